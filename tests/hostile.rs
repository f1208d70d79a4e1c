//! Issue #14, attacked as a hostile uploader or an opposing party would: inputs and flags that
//! used to panic (exit 101), abort, spoof the terminal or go unnoticed. Each test writes its
//! hostile input itself and asserts the exit code and the message.

mod common;
use common::*;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use lorascope::fixtures::SafetensorsBuilder;
use safetensors::Dtype;

struct Run {
    code: i32,
    out: String,
    err: String,
}

fn run(args: &[&str]) -> Run {
    run_in(args, Path::new(env!("CARGO_MANIFEST_DIR")))
}

fn run_in(args: &[&str], dir: &Path) -> Run {
    let o = Command::new(bin()).args(args).current_dir(dir).env_remove("LORASCOPE_FAULT").output().unwrap();
    Run {
        code: o.status.code().unwrap_or(-1),
        out: String::from_utf8_lossy(&o.stdout).into(),
        err: String::from_utf8_lossy(&o.stderr).into(),
    }
}

/// Exit 2 with one stderr line that says `what`, and never a panic.
fn refused(r: &Run, what: &str) {
    assert_eq!(r.code, 2, "stderr: {}", r.err);
    assert_eq!(r.err.trim_end().lines().count(), 1, "one line: {}", r.err);
    assert!(r.err.contains(what), "says {what:?}: {}", r.err);
    assert!(!r.err.contains("panicked"), "{}", r.err);
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A kohya LoRA with one module of the given name (rank 1, 2×2).
fn kohya_module(dir: &Path, file: &str, module: &str, meta: &[(&str, &str)]) -> PathBuf {
    let mut b = SafetensorsBuilder::new();
    b.add(&format!("{module}.lora_up.weight"), &[2, 1], &[0.5, -0.25], Dtype::F32)
        .add(&format!("{module}.lora_down.weight"), &[1, 2], &[1.0, 2.0], Dtype::F32)
        .add(&format!("{module}.alpha"), &[], &[1.0], Dtype::F32);
    for (k, v) in meta {
        b.meta(k, v);
    }
    let p = dir.join(file);
    b.write(&p).unwrap();
    p
}

#[test]
fn a_module_name_longer_than_a_format_width_is_shown_not_a_panic() {
    let d = tempfile::tempdir().unwrap();
    let name = format!("lora_unet_{}", "x".repeat(70_000));
    let p = kohya_module(d.path(), "long.safetensors", &name, &[]);
    for cmd in ["inspect", "spectrum"] {
        let r = run(&[cmd, s(&p), "-q"]);
        assert_eq!(r.code, 0, "{cmd}: {}", r.err);
        assert!(r.out.contains(&name), "{cmd} shows the whole name");
    }
}

#[test]
fn gguf_alignment_zero_is_refused_before_candle_divides_by_it() {
    let d = tempfile::tempdir().unwrap();
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes()); // tensors
    b.extend(1u64.to_le_bytes()); // key/value pairs
    let key = "general.alignment";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(4u32.to_le_bytes()); // u32
    b.extend(0u32.to_le_bytes());
    let g = d.path().join("align0.gguf");
    std::fs::write(&g, &b).unwrap();
    let adapter = fixtures().join("peft-llama");
    let r = run(&["inspect", s(&adapter), "--base", s(&g)]);
    refused(&r, "general.alignment");
    assert!(r.err.contains(s(&g)), "{}", r.err);
    // A string length near u64::MAX, which candle would try to allocate.
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    std::fs::write(&g, &b).unwrap();
    refused(&run(&["inspect", s(&adapter), "--base", s(&g)]), "more than the");
}

#[test]
fn token_flags_near_u64_max_are_usage_errors() {
    let max = u64::MAX.to_string();
    for flag in ["--new-tokens", "--stride", "--prefix-tokens", "--context"] {
        let r = run(&[
            "probe",
            "fixtures/peft-llama",
            "--base",
            "fixtures/llama-tiny",
            "--works",
            "fixtures/demo/works",
            flag,
            &max,
            "-q",
        ]);
        refused(&r, flag);
        assert!(r.err.contains("1048576"), "names the limit: {}", r.err);
    }
}

