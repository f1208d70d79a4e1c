//! `lorascope spectrum`: how much each module adds.

use serde::{Deserialize, Serialize};

use super::{human, table, InspectReport};
use crate::shown::inline;
use crate::spectral::{LayerSummary, ModuleSpectrum, SpectrumAnalysis, SpectrumOptions, Totals};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpectrumSettings {
    pub bits_per_param: f64,
    pub intruder_top_k: usize,
    pub intruder_epsilon: f64,
    pub max_dense_dim: usize,
    /// Whether intruder dimensions were counted (`probe` leaves them out unless `--intruders`).
    #[serde(default = "yes")]
    pub intruders: bool,
    pub seed: u64,
}

fn yes() -> bool {
    true
}

impl From<&SpectrumOptions> for SpectrumSettings {
    fn from(o: &SpectrumOptions) -> Self {
        SpectrumSettings {
            bits_per_param: o.bits_per_param,
            intruder_top_k: o.intruder_top_k,
            intruder_epsilon: o.intruder_epsilon,
            max_dense_dim: o.max_dense_dim,
            intruders: o.intruders,
            seed: o.seed,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpectrumReport {
    /// Everything `inspect` reports, at the top level of the JSON.
    #[serde(flatten)]
    pub inspect: InspectReport,
    /// Sorted by base_key.
    pub modules: Vec<ModuleSpectrum>,
    pub layers: Vec<LayerSummary>,
    pub totals: Totals,
    pub statement: String,
    pub settings: SpectrumSettings,
}

pub(crate) fn spectrum_report(
    inspect: InspectReport,
    analysis: SpectrumAnalysis,
    opts: &SpectrumOptions,
) -> SpectrumReport {
    SpectrumReport {
        inspect,
        modules: analysis.modules,
        layers: analysis.layers,
        totals: analysis.totals,
        statement: analysis.statement,
        settings: opts.into(),
    }
}

fn opt_f(x: Option<f64>, prec: usize) -> String {
    x.map(|v| format!("{v:.prec$}")).unwrap_or_else(|| "-".into())
}

/// Human summary: totals, layers, and the `top` modules ranked by information.
pub fn render_spectrum(r: &SpectrumReport, top: usize) -> String {
    let t = &r.totals;
    let i = &r.inspect;
    let mut s = format!("adapter   {}\n", inline(&i.inputs[0].path));
    s += &format!("format    {}    architecture: {}\n", i.adapter.format, i.adapter.architecture);
    s += &format!(
        "modules   {} analysed, {} not analysed    stored values {}    effective params {}\n",
        t.modules_analysed,
        t.modules_not_analysed,
        human(t.params as f64),
        human(t.effective_params as f64)
    );
    s += &format!(
        "capacity  {} bits ({} bytes) at {} bits/param\n",
        human(t.capacity_bits),
        human(t.capacity_bits / 8.0),
        t.bits_per_param
    );
    if let (Some(n), Some(per)) = (t.train_images, t.capacity_bits_per_image) {
        s += &format!(
            "          {n} training images (metadata): up to {} bits = {} bytes per image\n",
            human(per),
            human(per / 8.0)
        );
    }
    s += &format!("\n{}\n\nper layer\n", r.statement);
    let rows: Vec<Vec<String>> = r
        .layers
        .iter()
        .map(|l| {
            vec![
                l.layer.clone(),
                l.modules.to_string(),
                human(l.effective_params as f64),
                human(l.capacity_bits),
                format!("{:.4}", l.fro),
            ]
        })
        .collect();
    s += &table(&["layer", "modules", "eff. params", "capacity bits", "‖ΔW‖_F"], &rows);
    let mut ranked: Vec<&ModuleSpectrum> = r.modules.iter().collect();
    ranked.sort_by(|a, b| {
        b.capacity_bits.total_cmp(&a.capacity_bits).then_with(|| crate::order::natural_cmp(&a.base_key, &b.base_key))
    });
    s += &format!("\ntop {} modules by information\n", top.min(ranked.len()));
    let rows: Vec<Vec<String>> = ranked
        .iter()
        .take(top)
        .map(|m| {
            vec![
                m.base_key.clone(),
                m.kind.to_string(),
                m.route.to_string(),
                format!("{:.4}", m.spectral),
                format!("{:.4}", m.fro),
                format!("{:.2}", m.effective_rank),
                m.rank_99.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
                opt_f(m.relative_fro, 4),
                opt_f(m.amplification, 2),
                m.intruders.map(|x| x.to_string()).unwrap_or_else(|| "-".into()),
                human(m.capacity_bits),
            ]
        })
        .collect();
    s += &table(
        &["base key", "kind", "route", "σ₁", "‖ΔW‖_F", "eff.rank", "rank99", "rel.fro", "amplif.", "intruders", "bits"],
        &rows,
    );
    let notes: Vec<String> = r
        .modules
        .iter()
        .filter_map(|m| m.note.as_ref().map(|n| format!("  - {}: {}", inline(&m.base_key), inline(n))))
        .collect();
    if !notes.is_empty() {
        s += "\nnotes\n";
        s += &notes.join("\n");
        s.push('\n');
    }
    if !i.warnings.is_empty() {
        s += "\nwarnings\n";
        for w in &i.warnings {
            s += &format!("  - {}\n", inline(w));
        }
    }
    s
}
