//! Hostile files of issue #14, each planted by the test itself: symbolic links leading out of
//! the tree the user named (findings 4), FIFOs, sockets and devices (5), a file truncated while
//! `scan` reads it (6), a file changed while `report` analyses it (10), and self-links and hard
//! links that made `scan` list one file many times (14). Every run of the binary has a deadline:
//! a command that hangs is killed and fails its test instead of hanging the suite. Leaks are
//! checked against a secret planted outside the tree: neither its marker text, nor its SHA-256,
//! nor its path may appear in stdout, stderr or any file written.

mod common;
use common::*;

use std::io::Read;
use std::os::unix::fs::{symlink, FileExt};
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use lorascope::fixtures::{kohya_sd_lora, SafetensorsBuilder};
use safetensors::Dtype;
use sha2::{Digest, Sha256};

/// Text planted in every secret: it must never appear in anything lorascope writes.
const MARKER: &str = "SECRET-MARKER-5d1e0c9a";

struct Run {
    code: Option<i32>,
    out: String,
    err: String,
}

impl Run {
    fn all(&self) -> String {
        format!("{}\n{}", self.out, self.err)
    }
    fn lines(&self) -> Vec<serde_json::Value> {
        self.out.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}"))).collect()
    }
}

/// Run lorascope with `args`, killing it (and failing the test) after `secs` seconds.
fn run_for(args: &[&str], secs: u64) -> Run {
    let mut child = Command::new(bin())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = so.read_to_end(&mut v);
        v
    });
    let err = std::thread::spawn(move || {
        let mut v = vec![];
        let _ = se.read_to_end(&mut v);
        v
    });
    let deadline = Instant::now() + Duration::from_secs(secs);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            let e = String::from_utf8_lossy(&err.join().unwrap()).into_owned();
            panic!("lorascope {args:?} still running after {secs} s: it hangs (stderr: {e})");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let r = Run {
        code: status.code(),
        out: String::from_utf8_lossy(&out.join().unwrap()).into_owned(),
        err: String::from_utf8_lossy(&err.join().unwrap()).into_owned(),
    };
    assert!(status.signal().is_none(), "lorascope {args:?} killed by signal {:?}: {}", status.signal(), r.err);
    r
}

fn run(args: &[&str]) -> Run {
    run_for(args, 60)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

fn sha256_hex(bytes: &[u8]) -> String {
    Sha256::digest(bytes).iter().map(|b| format!("{b:02x}")).collect()
}

/// Exit code 2 and one stderr line naming `file` and saying `what`.
fn refused(r: &Run, file: &Path, what: &str) {
    assert_eq!(r.code, Some(2), "stdout {} stderr {}", r.out, r.err);
    assert_eq!(r.err.trim_end().lines().count(), 1, "one line: {}", r.err);
    assert!(r.err.contains(s(file)), "names {}: {}", file.display(), r.err);
    assert!(r.err.contains(what), "says {what:?}: {}", r.err);
}

/// Nothing of the secrets (marker, content hash, path) in `text`.
fn no_leak(text: &str, secrets: &[&Path]) {
    assert!(!text.contains(MARKER), "the secret's content leaked: {text}");
    for p in secrets {
        let h = sha256_hex(&std::fs::read(p).unwrap());
        assert!(!text.contains(&h), "the secret's SHA-256 leaked: {text}");
        assert!(!text.contains(s(p)), "the link target {} was printed: {text}", p.display());
    }
}

/// Nothing of the secrets in any file under `dir` (when it exists).
fn no_leak_in_files(dir: &Path, secrets: &[&Path]) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for e in entries {
        let p = e.unwrap().path();
        if p.is_dir() {
            no_leak_in_files(&p, secrets);
        } else {
            no_leak(&String::from_utf8_lossy(&std::fs::read(&p).unwrap()), secrets);
        }
    }
}

/// Secrets outside every tree: an adapter whose metadata carries the marker (a scan prints its
/// tags), a text like /etc/passwd, and JSON configs (PEFT and llama) carrying the marker.
struct Secrets {
    _dir: tempfile::TempDir,
    adapter: PathBuf,
    text: PathBuf,
    peft_config: PathBuf,
    llama_config: PathBuf,
    peft_weights: PathBuf,
}

