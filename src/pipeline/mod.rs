//! Orchestration of each command: open the inputs, run the stages in order, and hand typed
//! results to `report` for rendering. The CLI (src/main.rs) only parses arguments and prints.

mod compare;
mod evidence;
mod image;
mod inspect;
mod scan;

pub use compare::compare;
pub use evidence::{
    build_report, compare_rerun, run_report, verify, write_report_dir, ProbeOutcome, ReportHooks, ReportRun,
    Verification,
};
pub use image::{check_base_for_images, probe_images, works_are_images, ImageData};
use inspect::recorded;
pub use inspect::{input_files, inspect, inspect_with, ValueFacts};
pub use scan::{scan_all, scan_one, ScanSummary};

use crate::error::Result;
use crate::load::{self, Adapter, BaseModel, LoadOptions, LoraModule};
use crate::{model, report, spectral};

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
    pub prompts: Option<&'a load::works::Prompts>,
}

/// `probe`: the spectrum report plus the merged model's evidence on each work. The base must
/// be a runnable text model (Hugging Face directory or GGUF); the adapter must be resolved
/// against it.
pub fn probe(
    adapter: &Adapter,
    base: &BaseModel,
    spectrum: report::SpectrumReport,
    inputs: &ProbeInputs,
    thresholds: &crate::probe::Thresholds,
    progress: &dyn crate::probe::Progress,
) -> Result<report::ProbeReport> {
    crate::error::injected_fault("probe")?;
    check_probe_text(inputs)?;
    let text_model = model::TextModel::load_as(base, &candle_core::Device::Cpu, thresholds.weights)?;
    progress.stage("merge", 1);
    let (merged, merge) = model::apply_adapter(&text_model.llama, adapter)?;
    progress.plan(&memory_line(&text_model.llama, &merge));
    let no_controls = load::works::WorkSet { works: vec![], files: vec![], digests: vec![] };
    let controls = inputs.controls.unwrap_or(&no_controls);
    let prompts = inputs.prompts.map(|p| p.lines.as_slice()).unwrap_or(&[]);
    let result =
        crate::probe::run(&text_model, &merged, &inputs.works.works, &controls.works, prompts, thresholds, progress)?;
    // The numbers above came from the base as hashed when it was opened, or not at all.
    base.check_unchanged()?;
    let mut spectrum = spectrum;
    // Recorded with the digests of the bytes that were read and parsed, not read again.
    let inputs_rec = &mut spectrum.inspect.inputs;
    for (role, set) in [(report::InputRole::Work, inputs.works), (report::InputRole::Control, controls)] {
        inputs_rec.extend(set.files.iter().zip(&set.digests).map(|(f, d)| recorded(role, f, d)));
    }
    if let Some(p) = inputs.prompts {
        inputs_rec.push(recorded(report::InputRole::Prompts, &p.path, &p.digest));
    }
    let capacity_check = report::CapacityCheck::new(&result.works, spectrum.totals.capacity_bits);
    let context = text_model.context_tokens(thresholds.bos)?;
    let probe = report::ProbeSection {
        model: model_info(&text_model, thresholds.context, context),
        merge,
        capacity_check,
        result,
    };
    let r = report::ProbeReport { spectrum, probe };
    report::check_finite("probe", &r)?;
    Ok(r)
}

/// Most bytes of text (works and controls together) one probe runs on. The probe keeps per-
/// character surprisal, tokens and normalised copies of every text for both models, about 75
/// bytes per byte of text (100 MB of works reached 7.4 GB): 16 MiB stays near 1.2 GB, and on
/// a CPU is already days of scoring. Larger sets can be split over several runs.
pub const MAX_PROBE_TEXT_BYTES: usize = 16 << 20;

fn check_probe_text(inputs: &ProbeInputs) -> Result<()> {
    let sets = std::iter::once(inputs.works).chain(inputs.controls);
    let total: usize = sets.flat_map(|s| &s.works).map(|w| w.text.len()).sum();
    if total > MAX_PROBE_TEXT_BYTES {
        let path = inputs.works.files.first().cloned().unwrap_or_default();
        return Err(crate::error::Error::input(
            path,
            format!(
                "works and controls hold {total} bytes of text, above the probe's limit of {MAX_PROBE_TEXT_BYTES} \
                 (MAX_PROBE_TEXT_BYTES); probe them in several runs"
            ),
        ));
    }
    Ok(())
}

/// `spectrum`: inspect plus the spectral analysis. The adapter file is hashed on one thread
/// while the modules are analysed on the others.
pub fn spectrum(
    adapter: &Adapter,
    base: Option<&BaseModel>,
    opts: &spectral::SpectrumOptions,
    tick: &(dyn Fn() + Sync),
) -> Result<report::SpectrumReport> {
    crate::error::injected_fault("spectrum")?;
    let (_, analysis) = rayon::join(|| adapter.hashes(), || spectral::analyse(adapter, base, opts, tick));
    let analysis = analysis?;
    // Factored and Kronecker routes decoded every tensor of their module and refuse NaN/Inf and
    // values beyond MAX_ABS_VALUE, so those modules need no second scan: no bad values, and ΔW
    // is zero iff its norm is.
    let by_name: std::collections::HashMap<&str, &spectral::ModuleSpectrum> =
        analysis.modules.iter().map(|s| (s.name.as_str(), s)).collect();
    let known = |m: &LoraModule| {
        let s = by_name.get(m.name.as_str())?;
        matches!(s.route, spectral::Route::Factored | spectral::Route::Kronecker).then_some(ValueFacts {
            nonfinite: 0,
            zero: s.fro == 0.0,
            extreme: 0,
        })
    };
    let mut inspect = inspect_with(adapter, base, &known)?;
    // A module the spectrum bounded instead of analysing says so where warnings are read.
    for s in analysis.modules.iter().filter(|s| s.route == spectral::Route::RankBound) {
        inspect.warnings.push(format!("module {}: {}", s.name, s.note.as_deref().unwrap_or_default()));
    }
    if let Some(b) = base {
        b.check_unchanged()?;
    }
    let r = report::spectrum_report(inspect, analysis, opts);
    report::check_finite("spectrum", &r)?;
    Ok(r)
}

