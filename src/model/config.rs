//! The llama-family hyper-parameters, read from a Hugging Face `config.json` (deserialised into
//! a raw struct with transformers' defaults, then resolved, as candle-transformers'
//! `LlamaConfig::into_config` does) or from GGUF metadata (`{arch}.*` keys, as llama.cpp's
//! convert_hf_to_gguf.py writes them).

use std::path::Path;

use candle_core::quantized::gguf_file;
use serde::Deserialize;
use serde_json::Value;

use crate::error::{Error, Result};

/// How rotary frequencies are rescaled for long contexts (`rope_scaling` in config.json).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum RopeScaling {
    /// Positions divided by `factor` (transformers' "linear").
    Linear { factor: f64 },
    /// Llama 3.1's piecewise rescaling of the inverse frequencies.
    Llama3 { factor: f64, low_freq_factor: f64, high_freq_factor: f64, original_max_position_embeddings: f64 },
}

#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LlamaConfig {
    /// `llama`, `mistral`, `qwen2` (SmolLM uses `llama`).
    pub model_type: String,
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub rope_scaling: Option<RopeScaling>,
    pub max_position_embeddings: usize,
    /// Mistral's sliding attention window; windows longer than this are never built.
    pub sliding_window: Option<usize>,
    pub tie_word_embeddings: bool,
    /// Qwen2 has biases on q/k/v.
    pub attention_bias: bool,
    pub bos_token_id: Option<u32>,
    pub eos_token_id: Option<u32>,
}

const SUPPORTED: &[&str] = &["llama", "mistral", "qwen2"];

// Limits on sizes read from config.json or GGUF metadata (docs/security.md). Each is several
// times the largest published llama-family model's value (Llama 3.1 405B: 126 layers, width
// 16384, 128 heads, head_dim 128, vocabulary 128256, context 131072; Qwen2.5-1M: 1,010,000).
/// Most transformer layers.
pub(crate) const MAX_LAYERS: usize = 1024;
/// Widest hidden size (the MLP may be 4× this).
pub(crate) const MAX_WIDTH: usize = 65_536;
/// Most attention (and key/value) heads.
pub(crate) const MAX_HEADS: usize = 1024;
/// Largest head dimension.
pub(crate) const MAX_HEAD_DIM: usize = 1024;
/// Largest vocabulary.
pub(crate) const MAX_VOCAB: usize = 1 << 22;
/// Longest trained context (positions).
pub(crate) const MAX_POSITIONS: usize = 1 << 21;

/// The part of config.json that says which family a model is, read before anything else so
/// that a model of another family is named as such rather than reported as missing fields.
#[derive(Debug, Deserialize)]
struct Family {
    #[serde(default)]
    model_type: String,
    /// Only quoted back in the error for an unsupported model.
    #[serde(default)]
    architectures: Option<Value>,
}

/// config.json as transformers writes it for the llama family (`LlamaConfig`, `MistralConfig`,
/// `Qwen2Config`; SmolLM is `llama`). Missing optional fields take transformers' defaults;
/// fields transformers writes as `null` when unset are `Option`s. Everything else in the file is
/// ignored.
#[derive(Debug, Deserialize)]
struct HfConfig {
    model_type: String,
    vocab_size: usize,
    hidden_size: usize,
    intermediate_size: usize,
    num_hidden_layers: usize,
    num_attention_heads: usize,
    /// `null` or absent: one key/value head per query head.
    num_key_value_heads: Option<usize>,
    /// `null` or absent: hidden_size / num_attention_heads.
    head_dim: Option<usize>,
    #[serde(default = "default_rms_norm_eps")]
    rms_norm_eps: f64,
    /// Absent from files written by transformers ≥ 5, which keep it in `rope_parameters`.
    rope_theta: Option<f64>,
    rope_scaling: Option<RopeScalingJson>,
    /// transformers ≥ 5: `rope_theta` and the scaling together, `rope_type: "default"` for none.
    rope_parameters: Option<RopeParametersJson>,
    #[serde(default = "default_max_position_embeddings")]
    max_position_embeddings: usize,
    /// Mistral's window; Qwen2 writes one too (with `use_sliding_window: false`), which the
    /// runtime honours all the same by capping its context.
    sliding_window: Option<usize>,
    #[serde(default)]
    tie_word_embeddings: bool,
    #[serde(default)]
    attention_bias: bool,
    bos_token_id: Option<TokenIds>,
    eos_token_id: Option<TokenIds>,
}

