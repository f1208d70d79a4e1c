//! The noise schedule and the DDIM sampler: ᾱ_t from the scheduler config as diffusers computes
//! it (scheduling_ddpm.py / scheduling_ddim.py: `linear`, `scaled_linear` and
//! `squaredcos_cap_v2` betas or `trained_betas`, in f32, `rescale_betas_zero_snr`), the forward
//! noising and training target (`add_noise`, `get_velocity`), and the DDIM timestep grid and
//! update with η = 0 (Song et al., ICLR 2021; `DDIMScheduler.set_timesteps` and `step`).
//! Without a scheduler config (single-file checkpoints) the schedule is SD 1.5's
//! (runwayml/stable-diffusion-v1-5 scheduler_config.json).

use candle_core::Tensor;

use super::config::Json;
use crate::error::{Error, Result};
use crate::model::cerr;

crate::named::closed_set! {
    /// What the UNet predicts (`prediction_type`).
    pub enum Prediction ("prediction type") {
        Epsilon = "epsilon",
        V = "v_prediction",
    }
}

crate::named::closed_set! {
    /// How DDIM spaces its timesteps over the training steps (`timestep_spacing`).
    pub enum TimestepSpacing ("timestep spacing") {
        Leading = "leading",
        Trailing = "trailing",
        Linspace = "linspace",
    }
}

/// Most training timesteps a scheduler config may declare (SD: 1000).
pub(crate) const MAX_TRAIN_TIMESTEPS: usize = 100_000;

#[derive(Debug, Clone, PartialEq)]
pub struct NoiseSchedule {
    /// ᾱ_t for t = 0 … train_timesteps − 1 (f32 values, as diffusers holds them).
    pub alphas_cumprod: Vec<f64>,
    pub prediction: Prediction,
    pub train_timesteps: usize,
    /// `beta_schedule` with its range, e.g. "scaled_linear 0.00085..0.012".
    pub betas: String,
    pub spacing: TimestepSpacing,
    pub steps_offset: usize,
    /// ᾱ after the last DDIM step: 1, or ᾱ_0 (`set_alpha_to_one`).
    pub final_alpha_cumprod: f64,
    /// DDIM clips its x₀ estimate to ±`clip_sample_range` when set.
    pub clip_sample: Option<f64>,
    /// Where it was read: the scheduler config's path, or "SD 1.5 defaults".
    pub source: String,
}

/// `torch.linspace(a, b, n, dtype=float32)` as ATen's CPU kernel computes it: from the start
/// for the first half, from the end for the second.
fn linspace_f32(a: f32, b: f32, n: usize) -> Vec<f32> {
    if n == 1 {
        return vec![a];
    }
    let step = (b - a) / (n - 1) as f32;
    (0..n).map(|i| if i < n / 2 { a + step * i as f32 } else { b - step * (n - i - 1) as f32 }).collect()
}

/// ᾱ from betas: `torch.cumprod(1 − β)` in f32 (ATen accumulates the product in f64 and rounds
/// each output to f32).
fn cumprod(betas: &[f32]) -> Vec<f64> {
    let mut acc = 1f64;
    betas
        .iter()
        .map(|b| {
            acc *= (1.0 - b) as f64;
            acc as f32 as f64
        })
        .collect()
}

impl NoiseSchedule {
    /// SD 1.5's schedule: scaled_linear 0.00085..0.012 over 1000 steps, `steps_offset` 1,
    /// `set_alpha_to_one` false, no clipping, leading spacing; epsilon unless `prediction` says.
    pub fn sd15(prediction: Prediction) -> Self {
        let betas: Vec<f32> =
            linspace_f32(0.00085f64.sqrt() as f32, 0.012f64.sqrt() as f32, 1000).into_iter().map(|x| x * x).collect();
        let ac = cumprod(&betas);
        NoiseSchedule {
            final_alpha_cumprod: ac[0],
            alphas_cumprod: ac,
            prediction,
            train_timesteps: 1000,
            betas: "scaled_linear 0.00085..0.012".into(),
            spacing: TimestepSpacing::Leading,
            steps_offset: 1,
            clip_sample: None,
            source: "SD 1.5 defaults".into(),
        }
    }

