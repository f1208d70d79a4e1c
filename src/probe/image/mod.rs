//! The image probe (docs/probe.md, "Image adapters"): does the merged Stable Diffusion model
//! know these particular images better than the base, better than comparable images, and does
//! it give them back? Per image: denoising losses under base and merged for the same seeded
//! noise, the conditional-minus-unconditional gap (CLiD) and the text-conditional
//! noise-prediction magnitude (Wen et al.); the gain calibrated against generic controls and
//! set against style controls; optionally DDIM generations from each work's caption compared to
//! every image. This file holds the result types and `run`; the phases are in the files beside.

mod captions;
mod denoise;
mod generate;
pub(crate) mod pixels;
pub(crate) mod similarity;
mod verdict;

use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::load::images::ImageSet;
use crate::load::Adapter;
use crate::model::{SdInfo, SdModel};

use super::calibrate::{AaCheck, Auc, SetTest};
use super::pair::Pair;
use super::Progress;
pub use captions::CaptionSource;
pub use denoise::{denoising_losses, LatentShape, Losses, Noise};
pub use similarity::Similarity;

/// Settings of the image probe (flags of `probe`/`report` on an image base).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageSettings {
    /// Diffusion timesteps the denoising loss is measured at (docs/probe.md: low-to-mid noise,
    /// where membership shows).
    pub timesteps: Vec<usize>,
    /// Noise draws per timestep.
    pub draws: usize,
    /// Seed of lorascope's generator for the noise (the same draws for every image and both
    /// models).
    pub noise_seed: u64,
    /// Seeds of the `--generate` samples (none: no generation).
    pub generate_seeds: Vec<u64>,
    pub ddim_steps: usize,
    pub guidance: f64,
    /// Carlini et al.'s near-copy threshold on the tiled ℓ2 distance.
    pub copy_distance: f64,
    /// A `partial-copy` needs the closest merged generation at SSIM ≥ this and a perceptual-hash
    /// distance ≤ `partial_phash` bits (of 64), and the base's closest not.
    pub partial_ssim: f64,
    pub partial_phash: u32,
    /// Family-wise level (Holm across the works) for calibrated verdicts and set tests.
    pub significance: f64,
    /// Images per UNet call.
    pub batch: usize,
}

impl Default for ImageSettings {
    fn default() -> Self {
        ImageSettings {
            timesteps: vec![100, 200, 300, 400],
            draws: 2,
            noise_seed: 0x1ea5_e5ee_d000_0001,
            generate_seeds: vec![],
            ddim_steps: 50,
            guidance: 7.5,
            copy_distance: 0.15,
            partial_ssim: 0.5,
            partial_phash: 8,
            significance: 0.05,
            batch: 8,
        }
    }
}

/// Most timesteps × draws (each costs four UNet passes per image).
pub const MAX_NOISE_SAMPLES: usize = 1024;
/// Most `--generate` seeds and DDIM steps.
pub const MAX_GENERATE_SEEDS: usize = 64;
pub const MAX_DDIM_STEPS: usize = 1000;

