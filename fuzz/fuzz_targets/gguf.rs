#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One scratch file per process (libFuzzer runs one input at a time per process).
    let scratch = std::env::temp_dir().join(format!("lorascope-fuzz-{}.gguf", std::process::id()));
    lorascope::fuzzing::gguf_bytes(data, &scratch);
});
