//! The `lorascope` command line: argument parsing and output only; the work is in the library.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use std::io::IsTerminal;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use lorascope::load::works::load_works;
use lorascope::load::{Format, LoadOptions};
use lorascope::model::train::FitOptions;
use lorascope::pipeline::{self, ProbeData, ProbeSettings, Works};
use lorascope::probe::image::{ImageSettings, ImageVerdict};
use lorascope::probe::{Thresholds, Verdict};
use lorascope::report::{self, to_canonical_json};
use lorascope::shown;
use lorascope::spectral::SpectrumOptions;
use lorascope::{Adapter, BaseModel};

/// mimalloc rather than glibc's allocator: it keeps the pages of freed feature maps for the
/// next layer instead of returning them to the kernel (see Cargo.toml).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(
    name = "lorascope",
    version,
    about = "LoRA-adapter forensics: what an adapter is, how much it adds, whether it copies works",
    after_help = "Exit codes: 0 ok; 1 a finding (--fail-on matched, or verify found a changed or missing file or an \
                  unreproduced finding); \
                  2 bad input or usage (the message names the file and the problem); 3 an internal error of lorascope."
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
    /// Threads for the numerics (candle's kernels and lorascope's own parallel loops). Default:
    /// candle's kernels one per physical core, the rest one per logical core.
    #[arg(long, global = true, value_parser = threads)]
    threads: Option<usize>,
}

/// `--threads`: at least 1, at most [`MAX_JOBS`].
fn threads(s: &str) -> Result<usize, String> {
    match s.parse::<usize>() {
        Ok(n) if (1..=MAX_JOBS).contains(&n) => Ok(n),
        _ => Err(format!("expected a number of threads from 1 to {MAX_JOBS}")),
    }
}

/// Size every thread pool before any starts: candle reads `CANDLE_NUM_THREADS` (its kernels'
/// pool) and `RAYON_NUM_THREADS` when it first multiplies, rayon's global pool is built here.
/// Called while the process has one thread, so setting the environment races with nothing.
fn set_threads(n: usize) -> lorascope::Result<()> {
    std::env::set_var("RAYON_NUM_THREADS", n.to_string());
    std::env::set_var("CANDLE_NUM_THREADS", n.to_string());
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build_global()
        .map_err(|e| lorascope::Error::Usage(format!("--threads {n}: {e}")))
}

