//! Replays the fuzz seeds (the shipped fixtures) and every input kept in
//! fixtures/fuzz-regressions/ through the fuzz harnesses: each must return without panicking.

mod common;
use common::*;

fn files(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut v: Vec<_> =
        std::fs::read_dir(dir).map(|r| r.filter_map(|e| e.ok().map(|e| e.path())).collect()).unwrap_or_default();
    v.sort();
    v
}

#[test]
fn adapter_inputs_never_panic() {
    let mut n = 0;
    let mut inputs = files(&fixtures().join("fuzz-regressions/adapter"));
    inputs.extend(files(&fixtures()).into_iter().filter(|p| p.extension().is_some_and(|e| e == "safetensors")));
    inputs.push(fixtures().join("peft-llama/adapter_model.safetensors"));
    inputs.push(fixtures().join("peft-dora-llama/adapter_model.safetensors"));
    for p in inputs {
        let data = std::fs::read(&p).unwrap();
        lorascope::fuzzing::adapter_bytes(&data);
        // Every truncation of a valid file must be handled too.
        for cut in [0, 1, 7, 8, 9, data.len() / 2, data.len().saturating_sub(1)] {
            lorascope::fuzzing::adapter_bytes(&data[..cut.min(data.len())]);
        }
        n += 1;
    }
    assert!(n >= 7, "seeds replayed: {n}");
}

#[test]
fn gguf_inputs_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let scratch = d.path().join("x.gguf");
    let mut inputs = files(&fixtures().join("fuzz-regressions/gguf"));
    inputs.push(fixtures().join("llama-tiny.gguf"));
    for p in &inputs {
        let data = std::fs::read(p).unwrap();
        lorascope::fuzzing::gguf_bytes(&data, &scratch);
        for cut in [0, 4, 8, 24, data.len() / 3, data.len().saturating_sub(1)] {
            lorascope::fuzzing::gguf_bytes(&data[..cut.min(data.len())], &scratch);
        }
    }
    assert!(!inputs.is_empty());
}

#[test]
fn peft_config_inputs_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let mut inputs = files(&fixtures().join("fuzz-regressions/peft_config"));
    inputs.push(fixtures().join("peft-llama/adapter_config.json"));
    inputs.push(fixtures().join("peft-dora-llama/adapter_config.json"));
    for p in &inputs {
        let data = std::fs::read(p).unwrap();
        lorascope::fuzzing::peft_config_bytes(&data, d.path());
        for cut in [0, 1, data.len() / 2, data.len().saturating_sub(1)] {
            lorascope::fuzzing::peft_config_bytes(&data[..cut.min(data.len())], d.path());
        }
    }
}

#[test]
fn gguf_model_inputs_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let scratch = d.path().join("x.gguf");
    let mut inputs = files(&fixtures().join("fuzz-regressions/gguf_model"));
    inputs.extend(files(&fixtures().join("fuzz-regressions/gguf")));
    inputs.push(fixtures().join("llama-tiny.gguf"));
    for p in &inputs {
        let data = std::fs::read(p).unwrap();
        lorascope::fuzzing::gguf_model_bytes(&data, &scratch);
        for cut in [0, 24, data.len() / 2, data.len().saturating_sub(1)] {
            lorascope::fuzzing::gguf_model_bytes(&data[..cut.min(data.len())], &scratch);
        }
    }
}

#[test]
fn report_inputs_never_panic() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("seed");
    let o = std::process::Command::new(bin())
        .args(["report", "fixtures/kohya-sd-lora.safetensors", "--out", out.to_str().unwrap(), "-q"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let mut inputs = files(&fixtures().join("fuzz-regressions/report"));
    inputs.push(out.join("report.json"));
    let scratch = d.path().join("scratch");
    for p in &inputs {
        let data = std::fs::read(p).unwrap();
        lorascope::fuzzing::report_bytes(&data, &scratch);
        for cut in [0, 1, data.len() / 2, data.len().saturating_sub(1)] {
            lorascope::fuzzing::report_bytes(&data[..cut.min(data.len())], &scratch);
        }
    }
}
