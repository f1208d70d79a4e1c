//! Issue #11: the image probe on the positive control fixtures/sd-micro (a micro SD-1.x pipeline
//! trained by diffusers on procedural "artists", a LoRA trained with peft to memorise four works
//! of artist-a; scripts/make-sd-fixture.py, values diffusers computed in reference.safetensors).
//! The probe's own loss path against diffusers' losses for the stored noise; verdicts on the
//! memorised works and the controls; a zero adapter; both namings of the LoRA; the single-file
//! checkpoint against the pipeline directory.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use candle_core::{Device, Tensor};
use lorascope::model::SdModel;
use lorascope::probe::image::{denoising_losses, Noise};
use lorascope::probe::Quiet;
use lorascope::BaseModel;
use serde_json::Value;

fn sd() -> PathBuf {
    fixtures().join("sd-micro")
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn run(args: &[&str]) -> (i32, String, String) {
    let o = Command::new(bin()).args(args).current_dir(env!("CARGO_MANIFEST_DIR")).output().unwrap();
    (
        o.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&o.stdout).into(),
        String::from_utf8_lossy(&o.stderr).into(),
    )
}

/// A tensor of reference.safetensors as f32 values and its shape.
fn reference(name: &str) -> (Vec<usize>, Vec<f32>) {
    let bytes = std::fs::read(sd().join("reference.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap_or_else(|_| panic!("reference.safetensors has {name}"));
    let v = t.data().chunks(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
    (t.shape().to_vec(), v)
}

fn reference_json() -> Value {
    serde_json::from_str(&std::fs::read_to_string(sd().join("reference.json")).unwrap()).unwrap()
}

/// The image as the VAE sees it, by the fixture's rule (PNG RGB / 127.5 − 1, CHW), written out
/// here rather than through the probe's code.
fn pixels(path: &Path) -> Vec<f32> {
    let img = image::open(path).unwrap().to_rgb8();
    let (w, h) = img.dimensions();
    let mut v = vec![0f32; (3 * w * h) as usize];
    for (x, y, p) in img.enumerate_pixels() {
        for c in 0..3 {
            v[(c as u32 * w * h + y * w + x) as usize] = p.0[c] as f32 / 127.5 - 1.0;
        }
    }
    v
}

/// Per image: the probe's conditional and unconditional losses for diffusers' noise, under
/// `model`.
fn probe_losses(model: &SdModel) -> (Vec<f64>, Vec<f64>) {
    let r = reference_json();
    let images = r["images"].as_array().unwrap();
    let timesteps: Vec<usize> =
        r["loss_setup"]["timesteps"].as_array().unwrap().iter().map(|t| t.as_u64().unwrap() as usize).collect();
    let draws = r["loss_setup"]["draws"].as_u64().unwrap() as usize;
    let (shape, noise) = reference("loss.noise");
    let per: usize = shape[2..].iter().product();
    let samples: Vec<Vec<f32>> = noise.chunks(per).map(<[f32]>::to_vec).collect();
    let noise = Noise { wen: samples[..draws].to_vec(), samples };
    let mut z0 = vec![];
    for im in images {
        let x =
            Tensor::from_vec(pixels(&sd().join(im["file"].as_str().unwrap())), (1, 3, 32, 32), &Device::Cpu).unwrap();
        z0.push(model.encode_images(&x).unwrap().flatten_all().unwrap().to_vec1::<f32>().unwrap());
    }
    let captions: Vec<&str> = images.iter().map(|i| i["caption"].as_str().unwrap()).collect();
    let l = denoising_losses(model, &z0, &captions, &timesteps, draws, &noise, (4, 8, 8), 8, &Quiet).unwrap();
    (l.cond, l.uncond)
}

fn assert_rel(what: &str, got: &[f64], want: &[f32], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}");
    let worst = got.iter().zip(want).map(|(g, w)| (g - *w as f64).abs() / (*w as f64).abs()).fold(0.0, f64::max);
    println!("{what}: worst relative difference {worst:.2e} over {} images", got.len());
    assert!(worst <= tol, "{what}: {worst:e} > {tol:e}");
}

#[test]
fn the_probes_denoising_losses_match_diffusers_for_the_stored_noise() {
    let base = BaseModel::open(&sd().join("pipeline")).unwrap();
    let model = SdModel::load(&base, None, &Device::Cpu).unwrap();
    let (cond, uncond) = probe_losses(&model);
    assert_rel("base, caption", &cond, &reference("loss.base.cond").1, 1e-4);
    assert_rel("base, empty caption", &uncond, &reference("loss.base.uncond").1, 1e-4);
    let adapter =
        lorascope::open(&sd().join("lora-diffusers.safetensors"), Some(&sd().join("pipeline")), &Default::default())
            .unwrap()
            .0;
    let (merged, _) = model.merged(&adapter).unwrap();
    let (cond, uncond) = probe_losses(&merged);
    assert_rel("LoRA, caption", &cond, &reference("loss.lora.cond").1, 1e-4);
    assert_rel("LoRA, empty caption", &uncond, &reference("loss.lora.uncond").1, 1e-4);
}

/// `probe --json` on the fixture with `adapter` (and extra arguments), parsed.
fn probe(adapter: &str, base: &[&str], extra: &[&str]) -> Value {
    let f = sd();
    let (a, w, c, st) = (f.join(adapter), f.join("works"), f.join("controls"), f.join("style-controls"));
    let mut args = vec!["probe", s(&a)];
    args.extend_from_slice(base);
    args.extend_from_slice(&["--works", s(&w), "--controls", s(&c), "--style-controls", s(&st), "--json", "-q"]);
    args.extend_from_slice(extra);
    let (code, out, err) = run(&args);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

fn verdicts(v: &Value, set: &str) -> Vec<(String, String)> {
    v[set]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| (e["id"].as_str().unwrap().into(), e["verdict"].as_str().unwrap().into()))
        .collect()
}

#[test]
fn memorised_works_are_caught_and_controls_are_not() {
    let pipeline = sd().join("pipeline");
    let v = probe("lora-kohya.safetensors", &["--base", s(&pipeline)], &["--generate", "1,2", "--steps", "20"]);
    for (id, verdict) in verdicts(&v, "works") {
        assert!(
            ["reconstructable-copy", "partial-copy", "memorized-traces"].contains(&verdict.as_str()),
            "{id}: {verdict}: {}",
            v["works"]
        );
    }
    for (id, verdict) in verdicts(&v, "controls") {
        assert_eq!(verdict, "no-evidence", "{id}");
    }
    let gain = |set: &str| -> f64 {
        let g: Vec<f64> = v[set].as_array().unwrap().iter().map(|e| e["gain"].as_f64().unwrap()).collect();
        g.iter().sum::<f64>() / g.len() as f64
    };
    println!(
        "mean gain: works {:.4}, style controls {:.4}, controls {:.4}",
        gain("works"),
        gain("style_controls"),
        gain("controls")
    );
    assert!(gain("works") > gain("style_controls") && gain("works") > gain("controls"));
    assert_eq!(v["calibration"]["failures"], serde_json::json!([]));
}

#[test]
fn a_zero_adapter_gains_exactly_nothing() {
    let pipeline = sd().join("pipeline");
    let v = probe("lora-zero.safetensors", &["--base", s(&pipeline)], &[]);
    for set in ["works", "controls", "style_controls"] {
        for e in v[set].as_array().unwrap() {
            assert_eq!(e["gain"].as_f64(), Some(0.0), "{}", e["id"]);
            assert_eq!(e["loss_base"], e["loss_merged"]);
            assert_eq!(e["verdict"], "no-evidence");
        }
    }
}

/// The image probe's findings with what names the base's files left out (the inputs and the
/// layout differ between a pipeline directory and a single file by nature).
fn findings(mut v: Value) -> Value {
    let o = v.as_object_mut().unwrap();
    for k in ["inputs", "base", "model", "warnings"] {
        o.remove(k);
    }
    v
}

#[test]
fn both_namings_and_the_single_file_checkpoint_give_the_same_findings() {
    let pipeline = sd().join("pipeline");
    let ldm = sd().join("micro-sd-ldm.safetensors");
    let tok = pipeline.join("tokenizer");
    let kohya = probe("lora-kohya.safetensors", &["--base", s(&pipeline)], &[]);
    let diffusers = probe("lora-diffusers.safetensors", &["--base", s(&pipeline)], &[]);
    let single = probe("lora-kohya.safetensors", &["--base", s(&ldm), "--tokenizer", s(&tok)], &[]);
    let (k, d) = (&kohya["works"], &diffusers["works"]);
    for (a, b) in k.as_array().unwrap().iter().zip(d.as_array().unwrap()) {
        let (ga, gb) = (a["gain"].as_f64().unwrap(), b["gain"].as_f64().unwrap());
        assert!((ga - gb).abs() <= 1e-4 * ga.abs().max(1e-3), "{}: kohya {ga} vs diffusers {gb}", a["id"]);
    }
    // The single file's tokenizer came from --tokenizer: recorded with the hash of its bytes.
    let vocab = std::fs::read(tok.join("vocab.json")).unwrap();
    let want: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&vocab).iter().map(|b| format!("{b:02x}")).collect()
    };
    let recorded = single["inputs"].as_array().unwrap();
    assert!(
        recorded.iter().any(|i| i["role"] == "tokenizer"
            && i["path"].as_str().unwrap().ends_with("vocab.json")
            && i["sha256"] == want.as_str()),
        "{recorded:?}"
    );
    assert!(!kohya["inputs"].as_array().unwrap().iter().any(|i| i["role"] == "tokenizer"));
    let (a, b) = (findings(kohya.clone()), findings(single));
    let (ja, jb) = (serde_json::to_string(&a["works"]).unwrap(), serde_json::to_string(&b["works"]).unwrap());
    assert_eq!(ja, jb, "the single-file checkpoint gives byte-identical evidence");
    assert_eq!(a["calibration"], b["calibration"]);
}