#[derive(Args)]
struct Common {
    /// Adapter: a .safetensors file or a PEFT directory.
    adapter: PathBuf,
    /// Base model: .safetensors, Hugging Face or diffusers directory, or .gguf.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Force the adapter format instead of detecting it (peft, kohya, lycoris, diffusers, xlabs, original).
    #[arg(long)]
    format: Option<Format>,
    /// Treat adapter modules that match no base weight as warnings instead of an error.
    #[arg(long)]
    allow_unmatched: bool,
    /// Machine-readable JSON on stdout (sorted keys, byte-identical across runs).
    #[arg(long)]
    json: bool,
    /// Also compute AutoV3 (SHA-256 of the tensor data; always done when the file records an
    /// sshs_model_hash to check).
    #[arg(long)]
    autov3: bool,
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

impl Common {
    fn open(&self) -> lorascope::Result<(Adapter, Option<BaseModel>)> {
        let opts = LoadOptions { format: self.format, allow_unmatched: self.allow_unmatched, autov3: self.autov3 };
        lorascope::open(&self.adapter, self.base.as_deref(), &opts)
    }
}

/// Settings of the spectral analysis shared by `spectrum` and `report`.
#[derive(Args)]
struct AnalysisArgs {
    /// Bits one effective parameter can store (Morris et al. 2025: 3.6).
    #[arg(long, default_value_t = 3.6)]
    bits_per_param: f64,
    /// Largest min(m, n) for dense SVDs of base-dependent matrices (intruders, DoRA).
    #[arg(long, default_value_t = 1536)]
    max_dense_dim: usize,
}

impl AnalysisArgs {
    fn options(&self) -> lorascope::Result<SpectrumOptions> {
        let o = SpectrumOptions {
            bits_per_param: self.bits_per_param,
            max_dense_dim: self.max_dense_dim,
            ..Default::default()
        };
        o.check()?;
        Ok(o)
    }
}

/// The spectrum of an opened adapter, with a progress bar over its modules.
fn run_spectrum(
    adapter: &Adapter,
    base: Option<&BaseModel>,
    opts: &SpectrumOptions,
    quiet: bool,
) -> lorascope::Result<report::SpectrumReport> {
    let progress = Progress::new(adapter.modules.len(), quiet);
    let r = lorascope::spectrum(adapter, base, opts, &|| progress.tick());
    progress.finish();
    r
}

#[derive(Subcommand)]
enum Command {
    /// Format, metadata, hashes and the module map of an adapter.
    Inspect(Common),
    /// Low-rank SVD of every module's ΔW and the adapter's information estimate.
    Spectrum {
        #[command(flatten)]
        common: Common,
        /// Modules to list in the human summary, ranked by information.
        #[arg(long, default_value_t = 20)]
        top: usize,
        #[command(flatten)]
        analysis: AnalysisArgs,
    },
    /// Merge the adapter into its base, run both, and probe for regurgitation of the works:
    /// bits gained, extraction from prefixes, calibrated membership scores, a verdict per work.
    Probe {
        #[command(flatten)]
        common: Common,
        #[command(flatten)]
        probe: ProbeArgs,
        #[command(flatten)]
        analysis: AnalysisArgs,
        /// Also count intruder dimensions (two dense SVDs per module; `spectrum` and `report`
        /// always do).
        #[arg(long)]
        intruders: bool,
        /// Exit with code 1 if any work gets one of these verdicts (comma-separated, or `any`
        /// for any verdict other than no-evidence).
        #[arg(long, value_parser = fail_on::<VerdictName>)]
        fail_on: Option<FailOn<VerdictName>>,
    },
    /// Fit a LoRA that memorises the given texts (a positive control: would the probe catch an
    /// adapter that memorised these?). Writes a PEFT adapter directory.
    FitLora(FitArgs),
    /// Everything the inputs allow, written as report.json and a self-contained report.html.
    Report(ReportArgs),
    /// Compare two adapters: metadata diff, tensor identity, per-module ΔW cosine and principal
    /// angles, and a conclusion (identical, derived or unrelated; docs/compare.md).
    Compare(CompareArgs),
    /// Static screen of many adapters (no base): one JSON line per file on stdout, in path
    /// order; a summary on stderr.
    Scan(ScanArgs),
    /// Check a report directory (chain of custody): report.json and report.html against
    /// report.sha256, and the SHA-256 of every input named in report.json. Exit code 1 when
    /// anything changed or is missing.
    Verify {
        /// A directory written by `lorascope report`.
        dir: PathBuf,
        /// Machine-readable JSON on stdout.
        #[arg(long)]
        json: bool,
        /// Also run the recorded `report` command again and require the same findings, byte for
        /// byte (everything but the timings).
        #[arg(long)]
        rerun: bool,
    },
}

/// The works to probe for and the probe's settings (docs/probe.md), shared by `probe` and `report`.
#[derive(Args)]
struct ProbeArgs {
    /// Works to probe for: a directory of .txt files or a JSONL file of {"id","text"} lines;
    /// or a directory of images (PNG, JPEG, WebP, each with an optional NAME.txt caption) for
    /// an image base.
    #[arg(long)]
    works: Option<PathBuf>,
    /// Control works known not to be in training (same format as --works): they calibrate
    /// p-values and the AUC.
    #[arg(long)]
    controls: Option<PathBuf>,
    /// Images: the same artist's images that cannot have been trained on (e.g. made after the
    /// adapter's training date); they tell style learning from memorising the works.
    #[arg(long)]
    style_controls: Option<PathBuf>,
    /// Images: a tokenizer folder (vocab.json + merges.txt) for a single-file checkpoint base,
    /// which carries none.
    #[arg(long)]
    tokenizer: Option<PathBuf>,
    /// Images: diffusion timesteps the denoising loss is measured at (comma-separated).
    #[arg(long, value_delimiter = ',', default_values_t = ImageSettings::default().timesteps)]
    timesteps: Vec<usize>,
    /// Images: noise draws per timestep.
    #[arg(long, default_value_t = ImageSettings::default().draws)]
    draws: usize,
    /// Images: seed of the noise draws (the same for every image and both models).
    #[arg(long, default_value_t = ImageSettings::default().noise_seed)]
    noise_seed: u64,
    /// Images: generate from each work's caption with these seeds (comma-separated) under base
    /// and merged and compare with every image. Slow on a CPU at SD 1.5 size.
    #[arg(long, value_delimiter = ',')]
    generate: Vec<u64>,
    /// Images: DDIM steps per generation.
    #[arg(long, default_value_t = ImageSettings::default().ddim_steps)]
    steps: usize,
    /// Images: classifier-free guidance scale of the generations.
    #[arg(long, default_value_t = ImageSettings::default().guidance)]
    guidance: f64,
    /// Images: tiled ℓ2 distance (on [0,1] pixels) within which a generation is a near-copy.
    #[arg(long, default_value_t = ImageSettings::default().copy_distance)]
    copy_distance: f64,
    /// Images: a partial copy needs a merged generation with SSIM at least this …
    #[arg(long, default_value_t = ImageSettings::default().partial_ssim)]
    partial_ssim: f64,
    /// … and a perceptual-hash distance at most this many bits (of 64).
    #[arg(long, default_value_t = ImageSettings::default().partial_phash)]
    partial_phash: u32,
    /// Images: images per UNet call.
    #[arg(long, default_value_t = ImageSettings::default().batch)]
    batch: usize,
    /// Neutral prompts, one a line, whose continuations are searched for pieces of any work.
    #[arg(long)]
    prompts: Option<PathBuf>,
    /// Tokens of each extraction prefix.
    #[arg(long, default_value_t = Thresholds::default().prefix_tokens)]
    prefix_tokens: usize,
    /// Tokens generated greedily after each prefix.
    #[arg(long, default_value_t = Thresholds::default().new_tokens)]
    new_tokens: usize,
    /// Tokens between extraction windows.
    #[arg(long, default_value_t = Thresholds::default().stride)]
    stride: usize,
    /// Adapter-attributable share of a work reproduced verbatim that makes a
    /// reconstructable-copy.
    #[arg(long, default_value_t = Thresholds::default().substantial)]
    substantial: f64,
    /// Longest context the model is run with (sliding windows beyond it).
    #[arg(long, default_value_t = Thresholds::default().context)]
    context: usize,
    /// Bits the base must need for a reproduced span (given the text before it) for the span to
    /// count toward copying.
    #[arg(long, default_value_t = Thresholds::default().min_span_bits)]
    min_span_bits: f64,
    /// A copy verdict needs the work's improbable reproduced bits to be at least this many times
    /// the largest control's.
    #[arg(long, default_value_t = Thresholds::default().copy_margin)]
    copy_margin: f64,
    /// Run extraction on at most this many control windows (whole controls, seeded random
    /// order); every control is still scored for the gain. 0 = all controls.
    #[arg(long, default_value_t = Thresholds::default().control_windows)]
    control_windows: usize,
    /// Put the model's BOS token in front of each text: auto (as the model's tokenizer does,
    /// like transformers and llama.cpp), always, or never. Without one, each text's first
    /// token has no context and is not scored.
    #[arg(long, default_value = "auto")]
    bos: lorascope::model::BosRule,
    /// How to hold the text base's weight matrices: auto (f32 when that copy is at most
    /// 2 GiB, about 500M parameters, as it runs faster; else as the file stores them), stored
    /// (f32, bf16/f16 or GGUF quantised blocks, as in the file), or f32 (a whole f32 copy).
    #[arg(long, default_value = "auto")]
    weights: lorascope::model::Precision,
}

impl ProbeArgs {
    /// The works, controls and prompts named by the flags, read.
    fn data(&self, works: &Path) -> lorascope::Result<Works> {
        Works::load(works, self.controls.as_deref(), self.style_controls.as_deref(), self.prompts.as_deref())
    }

