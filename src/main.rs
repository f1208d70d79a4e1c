//! The `lorascope` command line: argument parsing and output only; the work is in the library.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};

use lorascope::load::{Format, LoadOptions};
use lorascope::report::{self, to_canonical_json};

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
    /// No progress bars.
    #[arg(long, short)]
    quiet: bool,
}

#[derive(Subcommand)]
enum Command {
    /// Format, metadata, hashes and the module map of an adapter.
    Inspect(Common),
}

fn run(cli: Cli) -> lorascope::Result<()> {
    match cli.command {
        Command::Inspect(c) => {
            let opts = LoadOptions { format: c.format, allow_unmatched: c.allow_unmatched };
            let (adapter, base) = lorascope::open(&c.adapter, c.base.as_deref(), &opts)?;
            let r = report::inspect(&adapter, base.as_ref())?;
            if c.json {
                print!("{}", to_canonical_json(&r));
            } else {
                print!("{}", report::render_inspect(&r));
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
