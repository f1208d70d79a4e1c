//! Merging an adapter into the runnable model: W' = W + ΔW for each touched matrix (DoRA,
//! (IA)³ and `modules_to_save` replacements through `LoraModule::dense_delta`, which needs W).
//! The merged model is loaded the way the base was, through a `VarBuilder` that serves the
//! merged matrices and the base model's own tensors for the rest (shared, not copied), so it
//! costs only the matrices the adapter changes. Unmerged LoRA pairs are attached to a copy of
//! the base for checking the merge.

use std::collections::HashMap;

use candle_core::{Device, Tensor};
use nalgebra::DMatrix;

use super::cerr;
use super::llama::{Llama, LoraPair};
use super::weights::load_merged;
use crate::error::{Error, Result};
use crate::load::{Adapter, Delta, LoraModule};
use crate::spectral::DeltaW;

/// What merging did, module by module (base keys, sorted as the adapter's modules are).
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct MergeSummary {
    /// Keys whose weight changed.
    pub merged: Vec<String>,
    /// Keys whose ΔW is exactly zero (the base tensor is kept as is).
    pub zero: Vec<String>,
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

/// The base model with the adapter merged in. The adapter's modules must already be resolved
/// against the same base (`Adapter::attach_base`).
pub fn merge_adapter(base: &Llama, adapter: &Adapter) -> Result<(Llama, MergeSummary)> {
    let mut merged: HashMap<String, Tensor> = HashMap::new();
    let mut summary = MergeSummary::default();
    for m in &adapter.modules {
        let key = load_key(base, &m.base_key);
        // An earlier module may have changed the same matrix (both names of a tied embedding).
        let w = merged.get(key).or_else(|| base.weight(key)).cloned();
        let w =
            w.ok_or_else(|| unusable(adapter, m, "the model runtime has no such weight, so it cannot be merged"))?;
        let w64 = to_matrix(&w)?;
        let delta = m.dense_delta(Some(&w64)).map_err(|e| unusable(adapter, m, &e.to_string()))?;
        if let Some(bad) = delta.iter().find(|x| !x.is_finite()) {
            return Err(unusable(adapter, m, &format!("ΔW holds a non-finite value ({bad})")));
        }
        if delta.iter().all(|&x| x == 0.0) {
            summary.zero.push(m.base_key.clone());
            continue;
        }
        merged.insert(key.to_string(), from_matrix(&(w64 + delta), w.dims(), w.device())?);
        summary.merged.push(m.base_key.clone());
    }
    Ok((load_merged(base, merged)?, summary))
}

/// The base model with the adapter's plain LoRA modules attached unmerged (y = x·Wᵀ +
/// s·x·Aᵀ·Bᵀ): an independent route to the merged model's output, for checking the merge.
pub fn attach_lora(base: &Llama, adapter: &Adapter) -> Result<Llama> {
    let mut model = base.clone();
    let dev = base.device().clone();
    for m in &adapter.modules {
        let Delta::LowRank { up, down, mid: None, transposed: false } = &m.delta else {
            return Err(unusable(adapter, m, "only plain LoRA modules can run unmerged"));
        };
        if m.magnitude.is_some() {
            return Err(unusable(adapter, m, "DoRA modules cannot run unmerged"));
        }
        let (a, b) = (down.as_2d()?, up.as_2d()?);
        let pair = LoraPair {
            a: from_matrix(&a, &[a.nrows(), a.ncols()], &dev)?,
            b: from_matrix(&b, &[b.nrows(), b.ncols()], &dev)?,
            scale: m.scale,
        };
        let key = m.base_key.strip_suffix(".weight").unwrap_or(&m.base_key);
        let linear = model.linear_mut(key).ok_or_else(|| unusable(adapter, m, "not a projection inside a layer"))?;
        linear.set_lora(pair);
    }
    Ok(model)
}