#[test]
fn fit_lora_layer_ranges_and_job_counts_are_bounded() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("out");
    let r = run(&[
        "fit-lora",
        "--base",
        "fixtures/llama-tiny",
        "--texts",
        "fixtures/demo/works",
        "--out",
        s(&out),
        "--layers",
        &format!("0-{}", u64::MAX),
    ]);
    refused(&r, "--layers");
    let r = run(&["scan", "fixtures/kohya-sd-lora.safetensors", "--jobs", "100000", "-q"]);
    refused(&r, "--jobs 100000 is outside 1..=256");
}

#[test]
fn non_finite_numeric_flags_are_refused_up_front() {
    for (cmd, flag, v) in [
        ("spectrum", "--bits-per-param", "nan"),
        ("spectrum", "--bits-per-param", "inf"),
        ("spectrum", "--bits-per-param=-1", ""),
        ("scan", "--bits-per-param", "NaN"),
    ] {
        let mut args = vec![cmd, "fixtures/kohya-sd-lora.safetensors", flag, v, "-q"];
        args.retain(|a| !a.is_empty());
        refused(&run(&args), "--bits-per-param");
    }
    let r = run(&[
        "probe",
        "fixtures/peft-llama",
        "--base",
        "fixtures/llama-tiny",
        "--works",
        "fixtures/demo/works",
        "--copy-margin",
        "inf",
        "-q",
    ]);
    refused(&r, "--copy-margin");
}

