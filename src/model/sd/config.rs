//! The hyper-parameters of a Stable Diffusion 1.x/2.x model: UNet, VAE and CLIP text encoder,
//! read from a diffusers pipeline's `config.json` files (diffusers' `UNet2DConditionModel`,
//! `AutoencoderKL`, transformers' `CLIPTextConfig`, with their defaults) or inferred from the
//! tensor shapes of a single-file original-LDM checkpoint (the rules are in
//! docs/image-runtime.md, after diffusers' `create_unet_diffusers_config` /
//! `create_vae_diffusers_config` in `single_file_utils.py`, which read them off the original
//! YAML instead). Everything the runtime cannot run (SDXL conditioning, other block types) is
//! refused here with what is missing, never run as something else.

use std::path::Path;

use serde_json::Value;

use crate::error::{Error, Result};
use crate::load::BaseModel;

/// Largest pixel side an image model may declare (`sample_size`): SD 1.x/2.x work at 512 and
/// 768; the probe allocates images of this side, so a config cannot ask for more.
pub(crate) const MAX_SD_RESOLUTION: usize = 4096;
/// Most resolution levels, layers per block or transformer blocks per attention a config or a
/// checkpoint may declare (SD 1.x/2.x: 4 levels, 2 layers, depth 1).
pub(crate) const MAX_SD_BLOCKS: usize = 16;

/// Where the single-file checkpoint keeps each component (original LDM / CompVis names).
pub(crate) const LDM_UNET: &str = "model.diffusion_model.";
pub(crate) const LDM_VAE: &str = "first_stage_model.";
/// SD 1.x: OpenAI CLIP ViT-L/14 as transformers' `CLIPTextModel`.
pub(crate) const LDM_CLIP: &str = "cond_stage_model.transformer.";
/// SD 2.x: OpenCLIP ViT-H/14 in open_clip's own names.
pub(crate) const LDM_OPENCLIP: &str = "cond_stage_model.model.";

crate::named::closed_set! {
    /// The model family, by its text encoder: SD 1.x (CLIP ViT-L, context 768) or SD 2.x
    /// (OpenCLIP ViT-H, context 1024).
    pub enum SdFamily ("Stable Diffusion family") {
        Sd1 = "SD1",
        Sd2 = "SD2",
    }
}

crate::named::closed_set! {
    /// How the base is stored.
    pub enum SdLayout ("base layout") {
        DiffusersDir = "diffusers-dir",
        SingleFile = "single-file",
    }
}

/// The text encoder's activation (`hidden_act`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Act {
    /// x·σ(1.702x), OpenAI CLIP (SD 1.x).
    QuickGelu,
    /// The exact (erf) GELU, OpenCLIP (SD 2.x).
    Gelu,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct UnetConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    /// `block_out_channels`, one per resolution level.
    pub channels: Vec<usize>,
    /// Whether each down block (level order) has cross-attention.
    pub down_attn: Vec<bool>,
    /// Whether each up block (up-block order: deepest level first) has cross-attention.
    pub up_attn: Vec<bool>,
    pub layers_per_block: usize,
    /// Transformer blocks per attention, per level (down order; up blocks use it reversed).
    pub depth: Vec<usize>,
    /// Attention heads per level (diffusers' `attention_head_dim` in SD configs is this count).
    pub heads: Vec<usize>,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub eps: f64,
    pub linear_projection: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub downsample_padding: usize,
    pub mid_scale: f64,
    pub center_input_sample: bool,
    /// Latent side the model was trained at.
    pub sample_size: usize,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct VaeConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub channels: Vec<usize>,
    pub layers_per_block: usize,
    pub latent_channels: usize,
    pub groups: usize,
    /// Pixel side the model works at.
    pub sample_size: usize,
    pub scaling_factor: f64,
    pub quant_conv: bool,
    pub post_quant_conv: bool,
    pub mid_attention: bool,
}

#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ClipConfig {
    pub vocab_size: usize,
    pub hidden: usize,
    pub intermediate: usize,
    pub layers: usize,
    pub heads: usize,
    pub positions: usize,
    pub act: Act,
    pub eps: f64,
}

/// A JSON config file and the typed reads of its fields, each failing with the file and key.
pub(crate) struct Json<'a> {
    pub path: &'a Path,
    pub v: &'a Value,
}

impl<'a> Json<'a> {
    pub fn parse(path: &'a Path, v: &'a Value) -> Result<Self> {
        if !v.is_object() {
            return Err(Error::input(path, "a configuration file must hold a JSON object"));
        }
        Ok(Json { path, v })
    }

