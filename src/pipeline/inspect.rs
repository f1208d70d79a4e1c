//! `inspect`: what the adapter is — the module table with NaN/Inf counts and all-zero checks,
//! warnings about odd settings, and every input file with its SHA-256.

use std::collections::BTreeMap;
use std::path::Path;

use rayon::prelude::*;

use crate::error::Result;
use crate::load::{Adapter, BaseModel, Delta, FileDigest, KronPart, LoraModule, TensorRef};
use crate::report::{
    path_string, tool, AdapterInfo, BaseInfo, InputFile, InputRole, InspectReport, ModuleRow, ValueStats,
    SCHEMA_VERSION,
};
use crate::spectral::{within_abs_limit, MAX_ABS_VALUE};

/// The record of an input file: its path and the digest of the bytes that were read from it.
pub(crate) fn recorded(role: InputRole, path: &Path, d: &FileDigest) -> InputFile {
    InputFile { role, path: path_string(path), bytes: d.bytes, sha256: d.sha256.clone() }
}

/// Every input file with its SHA-256, each of the bytes that were read and analysed (the
/// adapter's from its bytes in memory, the config's and the base's from when they were opened);
/// nothing is read again here.
pub fn input_files(adapter: &Adapter, base: Option<&BaseModel>) -> Result<Vec<InputFile>> {
    let mut inputs = vec![InputFile {
        role: InputRole::Adapter,
        path: path_string(&adapter.file.path),
        bytes: adapter.file.bytes().len() as u64,
        sha256: adapter.hashes().sha256.clone(),
    }];
    if let (Some(c), Some(d)) = (&adapter.config_path, &adapter.config_digest) {
        inputs.push(recorded(InputRole::AdapterConfig, c, d));
    }
    if let Some(b) = base {
        inputs.extend(b.files.iter().zip(&b.digests).map(|(f, d)| recorded(InputRole::Base, f, d)));
    }
    Ok(inputs)
}

/// What the values of a module are known to be: NaN/Inf count, ΔW exactly zero, and the count
/// of values beyond ±`MAX_ABS_VALUE` (spectral/delta.rs).
#[derive(Debug, Clone, Copy)]
pub struct ValueFacts {
    pub nonfinite: usize,
    pub zero: bool,
    pub extreme: usize,
}

/// The value statistics of a module's stored tensors.
fn value_stats(m: &LoraModule) -> Result<ValueStats> {
    let mut s = m.tensors.first().map(|t| t.value_sums()).transpose()?.unwrap_or_default();
    for t in m.tensors.iter().skip(1) {
        s = s.add(t.value_sums()?);
    }
    Ok(ValueStats { l1: s.sum_abs, max_abs: s.max_abs, std: s.std() })
}

fn module_row(m: &LoraModule, known: Option<ValueFacts>) -> Result<ModuleRow> {
    let values = value_stats(m)?;
    if let Some(k) = known {
        return Ok(row(m, k, values));
    }
    let mut nonfinite = 0;
    let mut extreme = 0;
    let mut zero_of: BTreeMap<String, bool> = BTreeMap::new();
    for t in &m.tensors {
        let s = t.float_stats(MAX_ABS_VALUE)?;
        nonfinite += s.nonfinite;
        extreme += s.beyond;
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
    Ok(row(m, ValueFacts { nonfinite, zero, extreme }, values))
}

fn row(m: &LoraModule, ValueFacts { nonfinite, zero, extreme }: ValueFacts, values: ValueStats) -> ModuleRow {
    ModuleRow {
        base_key: m.base_key.clone(),
        name: m.name.clone(),
        kind: m.kind,
        rank: m.rank,
        alpha: m.alpha,
        scale: m.scale,
        shape: m.shape.clone(),
        dtype: m.dtype.clone(),
        params: m.params,
        resolved: m.resolved,
        tensors: m.tensors.iter().map(|t| t.name.clone()).collect(),
        nonfinite,
        extreme,
        zero: zero && m.magnitude.is_none(),
        dora: m.magnitude.is_some(),
        values,
    }
}

pub fn inspect(adapter: &Adapter, base: Option<&BaseModel>) -> Result<InspectReport> {
    crate::error::injected_fault("inspect")?;
    let r = inspect_with(adapter, base, &|_| None)?;
    if let Some(b) = base {
        // The shapes above came from the base as hashed when it was opened.
        b.check_unchanged()?;
    }
    Ok(r)
}

/// `inspect`, taking the value facts from `known` for modules whose values were already read
/// and checked elsewhere (the spectrum), so the file is not scanned twice.
pub fn inspect_with(
    adapter: &Adapter,
    base: Option<&BaseModel>,
    known: &(dyn Fn(&LoraModule) -> Option<ValueFacts> + Sync),
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
    if let Some(c) = adapter.hashes().sshs_legacy_hash.as_ref().filter(|c| !c.matches && c.computed.is_some()) {
        warnings.push(format!(
            "recorded sshs_legacy_hash {} differs from the recomputed {}: the tensors, their order or the ss_ \
             training metadata changed after training, or the hash was forged",
            c.recorded,
            c.computed.as_deref().unwrap_or_default()
        ));
    }
    let rows: Vec<ModuleRow> = adapter.modules.par_iter().map(|m| module_row(m, known(m))).collect::<Result<_>>()?;
    let mut modules = vec![];
    for (m, row) in adapter.modules.iter().zip(rows) {
        if row.nonfinite > 0 {
            warnings.push(format!("module {}: {} NaN/Inf value(s)", m.name, row.nonfinite));
        }
        if row.extreme > 0 {
            warnings.push(format!(
                "module {}: {} value(s) beyond ±{MAX_ABS_VALUE:e} (limit MAX_ABS_VALUE): the spectrum refuses it",
                m.name, row.extreme
            ));
        }
        if !within_abs_limit(m.scale) {
            warnings.push(format!(
                "module {}: scale {:e} beyond ±{MAX_ABS_VALUE:e} (limit MAX_ABS_VALUE): the spectrum refuses it",
                m.name, m.scale
            ));
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
        *kinds.entry(r.kind).or_insert(0) += 1;
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
