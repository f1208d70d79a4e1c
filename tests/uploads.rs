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

/// The SD 1.x/2.x UNet's transformer blocks in the order `lora_diffusion` walks them (down,
/// up, mid: diffusers registers `up_blocks` before `mid_block`), each with its width and its
/// block in original-LDM naming (layers_per_block 2), written out here by hand.
const WALK: [(&str, usize, &str); 16] = [
    ("down_blocks.0.attentions.0", 8, "input_blocks.1.1"),
    ("down_blocks.0.attentions.1", 8, "input_blocks.2.1"),
    ("down_blocks.1.attentions.0", 16, "input_blocks.4.1"),
    ("down_blocks.1.attentions.1", 16, "input_blocks.5.1"),
    ("down_blocks.2.attentions.0", 32, "input_blocks.7.1"),
    ("down_blocks.2.attentions.1", 32, "input_blocks.8.1"),
    ("up_blocks.1.attentions.0", 32, "output_blocks.3.1"),
    ("up_blocks.1.attentions.1", 32, "output_blocks.4.1"),
    ("up_blocks.1.attentions.2", 32, "output_blocks.5.1"),
    ("up_blocks.2.attentions.0", 16, "output_blocks.6.1"),
    ("up_blocks.2.attentions.1", 16, "output_blocks.7.1"),
    ("up_blocks.2.attentions.2", 16, "output_blocks.8.1"),
    ("up_blocks.3.attentions.0", 8, "output_blocks.9.1"),
    ("up_blocks.3.attentions.1", 8, "output_blocks.10.1"),
    ("up_blocks.3.attentions.2", 8, "output_blocks.11.1"),
    ("mid_block.attentions.0", 32, "middle_block.1"),
];
const CTX: usize = 12;

/// One transformer block's layers as lora_diffusion stores them: (diffusers suffix, [out, in]).
/// `old_order`: the diffusers of late 2022 registered `attn1`, `ff`, `attn2`.
fn block_layers(c: usize, old_order: bool) -> Vec<(String, [usize; 2])> {
    let attn = |a: &str, kv_in: usize| {
        vec![
            (format!("{a}.to_q"), [c, c]),
            (format!("{a}.to_k"), [c, kv_in]),
            (format!("{a}.to_v"), [c, kv_in]),
            (format!("{a}.to_out.0"), [c, c]),
        ]
    };
    let ff = vec![("ff.net.0.proj".to_string(), [8 * c, c])];
    if old_order {
        [attn("attn1", c), ff, attn("attn2", CTX)].concat()
    } else {
        [attn("attn1", c), attn("attn2", CTX), ff].concat()
    }
}

/// A safeloras file (UNet with the default targets, a 2-layer CLIP text encoder, one
/// textual-inversion token) and, in the same order, the diffusers path of every UNet layer.
fn safeloras_file(dir: &Path, old_order: bool, unet_targets: &str) -> (std::path::PathBuf, Vec<String>) {
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(21);
    let mut paths = vec![];
    let mut i = 0;
    for (block, c, _) in WALK {
        for (suffix, [out, inp]) in block_layers(c, old_order) {
            b.random(&mut rng, &format!("unet:{i}:up"), &[out, 2], 0.5, Dtype::F16);
            b.random(&mut rng, &format!("unet:{i}:down"), &[2, inp], 0.5, Dtype::F16);
            b.meta(&format!("unet:{i}:rank"), "2");
            paths.push(format!("unet.{block}.transformer_blocks.0.{suffix}"));
            i += 1;
        }
    }
    for j in 0..8 {
        b.random(&mut rng, &format!("text_encoder:{j}:up"), &[10, 1], 0.5, Dtype::F16);
        b.random(&mut rng, &format!("text_encoder:{j}:down"), &[1, 10], 0.5, Dtype::F16);
        b.meta(&format!("text_encoder:{j}:rank"), "1");
    }
    b.random(&mut rng, "<s1>", &[10], 0.5, Dtype::F32);
    b.meta("<s1>", "<embed>");
    b.meta("unet", unet_targets);
    b.meta("text_encoder", "[\"CLIPAttention\"]");
    let p = dir.join(format!("safeloras-{old_order}.safetensors"));
    b.write(&p).unwrap();
    (p, paths)
}

/// An SD base in original-LDM naming holding the weights the safeloras layers change.
fn ldm_base(dir: &Path) -> std::path::PathBuf {
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(22);
    for (_, c, ldm) in WALK {
        for (suffix, [out, inp]) in block_layers(c, false) {
            b.random(
                &mut rng,
                &format!("model.diffusion_model.{ldm}.transformer_blocks.0.{suffix}.weight"),
                &[out, inp],
                0.1,
                Dtype::F32,
            );
        }
    }
    for l in 0..2 {
        for p in ["q_proj", "k_proj", "v_proj", "out_proj"] {
            let k = format!("cond_stage_model.transformer.text_model.encoder.layers.{l}.self_attn.{p}.weight");
            b.random(&mut rng, &k, &[10, 10], 0.1, Dtype::F32);
        }
    }
    let p = dir.join("base.safetensors");
    b.write(&p).unwrap();
    p
}

