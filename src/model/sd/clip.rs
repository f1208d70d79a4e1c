//! The CLIP text encoder as transformers' `CLIPTextModel` (modeling_clip.py): token plus
//! position embeddings, pre-norm transformer layers with causal self-attention and a
//! quick-GELU (OpenAI CLIP, SD 1.x) or GELU (OpenCLIP, SD 2.x) MLP, the final LayerNorm; the
//! output is `last_hidden_state`, which SD pipelines pass to the UNet. SD 2.x's OpenCLIP
//! weights are read under these names too (the caller maps them, penultimate layer last).

use candle_core::{Device, Module, Tensor};
use candle_nn::{Embedding, LayerNorm, VarBuilder};

use super::config::{Act, ClipConfig};
use super::nn::{self, Linear};
use crate::model::CResult;

#[derive(Debug)]
struct Layer {
    ln1: LayerNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
    ln2: LayerNorm,
    fc1: Linear,
    fc2: Linear,
}

#[derive(Debug)]
pub(crate) struct ClipText {
    pub cfg: ClipConfig,
    tokens: Embedding,
    positions: Tensor,
    layers: Vec<Layer>,
    final_norm: LayerNorm,
}

impl ClipText {
    /// `vb` at the text model (`text_model.`).
    pub fn load(vb: VarBuilder, cfg: &ClipConfig) -> CResult<Self> {
        let d = cfg.hidden;
        let e = vb.pp("embeddings");
        let tokens = Embedding::new(e.get((cfg.vocab_size, d), "token_embedding.weight")?, d);
        let positions = e.get((cfg.positions, d), "position_embedding.weight")?;
        let layers = (0..cfg.layers)
            .map(|i| {
                let l = vb.pp("encoder.layers").pp(i);
                let a = l.pp("self_attn");
                Ok(Layer {
                    ln1: nn::layer_norm(l.pp("layer_norm1"), d, cfg.eps)?,
                    q: nn::linear(a.pp("q_proj"), d, d, true)?,
                    k: nn::linear(a.pp("k_proj"), d, d, true)?,
                    v: nn::linear(a.pp("v_proj"), d, d, true)?,
                    out: nn::linear(a.pp("out_proj"), d, d, true)?,
                    ln2: nn::layer_norm(l.pp("layer_norm2"), d, cfg.eps)?,
                    fc1: nn::linear(l.pp("mlp.fc1"), d, cfg.intermediate, true)?,
                    fc2: nn::linear(l.pp("mlp.fc2"), cfg.intermediate, d, true)?,
                })
            })
            .collect::<CResult<_>>()?;
        Ok(ClipText {
            cfg: cfg.clone(),
            tokens,
            positions,
            layers,
            final_norm: nn::layer_norm(vb.pp("final_layer_norm"), d, cfg.eps)?,
        })
    }

    /// The causal mask: 0 on and below the diagonal, −∞ above.
    fn causal(n: usize, dev: &Device) -> CResult<Tensor> {
        let v: Vec<f32> = (0..n * n).map(|i| if i % n > i / n { f32::NEG_INFINITY } else { 0.0 }).collect();
        Tensor::from_vec(v, (n, n), dev)
    }

    /// `last_hidden_state` `[B, L, D]` of token ids `[B, L]` (u32).
    pub fn forward(&self, ids: &Tensor) -> CResult<Tensor> {
        let (_, n) = ids.dims2()?;
        if n > self.cfg.positions {
            candle_core::bail!("{n} tokens, the text encoder has {} positions", self.cfg.positions);
        }
        let mut x = self.tokens.forward(ids)?.broadcast_add(&self.positions.narrow(0, 0, n)?)?;
        let mask = Self::causal(n, ids.device())?;
        for l in &self.layers {
            let h = l.ln1.forward(&x)?;
            let a =
                nn::attention(&l.q.forward(&h)?, &l.k.forward(&h)?, &l.v.forward(&h)?, self.cfg.heads, Some(&mask))?;
            x = nn::add(&l.out.forward(&a)?, &x)?;
            let h = l.fc1.forward(&l.ln2.forward(&x)?)?;
            let h = match self.cfg.act {
                Act::QuickGelu => nn::quick_gelu(&h)?,
                Act::Gelu => nn::gelu(&h)?,
            };
            x = nn::add(&l.fc2.forward(&h)?, &x)?;
        }
        self.final_norm.forward(&x)
    }
}
