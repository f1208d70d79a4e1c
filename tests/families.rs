//! Issue #12, newer model families: SDXL, Flux and SD3 adapters in each layout their trainers
//! write (key sets written here, tiny dims, random factors) are read with the right format,
//! architecture, module count and base keys, and ΔW equals s·B·A computed here with plain loops,
//! s the scale the upstream loader applies. A kohya Flux adapter resolves against a BFL-named
//! base; an adapter and a base in the two different Flux layouts are refused with the reason.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use lorascope::fixtures::SafetensorsBuilder;
use lorascope::rng::Rng;
use lorascope::spectral::DeltaW;
use lorascope::{Adapter, LoadOptions};
use safetensors::Dtype;
use serde_json::Value;

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

/// Factors of one module: (down key, down shape, up key, up shape).
struct Lora<'a> {
    down: &'a str,
    up: &'a str,
    /// `[rank, in]` and out.
    rank: usize,
    inp: usize,
    out: usize,
}

/// Writes the modules' factors (and the given alphas) and returns the file's path.
fn write(dir: &Path, name: &str, mods: &[Lora], alphas: &[(&str, f32)], seed: u64) -> PathBuf {
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(seed);
    for m in mods {
        b.random(&mut rng, m.down, &[m.rank, m.inp], 0.5, Dtype::F32);
        b.random(&mut rng, m.up, &[m.out, m.rank], 0.5, Dtype::F32);
    }
    for (k, a) in alphas {
        b.add(k, &[], &[*a], Dtype::F32);
    }
    let p = dir.join(name);
    b.write(&p).unwrap();
    p
}

