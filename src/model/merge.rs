//! An adapter on the runnable model, two ways. `apply_adapter` (what the probe runs) keeps every
//! base matrix as stored and runs the adapter beside it on the projections it touches (llama.rs
//! `Adaptation`: LoRA/rsLoRA factors, DoRA's per-row magnitude, (IA)³ vectors in their own exact
//! forms; a dense f32 ΔW of just that matrix for formats that exist only densely, LoHa, LoKr,
//! full). `merge_adapter` writes W' = W + ΔW into an f32 copy of each touched matrix (ΔW from
//! `LoraModule::dense_delta`, which needs W for DoRA, (IA)³ and replacements): the reference the
//! unmerged route is checked against. Either way untouched tensors are shared with the base.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use nalgebra::DMatrix;

use super::cerr;
use super::llama::{Adaptation, Llama, LoraPair};
use super::weight::Weight;
use crate::error::{Error, Result};
use crate::linalg::NormAxis;
use crate::load::{Adapter, Delta, LoraModule};
use crate::spectral::DeltaW;

/// What merging did, module by module (base keys, sorted as the adapter's modules are).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeSummary {
    /// Keys whose weight changed.
    pub merged: Vec<String>,
    /// Keys whose ΔW is exactly zero (the base tensor is kept as is).
    pub zero: Vec<String>,
    /// Bytes of f32 the adapter's terms hold beside the base (factors, vectors, and the dense
    /// ΔW or merged copies of the matrices that need one).
    #[serde(default)]
    pub adapter_bytes: usize,
    /// Keys of the matrices that needed a dense f32 ΔW or merged copy.
    #[serde(default)]
    pub dense: Vec<String>,
}

/// The key `Llama::load` reads the tensor named by `key` under. Tied embeddings are one
/// matrix, read as the embedding: a change to either name changes both (PEFT's merge writes
/// into the shared weight).
fn load_key<'a>(m: &Llama, key: &'a str) -> &'a str {
    if m.cfg.tie_word_embeddings && key == "lm_head.weight" {
        "model.embed_tokens.weight"
    } else {
        key
    }
}

fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let dims = t.dims();
    let rows = dims.first().copied().unwrap_or(1);
    let cols: usize = dims.iter().skip(1).product();
    let v = t.flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(cerr)?;
    Ok(DMatrix::from_fn(rows, cols, |i, j| v[i * cols + j] as f64))
}

fn from_matrix(m: &DMatrix<f64>, shape: &[usize], dev: &Device) -> Result<Tensor> {
    let (rows, cols) = m.shape();
    let mut v = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            v.push(m[(i, j)] as f32);
        }
    }
    Tensor::from_vec(v, shape, dev).map_err(cerr)
}

fn unusable(adapter: &Adapter, m: &LoraModule, why: &str) -> Error {
    Error::mismatch(&adapter.path, format!("module {} ({}): {why}", m.name, m.base_key))
}

/// The base weight under `key` as an f64 matrix (one matrix widened at a time).
fn base_matrix(model: &Llama, adapter: &Adapter, m: &LoraModule, key: &str) -> Result<DMatrix<f64>> {
    let w = model.matrix(key).ok_or_else(|| unusable(adapter, m, "the model runtime has no such weight"))?;
    to_matrix(&w.to_f32().map_err(cerr)?)
}

/// ΔW of `m` against `w`, refused when non-finite.
fn checked_delta(adapter: &Adapter, m: &LoraModule, w: &DMatrix<f64>) -> Result<DMatrix<f64>> {
    let delta = m.dense_delta(Some(w)).map_err(|e| unusable(adapter, m, &e.to_string()))?;
    if let Some(bad) = delta.iter().find(|x| !x.is_finite()) {
        return Err(unusable(adapter, m, &format!("ΔW holds a non-finite value ({bad})")));
    }
    Ok(delta)
}

