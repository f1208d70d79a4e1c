#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // One scratch directory per process (libFuzzer runs one input at a time per process).
    let dir = std::env::temp_dir().join(format!("lorascope-fuzz-peft-{}", std::process::id()));
    lorascope::fuzzing::peft_config_bytes(data, &dir);
});
