//! Layers shared by the UNet, the VAE and the text encoder, as diffusers and transformers define
//! them: the resnet block (diffusers `ResnetBlock2D`, `time_embedding_norm="default"`),
//! multi-head scaled dot-product attention (`AttnProcessor2_0`: softmax(q·kᵀ/√d)·v), GEGLU, and
//! convolution and group-norm layers. On the CPU the convolution, group norm (+SiLU),
//! unmasked attention and GEGLU run on kernels.rs; elsewhere, and for masked attention (in
//! slices of heads so the score matrices stay within a fixed budget), on candle's operations.

use candle_core::{Module, Tensor, D};
use candle_nn::{Conv2dConfig, VarBuilder};

use super::kernels;
use crate::model::CResult;

/// Bytes of attention scores computed at once by candle's attention (other devices, or with a
/// mask): heads are sliced to stay within it. SD 1.5's self-attention at 64×64 latents is
/// 4096×4096 scores per head, 64 MiB in f32.
const ATTENTION_SCORE_BYTES: usize = 256 << 20;

/// A convolution: on the CPU with a bias (every SD convolution has one) through kernels.rs,
/// elsewhere through candle's.
#[derive(Debug)]
pub(crate) struct Conv2d {
    inner: candle_nn::Conv2d,
    /// Zero rows and columns added after the input's last (diffusers' `F.pad(x, (0, 1, 0, 1))`
    /// before its padding-0 downsamplers), on top of the symmetric padding.
    pad_end: usize,
}

impl Conv2d {
    /// The same convolution with `n` more zero rows and columns after the input's last.
    pub fn with_end_padding(self, n: usize) -> Self {
        Conv2d { pad_end: n, ..self }
    }

    /// kernels.rs's convolution where it applies (CPU, a bias, no dilation or groups).
    fn kernel(&self, x: &Tensor) -> Option<(kernels::Conv, &Tensor)> {
        let c = self.inner.config();
        let b = self.inner.bias().filter(|_| x.device().is_cpu() && c.dilation == 1 && c.groups == 1)?;
        Some((kernels::Conv { padding: c.padding, pad_end: self.pad_end, stride: c.stride, direct: true }, b))
    }

    /// The convolution of an input no one else needs: on the CPU its memory is released once
    /// its padded copy exists (kernels::Conv::run_owned), one feature map less at the peak.
    pub fn forward_owned(&self, x: Tensor) -> CResult<Tensor> {
        match self.kernel(&x) {
            Some((op, b)) => op.run_owned(x, self.inner.weight(), b),
            None => self.forward(&x),
        }
    }
}

impl Module for Conv2d {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        match self.kernel(x) {
            Some((op, b)) => x.contiguous()?.apply_op3_no_bwd(self.inner.weight(), b, &op),
            _ if self.pad_end > 0 => {
                self.inner.forward(&x.pad_with_zeros(3, 0, self.pad_end)?.pad_with_zeros(2, 0, self.pad_end)?)
            }
            _ => self.inner.forward(x),
        }
    }
}

pub(crate) fn conv(
    vb: VarBuilder,
    cin: usize,
    cout: usize,
    k: usize,
    stride: usize,
    padding: usize,
) -> CResult<Conv2d> {
    let cfg = Conv2dConfig { padding, stride, ..Default::default() };
    Ok(Conv2d { inner: candle_nn::conv2d(cin, cout, k, cfg, vb)?, pad_end: 0 })
}

/// torch's `GroupNorm` (affine), optionally followed by SiLU in the same pass on the CPU.
#[derive(Debug)]
pub(crate) struct GroupNorm {
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    fn run(&self, x: &Tensor, silu: bool) -> CResult<Tensor> {
        if x.device().is_cpu() {
            let op = kernels::GroupNorm { groups: self.groups, eps: self.eps, silu };
            return x.contiguous()?.apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        let channels = self.weight.dim(0)?;
        let norm = candle_nn::GroupNorm::new(self.weight.clone(), self.bias.clone(), channels, self.groups, self.eps)?;
        let y = norm.forward(x)?;
        if silu {
            candle_nn::ops::silu(&y)
        } else {
            Ok(y)
        }
    }

    /// SiLU(GroupNorm(x)), the order every resnet and output head applies them in.
    pub fn forward_silu(&self, x: &Tensor) -> CResult<Tensor> {
        self.run(x, true)
    }
}

impl Module for GroupNorm {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        self.run(x, false)
    }
}

