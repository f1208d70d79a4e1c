//! Issue #12, items 3 and 4: layouts real uploads use and messages that misled, each on a
//! small file the test writes in that layout.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

use lorascope::fixtures::SafetensorsBuilder;
use lorascope::rng::Rng;
use safetensors::Dtype;

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(bin()).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn a_git_lfs_pointer_is_named_as_such() {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("lora.safetensors");
    let oid = "4d7a2146a1b5a2f2c7d5c8f0c3e1a9b8e7d6c5b4a3f2e1d0c9b8a7f6e5d4c3b2";
    std::fs::write(&p, format!("version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize 151108832\n"))
        .unwrap();
    let (code, _, err) = run(&["inspect", s(&p)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("Git LFS pointer") && err.contains(oid) && err.contains("151108832 bytes"), "{err}");
    assert!(!err.contains("header length"), "{err}");
    // The same in a scan record.
    let (_, out, _) = run(&["scan", s(&p), "-q"]);
    assert!(out.contains("Git LFS pointer"), "{out}");
}

#[test]
fn autov1_is_computed_for_small_files_as_a1111_does() {
    // A1111's model_hash seeks to 1 MiB and hashes what it reads there: nothing for a file under
    // 1 MiB, so every such file has the SHA-256 of the empty input, e3b0c442.
    let (code, out, err) = run(&["inspect", "fixtures/kohya-sd-lora.safetensors", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["adapter"]["hashes"]["autov1"], "e3b0c442");
    // A 1.5 MiB file: the hash of its bytes from 1 MiB to the end (512 KiB), computed here with
    // the system's sha256sum.
    let d = tempfile::tempdir().unwrap();
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(3);
    b.random(&mut rng, "lora_unet_m.lora_down.weight", &[8, 40_000], 0.5, Dtype::F32);
    b.random(&mut rng, "lora_unet_m.lora_up.weight", &[16, 8], 0.5, Dtype::F32);
    let p = d.path().join("mid.safetensors");
    b.write(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    assert!(bytes.len() > (1 << 20) && bytes.len() < (1 << 20) + (64 << 10) + (1 << 20));
    let window = d.path().join("window");
    std::fs::write(&window, &bytes[1 << 20..bytes.len().min((1 << 20) + (64 << 10))]).unwrap();
    let o = Command::new("sha256sum").arg(&window).output().unwrap();
    let want = String::from_utf8_lossy(&o.stdout)[..8].to_string();
    let (_, out, _) = run(&["inspect", s(&p), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["adapter"]["hashes"]["autov1"], want.as_str());
}

#[test]
fn a_forced_format_the_keys_do_not_follow_is_an_error() {
    // PEFT keys read with --format kohya used to become rank-0 (IA)³ modules, one per tensor.
    let (code, out, err) = run(&["inspect", "fixtures/peft-llama", "--format", "kohya"]);
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("--format kohya") && err.contains("base_model.model."), "{err}");
    assert!(!out.contains("ia3"));
}

#[test]
fn the_base_model_hint_appears_only_for_files_that_look_like_one() {
    let d = tempfile::tempdir().unwrap();
    // Not a base model: a few tensors of no known naming scheme.
    let mut b = SafetensorsBuilder::new();
    b.add("foo", &[2], &[1.0, 2.0], Dtype::F32).add("bar.baz", &[1], &[1.0], Dtype::F32);
    let p = d.path().join("odd.safetensors");
    b.write(&p).unwrap();
    let (code, _, err) = run(&["inspect", s(&p)]);
    assert_eq!(code, 2);
    assert!(err.contains("no adapter tensors recognised") && !err.contains("base model"), "{err}");
    // A base model (the SD fixture): the hint is there.
    let (code, _, err) = run(&["inspect", "fixtures/sd-tiny-base.safetensors"]);
    assert_eq!(code, 2);
    assert!(err.contains("looks like a base model"), "{err}");
}

/// diffusers' `save_attn_procs` layout: UNet block names without `unet.`, `processor.to_q_lora`.
fn attn_procs_file(dir: &Path) -> std::path::PathBuf {
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(11);
    let m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor";
    for (proj, out) in [("to_q", 8), ("to_out", 8)] {
        b.random(&mut rng, &format!("{m}.{proj}_lora.down.weight"), &[2, 8], 0.5, Dtype::F32);
        b.random(&mut rng, &format!("{m}.{proj}_lora.up.weight"), &[out, 2], 0.5, Dtype::F32);
    }
    let p = dir.join("pytorch_lora_weights.safetensors");
    b.write(&p).unwrap();
    p
}

#[test]
fn diffusers_attention_processor_files_are_detected_without_a_flag() {
    let d = tempfile::tempdir().unwrap();
    let p = attn_procs_file(d.path());
    let (code, out, err) = run(&["inspect", s(&p), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["adapter"]["format"], "diffusers");
    let names: Vec<&str> =
        v["adapter"]["modules"].as_array().unwrap().iter().map(|m| m["base_key"].as_str().unwrap()).collect();
    assert!(names.iter().any(|n| n.ends_with("attn1.to_q.weight")), "{names:?}");
    assert!(names.iter().any(|n| n.ends_with("attn1.to_out.0.weight")), "{names:?}");
    // ΔW = up · down (scale 1, no alpha), against the plain reference.
    let (code, out, _) = run(&["spectrum", s(&p), "--json", "-q"]);
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let m = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora";
    let up = mat(&p, &format!("{m}.up.weight"));
    let down = mat(&p, &format!("{m}.down.weight"));
    let dense = up.matmul(&down);
    let fro = dense.v.iter().map(|x| x * x).sum::<f64>().sqrt();
    let got = v["modules"]
        .as_array()
        .unwrap()
        .iter()
        .find(|x| x["base_key"].as_str().unwrap().ends_with("attn1.to_q.weight"))
        .unwrap();
    assert!((got["fro"].as_f64().unwrap() - fro).abs() < 1e-5 * fro, "{} vs {fro}", got["fro"]);
    let (_, out, _) = run(&["scan", s(&p), "-q"]);
    let rec: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(rec["error"], serde_json::Value::Null, "{rec}");
    assert_eq!(rec["format"], "diffusers");
}

#[test]
fn an_adapter_on_some_layers_is_described_by_the_layers_it_touches() {
    // The demo LoRA adapts layers 24–29 of SmolLM2's 30 (layers_to_transform): 6 layers, not
    // "30" (the highest index + 1).
    let (code, out, err) = run(&["inspect", "fixtures/demo/smollm2-demo-lora", "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["adapter"]["architecture"], "llama-like decoder (adapter touches 6 layers: 24–29)");
    let (_, out, _) = run(&["inspect", "fixtures/peft-llama", "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["adapter"]["architecture"], "llama-like decoder (adapter touches 2 layers)");
}

#[test]
fn layers_and_modules_are_in_natural_order() {
    // Text order put layers.10 between layers.1 and layers.2.
    let d = tempfile::tempdir().unwrap();
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(9);
    for l in [10, 2, 1] {
        let m = format!("base_model.model.model.layers.{l}.self_attn.q_proj");
        b.random(&mut rng, &format!("{m}.lora_A.weight"), &[2, 8], 0.5, Dtype::F32);
        b.random(&mut rng, &format!("{m}.lora_B.weight"), &[8, 2], 0.5, Dtype::F32);
    }
    let p = d.path().join("adapter_model.safetensors");
    b.write(&p).unwrap();
    let (code, out, err) = run(&["spectrum", s(&p), "--json", "-q"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let layers: Vec<&str> = v["layers"].as_array().unwrap().iter().map(|l| l["layer"].as_str().unwrap()).collect();
    assert_eq!(layers, ["model.layers.1", "model.layers.2", "model.layers.10"]);
    let modules: Vec<&str> = v["modules"].as_array().unwrap().iter().map(|m| m["name"].as_str().unwrap()).collect();
    assert!(
        modules[0].contains("layers.1.") && modules[1].contains("layers.2.") && modules[2].contains("layers.10."),
        "{modules:?}"
    );
    let (_, text, _) = run(&["spectrum", s(&p), "-q"]);
    let at = |x: &str| text.find(x).unwrap();
    assert!(at("model.layers.2 ") < at("model.layers.10 "), "{text}");
}

#[test]
fn the_training_metadata_users_look_for_is_shown() {
    let d = tempfile::tempdir().unwrap();
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(1);
    b.random(&mut rng, "lora_unet_m.lora_down.weight", &[2, 8], 0.5, Dtype::F32);
    b.random(&mut rng, "lora_unet_m.lora_up.weight", &[8, 2], 0.5, Dtype::F32);
    for (k, v) in [
        ("ss_training_comment", "trigger: jdoe_style"),
        ("modelspec.trigger_phrase", "jdoe_style"),
        ("ss_optimizer", "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)"),
        ("ss_learning_rate", "0.0001"),
        ("ss_unet_lr", "0.0001"),
        ("ss_text_encoder_lr", "5e-05"),
        ("ss_seed", "42"),
        ("ss_training_started_at", "1709210096.75"),
        ("ss_training_finished_at", "1709213696.0"),
        ("ss_network_args", r#"{"conv_dim": "8"}"#),
        ("ss_clip_skip", "2"),
        ("ss_noise_offset", "0.05"),
        ("ss_new_sd_model_hash", "6ce0161689"),
        ("ss_sd_model_hash", "7460a6fa"),
    ] {
        b.meta(k, v);
    }
    let p = d.path().join("meta.safetensors");
    b.write(&p).unwrap();
    let (code, out, err) = run(&["inspect", s(&p)]);
    assert_eq!(code, 0, "{err}");
    for want in [
        "trigger phrase     jdoe_style",
        "comment            trigger: jdoe_style",
        "optimizer          bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)",
        "learning rates     0.0001, unet 0.0001, text encoder 5e-05",
        "seed               42",
        "started            2024-02-29T12:34:56Z (1709210096.75)",
        "finished           2024-02-29T13:34:56Z (1709213696.0)",
        "network args       {\"conv_dim\": \"8\"}",
        "clip skip          2",
        "noise offset       0.05",
        "base model hash    6ce0161689, legacy 7460a6fa",
    ] {
        assert!(out.contains(want), "missing {want:?} in\n{out}");
    }
    let (_, out, _) = run(&["inspect", s(&p), "--json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        v["adapter"]["metadata"]["training"]["optimizer"],
        "bitsandbytes.optim.adamw.AdamW8bit(weight_decay=0.1)"
    );
    let out_dir = d.path().join("rep");
    run(&["report", s(&p), "--out", s(&out_dir), "-q"]);
    let html = std::fs::read_to_string(out_dir.join("report.html")).unwrap();
    assert!(html.contains("training finished") && html.contains("2024-02-29T13:34:56Z"), "in report.html");
    // PEFT: the base model and task type come from adapter_config.json.
    let (_, out, _) = run(&["inspect", "fixtures/demo/smollm2-demo-lora"]);
    assert!(out.contains("base model         models/SmolLM2-135M-Instruct.Q4_1.gguf"), "{out}");
    assert!(out.contains("task type          CAUSAL_LM"), "{out}");
}
