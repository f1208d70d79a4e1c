//! `lorascope compare A B`: the report structure (metadata diff, tensor identity, per-module ΔW
//! comparison, conclusion) and its terminal rendering. Numbers and thresholds:
//! docs/compare.md; the numerics are in `spectral::compare`.

use serde::{Deserialize, Serialize};

use super::{table, InputFile, Tool};
use crate::load::ModuleKind;
use crate::shown::inline;
use crate::spectral::compare::{Aggregate, CompareThresholds, Conclusion, DeltaComparison, Skip};

/// One adapter of the pair.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareSide {
    pub path: String,
    pub format: String,
    pub architecture: String,
    pub modules: usize,
    pub sha256: String,
    /// SHA-256 of the safetensors data section (sd-scripts `sshs_model_hash`, Civitai AutoV3):
    /// metadata edits do not change it.
    pub content_hash: String,
}

/// A metadata key present on one side only; long values are summarised (docs/compare.md).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetadataValue {
    pub key: String,
    pub value: String,
}

/// A metadata key whose value differs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MetadataChange {
    pub key: String,
    pub a: String,
    pub b: String,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MetadataDiff {
    pub only_a: Vec<MetadataValue>,
    pub only_b: Vec<MetadataValue>,
    pub changed: Vec<MetadataChange>,
    /// Keys with the same value on both sides.
    pub same: usize,
}

/// Whether the two files hold the same weights.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Identity {
    /// The data sections are byte-identical.
    pub content_hash_equal: bool,
    /// Both adapters have the same modules and each matched module's stored tensors (and
    /// scale) are bit-identical.
    pub modules_identical: bool,
}

/// One module present in both adapters.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleComparison {
    /// What the modules were matched on: the base weight key (or the module name where one
    /// adapter has several modules on one key).
    pub key: String,
    pub name_a: String,
    pub name_b: String,
    pub kind_a: ModuleKind,
    pub kind_b: ModuleKind,
    pub rank_a: usize,
    pub rank_b: usize,
    /// The stored tensors and the scale are bit-identical.
    pub identical_tensors: bool,
    pub delta: Option<DeltaComparison>,
    pub not_compared: Option<Skip>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CompareReport {
    pub schema_version: u32,
    pub tool: Tool,
    pub inputs: Vec<InputFile>,
    pub a: CompareSide,
    pub b: CompareSide,
    pub metadata: MetadataDiff,
    pub identity: Identity,
    /// `--top-k`: the singular subspaces compared.
    pub top_k: usize,
    pub modules: Vec<ModuleComparison>,
    /// Keys of the modules only one adapter has.
    pub only_a: Vec<String>,
    pub only_b: Vec<String>,
    pub aggregate: Aggregate,
    pub thresholds: CompareThresholds,
    pub conclusion: Conclusion,
    /// The evidence behind the conclusion, one line each.
    pub reasons: Vec<String>,
}

fn num(x: Option<f64>, digits: usize) -> String {
    x.map(|v| format!("{v:.digits$}")).unwrap_or_else(|| "-".into())
}

/// Human summary of a comparison. Every string from the files (paths, keys, values, module
/// names) goes through `shown` (tables per cell, the rest per value).
pub fn render_compare(r: &CompareReport) -> String {
    let mut s = String::new();
    for (label, side) in [("A", &r.a), ("B", &r.b)] {
        s += &format!(
            "{label}  {}\n   {} · {} · {} modules · content hash {}\n",
            inline(&side.path),
            inline(&side.format),
            inline(&side.architecture),
            side.modules,
            side.content_hash
        );
    }
    s += &format!("\nconclusion  {}\n", r.conclusion);
    for why in &r.reasons {
        s += &format!("  - {}\n", inline(why));
    }
    s += &render_metadata(&r.metadata);
    s += &format!(
        "\nmodules  {} matched, {} compared, {} only in A, {} only in B\n",
        r.modules.len(),
        r.aggregate.modules_compared,
        r.only_a.len(),
        r.only_b.len()
    );
    if !r.modules.is_empty() {
        s += &table(
            &[
                "module",
                "kinds",
                "ranks",
                "cosine",
                "chance sd",
                "left overlap (chance)",
                "right overlap (chance)",
                "note",
            ],
            &r.modules.iter().map(module_row).collect::<Vec<_>>(),
        );
    }
    for (label, keys) in [("only in A", &r.only_a), ("only in B", &r.only_b)] {
        for k in keys.iter().take(20) {
            s += &format!("  {label}: {}\n", inline(k));
        }
        if keys.len() > 20 {
            s += &format!("  {label}: and {} more\n", keys.len() - 20);
        }
    }
    let g = &r.aggregate;
    s += &format!(
        "\naggregate  cosine {} (chance sd {}, {} sd)  left overlap {} (chance {})  right overlap {} (chance {})\n",
        num(g.cosine, 4),
        num(g.cosine_chance, 4),
        num(g.cosine_z, 1),
        num(g.left_overlap, 3),
        num(g.left_chance, 3),
        num(g.right_overlap, 3),
        num(g.right_chance, 3)
    );
    s
}

fn render_metadata(m: &MetadataDiff) -> String {
    let mut s = format!(
        "\nmetadata  {} only in A, {} only in B, {} changed, {} the same\n",
        m.only_a.len(),
        m.only_b.len(),
        m.changed.len(),
        m.same
    );
    for (label, list) in [("only in A", &m.only_a), ("only in B", &m.only_b)] {
        for v in list {
            s += &format!("  {label}  {} = {}\n", inline(&v.key), inline(&v.value));
        }
    }
    for c in &m.changed {
        s += &format!("  changed    {}: {} → {}\n", inline(&c.key), inline(&c.a), inline(&c.b));
    }
    s
}

fn module_row(m: &ModuleComparison) -> Vec<String> {
    let kinds = if m.kind_a == m.kind_b { m.kind_a.to_string() } else { format!("{} / {}", m.kind_a, m.kind_b) };
    let ranks = format!("{} / {}", m.rank_a, m.rank_b);
    let note = match (&m.not_compared, m.identical_tensors) {
        (Some(skip), _) => format!("not compared ({}): {}", skip.reason, skip.detail),
        (None, true) => "identical tensors".to_string(),
        (None, false) => String::new(),
    };
    match &m.delta {
        Some(d) => vec![
            m.key.clone(),
            kinds,
            ranks,
            format!("{:.4}", d.cosine),
            format!("{:.4}", d.cosine_chance),
            format!("{:.3} ({:.3}), k={}", d.left.overlap, d.left.chance, d.left.k),
            format!("{:.3} ({:.3})", d.right.overlap, d.right.chance),
            note,
        ],
        None => vec![m.key.clone(), kinds, ranks, "-".into(), "-".into(), "-".into(), "-".into(), note],
    }
}
