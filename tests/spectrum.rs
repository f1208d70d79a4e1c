#![allow(clippy::needless_range_loop)]
//! The factored spectrum against dense SVDs of the formed ΔW, randomized SVD against dense,
//! every metric against hand-computed values, intruders on planted directions.

mod common;
use common::*;

use std::process::Command;

use lorascope::fixtures::{Rng, SafetensorsBuilder};
use lorascope::linalg::{randomized_svd, svd_factors, svd_low_rank, Factors};
use lorascope::load::LoadOptions;
use lorascope::spectral::{metrics, DeltaW, SpectrumOptions};
use nalgebra::DMatrix;
use safetensors::Dtype;

fn random(rng: &mut Rng, r: usize, c: usize) -> DMatrix<f64> {
    DMatrix::from_fn(r, c, |_, _| rng.normal())
}

/// Reference: nalgebra's dense SVD of a matrix formed here with plain loops.
fn dense_values(m: &M) -> Vec<f64> {
    let d = DMatrix::from_row_slice(m.r, m.c, &m.v);
    let mut v: Vec<f64> = d.svd(false, false).singular_values.iter().copied().collect();
    v.sort_by(|a, b| b.total_cmp(a));
    v
}

fn to_m(d: &DMatrix<f64>) -> M {
    M { r: d.nrows(), c: d.ncols(), v: (0..d.nrows() * d.ncols()).map(|k| d[(k / d.ncols(), k % d.ncols())]).collect() }
}

/// Singular values agree to `tol` relative to σ₁ (missing trailing values count as zero).
fn assert_spectrum(got: &[f64], want: &[f64], tol: f64) {
    let s1 = want.first().copied().unwrap_or(0.0).max(1e-300);
    for i in 0..got.len().max(want.len()) {
        let (g, w) = (got.get(i).copied().unwrap_or(0.0), want.get(i).copied().unwrap_or(0.0));
        assert!((g - w).abs() <= tol * s1, "σ_{i}: {g} vs {w} (σ₁ {s1})");
    }
}

#[test]
fn low_rank_route_matches_dense_svd_on_random_shapes() {
    let mut rng = Rng::new(11);
    for &(m, n, r) in &[(40, 30, 1), (64, 17, 4), (17, 64, 8), (128, 96, 16), (5, 7, 9), (200, 3, 2)] {
        let up = random(&mut rng, m, r);
        let down = random(&mut rng, r, n);
        let got = svd_low_rank(&up, &down.transpose(), false).unwrap().values;
        let want = dense_values(&to_m(&up).matmul(&to_m(&down)));
        assert_spectrum(&got, &want, 1e-8);
    }
}

#[test]
fn rank_deficient_factors() {
    let mut rng = Rng::new(12);
    // up has rank 2 although it has 6 columns: ΔW has exactly 2 nonzero singular values.
    let base = random(&mut rng, 50, 2);
    let mix = random(&mut rng, 2, 6);
    let up = &base * &mix;
    let down = random(&mut rng, 6, 40);
    let got = svd_low_rank(&up, &down.transpose(), false).unwrap().values;
    let want = dense_values(&to_m(&up).matmul(&to_m(&down)));
    assert_spectrum(&got, &want, 1e-8);
    assert!(got[2] <= 1e-10 * got[0], "third singular value {} should vanish", got[2]);
}

#[test]
fn kronecker_route_is_products_of_factor_spectra() {
    let mut rng = Rng::new(13);
    let a = random(&mut rng, 3, 4);
    let (u, d) = (random(&mut rng, 6, 2), random(&mut rng, 2, 5));
    let f =
        Factors::Kron(Box::new(Factors::Dense(a.clone())), Box::new(Factors::LowRank(u.clone(), d.transpose())), 0.7);
    let got = svd_factors(&f, false).unwrap().values;
    let want = dense_values(&to_m(&a).kron(&to_m(&u).matmul(&to_m(&d))).scale(0.7));
    assert_spectrum(&got, &want, 1e-8);
}

