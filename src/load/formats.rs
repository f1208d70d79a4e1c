//! Reading adapter files of every format into `LoraModule`s.
//!
//! Sources: PEFT `tuners/lora` and `utils/save_and_load.py` (key names, DoRA magnitude key
//! without `.weight`; `get_pattern_key` in `patterns.rs`), sd-scripts `networks/lora.py` (kohya names, `.alpha`),
//! LyCORIS `modules/{loha,lokr}.py` and `functional/` (LoHa/LoKr factors, Tucker cores, scale
//! rules), diffusers `loaders/lora_*` (component prefixes, legacy processor keys,
//! `lora_adapter_metadata`; `lora_conversion_utils.py` for the Flux layouts: kohya
//! `lora_unet_double_blocks_…`, XLabs `…processor.qkv_lora1.down.weight`, `diffusion_model.`
//! names), ComfyUI `comfy/lora.py` (`diffusion_model.` + checkpoint path with `lora_A`/`lora_B`
//! or `lora_down`/`lora_up`, alpha/rank when `.alpha` is stored, else scale 1). The model
//! families and their key templates are in `families.rs`.
//!
//! A file whose keys follow several naming schemes (PEFT's `base_model.model.…`, diffusers'
//! component prefixes, kohya's `lora_unet_…`) has the modules of every scheme read, and says so
//! in a warning: reading only one scheme would let a few tensors of another hide the rest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize};
use serde_json::Value;

use super::families;
use super::fsguard::{is_entry, Tree};
use super::module::{Delta, KronPart, LoraModule, Magnitude, ModuleKind, NormAxis};
use super::patterns::{self, PatternWork, Patterns, MAX_PATTERN_KEYS};
use super::safeloras;
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
    /// cloneofsimo `lora_diffusion` "safeloras" (`unet:0:up`).
    Safeloras,
    /// XLabs x-flux processor LoRAs (`double_blocks.N.processor.qkv_lora1.down.weight`).
    Xlabs,
    /// The checkpoint's own module paths under `diffusion_model.` with PEFT or kohya suffixes
    /// (ComfyUI's generic LoRA naming; AI-toolkit writes it for BFL-layout models).
    Original,
}

impl std::str::FromStr for Format {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "peft" => Ok(Format::Peft),
            "kohya" | "sd-scripts" | "a1111" | "comfyui" => Ok(Format::Kohya),
            "lycoris" => Ok(Format::Lycoris),
            "diffusers" => Ok(Format::Diffusers),
            "safeloras" | "cloneofsimo" | "lora_diffusion" => Ok(Format::Safeloras),
            "xlabs" | "x-flux" => Ok(Format::Xlabs),
            "original" | "ai-toolkit" | "diffusion_model" => Ok(Format::Original),
            other => {
                Err(format!("unknown format {other:?} (peft, kohya, lycoris, diffusers, safeloras, xlabs, original)"))
            }
        }
    }
}

impl Format {
    pub(crate) fn as_str(&self) -> &'static str {
        match self {
            Format::Peft => "peft",
            Format::Kohya => "kohya",
            Format::Lycoris => "lycoris",
            Format::Diffusers => "diffusers",
            Format::Safeloras => "safeloras",
            Format::Xlabs => "xlabs",
            Format::Original => "original",
        }
    }
}

/// The settings of a PEFT `adapter_config.json` (or of one component in diffusers'
/// `lora_adapter_metadata`) that change how ΔW is built, with the names PEFT's `LoraConfig`
/// gives them (peft `tuners/lora/config.py`). Unknown fields are ignored, missing ones take
/// these defaults, and a field of another type than PEFT writes reads as missing, so that a
/// hand-edited config is read as far as it can be rather than refused.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct LoraConfig {
    #[serde(deserialize_with = "lenient")]
    pub r: Option<usize>,
    /// `Some` whenever the key is present, even with a value of the wrong type: only an absent
    /// `lora_alpha` lets `alpha` stand in.
    #[serde(deserialize_with = "present")]
    lora_alpha: Option<Option<f64>>,
    /// PEFT's LoHa and LoKr configs name it `alpha` (peft `tuners/loha/config.py`).
    #[serde(rename = "alpha", deserialize_with = "lenient")]
    other_alpha: Option<f64>,
    #[serde(deserialize_with = "lenient")]
    pub use_rslora: bool,
    pub rank_pattern: Patterns<usize>,
    pub alpha_pattern: Patterns<f64>,
    #[serde(deserialize_with = "lenient")]
    pub fan_in_fan_out: bool,
    #[serde(deserialize_with = "lenient")]
    pub use_dora: bool,
    #[serde(deserialize_with = "strings")]
    pub modules_to_save: Vec<String>,
    #[serde(rename = "base_model_name_or_path", deserialize_with = "lenient")]
    pub base_model: Option<String>,
    #[serde(deserialize_with = "lenient")]
    pub peft_type: Option<String>,
    /// Why the patterns cannot be evaluated (too many keys, a key that does not compile), set
    /// when the config is read; every pattern lookup then fails with it.
    #[serde(skip)]
    pattern_problem: Option<String>,
    /// Pattern evaluations so far, shared by every config one adapter reads.
    #[serde(skip)]
    work: Arc<PatternWork>,
}

/// The value if it has the type PEFT writes, else the type's default.
fn lenient<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> std::result::Result<T, D::Error> {
    Ok(serde_json::from_value(Value::deserialize(d)?).unwrap_or_default())
}

/// For a field whose mere presence matters: `Some` of the lenient value.
fn present<'de, D: Deserializer<'de>, T: DeserializeOwned + Default>(d: D) -> std::result::Result<Option<T>, D::Error> {
    lenient(d).map(Some)
}

/// A list of names, keeping the strings of a list that mixes in other values.
fn strings<'de, D: Deserializer<'de>>(d: D) -> std::result::Result<Vec<String>, D::Error> {
    let v = Value::deserialize(d)?;
    let items = v.as_array().map(Vec::as_slice).unwrap_or_default();
    Ok(items.iter().filter_map(|s| s.as_str().map(String::from)).collect())
}

impl LoraConfig {
    /// A config that is not a JSON object holds no settings. The pattern keys are compiled
    /// here, once; a problem with them is kept for [`LoraConfig::pattern_problem`] and every
    /// lookup.
    pub fn from_json(v: &Value) -> Self {
        let Some(map) = v.as_object() else {
            return Self::default();
        };
        let keys = patterns::count_keys(map);
        if keys > MAX_PATTERN_KEYS {
            return LoraConfig { pattern_problem: Some(too_many_keys(keys)), ..Self::default() };
        }
        // Every field is read leniently, so an object always deserializes.
        let mut c = Self::deserialize(v).unwrap_or_default();
        c.pattern_problem = c
            .rank_pattern
            .compile()
            .map_err(|e| format!("rank_pattern {e}"))
            .and_then(|()| c.alpha_pattern.compile().map_err(|e| format!("alpha_pattern {e}")))
            .err();
        c
    }

    /// Why `rank_pattern`/`alpha_pattern` cannot be evaluated, naming the field and the key or
    /// the limit; an adapter with such a config is refused.
    pub(crate) fn pattern_problem(&self) -> Option<&str> {
        self.pattern_problem.as_deref()
    }