pub(crate) fn group_norm(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> CResult<GroupNorm> {
    if groups == 0 || !channels.is_multiple_of(groups) {
        candle_core::bail!("GroupNorm: {channels} channels are not a multiple of {groups} groups");
    }
    Ok(GroupNorm { weight: vb.get(channels, "weight")?, bias: vb.get(channels, "bias")?, groups, eps })
}

/// A linear layer `x·Wᵀ + b`: candle's product, the bias added by kernels.rs on the CPU.
#[derive(Debug)]
pub(crate) struct Linear {
    product: candle_nn::Linear,
    bias: Option<Tensor>,
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let y = self.product.forward(x)?;
        match &self.bias {
            Some(b) => add_spread(&y, b, kernels::Spread::Rows),
            None => Ok(y),
        }
    }
}

pub(crate) fn linear(vb: VarBuilder, cin: usize, cout: usize, bias: bool) -> CResult<Linear> {
    let weight = vb.get((cout, cin), "weight")?;
    let bias = bias.then(|| vb.get(cout, "bias")).transpose()?;
    Ok(Linear { product: candle_nn::Linear::new(weight, None), bias })
}

/// a + b, tensors of one shape.
pub(crate) fn add(a: &Tensor, b: &Tensor) -> CResult<Tensor> {
    add_spread(a, b, kernels::Spread::Same)
}

/// a + b with `b` spread over `a` (kernels::Spread), divided by `divisor`; kernels.rs on the
/// CPU, candle's broadcasting operations elsewhere.
fn add_divided(a: &Tensor, b: &Tensor, spread: kernels::Spread, divisor: f64) -> CResult<Tensor> {
    if a.device().is_cpu() {
        let op = kernels::Add { spread, divisor: divisor as f32 };
        return a.contiguous()?.apply_op2_no_bwd(&b.contiguous()?, &op);
    }
    let b = match spread {
        kernels::Spread::Planes => {
            let c = a.dim(1)?;
            b.reshape((b.elem_count() / c, c, 1, 1))?
        }
        _ => b.clone(),
    };
    let sum = a.broadcast_add(&b)?;
    if divisor == 1.0 {
        Ok(sum)
    } else {
        sum / divisor
    }
}

fn add_spread(a: &Tensor, b: &Tensor, spread: kernels::Spread) -> CResult<Tensor> {
    add_divided(a, b, spread, 1.0)
}

pub(crate) fn layer_norm(vb: VarBuilder, dim: usize, eps: f64) -> CResult<candle_nn::LayerNorm> {
    candle_nn::layer_norm(dim, candle_nn::LayerNormConfig { eps, ..Default::default() }, vb)
}

/// diffusers `ResnetBlock2D`: GroupNorm, SiLU, 3×3 conv, plus the projected time embedding
/// (UNet only), GroupNorm, SiLU, 3×3 conv; a 1×1 conv on the skip path when the width changes;
/// the sum divided by `output_scale_factor`.
#[derive(Debug)]
pub(crate) struct Resnet {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Option<Linear>,
    norm2: GroupNorm,
    conv2: Conv2d,
    shortcut: Option<Conv2d>,
    scale: f64,
}

/// What a resnet block is built with besides its widths.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ResnetCfg {
    pub groups: usize,
    pub eps: f64,
    pub temb: Option<usize>,
    pub scale: f64,
}

impl Resnet {
    pub fn load(vb: VarBuilder, cin: usize, cout: usize, c: ResnetCfg) -> CResult<Self> {
        let shortcut = if cin != cout { Some(conv(vb.pp("conv_shortcut"), cin, cout, 1, 1, 0)?) } else { None };
        Ok(Resnet {
            norm1: group_norm(vb.pp("norm1"), c.groups, cin, c.eps)?,
            conv1: conv(vb.pp("conv1"), cin, cout, 3, 1, 1)?,
            time_emb_proj: c.temb.map(|t| linear(vb.pp("time_emb_proj"), t, cout, true)).transpose()?,
            norm2: group_norm(vb.pp("norm2"), c.groups, cout, c.eps)?,
            conv2: conv(vb.pp("conv2"), cout, cout, 3, 1, 1)?,
            shortcut,
            scale: c.scale,
        })
    }