/// Build an adapter file, open it through lorascope, and compare every module's factored
/// spectrum with a dense SVD of its formed ΔW. Returns how many modules took the streamed route.
fn check_file(b: &SafetensorsBuilder) -> usize {
    let d = tempfile::tempdir().unwrap();
    let p = d.path().join("a.safetensors");
    b.write(&p).unwrap();
    let a = lorascope::Adapter::open(&p, &LoadOptions::default()).unwrap();
    let mut fast_checked = 0;
    for m in &a.modules {
        let f = m.factors().unwrap().unwrap();
        let got = svd_factors(&f, false).unwrap().values;
        let want = dense_values(&to_m(&m.dense_delta(None).unwrap()));
        assert_spectrum(&got, &want, 1e-8);
        // The streamed-Gram route reads the stored bytes directly; it must agree as well.
        if let Some(fast) = m.fast_singular_values() {
            assert_spectrum(&fast, &want, 1e-8);
            fast_checked += 1;
        }
    }
    fast_checked
}

#[test]
fn stored_f16_bf16_conv_loha_lokr() {
    let mut rng = Rng::new(14);
    for dt in [Dtype::F16, Dtype::BF16, Dtype::F32] {
        let mut b = SafetensorsBuilder::new();
        b.random(&mut rng, "lora_unet_lin.lora_down.weight", &[3, 20], 0.5, dt);
        b.random(&mut rng, "lora_unet_lin.lora_up.weight", &[24, 3], 0.5, dt);
        b.add("lora_unet_lin.alpha", &[], &[2.0], Dtype::F32);
        b.random(&mut rng, "lora_unet_conv.lora_down.weight", &[4, 6, 3, 3], 0.5, dt);
        b.random(&mut rng, "lora_unet_conv.lora_up.weight", &[10, 4, 1, 1], 0.5, dt);
        b.random(&mut rng, "lora_unet_tucker.lora_down.weight", &[3, 6, 1, 1], 0.5, dt);
        b.random(&mut rng, "lora_unet_tucker.lora_mid.weight", &[3, 3, 3, 3], 0.5, dt);
        b.random(&mut rng, "lora_unet_tucker.lora_up.weight", &[7, 3, 1, 1], 0.5, dt);
        for w in ["1", "2"] {
            b.random(&mut rng, &format!("lora_unet_loha.hada_w{w}_a"), &[12, 3], 0.5, dt);
            b.random(&mut rng, &format!("lora_unet_loha.hada_w{w}_b"), &[3, 9], 0.5, dt);
            b.random(&mut rng, &format!("lora_unet_lohat.hada_w{w}_a"), &[2, 5], 0.5, dt);
            b.random(&mut rng, &format!("lora_unet_lohat.hada_w{w}_b"), &[2, 4], 0.5, dt);
            b.random(&mut rng, &format!("lora_unet_lohat.hada_t{w}"), &[2, 2, 3, 3], 0.5, dt);
        }
        b.random(&mut rng, "lora_unet_lokr.lokr_w1", &[3, 2], 0.5, dt);
        b.random(&mut rng, "lora_unet_lokr.lokr_w2_a", &[5, 2], 0.5, dt);
        b.random(&mut rng, "lora_unet_lokr.lokr_w2_b", &[2, 7], 0.5, dt);
        b.random(&mut rng, "lora_unet_lokrc.lokr_w1_a", &[2, 1], 0.5, dt);
        b.random(&mut rng, "lora_unet_lokrc.lokr_w1_b", &[1, 3], 0.5, dt);
        b.random(&mut rng, "lora_unet_lokrc.lokr_w2", &[4, 2, 3, 3], 0.5, dt);
        // Plain LoRA and LoCon take the streamed route.
        assert_eq!(check_file(&b), 2);
    }
}

#[test]
fn streamed_route_over_many_blocks_and_ill_conditioned_fallback() {
    let mut rng = Rng::new(16);
    let mut b = SafetensorsBuilder::new();
    // 2100 rows / columns: three Gram blocks of each factor; bf16 storage.
    b.random(&mut rng, "lora_unet_tall.lora_down.weight", &[4, 30], 0.5, Dtype::BF16);
    b.random(&mut rng, "lora_unet_tall.lora_up.weight", &[2100, 4], 0.5, Dtype::BF16);
    b.random(&mut rng, "lora_unet_wide.lora_down.weight", &[4, 2100], 0.5, Dtype::BF16);
    b.random(&mut rng, "lora_unet_wide.lora_up.weight", &[30, 4], 0.5, Dtype::BF16);
    // An up factor whose two columns are nearly parallel (κ ≈ 10⁶): CholeskyQR would lose
    // the small singular value, so the route must fall back to Householder QR.
    let col: Vec<f32> = (0..50).map(|_| rng.uniform() as f32).collect();
    let mut up = vec![0.0f32; 100];
    for i in 0..50 {
        up[2 * i] = col[i];
        up[2 * i + 1] = col[i] * (1.0 + 1e-6 * (i as f32 - 25.0));
    }
    b.add("lora_unet_illcond.lora_up.weight", &[50, 2], &up, Dtype::F32);
    b.random(&mut rng, "lora_unet_illcond.lora_down.weight", &[2, 40], 0.5, Dtype::F32);
    assert_eq!(check_file(&b), 2, "only the well-conditioned modules take the streamed route");
}

