//! Issue #14, "Hold up against an adversary": hostile adapter files and configs that used to be
//! misread or to cost minutes, through the binary. Each test writes its input and checks the
//! exit code, the message, and the values against ones known independently.

mod common;
use common::*;

use std::path::{Path, PathBuf};
use std::process::Command;

use lorascope::fixtures::{kohya_sd_lora, Rng, SafetensorsBuilder};
use safetensors::Dtype;
use serde_json::{json, Value};

fn run(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin()).args(args).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into(),
        String::from_utf8_lossy(&out.stderr).into(),
    )
}

fn json_of(args: &[&str]) -> Value {
    let (code, out, err) = run(args);
    assert_eq!(code, 0, "{args:?}: {err}");
    serde_json::from_str(&out).unwrap()
}

/// Exit code 2 and one stderr line naming `file` and saying each of `what`.
fn refused(args: &[&str], file: &Path, what: &[&str]) -> String {
    let (code, _, err) = run(args);
    assert_eq!(code, 2, "{args:?}: {err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(err.contains(&file.display().to_string()), "names {}: {err}", file.display());
    for w in what {
        assert!(err.contains(w), "says {w:?}: {err}");
    }
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// The one scan record of `path`, and the scan's exit code with `--fail-on flag`.
fn scan_record(path: &Path, fail_on: &str) -> (i32, Value) {
    let o = Command::new(bin()).args(["scan", s(path), "--quiet", "--fail-on", fail_on]).output().unwrap();
    let out = String::from_utf8(o.stdout).unwrap();
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}{}", String::from_utf8_lossy(&o.stderr));
    (o.status.code().unwrap(), serde_json::from_str(lines[0]).unwrap())
}

fn flags(rec: &Value) -> Vec<&str> {
    rec["flags"].as_array().unwrap().iter().map(|f| f.as_str().unwrap()).collect()
}

/// A PEFT directory: rank-4 LoRA on q_proj and v_proj of layer 0 (hidden 16), and `config`.
fn peft_dir(dir: &Path, module_names: &[&str], config: &Value) -> PathBuf {
    let mut rng = Rng::new(14);
    let mut b = SafetensorsBuilder::new();
    for m in module_names {
        b.random(&mut rng, &format!("base_model.model.{m}.lora_A.weight"), &[4, 16], 0.5, Dtype::F32);
        b.random(&mut rng, &format!("base_model.model.{m}.lora_B.weight"), &[16, 4], 0.5, Dtype::F32);
    }
    let d = dir.join("adapter");
    b.write(&d.join("adapter_model.safetensors")).unwrap();
    std::fs::write(d.join("adapter_config.json"), serde_json::to_string_pretty(config).unwrap()).unwrap();
    d
}

const Q: &str = "model.layers.0.self_attn.q_proj";
const V: &str = "model.layers.0.self_attn.v_proj";

// Finding 1: pattern keys with Python-only syntax.

#[test]
fn look_around_pattern_keys_set_alpha_as_peft_does() {
    // lora_alpha is tiny; the real alphas are behind look-around keys, which Python's `re`
    // (PEFT's engine) matches: q_proj takes the look-behind key (first in file order), v_proj the
    // look-ahead one. Read as "no match", both would get alpha 0.01, scale 0.0025.
    let d = tempfile::tempdir().unwrap();
    let cfg = json!({
        "peft_type": "LORA", "r": 4, "lora_alpha": 0.01,
        "alpha_pattern": {"(?<=self_attn\\.)q_proj": 32, "(?=.)(.*)": 64}
    });
    let a = peft_dir(d.path(), &[Q, V], &cfg);
    let v = json_of(&["inspect", s(&a), "--json"]);
    let modules = v["adapter"]["modules"].as_array().unwrap();
    let by = |name: &str| modules.iter().find(|m| m["name"] == name).unwrap();
    // scale = alpha / r.
    assert_eq!((by(Q)["alpha"].as_f64(), by(Q)["scale"].as_f64()), (Some(32.0), Some(8.0)));
    assert_eq!((by(V)["alpha"].as_f64(), by(V)["scale"].as_f64()), (Some(64.0), Some(16.0)));
}

#[test]
fn pattern_keys_that_cannot_be_evaluated_refuse_the_adapter() {
    // Each used to be read as "matches nothing", silently keeping lora_alpha.
    let long_a = "a".repeat(40);
    let cases: [(&str, &str, Vec<&str>, &str); 4] = [
        // Not a regular expression in Python either: PEFT's re.match raises.
        ("alpha_pattern", "q_proj(", vec![Q], "is not a regular expression"),
        // Python reads `[[:alpha:]_.]` as a class of `[:alph_.` followed by `]`, `regex` as a
        // POSIX class: refused rather than matched with the other meaning.
        ("alpha_pattern", "[[:alpha:]_.]+", vec![Q], "inside a character class"),
        // Catastrophic backtracking on a hostile module name.
        ("alpha_pattern", "(?=a)(a|aa)*c", vec![long_a.as_str()], "MAX_PATTERN_BACKTRACK"),
        ("rank_pattern", "(?<=self_attn\\.)(q_proj", vec![Q], "is not a regular expression"),
    ];
    for (field, key, modules, says) in cases {
        let d = tempfile::tempdir().unwrap();
        let cfg = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 0.01, field: {key: 64}});
        let a = peft_dir(d.path(), &modules, &cfg);
        let config = a.join("adapter_config.json");
        refused(&["inspect", s(&a)], &config, &[&format!("{field} key {key:?}"), says]);
        refused(&["spectrum", s(&a)], &config, &[field, says]);
    }
}

