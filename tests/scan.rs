//! `lorascope scan`: every file gives one JSON line, bad files become error records, flags
//! follow their documented thresholds, shards partition the files.

mod common;
use common::*;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Command;

use lorascope::fixtures::{kohya_sd_lora, SafetensorsBuilder};
use safetensors::Dtype;

fn scan(args: &[&str]) -> (i32, Vec<serde_json::Value>, String) {
    let o = Command::new(bin()).arg("scan").args(args).output().unwrap();
    let lines = String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    (o.status.code().unwrap(), lines, String::from_utf8_lossy(&o.stderr).into_owned())
}

/// A hub-like directory: every adapter fixture (PEFT directories included), a broken file, an
/// empty file, a pickle, and a base model uploaded by mistake.
fn hub(dir: &Path) -> usize {
    let mut n = 0;
    for e in std::fs::read_dir(fixtures()).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_str().unwrap().to_string();
        if name.starts_with("peft-") {
            let d = dir.join("users/someone").join(&name);
            std::fs::create_dir_all(&d).unwrap();
            for f in ["adapter_model.safetensors", "adapter_config.json"] {
                std::fs::copy(p.join(f), d.join(f)).unwrap();
            }
            n += 1;
        } else if name.ends_with(".safetensors") {
            std::fs::copy(&p, dir.join(&name)).unwrap();
            n += 1;
        }
    }
    let full = kohya_sd_lora(4).to_bytes();
    std::fs::write(dir.join("broken.safetensors"), &full[..full.len() - 7]).unwrap();
    std::fs::write(dir.join("empty.safetensors"), b"").unwrap();
    std::fs::write(dir.join("model.ckpt"), b"\x80\x02cos\nsystem\n(S'id'\ntR.").unwrap();
    std::fs::write(dir.join("notes.txt"), b"not scanned").unwrap();
    n + 3
}

