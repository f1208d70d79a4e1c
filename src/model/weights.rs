//! Where the text runtime's weights come from: the base model's tensors under their Hugging
//! Face names (llama.rs `Params`), checked against the shape the architecture asks for and
//! refused when non-finite. Matrices stay in the type the file stores (f32, bf16/f16, GGUF
//! quantised blocks: weight.rs) unless the caller asks for f32 throughout (the trainer, whose
//! gradients need f32 products); norms and biases are f32.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::quantized::{ggml_file::qtensor_from_ggml, QTensor};
use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;

use super::cerr;
use super::config::LlamaConfig;
use super::llama::{Llama, Params, Vb};
use super::weight::{row_bytes, Weight};
use crate::error::{Error, Result};
use crate::load::{BaseModel, StoredMatrix};

crate::named::closed_set! {
    /// How the runtime holds the base's weight matrices.
    pub enum Precision ("precision") {
        /// As the file stores them (f32, bf16/f16, quantised blocks).
        Stored = "stored",
        /// Widened to f32 (a whole f32 copy: for training, and for small bases).
        F32 = "f32",
        /// f32 when that copy is at most [`AUTO_F32_BYTES`], else as stored.
        Auto = "auto",
    }
}

/// Largest f32 copy of a base that [`Precision::Auto`] makes (2 GiB: about 500M parameters).
/// Below it the f32 products are faster than the stored types' (a quantised matrix is decoded
/// at every step of a batch of continuations, and candle's bf16 CPU products are slower than
/// its f32 ones), and the copy is small beside any machine that runs the probe; above it the
/// weights stay as stored so that a 7–8B base fits in 24 GB. The rule depends on the file
/// alone, never on the machine, so the same inputs give the same report everywhere.
pub const AUTO_F32_BYTES: usize = 2 << 30;

impl Precision {
    /// What `self` means for `base`: [`Precision::Auto`] becomes f32 or stored by the size of
    /// the base's f32 copy (all its tensors, four bytes each).
    pub fn resolve(self, base: &BaseModel) -> Precision {
        match self {
            Precision::Auto if base.params().saturating_mul(4) <= AUTO_F32_BYTES => Precision::F32,
            Precision::Auto => Precision::Stored,
            p => p,
        }
    }

    /// What reports written before `--weights` existed ran on (their serde default).
    pub(crate) fn before_the_flag() -> Precision {
        Precision::Stored
    }
}

/// The base model's weights. candle's error type cannot carry the crate's typed error (which
/// names the file) back out of `Llama::load`, so the first failure is also kept in `failure`
/// for [`load_base`] to return.
struct BaseWeights<'a> {
    base: &'a BaseModel,
    precision: Precision,
    device: Device,
    failure: &'a Mutex<Option<Error>>,
    /// How many matrices of each type the file stores, over those the runtime loaded.
    stored_types: Mutex<BTreeMap<String, usize>>,
}