    pub(crate) fn alpha(&self) -> Option<f64> {
        match self.lora_alpha {
            Some(a) => a,
            None => self.other_alpha,
        }
    }
    /// The module's rank: `rank_pattern` (patterns.rs), else `r`. An error names the field and
    /// the key that could not be evaluated, or the limit reached.
    pub fn rank_for(&self, module: &str) -> std::result::Result<Option<usize>, String> {
        self.check_patterns()?;
        let p = self.rank_pattern.get(module, &self.work).map_err(|e| format!("rank_pattern {e}"))?;
        Ok(p.copied().or(self.r))
    }
    /// The module's alpha: `alpha_pattern`, else `lora_alpha` (or `alpha`).
    pub fn alpha_for(&self, module: &str) -> std::result::Result<Option<f64>, String> {
        self.check_patterns()?;
        let p = self.alpha_pattern.get(module, &self.work).map_err(|e| format!("alpha_pattern {e}"))?;
        Ok(p.copied().or(self.alpha()))
    }
    fn check_patterns(&self) -> std::result::Result<(), String> {
        match &self.pattern_problem {
            Some(p) => Err(p.clone()),
            None => Ok(()),
        }
    }
}

fn too_many_keys(n: usize) -> String {
    format!("rank_pattern and alpha_pattern hold {n} keys (limit MAX_PATTERN_KEYS = {MAX_PATTERN_KEYS})")
}

/// Where an adapter lives: its tensor file and, for PEFT, its config, each with the tree it
/// must stay inside (`weights_tree` is `None` when the user named the weights file itself).
pub(crate) struct AdapterSource {
    pub weights: PathBuf,
    pub weights_tree: Option<Tree>,
    pub config: Option<(PathBuf, Tree)>,
}

