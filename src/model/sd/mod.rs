//! The Stable Diffusion 1.x/2.x runtime for the image probe, on candle in f32: CLIP text encoder
//! (`clip`), UNet (`unet`), VAE (`vae`), noise schedule and DDIM (`schedule`), CLIP tokenizer
//! (`tokenizer`), built from a diffusers pipeline directory or a single-file original-LDM
//! checkpoint (`load`, `config`, `weights`), and the adapter merged into the UNet and text
//! encoder (`merge`). Each part follows diffusers / transformers (named in its file); what is
//! checked against them is listed in docs/image-runtime.md.

mod clip;
pub(crate) mod config;
mod direct;
mod kernels;
mod load;
mod merge;
mod nn;
mod schedule;
mod tokenizer;
mod unet;
mod vae;
mod weights;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

pub use config::{SdFamily, SdLayout};
pub use load::SdOptions;
pub use schedule::{NoiseSchedule, Prediction, TimestepSpacing};

use super::{cerr, MergeSummary};
use crate::error::{Error, Result};
use crate::load::{Adapter, BaseModel, FileDigest};
use clip::ClipText;
use tokenizer::ClipTokenizer;
use unet::Unet;
use vae::Vae;
use weights::{Part, Weights};

/// Whether `base` is an SD 1.x/2.x base the runtime can run: a diffusers pipeline directory
/// (unet/, vae/, text_encoder/) or a single-file original-LDM checkpoint (UNet, VAE and text
/// encoder). SDXL and other families are not. Reads key names and configs only.
pub fn is_sd_base(base: &BaseModel) -> bool {
    load::check(base).is_ok()
}

/// [`is_sd_base`] with the reason when it is not (an input error naming the base): what is
/// missing, or that it is SDXL (and what SDXL would need), or a text model.
pub fn check_sd_base(base: &BaseModel) -> Result<SdLayout> {
    load::check(base)
}

/// Parameter counts of the three parts, as the runtime holds them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SdParams {
    pub text_encoder: usize,
    pub unet: usize,
    pub vae: usize,
}

/// What was loaded and from where (fields in sorted order; stable across runs).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SdInfo {
    /// Where the hyper-parameters came from: the pipeline's config files, or inferred from the
    /// checkpoint's tensor shapes (and which companion configs filled in the rest).
    pub config_source: String,
    /// "SD1" or "SD2".
    pub family: SdFamily,
    pub latent_channels: usize,
    /// "diffusers-dir" or "single-file".
    pub layout: SdLayout,
    pub params: SdParams,
    pub prediction: Prediction,
    /// Pixel side the model works at (the VAE's sample_size).
    pub resolution: usize,
    pub scaling_factor: f64,
    /// Beta schedule and training steps, e.g. "scaled_linear 0.00085..0.012, 1000 steps".
    pub schedule: String,
    pub schedule_source: String,
    /// Token ids per caption (padded/truncated to it).
    pub text_max_length: usize,
    /// The tokenizer folder.
    pub tokenizer_source: String,
}

/// A Stable Diffusion model ready to run: text encoder, UNet, VAE, schedule and tokenizer.
/// A merged model shares the VAE, the tokenizer and every tensor the adapter did not change.
pub struct SdModel {
    text: Arc<ClipText>,
    unet: Arc<Unet>,
    vae: Arc<Vae>,
    tokenizer: Arc<ClipTokenizer>,
    schedule: NoiseSchedule,
    /// The base tensors the runtime read (one f32 copy) and where each parameter came from.
    weights: Arc<Weights>,
    /// Tensors an adapter changed, by base key (empty for the base).
    merged: Arc<HashMap<String, Tensor>>,
    info: SdInfo,
    extra_files: Arc<Vec<(PathBuf, FileDigest)>>,
    device: Device,
}

impl std::fmt::Debug for SdModel {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SdModel").field("info", &self.info).finish()
    }
}

fn usage(what: String) -> Error {
    Error::Usage(what)
}

impl SdModel {
    /// Build the runnable model of `base` on `device`. A single-file checkpoint carries no
    /// tokenizer: `tokenizer_dir` is required for it (and replaces a pipeline's own when given).
    pub fn load(base: &BaseModel, tokenizer_dir: Option<&Path>, device: &Device) -> Result<SdModel> {
        Self::load_with(
            base,
            &SdOptions { tokenizer_dir: tokenizer_dir.map(Path::to_path_buf), prediction: None },
            device,
        )
    }