/// What the model costs in memory, said before the long stages: the base's matrices as stored
/// and what the adapter adds beside them.
fn memory_line(m: &model::Llama, merge: &model::MergeSummary) -> String {
    let (types, bytes) = m.weight_summary();
    let types: Vec<String> = types.iter().map(|(t, n)| format!("{n} {t}")).collect();
    let gib = |b: usize| b as f64 / (1u64 << 30) as f64;
    let dense = if merge.dense.is_empty() {
        String::new()
    } else {
        format!(", {} of them dense f32 copies of the matrices they change", merge.dense.len())
    };
    format!(
        "memory: base weights {:.2} GiB ({} matrices), adapter beside them {:.3} GiB ({} modules{dense})",
        gib(bytes),
        types.join(", "),
        gib(merge.adapter_bytes),
        merge.merged.len()
    )
}

/// What the probe ran on, for the report.
fn model_info(m: &model::TextModel, context: usize, tokens: model::ContextTokens) -> report::ModelInfo {
    let c = &m.llama.cfg;
    let (weights, weight_bytes) = m.llama.weight_summary();
    report::ModelInfo {
        model_type: c.model_type.clone(),
        layers: c.num_hidden_layers,
        hidden_size: c.hidden_size,
        attention_heads: c.num_attention_heads,
        key_value_heads: c.num_key_value_heads,
        vocab_size: c.vocab_size,
        context: context.min(c.context()),
        tied_embeddings: c.tie_word_embeddings,
        bos_token_id: c.bos_token_id,
        eos_token_id: c.eos_token_id,
        context_tokens: tokens.ids,
        bos_rule: tokens.rule,
        context_source: tokens.source,
        tokenizer: report::path_string(&m.tokenizer.source),
        dtype: "f32".into(),
        precision: m.precision,
        stored_weights: m.stored_weights.clone(),
        weights,
        weight_bytes,
    }
}

/// Works, controls and prompts read from the paths given, owned for the probe's run.
pub struct ProbeData {
    pub works: load::works::WorkSet,
    pub controls: Option<load::works::WorkSet>,
    pub prompts: Option<load::works::Prompts>,
}

impl ProbeData {
    /// Read the works (a directory of .txt files or JSONL), and the controls and prompts when
    /// given.
    pub fn load(works: &Path, controls: Option<&Path>, prompts: Option<&Path>) -> Result<Self> {
        Ok(ProbeData {
            works: load::works::load_works(works)?,
            controls: controls.map(load::works::load_works).transpose()?,
            prompts: prompts.map(load::works::load_prompts).transpose()?,
        })
    }

    /// Borrowed view for [`probe`].
    pub fn inputs(&self) -> ProbeInputs<'_> {
        ProbeInputs { works: &self.works, controls: self.controls.as_ref(), prompts: self.prompts.as_ref() }
    }
}

/// The works of a probe: texts or images (a folder of PNG, JPEG or WebP files).
pub enum Works {
    Text(ProbeData),
    Images(ImageData),
}

impl Works {
    /// Read `works` as images when it is a folder holding images, else as texts; controls (and
    /// style controls, for images) in the same kind. Prompts are for texts only.
    pub fn load(
        works: &Path,
        controls: Option<&Path>,
        style_controls: Option<&Path>,
        prompts: Option<&Path>,
    ) -> Result<Works> {
        if works_are_images(works) {
            if prompts.is_some() {
                return Err(crate::error::Error::Usage(
                    "--prompts is for text works; image works are probed from their captions".into(),
                ));
            }
            return Ok(Works::Images(ImageData::load(works, controls, style_controls)?));
        }
        if style_controls.is_some() {
            return Err(crate::error::Error::Usage(
                "--style-controls is for image works (a folder of PNG, JPEG or WebP files)".into(),
            ));
        }
        Ok(Works::Text(ProbeData::load(works, controls, prompts)?))
    }

    pub fn text(&self) -> Option<&ProbeData> {
        match self {
            Works::Text(d) => Some(d),
            Works::Images(_) => None,
        }
    }
}

/// Every setting of a probe: the text probe's thresholds, the image probe's settings, and the
/// tokenizer folder a single-file image base needs.
#[derive(Debug, Clone, Default)]
pub struct ProbeSettings {
    pub text: crate::probe::Thresholds,
    pub image: crate::probe::image::ImageSettings,
    pub tokenizer: Option<std::path::PathBuf>,
}