/// A PEFT directory, or a single `.safetensors` file (with `adapter_config.json` beside it when
/// the file is a PEFT `adapter_model.safetensors`). `tree` is `None` when the user named `path`
/// (it may be a link; a directory is then its own tree), or the tree a scan found it under
/// (`path` must resolve inside it). Entries are taken whatever their type, so that a weights
/// file that is a link out or a FIFO is refused when opened, not passed over.
pub(crate) fn locate(path: &Path, tree: Option<&Tree>) -> Result<AdapterSource> {
    const WHAT: &str = "the adapter directory";
    match tree {
        Some(t) => {
            t.resolve(path)?;
        }
        None if !path.exists() => return Err(Error::input(path, "no such file or directory")),
        None => {}
    }
    if path.is_dir() {
        let tree = match tree {
            Some(t) => t.clone(),
            None => Tree::named(path, WHAT)?,
        };
        let w = path.join("adapter_model.safetensors");
        let cfg = path.join("adapter_config.json");
        let config = is_entry(&cfg).then(|| (cfg, tree.clone()));
        if is_entry(&w) {
            return Ok(AdapterSource { weights: w, weights_tree: Some(tree), config });
        }
        for pickle in ["adapter_model.bin", "adapter_model.pt"] {
            if is_entry(&path.join(pickle)) {
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
            1 => Ok(AdapterSource { weights: st.remove(0), weights_tree: Some(tree), config }),
            0 => Err(Error::input(
                path,
                "directory has no adapter in it (no adapter_model.safetensors or other .safetensors file)",
            )),
            n => Err(Error::input(path, format!("directory has {n} .safetensors files; name the adapter file itself"))),
        };
    }
    refuse_pickle(path)?;
    let cfg = path.with_file_name("adapter_config.json");
    let config = if path.file_name().is_some_and(|f| f == "adapter_model.safetensors") && is_entry(&cfg) {
        let t = match tree {
            Some(t) => t.clone(),
            None => Tree::around(path, WHAT)?,
        };
        Some((cfg, t))
    } else {
        None
    };
    Ok(AdapterSource { weights: path.to_path_buf(), weights_tree: tree.cloned(), config })
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

/// ComfyUI's generic LoRA names: `diffusion_model.` + the checkpoint's module path (ComfyUI
/// `comfy/lora.py` `model_lora_keys_unet`; AI-toolkit `convert_lora_weights_before_save` of its
/// BFL-layout models, with PEFT's `lora_A`/`lora_B` and no alpha).
const ORIGINAL_PREFIX: &str = "diffusion_model.";
/// Suffixes ComfyUI reads beside PEFT's under that prefix (kohya's factor names).
const ORIGINAL_SUFFIXES: &[(&str, &str)] =
    &[(".lora_down.weight", "down"), (".lora_up.weight", "up"), (".dora_scale", "dora_scale")];

const DIFFUSERS_COMPONENTS: &[&str] = &["unet.", "text_encoder.", "text_encoder_2.", "transformer."];
/// The UNet's top-level blocks, with which `save_attn_procs` (diffusers' older
/// attention-processor LoRA files) starts its keys.
const UNET_BLOCKS: &[&str] = &["down_blocks.", "up_blocks.", "mid_block."];

/// (module name, role) of one tensor key, or `None` if the key is not part of an adapter.
fn split_key(format: Format, key: &str) -> Option<(String, &'static str)> {
    match format {
        Format::Safeloras => safeloras::split(key).map(|(c, i, role)| (safeloras::module_name(c, i), role)),
        Format::Kohya | Format::Lycoris => {
            let (module, suffix) = key.split_once('.')?;
            KOHYA_ROLES.iter().find(|(s, _)| *s == suffix).map(|(_, r)| (module.to_string(), *r))
        }
        Format::Xlabs => families::xlabs_key(key),
        Format::Original => {
            let rest = key.strip_prefix(ORIGINAL_PREFIX)?;
            let (suffix, role) = PEFT_SUFFIXES.iter().chain(ORIGINAL_SUFFIXES).find(|(s, _)| rest.ends_with(s))?;
            Some((format!("{ORIGINAL_PREFIX}{}", &rest[..rest.len() - suffix.len()]), role))
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

/// The format of an adapter with these keys: of the naming scheme that claims the most keys
/// ([`naming_schemes`]); `None` when no scheme recognises any.
pub fn detect_format(keys: &[&str]) -> Option<Format> {
    let schemes = naming_schemes(keys);
    // `max_by_key` keeps the last of equals: reverse so that precedence order breaks ties.
    schemes.iter().rev().max_by_key(|(_, k)| k.len()).map(|(f, _)| *f)
}

/// The naming schemes the keys follow, in precedence order (PEFT, diffusers, safeloras,
/// original, XLabs, kohya/LyCORIS), each with the keys it claims: PEFT the keys under
/// `base_model.model.`, diffusers those under a component prefix (`unet.`, …) that its suffixes
/// recognise, safeloras the `component:i:up|down` keys, original those under `diffusion_model.`
/// with a PEFT or kohya factor suffix, XLabs its processor keys, kohya the other keys of the
/// form `module.role`. A scheme counts only if it has a weight (kohya keys that are all
/// `alpha`/`scalar`/`on_input` do not). When only one scheme is present it claims every key,
/// so a file of one scheme reads as it always has.
fn naming_schemes<'k>(keys: &[&'k str]) -> Vec<(Format, Vec<&'k str>)> {
    let is_peft = |k: &str| k.starts_with("base_model.model.");
    let is_safeloras = |k: &str| safeloras::split(k).is_some();
    // diffusers' `save_attn_procs` files name UNet modules without the `unet.` prefix.
    let is_diffusers = |k: &str| {
        !is_peft(k)
            && (DIFFUSERS_COMPONENTS.iter().any(|c| k.starts_with(c)) || UNET_BLOCKS.iter().any(|c| k.starts_with(c)))
            && split_key(Format::Diffusers, k).is_some()
    };
    let is_xlabs = |k: &str| split_key(Format::Xlabs, k).is_some();
    let is_original = |k: &str| !is_xlabs(k) && split_key(Format::Original, k).is_some();
    let peft: Vec<&str> = keys.iter().copied().filter(|k| is_peft(k)).collect();
    let diffusers: Vec<&str> = keys.iter().copied().filter(|k| is_diffusers(k)).collect();
    let safeloras: Vec<&str> = keys.iter().copied().filter(|k| is_safeloras(k)).collect();
    let xlabs: Vec<&str> = keys.iter().copied().filter(|k| is_xlabs(k)).collect();
    let original: Vec<&str> = keys.iter().copied().filter(|k| is_original(k)).collect();
    let kohya: Vec<(&str, &str)> = keys
        .iter()
        .copied()
        .filter(|k| !is_peft(k) && !is_diffusers(k) && !is_safeloras(k) && !is_xlabs(k) && !is_original(k))
        .filter_map(|k| split_key(Format::Kohya, k).map(|(_, r)| (k, r)))
        .collect();
    // A bare `.weight` is (IA)³ only beside its `on_input` flag; a base model's `lm_head.weight`
    // must not make a base file look like an adapter.
    let has_on_input = kohya.iter().any(|(_, r)| *r == "on_input");
    let kohya: Vec<(&str, &str)> = kohya.into_iter().filter(|(_, r)| has_on_input || *r != "ia3").collect();
    let mut out = vec![];
    if !peft.is_empty() {
        out.push((Format::Peft, peft));
    }
    if !diffusers.is_empty() {
        out.push((Format::Diffusers, diffusers));
    }
    if !safeloras.is_empty() {
        out.push((Format::Safeloras, safeloras));
    }
    // A scheme of alphas alone is none (they sit beside factors of another scheme).
    if original.iter().any(|k| !k.ends_with(".alpha")) {
        out.push((Format::Original, original));
    }
    if !xlabs.is_empty() {
        out.push((Format::Xlabs, xlabs));
    }
    if !kohya.iter().all(|(_, r)| matches!(*r, "alpha" | "scalar" | "on_input")) {
        let lycoris = kohya.iter().any(|(_, r)| {
            r.starts_with("hada_")
                || r.starts_with("lokr_")
                || r.starts_with("oft")
                || r.starts_with("boft")
                || r.starts_with("glora")
                || *r == "diff"
                || *r == "ia3"
        });
        out.push((if lycoris { Format::Lycoris } else { Format::Kohya }, kohya.into_iter().map(|(k, _)| k).collect()));
    }
    if let [(_, claimed)] = out.as_mut_slice() {
        *claimed = keys.to_vec();
    }
    out
}

/// kohya and LyCORIS share one naming (LyCORIS adds module kinds).
fn same_scheme(a: Format, b: Format) -> bool {
    let family = |f: Format| if f == Format::Lycoris { Format::Kohya } else { f };
    family(a) == family(b)
}

/// Whether keys with no adapter naming look like a model's own weights: the roots of the
/// checkpoints lorascope reads as bases, or many tensors that are all `.weight`/`.bias`.
fn looks_like_base(keys: &[&str]) -> bool {
    const ROOTS: &[&str] = &[
        "model.diffusion_model.",
        "first_stage_model.",
        "cond_stage_model.",
        "conditioner.",
        "model.layers.",
        "model.embed_tokens.",
        "transformer.",
        "text_model.",
        "down_blocks.",
        "up_blocks.",
        "encoder.",
        "decoder.",
    ];
    let rooted = keys.iter().filter(|k| ROOTS.iter().any(|r| k.starts_with(r))).count();
    let weights = keys.iter().filter(|k| k.ends_with(".weight") || k.ends_with(".bias")).count();
    rooted * 2 >= keys.len() || (keys.len() >= 10 && weights * 10 >= keys.len() * 9)
}

/// Per-module settings that come from outside the tensors.
struct Settings<'a> {
    config: Option<&'a LoraConfig>,
    is_peft: bool,
    /// The file the config came from, for errors about it: `adapter_config.json`, or the
    /// adapter itself for diffusers' `lora_adapter_metadata`.
    config_source: &'a ConfigSource,
}

impl Settings<'_> {
    fn rank_for(&self, module: &str) -> Result<Option<usize>> {
        match self.config {
            Some(c) => c.rank_for(module).map_err(|e| self.config_source.error(e)),
            None => Ok(None),
        }
    }
    fn alpha_for(&self, module: &str) -> Result<Option<f64>> {
        match self.config {
            Some(c) => c.alpha_for(module).map_err(|e| self.config_source.error(e)),
            None => Ok(None),
        }
    }
}

/// Where a config was read from, for the errors that name it.
struct ConfigSource {
    path: PathBuf,
    /// Prepended to the reason: the metadata key for a config inside the adapter file.
    within: &'static str,
}

impl ConfigSource {
    fn error(&self, reason: impl std::fmt::Display) -> Error {
        Error::input(&self.path, format!("{}{reason}", self.within))
    }
}

pub(crate) struct Parsed {
    pub format: Format,
    pub modules: Vec<LoraModule>,
    pub warnings: Vec<String>,
    pub config: Option<LoraConfig>,
    /// Modules read under each naming scheme the keys follow; more than one is `mixed-naming`.
    pub naming: Vec<(Format, usize)>,
}

/// Group the file's tensors by module and build each module, under every naming scheme the keys
/// follow (or the one forced). `config` is PEFT's `adapter_config.json`: its path and contents.
pub(crate) fn parse(file: &Arc<TensorFile>, forced: Option<Format>, config: Option<(&Path, &Value)>) -> Result<Parsed> {
    let keys: Vec<&str> = file.tensors.keys().map(String::as_str).collect();
    if keys.is_empty() {
        return Err(Error::input(&file.path, "file holds no tensors, so no adapter"));
    }
    let detected = naming_schemes(&keys);
    let sample: Vec<&str> = keys.iter().take(3).copied().collect();
    let schemes = match forced {
        // A forced format must be one the keys follow: read under another scheme every
        // `name.weight` of a base file became a rank-0 (IA)³ module.
        Some(f) if detected.iter().any(|(d, _)| same_scheme(*d, f)) => vec![(f, keys.clone())],
        Some(f) => {
            let follows: Vec<&str> = detected.iter().map(|(d, _)| d.as_str()).collect();
            let why = if follows.is_empty() { "no known naming".to_string() } else { follows.join(" and ") };
            return Err(Error::input(
                &file.path,
                format!(
                    "--format {f}: the keys do not follow {f} naming (keys such as {sample:?} follow {why}); \
                     leave --format out to detect the format",
                    f = f.as_str()
                ),
            ));
        }
        None => detected,
    };
    if schemes.is_empty() {
        let hint = if looks_like_base(&keys) {
            "; it looks like a base model (full weights), not an adapter: give it as --base"
        } else {
            ""
        };
        return Err(Error::input(&file.path, format!("no adapter tensors recognised (keys such as {sample:?}){hint}")));
    }
    let mut warnings = vec![];
    let work = Arc::new(PatternWork::default());
    let mut modules: Vec<LoraModule> = vec![];
    let mut scheme_of: BTreeMap<String, Format> = BTreeMap::new();
    let mut naming = vec![];
    let mut whole_config = None;
    for (format, claimed) in &schemes {
        let format = *format;
        let claimed = &without_embeddings(file, format, claimed, &mut warnings);
        let start = modules.len();
        let configs = ModuleConfigs::read(format, file, config, &work)?;
        if format == Format::Peft && configs.whole.is_none() {
            warnings.push(
                "no adapter_config.json beside the PEFT weights: alpha unknown, assuming alpha = r (scale 1)"
                    .to_string(),
            );
        }
        let groups = group_by_module(file, format, claimed, &mut warnings)?;
        let mut count = 0;
        for (name, roles) in &groups {
            let s = Settings {
                config: configs.for_module(name),
                is_peft: format == Format::Peft,
                config_source: &configs.source,
            };
            let Some(mut m) = build_module(file, name, roles, &s, &mut warnings)? else { continue };
            if let Some(other) = scheme_of.insert(name.clone(), format) {
                return Err(Error::input(
                    &file.path,
                    format!(
                        "module {name} is stored twice, under {} and under {} key names",
                        other.as_str(),
                        format.as_str()
                    ),
                ));
            }
            // Without a base, the best guess at the base key: dotted names denote the weight
            // directly; kohya names stay as they are until a base resolves them.
            m.base_key = match format {
                Format::Peft | Format::Diffusers => format!("{}.weight", m.name),
                // Flux/SD3 transformer names read back with the models' module paths.
                Format::Safeloras => m.name.clone(),
                Format::Kohya | Format::Lycoris => families::kohya_dit_key(&m.name).unwrap_or_else(|| m.name.clone()),
                Format::Xlabs => {
                    warnings.extend(families::xlabs_partial(&m.name));
                    families::xlabs_target(&m.name).unwrap_or_else(|| m.name.clone())
                }
                Format::Original => format!("{}.weight", &m.name[ORIGINAL_PREFIX.len()..]),
            };
            modules.push(m);
            count += 1;
        }
        if format == Format::Safeloras {
            name_safeloras_modules(file, &mut modules[start..], &mut warnings);
        }
        naming.push((format, count));
        whole_config = whole_config.or(configs.whole);
    }
    if modules.is_empty() {
        return Err(Error::input(&file.path, "no adapter modules found in the file"));
    }
    if schemes.len() > 1 {
        let claimed: usize = schemes.iter().map(|(_, k)| k.len()).sum();
        if claimed < keys.len() {
            let first = keys.iter().find(|k| !schemes.iter().any(|(_, c)| c.contains(k))).copied().unwrap_or_default();
            warnings.push(format!(
                "{} tensor(s) not recognised as adapter weights and ignored, e.g. {first}",
                keys.len() - claimed
            ));
        }
        let list: Vec<String> = naming.iter().map(|(f, n)| format!("{} ({n} module(s))", f.as_str())).collect();
        warnings.push(format!(
            "mixed naming: the keys follow {} naming schemes, {}; every module of each is analysed, and the \
             format reported is the one with the most modules",
            schemes.len(),
            list.join(", ")
        ));
    }
    // The scheme with the most modules names the adapter's format; precedence order breaks ties.
    let format = naming.iter().rev().max_by_key(|(_, n)| *n).map(|(f, _)| *f).expect("at least one scheme");
    Ok(Parsed { format, modules, warnings, config: whole_config, naming })
}

/// The keys of a safeloras file less its textual-inversion embeddings (metadata value
/// `<embed>`), which are named in a warning: they add tokens, not a weight delta.
fn without_embeddings<'k>(
    file: &TensorFile,
    format: Format,
    keys: &[&'k str],
    warnings: &mut Vec<String>,
) -> Vec<&'k str> {
    if format != Format::Safeloras {
        return keys.to_vec();
    }
    let (embeds, rest): (Vec<&str>, Vec<&str>) =
        keys.iter().partition(|k| file.metadata.get(**k).is_some_and(|v| v == safeloras::EMBED_FLAG));
    if !embeds.is_empty() {
        warnings.push(format!(
            "{} textual-inversion embedding(s) stored beside the LoRA ({}): new tokens the adapter adds, not analysed",
            embeds.len(),
            embeds.iter().take(8).copied().collect::<Vec<_>>().join(", ")
        ));
    }
    rest
}

