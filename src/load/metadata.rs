//! safetensors `__metadata__`: shown parsed, with sd-scripts' `ss_*` training keys decoded.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Tag {
    pub tag: String,
    pub count: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct DatasetDir {
    pub name: String,
    pub images: Option<u64>,
    pub repeats: Option<u64>,
}

/// What sd-scripts (kohya) records about training. Every field is optional: files from other
/// trainers carry none of it, and hub uploads are often stripped.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct TrainingInfo {
    pub base_model: Option<String>,
    pub base_model_version: Option<String>,
    pub output_name: Option<String>,
    pub network_module: Option<String>,
    pub network_dim: Option<String>,
    pub network_alpha: Option<String>,
    /// sd-scripts' `ss_num_train_images`: images × repeats (each folder's images counted once
    /// per repeat; sd-scripts `DreamBoothDataset` adds `num_repeats × len(img_paths)`), not the
    /// number of distinct images.
    pub num_train_images: Option<u64>,
    /// Distinct training images: the sum of `img_count` over `ss_dataset_dirs` (or over the
    /// subsets of `ss_datasets`), when the file records it.
    pub distinct_images: Option<u64>,
    pub num_epochs: Option<u64>,
    pub max_train_steps: Option<u64>,
    pub resolution: Option<String>,
    pub dataset_dirs: Vec<DatasetDir>,
    /// Caption tags over all dataset folders, most frequent first.
    pub tags: Vec<Tag>,
    pub modelspec: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Metadata {
    /// Every `__metadata__` entry; values that are JSON are shown parsed.
    pub raw: BTreeMap<String, Value>,
    pub training: TrainingInfo,
}

impl TrainingInfo {
    /// The number of training images per-image figures use: distinct images when the file
    /// records them, else `ss_num_train_images` (which counts repeats, so per-image figures
    /// from it are smaller than the truth).
    pub fn images(&self) -> Option<u64> {
        self.distinct_images.or(self.num_train_images).filter(|&n| n > 0)
    }
}

/// Distinct images from the folders (`ss_dataset_dirs`), else from `ss_datasets`' subsets
/// (sd-scripts writes `img_count` per subset in newer versions). Counts saturate.
fn distinct_images(dirs: &[DatasetDir], datasets: Option<&String>) -> Option<u64> {
    let from_dirs: Vec<u64> = dirs.iter().filter_map(|d| d.images).collect();
    if !from_dirs.is_empty() {
        return Some(from_dirs.iter().fold(0u64, |a, &b| a.saturating_add(b)));
    }
    let Ok(Value::Array(sets)) = serde_json::from_str::<Value>(datasets?) else { return None };
    let counts: Vec<u64> = sets
        .iter()
        .filter_map(|d| d.get("subsets")?.as_array())
        .flatten()
        .filter_map(|s| s.get("img_count")?.as_u64())
        .collect();
    (!counts.is_empty()).then(|| counts.iter().fold(0u64, |a, &b| a.saturating_add(b)))
}

fn num(v: Option<&String>) -> Option<u64> {
    let s = v?.trim();
    s.parse::<u64>().ok().or_else(|| s.parse::<f64>().ok().filter(|f| *f >= 0.0).map(|f| f as u64))
}

fn text(v: Option<&String>) -> Option<String> {
    v.map(|s| s.trim().to_string()).filter(|s| !s.is_empty() && s != "None")
}

pub(crate) fn parse(meta: &BTreeMap<String, String>) -> Metadata {
    let raw = meta
        .iter()
        .map(|(k, v)| {
            let parsed = match v.trim_start().chars().next() {
                Some('{') | Some('[') => serde_json::from_str(v).unwrap_or_else(|_| Value::String(v.clone())),
                _ => Value::String(v.clone()),
            };
            (k.clone(), parsed)
        })
        .collect();
    let g = |k: &str| meta.get(k);
    let mut t = TrainingInfo {
        base_model: text(g("ss_sd_model_name")),
        base_model_version: text(g("ss_base_model_version")),
        output_name: text(g("ss_output_name")),
        network_module: text(g("ss_network_module")),
        network_dim: text(g("ss_network_dim")),
        network_alpha: text(g("ss_network_alpha")),
        num_train_images: num(g("ss_num_train_images")),
        num_epochs: num(g("ss_num_epochs")),
        max_train_steps: num(g("ss_max_train_steps")),
        resolution: text(g("ss_resolution")),
        ..Default::default()
    };
    if let Some(Ok(Value::Object(dirs))) = g("ss_dataset_dirs").map(|s| serde_json::from_str::<Value>(s)) {
        for (name, d) in dirs {
            t.dataset_dirs.push(DatasetDir {
                name,
                images: d.get("img_count").and_then(Value::as_u64),
                repeats: d.get("n_repeats").and_then(Value::as_u64),
            });
        }
    }
    t.distinct_images = distinct_images(&t.dataset_dirs, g("ss_datasets"));
    if let Some(Ok(Value::Object(folders))) = g("ss_tag_frequency").map(|s| serde_json::from_str::<Value>(s)) {
        let mut counts: BTreeMap<String, u64> = BTreeMap::new();
        for (_, tags) in folders {
            if let Value::Object(tags) = tags {
                for (tag, c) in tags {
                    let c = c.as_u64().or_else(|| c.as_f64().map(|f| f.max(0.0) as u64)).unwrap_or(0);
                    // Counts come from the file: saturate rather than wrap.
                    let n = counts.entry(tag.trim().to_string()).or_default();
                    *n = n.saturating_add(c);
                }
            }
        }
        let mut tags: Vec<Tag> = counts.into_iter().map(|(tag, count)| Tag { tag, count }).collect();
        tags.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| a.tag.cmp(&b.tag)));
        t.tags = tags;
    }
    t.modelspec =
        meta.iter().filter(|(k, _)| k.starts_with("modelspec.")).map(|(k, v)| (k.clone(), v.clone())).collect();
    Metadata { raw, training: t }
}