#[test]
fn a_single_file_checkpoint_without_a_tokenizer_is_named() {
    let ldm = sd().join("micro-sd-ldm.safetensors");
    let (a, w) = (sd().join("lora-kohya.safetensors"), sd().join("works"));
    let (code, _, err) = run(&["probe", s(&a), "--base", s(&ldm), "--works", s(&w), "-q"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("micro-sd-ldm.safetensors") && err.contains("--tokenizer"), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
}

#[test]
fn text_works_on_an_image_base_name_the_base() {
    let pipeline = sd().join("pipeline");
    let a = sd().join("lora-kohya.safetensors");
    let texts = fixtures().join("demo").join("works");
    let (code, _, err) = run(&["probe", s(&a), "--base", s(&pipeline), "--works", s(&texts), "-q"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("pipeline") && err.contains("works are texts"), "{err}");
}

#[test]
fn an_image_too_small_for_the_model_is_named() {
    let d = tempfile::tempdir().unwrap();
    image::RgbImage::from_pixel(6, 6, image::Rgb([9, 9, 9])).save(d.path().join("tiny.png")).unwrap();
    let pipeline = sd().join("pipeline");
    let a = sd().join("lora-kohya.safetensors");
    let (code, _, err) = run(&["probe", s(&a), "--base", s(&pipeline), "--works", s(d.path()), "-q"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("tiny.png") && err.contains("too small"), "{err}");
}
