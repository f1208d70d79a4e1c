//! `compare A B`: match the two adapters' modules by base weight key, diff their metadata,
//! check tensor identity (the data-section hash sd-scripts records as `sshs_model_hash`, then
//! module by module), compare every matched ΔW from its factors (`spectral::compare`) and
//! conclude. Rules and thresholds: docs/compare.md.

use std::collections::{BTreeMap, HashMap};

use rayon::prelude::*;

use super::input_files;
use crate::error::{Error, Result};
use crate::load::hashes::sha256_bytes;
use crate::load::{Adapter, LoraModule};
use crate::order::natural_cmp;
use crate::report::{
    self, CompareReport, CompareSide, Identity, MetadataChange, MetadataDiff, MetadataValue, ModuleComparison,
};
use crate::spectral::compare::{self as cmp, CompareThresholds, MAX_TOP_K};

/// Metadata values longer than this (in characters) are summarised, not shown: sd-scripts'
/// `ss_tag_frequency` and `ss_dataset_dirs` run to tens of kilobytes.
const MAX_SHOWN_VALUE_CHARS: usize = 120;
/// Characters of a long value kept at the start of its summary.
const SUMMARY_PREFIX_CHARS: usize = 60;

/// Compare two opened adapters. `top_k`: how many singular directions span the subspaces
/// whose principal angles are reported.
pub fn compare(a: &Adapter, b: &Adapter, top_k: usize) -> Result<CompareReport> {
    if top_k == 0 || top_k > MAX_TOP_K {
        return Err(Error::Usage(format!("--top-k {top_k} is outside 1..={MAX_TOP_K}")));
    }
    let (side_a, side_b) = (side(a), side(b));
    let (pairs, only_a, only_b) = match_modules(&a.modules, &b.modules);
    let modules: Vec<ModuleComparison> =
        pairs.par_iter().map(|(key, ma, mb)| compare_pair(key, ma, mb, top_k)).collect();
    let identity = Identity {
        content_hash_equal: side_a.content_hash == side_b.content_hash,
        modules_identical: only_a.is_empty()
            && only_b.is_empty()
            && !modules.is_empty()
            && modules.iter().all(|m| m.identical_tensors),
    };
    let deltas: Vec<&cmp::DeltaComparison> = modules.iter().filter_map(|m| m.delta.as_ref()).collect();
    let aggregate = cmp::aggregate(&deltas);
    let thresholds = CompareThresholds::default();
    let (conclusion, reasons) = cmp::conclude(identical_reason(&identity, modules.len()), &aggregate, &thresholds);
    let mut inputs = input_files(a, None)?;
    inputs.extend(input_files(b, None)?);
    let r = CompareReport {
        schema_version: report::SCHEMA_VERSION,
        tool: report::tool(),
        inputs,
        a: side_a,
        b: side_b,
        metadata: metadata_diff(&a.file.metadata, &b.file.metadata),
        identity,
        top_k,
        modules,
        only_a,
        only_b,
        aggregate,
        thresholds,
        conclusion,
        reasons,
    };
    report::check_finite("compare", &r)?;
    Ok(r)
}

fn side(a: &Adapter) -> CompareSide {
    CompareSide {
        path: report::path_string(&a.path),
        format: a.format.as_str().to_string(),
        architecture: a.architecture(),
        modules: a.modules.len(),
        sha256: a.hashes().sha256.clone(),
        content_hash: sha256_bytes(a.file.data_section()),
    }
}

/// Why the two hold the same weights, if they do.
fn identical_reason(id: &Identity, modules: usize) -> Option<String> {
    if id.content_hash_equal {
        Some("identical weights: the tensor data sections have the same SHA-256 (sshs_model_hash / AutoV3)".into())
    } else if id.modules_identical {
        Some(format!(
            "identical weights: all {modules} modules match and their stored tensors and scales are bit-identical \
             (the files differ in layout or tensor names only)"
        ))
    } else {
        None
    }
}

type Pair<'a> = (String, &'a LoraModule, &'a LoraModule);

/// Modules matched by base weight key (by name where an adapter has several modules on one
/// key), in natural order of the key, and the keys only one side has.
fn match_modules<'a>(a: &'a [LoraModule], b: &'a [LoraModule]) -> (Vec<Pair<'a>>, Vec<String>, Vec<String>) {
    let (ka, kb) = (keyed(a), keyed(b));
    let pairs: Vec<Pair> = ka.iter().filter_map(|(k, ma)| kb.get(k).map(|mb| (k.clone(), *ma, *mb))).collect();
    let only = |x: &BTreeMap<String, &LoraModule>, y: &BTreeMap<String, &LoraModule>| {
        x.keys().filter(|k| !y.contains_key(*k)).cloned().collect::<Vec<_>>()
    };
    let (mut only_a, mut only_b) = (only(&ka, &kb), only(&kb, &ka));
    let mut pairs = pairs;
    pairs.sort_by(|x, y| natural_cmp(&x.0, &y.0));
    only_a.sort_by(|x, y| natural_cmp(x, y));
    only_b.sort_by(|x, y| natural_cmp(x, y));
    (pairs, only_a, only_b)
}

