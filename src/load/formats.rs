//! Reading adapter files of every format into `LoraModule`s.
//!
//! Sources: PEFT `tuners/lora` and `utils/save_and_load.py` (key names, DoRA magnitude key
//! without `.weight`, `get_pattern_key`), sd-scripts `networks/lora.py` (kohya names, `.alpha`),
//! LyCORIS `modules/{loha,lokr}.py` and `functional/` (LoHa/LoKr factors, Tucker cores, scale
//! rules), diffusers `loaders/lora_*` (component prefixes, legacy processor keys,
//! `lora_adapter_metadata`).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use super::module::{Delta, KronPart, LoraModule, Magnitude, ModuleKind, NormAxis};
use super::tensor::TensorRef;
use super::tensorfile::{refuse_pickle, TensorFile};
use crate::error::{Error, Result};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Peft,
    Kohya,
    Lycoris,
    Diffusers,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "peft" => Ok(Format::Peft),
            "kohya" | "sd-scripts" | "a1111" | "comfyui" => Ok(Format::Kohya),
            "lycoris" => Ok(Format::Lycoris),
            "diffusers" => Ok(Format::Diffusers),
            other => Err(format!("unknown format {other:?} (peft, kohya, lycoris, diffusers)")),
        }
    }
}

impl Format {
    pub fn as_str(&self) -> &'static str {
        match self {
            Format::Peft => "peft",
            Format::Kohya => "kohya",
            Format::Lycoris => "lycoris",
            Format::Diffusers => "diffusers",
        }
    }
}

/// The settings of a PEFT `adapter_config.json` (or a diffusers component config) that change
/// how ΔW is built.
#[derive(Debug, Clone, Default)]
pub struct LoraConfig {
    pub r: Option<usize>,
    pub alpha: Option<f64>,
    pub use_rslora: bool,
    /// Ordered as in the file: PEFT takes the first matching pattern.
    pub rank_pattern: Vec<(String, usize)>,
    pub alpha_pattern: Vec<(String, f64)>,
    pub fan_in_fan_out: bool,
    pub use_dora: bool,
    pub modules_to_save: Vec<String>,
    pub base_model: Option<String>,
    pub peft_type: Option<String>,
}

impl LoraConfig {
    pub fn from_json(v: &Value) -> Self {
        let obj_pairs = |k: &str| -> Vec<(String, Value)> {
            v.get(k)
                .and_then(Value::as_object)
                .map(|o| o.iter().map(|(a, b)| (a.clone(), b.clone())).collect())
                .unwrap_or_default()
        };
        LoraConfig {
            r: v.get("r").and_then(Value::as_u64).map(|x| x as usize),
            alpha: v.get("lora_alpha").or_else(|| v.get("alpha")).and_then(Value::as_f64),
            use_rslora: v.get("use_rslora").and_then(Value::as_bool).unwrap_or(false),
            rank_pattern: obj_pairs("rank_pattern")
                .into_iter()
                .filter_map(|(k, x)| Some((k, x.as_u64()? as usize)))
                .collect(),
            alpha_pattern: obj_pairs("alpha_pattern").into_iter().filter_map(|(k, x)| Some((k, x.as_f64()?))).collect(),
            fan_in_fan_out: v.get("fan_in_fan_out").and_then(Value::as_bool).unwrap_or(false),
            use_dora: v.get("use_dora").and_then(Value::as_bool).unwrap_or(false),
            modules_to_save: v
                .get("modules_to_save")
                .and_then(Value::as_array)
                .map(|a| a.iter().filter_map(|s| s.as_str().map(String::from)).collect())
                .unwrap_or_default(),
            base_model: v.get("base_model_name_or_path").and_then(Value::as_str).map(String::from),
            peft_type: v.get("peft_type").and_then(Value::as_str).map(String::from),
        }
    }

    /// PEFT `get_pattern_key`: an exact key wins, else the first key `k` with
    /// `re.match(rf"(.*\.)?({k})$", module_name)`.
    fn pattern<'a, T>(pairs: &'a [(String, T)], module: &str) -> Option<&'a T> {
        if let Some((_, v)) = pairs.iter().find(|(k, _)| k == module) {
            return Some(v);
        }
        pairs
            .iter()
            .find(|(k, _)| {
                regex::Regex::new(&format!(r"^(?:.*\.)?(?:{k})$")).map(|re| re.is_match(module)).unwrap_or(false)
            })
            .map(|(_, v)| v)
    }

    pub fn rank_for(&self, module: &str) -> Option<usize> {
        Self::pattern(&self.rank_pattern, module).copied().or(self.r)
    }
    pub fn alpha_for(&self, module: &str) -> Option<f64> {
        Self::pattern(&self.alpha_pattern, module).copied().or(self.alpha)
    }
}

