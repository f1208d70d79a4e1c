//! Where the runtime's weights come from, as candle-nn `VarBuilder` backends (candle-nn's
//! var_builder.rs, `SimpleBackend`): the base model's tensors, dequantised, checked against
//! the shape the architecture asks for and refused when non-finite; and, for a merged model, the
//! merged tensors over the base model's own.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::cerr;
use super::config::LlamaConfig;
use super::llama::Llama;
use crate::error::{Error, Result};
use crate::load::BaseModel;

/// The base model's weights under their Hugging Face names. candle's error type cannot carry the
/// crate's typed error (which names the file) back out of `Llama::load`, so the first failure is
/// also kept in `failure` for [`load_base`] to return.
struct BaseWeights<'a> {
    base: &'a BaseModel,
    failure: &'a Mutex<Option<Error>>,
}

impl BaseWeights<'_> {
    fn tensor(&self, key: &str, shape: Option<&[usize]>, dev: &Device) -> Result<Tensor> {
        let base = self.base;
        let got = base.shape(key).ok_or_else(|| {
            Error::input(&base.path, format!("base model has no weight {key}, which the architecture needs"))
        })?;
        if let Some(shape) = shape.filter(|&s| s != got) {
            return Err(Error::input(
                &base.path,
                format!("weight {key} has shape {got:?}, the config implies {shape:?}"),
            ));
        }
        let got = got.to_vec();
        let v = base.values_f32(key)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(Error::input(&base.path, format!("weight {key} holds a non-finite value at index {i}")));
        }
        Tensor::from_vec(v, got, dev).map_err(cerr)
    }

    /// Keep `e` for [`load_base`] and hand candle an error with the same text.
    fn fail(&self, e: Error) -> candle_core::Error {
        let text = e.to_string();
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
        candle_core::Error::Msg(text)
    }
}

impl SimpleBackend for BaseWeights<'_> {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name, Some(s.dims()), dev).map_err(|e| self.fail(e))?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.tensor(name, None, dev).map_err(|e| self.fail(e))?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.base.shape(name).is_some()
    }
}

/// The runnable f32 model of `base` on `device`.
pub fn load_base(base: &BaseModel, cfg: &LlamaConfig, device: &Device) -> Result<Llama> {
    let failure = Mutex::new(None);
    let vb = VarBuilder::from_backend(Box::new(BaseWeights { base, failure: &failure }), DType::F32, device.clone());
    let loaded = Llama::load(vb, cfg);
    loaded.map_err(|e| failure.into_inner().unwrap_or_else(PoisonError::into_inner).unwrap_or_else(|| cerr(e)))
}

/// A merged model's weights: the merged tensors for the keys an adapter changed, the base
/// model's own tensors (shared, not copied) for the rest.
struct Overlay<'a> {
    base: &'a Llama,
    merged: HashMap<String, Tensor>,
}

impl SimpleBackend for Overlay<'_> {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.get_unchecked(name, dtype, dev)?;
        if t.shape() != &s {
            candle_core::bail!("merged weight {name} has shape {:?}, the model needs {:?}", t.dims(), s.dims());
        }
        Ok(t)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        let t = self.merged.get(name).or_else(|| self.base.weight(name));
        let t = t.ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        t.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.merged.contains_key(name) || self.base.weight(name).is_some()
    }
}

/// `base` with the tensors in `merged` (Hugging Face keys; the embedding's key for a tied
/// output head) put in place of its own, built the way `base` was. LoRA pairs attached to
/// `base` are not carried over.
pub fn load_merged(base: &Llama, merged: HashMap<String, Tensor>) -> Result<Llama> {
    let vb = VarBuilder::from_backend(Box::new(Overlay { base, merged }), DType::F32, base.device().clone());
    Llama::load(vb, &base.cfg).map_err(cerr)
}
