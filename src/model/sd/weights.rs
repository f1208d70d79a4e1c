//! Where the SD runtime's parameters come from. The modules ask for diffusers names under
//! `unet.`, `vae.` and `text_encoder.text_model.`; a diffusers pipeline stores exactly those (or,
//! saved by transformers ≥ 5, the text encoder without its `text_model.` level), a
//! single-file checkpoint stores them under original-LDM names (load/names.rs:
//! `diffusers_to_ldm`, `vae_diffusers_to_ldm`, `clip_to_openclip`), with the VAE attention's
//! linear layers as 1×1 convolutions and SD 2.x's q/k/v fused in one `in_proj`. The first load
//! reads each base tensor once into f32 (the one copy the runtime holds, finite values only,
//! shape checked before anything is read); a merged model is built from the merged tensors
//! over those same tensors (candle `Tensor`s share storage), as model/weights.rs does for llama.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

use super::config::{TextLayout, LDM_OPENCLIP, LDM_UNET, LDM_VAE};
use crate::error::{Error, Result};
use crate::load::names::{clip_to_openclip, diffusers_to_ldm, vae_diffusers_to_ldm};
use crate::load::BaseModel;
use crate::model::cerr;

/// How runtime names map to base keys.
#[derive(Debug, Clone)]
pub(crate) enum KeyMap {
    /// A diffusers pipeline directory: the base's keys are the runtime's names.
    Pipeline,
    /// A single-file original-LDM checkpoint.
    Ldm { layers_per_block: usize, vae_levels: usize, text: TextLayout },
}

/// The base tensor a runtime parameter is, or a third of (SD 2.x's fused q/k/v rows).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Source {
    pub key: String,
    pub third: Option<usize>,
}

/// Which part of the model a runtime name belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub(crate) enum Part {
    Unet,
    Vae,
    Text,
}

impl Part {
    pub fn of(name: &str) -> Option<Part> {
        if name.starts_with("unet.") {
            Some(Part::Unet)
        } else if name.starts_with("vae.") {
            Some(Part::Vae)
        } else if name.starts_with("text_encoder.") {
            Some(Part::Text)
        } else {
            None
        }
    }
}

impl KeyMap {
    /// The base keys a runtime name may be stored under, in the order tried.
    fn candidates(&self, name: &str) -> Vec<Source> {
        let plain = |k: String| Source { key: k, third: None };
        match self {
            KeyMap::Pipeline => {
                let mut v = vec![plain(name.to_string())];
                // transformers ≥ 5 saves `CLIPTextModel` without its `text_model.` level.
                if let Some(p) = name.strip_prefix("text_encoder.text_model.") {
                    v.push(plain(format!("text_encoder.{p}")));
                }
                v
            }
            KeyMap::Ldm { layers_per_block, vae_levels, text } => {
                if let Some(p) = name.strip_prefix("unet.") {
                    diffusers_to_ldm(p, *layers_per_block)
                        .into_iter()
                        .map(|k| plain(format!("{LDM_UNET}{k}")))
                        .collect()
                } else if let Some(p) = name.strip_prefix("vae.") {
                    vae_diffusers_to_ldm(p, *vae_levels).map(|k| plain(format!("{LDM_VAE}{k}"))).into_iter().collect()
                } else if let Some(p) = name.strip_prefix("text_encoder.text_model.") {
                    match text {
                        TextLayout::Hf { prefix } => vec![plain(format!("{prefix}{p}"))],
                        TextLayout::OpenClip => clip_to_openclip(p)
                            .map(|(k, third)| Source { key: format!("{LDM_OPENCLIP}{k}"), third })
                            .into_iter()
                            .collect(),
                    }
                } else {
                    vec![]
                }
            }
        }
    }
}

