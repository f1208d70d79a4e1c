//! `lorascope inspect` on every shipped fixture: the table, the JSON contract, byte-identical
//! JSON across runs, hashes checked against independent computations.

mod common;
use common::*;

use std::process::Command;

use sha2::{Digest, Sha256};

const ADAPTERS: &[(&str, Option<&str>)] = &[
    ("peft-llama", Some("llama-tiny")),
    ("peft-dora-llama", Some("llama-tiny.gguf")),
    ("kohya-sd-lora.safetensors", Some("sd-tiny-base.safetensors")),
    ("kohya-sd-lora.safetensors", None),
    ("lycoris-loha.safetensors", Some("sd-tiny-base.safetensors")),
    ("lycoris-lokr.safetensors", Some("sd-tiny-base.safetensors")),
    ("lycoris-full-dora-ia3.safetensors", Some("sd-tiny-base.safetensors")),
    ("diffusers-lora.safetensors", Some("sd-tiny-base.safetensors")),
];

fn inspect(adapter: &str, base: Option<&str>, json: bool) -> String {
    let mut c = Command::new(bin());
    c.arg("inspect").arg(fixtures().join(adapter));
    if let Some(b) = base {
        c.arg("--base").arg(fixtures().join(b));
    }
    if json {
        c.arg("--json");
    }
    let out = c.output().unwrap();
    assert!(out.status.success(), "{adapter}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[test]
fn table_for_every_fixture() {
    for (a, b) in ADAPTERS {
        let out = inspect(a, *b, false);
        assert!(out.contains("base key") && out.contains("kind") && out.contains("rank"), "{a}: {out}");
        assert!(out.contains("sha256"), "{a}");
    }
}

#[test]
fn json_is_byte_identical_and_follows_the_contract() {
    for (a, b) in ADAPTERS {
        let first = inspect(a, *b, true);
        let second = inspect(a, *b, true);
        assert_eq!(first, second, "{a}: JSON differs between runs");
        let v: serde_json::Value = serde_json::from_str(&first).unwrap();
        assert_eq!(v["schema_version"], 1);
        for i in v["inputs"].as_array().unwrap() {
            for k in ["role", "path", "bytes", "sha256"] {
                assert!(!i[k].is_null(), "{a}: inputs[].{k}");
            }
            // Every recorded hash is the file's real SHA-256.
            let bytes = std::fs::read(i["path"].as_str().unwrap()).unwrap();
            assert_eq!(i["sha256"].as_str().unwrap(), hex(&Sha256::digest(&bytes)), "{a}");
            assert_eq!(i["bytes"].as_u64().unwrap(), bytes.len() as u64);
        }
        let ad = &v["adapter"];
        assert!(ad["format"].is_string() && ad["params"].is_u64());
        let mods = ad["modules"].as_array().unwrap();
        assert!(!mods.is_empty());
        let keys: Vec<&str> = mods.iter().map(|m| m["base_key"].as_str().unwrap()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted, "{a}: modules sorted by base_key");
        for m in mods {
            for k in ["base_key", "kind", "rank", "alpha", "scale", "shape"] {
                assert!(m.get(k).is_some(), "{a}: modules[].{k}");
            }
            let kind = m["kind"].as_str().unwrap();
            assert!(["lora", "locon", "loha", "lokr", "full", "dora", "ia3", "embedding"].contains(&kind), "{kind}");
        }
        assert!(v["warnings"].is_array());
        // Sorted keys at the top level.
        let top: Vec<&String> = v.as_object().unwrap().keys().collect();
        let mut st = top.clone();
        st.sort();
        assert_eq!(top, st);
    }
}

#[test]
fn params_count_every_stored_factor() {
    // kohya fixture: 8 linear modules at rank 4 plus two convs; count by hand.
    let lin = [(8, 8), (8, 8), (8, 12), (32, 8), (16, 16), (16, 12), (12, 12), (24, 12)];
    let mut want: u64 = lin.iter().map(|(o, i)| 4 * (o + i)).sum();
    want += 4 * 8 * 9 + 8 * 4; // LoCon conv1: down [4,8,3,3], up [8,4,1,1]
    want += 4 * 16 + 4 * 4 * 9 + 16 * 4; // Tucker conv2: down, mid, up
    let v: serde_json::Value = serde_json::from_str(&inspect("kohya-sd-lora.safetensors", None, true)).unwrap();
    assert_eq!(v["adapter"]["params"].as_u64().unwrap(), want);
    assert_eq!(v["adapter"]["architecture"], "SD-family (UNet + CLIP text encoder)");
}

#[test]
fn sshs_model_hash_is_sha256_of_the_bytes_after_the_header() {
    let path = fixtures().join("kohya-sd-lora.safetensors");
    let bytes = std::fs::read(&path).unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let independent = hex(&Sha256::digest(&bytes[8 + n..]));
    let v: serde_json::Value = serde_json::from_str(&inspect("kohya-sd-lora.safetensors", None, true)).unwrap();
    let h = &v["adapter"]["hashes"];
    assert_eq!(h["autov3"].as_str().unwrap(), independent);
    assert_eq!(h["sshs_model_hash"]["computed"].as_str().unwrap(), independent);
    assert_eq!(h["sshs_model_hash"]["matches"], true);
    let whole = hex(&Sha256::digest(&bytes));
    assert_eq!(h["sha256"].as_str().unwrap(), whole);
    assert_eq!(h["autov2"].as_str().unwrap(), &whole[..10]);
    // A1111 hashes the 64 KiB at 1 MiB, nothing for a file this small: the empty input's hash.
    assert_eq!(h["autov1"].as_str().unwrap(), &hex(&Sha256::digest(b""))[..8]);
    // Training metadata decoded, tags sorted by count.
    let t = &v["adapter"]["metadata"]["training"];
    assert_eq!(t["num_train_images"], 20);
    assert_eq!(t["max_train_steps"], 5000);
    let tags: Vec<&str> = t["tags"].as_array().unwrap().iter().map(|x| x["tag"].as_str().unwrap()).collect();
    assert_eq!(tags, ["demo_artist", "watercolor", "1girl", "landscape", "flowers"]);
}

#[test]
fn a_forged_or_stale_sshs_hash_is_reported() {
    let d = tempfile::tempdir().unwrap();
    let mut b = lorascope::fixtures::kohya_sd_lora(4);
    b.meta("sshs_model_hash", &"0".repeat(64));
    let p = d.path().join("forged.safetensors");
    b.write(&p).unwrap();
    let out = Command::new(bin()).args(["inspect", p.to_str().unwrap(), "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["adapter"]["hashes"]["sshs_model_hash"]["matches"], false);
    assert!(v["warnings"].to_string().contains("differs from the recomputed"));
}

#[test]
fn autov1_on_a_file_over_two_mib() {
    let d = tempfile::tempdir().unwrap();
    let mut b = lorascope::fixtures::SafetensorsBuilder::new();
    let n = 700_000; // 2.8 MB of f32
    let v: Vec<f32> = (0..n).map(|i| (i % 97) as f32 * 0.01).collect();
    b.add("lora_unet_x.lora_down.weight", &[1, n], &v, safetensors::Dtype::F32);
    b.add("lora_unet_x.lora_up.weight", &[1, 1], &[1.0], safetensors::Dtype::F32);
    let p = d.path().join("big.safetensors");
    b.write(&p).unwrap();
    let bytes = std::fs::read(&p).unwrap();
    let want = hex(&Sha256::digest(&bytes[0x100000..0x110000]))[..8].to_string();
    let out = Command::new(bin()).args(["inspect", p.to_str().unwrap(), "--json"]).output().unwrap();
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(v["adapter"]["hashes"]["autov1"].as_str().unwrap(), want);
}

#[test]
fn shipped_fixtures_are_what_the_generator_writes() {
    let d = tempfile::tempdir().unwrap();
    lorascope::fixtures::write_all(d.path()).unwrap();
    let mut n = 0;
    for e in walk(d.path()) {
        let rel = e.strip_prefix(d.path()).unwrap();
        let shipped = fixtures().join(rel);
        let same = std::fs::read(&e).unwrap() == std::fs::read(&shipped).unwrap();
        assert!(same, "{} is stale: run cargo run --example make-fixtures", rel.display());
        n += 1;
    }
    assert!(n >= 12);
}

fn walk(p: &std::path::Path) -> Vec<std::path::PathBuf> {
    let mut out = vec![];
    for e in std::fs::read_dir(p).unwrap() {
        let e = e.unwrap().path();
        if e.is_dir() {
            out.extend(walk(&e));
        } else {
            out.push(e);
        }
    }
    out
}
