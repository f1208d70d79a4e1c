//! A llama-family decoder (Llama, Mistral, Qwen2, SmolLM) on candle tensors, laid out as
//! candle-transformers' models/llama.rs: components (`Linear`, `RmsNorm`, `Attention`, `Mlp`,
//! `DecoderLayer`, `Llama`) built by `load(vb, cfg)` from a candle-nn `VarBuilder` under the
//! Hugging Face names (`model.layers.N.self_attn.q_proj.weight`…), each with a `forward`.
//!
//! Where it departs from candle-transformers' llama, and why: that model returns the logits of
//! the last position only and has no place for an unmerged LoRA; the probe needs every
//! position's hidden state and the trainer needs LoRA factors in the graph. Projections take
//! the few-row product of gemv.rs (greedy decoding reads each weight once per token).
//! Grouped-query attention stacks the query heads that share a key/value head instead of
//! repeating keys and values. `exact_grad` switches to the differentiable versions of RMSNorm,
//! RoPE and softmax: candle-nn's fused kernels have no backward pass, so gradients would
//! silently stop there. Greedy decoding keeps keys and values in candle-nn's `KvCache`.

use candle_core::{Device, Result, Tensor, D};
use candle_nn::kv_cache::KvCache;
use candle_nn::{ops, rotary_emb, Embedding, Module, VarBuilder};

use super::config::LlamaConfig;
use super::gemv;

/// A layer's projections by their Hugging Face module names, as LoRA adapters target them.
pub const PROJECTIONS: &[&str] = &[
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// A LoRA pair applied beside a frozen weight: y += scale·(x·Aᵀ)·Bᵀ.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
}

/// `y = x·Wᵀ + b` (candle-nn's `Linear`) with the few-row product and room for an unmerged LoRA.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`
    weight: Tensor,
    bias: Option<Tensor>,
    lora: Option<LoraPair>,
}

impl Linear {
    /// `weight` `[out_dim, in_dim]` and, with `bias`, `bias` `[out_dim]` under `vb`.
    pub(crate) fn load(vb: VarBuilder, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.get((out_dim, in_dim), "weight")?;
        let bias = if bias { Some(vb.get(out_dim, "bias")?) } else { None };
        Ok(Linear { weight, bias, lora: None })
    }

    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// Run `lora` beside the weight from now on (replacing any pair attached before).
    pub(crate) fn set_lora(&mut self, lora: LoraPair) {
        self.lora = Some(lora);
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (last, lead) = dims.split_last().expect("projection input has a feature axis");
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, *last))?;
        let mut y = gemv::matmul_t(&x2, &self.weight)?;
        if let Some(l) = &self.lora {
            let low = x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
            y = (y + (low * l.scale)?)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out = lead.to_vec();
        out.push(self.weight.dim(0)?);
        y.reshape(out)
    }
}

/// Root-mean-square norm with a learned gain.
#[derive(Debug, Clone)]
struct RmsNorm {
    weight: Tensor,
    eps: f32,
}

impl RmsNorm {
    fn load(vb: VarBuilder, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: vb.get(size, "weight")?, eps: eps as f32 })
    }

    fn forward(&self, x: &Tensor, exact_grad: bool) -> Result<Tensor> {
        if exact_grad {
            ops::rms_norm_slow(x, &self.weight, self.eps)
        } else {
            ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
        }
    }
}

