//! `lorascope report` and `lorascope verify`: stable JSON that round-trips, HTML that escapes
//! hostile input and draws one SVG per plotted spectrum, and hash checks that catch a change.

mod common;
use common::*;

use std::path::Path;
use std::process::Command;

use lorascope::fixtures::kohya_sd_lora;
use lorascope::report::{to_canonical_json, Report};

fn run(args: &[&str]) -> std::process::Output {
    Command::new(bin()).args(args).output().unwrap()
}

fn report(adapter: &Path, base: Option<&Path>, out: &Path, extra: &[&str]) {
    let mut args = vec!["report", adapter.to_str().unwrap(), "--out", out.to_str().unwrap()];
    if let Some(b) = base {
        args.extend(["--base", b.to_str().unwrap()]);
    }
    args.extend(extra);
    let o = run(&args);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn report_json_round_trips_and_is_stable() {
    let d = tempfile::tempdir().unwrap();
    let a = fixtures().join("kohya-sd-lora.safetensors");
    let b = fixtures().join("sd-tiny-base.safetensors");
    let (o1, o2) = (d.path().join("one"), d.path().join("two"));
    report(&a, Some(&b), &o1, &["--no-timings"]);
    report(&a, Some(&b), &o2, &["--no-timings"]);
    let j1 = std::fs::read_to_string(o1.join("report.json")).unwrap();
    // --out differs between the two runs, and it is part of the recorded command line.
    let j2 = std::fs::read_to_string(o2.join("report.json")).unwrap().replace("/two", "/one");
    assert_eq!(j1, j2, "same inputs, same bytes");
    let r: Report = serde_json::from_str(&j1).unwrap();
    assert_eq!(to_canonical_json(&r), j1, "serde round trip gives the same bytes");
    assert!(r.timings.is_none());
    assert_eq!(r.spectrum.modules.len(), 10);
    assert!(r.stages.iter().any(|s| s.name.as_str() == "probe" && !s.ran && s.reason.contains("no --works")));
    // With timings, only the separate timing block differs.
    let o3 = d.path().join("three");
    report(&a, Some(&b), &o3, &[]);
    let mut v3: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(o3.join("report.json")).unwrap()).unwrap();
    assert!(v3["timings"]["total_s"].as_f64().unwrap() >= 0.0);
    v3.as_object_mut().unwrap().remove("timings");
    let mut v1: serde_json::Value = serde_json::from_str(&j1).unwrap();
    v1.as_object_mut().unwrap().remove("timings");
    v1["command_line"] = serde_json::Value::Null;
    v3["command_line"] = serde_json::Value::Null;
    assert_eq!(v1, v3);
}

#[test]
fn html_escapes_hostile_metadata_and_work_text() {
    let d = tempfile::tempdir().unwrap();
    let mut b = kohya_sd_lora(4);
    b.meta("ss_output_name", "<script>alert(1)</script>");
    b.meta("ss_tag_frequency", r#"{"x": {"<script>alert(1)</script>": 3, "<img src=x onerror=alert(2)>": 2}}"#);
    let a = d.path().join("evil.safetensors");
    b.write(&a).unwrap();
    let works = d.path().join("works");
    std::fs::create_dir(&works).unwrap();
    std::fs::write(works.join("poem.txt"), "<script>alert(1)</script> and then some text").unwrap();
    let out = d.path().join("out");
    report(&a, None, &out, &["--works", works.to_str().unwrap()]);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(!html.to_lowercase().contains("<script"), "no script element may reach the page");
    assert!(!html.contains("<img"), "no injected element");
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "shown escaped");
    assert!(html.contains("&lt;img src=x onerror=alert(2)&gt;"));
    assert!(html.contains("&lt;script&gt;alert(1)&lt;/script&gt; and then some text"), "the work's opening, escaped");
    // Self-contained: no external assets.
    for bad in ["src=\"", "href=\"", "<link", "@import", "url("] {
        assert!(!html.contains(bad), "external reference {bad:?}");
    }
    // The work was recorded with its hash, and the report says why it was not probed.
    let r: Report = serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    assert!(r.inputs.iter().any(|i| i.role.as_str() == "work" && i.path.ends_with("poem.txt")));
    assert!(r.stages.iter().any(|s| s.name.as_str() == "probe" && !s.ran && s.reason.contains("--base")));
}

fn count(h: &str, pat: &str) -> usize {
    h.matches(pat).count()
}

#[test]
fn one_svg_per_plotted_spectrum() {
    let d = tempfile::tempdir().unwrap();
    for (a, n) in [("kohya-sd-lora.safetensors", 8), ("lycoris-lokr.safetensors", 3), ("diffusers-lora.safetensors", 3)]
    {
        let out = d.path().join(a);
        report(&fixtures().join(a), None, &out, &[]);
        let html = std::fs::read_to_string(out.join("report.html")).unwrap();
        assert_eq!(count(&html, "<svg class=\"spectrum\""), n, "{a}");
        assert_eq!(count(&html, "<svg class=\"heatmap\""), 1, "{a}");
        assert_eq!(count(&html, "<svg"), n + 1, "{a}");
        assert_eq!(count(&html, "</svg>"), n + 1, "{a}: every SVG closed");
    }
}

#[test]
fn verify_detects_a_changed_byte_and_a_missing_file() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("copy.safetensors");
    std::fs::copy(fixtures().join("kohya-sd-lora.safetensors"), &a).unwrap();
    let out = d.path().join("out");
    report(&a, None, &out, &[]);
    let o = run(&["verify", out.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stdout));
    // Flip one bit of the last byte (inside the tensor data).
    let mut bytes = std::fs::read(&a).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&a, &bytes).unwrap();
    let o = run(&["verify", out.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["inputs"][0]["status"], "changed");
    assert_ne!(v["inputs"][0]["sha256"], v["inputs"][0]["recorded_sha256"]);
    assert_eq!(v["report_files"][0]["status"], "ok", "the report itself is unchanged");
    std::fs::remove_file(&a).unwrap();
    let o = run(&["verify", out.to_str().unwrap(), "--json"]);
    assert_eq!(o.status.code(), Some(1));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["inputs"][0]["status"], "missing");
    // Not a report directory: bad input.
    let o = run(&["verify", d.path().to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("report.json"));
}

#[test]
fn bad_works_inputs_are_clear_errors() {
    let d = tempfile::tempdir().unwrap();
    let a = fixtures().join("kohya-sd-lora.safetensors");
    let jsonl = d.path().join("w.jsonl");
    std::fs::write(&jsonl, "{\"id\": \"a\", \"text\": \"x\"}\n{\"id\": \"a\", \"text\": \"y\"}\n").unwrap();
    let out = d.path().join("o");
    let o = run(&["report", a.to_str().unwrap(), "--out", out.to_str().unwrap(), "--works", jsonl.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("w.jsonl") && err.contains("appears twice"), "{err}");
    std::fs::write(&jsonl, "{\"id\": \"a\"}\n").unwrap();
    let o = run(&["report", a.to_str().unwrap(), "--out", out.to_str().unwrap(), "--works", jsonl.to_str().unwrap()]);
    assert_eq!(o.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 1"));
}
