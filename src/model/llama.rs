//! A llama-family decoder (Llama, Mistral, Qwen2, SmolLM) on candle tensors, in the Hugging
//! Face layout. candle-transformers' llama returns logits of the last position only and has no
//! place for an unmerged LoRA; the probe needs every position's distribution and the trainer
//! needs LoRA factors in the graph, so the forward pass is spelled out here with candle-nn's
//! kernels (RMSNorm, RoPE, softmax). `exact_grad` switches to the differentiable versions of
//! RMSNorm, RoPE and softmax: candle-nn's fused kernels have no backward pass, so gradients
//! would silently stop there.

use candle_core::{Device, Tensor, D};
use candle_nn::ops;
use candle_nn::rotary_emb;

use super::config::LlamaConfig;
use super::gemv;
use super::{cerr, CResult};

/// A LoRA pair applied beside a frozen weight: y += scale·(x·Aᵀ)·Bᵀ.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
}

/// A linear projection `y = x·Wᵀ + b`, optionally with an unmerged LoRA.
#[derive(Debug, Clone)]
pub struct Proj {
    /// `[out, in]`
    pub w: Tensor,
    pub bias: Option<Tensor>,
    pub lora: Option<LoraPair>,
}

impl Proj {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let dims = x.dims().to_vec();
        let (last, lead) = dims.split_last().expect("projection input has a feature axis");
        let rows: usize = lead.iter().product();
        let x2 = x.reshape((rows, *last))?;
        let mut y = gemv::matmul_t(&x2, &self.w)?;
        if let Some(l) = &self.lora {
            let low = x2.matmul(&l.a.t()?)?.matmul(&l.b.t()?)?;
            y = (y + (low * l.scale)?)?;
        }
        if let Some(b) = &self.bias {
            y = y.broadcast_add(b)?;
        }
        let mut out = lead.to_vec();
        out.push(self.w.dim(0)?);
        y.reshape(out)
    }
}

#[derive(Debug, Clone)]
pub struct Layer {
    pub input_norm: Tensor,
    pub q: Proj,
    pub k: Proj,
    pub v: Proj,
    pub o: Proj,
    pub post_norm: Tensor,
    pub gate: Proj,
    pub up: Proj,
    pub down: Proj,
}

impl Layer {
    /// The projection named by its Hugging Face module name (`self_attn.q_proj`, `mlp.up_proj`…).
    pub fn proj_mut(&mut self, name: &str) -> Option<&mut Proj> {
        Some(match name {
            "self_attn.q_proj" => &mut self.q,
            "self_attn.k_proj" => &mut self.k,
            "self_attn.v_proj" => &mut self.v,
            "self_attn.o_proj" => &mut self.o,
            "mlp.gate_proj" => &mut self.gate,
            "mlp.up_proj" => &mut self.up,
            "mlp.down_proj" => &mut self.down,
            _ => return None,
        })
    }
}

pub const PROJECTIONS: &[&str] = &[
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
];

/// Keys and values of every layer seen so far, `[batch, kv_heads, positions, head_dim]`.
#[derive(Debug, Default)]
pub struct KvCache {
    layers: Vec<Option<(Tensor, Tensor)>>,
}

impl KvCache {
    pub fn positions(&self) -> usize {
        self.layers.first().and_then(|l| l.as_ref()).map(|(k, _)| k.dims()[2]).unwrap_or(0)
    }
}

#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    /// `[vocab, hidden]`
    pub embed: Tensor,
    pub layers: Vec<Layer>,
    pub norm: Tensor,
    /// `[vocab, hidden]`; shares the embedding's storage when the model ties them.
    pub lm_head: Tensor,
    cos: Tensor,
    sin: Tensor,
}