/// Rotary tables in the Hugging Face layout (the two halves of a head rotate together),
/// `[positions, head_dim / 2]`.
#[derive(Debug, Clone)]
struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Angles p·f in f64 for every position of the context and inverse frequency, rounded to f32.
    fn new(cfg: &LlamaConfig, dev: &Device) -> Result<Self> {
        let inv = cfg.inv_freq();
        let n = cfg.context();
        let half = inv.len();
        let mut cos = Vec::with_capacity(n * half);
        let mut sin = Vec::with_capacity(n * half);
        for p in 0..n {
            for f in &inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(RotaryEmbedding { cos: Tensor::from_vec(cos, (n, half), dev)?, sin: Tensor::from_vec(sin, (n, half), dev)? })
    }

    fn positions(&self) -> usize {
        self.cos.dims()[0]
    }

    /// The tables of positions `start..start + len`.
    fn window(&self, start: usize, len: usize) -> Result<Self> {
        Ok(RotaryEmbedding { cos: self.cos.narrow(0, start, len)?, sin: self.sin.narrow(0, start, len)? })
    }

    /// Rotate `x` `[batch, heads, positions, head_dim]` by the window's angles.
    fn apply(&self, x: &Tensor, exact_grad: bool) -> Result<Tensor> {
        if exact_grad {
            rotary_emb::rope_slow(x, &self.cos, &self.sin)
        } else {
            rotary_emb::rope(x, &self.cos, &self.sin)
        }
    }
}

/// Causal self-attention with grouped-query key/value heads.
#[derive(Debug, Clone)]
struct Attention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    o_proj: Linear,
    num_heads: usize,
    num_kv_heads: usize,
    head_dim: usize,
}

impl Attention {
    fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, hd, bias) = (cfg.hidden_size, cfg.head_dim, cfg.attention_bias);
        let (q_dim, kv_dim) = (cfg.num_attention_heads * hd, cfg.num_key_value_heads * hd);
        Ok(Attention {
            q_proj: Linear::load(vb.pp("q_proj"), h, q_dim, bias)?,
            k_proj: Linear::load(vb.pp("k_proj"), h, kv_dim, bias)?,
            v_proj: Linear::load(vb.pp("v_proj"), h, kv_dim, bias)?,
            o_proj: Linear::load(vb.pp("o_proj"), q_dim, h, false)?,
            num_heads: cfg.num_attention_heads,
            num_kv_heads: cfg.num_key_value_heads,
            head_dim: hd,
        })
    }

    /// `x` `[batch, positions, hidden]` (already normed); `rope` holds the angles of these
    /// positions, `mask` `[positions, cached + positions]` (none for a single position);
    /// `cache` holds the keys and values of earlier positions and receives these.
    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        exact_grad: bool,
    ) -> Result<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.num_heads, self.num_kv_heads, self.head_dim);
        let heads = |p: &Linear, n: usize| -> Result<Tensor> {
            p.forward(x)?.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let q = rope.apply(&heads(&self.q_proj, nh)?, exact_grad)?;
        let k = rope.apply(&heads(&self.k_proj, nkv)?, exact_grad)?;
        let v = heads(&self.v_proj, nkv)?;
        let (k, v) = match cache {
            Some(c) => c.append(&k, &v)?,
            None => (k, v),
        };
        // Grouped-query attention without copying keys and values per query head: the query
        // heads that share a key/value head are stacked along the position axis
        // (head h uses key/value head h / n_rep, as transformers' repeat_kv).
        let n_rep = nh / nkv;
        let s = k.dim(2)?;
        let q = q.reshape((b, nkv, n_rep * t, hd))?;
        let mut att = (q.matmul(&k.t()?)? / (hd as f64).sqrt())?;
        if let Some(m) = mask {
            att = att.reshape((b, nkv, n_rep, t, s))?.broadcast_add(m)?.reshape((b, nkv, n_rep * t, s))?;
        }
        let att = if exact_grad { ops::softmax(&att, D::Minus1)? } else { ops::softmax_last_dim(&att)? };
        let y = att.matmul(&v)?.reshape((b, nh, t, hd))?.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&y)
    }
}

/// The SwiGLU feed-forward block: down(silu(gate(x)) · up(x)).
#[derive(Debug, Clone)]
struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        Ok(Mlp {
            gate_proj: Linear::load(vb.pp("gate_proj"), h, i, false)?,
            up_proj: Linear::load(vb.pp("up_proj"), h, i, false)?,
            down_proj: Linear::load(vb.pp("down_proj"), i, h, false)?,
        })
    }
}

impl Module for Mlp {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.down_proj.forward(&(ops::silu(&self.gate_proj.forward(x)?)? * self.up_proj.forward(x)?)?)
    }
}