impl BaseWeights<'_> {
    fn check_shape(&self, key: &str, shape: &[usize]) -> Result<()> {
        let base = self.base;
        let got = base.shape(key).ok_or_else(|| {
            Error::input(&base.path, format!("base model has no weight {key}, which the architecture needs"))
        })?;
        if got != shape {
            return Err(Error::input(
                &base.path,
                format!("weight {key} has shape {got:?}, the config implies {shape:?}"),
            ));
        }
        Ok(())
    }

    fn nonfinite(&self, key: &str, at: usize) -> Error {
        Error::input(&self.base.path, format!("weight {key} holds a non-finite value at index {at}"))
    }

    fn f32_tensor(&self, key: &str, shape: &[usize]) -> Result<Tensor> {
        self.check_shape(key, shape)?;
        let v = self.base.values_f32(key)?;
        if let Some(i) = v.iter().position(|x| !x.is_finite()) {
            return Err(self.nonfinite(key, i));
        }
        Tensor::from_vec(v, shape, &self.device).map_err(cerr)
    }

    fn stored_matrix(&self, key: &str, rows: usize, cols: usize) -> Result<Weight> {
        self.check_shape(key, &[rows, cols])?;
        if self.precision == Precision::F32 {
            return self.f32_tensor(key, &[rows, cols]).map(Weight::F32);
        }
        let half = |bits: Vec<u16>, dtype: DType, exp_mask: u16| -> Result<Weight> {
            if let Some(i) = bits.iter().position(|b| b & exp_mask == exp_mask) {
                return Err(self.nonfinite(key, i));
            }
            let bytes: Vec<u8> = bits.iter().flat_map(|b| b.to_le_bytes()).collect();
            drop(bits);
            let t = Tensor::from_raw_buffer(&bytes, dtype, &[rows, cols], &self.device).map_err(cerr)?;
            Ok(Weight::Half(t))
        };
        match self.base.stored_matrix(key)? {
            StoredMatrix::F32(v) => {
                if let Some(i) = v.iter().position(|x| !x.is_finite()) {
                    return Err(self.nonfinite(key, i));
                }
                Tensor::from_vec(v, (rows, cols), &self.device).map(Weight::F32).map_err(cerr)
            }
            StoredMatrix::Bf16(bits) => half(bits, DType::BF16, 0x7f80),
            StoredMatrix::F16(bits) => half(bits, DType::F16, 0x7c00),
            StoredMatrix::Quant(q) => {
                if let Some(i) = first_nonfinite(&q, rows, cols).map_err(cerr)? {
                    return Err(self.nonfinite(key, i));
                }
                Ok(Weight::Quant(Arc::new(q)))
            }
        }
    }

    /// Keep `e` for [`load_base`] and hand candle an error with the same text.
    fn fail(&self, e: Error) -> candle_core::Error {
        let text = e.to_string();
        self.failure.lock().unwrap_or_else(PoisonError::into_inner).get_or_insert(e);
        candle_core::Error::Msg(text)
    }
}

/// Rows decoded at a time when a quantised matrix is checked for non-finite values.
const CHECK_ROWS: usize = 256;

/// The index of the first non-finite value of a quantised `[rows, cols]` matrix (a block scale
/// can be NaN or Inf), decoding `CHECK_ROWS` rows at a time in parallel rather than the whole
/// matrix at once (an 8B model's output head is 2 GB of f32).
fn first_nonfinite(q: &QTensor, rows: usize, cols: usize) -> candle_core::Result<Option<usize>> {
    let dtype = q.dtype();
    let Some(rb) = row_bytes(dtype, cols) else {
        candle_core::bail!("rows of {cols} values are not whole {dtype:?} blocks")
    };
    let data = q.data()?;
    let found = (0..rows.div_ceil(CHECK_ROWS))
        .into_par_iter()
        .map(|c| -> candle_core::Result<Option<usize>> {
            let (r0, r1) = (c * CHECK_ROWS, ((c + 1) * CHECK_ROWS).min(rows));
            let part = qtensor_from_ggml(dtype, &data[r0 * rb..r1 * rb], vec![r1 - r0, cols], &Device::Cpu)?;
            let v = part.dequantize(&Device::Cpu)?.flatten_all()?.to_vec1::<f32>()?;
            Ok(v.iter().position(|x| !x.is_finite()).map(|i| r0 * cols + i))
        })
        .collect::<candle_core::Result<Vec<_>>>()?;
    Ok(found.into_iter().flatten().min())
}

impl Params for BaseWeights<'_> {
    fn tensor(&self, key: &str, shape: &[usize]) -> candle_core::Result<Tensor> {
        self.f32_tensor(key, shape).map_err(|e| self.fail(e))
    }

    fn matrix(&self, key: &str, rows: usize, cols: usize) -> candle_core::Result<Weight> {
        let w = self.stored_matrix(key, rows, cols).map_err(|e| self.fail(e))?;
        if let Some(e) = self.base.entries.get(key) {
            let mut types = self.stored_types.lock().unwrap_or_else(PoisonError::into_inner);
            *types.entry(e.dtype.clone()).or_insert(0) += 1;
        }
        Ok(w)
    }

    fn device(&self) -> &Device {
        &self.device
    }
}