#[test]
fn mixed_directory_gives_one_line_per_file_and_error_records() {
    let d = tempfile::tempdir().unwrap();
    let n = hub(d.path());
    let (code, lines, err) = scan(&[d.path().to_str().unwrap(), "--quiet"]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(lines.len(), n, "one line per candidate file");
    let paths: Vec<&str> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
    let mut sorted = paths.clone();
    sorted.sort();
    assert_eq!(paths, sorted, "deterministic path order");
    let by = |suffix: &str| lines.iter().find(|l| l["path"].as_str().unwrap().ends_with(suffix)).unwrap();
    for bad in ["broken.safetensors", "empty.safetensors", "model.ckpt", "sd-tiny-base.safetensors"] {
        let l = by(bad);
        assert_eq!(l["error"]["kind"], "input", "{bad}");
        assert!(l["error"]["message"].as_str().unwrap().contains(bad));
        assert_eq!(l["flags"], serde_json::json!(["unreadable"]));
    }
    assert!(by("model.ckpt")["error"]["message"].as_str().unwrap().contains("pickle"));
    // Even a broken file's hash is recorded.
    assert!(by("broken.safetensors")["sha256"].is_string());
    let k = by("kohya-sd-lora.safetensors");
    assert!(k["error"].is_null());
    assert_eq!(k["format"], "kohya");
    assert_eq!(k["train_images"], 20);
    assert_eq!(k["top_tags"][0]["tag"], "demo_artist");
    assert!(k["capacity_bits"].as_f64().unwrap() > 0.0);
    assert_eq!(by("peft-llama")["format"], "peft");
    assert!(err.contains("errors") && err.contains("files"), "summary on stderr: {err}");
    // Two runs, same bytes.
    let again =
        Command::new(bin()).args(["scan", d.path().to_str().unwrap(), "--quiet", "--jobs", "1"]).output().unwrap();
    let first = Command::new(bin()).args(["scan", d.path().to_str().unwrap(), "--quiet"]).output().unwrap();
    assert_eq!(again.stdout, first.stdout, "--jobs does not change the output");
    // --fail-on turns flags into exit code 1.
    assert_eq!(scan(&[d.path().to_str().unwrap(), "--quiet", "--fail-on", "unreadable"]).0, 1);
    assert_eq!(scan(&[d.path().to_str().unwrap(), "--quiet", "--fail-on", "hash-mismatch"]).0, 0);
    assert_eq!(scan(&[d.path().to_str().unwrap(), "--quiet", "--fail-on", "any"]).0, 1);
    let (code, _, err) = scan(&[d.path().to_str().unwrap(), "--quiet", "--fail-on", "nonsense"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn shards_cover_every_file_exactly_once() {
    let d = tempfile::tempdir().unwrap();
    let n = hub(d.path());
    let mut seen = vec![];
    for i in 0..3 {
        let (code, lines, _) = scan(&[d.path().to_str().unwrap(), "--quiet", "--shard", &format!("{i}/3")]);
        assert_eq!(code, 0);
        seen.extend(lines.iter().map(|l| l["path"].as_str().unwrap().to_string()));
    }
    let unique: BTreeSet<&String> = seen.iter().collect();
    assert_eq!(seen.len(), n);
    assert_eq!(unique.len(), n);
    assert_eq!(scan(&[d.path().to_str().unwrap(), "--shard", "3/3"]).0, 2, "I must be below N");
}

fn planted(dir: &Path, name: &str, f: impl FnOnce(&mut SafetensorsBuilder)) -> String {
    let mut b = SafetensorsBuilder::new();
    b.add("lora_unet_x.lora_down.weight", &[2, 8], &[0.5; 16], Dtype::F32);
    b.add("lora_unet_x.lora_up.weight", &[8, 2], &[0.25; 16], Dtype::F32);
    f(&mut b);
    let p = dir.join(name);
    b.write(&p).unwrap();
    p.to_str().unwrap().to_string()
}

#[test]
fn flags_follow_their_thresholds() {
    let d = tempfile::tempdir().unwrap();
    // ΔW = 0.25·0.5·2 in every entry: rank 1, 1·(8+8−1) = 15 effective params = 54 bits.
    let few = planted(d.path(), "few.safetensors", |b| {
        b.meta("ss_num_train_images", "10").meta("ss_max_train_steps", "1000");
    });
    let fine = planted(d.path(), "fine.safetensors", |b| {
        b.meta("ss_num_train_images", "10").meta("ss_max_train_steps", "999");
    });
    // 54 bits / 1 image = 6.75 bytes ≥ 4·4·0.3 = 4.8 bytes: flagged; at 8×8 (19.2 bytes) not.
    let cap = planted(d.path(), "cap.safetensors", |b| {
        b.meta("ss_num_train_images", "1").meta("ss_resolution", "(4, 4)");
    });
    let nocap = planted(d.path(), "nocap.safetensors", |b| {
        b.meta("ss_num_train_images", "1").meta("ss_resolution", "(8, 8)");
    });
    let forged = planted(d.path(), "forged.safetensors", |b| {
        b.meta("sshs_model_hash", &"ab".repeat(32));
    });
    let nan = planted(d.path(), "nan.safetensors", |b| {
        b.add("lora_unet_y.lora_down.weight", &[1, 2], &[f32::NAN, 1.0], Dtype::F32);
        b.add("lora_unet_y.lora_up.weight", &[2, 1], &[1.0, 1.0], Dtype::F32);
    });
    let (code, lines, _) = scan(&[&few, &fine, &cap, &nocap, &forged, &nan, "--quiet"]);
    assert_eq!(code, 0);
    let flags = |p: &str| -> Vec<String> {
        let l = lines.iter().find(|l| l["path"] == p).unwrap();
        l["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().to_string()).collect()
    };
    assert_eq!(flags(&few), ["few-images-many-steps"]);
    assert!(flags(&fine).is_empty());
    assert_eq!(flags(&cap), ["capacity-per-image"]);
    assert!(flags(&nocap).is_empty());
    assert_eq!(flags(&forged), ["hash-mismatch"]);
    assert_eq!(flags(&nan), ["nonfinite-weights"], "NaN is a flag, not an unreadable file");
    let c = lines.iter().find(|l| l["path"] == cap.as_str()).unwrap();
    assert_eq!(c["capacity_bits"].as_f64().unwrap(), 15.0 * 3.6);
}

#[test]
fn list_file_of_paths() {
    let d = tempfile::tempdir().unwrap();
    let list = d.path().join("list.txt");
    let a = fixtures().join("lycoris-loha.safetensors");
    let b = fixtures().join("diffusers-lora.safetensors");
    std::fs::write(&list, format!("# uploads\n{}\n\n{}\n", a.display(), b.display())).unwrap();
    let (code, lines, _) = scan(&["--list", list.to_str().unwrap(), "--quiet"]);
    assert_eq!(code, 0);
    assert_eq!(lines.len(), 2);
}
