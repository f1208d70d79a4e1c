//! Every bad input of issue #2 through the binary: exit code 2 and one line on stderr that
//! names the file and the problem. Never a panic.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use lorascope::fixtures::{kohya_sd_lora, SafetensorsBuilder};
use safetensors::Dtype;

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

/// Assert exit code 2 and a single stderr line naming `file` and containing `what`.
fn rejects(args: &[&str], file: &Path, what: &str) {
    let (code, _, err) = run(args);
    assert_eq!(code, 2, "args {args:?}: stderr {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&file.display().to_string()), "names {}: {err}", file.display());
    assert!(err.to_lowercase().contains(&what.to_lowercase()), "says {what:?}: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

fn tmp() -> tempfile::TempDir {
    tempfile::tempdir().unwrap()
}

fn write(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, bytes).unwrap();
    p
}

/// A safetensors file with a hand-written header.
fn with_header(header: &str, data: &[u8]) -> Vec<u8> {
    let mut b = (header.len() as u64).to_le_bytes().to_vec();
    b.extend(header.as_bytes());
    b.extend(data);
    b
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn empty_file() {
    let d = tmp();
    let p = write(d.path(), "empty.safetensors", b"");
    rejects(&["inspect", s(&p)], &p, "empty file");
}

#[test]
fn truncated_file() {
    let d = tmp();
    let full = kohya_sd_lora(4).to_bytes();
    let p = write(d.path(), "cut.safetensors", &full[..full.len() / 2]);
    rejects(&["inspect", s(&p)], &p, "truncated");
    let p = write(d.path(), "tiny.safetensors", &full[..5]);
    rejects(&["inspect", s(&p)], &p, "truncated");
}

#[test]
fn header_length_beyond_file() {
    let d = tmp();
    let mut b = 1000u64.to_le_bytes().to_vec();
    b.extend(b"{}");
    let p = write(d.path(), "long.safetensors", &b);
    rejects(&["inspect", s(&p)], &p, "exceeds the file size");
}

#[test]
fn invalid_header_json() {
    let d = tmp();
    let p = write(d.path(), "json.safetensors", &with_header("{\"a\": nope}", b""));
    rejects(&["inspect", s(&p)], &p, "invalid header JSON");
}

#[test]
fn offsets_out_of_range_or_overlapping() {
    let d = tmp();
    let h = r#"{"x.lora_down.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"x.lora_up.weight":{"dtype":"F32","shape":[2,1],"data_offsets":[4,12]}}"#;
    let p = write(d.path(), "overlap.safetensors", &with_header(h, &[0u8; 12]));
    rejects(&["inspect", s(&p)], &p, "overlapping");
    let h = r#"{"x.lora_down.weight":{"dtype":"F32","shape":[1,2],"data_offsets":[0,8]},"x.lora_up.weight":{"dtype":"F32","shape":[2,1],"data_offsets":[8,16]}}"#;
    let p = write(d.path(), "range.safetensors", &with_header(h, &[0u8; 10]));
    rejects(&["inspect", s(&p)], &p, "does not match the file size");
    let h = r#"{"x.lora_down.weight":{"dtype":"F32","shape":[1000000000000],"data_offsets":[0,8]}}"#;
    // A header claiming 10^12 elements in 8 bytes: rejected before any allocation.
    let p = write(d.path(), "huge.safetensors", &with_header(h, &[0u8; 8]));
    rejects(&["inspect", s(&p)], &p, "shape does not match its byte range");
}

#[test]
fn rank_mismatch() {
    let d = tmp();
    let mut b = SafetensorsBuilder::new();
    b.add("lora_unet_x.lora_down.weight", &[4, 8], &[0.1; 32], Dtype::F32);
    b.add("lora_unet_x.lora_up.weight", &[8, 3], &[0.1; 24], Dtype::F32);
    let p = d.path().join("rank.safetensors");
    b.write(&p).unwrap();
    rejects(&["inspect", s(&p)], &p, "rank mismatch");
}

#[test]
fn module_missing_from_base() {
    let a = fixtures().join("kohya-sd-lora.safetensors");
    let base = fixtures().join("llama-tiny");
    rejects(&["inspect", s(&a), "--base", s(&base)], &a, "match nothing");
    // Downgraded to a warning on request.
    let (code, out, _) = run(&["inspect", s(&a), "--base", s(&base), "--allow-unmatched"]);
    assert_eq!(code, 0);
    assert!(out.contains("match nothing in the base"), "{out}");
}

#[test]
fn shape_mismatch_with_base() {
    let d = tmp();
    let mut b = SafetensorsBuilder::new();
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    b.add(&format!("{n}.lora_down.weight"), &[2, 12], &[0.1; 24], Dtype::F32);
    b.add(&format!("{n}.lora_up.weight"), &[8, 2], &[0.1; 16], Dtype::F32);
    let p = d.path().join("shape.safetensors");
    b.write(&p).unwrap();
    let base = fixtures().join("sd-tiny-base.safetensors");
    rejects(&["inspect", s(&p), "--base", s(&base)], &p, "shape mismatch");
}

#[test]
fn pickle_formats_are_refused_unread() {
    let d = tmp();
    for ext in ["bin", "pt", "ckpt"] {
        // Contents that would run code if unpickled; they must never be read as pickle.
        let p = write(d.path(), &format!("model.{ext}"), b"\x80\x02cos\nsystem\n(S'echo pwned'\ntR.");
        rejects(&["inspect", s(&p)], &p, "pickle");
    }
    let dir = d.path().join("peft");
    std::fs::create_dir(&dir).unwrap();
    let p = write(&dir, "adapter_model.bin", b"\x80\x02}q\x00.");
    rejects(&["inspect", s(&dir)], &p, "pickle");
    // A pickle base is refused too.
    let a = fixtures().join("kohya-sd-lora.safetensors");
    let base = write(d.path(), "base.ckpt", b"PK\x03\x04");
    rejects(&["inspect", s(&a), "--base", s(&base)], &base, "pickle");
    // A zip/pickle checkpoint renamed to .safetensors is recognised as well.
    let p = write(d.path(), "renamed.safetensors", b"PK\x03\x04\x14\x00\x00\x00\x08\x00");
    rejects(&["inspect", s(&p)], &p, "pickle");
}

#[test]
fn directory_without_adapter_and_missing_files() {
    let d = tmp();
    write(d.path(), "README.txt", b"nothing here");
    rejects(&["inspect", s(d.path())], d.path(), "no adapter");
    let missing = d.path().join("nope.safetensors");
    rejects(&["inspect", s(&missing)], &missing, "no such file");
    let a = fixtures().join("kohya-sd-lora.safetensors");
    rejects(&["inspect", s(&a), "--base", s(&missing)], &missing, "no such file");
}

#[test]
fn a_base_model_given_as_adapter() {
    let base = fixtures().join("llama-tiny/model.safetensors");
    rejects(&["inspect", s(&base)], &base, "it looks like a base model (full weights), not an adapter");
}

#[test]
fn nan_and_inf_are_counted_per_module() {
    let d = tmp();
    let mut b = SafetensorsBuilder::new();
    b.add("lora_unet_x.lora_down.weight", &[1, 4], &[f32::NAN, 1.0, f32::INFINITY, 2.0], Dtype::F32);
    b.add("lora_unet_x.lora_up.weight", &[2, 1], &[1.0, f32::NEG_INFINITY], Dtype::F32);
    let p = d.path().join("nan.safetensors");
    b.write(&p).unwrap();
    let (code, out, _) = run(&["inspect", s(&p), "--json"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["adapter"]["modules"][0]["nonfinite"], 3);
    assert!(v["warnings"].as_array().unwrap().iter().any(|w| w.as_str().unwrap().contains("lora_unet_x: 3 NaN/Inf")));
}

#[test]
fn gguf_base_with_an_empty_or_absurd_tensor_shape() {
    // Found by fuzzing: a zero dimension made candle's reader build a slice from a dangling
    // pointer. The base is refused before any tensor is read.
    let a = fixtures().join("peft-llama");
    let g = fixtures().join("fuzz-regressions/gguf/zero-dim-tensor.gguf");
    rejects(&["inspect", s(&a), "--base", s(&g)], &g, "empty or larger than the file");
    let d = tmp();
    let p = write(d.path(), "junk.gguf", b"GGUF\x03\x00\x00\x00garbage");
    rejects(&["inspect", s(&a), "--base", s(&p)], &p, "malformed GGUF header");
}