    fn bad(&self, key: &str, want: &str) -> Error {
        Error::input(self.path, format!("{key}: expected {want}, found {}", short(&self.v[key])))
    }

    /// The field, `None` when absent or null.
    pub fn get(&self, key: &str) -> Option<&'a Value> {
        self.v.get(key).filter(|x| !x.is_null())
    }

    pub fn usize(&self, key: &str, default: usize) -> Result<usize> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => as_usize(x).ok_or_else(|| self.bad(key, "a non-negative integer")),
        }
    }

    pub fn f64(&self, key: &str, default: f64) -> Result<f64> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x.as_f64().filter(|f| f.is_finite()).ok_or_else(|| self.bad(key, "a finite number")),
        }
    }

    pub fn bool(&self, key: &str, default: bool) -> Result<bool> {
        match self.get(key) {
            None => Ok(default),
            Some(x) => x.as_bool().ok_or_else(|| self.bad(key, "true or false")),
        }
    }

    pub fn str(&self, key: &str) -> Result<Option<&'a str>> {
        match self.get(key) {
            None => Ok(None),
            Some(x) => x.as_str().map(Some).ok_or_else(|| self.bad(key, "a string")),
        }
    }

    /// A list of non-negative integers, or one integer meaning `n` copies of it.
    pub fn usize_per(&self, key: &str, n: usize, default: usize) -> Result<Vec<usize>> {
        match self.get(key) {
            None => Ok(vec![default; n]),
            Some(Value::Array(a)) => {
                let v: Option<Vec<usize>> = a.iter().map(as_usize).collect();
                let v = v.ok_or_else(|| self.bad(key, "a list of non-negative integers"))?;
                if v.len() != n {
                    return Err(Error::input(self.path, format!("{key}: {} values for {n} blocks", v.len())));
                }
                Ok(v)
            }
            Some(x) => Ok(vec![as_usize(x).ok_or_else(|| self.bad(key, "an integer or a list of integers"))?; n]),
        }
    }

    pub fn strings(&self, key: &str) -> Result<Option<Vec<&'a str>>> {
        match self.get(key) {
            None => Ok(None),
            Some(Value::Array(a)) => {
                let v: Option<Vec<&str>> = a.iter().map(Value::as_str).collect();
                v.map(Some).ok_or_else(|| self.bad(key, "a list of strings"))
            }
            Some(_) => Err(self.bad(key, "a list of strings")),
        }
    }

    /// Refuse a field that is set to anything but one of `allowed` (absent and null are fine).
    fn only(&self, key: &str, allowed: &[Value], what: &str) -> Result<()> {
        match self.get(key) {
            Some(x) if !allowed.contains(x) => Err(Error::input(
                self.path,
                format!("{key} = {}: {what}, which the image runtime does not run", short(x)),
            )),
            _ => Ok(()),
        }
    }
}

fn as_usize(x: &Value) -> Option<usize> {
    x.as_u64().map(|u| u as usize).or_else(|| x.as_f64().filter(|f| f.fract() == 0.0 && *f >= 0.0).map(|f| f as usize))
}

/// A JSON value quoted in a message, cut to a readable length.
fn short(v: &Value) -> String {
    let s = v.to_string();
    if s.chars().count() > 60 {
        format!("{}…", s.chars().take(60).collect::<String>())
    } else {
        s
    }
}

fn check_blocks(path: &Path, what: &str, n: usize) -> Result<()> {
    if n == 0 || n > MAX_SD_BLOCKS {
        return Err(Error::input(path, format!("{what} is {n}; between 1 and {MAX_SD_BLOCKS} are supported")));
    }
    Ok(())
}

/// The SDXL message: what SDXL needs that an SD 1.x/2.x runtime lacks.
pub(crate) const SDXL_REFUSED: &str = "an SDXL base, which the image runtime does not run: SDXL needs two \
     text encoders (CLIP ViT-L and OpenCLIP ViT-bigG, their hidden states concatenated), the pooled text \
     embedding and the size/crop time ids of the UNet's add_embedding; SD 1.x and 2.x bases are supported \
     (docs/image-runtime.md)";

