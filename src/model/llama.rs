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
use candle_nn::{ops, rotary_emb, Module};

use super::config::LlamaConfig;
use super::weight::Weight;

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

/// Most bytes of attention scores one block of queries holds (f32).
pub(crate) const ATTENTION_BUDGET: usize = 64 << 20;

/// Where [`Llama::load`] takes its tensors from, by Hugging Face key: small tensors (norms,
/// biases) in f32, weight matrices as the source holds them.
pub(crate) trait Params {
    /// The f32 tensor under `key`, of `shape`.
    fn tensor(&self, key: &str, shape: &[usize]) -> Result<Tensor>;
    /// The matrix `[rows, cols]` under `key`.
    fn matrix(&self, key: &str, rows: usize, cols: usize) -> Result<Weight>;
    fn device(&self) -> &Device;
}

/// A [`Params`] under a key prefix, as candle-nn's `VarBuilder` is (`vb.pp("mlp")`).
#[derive(Clone)]
pub(crate) struct Vb<'a> {
    params: &'a dyn Params,
    prefix: String,
}

impl<'a> Vb<'a> {
    pub(crate) fn new(params: &'a dyn Params) -> Self {
        Vb { params, prefix: String::new() }
    }

    pub(crate) fn pp(&self, part: impl AsRef<str>) -> Self {
        Vb { params: self.params, prefix: self.key(part.as_ref()) }
    }

    fn key(&self, name: &str) -> String {
        if self.prefix.is_empty() {
            name.to_string()
        } else {
            format!("{}.{name}", self.prefix)
        }
    }

    fn get(&self, shape: &[usize], name: &str) -> Result<Tensor> {
        self.params.tensor(&self.key(name), shape)
    }

    fn matrix(&self, rows: usize, cols: usize, name: &str) -> Result<Weight> {
        self.params.matrix(&self.key(name), rows, cols)
    }
}

/// A LoRA pair applied beside a frozen weight: y += scale·(x·Aᵀ)·Bᵀ.
#[derive(Debug, Clone)]
pub struct LoraPair {
    /// `[r, in]`
    pub a: Tensor,
    /// `[out, r]`
    pub b: Tensor,
    pub scale: f64,
}

/// What an adapter does to one projection, applied beside the frozen weight instead of merged
/// into it (the base is never copied): with x' = x ⊙ `in_scale`,
/// y = (x'·Wᵀ + scale·(x'·Aᵀ)·Bᵀ + x'·ΔWᵀ) ⊙ `out_scale` + bias. LoRA and rsLoRA are the pair
/// alone; DoRA is the pair with `out_scale` = m / ‖W + sBA‖ per row (or `in_scale` per column,
/// the norm axis of the file); (IA)³ is `in_scale` or `out_scale` = 1 + l alone; formats that
/// exist only as a dense ΔW (LoHa, LoKr, full) carry `dense`.
#[derive(Debug, Clone, Default)]
pub struct Adaptation {
    pub lora: Option<LoraPair>,
    /// ΔW `[out, in]` in f32.
    pub dense: Option<Tensor>,
    /// `[in]`
    pub in_scale: Option<Tensor>,
    /// `[out]`
    pub out_scale: Option<Tensor>,
}

impl Adaptation {
    /// Bytes of f32 the adaptation holds.
    pub fn bytes(&self) -> usize {
        let n = |t: &Option<Tensor>| t.as_ref().map_or(0, Tensor::elem_count);
        let pair = self.lora.as_ref().map_or(0, |l| l.a.elem_count() + l.b.elem_count());
        4 * (pair + n(&self.dense) + n(&self.in_scale) + n(&self.out_scale))
    }
}

/// `y = x·Wᵀ + b` (candle-nn's `Linear`) on a weight as stored, with room for an adapter.
#[derive(Debug, Clone)]
pub struct Linear {
    /// `[out, in]`
    weight: Weight,
    bias: Option<Tensor>,
    adapter: Option<Adaptation>,
}

impl Linear {
    /// `weight` `[out_dim, in_dim]` and, with `bias`, `bias` `[out_dim]` under `vb`.
    pub(crate) fn load(vb: Vb, in_dim: usize, out_dim: usize, bias: bool) -> Result<Self> {
        let weight = vb.matrix(out_dim, in_dim, "weight")?;
        let bias = if bias { Some(vb.get(&[out_dim], "bias")?) } else { None };
        Ok(Linear { weight, bias, adapter: None })
    }

