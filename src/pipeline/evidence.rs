//! `report` and `verify`: assemble everything the inputs allow into one `Report`, and re-check
//! the recorded input hashes later (chain of custody).

use std::collections::BTreeMap;
use std::path::Path;

use crate::error::{Error, Result};
use crate::load::hashes::sha256_file;
use crate::load::works::WorkSet;
use crate::report::{
    path_string, FileCheck, InputRole, ProbeSection, Report, Rerun, SpectrumReport, SpectrumSection, Stage, StageName,
    Verified, VerifyReport, VerifyStatus, WorkInfo, MANIFEST,
};

fn excerpt(text: &str) -> String {
    let t: String = text.chars().take(240).collect();
    if text.chars().count() > 240 {
        format!("{t}…")
    } else {
        t
    }
}

/// Whether the probe ran: its findings, or why not.
pub enum ProbeOutcome {
    Ran(Box<ProbeSection>),
    Images(Box<crate::report::ImageProbeSection>),
    Skipped(String),
}

/// Assemble the report from a spectrum report, the supplied works and controls, and the probe.
pub fn build_report(
    spectrum: SpectrumReport,
    works: Option<&WorkSet>,
    controls: Option<&WorkSet>,
    probe: ProbeOutcome,
    command_line: Vec<String>,
) -> Result<Report> {
    let SpectrumReport { inspect: s, modules, layers, totals, statement, settings } = spectrum;
    let mut inputs = s.inputs;
    let mut infos = vec![];
    for (role, set) in [(InputRole::Work, works), (InputRole::Control, controls)] {
        let Some(set) = set else { continue };
        // The probe records the works it read; record the others here, with the digest of the
        // bytes that were read (never by reading the file a second time).
        for (f, d) in set.files.iter().zip(&set.digests) {
            if !inputs.iter().any(|i| i.role == role && i.path == path_string(f)) {
                inputs.push(super::recorded(role, f, d));
            }
        }
        for w in &set.works {
            infos.push(WorkInfo {
                id: w.id.clone(),
                role,
                sha256: w.sha256.clone(),
                chars: w.text.chars().count(),
                excerpt: excerpt(&w.text),
            });
        }
    }
    let has_base = s.base.is_some();
    let base_reason = if has_base {
        "base given: modules mapped to base weights, base-relative metrics computed".to_string()
    } else {
        "no --base: module names not checked against a base, no base-relative metrics".to_string()
    };
    let mut image_probe = None;
    let (probe, probe_ran, probe_reason) = match probe {
        ProbeOutcome::Images(p) => {
            let r = &p.result;
            let why = format!(
                "merged Stable Diffusion model run on {} works, {} controls and {} style controls ({} UNet passes, {} \
                 generations)",
                r.works.len(),
                r.controls.len(),
                r.style_controls.len(),
                r.unet_passes,
                r.generations.len()
            );
            image_probe = Some(*p);
            (None, true, why)
        }
        ProbeOutcome::Ran(p) => {
            let why = format!(
                "merged model run on {} works and {} controls ({} tokens scored, {} generated)",
                p.result.works.len(),
                p.result.controls.len(),
                p.result.scored_tokens,
                p.result.generated_tokens
            );
            (Some(*p), true, why)
        }
        ProbeOutcome::Skipped(why) => (None, false, why),
    };
    Ok(Report {
        schema_version: s.schema_version,
        tool: s.tool,
        command_line,
        inputs,
        adapter: s.adapter,
        base: s.base,
        spectrum: SpectrumSection { modules, layers, totals, statement },
        works: infos,
        probe,
        image_probe,
        stages: vec![
            Stage { name: StageName::Inspect, ran: true, reason: "always".into() },
            Stage { name: StageName::Base, ran: has_base, reason: base_reason },
            Stage { name: StageName::Spectrum, ran: true, reason: "static analysis of the adapter's factors".into() },
            Stage { name: StageName::Probe, ran: probe_ran, reason: probe_reason },
        ],
        settings,
        warnings: s.warnings,
        timings: None,
    })
}

/// A report directory as `verify` read it: the recorded report (for `--rerun`) and what was
/// checked.
#[derive(Debug)]
pub struct Verification {
    pub recorded: Report,
    pub outcome: VerifyReport,
}

/// The manifest's entries: file name → SHA-256 (`sha256sum` lines; others ignored).
fn read_manifest(dir: &Path) -> BTreeMap<String, String> {
    let Ok(text) = std::fs::read_to_string(dir.join(MANIFEST)) else { return BTreeMap::new() };
    text.lines()
        .filter_map(|l| {
            let (hash, name) = l.split_once("  ")?;
            let ok = hash.len() == 64 && hash.bytes().all(|b| b.is_ascii_hexdigit());
            ok.then(|| (name.to_string(), hash.to_ascii_lowercase()))
        })
        .collect()
}

