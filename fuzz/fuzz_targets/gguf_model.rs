#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let scratch = std::env::temp_dir().join(format!("lorascope-fuzz-model-{}.gguf", std::process::id()));
    lorascope::fuzzing::gguf_model_bytes(data, &scratch);
});