impl ImageSettings {
    /// Refuse settings that cannot work before a model is loaded.
    pub fn check(&self, train_timesteps: Option<usize>) -> Result<()> {
        let usage = |m: String| Err(Error::Usage(m));
        if self.timesteps.is_empty() || self.draws == 0 {
            return usage("--timesteps and --draws need at least one value each".into());
        }
        if self.timesteps.len().saturating_mul(self.draws) > MAX_NOISE_SAMPLES {
            return usage(format!("--timesteps × --draws is above {MAX_NOISE_SAMPLES} (MAX_NOISE_SAMPLES)"));
        }
        if let Some(t) = self.timesteps.iter().find(|&&t| train_timesteps.is_some_and(|n| t >= n)) {
            return usage(format!(
                "--timesteps {t} is not below the schedule's {} training steps",
                train_timesteps.unwrap_or(0)
            ));
        }
        if self.generate_seeds.len() > MAX_GENERATE_SEEDS {
            return usage(format!("--generate takes at most {MAX_GENERATE_SEEDS} seeds (MAX_GENERATE_SEEDS)"));
        }
        if self.ddim_steps == 0 || self.ddim_steps > MAX_DDIM_STEPS {
            return usage(format!("--steps {} is outside 1..={MAX_DDIM_STEPS}", self.ddim_steps));
        }
        if !(self.guidance.is_finite() && (0.0..=100.0).contains(&self.guidance)) {
            return usage(format!("--guidance {} must be a finite number in 0..=100", self.guidance));
        }
        if !(self.copy_distance.is_finite() && self.copy_distance > 0.0 && self.copy_distance <= 1.0) {
            return usage(format!("--copy-distance {} is a distance on [0, 1] pixels, above 0", self.copy_distance));
        }
        if !(self.partial_ssim.is_finite() && self.partial_ssim > 0.0 && self.partial_ssim <= 1.0) {
            return usage(format!("--partial-ssim {} is outside (0, 1]", self.partial_ssim));
        }
        if self.partial_phash > 64 {
            return usage(format!("--partial-phash {} is above 64 (the hash has 64 bits)", self.partial_phash));
        }
        if self.batch == 0 || self.batch > 256 {
            return usage(format!("--batch {} is outside 1..=256", self.batch));
        }
        Ok(())
    }
}

crate::named::closed_set! {
    /// Which folder an image came from.
    pub enum ImageRole ("image role") {
        Work = "work",
        Control = "control",
        StyleControl = "style-control",
    }
}

crate::named::closed_set! {
    /// The image probe's answer for one work (docs/probe.md: the rules and their thresholds).
    pub enum ImageVerdict ("image verdict") {
        ReconstructableCopy = "reconstructable-copy",
        PartialCopy = "partial-copy",
        MemorizedTraces = "memorized-traces",
        StyleOnly = "style-only",
        NoEvidence = "no-evidence",
    }
}

impl ImageVerdict {
    pub fn is_copy(self) -> bool {
        matches!(self, ImageVerdict::ReconstructableCopy | ImageVerdict::PartialCopy)
    }
}

/// Denoising loss at one timestep, mean over the draws.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq)]
pub struct TimestepLoss {
    pub t: usize,
    pub base: f64,
    pub merged: f64,
}

/// The closest generation to an image under one model.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Closest {
    /// Index into `ImageProbeResult::generations`.
    pub generation: usize,
    pub similarity: Similarity,
}

/// One image's evidence.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageEvidence {
    pub id: String,
    pub role: ImageRole,
    pub sha256: String,
    pub width: u32,
    pub height: u32,
    pub caption: String,
    pub caption_source: CaptionSource,
    /// Mean squared error of the noise (or v) prediction with the caption, over timesteps ×
    /// draws, under base and merged.
    pub loss_base: f64,
    pub loss_merged: f64,
    /// (loss_base − loss_merged) / loss_base: the calibrated statistic.
    pub gain: f64,
    /// The same losses with the empty caption.
    pub loss_base_uncond: f64,
    pub loss_merged_uncond: f64,
    /// CLiD: unconditional minus conditional loss (Zhai et al., NeurIPS 2024); members of the
    /// training set show a larger gap.
    pub clid_base: f64,
    pub clid_merged: f64,
    /// Wen et al. (ICLR 2024): ‖ε(x_T, caption) − ε(x_T, "")‖ at the first sampling step,
    /// mean over the draws; memorised prompts give a large magnitude.
    pub wen_base: f64,
    pub wen_merged: f64,
    pub per_timestep: Vec<TimestepLoss>,
    /// Empirical p of the gain against the generic controls (a control: against the others),
    /// Holm-adjusted (a control: by the works' factor) and Benjamini–Hochberg q.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_value: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub p_adjusted: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub q_value: Option<f64>,
    /// Whether the gain is above every style control's (no style controls: `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub above_style_controls: Option<bool>,
    /// The closest merged and base generations (with `--generate`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closest_merged: Option<Closest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub closest_base: Option<Closest>,
    pub verdict: ImageVerdict,
    pub verdict_reason: String,
}