/// `inspect --json` of the file (and base), which must succeed.
fn inspect(path: &Path, base: Option<&Path>) -> Value {
    let mut args = vec!["inspect", s(path), "--json"];
    if let Some(b) = base {
        args.extend(["--base", s(b)]);
    }
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// (module name → base key) of an inspect report.
fn base_keys(v: &Value) -> Vec<(String, String)> {
    v["adapter"]["modules"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| (m["name"].as_str().unwrap().to_string(), m["base_key"].as_str().unwrap().to_string()))
        .collect()
}

fn base_key_of(v: &Value, name: &str) -> String {
    base_keys(v).into_iter().find(|(n, _)| n == name).unwrap_or_else(|| panic!("no module {name} in {v}")).1
}

fn assert_family(v: &Value, format: &str, architecture: &str, modules: usize) {
    let a = &v["adapter"];
    assert_eq!(a["format"], format, "{a}");
    assert_eq!(a["architecture"], architecture, "{a}");
    assert_eq!(v["adapter"]["modules"].as_array().unwrap().len(), modules, "{}", v["adapter"]["modules"]);
}

/// ΔW of module `name` from lorascope against scale·up·down from the raw tensors.
fn assert_delta(path: &Path, name: &str, up: &str, down: &str, scale: f64) {
    let a = Adapter::open(path, &LoadOptions::default()).unwrap();
    let m = a.modules.iter().find(|m| m.name == name).unwrap_or_else(|| panic!("no module {name}"));
    assert!((m.scale - scale).abs() < 1e-12, "{name}: scale {} vs {scale}", m.scale);
    let want = mat(path, up).matmul(&mat(path, down)).scale(scale);
    assert_close(&m.dense_delta(None).unwrap(), &want, 1e-6);
}

#[test]
fn sdxl_kohya() {
    let d = tempfile::tempdir().unwrap();
    let unet = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q";
    let te1 = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj";
    let te2 = "lora_te2_text_model_encoder_layers_0_self_attn_q_proj";
    let keys: Vec<[String; 2]> =
        [unet, te1, te2].iter().map(|n| [format!("{n}.lora_down.weight"), format!("{n}.lora_up.weight")]).collect();
    let mods: Vec<Lora> =
        keys.iter().zip([8, 6, 10]).map(|(k, w)| Lora { down: &k[0], up: &k[1], rank: 4, inp: w, out: w }).collect();
    let p = write(
        d.path(),
        "sdxl.safetensors",
        &mods,
        &[(&format!("{te2}.alpha"), 8.0), (&format!("{unet}.alpha"), 2.0)],
        1,
    );
    let v = inspect(&p, None);
    assert_family(&v, "kohya", "SDXL", 3);
    // Without a base, SD names stay kohya names (the UNet and CLIP paths need a base to split).
    assert_eq!(base_key_of(&v, te2), te2);
    assert_delta(&p, te2, &format!("{te2}.lora_up.weight"), &format!("{te2}.lora_down.weight"), 8.0 / 4.0);
    assert_delta(&p, unet, &format!("{unet}.lora_up.weight"), &format!("{unet}.lora_down.weight"), 2.0 / 4.0);
    // Against an SGM checkpoint's UNet and a diffusers-named second text encoder.
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(2);
    for (k, w) in [
        ("model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight", 8),
        ("conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight", 6),
        ("text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight", 10),
    ] {
        b.random(&mut rng, k, &[w, w], 0.1, Dtype::F32);
    }
    let base = d.path().join("sdxl-base.safetensors");
    b.write(&base).unwrap();
    let v = inspect(&p, Some(&base));
    assert_eq!(base_key_of(&v, unet), "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight");
    assert_eq!(base_key_of(&v, te2), "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj.weight");
}

#[test]
fn sdxl_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let unet = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q";
    let te1 = "text_encoder.text_model.encoder.layers.0.self_attn.q_proj";
    let te2 = "text_encoder_2.text_model.encoder.layers.0.self_attn.q_proj";
    let keys: Vec<[String; 2]> =
        [unet, te1, te2].iter().map(|n| [format!("{n}.lora_A.weight"), format!("{n}.lora_B.weight")]).collect();
    let mods: Vec<Lora> = keys.iter().map(|k| Lora { down: &k[0], up: &k[1], rank: 4, inp: 8, out: 8 }).collect();
    // diffusers keeps kohya's alphas as `<module>.alpha` (lora_conversion_utils `_get_alpha_name`).
    let p = write(d.path(), "sdxl-diffusers.safetensors", &mods, &[(&format!("{te2}.alpha"), 2.0)], 3);
    let v = inspect(&p, None);
    assert_family(&v, "diffusers", "SDXL", 3);
    assert_eq!(base_key_of(&v, te2), format!("{te2}.weight"));
    assert_eq!(base_key_of(&v, unet), format!("{unet}.weight"));
    assert_delta(&p, te2, &format!("{te2}.lora_B.weight"), &format!("{te2}.lora_A.weight"), 0.5);
    assert_delta(&p, unet, &format!("{unet}.lora_B.weight"), &format!("{unet}.lora_A.weight"), 1.0);
}

/// A kohya Flux adapter as sd-scripts `lora_flux.py` writes it: double and single blocks and
/// CLIP-L (`lora_te1_`); `te` leaves the text encoder out.
fn flux_kohya(dir: &Path, te: bool) -> PathBuf {
    let qkv = "lora_unet_double_blocks_0_img_attn_qkv";
    let mlp = "lora_unet_double_blocks_0_txt_mlp_2";
    let lin1 = "lora_unet_single_blocks_1_linear1";
    let clip = "lora_te1_text_model_encoder_layers_0_self_attn_q_proj";
    let mut names = vec![(qkv, 8, 24), (mlp, 32, 8), (lin1, 8, 40)];
    if te {
        names.push((clip, 6, 6));
    }
    let keys: Vec<([String; 2], usize, usize)> = names
        .iter()
        .map(|(n, i, o)| ([format!("{n}.lora_down.weight"), format!("{n}.lora_up.weight")], *i, *o))
        .collect();
    let mods: Vec<Lora> =
        keys.iter().map(|(k, i, o)| Lora { down: &k[0], up: &k[1], rank: 4, inp: *i, out: *o }).collect();
    let alphas = [(format!("{qkv}.alpha"), 2.0), (format!("{lin1}.alpha"), 0.0)];
    let alphas: Vec<(&str, f32)> = alphas.iter().map(|(k, a)| (k.as_str(), *a)).collect();
    write(dir, if te { "flux-kohya.safetensors" } else { "flux-kohya-unet.safetensors" }, &mods, &alphas, 4)
}