    pub fn weight(&self) -> &Weight {
        &self.weight
    }

    /// Run `lora` beside the weight from now on (replacing any adapter attached before).
    pub(crate) fn set_lora(&mut self, lora: LoraPair) {
        self.adapter = Some(Adaptation { lora: Some(lora), ..Default::default() });
    }

    /// Run `a` beside the weight from now on (replacing any adapter attached before).
    pub(crate) fn set_adaptation(&mut self, a: Adaptation) {
        self.adapter = Some(a);
    }

    /// `x` `[rows, in]` → `[rows, out]`.
    fn forward_2d(&self, x: &Tensor) -> Result<Tensor> {
        let Some(a) = &self.adapter else {
            let y = self.weight.matmul_t(x)?;
            return match &self.bias {
                Some(b) => y.broadcast_add(b),
                None => Ok(y),
            };
        };
        let x = match &a.in_scale {
            Some(s) => x.broadcast_mul(s)?,
            None => x.clone(),
        };
        let mut y = self.weight.matmul_t(&x)?;
        if let Some(l) = &a.lora {
            y = (y + (x.matmul(&l.a.t()?)?.matmul(&l.b.t()?)? * l.scale)?)?;
        }
        if let Some(d) = &a.dense {
            y = (y + x.matmul(&d.t()?)?)?;
        }
        if let Some(s) = &a.out_scale {
            y = y.broadcast_mul(s)?;
        }
        match &self.bias {
            Some(b) => y.broadcast_add(b),
            None => Ok(y),
        }
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let dims = x.dims().to_vec();
        let (last, lead) = dims.split_last().expect("projection input has a feature axis");
        let rows: usize = lead.iter().product();
        let y = self.forward_2d(&x.reshape((rows, *last))?)?;
        let mut out = lead.to_vec();
        out.push(self.weight.dims()?.0);
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
    fn load(vb: Vb, size: usize, eps: f64) -> Result<Self> {
        Ok(RmsNorm { weight: vb.get(&[size], "weight")?, eps: eps as f32 })
    }

    fn forward(&self, x: &Tensor, exact_grad: bool) -> Result<Tensor> {
        if exact_grad {
            ops::rms_norm_slow(x, &self.weight, self.eps)
        } else {
            ops::rms_norm(&x.contiguous()?, &self.weight, self.eps)
        }
    }
}

/// Rotary angles in the Hugging Face layout (the two halves of a head rotate together),
/// `[positions, head_dim / 2]`, for the positions of one forward call only: computed when
/// needed rather than tabled for the whole context (131 072 positions for Llama 3).
#[derive(Debug, Clone)]
struct RotaryEmbedding {
    cos: Tensor,
    sin: Tensor,
}

impl RotaryEmbedding {
    /// Angles p·f in f64 for positions `start..start + len` and every inverse frequency of
    /// `inv`, rounded to f32.
    fn window(inv: &[f64], start: usize, len: usize, dev: &Device) -> Result<Self> {
        let half = inv.len();
        let mut cos = Vec::with_capacity(len * half);
        let mut sin = Vec::with_capacity(len * half);
        for p in start..start + len {
            for f in inv {
                let a = p as f64 * f;
                cos.push(a.cos() as f32);
                sin.push(a.sin() as f32);
            }
        }
        Ok(RotaryEmbedding {
            cos: Tensor::from_vec(cos, (len, half), dev)?,
            sin: Tensor::from_vec(sin, (len, half), dev)?,
        })
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
    /// Most bytes of scores one block of queries holds ([`ATTENTION_BUDGET`] unless set).
    score_budget: usize,
}

impl Attention {
    fn load(vb: Vb, cfg: &LlamaConfig) -> Result<Self> {
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
            score_budget: ATTENTION_BUDGET,
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
        // Queries in blocks whose scores stay within ATTENTION_BUDGET: a 2048-position window of
        // a 32-head model would otherwise hold 512 MB of scores, twice (mask and softmax).
        let s = k.dim(2)?;
        let kt = k.t()?;
        let block = (self.score_budget / (4 * b * nh * s).max(1)).clamp(1, t.max(1));
        let mut parts = Vec::with_capacity(t.div_ceil(block));
        for t0 in (0..t).step_by(block) {
            let tc = block.min(t - t0);
            let qc = if tc == t { q.clone() } else { q.narrow(2, t0, tc)?.contiguous()? };
            let mc = match mask {
                Some(m) if tc < t => Some(m.narrow(0, t0, tc)?),
                m => m.cloned(),
            };
            parts.push(self.attend(&qc, &kt, &v, mc.as_ref(), exact_grad)?);
        }
        let y = if parts.len() == 1 { parts.remove(0) } else { Tensor::cat(&parts, 2)? };
        let y = y.transpose(1, 2)?.reshape((b, t, nh * hd))?;
        self.o_proj.forward(&y)
    }