fn secrets() -> Secrets {
    let dir = tempfile::tempdir().unwrap();
    let adapter = dir.path().join("secret.safetensors");
    let mut b = kohya_sd_lora(4);
    b.meta("ss_tag_frequency", &format!(r#"{{"1_x": {{"{MARKER}": 99}}}}"#));
    b.write(&adapter).unwrap();
    let text = dir.path().join("secret.txt");
    std::fs::write(&text, format!("root:x:0:0:{MARKER}:/root:/bin/sh\n")).unwrap();
    let with_marker = |src: PathBuf, dst: &Path| {
        let mut v: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(src).unwrap()).unwrap();
        v["secret"] = MARKER.into();
        std::fs::write(dst, serde_json::to_string(&v).unwrap()).unwrap();
    };
    let peft_config = dir.path().join("secret-adapter-config.json");
    with_marker(fixtures().join("peft-llama/adapter_config.json"), &peft_config);
    let llama_config = dir.path().join("secret-config.json");
    with_marker(fixtures().join("llama-tiny/config.json"), &llama_config);
    // A different adapter than the fixture (another seed), so its hash is its own.
    let peft_weights = dir.path().join("secret-weights.safetensors");
    let (w, _) = lorascope::fixtures::peft_llama(&Default::default(), 99, false);
    w.write(&peft_weights).unwrap();
    Secrets { _dir: dir, adapter, text, peft_config, llama_config, peft_weights }
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, to.join(p.file_name().unwrap())).unwrap();
    }
}

fn mkfifo(p: &Path) {
    let st = Command::new("mkfifo").arg(p).status().unwrap();
    assert!(st.success(), "mkfifo {}", p.display());
}

fn by<'a>(lines: &'a [serde_json::Value], suffix: &str) -> &'a serde_json::Value {
    lines
        .iter()
        .find(|l| l["path"].as_str().unwrap().ends_with(suffix))
        .unwrap_or_else(|| panic!("no record for {suffix}: {lines:?}"))
}

/// A scan record for a file that was not opened: kind `skipped`, the reason, nothing of the
/// file.
fn skipped(rec: &serde_json::Value, why: &str) {
    assert_eq!(rec["error"]["kind"], "skipped", "{rec}");
    let msg = rec["error"]["message"].as_str().unwrap();
    assert!(msg.contains(rec["path"].as_str().unwrap()), "names the file: {msg}");
    assert!(msg.contains(why), "says {why:?}: {msg}");
    assert!(rec["sha256"].is_null() && rec["bytes"].is_null() && rec["format"].is_null(), "{rec}");
    assert_eq!(rec["flags"], serde_json::json!(["unreadable"]));
}

const OUT_OF_SCAN: &str = "symbolic link leading outside the scanned tree: not followed";