    pub fn forward(&self, x: &Tensor, temb: Option<&Tensor>) -> CResult<Tensor> {
        let mut h = self.conv1.forward_owned(self.norm1.forward_silu(x)?)?;
        if let (Some(p), Some(t)) = (&self.time_emb_proj, temb) {
            let t = p.forward(&candle_nn::ops::silu(t)?)?;
            h = add_spread(&h, &t, kernels::Spread::Planes)?;
        }
        let h = self.conv2.forward_owned(self.norm2.forward_silu(&h)?)?;
        let skip = match &self.shortcut {
            Some(s) => s.forward(x)?,
            None => x.clone(),
        };
        add_divided(&skip, &h, kernels::Spread::Same, self.scale)
    }
}

/// Multi-head attention of `q` `[B, N, H·d]` over `k`, `v` `[B, M, H·d]`: softmax(q·kᵀ/√d + mask)·v
/// per head, `mask` `[N, M]` added to the scores when given (the text encoder's causal mask).
pub(crate) fn attention(q: &Tensor, k: &Tensor, v: &Tensor, heads: usize, mask: Option<&Tensor>) -> CResult<Tensor> {
    if mask.is_none() && q.device().is_cpu() {
        return q.contiguous()?.apply_op3_no_bwd(&k.contiguous()?, &v.contiguous()?, &kernels::Attention { heads });
    }
    let (b, n, c) = q.dims3()?;
    let m = k.dim(1)?;
    let d = c / heads;
    let split = |x: &Tensor, len: usize| x.reshape((b, len, heads, d))?.transpose(1, 2)?.reshape((b * heads, len, d));
    let (q, k, v) = (split(q, n)?, split(k, m)?, split(v, m)?);
    let kt = k.t()?.contiguous()?;
    let scale = 1.0 / (d as f64).sqrt();
    let per = (ATTENTION_SCORE_BYTES / (n * m * 4).max(1)).clamp(1, b * heads);
    let mut outs = Vec::with_capacity((b * heads).div_ceil(per));
    let mut at = 0;
    while at < b * heads {
        let len = per.min(b * heads - at);
        let scores = (q.narrow(0, at, len)?.matmul(&kt.narrow(0, at, len)?)? * scale)?;
        let scores = match mask {
            Some(mk) => scores.broadcast_add(mk)?,
            None => scores,
        };
        let p = candle_nn::ops::softmax_last_dim(&scores)?;
        outs.push(p.matmul(&v.narrow(0, at, len)?)?);
        at += len;
    }
    let o = if outs.len() == 1 { outs.pop().expect("one slice") } else { Tensor::cat(&outs, 0)? };
    o.reshape((b, heads, n, d))?.transpose(1, 2)?.reshape((b, n, c))
}

/// `[B, C, H, W]` → `[B, H·W, C]`.
pub(crate) fn to_tokens(x: &Tensor) -> CResult<Tensor> {
    let (b, c, h, w) = x.dims4()?;
    x.reshape((b, c, h * w))?.transpose(1, 2)?.contiguous()
}

/// `[B, H·W, C]` → `[B, C, H, W]`.
pub(crate) fn from_tokens(x: &Tensor, h: usize, w: usize) -> CResult<Tensor> {
    let (b, _, c) = x.dims3()?;
    x.transpose(1, 2)?.reshape((b, c, h, w))
}

/// The exact (erf) GELU, as `torch.nn.functional.gelu` (diffusers' GEGLU, OpenCLIP).
pub(crate) fn gelu(x: &Tensor) -> CResult<Tensor> {
    x.gelu_erf()
}

/// diffusers' `GEGLU` on its projection's output: the first half of the last dimension times
/// the exact GELU of the second half.
pub(crate) fn geglu(x: &Tensor) -> CResult<Tensor> {
    if x.device().is_cpu() {
        return x.contiguous()?.apply_op1_no_bwd(&kernels::Geglu);
    }
    let (h, gate) = halves(x)?;
    h * gelu(&gate)?
}

/// transformers' `quick_gelu`: x·σ(1.702x) (OpenAI CLIP).
pub(crate) fn quick_gelu(x: &Tensor) -> CResult<Tensor> {
    x * candle_nn::ops::sigmoid(&(x * 1.702)?)?
}

/// Split the last dimension in two halves.
pub(crate) fn halves(x: &Tensor) -> CResult<(Tensor, Tensor)> {
    let n = x.dim(D::Minus1)? / 2;
    Ok((x.narrow(D::Minus1, 0, n)?, x.narrow(D::Minus1, n, n)?))
}