/// Give the positional modules of a safeloras file the base weights they change, component by
/// component, where their order and shapes fit a known walk (`safeloras.rs`); otherwise keep
/// the positional names and say why.
fn name_safeloras_modules(file: &TensorFile, modules: &mut [LoraModule], warnings: &mut Vec<String>) {
    let mut by_component: BTreeMap<String, Vec<(usize, usize)>> = BTreeMap::new();
    for (at, m) in modules.iter().enumerate() {
        if let Some((c, i, _)) = safeloras::split(&format!("{}:up", m.name)) {
            by_component.entry(c.to_string()).or_default().push((i, at));
        }
    }
    for (component, mut layers) in by_component {
        layers.sort_unstable();
        for (i, at) in &layers {
            let recorded =
                file.metadata.get(&format!("{component}:{i}:rank")).and_then(|r| r.trim().parse::<usize>().ok());
            if let Some(r) = recorded.filter(|r| *r != modules[*at].rank) {
                warnings.push(format!(
                    "module {}: metadata records rank {r}, the factors have rank {}; the factors are used",
                    modules[*at].name, modules[*at].rank
                ));
            }
        }
        let contiguous = layers.iter().enumerate().all(|(n, (i, _))| n == *i);
        let targets: Vec<String> =
            file.metadata.get(&component).and_then(|t| serde_json::from_str(t).ok()).unwrap_or_default();
        let shapes: Vec<Vec<usize>> = layers.iter().map(|(_, at)| modules[*at].shape.clone()).collect();
        let paths = if contiguous {
            safeloras::module_paths(&component, &targets, &shapes)
        } else {
            Err("its layer indices have gaps".to_string())
        };
        match paths {
            Ok(paths) => {
                for ((_, at), path) in layers.iter().zip(paths) {
                    modules[*at].base_key = format!("{path}.weight");
                }
            }
            Err(why) => warnings.push(format!(
                "safeloras component {component}: {} layers stored by position, and {why}; their names are \
                 positions ({component}:0, …), not the base weights they change",
                layers.len()
            )),
        }
    }
}

/// Each module's tensors by role; keys that belong to no module are counted in a warning.
fn group_by_module(
    file: &TensorFile,
    format: Format,
    keys: &[&str],
    warnings: &mut Vec<String>,
) -> Result<BTreeMap<String, BTreeMap<&'static str, String>>> {
    let mut groups: BTreeMap<String, BTreeMap<&'static str, String>> = BTreeMap::new();
    let mut unknown = vec![];
    for k in keys {
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
    Ok(groups)
}

/// The configs an adapter's modules read, parsed once per adapter: PEFT's `adapter_config.json`,
/// or diffusers' `lora_adapter_metadata` with its per-component parts.
struct ModuleConfigs {
    /// The whole config, as the adapter reports it.
    whole: Option<LoraConfig>,
    /// diffusers packs each component's LoraConfig under a `unet.`/`text_encoder.` prefix
    /// (diffusers `loaders/lora_base.py`, `_pack_dict_with_prefix`); a module of a component
    /// with no such keys reads the whole config.
    components: BTreeMap<String, LoraConfig>,
    source: ConfigSource,
}