// Finding 2: keys of several naming schemes in one file.

/// kohya_sd_lora with two 1×1 diffusers-named tensors (a rank-1 module of value 0.25).
fn kohya_plus_diffusers() -> SafetensorsBuilder {
    let mut b = kohya_sd_lora(4);
    b.add("unet.x.lora_A.weight", &[1, 1], &[0.5], Dtype::F32);
    b.add("unet.x.lora_B.weight", &[1, 1], &[0.5], Dtype::F32);
    // Re-record the data hash, so the only finding is the naming.
    b.with_sshs_hash();
    b
}

#[test]
fn a_few_diffusers_tensors_do_not_hide_a_kohya_adapter() {
    let d = tempfile::tempdir().unwrap();
    let clean = d.path().join("clean.safetensors");
    kohya_sd_lora(4).write(&clean).unwrap();
    let mixed = d.path().join("mixed.safetensors");
    kohya_plus_diffusers().write(&mixed).unwrap();
    let (code, c) = scan_record(&clean, "mixed-naming");
    assert_eq!(code, 0);
    assert!(!flags(&c).contains(&"mixed-naming"), "{c}");
    let (code, m) = scan_record(&mixed, "mixed-naming");
    assert_eq!(code, 1, "--fail-on mixed-naming: {m}");
    assert_eq!(flags(&m), flags(&c).into_iter().chain(["mixed-naming"]).collect::<Vec<_>>());
    // Every kohya module is still analysed, plus the diffusers one: a 1×1 ΔW of rank 1 has
    // 1·(1 + 1 − 1) = 1 degree of freedom, 3.6 bits.
    assert_eq!(m["format"], "kohya");
    assert_eq!(m["modules"].as_u64().unwrap(), c["modules"].as_u64().unwrap() + 1);
    let eff = c["effective_params"].as_u64().unwrap();
    assert!(eff > 1000, "the kohya modules carry the capacity: {eff}");
    assert_eq!(m["effective_params"].as_u64().unwrap(), eff + 1);
    assert_eq!(m["capacity_bits"].as_f64().unwrap(), (eff + 1) as f64 * 3.6);
    // inspect and spectrum say so too, naming the schemes and their module counts.
    let n = c["modules"].as_u64().unwrap();
    let want = format!("diffusers (1 module(s)), kohya ({n} module(s))");
    for cmd in ["inspect", "spectrum"] {
        let v = json_of(&[cmd, s(&mixed), "--json"]);
        let w: Vec<&str> = v["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
        assert!(w.iter().any(|w| w.starts_with("mixed naming") && w.contains(&want)), "{cmd}: {w:?}");
    }
}

#[test]
fn a_module_stored_under_two_naming_schemes_is_refused() {
    // `base_model.model.unet.x` (PEFT) and `unet.x` (diffusers) are the same module: which
    // copy counts would be a guess.
    let d = tempfile::tempdir().unwrap();
    let mut b = SafetensorsBuilder::new();
    for prefix in ["base_model.model.", ""] {
        b.add(&format!("{prefix}unet.x.lora_A.weight"), &[1, 2], &[0.5, 0.5], Dtype::F32);
        b.add(&format!("{prefix}unet.x.lora_B.weight"), &[2, 1], &[0.5, 0.5], Dtype::F32);
    }
    let p = d.path().join("twice.safetensors");
    b.write(&p).unwrap();
    refused(&["inspect", s(&p)], &p, &["module unet.x is stored twice, under peft and under diffusers key names"]);
}

// Finding 3: finite products of extreme factors.

/// A kohya 1×1 LoRA stored in f64: ΔW = scale·up·down.
fn extreme(dir: &Path, name: &str, up: f64, down: f64, alpha: Option<f64>) -> PathBuf {
    let mut b = SafetensorsBuilder::new();
    b.add_f64("lora_unet_x.lora_up.weight", &[1, 1], &[up]);
    b.add_f64("lora_unet_x.lora_down.weight", &[1, 1], &[down]);
    if let Some(a) = alpha {
        b.add_f64("lora_unet_x.alpha", &[], &[a]);
    }
    let p = dir.join(name);
    b.write(&p).unwrap();
    p
}

#[test]
fn extreme_values_are_refused_by_spectrum_and_flagged_by_scan() {
    let d = tempfile::tempdir().unwrap();
    // ΔW = 1e200·1e-200 = 1 is finite, but the factors' Gram matrices overflow.
    let factors = extreme(d.path(), "factors.safetensors", 1e200, 1e-200, None);
    // Below f64's range but beyond 1e15: the fast route would have taken it.
    let moderate = extreme(d.path(), "moderate.safetensors", 1e20, 1e-20, None);
    // Ordinary values, an alpha of 1e300: scale 1e300.
    let scale = extreme(d.path(), "scale.safetensors", 0.5, 0.5, Some(1e300));
    for (p, says) in [
        (&factors, "1 value(s) beyond ±1e15"),
        (&moderate, "1 value(s) beyond ±1e15"),
        (&scale, "scale 1e300 is beyond ±1e15"),
    ] {
        refused(&["spectrum", s(p)], p, &["module lora_unet_x", says, "MAX_ABS_VALUE"]);
        let (code, rec) = scan_record(p, "extreme-values");
        assert_eq!(code, 1, "{rec}");
        assert!(rec["error"].is_null(), "a flag, not an unreadable file: {rec}");
        assert_eq!(flags(&rec), ["extreme-values"]);
        assert!(rec["capacity_bits"].is_null(), "{rec}");
        let w = rec["warnings"].as_array().unwrap();
        assert!(w.iter().any(|w| w.as_str().unwrap().contains("spectrum not computed")), "{w:?}");
    }
    // The inspection counts them.
    let v = json_of(&["inspect", s(&factors), "--json"]);
    assert_eq!(v["adapter"]["modules"][0]["extreme"], 1);
    // 1e15 itself is within the limit: ΔW = 1e15·1e-15 = 1 has one singular value, 1.
    let edge = extreme(d.path(), "edge.safetensors", 1e15, 1e-15, None);
    let v = json_of(&["spectrum", s(&edge), "--json"]);
    let sv = v["modules"][0]["singular_values"].as_array().unwrap();
    assert!(sv.len() == 1 && (sv[0].as_f64().unwrap() - 1.0).abs() < 1e-12, "{sv:?}");
    assert!(v["adapter"]["modules"][0].get("extreme").is_none(), "written only when nonzero");
}

// Finding 4: resource bombs.

#[test]
fn a_loha_wider_than_the_exact_svd_limit_gets_the_rank_bound() {
    // r₁·r₂ = 46² = 2116 ≥ min(m, n) = 2049 > MAX_EXACT_SVD_DIM = 2048: the exact spectrum is
    // a dense 2049² SVD (a 1.5 MB file; the issue's 5792² one took 137 CPU-s). ΔW can have
    // rank at most 2049, whose degrees of freedom are 2049·(2049 + 2049 − 2049) = 2049², more
    // than the 4·2049·46 values the module stores: the bound is the stored values.
    let d = tempfile::tempdir().unwrap();
    let (n, r) = (2049, 46);
    let mut rng = Rng::new(4);
    let mut b = SafetensorsBuilder::new();
    let m = "lora_unet_x";
    for w in ["w1", "w2"] {
        b.random(&mut rng, &format!("{m}.hada_{w}_a"), &[n, r], 0.1, Dtype::F32);
        b.random(&mut rng, &format!("{m}.hada_{w}_b"), &[r, n], 0.1, Dtype::F32);
    }
    let p = d.path().join("wide-loha.safetensors");
    b.write(&p).unwrap();
    let start = std::time::Instant::now();
    let v = json_of(&["spectrum", s(&p), "--json"]);
    let took = start.elapsed();
    let module = &v["modules"][0];
    assert_eq!(module["route"], "rank-bound", "note: {}", module["note"]);
    let stored = 4 * 2049 * 46;
    assert_eq!(module["effective_params"].as_u64(), Some(stored));
    assert_eq!(module["singular_values"], json!([]));
    assert_eq!(v["totals"]["capacity_bits"].as_f64(), Some(stored as f64 * 3.6));
    let w: Vec<&str> = v["warnings"].as_array().unwrap().iter().map(|w| w.as_str().unwrap()).collect();
    assert!(
        w.iter().any(|w| w.contains("SVD of width 2049") && w.contains("2048 (MAX_EXACT_SVD_DIM)")),
        "a warning names the limit: {w:?}"
    );
    eprintln!("spectrum of the wide LoHa took {took:?}");
}

#[test]
fn pattern_keys_beyond_the_limits_are_refused() {
    let d = tempfile::tempdir().unwrap();
    let many: serde_json::Map<String, Value> = (0..2049).map(|i| (format!("layers\\.{i}\\.mlp"), json!(8))).collect();
    let long = format!("({})", "q|".repeat(255) + "q");
    for (name, patterns, says) in [
        ("many", Value::Object(many), "2049 keys (limit MAX_PATTERN_KEYS = 2048)"),
        ("long", json!({ long: 8 }), "is 513 bytes long (limit MAX_PATTERN_LEN = 512)"),
        ("huge", json!({"\\w{1000}": 8}), "compiles to more than 262144 bytes (limit MAX_PATTERN_PROGRAM)"),
    ] {
        let cfg = json!({"peft_type": "LORA", "r": 4, "lora_alpha": 8, "alpha_pattern": patterns});
        let a = peft_dir(&d.path().join(name), &[Q], &cfg);
        refused(&["inspect", s(&a)], &a.join("adapter_config.json"), &[says]);
    }
    // diffusers' metadata counts every component's keys together.
    let half: serde_json::Map<String, Value> = (0..1025).map(|i| (format!("blocks\\.{i}\\..*"), json!(8))).collect();
    let mut b = SafetensorsBuilder::new();
    b.add("unet.x.lora_A.weight", &[1, 2], &[0.5, 0.5], Dtype::F32);
    b.add("unet.x.lora_B.weight", &[2, 1], &[0.5, 0.5], Dtype::F32);
    let meta = json!({"unet.r": 1, "unet.alpha_pattern": half, "text_encoder.rank_pattern": half});
    b.meta("lora_adapter_metadata", &meta.to_string());
    let p = d.path().join("diffusers.safetensors");
    b.write(&p).unwrap();
    refused(&["inspect", s(&p)], &p, &["lora_adapter_metadata: ", "2050 keys (limit MAX_PATTERN_KEYS = 2048)"]);
}