    /// softmax(q·kᵀ/√d + mask)·v for queries `q` `[b, heads, t, d]`, keys transposed `kt`
    /// `[b, kv heads, d, s]`, values `v` `[b, kv heads, s, d]`; `[b, heads, t, d]`.
    fn attend(&self, q: &Tensor, kt: &Tensor, v: &Tensor, mask: Option<&Tensor>, exact_grad: bool) -> Result<Tensor> {
        let (b, nh, t, hd) = q.dims4()?;
        let nkv = self.num_kv_heads;
        let s = kt.dim(3)?;
        // Grouped-query attention without copying keys and values per query head: the query
        // heads that share a key/value head are stacked along the position axis
        // (head h uses key/value head h / n_rep, as transformers' repeat_kv).
        let n_rep = nh / nkv;
        let q = q.reshape((b, nkv, n_rep * t, hd))?;
        let mut att = (q.matmul(kt)? / (hd as f64).sqrt())?;
        if let Some(m) = mask {
            att = att.reshape((b, nkv, n_rep, t, s))?.broadcast_add(m)?.reshape((b, nkv, n_rep * t, s))?;
        }
        let att = if exact_grad { ops::softmax(&att, D::Minus1)? } else { ops::softmax_last_dim(&att)? };
        att.matmul(v)?.reshape((b, nh, t, hd))
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
    fn load(vb: Vb, cfg: &LlamaConfig) -> Result<Self> {
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
    fn load(vb: Vb, cfg: &LlamaConfig) -> Result<Self> {
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

    /// The weight matrix under `part`, a key relative to the layer (`mlp.up_proj.weight`).
    fn matrix(&self, part: &str) -> Option<&Weight> {
        self.linear(part.strip_suffix(".weight")?).map(Linear::weight)
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

    /// A copy of the positions held so far with room for `room` more, on its own storage:
    /// candle's cache writes new positions in place, so two continuations of one prompt cannot
    /// share one cache.
    pub(crate) fn fork(&self, room: usize) -> Result<Cache> {
        let n = self.positions();
        let layers = self
            .layers
            .iter()
            .map(|l| {
                let mut c = KvCache::new(2, (n + room).max(1));
                if let (Some(k), Some(v)) = (l.k()?, l.v()?) {
                    c.append(&k.contiguous()?, &v.contiguous()?)?;
                }
                Ok(c)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Cache { layers })
    }
}

/// The decoder: embedding, layers, final norm and the output head.
#[derive(Debug, Clone)]
pub struct Llama {
    pub cfg: LlamaConfig,
    /// `[vocab, hidden]`, looked up row by row.
    embed_tokens: Weight,
    layers: Vec<DecoderLayer>,
    norm: RmsNorm,
    /// `[vocab, hidden]`; holds the embedding's own weight when the model ties them.
    lm_head: Linear,
    inv_freq: Vec<f64>,
    device: Device,
}

impl Llama {
    /// Build the model from the weights under `vb` (Hugging Face names from the root), every
    /// tensor on `vb`'s device.
    pub(crate) fn load(vb: Vb, cfg: &LlamaConfig) -> Result<Self> {
        let embed_tokens = vb.pp("model.embed_tokens").matrix(cfg.vocab_size, cfg.hidden_size, "weight")?;
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| DecoderLayer::load(vb.pp(format!("model.layers.{i}")), cfg))
            .collect::<Result<Vec<_>>>()?;
        let norm = RmsNorm::load(vb.pp("model.norm"), cfg.hidden_size, cfg.rms_norm_eps)?;
        let lm_head = if cfg.tie_word_embeddings {
            Linear { weight: embed_tokens.clone(), bias: None, adapter: None }
        } else {
            Linear::load(vb.pp("lm_head"), cfg.hidden_size, cfg.vocab_size, false)?
        };
        let device = vb.params.device().clone();
        Ok(Llama { cfg: cfg.clone(), embed_tokens, layers, norm, lm_head, inv_freq: cfg.inv_freq(), device })
    }

    pub(crate) fn device(&self) -> &Device {
        &self.device
    }

    /// Hidden states after the final norm, `[batch, positions, hidden]`, for `ids`
    /// (`[batch, positions]`) placed after what `cache` holds.
    pub fn hidden(&self, ids: &Tensor, mut cache: Option<&mut Cache>, exact_grad: bool) -> Result<Tensor> {
        let (b, t) = ids.dims2()?;
        let start = cache.as_ref().map_or(0, |c| c.positions());
        if start + t > self.cfg.context() {
            candle_core::bail!("{} positions exceed the model's context of {}", start + t, self.cfg.context());
        }
        if cache.as_ref().is_some_and(|c| c.layers.len() != self.layers.len()) {
            candle_core::bail!("the cache was made for a model with another number of layers");
        }
        let rope = RotaryEmbedding::window(&self.inv_freq, start, t, self.device())?;
        let mask = causal_mask(t, start, self.device())?;
        let flat: Vec<u32> = ids.flatten_all()?.to_vec1::<u32>()?;
        let mut x = self.embed_tokens.rows(&flat)?.to_device(self.device())?.reshape((b, t, self.cfg.hidden_size))?;
        for (i, layer) in self.layers.iter().enumerate() {
            let kv = cache.as_mut().map(|c| &mut c.layers[i]);
            x = layer.forward(&x, &rope, mask.as_ref(), kv, exact_grad)?;
        }
        self.norm.forward(&x, exact_grad)
    }

    /// Bound the attention scores one block of queries holds to `bytes` (at least one query a
    /// block): the default is [`ATTENTION_BUDGET`]; tests set it small to check that blocked
    /// attention equals the whole.
    pub fn set_attention_budget(&mut self, bytes: usize) {
        for l in &mut self.layers {
            l.self_attn.score_budget = bytes;
        }
    }

    /// Logits `[rows, vocab]` of hidden states `[rows, hidden]`.
    pub fn logits(&self, hidden: &Tensor) -> Result<Tensor> {
        self.lm_head.forward_2d(hidden)
    }

    /// The weight matrix the model holds under a Hugging Face key (for a model that ties them,
    /// `lm_head.weight` is the embedding).
    pub fn matrix(&self, key: &str) -> Option<&Weight> {
        match key {
            "model.embed_tokens.weight" => Some(&self.embed_tokens),
            "lm_head.weight" => Some(&self.lm_head.weight),
            _ => {
                let (i, part) = layer_part(key)?;
                self.layers.get(i)?.matrix(part)
            }
        }
    }

    /// Put `w` in place of the matrix under `key` (both uses of a tied embedding); false when
    /// the model has no such matrix.
    pub(crate) fn set_matrix(&mut self, key: &str, w: Weight) -> bool {
        let tied = self.cfg.tie_word_embeddings;
        match key {
            "model.embed_tokens.weight" | "lm_head.weight" if tied => {
                self.embed_tokens = w.clone();
                self.lm_head.weight = w;
            }
            "model.embed_tokens.weight" => self.embed_tokens = w,
            "lm_head.weight" => self.lm_head.weight = w,
            _ => match self.linear_mut(key.strip_suffix(".weight").unwrap_or("")) {
                Some(l) => l.weight = w,
                None => return false,
            },
        }
        true
    }

    /// The projection named by its Hugging Face module key (`model.layers.3.self_attn.q_proj`,
    /// or `lm_head`).
    pub(crate) fn linear_mut(&mut self, key: &str) -> Option<&mut Linear> {
        if key == "lm_head" {
            return Some(&mut self.lm_head);
        }
        let (i, name) = layer_part(key)?;
        self.layers.get_mut(i)?.linear_mut(name)
    }

    /// The weight matrices held (embedding, every projection, and the output head when it is
    /// not the embedding's own): how many of each stored type, and their bytes.
    pub fn weight_summary(&self) -> (std::collections::BTreeMap<String, usize>, usize) {
        let head = (!self.cfg.tie_word_embeddings).then_some(&self.lm_head.weight);
        let layers = self.layers.iter().flat_map(|l| PROJECTIONS.iter().filter_map(move |p| l.linear(p)));
        let all = std::iter::once(&self.embed_tokens).chain(layers.map(Linear::weight)).chain(head);
        let mut types = std::collections::BTreeMap::new();
        let mut bytes = 0;
        for w in all {
            *types.entry(w.stored()).or_insert(0) += 1;
            bytes += w.bytes();
        }
        (types, bytes)
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
