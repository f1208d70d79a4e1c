//! The `lorascope` command line: argument parsing and output only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use std::io::IsTerminal;
use std::time::Instant;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

use lorascope::load::{Format, LoadOptions};
use lorascope::report::{self, to_canonical_json};
use lorascope::spectral::SpectrumOptions;

#[derive(Parser)]
#[command(
    name = "lorascope",
    version,
    about = "LoRA-adapter forensics: what an adapter is, how much it adds, whether it copies works"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Common {
    /// Adapter: a .safetensors file or a PEFT directory.
    adapter: PathBuf,
    /// Base model: .safetensors, Hugging Face or diffusers directory, or .gguf.
    #[arg(long)]
    base: Option<PathBuf>,
    /// Force the adapter format instead of detecting it (peft, kohya, lycoris, diffusers).
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
        /// Bits one effective parameter can store (Morris et al. 2025: 3.6).
        #[arg(long, default_value_t = 3.6)]
        bits_per_param: f64,
        /// Largest min(m, n) for dense SVDs of base-dependent matrices (intruders, DoRA).
        #[arg(long, default_value_t = 1536)]
        max_dense_dim: usize,
    },
}

/// A progress bar on stderr that appears only once work has taken over a second, and never
/// when stderr is not a terminal or with --quiet.
struct Progress {
    bar: ProgressBar,
    start: Instant,
    visible: bool,
}

impl Progress {
    fn new(len: usize, quiet: bool) -> Self {
        let bar = ProgressBar::with_draw_target(Some(len as u64), ProgressDrawTarget::hidden());
        if let Ok(style) = ProgressStyle::with_template("{spinner} {msg} [{bar:30}] {pos}/{len} ({eta})") {
            bar.set_style(style.progress_chars("=> "));
        }
        bar.set_message("modules");
        Progress { bar, start: Instant::now(), visible: !quiet && std::io::stderr().is_terminal() }
    }
    fn tick(&self) {
        if self.visible && self.bar.is_hidden() && self.start.elapsed().as_secs_f64() > 1.0 {
            self.bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        self.bar.inc(1);
    }
    fn finish(&self) {
        self.bar.finish_and_clear();
    }
}

fn run(cli: Cli) -> lorascope::Result<()> {
    match cli.command {
        Command::Inspect(c) => {
            let opts = LoadOptions { format: c.format, allow_unmatched: c.allow_unmatched, autov3: c.autov3 };
            let (adapter, base) = lorascope::open(&c.adapter, c.base.as_deref(), &opts)?;
            let r = lorascope::inspect(&adapter, base.as_ref())?;
            if c.json {
                print!("{}", to_canonical_json(&r));
            } else {
                print!("{}", report::render_inspect(&r));
            }
        }
        Command::Spectrum { common: c, top, bits_per_param, max_dense_dim } => {
            let opts = LoadOptions { format: c.format, allow_unmatched: c.allow_unmatched, autov3: c.autov3 };
            let (adapter, base) = lorascope::open(&c.adapter, c.base.as_deref(), &opts)?;
            let sopts = SpectrumOptions { bits_per_param, max_dense_dim, ..Default::default() };
            let progress = Progress::new(adapter.modules.len(), c.quiet);
            let r = lorascope::spectrum(&adapter, base.as_ref(), &sopts, &|| progress.tick());
            progress.finish();
            let r = r?;
            if c.json {
                print!("{}", to_canonical_json(&r));
            } else {
                print!("{}", report::render_spectrum(&r, top));
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("lorascope: error: {e}");
            ExitCode::from(2)
        }
    }
}
