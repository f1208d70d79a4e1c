//! `lorascope report`: everything that the inputs allow, in one `Report` (report.json) and a
//! self-contained report.html; `lorascope verify` re-checks the recorded input hashes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::inspect::{path_string, AdapterInfo, BaseInfo};
use super::{InputFile, ProbeSection, SpectrumReport, SpectrumSettings, Tool};
use crate::error::{Error, Result};
use crate::load::hashes::sha256_file;
use crate::load::works::WorkSet;
use crate::spectral::{LayerSummary, ModuleSpectrum, Totals};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpectrumSection {
    pub modules: Vec<ModuleSpectrum>,
    pub layers: Vec<LayerSummary>,
    pub totals: Totals,
    pub statement: String,
}

/// A work or control as supplied (the probe's evidence is added when the probe runs).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WorkInfo {
    pub id: String,
    /// `work` or `control`.
    pub role: String,
    pub sha256: String,
    pub chars: usize,
    /// The opening of the text, so a reader can tell which work this is.
    pub excerpt: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub name: String,
    pub ran: bool,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Report {
    pub schema_version: u32,
    pub tool: Tool,
    pub command_line: Vec<String>,
    pub inputs: Vec<InputFile>,
    pub adapter: AdapterInfo,
    pub base: Option<BaseInfo>,
    pub spectrum: SpectrumSection,
    pub works: Vec<WorkInfo>,
    /// The merged-model probe, when it ran.
    pub probe: Option<ProbeSection>,
    /// What ran, what was skipped and why.
    pub stages: Vec<Stage>,
    pub settings: SpectrumSettings,
    pub warnings: Vec<String>,
    /// Wall-clock seconds per stage; the only part that differs between runs on the same
    /// inputs. Absent with `--no-timings`.
    pub timings: Option<BTreeMap<String, f64>>,
}

fn excerpt(text: &str) -> String {
    let t: String = text.chars().take(240).collect();
    if text.chars().count() > 240 {
        format!("{t}…")
    } else {
        t
    }
}

/// Input records (path, size, SHA-256) of supplied files such as works and controls.
pub fn file_inputs(role: &str, files: &[std::path::PathBuf]) -> Result<Vec<InputFile>> {
    files
        .iter()
        .map(|f| {
            let (sha256, bytes) = sha256_file(f)?;
            Ok(InputFile { role: role.into(), path: path_string(f), bytes, sha256 })
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
    for (role, set) in [("work", works), ("control", controls)] {
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
                role: role.into(),
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
            Stage { name: "inspect".into(), ran: true, reason: "always".into() },
            Stage { name: "base".into(), ran: has_base, reason: base_reason },
            Stage { name: "spectrum".into(), ran: true, reason: "static analysis of the adapter's factors".into() },
            Stage { name: "probe".into(), ran: probe_ran, reason: probe_reason },
        ],
        settings,
        warnings: s.warnings,
        timings: None,
    })
}

/// One input's state now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verified {
    pub role: String,
    pub path: String,
    /// `ok`, `changed` or `missing`.
    pub status: String,
    pub recorded_sha256: String,
    pub sha256: Option<String>,
}

/// Recompute the SHA-256 of every input named in `dir/report.json` (chain of custody).
pub fn verify(dir: &Path) -> Result<Vec<Verified>> {
    let p = dir.join("report.json");
    let text = std::fs::read_to_string(&p).map_err(|e| Error::input(&p, format!("cannot read: {e}")))?;
    let r: Report =
        serde_json::from_str(&text).map_err(|e| Error::input(&p, format!("not a lorascope report: {e}")))?;
    Ok(r.inputs
        .iter()
        .map(|i| {
            let now = sha256_file(Path::new(&i.path)).ok().map(|(h, _)| h);
            let status = match &now {
                None => "missing",
                Some(h) if *h == i.sha256 => "ok",
                Some(_) => "changed",
            };
            Verified {
                role: i.role.clone(),
                path: i.path.clone(),
                status: status.into(),
                recorded_sha256: i.sha256.clone(),
                sha256: now,
            }
        })
        .collect())
}