impl Llama {
    /// Assemble a model from named weights. `weight(key, shape)` returns the tensor stored under
    /// the Hugging Face key, checked against `shape`.
    pub fn from_weights(
        cfg: LlamaConfig,
        mut weight: impl FnMut(&str, &[usize]) -> crate::Result<Tensor>,
    ) -> crate::Result<Self> {
        let (h, i) = (cfg.hidden_size, cfg.intermediate_size);
        let (qd, kvd) = (cfg.num_attention_heads * cfg.head_dim, cfg.num_key_value_heads * cfg.head_dim);
        let embed = weight("model.embed_tokens.weight", &[cfg.vocab_size, h])?;
        let mut layers = Vec::with_capacity(cfg.num_hidden_layers);
        for l in 0..cfg.num_hidden_layers {
            let p = format!("model.layers.{l}");
            let mut proj = |name: &str, out: usize, inp: usize, bias: bool| -> crate::Result<Proj> {
                let w = weight(&format!("{p}.{name}.weight"), &[out, inp])?;
                let bias = if bias { Some(weight(&format!("{p}.{name}.bias"), &[out])?) } else { None };
                Ok(Proj { w, bias, lora: None })
            };
            let ab = cfg.attention_bias;
            let (q, k, v, o) = (
                proj("self_attn.q_proj", qd, h, ab)?,
                proj("self_attn.k_proj", kvd, h, ab)?,
                proj("self_attn.v_proj", kvd, h, ab)?,
                proj("self_attn.o_proj", h, qd, false)?,
            );
            let (gate, up, down) = (
                proj("mlp.gate_proj", i, h, false)?,
                proj("mlp.up_proj", i, h, false)?,
                proj("mlp.down_proj", h, i, false)?,
            );
            layers.push(Layer {
                input_norm: weight(&format!("{p}.input_layernorm.weight"), &[h])?,
                q,
                k,
                v,
                o,
                post_norm: weight(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                gate,
                up,
                down,
            });
        }
        let norm = weight("model.norm.weight", &[h])?;
        let lm_head =
            if cfg.tie_word_embeddings { embed.clone() } else { weight("lm_head.weight", &[cfg.vocab_size, h])? };
        let (cos, sin) = rope_tables(&cfg).map_err(cerr)?;
        Ok(Llama { cfg, embed, layers, norm, lm_head, cos, sin })
    }

    pub fn device(&self) -> &Device {
        self.embed.device()
    }

    /// Hidden states after the final norm, `[batch, positions, hidden]`, for `ids`
    /// (`[batch, positions]`) placed after what `cache` holds.
    pub fn hidden(&self, ids: &Tensor, cache: Option<&mut KvCache>, exact_grad: bool) -> CResult<Tensor> {
        let (_, t) = ids.dims2()?;
        let mut cache = cache;
        let start = cache.as_ref().map(|c| c.positions()).unwrap_or(0);
        if start + t > self.cos.dim(0)? {
            candle_core::bail!("{} positions exceed the model's context of {}", start + t, self.cos.dim(0)?);
        }
        if let Some(c) = cache.as_mut() {
            c.layers.resize(self.layers.len(), None);
        }
        let cos = self.cos.narrow(0, start, t)?;
        let sin = self.sin.narrow(0, start, t)?;
        let mask = causal_mask(t, start, self.device())?;
        let mut x = self.embed.embedding(&ids.flatten_all()?)?.reshape((ids.dim(0)?, t, self.cfg.hidden_size))?;
        for (li, layer) in self.layers.iter().enumerate() {
            let slot = cache.as_mut().map(|c| &mut c.layers[li]);
            let a = self.attention(
                layer,
                &self.rms(&x, &layer.input_norm, exact_grad)?,
                &cos,
                &sin,
                mask.as_ref(),
                slot,
                exact_grad,
            )?;
            x = (x + a)?;
            let n = self.rms(&x, &layer.post_norm, exact_grad)?;
            let m = layer.down.forward(&(ops::silu(&layer.gate.forward(&n)?)? * layer.up.forward(&n)?)?)?;
            x = (x + m)?;
        }
        self.rms(&x, &self.norm, exact_grad)
    }

    fn rms(&self, x: &Tensor, w: &Tensor, exact_grad: bool) -> CResult<Tensor> {
        let eps = self.cfg.rms_norm_eps as f32;
        if exact_grad {
            ops::rms_norm_slow(x, w, eps)
        } else {
            ops::rms_norm(&x.contiguous()?, w, eps)
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn attention(
        &self,
        layer: &Layer,
        x: &Tensor,
        cos: &Tensor,
        sin: &Tensor,
        mask: Option<&Tensor>,
        slot: Option<&mut Option<(Tensor, Tensor)>>,
        exact_grad: bool,
    ) -> CResult<Tensor> {
        let (b, t, _) = x.dims3()?;
        let (nh, nkv, hd) = (self.cfg.num_attention_heads, self.cfg.num_key_value_heads, self.cfg.head_dim);
        let heads = |p: &Proj, n: usize| -> CResult<Tensor> {
            p.forward(x)?.reshape((b, t, n, hd))?.transpose(1, 2)?.contiguous()
        };
        let rope = |z: Tensor| -> CResult<Tensor> {
            if exact_grad {
                rotary_emb::rope_slow(&z, cos, sin)
            } else {
                rotary_emb::rope(&z, cos, sin)
            }
        };
        let q = rope(heads(&layer.q, nh)?)?;
        let mut k = rope(heads(&layer.k, nkv)?)?;
        let mut v = heads(&layer.v, nkv)?;
        if let Some(slot) = slot {
            if let Some((pk, pv)) = slot.as_ref() {
                k = Tensor::cat(&[pk, &k], 2)?;
                v = Tensor::cat(&[pv, &v], 2)?;
            }
            *slot = Some((k.clone(), v.clone()));
        }
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
        layer.o.forward(&y)
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> CResult<Tensor> {
        gemv::matmul_t(hidden, &self.lm_head)
    }
}

/// `[t, start+t]`: query i (absolute position start+i) sees keys up to start+i.
fn causal_mask(t: usize, start: usize, dev: &Device) -> CResult<Option<Tensor>> {
    if t == 1 {
        return Ok(None);
    }
    let s = start + t;
    let v: Vec<f32> =
        (0..t).flat_map(|i| (0..s).map(move |j| if j > start + i { f32::NEG_INFINITY } else { 0.0 })).collect();
    Tensor::from_vec(v, (t, s), dev).map(Some)
}

fn rope_tables(cfg: &LlamaConfig) -> CResult<(Tensor, Tensor)> {
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
    let dev = Device::Cpu;
    Ok((Tensor::from_vec(cos, (n, half), &dev)?, Tensor::from_vec(sin, (n, half), &dev)?))
}

/// Ids as a `[batch, positions]` u32 tensor; rows must have equal length.
pub fn ids_tensor(rows: &[Vec<u32>], dev: &Device) -> CResult<Tensor> {
    let t = rows.first().map(Vec::len).unwrap_or(0);
    let flat: Vec<u32> = rows.iter().flat_map(|r| r.iter().copied()).collect();
    Tensor::from_vec(flat, (rows.len(), t), dev)
}
