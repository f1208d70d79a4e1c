//! Entry points for the fuzz targets (fuzz/): run untrusted bytes through the adapter and GGUF
//! parsing paths and everything that reads their values. They must return, never panic; the
//! outcome (parsed or a clear error) is not the fuzzer's concern.

use std::path::Path;
use std::sync::Arc;

use crate::linalg::svd_factors;
use crate::load::{Adapter, BaseModel, LoadOptions, TensorFile};
use crate::spectral::{DeltaW, SpectrumOptions};

/// A safetensors adapter from bytes: parse, normalise, resolve names against its own keys,
/// inspect, and analyse every module.
pub fn adapter_bytes(data: &[u8]) {
    let Ok(file) = TensorFile::from_bytes(Path::new("fuzz-input.safetensors"), data.to_vec()) else { return };
    let Ok(adapter) = Adapter::from_file(Arc::new(file), None, &LoadOptions::default()) else { return };
    let _ = crate::pipeline::inspect(&adapter, None);
    let _ = crate::pipeline::spectrum(&adapter, None, &SpectrumOptions::default(), &|| {});
    for m in &adapter.modules {
        if let Ok(Some(f)) = m.factors() {
            let _ = svd_factors(&f, true);
        }
        let _ = m.fast_singular_values();
        let (rows, cols) = m.matrix_shape();
        if rows.saturating_mul(cols) <= 1 << 20 {
            let _ = m.dense_delta(None);
        }
    }
    let resolver = crate::load::names::KeyResolver::new(adapter.file.tensors.keys().map(String::as_str));
    for m in &adapter.modules {
        let _ = resolver.resolve(&m.name);
    }
}

/// A GGUF base from bytes (written to `scratch`, as the reader takes a file): parse, map names,
/// dequantise every tensor and undo the q/k permutation.
pub fn gguf_bytes(data: &[u8], scratch: &Path) {
    if std::fs::write(scratch, data).is_err() {
        return;
    }
    let Ok(base) = BaseModel::open(scratch) else { return };
    let keys: Vec<String> = base.keys().map(String::from).collect();
    for k in keys {
        let _ = base.weight(&k);
    }
}

/// The small PEFT adapter the config target pairs every fuzzed config with.
const PEFT_WEIGHTS: &[u8] = include_bytes!("../fixtures/peft-llama/adapter_model.safetensors");

/// A PEFT `adapter_config.json` from bytes (written to `dir` beside a fixed small adapter):
/// config parsing, `target_modules`/`rank_pattern`/`alpha_pattern` compilation and matching,
/// rsLoRA and DoRA settings, and the whole spectrum under the resulting scales.
pub fn peft_config_bytes(data: &[u8], dir: &Path) {
    if std::fs::create_dir_all(dir).is_err()
        || std::fs::write(dir.join("adapter_model.safetensors"), PEFT_WEIGHTS).is_err()
        || std::fs::write(dir.join("adapter_config.json"), data).is_err()
    {
        return;
    }
    let Ok(adapter) = Adapter::open(dir, &LoadOptions::default()) else { return };
    let _ = crate::pipeline::spectrum(&adapter, None, &SpectrumOptions::default(), &|| {});
}

/// A GGUF base from bytes, all the way to a runnable model: the header walk, candle's reader,
/// the llama hyper-parameters and the tokenizer from metadata, and every weight the runtime
/// loads.
pub fn gguf_model_bytes(data: &[u8], scratch: &Path) {
    if std::fs::write(scratch, data).is_err() {
        return;
    }
    let Ok(base) = BaseModel::open(scratch) else { return };
    let _ = crate::model::TextModel::load(&base, &candle_core::Device::Cpu);
}

/// A report.json from bytes (written into `dir`): `verify`'s reading and checks, the rerun
/// comparison of the report with itself, and report.html rendered from whatever it holds.
pub fn report_bytes(data: &[u8], dir: &Path) {
    if std::fs::create_dir_all(dir).is_err() || std::fs::write(dir.join("report.json"), data).is_err() {
        return;
    }
    let Ok(v) = crate::pipeline::verify(dir) else { return };
    let again = crate::pipeline::compare_rerun(&v.recorded, &v.recorded);
    assert!(again.reproduced, "a report differs from itself at {:?}", again.differences);
    let _ = crate::report::html::render_html(&v.recorded);
    let _ = crate::report::to_canonical_json(&v.recorded);
}