/// Where an adapter lives: its tensor file and, for PEFT, its config.
pub struct AdapterSource {
    pub weights: PathBuf,
    pub config: Option<PathBuf>,
}

/// A PEFT directory, or a single `.safetensors` file (with `adapter_config.json` beside it when
/// the file is a PEFT `adapter_model.safetensors`).
pub fn locate(path: &Path) -> Result<AdapterSource> {
    if !path.exists() {
        return Err(Error::input(path, "no such file or directory"));
    }
    if path.is_dir() {
        let w = path.join("adapter_model.safetensors");
        let cfg = path.join("adapter_config.json");
        if w.is_file() {
            return Ok(AdapterSource { weights: w, config: cfg.is_file().then_some(cfg) });
        }
        for pickle in ["adapter_model.bin", "adapter_model.pt"] {
            if path.join(pickle).is_file() {
                refuse_pickle(&path.join(pickle))?;
            }
        }
        let mut st: Vec<PathBuf> = std::fs::read_dir(path)
            .map_err(|e| Error::input(path, format!("cannot list directory: {e}")))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|e| e == "safetensors"))
            .collect();
        st.sort();
        return match st.len() {
            1 => Ok(AdapterSource { weights: st.remove(0), config: cfg.is_file().then_some(cfg) }),
            0 => Err(Error::input(
                path,
                "directory has no adapter in it (no adapter_model.safetensors or other .safetensors file)",
            )),
            n => Err(Error::input(path, format!("directory has {n} .safetensors files; name the adapter file itself"))),
        };
    }
    refuse_pickle(path)?;
    let config = (path.file_name().is_some_and(|f| f == "adapter_model.safetensors"))
        .then(|| path.with_file_name("adapter_config.json"))
        .filter(|p| p.is_file());
    Ok(AdapterSource { weights: path.to_path_buf(), config })
}

const KOHYA_ROLES: &[(&str, &str)] = &[
    ("lora_down.weight", "down"),
    ("lora_up.weight", "up"),
    ("lora_mid.weight", "mid"),
    ("alpha", "alpha"),
    ("dora_scale", "dora_scale"),
    ("hada_w1_a", "hada_w1_a"),
    ("hada_w1_b", "hada_w1_b"),
    ("hada_w2_a", "hada_w2_a"),
    ("hada_w2_b", "hada_w2_b"),
    ("hada_t1", "hada_t1"),
    ("hada_t2", "hada_t2"),
    ("lokr_w1", "lokr_w1"),
    ("lokr_w1_a", "lokr_w1_a"),
    ("lokr_w1_b", "lokr_w1_b"),
    ("lokr_w2", "lokr_w2"),
    ("lokr_w2_a", "lokr_w2_a"),
    ("lokr_w2_b", "lokr_w2_b"),
    ("lokr_t1", "lokr_t1"),
    ("lokr_t2", "lokr_t2"),
    ("diff", "diff"),
    ("diff_b", "diff_b"),
    ("weight", "ia3"),
    ("on_input", "on_input"),
    ("oft_blocks", "oft"),
    ("oft_diag", "oft"),
    ("rescale", "oft_rescale"),
    ("boft_blocks", "boft"),
    ("boft_s", "boft_s"),
    ("a1.weight", "glora_a1"),
    ("a2.weight", "glora_a2"),
    ("b1.weight", "glora_b1"),
    ("b2.weight", "glora_b2"),
    ("scalar", "scalar"),
];

