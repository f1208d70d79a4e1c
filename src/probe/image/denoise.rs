//! Denoising evidence per image (docs/probe.md, "Image adapters"): the VAE latent mean z₀ of
//! the image (no sampling, so the number is a function of the image), noised to
//! x_t = √ᾱ_t·z₀ + √(1 − ᾱ_t)·ε at each timestep with the same seeded draws ε for every image
//! and both models, and the mean squared error of each model's prediction against its target
//! (ε, or v = √ᾱ_t·ε − √(1 − ᾱ_t)·z₀ for v-prediction models), with the caption and with the
//! empty caption. Wen et al.'s magnitude is measured at the first sampling step from pure noise
//! x_T = ε (their detection statistic, ICLR 2024 §3), as ε-predictions.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;

use candle_core::{Device, Tensor};
use image::RgbImage;

use crate::error::Result;
use crate::load::images::ImageWork;
use crate::model::{cerr, Prediction, SdModel};
use crate::rng::Rng;

use super::super::pair::Pair;
use super::super::Progress;
use super::captions::{choose, CaptionSource};
use super::{pixels, ImageEvidence, ImageRole, ImageVerdict, Plan, TimestepLoss};

/// One image as the probe uses it.
pub(crate) struct Subject {
    pub id: String,
    pub role: ImageRole,
    pub sha256: String,
    pub size: (u32, u32),
    pub caption: String,
    pub caption_source: CaptionSource,
    /// The R × R image the model sees.
    pub fitted: RgbImage,
}

impl Subject {
    pub(crate) fn new(w: &ImageWork, role: ImageRole, fitted: RgbImage, tags: &Option<String>) -> Subject {
        let (caption, caption_source) = choose(w.caption.as_deref(), tags);
        Subject {
            id: w.id.clone(),
            role,
            sha256: w.digest.sha256.clone(),
            size: w.pixels.dimensions(),
            caption,
            caption_source,
            fitted,
        }
    }

    /// The evidence record with the measured numbers; calibration and verdict come later.
    pub(crate) fn evidence(&self, m: Measure) -> ImageEvidence {
        let gain = if m.cond.base > 0.0 { (m.cond.base - m.cond.merged) / m.cond.base } else { 0.0 };
        ImageEvidence {
            id: self.id.clone(),
            role: self.role,
            sha256: self.sha256.clone(),
            width: self.size.0,
            height: self.size.1,
            caption: self.caption.clone(),
            caption_source: self.caption_source,
            loss_base: m.cond.base,
            loss_merged: m.cond.merged,
            gain,
            loss_base_uncond: m.uncond.base,
            loss_merged_uncond: m.uncond.merged,
            clid_base: m.uncond.base - m.cond.base,
            clid_merged: m.uncond.merged - m.cond.merged,
            wen_base: m.wen.base,
            wen_merged: m.wen.merged,
            per_timestep: m.per_timestep,
            p_value: None,
            p_adjusted: None,
            q_value: None,
            above_style_controls: None,
            closest_merged: None,
            closest_base: None,
            verdict: ImageVerdict::NoEvidence,
            verdict_reason: String::new(),
        }
    }
}

/// One image's measured numbers.
pub struct Measure {
    /// Mean loss with the caption, per model.
    pub cond: Pair<f64>,
    /// Mean loss with the empty caption, per model.
    pub uncond: Pair<f64>,
    pub wen: Pair<f64>,
    pub per_timestep: Vec<TimestepLoss>,
}

pub(crate) struct Measured {
    pub per_image: Vec<Measure>,
    pub unet_passes: usize,
    pub shape: LatentShape,
}

/// The noise draws: `samples[k * draws + n]` is ε for timestep k, draw n (latent-shaped,
/// flattened); `wen[n]` the pure-noise starts for Wen's statistic.
pub struct Noise {
    pub samples: Vec<Vec<f32>>,
    pub wen: Vec<Vec<f32>>,
}

impl Noise {
    /// Standard normal draws from lorascope's seeded generator: timestep-major, then draw,
    /// then the latent's values in C, H, W order; Wen's starts from the same stream after them.
    pub fn seeded(seed: u64, timesteps: usize, draws: usize, latent_len: usize) -> Noise {
        let mut rng = Rng::new(seed);
        let mut draw = || (0..latent_len).map(|_| rng.normal() as f32).collect::<Vec<f32>>();
        let samples = (0..timesteps * draws).map(|_| draw()).collect();
        let wen = (0..draws).map(|_| draw()).collect();
        Noise { samples, wen }
    }
}