/// The shape a runtime parameter has when read from a base tensor of shape `stored`: a third of
/// the rows for fused q/k/v; a 1×1 convolution and a linear layer are the same values.
fn view_shape(stored: &[usize], third: Option<usize>, want: Option<&[usize]>) -> Option<Vec<usize>> {
    let mut s = stored.to_vec();
    if third.is_some() {
        if s.is_empty() || !s[0].is_multiple_of(3) {
            return None;
        }
        s[0] /= 3;
    }
    let Some(w) = want else { return Some(s) };
    let one_by_one = |a: &[usize], b: &[usize]| a.len() == b.len() + 2 && a[..b.len()] == *b && a[b.len()..] == [1, 1];
    (s == w || one_by_one(&s, w) || one_by_one(w, &s)).then(|| w.to_vec())
}

fn view(t: &Tensor, third: Option<usize>, shape: &[usize]) -> candle_core::Result<Tensor> {
    let t = match third {
        Some(i) => {
            let rows = t.dim(0)? / 3;
            t.narrow(0, i * rows, rows)?
        }
        None => t.clone(),
    };
    if t.dims() == shape {
        Ok(t)
    } else {
        t.reshape(shape)
    }
}

/// The base tensors the runtime read (base key → f32 tensor) and where each runtime name came
/// from.
#[derive(Debug, Default)]
pub(crate) struct Weights {
    pub tensors: HashMap<String, Tensor>,
    pub sources: HashMap<String, Source>,
}

impl Weights {
    /// The part of the model each base key the runtime uses feeds.
    pub fn parts(&self) -> HashMap<&str, Part> {
        self.sources.iter().filter_map(|(n, s)| Part::of(n).map(|p| (s.key.as_str(), p))).collect()
    }

    /// Parameters of one part (as the runtime holds them).
    pub fn params(&self, part: Part) -> usize {
        self.sources
            .iter()
            .filter(|(n, _)| Part::of(n) == Some(part))
            .filter_map(|(_, s)| {
                self.tensors.get(&s.key).map(|t| t.elem_count() / if s.third.is_some() { 3 } else { 1 })
            })
            .sum()
    }
}

/// The first load: tensors read from the base as the modules ask for them. candle's error type
/// cannot carry the crate's typed error (which names the file), so the first failure is also
/// kept for [`load_base`] to return.
struct Loader<'a> {
    base: &'a BaseModel,
    map: &'a KeyMap,
    device: Device,
    state: Mutex<Weights>,
    failure: Mutex<Option<Error>>,
}

impl Loader<'_> {
    fn fetch(&self, name: &str, want: Option<&[usize]>) -> Result<Tensor> {
        let base = self.base;
        let cands = self.map.candidates(name);
        let Some(src) = cands.iter().find(|c| base.shape(&c.key).is_some()).cloned() else {
            let keys: Vec<&str> = cands.iter().map(|c| c.key.as_str()).collect();
            let looked = if keys.is_empty() { name.to_string() } else { keys.join(" or ") };
            return Err(Error::input(&base.path, format!("base model has no weight {looked}, which the model needs")));
        };
        let stored = base.shape(&src.key).expect("found above").to_vec();
        let shape = view_shape(&stored, src.third, want).ok_or_else(|| {
            Error::input(
                &base.path,
                format!("weight {} has shape {stored:?}, the config implies {:?}", src.key, want.unwrap_or(&[])),
            )
        })?;
        let mut st = self.state.lock().unwrap_or_else(PoisonError::into_inner);
        let t = match st.tensors.get(&src.key) {
            Some(t) => t.clone(),
            None => {
                let v = base.values_f32(&src.key)?;
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(Error::input(
                        &base.path,
                        format!("weight {} holds a non-finite value at index {i}", src.key),
                    ));
                }
                let t = Tensor::from_vec(v, stored, &self.device).map_err(cerr)?;
                st.tensors.insert(src.key.clone(), t.clone());
                t
            }
        };
        let out = view(&t, src.third, &shape).map_err(cerr)?;
        st.sources.insert(name.to_string(), src);
        Ok(out)
    }

    fn fail(&self, e: Error) -> candle_core::Error {
        let text = e.to_string();
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
        candle_core::Error::Msg(text)
    }
}