/// One pre-norm decoder block: x + attention(norm(x)), then + mlp(norm(·)).
#[derive(Debug, Clone)]
struct DecoderLayer {
    self_attn: Attention,
    mlp: Mlp,
    input_layernorm: RmsNorm,
    post_attention_layernorm: RmsNorm,
}

impl DecoderLayer {
    fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let (h, eps) = (cfg.hidden_size, cfg.rms_norm_eps);
        Ok(DecoderLayer {
            self_attn: Attention::load(vb.pp("self_attn"), cfg)?,
            mlp: Mlp::load(vb.pp("mlp"), cfg)?,
            input_layernorm: RmsNorm::load(vb.pp("input_layernorm"), h, eps)?,
            post_attention_layernorm: RmsNorm::load(vb.pp("post_attention_layernorm"), h, eps)?,
        })
    }

    fn forward(
        &self,
        x: &Tensor,
        rope: &RotaryEmbedding,
        mask: Option<&Tensor>,
        cache: Option<&mut KvCache>,
        exact_grad: bool,
    ) -> Result<Tensor> {
        let a = self.self_attn.forward(&self.input_layernorm.forward(x, exact_grad)?, rope, mask, cache, exact_grad)?;
        let x = (x + a)?;
        let m = self.mlp.forward(&self.post_attention_layernorm.forward(&x, exact_grad)?)?;
        x + m
    }

    /// The projection named by its Hugging Face module name (`self_attn.q_proj`, `mlp.up_proj`…).
    fn linear(&self, name: &str) -> Option<&Linear> {
        Some(match name {
            "self_attn.q_proj" => &self.self_attn.q_proj,
            "self_attn.k_proj" => &self.self_attn.k_proj,
            "self_attn.v_proj" => &self.self_attn.v_proj,
            "self_attn.o_proj" => &self.self_attn.o_proj,
            "mlp.gate_proj" => &self.mlp.gate_proj,
            "mlp.up_proj" => &self.mlp.up_proj,
            "mlp.down_proj" => &self.mlp.down_proj,
            _ => return None,
        })
    }

    fn linear_mut(&mut self, name: &str) -> Option<&mut Linear> {
        Some(match name {
            "self_attn.q_proj" => &mut self.self_attn.q_proj,
            "self_attn.k_proj" => &mut self.self_attn.k_proj,
            "self_attn.v_proj" => &mut self.self_attn.v_proj,
            "self_attn.o_proj" => &mut self.self_attn.o_proj,
            "mlp.gate_proj" => &mut self.mlp.gate_proj,
            "mlp.up_proj" => &mut self.mlp.up_proj,
            "mlp.down_proj" => &mut self.mlp.down_proj,
            _ => return None,
        })
    }

    /// The tensor under `part`, a key relative to the layer (`mlp.up_proj.weight`).
    fn weight(&self, part: &str) -> Option<&Tensor> {
        match part {
            "input_layernorm.weight" => return Some(&self.input_layernorm.weight),
            "post_attention_layernorm.weight" => return Some(&self.post_attention_layernorm.weight),
            _ => {}
        }
        let (name, what) = part.rsplit_once('.')?;
        let linear = self.linear(name)?;
        match what {
            "weight" => Some(&linear.weight),
            "bias" => linear.bias.as_ref(),
            _ => None,
        }
    }
}

/// Keys and values of every layer seen so far, `[batch, kv_heads, positions, head_dim]`, for
/// decoding one position at a time: candle-nn's `KvCache` per layer, which allocates room for
/// all positions once and writes each step's keys into place (concatenating would copy the
/// whole cache every step).
#[derive(Debug, Clone)]
pub struct Cache {
    layers: Vec<KvCache>,
}

impl Cache {
    /// Room for `positions` positions (prompt and new tokens); it grows if more come.
    pub(crate) fn new(cfg: &LlamaConfig, positions: usize) -> Self {
        Cache { layers: vec![KvCache::new(2, positions.max(1)); cfg.num_hidden_layers] }
    }

