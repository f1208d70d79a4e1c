//! Spectral analysis: what each module adds (docs/spectrum.md), from its factors wherever it can.

pub mod compare;
pub(crate) mod delta;
pub mod metrics;

use std::collections::BTreeMap;

use nalgebra::DMatrix;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};

use crate::error::{Error, Result};
use crate::linalg::{randomized_svd, svd_dense, svd_factors, Factors, Svd};
use crate::load::{Adapter, BaseModel, Delta, LoraModule, ModuleKind, TensorRef};
use crate::named::closed_set;
pub use delta::DeltaW;
pub(crate) use delta::{within_abs_limit, MAX_ABS_VALUE};
use metrics::*;

#[derive(Debug, Clone)]
pub struct SpectrumOptions {
    /// Bits of information one effective parameter can hold (Morris et al. 2025 measured ≈3.6
    /// for GPT-style models).
    pub bits_per_param: f64,
    /// Intruder dimensions: how many top singular vectors of W+ΔW to test, and the cosine
    /// threshold (Shuttleworth et al. 2024; PEFT `reduce_intruder_dimension` defaults).
    pub intruder_top_k: usize,
    pub intruder_epsilon: f64,
    /// Largest min(m, n) for which dense SVDs of base-dependent matrices are computed; above it
    /// the spectrum is the randomized top 64 and intruders are not computed.
    pub max_dense_dim: usize,
    /// Whether intruder dimensions are counted at all: two dense SVDs per module, most of the
    /// spectrum's time on a real base (35 of 60 s on the SmolLM2 demo). `probe` leaves them
    /// out unless asked (`--intruders`): its question is what the model gives back, and the
    /// intruder count is a spectrum statistic that `spectrum` and `report` still give.
    pub intruders: bool,
    pub seed: u64,
}

impl Default for SpectrumOptions {
    fn default() -> Self {
        SpectrumOptions {
            bits_per_param: 3.6,
            intruder_top_k: 10,
            intruder_epsilon: 0.5,
            max_dense_dim: 1536,
            intruders: true,
            seed: 0x5eed,
        }
    }
}

/// Largest `--max-dense-dim` accepted: a dense SVD of a 16384² matrix already needs 2 GiB of
/// f64 and hours of CPU.
pub const MAX_DENSE_DIM: usize = 16_384;

impl SpectrumOptions {
    /// Refuse settings that would give non-finite bits or unbounded work, before any analysis.
    pub fn check(&self) -> Result<()> {
        if !(self.bits_per_param.is_finite() && self.bits_per_param > 0.0 && self.bits_per_param <= 64.0) {
            return Err(Error::Usage(format!(
                "--bits-per-param {} must be a finite number in (0, 64] (a parameter holds at most its bits)",
                self.bits_per_param
            )));
        }
        if self.max_dense_dim > MAX_DENSE_DIM {
            return Err(Error::Usage(format!(
                "--max-dense-dim {} is above the limit of {MAX_DENSE_DIM}",
                self.max_dense_dim
            )));
        }
        Ok(())
    }
}