/// Latent means × scaling factor for every image (the VAE is the base's: adapters change the
/// UNet and text encoder only, and `SdModel::merged` shares the VAE).
pub(crate) fn latents(model: &SdModel, images: &[&RgbImage], batch: usize) -> Result<(Vec<Vec<f32>>, LatentShape)> {
    let mut out = vec![];
    let mut shape = (0, 0, 0);
    for chunk in images.chunks(batch) {
        let r = chunk[0].width() as usize;
        let px: Vec<f32> = chunk.iter().flat_map(|img| pixels::to_unit_range(img)).collect();
        let x = Tensor::from_vec(px, (chunk.len(), 3, r, r), &Device::Cpu).map_err(cerr)?;
        let z = model.encode_images(&x)?;
        let (_, c, h, w) = z.dims4().map_err(cerr)?;
        shape = (c, h, w);
        out.extend(values(&z)?.chunks(c * h * w).map(<[f32]>::to_vec));
    }
    Ok((out, shape))
}

/// Channels, height and width of a latent.
pub type LatentShape = (usize, usize, usize);

/// Every image's losses under both models (see the file comment), with seeded noise.
pub(crate) fn measure(
    models: Pair<&SdModel>,
    subjects: &[Subject],
    settings: &super::ImageSettings,
    plan: &Plan,
    progress: &dyn Progress,
) -> Result<Measured> {
    let images: Vec<&RgbImage> = subjects.iter().map(|s| &s.fitted).collect();
    let captions: Vec<&str> = subjects.iter().map(|s| s.caption.as_str()).collect();
    let (z0, shape) = latents(models.base, &images, settings.batch)?;
    let latent_len = z0.first().map_or(0, Vec::len);
    let noise = Noise::seeded(settings.noise_seed, settings.timesteps.len(), settings.draws, latent_len);
    let per_model = (subjects.len() * settings.draws * (settings.timesteps.len() + 1)).div_ceil(settings.batch);
    progress.stage("denoise", 2 * per_model as u64);
    let first_call_latents = 2 * settings.batch.min(subjects.len() * settings.draws);
    let progress = &FirstCall::new(progress, plan, first_call_latents);
    let losses = models.try_map(|_, m| {
        denoising_losses(
            m,
            &z0,
            &captions,
            &settings.timesteps,
            settings.draws,
            &noise,
            shape,
            settings.batch,
            progress,
        )
    })?;
    let per_image = (0..subjects.len())
        .map(|i| Measure {
            cond: losses.as_ref().map(|l| l.cond[i]),
            uncond: losses.as_ref().map(|l| l.uncond[i]),
            wen: losses.as_ref().map(|l| l.wen[i]),
            per_timestep: settings
                .timesteps
                .iter()
                .enumerate()
                .map(|(k, &t)| TimestepLoss { t, base: losses.base.per_t[i][k], merged: losses.merged.per_t[i][k] })
                .collect(),
        })
        .collect();
    Ok(Measured { per_image, unet_passes: losses.base.passes + losses.merged.passes, shape })
}

/// The probe's progress, which also prints, once, the time the first UNet call took and what
/// that makes for the whole probe (`Plan::estimate`): the work items count calls, so the first
/// `inc` marks the end of the first call.
struct FirstCall<'a> {
    inner: &'a dyn Progress,
    plan: &'a Plan,
    latents: usize,
    start: Instant,
    told: AtomicBool,
}

impl<'a> FirstCall<'a> {
    fn new(inner: &'a dyn Progress, plan: &'a Plan, latents: usize) -> Self {
        FirstCall { inner, plan, latents, start: Instant::now(), told: AtomicBool::new(false) }
    }
}

impl Progress for FirstCall<'_> {
    fn stage(&self, name: &str, total: u64) {
        self.inner.stage(name, total)
    }
    fn inc(&self, n: u64) {
        if !self.told.swap(true, Ordering::Relaxed) {
            self.inner.plan(&self.plan.estimate(self.latents, self.start.elapsed().as_secs_f64()));
        }
        self.inner.inc(n)
    }
    fn plan(&self, line: &str) {
        self.inner.plan(line)
    }
}