    /// [`SdModel::load`] with every option.
    pub fn load_with(base: &BaseModel, opts: &SdOptions, device: &Device) -> Result<SdModel> {
        let plan = load::plan(base, opts)?;
        let (unet_cfg, vae_cfg, clip_cfg) = (plan.unet.clone(), plan.vae.clone(), plan.clip.clone());
        let ((text, unet, vae), weights) = weights::load_base(base, &plan.map, device, |vb| {
            let text = ClipText::load(vb.pp("text_encoder").pp("text_model"), &clip_cfg)?;
            let unet = Unet::load(vb.pp("unet"), &unet_cfg)?;
            let vae = Vae::load(vb.pp("vae"), &vae_cfg)?;
            Ok((text, unet, vae))
        })?;
        let s = &plan.schedule;
        let info = SdInfo {
            config_source: plan.config_source.clone(),
            family: plan.family,
            latent_channels: plan.vae.latent_channels,
            layout: plan.layout,
            params: SdParams {
                text_encoder: weights.params(Part::Text),
                unet: weights.params(Part::Unet),
                vae: weights.params(Part::Vae),
            },
            prediction: s.prediction,
            resolution: plan.vae.sample_size,
            scaling_factor: plan.vae.scaling_factor,
            schedule: format!("{}, {} steps", s.betas, s.train_timesteps),
            schedule_source: s.source.clone(),
            text_max_length: plan.tokenizer.max_length,
            tokenizer_source: plan.tokenizer_source.clone(),
        };
        Ok(SdModel {
            text: Arc::new(text),
            unet: Arc::new(unet),
            vae: Arc::new(vae),
            tokenizer: Arc::new(plan.tokenizer),
            schedule: plan.schedule,
            weights: Arc::new(weights),
            merged: Arc::new(HashMap::new()),
            info,
            extra_files: Arc::new(plan.extra_files),
            device: device.clone(),
        })
    }

    /// This model with `adapter` merged into the UNet and text-encoder weights it changes
    /// (W + ΔW; see merge.rs); every other tensor and the VAE shared with `self`. The adapter
    /// must be resolved against this base (`pipeline::open`).
    pub fn merged(&self, adapter: &Adapter) -> Result<(SdModel, MergeSummary)> {
        let (merged, summary) = merge::merge(adapter, &self.weights, &self.merged)?;
        let (uc, cc) = (self.unet.cfg.clone(), self.text.cfg.clone());
        let (text, unet) = weights::load_merged(&self.weights, &merged, &self.device, |vb| {
            Ok((ClipText::load(vb.pp("text_encoder").pp("text_model"), &cc)?, Unet::load(vb.pp("unet"), &uc)?))
        })?;
        let model = SdModel {
            text: Arc::new(text),
            unet: Arc::new(unet),
            vae: self.vae.clone(),
            tokenizer: self.tokenizer.clone(),
            schedule: self.schedule.clone(),
            weights: self.weights.clone(),
            merged: Arc::new(merged),
            info: self.info.clone(),
            extra_files: self.extra_files.clone(),
            device: self.device.clone(),
        };
        Ok((model, summary))
    }

    /// Pixel side the model works at (the VAE's `sample_size`: 512 for SD 1.x, 768 for SD 2.x-v).
    pub fn resolution(&self) -> usize {
        self.info.resolution
    }

    pub fn info(&self) -> SdInfo {
        self.info.clone()
    }

