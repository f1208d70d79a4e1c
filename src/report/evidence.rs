//! `lorascope report`: everything that the inputs allow, in one `Report` (report.json) and a
//! self-contained report.html, with report.sha256 beside them; `lorascope verify` checks that
//! manifest, re-hashes the recorded inputs and, with `--rerun`, reproduces the findings.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::inspect::{AdapterInfo, BaseInfo};
use super::{InputFile, InputRole, ProbeSection, SpectrumSettings, Tool};
use crate::named::closed_set;
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
    pub role: InputRole,
    pub sha256: String,
    pub chars: usize,
    /// The opening of the text, so a reader can tell which work this is.
    pub excerpt: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Stage {
    pub name: StageName,
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
    /// The image probe, when it ran (image works on a Stable Diffusion base).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_probe: Option<super::ImageProbeSection>,
    /// What ran, what was skipped and why.
    pub stages: Vec<Stage>,
    pub settings: SpectrumSettings,
    pub warnings: Vec<String>,
    /// Wall-clock seconds per stage; the only part that differs between runs on the same
    /// inputs. Absent with `--no-timings`.
    pub timings: Option<BTreeMap<String, f64>>,
}

closed_set! {
    /// The stages of `report`.
    pub enum StageName ("stage") {
        Inspect = "inspect",
        Base = "base",
        Spectrum = "spectrum",
        Probe = "probe",
    }
}

closed_set! {
    /// An input's state when `verify` looked again.
    pub enum VerifyStatus ("status") {
        /// Same SHA-256 as recorded.
        Ok = "ok",
        Changed = "changed",
        Missing = "missing",
        /// The manifest does not list the file, or there is no manifest.
        Unlisted = "unlisted",
    }
}

/// One input's state now.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Verified {
    pub role: InputRole,
    pub path: String,
    pub status: VerifyStatus,
    pub recorded_sha256: String,
    pub sha256: Option<String>,
}

/// The manifest `report` writes beside report.json and report.html: `sha256sum` format, so a
/// third party can check the two files with `sha256sum -c report.sha256` and no lorascope.
pub const MANIFEST: &str = "report.sha256";

/// One file of the report directory (report.json, report.html) against the manifest.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FileCheck {
    pub file: String,
    pub status: VerifyStatus,
    /// As the manifest records it; `None` when the manifest does not list the file (or is
    /// missing).
    pub recorded_sha256: Option<String>,
    pub sha256: Option<String>,
}

/// What re-running the recorded command gave.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Rerun {
    /// The findings (report.json without its timings) came out byte for byte the same.
    pub reproduced: bool,
    /// JSON paths where the rerun differs from the recorded report (the first 50).
    pub differences: Vec<String>,
}

/// Everything `verify` found. `ok` holds only when every part holds.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct VerifyReport {
    /// report.json and report.html against report.sha256.
    pub report_files: Vec<FileCheck>,
    /// report.json is exactly the canonical serialisation of its own content (a hand edit that
    /// kept the JSON valid usually breaks this as well as the manifest).
    pub canonical: bool,
    pub inputs: Vec<Verified>,
    pub rerun: Option<Rerun>,
    pub ok: bool,
}

/// Human summary of `verify`: the report's own files, its inputs, the rerun, and the answer.
pub fn render_verify(o: &VerifyReport) -> String {
    let files: Vec<Vec<String>> = o
        .report_files
        .iter()
        .map(|f| vec![f.status.to_string(), f.file.clone()])
        .chain(std::iter::once(vec![
            if o.canonical { "ok" } else { "changed" }.to_string(),
            "report.json in canonical form".to_string(),
        ]))
        .collect();
    let mut text = format!("report files (against {})\n", MANIFEST);
    text += &super::table(&["status", "file"], &files);
    let rows: Vec<Vec<String>> =
        o.inputs.iter().map(|x| vec![x.status.to_string(), x.role.to_string(), x.path.clone()]).collect();
    text += "\ninputs\n";
    text += &super::table(&["status", "role", "file"], &rows);
    let same = o.inputs.iter().filter(|x| x.status == VerifyStatus::Ok).count();
    text += &format!("{} of {} inputs unchanged\n", same, o.inputs.len());
    match &o.rerun {
        Some(r) if r.reproduced => text += "rerun: the findings were reproduced byte for byte\n",
        Some(r) => {
            text += &format!("rerun: the findings DIFFER at {}\n", crate::shown::inline(&r.differences.join(", ")))
        }
        None => {}
    }
    text += if o.ok { "verified\n" } else { "NOT verified\n" };
    text
}