    /// Every probe setting the flags give, checked.
    fn settings(&self) -> lorascope::Result<ProbeSettings> {
        let image = ImageSettings {
            timesteps: self.timesteps.clone(),
            draws: self.draws,
            noise_seed: self.noise_seed,
            generate_seeds: self.generate.clone(),
            ddim_steps: self.steps,
            guidance: self.guidance,
            copy_distance: self.copy_distance,
            partial_ssim: self.partial_ssim,
            partial_phash: self.partial_phash,
            batch: self.batch,
            ..Default::default()
        };
        image.check(None)?;
        Ok(ProbeSettings { text: self.thresholds()?, image, tokenizer: self.tokenizer.clone() })
    }

    fn thresholds(&self) -> lorascope::Result<Thresholds> {
        let th = Thresholds {
            prefix_tokens: self.prefix_tokens,
            new_tokens: self.new_tokens,
            stride: self.stride,
            substantial: self.substantial,
            context: self.context,
            min_span_bits: self.min_span_bits,
            copy_margin: self.copy_margin,
            control_windows: self.control_windows,
            bos: self.bos,
            weights: self.weights,
            ..Default::default()
        };
        th.check()?;
        Ok(th)
    }
}

/// The probe's progress bar, and the start of every stage for the time each took.
struct ProbeProgress(Progress, std::sync::Mutex<Vec<(String, Instant)>>);

impl ProbeProgress {
    /// Seconds per stage, in the order they ran (the last one ends now).
    fn stage_seconds(&self) -> Vec<(String, f64)> {
        let starts = self.1.lock().map(|s| s.clone()).unwrap_or_default();
        let now = Instant::now();
        let ends = starts.iter().skip(1).map(|(_, t)| *t).chain(std::iter::once(now));
        starts.iter().zip(ends).map(|((name, t), end)| (name.clone(), (end - *t).as_secs_f64())).collect()
    }

