//! The SD 1.x/2.x denoiser: diffusers' `UNet2DConditionModel` (unet_2d_condition.py,
//! unet_2d_blocks.py, transformer_2d.py, attention.py) for the configurations SD 1.x and 2.x
//! use — any widths, depths, level count and head counts: sinusoidal time embedding
//! (`Timesteps`, `TimestepEmbedding`), `CrossAttnDownBlock2D`/`DownBlock2D`,
//! `UNetMidBlock2DCrossAttn`, `CrossAttnUpBlock2D`/`UpBlock2D`, `Transformer2DModel` with
//! `BasicTransformerBlock` (self-attention, cross-attention, GEGLU feed-forward). Parameters are
//! read under diffusers' names; the caller's `VarBuilder` maps them to the base's keys.

use candle_core::{Device, Module, Tensor};
use candle_nn::{LayerNorm, VarBuilder};

use super::config::UnetConfig;
use super::nn::{self, Conv2d, GroupNorm, Linear, Resnet, ResnetCfg};
use crate::model::CResult;

#[derive(Debug)]
struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
}

impl Attention {
    fn load(vb: VarBuilder, dim: usize, context: usize, heads: usize) -> CResult<Self> {
        Ok(Attention {
            to_q: nn::linear(vb.pp("to_q"), dim, dim, false)?,
            to_k: nn::linear(vb.pp("to_k"), context, dim, false)?,
            to_v: nn::linear(vb.pp("to_v"), context, dim, false)?,
            to_out: nn::linear(vb.pp("to_out.0"), dim, dim, true)?,
            heads,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> CResult<Tensor> {
        let q = self.to_q.forward(x)?;
        let k = self.to_k.forward(context)?;
        let v = self.to_v.forward(context)?;
        self.to_out.forward(&nn::attention(&q, &k, &v, self.heads, None)?)
    }
}

/// `BasicTransformerBlock` with `norm_type="layer_norm"`: x + attn1(norm1 x), + attn2(norm2 x,
/// context), + ff(norm3 x), the feed-forward a GEGLU of 4× width.
#[derive(Debug)]
struct TransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff_in: Linear,
    ff_out: Linear,
}

impl TransformerBlock {
    fn load(vb: VarBuilder, dim: usize, context: usize, heads: usize) -> CResult<Self> {
        Ok(TransformerBlock {
            norm1: nn::layer_norm(vb.pp("norm1"), dim, 1e-5)?,
            attn1: Attention::load(vb.pp("attn1"), dim, dim, heads)?,
            norm2: nn::layer_norm(vb.pp("norm2"), dim, 1e-5)?,
            attn2: Attention::load(vb.pp("attn2"), dim, context, heads)?,
            norm3: nn::layer_norm(vb.pp("norm3"), dim, 1e-5)?,
            ff_in: nn::linear(vb.pp("ff.net.0.proj"), dim, dim * 8, true)?,
            ff_out: nn::linear(vb.pp("ff.net.2"), dim * 4, dim, true)?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> CResult<Tensor> {
        let n1 = self.norm1.forward(x)?;
        let x = nn::add(&self.attn1.forward(&n1, &n1)?, x)?;
        let x = nn::add(&self.attn2.forward(&self.norm2.forward(&x)?, context)?, &x)?;
        nn::add(&self.ff_out.forward(&nn::geglu(&self.ff_in.forward(&self.norm3.forward(&x)?)?)?)?, &x)
    }
}

#[derive(Debug)]
enum Proj {
    Conv(Conv2d),
    Linear(Linear),
}

/// `Transformer2DModel` on a feature map: GroupNorm (eps 1e-6), projection in (1×1 conv, or
/// linear with `use_linear_projection`), the blocks, projection out, plus the input.
#[derive(Debug)]
struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Proj,
    blocks: Vec<TransformerBlock>,
    proj_out: Proj,
}

impl SpatialTransformer {
    fn load(vb: VarBuilder, c: usize, heads: usize, depth: usize, cfg: &UnetConfig) -> CResult<Self> {
        let proj = |name: &str| -> CResult<Proj> {
            Ok(if cfg.linear_projection {
                Proj::Linear(nn::linear(vb.pp(name), c, c, true)?)
            } else {
                Proj::Conv(nn::conv(vb.pp(name), c, c, 1, 1, 0)?)
            })
        };
        let vbb = vb.pp("transformer_blocks");
        let blocks = (0..depth)
            .map(|d| TransformerBlock::load(vbb.pp(d), c, cfg.cross_attention_dim, heads))
            .collect::<CResult<_>>()?;
        Ok(SpatialTransformer {
            norm: nn::group_norm(vb.pp("norm"), cfg.groups, c, 1e-6)?,
            proj_in: proj("proj_in")?,
            blocks,
            proj_out: proj("proj_out")?,
        })
    }

    fn forward(&self, x: &Tensor, context: &Tensor) -> CResult<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let n = self.norm.forward(x)?;
        let mut t = match &self.proj_in {
            Proj::Conv(p) => nn::to_tokens(&p.forward(&n)?)?,
            Proj::Linear(p) => p.forward(&nn::to_tokens(&n)?)?,
        };
        for b in &self.blocks {
            t = b.forward(&t, context)?;
        }
        let out = match &self.proj_out {
            Proj::Conv(p) => p.forward(&nn::from_tokens(&t, h, w)?)?,
            Proj::Linear(p) => nn::from_tokens(&p.forward(&t)?, h, w)?,
        };
        nn::add(&out, x)
    }
}

/// One level of the encoder or decoder half: resnets, each followed by its transformer when the
/// level has attention, then the down- or upsampler.
#[derive(Debug)]
struct Level {
    resnets: Vec<Resnet>,
    attentions: Vec<SpatialTransformer>,
    /// Downsampler (stride-2 conv, with diffusers' (0,1,0,1) zero pad when its padding is 0)
    /// or upsampler (nearest ×2, then a 3×3 conv).
    sampler: Option<Conv2d>,
}

#[derive(Debug)]
pub(crate) struct Unet {
    pub cfg: UnetConfig,
    conv_in: Conv2d,
    time_1: Linear,
    time_2: Linear,
    down: Vec<Level>,
    mid_1: Resnet,
    mid_attn: SpatialTransformer,
    mid_2: Resnet,
    up: Vec<Level>,
    norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Unet {
    pub fn load(vb: VarBuilder, cfg: &UnetConfig) -> CResult<Self> {
        let ch = &cfg.channels;
        let n = ch.len();
        let temb = 4 * ch[0];
        let rc = |scale: f64| ResnetCfg { groups: cfg.groups, eps: cfg.eps, temb: Some(temb), scale };
        let mut down = vec![];
        for (i, &c) in ch.iter().enumerate() {
            let vbl = vb.pp("down_blocks").pp(i);
            let mut level = Level { resnets: vec![], attentions: vec![], sampler: None };
            for j in 0..cfg.layers_per_block {
                let cin = if j == 0 { ch[i.saturating_sub(1)] } else { c };
                level.resnets.push(Resnet::load(vbl.pp("resnets").pp(j), cin, c, rc(1.0))?);
                if cfg.down_attn[i] {
                    let a = SpatialTransformer::load(vbl.pp("attentions").pp(j), c, cfg.heads[i], cfg.depth[i], cfg)?;
                    level.attentions.push(a);
                }
            }
            if i + 1 < n {
                let p = cfg.downsample_padding;
                let conv = nn::conv(vbl.pp("downsamplers.0.conv"), c, c, 3, 2, p)?;
                level.sampler = Some(conv.with_end_padding(usize::from(p == 0)));
            }
            down.push(level);
        }
        let last = n - 1;
        let vbm = vb.pp("mid_block");
        let mid_1 = Resnet::load(vbm.pp("resnets.0"), ch[last], ch[last], rc(cfg.mid_scale))?;
        let mid_attn =
            SpatialTransformer::load(vbm.pp("attentions.0"), ch[last], cfg.heads[last], cfg.depth[last], cfg)?;
        let mid_2 = Resnet::load(vbm.pp("resnets.1"), ch[last], ch[last], rc(cfg.mid_scale))?;
        let mut up = vec![];
        for i in 0..n {
            let level_of = n - 1 - i;
            let out = ch[level_of];
            let prev = if i == 0 { ch[last] } else { ch[n - i] };
            let input = ch[level_of.saturating_sub(1)];
            let vbl = vb.pp("up_blocks").pp(i);
            let mut level = Level { resnets: vec![], attentions: vec![], sampler: None };
            for j in 0..=cfg.layers_per_block {
                let skip = if j == cfg.layers_per_block { input } else { out };
                let cin = if j == 0 { prev } else { out };
                level.resnets.push(Resnet::load(vbl.pp("resnets").pp(j), cin + skip, out, rc(1.0))?);
                if cfg.up_attn[i] {
                    let (h, d) = (cfg.heads[level_of], cfg.depth[level_of]);
                    level.attentions.push(SpatialTransformer::load(vbl.pp("attentions").pp(j), out, h, d, cfg)?);
                }
            }
            if i + 1 < n {
                level.sampler = Some(nn::conv(vbl.pp("upsamplers.0.conv"), out, out, 3, 1, 1)?);
            }
            up.push(level);
        }
        Ok(Unet {
            cfg: cfg.clone(),
            conv_in: nn::conv(vb.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            time_1: nn::linear(vb.pp("time_embedding.linear_1"), ch[0], temb, true)?,
            time_2: nn::linear(vb.pp("time_embedding.linear_2"), temb, temb, true)?,
            down,
            mid_1,
            mid_attn,
            mid_2,
            up,
            norm_out: nn::group_norm(vb.pp("conv_norm_out"), cfg.groups, ch[0], cfg.eps)?,
            conv_out: nn::conv(vb.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// diffusers' `get_timestep_embedding` (embeddings.py) in f32 as it computes it:
    /// exponent_i = −ln(10000)·i / (half − freq_shift), arguments t·e^exponent, [sin | cos]
    /// (or [cos | sin] with `flip_sin_to_cos`), zero-padded when the width is odd.
    fn time_features(&self, t: &[f64], dev: &Device) -> CResult<Tensor> {
        let dim = self.cfg.channels[0];
        let half = dim / 2;
        let freqs: Vec<f32> = (0..half)
            .map(|i| {
                let e = (-(10000f64.ln() as f32) * i as f32) / (half as f32 - self.cfg.freq_shift as f32);
                e.exp()
            })
            .collect();
        let mut v = Vec::with_capacity(t.len() * dim);
        for &ti in t {
            let args: Vec<f32> = freqs.iter().map(|f| ti as f32 * f).collect();
            let (sin, cos): (Vec<f32>, Vec<f32>) = args.iter().map(|a| (a.sin(), a.cos())).unzip();
            if self.cfg.flip_sin_to_cos {
                v.extend(&cos);
                v.extend(&sin);
            } else {
                v.extend(&sin);
                v.extend(&cos);
            }
            if dim % 2 == 1 {
                v.push(0.0);
            }
        }
        Tensor::from_vec(v, (t.len(), dim), dev)
    }

    /// The UNet's output for latents `x` `[B, C, h, w]` at timesteps `t` (one per sample, or
    /// one for all) under text `context` `[B or 1, L, D]`.
    pub fn forward(&self, x: &Tensor, t: &[f64], context: &Tensor) -> CResult<Tensor> {
        let b = x.dim(0)?;
        let t: Vec<f64> = if t.len() == 1 { vec![t[0]; b] } else { t.to_vec() };
        if t.len() != b {
            candle_core::bail!("{} timesteps for a batch of {b}", t.len());
        }
        let context = if context.dim(0)? == 1 && b > 1 {
            let (_, l, d) = context.dims3()?;
            context.broadcast_as((b, l, d))?.contiguous()?
        } else {
            context.clone()
        };
        let emb = self.time_features(&t, x.device())?;
        let emb = self.time_2.forward(&candle_nn::ops::silu(&self.time_1.forward(&emb)?)?)?;
        let x = if self.cfg.center_input_sample { ((x * 2.0)? - 1.0)? } else { x.clone() };
        let mut h = self.conv_in.forward(&x)?;
        let mut skips = vec![h.clone()];
        for level in &self.down {
            for (j, r) in level.resnets.iter().enumerate() {
                h = r.forward(&h, Some(&emb))?;
                if let Some(a) = level.attentions.get(j) {
                    h = a.forward(&h, &context)?;
                }
                skips.push(h.clone());
            }
            if let Some(s) = &level.sampler {
                h = s.forward(&h)?;
                skips.push(h.clone());
            }
        }
        h = self.mid_1.forward(&h, Some(&emb))?;
        h = self.mid_attn.forward(&h, &context)?;
        h = self.mid_2.forward(&h, Some(&emb))?;
        for level in &self.up {
            for (j, r) in level.resnets.iter().enumerate() {
                let skip =
                    skips.pop().ok_or_else(|| candle_core::Error::Msg("UNet skip connections ran out".into()))?;
                h = r.forward(&Tensor::cat(&[&h, &skip], 1)?, Some(&emb))?;
                if let Some(a) = level.attentions.get(j) {
                    h = a.forward(&h, &context)?;
                }
            }
            if let Some(s) = &level.sampler {
                // To the size of the skip it meets next: ×2, or the odd size diffusers passes as
                // `upsample_size` when the latent side is not a multiple of 2^levels.
                let (th, tw) = match skips.last() {
                    Some(n) => (n.dim(2)?, n.dim(3)?),
                    None => (h.dim(2)? * 2, h.dim(3)? * 2),
                };
                h = s.forward_owned(h.upsample_nearest2d(th, tw)?)?;
            }
        }
        let h = self.norm_out.forward_silu(&h)?;
        self.conv_out.forward(&h)
    }
}
