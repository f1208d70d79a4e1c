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
pub(crate) fn load_base(base: &BaseModel, cfg: &LlamaConfig, device: &Device) -> Result<Llama> {
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
pub(crate) fn load_merged(base: &Llama, merged: HashMap<String, Tensor>) -> Result<Llama> {
    let vb = VarBuilder::from_backend(Box::new(Overlay { base, merged }), DType::F32, base.device().clone());
    Llama::load(vb, &base.cfg).map_err(cerr)
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::load::write::SafetensorsBuilder;

    /// One layer, hidden 4, two heads of 2, vocabulary 8.
    fn cfg() -> LlamaConfig {
        let v = serde_json::json!({"model_type": "llama", "vocab_size": 8, "hidden_size": 4, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2});
        LlamaConfig::from_hf_json(Path::new("config.json"), &v).unwrap()
    }

    fn weights() -> Vec<(String, Vec<usize>)> {
        let l = "model.layers.0";
        let mut w = vec![("model.embed_tokens.weight".to_string(), vec![8, 4])];
        for (name, shape) in [
            ("self_attn.q_proj", [4, 4]),
            ("self_attn.k_proj", [4, 4]),
            ("self_attn.v_proj", [4, 4]),
            ("self_attn.o_proj", [4, 4]),
            ("mlp.gate_proj", [8, 4]),
            ("mlp.up_proj", [8, 4]),
            ("mlp.down_proj", [4, 8]),
        ] {
            w.push((format!("{l}.{name}.weight"), shape.to_vec()));
        }
        for name in [format!("{l}.input_layernorm"), format!("{l}.post_attention_layernorm"), "model.norm".into()] {
            w.push((format!("{name}.weight"), vec![4]));
        }
        w.push(("lm_head.weight".to_string(), vec![8, 4]));
        w
    }

    /// Load a base directory holding `weights()` changed by `edit`, every value 0.1 except one NaN
    /// in model.norm.weight (the directory is kept alive beside the result).
    fn load_edited(edit: impl FnOnce(&mut Vec<(String, Vec<usize>)>)) -> (Result<Llama>, tempfile::TempDir) {
        let dir = tempfile::tempdir().unwrap();
        let mut w = weights();
        edit(&mut w);
        let mut st = SafetensorsBuilder::new();
        for (k, shape) in &w {
            let n: usize = shape.iter().product();
            let v: Vec<f32> = (0..n).map(|i| if k == "model.norm.weight" && i == 3 { f32::NAN } else { 0.1 }).collect();
            st.add(k, shape, &v, safetensors::Dtype::F32);
        }
        st.write(&dir.path().join("model.safetensors")).unwrap();
        let base = BaseModel::open(dir.path()).unwrap();
        (load_base(&base, &cfg(), &Device::Cpu), dir)
    }

    fn input_error(r: Result<Llama>, dir: &Path) -> String {
        match r {
            Err(Error::Input { path, reason }) if path == dir => reason,
            other => panic!("expected an input error naming {}: {other:?}", dir.display()),
        }
    }

    #[test]
    fn bad_base_weights_are_input_errors_naming_the_base() {
        let (r, d) = load_edited(|w| w.retain(|(k, _)| k != "model.layers.0.mlp.up_proj.weight"));
        let reason = input_error(r, d.path());
        assert_eq!(reason, "base model has no weight model.layers.0.mlp.up_proj.weight, which the architecture needs");
        let (r, d) = load_edited(|w| w[1].1 = vec![2, 4]);
        let reason = input_error(r, d.path());
        assert_eq!(reason, "weight model.layers.0.self_attn.q_proj.weight has shape [2, 4], the config implies [4, 4]");
        // The NaN planted in model.norm.weight is found once the file is otherwise loadable.
        let (r, d) = load_edited(|_| {});
        assert_eq!(input_error(r, d.path()), "weight model.norm.weight holds a non-finite value at index 3");
    }

    #[test]
    fn a_merged_model_shares_the_tensors_it_does_not_change() {
        let dir = tempfile::tempdir().unwrap();
        let mut st = SafetensorsBuilder::new();
        for (k, shape) in weights() {
            st.add(&k, &shape, &vec![0.5; shape.iter().product()], safetensors::Dtype::F32);
        }
        st.write(&dir.path().join("model.safetensors")).unwrap();
        let base = load_base(&BaseModel::open(dir.path()).unwrap(), &cfg(), &Device::Cpu).unwrap();
        let up = "model.layers.0.mlp.up_proj.weight";
        let new = Tensor::zeros((8, 4), DType::F32, &Device::Cpu).unwrap();
        let merged = load_merged(&base, HashMap::from([(up.to_string(), new.clone())])).unwrap();
        // The same tensor (candle's id), not a copy.
        assert_eq!(merged.weight(up).unwrap().id(), new.id());
        for (k, _) in weights().iter().filter(|(k, _)| k != up) {
            assert_eq!(merged.weight(k).unwrap().id(), base.weight(k).unwrap().id(), "{k} was copied");
        }
    }
}