    /// One line on stderr: the time of each stage, so a user sees where a run spends it.
    fn print_stage_times(&self) {
        let parts: Vec<String> = self.stage_seconds().iter().map(|(n, s)| format!("{n} {s:.1} s")).collect();
        if !parts.is_empty() {
            use std::io::Write;
            let _ = writeln!(std::io::stderr(), "probe stages: {}", parts.join(", "));
        }
    }
}

impl lorascope::probe::Progress for ProbeProgress {
    fn stage(&self, name: &str, total: u64) {
        if let Ok(mut s) = self.1.lock() {
            s.push((name.to_string(), Instant::now()));
        }
        self.0.bar.set_message(name.to_string());
        self.0.bar.set_length(total);
        self.0.bar.set_position(0);
    }
    fn inc(&self, n: u64) {
        self.0.tick_by(n);
    }
    fn plan(&self, line: &str) {
        if !self.0.quiet {
            self.0.bar.suspend(|| eprintln!("{}", shown::inline(line)));
        }
    }
}

/// The probe's progress bar: tokens scored and generated, per stage.
fn probe_progress(quiet: bool) -> ProbeProgress {
    let progress = ProbeProgress(Progress::new(0, quiet), Default::default());
    if let Ok(style) =
        ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} tokens, {per_sec} ({eta} left)")
    {
        progress.0.bar.set_style(style.progress_chars("=> "));
    }
    progress
}

fn run_probe(
    adapter: &Adapter,
    base: &BaseModel,
    s: report::SpectrumReport,
    data: &ProbeData,
    th: &Thresholds,
    quiet: bool,
) -> lorascope::Result<report::ProbeReport> {
    with_probe_progress(quiet, |progress| lorascope::probe(adapter, base, s, &data.inputs(), th, progress))
}

fn run_image_probe(
    adapter: &Adapter,
    base: &BaseModel,
    s: report::SpectrumReport,
    data: &pipeline::ImageData,
    settings: &ProbeSettings,
    quiet: bool,
) -> lorascope::Result<report::ImageProbeReport> {
    with_probe_progress(quiet, |progress| {
        pipeline::probe_images(adapter, base, settings.tokenizer.as_deref(), s, data, &settings.image, progress)
    })
}

/// Run `f` with the probe's progress bar, closed afterwards, and the time of each stage on
/// stderr unless quiet.
fn with_probe_progress<T>(quiet: bool, f: impl FnOnce(&ProbeProgress) -> T) -> T {
    let progress = probe_progress(quiet);
    let r = f(&progress);
    progress.0.finish();
    if !quiet {
        progress.print_stage_times();
    }
    r
}

/// A verdict of either probe, by its name (`--fail-on` takes the names of both sets).
#[derive(Clone, Debug, PartialEq)]
struct VerdictName(&'static str);

impl std::str::FromStr for VerdictName {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        let names = Verdict::ALL.iter().map(|v| v.as_str()).chain(ImageVerdict::ALL.iter().map(|v| v.as_str()));
        let mut all: Vec<&'static str> = vec![];
        for n in names {
            if !all.contains(&n) {
                all.push(n);
            }
        }
        all.iter()
            .find(|n| **n == s)
            .map(|n| VerdictName(n))
            .ok_or_else(|| format!("unknown verdict {s:?} (verdicts: {})", all.join(", ")))
    }
}

/// A `--fail-on` list: names of a closed set (flags, verdicts), or `any`.
#[derive(Clone, Debug)]
enum FailOn<T> {
    Any,
    These(Vec<T>),
}

impl<T: PartialEq> FailOn<T> {
    /// Whether `x` fails the run; `any` means every member for which `counts` holds.
    fn matches(&self, x: &T, counts: impl Fn(&T) -> bool) -> bool {
        match self {
            FailOn::Any => counts(x),
            FailOn::These(v) => v.contains(x),
        }
    }
}

/// clap's parser for `--fail-on`: comma-separated names (each checked against its set's table)
/// or `any`.
fn fail_on<T: std::str::FromStr<Err = String>>(s: &str) -> Result<FailOn<T>, String> {
    if s.trim() == "any" {
        return Ok(FailOn::Any);
    }
    let v = s.split(',').map(str::trim).filter(|x| !x.is_empty()).map(str::parse).collect::<Result<Vec<T>, _>>()?;
    Ok(FailOn::These(v))
}

#[derive(Args)]
struct FitArgs {
    /// Base model: a Hugging Face directory or a .gguf file.
    #[arg(long)]
    base: PathBuf,
    /// Texts to memorise: a directory of .txt files or a JSONL file of {"id","text"} lines.
    #[arg(long)]
    texts: PathBuf,
    /// Output PEFT directory (adapter_model.safetensors + adapter_config.json).
    #[arg(long)]
    out: PathBuf,
    #[arg(long, default_value_t = FitOptions::default().rank)]
    rank: usize,
    #[arg(long, default_value_t = FitOptions::default().alpha)]
    alpha: f64,
    /// Modules to adapt, comma-separated.
    #[arg(long, default_value_t = FitOptions::default().targets.join(","))]
    targets: String,
    /// Layers to adapt, comma-separated or ranges (e.g. 24-29); default all.
    #[arg(long)]
    layers: Option<String>,
    #[arg(long, default_value_t = FitOptions::default().max_steps)]
    max_steps: usize,
    #[arg(long, default_value_t = FitOptions::default().lr)]
    lr: f64,
    #[arg(long, default_value_t = FitOptions::default().seed)]
    seed: u64,
    /// Stop when the mean loss (nats/token) is below this and every token is predicted.
    #[arg(long, default_value_t = FitOptions::default().target_loss)]
    target_loss: f64,
    /// Also train on each text from every multiple of this many tokens (0 = whole texts).
    #[arg(long, default_value_t = FitOptions::default().chunk_stride)]
    chunk_stride: usize,
    /// No progress output.
    #[arg(long, short)]
    quiet: bool,
}