#[test]
fn scan_reports_links_out_of_the_tree_as_skipped_without_reading_them() {
    let sec = secrets();
    let d = tempfile::tempdir().unwrap();
    let t = d.path();
    std::fs::copy(fixtures().join("kohya-sd-lora.safetensors"), t.join("good.safetensors")).unwrap();
    symlink(&sec.adapter, t.join("leak.safetensors")).unwrap();
    symlink(&sec.text, t.join("passwd.safetensors")).unwrap();
    // A link to a directory outside (a home directory): not walked.
    symlink(sec.adapter.parent().unwrap(), t.join("home")).unwrap();
    // A dangling link gets the same words: the output does not tell whether a path outside exists.
    symlink(t.join("../no-such-file-anywhere"), t.join("dangling.safetensors")).unwrap();
    let r = run(&["scan", s(t), "--quiet", "--jobs", "2"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let lines = r.lines();
    let paths: Vec<&str> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
    assert_eq!(lines.len(), 5, "good, leak, passwd, home, dangling: {paths:?}");
    assert!(by(&lines, "good.safetensors")["error"].is_null());
    for name in ["leak.safetensors", "passwd.safetensors", "home", "dangling.safetensors"] {
        skipped(by(&lines, name), OUT_OF_SCAN);
    }
    no_leak(&r.all(), &[&sec.adapter, &sec.text]);
    assert!(r.err.contains("skipped"), "the summary counts skipped files: {}", r.err);
}

#[test]
fn scan_lists_each_file_once_through_self_links_and_hard_links() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path();
    let a = t.join("a.safetensors");
    std::fs::copy(fixtures().join("kohya-sd-lora.safetensors"), &a).unwrap();
    symlink(".", t.join("self")).unwrap();
    std::fs::create_dir(t.join("sub")).unwrap();
    symlink("..", t.join("sub/up")).unwrap();
    symlink("a.safetensors", t.join("b.safetensors")).unwrap();
    std::fs::hard_link(&a, t.join("c.safetensors")).unwrap();
    // A loop of two links: neither resolves.
    symlink("l2.safetensors", t.join("l1.safetensors")).unwrap();
    symlink("l1.safetensors", t.join("l2.safetensors")).unwrap();
    let r = run(&["scan", s(t), "--quiet", "--jobs", "1"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let lines = r.lines();
    let paths: Vec<&str> = lines.iter().map(|l| l["path"].as_str().unwrap()).collect();
    let a_rec: Vec<&serde_json::Value> = lines.iter().filter(|l| l["error"].is_null()).collect();
    assert_eq!(a_rec.len(), 1, "the file is listed once, under its own name: {paths:?}");
    assert_eq!(a_rec[0]["path"], s(&a));
    assert_eq!(lines.len(), 3, "a.safetensors and the two looping links: {paths:?}");
    skipped(by(&lines, "l1.safetensors"), OUT_OF_SCAN);
    skipped(by(&lines, "l2.safetensors"), OUT_OF_SCAN);
    // Naming the same tree twice, and through its self-link, still lists the file once.
    let r = run(&["scan", s(t), s(&t.join("self")), s(&t.join("sub/up")), "--quiet"]);
    assert_eq!(r.lines().iter().filter(|l| l["error"].is_null()).count(), 1, "{}", r.out);
}

#[test]
fn adapter_directories_do_not_follow_links_out() {
    let sec = secrets();
    let d = tempfile::tempdir().unwrap();
    let peft = fixtures().join("peft-llama");
    // Weights linked out.
    let p1 = d.path().join("tree/p1");
    std::fs::create_dir_all(&p1).unwrap();
    std::fs::copy(peft.join("adapter_config.json"), p1.join("adapter_config.json")).unwrap();
    symlink(&sec.peft_weights, p1.join("adapter_model.safetensors")).unwrap();
    let r = run(&["inspect", s(&p1), "--json"]);
    refused(
        &r,
        &p1.join("adapter_model.safetensors"),
        "symbolic link leading outside the adapter directory: not followed",
    );
    no_leak(&r.all(), &[&sec.peft_weights]);
    // Config linked out.
    let p2 = d.path().join("tree/p2");
    std::fs::create_dir_all(&p2).unwrap();
    std::fs::copy(peft.join("adapter_model.safetensors"), p2.join("adapter_model.safetensors")).unwrap();
    symlink(&sec.peft_config, p2.join("adapter_config.json")).unwrap();
    let r = run(&["inspect", s(&p2), "--json"]);
    refused(&r, &p2.join("adapter_config.json"), "symbolic link leading outside the adapter directory: not followed");
    no_leak(&r.all(), &[&sec.peft_config]);
    // The weights file named directly: its config beside it is still checked.
    let w = p2.join("adapter_model.safetensors");
    let r = run(&["inspect", s(&w), "--json"]);
    refused(&r, &p2.join("adapter_config.json"), "symbolic link leading outside the adapter directory: not followed");
    no_leak(&r.all(), &[&sec.peft_config]);
    // In a scan both directories are skipped records.
    let r = run(&["scan", s(&d.path().join("tree")), "--quiet"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let lines = r.lines();
    assert_eq!(lines.len(), 2, "{}", r.out);
    for (rec, file) in
        [(by(&lines, "p1"), "p1/adapter_model.safetensors"), (by(&lines, "p2"), "p2/adapter_config.json")]
    {
        assert_eq!(rec["error"]["kind"], "skipped", "{rec}");
        let msg = rec["error"]["message"].as_str().unwrap();
        assert!(msg.contains(file) && msg.contains(OUT_OF_SCAN), "{msg}");
    }
    no_leak(&r.all(), &[&sec.peft_weights, &sec.peft_config]);
}

#[test]
fn base_directories_do_not_follow_links_out() {
    let sec = secrets();
    let d = tempfile::tempdir().unwrap();
    let a = fixtures().join("peft-llama");
    let base = d.path().join("base");
    copy_dir(&fixtures().join("llama-tiny"), &base);
    std::fs::remove_file(base.join("config.json")).unwrap();
    symlink(&sec.llama_config, base.join("config.json")).unwrap();
    let r = run(&["inspect", s(&a), "--base", s(&base), "--json"]);
    refused(&r, &base.join("config.json"), "symbolic link leading outside the base model directory: not followed");
    no_leak(&r.all(), &[&sec.llama_config]);
    // A Hugging Face cache snapshot links every file into the repository's blobs/: that is
    // inside the tree (the repository folder), and works.
    let repo = d.path().join("hub/models--demo--tiny");
    let snap = repo.join("snapshots/0123abc");
    std::fs::create_dir_all(&snap).unwrap();
    std::fs::create_dir_all(repo.join("blobs")).unwrap();
    for f in ["config.json", "model.safetensors", "tokenizer.json"] {
        let blob = repo.join("blobs").join(sha256_hex(f.as_bytes()));
        std::fs::copy(fixtures().join("llama-tiny").join(f), &blob).unwrap();
        symlink(Path::new("../../blobs").join(blob.file_name().unwrap()), snap.join(f)).unwrap();
    }
    let r = run(&["inspect", s(&a), "--base", s(&snap), "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    // ...but a snapshot file leading out of the repository folder is refused.
    std::fs::remove_file(snap.join("config.json")).unwrap();
    symlink(&sec.llama_config, snap.join("config.json")).unwrap();
    let r = run(&["inspect", s(&a), "--base", s(&snap), "--json"]);
    refused(&r, &snap.join("config.json"), "symbolic link leading outside the base model directory: not followed");
    no_leak(&r.all(), &[&sec.llama_config]);
}

#[test]
fn works_and_controls_directories_do_not_follow_links_out() {
    let sec = secrets();
    let d = tempfile::tempdir().unwrap();
    let a = fixtures().join("kohya-sd-lora.safetensors");
    let works = d.path().join("works");
    std::fs::create_dir(&works).unwrap();
    std::fs::write(works.join("a.txt"), "a work of the user's own").unwrap();
    symlink(&sec.text, works.join("b.txt")).unwrap();
    let out = d.path().join("out");
    let r = run(&["report", s(&a), "--works", s(&works), "--out", s(&out), "--no-timings", "--json", "-q"]);
    refused(&r, &works.join("b.txt"), "symbolic link leading outside the works directory: not followed");
    no_leak(&r.all(), &[&sec.text]);
    no_leak_in_files(&out, &[&sec.text]);
    let good = d.path().join("good");
    std::fs::create_dir(&good).unwrap();
    std::fs::write(good.join("a.txt"), "a work of the user's own").unwrap();
    let controls = d.path().join("controls");
    std::fs::create_dir(&controls).unwrap();
    symlink(&sec.text, controls.join("c.txt")).unwrap();
    let r = run(&[
        "report",
        s(&a),
        "--works",
        s(&good),
        "--controls",
        s(&controls),
        "--out",
        s(&out),
        "--no-timings",
        "--json",
        "-q",
    ]);
    refused(&r, &controls.join("c.txt"), "symbolic link leading outside the works directory: not followed");
    no_leak(&r.all(), &[&sec.text]);
    no_leak_in_files(&out, &[&sec.text]);
}

/// A guard, not a finding: what the user names on the command line may itself be a link (it
/// passes before and after the change).
#[test]
fn paths_named_on_the_command_line_may_be_links() {
    let d = tempfile::tempdir().unwrap();
    let link = d.path().join("link.safetensors");
    symlink(fixtures().join("kohya-sd-lora.safetensors"), &link).unwrap();
    let r = run(&["inspect", s(&link), "--json"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let real = d.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::copy(fixtures().join("kohya-sd-lora.safetensors"), real.join("k.safetensors")).unwrap();
    let ldir = d.path().join("linked-dir");
    symlink(&real, &ldir).unwrap();
    let r = run(&["scan", s(&ldir), "--quiet"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let lines = r.lines();
    assert_eq!(lines.len(), 1);
    assert_eq!(lines[0]["path"], s(&ldir.join("k.safetensors")));
    assert!(lines[0]["error"].is_null(), "{}", lines[0]);
}

#[test]
fn fifos_sockets_and_devices_are_refused_without_hanging() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path().join("tree");
    std::fs::create_dir(&t).unwrap();
    std::fs::copy(fixtures().join("kohya-sd-lora.safetensors"), t.join("good.safetensors")).unwrap();
    let fifo = t.join("pipe.safetensors");
    mkfifo(&fifo);
    let sock = t.join("sock.safetensors");
    let _listener = std::os::unix::net::UnixListener::bind(&sock).unwrap();
    let peft = t.join("peft");
    std::fs::create_dir(&peft).unwrap();
    mkfifo(&peft.join("adapter_model.safetensors"));
    let r = run_for(&["scan", s(&t), "--quiet"], 30);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let lines = r.lines();
    assert_eq!(lines.len(), 4, "{}", r.out);
    assert!(by(&lines, "good.safetensors")["error"].is_null());
    skipped(by(&lines, "pipe.safetensors"), "not a regular file (FIFO)");
    skipped(by(&lines, "sock.safetensors"), "not a regular file (socket)");
    let p = by(&lines, "peft");
    assert!(p["error"]["message"]
        .as_str()
        .unwrap()
        .contains("peft/adapter_model.safetensors: not a regular file (FIFO)"));

    // Single commands: exit 2 naming the file.
    let fifo_what = "not a regular file (FIFO)";
    refused(&run_for(&["inspect", s(&fifo)], 30), &fifo, fifo_what);
    refused(&run_for(&["inspect", s(&peft)], 30), &peft.join("adapter_model.safetensors"), fifo_what);
    refused(&run_for(&["inspect", s(&sock)], 30), &sock, "not a regular file (socket)");
    refused(&run_for(&["inspect", "/dev/null"], 30), Path::new("/dev/null"), "not a regular file (character device)");
    let a = fixtures().join("kohya-sd-lora.safetensors");
    refused(&run_for(&["inspect", s(&a), "--base", s(&fifo)], 30), &fifo, fifo_what);
    let out = d.path().join("out");
    let report = |extra: &[&str]| {
        let mut args = vec!["report", s(&a), "--out", s(&out), "-q"];
        args.extend(extra);
        run_for(&args, 30)
    };
    let jsonl = d.path().join("works.jsonl");
    mkfifo(&jsonl);
    refused(&report(&["--works", s(&jsonl)]), &jsonl, fifo_what);
    let works = d.path().join("works");
    std::fs::create_dir(&works).unwrap();
    std::fs::write(works.join("a.txt"), "a work").unwrap();
    let prompts = d.path().join("prompts.txt");
    mkfifo(&prompts);
    refused(&report(&["--works", s(&works), "--prompts", s(&prompts)]), &prompts, fifo_what);
    mkfifo(&works.join("b.txt"));
    refused(&report(&["--works", s(&works)]), &works.join("b.txt"), fifo_what);
    let list = d.path().join("list.txt");
    mkfifo(&list);
    refused(&run_for(&["scan", "--list", s(&list), "--quiet"], 30), &list, fifo_what);
}

#[test]
fn verify_does_not_hang_on_fifos() {
    let d = tempfile::tempdir().unwrap();
    let a = fixtures().join("kohya-sd-lora.safetensors");
    let b = fixtures().join("sd-tiny-base.safetensors");
    let out = d.path().join("r");
    let r = run(&["report", s(&a), "--base", s(&b), "--out", s(&out), "--no-timings", "-q"]);
    assert_eq!(r.code, Some(0), "{}", r.err);
    // A recorded input replaced by a FIFO: verify finishes and says the input is not there.
    let fifo = d.path().join("pipe");
    mkfifo(&fifo);
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("report.json")).unwrap()).unwrap();
    v["inputs"][0]["path"] = s(&fifo).into();
    std::fs::write(out.join("report.json"), serde_json::to_string(&v).unwrap()).unwrap();
    let r = run_for(&["verify", s(&out), "--json"], 30);
    assert_eq!(r.code, Some(1), "{}", r.err);
    let res: serde_json::Value = serde_json::from_str(&r.out).unwrap();
    let rec = res["inputs"].as_array().unwrap().iter().find(|x| x["path"] == s(&fifo)).unwrap();
    assert_eq!(rec["status"], "missing", "{rec}");
    // report.json itself a FIFO.
    let r2 = d.path().join("r2");
    std::fs::create_dir(&r2).unwrap();
    mkfifo(&r2.join("report.json"));
    refused(&run_for(&["verify", s(&r2)], 30), &r2.join("report.json"), "not a regular file (FIFO)");
}

/// A kohya adapter of `modules` linear modules of 64 × `width` f32 factors each (`modules` × 2 ×
/// 64 × `width` × 4 bytes), plus one 4 × 4 module `lora_unet_a_small` first in the file.
fn big_adapter(modules: usize, width: usize, small_up0: f32) -> SafetensorsBuilder {
    let mut rng = lorascope::rng::Rng::new(7);
    let mut b = SafetensorsBuilder::new();
    for i in 0..modules {
        b.random(&mut rng, &format!("lora_unet_m{i}.lora_down.weight"), &[64, width], 0.1, Dtype::F32);
        b.random(&mut rng, &format!("lora_unet_m{i}.lora_up.weight"), &[width, 64], 0.1, Dtype::F32);
    }
    let mut up = vec![0.25f32; 8];
    up[0] = small_up0;
    b.add("lora_unet_a_small.lora_down.weight", &[2, 4], &[0.5, 0.0, 0.1, 0.2, 0.0, 0.5, 0.3, 0.1], Dtype::F32);
    b.add("lora_unet_a_small.lora_up.weight", &[4, 2], &up, Dtype::F32);
    b
}

/// Rewrite `path` from `full` in a loop (truncate to a stub, then write it back) until `stop`.
fn churn(path: PathBuf, full: Vec<u8>, stop: Arc<AtomicBool>) -> std::thread::JoinHandle<usize> {
    std::thread::spawn(move || {
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        let mut cycles = 0;
        while !stop.load(Ordering::Relaxed) {
            f.set_len(4096).unwrap();
            std::thread::sleep(Duration::from_millis(2));
            f.write_all_at(&full, 0).unwrap();
            std::thread::sleep(Duration::from_millis(8));
            cycles += 1;
        }
        cycles
    })
}

/// What this covers: a file truncated and rewritten in a loop by another thread while `scan`
/// runs, several times over. Before the change the memory-mapped file raised SIGBUS in most
/// runs and killed the scan; now every run ends normally with one line per file. It does not
/// pin the exact moment of the truncation (a truncation between discovery and read is one of
/// the cases the loop hits, not one it forces).
#[test]
fn scan_survives_a_file_truncated_while_it_runs() {
    let d = tempfile::tempdir().unwrap();
    let t = d.path();
    for i in 0..6 {
        std::fs::copy(fixtures().join("kohya-sd-lora.safetensors"), t.join(format!("good{i}.safetensors"))).unwrap();
    }
    let full = big_adapter(12, 4096, 0.5).to_bytes();
    let churned = t.join("churn.safetensors");
    std::fs::write(&churned, &full).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = churn(churned.clone(), full, stop.clone());
    let mut outcomes = vec![];
    for _ in 0..4 {
        let o = Command::new(bin()).args(["scan", s(t), "--quiet", "--jobs", "2"]).output().unwrap();
        outcomes.push(o);
    }
    stop.store(true, Ordering::Relaxed);
    let cycles = worker.join().unwrap();
    assert!(cycles > 0);
    for o in outcomes {
        let err = String::from_utf8_lossy(&o.stderr);
        assert!(o.status.signal().is_none(), "scan killed by signal {:?}: {err}", o.status.signal());
        assert_eq!(o.status.code(), Some(0), "{err}");
        let lines: Vec<serde_json::Value> =
            String::from_utf8(o.stdout).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
        assert_eq!(lines.len(), 7, "one line per file");
        for i in 0..6 {
            assert!(by(&lines, &format!("good{i}.safetensors"))["error"].is_null());
        }
        let c = by(&lines, "churn.safetensors");
        assert!(c["error"].is_null() || c["error"]["kind"] == "input", "{c}");
    }
}

#[test]
fn scan_refuses_an_adapter_over_the_in_memory_limit_without_reading_it() {
    let d = tempfile::tempdir().unwrap();
    let big = d.path().join("big.safetensors");
    // Sparse: 4 GiB + 8 bytes of zeros on disk costs nothing.
    let f = std::fs::File::create(&big).unwrap();
    f.set_len((4u64 << 30) + 8).unwrap();
    drop(f);
    std::fs::copy(fixtures().join("kohya-sd-lora.safetensors"), d.path().join("good.safetensors")).unwrap();
    let r = run_for(&["scan", s(d.path()), "--quiet"], 30);
    assert_eq!(r.code, Some(0), "{}", r.err);
    let lines = r.lines();
    assert_eq!(lines.len(), 2);
    let rec = by(&lines, "big.safetensors");
    assert_eq!(rec["error"]["kind"], "input", "{rec}");
    let msg = rec["error"]["message"].as_str().unwrap();
    assert!(msg.contains("4294967304 bytes") && msg.contains("4294967296-byte limit"), "{msg}");
    assert!(rec["sha256"].is_null(), "not read, so not hashed: {rec}");
}

/// While `report` runs, one value of a small module flips between two settings (4 bytes written
/// in place, over and over). The adapter's recorded SHA-256 must be that of the bytes whose
/// numbers the report gives: each run is compared with a clean run of the version its hash
/// names. Before the change the hash and the analysis read the memory-mapped file at different
/// moments and disagreed in about half the runs.
#[test]
fn report_records_the_hash_of_the_bytes_it_analysed() {
    let d = tempfile::tempdir().unwrap();
    let (va, vb) = (big_adapter(16, 2048, 0.5).to_bytes(), big_adapter(16, 2048, 4.0).to_bytes());
    assert_eq!(va.len(), vb.len());
    let diff: Vec<usize> = (0..va.len()).filter(|&i| va[i] != vb[i]).collect();
    let off = diff[0] & !3;
    assert!(diff.iter().all(|&i| i >= off && i < off + 4), "one 4-byte value differs");
    let clean = |name: &str, bytes: &[u8]| {
        let p = d.path().join(name);
        std::fs::write(&p, bytes).unwrap();
        let r = run(&["report", s(&p), "--out", s(&d.path().join("o")), "--no-timings", "--json", "-q"]);
        assert_eq!(r.code, Some(0), "{}", r.err);
        let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
        (sha256_hex(bytes), v["spectrum"]["modules"].clone())
    };
    let (ha, ma) = clean("a.safetensors", &va);
    let (hb, mb) = clean("b.safetensors", &vb);
    assert_ne!(ma, mb, "the flipped value changes the numbers");
    let p = d.path().join("churn.safetensors");
    std::fs::write(&p, &va).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let worker = {
        let (p, stop) = (p.clone(), stop.clone());
        let (wa, wb) = (va[off..off + 4].to_vec(), vb[off..off + 4].to_vec());
        std::thread::spawn(move || {
            let f = std::fs::OpenOptions::new().write(true).open(&p).unwrap();
            while !stop.load(Ordering::Relaxed) {
                f.write_all_at(&wa, off as u64).unwrap();
                std::thread::sleep(Duration::from_micros(300));
                f.write_all_at(&wb, off as u64).unwrap();
                std::thread::sleep(Duration::from_micros(300));
            }
        })
    };
    let mut checked = 0;
    let mut mismatched = vec![];
    for i in 0..8 {
        let r = run(&["report", s(&p), "--out", s(&d.path().join(format!("c{i}"))), "--no-timings", "--json", "-q"]);
        assert_eq!(r.code, Some(0), "{}", r.err);
        let v: serde_json::Value = serde_json::from_str(&r.out).unwrap();
        let h = v["inputs"].as_array().unwrap().iter().find(|x| x["role"] == "adapter").unwrap()["sha256"].clone();
        let want = if h == ha.as_str() {
            &ma
        } else if h == hb.as_str() {
            &mb
        } else {
            continue; // a torn read of the 4 bytes: neither version, nothing to compare with
        };
        checked += 1;
        if &v["spectrum"]["modules"] != want {
            mismatched.push(i);
        }
    }
    stop.store(true, Ordering::Relaxed);
    worker.join().unwrap();
    assert!(checked >= 4, "too few runs read a whole version ({checked} of 8)");
    assert!(mismatched.is_empty(), "runs {mismatched:?}: the recorded hash is not of the bytes analysed");
}

/// A memory-mapped base (or a GGUF base read tensor by tensor) changed in place after it was
/// opened: the command refuses instead of reporting numbers under the hash taken at open.
#[test]
fn a_base_changed_after_it_was_opened_is_refused() {
    use lorascope::load::LoadOptions;
    let d = tempfile::tempdir().unwrap();
    let base = d.path().join("base.safetensors");
    std::fs::copy(fixtures().join("sd-tiny-base.safetensors"), &base).unwrap();
    let a = fixtures().join("kohya-sd-lora.safetensors");
    let (ad, b) = lorascope::pipeline::open(&a, Some(&base), &LoadOptions::default()).unwrap();
    let b = b.unwrap();
    // Flip the lowest mantissa bit of the first stored value (stays finite).
    let bytes = std::fs::read(&base).unwrap();
    let first = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let f = std::fs::OpenOptions::new().write(true).open(&base).unwrap();
    f.write_all_at(&[bytes[first] ^ 1], first as u64).unwrap();
    let e = lorascope::pipeline::spectrum(&ad, Some(&b), &Default::default(), &|| {}).expect_err("refused");
    let msg = e.to_string();
    assert!(msg.contains(s(&base)) && msg.contains("changed while lorascope read it"), "{msg}");
    assert_eq!(e.exit_code(), 2);
    // GGUF: read through its file handle, re-hashed the same way.
    let g = d.path().join("base.gguf");
    std::fs::copy(fixtures().join("llama-tiny.gguf"), &g).unwrap();
    let (ad, b) = lorascope::pipeline::open(&fixtures().join("peft-llama"), Some(&g), &LoadOptions::default()).unwrap();
    let b = b.unwrap();
    let bytes = std::fs::read(&g).unwrap();
    let last = bytes.len() - 1;
    let f = std::fs::OpenOptions::new().write(true).open(&g).unwrap();
    f.write_all_at(&[bytes[last] ^ 1], last as u64).unwrap();
    let e = lorascope::inspect(&ad, Some(&b)).expect_err("refused");
    assert!(e.to_string().contains("changed while lorascope read it"), "{e}");
}

/// Works and prompts are recorded with the hash of the bytes that were read and parsed, even if
/// the files change afterwards (before the change the probe hashed them again from disk).
#[test]
fn works_and_prompts_are_recorded_with_the_hash_of_the_bytes_read() {
    use lorascope::load::LoadOptions;
    use lorascope::pipeline::ProbeData;
    let d = tempfile::tempdir().unwrap();
    let works = d.path().join("works");
    copy_dir(&fixtures().join("demo/works"), &works);
    let prompts = d.path().join("prompts.txt");
    std::fs::write(&prompts, "Once upon a time\nThe sea was\n").unwrap();
    let mut want = std::collections::BTreeMap::new();
    for p in std::fs::read_dir(&works).unwrap().map(|e| e.unwrap().path()).chain([prompts.clone()]) {
        want.insert(s(&p).to_string(), sha256_hex(&std::fs::read(&p).unwrap()));
    }
    let (a, b) = lorascope::pipeline::open(
        &fixtures().join("peft-llama"),
        Some(&fixtures().join("llama-tiny")),
        &LoadOptions::default(),
    )
    .unwrap();
    let b = b.unwrap();
    let data = ProbeData::load(&works, None, Some(&prompts)).unwrap();
    for p in want.keys() {
        std::fs::write(p, "changed after it was read").unwrap();
    }
    let th = lorascope::probe::Thresholds { prefix_tokens: 8, new_tokens: 8, stride: 1000, ..Default::default() };
    let s = lorascope::pipeline::spectrum(&a, Some(&b), &Default::default(), &|| {}).unwrap();
    let r = lorascope::pipeline::probe(&a, &b, s, &data.inputs(), &th, &lorascope::probe::Quiet).unwrap();
    let got: std::collections::BTreeMap<String, String> = r
        .spectrum
        .inspect
        .inputs
        .iter()
        .filter(|i| matches!(i.role.as_str(), "work" | "prompts"))
        .map(|i| (i.path.clone(), i.sha256.clone()))
        .collect();
    assert_eq!(got, want);
}