closed_set! {
    /// How a module's spectrum was obtained.
    pub enum Route ("route") {
        /// QR of the low-rank factors and an SVD of the small core (never the dense ΔW).
        Factored = "factored",
        /// Singular values of a Kronecker product as products of its factors'.
        Kronecker = "kronecker",
        /// ΔW held whole (a `.diff`), or built from the base (DoRA, (IA)³, replacements).
        Dense = "dense",
        /// Randomized top-k SVD of a base-dependent ΔW too large for a dense SVD.
        Randomized = "randomized",
        /// DoRA without its base: the spectrum of the LoRA part B·A only.
        LoraPartOnly = "lora-part-only",
        /// The delta depends on base weights that were not given.
        NeedsBase = "needs-base",
        /// Recognised algorithm whose analysis is not implemented.
        Unsupported = "unsupported",
        /// A LoHa whose exact spectrum needs an SVD wider than `delta::MAX_EXACT_SVD_DIM`: no
        /// spectrum, capacity from the largest rank ΔW can have.
        RankBound = "rank-bound",
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ModuleSpectrum {
    pub base_key: String,
    pub name: String,
    pub kind: ModuleKind,
    pub route: Route,
    pub shape: Vec<usize>,
    pub rank: usize,
    pub singular_values: Vec<f64>,
    /// The spectrum lists only the top singular values.
    pub truncated: bool,
    pub fro: f64,
    pub spectral: f64,
    pub stable_rank: f64,
    pub effective_rank: f64,
    pub rank_90: Option<usize>,
    pub rank_99: Option<usize>,
    pub relative_fro: Option<f64>,
    pub relative_spectral: Option<f64>,
    pub amplification: Option<f64>,
    pub intruders: Option<usize>,
    /// Stored values of the module.
    pub params: usize,
    /// Degrees of freedom of ΔW at rank_99: rank_99·(m + n − rank_99) (+ m for a DoRA magnitude).
    pub effective_params: usize,
    pub capacity_bits: f64,
    pub note: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LayerSummary {
    pub layer: String,
    pub modules: usize,
    pub params: usize,
    pub effective_params: usize,
    pub capacity_bits: f64,
    pub fro: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Totals {
    pub params: usize,
    pub effective_params: usize,
    pub capacity_bits: f64,
    pub bits_per_param: f64,
    pub modules_analysed: usize,
    pub modules_not_analysed: usize,
    /// Distinct training images from sd-scripts metadata (`img_count` of its folders), else
    /// `ss_num_train_images` (images × repeats), when present.
    pub train_images: Option<u64>,
    pub capacity_bits_per_image: Option<f64>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SpectrumAnalysis {
    pub modules: Vec<ModuleSpectrum>,
    pub layers: Vec<LayerSummary>,
    pub totals: Totals,
    pub statement: String,
}

pub(crate) const STATEMENT: &str = "capacity_bits is an upper bound on the information this adapter could store: \
effective parameters (degrees of freedom of each ΔW at the rank holding 99% of its energy) times bits_per_param \
(3.6 by default, the capacity Morris et al. 2025 measured for GPT-style models). It says nothing about what the \
adapter does store, or whether it stores any particular work: that is what the merged-model probe measures.";

/// The layer a weight belongs to: its key up to the first numeric path element
/// (`model.layers.3`, `…input_blocks.4`, `lora_te_text_model_encoder_layers_0`).
pub(crate) fn layer_of(key: &str) -> String {
    let key = key.strip_suffix(".weight").unwrap_or(key);
    let sep = if key.contains('.') { '.' } else { '_' };
    let mut out = vec![];
    for part in key.split(sep) {
        out.push(part);
        if part.chars().all(|c| c.is_ascii_digit()) && !part.is_empty() {
            break;
        }
    }
    out.join(&sep.to_string())
}

/// The scale and every stored value of the module within ±`MAX_ABS_VALUE` (delta.rs), else a
/// value error: beyond it f64 products may overflow. Tensors in `checked` (the factors the fast
/// route already read under the same limit) are not read again.
fn check_magnitudes(m: &LoraModule, checked: &[&TensorRef]) -> Result<()> {
    use delta::MAX_ABS_VALUE;
    let why = format!(
        "beyond ±{MAX_ABS_VALUE:e} (limit MAX_ABS_VALUE), where f64 products of the values could overflow; \
         no spectrum can be computed"
    );
    if !delta::within_abs_limit(m.scale) {
        return Err(m.value_error(format!("scale {:e} is {why}", m.scale)));
    }
    let mut beyond = 0;
    for t in m.tensors.iter().filter(|t| !checked.iter().any(|c| c.name == t.name)) {
        beyond += t.float_stats(MAX_ABS_VALUE)?.beyond;
    }
    if beyond > 0 {
        return Err(m.value_error(format!("{beyond} value(s) {why}")));
    }
    Ok(())
}

fn check_finite(m: &LoraModule, f: &Factors) -> Result<()> {
    let bad = |x: &DMatrix<f64>| x.iter().filter(|v| !v.is_finite()).count();
    fn count(f: &Factors, bad: &dyn Fn(&DMatrix<f64>) -> usize) -> usize {
        match f {
            Factors::LowRank(u, d) => bad(u) + bad(d),
            Factors::Kron(a, b, _) => count(a, bad) + count(b, bad),
            Factors::Dense(d) => bad(d),
        }
    }
    let n = count(f, &bad);
    if n > 0 {
        return Err(m.value_error(format!("{n} NaN/Inf value(s) in its factors; no spectrum can be computed")));
    }
    Ok(())
}

struct BaseStats {
    fro: f64,
    sigma1: f64,
}

fn base_stats(w: &DMatrix<f64>, opts: &SpectrumOptions) -> Result<BaseStats> {
    let sigma1 = if w.nrows().min(w.ncols()) <= 64 {
        svd_dense(w, false)?.values.first().copied().unwrap_or(0.0)
    } else {
        randomized_svd(w, 4, 10, 4, opts.seed)?.values.first().copied().unwrap_or(0.0)
    };
    Ok(BaseStats { fro: w.norm(), sigma1 })
}

/// ‖ΔW‖_F / ‖U_rᵀ W V_r‖_F with U_r, V_r the singular vectors of ΔW's nonzero singular values
/// (LoRA paper §7.3).
fn amplification(svd: &Svd, w: &DMatrix<f64>) -> Option<f64> {
    let (u, v) = (svd.u.as_ref()?, svd.v.as_ref()?);
    let s1 = *svd.values.first()?;
    let r = svd.values.iter().filter(|&&x| x > s1 * 1e-10).count();
    if r == 0 {
        return None;
    }
    let proj = u.columns(0, r).tr_mul(&(w * v.columns(0, r)));
    let denom = proj.norm();
    (denom > 0.0).then(|| fro(&svd.values[..r]) / denom)
}

/// Count of the top-k left singular vectors of W+ΔW whose largest |cosine| with every left
/// singular vector of W is below ε (Shuttleworth et al. 2024; PEFT `intruders.py`).
pub(crate) fn intruder_count(w: &DMatrix<f64>, merged: &DMatrix<f64>, top_k: usize, eps: f64) -> Result<usize> {
    let ub = svd_dense(w, true)?.u.expect("vectors");
    let um = svd_dense(merged, true)?.u.expect("vectors");
    let k = top_k.min(um.ncols());
    let cos = um.columns(0, k).tr_mul(&ub);
    Ok((0..k).filter(|&i| cos.row(i).iter().fold(0.0f64, |a, x| a.max(x.abs())) < eps).count())
}

fn analyse_module(m: &LoraModule, base: Option<&BaseModel>, opts: &SpectrumOptions) -> Result<ModuleSpectrum> {
    let (rows, cols) = m.matrix_shape();
    let w = match base {
        Some(b) if m.resolved => Some(b.weight(&m.base_key)?),
        _ => None,
    };
    let vectors = w.is_some();
    let mut note = None;
    let mut truncated = false;
    let mut dense_delta: Option<DMatrix<f64>> = None;
    let unsupported = matches!(m.delta, Delta::Unsupported { .. });
    let fast = (!vectors && !unsupported && !m.needs_base()).then(|| m.fast_singular_values()).flatten();
    let streamed: Vec<&TensorRef> = match (&fast, &m.delta) {
        (Some(_), Delta::LowRank { up, down, .. }) => vec![up, down],
        _ => vec![],
    };
    check_magnitudes(m, &streamed)?;
    let beyond_exact = delta::loha_beyond_exact_svd(m);
    let (route, svd, total_energy): (Route, Option<Svd>, f64) = if let Delta::Unsupported { algo, .. } = &m.delta {
        note = Some(format!("{algo} is recognised but not analysed yet"));
        (Route::Unsupported, None, 0.0)
    } else if m.needs_base() {
        match &w {
            Some(w) => {
                let d = m.dense_delta(Some(w))?;
                let energy = d.norm_squared();
                let (route, s) = if rows.min(cols) <= opts.max_dense_dim {
                    (Route::Dense, svd_dense(&d, vectors)?)
                } else {
                    truncated = true;
                    (Route::Randomized, randomized_svd(&d, 64, 10, 2, opts.seed)?)
                };
                if opts.intruders {
                    dense_delta = Some(d);
                }
                (route, Some(s), energy)
            }
            None if m.kind == ModuleKind::Dora => {
                let f = m.factors_ignoring_magnitude()?.expect("LoRA part has factors");
                check_finite(m, &f)?;
                note =
                    Some("DoRA: the magnitude rescaling needs the base (--base); spectrum of the LoRA part B·A".into());
                let s = svd_factors(&f, false)?;
                let e = s.values.iter().map(|x| x * x).sum();
                (Route::LoraPartOnly, Some(s), e)
            }
            None => {
                note = Some(format!("the {} delta depends on the base weight; give --base", m.kind.as_str()));
                (Route::NeedsBase, None, 0.0)
            }
        }
    } else if let Some(values) = fast {
        let e = values.iter().map(|x| x * x).sum();
        (Route::Factored, Some(Svd { values, u: None, v: None }), e)
    } else if let Some((k, width)) = beyond_exact {
        note = Some(format!(
            "LoHa with r₁·r₂ = {k}: its exact spectrum needs an SVD of width {width}, above the limit of {} \
             (MAX_EXACT_SVD_DIM); spectrum not computed, capacity from the rank bound {width}",
            delta::MAX_EXACT_SVD_DIM
        ));
        (Route::RankBound, None, 0.0)
    } else {
        let f = m.factors()?.expect("base-free kinds have factors");
        check_finite(m, &f)?;
        let route = match &f {
            Factors::Kron(..) => Route::Kronecker,
            Factors::Dense(_) => Route::Dense,
            Factors::LowRank(..) => Route::Factored,
        };
        let s = svd_factors(&f, vectors)?;
        let e = s.values.iter().map(|x| x * x).sum();
        if vectors && opts.intruders && rows.min(cols) <= opts.max_dense_dim {
            dense_delta = Some(f.dense());
        }
        (route, Some(s), e)
    };
    let values = svd.as_ref().map(|s| s.values.clone()).unwrap_or_default();
    if !total_energy.is_finite() || values.iter().any(|v| !v.is_finite()) {
        return Err(
            m.value_error("its spectrum overflowed f64 (non-finite singular values); no spectrum can be computed")
        );
    }
    let (mut relative_fro, mut relative_spectral, mut amp, mut intruders) = (None, None, None, None);
    if let (Some(w), Some(s)) = (&w, &svd) {
        let bs = base_stats(w, opts)?;
        let f = total_energy.sqrt();
        relative_fro = (bs.fro > 0.0).then(|| f / bs.fro);
        relative_spectral = (bs.sigma1 > 0.0).then(|| values.first().copied().unwrap_or(0.0) / bs.sigma1);
        if !truncated {
            amp = amplification(s, w);
        }
        if let Some(d) = &dense_delta {
            intruders = Some(intruder_count(w, &(w + d), opts.intruder_top_k, opts.intruder_epsilon)?);
        } else if note.is_none() && opts.intruders {
            note = Some(format!("intruders not computed: min dimension above {}", opts.max_dense_dim));
        }
    }
    let rank_90 = rank_for_energy(&values, 0.90, total_energy);
    let rank_99 = rank_for_energy(&values, 0.99, total_energy);
    // Degrees of freedom of ΔW at its rank, never more than the values the module stores: a
    // Kronecker or Hadamard product can have a high rank from a few stored values (a LoKr's
    // k(m+n−k) was 5–50× its stored values), and a module cannot hold more than it stores.
    let effective_params = match route {
        Route::NeedsBase | Route::Unsupported => match &m.delta {
            // A replacement's information is the whole matrix; other vectors count as stored.
            Delta::Replace { .. } => rows * cols,
            _ => m.params,
        },
        Route::RankBound => rank_k_params(beyond_exact.map_or(0, |(_, width)| width), rows, cols).min(m.params),
        _ => {
            let k = rank_99.unwrap_or(values.len());
            (rank_k_params(k, rows, cols) + m.magnitude.as_ref().map_or(0, |g| g.tensor.numel())).min(m.params)
        }
    };
    Ok(ModuleSpectrum {
        base_key: m.base_key.clone(),
        name: m.name.clone(),
        kind: m.kind,
        route,
        shape: m.shape.clone(),
        rank: m.rank,
        fro: total_energy.sqrt(),
        spectral: values.first().copied().unwrap_or(0.0),
        stable_rank: if truncated {
            total_energy / values.first().map_or(1.0, |s| s * s).max(f64::MIN_POSITIVE)
        } else {
            stable_rank(&values)
        },
        effective_rank: effective_rank(&values),
        rank_90,
        rank_99,
        singular_values: values,
        truncated,
        relative_fro,
        relative_spectral,
        amplification: amp,
        intruders,
        params: m.params,
        effective_params,
        capacity_bits: effective_params as f64 * opts.bits_per_param,
        note,
    })
}

/// Analyse every module (in parallel). `tick` is called once per finished module.
pub(crate) fn analyse(
    adapter: &Adapter,
    base: Option<&BaseModel>,
    opts: &SpectrumOptions,
    tick: &(dyn Fn() + Sync),
) -> Result<SpectrumAnalysis> {
    let modules: Vec<ModuleSpectrum> = adapter
        .modules
        .par_iter()
        .map(|m| {
            // A numerical failure here comes from the file's values (overflow): report it as
            // bad input naming the file and the module.
            let r = analyse_module(m, base, opts).map_err(|e| match e {
                Error::Numeric(msg) => m.value_error(msg),
                other => other,
            });
            tick();
            r
        })
        .collect::<Result<_>>()?;
    let mut layers: BTreeMap<String, LayerSummary> = BTreeMap::new();
    for m in &modules {
        let l = layer_of(&m.base_key);
        let e = layers.entry(l.clone()).or_insert(LayerSummary {
            layer: l,
            modules: 0,
            params: 0,
            effective_params: 0,
            capacity_bits: 0.0,
            fro: 0.0,
        });
        e.modules += 1;
        e.params += m.params;
        e.effective_params += m.effective_params;
        e.capacity_bits += m.capacity_bits;
        e.fro = (e.fro * e.fro + m.fro * m.fro).sqrt();
    }
    let effective_params: usize = modules.iter().map(|m| m.effective_params).sum();
    let capacity_bits = effective_params as f64 * opts.bits_per_param;
    let train_images = adapter.metadata.training.images();
    let not =
        modules.iter().filter(|m| matches!(m.route, Route::NeedsBase | Route::Unsupported | Route::RankBound)).count();
    Ok(SpectrumAnalysis {
        totals: Totals {
            params: adapter.params(),
            effective_params,
            capacity_bits,
            bits_per_param: opts.bits_per_param,
            modules_analysed: modules.len() - not,
            modules_not_analysed: not,
            train_images,
            capacity_bits_per_image: train_images.map(|n| capacity_bits / n as f64),
        },
        // Natural order: layer 2 before layer 10.
        layers: {
            let mut v: Vec<LayerSummary> = layers.into_values().collect();
            v.sort_by(|a, b| crate::order::natural_cmp(&a.layer, &b.layer));
            v
        },
        modules,
        statement: STATEMENT.to_string(),
    })
}
