//! The SD autoencoder: diffusers' `AutoencoderKL` (autoencoder_kl.py, vae.py `Encoder` and
//! `Decoder`, `UNetMidBlock2D` with its single-head `Attention`), any widths and level count.
//! The encoder gives the latent distribution's mean (the first `latent_channels` channels of
//! `quant_conv`'s output, as `DiagonalGaussianDistribution.mean`); nothing is sampled.

use candle_core::{Module, Tensor};
use candle_nn::VarBuilder;

use super::config::VaeConfig;
use super::nn::{self, Conv2d, GroupNorm, Linear, Resnet, ResnetCfg};
use crate::model::CResult;

/// diffusers' resnets, attention and output norm in the VAE all use eps 1e-6.
const EPS: f64 = 1e-6;

/// The middle block's attention: GroupNorm, one head over all channels (`attention_head_dim`
/// = the width), biased q/k/v/out projections, plus the input.
#[derive(Debug)]
struct MidAttention {
    norm: GroupNorm,
    q: Linear,
    k: Linear,
    v: Linear,
    out: Linear,
}

impl MidAttention {
    fn load(vb: VarBuilder, c: usize, groups: usize) -> CResult<Self> {
        Ok(MidAttention {
            norm: nn::group_norm(vb.pp("group_norm"), groups, c, EPS)?,
            q: nn::linear(vb.pp("to_q"), c, c, true)?,
            k: nn::linear(vb.pp("to_k"), c, c, true)?,
            v: nn::linear(vb.pp("to_v"), c, c, true)?,
            out: nn::linear(vb.pp("to_out.0"), c, c, true)?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let (_, _, h, w) = x.dims4()?;
        let t = nn::to_tokens(&self.norm.forward(x)?)?;
        let a = nn::attention(&self.q.forward(&t)?, &self.k.forward(&t)?, &self.v.forward(&t)?, 1, None)?;
        nn::add(&nn::from_tokens(&self.out.forward(&a)?, h, w)?, x)
    }
}

#[derive(Debug)]
struct Mid {
    r1: Resnet,
    attn: Option<MidAttention>,
    r2: Resnet,
}

impl Mid {
    fn load(vb: VarBuilder, c: usize, cfg: &VaeConfig) -> CResult<Self> {
        let rc = ResnetCfg { groups: cfg.groups, eps: EPS, temb: None, scale: 1.0 };
        Ok(Mid {
            r1: Resnet::load(vb.pp("resnets.0"), c, c, rc)?,
            attn: cfg.mid_attention.then(|| MidAttention::load(vb.pp("attentions.0"), c, cfg.groups)).transpose()?,
            r2: Resnet::load(vb.pp("resnets.1"), c, c, rc)?,
        })
    }

    fn forward(&self, x: &Tensor) -> CResult<Tensor> {
        let mut h = self.r1.forward(x, None)?;
        if let Some(a) = &self.attn {
            h = a.forward(&h)?;
        }
        self.r2.forward(&h, None)
    }
}

#[derive(Debug)]
struct Block {
    resnets: Vec<Resnet>,
    sampler: Option<Conv2d>,
}

#[derive(Debug)]
pub(crate) struct Vae {
    pub cfg: VaeConfig,
    enc_in: Conv2d,
    enc_blocks: Vec<Block>,
    enc_mid: Mid,
    enc_norm: GroupNorm,
    enc_out: Conv2d,
    quant: Option<Conv2d>,
    post_quant: Option<Conv2d>,
    dec_in: Conv2d,
    dec_mid: Mid,
    dec_blocks: Vec<Block>,
    dec_norm: GroupNorm,
    dec_out: Conv2d,
}

impl Vae {
    pub fn load(vb: VarBuilder, cfg: &VaeConfig) -> CResult<Self> {
        let ch = &cfg.channels;
        let (n, last) = (ch.len(), ch[ch.len() - 1]);
        let lat = cfg.latent_channels;
        let rc = ResnetCfg { groups: cfg.groups, eps: EPS, temb: None, scale: 1.0 };
        let enc = vb.pp("encoder");
        let mut enc_blocks = vec![];
        for (i, &c) in ch.iter().enumerate() {
            let vbl = enc.pp("down_blocks").pp(i);
            let resnets = (0..cfg.layers_per_block)
                .map(|j| Resnet::load(vbl.pp("resnets").pp(j), if j == 0 { ch[i.saturating_sub(1)] } else { c }, c, rc))
                .collect::<CResult<_>>()?;
            // Downsample2D(padding=0): zero pad right and bottom by one, then a stride-2 conv.
            let sampler = (i + 1 < n)
                .then(|| nn::conv(vbl.pp("downsamplers.0.conv"), c, c, 3, 2, 0).map(|s| s.with_end_padding(1)))
                .transpose()?;
            enc_blocks.push(Block { resnets, sampler });
        }
        let dec = vb.pp("decoder");
        let mut dec_blocks = vec![];
        let mut prev = last;
        for i in 0..n {
            let out = ch[n - 1 - i];
            let vbl = dec.pp("up_blocks").pp(i);
            let resnets = (0..=cfg.layers_per_block)
                .map(|j| Resnet::load(vbl.pp("resnets").pp(j), if j == 0 { prev } else { out }, out, rc))
                .collect::<CResult<_>>()?;
            let sampler = (i + 1 < n).then(|| nn::conv(vbl.pp("upsamplers.0.conv"), out, out, 3, 1, 1)).transpose()?;
            dec_blocks.push(Block { resnets, sampler });
            prev = out;
        }
        Ok(Vae {
            cfg: cfg.clone(),
            enc_in: nn::conv(enc.pp("conv_in"), cfg.in_channels, ch[0], 3, 1, 1)?,
            enc_blocks,
            enc_mid: Mid::load(enc.pp("mid_block"), last, cfg)?,
            enc_norm: nn::group_norm(enc.pp("conv_norm_out"), cfg.groups, last, EPS)?,
            enc_out: nn::conv(enc.pp("conv_out"), last, 2 * lat, 3, 1, 1)?,
            quant: cfg.quant_conv.then(|| nn::conv(vb.pp("quant_conv"), 2 * lat, 2 * lat, 1, 1, 0)).transpose()?,
            post_quant: cfg
                .post_quant_conv
                .then(|| nn::conv(vb.pp("post_quant_conv"), lat, lat, 1, 1, 0))
                .transpose()?,
            dec_in: nn::conv(dec.pp("conv_in"), lat, last, 3, 1, 1)?,
            dec_mid: Mid::load(dec.pp("mid_block"), last, cfg)?,
            dec_blocks,
            dec_norm: nn::group_norm(dec.pp("conv_norm_out"), cfg.groups, ch[0], EPS)?,
            dec_out: nn::conv(dec.pp("conv_out"), ch[0], cfg.out_channels, 3, 1, 1)?,
        })
    }

    /// The latent mean of pixels `[B, 3, H, W]` in [-1, 1] (not scaled).
    pub fn encode_mean(&self, x: &Tensor) -> CResult<Tensor> {
        let mut h = self.enc_in.forward(x)?;
        for b in &self.enc_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(s) = &b.sampler {
                h = s.forward(&h)?;
            }
        }
        h = self.enc_mid.forward(&h)?;
        h = self.enc_out.forward_owned(self.enc_norm.forward_silu(&h)?)?;
        if let Some(q) = &self.quant {
            h = q.forward(&h)?;
        }
        h.narrow(1, 0, self.cfg.latent_channels)
    }

    /// Pixels (nominally in [-1, 1], not clamped) of unscaled latents `[B, C, h, w]`.
    pub fn decode(&self, z: &Tensor) -> CResult<Tensor> {
        let mut h = match &self.post_quant {
            Some(p) => p.forward(z)?,
            None => z.clone(),
        };
        h = self.dec_in.forward(&h)?;
        h = self.dec_mid.forward(&h)?;
        for b in &self.dec_blocks {
            for r in &b.resnets {
                h = r.forward(&h, None)?;
            }
            if let Some(s) = &b.sampler {
                let (hh, ww) = (h.dim(2)?, h.dim(3)?);
                h = s.forward_owned(h.upsample_nearest2d(2 * hh, 2 * ww)?)?;
            }
        }
        self.dec_out.forward_owned(self.dec_norm.forward_silu(&h)?)
    }
}