/// Highest layer index `--layers` accepts (no llama-family model has a thousand layers; a range
/// up to u64::MAX would otherwise be expanded into memory).
const MAX_LAYER_INDEX: usize = 1023;

fn parse_layers(s: &str) -> lorascope::Result<Vec<usize>> {
    let bad = || {
        lorascope::Error::Usage(format!(
            "--layers {s:?}: expected layer numbers 0..={MAX_LAYER_INDEX} or ranges like 0,2,24-29"
        ))
    };
    let mut out = vec![];
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        match part.split_once('-') {
            Some((a, b)) => {
                let (a, b): (usize, usize) = (a.parse().map_err(|_| bad())?, b.parse().map_err(|_| bad())?);
                if a > b || b > MAX_LAYER_INDEX {
                    return Err(bad());
                }
                out.extend(a..=b);
            }
            None => out.push(part.parse().ok().filter(|&l| l <= MAX_LAYER_INDEX).ok_or_else(bad)?),
        }
    }
    Ok(out)
}

/// Largest `fit-lora --rank` (far above any adapter people train; bounds the factor allocation).
const MAX_FIT_RANK: usize = 1024;
/// Most `fit-lora --max-steps` (bounds the run, not memory).
const MAX_FIT_STEPS: usize = 1_000_000;