#[test]
fn randomized_top_k_matches_dense_on_a_decaying_spectrum() {
    let mut rng = Rng::new(15);
    let (m, n) = (120, 90);
    let q1 = random(&mut rng, m, n).qr().q();
    let q2 = random(&mut rng, n, n).qr().q();
    let sigma: Vec<f64> = (0..n).map(|i| 0.7f64.powi(i as i32)).collect();
    let a = &q1 * DMatrix::from_diagonal(&nalgebra::DVector::from_vec(sigma.clone())) * q2.transpose();
    let got = randomized_svd(&a, 10, 10, 2, 7).unwrap().values;
    assert_eq!(got.len(), 10);
    for i in 0..10 {
        assert!((got[i] - sigma[i]).abs() <= 1e-6, "σ_{i}: {} vs {}", got[i], sigma[i]);
    }
    // The same seed gives the same numbers.
    assert_eq!(got, randomized_svd(&a, 10, 10, 2, 7).unwrap().values);
}

#[test]
fn metrics_against_hand_computed_values() {
    let s = [4.0, 3.0];
    assert_eq!(metrics::fro(&s), 5.0);
    assert_eq!(metrics::stable_rank(&s), 25.0 / 16.0);
    let (p, q) = (4.0 / 7.0, 3.0 / 7.0);
    let h: f64 = -(p * f64::ln(p) + q * f64::ln(q));
    assert!((metrics::effective_rank(&s) - h.exp()).abs() < 1e-15);
    // Energies 100, 4, 1 of 105: 95.2% after one value, 99.05% after two.
    let s = [10.0, 2.0, 1.0];
    assert_eq!(metrics::rank_for_energy(&s, 0.90, 105.0), Some(1));
    assert_eq!(metrics::rank_for_energy(&s, 0.99, 105.0), Some(2));
    assert_eq!(metrics::rank_for_energy(&[], 0.99, 0.0), Some(0));
    assert_eq!(metrics::effective_rank(&[1.0, 1.0, 1.0, 1.0]), 4.0);
    assert_eq!(metrics::rank_k_params(4, 100, 50), 4 * 146);
    assert_eq!(metrics::rank_k_params(12, 12, 12), 144, "full rank counts the whole matrix");
}