impl UnetConfig {
    /// From a diffusers `unet/config.json`.
    pub fn from_diffusers(j: &Json) -> Result<Self> {
        if j.get("addition_embed_type").is_some() || j.get("addition_time_embed_dim").is_some() {
            return Err(Error::input(j.path, format!("addition_embed_type is set: {SDXL_REFUSED}")));
        }
        if let Some(c) = j.str("_class_name")? {
            if c != "UNet2DConditionModel" {
                return Err(Error::input(j.path, format!("a {c}, not a UNet2DConditionModel")));
            }
        }
        let null = || vec![Value::Null];
        j.only("class_embed_type", &null(), "a class embedding")?;
        j.only("num_class_embeds", &null(), "a class embedding")?;
        j.only("time_cond_proj_dim", &null(), "a guidance-conditioned time embedding (LCM)")?;
        j.only("encoder_hid_dim", &null(), "a projected encoder input")?;
        j.only("time_embedding_dim", &null(), "a custom time embedding width")?;
        j.only("time_embedding_act_fn", &null(), "an activated time embedding")?;
        j.only("timestep_post_act", &null(), "an activated time embedding")?;
        j.only("cross_attention_norm", &null(), "a normalised cross-attention input")?;
        j.only("reverse_transformer_layers_per_block", &null(), "per-layer transformer depths in the up blocks")?;
        j.only("time_embedding_type", &["positional".into()], "a time embedding other than sinusoidal")?;
        j.only("resnet_time_scale_shift", &["default".into()], "a scale-shift time conditioning")?;
        j.only("mid_block_type", &["UNetMidBlock2DCrossAttn".into()], "another middle block")?;
        j.only("attention_type", &["default".into()], "gated attention")?;
        j.only("act_fn", &["silu".into()], "another activation")?;
        j.only("conv_in_kernel", &[3.into()], "another input convolution")?;
        j.only("conv_out_kernel", &[3.into()], "another output convolution")?;
        j.only("dual_cross_attention", &[false.into()], "dual cross-attention")?;
        j.only("only_cross_attention", &[false.into()], "cross-attention without self-attention")?;
        j.only("class_embeddings_concat", &[false.into()], "concatenated class embeddings")?;
        j.only("resnet_skip_time_act", &[false.into()], "another resnet time path")?;
        j.only("resnet_out_scale_factor", &[1.into(), 1.0.into()], "rescaled resnets")?;
        if j.get("cross_attention_dim").is_some_and(Value::is_array) {
            return Err(Error::input(j.path, "cross_attention_dim per block is not supported"));
        }
        let channels = match j.get("block_out_channels") {
            Some(Value::Array(a)) => {
                let v: Option<Vec<usize>> = a.iter().map(as_usize).collect();
                v.ok_or_else(|| j.bad("block_out_channels", "a list of integers"))?
            }
            None => vec![320, 640, 1280, 1280],
            Some(_) => return Err(j.bad("block_out_channels", "a list of integers")),
        };
        let n = channels.len();
        check_blocks(j.path, "the number of UNet levels", n)?;
        let down = j.strings("down_block_types")?.unwrap_or_else(|| {
            vec!["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"]
        });
        let up = j
            .strings("up_block_types")?
            .unwrap_or_else(|| vec!["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"]);
        if down.len() != n || up.len() != n {
            return Err(Error::input(
                j.path,
                format!("{n} block_out_channels, {} down and {} up block types", down.len(), up.len()),
            ));
        }
        let kind = |t: &str, plain: &str, attn: &str| -> Result<bool> {
            match t {
                _ if t == plain => Ok(false),
                _ if t == attn => Ok(true),
                other => Err(Error::input(
                    j.path,
                    format!("block type {other}: the image runtime runs {plain} and {attn} (SD 1.x/2.x)"),
                )),
            }
        };
        let down_attn = down.iter().map(|t| kind(t, "DownBlock2D", "CrossAttnDownBlock2D")).collect::<Result<_>>()?;
        let up_attn = up.iter().map(|t| kind(t, "UpBlock2D", "CrossAttnUpBlock2D")).collect::<Result<_>>()?;
        let lpb = j.usize_per("layers_per_block", n, 2)?;
        if lpb.iter().any(|&l| l != lpb[0]) {
            return Err(Error::input(j.path, "layers_per_block differs between blocks, which is not supported"));
        }
        check_blocks(j.path, "layers_per_block", lpb[0])?;
        let depth = j.usize_per("transformer_layers_per_block", n, 1)?;
        for &d in &depth {
            check_blocks(j.path, "transformer_layers_per_block", d)?;
        }
        // diffusers: `num_attention_heads = num_attention_heads or attention_head_dim` (the SD
        // configs' `attention_head_dim` has always counted heads).
        let heads = match j.get("num_attention_heads") {
            Some(_) => j.usize_per("num_attention_heads", n, 8)?,
            None => j.usize_per("attention_head_dim", n, 8)?,
        };
        let cfg = UnetConfig {
            in_channels: j.usize("in_channels", 4)?,
            out_channels: j.usize("out_channels", 4)?,
            channels,
            down_attn,
            up_attn,
            layers_per_block: lpb[0],
            depth,
            heads,
            cross_attention_dim: j.usize("cross_attention_dim", 1280)?,
            groups: j.usize("norm_num_groups", 32)?,
            eps: j.f64("norm_eps", 1e-5)?,
            linear_projection: j.bool("use_linear_projection", false)?,
            flip_sin_to_cos: j.bool("flip_sin_to_cos", true)?,
            freq_shift: j.f64("freq_shift", 0.0)?,
            downsample_padding: j.usize("downsample_padding", 1)?,
            mid_scale: j.f64("mid_block_scale_factor", 1.0)?,
            center_input_sample: j.bool("center_input_sample", false)?,
            sample_size: j.usize("sample_size", 64)?,
        };
        cfg.check(j.path)?;
        Ok(cfg)
    }