/// The base model with the adapter merged into f32 copies of the matrices it changes. The
/// adapter's modules must already be resolved against the same base (`Adapter::attach_base`).
pub fn merge_adapter(base: &Llama, adapter: &Adapter) -> Result<(Llama, MergeSummary)> {
    let mut model = base.clone();
    let mut summary = MergeSummary::default();
    for m in &adapter.modules {
        let key = load_key(base, &m.base_key);
        // An earlier module may have changed the same matrix (both names of a tied embedding),
        // so W is read from the model being merged.
        let w64 = base_matrix(&model, adapter, m, key)?;
        let delta = checked_delta(adapter, m, &w64)?;
        if delta.iter().all(|&x| x == 0.0) {
            summary.zero.push(m.base_key.clone());
            continue;
        }
        let shape = model.matrix(key).expect("read above").dims().map_err(cerr)?;
        let merged = from_matrix(&(w64 + delta), &[shape.0, shape.1], base.device())?;
        summary.adapter_bytes += merged.elem_count() * 4;
        model.set_matrix(key, Weight::F32(merged));
        summary.merged.push(m.base_key.clone());
        summary.dense.push(m.base_key.clone());
    }
    Ok((model, summary))
}

fn vector(v: &[f64], dev: &Device) -> Result<Tensor> {
    Tensor::from_vec(v.iter().map(|&x| x as f32).collect::<Vec<f32>>(), v.len(), dev).map_err(cerr)
}

/// The LoRA pair of a plain low-rank module (`[r, in]`, `[out, r]`, scale), or `None` for the
/// forms that are not (Tucker core, transposed storage).
fn plain_pair(adapter: &Adapter, m: &LoraModule, dev: &Device) -> Result<Option<(LoraPair, bool)>> {
    let Delta::LowRank { up, down, mid: None, transposed: false } = &m.delta else { return Ok(None) };
    let (a, b) = (down.as_2d()?, up.as_2d()?);
    if let Some(bad) = a.iter().chain(b.iter()).find(|x| !x.is_finite()) {
        return Err(unusable(adapter, m, &format!("ΔW holds a non-finite value ({bad})")));
    }
    let zero = m.scale == 0.0 || a.iter().all(|&x| x == 0.0) || b.iter().all(|&x| x == 0.0);
    let pair = LoraPair {
        a: from_matrix(&a, &[a.nrows(), a.ncols()], dev)?,
        b: from_matrix(&b, &[b.nrows(), b.ncols()], dev)?,
        scale: m.scale,
    };
    Ok(Some((pair, zero)))
}

/// DoRA's rescaling m / ‖W + ΔW‖ along the magnitude's axis (0 where the norm is 0, as
/// `linalg::dora_rescale` does), from the base weight and the LoRA part's dense ΔW.
fn dora_scale(adapter: &Adapter, m: &LoraModule, w: &DMatrix<f64>) -> Result<(NormAxis, Vec<f64>)> {
    let mag = m.magnitude.as_ref().expect("a DoRA module");
    let plain = m.factors_ignoring_magnitude()?.map(|f| f.dense());
    let plain = plain.ok_or_else(|| unusable(adapter, m, "DoRA without low-rank factors"))?;
    let merged = w + plain;
    let mvec = mag.tensor.values()?;
    let norms: Vec<f64> = match mag.axis {
        NormAxis::Row => merged.row_iter().map(|r| r.norm()).collect(),
        NormAxis::Column => merged.column_iter().map(|c| c.norm()).collect(),
    };
    if mvec.len() != norms.len() {
        return Err(unusable(
            adapter,
            m,
            &format!("DoRA magnitude has {} values, the weight has {} along its norm axis", mvec.len(), norms.len()),
        ));
    }
    Ok((mag.axis, mvec.iter().zip(&norms).map(|(g, n)| if *n > 0.0 { g / n } else { 0.0 }).collect()))
}