/// A llama config.json with one field replaced.
fn hf_base_with(dir: &Path, field: &str, value: serde_json::Value) -> PathBuf {
    let base = dir.join("base");
    std::fs::create_dir_all(&base).unwrap();
    for f in std::fs::read_dir(fixtures().join("llama-tiny")).unwrap() {
        let f = f.unwrap().path();
        std::fs::copy(&f, base.join(f.file_name().unwrap())).unwrap();
    }
    let cfg_path = base.join("config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg[field] = value;
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    base
}

#[test]
fn impossible_base_configs_are_refused_before_allocation() {
    for (field, value, says) in [
        ("num_hidden_layers", serde_json::json!(1_000_000_000_000u64), "num_hidden_layers"),
        ("rms_norm_eps", serde_json::json!(-1e-5), "rms_norm_eps"),
        ("rope_scaling", serde_json::json!({"type": "linear", "factor": 0.0}), "rope_scaling factor"),
        ("vocab_size", serde_json::json!(1u64 << 40), "vocab_size"),
    ] {
        let d = tempfile::tempdir().unwrap();
        let base = hf_base_with(d.path(), field, value);
        let r = run(&["probe", "fixtures/peft-llama", "--base", s(&base), "--works", "fixtures/demo/works", "-q"]);
        refused(&r, says);
        assert!(r.err.contains("config.json") || r.err.contains(s(&base)), "names the file: {}", r.err);
    }
}

#[test]
fn a_non_utf8_file_name_is_recorded_not_a_panic() {
    use std::os::unix::ffi::OsStrExt;
    let d = tempfile::tempdir().unwrap();
    let name = std::ffi::OsStr::from_bytes(b"bad\xff.safetensors");
    let p = d.path().join(name);
    std::fs::copy(fixtures().join("kohya-sd-lora.safetensors"), &p).unwrap();
    let out = d.path().join("rep");
    let o = Command::new(bin())
        .arg("report")
        .arg(&p)
        .arg("--out")
        .arg(&out)
        .arg("-q")
        .arg("--no-timings")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", String::from_utf8_lossy(&o.stderr));
    let json = std::fs::read_to_string(out.join("report.json")).unwrap();
    assert!(json.contains("bad\u{fffd}.safetensors"), "the name is recorded, lossily");
}

#[test]
fn a_closed_pipe_ends_the_output_quietly() {
    // Far more output than a pipe buffer holds, read by a reader that stops after one line.
    let d = tempfile::tempdir().unwrap();
    let mut b = SafetensorsBuilder::new();
    for i in 0..3000 {
        b.add(&format!("lora_unet_block_{i}.lora_up.weight"), &[2, 1], &[0.5, -0.25], Dtype::F32).add(
            &format!("lora_unet_block_{i}.lora_down.weight"),
            &[1, 2],
            &[1.0, 2.0],
            Dtype::F32,
        );
    }
    let p = d.path().join("many.safetensors");
    b.write(&p).unwrap();
    let mut child = Command::new(bin())
        .args(["spectrum", s(&p), "--top", "100000", "-q"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = [0u8; 16];
    child.stdout.as_mut().unwrap().read_exact(&mut first).unwrap();
    drop(child.stdout.take());
    let o = child.wait_with_output().unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(0), "{err}");
    assert!(err.is_empty(), "nothing on stderr: {err}");
}

#[test]
fn a_panic_anywhere_is_one_line_and_exit_3() {
    let o = Command::new(bin())
        .args(["inspect", "fixtures/kohya-sd-lora.safetensors"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("LORASCOPE_FAULT", "panic")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert_eq!(o.status.code(), Some(3), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "{err}");
    assert!(err.starts_with("lorascope: error: internal error: lorascope panicked at "), "{err}");
    assert!(err.contains("fault injected"), "{err}");
    // In a scan the panicking file becomes an internal error record and the scan goes on.
    let o = Command::new(bin())
        .args(["scan", "fixtures/kohya-sd-lora.safetensors", "fixtures/lycoris-loha.safetensors", "-q"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .env("LORASCOPE_FAULT", "panic")
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0));
    let lines: Vec<serde_json::Value> =
        String::from_utf8_lossy(&o.stdout).lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2);
    for l in &lines {
        assert_eq!(l["error"]["kind"], "internal", "{l}");
        assert!(l["error"]["message"].as_str().unwrap().contains("panicked"), "{l}");
    }
}

#[test]
fn terminal_spoofing_characters_are_escaped() {
    let d = tempfile::tempdir().unwrap();
    // An ANSI sequence that erases the line and a newline forging a second line, in a tag and a
    // module name; a bidi override in the module name.
    let tags = r#"{"x": {"evil\u001b[2K\rmatches": 3, "two\nlines": 1}}"#;
    let module = "lora_unet_a\u{202E}b";
    let p = kohya_module(d.path(), "spoof.safetensors", module, &[("ss_tag_frequency", tags)]);
    for args in [vec!["inspect", s(&p)], vec!["spectrum", s(&p), "-q"]] {
        let r = run(&args);
        assert_eq!(r.code, 0, "{}", r.err);
        for bad in ['\u{1b}', '\r', '\u{202E}'] {
            assert!(!r.out.contains(bad), "{args:?} shows {bad:?} raw: {}", r.out);
        }
        assert!(r.out.contains("\\u{202e}"), "{}", r.out);
    }
    let r = run(&["inspect", s(&p)]);
    assert!(r.out.contains("evil\\u{1b}[2K\\rmatches"), "{}", r.out);
    assert!(!r.out.lines().any(|l| l.trim_start().starts_with("lines")), "no forged line: {}", r.out);
    // JSON keeps the values but writes the bidi control as an escape.
    let r = run(&["inspect", s(&p), "--json"]);
    assert!(!r.out.contains('\u{202E}') && r.out.contains("\\u202e"), "{}", r.out);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert!(v.to_string().contains('\u{202E}'), "the value itself is unchanged");
    // An error naming a file whose name holds a newline stays one line.
    let forged = d.path().join("x\nlorascope: error: forged.safetensors");
    std::fs::write(&forged, b"not safetensors at all").unwrap();
    let r = run(&["inspect", s(&forged)]);
    refused(&r, "\\nlorascope: error: forged");
}

#[test]
fn metadata_numbers_saturate_and_implausible_resolutions_are_not_believed() {
    let d = tempfile::tempdir().unwrap();
    let big = u64::MAX.to_string();
    let tags = format!(r#"{{"a": {{"t": {big}}}, "b": {{"t": {big}}}}}"#);
    let plain = kohya_module(d.path(), "plain.safetensors", "lora_unet_m", &[("ss_num_train_images", "1")]);
    let huge = kohya_module(
        d.path(),
        "huge.safetensors",
        "lora_unet_m",
        &[("ss_num_train_images", "1"), ("ss_resolution", "(4294967296, 4294967296)"), ("ss_tag_frequency", &tags)],
    );
    let r = run(&["inspect", s(&huge), "--json"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["adapter"]["metadata"]["training"]["tags"][0]["count"], u64::MAX, "saturated, not wrapped");
    // 2³² × 2³² wraps to 0 in u64 (every adapter would then look able to store its images);
    // a side above 16384 is not believed, so the flags equal those of the file without it.
    let flags = |p: &Path| {
        let r = run(&["scan", s(p), "-q"]);
        assert_eq!(r.code, 0, "{}", r.err);
        serde_json::from_str::<serde_json::Value>(&r.out).unwrap()["flags"].clone()
    };
    assert_eq!(flags(&huge), flags(&plain));
}

#[test]
fn report_html_escapes_bidi_and_breaks_long_tags() {
    let d = tempfile::tempdir().unwrap();
    let tag = "y".repeat(3000);
    let tags = format!(r#"{{"x": {{"{tag}": 2}}}}"#);
    let p = kohya_module(d.path(), "a.safetensors", "lora_unet_m", &[("ss_tag_frequency", &tags)]);
    let works = d.path().join("works");
    std::fs::create_dir(&works).unwrap();
    std::fs::write(works.join("cat\u{202E}gnp.exe.txt"), "a work").unwrap();
    let out = d.path().join("rep");
    let r = run(&["report", s(&p), "--works", s(&works), "--out", s(&out), "-q"]);
    assert_eq!(r.code, 0, "{}", r.err);
    let html = std::fs::read_to_string(out.join("report.html")).unwrap();
    assert!(!html.contains('\u{202E}'), "no raw bidi override in the page");
    assert!(html.contains("cat\\u{202e}gnp.exe"), "the id is shown with the override escaped");
    assert!(html.contains(&format!("<p class=\"tags\">{tag}")), "the long tag sits in a breakable paragraph");
    assert!(html.contains(".tags,.kv td{overflow-wrap:anywhere}"));
}

fn sha256_hex(path: &Path) -> String {
    let o = Command::new("sha256sum").arg(path).output().unwrap();
    String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap().to_string()
}

/// A report of the kohya fixture in a fresh directory (with its own copy of the adapter).
fn kohya_report(d: &Path) -> PathBuf {
    let a = d.join("adapter.safetensors");
    std::fs::copy(fixtures().join("kohya-sd-lora.safetensors"), &a).unwrap();
    let out = d.join("rep");
    let r = run_in(&["report", "adapter.safetensors", "--out", "rep", "-q"], d);
    assert_eq!(r.code, 0, "{}", r.err);
    out
}

/// Rewrite report.json through lorascope's own types (so it stays canonical) and, when
/// `rehash`, the manifest too: an opposing party who knows the format.
fn edit_report(out: &Path, rehash: bool, edit: impl Fn(&mut serde_json::Value)) {
    let p = out.join("report.json");
    let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    edit(&mut v);
    let r: lorascope::report::Report = serde_json::from_value(v).unwrap();
    std::fs::write(&p, lorascope::report::to_canonical_json(&r)).unwrap();
    if rehash {
        let m = format!("{}  report.json\n{}  report.html\n", sha256_hex(&p), sha256_hex(&out.join("report.html")));
        std::fs::write(out.join("report.sha256"), m).unwrap();
    }
}

#[test]
fn verify_refuses_a_report_with_its_inputs_removed() {
    let d = tempfile::tempdir().unwrap();
    let out = kohya_report(d.path());
    edit_report(&out, true, |v| v["inputs"] = serde_json::json!([]));
    let r = run_in(&["verify", "rep"], d.path());
    refused(&r, "records 0 input(s) and no adapter: nothing to verify");
}

#[test]
fn verify_catches_edited_findings_and_pages() {
    let d = tempfile::tempdir().unwrap();
    let out = kohya_report(d.path());
    let ok = run_in(&["verify", "rep", "--rerun"], d.path());
    assert_eq!(ok.code, 0, "{}{}", ok.out, ok.err);
    assert!(ok.out.contains("rerun: the findings were reproduced byte for byte"), "{}", ok.out);
    // A finding edited, manifest untouched: report.json no longer matches it.
    edit_report(&out, false, |v| v["spectrum"]["totals"]["capacity_bits"] = serde_json::json!(1.0));
    let r = run_in(&["verify", "rep", "--json"], d.path());
    assert_eq!(r.code, 1, "{}", r.err);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["report_files"][0]["status"], "changed");
    assert_eq!(v["report_files"][1]["status"], "ok");
    assert_eq!(v["ok"], false);
    // The manifest recomputed as well: only running the analysis again shows the edit.
    edit_report(&out, true, |_| {});
    let r = run_in(&["verify", "rep", "--json"], d.path());
    assert_eq!(r.code, 0, "integrity alone cannot tell (no signatures): {}", r.out);
    let r = run_in(&["verify", "rep", "--rerun", "--json"], d.path());
    assert_eq!(r.code, 1, "{}", r.err);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["rerun"]["reproduced"], false);
    assert_eq!(v["rerun"]["differences"], serde_json::json!(["/spectrum/totals/capacity_bits"]));
    // report.html edited (a verdict changed in the page people read).
    let second = d.path().join("second");
    std::fs::create_dir(&second).unwrap();
    let out2 = kohya_report(&second);
    let html = out2.join("report.html");
    let page =
        std::fs::read_to_string(&html).unwrap().replacen("LoRA adapter report", "LoRA adapter report (clean)", 1);
    std::fs::write(&html, page).unwrap();
    let r = run_in(&["verify", "second/rep", "--json"], d.path());
    assert_eq!(r.code, 1);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["report_files"][1]["status"], "changed");
    // No manifest at all (deleted): nothing vouches for the files.
    std::fs::remove_file(out2.join("report.sha256")).unwrap();
    let r = run_in(&["verify", "second/rep", "--json"], d.path());
    assert_eq!(r.code, 1);
    let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    assert_eq!(v["report_files"][0]["status"], "unlisted");
}

#[test]
fn a_probe_report_is_reproduced_by_rerun() {
    let d = tempfile::tempdir().unwrap();
    let out = d.path().join("rep");
    let r = run(&[
        "report",
        "fixtures/peft-llama",
        "--base",
        "fixtures/llama-tiny",
        "--works",
        "fixtures/demo/works",
        "--controls",
        "fixtures/demo/controls",
        "--out",
        s(&out),
        "-q",
    ]);
    assert_eq!(r.code, 0, "{}", r.err);
    let r = run(&["verify", s(&out), "--rerun"]);
    assert_eq!(r.code, 0, "{}{}", r.out, r.err);
    assert!(r.out.contains("reproduced byte for byte"), "{}", r.out);
}

#[test]
fn report_never_writes_through_a_planted_link() {
    let d = tempfile::tempdir().unwrap();
    let evidence = d.path().join("evidence.json");
    std::fs::write(&evidence, "the original evidence").unwrap();
    let out = d.path().join("rep");
    std::fs::create_dir(&out).unwrap();
    std::os::unix::fs::symlink(&evidence, out.join("report.json")).unwrap();
    std::os::unix::fs::symlink(&evidence, out.join("report.html")).unwrap();
    let r = run(&["report", "fixtures/kohya-sd-lora.safetensors", "--out", s(&out), "-q"]);
    assert_eq!(r.code, 0, "{}", r.err);
    assert_eq!(std::fs::read_to_string(&evidence).unwrap(), "the original evidence");
    for f in ["report.json", "report.html", "report.sha256"] {
        let m = std::fs::symlink_metadata(out.join(f)).unwrap();
        assert!(m.file_type().is_file(), "{f} is a regular file now");
    }
    assert!(std::fs::read_dir(&out).unwrap().all(|e| !e.unwrap().file_name().to_string_lossy().ends_with(".tmp")));
}

#[test]
fn an_overflowing_scale_is_an_error_not_a_null_in_the_report() {
    let d = tempfile::tempdir().unwrap();
    let a = d.path().join("a");
    std::fs::create_dir(&a).unwrap();
    for f in ["adapter_model.safetensors", "adapter_config.json"] {
        std::fs::copy(fixtures().join("peft-llama").join(f), a.join(f)).unwrap();
    }
    let cfg_path = a.join("adapter_config.json");
    let mut cfg: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(&cfg_path).unwrap()).unwrap();
    cfg["lora_alpha"] = serde_json::json!(1e308);
    std::fs::write(&cfg_path, cfg.to_string()).unwrap();
    let r = run(&["spectrum", s(&a), "--json", "-q"]);
    refused(&r, "beyond ±1e15 (limit MAX_ABS_VALUE)");
    assert!(r.out.is_empty(), "no JSON with nulls in it");
    let out = d.path().join("rep");
    let r = run(&["report", s(&a), "--out", s(&out), "-q"]);
    refused(&r, "beyond ±1e15 (limit MAX_ABS_VALUE)");
    assert!(!out.join("report.json").exists());
}

#[test]
fn works_beyond_the_probe_text_limit_are_refused_before_the_model_runs() {
    let d = tempfile::tempdir().unwrap();
    let works = d.path().join("works");
    std::fs::create_dir(&works).unwrap();
    // 17 MiB of text in two works (the limit is 16 MiB for works and controls together).
    let chunk = "All work and no play. ".repeat(405_000);
    std::fs::write(works.join("a.txt"), &chunk).unwrap();
    std::fs::write(works.join("b.txt"), &chunk).unwrap();
    let r = run(&["probe", "fixtures/peft-llama", "--base", "fixtures/llama-tiny", "--works", s(&works), "-q"]);
    refused(&r, "above the probe's limit of 16777216 (MAX_PROBE_TEXT_BYTES)");
}

/// docs/security.md lists every limit: each `const MAX_…` in the sources is named there.
#[test]
fn every_limit_is_documented() {
    fn sources(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                sources(&p, out);
            } else if p.extension().is_some_and(|x| x == "rs") {
                out.push(p);
            }
        }
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/security.md")).unwrap();
    let mut files = vec![];
    sources(&root.join("src"), &mut files);
    let mut names = vec![];
    for f in files.iter().filter(|f| !f.ends_with("fixtures.rs")) {
        for line in std::fs::read_to_string(f).unwrap().lines() {
            if let Some(rest) = line.trim_start().split("const ").nth(1).filter(|r| r.starts_with("MAX_")) {
                names.push(rest.split(':').next().unwrap().trim().to_string());
            }
        }
    }
    assert!(names.len() >= 30, "found {names:?}");
    let missing: Vec<&String> = names.iter().filter(|n| !doc.contains(&format!("`{n}`"))).collect();
    assert!(missing.is_empty(), "not in docs/security.md: {missing:?}");
}