fn default_rms_norm_eps() -> f64 {
    1e-6
}

fn default_rope_theta() -> f64 {
    10_000.0
}

fn default_max_position_embeddings() -> usize {
    2048
}

/// `rope_parameters` as transformers ≥ 5 writes it: the base frequency beside the fields of
/// `rope_scaling`.
#[derive(Debug, Deserialize)]
struct RopeParametersJson {
    rope_theta: Option<f64>,
    #[serde(flatten)]
    scaling: RopeScalingJson,
}

impl HfConfig {
    /// The rotary base: `rope_theta`, else `rope_parameters.rope_theta`, else llama's 10000.
    fn rope_theta(&self) -> f64 {
        let nested = self.rope_parameters.as_ref().and_then(|p| p.rope_theta);
        self.rope_theta.or(nested).unwrap_or_else(default_rope_theta)
    }

    /// The rotary scaling: `rope_scaling`, else a `rope_parameters` whose type is not "default".
    fn rope_scaling(scaling: Option<RopeScalingJson>, params: Option<RopeParametersJson>) -> Option<RopeScalingJson> {
        scaling.or_else(|| {
            let s = params?.scaling;
            (s.kind().unwrap_or("default") != "default").then_some(s)
        })
    }
}

/// `rope_scaling` as written: transformers ≥ 4.43 names the kind `rope_type`, older files
/// `type`, and files saved by a recent transformers from an old config carry both.
#[derive(Debug, Deserialize)]
struct RopeScalingJson {
    rope_type: Option<String>,
    #[serde(rename = "type")]
    legacy_type: Option<String>,
    factor: Option<f64>,
    low_freq_factor: Option<f64>,
    high_freq_factor: Option<f64>,
    original_max_position_embeddings: Option<f64>,
}

impl RopeScalingJson {
    /// The kind under either of its names.
    fn kind(&self) -> Option<&str> {
        self.rope_type.as_deref().or(self.legacy_type.as_deref())
    }

    fn resolve(self) -> std::result::Result<RopeScaling, String> {
        let factor = self.factor.ok_or("rope_scaling has no factor")?;
        match self.kind().unwrap_or_default() {
            "linear" => Ok(RopeScaling::Linear { factor }),
            "llama3" => Ok(RopeScaling::Llama3 {
                factor,
                low_freq_factor: self.low_freq_factor.ok_or("llama3 rope_scaling has no low_freq_factor")?,
                high_freq_factor: self.high_freq_factor.ok_or("llama3 rope_scaling has no high_freq_factor")?,
                original_max_position_embeddings: self
                    .original_max_position_embeddings
                    .ok_or("llama3 rope_scaling has no original_max_position_embeddings")?,
            }),
            other => Err(format!("rope_scaling type {other:?} is not supported (linear and llama3 are)")),
        }
    }
}

/// A special-token id: one number, or a list of which the first is used (Llama 3 lists
/// several end-of-sequence ids).
#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum TokenIds {
    One(u32),
    Many(Vec<u32>),
}

impl TokenIds {
    fn first(&self) -> Option<u32> {
        match self {
            TokenIds::One(id) => Some(*id),
            TokenIds::Many(ids) => ids.first().copied(),
        }
    }
}

impl LlamaConfig {
    /// Bytes of keys and values one position of one sequence holds in a KV cache (f32).
    pub(crate) fn kv_bytes_per_position(&self) -> usize {
        2 * self.num_hidden_layers * self.num_key_value_heads * self.head_dim * 4
    }

    /// Bytes of activations one position holds in a teacher-forced pass at the widest point of
    /// a layer (the feed-forward block's gate, up and their product; the residual stream, its
    /// norm, queries, keys, values and the attention output), f32.
    pub(crate) fn activation_bytes_per_position(&self) -> usize {
        4 * (3 * self.intermediate_size + 6 * self.hidden_size)
    }

    /// The longest context the runtime uses: the trained context, capped by a sliding window.
    pub(crate) fn context(&self) -> usize {
        match self.sliding_window {
            Some(w) if w > 0 => w.min(self.max_position_embeddings),
            _ => self.max_position_embeddings,
        }
    }