    /// Divisibility and range checks shared by both sources.
    fn check(&self, path: &Path) -> Result<()> {
        for (i, &c) in self.channels.iter().enumerate() {
            if c == 0 || self.groups == 0 || !c.is_multiple_of(self.groups) {
                return Err(Error::input(path, format!("level {i}: {c} channels in {} norm groups", self.groups)));
            }
            let h = self.heads[i];
            if (self.down_attn[i] || self.up_attn[self.channels.len() - 1 - i]) && (h == 0 || !c.is_multiple_of(h)) {
                return Err(Error::input(path, format!("level {i}: {c} channels in {h} attention heads")));
            }
        }
        if self.sample_size == 0 || self.sample_size > MAX_SD_RESOLUTION {
            return Err(Error::input(path, format!("sample_size {} is out of range", self.sample_size)));
        }
        Ok(())
    }

    /// Inferred from a single-file checkpoint's `model.diffusion_model.*` shapes; `groups`,
    /// `heads` and the rest that shapes do not show come from `known` when given, else SD's
    /// conventions; `sample_size` (latent side) is the caller's when `known` has none.
    pub fn from_ldm(base: &BaseModel, known: Option<&UnetConfig>, sample_size: usize) -> Result<Self> {
        let bad = |what: String| Error::input(&base.path, format!("single-file UNet: {what}"));
        let shape = |k: &str| base.shape(&format!("{LDM_UNET}{k}")).map(<[usize]>::to_vec);
        let has = |k: &str| base.shape(&format!("{LDM_UNET}{k}")).is_some();
        let conv_in = shape("input_blocks.0.0.weight")
            .filter(|s| s.len() == 4)
            .ok_or_else(|| bad("no 4-d input_blocks.0.0.weight, so this is no original-LDM UNet".into()))?;
        let out = shape("out.2.weight").filter(|s| s.len() == 4).ok_or_else(|| bad("no 4-d out.2.weight".into()))?;
        // Input blocks: conv_in, then per level L resnets and (but the last) one downsampler.
        let mut n_input = 1;
        while n_input <= 4 * MAX_SD_BLOCKS * MAX_SD_BLOCKS
            && base.keys().any(|k| k.starts_with(&format!("{LDM_UNET}input_blocks.{n_input}.")))
        {
            n_input += 1;
        }
        let first_op = (1..n_input).find(|i| has(&format!("input_blocks.{i}.0.op.weight")));
        let (levels, l) = match first_op {
            Some(op) => {
                let l = op - 1;
                // 1 + n·L + (n − 1) = n_input  ⇒  n = n_input / (L + 1)
                if l == 0 || !n_input.is_multiple_of(l + 1) {
                    return Err(bad(format!("{n_input} input blocks do not make levels of {l} resnets")));
                }
                (n_input / (l + 1), l)
            }
            None => (1, n_input - 1),
        };
        check_blocks(&base.path, "the number of UNet levels", levels)?;
        check_blocks(&base.path, "layers_per_block", l)?;
        let res = |b: usize, j: usize| format!("input_blocks.{}", b * (l + 1) + j + 1);
        let mut channels = vec![];
        let mut down_attn = vec![];
        let mut depth = vec![];
        for b in 0..levels {
            let c = shape(&format!("{}.0.out_layers.3.weight", res(b, 0)))
                .ok_or_else(|| bad(format!("no {}.0.out_layers.3.weight", res(b, 0))))?[0];
            channels.push(c);
            let attn = has(&format!("{}.1.proj_in.weight", res(b, 0)));
            down_attn.push(attn);
            depth.push(if attn { count_blocks(base, &format!("{LDM_UNET}{}.1", res(b, 0))) } else { 1 });
        }
        let mut up_attn = vec![];
        for i in 0..levels {
            let at = format!("output_blocks.{}.1", i * (l + 1));
            let attn = has(&format!("{at}.proj_in.weight"));
            up_attn.push(attn);
            // diffusers builds the up blocks with the down depths reversed.
            if attn && count_blocks(base, &format!("{LDM_UNET}{at}")) != depth[levels - 1 - i] {
                return Err(bad(format!("{at} has another transformer depth than its down level")));
            }
        }
        if !has("middle_block.1.proj_in.weight") {
            return Err(bad("no attention in middle_block.1 (SD 1.x/2.x always have one)".into()));
        }
        if count_blocks(base, &format!("{LDM_UNET}middle_block.1")) != depth[levels - 1] && down_attn[levels - 1] {
            return Err(bad("the middle block has another transformer depth than the last level".into()));
        }
        let to_k = shape("middle_block.1.transformer_blocks.0.attn2.to_k.weight")
            .ok_or_else(|| bad("no middle_block.1.transformer_blocks.0.attn2.to_k.weight".into()))?;
        let context = to_k.get(1).copied().unwrap_or(0);
        let linear = shape("middle_block.1.proj_in.weight").is_some_and(|s| s.len() == 2);
        // SD 2.x (context 1024, OpenCLIP) uses heads of 64 channels, SD 1.x 8 heads per level.
        let heads = match known {
            Some(k) => k.heads.clone(),
            None if context == 1024 => channels.iter().map(|c| c / 64).collect(),
            None => vec![8; levels],
        };
        let groups = match known {
            Some(k) => k.groups,
            None => {
                if channels.iter().any(|c| !c.is_multiple_of(32)) {
                    return Err(bad(format!(
                        "channels {channels:?} are not multiples of SD's 32 norm groups, and a checkpoint does not \
                         record its group count: give --tokenizer the tokenizer/ folder of the diffusers pipeline \
                         this checkpoint was made from, whose unet/config.json says it"
                    )));
                }
                32
            }
        };
        let d = known.cloned();
        let cfg = UnetConfig {
            in_channels: conv_in[1],
            out_channels: out[0],
            channels,
            down_attn,
            up_attn,
            layers_per_block: l,
            depth,
            heads,
            cross_attention_dim: context,
            groups,
            eps: d.as_ref().map_or(1e-5, |k| k.eps),
            linear_projection: linear,
            flip_sin_to_cos: d.as_ref().is_none_or(|k| k.flip_sin_to_cos),
            freq_shift: d.as_ref().map_or(0.0, |k| k.freq_shift),
            downsample_padding: d.as_ref().map_or(1, |k| k.downsample_padding),
            mid_scale: d.as_ref().map_or(1.0, |k| k.mid_scale),
            center_input_sample: d.as_ref().is_some_and(|k| k.center_input_sample),
            sample_size: d.as_ref().map_or(sample_size, |k| k.sample_size),
        };
        cfg.check(&base.path)?;
        Ok(cfg)
    }