/// One model's losses for every image.
#[derive(Debug, Clone)]
pub struct Losses {
    /// Mean over timesteps × draws, with the caption / the empty caption.
    pub cond: Vec<f64>,
    pub uncond: Vec<f64>,
    /// Per image, per timestep: mean over draws with the caption.
    pub per_t: Vec<Vec<f64>>,
    /// Per image, per timestep × draw (timestep-major), with the caption.
    pub full: Vec<Vec<f64>>,
    pub wen: Vec<f64>,
    /// UNet calls made.
    pub passes: usize,
}

/// Losses of one model for latents `z0` (× scaling factor, flattened C·H·W each) with the given
/// noise; public so that tests can feed the noise a reference implementation stored.
#[allow(clippy::too_many_arguments)]
pub fn denoising_losses(
    model: &SdModel,
    z0: &[Vec<f32>],
    captions: &[&str],
    timesteps: &[usize],
    draws: usize,
    noise: &Noise,
    shape: LatentShape,
    batch: usize,
    progress: &dyn Progress,
) -> Result<Losses> {
    let n_img = z0.len();
    let (cond_ctx, uncond_ctx) = contexts(model, captions)?;
    let sched = model.schedule();
    let mut full_c = vec![vec![0.0; timesteps.len() * draws]; n_img];
    let mut full_u = full_c.clone();
    let mut passes = 0;
    let pairs: Vec<(usize, usize)> = (0..n_img).flat_map(|i| (0..draws).map(move |n| (i, n))).collect();
    let per = shape.0 * shape.1 * shape.2;
    for (k, &t) in timesteps.iter().enumerate() {
        for chunk in pairs.chunks(batch) {
            let z = stack(chunk.iter().map(|&(i, _)| &z0[i]), shape)?;
            let eps = stack(chunk.iter().map(|&(_, n)| &noise.samples[k * draws + n]), shape)?;
            let target = values(&sched.target(&z, &eps, t)?)?;
            let rows: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
            let (c, u) = predict_both(model, &sched.add_noise(&z, &eps, t)?, t, &cond_ctx, &uncond_ctx, &rows)?;
            passes += 1;
            for (j, &(i, n)) in chunk.iter().enumerate() {
                let tj = &target[j * per..(j + 1) * per];
                full_c[i][k * draws + n] = mse(&c[j * per..(j + 1) * per], tj);
                full_u[i][k * draws + n] = mse(&u[j * per..(j + 1) * per], tj);
            }
            progress.inc(1);
        }
    }
    let wen = wen_magnitudes(model, &pairs, noise, (&cond_ctx, &uncond_ctx), shape, batch, progress, &mut passes)?;
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len() as f64;
    let per_t = full_c.iter().map(|row| row.chunks(draws).map(mean).collect()).collect();
    Ok(Losses {
        cond: full_c.iter().map(|r| mean(r)).collect(),
        uncond: full_u.iter().map(|r| mean(r)).collect(),
        per_t,
        full: full_c,
        wen: wen.into_iter().map(|s| s / draws as f64).collect(),
        passes,
    })
}

/// Wen et al.'s statistic per image, summed over the draws (the caller takes the mean):
/// ‖ε̂(x_T, c) − ε̂(x_T, ∅)‖₂ at the last training timestep, x_T the draw itself.
#[allow(clippy::too_many_arguments)]
fn wen_magnitudes(
    model: &SdModel,
    pairs: &[(usize, usize)],
    noise: &Noise,
    (cond_ctx, uncond_ctx): (&Tensor, &Tensor),
    shape: LatentShape,
    batch: usize,
    progress: &dyn Progress,
    passes: &mut usize,
) -> Result<Vec<f64>> {
    let sched = model.schedule();
    let t = sched.train_timesteps - 1;
    // ε̂ = √ᾱ·v + √(1 − ᾱ)·x for v-prediction; the cond − uncond difference keeps only √ᾱ·Δv.
    let factor = match sched.prediction {
        Prediction::Epsilon => 1.0,
        Prediction::V => sched.alphas_cumprod[t].sqrt(),
    };
    let n_img = pairs.iter().map(|&(i, _)| i + 1).max().unwrap_or(0);
    let mut sums = vec![0.0; n_img];
    let per = shape.0 * shape.1 * shape.2;
    for chunk in pairs.chunks(batch) {
        let x = stack(chunk.iter().map(|&(_, n)| &noise.wen[n]), shape)?;
        let rows: Vec<usize> = chunk.iter().map(|&(i, _)| i).collect();
        let (c, u) = predict_both(model, &x, t, cond_ctx, uncond_ctx, &rows)?;
        *passes += 1;
        for (j, &(i, _)) in chunk.iter().enumerate() {
            let d: f64 = (j * per..(j + 1) * per).map(|q| (c[q] as f64 - u[q] as f64).powi(2)).sum();
            sums[i] += factor * d.sqrt();
        }
        progress.inc(1);
    }
    Ok(sums)
}