const PEFT_SUFFIXES: &[(&str, &str)] = &[
    (".lora_A.weight", "down"),
    (".lora_B.weight", "up"),
    (".lora_A.bias", "lora_bias"),
    (".lora_B.bias", "lora_bias"),
    (".lora_embedding_A", "emb_a"),
    (".lora_embedding_B", "emb_b"),
    (".lora_magnitude_vector.weight", "magnitude"),
    (".lora_magnitude_vector", "magnitude"),
    (".lora.down.weight", "down"),
    (".lora.up.weight", "up"),
    (".lora_linear_layer.down.weight", "down"),
    (".lora_linear_layer.up.weight", "up"),
    (".alpha", "alpha"),
    (".hada_w1_a", "hada_w1_a"),
    (".hada_w1_b", "hada_w1_b"),
    (".hada_w2_a", "hada_w2_a"),
    (".hada_w2_b", "hada_w2_b"),
    (".hada_t1", "hada_t1"),
    (".hada_t2", "hada_t2"),
    (".lokr_w1", "lokr_w1"),
    (".lokr_w1_a", "lokr_w1_a"),
    (".lokr_w1_b", "lokr_w1_b"),
    (".lokr_w2", "lokr_w2"),
    (".lokr_w2_a", "lokr_w2_a"),
    (".lokr_w2_b", "lokr_w2_b"),
    (".lokr_t2", "lokr_t2"),
];

const DIFFUSERS_COMPONENTS: &[&str] = &["unet.", "text_encoder.", "text_encoder_2.", "transformer."];

/// (module name, role) of one tensor key, or `None` if the key is not part of an adapter.
fn split_key(format: Format, key: &str) -> Option<(String, &'static str)> {
    match format {
        Format::Kohya | Format::Lycoris => {
            let (module, suffix) = key.split_once('.')?;
            KOHYA_ROLES.iter().find(|(s, _)| *s == suffix).map(|(_, r)| (module.to_string(), *r))
        }
        Format::Peft | Format::Diffusers => {
            let rest = if format == Format::Peft { key.strip_prefix("base_model.model.").unwrap_or(key) } else { key };
            if let Some(found) = legacy_processor_key(rest) {
                return Some(found);
            }
            for (suffix, role) in PEFT_SUFFIXES {
                if let Some(m) = rest.strip_suffix(suffix) {
                    return Some((m.to_string(), role));
                }
            }
            if format == Format::Peft {
                if let Some((m, _)) = rest.split_once(".modules_to_save.") {
                    return Some((m.to_string(), if key.ends_with(".bias") { "bias" } else { "replace" }));
                }
                if let Some(m) = rest.strip_suffix(".weight") {
                    return Some((m.to_string(), "replace"));
                }
                if let Some(m) = rest.strip_suffix(".bias") {
                    return Some((m.to_string(), "bias"));
                }
            }
            None
        }
    }
}

/// Old diffusers attention-processor keys: `….attn1.processor.to_q_lora.down.weight` names the
/// module `….attn1.to_q` (`to_out` is `to_out.0`); text-encoder `self_attn.to_q_lora` is `q_proj`.
fn legacy_processor_key(key: &str) -> Option<(String, &'static str)> {
    let (head, role) = if let Some(h) = key.strip_suffix("_lora.down.weight") {
        (h, "down")
    } else if let Some(h) = key.strip_suffix("_lora.up.weight") {
        (h, "up")
    } else {
        return None;
    };
    let (parent, proj) = head.rsplit_once('.')?;
    let parent = parent.strip_suffix(".processor").unwrap_or(parent);
    let clip = parent.ends_with("self_attn");
    let name = match (proj, clip) {
        ("to_q", false) | ("to_k", false) | ("to_v", false) => proj.to_string(),
        ("to_out", false) => "to_out.0".to_string(),
        ("to_q", true) => "q_proj".to_string(),
        ("to_k", true) => "k_proj".to_string(),
        ("to_v", true) => "v_proj".to_string(),
        ("to_out", true) => "out_proj".to_string(),
        _ => return None,
    };
    Some((format!("{parent}.{name}"), role))
}

pub fn detect_format(keys: &[&str]) -> Option<Format> {
    if keys.iter().any(|k| k.starts_with("base_model.model.")) {
        return Some(Format::Peft);
    }
    if keys
        .iter()
        .any(|k| DIFFUSERS_COMPONENTS.iter().any(|c| k.starts_with(c)) && split_key(Format::Diffusers, k).is_some())
    {
        return Some(Format::Diffusers);
    }
    let kohya: Vec<&str> = keys.iter().copied().filter_map(|k| split_key(Format::Kohya, k).map(|(_, r)| r)).collect();
    // A bare `.weight` is (IA)³ only beside its `on_input` flag; a base model's `lm_head.weight`
    // must not make a base file look like an adapter.
    let has_on_input = kohya.contains(&"on_input");
    let kohya: Vec<&str> = kohya.into_iter().filter(|r| has_on_input || *r != "ia3").collect();
    if kohya.iter().all(|r| matches!(*r, "alpha" | "scalar" | "on_input")) {
        return None;
    }
    if kohya.iter().any(|r| {
        r.starts_with("hada_")
            || r.starts_with("lokr_")
            || r.starts_with("oft")
            || r.starts_with("boft")
            || r.starts_with("glora")
            || *r == "diff"
            || *r == "ia3"
    }) {
        Some(Format::Lycoris)
    } else {
        Some(Format::Kohya)
    }
}

