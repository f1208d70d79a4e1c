//! Merging an adapter into the runnable model: W' = W + ΔW for each touched matrix (DoRA,
//! (IA)³ and `modules_to_save` replacements through `LoraModule::dense_delta`, which needs W).
//! Untouched tensors are shared with the base model, so the merged model costs only the
//! matrices the adapter changes.

use candle_core::{Device, Tensor};
use nalgebra::DMatrix;

use super::cerr;
use super::llama::{Llama, LoraPair};
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

/// Which tensor of the model a Hugging Face key names. Tied embeddings are one matrix: a
/// change to either name changes both (PEFT's merge writes into the shared weight).
fn slots<'a>(m: &'a mut Llama, key: &str) -> Option<Vec<&'a mut Tensor>> {
    let tied = m.cfg.tie_word_embeddings;
    match key {
        "model.embed_tokens.weight" | "lm_head.weight" if tied => return Some(vec![&mut m.embed, &mut m.lm_head]),
        "model.embed_tokens.weight" => return Some(vec![&mut m.embed]),
        "lm_head.weight" => return Some(vec![&mut m.lm_head]),
        "model.norm.weight" => return Some(vec![&mut m.norm]),
        _ => {}
    }
    let (idx, part) = layer_part(key)?;
    let layer = m.layers.get_mut(idx)?;
    match part {
        "input_layernorm.weight" => return Some(vec![&mut layer.input_norm]),
        "post_attention_layernorm.weight" => return Some(vec![&mut layer.post_norm]),
        _ => {}
    }
    let (name, what) = part.rsplit_once('.')?;
    let proj = layer.proj_mut(name)?;
    match what {
        "weight" => Some(vec![&mut proj.w]),
        "bias" => proj.bias.as_mut().map(|b| vec![b]),
        _ => None,
    }
}

/// `model.layers.N.rest` → (N, rest).
fn layer_part(key: &str) -> Option<(usize, &str)> {
    let (idx, part) = key.strip_prefix("model.layers.")?.split_once('.')?;
    Some((idx.parse().ok()?, part))
}

fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let dims = t.dims();
    let rows = dims.first().copied().unwrap_or(1);
    let cols: usize = dims.iter().skip(1).product();
    let v = t.flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(cerr)?;
    Ok(DMatrix::from_fn(rows, cols, |i, j| v[i * cols + j] as f64))
}

fn from_matrix(m: &DMatrix<f64>, shape: &[usize]) -> Result<Tensor> {
    let (rows, cols) = m.shape();
    let mut v = Vec::with_capacity(rows * cols);
    for i in 0..rows {
        for j in 0..cols {
            v.push(m[(i, j)] as f32);
        }
    }
    Tensor::from_vec(v, shape, &Device::Cpu).map_err(cerr)
}

fn unusable(adapter: &Adapter, m: &LoraModule, why: &str) -> Error {
    Error::mismatch(&adapter.path, format!("module {} ({}): {why}", m.name, m.base_key))
}

/// The base model with the adapter merged in. The adapter's modules must already be resolved
/// against the same base (`Adapter::attach_base`).
pub fn merge_adapter(base: &Llama, adapter: &Adapter) -> Result<(Llama, MergeSummary)> {
    let mut merged = base.clone();
    let mut summary = MergeSummary::default();
    for m in &adapter.modules {
        let targets = slots(&mut merged, &m.base_key)
            .ok_or_else(|| unusable(adapter, m, "the model runtime has no such weight, so it cannot be merged"))?;
        let w = targets[0].clone();
        let w64 = to_matrix(&w)?;
        let delta = m.dense_delta(Some(&w64)).map_err(|e| unusable(adapter, m, &e.to_string()))?;
        if let Some(bad) = delta.iter().find(|x| !x.is_finite()) {
            return Err(unusable(adapter, m, &format!("ΔW holds a non-finite value ({bad})")));
        }
        if delta.iter().all(|&x| x == 0.0) {
            summary.zero.push(m.base_key.clone());
            continue;
        }
        let new = from_matrix(&(w64 + delta), w.dims())?;
        for t in targets {
            *t = new.clone();
        }
        summary.merged.push(m.base_key.clone());
    }
    Ok((merged, summary))
}

/// The base model with the adapter's plain LoRA modules attached unmerged (y = x·Wᵀ +
/// s·x·Aᵀ·Bᵀ): an independent route to the merged model's output, for checking the merge.
pub fn attach_lora(base: &Llama, adapter: &Adapter) -> Result<Llama> {
    let mut model = base.clone();
    for m in &adapter.modules {
        let Delta::LowRank { up, down, mid: None, transposed: false } = &m.delta else {
            return Err(unusable(adapter, m, "only plain LoRA modules can run unmerged"));
        };
        if m.magnitude.is_some() {
            return Err(unusable(adapter, m, "DoRA modules cannot run unmerged"));
        }
        let (a, b) = (down.as_2d()?, up.as_2d()?);
        let pair = LoraPair {
            a: from_matrix(&a, &[a.nrows(), a.ncols()])?,
            b: from_matrix(&b, &[b.nrows(), b.ncols()])?,
            scale: m.scale,
        };
        let key = m.base_key.strip_suffix(".weight").unwrap_or(&m.base_key);
        let proj = layer_part(key)
            .and_then(|(layer, name)| model.layers.get_mut(layer)?.proj_mut(name))
            .ok_or_else(|| unusable(adapter, m, "not a projection inside a layer"))?;
        proj.lora = Some(pair);
    }
    Ok(model)
}
