//! `lorascope inspect`: what the adapter is.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{human, table, tool, InputFile, Tool, SCHEMA_VERSION};
use crate::error::Result;
use crate::load::hashes::{sha256_file, FileHashes};
use crate::load::metadata::Metadata;
use crate::load::{Adapter, BaseKind, BaseModel, Delta, KronPart, LoraModule, TensorRef};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleRow {
    pub base_key: String,
    pub name: String,
    pub kind: String,
    pub rank: usize,
    pub alpha: Option<f64>,
    pub scale: f64,
    pub shape: Vec<usize>,
    pub dtype: String,
    pub params: usize,
    pub resolved: bool,
    pub tensors: Vec<String>,
    /// Count of NaN and ±Inf values over the module's tensors.
    pub nonfinite: usize,
    /// ΔW is exactly zero (a factor of the product is all zeros).
    pub zero: bool,
    pub dora: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub format: String,
    pub architecture: String,
    pub modules: Vec<ModuleRow>,
    pub params: usize,
    pub kinds: BTreeMap<String, usize>,
    pub metadata: Metadata,
    pub hashes: FileHashes,
    pub config: Option<Value>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseInfo {
    pub path: String,
    pub kind: BaseKind,
    pub tensors: usize,
    pub params: usize,
    /// Share of the base's parameters in the weights the adapter changes.
    pub touched_params: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct InspectReport {
    pub schema_version: u32,
    pub tool: Tool,
    pub inputs: Vec<InputFile>,
    pub adapter: AdapterInfo,
    pub base: Option<BaseInfo>,
    pub warnings: Vec<String>,
}

pub fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Every input file with its SHA-256. The adapter's hash was computed when it was opened.
pub fn input_files(adapter: &Adapter, base: Option<&BaseModel>) -> Result<Vec<InputFile>> {
    let mut inputs = vec![InputFile {
        role: "adapter".into(),
        path: path_string(&adapter.file.path),
        bytes: adapter.file.bytes().len() as u64,
        sha256: adapter.hashes().sha256.clone(),
    }];
    if let Some(c) = &adapter.config_path {
        let (sha256, bytes) = sha256_file(c)?;
        inputs.push(InputFile { role: "adapter-config".into(), path: path_string(c), bytes, sha256 });
    }
    if let Some(b) = base {
        for f in &b.files {
            let (sha256, bytes) = sha256_file(f)?;
            inputs.push(InputFile { role: "base".into(), path: path_string(f), bytes, sha256 });
        }
    }
    Ok(inputs)
}

struct TensorStats {
    nonfinite: usize,
    zero: bool,
}

fn stats(t: &TensorRef) -> Result<TensorStats> {
    let (nonfinite, zero) = t.float_stats()?;
    Ok(TensorStats { nonfinite, zero })
}

fn module_row(m: &LoraModule, known: Option<(usize, bool)>) -> Result<ModuleRow> {
    if let Some((nonfinite, zero)) = known {
        return Ok(row(m, nonfinite, zero));
    }
    let mut nonfinite = 0;
    let mut zero_of: BTreeMap<String, bool> = BTreeMap::new();
    for t in &m.tensors {
        let s = stats(t)?;
        nonfinite += s.nonfinite;
        zero_of.insert(t.name.clone(), s.zero);
    }
    let z = |t: &TensorRef| zero_of.get(&t.name).copied().unwrap_or(false);
    let kz = |p: &KronPart| match p {
        KronPart::Full(t) => z(t),
        KronPart::Product { a, b, t } => z(a) || z(b) || t.as_ref().is_some_and(z),
    };
    let zero = match &m.delta {
        Delta::LowRank { up, down, mid, .. } => z(up) || z(down) || mid.as_ref().is_some_and(z),
        Delta::Hadamard { w1a, w1b, w2a, w2b, .. } => z(w1a) || z(w1b) || z(w2a) || z(w2b),
        Delta::Kronecker { w1, w2 } => kz(w1) || kz(w2),
        Delta::Diff { diff, .. } => z(diff),
        Delta::Ia3 { weight, .. } => z(weight),
        Delta::Replace { .. } | Delta::Unsupported { .. } => false,
    };
    Ok(row(m, nonfinite, zero))
}

fn row(m: &LoraModule, nonfinite: usize, zero: bool) -> ModuleRow {
    ModuleRow {
        base_key: m.base_key.clone(),
        name: m.name.clone(),
        kind: m.kind.as_str().to_string(),
        rank: m.rank,
        alpha: m.alpha,
        scale: m.scale,
        shape: m.shape.clone(),
        dtype: m.dtype.clone(),
        params: m.params,
        resolved: m.resolved,
        tensors: m.tensors.iter().map(|t| t.name.clone()).collect(),
        nonfinite,
        zero: zero && m.magnitude.is_none(),
        dora: m.magnitude.is_some(),
    }
}

pub fn inspect(adapter: &Adapter, base: Option<&BaseModel>) -> Result<InspectReport> {
    inspect_with(adapter, base, &|_| None)
}

/// `inspect`, taking (NaN/Inf count, ΔW is zero) from `known` for modules whose values were
/// already read and checked elsewhere (the spectrum), so the file is not scanned twice.
pub fn inspect_with(
    adapter: &Adapter,
    base: Option<&BaseModel>,
    known: &(dyn Fn(&LoraModule) -> Option<(usize, bool)> + Sync),
) -> Result<InspectReport> {
    let mut warnings = adapter.warnings.clone();
    if let Some(c) = &adapter.hashes().sshs_model_hash {
        if !c.matches {
            warnings.push(format!(
                "recorded sshs_model_hash {} differs from the recomputed {}: the tensors were changed after training, or the hash was forged",
                c.recorded, c.computed
            ));
        }
    }
    let rows: Vec<ModuleRow> = adapter.modules.par_iter().map(|m| module_row(m, known(m))).collect::<Result<_>>()?;
    let mut modules = vec![];
    for (m, row) in adapter.modules.iter().zip(rows) {
        if row.nonfinite > 0 {
            warnings.push(format!("module {}: {} NaN/Inf value(s)", m.name, row.nonfinite));
        }
        if row.zero {
            warnings.push(format!("module {}: ΔW is exactly zero", m.name));
        }
        if let Some(a) = m.alpha {
            if !a.is_finite() || a <= 0.0 {
                warnings.push(format!("module {}: alpha {a} is not positive", m.name));
            } else if m.scale > 16.0 {
                warnings.push(format!(
                    "module {}: alpha {a} at rank {} gives scale {:.3}, unusually large",
                    m.name, m.rank, m.scale
                ));
            }
        }
        modules.push(row);
    }
    if !adapter.base_attached && modules.iter().any(|r| !r.base_key.contains('.')) {
        warnings.push("kohya module names were not mapped to base weights: give --base to resolve them".to_string());
    }
    let mut kinds = BTreeMap::new();
    for r in &modules {
        *kinds.entry(r.kind.clone()).or_insert(0) += 1;
    }
    let base_info = base.map(|b| BaseInfo {
        path: path_string(&b.path),
        kind: b.kind,
        tensors: b.entries.len(),
        params: b.params(),
        touched_params: adapter
            .modules
            .iter()
            .filter_map(|m| b.shape(&m.base_key))
            .map(|s| s.iter().product::<usize>())
            .sum(),
    });
    Ok(InspectReport {
        schema_version: SCHEMA_VERSION,
        tool: tool(),
        inputs: input_files(adapter, base)?,
        adapter: AdapterInfo {
            format: adapter.format.as_str().to_string(),
            architecture: adapter.architecture(),
            params: adapter.params(),
            kinds,
            modules,
            metadata: adapter.metadata.clone(),
            hashes: adapter.hashes().clone(),
            config: adapter.config_json.clone(),
        },
        base: base_info,
        warnings,
    })
}

fn opt(x: &Option<impl ToString>) -> String {
    x.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Human summary of an inspect report.
pub fn render_inspect(r: &InspectReport) -> String {
    let a = &r.adapter;
    let mut s = String::new();
    s += &format!("adapter   {}\n", r.inputs[0].path);
    s += &format!("format    {}    architecture: {}\n", a.format, a.architecture);
    s += &format!(
        "modules   {}  ({})    stored values: {}\n",
        a.modules.len(),
        a.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", "),
        human(a.params as f64)
    );
    if let Some(b) = &r.base {
        s += &format!(
            "base      {} ({:?}, {} tensors, {} params; adapter changes weights holding {})\n",
            b.path,
            b.kind,
            b.tensors,
            human(b.params as f64),
            human(b.touched_params as f64)
        );
    }
    s += "\nhashes\n";
    for i in &r.inputs {
        s += &format!("  {:<15} sha256 {}  {} bytes  {}\n", i.role, i.sha256, i.bytes, i.path);
    }
    s += &format!(
        "  AutoV2 {}   AutoV1 {}   AutoV3/sshs {}\n",
        a.hashes.autov2,
        opt(&a.hashes.autov1),
        opt(&a.hashes.autov3)
    );
    if let Some(c) = &a.hashes.sshs_model_hash {
        s += &format!(
            "  recorded sshs_model_hash {}: {}\n",
            c.recorded,
            if c.matches { "matches" } else { "DIFFERS (tensors changed after training, or forged)" }
        );
    }
    let t = &a.metadata.training;
    let mut meta = vec![];
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            meta.push(format!("  {k:<18} {v}"));
        }
    };
    add("base model", t.base_model.clone());
    add("base version", t.base_model_version.clone());
    add("output name", t.output_name.clone());
    add("network", t.network_module.clone());
    add("dim / alpha", t.network_dim.clone().map(|d| format!("{d} / {}", t.network_alpha.clone().unwrap_or_default())));
    add("train images", t.num_train_images.map(|x| x.to_string()));
    add("epochs", t.num_epochs.map(|x| x.to_string()));
    add("max steps", t.max_train_steps.map(|x| x.to_string()));
    add("resolution", t.resolution.clone());
    for d in &t.dataset_dirs {
        meta.push(format!("  dataset dir        {} ({} images x {} repeats)", d.name, opt(&d.images), opt(&d.repeats)));
    }
    if !t.tags.is_empty() {
        let top: Vec<String> = t.tags.iter().take(12).map(|g| format!("{} ({})", g.tag, g.count)).collect();
        meta.push(format!("  top tags           {}", top.join(", ")));
    }
    if !meta.is_empty() {
        s += "\ntraining metadata\n";
        s += &meta.join("\n");
        s.push('\n');
    }
    s += "\n";
    let rows: Vec<Vec<String>> = a
        .modules
        .iter()
        .map(|m| {
            vec![
                m.base_key.clone(),
                m.kind.clone(),
                m.rank.to_string(),
                m.alpha.map(|x| format!("{x}")).unwrap_or_else(|| "-".into()),
                format!("{:.4}", m.scale),
                format!("{:?}", m.shape),
                m.dtype.clone(),
            ]
        })
        .collect();
    s += &table(&["base key", "kind", "rank", "alpha", "scale", "shape", "dtype"], &rows);
    if !r.warnings.is_empty() {
        s += "\nwarnings\n";
        for w in &r.warnings {
            s += &format!("  - {w}\n");
        }
    }
    s
}