fn spectrum_json(adapter: &std::path::Path, base: Option<&std::path::Path>, extra: &[&str]) -> serde_json::Value {
    let mut c = Command::new(bin());
    c.arg("spectrum").arg(adapter).arg("--json").args(extra);
    if let Some(b) = base {
        c.arg("--base").arg(b);
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

#[test]
fn base_relative_metrics_by_hand() {
    // W = [[2, 0.5], [0, 1]], ΔW = e1·(0.5 e2)ᵀ: ‖ΔW‖ = 0.5, ‖W‖_F = √5.25,
    // σ₁(W) = sqrt((5.25 + sqrt(5.25² − 16)) / 2), UᵀWV = W[0,1] = 0.5 so amplification = 1.
    let d = tempfile::tempdir().unwrap();
    let mut base = SafetensorsBuilder::new();
    base.add("layer.weight", &[2, 2], &[2.0, 0.5, 0.0, 1.0], Dtype::F32);
    let bp = d.path().join("base.safetensors");
    base.write(&bp).unwrap();
    let mut a = SafetensorsBuilder::new();
    a.add("lora_layer.lora_up.weight", &[2, 1], &[1.0, 0.0], Dtype::F32);
    a.add("lora_layer.lora_down.weight", &[1, 2], &[0.0, 0.5], Dtype::F32);
    a.add("lora_layer.alpha", &[], &[1.0], Dtype::F32);
    let ap = d.path().join("a.safetensors");
    a.write(&ap).unwrap();
    let v = spectrum_json(&ap, Some(&bp), &[]);
    let m = &v["modules"][0];
    assert_eq!(m["base_key"], "layer.weight");
    let f = |k: &str| m[k].as_f64().unwrap();
    assert!((f("fro") - 0.5).abs() < 1e-12);
    assert!((f("relative_fro") - 0.5 / 5.25f64.sqrt()).abs() < 1e-12);
    let s1 = ((5.25 + (5.25f64 * 5.25 - 16.0).sqrt()) / 2.0).sqrt();
    assert!((f("relative_spectral") - 0.5 / s1).abs() < 1e-9, "{}", f("relative_spectral"));
    assert!((f("amplification") - 1.0).abs() < 1e-12);
    assert_eq!(m["rank_99"], 1);
    // Effective params 1·(2+2−1) = 3; capacity 3·3.6 bits, or 3·2 with --bits-per-param 2.
    assert_eq!(v["totals"]["effective_params"], 3);
    assert!((v["totals"]["capacity_bits"].as_f64().unwrap() - 10.8).abs() < 1e-12);
    let v2 = spectrum_json(&ap, Some(&bp), &["--bits-per-param", "2"]);
    assert_eq!(v2["totals"]["capacity_bits"].as_f64().unwrap(), 6.0);
}

/// A 16×16 base with singular values 16..1 along the standard basis, and a rank-1 ΔW of
/// strength `s` along (u, v).
fn intruders_for(u: &[f32], s: f32) -> u64 {
    let d = tempfile::tempdir().unwrap();
    let n = 16;
    let mut w = vec![0.0f32; n * n];
    for i in 0..n {
        w[i * n + i] = (n - i) as f32;
    }
    let mut base = SafetensorsBuilder::new();
    base.add("proj.weight", &[n, n], &w, Dtype::F32);
    let bp = d.path().join("base.safetensors");
    base.write(&bp).unwrap();
    let mut a = SafetensorsBuilder::new();
    a.add("lora_proj.lora_up.weight", &[n, 1], &u.iter().map(|x| x * s).collect::<Vec<_>>(), Dtype::F32);
    a.add("lora_proj.lora_down.weight", &[1, n], u, Dtype::F32);
    a.add("lora_proj.alpha", &[], &[1.0], Dtype::F32);
    let ap = d.path().join("a.safetensors");
    a.write(&ap).unwrap();
    spectrum_json(&ap, Some(&bp), &[])["modules"][0]["intruders"].as_u64().unwrap()
}

#[test]
fn intruder_dimensions_planted() {
    let n = 16;
    // A strong direction spread over the base's 14 weakest singular vectors: its largest
    // |cosine| with any of them is 1/√14 ≈ 0.27 < 0.5.
    let mut spread = vec![0.0f32; n];
    for x in spread.iter_mut().skip(2) {
        *x = 1.0 / (14.0f32).sqrt();
    }
    assert!(intruders_for(&spread, 40.0) >= 1);
    // Along the top singular vector: nothing new.
    let mut aligned = vec![0.0f32; n];
    aligned[0] = 1.0;
    assert_eq!(intruders_for(&aligned, 40.0), 0);
}

#[test]
fn spectrum_json_contract_and_determinism() {
    for (a, b) in [
        ("kohya-sd-lora.safetensors", Some("sd-tiny-base.safetensors")),
        ("kohya-sd-lora.safetensors", None),
        ("lycoris-lokr.safetensors", None),
        ("lycoris-full-dora-ia3.safetensors", Some("sd-tiny-base.safetensors")),
        ("peft-dora-llama", None),
        ("peft-llama", Some("llama-tiny.gguf")),
    ] {
        let ap = fixtures().join(a);
        let bp = b.map(|b| fixtures().join(b));
        let run = || {
            let mut c = Command::new(bin());
            c.arg("spectrum").arg(&ap).arg("--json");
            if let Some(b) = &bp {
                c.arg("--base").arg(b);
            }
            c.output().unwrap().stdout
        };
        let first = run();
        assert_eq!(first, run(), "{a}: spectrum JSON differs between runs");
        let v: serde_json::Value = serde_json::from_slice(&first).unwrap();
        let mods = v["modules"].as_array().unwrap();
        let keys: Vec<&str> = mods.iter().map(|m| m["base_key"].as_str().unwrap()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        for m in mods {
            for k in [
                "base_key",
                "singular_values",
                "fro",
                "spectral",
                "stable_rank",
                "effective_rank",
                "rank_90",
                "rank_99",
            ] {
                assert!(m.get(k).is_some(), "{a}: modules[].{k}");
            }
            // fro equals the norm of the listed spectrum unless it was truncated.
            if !m["truncated"].as_bool().unwrap() {
                let s: Vec<f64> =
                    m["singular_values"].as_array().unwrap().iter().map(|x| x.as_f64().unwrap()).collect();
                assert!(
                    (metrics::fro(&s) - m["fro"].as_f64().unwrap()).abs() <= 1e-9 * (1.0 + m["fro"].as_f64().unwrap())
                );
            }
        }
        for k in ["params", "effective_params", "capacity_bits", "bits_per_param"] {
            assert!(v["totals"].get(k).is_some(), "{a}: totals.{k}");
        }
        let eff: u64 = mods.iter().map(|m| m["effective_params"].as_u64().unwrap()).sum();
        assert_eq!(v["totals"]["effective_params"].as_u64().unwrap(), eff);
    }
}

#[test]
fn capacity_per_training_image_from_metadata() {
    let v = spectrum_json(&fixtures().join("kohya-sd-lora.safetensors"), None, &[]);
    assert_eq!(v["totals"]["train_images"], 20);
    let cap = v["totals"]["capacity_bits"].as_f64().unwrap();
    assert!((v["totals"]["capacity_bits_per_image"].as_f64().unwrap() - cap / 20.0).abs() < 1e-9);
}

#[test]
fn nan_in_factors_is_a_clear_error() {
    let d = tempfile::tempdir().unwrap();
    let mut b = SafetensorsBuilder::new();
    b.add("lora_unet_x.lora_down.weight", &[1, 2], &[f32::NAN, 1.0], Dtype::F32);
    b.add("lora_unet_x.lora_up.weight", &[2, 1], &[1.0, 1.0], Dtype::F32);
    let p = d.path().join("nan.safetensors");
    b.write(&p).unwrap();
    let out = Command::new(bin()).args(["spectrum", p.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nan.safetensors") && err.contains("1 NaN/Inf") && err.contains("lora_unet_x"), "{err}");
}

#[test]
fn overflowing_values_are_an_error_not_a_hang() {
    // A fuzzed file made nalgebra's unbounded SVD loop forever on overflowed values.
    let d = tempfile::tempdir().unwrap();
    let mut b = SafetensorsBuilder::new();
    b.add(
        "lora_unet_x.lora_down.weight",
        &[2, 3],
        &[1e300, -1e300, 1e300, 2e300, 1e300, -3e300].map(|x| x as f32),
        Dtype::F32,
    );
    b.add("lora_unet_x.lora_up.weight", &[3, 2], &[f32::MAX; 6], Dtype::F32);
    let p = d.path().join("big.safetensors");
    b.write(&p).unwrap();
    // f32 cannot hold 1e300: those become ±Inf, which the file check reports.
    let out = Command::new(bin()).args(["spectrum", p.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    // f64 storage can: the factors are finite, their products overflow to Inf.
    let big = [1e300f64, -1e300, 1e300, 2e300, 1e300, -3e300];
    let raw: Vec<u8> = big.iter().flat_map(|x| x.to_le_bytes()).collect();
    let header = r#"{"lora_unet_x.lora_down.weight":{"dtype":"F64","shape":[2,3],"data_offsets":[0,48]},"lora_unet_x.lora_up.weight":{"dtype":"F64","shape":[3,2],"data_offsets":[48,96]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend(header.as_bytes());
    bytes.extend(&raw);
    bytes.extend(&raw);
    std::fs::write(&p, &bytes).unwrap();
    let out = Command::new(bin()).args(["spectrum", p.to_str().unwrap()]).output().unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", String::from_utf8_lossy(&out.stdout));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("big.safetensors") && err.contains("lora_unet_x") && err.contains("overflow"), "{err}");
}

#[test]
fn spectrum_of_options_default_is_documented() {
    let o = SpectrumOptions::default();
    assert_eq!((o.bits_per_param, o.intruder_top_k, o.intruder_epsilon), (3.6, 10, 0.5));
}
