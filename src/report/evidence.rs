//! `lorascope report`: everything that the inputs allow, in one `Report` (report.json) and a
//! self-contained report.html; `lorascope verify` re-checks the recorded input hashes.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::inspect::{path_string, AdapterInfo, BaseInfo};
use super::{InputFile, SpectrumReport, SpectrumSettings, Tool};
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

/// Assemble the report from a spectrum report and the supplied works and controls.
pub fn build_report(
    spectrum: SpectrumReport,
    works: Option<&WorkSet>,
    controls: Option<&WorkSet>,
    command_line: Vec<String>,
) -> Result<Report> {
    let SpectrumReport { inspect: s, modules, layers, totals, statement, settings } = spectrum;
    let mut inputs = s.inputs;
    let mut infos = vec![];
    for (role, set) in [("work", works), ("control", controls)] {
        let Some(set) = set else { continue };
        for f in &set.files {
            let (sha256, bytes) = sha256_file(f)?;
            inputs.push(InputFile { role: role.into(), path: path_string(f), bytes, sha256 });
        }
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
    let probe_reason = match (works.is_some(), s.base.is_some()) {
        (false, _) => "no --works given: nothing to probe for".to_string(),
        (true, false) => "works given but no --base: the probe runs the merged model and needs the base".to_string(),
        (true, true) => {
            "works given, but this build has no merged-model probe yet (lorascope issue #4); the works are recorded with their hashes only"
                .to_string()
        }
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
        stages: vec![
            Stage { name: "inspect".into(), ran: true, reason: "always".into() },
            Stage { name: "base".into(), ran: has_base, reason: base_reason },
            Stage { name: "spectrum".into(), ran: true, reason: "static analysis of the adapter's factors".into() },
            Stage { name: "probe".into(), ran: false, reason: probe_reason },
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