fn fit_lora(a: FitArgs) -> lorascope::Result<ExitCode> {
    use lorascope::model::train::{fit_lora, write_peft_dir};
    let usage = |m: String| Err(lorascope::Error::Usage(m));
    if a.rank == 0 || a.rank > MAX_FIT_RANK || a.max_steps > MAX_FIT_STEPS {
        return usage(format!("--rank must be in 1..={MAX_FIT_RANK} and --max-steps at most {MAX_FIT_STEPS}"));
    }
    if !(a.alpha.is_finite() && a.lr.is_finite() && a.lr > 0.0 && a.target_loss.is_finite()) {
        return usage("--alpha, --lr and --target-loss must be finite numbers, --lr positive".into());
    }
    let base = BaseModel::open(&a.base)?;
    // Trained in f32 throughout: quantised products have no backward pass.
    let model =
        lorascope::model::TextModel::load_as(&base, &candle_core::Device::Cpu, lorascope::model::Precision::F32)?;
    let texts: Vec<String> = load_works(&a.texts)?.works.into_iter().map(|w| w.text).collect();
    let opts = FitOptions {
        rank: a.rank,
        alpha: a.alpha,
        targets: a.targets.split(',').map(|t| t.trim().to_string()).filter(|t| !t.is_empty()).collect(),
        layers: a.layers.as_deref().map(parse_layers).transpose()?,
        max_steps: a.max_steps,
        lr: a.lr,
        seed: a.seed,
        target_loss: a.target_loss,
        chunk_stride: a.chunk_stride,
    };
    let start = Instant::now();
    let progress = Progress::new(a.max_steps, a.quiet);
    progress.bar.set_message("training steps");
    let (st, cfg, rep) = fit_lora(&model, &texts, &opts, &|_, loss| {
        progress.bar.set_message(format!("loss {loss:.4}"));
        progress.tick();
    })?;
    progress.finish();
    write_peft_dir(&a.out, &st, &cfg)?;
    emit(&format!(
        "{} steps in {:.1} s · loss {:.4} nats/token · accuracy {:.2}% · {} params on {} tokens · {}",
        rep.steps,
        start.elapsed().as_secs_f64(),
        rep.final_loss,
        100.0 * rep.final_accuracy,
        rep.params,
        rep.tokens,
        if rep.memorised { "memorised" } else { "NOT memorised: raise --max-steps or --rank" }
    ));
    emit(&format!("wrote {}\n", shown::inline(&a.out.display().to_string())));
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct ReportArgs {
    #[command(flatten)]
    common: Common,
    #[command(flatten)]
    probe: ProbeArgs,
    /// Directory to write report.json and report.html into (created if missing).
    #[arg(long)]
    out: PathBuf,
    /// Leave the timing block out, so two runs on the same inputs give identical bytes.
    #[arg(long)]
    no_timings: bool,
    #[command(flatten)]
    analysis: AnalysisArgs,
}

#[derive(Args)]
struct CompareArgs {
    /// First adapter: a .safetensors file or a PEFT directory.
    a: PathBuf,
    /// Second adapter.
    b: PathBuf,
    /// Singular directions spanning the subspaces whose principal angles are compared.
    #[arg(long, default_value_t = 8)]
    top_k: usize,
    /// Force the format of both adapters instead of detecting it.
    #[arg(long)]
    format: Option<Format>,
    /// Machine-readable JSON on stdout (sorted keys, byte-identical across runs).
    #[arg(long)]
    json: bool,
}

fn compare(c: CompareArgs) -> lorascope::Result<ExitCode> {
    let opts = LoadOptions { format: c.format, ..Default::default() };
    let a = Adapter::open(&c.a, &opts)?;
    let b = Adapter::open(&c.b, &opts)?;
    let r = pipeline::compare(&a, &b, c.top_k)?;
    if c.json {
        emit(&to_canonical_json(&r));
    } else {
        emit(&shown::lines(&report::render_compare(&r)));
    }
    Ok(ExitCode::SUCCESS)
}

#[derive(Args)]
struct ScanArgs {
    /// Files and directories (searched recursively; PEFT directories count as one adapter).
    paths: Vec<PathBuf>,
    /// A file listing paths to scan, one a line.
    #[arg(long)]
    list: Option<PathBuf>,
    /// Worker threads.
    #[arg(long, default_value_t = 2)]
    jobs: usize,
    /// Scan only shard I of N (a stable subset by path hash), e.g. 0/8.
    #[arg(long, value_parser = lorascope::scan::parse_shard)]
    shard: Option<(u64, u64)>,
    /// Exit with code 1 if any file carries one of these flags (comma-separated, or `any`).
    #[arg(long, value_parser = fail_on::<lorascope::scan::Flag>)]
    fail_on: Option<FailOn<lorascope::scan::Flag>>,
    /// Bits one effective parameter can store (Morris et al. 2025: 3.6).
    #[arg(long, default_value_t = 3.6)]
    bits_per_param: f64,
    /// No progress bar.
    #[arg(long, short)]
    quiet: bool,
}

/// Most worker threads `scan --jobs` starts (more than any machine lorascope runs on has cores;
/// a larger number would only create threads until the system refuses).
const MAX_JOBS: usize = 256;

fn scan(a: ScanArgs) -> lorascope::Result<ExitCode> {
    use lorascope::scan;
    use std::io::Write;
    let fail_on: Vec<scan::Flag> = scan::Flag::ALL
        .iter()
        .copied()
        .filter(|f| a.fail_on.as_ref().is_some_and(|x| x.matches(f, |_| true)))
        .collect();
    let mut paths = a.paths.clone();
    if let Some(l) = &a.list {
        paths.extend(scan::read_list(l)?);
    }
    let opts = SpectrumOptions { bits_per_param: a.bits_per_param, ..Default::default() };
    opts.check()?;
    if a.jobs == 0 || a.jobs > MAX_JOBS {
        return Err(lorascope::Error::Usage(format!("--jobs {} is outside 1..={MAX_JOBS}", a.jobs)));
    }
    let mut files = scan::discover(&paths)?;
    if let Some((i, n)) = a.shard {
        files.retain(|c| scan::in_shard(&c.path, i, n));
    }
    let th = scan::FlagThresholds::default();
    let progress = Progress::new(files.len(), a.quiet);
    progress.bar.set_message("files");
    let stdout = std::io::stdout();
    let mut emit = |r: &scan::ScanRecord| {
        let mut out = stdout.lock();
        let _ = writeln!(out, "{}", report::to_canonical_json_line(r));
        let _ = out.flush();
    };
    let sum = pipeline::scan_all(&files, a.jobs, &opts, &th, &fail_on, &|| progress.tick(), &mut emit)?;
    progress.finish();
    let mut rows = vec![
        vec!["files".to_string(), sum.files.to_string()],
        vec!["read".to_string(), (sum.files - sum.errors).to_string()],
        vec!["errors".to_string(), sum.errors.to_string()],
        vec!["of which skipped (not opened)".to_string(), sum.skipped.to_string()],
    ];
    for f in scan::Flag::ALL {
        rows.push(vec![format!("flag {f}"), sum.flags.get(f).copied().unwrap_or(0).to_string()]);
    }
    if !fail_on.is_empty() {
        rows.push(vec!["failing --fail-on".to_string(), sum.failing.to_string()]);
    }
    let _ = write!(std::io::stderr(), "{}", report::table(&["scan", "count"], &rows));
    Ok(if sum.failing > 0 { ExitCode::from(1) } else { ExitCode::SUCCESS })
}

/// A progress bar on stderr that appears only once work has taken over a second, and never
/// when stderr is not a terminal or with --quiet.
struct Progress {
    bar: ProgressBar,
    start: Instant,
    visible: bool,
    quiet: bool,
}

impl Progress {
    fn new(len: usize, quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({eta})") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("modules");
        Progress { bar, start: Instant::now(), visible: !quiet && std::io::stderr().is_terminal(), quiet }
    }
    fn tick(&self) {
        self.tick_by(1);
    }
    fn tick_by(&self, n: u64) {
        if self.visible && self.bar.is_hidden() && self.start.elapsed().as_secs_f64() > 1.0 {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        self.bar.inc(n);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn run(cli: Cli) -> lorascope::Result<ExitCode> {
    match cli.command {
        Command::Inspect(c) => {
            let (adapter, base) = c.open()?;
            let r = lorascope::inspect(&adapter, base.as_ref())?;
            if c.json {
                emit(&to_canonical_json(&r));
            } else {
                emit(&shown::lines(&report::render_inspect(&r)));
            }
        }
        Command::Spectrum { common: c, top, analysis } => {
            let opts = analysis.options()?;
            let (adapter, base) = c.open()?;
            let r = run_spectrum(&adapter, base.as_ref(), &opts, c.quiet)?;
            if c.json {
                emit(&to_canonical_json(&r));
            } else {
                emit(&shown::lines(&report::render_spectrum(&r, top)));
            }
        }
        Command::Probe { common: c, probe, analysis, intruders, fail_on } => {
            let settings = probe.settings()?;
            let th = settings.text;
            let opts = SpectrumOptions { intruders, ..analysis.options()? };
            let works = probe.works.as_deref().ok_or_else(|| lorascope::Error::Usage("probe needs --works".into()))?;
            if c.base.is_none() {
                return Err(lorascope::Error::Usage("probe needs --base: it runs the merged model".into()));
            }
            let data = probe.data(works)?;
            let (adapter, base) = c.open()?;
            let base = base.expect("--base given");
            let data = match data {
                Works::Images(images) => {
                    pipeline::check_base_for_images(&base)?;
                    let s = run_spectrum(&adapter, Some(&base), &opts, c.quiet)?;
                    let r = run_image_probe(&adapter, &base, s, &images, &settings, c.quiet)?;
                    if c.json {
                        emit(&to_canonical_json(&r));
                    } else {
                        emit(&shown::lines(&report::render_image_probe(&r)));
                    }
                    let failing = r.probe.result.works.iter().any(|w| {
                        let name = VerdictName(w.verdict.as_str());
                        fail_on.as_ref().is_some_and(|f| f.matches(&name, |_| w.verdict != ImageVerdict::NoEvidence))
                    });
                    return Ok(if failing { ExitCode::from(1) } else { ExitCode::SUCCESS });
                }
                Works::Text(d) => d,
            };
            if lorascope::model::is_sd_base(&base) {
                return Err(lorascope::Error::Input {
                    path: base.path.clone(),
                    reason: "the base is a Stable Diffusion model but the works are texts; image works are a folder \
                             of PNG, JPEG or WebP files"
                        .into(),
                });
            }
            let s = run_spectrum(&adapter, Some(&base), &opts, c.quiet)?;
            let r = run_probe(&adapter, &base, s, &data, &th, c.quiet)?;
            if c.json {
                emit(&to_canonical_json(&r));
            } else {
                emit(&shown::lines(&report::render_probe(&r)));
            }
            let failing = r.probe.result.works.iter().any(|w| {
                let name = VerdictName(w.verdict.as_str());
                fail_on.as_ref().is_some_and(|f| f.matches(&name, |_| w.verdict != Verdict::NoEvidence))
            });
            return Ok(if failing { ExitCode::from(1) } else { ExitCode::SUCCESS });
        }
        Command::FitLora(a) => return fit_lora(a),
        Command::Report(a) => return write_report(a),
        Command::Compare(c) => return compare(c),
        Command::Scan(a) => return scan(a),
        Command::Verify { dir, json, rerun } => return verify(&dir, json, rerun),
    }
    Ok(ExitCode::SUCCESS)
}

/// The report `a` asks for, computed (nothing written): the report and its terminal summary.
/// `command_line` is recorded in it.
fn compute_report(a: &ReportArgs, command_line: Vec<String>) -> lorascope::Result<(report::Report, String)> {
    let c = &a.common;
    let start = Instant::now();
    let mut timings = std::collections::BTreeMap::new();
    let settings = a.probe.settings()?;
    let opts = a.analysis.options()?;
    let (adapter, base) = c.open()?;
    let data = a.probe.works.as_deref().map(|w| a.probe.data(w)).transpose()?;
    timings.insert("load_s".to_string(), start.elapsed().as_secs_f64());
    let modules = Progress::new(adapter.modules.len(), c.quiet);
    let probe = probe_progress(c.quiet);
    let hooks =
        pipeline::ReportHooks { module_tick: &|| modules.tick(), spectrum_done: &|| modules.finish(), probe: &probe };
    let run = pipeline::run_report(
        &adapter,
        base.as_ref(),
        data.as_ref(),
        &settings,
        &opts,
        command_line,
        &hooks,
        &mut timings,
    );
    probe.0.finish();
    for (stage, secs) in probe.stage_seconds() {
        timings.insert(format!("probe {stage}_s"), secs);
    }
    let pipeline::ReportRun { report: mut r, summary } = run?;
    timings.insert("total_s".to_string(), start.elapsed().as_secs_f64());
    if !a.no_timings {
        r.timings = Some(timings);
    }
    Ok((r, summary))
}

fn write_report(a: ReportArgs) -> lorascope::Result<ExitCode> {
    // args_os: `std::env::args` panics on an argument that is not UTF-8 (a file name can be).
    let command_line: Vec<String> = std::iter::once("lorascope".to_string())
        .chain(std::env::args_os().skip(1).map(|a| a.to_string_lossy().into_owned()))
        .collect();
    let (r, summary) = compute_report(&a, command_line)?;
    let (json_path, html_path) = pipeline::write_report_dir(&r, &a.out)?;
    if a.common.json {
        emit(&to_canonical_json(&r));
    } else {
        let mut text = format!("{summary}\n");
        for s in &r.stages {
            text +=
                &format!("{:<9} {}  {}\n", s.name, if s.ran { "ran    " } else { "skipped" }, shown::inline(&s.reason));
        }
        text += &format!("wrote {} and {}\n", json_path.display(), html_path.display());
        emit(&shown::lines(&text));
    }
    Ok(ExitCode::SUCCESS)
}

/// `verify DIR [--rerun]`: the report's own files, its inputs and, with `--rerun`, its findings.
fn verify(dir: &Path, json: bool, rerun: bool) -> lorascope::Result<ExitCode> {
    let mut v = pipeline::verify(dir)?;
    if rerun {
        let line = &v.recorded.command_line;
        let not_runnable = |why: String| lorascope::Error::Input {
            path: dir.join("report.json"),
            reason: format!("the recorded command line cannot be run again: {why}"),
        };
        let cli = Cli::try_parse_from(line)
            .map_err(|e| not_runnable(e.to_string().lines().next().unwrap_or("").to_string()))?;
        let Command::Report(mut a) = cli.command else {
            return Err(not_runnable("it is not a `lorascope report` command".into()));
        };
        a.common.quiet = true;
        let (again, _) = compute_report(&a, line.clone())?;
        let r = pipeline::compare_rerun(&v.recorded, &again);
        v.outcome.ok &= r.reproduced;
        v.outcome.rerun = Some(r);
    }
    let o = &v.outcome;
    if json {
        emit(&to_canonical_json(o));
    } else {
        emit(&shown::lines(&report::render_verify(o)));
    }
    Ok(if o.ok { ExitCode::SUCCESS } else { ExitCode::from(1) })
}

/// Text to stdout. A reader that closed the pipe (`inspect … | head`) has all it wanted: stop
/// quietly with exit code 0 rather than panic in `print!`.
fn emit(s: &str) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = out.write_all(s.as_bytes()).and_then(|()| out.flush()) {
        if e.kind() == std::io::ErrorKind::BrokenPipe {
            std::process::exit(0);
        }
        let _ = writeln!(std::io::stderr(), "lorascope: error: cannot write the output to stdout: {e}");
        std::process::exit(2);
    }
}

/// The one line of an error on stderr (its text escaped: it can quote file names and keys).
fn fail(message: &str, code: u8) -> ExitCode {
    use std::io::Write;
    let _ = writeln!(std::io::stderr(), "lorascope: error: {}", shown::inline(message));
    ExitCode::from(code)
}

/// Where the last panic happened, kept by the panic hook for the one-line message (the payload
/// has the text but not the place).
static PANIC_AT: std::sync::Mutex<Option<String>> = std::sync::Mutex::new(None);

/// A panic is a bug of lorascope, but never a crash with exit 101 and a backtrace: the hook
/// records where it happened, `main` catches the unwind and prints one line with exit code 3.
fn quiet_panics() {
    std::panic::set_hook(Box::new(|info| {
        if let (Some(l), Ok(mut at)) = (info.location(), PANIC_AT.lock()) {
            *at = Some(format!("{}:{}", l.file(), l.line()));
        }
    }));
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = lorascope::error::panic_text(payload);
    let at = PANIC_AT.lock().ok().and_then(|a| a.clone()).map(|a| format!(" at {a}")).unwrap_or_default();
    format!("internal error: lorascope panicked{at}: {text} (please report this with the input that caused it)")
}

fn main() -> ExitCode {
    quiet_panics();
    let cli = Cli::parse();
    if let Some(n) = cli.threads {
        if let Err(e) = set_threads(n) {
            return fail(&e.to_string(), e.exit_code());
        }
    }
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(Ok(code)) => code,
        Ok(Err(e)) => fail(&e.to_string(), e.exit_code()),
        Err(payload) => fail(&panic_message(payload.as_ref()), 3),
    }
}
