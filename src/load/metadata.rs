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
    /// `ss_training_comment`: free text, where trainers often write the trigger words.
    pub training_comment: Option<String>,
    /// `modelspec.trigger_phrase` (Stability's model spec).
    pub trigger_phrase: Option<String>,
    /// `ss_optimizer`, with its arguments as sd-scripts writes them.
    pub optimizer: Option<String>,
    pub learning_rate: Option<String>,
    pub unet_lr: Option<String>,
    pub text_encoder_lr: Option<String>,
    pub seed: Option<String>,
    /// `ss_training_started_at` / `ss_training_finished_at` (Unix seconds) as UTC ISO 8601.
    pub started_at: Option<String>,
    pub finished_at: Option<String>,
    /// `ss_network_args` (JSON as written).
    pub network_args: Option<String>,
    pub clip_skip: Option<String>,
    pub noise_offset: Option<String>,
    /// Hashes sd-scripts records of the base model it trained from.
    pub sd_model_hash: Option<String>,
    pub new_sd_model_hash: Option<String>,
    /// PEFT's `task_type` (from adapter_config.json).
    pub task_type: Option<String>,
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

/// Unix seconds (sd-scripts writes `time.time()`, a float) as UTC ISO 8601, with the value as
/// written beside it; `None` for what is not a plausible time (before 1970 or after 9999).
fn utc_time(v: &str) -> Option<String> {
    let secs = v.trim().parse::<f64>().ok().filter(|s| s.is_finite() && *s >= 0.0 && *s < 253_402_300_800.0)?;
    let secs = secs.floor() as i64;
    let (days, rem) = (secs.div_euclid(86_400), secs.rem_euclid(86_400));
    // Civil date from days since 1970-01-01 (H. Hinnant, "chrono-compatible low-level date
    // algorithms", civil_from_days).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    Some(format!("{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z ({})", rem / 3600, rem % 3600 / 60, rem % 60, v.trim()))
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
        training_comment: text(g("ss_training_comment")),
        trigger_phrase: text(g("modelspec.trigger_phrase")),
        optimizer: text(g("ss_optimizer")),
        learning_rate: text(g("ss_learning_rate")),
        unet_lr: text(g("ss_unet_lr")),
        text_encoder_lr: text(g("ss_text_encoder_lr")),
        seed: text(g("ss_seed")),
        started_at: g("ss_training_started_at").and_then(|v| utc_time(v)),
        finished_at: g("ss_training_finished_at").and_then(|v| utc_time(v)),
        network_args: text(g("ss_network_args")),
        clip_skip: text(g("ss_clip_skip")),
        noise_offset: text(g("ss_noise_offset")),
        sd_model_hash: text(g("ss_sd_model_hash")),
        new_sd_model_hash: text(g("ss_new_sd_model_hash")),
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

#[cfg(test)]
mod tests {
    #[test]
    fn unix_times_become_utc_dates() {
        assert_eq!(super::utc_time("0").as_deref(), Some("1970-01-01T00:00:00Z (0)"));
        // 2024-02-29T12:34:56Z = 1709210096 (a leap day).
        assert_eq!(super::utc_time("1709210096.75").as_deref(), Some("2024-02-29T12:34:56Z (1709210096.75)"));
        assert_eq!(super::utc_time("-5"), None);
        assert_eq!(super::utc_time("soon"), None);
    }
}
