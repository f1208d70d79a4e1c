#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let dir = std::env::temp_dir().join(format!("lorascope-fuzz-report-{}", std::process::id()));
    lorascope::fuzzing::report_bytes(data, &dir);
});
