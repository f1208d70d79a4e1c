//! lorascope: LoRA-adapter forensics.
//!
//! The pipeline runs one way: [`load`] reads an adapter (any format) and optionally its base
//! model into normalised [`load::LoraModule`]s; [`linalg`] and [`spectral`] measure what each
//! module adds without forming dense deltas; [`report`] turns the results into canonical JSON
//! and human summaries.

// Numeric kernels index several arrays with one loop variable; iterators would hide that.
#![allow(clippy::needless_range_loop)]

pub mod error;
pub mod fixtures;
#[doc(hidden)]
pub mod fuzzing;
pub mod linalg;
pub mod load;
pub mod model;
pub mod probe;
pub mod report;
pub mod scan;
pub mod spectral;

pub use error::{Error, Result};
pub use load::{Adapter, BaseModel, LoadOptions, LoraModule};

use std::path::Path;

/// Open an adapter and, when given, its base, resolving every module to a base weight.
pub fn open(adapter: &Path, base: Option<&Path>, opts: &LoadOptions) -> Result<(Adapter, Option<BaseModel>)> {
    let mut a = Adapter::open(adapter, opts)?;
    let b = match base {
        Some(p) => {
            let b = BaseModel::open(p)?;
            a.attach_base(&b, opts.allow_unmatched)?;
            Some(b)
        }
        None => None,
    };
    Ok((a, b))
}

/// What the probe is given besides the adapter and base.
pub struct ProbeInputs<'a> {
    pub works: &'a load::works::WorkSet,
    pub controls: Option<&'a load::works::WorkSet>,
    /// Neutral prompts and the file they came from.
    pub prompts: Option<(&'a Path, &'a [String])>,
}

/// `probe`: the spectrum report plus the merged model's evidence on each work. The base must
/// be a runnable text model (Hugging Face directory or GGUF); the adapter must be resolved
/// against it.
pub fn probe(
    adapter: &Adapter,
    base: &BaseModel,
    spectrum: report::SpectrumReport,
    inputs: &ProbeInputs,
    thresholds: &probe::Thresholds,
    progress: &dyn probe::Progress,
) -> Result<report::ProbeReport> {
    let text_model = model::TextModel::load(base)?;
    progress.stage("merge", 1);
    let (merged, merge) = model::merge_adapter(&text_model.llama, adapter)?;
    let no_controls = load::works::WorkSet { works: vec![], files: vec![] };
    let controls = inputs.controls.unwrap_or(&no_controls);
    let prompts = inputs.prompts.map(|(_, p)| p).unwrap_or(&[]);
    let result = probe::run(&text_model, &merged, &inputs.works.works, &controls.works, prompts, thresholds, progress)?;
    let mut spectrum = spectrum;
    let recorded = &mut spectrum.inspect.inputs;
    recorded.extend(report::file_inputs("work", &inputs.works.files)?);
    recorded.extend(report::file_inputs("control", &controls.files)?);
    if let Some((path, _)) = inputs.prompts {
        recorded.extend(report::file_inputs("prompts", &[path.to_path_buf()])?);
    }
    let capacity_check = report::CapacityCheck::new(&result.works, spectrum.totals.capacity_bits);
    let probe = report::ProbeSection {
        model: report::ModelInfo::of(&text_model, thresholds.context),
        merge,
        capacity_check,
        result,
    };
    Ok(report::ProbeReport { spectrum, probe })
}

/// `inspect`: what the adapter is.
pub fn inspect(adapter: &Adapter, base: Option<&BaseModel>) -> Result<report::InspectReport> {
    report::inspect(adapter, base)
}

/// `spectrum`: inspect plus the spectral analysis. The adapter file is hashed on one thread
/// while the modules are analysed on the others.
pub fn spectrum(
    adapter: &Adapter,
    base: Option<&BaseModel>,
    opts: &spectral::SpectrumOptions,
    tick: &(dyn Fn() + Sync),
) -> Result<report::SpectrumReport> {
    let (_, analysis) = rayon::join(|| adapter.hashes(), || spectral::analyse(adapter, base, opts, tick));
    let analysis = analysis?;
    // Factored and Kronecker routes decoded every tensor of their module and refuse NaN/Inf,
    // so those modules need no second scan: no bad values, and ΔW is zero iff its norm is.
    let by_name: std::collections::HashMap<&str, &spectral::ModuleSpectrum> =
        analysis.modules.iter().map(|s| (s.name.as_str(), s)).collect();
    let known = |m: &LoraModule| {
        let s = by_name.get(m.name.as_str())?;
        matches!(s.route, spectral::Route::Factored | spectral::Route::Kronecker).then_some((0, s.fro == 0.0))
    };
    let inspect = report::inspect_with(adapter, base, &known)?;
    Ok(report::spectrum_report(inspect, analysis, opts))
}