impl ModuleConfigs {
    /// The configs of one naming scheme, their pattern keys compiled (all the configs of one
    /// adapter count their pattern evaluations in `work`). A config whose patterns cannot be
    /// evaluated refuses the adapter.
    fn read(format: Format, file: &TensorFile, peft: Option<(&Path, &Value)>, work: &Arc<PatternWork>) -> Result<Self> {
        let mut c = match (format, peft) {
            (Format::Peft, Some((path, v))) => ModuleConfigs {
                whole: Some(LoraConfig::from_json(v)),
                components: BTreeMap::new(),
                source: ConfigSource { path: path.to_path_buf(), within: "" },
            },
            (Format::Diffusers, _) => {
                let source = ConfigSource { path: file.path.clone(), within: "lora_adapter_metadata: " };
                // Metadata that is not valid JSON gives no config, as an absent one does.
                let meta = file.metadata.get("lora_adapter_metadata");
                match meta.and_then(|raw| serde_json::from_str::<Value>(raw).ok()) {
                    Some(v) => Self::diffusers(&v, source)?,
                    None => ModuleConfigs { whole: None, components: BTreeMap::new(), source },
                }
            }
            _ => ModuleConfigs {
                whole: None,
                components: BTreeMap::new(),
                source: ConfigSource { path: file.path.clone(), within: "" },
            },
        };
        if let Some(w) = &c.whole {
            if let Some(p) = w.pattern_problem() {
                return Err(c.source.error(p));
            }
        }
        for (component, cfg) in &c.components {
            if let Some(p) = cfg.pattern_problem() {
                return Err(c.source.error(format!("{component}.{p}")));
            }
        }
        for cfg in c.whole.iter_mut().chain(c.components.values_mut()) {
            cfg.work = work.clone();
        }
        Ok(c)
    }

    fn diffusers(v: &Value, source: ConfigSource) -> Result<Self> {
        let mut parts: BTreeMap<String, serde_json::Map<String, Value>> = BTreeMap::new();
        for (k, x) in v.as_object().into_iter().flatten() {
            if let Some((component, key)) = k.split_once('.') {
                parts.entry(component.to_string()).or_default().insert(key.to_string(), x.clone());
            }
        }
        // The limit on pattern keys holds for the adapter, over every component's config.
        let keys =
            v.as_object().map_or(0, patterns::count_keys) + parts.values().map(patterns::count_keys).sum::<usize>();
        if keys > MAX_PATTERN_KEYS {
            return Err(source.error(too_many_keys(keys)));
        }
        let components = parts.into_iter().map(|(c, m)| (c, LoraConfig::from_json(&Value::Object(m)))).collect();
        Ok(ModuleConfigs { whole: Some(LoraConfig::from_json(v)), components, source })
    }

    fn for_module(&self, name: &str) -> Option<&LoraConfig> {
        let component = name.split('.').next().unwrap_or(name);
        self.components.get(component).or(self.whole.as_ref())
    }
}

fn numel(s: &[usize]) -> usize {
    s.iter().product()
}

/// One module's tensors by role, with the file they live in.
struct ModuleTensors<'a> {
    file: &'a Arc<TensorFile>,
    name: &'a str,
    roles: &'a BTreeMap<&'static str, String>,
}

impl ModuleTensors<'_> {
    fn get(&self, role: &str) -> Option<TensorRef> {
        self.roles.get(role).map(|k| TensorRef::new(self.file, k))
    }
    fn has_prefix(&self, prefix: &str) -> bool {
        self.roles.keys().any(|r| r.starts_with(prefix))
    }
    fn err(&self, reason: impl std::fmt::Display) -> Error {
        Error::input(&self.file.path, format!("module {}: {reason}", self.name))
    }
}

/// What a module's tensors make before alpha and DoRA are applied.
struct Built {
    kind: ModuleKind,
    delta: Delta,
    rank: usize,
    shape: Vec<usize>,
    /// The tensor whose dtype the module reports.
    main: TensorRef,
    /// Whether ΔW is scaled by alpha/r. LyCORIS scales whole LoKr factors, `.diff`, (IA)³ and
    /// the rest by 1, as PEFT does a `modules_to_save` replacement.
    scaled: bool,
}

/// One module from its tensors, in phases: the delta its roles make, the config's rank check,
/// alpha and scale, DoRA's magnitude.
fn build_module(
    file: &Arc<TensorFile>,
    name: &str,
    roles: &BTreeMap<&'static str, String>,
    s: &Settings,
    warnings: &mut Vec<String>,
) -> Result<Option<LoraModule>> {
    let m = ModuleTensors { file, name, roles };
    let alpha_tensor = m.get("alpha").map(|a| a.scalar()).transpose()?;
    let Some(b) = build_delta(&m, s, warnings)? else {
        return Ok(None);
    };
    check_config_rank(&m, s, &b)?;
    let (alpha, scale) = alpha_and_scale(&m, s, &b, alpha_tensor)?;
    let magnitude = dora_magnitude(&m, &b.shape);
    let kind = if magnitude.is_some() && matches!(b.kind, ModuleKind::Lora | ModuleKind::Locon) {
        ModuleKind::Dora
    } else {
        b.kind
    };
    let tensors = stored_tensors(&m);
    let params = tensors.iter().map(|t| t.numel()).sum();
    Ok(Some(LoraModule {
        name: name.to_string(),
        base_key: String::new(),
        resolved: false,
        kind,
        delta: b.delta,
        magnitude,
        alpha,
        rank: b.rank,
        scale,
        shape: b.shape,
        dtype: b.main.dtype_name(),
        params,
        tensors,
    }))
}

/// The module's tensors less the scalars that only set its scale or its (IA)³ axis.
fn stored_tensors(m: &ModuleTensors) -> Vec<TensorRef> {
    let kept = m.roles.iter().filter(|(r, _)| !matches!(**r, "alpha" | "on_input" | "scalar"));
    kept.map(|(_, k)| TensorRef::new(m.file, k)).collect()
}

/// The kind the module's roles say, built; `None` (with a warning) for a module that stores
/// no weight delta.
fn build_delta(m: &ModuleTensors, s: &Settings, warnings: &mut Vec<String>) -> Result<Option<Built>> {
    if let (Some(up), Some(down)) = (m.get("up"), m.get("down")) {
        return low_rank(m, s, up, down).map(Some);
    }
    if let (Some(a), Some(b)) = (m.get("emb_a"), m.get("emb_b")) {
        return embedding(m, a, b).map(Some);
    }
    if m.has_prefix("hada_") {
        return loha(m).map(Some);
    }
    if m.has_prefix("lokr_") {
        return lokr(m).map(Some);
    }
    if let Some(diff) = m.get("diff") {
        return full_diff(m, diff).map(Some);
    }
    if let Some(w) = m.get("replace") {
        return Ok(Some(replacement(w)));
    }
    if let Some(w) = m.get("ia3") {
        return ia3(m, w).map(Some);
    }
    if let Some(algo) = ["oft", "boft", "glora_a1"].into_iter().find(|r| m.roles.contains_key(r)) {
        return Ok(Some(unsupported(m, algo, warnings)));
    }
    let roles = m.roles;
    if roles.contains_key("bias")
        || roles.contains_key("lora_bias")
        || roles.keys().all(|r| *r == "alpha" || *r == "scalar")
    {
        // A trained bias alone, or a stray alpha: no weight delta to analyse.
        warnings.push(format!(
            "module {}: only {:?} stored, no weight delta",
            m.name,
            roles.keys().collect::<Vec<_>>()
        ));
        return Ok(None);
    }
    let present: Vec<&str> = roles.keys().copied().collect();
    Err(m.err(format!("incomplete module: has {present:?} but no factor pair")))
}