    /// Whether `other` (a companion config) describes the same shapes as `self` (inferred).
    pub fn same_shapes(&self, other: &UnetConfig) -> bool {
        self.in_channels == other.in_channels
            && self.out_channels == other.out_channels
            && self.channels == other.channels
            && self.down_attn == other.down_attn
            && self.up_attn == other.up_attn
            && self.layers_per_block == other.layers_per_block
            && self.cross_attention_dim == other.cross_attention_dim
            && self.linear_projection == other.linear_projection
            && self.depth.iter().zip(&other.depth).zip(&self.down_attn).all(|((a, b), &at)| !at || a == b)
    }
}

/// How many `transformer_blocks.N` an attention at `prefix` has.
fn count_blocks(base: &BaseModel, prefix: &str) -> usize {
    (0..=MAX_SD_BLOCKS)
        .take_while(|d| base.shape(&format!("{prefix}.transformer_blocks.{d}.attn1.to_q.weight")).is_some())
        .count()
}

impl VaeConfig {
    /// From a diffusers `vae/config.json`.
    pub fn from_diffusers(j: &Json) -> Result<Self> {
        if let Some(c) = j.str("_class_name")? {
            if c != "AutoencoderKL" {
                return Err(Error::input(j.path, format!("a {c}, not an AutoencoderKL")));
            }
        }
        j.only("shift_factor", &[Value::Null, 0.into(), 0.0.into()], "a shifted latent (SD3/Flux VAE)")?;
        j.only("act_fn", &["silu".into()], "another activation")?;
        j.only("latents_mean", &[Value::Null], "per-channel latent statistics")?;
        let channels = match j.get("block_out_channels") {
            None => vec![64],
            Some(Value::Array(a)) => {
                let v: Option<Vec<usize>> = a.iter().map(as_usize).collect();
                v.ok_or_else(|| j.bad("block_out_channels", "a list of integers"))?
            }
            Some(_) => return Err(j.bad("block_out_channels", "a list of integers")),
        };
        let n = channels.len();
        check_blocks(j.path, "the number of VAE levels", n)?;
        for (key, want) in [("down_block_types", "DownEncoderBlock2D"), ("up_block_types", "UpDecoderBlock2D")] {
            if let Some(types) = j.strings(key)? {
                if types.len() != n || types.iter().any(|t| *t != want) {
                    return Err(Error::input(j.path, format!("{key}: the image runtime runs {n} × {want}")));
                }
            }
        }
        let cfg = VaeConfig {
            in_channels: j.usize("in_channels", 3)?,
            out_channels: j.usize("out_channels", 3)?,
            channels,
            layers_per_block: j.usize("layers_per_block", 1)?,
            latent_channels: j.usize("latent_channels", 4)?,
            groups: j.usize("norm_num_groups", 32)?,
            sample_size: j.usize("sample_size", 32)?,
            scaling_factor: j.f64("scaling_factor", 0.18215)?,
            quant_conv: j.bool("use_quant_conv", true)?,
            post_quant_conv: j.bool("use_post_quant_conv", true)?,
            mid_attention: j.bool("mid_block_add_attention", true)?,
        };
        cfg.check(j.path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<()> {
        check_blocks(path, "the VAE's layers_per_block", self.layers_per_block)?;
        for &c in &self.channels {
            if c == 0 || self.groups == 0 || !c.is_multiple_of(self.groups) {
                return Err(Error::input(path, format!("VAE: {c} channels in {} norm groups", self.groups)));
            }
        }
        if self.sample_size == 0 || self.sample_size > MAX_SD_RESOLUTION {
            return Err(Error::input(path, format!("VAE sample_size {} is out of range", self.sample_size)));
        }
        if self.scaling_factor.is_nan() || self.scaling_factor <= 0.0 {
            return Err(Error::input(path, "VAE scaling_factor must be positive"));
        }
        Ok(())
    }

    /// How many times the encoder halves the image side.
    pub fn downsamplings(&self) -> usize {
        self.channels.len() - 1
    }

    /// Inferred from `first_stage_model.*` shapes; groups, sample size and scaling factor from
    /// `known` when given, else SD's (32, 512, 0.18215).
    pub fn from_ldm(base: &BaseModel, known: Option<&VaeConfig>, sample_size: usize) -> Result<Self> {
        let bad = |what: String| Error::input(&base.path, format!("single-file VAE: {what}"));
        let shape = |k: &str| base.shape(&format!("{LDM_VAE}{k}")).map(<[usize]>::to_vec);
        let conv_in = shape("encoder.conv_in.weight")
            .filter(|s| s.len() == 4)
            .ok_or_else(|| bad("no first_stage_model.encoder.conv_in.weight".into()))?;
        let levels = (0..=MAX_SD_BLOCKS)
            .take_while(|i| shape(&format!("encoder.down.{i}.block.0.conv1.weight")).is_some())
            .count();
        check_blocks(&base.path, "the number of VAE levels", levels)?;
        let l = (0..=MAX_SD_BLOCKS)
            .take_while(|j| shape(&format!("encoder.down.0.block.{j}.conv1.weight")).is_some())
            .count();
        let channels = (0..levels)
            .map(|i| {
                shape(&format!("encoder.down.{i}.block.0.conv2.weight"))
                    .map(|s| s[0])
                    .ok_or_else(|| bad(format!("no encoder.down.{i}.block.0.conv2.weight")))
            })
            .collect::<Result<Vec<_>>>()?;
        let conv_out = shape("encoder.conv_out.weight").ok_or_else(|| bad("no encoder.conv_out.weight".into()))?;
        let dec_out = shape("decoder.conv_out.weight").ok_or_else(|| bad("no decoder.conv_out.weight".into()))?;
        let groups = match known {
            Some(k) => k.groups,
            None => {
                if channels.iter().any(|c| !c.is_multiple_of(32)) {
                    return Err(bad(format!(
                        "channels {channels:?} are not multiples of SD's 32 norm groups; give --tokenizer the \
                         tokenizer/ folder of the matching diffusers pipeline, whose vae/config.json says the count"
                    )));
                }
                32
            }
        };
        let cfg = VaeConfig {
            in_channels: conv_in[1],
            out_channels: dec_out[0],
            channels,
            layers_per_block: l,
            latent_channels: conv_out[0] / 2,
            groups,
            sample_size: known.map_or(sample_size, |k| k.sample_size),
            scaling_factor: known.map_or(0.18215, |k| k.scaling_factor),
            quant_conv: shape("quant_conv.weight").is_some(),
            post_quant_conv: shape("post_quant_conv.weight").is_some(),
            mid_attention: shape("encoder.mid.attn_1.q.weight").is_some(),
        };
        cfg.check(&base.path)?;
        Ok(cfg)
    }

    pub fn same_shapes(&self, o: &VaeConfig) -> bool {
        self.in_channels == o.in_channels
            && self.out_channels == o.out_channels
            && self.channels == o.channels
            && self.layers_per_block == o.layers_per_block
            && self.latent_channels == o.latent_channels
            && self.quant_conv == o.quant_conv
            && self.post_quant_conv == o.post_quant_conv
            && self.mid_attention == o.mid_attention
    }
}

impl ClipConfig {
    /// From a transformers `text_encoder/config.json` (`CLIPTextConfig`).
    pub fn from_hf(j: &Json) -> Result<Self> {
        // A full CLIPConfig keeps the text model's fields under text_config.
        let inner;
        let j = match j.get("text_config") {
            Some(tc) => {
                inner = Json::parse(j.path, tc)?;
                &inner
            }
            None => j,
        };
        let act = match j.str("hidden_act")?.unwrap_or("quick_gelu") {
            "quick_gelu" => Act::QuickGelu,
            "gelu" => Act::Gelu,
            other => {
                return Err(Error::input(j.path, format!("hidden_act {other:?}: quick_gelu and gelu are supported")))
            }
        };
        let cfg = ClipConfig {
            vocab_size: j.usize("vocab_size", 49408)?,
            hidden: j.usize("hidden_size", 512)?,
            intermediate: j.usize("intermediate_size", 2048)?,
            layers: j.usize("num_hidden_layers", 12)?,
            heads: j.usize("num_attention_heads", 8)?,
            positions: j.usize("max_position_embeddings", 77)?,
            act,
            eps: j.f64("layer_norm_eps", 1e-5)?,
        };
        cfg.check(j.path)?;
        Ok(cfg)
    }

    fn check(&self, path: &Path) -> Result<()> {
        use crate::model::config::{MAX_HEADS, MAX_LAYERS, MAX_POSITIONS, MAX_VOCAB, MAX_WIDTH};
        if self.heads == 0 || !self.hidden.is_multiple_of(self.heads) || self.heads > MAX_HEADS {
            return Err(Error::input(path, format!("text encoder: {} channels in {} heads", self.hidden, self.heads)));
        }
        if self.layers == 0 || self.layers > MAX_LAYERS || self.hidden > MAX_WIDTH || self.intermediate > 4 * MAX_WIDTH
        {
            return Err(Error::input(path, "text encoder: layer count or width out of range"));
        }
        if self.positions < 2 || self.positions > MAX_POSITIONS || self.vocab_size > MAX_VOCAB {
            return Err(Error::input(path, "text encoder: positions or vocabulary out of range"));
        }
        Ok(())
    }

    /// Inferred from the CLIP shapes of a single-file checkpoint whose text model sits under
    /// `prefix` (transformers' names) or, for SD 2.x, OpenCLIP's names under `cond_stage_model.model.`.
    /// Heads: `known` when given, else one head per 64 channels (every released CLIP) or, for
    /// a model narrower than that (test models), heads of 8 channels.
    pub fn from_ldm(base: &BaseModel, text: &TextLayout, known: Option<&ClipConfig>) -> Result<Self> {
        let bad = |what: String| Error::input(&base.path, format!("single-file text encoder: {what}"));
        let (tok, pos, fc1, layer, act) = match text {
            TextLayout::Hf { prefix } => (
                format!("{prefix}embeddings.token_embedding.weight"),
                format!("{prefix}embeddings.position_embedding.weight"),
                format!("{prefix}encoder.layers.0.mlp.fc1.weight"),
                format!("{prefix}encoder.layers."),
                Act::QuickGelu,
            ),
            TextLayout::OpenClip => (
                format!("{LDM_OPENCLIP}token_embedding.weight"),
                format!("{LDM_OPENCLIP}positional_embedding"),
                format!("{LDM_OPENCLIP}transformer.resblocks.0.mlp.c_fc.weight"),
                format!("{LDM_OPENCLIP}transformer.resblocks."),
                Act::Gelu,
            ),
        };
        let s = |k: &str| base.shape(k).map(<[usize]>::to_vec).ok_or_else(|| bad(format!("no {k}")));
        let (t, p, f) = (s(&tok)?, s(&pos)?, s(&fc1)?);
        if t.len() != 2 || p.len() != 2 || f.len() != 2 {
            return Err(bad("embedding or MLP weights are not matrices".into()));
        }
        let mut layers = 0;
        while layers <= crate::model::config::MAX_LAYERS
            && base.keys().any(|k| k.starts_with(&format!("{layer}{layers}.")))
        {
            layers += 1;
        }
        // SD 2.x uses the penultimate layer of OpenCLIP (FrozenOpenCLIPEmbedder, layer =
        // "penultimate"); diffusers' converted text encoder has that many layers.
        if matches!(text, TextLayout::OpenClip) {
            layers = layers.saturating_sub(1);
        }
        let hidden = t[1];
        let heads = match known {
            Some(k) => k.heads,
            None if hidden.is_multiple_of(64) => hidden / 64,
            None => (hidden / 8).max(1),
        };
        let cfg = ClipConfig {
            vocab_size: t[0],
            hidden,
            intermediate: f[0],
            layers,
            heads,
            positions: p[0],
            act: known.map_or(act, |k| k.act),
            eps: known.map_or(1e-5, |k| k.eps),
        };
        cfg.check(&base.path)?;
        Ok(cfg)
    }

    pub fn same_shapes(&self, o: &ClipConfig) -> bool {
        self.vocab_size == o.vocab_size
            && self.hidden == o.hidden
            && self.intermediate == o.intermediate
            && self.layers == o.layers
            && self.positions == o.positions
    }
}

/// Where a single-file checkpoint keeps its text encoder.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum TextLayout {
    /// transformers' CLIPTextModel names under `prefix` (`cond_stage_model.transformer.text_model.`
    /// or, in older checkpoints, `cond_stage_model.transformer.`).
    Hf { prefix: String },
    /// open_clip's names under `cond_stage_model.model.` (SD 2.x).
    OpenClip,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// runwayml/stable-diffusion-v1-5 and stabilityai/stable-diffusion-2-1 unet/config.json
    /// (the fields that differ from diffusers' defaults).
    fn parse(v: serde_json::Value) -> Result<UnetConfig> {
        UnetConfig::from_diffusers(&Json::parse(Path::new("unet/config.json"), &v)?)
    }

    #[test]
    fn published_sd_configs_read_as_diffusers_builds_them() {
        let sd15 = parse(serde_json::json!({"_class_name": "UNet2DConditionModel", "attention_head_dim": 8,
            "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 768, "layers_per_block": 2,
            "norm_num_groups": 32, "sample_size": 64}))
        .unwrap();
        assert_eq!(sd15.heads, vec![8; 4]);
        assert_eq!(
            (sd15.down_attn.clone(), sd15.up_attn.clone()),
            (vec![true, true, true, false], vec![false, true, true, true])
        );
        let sd21 =
            parse(serde_json::json!({"_class_name": "UNet2DConditionModel", "attention_head_dim": [5, 10, 20, 20],
            "block_out_channels": [320, 640, 1280, 1280], "cross_attention_dim": 1024, "use_linear_projection": true,
            "upcast_attention": true, "sample_size": 96}))
            .unwrap();
        // diffusers passes attention_head_dim as the head count: 64 channels per head.
        assert_eq!(sd21.heads, vec![5, 10, 20, 20]);
        assert!(sd21.linear_projection);
        let e =
            parse(serde_json::json!({"addition_embed_type": "text_time", "cross_attention_dim": 2048})).unwrap_err();
        assert!(e.to_string().contains("SDXL"), "{e}");
        let e = parse(serde_json::json!({"class_embed_type": "timestep"})).unwrap_err();
        assert_eq!(e.to_string(), "unet/config.json: class_embed_type = \"timestep\": a class embedding, which the image runtime does not run");
        let e = parse(serde_json::json!({"down_block_types": ["SimpleCrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D", "DownBlock2D"]})).unwrap_err();
        assert!(e.to_string().contains("block type SimpleCrossAttnDownBlock2D"), "{e}");
    }
}
