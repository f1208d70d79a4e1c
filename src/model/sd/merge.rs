//! Merging an adapter into the SD runtime: W' = W + ΔW for every UNet and text-encoder weight a
//! module resolved to (ΔW from `DeltaW::dense_delta`, which is exact for every kind load/ reads:
//! LoRA and LoCon with or without a Tucker core, LoHa, LoKr, full diffs with their bias, DoRA,
//! (IA)³ and replacements, which need W), in the base's stored layout, so a single-file
//! checkpoint and a pipeline merge alike. Modules that change nothing the UNet or text encoder
//! reads (the VAE, unused tensors) are refused with their names.

use std::collections::HashMap;

use candle_core::Tensor;
use nalgebra::DMatrix;

use super::weights::{Part, Weights};
use crate::error::{Error, Result};
use crate::load::{Adapter, Delta, LoraModule};
use crate::model::{cerr, MergeSummary};
use crate::spectral::DeltaW;

fn to_matrix(t: &Tensor) -> Result<DMatrix<f64>> {
    let dims = t.dims();
    let rows = dims.first().copied().unwrap_or(1);
    let cols: usize = dims.iter().skip(1).product();
    let v = t.flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(cerr)?;
    Ok(DMatrix::from_fn(rows, cols, |i, j| v[i * cols + j] as f64))
}

fn from_matrix(m: &DMatrix<f64>, like: &Tensor) -> Result<Tensor> {
    let (rows, cols) = m.shape();
    let v: Vec<f32> = (0..rows * cols).map(|k| m[(k / cols, k % cols)] as f32).collect();
    Tensor::from_vec(v, like.dims(), like.device()).map_err(cerr)
}

fn refuse(adapter: &Adapter, m: &LoraModule, why: &str) -> Error {
    Error::input(&adapter.path, format!("module {} ({}): {why}", m.name, m.base_key))
}

/// The tensors `adapter` changes, merged over `weights` and the tensors an earlier merge
/// changed (`current`), by base key.
pub(crate) fn merge(
    adapter: &Adapter,
    weights: &Weights,
    current: &HashMap<String, Tensor>,
) -> Result<(HashMap<String, Tensor>, MergeSummary)> {
    if adapter.modules.is_empty() {
        return Err(Error::input(
            &adapter.path,
            "no module of the adapter changes a UNet or text-encoder weight of this base",
        ));
    }
    let parts = weights.parts();
    let mut merged = current.clone();
    let mut summary = MergeSummary::default();
    for m in &adapter.modules {
        if !m.resolved {
            return Err(refuse(adapter, m, "not matched against this base's weights, so it cannot be merged"));
        }
        match parts.get(m.base_key.as_str()) {
            Some(Part::Unet | Part::Text) => {}
            Some(Part::Vae) => {
                return Err(refuse(adapter, m, "changes the VAE; only UNet and text-encoder weights are merged"))
            }
            None => {
                return Err(refuse(
                    adapter,
                    m,
                    "changes no weight the UNet or the text encoder uses, so the image runtime cannot merge it",
                ))
            }
        }
        let w = merged.get(&m.base_key).or_else(|| weights.tensors.get(&m.base_key)).cloned();
        let w = w.ok_or_else(|| Error::Internal(format!("runtime weight {} not loaded", m.base_key)))?;
        let w64 = to_matrix(&w)?;
        let delta = m.dense_delta(Some(&w64)).map_err(|e| refuse(adapter, m, &e.to_string()))?;
        if delta.shape() != w64.shape() {
            return Err(refuse(adapter, m, &format!("ΔW is {:?}, the weight {:?}", delta.shape(), w64.shape())));
        }
        if let Some(bad) = delta.iter().find(|x| !x.is_finite()) {
            return Err(refuse(adapter, m, &format!("ΔW holds a non-finite value ({bad})")));
        }
        // LyCORIS `full` stores the bias difference beside the weight's (`diff_b`).
        if let Delta::Diff { bias: Some(b), .. } = &m.delta {
            let key = format!("{}.bias", m.base_key.strip_suffix(".weight").unwrap_or(&m.base_key));
            let old = merged.get(&key).or_else(|| weights.tensors.get(&key)).cloned();
            let old = old.ok_or_else(|| {
                refuse(adapter, m, &format!("has a bias difference, but {key} is no bias the runtime uses"))
            })?;
            let db = b.values()?;
            if db.len() != old.elem_count() || db.iter().any(|x| !x.is_finite()) {
                return Err(refuse(adapter, m, "its bias difference does not fit the bias or is not finite"));
            }
            let ob = old.flatten_all().and_then(|x| x.to_vec1::<f32>()).map_err(cerr)?;
            let nb: Vec<f32> = ob.iter().zip(&db).map(|(o, d)| (*o as f64 + m.scale * d) as f32).collect();
            merged.insert(key, Tensor::from_vec(nb, old.dims(), old.device()).map_err(cerr)?);
        }
        if delta.iter().all(|&x| x == 0.0) {
            summary.zero.push(m.base_key.clone());
            continue;
        }
        merged.insert(m.base_key.clone(), from_matrix(&(w64 + delta), &w)?);
        summary.merged.push(m.base_key.clone());
    }
    Ok((merged, summary))
}