/// How `m` runs beside the frozen weight under `key`, and whether its ΔW is exactly zero.
fn adaptation(model: &Llama, adapter: &Adapter, m: &LoraModule, key: &str) -> Result<(Adaptation, bool, bool)> {
    let dev = model.device().clone();
    if let Some((pair, zero)) = plain_pair(adapter, m, &dev)? {
        if m.magnitude.is_none() {
            return Ok((Adaptation { lora: Some(pair), ..Default::default() }, zero, false));
        }
        let (axis, scale) = dora_scale(adapter, m, &base_matrix(model, adapter, m, key)?)?;
        let unit = zero && scale.iter().all(|&s| s == 1.0);
        let t = Some(vector(&scale, &dev)?);
        let (in_scale, out_scale) = if axis == NormAxis::Row { (None, t) } else { (t, None) };
        return Ok((Adaptation { lora: Some(pair), in_scale, out_scale, dense: None }, unit, false));
    }
    if let Delta::Ia3 { weight, on_input } = &m.delta {
        let (rows, cols) = model.matrix(key).map(|w| w.dims()).transpose().map_err(cerr)?.unwrap_or((0, 0));
        let v = weight.values()?;
        let want = if *on_input { cols } else { rows };
        if v.len() != want || v.iter().any(|x| !x.is_finite()) {
            return Err(unusable(adapter, m, &format!("(IA)³ vector needs {want} finite values, has {}", v.len())));
        }
        // W' = W ⊙ (1 + l) along the axis (the ΔW = W ⊙ l that dense_delta writes).
        let scale = vector(&v.iter().map(|x| 1.0 + x).collect::<Vec<_>>(), &dev)?;
        let zero = v.iter().all(|&x| x == 0.0);
        let a = if *on_input {
            Adaptation { in_scale: Some(scale), ..Default::default() }
        } else {
            Adaptation { out_scale: Some(scale), ..Default::default() }
        };
        return Ok((a, zero, false));
    }
    let w = base_matrix(model, adapter, m, key)?;
    let delta = checked_delta(adapter, m, &w)?;
    let zero = delta.iter().all(|&x| x == 0.0);
    let dense = from_matrix(&delta, &[delta.nrows(), delta.ncols()], &dev)?;
    Ok((Adaptation { dense: Some(dense), ..Default::default() }, zero, true))
}

/// The base model with the adapter running unmerged beside its weights (which stay as stored
/// and shared): what the probe runs, so an 8B base is never copied. The embedding (and a tied
/// output head) has no projection to run beside, so a module changing it merges into an f32
/// copy of that one matrix. The adapter must be resolved against the same base.
pub fn apply_adapter(base: &Llama, adapter: &Adapter) -> Result<(Llama, MergeSummary)> {
    let mut model = base.clone();
    let mut summary = MergeSummary::default();
    let mut seen: HashMap<String, &str> = HashMap::new();
    for m in &adapter.modules {
        let key = load_key(base, &m.base_key);
        if let Some(first) = seen.insert(key.to_string(), &m.name) {
            if key != "model.embed_tokens.weight" {
                return Err(unusable(adapter, m, &format!("module {first} already changes the same weight")));
            }
        }
        let module = key.strip_suffix(".weight").unwrap_or(key);
        if model.linear_mut(module).is_none() || key == "model.embed_tokens.weight" {
            // Merged: the embedding is looked up, not multiplied.
            let w64 = base_matrix(&model, adapter, m, key)?;
            let delta = checked_delta(adapter, m, &w64)?;
            if delta.iter().all(|&x| x == 0.0) {
                summary.zero.push(m.base_key.clone());
                continue;
            }
            let shape = [delta.nrows(), delta.ncols()];
            let merged = from_matrix(&(w64 + delta), &shape, base.device())?;
            summary.adapter_bytes += merged.elem_count() * 4;
            if !model.set_matrix(key, Weight::F32(merged)) {
                return Err(unusable(adapter, m, "the model runtime has no such weight, so it cannot be merged"));
            }
            summary.merged.push(m.base_key.clone());
            summary.dense.push(m.base_key.clone());
            continue;
        }
        let (a, zero, dense) = adaptation(&model, adapter, m, key)?;
        if zero {
            summary.zero.push(m.base_key.clone());
            continue;
        }
        summary.adapter_bytes += a.bytes();
        if dense {
            summary.dense.push(m.base_key.clone());
        }
        model.linear_mut(module).expect("checked above").set_adaptation(a);
        summary.merged.push(m.base_key.clone());
    }
    Ok((model, summary))
}
