//! Issue #11, bad input: image folders and bases that do not go together. Every case exits 2
//! with one line naming the file and the problem; nothing panics. The cases here need no
//! Stable Diffusion model (tests/image_probe.rs has those on the micro fixture).

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

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

fn png(path: &Path, w: u32, h: u32) {
    let img = image::RgbImage::from_fn(w, h, |x, y| image::Rgb([(x * 7) as u8, (y * 5) as u8, 128]));
    img.save(path).unwrap();
}

fn one_line_naming(err: &str, name: &str, what: &str) {
    assert!(err.contains(name) && err.contains(what), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "one line: {err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn image_works_on_a_text_base_name_the_base() {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("a.png"), 16, 16);
    let f = fixtures();
    let adapter = f.join("peft-llama");
    let base = f.join("llama-tiny");
    let (code, _, err) = run(&["probe", s(&adapter), "--base", s(&base), "--works", s(d.path()), "-q"]);
    assert_eq!(code, 2, "{err}");
    one_line_naming(&err, "llama-tiny", "not a Stable Diffusion");
}

#[test]
fn stray_and_broken_files_in_an_image_folder_are_named() {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("a.png"), 16, 16);
    std::fs::write(d.path().join("notes.pdf"), b"%PDF-1.4").unwrap();
    let f = fixtures();
    let adapter = f.join("kohya-sd-lora.safetensors");
    let (code, _, err) = run(&["report", s(&adapter), "--works", s(d.path()), "--out", s(&d.path().join("out")), "-q"]);
    assert_eq!(code, 2, "{err}");
    one_line_naming(&err, "notes.pdf", "not an image");
    std::fs::remove_file(d.path().join("notes.pdf")).unwrap();
    std::fs::write(d.path().join("b.webp"), b"RIFF\x10\x00\x00\x00WEBPVP8 garbage").unwrap();
    let (code, _, err) = run(&["report", s(&adapter), "--works", s(d.path()), "--out", s(&d.path().join("out")), "-q"]);
    assert_eq!(code, 2, "{err}");
    one_line_naming(&err, "b.webp", "cannot decode");
}

#[test]
fn image_works_without_a_base_are_recorded_with_their_hashes() {
    let d = tempfile::tempdir().unwrap();
    let works = d.path().join("works");
    std::fs::create_dir(&works).unwrap();
    png(&works.join("a.png"), 16, 16);
    std::fs::write(works.join("a.txt"), "a painting by someone").unwrap();
    let f = fixtures();
    let adapter = f.join("kohya-sd-lora.safetensors");
    let out = d.path().join("out");
    let (code, _, err) = run(&["report", s(&adapter), "--works", s(&works), "--out", s(&out), "-q", "--no-timings"]);
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    let inputs = v["inputs"].as_array().unwrap();
    let role = |r: &str| inputs.iter().filter(|i| i["role"] == r).count();
    assert_eq!((role("work"), role("caption")), (1, 1));
    let png_bytes = std::fs::read(works.join("a.png")).unwrap();
    let want: String = {
        use sha2::Digest;
        sha2::Sha256::digest(&png_bytes).iter().map(|b| format!("{b:02x}")).collect()
    };
    assert!(inputs.iter().any(|i| i["role"] == "work" && i["sha256"] == want.as_str()));
    let stage = v["stages"].as_array().unwrap().iter().find(|s| s["name"] == "probe").unwrap().clone();
    assert_eq!(stage["ran"], false);
    assert!(stage["reason"].as_str().unwrap().contains("--base"), "{stage}");
    assert!(v.get("image_probe").is_none());
}

#[test]
fn prompts_and_style_controls_are_for_their_own_kind_of_works() {
    let d = tempfile::tempdir().unwrap();
    png(&d.path().join("a.png"), 16, 16);
    let f = fixtures();
    let adapter = f.join("kohya-sd-lora.safetensors");
    let prompts = d.path().join("p.txt");
    std::fs::write(&prompts, "once upon a time\n").unwrap();
    let (code, _, err) = run(&[
        "report",
        s(&adapter),
        "--works",
        s(d.path()),
        "--prompts",
        s(&prompts),
        "--out",
        s(&d.path().join("o")),
        "-q",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--prompts is for text works"), "{err}");
    let texts = f.join("demo").join("works");
    let (code, _, err) = run(&[
        "report",
        s(&adapter),
        "--works",
        s(&texts),
        "--style-controls",
        s(d.path()),
        "--out",
        s(&d.path().join("o")),
        "-q",
    ]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--style-controls is for image works"), "{err}");
}