    /// From a parsed config.json (`path` names it in errors).
    pub(crate) fn from_hf_json(path: &Path, v: &Value) -> Result<Self> {
        let err = |m: String| Error::input(path, m);
        let family = Family::deserialize(v).map_err(|e| err(format!("config.json: {e}")))?;
        if !SUPPORTED.contains(&family.model_type.as_str()) {
            let arch = family.architectures.map(|a| a.to_string()).unwrap_or_default();
            return Err(err(format!(
                "model_type {:?} {arch} is not a supported text model (supported: llama, mistral, qwen2, SmolLM)",
                family.model_type
            )));
        }
        let c = HfConfig::deserialize(v).map_err(|e| err(format!("config.json: {e}")))?;
        for (k, x) in [
            ("vocab_size", c.vocab_size),
            ("hidden_size", c.hidden_size),
            ("intermediate_size", c.intermediate_size),
            ("num_hidden_layers", c.num_hidden_layers),
            ("num_attention_heads", c.num_attention_heads),
        ] {
            if x == 0 {
                return Err(err(format!("config.json has no positive {k}")));
            }
        }
        let rope_theta = c.rope_theta();
        let rope_scaling = HfConfig::rope_scaling(c.rope_scaling, c.rope_parameters);
        let cfg = LlamaConfig {
            vocab_size: c.vocab_size,
            hidden_size: c.hidden_size,
            intermediate_size: c.intermediate_size,
            num_hidden_layers: c.num_hidden_layers,
            num_attention_heads: c.num_attention_heads,
            num_key_value_heads: c.num_key_value_heads.unwrap_or(c.num_attention_heads),
            head_dim: c.head_dim.unwrap_or(c.hidden_size / c.num_attention_heads),
            rms_norm_eps: c.rms_norm_eps,
            rope_theta,
            rope_scaling: rope_scaling.map(RopeScalingJson::resolve).transpose().map_err(err)?,
            max_position_embeddings: c.max_position_embeddings,
            sliding_window: c.sliding_window,
            tie_word_embeddings: c.tie_word_embeddings,
            // Qwen2 has q/k/v biases without saying so.
            attention_bias: c.model_type == "qwen2" || c.attention_bias,
            bos_token_id: c.bos_token_id.as_ref().and_then(TokenIds::first),
            eos_token_id: c.eos_token_id.as_ref().and_then(TokenIds::first),
            model_type: c.model_type,
        };
        cfg.check().map_err(err)?;
        Ok(cfg)
    }

    /// From GGUF metadata. `tie_word_embeddings` is decided by the caller from whether an
    /// `output.weight` tensor exists.
    pub(crate) fn from_gguf(path: &Path, c: &gguf_file::Content, has_output: bool) -> Result<Self> {
        let err = |m: String| Error::input(path, m);
        let md = &c.metadata;
        let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if !SUPPORTED.contains(&arch.as_str()) {
            return Err(err(format!(
                "GGUF architecture {arch:?} is not a supported text model (llama, mistral, qwen2)"
            )));
        }
        let num = |k: &str| {
            md.get(&format!("{arch}.{k}")).and_then(|v| {
                v.to_u32()
                    .map(|x| x as f64)
                    .or_else(|_| v.to_u64().map(|x| x as f64))
                    .or_else(|_| v.to_f32().map(f64::from))
                    .or_else(|_| v.to_i32().map(f64::from))
                    .ok()
            })
        };
        let need = |k: &str| {
            num(k)
                .filter(|&x| x >= 1.0)
                .map(|x| x as usize)
                .ok_or_else(|| err(format!("GGUF metadata has no {arch}.{k}")))
        };
        let hidden_size = need("embedding_length")?;
        let num_attention_heads = need("attention.head_count")?;
        let vocab_size = match c.tensor_infos.get("token_embd.weight") {
            Some(t) => t.shape.dims()[0],
            None => return Err(err("GGUF has no token_embd.weight tensor".into())),
        };
        let token = |k: &str| md.get(k).and_then(|v| v.to_u32().ok());
        let head_dim = num("attention.key_length").map(|x| x as usize).unwrap_or(hidden_size / num_attention_heads);
        let cfg = LlamaConfig {
            model_type: arch.clone(),
            vocab_size,
            hidden_size,
            intermediate_size: need("feed_forward_length")?,
            num_hidden_layers: need("block_count")?,
            num_attention_heads,
            num_key_value_heads: num("attention.head_count_kv").map(|x| x as usize).unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: num("attention.layer_norm_rms_epsilon").unwrap_or(1e-5),
            rope_theta: num("rope.freq_base").unwrap_or(10_000.0),
            rope_scaling: match (
                md.get(&format!("{arch}.rope.scaling.type")).and_then(|v| v.to_string().ok()),
                num("rope.scaling.factor"),
            ) {
                (Some(t), Some(f)) if t == "linear" => Some(RopeScaling::Linear { factor: f }),
                (Some(t), _) if t != "none" => return Err(err(format!("GGUF rope scaling {t:?} is not supported"))),
                _ => None,
            },
            max_position_embeddings: num("context_length").map(|x| x as usize).unwrap_or(2048),
            sliding_window: None,
            tie_word_embeddings: !has_output,
            attention_bias: c.tensor_infos.contains_key("blk.0.attn_q.bias"),
            bos_token_id: token("tokenizer.ggml.bos_token_id"),
            eos_token_id: token("tokenizer.ggml.eos_token_id"),
        };
        cfg.check().map_err(err)?;
        Ok(cfg)
    }