/// One DDIM sample: from which work's caption, which seed, which model, and the picture.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Generation {
    pub caption_of: String,
    pub seed: u64,
    pub model: GenerationModel,
    /// PNG bytes, base64 (the report page shows them inline).
    pub png_base64: String,
    pub sha256: String,
}

/// A work as the model saw it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Picture {
    pub id: String,
    pub png_base64: String,
}

crate::named::closed_set! {
    pub enum GenerationModel ("generation model") {
        Base = "base",
        Merged = "merged",
    }
}

/// What the controls say about the works.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageCalibration {
    pub statistic: String,
    pub controls: usize,
    pub style_controls: usize,
    /// The smallest empirical p-value the controls allow: 1/(n + 1).
    pub smallest_p: f64,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aa_check: Option<AaCheck>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub auc: Option<Auc>,
    /// Set-level tests (one-sided Mann–Whitney U): works above generic controls, style
    /// controls above generic controls, works above style controls.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub works_vs_controls: Option<SetTest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub style_vs_controls: Option<SetTest>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub works_vs_style: Option<SetTest>,
    /// Controls that got a verdict other than `no-evidence` when judged like a work.
    pub failures: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ImageProbeResult {
    pub settings: ImageSettings,
    pub model: SdInfo,
    pub works: Vec<ImageEvidence>,
    pub controls: Vec<ImageEvidence>,
    pub style_controls: Vec<ImageEvidence>,
    pub calibration: ImageCalibration,
    pub generations: Vec<Generation>,
    /// With `--generate`: each work as the model saw it (resized and cropped), PNG base64, so
    /// the report shows it beside its generations.
    pub pictures: Vec<Picture>,
    /// UNet passes run (both models).
    pub unet_passes: usize,
    pub notes: Vec<String>,
}

/// The images of the three folders.
pub struct ImageInputs<'a> {
    pub works: &'a ImageSet,
    pub controls: Option<&'a ImageSet>,
    pub style_controls: Option<&'a ImageSet>,
}

/// Run the image probe on `works` (and controls) under `base` and `merged`.
pub(crate) fn run(
    models: Pair<&SdModel>,
    adapter: &Adapter,
    inputs: &ImageInputs,
    settings: &ImageSettings,
    progress: &dyn Progress,
) -> Result<ImageProbeResult> {
    settings.check(Some(models.base.schedule().train_timesteps))?;
    let mut notes = vec![];
    let tags = captions::adapter_caption(adapter);
    let r = models.base.resolution() as u32;
    let sets = [
        (ImageRole::Work, Some(inputs.works)),
        (ImageRole::Control, inputs.controls),
        (ImageRole::StyleControl, inputs.style_controls),
    ];
    let mut subjects = vec![];
    for (role, set) in sets {
        for w in set.map(|s| s.images.as_slice()).unwrap_or(&[]) {
            subjects.push(denoise::Subject::new(w, role, pixels::fit(w, r)?, &tags));
        }
    }
    notes.extend(captions::notes(&subjects, &tags));
    let plan = Plan::new(subjects.len(), inputs.works.images.len(), settings);
    progress.plan(&plan.line(subjects.len(), settings));
    let measured = denoise::measure(models, &subjects, settings, &plan, progress)?;
    let mut evidence: Vec<ImageEvidence> =
        subjects.iter().zip(measured.per_image).map(|(s, m)| s.evidence(m)).collect();
    let (generations, pictures, passes) = if settings.generate_seeds.is_empty() {
        (vec![], vec![], 0)
    } else {
        generate::run(models, &subjects, &mut evidence, measured.shape, settings, progress)?
    };
    let mut split = |role| -> Vec<ImageEvidence> {
        let (take, keep): (Vec<_>, Vec<_>) = std::mem::take(&mut evidence).into_iter().partition(|e| e.role == role);
        evidence = keep;
        take
    };
    let (mut works, mut controls, mut style_controls) =
        (split(ImageRole::Work), split(ImageRole::Control), split(ImageRole::StyleControl));
    let generated = !generations.is_empty();
    let calibration = verdict::decide(&mut works, &mut controls, &mut style_controls, generated, settings, &mut notes);
    Ok(ImageProbeResult {
        settings: settings.clone(),
        model: models.base.info(),
        works,
        controls,
        style_controls,
        calibration,
        generations,
        pictures,
        unet_passes: measured.unet_passes + passes,
        notes,
    })
}

