//! `lorascope inspect`: what the adapter is.

use std::collections::BTreeMap;
use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::{human, table, InputFile, Tool};
use crate::load::hashes::FileHashes;
use crate::load::metadata::Metadata;
use crate::load::{BaseKind, ModuleKind};
use crate::shown::inline;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleRow {
    pub base_key: String,
    pub name: String,
    pub kind: ModuleKind,
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
    /// Count of finite values beyond ±1e15 (`MAX_ABS_VALUE`, spectral/delta.rs), which the
    /// spectrum refuses; written only when there are any, so ordinary reports keep their shape.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub extreme: usize,
    /// ΔW is exactly zero (a factor of the product is all zeros).
    pub zero: bool,
    pub dora: bool,
    /// Statistics of the stored values (all the module's factors together, finite values);
    /// absent from reports written before they were added.
    #[serde(default)]
    pub values: ValueStats,
}

/// What the closest peer tools print per module, over the stored factor values: the L1 norm
/// (sum of |x|), the largest |x| and the population standard deviation. Training settings show
/// in them (a high learning rate or alpha gives large factors); unlike the spectrum they depend
/// on how ΔW is split between the factors.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize, PartialEq)]
pub struct ValueStats {
    pub l1: f64,
    pub max_abs: f64,
    pub std: f64,
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AdapterInfo {
    pub format: String,
    pub architecture: String,
    pub modules: Vec<ModuleRow>,
    pub params: usize,
    pub kinds: BTreeMap<ModuleKind, usize>,
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

pub(crate) fn path_string(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn opt(x: &Option<impl ToString>) -> String {
    x.as_ref().map(|v| v.to_string()).unwrap_or_else(|| "-".into())
}

/// Labelled values on one line ("0.0001, unet 0.0001"), the absent ones left out.
fn labelled(parts: &[(&str, &Option<String>)]) -> Option<String> {
    let shown: Vec<String> = parts.iter().filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}{v}"))).collect();
    (!shown.is_empty()).then(|| shown.join(", "))
}

/// sd-scripts' learning rates: the base rate, then the UNet's and the text encoder's when set.
pub(crate) fn learning_rates(t: &crate::load::metadata::TrainingInfo) -> Option<String> {
    labelled(&[("", &t.learning_rate), ("unet ", &t.unet_lr), ("text encoder ", &t.text_encoder_lr)])
}

/// The base-model hashes sd-scripts recorded (new and legacy).
pub(crate) fn base_hashes(t: &crate::load::metadata::TrainingInfo) -> Option<String> {
    labelled(&[("", &t.new_sd_model_hash), ("legacy ", &t.sd_model_hash)])
}

/// Distinct training images and, beside them, sd-scripts' count with repeats.
pub(crate) fn images_line(t: &crate::load::metadata::TrainingInfo) -> Option<String> {
    match (t.distinct_images, t.num_train_images) {
        (Some(d), Some(n)) if d != n => Some(format!("{d} distinct ({n} with repeats, ss_num_train_images)")),
        (Some(d), _) => Some(format!("{d} distinct")),
        (None, Some(n)) => Some(format!("{n} with repeats (ss_num_train_images; distinct count not recorded)")),
        (None, None) => None,
    }
}

/// Human summary of an inspect report. Every string from the adapter file (names, tags,
/// metadata, paths) is shown with its controls escaped: one value, one line.
pub fn render_inspect(r: &InspectReport) -> String {
    let a = &r.adapter;
    let mut s = String::new();
    s += &format!("adapter   {}\n", inline(&r.inputs[0].path));
    s += &format!("format    {}    architecture: {}\n", a.format, a.architecture);
    s += &format!(
        "modules   {}  ({})    stored values: {}\n",
        a.modules.len(),
        a.kinds.iter().map(|(k, n)| format!("{n} {k}")).collect::<Vec<_>>().join(", "),
        human(a.params as f64)
    );
    if let Some(b) = &r.base {
        s += &format!(
            "base      {} ({}, {} tensors, {} params; adapter changes weights holding {})\n",
            inline(&b.path),
            b.kind,
            b.tensors,
            human(b.params as f64),
            human(b.touched_params as f64)
        );
    }
    s += "\nhashes\n";
    for i in &r.inputs {
        s += &format!("  {:<15} sha256 {}  {} bytes  {}\n", i.role, i.sha256, i.bytes, inline(&i.path));
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
            inline(&c.recorded),
            if c.matches { "matches" } else { "DIFFERS (tensors changed after training, or forged)" }
        );
    }
    if let Some(c) = &a.hashes.sshs_legacy_hash {
        s += &format!("  recorded sshs_legacy_hash {}: {}\n", inline(&c.recorded), legacy_verdict(c));
    }
    let t = &a.metadata.training;
    let mut meta = vec![];
    let mut add = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            meta.push(format!("  {k:<18} {}", inline(&v)));
        }
    };
    add("base model", t.base_model.clone());
    add("base version", t.base_model_version.clone());
    add("output name", t.output_name.clone());
    add("network", t.network_module.clone());
    add("dim / alpha", t.network_dim.clone().map(|d| format!("{d} / {}", t.network_alpha.clone().unwrap_or_default())));
    add("train images", images_line(t));
    add("epochs", t.num_epochs.map(|x| x.to_string()));
    add("max steps", t.max_train_steps.map(|x| x.to_string()));
    add("resolution", t.resolution.clone());
    add("task type", t.task_type.clone());
    add("trigger phrase", t.trigger_phrase.clone());
    add("comment", t.training_comment.clone());
    add("optimizer", t.optimizer.clone());
    add("learning rates", learning_rates(t));
    add("seed", t.seed.clone());
    add("started", t.started_at.clone());
    add("finished", t.finished_at.clone());
    add("network args", t.network_args.clone());
    add("clip skip", t.clip_skip.clone());
    add("noise offset", t.noise_offset.clone());
    add("base model hash", base_hashes(t));
    for d in &t.dataset_dirs {
        meta.push(format!(
            "  dataset dir        {} ({} images x {} repeats)",
            inline(&d.name),
            opt(&d.images),
            opt(&d.repeats)
        ));
    }
    if !t.tags.is_empty() {
        let top: Vec<String> = t.tags.iter().take(12).map(|g| format!("{} ({})", inline(&g.tag), g.count)).collect();
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
                m.kind.to_string(),
                m.rank.to_string(),
                m.alpha.map(|x| format!("{x}")).unwrap_or_else(|| "-".into()),
                format!("{:.4}", m.scale),
                format!("{:?}", m.shape),
                m.dtype.clone(),
                format!("{:.4}", m.values.max_abs),
                format!("{:.4}", m.values.std),
                format!("{:.1}", m.values.l1),
            ]
        })
        .collect();
    s += &table(&["base key", "kind", "rank", "alpha", "scale", "shape", "dtype", "max |x|", "std", "L1"], &rows);
    if !r.warnings.is_empty() {
        s += "\nwarnings\n";
        for w in &r.warnings {
            s += &format!("  - {}\n", inline(w));
        }
    }
    s
}

/// What a recorded `sshs_legacy_hash` check says, in words.
pub(crate) fn legacy_verdict(c: &crate::load::hashes::LegacyCheck) -> &'static str {
    match (c.matches, &c.computed) {
        (true, _) => "matches (tensors and ss_ training metadata as saved)",
        (false, Some(_)) => {
            "DIFFERS (tensors, their order or the ss_ training metadata changed after training, or forged)"
        }
        (false, None) => "not recomputable (the ss_ metadata alone exceeds 1 MiB)",
    }
}