fn keyed(modules: &[LoraModule]) -> BTreeMap<String, &LoraModule> {
    let mut per_key: HashMap<&str, usize> = HashMap::new();
    for m in modules {
        *per_key.entry(m.base_key.as_str()).or_default() += 1;
    }
    modules
        .iter()
        .map(|m| {
            let key = if per_key[m.base_key.as_str()] == 1 { &m.base_key } else { &m.name };
            (key.clone(), m)
        })
        .collect()
}

fn compare_pair(key: &str, a: &LoraModule, b: &LoraModule, top_k: usize) -> ModuleComparison {
    let (delta, not_compared) = match cmp::compare_modules(a, b, top_k) {
        Ok(d) => (Some(d), None),
        Err(skip) => (None, Some(skip)),
    };
    ModuleComparison {
        key: key.to_string(),
        name_a: a.name.clone(),
        name_b: b.name.clone(),
        kind_a: a.kind,
        kind_b: b.kind,
        rank_a: a.rank,
        rank_b: b.rank,
        identical_tensors: same_tensors(a, b),
        delta,
        not_compared,
    }
}

/// Same kind and scale, and each stored tensor (in the module's order) of the same dtype, shape
/// and bytes.
fn same_tensors(a: &LoraModule, b: &LoraModule) -> bool {
    let same = |x: &crate::load::TensorRef, y: &crate::load::TensorRef| {
        x.dtype() == y.dtype()
            && x.shape() == y.shape()
            && matches!((x.file.raw(&x.name), y.file.raw(&y.name)), (Ok(p), Ok(q)) if p == q)
    };
    a.kind == b.kind
        && a.scale.to_bits() == b.scale.to_bits()
        && a.tensors.len() == b.tensors.len()
        && a.tensors.iter().zip(&b.tensors).all(|(x, y)| same(x, y))
}

/// Keys only on one side, and values that differ, long values summarised.
fn metadata_diff(a: &BTreeMap<String, String>, b: &BTreeMap<String, String>) -> MetadataDiff {
    let mut d = MetadataDiff::default();
    for (k, va) in a {
        match b.get(k) {
            None => d.only_a.push(MetadataValue { key: k.clone(), value: summarise(va) }),
            Some(vb) if vb == va => d.same += 1,
            Some(vb) => d.changed.push(MetadataChange { key: k.clone(), a: summarise(va), b: summarise(vb) }),
        }
    }
    for (k, vb) in b.iter().filter(|(k, _)| !a.contains_key(*k)) {
        d.only_b.push(MetadataValue { key: k.clone(), value: summarise(vb) });
    }
    d
}

/// A metadata value as shown: whole when short, else its start, its size and a hash that tells
/// two long values apart (a JSON object or array is described by its entry count).
fn summarise(v: &str) -> String {
    let chars = v.chars().count();
    if chars <= MAX_SHOWN_VALUE_CHARS {
        return v.to_string();
    }
    let hash = &sha256_bytes(v.as_bytes())[..12];
    let json = match serde_json::from_str::<serde_json::Value>(v) {
        Ok(serde_json::Value::Object(m)) => Some(format!("JSON object of {} keys", m.len())),
        Ok(serde_json::Value::Array(a)) => Some(format!("JSON array of {} items", a.len())),
        _ => None,
    };
    match json {
        Some(what) => format!("({what}, {} bytes, sha256 {hash})", v.len()),
        None => {
            let start: String = v.chars().take(SUMMARY_PREFIX_CHARS).collect();
            format!("{start}… ({chars} characters, sha256 {hash})")
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn long_values_are_summarised() {
        let tags = format!("{{{}}}", (0..40).map(|i| format!("\"tag{i}\": {i}")).collect::<Vec<_>>().join(", "));
        let s = super::summarise(&tags);
        assert!(s.starts_with("(JSON object of 40 keys, ") && s.contains("sha256 "), "{s}");
        assert_eq!(super::summarise("short"), "short");
        let long = "x".repeat(500);
        assert!(super::summarise(&long).contains("… (500 characters, sha256 "));
    }
}