/// The runnable model of `base` on `device`, its matrices held as `precision` says (already
/// resolved: `TextModel::load_as` resolves [`Precision::Auto`] once and records the result),
/// and how many of those matrices the file stores in each type.
pub(crate) fn load_base(
    base: &BaseModel,
    cfg: &LlamaConfig,
    device: &Device,
    precision: Precision,
) -> Result<(Llama, BTreeMap<String, usize>)> {
    debug_assert_ne!(precision, Precision::Auto, "resolve Precision::Auto before loading");
    let failure = Mutex::new(None);
    let stored_types = Mutex::new(BTreeMap::new());
    let params = BaseWeights { base, precision, device: device.clone(), failure: &failure, stored_types };
    match Llama::load(Vb::new(&params), cfg) {
        Ok(llama) => Ok((llama, params.stored_types.into_inner().unwrap_or_else(PoisonError::into_inner))),
        Err(e) => Err(failure.into_inner().unwrap_or_else(PoisonError::into_inner).unwrap_or_else(|| cerr(e))),
    }
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
        (load_base(&base, &cfg(), &Device::Cpu, Precision::Stored).map(|(l, _)| l), dir)
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

    /// A base directory holding `weights()` in `dtype`, value 0.5 everywhere except `nan_at`.
    fn write_base(dtype: safetensors::Dtype, nan_at: Option<&str>) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let mut st = SafetensorsBuilder::new();
        for (k, shape) in weights() {
            let mut v = vec![0.5; shape.iter().product()];
            if nan_at == Some(k.as_str()) {
                v[5] = f32::INFINITY;
            }
            st.add(&k, &shape, &v, dtype);
        }
        st.write(&dir.path().join("model.safetensors")).unwrap();
        dir
    }

    #[test]
    fn sixteen_bit_matrices_stay_sixteen_bit_and_norms_are_f32() {
        for (dtype, name) in [(safetensors::Dtype::BF16, "bf16"), (safetensors::Dtype::F16, "f16")] {
            let dir = write_base(dtype, None);
            let base = BaseModel::open(dir.path()).unwrap();
            let (m, _) = load_base(&base, &cfg(), &Device::Cpu, Precision::Stored).unwrap();
            let (types, bytes) = m.weight_summary();
            // Embedding, 7 projections, output head: 8·4 + 3·16 + 4·4 + 4·8… values of 2 bytes.
            assert_eq!(types, std::collections::BTreeMap::from([(name.to_string(), 9)]));
            assert_eq!(bytes, 2 * (32 + 4 * 16 + 3 * 32 + 32));
            let (f, stored) = load_base(&base, &cfg(), &Device::Cpu, Precision::F32).unwrap();
            assert_eq!(f.weight_summary().0, std::collections::BTreeMap::from([("f32".to_string(), 9)]));
            // The file's types are recorded whatever the runtime holds.
            assert_eq!(stored, std::collections::BTreeMap::from([(name.to_string(), 9)]));
            // A few hundred parameters, far below AUTO_F32_BYTES: auto widens to f32.
            assert_eq!(Precision::Auto.resolve(&base), Precision::F32);
            assert_eq!(Precision::Stored.resolve(&base), Precision::Stored);
            // An Inf in a 16-bit matrix is found from its bit pattern.
            let dir = write_base(dtype, Some("model.layers.0.mlp.gate_proj.weight"));
            let r = load_base(&BaseModel::open(dir.path()).unwrap(), &cfg(), &Device::Cpu, Precision::Stored)
                .map(|(l, _)| l);
            assert_eq!(
                input_error(r, dir.path()),
                "weight model.layers.0.mlp.gate_proj.weight holds a non-finite value at index 5"
            );
        }
    }
}
