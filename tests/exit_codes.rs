//! Exit codes (README, `--help`): 0 ok, 1 a finding, 2 bad input or usage, 3 an internal error;
//! errors keep their underlying cause as `source()`.

mod common;

use std::process::Command;

fn lorascope(args: &[&str], fault: Option<&str>) -> std::process::Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_lorascope"));
    c.args(args).current_dir(env!("CARGO_MANIFEST_DIR"));
    match fault {
        Some(f) => c.env("LORASCOPE_FAULT", f),
        None => c.env_remove("LORASCOPE_FAULT"),
    };
    c.output().expect("run lorascope")
}

#[test]
fn an_internal_failure_exits_3_with_one_line() {
    let args = ["spectrum", "fixtures/kohya-sd-lora.safetensors", "--json", "-q"];
    let ok = lorascope(&args, None);
    assert_eq!(ok.status.code(), Some(0));
    let out = lorascope(&args, Some("spectrum"));
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim(), "lorascope: error: internal error: fault injected at stage spectrum (LORASCOPE_FAULT)");
    assert!(out.stdout.is_empty(), "no partial report on stdout");
    // The same fault in the probe stage of `probe`.
    let out = lorascope(
        &["probe", "fixtures/peft-llama", "--base", "fixtures/llama-tiny", "--works", "fixtures/demo/works", "-q"],
        Some("probe"),
    );
    assert_eq!(out.status.code(), Some(3), "{}", String::from_utf8_lossy(&out.stderr));
}

#[test]
fn a_scan_records_an_internal_failure_and_goes_on() {
    let out = lorascope(&["scan", "fixtures/kohya-sd-lora.safetensors", "-q"], Some("spectrum"));
    assert_eq!(out.status.code(), Some(0));
    let line: serde_json::Value = serde_json::from_slice(&out.stdout).expect("one JSON line");
    assert_eq!(line["error"]["kind"], "internal");
    assert_eq!(line["flags"], serde_json::json!(["unreadable"]));
}

#[test]
fn bad_input_and_usage_exit_2_and_findings_exit_1() {
    let missing = lorascope(&["inspect", "fixtures/no-such-adapter.safetensors"], None);
    assert_eq!(missing.status.code(), Some(2));
    let usage = lorascope(&["scan", "fixtures/kohya-sd-lora.safetensors", "--fail-on", "bogus", "-q"], None);
    assert_eq!(usage.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&usage.stderr).contains("bogus"));
    // kohya-sd-lora records few images and many steps: a finding, exit 1.
    let finding =
        lorascope(&["scan", "fixtures/kohya-sd-lora.safetensors", "--fail-on", "few-images-many-steps", "-q"], None);
    assert_eq!(finding.status.code(), Some(1));
}

#[test]
fn errors_keep_their_cause() {
    // A report directory without report.json: the I/O error is kept underneath ours.
    let dir = common::fixtures();
    let e = lorascope::pipeline::verify(&dir).unwrap_err();
    assert_eq!(e.exit_code(), 2);
    let source = std::error::Error::source(&e).expect("an I/O error underneath");
    let io = source.downcast_ref::<std::io::Error>().expect("std::io::Error");
    assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
    assert!(e.to_string().starts_with(&format!("{}: cannot read: ", dir.join("report.json").display())), "{e}");
}