impl SimpleBackend for Loader<'_> {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(s.dims())).map_err(|e| self.fail(e))?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None).map_err(|e| self.fail(e))?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.map.candidates(name).iter().any(|c| self.base.shape(&c.key).is_some())
    }
}

/// Build the model parts with `build` from the base's tensors; returns what `build` built and
/// the tensors it read.
pub(crate) fn load_base<T>(
    base: &BaseModel,
    map: &KeyMap,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<(T, Weights)> {
    let loader =
        Loader { base, map, device: device.clone(), state: Mutex::new(Weights::default()), failure: Mutex::new(None) };
    let vb = VarBuilder::from_backend(Box::new(LoaderRef(&loader)), DType::F32, device.clone());
    let built = build(vb);
    let failure = loader.failure.lock().unwrap_or_else(PoisonError::into_inner).take();
    let built = built.map_err(|e| failure.unwrap_or_else(|| cerr(e)))?;
    let weights = loader.state.into_inner().unwrap_or_else(PoisonError::into_inner);
    Ok((built, weights))
}

/// The loader borrowed by the `VarBuilder`, so its state can be taken back afterwards.
struct LoaderRef<'a, 'b>(&'a Loader<'b>);

impl SimpleBackend for LoaderRef<'_, '_> {
    fn get(&self, s: Shape, name: &str, i: Init, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get(s, name, i, dtype, dev)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        self.0.get_unchecked(name, dtype, dev)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains_tensor(name)
    }
}

/// A merged model's parameters: the merged tensors (by base key) where the adapter changed
/// one, the base's own tensors (shared) elsewhere, through the sources the first load found.
struct Overlay<'a> {
    weights: &'a Weights,
    merged: &'a HashMap<String, Tensor>,
}

impl Overlay<'_> {
    fn fetch(&self, name: &str, want: Option<&[usize]>) -> candle_core::Result<Tensor> {
        let src = self
            .weights
            .sources
            .get(name)
            .ok_or_else(|| candle_core::Error::CannotFindTensor { path: name.to_string() })?;
        let t = self.merged.get(&src.key).or_else(|| self.weights.tensors.get(&src.key));
        let t = t.ok_or_else(|| candle_core::Error::CannotFindTensor { path: src.key.clone() })?;
        let shape = view_shape(t.dims(), src.third, want).ok_or_else(|| {
            candle_core::Error::Msg(format!(
                "merged weight {} has shape {:?}, the model needs {want:?}",
                src.key,
                t.dims()
            ))
        })?;
        view(t, src.third, &shape)
    }
}

impl SimpleBackend for Overlay<'_> {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, Some(s.dims()))?.to_dtype(dtype)
    }
    fn get_unchecked(&self, name: &str, dtype: DType, _: &Device) -> candle_core::Result<Tensor> {
        self.fetch(name, None)?.to_dtype(dtype)
    }
    fn contains_tensor(&self, name: &str) -> bool {
        self.weights.sources.contains_key(name)
    }
}

/// Build model parts with `build` from `merged` over `weights`.
pub(crate) fn load_merged<T>(
    weights: &Weights,
    merged: &HashMap<String, Tensor>,
    device: &Device,
    build: impl FnOnce(VarBuilder) -> candle_core::Result<T>,
) -> Result<T> {
    let vb = VarBuilder::from_backend(Box::new(Overlay { weights, merged }), DType::F32, device.clone());
    build(vb).map_err(cerr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn views_allow_fused_thirds_and_one_by_one_convolutions() {
        assert_eq!(view_shape(&[96, 32], Some(1), Some(&[32, 32])), Some(vec![32, 32]));
        assert_eq!(view_shape(&[32, 32, 1, 1], None, Some(&[32, 32])), Some(vec![32, 32]));
        assert_eq!(view_shape(&[32, 32], None, Some(&[32, 32, 1, 1])), Some(vec![32, 32, 1, 1]));
        assert_eq!(view_shape(&[32, 32, 3, 3], None, Some(&[32, 32])), None);
        assert_eq!(view_shape(&[95, 32], Some(0), None), None);
    }
}
