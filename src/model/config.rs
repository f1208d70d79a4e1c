//! The llama-family hyper-parameters, read from a Hugging Face `config.json` or from GGUF
//! metadata (`{arch}.*` keys, as llama.cpp writes them).

use std::path::Path;

use candle_core::quantized::gguf_file;
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

impl LlamaConfig {
    /// The longest context the runtime uses: the trained context, capped by a sliding window.
    pub fn context(&self) -> usize {
        match self.sliding_window {
            Some(w) if w > 0 => w.min(self.max_position_embeddings),
            _ => self.max_position_embeddings,
        }
    }

    pub fn from_hf_json(path: &Path, v: &Value) -> Result<Self> {
        let err = |m: String| Error::input(path, m);
        let model_type = v.get("model_type").and_then(Value::as_str).unwrap_or("").to_string();
        if !SUPPORTED.contains(&model_type.as_str()) {
            let arch = v.get("architectures").map(|a| a.to_string()).unwrap_or_default();
            return Err(err(format!(
                "model_type {model_type:?} {arch} is not a supported text model (supported: llama, mistral, qwen2, SmolLM)"
            )));
        }
        let get = |k: &str| v.get(k).and_then(Value::as_u64).map(|x| x as usize);
        let need = |k: &str| get(k).filter(|&x| x > 0).ok_or_else(|| err(format!("config.json has no positive {k}")));
        let hidden_size = need("hidden_size")?;
        let num_attention_heads = need("num_attention_heads")?;
        let head_dim = get("head_dim").unwrap_or(hidden_size / num_attention_heads);
        let id = |k: &str| match v.get(k) {
            Some(Value::Number(n)) => n.as_u64().map(|x| x as u32),
            Some(Value::Array(a)) => a.first().and_then(Value::as_u64).map(|x| x as u32),
            _ => None,
        };
        let cfg = LlamaConfig {
            vocab_size: need("vocab_size")?,
            hidden_size,
            intermediate_size: need("intermediate_size")?,
            num_hidden_layers: need("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads: get("num_key_value_heads").unwrap_or(num_attention_heads),
            head_dim,
            rms_norm_eps: v.get("rms_norm_eps").and_then(Value::as_f64).unwrap_or(1e-6),
            rope_theta: v.get("rope_theta").and_then(Value::as_f64).unwrap_or(10_000.0),
            rope_scaling: rope_scaling(v.get("rope_scaling")).map_err(err)?,
            max_position_embeddings: get("max_position_embeddings").unwrap_or(2048),
            sliding_window: get("sliding_window"),
            tie_word_embeddings: v.get("tie_word_embeddings").and_then(Value::as_bool).unwrap_or(false),
            attention_bias: model_type == "qwen2" || v.get("attention_bias").and_then(Value::as_bool).unwrap_or(false),
            bos_token_id: id("bos_token_id"),
            eos_token_id: id("eos_token_id"),
            model_type,
        };
        cfg.check().map_err(err)?;
        Ok(cfg)
    }

    /// From GGUF metadata. `tie_word_embeddings` is decided by the caller from whether an
    /// `output.weight` tensor exists.
    pub fn from_gguf(path: &Path, c: &gguf_file::Content, has_output: bool) -> Result<Self> {
        let err = |m: String| Error::input(path, m);
        let md = &c.metadata;
        let arch = md.get("general.architecture").and_then(|v| v.to_string().ok()).cloned().unwrap_or_default();
        if !["llama", "mistral", "qwen2"].contains(&arch.as_str()) {
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
        if self.num_key_value_heads == 0 || !self.num_attention_heads.is_multiple_of(self.num_key_value_heads) {
            return Err(format!(
                "{} attention heads cannot be shared by {} key/value heads",
                self.num_attention_heads, self.num_key_value_heads
            ));
        }
        if self.head_dim == 0 || !self.head_dim.is_multiple_of(2) {
            return Err(format!("head dimension {} is not a positive even number", self.head_dim));
        }
        if !(self.rms_norm_eps.is_finite() && self.rope_theta.is_finite() && self.rope_theta > 0.0) {
            return Err("rms_norm_eps or rope_theta is not a positive finite number".into());
        }
        Ok(())
    }

    /// Rotary inverse frequencies, one per pair of head dimensions.
    pub fn inv_freq(&self) -> Vec<f64> {
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

fn rope_scaling(v: Option<&Value>) -> std::result::Result<Option<RopeScaling>, String> {
    let Some(v) = v.filter(|v| !v.is_null()) else { return Ok(None) };
    let kind = v.get("rope_type").or_else(|| v.get("type")).and_then(Value::as_str).unwrap_or("");
    let f = |k: &str| v.get(k).and_then(Value::as_f64);
    let factor = f("factor").ok_or("rope_scaling has no factor")?;
    match kind {
        "linear" => Ok(Some(RopeScaling::Linear { factor })),
        "llama3" => Ok(Some(RopeScaling::Llama3 {
            factor,
            low_freq_factor: f("low_freq_factor").ok_or("llama3 rope_scaling has no low_freq_factor")?,
            high_freq_factor: f("high_freq_factor").ok_or("llama3 rope_scaling has no high_freq_factor")?,
            original_max_position_embeddings: f("original_max_position_embeddings")
                .ok_or("llama3 rope_scaling has no original_max_position_embeddings")?,
        })),
        other => Err(format!("rope_scaling type {other:?} is not supported (linear and llama3 are)")),
    }
}