/// Caption embeddings (one row per image) and the empty caption's.
fn contexts(model: &SdModel, captions: &[&str]) -> Result<(Tensor, Tensor)> {
    let cond = model.encode_text(captions)?;
    let uncond = model.encode_text(&[""])?;
    Ok((cond, uncond))
}

/// Flattened latents as one B × C × H × W batch.
fn stack<'a>(rows: impl Iterator<Item = &'a Vec<f32>>, (c, h, w): LatentShape) -> Result<Tensor> {
    let v: Vec<f32> = rows.flat_map(|r| r.iter().copied()).collect();
    let b = v.len() / (c * h * w);
    Tensor::from_vec(v, (b, c, h, w), &Device::Cpu).map_err(cerr)
}

/// A tensor's values, flattened.
pub(super) fn values(t: &Tensor) -> Result<Vec<f32>> {
    t.flatten_all().and_then(|t| t.to_vec1()).map_err(cerr)
}

/// The model's predictions for the batch `x` with each row's caption (`rows` index the caption
/// embeddings) and with the empty one, in one UNet call of twice the batch (as classifier-free
/// guidance runs).
fn predict_both(
    model: &SdModel,
    x: &Tensor,
    t: usize,
    cond_ctx: &Tensor,
    uncond_ctx: &Tensor,
    rows: &[usize],
) -> Result<(Vec<f32>, Vec<f32>)> {
    let b = rows.len();
    let inputs = || -> candle_core::Result<(Tensor, Tensor)> {
        let idx = Tensor::from_vec(rows.iter().map(|&r| r as u32).collect::<Vec<u32>>(), b, &Device::Cpu)?;
        let (_, l, d) = uncond_ctx.dims3()?;
        let uncond = uncond_ctx.broadcast_as((b, l, d))?.contiguous()?;
        Ok((Tensor::cat(&[x, x], 0)?, Tensor::cat(&[&cond_ctx.index_select(&idx, 0)?, &uncond], 0)?))
    };
    let (x2, ctx) = inputs().map_err(cerr)?;
    let mut v = values(&model.predict(&x2, t, &ctx)?)?;
    let u = v.split_off(v.len() / 2);
    Ok((v, u))
}

fn mse(a: &[f32], b: &[f32]) -> f64 {
    a.iter().zip(b).map(|(x, y)| (*x as f64 - *y as f64).powi(2)).sum::<f64>() / a.len() as f64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeded_noise_is_standard_normal_and_repeatable() {
        let a = Noise::seeded(7, 2, 3, 4000);
        let b = Noise::seeded(7, 2, 3, 4000);
        assert_eq!(a.samples, b.samples);
        assert_eq!((a.samples.len(), a.wen.len()), (6, 3));
        let all: Vec<f64> = a.samples.iter().flatten().map(|&x| x as f64).collect();
        let mean = all.iter().sum::<f64>() / all.len() as f64;
        let var = all.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / all.len() as f64;
        // 24000 draws: the mean's standard error is 0.0065, the variance's 0.009.
        assert!(mean.abs() < 0.03 && (var - 1.0).abs() < 0.04, "{mean} {var}");
        assert_ne!(a.samples[0], a.samples[1]);
        assert_eq!(mse(&[1.0, 3.0], &[0.0, 0.0]), 5.0);
    }
}