    pub(crate) fn positions(&self) -> usize {
        self.layers.first().map_or(0, KvCache::current_seq_len)
    }
}

/// The decoder: embedding, layers, final norm and the output head.
#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    embed_tokens: Embedding,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`; the embedding's own tensor when the model ties them. A plain tensor,
    /// not a `Linear`: its input (one position per row, picked out of the hidden states) goes to
    /// the product as it is, without the reshape a `Linear` does.
    lm_head: Tensor,
    rotary: RotaryEmbedding,
}

impl Llama {
    /// Build the model from the weights under `vb` (Hugging Face names from the root). The
    /// rotary tables and every tensor are on `vb`'s device.
    pub(crate) fn load(vb: VarBuilder, cfg: &LlamaConfig) -> Result<Self> {
        let embed_tokens = candle_nn::embedding(cfg.vocab_size, cfg.hidden_size, vb.pp("model.embed_tokens"))?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb.pp(format!("model.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(vb.pp("model.norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            embed_tokens.embeddings().clone()
        } else {
            vb.pp("lm_head").get((cfg.vocab_size, cfg.hidden_size), "weight")?
        };
        let rotary = RotaryEmbedding::new(cfg, vb.device())?;
        Ok(Llama { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, rotary })
    }

    pub(crate) fn device(&self) -> &Device {
        self.lm_head.device()
    }

    /// Hidden states after the final norm, `[batch, positions, hidden]`, for `ids`
    /// (`[batch, positions]`) placed after what `cache` holds.
    pub fn hidden(&self, ids: &Tensor, mut cache: Option<&mut Cache>, exact_grad: bool) -> Result<Tensor> {
        let (_, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.positions());
        if start + t > self.rotary.positions() {
            candle_core::bail!("{} positions exceed the model's context of {}", start + t, self.rotary.positions());
        }
        if cache.as_ref().is_some_and(|c| c.layers.len() != self.layers.len()) {
            candle_core::bail!("the cache was made for a model with another number of layers");
        }
        let rope = self.rotary.window(start, t)?;
        let mask = causal_mask(t, start, self.device())?;
        let mut x = self.embed_tokens.forward(ids)?;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &rope, mask.as_ref(), kv, exact_grad)?;
        }
        self.norm.forward(&x, exact_grad)
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        gemv::matmul_t(hidden, &self.lm_head)
    }

    /// The tensor the model holds under a Hugging Face key (for a model that ties them,
    /// `lm_head.weight` is the embedding).
    pub(crate) fn weight(&self, key: &str) -> Option<&Tensor> {
        match key {
            "model.embed_tokens.weight" => Some(self.embed_tokens.embeddings()),
            "lm_head.weight" => Some(&self.lm_head),
            "model.norm.weight" => Some(&self.norm.weight),
            _ => {
                let (i, part) = layer_part(key)?;
                self.layers.get(i)?.weight(part)
            }
        }
    }

    /// The projection named by its Hugging Face module key (`model.layers.3.self_attn.q_proj`).
    pub(crate) fn linear_mut(&mut self, key: &str) -> Option<&mut Linear> {
        let (i, name) = layer_part(key)?;
        self.layers.get_mut(i)?.linear_mut(name)
    }
}

/// `model.layers.N.rest` → (N, rest).
fn layer_part(key: &str) -> Option<(usize, &str)> {
    let (idx, part) = key.strip_prefix("model.layers.")?.split_once('.')?;
    Some((idx.parse().ok()?, part))
}

/// `[t, start+t]`: query i (absolute position start+i) sees keys up to start+i.
fn causal_mask(t: usize, start: usize, dev: &Device) -> Result<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let s = start + t;
    let v: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(v, (t, s), dev).map(Some)
}

/// Ids as a `[batch, positions]` u32 tensor; rows must have equal length.
pub(crate) fn ids_tensor(rows: &[Vec<u32>], dev: &Device) -> Result<Tensor> {
    let t = rows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), dev)
}