    fn check(&self) -> std::result::Result<(), String> {
        // Sizes come from a file: bounded before anything is allocated from them.
        for (k, v, max) in [
            ("num_hidden_layers", self.num_hidden_layers, MAX_LAYERS),
            ("hidden_size", self.hidden_size, MAX_WIDTH),
            ("intermediate_size", self.intermediate_size, MAX_WIDTH * 4),
            ("num_attention_heads", self.num_attention_heads, MAX_HEADS),
            ("num_key_value_heads", self.num_key_value_heads, MAX_HEADS),
            ("head_dim", self.head_dim, MAX_HEAD_DIM),
            ("vocab_size", self.vocab_size, MAX_VOCAB),
            ("max_position_embeddings", self.max_position_embeddings, MAX_POSITIONS),
        ] {
            if v > max {
                return Err(format!("{k} = {v} is above lorascope's limit of {max}"));
            }
        }
        if !(self.rms_norm_eps.is_finite() && self.rms_norm_eps > 0.0) {
            return Err(format!("rms_norm_eps {} is not a positive finite number", self.rms_norm_eps));
        }
        match &self.rope_scaling {
            Some(RopeScaling::Linear { factor }) if !(factor.is_finite() && *factor > 0.0) => {
                return Err(format!("rope_scaling factor {factor} is not a positive finite number"));
            }
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                let all = [*factor, *low_freq_factor, *high_freq_factor, *original_max_position_embeddings];
                // The llama3 rule divides by (high − low) and by the factor.
                if !all.iter().all(|x| x.is_finite() && *x > 0.0) || high_freq_factor <= low_freq_factor {
                    return Err(format!(
                        "llama3 rope_scaling needs positive finite values and high_freq_factor > low_freq_factor \
                         (factor {factor}, low {low_freq_factor}, high {high_freq_factor}, original context \
                         {original_max_position_embeddings})"
                    ));
                }
            }
            _ => {}
        }
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "{} attention heads cannot be shared by {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!("head dimension {} is not a positive even number", self.head_dim));
        }
        if !(self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err(format!("rope_theta {} is not a positive finite number", self.rope_theta));
        }
        Ok(())
    }

    /// Rotary inverse frequencies, one per pair of head dimensions.
    pub(crate) fn inv_freq(&self) -> Vec<f64> {
        let d = self.head_dim;
        let base: Vec<f64> = (0..d / 2).map(|i| 1.0 / self.rope_theta.powf(2.0 * i as f64 / d as f64)).collect();
        match &self.rope_scaling {
            None => base,
            Some(RopeScaling::Linear { factor }) => base.into_iter().map(|f| f / factor).collect(),
            Some(RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            }) => {
                // transformers' _compute_llama3_parameters.
                let low_wavelen = original_max_position_embeddings / low_freq_factor;
                let high_wavelen = original_max_position_embeddings / high_freq_factor;
                base.into_iter()
                    .map(|f| {
                        let wavelen = 2.0 * std::f64::consts::PI / f;
                        if wavelen < high_wavelen {
                            f
                        } else if wavelen > low_wavelen {
                            f / factor
                        } else {
                            let smooth = (original_max_position_embeddings / wavelen - low_freq_factor)
                                / (high_freq_factor - low_freq_factor);
                            (1.0 - smooth) * f / factor + smooth * f
                        }
                    })
                    .collect()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<LlamaConfig> {
        LlamaConfig::from_hf_json(Path::new("config.json"), &v)
    }

    fn llama(extra: Value) -> Value {
        let mut v = serde_json::json!({
            "model_type": "llama", "vocab_size": 100, "hidden_size": 64, "intermediate_size": 128,
            "num_hidden_layers": 2, "num_attention_heads": 4,
        });
        v.as_object_mut().unwrap().extend(extra.as_object().unwrap().clone());
        v
    }

    #[test]
    fn transformers_defaults_fill_what_is_missing_or_null() {
        let c = parse(llama(serde_json::json!({"num_key_value_heads": null, "sliding_window": null}))).unwrap();
        assert_eq!((c.num_key_value_heads, c.head_dim, c.max_position_embeddings), (4, 16, 2048));
        assert_eq!((c.rms_norm_eps, c.rope_theta, c.sliding_window), (1e-6, 10_000.0, None));
        assert!(!c.tie_word_embeddings && !c.attention_bias && c.rope_scaling.is_none());
    }

    #[test]
    fn transformers_5_keeps_the_rotary_base_in_rope_parameters() {
        // As transformers 5.25 saves SmolLM2: no top-level rope_theta; reading llama's default
        // 10000 instead of 100000 moved the bits of the demo texts by up to 3.5%.
        let v = serde_json::json!({"rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"}});
        let c = parse(llama(v)).unwrap();
        assert_eq!((c.rope_theta, c.rope_scaling.clone()), (100_000.0, None));
        // Llama 3.1 under transformers 5: base and llama3 scaling in one object.
        let v = serde_json::json!({"rope_parameters": {"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}});
        let c = parse(llama(v)).unwrap();
        assert_eq!(c.rope_theta, 500_000.0);
        assert!(matches!(c.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 8.0));
        // A top-level value, where both are written, is the one transformers 4 reads.
        let v = serde_json::json!({"rope_theta": 20000.0, "rope_parameters": {"rope_theta": 30000.0}});
        assert_eq!(parse(llama(v)).unwrap().rope_theta, 20_000.0);
    }

    #[test]
    fn family_specifics() {
        // Qwen2: q/k/v biases implied; its sliding_window caps the context.
        let q = parse(llama(serde_json::json!({"model_type": "qwen2", "sliding_window": 512}))).unwrap();
        assert!(q.attention_bias);
        assert_eq!(q.context(), 512);
        // Llama 3: a list of end-of-sequence ids, integer rope_theta, llama3 rope scaling saved
        // with both the new and the old name of its kind.
        let scaling = serde_json::json!({"factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192, "rope_type": "llama3", "type": "llama3"});
        let l = parse(llama(serde_json::json!({"eos_token_id": [7, 8], "bos_token_id": 6, "rope_theta": 500000,
            "rope_scaling": scaling})))
        .unwrap();
        assert_eq!((l.bos_token_id, l.eos_token_id, l.rope_theta), (Some(6), Some(7), 500_000.0));
        assert!(matches!(l.rope_scaling, Some(RopeScaling::Llama3 { factor, .. }) if factor == 32.0));
        let lin = parse(llama(serde_json::json!({"rope_scaling": {"type": "linear", "factor": 2.0}}))).unwrap();
        assert_eq!(lin.rope_scaling, Some(RopeScaling::Linear { factor: 2.0 }));
    }

    #[test]
    fn bad_configs_are_input_errors_naming_the_problem() {
        let msg = |v: Value| parse(v).unwrap_err().to_string();
        let gpt2 = serde_json::json!({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "n_embd": 768});
        assert!(msg(gpt2).contains("\"gpt2\" [\"GPT2LMHeadModel\"] is not a supported text model"));
        let mut no_hidden = llama(serde_json::json!({}));
        no_hidden.as_object_mut().unwrap().remove("hidden_size");
        assert!(msg(no_hidden).contains("missing field `hidden_size`"));
        assert!(msg(llama(serde_json::json!({"vocab_size": 0}))).contains("no positive vocab_size"));
        let yarn = serde_json::json!({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}});
        assert!(msg(llama(yarn)).contains("\"yarn\" is not supported"));
        assert!(msg(llama(serde_json::json!({"num_key_value_heads": 3}))).contains("cannot be shared"));
        assert!(parse(llama(serde_json::json!({}))).is_ok_and(|c| c.model_type == "llama"));
        assert!(parse(llama(serde_json::json!({"hidden_size": 0}))).unwrap_err().is_input());
    }
}