/// Per-module settings that come from outside the tensors.
struct Settings<'a> {
    config: Option<&'a LoraConfig>,
    is_peft: bool,
}

pub struct Parsed {
    pub format: Format,
    pub modules: Vec<LoraModule>,
    pub warnings: Vec<String>,
    pub config: Option<LoraConfig>,
}

/// Group the file's tensors by module and build each module.
pub fn parse(file: &Arc<TensorFile>, forced: Option<Format>, config_json: Option<&Value>) -> Result<Parsed> {
    let keys: Vec<&str> = file.tensors.keys().map(String::as_str).collect();
    if keys.is_empty() {
        return Err(Error::input(&file.path, "file holds no tensors, so no adapter"));
    }
    let format = match forced.or_else(|| detect_format(&keys)) {
        Some(f) => f,
        None => {
            let sample: Vec<&str> = keys.iter().take(3).copied().collect();
            return Err(Error::input(&file.path, format!("no adapter tensors recognised (keys such as {sample:?}); is this a base model rather than an adapter?")));
        }
    };
    let mut warnings = vec![];
    let config = match format {
        Format::Peft => config_json.map(LoraConfig::from_json),
        Format::Diffusers => diffusers_config(file),
        _ => None,
    };
    if format == Format::Peft && config.is_none() {
        warnings.push(
            "no adapter_config.json beside the PEFT weights: alpha unknown, assuming alpha = r (scale 1)".to_string(),
        );
    }
    let mut groups: BTreeMap<String, BTreeMap<&'static str, String>> = BTreeMap::new();
    let mut unknown = vec![];
    for k in &keys {
        match split_key(format, k) {
            Some((module, role)) => {
                let slot = groups.entry(module.clone()).or_default();
                if let Some(prev) = slot.insert(role, k.to_string()) {
                    return Err(Error::input(
                        &file.path,
                        format!("module {module} has two tensors for the same role: {prev} and {k}"),
                    ));
                }
            }
            None => unknown.push(k.to_string()),
        }
    }
    if !unknown.is_empty() {
        warnings.push(format!(
            "{} tensor(s) not recognised as adapter weights and ignored, e.g. {}",
            unknown.len(),
            unknown[0]
        ));
    }
    let mut modules = vec![];
    for (name, roles) in &groups {
        // Diffusers component configs are keyed by component; PEFT patterns by module name.
        let component_cfg;
        let cfg = match (format, &config) {
            (Format::Diffusers, Some(_)) => {
                component_cfg = diffusers_component_config(file, name);
                component_cfg.as_ref()
            }
            (_, c) => c.as_ref(),
        };
        let s = Settings { config: cfg, is_peft: format == Format::Peft };
        if let Some(m) = build_module(file, name, roles, &s, &mut warnings)? {
            modules.push(m);
        }
    }
    if modules.is_empty() {
        return Err(Error::input(&file.path, "no adapter modules found in the file"));
    }
    Ok(Parsed { format, modules, warnings, config })
}

fn diffusers_config(file: &TensorFile) -> Option<LoraConfig> {
    let raw = file.metadata.get("lora_adapter_metadata")?;
    let v: Value = serde_json::from_str(raw).ok()?;
    Some(LoraConfig::from_json(&v))
}