    pub fn schedule(&self) -> &NoiseSchedule {
        &self.schedule
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Files read besides the base's own (the `--tokenizer` folder's files and the pipeline
    /// configs beside it), each with the digest of the bytes parsed, for the report's inputs.
    pub fn input_files(&self) -> &[(PathBuf, FileDigest)] {
        &self.extra_files
    }

    /// Latent side for the model's resolution.
    pub fn latent_size(&self) -> usize {
        self.info.resolution >> self.vae.cfg.downsamplings()
    }

    /// Latent means × scaling_factor of pixels `[B, 3, H, W]` in [-1, 1] (no sampling).
    pub fn encode_images(&self, pixels: &Tensor) -> Result<Tensor> {
        let (_, c, h, w) =
            pixels.dims4().map_err(|_| usage(format!("pixels must be B×C×H×W, not {:?}", pixels.dims())))?;
        let f = 1usize << self.vae.cfg.downsamplings();
        if c != self.vae.cfg.in_channels || h == 0 || w == 0 || !h.is_multiple_of(f) || !w.is_multiple_of(f) {
            return Err(usage(format!(
                "pixels are {:?}: the VAE takes {} channels and sides that are multiples of {f}",
                pixels.dims(),
                self.vae.cfg.in_channels
            )));
        }
        let x = pixels.to_device(&self.device).and_then(|x| x.to_dtype(DType::F32)).map_err(cerr)?;
        let mean = kernels::on_workers(|| self.vae.encode_mean(&x)).map_err(cerr)?;
        (mean * self.vae.cfg.scaling_factor).map_err(cerr)
    }

    /// Pixels (nominally in [-1, 1]; not clamped, as `AutoencoderKL.decode`) of latents `z`
    /// `[B, C, h, w]` that are × scaling_factor.
    pub fn decode_latents(&self, z: &Tensor) -> Result<Tensor> {
        let (_, c, _, _) = z.dims4().map_err(|_| usage(format!("latents must be B×C×h×w, not {:?}", z.dims())))?;
        if c != self.vae.cfg.latent_channels {
            return Err(usage(format!("latents have {c} channels, the VAE {}", self.vae.cfg.latent_channels)));
        }
        let z = z.to_device(&self.device).and_then(|x| x.to_dtype(DType::F32)).map_err(cerr)?;
        let z = (z / self.vae.cfg.scaling_factor).map_err(cerr)?;
        kernels::on_workers(|| self.vae.decode(&z)).map_err(cerr)
    }

    /// Token ids of each caption as the SD pipeline lays them out (BOS, tokens, EOS, padding;
    /// `text_max_length` each).
    pub fn tokenize(&self, captions: &[&str]) -> Result<Vec<Vec<u32>>> {
        self.tokenizer.encode(captions)
    }

    /// The text encoder's last hidden state `[B, L, D]` for the captions.
    pub fn encode_text(&self, captions: &[&str]) -> Result<Tensor> {
        if captions.is_empty() {
            return Err(usage("no captions to encode".into()));
        }
        let ids = self.tokenize(captions)?;
        let l = self.tokenizer.max_length;
        let flat: Vec<u32> = ids.into_iter().flatten().collect();
        let ids = Tensor::from_vec(flat, (captions.len(), l), &self.device).map_err(cerr)?;
        kernels::on_workers(|| self.text.forward(&ids)).map_err(cerr)
    }

    /// The text encoder's last hidden state for token ids `[B, L]` (u32).
    pub fn encode_ids(&self, ids: &Tensor) -> Result<Tensor> {
        let (_, l) = ids.dims2().map_err(|_| usage(format!("token ids must be B×L, not {:?}", ids.dims())))?;
        if l == 0 || l > self.text.cfg.positions {
            return Err(usage(format!("{l} tokens: the text encoder takes 1 to {}", self.text.cfg.positions)));
        }
        let ids = ids.to_device(&self.device).and_then(|x| x.to_dtype(DType::U32)).map_err(cerr)?;
        kernels::on_workers(|| self.text.forward(&ids)).map_err(cerr)
    }

    fn check_unet_input(&self, x: &Tensor, context: &Tensor) -> Result<()> {
        let cfg = &self.unet.cfg;
        let (b, c, h, w) = x.dims4().map_err(|_| usage(format!("latents must be B×C×h×w, not {:?}", x.dims())))?;
        if b == 0 || c != cfg.in_channels || h == 0 || w == 0 {
            return Err(usage(format!("latents are {:?}: the UNet takes {} channels", x.dims(), cfg.in_channels)));
        }
        let (cb, _, d) =
            context.dims3().map_err(|_| usage(format!("context must be B×L×D, not {:?}", context.dims())))?;
        if (cb != b && cb != 1) || d != cfg.cross_attention_dim {
            return Err(usage(format!(
                "context is {:?} for {b} latents: it must be {b} or 1 × L × {}",
                context.dims(),
                cfg.cross_attention_dim
            )));
        }
        Ok(())
    }

    /// The UNet's raw output (ε or v, as `schedule().prediction` says) for noisy latents `x_t`
    /// `[B, C, h, w]` at timestep `t` under `context` `[B or 1, L, D]`.
    pub fn predict(&self, x_t: &Tensor, t: usize, context: &Tensor) -> Result<Tensor> {
        self.predict_each(x_t, &[t], context)
    }

    /// [`SdModel::predict`] with one timestep per sample (or one for all).
    pub fn predict_each(&self, x_t: &Tensor, t: &[usize], context: &Tensor) -> Result<Tensor> {
        self.check_unet_input(x_t, context)?;
        let b = x_t.dim(0).map_err(cerr)?;
        if t.len() != 1 && t.len() != b {
            return Err(usage(format!("{} timesteps for {b} latents", t.len())));
        }
        if let Some(bad) = t.iter().find(|&&t| t >= self.schedule.train_timesteps) {
            return Err(usage(format!("timestep {bad} is outside 0..{}", self.schedule.train_timesteps)));
        }
        let ts: Vec<f64> = t.iter().map(|&t| t as f64).collect();
        let x = x_t.to_device(&self.device).and_then(|x| x.to_dtype(DType::F32)).map_err(cerr)?;
        let ctx = context.to_device(&self.device).and_then(|x| x.to_dtype(DType::F32)).map_err(cerr)?;
        kernels::on_workers(|| self.unet.forward(&x, &ts, &ctx)).map_err(cerr)
    }

    /// Deterministic DDIM (η = 0) from `noise` `[B, C, h, w]` in `steps` steps under
    /// classifier-free guidance (ε_u + g·(ε_c − ε_u), as StableDiffusionPipeline; guidance ≤ 1
    /// runs the conditional pass only), `cond` and `uncond` `[B or 1, L, D]`. Returns the final
    /// latents (× scaling_factor; `decode_latents` turns them into pixels).
    pub fn sample_ddim(
        &self,
        noise: &Tensor,
        cond: &Tensor,
        uncond: &Tensor,
        steps: usize,
        guidance: f64,
    ) -> Result<Tensor> {
        self.check_unet_input(noise, cond)?;
        self.check_unet_input(noise, uncond)?;
        if !guidance.is_finite() {
            return Err(usage(format!("guidance scale {guidance} is not finite")));
        }
        let timesteps = self.schedule.ddim_timesteps(steps)?;
        let b = noise.dim(0).map_err(cerr)?;
        let dev = &self.device;
        let expand = |c: &Tensor| -> Result<Tensor> {
            let (_, l, d) = c.dims3().map_err(cerr)?;
            c.to_device(dev).and_then(|c| c.broadcast_as((b, l, d))).and_then(|c| c.contiguous()).map_err(cerr)
        };
        let guided = guidance > 1.0;
        let ctx =
            if guided { Tensor::cat(&[&expand(uncond)?, &expand(cond)?], 0).map_err(cerr)? } else { expand(cond)? };
        let mut x = noise.to_device(dev).and_then(|x| x.to_dtype(DType::F32)).map_err(cerr)?;
        kernels::on_workers(|| {
            for &t in &timesteps {
                let out = if guided {
                    let both = Tensor::cat(&[&x, &x], 0).map_err(cerr)?;
                    let o = self.unet.forward(&both, &[t as f64], &ctx).map_err(cerr)?;
                    let (u, c) = (o.narrow(0, 0, b).map_err(cerr)?, o.narrow(0, b, b).map_err(cerr)?);
                    (&u + ((c - &u).map_err(cerr)? * guidance).map_err(cerr)?).map_err(cerr)?
                } else {
                    self.unet.forward(&x, &[t as f64], &ctx).map_err(cerr)?
                };
                x = self.schedule.ddim_step(&x, &out, t, steps)?;
            }
            Ok(x)
        })
    }
}

/// The name and shape of every parameter the runtime reads for the given diffusers configs
/// (`unet.…`, `vae.…`, `text_encoder.text_model.…`), for fixture generators.
#[cfg(feature = "fixtures")]
pub(crate) fn parameter_shapes(
    unet: &serde_json::Value,
    vae: &serde_json::Value,
    text: &serde_json::Value,
) -> Result<Vec<(String, Vec<usize>)>> {
    use config::{ClipConfig, Json, UnetConfig, VaeConfig};
    let p = Path::new("config.json");
    let (u, v, c) = (
        UnetConfig::from_diffusers(&Json::parse(p, unet)?)?,
        VaeConfig::from_diffusers(&Json::parse(p, vae)?)?,
        ClipConfig::from_hf(&Json::parse(p, text)?)?,
    );
    let vm = candle_nn::VarMap::new();
    let vb = candle_nn::VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
    ClipText::load(vb.pp("text_encoder").pp("text_model"), &c).map_err(cerr)?;
    Unet::load(vb.pp("unet"), &u).map_err(cerr)?;
    Vae::load(vb.pp("vae"), &v).map_err(cerr)?;
    let data = vm.data().lock().map_err(|_| Error::Internal("VarMap lock poisoned".into()))?;
    let mut out: Vec<(String, Vec<usize>)> = data.iter().map(|(k, var)| (k.clone(), var.dims().to_vec())).collect();
    out.sort();
    Ok(out)
}
