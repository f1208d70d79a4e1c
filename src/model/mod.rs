//! The model runtimes: a llama-family model built from a base (Hugging Face directory or GGUF)
//! on a device the caller chooses, its matrices kept as the file stores them (weight.rs), the
//! adapter run unmerged beside them (or merged into f32 copies of the matrices it touches, the
//! reference), teacher-forced token statistics and greedy generation; and Stable Diffusion 1.x/2.x
//! (`sd`: text encoder, UNet, VAE, schedule, DDIM) for image adapters.

pub(crate) mod config;
mod gemv;
pub(crate) mod llama;
mod merge;
mod run;
pub mod sd;
pub(crate) mod tokenizer;
pub mod train;
mod weight;
mod weights;

use candle_core::{Device, Tensor};

pub use config::LlamaConfig;
pub use llama::{Adaptation, Cache, Linear, Llama, LoraPair};
pub use merge::{apply_adapter, merge_adapter, MergeSummary};
pub use run::{
    continue_and_score, greedy, rows_per_batch, score, time_passes, Continuation, RunOptions, TokenStats,
    ACTIVATION_BUDGET, KV_BUDGET,
};
pub use sd::{
    check_sd_base, is_sd_base, NoiseSchedule, Prediction, SdFamily, SdInfo, SdLayout, SdModel, SdOptions, SdParams,
    TimestepSpacing,
};
pub use tokenizer::{TemplatePrefix, TextTokenizer};
pub use weight::Weight;
pub use weights::{Precision, AUTO_F32_BYTES};

use crate::error::{Error, Result};
use crate::load::{BaseKind, BaseModel};

pub(crate) type CResult<T> = candle_core::Result<T>;

/// A candle failure while running a valid model: an internal error (exit code 3), the candle
/// error kept as its source.
pub(crate) fn cerr(e: candle_core::Error) -> Error {
    Error::Runtime { what: "model runtime".into(), source: Box::new(e) }
}

/// Run `f` on the values of a contiguous f32 CPU tensor in place (no copy out of candle).
pub(crate) fn with_f32<R>(t: &Tensor, f: impl FnOnce(&[f32]) -> R) -> CResult<R> {
    let (storage, layout) = t.storage_and_layout();
    let candle_core::Storage::Cpu(cpu) = &*storage else { candle_core::bail!("the tensor is not in CPU memory") };
    let Some((from, to)) = layout.contiguous_offsets() else { candle_core::bail!("tensor is not contiguous") };
    Ok(f(&cpu.as_slice::<f32>()?[from..to]))
}

crate::named::closed_set! {
    /// Whether the probe puts the model's beginning-of-sequence token in front of each text:
    /// as the model's tokenizer does (`auto`, what transformers and llama.cpp do), always, or
    /// never (`--bos`).
    pub enum BosRule ("--bos value") {
        Auto = "auto",
        Always = "always",
        Never = "never",
    }
}

// Written out: `closed_set!` generates the enum, so `#[derive(Default)]` cannot be added there.
#[allow(clippy::derivable_impls)]
impl Default for BosRule {
    fn default() -> Self {
        BosRule::Auto
    }
}

/// The tokens in front of every text the probe scores or prompts with, and why. With none, a
/// text's first token has no context and is not scored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContextTokens {
    pub ids: Vec<u32>,
    pub rule: BosRule,
    pub source: String,
}

/// A base model ready to run: its weights and its tokenizer.
#[derive(Debug)]
pub struct TextModel {
    pub llama: Llama,
    pub tokenizer: TextTokenizer,
    /// How the runtime holds the matrices ([`Precision::Auto`] resolved).
    pub precision: Precision,
    /// How many of those matrices the file stores in each type (`q4_1`, `bf16`, …).
    pub stored_weights: std::collections::BTreeMap<String, usize>,
}

impl TextModel {
    /// Build the runnable model of `base` on `device`: a Hugging Face directory (config.json,
    /// tokenizer.json) or a GGUF file (hyper-parameters and tokenizer from its metadata), its
    /// matrices as the file stores them, or in f32 for a small base ([`Precision::Auto`]).
    pub fn load(base: &BaseModel, device: &Device) -> Result<Self> {
        Self::load_as(base, device, Precision::Auto)
    }

    /// [`TextModel::load`] with the matrices held as `precision` says.
    pub fn load_as(base: &BaseModel, device: &Device, precision: Precision) -> Result<Self> {
        let (cfg, tokenizer) = match base.kind {
            BaseKind::HfDirectory => {
                let cfg_path = base.path.join("config.json");
                let json = base.config.as_ref().ok_or_else(|| {
                    Error::input(&base.path, "a text-model base directory needs config.json to run the model")
                })?;
                let Some((tok, bytes)) = base.tokenizer_json() else {
                    return Err(Error::input(&base.path, "a text-model base directory needs tokenizer.json"));
                };
                (LlamaConfig::from_hf_json(&cfg_path, json)?, TextTokenizer::from_json_bytes(tok, bytes)?)
            }
            BaseKind::Gguf => {
                let c = base.gguf().expect("GGUF base has its header");
                let cfg = LlamaConfig::from_gguf(&base.path, c, c.tensor_infos.contains_key("output.weight"))?;
                (cfg, TextTokenizer::from_gguf(&base.path, c)?)
            }
            _ => {
                return Err(Error::input(
                    &base.path,
                    "running the model needs a Hugging Face model directory (config.json, tokenizer.json, \
                     safetensors) or a GGUF file; a bare weights file has neither configuration nor tokenizer",
                ))
            }
        };
        let precision = precision.resolve(base);
        let (llama, stored_weights) = weights::load_base(base, &cfg, device, precision)?;
        Ok(TextModel { llama, tokenizer, precision, stored_weights })
    }

    /// The tokens to put in front of every text under `rule`.
    pub fn context_tokens(&self, rule: BosRule) -> Result<ContextTokens> {
        let (ids, source) = match rule {
            BosRule::Auto => (self.tokenizer.template.ids.clone(), self.tokenizer.template.source.to_string()),
            BosRule::Always => {
                let Some(bos) = self.llama.cfg.bos_token_id else {
                    return Err(Error::Usage("--bos always: the model names no BOS token (bos_token_id)".into()));
                };
                (vec![bos], "--bos always".to_string())
            }
            BosRule::Never => (vec![], "--bos never".to_string()),
        };
        Ok(ContextTokens { ids, rule, source })
    }

    /// Token ids of a text with the model's beginning-of-sequence token (when it has one) in
    /// front, so the first token of the text is predicted from a context too.
    pub fn encode_with_bos(&self, text: &str) -> Result<Vec<u32>> {
        let mut ids: Vec<u32> = self.llama.cfg.bos_token_id.into_iter().collect();
        ids.extend(self.tokenizer.encode(text)?);
        Ok(ids)
    }
}

/// Whether `path` looks like something [`TextModel::load`] can run (for callers that decide
/// between text and image probes).
pub(crate) fn is_text_base(base: &BaseModel) -> bool {
    match base.kind {
        BaseKind::HfDirectory => base.tokenizer_json().is_some() && base.config.is_some(),
        BaseKind::Gguf => true,
        _ => false,
    }
}