/// diffusers packs each component's LoraConfig with a `unet.`/`text_encoder.` prefix.
fn diffusers_component_config(file: &TensorFile, module: &str) -> Option<LoraConfig> {
    let raw = file.metadata.get("lora_adapter_metadata")?;
    let v: Value = serde_json::from_str(raw).ok()?;
    let obj = v.as_object()?;
    let comp = module.split('.').next()?;
    let prefix = format!("{comp}.");
    let sub: serde_json::Map<String, Value> =
        obj.iter().filter_map(|(k, x)| k.strip_prefix(&prefix).map(|k| (k.to_string(), x.clone()))).collect();
    if sub.is_empty() {
        Some(LoraConfig::from_json(&v))
    } else {
        Some(LoraConfig::from_json(&Value::Object(sub)))
    }
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

fn build_module(
    file: &Arc<TensorFile>,
    name: &str,
    roles: &BTreeMap<&'static str, String>,
    s: &Settings,
    warnings: &mut Vec<String>,
) -> Result<Option<LoraModule>> {
    let t = |r: &str| roles.get(r).map(|k| TensorRef::new(file, k));
    let err = |reason: String| Error::input(&file.path, format!("module {name}: {reason}"));
    let has = |prefix: &str| roles.keys().any(|r| r.starts_with(prefix));
    let alpha_tensor = match t("alpha") {
        Some(a) => Some(a.scalar()?),
        None => None,
    };
    let cfg_alpha = s.config.and_then(|c| c.alpha_for(name));
    let rslora = s.config.is_some_and(|c| c.use_rslora);

    let (kind, delta, rank, shape, main): (ModuleKind, Delta, usize, Vec<usize>, TensorRef);
    let mut scale_rule_full = false;
    if let (Some(up), Some(down)) = (t("up"), t("down")) {
        let (us, ds) = (up.shape().to_vec(), down.shape().to_vec());
        if !(us.len() == 2 || (us.len() >= 3 && us[2..].iter().all(|&d| d == 1))) || ds.len() < 2 {
            return Err(err(format!("up {us:?} / down {ds:?} are not LoRA factor shapes")));
        }
        if us[1] != ds[0] {
            return Err(err(format!(
                "A/B rank mismatch: up ({}) has rank {}, down ({}) has rank {}",
                up.name, us[1], down.name, ds[0]
            )));
        }
        if up.dtype() != down.dtype() {
            return Err(err(format!("A/B dtype mismatch: up is {}, down is {}", up.dtype_name(), down.dtype_name())));
        }
        let mid = t("mid");
        let spatial: Vec<usize> = match &mid {
            Some(m) => {
                let ms = m.shape();
                if ms.len() < 2 || ms[0] != us[1] || ms[1] != ds[0] {
                    return Err(err(format!("Tucker core shape {ms:?} does not fit rank {}", us[1])));
                }
                if numel(&ds[2..]) != 1 {
                    return Err(err(format!("with a Tucker core the down factor must be 1x1, got {ds:?}")));
                }
                ms[2..].to_vec()
            }
            None => ds[2..].to_vec(),
        };
        let transposed = s.is_peft && s.config.is_some_and(|c| c.fan_in_fan_out);
        let mut sh = if transposed { vec![ds[1], us[0]] } else { vec![us[0], ds[1]] };
        sh.extend(&spatial);
        rank = us[1];
        kind = if sh.len() > 2 { ModuleKind::Locon } else { ModuleKind::Lora };
        shape = sh;
        main = up.clone();
        delta = Delta::LowRank { up, down, mid, transposed };
    } else if let (Some(a), Some(b)) = (t("emb_a"), t("emb_b")) {
        let (as_, bs) = (a.shape().to_vec(), b.shape().to_vec());
        if as_.len() != 2 || bs.len() != 2 || bs[1] != as_[0] {
            return Err(err(format!("A/B rank mismatch: lora_embedding_A {as_:?}, lora_embedding_B {bs:?}")));
        }
        rank = as_[0];
        kind = ModuleKind::Embedding;
        shape = vec![as_[1], bs[0]];
        main = a.clone();
        delta = Delta::LowRank { up: b, down: a, mid: None, transposed: true };
    } else if has("hada_") {
        let need = |r: &str| t(r).ok_or_else(|| err(format!("LoHa module lacks {r}")));
        let (w1a, w1b, w2a, w2b) = (need("hada_w1_a")?, need("hada_w1_b")?, need("hada_w2_a")?, need("hada_w2_b")?);
        let (t1, t2) = (t("hada_t1"), t("hada_t2"));
        let side = |a: &TensorRef, b: &TensorRef, tc: &Option<TensorRef>| -> Result<(usize, Vec<usize>)> {
            let (sa, sb) = (a.shape(), b.shape());
            match tc {
                None => {
                    if sa.len() != 2 || sa[1] != sb[0] {
                        return Err(err(format!("A/B rank mismatch: {} {sa:?} x {} {sb:?}", a.name, b.name)));
                    }
                    Ok((sb[0], vec![sa[0], numel(&sb[1..])]))
                }
                Some(tc) => {
                    let st = tc.shape();
                    if st.len() < 2 || sa[0] != st[0] || sb[0] != st[1] {
                        return Err(err(format!(
                            "Tucker core {st:?} does not fit {} {sa:?} and {} {sb:?}",
                            a.name, b.name
                        )));
                    }
                    let mut sh = vec![sa[1], sb[1]];
                    sh.extend(&st[2..]);
                    Ok((sb[0], sh))
                }
            }
        };
        let (r1, sh1) = side(&w1a, &w1b, &t1)?;
        let (_, sh2) = side(&w2a, &w2b, &t2)?;
        if sh1[0] != sh2[0] || numel(&sh1) != numel(&sh2) {
            return Err(err(format!("LoHa halves have different shapes {sh1:?} and {sh2:?}")));
        }
        rank = r1;
        kind = ModuleKind::Loha;
        shape = sh1;
        main = w1a.clone();
        delta = Delta::Hadamard { w1a, w1b, w2a, w2b, t1, t2 };
    } else if has("lokr_") {
        let part = |full: &str, a: &str, b: &str, tc: Option<&str>| -> Result<(KronPart, usize, usize, Vec<usize>)> {
            if let Some(f) = t(full) {
                let sh = f.shape().to_vec();
                if sh.len() < 2 {
                    return Err(err(format!("{full} has shape {sh:?}")));
                }
                return Ok((KronPart::Full(f), sh[0], sh[1], sh[2..].to_vec()));
            }
            let (Some(ta), Some(tb)) = (t(a), t(b)) else {
                return Err(err(format!("LoKr module has neither {full} nor {a}+{b}")));
            };
            let (sa, sb) = (ta.shape().to_vec(), tb.shape().to_vec());
            let tcore = tc.and_then(t);
            match &tcore {
                Some(tt) => {
                    let st = tt.shape().to_vec();
                    if st.len() < 2 || sa.len() != 2 || st[0] != sa[0] || st[1] != sb[0] {
                        return Err(err(format!("Tucker core {st:?} does not fit {a} {sa:?} and {b} {sb:?}")));
                    }
                    Ok((KronPart::Product { a: ta, b: tb, t: tcore.clone() }, sa[1], sb[1], st[2..].to_vec()))
                }
                None => {
                    if sa.len() != 2 || sb.len() < 2 || sa[1] != sb[0] {
                        return Err(err(format!("A/B rank mismatch: {a} {sa:?} x {b} {sb:?}")));
                    }
                    Ok((KronPart::Product { a: ta, b: tb, t: None }, sa[0], sb[1], sb[2..].to_vec()))
                }
            }
        };
        let (w1, a, c, sp1) = part("lokr_w1", "lokr_w1_a", "lokr_w1_b", None)?;
        let (w2, b, d, sp2) = part("lokr_w2", "lokr_w2_a", "lokr_w2_b", Some("lokr_t2"))?;
        if !sp1.is_empty() {
            return Err(err("lokr_w1 must be 2-D".to_string()));
        }
        // LyCORIS: the rank comes from w2_b, else w1_b; with both factors whole the scale is 1.
        let r = t("lokr_w2_b").or_else(|| t("lokr_w1_b")).map(|x| x.shape()[0]);
        scale_rule_full = r.is_none();
        // With both factors whole, report the largest rank a Kronecker product of them can have.
        rank = r.unwrap_or(a.min(c) * b.min(d));
        kind = ModuleKind::Lokr;
        let mut sh = vec![a * b, c * d];
        sh.extend(sp2);
        shape = sh;
        main = roles.get("lokr_w1").or(roles.get("lokr_w1_a")).map(|k| TensorRef::new(file, k)).expect("checked");
        delta = Delta::Kronecker { w1, w2 };
    } else if let Some(diff) = t("diff") {
        shape = diff.shape().to_vec();
        if shape.len() < 2 {
            return Err(err(format!("diff has shape {shape:?}")));
        }
        rank = shape[0].min(numel(&shape[1..]));
        kind = ModuleKind::Full;
        main = diff.clone();
        delta = Delta::Diff { diff, bias: t("diff_b") };
        scale_rule_full = true;
    } else if let Some(w) = t("replace") {
        shape = w.shape().to_vec();
        rank = shape.first().copied().unwrap_or(0).min(numel(shape.get(1..).unwrap_or(&[])));
        kind = ModuleKind::Full;
        main = w.clone();
        delta = Delta::Replace { weight: w };
        scale_rule_full = true;
    } else if let Some(w) = t("ia3") {
        let on_input = match t("on_input") {
            Some(o) => o.scalar()? != 0.0,
            None => false,
        };
        shape = vec![];
        rank = 0;
        kind = ModuleKind::Ia3;
        main = w.clone();
        delta = Delta::Ia3 { weight: w, on_input };
        scale_rule_full = true;
    } else if let Some(algo) = ["oft", "boft", "glora_a1"].iter().find(|r| roles.contains_key(*r)) {
        let tensors: Vec<TensorRef> = roles.values().map(|k| TensorRef::new(file, k)).collect();
        let (k, label) = match *algo {
            "oft" => (ModuleKind::Oft, "OFT"),
            "boft" => (ModuleKind::Boft, "BOFT"),
            _ => (ModuleKind::Glora, "GLoRA"),
        };
        warnings.push(format!("module {name}: {label} is recognised but its analysis is not supported yet"));
        shape = vec![];
        rank = 0;
        kind = k;
        main = tensors[0].clone();
        delta = Delta::Unsupported { algo: label.to_string(), tensors };
        scale_rule_full = true;
    } else if roles.contains_key("bias")
        || roles.contains_key("lora_bias")
        || roles.keys().all(|r| *r == "alpha" || *r == "scalar")
    {
        // A trained bias alone, or a stray alpha: no weight delta to analyse.
        warnings.push(format!("module {name}: only {:?} stored, no weight delta", roles.keys().collect::<Vec<_>>()));
        return Ok(None);
    } else {
        let present: Vec<&str> = roles.keys().copied().collect();
        return Err(err(format!("incomplete module: has {present:?} but no factor pair")));
    }

    // Rank and alpha from the config must agree with the tensors (PEFT would refuse to load).
    if s.is_peft && matches!(kind, ModuleKind::Lora | ModuleKind::Locon | ModuleKind::Embedding) {
        if let Some(r_cfg) = s.config.and_then(|c| c.rank_for(name)) {
            if r_cfg != rank {
                return Err(err(format!(
                    "rank mismatch with adapter_config.json: config gives r={r_cfg}, tensors have rank {rank}"
                )));
            }
        }
    }
    let alpha = if scale_rule_full {
        alpha_tensor
    } else {
        Some(alpha_tensor.or(cfg_alpha).filter(|a| *a != 0.0).unwrap_or(rank as f64))
    };
    let scale = if scale_rule_full || rank == 0 {
        1.0
    } else {
        let a = alpha.unwrap_or(rank as f64);
        if rslora {
            a / (rank as f64).sqrt()
        } else {
            a / rank as f64
        }
    };

    let magnitude = if let Some(m) = t("magnitude") {
        Some(Magnitude { tensor: m, axis: NormAxis::Row })
    } else if let Some(m) = t("dora_scale") {
        let ms = m.shape().to_vec();
        let axis = if ms.first() == Some(&1) && ms.get(1).is_some_and(|&d| d != 1 || shape.get(1) == Some(&1)) {
            NormAxis::Column
        } else {
            NormAxis::Row
        };
        Some(Magnitude { tensor: m, axis })
    } else {
        None
    };
    let kind = if magnitude.is_some() && matches!(kind, ModuleKind::Lora | ModuleKind::Locon) {
        ModuleKind::Dora
    } else {
        kind
    };
    let tensors: Vec<TensorRef> = roles
        .iter()
        .filter(|(r, _)| !matches!(**r, "alpha" | "on_input" | "scalar"))
        .map(|(_, k)| TensorRef::new(file, k))
        .collect();
    let params = tensors.iter().map(|t| t.numel()).sum();
    let dtype = main.dtype_name();
    Ok(Some(LoraModule {
        name: name.to_string(),
        base_key: String::new(),
        resolved: false,
        kind,
        delta,
        magnitude,
        alpha,
        rank,
        scale,
        shape,
        dtype,
        params,
        tensors,
    }))
}
