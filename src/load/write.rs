//! Writing safetensors files: the adapters `fit-lora` trains and the test fixtures. Serialisation
//! is the `safetensors` crate's; this adds dtype encoding and a canonical metadata order so the
//! same tensors give the same bytes on every run.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

use crate::error::{Error, Result};
use crate::rng::Rng;

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::F32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
        Dtype::F64 => values.iter().flat_map(|v| (*v as f64).to_le_bytes()).collect(),
        Dtype::F16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        Dtype::BF16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
        other => panic!("fixture dtype {other:?} not supported"),
    }
}

/// Collects named tensors and writes one safetensors file.
#[derive(Debug, Default, Clone)]
pub struct SafetensorsBuilder {
    tensors: BTreeMap<String, (Dtype, Vec<usize>, Vec<u8>)>,
    pub metadata: BTreeMap<String, String>,
}

impl SafetensorsBuilder {
    pub fn new() -> Self {
        Self::default()
    }
    pub fn add(&mut self, name: &str, shape: &[usize], values: &[f32], dtype: Dtype) -> &mut Self {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        self.tensors.insert(name.to_string(), (dtype, shape.to_vec(), encode(values, dtype)));
        self
    }
    /// An f64 tensor, for values f32 cannot hold.
    pub fn add_f64(&mut self, name: &str, shape: &[usize], values: &[f64]) -> &mut Self {
        assert_eq!(shape.iter().product::<usize>(), values.len(), "{name}");
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensors.insert(name.to_string(), (Dtype::F64, shape.to_vec(), bytes));
        self
    }
    /// A random tensor with entries uniform in [-scale, scale).
    pub fn random(&mut self, rng: &mut Rng, name: &str, shape: &[usize], scale: f64, dtype: Dtype) -> &mut Self {
        let v = rng.values(shape.iter().product(), scale);
        self.add(name, shape, &v, dtype)
    }
    pub fn meta(&mut self, k: &str, v: &str) -> &mut Self {
        self.metadata.insert(k.to_string(), v.to_string());
        self
    }
    pub fn to_bytes(&self) -> Vec<u8> {
        let views: Vec<(String, TensorView)> = self
            .tensors
            .iter()
            .map(|(k, (d, s, b))| (k.clone(), TensorView::new(*d, s.clone(), b).expect("valid view")))
            .collect();
        let meta: Option<HashMap<String, String>> =
            (!self.metadata.is_empty()).then(|| self.metadata.iter().map(|(k, v)| (k.clone(), v.clone())).collect());
        let bytes = safetensors::serialize(views, meta).expect("serialise");
        canonical_metadata_order(bytes)
    }
    pub fn write(&self, path: &Path) -> Result<()> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(|e| Error::input(parent, e.to_string()))?;
        }
        std::fs::write(path, self.to_bytes()).map_err(|e| Error::input(path, e.to_string()))
    }
}

/// `safetensors` writes `__metadata__` from a `HashMap`, so its key order changes from run to
/// run. Re-emit the header with sorted metadata keys (same bytes otherwise, same length), so
/// fixtures are byte-identical across runs and machines.
fn canonical_metadata_order(mut bytes: Vec<u8>) -> Vec<u8> {
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header = std::str::from_utf8(&bytes[8..8 + n]).expect("utf8 header");
    let mut v: serde_json::Value = serde_json::from_str(header.trim_end()).expect("own header");
    let Some(meta) = v.get_mut("__metadata__").and_then(|m| m.as_object_mut()) else { return bytes };
    meta.sort_keys();
    let mut text = serde_json::to_string(&v).expect("json");
    assert!(text.len() <= n, "re-emitted header grew");
    while text.len() < n {
        text.push(' ');
    }
    bytes[8..8 + n].copy_from_slice(text.as_bytes());
    bytes
}