/// A file's SHA-256 now (read through the safe open), and its state against the recorded one:
/// `None` recorded means nothing lists it.
fn recheck(path: &Path, recorded: Option<&str>) -> (VerifyStatus, Option<String>) {
    let now = sha256_file(path).ok().map(|(h, _)| h);
    let status = match (recorded, &now) {
        (_, None) => VerifyStatus::Missing,
        (None, Some(_)) => VerifyStatus::Unlisted,
        (Some(r), Some(h)) if r == h => VerifyStatus::Ok,
        _ => VerifyStatus::Changed,
    };
    (status, now)
}

fn check_report_file(dir: &Path, name: &str, manifest: &BTreeMap<String, String>) -> FileCheck {
    let recorded = manifest.get(name).cloned();
    let (status, now) = recheck(&dir.join(name), recorded.as_deref());
    FileCheck { file: name.to_string(), status, recorded_sha256: recorded, sha256: now }
}

/// Check a report directory (chain of custody): report.json and report.html against the
/// manifest, report.json's canonical form, and the SHA-256 of every recorded input now. A
/// report that records no inputs, or no adapter, is refused: there is nothing it could vouch
/// for. Without signatures, this proves the files are unchanged since the manifest was
/// written, not who wrote it (docs/security.md); `--rerun` reproduces the findings themselves.
pub fn verify(dir: &Path) -> Result<Verification> {
    let p = dir.join("report.json");
    // Through load::fsguard, as every recorded path below (`sha256_file`): a FIFO or device in
    // place of a file is an error, never a hang.
    let bytes = crate::load::fsguard::read(&p, None, crate::load::fsguard::MAX_JSON_BYTES, "a report")?;
    let text = String::from_utf8(bytes).map_err(|e| Error::read(&p, "not a lorascope report", e))?;
    let r: Report = serde_json::from_str(&text).map_err(|e| Error::read(&p, "not a lorascope report", e))?;
    if !r.inputs.iter().any(|i| i.role == InputRole::Adapter) {
        return Err(Error::input(
            &p,
            format!(
                "records {} input(s) and no adapter: nothing to verify (every lorascope report records its adapter; \
                 this one was edited or is not a lorascope report)",
                r.inputs.len()
            ),
        ));
    }
    let manifest = read_manifest(dir);
    let report_files: Vec<FileCheck> =
        ["report.json", "report.html"].iter().map(|f| check_report_file(dir, f, &manifest)).collect();
    let canonical = crate::report::to_canonical_json(&r) == text;
    let inputs: Vec<Verified> = r
        .inputs
        .iter()
        .map(|i| {
            let (status, now) = recheck(Path::new(&i.path), Some(&i.sha256));
            Verified { role: i.role, path: i.path.clone(), status, recorded_sha256: i.sha256.clone(), sha256: now }
        })
        .collect();
    let ok = canonical
        && report_files.iter().all(|f| f.status == VerifyStatus::Ok)
        && inputs.iter().all(|i| i.status == VerifyStatus::Ok);
    Ok(Verification { recorded: r, outcome: VerifyReport { report_files, canonical, inputs, rerun: None, ok } })
}

/// The findings of a report: everything but the wall-clock timings, the only part that may
/// differ between two runs on the same inputs.
fn findings(r: &Report) -> serde_json::Value {
    let mut v = serde_json::to_value(r).unwrap_or(serde_json::Value::Null);
    if let Some(o) = v.as_object_mut() {
        o.remove("timings");
    }
    v
}

/// JSON paths (`/a/0/b`) where two values differ, at most `limit`.
fn differences(a: &serde_json::Value, b: &serde_json::Value, at: &str, out: &mut Vec<String>, limit: usize) {
    use serde_json::Value;
    if out.len() >= limit || a == b {
        return;
    }
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            let keys: std::collections::BTreeSet<&String> = x.keys().chain(y.keys()).collect();
            for k in keys {
                let null = Value::Null;
                differences(x.get(k).unwrap_or(&null), y.get(k).unwrap_or(&null), &format!("{at}/{k}"), out, limit);
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (p, q)) in x.iter().zip(y).enumerate() {
                differences(p, q, &format!("{at}/{i}"), out, limit);
            }
        }
        _ => out.push(if at.is_empty() { "/".to_string() } else { at.to_string() }),
    }
}

/// Compare a recorded report with the report a rerun of its command produced: reproduced when
/// their findings serialise to the same bytes.
pub fn compare_rerun(recorded: &Report, rerun: &Report) -> Rerun {
    let (a, b) = (findings(recorded), findings(rerun));
    let mut diffs = vec![];
    differences(&a, &b, "", &mut diffs, 50);
    Rerun { reproduced: diffs.is_empty(), differences: diffs }
}

/// The stages of `report` after the inputs are open: the spectrum, then the probe when the
/// works and a runnable text base allow it (each skip with its reason), then the report.
/// `timings` collects wall-clock seconds per stage; `summary` the terminal text.
pub struct ReportRun {
    pub report: Report,
    pub summary: String,
}