#[test]
fn flux_kohya_is_named_and_read_with_bfl_base_keys() {
    let d = tempfile::tempdir().unwrap();
    let p = flux_kohya(d.path(), true);
    let v = inspect(&p, None);
    assert_family(&v, "kohya", "Flux.1", 4);
    assert_eq!(base_key_of(&v, "lora_unet_double_blocks_0_img_attn_qkv"), "double_blocks.0.img_attn.qkv.weight");
    assert_eq!(base_key_of(&v, "lora_unet_double_blocks_0_txt_mlp_2"), "double_blocks.0.txt_mlp.2.weight");
    assert_eq!(base_key_of(&v, "lora_unet_single_blocks_1_linear1"), "single_blocks.1.linear1.weight");
    let n = "lora_unet_double_blocks_0_img_attn_qkv";
    assert_delta(&p, n, &format!("{n}.lora_up.weight"), &format!("{n}.lora_down.weight"), 2.0 / 4.0);
    // alpha 0 means alpha = rank (lora_flux.py), scale 1; no alpha likewise.
    let n = "lora_unet_single_blocks_1_linear1";
    assert_delta(&p, n, &format!("{n}.lora_up.weight"), &format!("{n}.lora_down.weight"), 1.0);
    let n = "lora_unet_double_blocks_0_txt_mlp_2";
    assert_delta(&p, n, &format!("{n}.lora_up.weight"), &format!("{n}.lora_down.weight"), 1.0);
    // A file trained with sd-scripts' split_qkv says how its scale is read.
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(13);
    b.random(&mut rng, "lora_unet_double_blocks_0_img_attn_qkv.lora_down.weight", &[6, 8], 0.5, Dtype::F32);
    b.random(&mut rng, "lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight", &[24, 6], 0.5, Dtype::F32);
    b.metadata.insert("ss_network_args".into(), r#"{"split_qkv": "True"}"#.into());
    let split = d.path().join("split").join("split.safetensors");
    std::fs::create_dir(split.parent().unwrap()).unwrap();
    b.write(&split).unwrap();
    let w = inspect(&split, None)["warnings"].to_string();
    assert!(w.contains("trained with split_qkv"), "{w}");
    // scan names the architecture too.
    let (code, out, err) = run(&["scan", s(d.path()), "-q"]);
    assert_eq!(code, 0, "{err}");
    let rec: Value = serde_json::from_str(out.lines().next().unwrap()).unwrap();
    assert_eq!(rec["architecture"], "Flux.1", "{rec}");
    assert_eq!(rec["format"], "kohya", "{rec}");
}

#[test]
fn flux_diffusers() {
    let d = tempfile::tempdir().unwrap();
    let q = "transformer.transformer_blocks.0.attn.to_q";
    let add_k = "transformer.transformer_blocks.0.attn.add_k_proj";
    let out = "transformer.single_transformer_blocks.2.proj_out";
    let keys: Vec<([String; 2], usize, usize)> = [(q, 8, 8), (add_k, 8, 8), (out, 40, 8)]
        .iter()
        .map(|(n, i, o)| ([format!("{n}.lora_A.weight"), format!("{n}.lora_B.weight")], *i, *o))
        .collect();
    let mods: Vec<Lora> =
        keys.iter().map(|(k, i, o)| Lora { down: &k[0], up: &k[1], rank: 2, inp: *i, out: *o }).collect();
    let p = write(d.path(), "flux-diffusers.safetensors", &mods, &[], 5);
    let v = inspect(&p, None);
    assert_family(&v, "diffusers", "Flux.1", 3);
    assert_eq!(base_key_of(&v, out), format!("{out}.weight"));
    // No alpha stored (AI-toolkit's and diffusers' Flux files): scale 1.
    assert_delta(&p, out, &format!("{out}.lora_B.weight"), &format!("{out}.lora_A.weight"), 1.0);
}

#[test]
fn flux_xlabs() {
    let d = tempfile::tempdir().unwrap();
    let names = [
        ("double_blocks.0.processor.qkv_lora1", 8, 24, "double_blocks.0.img_attn.qkv.weight"),
        ("double_blocks.0.processor.proj_lora2", 8, 8, "double_blocks.0.txt_attn.proj.weight"),
        ("single_blocks.1.processor.proj_lora", 8, 8, "single_blocks.1.linear2.weight"),
        ("single_blocks.1.processor.qkv_lora", 8, 24, "single_blocks.1.linear1.weight"),
    ];
    let keys: Vec<[String; 2]> =
        names.iter().map(|(n, ..)| [format!("{n}.down.weight"), format!("{n}.up.weight")]).collect();
    let mods: Vec<Lora> =
        keys.iter().zip(&names).map(|(k, n)| Lora { down: &k[0], up: &k[1], rank: 4, inp: n.1, out: n.2 }).collect();
    let p = write(d.path(), "flux-xlabs.safetensors", &mods, &[], 6);
    let v = inspect(&p, None);
    assert_family(&v, "xlabs", "Flux.1", 4);
    for (n, _, _, key) in &names {
        assert_eq!(base_key_of(&v, n), *key);
    }
    let warnings = v["warnings"].to_string();
    assert!(warnings.contains("qkv_lora changes the q, k and v rows of single_blocks.1.linear1"), "{warnings}");
    // x-flux scales by network_alpha/rank only when given an alpha; the files hold none.
    let n = "double_blocks.0.processor.qkv_lora1";
    assert_delta(&p, n, &format!("{n}.up.weight"), &format!("{n}.down.weight"), 1.0);
    // Against a base, the single-block qkv_lora (q, k, v rows of linear1 only) is refused, saying why.
    let b = base(d.path(), "flux1-tiny.safetensors", BFL);
    let (code, _, err) = run(&["inspect", s(&p), "--base", s(&b)]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("shape mismatch") && err.contains("changes the q, k and v rows"), "{err}");
}

#[test]
fn flux_ai_toolkit_and_comfyui_diffusion_model_names() {
    let d = tempfile::tempdir().unwrap();
    let qkv = "diffusion_model.double_blocks.0.img_attn.qkv";
    let lin2 = "diffusion_model.single_blocks.3.linear2";
    let keys = [
        [format!("{qkv}.lora_A.weight"), format!("{qkv}.lora_B.weight")],
        // ComfyUI's generic format also takes kohya's factor names, and `.alpha`.
        [format!("{lin2}.lora_down.weight"), format!("{lin2}.lora_up.weight")],
    ];
    let mods = [
        Lora { down: &keys[0][0], up: &keys[0][1], rank: 4, inp: 8, out: 24 },
        Lora { down: &keys[1][0], up: &keys[1][1], rank: 4, inp: 40, out: 8 },
    ];
    let p = write(d.path(), "flux-aitk.safetensors", &mods, &[(&format!("{lin2}.alpha"), 1.0)], 7);
    let v = inspect(&p, None);
    assert_family(&v, "original", "Flux.1", 2);
    assert_eq!(base_key_of(&v, qkv), "double_blocks.0.img_attn.qkv.weight");
    assert_eq!(base_key_of(&v, lin2), "single_blocks.3.linear2.weight");
    // AI-toolkit writes no alpha (alpha = rank): scale 1; a stored alpha gives alpha/rank.
    assert_delta(&p, qkv, &format!("{qkv}.lora_B.weight"), &format!("{qkv}.lora_A.weight"), 1.0);
    assert_delta(&p, lin2, &format!("{lin2}.lora_up.weight"), &format!("{lin2}.lora_down.weight"), 0.25);
}

#[test]
fn sd3_diffusers_and_kohya() {
    let d = tempfile::tempdir().unwrap();
    // SD3 Medium's width, 1536, on the attention input tells it from Flux.1 (3072).
    let q = "transformer.transformer_blocks.0.attn.to_q";
    let add_q = "transformer.transformer_blocks.0.attn.add_q_proj";
    let ff = "transformer.transformer_blocks.1.ff_context.net.0.proj";
    let keys: Vec<([String; 2], usize, usize)> = [(q, 1536, 8), (add_q, 8, 8), (ff, 8, 32)]
        .iter()
        .map(|(n, i, o)| ([format!("{n}.lora_A.weight"), format!("{n}.lora_B.weight")], *i, *o))
        .collect();
    let mods: Vec<Lora> =
        keys.iter().map(|(k, i, o)| Lora { down: &k[0], up: &k[1], rank: 2, inp: *i, out: *o }).collect();
    let p = write(d.path(), "sd3-diffusers.safetensors", &mods, &[(&format!("{add_q}.alpha"), 4.0)], 8);
    let v = inspect(&p, None);
    assert_family(&v, "diffusers", "SD3/SD3.5", 3);
    assert_eq!(base_key_of(&v, add_q), format!("{add_q}.weight"));
    assert_delta(&p, add_q, &format!("{add_q}.lora_B.weight"), &format!("{add_q}.lora_A.weight"), 2.0);
    // The same joint-block names at a width neither model has: undecided, and said so.
    let k = [format!("{q}.lora_A.weight"), format!("{q}.lora_B.weight")];
    let p = write(d.path(), "mmdit.safetensors", &[Lora { down: &k[0], up: &k[1], rank: 2, inp: 8, out: 8 }], &[], 15);
    let arch = &inspect(&p, None)["adapter"]["architecture"];
    assert_eq!(arch, "MMDiT transformer (Flux.1 or SD3; the keys alone do not tell)");
    // kohya SD3 (sd-scripts lora_sd3.py): MMDiT paths under `lora_unet_`, T5 as `lora_te3_`.
    let x = "lora_unet_joint_blocks_0_x_block_attn_qkv";
    let t5 = "lora_te3_encoder_block_0_layer_0_SelfAttention_q";
    let keys = [
        [format!("{x}.lora_down.weight"), format!("{x}.lora_up.weight")],
        [format!("{t5}.lora_down.weight"), format!("{t5}.lora_up.weight")],
    ];
    let mods = [
        Lora { down: &keys[0][0], up: &keys[0][1], rank: 4, inp: 8, out: 24 },
        Lora { down: &keys[1][0], up: &keys[1][1], rank: 4, inp: 8, out: 8 },
    ];
    let p = write(d.path(), "sd3-kohya.safetensors", &mods, &[(&format!("{x}.alpha"), 16.0)], 9);
    let v = inspect(&p, None);
    assert_family(&v, "kohya", "SD3/SD3.5", 2);
    assert_eq!(base_key_of(&v, x), "joint_blocks.0.x_block.attn.qkv.weight");
    assert_delta(&p, x, &format!("{x}.lora_up.weight"), &format!("{x}.lora_down.weight"), 4.0);
}

/// A base file holding these (key, shape) weights.
fn base(dir: &Path, name: &str, weights: &[(&str, [usize; 2])]) -> PathBuf {
    let mut b = SafetensorsBuilder::new();
    let mut rng = Rng::new(10);
    for (k, sh) in weights {
        b.random(&mut rng, k, sh, 0.1, Dtype::F32);
    }
    let p = dir.join(name);
    b.write(&p).unwrap();
    p
}

const BFL: &[(&str, [usize; 2])] = &[
    ("double_blocks.0.img_attn.qkv.weight", [24, 8]),
    ("double_blocks.0.txt_mlp.2.weight", [8, 32]),
    ("double_blocks.0.txt_attn.proj.weight", [8, 8]),
    ("single_blocks.1.linear1.weight", [40, 8]),
    ("single_blocks.1.linear2.weight", [8, 8]),
];

#[test]
fn kohya_flux_resolves_against_a_bfl_base_and_crossed_layouts_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let lora = flux_kohya(d.path(), false);
    // flux1-dev.safetensors names (no prefix) and a ComfyUI checkpoint's (`model.diffusion_model.`).
    let bare = base(d.path(), "flux1-tiny.safetensors", BFL);
    let prefixed: Vec<(String, [usize; 2])> =
        BFL.iter().map(|(k, sh)| (format!("model.diffusion_model.{k}"), *sh)).collect();
    let prefixed: Vec<(&str, [usize; 2])> = prefixed.iter().map(|(k, sh)| (k.as_str(), *sh)).collect();
    let comfy = base(d.path(), "flux1-comfy.safetensors", &prefixed);
    for (b, prefix) in [(&bare, ""), (&comfy, "model.diffusion_model.")] {
        let v = inspect(&lora, Some(b));
        assert_eq!(v["adapter"]["modules"].as_array().unwrap().len(), 3);
        for m in v["adapter"]["modules"].as_array().unwrap() {
            assert_eq!(m["resolved"], true, "{m}");
        }
        let key = base_key_of(&v, "lora_unet_double_blocks_0_img_attn_qkv");
        assert_eq!(key, format!("{prefix}double_blocks.0.img_attn.qkv.weight"));
        assert_eq!(
            base_key_of(&v, "lora_unet_single_blocks_1_linear1"),
            format!("{prefix}single_blocks.1.linear1.weight")
        );
    }
    // XLabs names resolve through the BFL weight they change.
    let xl = [
        "double_blocks.0.processor.proj_lora2.down.weight".to_string(),
        "double_blocks.0.processor.proj_lora2.up.weight".to_string(),
    ];
    let xlabs =
        write(d.path(), "xlabs.safetensors", &[Lora { down: &xl[0], up: &xl[1], rank: 2, inp: 8, out: 8 }], &[], 11);
    let v = inspect(&xlabs, Some(&comfy));
    assert_eq!(
        base_key_of(&v, "double_blocks.0.processor.proj_lora2"),
        "model.diffusion_model.double_blocks.0.txt_attn.proj.weight"
    );

    // A diffusers Flux adapter against the BFL base: q, k and v are fused there.
    let dk = [
        "transformer.transformer_blocks.0.attn.to_q.lora_A.weight".to_string(),
        "transformer.transformer_blocks.0.attn.to_q.lora_B.weight".to_string(),
    ];
    let diffusers = write(
        d.path(),
        "flux-diffusers.safetensors",
        &[Lora { down: &dk[0], up: &dk[1], rank: 2, inp: 8, out: 8 }],
        &[],
        12,
    );
    let (code, out, err) = run(&["inspect", s(&diffusers), "--base", s(&bare)]);
    assert_eq!(code, 2, "{out}");
    assert!(err.contains("flux-diffusers.safetensors") && err.contains("flux1-tiny.safetensors"), "{err}");
    assert!(err.contains("diffusers transformer layout") && err.contains("fused"), "{err}");
    assert!(err.contains("transformer.transformer_blocks.0.attn.to_q matches no base weight"), "{err}");
    // And the kohya (BFL-named) adapter against a diffusers-layout transformer.
    let dbase = base(
        d.path(),
        "transformer.safetensors",
        &[("transformer_blocks.0.attn.to_q.weight", [8, 8]), ("single_transformer_blocks.1.proj_out.weight", [8, 40])],
    );
    let (code, _, err) = run(&["inspect", s(&lora), "--base", s(&dbase)]);
    assert_eq!(code, 2);
    assert!(err.contains("original BFL/SAI layout") && err.contains("does not split"), "{err}");
    // The same names in the same layout still resolve: diffusers against diffusers, and
    // OneTrainer's kohya-style names for it.
    let v = inspect(&diffusers, Some(&dbase));
    assert_eq!(base_key_of(&v, "transformer.transformer_blocks.0.attn.to_q"), "transformer_blocks.0.attn.to_q.weight");
    let ot = "lora_transformer_single_transformer_blocks_1_proj_out";
    let ok = [format!("{ot}.lora_down.weight"), format!("{ot}.lora_up.weight")];
    let onetrainer = write(
        d.path(),
        "onetrainer.safetensors",
        &[Lora { down: &ok[0], up: &ok[1], rank: 2, inp: 40, out: 8 }],
        &[],
        14,
    );
    assert_eq!(inspect(&onetrainer, None)["adapter"]["architecture"], "Flux.1");
    let v = inspect(&onetrainer, Some(&dbase));
    assert_eq!(base_key_of(&v, ot), "single_transformer_blocks.1.proj_out.weight");
}