    /// From a diffusers `scheduler_config.json` (any of the SD schedulers: they share these
    /// fields; DDIM's own defaults where a field is absent).
    pub(crate) fn from_diffusers(j: &Json) -> Result<Self> {
        let t = j.usize("num_train_timesteps", 1000)?;
        if !(2..=MAX_TRAIN_TIMESTEPS).contains(&t) {
            return Err(Error::input(j.path, format!("num_train_timesteps {t}: between 2 and {MAX_TRAIN_TIMESTEPS}")));
        }
        let (start, end) = (j.f64("beta_start", 0.0001)?, j.f64("beta_end", 0.02)?);
        let schedule = j.str("beta_schedule")?.unwrap_or("linear");
        let mut betas: Vec<f32> = match j.get("trained_betas") {
            Some(Value::Array(a)) => {
                let v: Option<Vec<f32>> = a.iter().map(|x| x.as_f64().map(|f| f as f32)).collect();
                let v = v.ok_or_else(|| Error::input(j.path, "trained_betas: expected a list of numbers"))?;
                if v.len() != t {
                    return Err(Error::input(j.path, format!("trained_betas has {} values for {t} steps", v.len())));
                }
                v
            }
            Some(_) => return Err(Error::input(j.path, "trained_betas: expected a list of numbers")),
            None => match schedule {
                "linear" => linspace_f32(start as f32, end as f32, t),
                "scaled_linear" => {
                    linspace_f32(start.sqrt() as f32, end.sqrt() as f32, t).iter().map(|x| x * x).collect()
                }
                "squaredcos_cap_v2" => {
                    let ab = |x: f64| ((x + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2).cos().powi(2);
                    (0..t)
                        .map(|i| (1.0 - ab((i + 1) as f64 / t as f64) / ab(i as f64 / t as f64)).min(0.999) as f32)
                        .collect()
                }
                other => {
                    return Err(Error::input(
                        j.path,
                        format!("beta_schedule {other:?}: linear, scaled_linear and squaredcos_cap_v2 are supported"),
                    ))
                }
            },
        };
        if betas.iter().any(|b| !(0.0..1.0).contains(b)) {
            return Err(Error::input(j.path, "every beta must lie in [0, 1)"));
        }
        if j.bool("rescale_betas_zero_snr", false)? {
            betas = zero_terminal_snr(&betas);
        }
        let prediction = match j.str("prediction_type")?.unwrap_or("epsilon") {
            "epsilon" => Prediction::Epsilon,
            "v_prediction" => Prediction::V,
            other => {
                return Err(Error::input(
                    j.path,
                    format!("prediction_type {other:?}: the runtime runs epsilon and v_prediction models"),
                ))
            }
        };
        if j.bool("thresholding", false)? {
            return Err(Error::input(j.path, "thresholding (dynamic x₀ clipping) is not supported"));
        }
        let spacing = match j.str("timestep_spacing")? {
            None => TimestepSpacing::Leading,
            Some(s) => s.parse().map_err(|e: String| Error::input(j.path, e))?,
        };
        let ac = cumprod(&betas);
        let clip = j.bool("clip_sample", true)?.then(|| j.f64("clip_sample_range", 1.0)).transpose()?;
        Ok(NoiseSchedule {
            final_alpha_cumprod: if j.bool("set_alpha_to_one", true)? { 1.0 } else { ac[0] },
            alphas_cumprod: ac,
            prediction,
            train_timesteps: t,
            betas: match j.get("trained_betas") {
                Some(_) => "trained_betas".into(),
                None => format!("{schedule} {start}..{end}"),
            },
            spacing,
            steps_offset: j.usize("steps_offset", 0)?,
            clip_sample: clip,
            source: j.path.display().to_string(),
        })
    }

    /// ᾱ_t, as the f32 the schedule holds.
    fn alpha(&self, t: usize) -> Result<f32> {
        self.alphas_cumprod
            .get(t)
            .map(|&a| a as f32)
            .ok_or_else(|| Error::Usage(format!("timestep {t} is outside the schedule's 0..{}", self.train_timesteps)))
    }

    /// x_t = √ᾱ_t·x₀ + √(1 − ᾱ_t)·ε (`DDPMScheduler.add_noise`, its coefficients in f32).
    pub fn add_noise(&self, z0: &Tensor, eps: &Tensor, t: usize) -> Result<Tensor> {
        let a = self.alpha(t)?;
        let (s, n) = (a.sqrt(), (1.0 - a).sqrt());
        ((z0 * s as f64).and_then(|x| x + (eps * n as f64)?)).map_err(cerr)
    }

    /// What the UNet is trained to predict at t: ε, or v = √ᾱ_t·ε − √(1 − ᾱ_t)·x₀
    /// (`get_velocity`).
    pub fn target(&self, z0: &Tensor, eps: &Tensor, t: usize) -> Result<Tensor> {
        match self.prediction {
            Prediction::Epsilon => Ok(eps.clone()),
            Prediction::V => {
                let a = self.alpha(t)?;
                let (s, n) = (a.sqrt(), (1.0 - a).sqrt());
                ((eps * s as f64).and_then(|x| x - (z0 * n as f64)?)).map_err(cerr)
            }
        }
    }

    /// DDIM's timesteps for `steps` inference steps, first (noisiest) first
    /// (`DDIMScheduler.set_timesteps`).
    pub fn ddim_timesteps(&self, steps: usize) -> Result<Vec<usize>> {
        let t = self.train_timesteps;
        if steps == 0 || steps > t {
            return Err(Error::Usage(format!("DDIM steps must be between 1 and {t}, not {steps}")));
        }
        let ts: Vec<i64> = match self.spacing {
            TimestepSpacing::Leading => {
                let r = (t / steps) as i64;
                (0..steps as i64).rev().map(|i| i * r + self.steps_offset as i64).collect()
            }
            TimestepSpacing::Trailing => {
                let r = t as f64 / steps as f64;
                (0..steps).map(|i| (t as f64 - i as f64 * r).round() as i64 - 1).collect()
            }
            TimestepSpacing::Linspace => {
                let last = (t - 1) as f64;
                (0..steps)
                    .rev()
                    .map(|i| if steps == 1 { 0 } else { (last * i as f64 / (steps - 1) as f64).round() as i64 })
                    .collect()
            }
        };
        ts.into_iter()
            .map(|x| {
                usize::try_from(x).ok().filter(|&u| u < t).ok_or_else(|| {
                    Error::Usage(format!("DDIM timestep {x} (steps_offset {}) is outside 0..{t}", self.steps_offset))
                })
            })
            .collect()
    }

    /// One DDIM step with η = 0 from x_t given the model output at t: the x₀ and ε it implies,
    /// moved to the previous timestep t − T/steps (ᾱ_prev = the final ᾱ past the start).
    pub(crate) fn ddim_step(&self, x: &Tensor, out: &Tensor, t: usize, steps: usize) -> Result<Tensor> {
        let a = self.alpha(t)? as f64;
        let prev = t as i64 - (self.train_timesteps / steps) as i64;
        let ap = if prev >= 0 { self.alpha(prev as usize)? as f64 } else { self.final_alpha_cumprod };
        let (sa, sb) = (a.sqrt(), (1.0 - a).sqrt());
        let r = (|| {
            let (x0, eps) = match self.prediction {
                Prediction::Epsilon => (((x - (out * sb)?)? / sa)?, out.clone()),
                Prediction::V => (((x * sa)? - (out * sb)?)?, ((out * sa)? + (x * sb)?)?),
            };
            let (x0, eps) = match self.clip_sample {
                Some(c) => {
                    let x0 = x0.clamp(-c, c)?;
                    let eps = ((x - (&x0 * sa)?)? / sb)?;
                    (x0, eps)
                }
                None => (x0, eps),
            };
            (x0 * ap.sqrt())? + (eps * (1.0 - ap).sqrt())?
        })();
        r.map_err(cerr)
    }
}

use serde_json::Value;

/// diffusers' `rescale_zero_terminal_snr` (Lin et al., WACV 2024, Algorithm 1): shift and scale
/// √ᾱ so that the last step has zero signal, keeping the first.
fn zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let ac = cumprod(betas);
    let s: Vec<f64> = ac.iter().map(|a| a.sqrt()).collect();
    let (s0, st) = (s[0], s[s.len() - 1]);
    let bar: Vec<f64> = s.iter().map(|x| ((x - st) * s0 / (s0 - st)).powi(2)).collect();
    let mut out = vec![(1.0 - bar[0]) as f32];
    out.extend(bar.windows(2).map(|w| (1.0 - w[1] / w[0]) as f32));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ddim_timesteps_follow_diffusers() {
        let s = NoiseSchedule::sd15(Prediction::Epsilon);
        // DDIMScheduler(steps_offset=1).set_timesteps(10): [901, 801, …, 1].
        assert_eq!(s.ddim_timesteps(10).unwrap(), (0..10).rev().map(|i| i * 100 + 1).collect::<Vec<_>>());
        let mut t = s.clone();
        t.spacing = TimestepSpacing::Trailing;
        t.steps_offset = 0;
        assert_eq!(t.ddim_timesteps(4).unwrap(), vec![999, 749, 499, 249]);
        t.spacing = TimestepSpacing::Linspace;
        assert_eq!(t.ddim_timesteps(4).unwrap(), vec![999, 666, 333, 0]);
        assert!(s.ddim_timesteps(0).is_err() && s.ddim_timesteps(1001).is_err());
    }

    #[test]
    fn sd15_alphas_match_diffusers() {
        let s = NoiseSchedule::sd15(Prediction::Epsilon);
        // DDPMScheduler(beta_schedule="scaled_linear", 0.00085, 0.012).alphas_cumprod[[0, 999]].
        assert!((s.alphas_cumprod[0] - 0.99915).abs() < 1e-7, "{}", s.alphas_cumprod[0]);
        assert!((s.alphas_cumprod[999] - 0.0046601).abs() < 1e-6, "{}", s.alphas_cumprod[999]);
    }
}