/// LoRA/LoCon: up `[out, r]` (trailing 1×1 for conv), down `[r, in, …]`, and kohya's optional
/// Tucker core `lora_mid` `[r, r, kh, kw]`, which takes the kernel from a 1×1 down.
fn low_rank(m: &ModuleTensors, s: &Settings, up: TensorRef, down: TensorRef) -> Result<Built> {
    let (us, ds) = (up.shape().to_vec(), down.shape().to_vec());
    if !(us.len() == 2 || (us.len() >= 3 && us[2..].iter().all(|&d| d == 1))) || ds.len() < 2 {
        return Err(m.err(format!("up {us:?} / down {ds:?} are not LoRA factor shapes")));
    }
    if us[1] != ds[0] {
        return Err(m.err(format!(
            "A/B rank mismatch: up ({}) has rank {}, down ({}) has rank {}",
            up.name, us[1], down.name, ds[0]
        )));
    }
    if up.dtype() != down.dtype() {
        return Err(m.err(format!("A/B dtype mismatch: up is {}, down is {}", up.dtype_name(), down.dtype_name())));
    }
    let mid = m.get("mid");
    let spatial = match &mid {
        Some(t) => tucker_kernel(m, t, &us, &ds)?,
        None => ds[2..].to_vec(),
    };
    // PEFT's `fan_in_fan_out` stores the layer's weight as [in, out] (GPT-2's Conv1D).
    let transposed = s.is_peft && s.config.is_some_and(|c| c.fan_in_fan_out);
    let mut shape = if transposed { vec![ds[1], us[0]] } else { vec![us[0], ds[1]] };
    shape.extend(&spatial);
    let kind = if shape.len() > 2 { ModuleKind::Locon } else { ModuleKind::Lora };
    let main = up.clone();
    Ok(Built { kind, delta: Delta::LowRank { up, down, mid, transposed }, rank: us[1], shape, main, scaled: true })
}

/// The kernel size a `lora_mid` core gives ΔW, once it is checked to fit the factors.
fn tucker_kernel(m: &ModuleTensors, mid: &TensorRef, us: &[usize], ds: &[usize]) -> Result<Vec<usize>> {
    let ms = mid.shape();
    if ms.len() < 2 || ms[0] != us[1] || ms[1] != ds[0] {
        return Err(m.err(format!("Tucker core shape {ms:?} does not fit rank {}", us[1])));
    }
    if numel(&ds[2..]) != 1 {
        return Err(m.err(format!("with a Tucker core the down factor must be 1x1, got {ds:?}")));
    }
    Ok(ms[2..].to_vec())
}

/// PEFT embedding LoRA: `lora_embedding_A` `[r, vocab]`, `lora_embedding_B` `[dim, r]`; the
/// product B·A is ΔWᵀ of the `[vocab, dim]` table.
fn embedding(m: &ModuleTensors, a: TensorRef, b: TensorRef) -> Result<Built> {
    let (as_, bs) = (a.shape().to_vec(), b.shape().to_vec());
    if as_.len() != 2 || bs.len() != 2 || bs[1] != as_[0] {
        return Err(m.err(format!("A/B rank mismatch: lora_embedding_A {as_:?}, lora_embedding_B {bs:?}")));
    }
    Ok(Built {
        kind: ModuleKind::Embedding,
        rank: as_[0],
        shape: vec![as_[1], bs[0]],
        main: a.clone(),
        delta: Delta::LowRank { up: b, down: a, mid: None, transposed: true },
        scaled: true,
    })
}

/// LoHa: ΔW = (w1_a·w1_b) ⊙ (w2_a·w2_b), each half optionally through a Tucker core.
fn loha(m: &ModuleTensors) -> Result<Built> {
    let need = |r: &str| m.get(r).ok_or_else(|| m.err(format!("LoHa module lacks {r}")));
    let (w1a, w1b, w2a, w2b) = (need("hada_w1_a")?, need("hada_w1_b")?, need("hada_w2_a")?, need("hada_w2_b")?);
    let (t1, t2) = (m.get("hada_t1"), m.get("hada_t2"));
    let (r1, sh1) = loha_half(m, &w1a, &w1b, t1.as_ref())?;
    let (_, sh2) = loha_half(m, &w2a, &w2b, t2.as_ref())?;
    if sh1[0] != sh2[0] || numel(&sh1) != numel(&sh2) {
        return Err(m.err(format!("LoHa halves have different shapes {sh1:?} and {sh2:?}")));
    }
    let main = w1a.clone();
    Ok(Built {
        kind: ModuleKind::Loha,
        rank: r1,
        shape: sh1,
        main,
        delta: Delta::Hadamard { w1a, w1b, w2a, w2b, t1, t2 },
        scaled: true,
    })
}

/// One LoHa half's rank and ΔW shape. Without a core, a `[out, r]` and b `[r, in, …]`; with
/// core t `[r, r, kh, kw]` (LyCORIS `functional/loha.py`), a `[r, out]` and b `[r, in]`.
fn loha_half(m: &ModuleTensors, a: &TensorRef, b: &TensorRef, core: Option<&TensorRef>) -> Result<(usize, Vec<usize>)> {
    let (sa, sb) = (a.shape(), b.shape());
    let Some(core) = core else {
        if sa.len() != 2 || sb.first() != Some(&sa[1]) {
            return Err(m.err(format!("A/B rank mismatch: {} {sa:?} x {} {sb:?}", a.name, b.name)));
        }
        return Ok((sb[0], vec![sa[0], numel(&sb[1..])]));
    };
    let st = core.shape();
    if st.len() < 2 || sa.len() < 2 || sb.len() < 2 || sa[0] != st[0] || sb[0] != st[1] {
        return Err(m.err(format!("Tucker core {st:?} does not fit {} {sa:?} and {} {sb:?}", a.name, b.name)));
    }
    let mut sh = vec![sa[1], sb[1]];
    sh.extend(&st[2..]);
    Ok((sb[0], sh))
}

/// One Kronecker factor of LoKr and the part of ΔW's shape it gives.
struct KronFactor {
    part: KronPart,
    rows: usize,
    cols: usize,
    /// Kernel dimensions (conv), empty for linear layers.
    spatial: Vec<usize>,
}

/// LoKr: ΔW = kron(w1, w2), each factor stored whole or as a product (LyCORIS `modules/lokr.py`).
fn lokr(m: &ModuleTensors) -> Result<Built> {
    let w1 = kron_factor(m, "lokr_w1", "lokr_w1_a", "lokr_w1_b", None)?;
    let w2 = kron_factor(m, "lokr_w2", "lokr_w2_a", "lokr_w2_b", Some("lokr_t2"))?;
    if !w1.spatial.is_empty() {
        return Err(m.err("lokr_w1 must be 2-D"));
    }
    // LyCORIS: the rank comes from w2_b, else w1_b; with both factors whole the scale is 1.
    let r = match ["lokr_w2_b", "lokr_w1_b"].into_iter().find_map(|role| m.get(role).map(|t| (role, t))) {
        // Beside a whole factor a `_b` tensor is not checked as a factor, so it may have no axes.
        Some((role, t)) => Some(*t.shape().first().ok_or_else(|| m.err(format!("{role} has shape []")))?),
        None => None,
    };
    // With both factors whole, report the largest rank a Kronecker product of them can have.
    let rank = r.unwrap_or(w1.rows.min(w1.cols) * w2.rows.min(w2.cols));
    let mut shape = vec![w1.rows * w2.rows, w1.cols * w2.cols];
    shape.extend(w2.spatial);
    let main = match &w1.part {
        KronPart::Full(t) | KronPart::Product { a: t, .. } => t.clone(),
    };
    Ok(Built {
        kind: ModuleKind::Lokr,
        rank,
        shape,
        main,
        delta: Delta::Kronecker { w1: w1.part, w2: w2.part },
        scaled: r.is_some(),
    })
}