#[test]
fn cloneofsimo_safeloras_are_read_with_the_weights_each_position_changes() {
    let d = tempfile::tempdir().unwrap();
    let targets = "[\"CrossAttention\", \"Attention\", \"GEGLU\"]";
    for old_order in [false, true] {
        let (p, paths) = safeloras_file(d.path(), old_order, targets);
        let (code, out, err) = run(&["inspect", s(&p), "--json"]);
        assert_eq!(code, 0, "{err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["adapter"]["format"], "safeloras");
        let modules = v["adapter"]["modules"].as_array().unwrap();
        assert_eq!(modules.len(), 16 * 9 + 8);
        let key_of = |name: &str| {
            modules.iter().find(|m| m["name"] == name).unwrap_or_else(|| panic!("{name}"))["base_key"].clone()
        };
        for (i, path) in paths.iter().enumerate() {
            assert_eq!(key_of(&format!("unet:{i}")), format!("{path}.weight"), "old order {old_order}");
        }
        // transformers' CLIPAttention registers k, v, q, out.
        assert_eq!(key_of("text_encoder:2"), "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.weight");
        assert_eq!(key_of("text_encoder:7"), "text_encoder.text_model.encoder.layers.1.self_attn.out_proj.weight");
        let warnings = v["warnings"].to_string();
        assert!(warnings.contains("textual-inversion") && warnings.contains("<s1>"), "{warnings}");
        assert!(!warnings.contains("positions"), "{warnings}");
    }

    // ΔW = up·down (lora_diffusion folds the scale into up), against the plain reference; and
    // against an original-LDM base every layer resolves to the weight the walk names.
    let (p, paths) = safeloras_file(d.path(), true, targets);
    let base = ldm_base(d.path());
    let (a, _) = lorascope::open(&p, Some(&base), &lorascope::LoadOptions::default()).unwrap();
    assert_eq!(a.modules.len(), 152);
    let m = a.modules.iter().find(|m| m.name == "unet:4").unwrap();
    assert_eq!(m.base_key, "model.diffusion_model.input_blocks.1.1.transformer_blocks.0.ff.net.0.proj.weight");
    assert!(paths[4].ends_with("ff.net.0.proj"));
    let want = mat(&p, "unet:4:up").matmul(&mat(&p, "unet:4:down"));
    use lorascope::spectral::DeltaW;
    assert_close(&m.dense_delta(None).unwrap(), &want, 1e-6);
    let m = a.modules.iter().find(|m| m.name == "unet:143").unwrap();
    assert_eq!(m.base_key, "model.diffusion_model.middle_block.1.transformer_blocks.0.attn2.to_out.0.weight");

    // scan reads it without a flag.
    let (code, out, err) = run(&["scan", s(&p), "-q"]);
    assert_eq!(code, 0, "{err}");
    let rec: serde_json::Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(rec["format"], "safeloras", "{out}");
    assert_eq!(rec["modules"], 152);
}

#[test]
fn safeloras_whose_order_is_unknown_keep_positional_names_and_say_so() {
    // Extended targets add ResnetBlock2D convolutions, whose place in the walk lorascope does
    // not know: the layers keep their positions as names, never a guessed weight.
    let d = tempfile::tempdir().unwrap();
    let (p, _) = safeloras_file(d.path(), false, "[\"ResnetBlock2D\", \"CrossAttention\", \"Attention\", \"GEGLU\"]");
    let (code, out, err) = run(&["inspect", s(&p), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let modules = v["adapter"]["modules"].as_array().unwrap();
    let m = modules.iter().find(|m| m["name"] == "unet:0").unwrap();
    assert_eq!(m["base_key"], "unet:0");
    let warnings = v["warnings"].to_string();
    assert!(warnings.contains("safeloras component unet") && warnings.contains("ResnetBlock2D"), "{warnings}");
    // Against a base, the positional names match nothing: an error naming them, not a guess.
    let base = ldm_base(d.path());
    let (code, _, err) = run(&["inspect", s(&p), "--base", s(&base)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("unet:0"), "{err}");
}

/// A kohya file as sd-scripts saves it: the hashes are taken on the tensors re-serialised with
/// only the `ss_` metadata, then written into the saved file beside other metadata. The legacy
/// hash is computed here from the bytes of that re-serialisation (SHA-256 of the 64 KiB at
/// 1 MiB, first 8 hex digits, as sd-scripts' `addnet_hash_legacy`).
fn sd_scripts_file(dir: &Path, edit_after: Option<(&str, &str)>) -> (std::path::PathBuf, String) {
    use sha2::{Digest, Sha256};
    let build = |extra: &[(&str, &str)]| {
        let mut b = SafetensorsBuilder::new();
        let mut rng = Rng::new(5);
        for i in 0..6 {
            let m = format!("lora_unet_block_{i}_to_q");
            b.random(&mut rng, &format!("{m}.lora_down.weight"), &[8, 16_000], 0.5, Dtype::F16);
            b.random(&mut rng, &format!("{m}.lora_up.weight"), &[320, 8], 0.5, Dtype::F16);
            b.add(&format!("{m}.alpha"), &[], &[4.0], Dtype::F16);
        }
        b.meta("ss_network_dim", "8").meta("ss_output_name", "style\u{e9}\"x\"\n");
        for (k, v) in extra {
            b.meta(k, v);
        }
        b
    };
    let training = build(&[]).to_bytes();
    assert!(training.len() > (1 << 20) + (64 << 10));
    let window = &training[1 << 20..(1 << 20) + (64 << 10)];
    let legacy: String = Sha256::digest(window).iter().take(4).map(|b| format!("{b:02x}")).collect();
    let mut extra = vec![("sshs_legacy_hash", legacy.as_str()), ("modelspec.title", "Style")];
    if let Some(e) = edit_after {
        extra.push(e);
    }
    let p = dir.join("sd-scripts.safetensors");
    build(&extra).write(&p).unwrap();
    (p, legacy)
}

#[test]
fn sshs_legacy_hash_is_checked_on_the_training_time_serialisation() {
    let d = tempfile::tempdir().unwrap();
    let (p, legacy) = sd_scripts_file(d.path(), None);
    let (code, out, err) = run(&["inspect", s(&p), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let c = &v["adapter"]["hashes"]["sshs_legacy_hash"];
    assert_eq!(c["recorded"], legacy.as_str());
    assert_eq!(c["computed"], legacy.as_str());
    assert_eq!(c["matches"], true);
    assert_eq!(c["convention"], "padded header");
    // The saved file's own window is elsewhere (its header is longer): the check is not that.
    assert_ne!(v["adapter"]["hashes"]["autov1"], legacy.as_str());
    let (_, text, _) = run(&["inspect", s(&p)]);
    assert!(text.contains(&format!("recorded sshs_legacy_hash {legacy}: matches")), "{text}");

    // An ss_ field edited after training moves the data: the check says so, in a warning too.
    // (An edit that keeps the padded header length would not: the legacy hash only sees where
    // the data starts, which is why the content hash is the one to trust.)
    let (p, _) = sd_scripts_file(d.path(), Some(("ss_output_name", "renamed by a re-uploader, 40 bytes longer")));
    let (code, out, err) = run(&["inspect", s(&p), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["adapter"]["hashes"]["sshs_legacy_hash"]["matches"], false);
    assert!(v["warnings"].to_string().contains("sshs_legacy_hash"), "{}", v["warnings"]);
}

#[test]
fn per_module_value_statistics_are_those_of_the_stored_factors() {
    // L1, max |x| and population std over up and down together (alpha is a setting, not a
    // stored value), computed here with plain loops from the raw tensors.
    let f = fixtures().join("kohya-sd-lora.safetensors");
    let (code, out, err) = run(&["inspect", s(&f), "--json"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let n = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q";
    let m = v["adapter"]["modules"].as_array().unwrap().iter().find(|m| m["name"] == n).unwrap();
    let mut xs = raw(&f, &format!("{n}.lora_up.weight")).1;
    xs.extend(raw(&f, &format!("{n}.lora_down.weight")).1);
    let l1: f64 = xs.iter().map(|x| x.abs()).sum();
    let max = xs.iter().fold(0.0f64, |a, x| a.max(x.abs()));
    let mean = xs.iter().sum::<f64>() / xs.len() as f64;
    let std = (xs.iter().map(|x| (x - mean) * (x - mean)).sum::<f64>() / xs.len() as f64).sqrt();
    let got = |k: &str| m["values"][k].as_f64().unwrap();
    assert!((got("l1") - l1).abs() < 1e-9 * l1, "{} vs {l1}", got("l1"));
    assert_eq!(got("max_abs"), max);
    assert!((got("std") - std).abs() < 1e-9, "{} vs {std}", got("std"));
    let (_, text, _) = run(&["inspect", s(&f)]);
    assert!(text.contains("max |x|") && text.contains(&format!("{max:.4}")), "{text}");
}