/// Hooks for progress display: one tick per analysed module, and the probe's progress.
pub struct ReportHooks<'a> {
    pub module_tick: &'a (dyn Fn() + Sync),
    /// Called when the spectrum is done (so its progress bar can close before the probe's).
    pub spectrum_done: &'a dyn Fn(),
    pub probe: &'a dyn crate::probe::Progress,
}

#[allow(clippy::too_many_arguments)]
pub fn run_report(
    adapter: &crate::load::Adapter,
    base: Option<&crate::load::BaseModel>,
    data: Option<&super::Works>,
    settings: &super::ProbeSettings,
    opts: &crate::spectral::SpectrumOptions,
    command_line: Vec<String>,
    hooks: &ReportHooks,
    timings: &mut std::collections::BTreeMap<String, f64>,
) -> Result<ReportRun> {
    let t = std::time::Instant::now();
    let s = super::spectrum(adapter, base, opts, hooks.module_tick);
    (hooks.spectrum_done)();
    let s = s?;
    timings.insert("spectrum_s".to_string(), t.elapsed().as_secs_f64());
    let mut summary = crate::report::render_spectrum(&s, 10);
    let thresholds = &settings.text;
    let (mut s, outcome) = match (data, base) {
        (None, _) => (s, ProbeOutcome::Skipped("no --works given: nothing to probe for".into())),
        (Some(super::Works::Images(d)), Some(b)) => {
            let t = std::time::Instant::now();
            let p = super::image::probe_images(
                adapter,
                b,
                settings.tokenizer.as_deref(),
                s,
                d,
                &settings.image,
                hooks.probe,
            )?;
            timings.insert("probe_s".to_string(), t.elapsed().as_secs_f64());
            summary += "\n";
            summary += &crate::report::render_image_probe(&p);
            (p.spectrum, ProbeOutcome::Images(Box::new(p.probe)))
        }
        (Some(_), None) => (
            s,
            ProbeOutcome::Skipped(
                "works given but no --base: the probe runs the merged model and needs the base".into(),
            ),
        ),
        (Some(_), Some(b)) if !crate::model::is_text_base(b) => (
            s,
            ProbeOutcome::Skipped(
                "the works are texts but the base is not a runnable text model (Hugging Face llama-family directory \
                 or GGUF), so the works are recorded with their hashes only; image works (a folder of PNG/JPEG/WebP) \
                 are probed on a Stable Diffusion base"
                    .into(),
            ),
        ),
        (Some(super::Works::Text(d)), Some(b)) => {
            let t = std::time::Instant::now();
            let p = super::probe(adapter, b, s, &d.inputs(), thresholds, hooks.probe)?;
            timings.insert("probe_s".to_string(), t.elapsed().as_secs_f64());
            summary += "\n";
            summary += &crate::report::render_probe(&p);
            (p.spectrum, ProbeOutcome::Ran(Box::new(p.probe)))
        }
    };
    let text = data.and_then(super::Works::text);
    if let (Some(super::Works::Images(d)), ProbeOutcome::Skipped(_)) = (data, &outcome) {
        // Skipped: the images are still recorded with their hashes.
        s.inspect.inputs.extend(d.recorded_inputs());
    }
    let works = text.map(|d| &d.works);
    let controls = text.and_then(|d| d.controls.as_ref());
    let report = build_report(s, works, controls, outcome, command_line)?;
    Ok(ReportRun { report, summary })
}

/// Write report.json, report.html and their manifest report.sha256 into `out` (created if
/// missing); returns the paths of the first two. Each file is written to a new temporary file
/// in `out` and renamed over its name, so a `report.json` that is a symbolic link is replaced,
/// never written through (it could point at the evidence itself), and a reader never sees a
/// half-written file.
pub fn write_report_dir(r: &Report, out: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(out).map_err(|e| Error::read(out, "cannot create", e))?;
    let json = crate::report::to_canonical_json(r);
    let html = crate::report::html::render_html(r);
    let manifest = format!(
        "{}  report.json\n{}  report.html\n",
        crate::load::hashes::sha256_bytes(json.as_bytes()),
        crate::load::hashes::sha256_bytes(html.as_bytes())
    );
    let json_path = replace_file(out, "report.json", &json)?;
    let html_path = replace_file(out, "report.html", &html)?;
    replace_file(out, MANIFEST, &manifest)?;
    Ok((json_path, html_path))
}

/// Write `text` to `dir/name` through a fresh temporary file (created exclusively: it cannot be
/// a planted link) renamed over the name.
fn replace_file(dir: &Path, name: &str, text: &str) -> Result<std::path::PathBuf> {
    use std::io::Write;
    let target = dir.join(name);
    let tmp = dir.join(format!(".{name}.{}.tmp", std::process::id()));
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).open(&tmp)?;
        f.write_all(text.as_bytes())?;
        f.sync_all()?;
        std::fs::rename(&tmp, &target)
    };
    write().map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        Error::read(&target, "cannot write", e)
    })?;
    Ok(target)
}