/// A LoKr factor from its whole tensor `full`, else from `a`·`b`: a `[rows, r]` and b
/// `[r, cols, …]`, or with Tucker core `core` `[r, r, kh, kw]` a `[r, rows]` and b `[r, cols]`.
fn kron_factor(m: &ModuleTensors, full: &str, a: &str, b: &str, core: Option<&str>) -> Result<KronFactor> {
    if let Some(f) = m.get(full) {
        let sh = f.shape().to_vec();
        if sh.len() < 2 {
            return Err(m.err(format!("{full} has shape {sh:?}")));
        }
        return Ok(KronFactor { part: KronPart::Full(f), rows: sh[0], cols: sh[1], spatial: sh[2..].to_vec() });
    }
    let (Some(ta), Some(tb)) = (m.get(a), m.get(b)) else {
        return Err(m.err(format!("LoKr module has neither {full} nor {a}+{b}")));
    };
    let (sa, sb) = (ta.shape().to_vec(), tb.shape().to_vec());
    match core.and_then(|c| m.get(c)) {
        Some(tt) => {
            let st = tt.shape().to_vec();
            if st.len() < 2 || sa.len() != 2 || sb.len() < 2 || st[0] != sa[0] || st[1] != sb[0] {
                return Err(m.err(format!("Tucker core {st:?} does not fit {a} {sa:?} and {b} {sb:?}")));
            }
            let part = KronPart::Product { a: ta, b: tb, t: Some(tt) };
            Ok(KronFactor { part, rows: sa[1], cols: sb[1], spatial: st[2..].to_vec() })
        }
        None => {
            if sa.len() != 2 || sb.len() < 2 || sa[1] != sb[0] {
                return Err(m.err(format!("A/B rank mismatch: {a} {sa:?} x {b} {sb:?}")));
            }
            let part = KronPart::Product { a: ta, b: tb, t: None };
            Ok(KronFactor { part, rows: sa[0], cols: sb[1], spatial: sb[2..].to_vec() })
        }
    }
}

/// The rank a whole matrix can have: min(rows, cols) of its `[out, in·kh·kw]` view.
fn full_rank(shape: &[usize]) -> usize {
    shape.first().copied().unwrap_or(0).min(numel(shape.get(1..).unwrap_or(&[])))
}

/// LyCORIS `full`: ΔW stored whole as `.diff` (with an optional bias `.diff_b`).
fn full_diff(m: &ModuleTensors, diff: TensorRef) -> Result<Built> {
    let shape = diff.shape().to_vec();
    if shape.len() < 2 {
        return Err(m.err(format!("diff has shape {shape:?}")));
    }
    Ok(Built {
        kind: ModuleKind::Full,
        rank: full_rank(&shape),
        shape,
        main: diff.clone(),
        delta: Delta::Diff { diff, bias: m.get("diff_b") },
        scaled: false,
    })
}

/// PEFT `modules_to_save`: a whole new weight.
fn replacement(w: TensorRef) -> Built {
    let shape = w.shape().to_vec();
    Built {
        kind: ModuleKind::Full,
        rank: full_rank(&shape),
        shape,
        main: w.clone(),
        delta: Delta::Replace { weight: w },
        scaled: false,
    }
}

/// (IA)³: a vector along the output axis, or the input axis when `on_input` is set.
fn ia3(m: &ModuleTensors, w: TensorRef) -> Result<Built> {
    let on_input = match m.get("on_input") {
        Some(o) => o.scalar()? != 0.0,
        None => false,
    };
    Ok(Built {
        kind: ModuleKind::Ia3,
        rank: 0,
        shape: vec![],
        main: w.clone(),
        delta: Delta::Ia3 { weight: w, on_input },
        scaled: false,
    })
}

/// OFT, BOFT and GLoRA: recognised, kept with all their tensors, not analysed.
fn unsupported(m: &ModuleTensors, algo: &str, warnings: &mut Vec<String>) -> Built {
    let tensors: Vec<TensorRef> = m.roles.values().map(|k| TensorRef::new(m.file, k)).collect();
    let (kind, label) = match algo {
        "oft" => (ModuleKind::Oft, "OFT"),
        "boft" => (ModuleKind::Boft, "BOFT"),
        _ => (ModuleKind::Glora, "GLoRA"),
    };
    warnings.push(format!("module {}: {label} is recognised but its analysis is not supported yet", m.name));
    // `algo` is one of the module's roles, so there is a first tensor.
    let main = tensors[0].clone();
    Built {
        kind,
        rank: 0,
        shape: vec![],
        main,
        delta: Delta::Unsupported { algo: label.to_string(), tensors },
        scaled: false,
    }
}

/// The config's rank must agree with the factors' (PEFT would refuse to load the adapter).
fn check_config_rank(m: &ModuleTensors, s: &Settings, b: &Built) -> Result<()> {
    if !s.is_peft || !matches!(b.kind, ModuleKind::Lora | ModuleKind::Locon | ModuleKind::Embedding) {
        return Ok(());
    }
    match s.rank_for(m.name)? {
        Some(r_cfg) if r_cfg != b.rank => Err(m.err(format!(
            "rank mismatch with adapter_config.json: config gives r={r_cfg}, tensors have rank {}",
            b.rank
        ))),
        _ => Ok(()),
    }
}

/// The reported alpha and the scale ΔW is multiplied by. A stored `.alpha` wins over the
/// config's; a missing or zero alpha means alpha = rank (sd-scripts `networks/lora.py`);
/// rsLoRA divides by √r instead of r (PEFT `use_rslora`). Kinds scaled by 1 report only a
/// stored alpha.
fn alpha_and_scale(
    m: &ModuleTensors,
    s: &Settings,
    b: &Built,
    alpha_tensor: Option<f64>,
) -> Result<(Option<f64>, f64)> {
    if !b.scaled {
        return Ok((alpha_tensor, 1.0));
    }
    let cfg_alpha = s.alpha_for(m.name)?;
    let rank = b.rank as f64;
    let alpha = alpha_tensor.or(cfg_alpha).filter(|a| *a != 0.0).unwrap_or(rank);
    let scale = match (b.rank, s.config.is_some_and(|c| c.use_rslora)) {
        (0, _) => 1.0,
        (_, true) => alpha / rank.sqrt(),
        (_, false) => alpha / rank,
    };
    Ok((Some(alpha), scale))
}

/// DoRA's magnitude and the axis its norm runs along. PEFT's `lora_magnitude_vector` holds one
/// value per output row. A kohya/LyCORIS `dora_scale` is `[1, in]` for a norm over each input
/// column and `[out, 1]` for one per output row; a `[1, 1]` scale is read by the layer's width.
fn dora_magnitude(m: &ModuleTensors, shape: &[usize]) -> Option<Magnitude> {
    if let Some(t) = m.get("magnitude") {
        return Some(Magnitude { tensor: t, axis: NormAxis::Row });
    }
    let t = m.get("dora_scale")?;
    let ms = t.shape();
    let axis = if ms.first() == Some(&1) && ms.get(1).is_some_and(|&d| d != 1 || shape.get(1) == Some(&1)) {
        NormAxis::Column
    } else {
        NormAxis::Row
    };
    Some(Magnitude { tensor: t, axis })
}

#[cfg(test)]
mod tests {
    use std::path::Path;
    use std::sync::Arc;

    use safetensors::Dtype;
    use serde_json::json;

    use super::super::tensorfile::TensorFile;
    use super::super::write::SafetensorsBuilder;
    use super::{parse, LoraConfig};

