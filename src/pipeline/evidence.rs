//! `report` and `verify`: assemble everything the inputs allow into one `Report`, and re-check
//! the recorded input hashes later (chain of custody).

use std::path::Path;

use crate::error::{Error, Result};
use crate::load::hashes::sha256_file;
use crate::load::works::WorkSet;
use crate::report::{
    path_string, InputFile, InputRole, ProbeSection, Report, SpectrumReport, SpectrumSection, Stage, StageName,
    Verified, VerifyStatus, WorkInfo,
};

fn excerpt(text: &str) -> String {
    let t: String = text.chars().take(240).collect();
    if text.chars().count() > 240 {
        format!("{t}…")
    } else {
        t
    }
}

/// Input records (path, size, SHA-256) of supplied files such as works and controls.
pub fn file_inputs(role: InputRole, files: &[std::path::PathBuf]) -> Result<Vec<InputFile>> {
    files
        .iter()
        .map(|f| {
            let (sha256, bytes) = sha256_file(f)?;
            Ok(InputFile { role, path: path_string(f), bytes, sha256 })
        })
        .collect()
}

/// Whether the probe ran: its findings, or why not.
pub enum ProbeOutcome {
    Ran(Box<ProbeSection>),
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
        // The probe records (and hashes) the works it read; record the others only.
        let unrecorded: Vec<std::path::PathBuf> = set
            .files
            .iter()
            .filter(|f| !inputs.iter().any(|i| i.role == role && i.path == path_string(f)))
            .cloned()
            .collect();
        inputs.extend(file_inputs(role, &unrecorded)?);
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
    let (probe, probe_ran, probe_reason) = match probe {
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

/// Recompute the SHA-256 of every input named in `dir/report.json` (chain of custody).
pub fn verify(dir: &Path) -> Result<Vec<Verified>> {
    let p = dir.join("report.json");
    // Through load::fsguard, as every recorded path below (`sha256_file`): a FIFO or device in
    // place of a file is an error, never a hang.
    let text = crate::load::fsguard::read(&p, None, crate::load::fsguard::MAX_JSON_BYTES, "a report")?;
    let r: Report = serde_json::from_slice(&text).map_err(|e| Error::read(&p, "not a lorascope report", e))?;
    Ok(r.inputs
        .iter()
        .map(|i| {
            let now = sha256_file(Path::new(&i.path)).ok().map(|(h, _)| h);
            let status = match &now {
                None => VerifyStatus::Missing,
                Some(h) if *h == i.sha256 => VerifyStatus::Ok,
                Some(_) => VerifyStatus::Changed,
            };
            Verified { role: i.role, path: i.path.clone(), status, recorded_sha256: i.sha256.clone(), sha256: now }
        })
        .collect())
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
    data: Option<&super::ProbeData>,
    thresholds: &crate::probe::Thresholds,
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
    let (s, outcome) = match (data, base) {
        (None, _) => (s, ProbeOutcome::Skipped("no --works given: nothing to probe for".into())),
        (Some(_), None) => (
            s,
            ProbeOutcome::Skipped(
                "works given but no --base: the probe runs the merged model and needs the base".into(),
            ),
        ),
        (Some(_), Some(b)) if !crate::model::is_text_base(b) => (
            s,
            ProbeOutcome::Skipped(
                "the base is not a runnable text model (Hugging Face llama-family directory or GGUF); probes of \
                 image models are not implemented yet, so the works are recorded with their hashes only"
                    .into(),
            ),
        ),
        (Some(d), Some(b)) => {
            let t = std::time::Instant::now();
            let p = super::probe(adapter, b, s, &d.inputs(), thresholds, hooks.probe)?;
            timings.insert("probe_s".to_string(), t.elapsed().as_secs_f64());
            summary += "\n";
            summary += &crate::report::render_probe(&p);
            (p.spectrum, ProbeOutcome::Ran(Box::new(p.probe)))
        }
    };
    let works = data.map(|d| &d.works);
    let controls = data.and_then(|d| d.controls.as_ref());
    let report = build_report(s, works, controls, outcome, command_line)?;
    Ok(ReportRun { report, summary })
}

/// Write report.json and report.html into `out` (created if missing); returns their paths.
pub fn write_report_dir(r: &Report, out: &Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    std::fs::create_dir_all(out).map_err(|e| Error::read(out, "cannot create", e))?;
    let write = |name: &str, text: &str| {
        let p = out.join(name);
        std::fs::write(&p, text).map_err(|e| Error::read(&p, "cannot write", e))?;
        Ok::<_, Error>(p)
    };
    let json = write("report.json", &crate::report::to_canonical_json(r))?;
    let html = write("report.html", &crate::report::html::render_html(r))?;
    Ok((json, html))
}