/// UNet evaluations (latents through the UNet) the probe will run, per model and both: four
/// per image, timestep and draw (caption and empty caption, as two latents of one call); two
/// per image and draw for Wen's statistic; 2 × steps per generation (guidance).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Plan {
    pub denoise: usize,
    pub generate: usize,
    generations: usize,
}

impl Plan {
    pub fn new(images: usize, works: usize, s: &ImageSettings) -> Plan {
        Plan {
            denoise: 2 * images * s.draws * (2 * s.timesteps.len() + 2),
            generate: 2 * works * s.generate_seeds.len() * 2 * s.ddim_steps,
            generations: 2 * works * s.generate_seeds.len(),
        }
    }

    pub fn evaluations(&self) -> usize {
        self.denoise + self.generate
    }

    /// The line printed before any work.
    pub fn line(&self, images: usize, s: &ImageSettings) -> String {
        format!(
            "image probe: {images} images × {} timesteps × {} draws under base and merged = {} UNet evaluations{}; \
             the time of the first UNet call follows, with an estimate for the whole probe",
            s.timesteps.len(),
            s.draws,
            self.denoise,
            if self.generate > 0 {
                format!(", plus {} for {} generations of {} steps", self.generate, self.generations, s.ddim_steps)
            } else {
                String::new()
            }
        )
    }

    /// The line printed after the first UNet call (`latents` latents in `seconds`): the
    /// measured time per evaluation here, times every evaluation of the probe.
    pub fn estimate(&self, latents: usize, seconds: f64) -> String {
        let per = seconds / latents.max(1) as f64;
        let total = per * self.evaluations() as f64;
        let each = if per < 0.1 { format!("{:.1} ms", per * 1e3) } else { format!("{per:.2} s") };
        format!(
            "first UNet call: {latents} latents in {seconds:.1} s ({each} each) → about {} for the {} evaluations of this probe",
            duration(total),
            self.evaluations()
        )
    }
}

/// A duration for a person: seconds, minutes or hours.
fn duration(s: f64) -> String {
    if s < 90.0 {
        format!("{s:.0} s")
    } else if s < 5400.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_plan_counts_every_unet_evaluation_and_scales_the_first_call() {
        let s = ImageSettings { generate_seeds: vec![1, 2], ..ImageSettings::default() };
        let p = Plan::new(3, 1, &s);
        // Per model: 3 images × 2 draws × (4 timesteps × 2 captions + 2 for Wen) = 60; both: 120.
        assert_eq!(p.denoise, 120);
        // 2 models × 1 work × 2 seeds × 2 (guidance) × 50 steps.
        assert_eq!(p.generate, 400);
        // 16 latents in 8 s: 0.5 s each, × 520 = 260 s.
        assert_eq!(
            p.estimate(16, 8.0),
            "first UNet call: 16 latents in 8.0 s (0.50 s each) → about 4 min for the 520 evaluations of this probe"
        );
        assert!(p.estimate(16, 0.08).contains("(5.0 ms each)"), "{}", p.estimate(16, 0.08));
        assert_eq!(duration(45.0), "45 s");
        assert_eq!(duration(7200.0), "2.0 h");
    }
}