    /// The error `parse` gives for a LyCORIS module `x` made of these tensors.
    fn parse_error(tensors: &[(&str, &[usize])]) -> String {
        let mut b = SafetensorsBuilder::new();
        for (role, shape) in tensors {
            b.add(&format!("lycoris_x.{role}"), shape, &vec![0.5; shape.iter().product()], Dtype::F32);
        }
        let file = Arc::new(TensorFile::from_bytes(Path::new("bad.safetensors"), b.to_bytes()).unwrap());
        parse(&file, None, None).err().expect("malformed factors are an error").to_string()
    }

    #[test]
    fn factors_with_too_few_axes_are_errors() {
        let loha_b =
            parse_error(&[("hada_w1_a", &[4, 2]), ("hada_w1_b", &[]), ("hada_w2_a", &[4, 2]), ("hada_w2_b", &[2, 4])]);
        assert!(loha_b.contains("bad.safetensors"), "{loha_b}");
        assert!(loha_b.ends_with("A/B rank mismatch: lycoris_x.hada_w1_a [4, 2] x lycoris_x.hada_w1_b []"), "{loha_b}");
        let loha_tucker = parse_error(&[
            ("hada_w1_a", &[2]),
            ("hada_w1_b", &[2, 4]),
            ("hada_t1", &[2, 2, 3, 3]),
            ("hada_w2_a", &[4, 2]),
            ("hada_w2_b", &[2, 4]),
        ]);
        assert!(loha_tucker.contains("Tucker core [2, 2, 3, 3] does not fit"), "{loha_tucker}");
        let lokr_stray = parse_error(&[("lokr_w1", &[2, 2]), ("lokr_w2", &[4, 4]), ("lokr_w2_b", &[])]);
        assert!(lokr_stray.ends_with("module lycoris_x: lokr_w2_b has shape []"), "{lokr_stray}");
        let lokr_tucker = parse_error(&[
            ("lokr_w1", &[2, 2]),
            ("lokr_w2_a", &[2, 4]),
            ("lokr_w2_b", &[]),
            ("lokr_t2", &[2, 2, 3, 3]),
        ]);
        assert!(lokr_tucker.ends_with("does not fit lokr_w2_a [2, 4] and lokr_w2_b []"), "{lokr_tucker}");
    }

    #[test]
    fn config_fields_of_another_type_read_as_missing() {
        let cfg = LoraConfig::from_json(&json!({
            "r": "8", "use_rslora": 1, "fan_in_fan_out": true,
            "modules_to_save": ["lm_head", 3, "embed_tokens"], "peft_type": "LORA", "target_modules": ["q_proj"]
        }));
        assert_eq!(cfg.r, None);
        assert!(!cfg.use_rslora);
        assert!(cfg.fan_in_fan_out);
        assert_eq!(cfg.modules_to_save, ["lm_head", "embed_tokens"]);
        assert_eq!(cfg.peft_type.as_deref(), Some("LORA"));
        assert!(LoraConfig::from_json(&json!([8, 16])).r.is_none(), "a list is no config");
    }

    #[test]
    fn alpha_stands_in_only_for_an_absent_lora_alpha() {
        assert_eq!(LoraConfig::from_json(&json!({"alpha": 4})).alpha(), Some(4.0));
        assert_eq!(LoraConfig::from_json(&json!({"lora_alpha": 32, "alpha": 4})).alpha(), Some(32.0));
        assert_eq!(LoraConfig::from_json(&json!({"lora_alpha": null, "alpha": 4})).alpha(), None);
    }

    #[test]
    fn patterns_keep_file_order_and_a_key_that_does_not_compile_refuses_the_config() {
        let cfg = LoraConfig::from_json(&json!({
            "r": 8,
            "rank_pattern": {"q_proj": 2, ".*_proj": 1, "k_proj": 2.5}
        }));
        let rank = |m: &str| cfg.rank_for(m).unwrap();
        // File order, not key order: "q_proj" comes before ".*_proj".
        assert_eq!(rank("model.layers.0.self_attn.q_proj"), Some(2));
        assert_eq!(rank("model.layers.0.self_attn.v_proj"), Some(1));
        // A non-integer rank is dropped, so the wider pattern applies.
        assert_eq!(rank("model.layers.0.self_attn.k_proj"), Some(1));
        assert_eq!(rank("model.layers.0.mlp.gate"), Some(8));
        // "up_proj(" is no regular expression: PEFT's re.match would raise, so every lookup
        // fails, naming the field and the key, and the adapter is refused.
        let bad = LoraConfig::from_json(&json!({"r": 8, "alpha_pattern": {"q_proj": 4, "up_proj(": 6}}));
        let why = bad.pattern_problem().expect("a problem");
        assert!(why.starts_with("alpha_pattern key \"up_proj(\" is not a regular expression"), "{why}");
        assert_eq!(bad.alpha_for("model.layers.0.self_attn.q_proj").unwrap_err(), why);
        assert_eq!(bad.rank_for("model.layers.0.self_attn.q_proj").unwrap_err(), why);
    }

    #[test]
    fn every_naming_scheme_of_a_file_claims_its_own_keys() {
        use super::{detect_format, naming_schemes, Format};
        // One scheme claims every key, the unrecognised ones too (reported when grouping).
        let kohya = ["lora_unet_a.lora_down.weight", "lora_unet_a.lora_up.weight", "lora_unet_a.alpha", "notes"];
        assert_eq!(naming_schemes(&kohya), vec![(Format::Kohya, kohya.to_vec())]);
        // A PEFT file with a base model's `lm_head.weight`: not (IA)³ without `on_input`.
        let peft = ["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight", "lm_head.weight"];
        assert_eq!(naming_schemes(&peft), vec![(Format::Peft, peft.to_vec())]);
        // Stray kohya alphas make no scheme of their own.
        let stray = ["base_model.model.q.lora_A.weight", "base_model.model.q.lora_B.weight", "lora_unet_a.alpha"];
        assert_eq!(naming_schemes(&stray).len(), 1);
        let mixed = [
            "base_model.model.q.lora_A.weight",
            "base_model.model.q.lora_B.weight",
            "unet.x.lora_A.weight",
            "lora_te_b.hada_w1_a",
            "lora_te_b.hada_w1_b",
            "lora_te_b.hada_w2_a",
            "lora_te_b.hada_w2_b",
            "text_encoder.y.bias_not_adapter",
        ];
        assert_eq!(
            naming_schemes(&mixed),
            vec![
                (Format::Peft, mixed[..2].to_vec()),
                (Format::Diffusers, vec![mixed[2]]),
                (Format::Lycoris, mixed[3..7].to_vec()),
            ]
        );
        assert_eq!(detect_format(&mixed), Some(Format::Lycoris), "the scheme with the most keys");
        assert_eq!(detect_format(&mixed[1..3]), Some(Format::Peft), "ties go to precedence order");
        assert_eq!(detect_format(&["model.embed_tokens.weight", "x.alpha"]), None);
    }

    #[test]
    fn too_many_pattern_keys_are_refused_before_compiling() {
        let keys: serde_json::Map<String, serde_json::Value> =
            (0..=super::MAX_PATTERN_KEYS).map(|i| (format!("layers\\.{i}\\..*"), json!(4))).collect();
        let cfg = LoraConfig::from_json(&json!({"r": 8, "rank_pattern": keys}));
        let why = cfg.pattern_problem().expect("a problem");
        assert!(why.contains("2049 keys (limit MAX_PATTERN_KEYS = 2048)"), "{why}");
    }
}
