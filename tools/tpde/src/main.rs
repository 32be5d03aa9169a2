//! The `tpde` command: encode checkpoints to deltas, apply, inspect and verify them.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tpde::delta::EncodeSettings;
use tpde::pipeline::{self, encode::EncodeOptions, Progress};
use tpde::{Checkpoint, DeltaFile};

// Chunks come and go by the megabyte on every thread; mimalloc keeps those pages
// instead of returning them to the kernel and faulting them in again.
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

const EXAMPLES: &str = "\
Examples:
  tpde encode base.safetensors finetune.safetensors -o finetune.tpde
  tpde encode base-dir/ step-1000-dir/ -o step-1000.tpde      (sharded checkpoints)
  tpde encode model.safetensors -o model.tpde                 (standalone, no base)
  tpde apply base.safetensors finetune.tpde -o rebuilt.safetensors
  tpde inspect finetune.tpde --json
  tpde verify base.safetensors finetune.tpde --target finetune.safetensors";

/// Lossless checkpoint deltas for safetensors models.
#[derive(Parser)]
#[command(version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Threads {
    /// Worker threads (default: all cores).
    #[arg(long, value_name = "N")]
    threads: Option<usize>,
}

#[derive(Subcommand)]
enum Command {
    /// Encode TARGET as a delta against BASE, or alone when only one checkpoint is given.
    #[command(
        after_help = "Examples:\n  tpde encode base.safetensors target.safetensors -o target.tpde\n  tpde encode target.safetensors -o target.tpde"
    )]
    Encode {
        /// `[BASE] TARGET`: each a .safetensors file or a sharded checkpoint directory.
        #[arg(value_name = "[BASE] TARGET", num_args = 1..=2, required = true)]
        inputs: Vec<PathBuf>,
        /// The delta file to write.
        #[arg(short, long, value_name = "DELTA")]
        output: PathBuf,
        /// Effort, 1 (fastest) to 22 (smallest). Above 1, each stream is also tried
        /// with zstd at this level and the smaller kept; from 10 on, encodings and
        /// value orders are measured rather than predicted.
        #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(i32).range(1..=22))]
        level: i32,
        /// Store a stream compressed only when zstd saves at least this fraction of it,
        /// and group values by base key only when that saves as much (0 to 1).
        /// Raising it trades size for decoding that is mostly copying, which suits
        /// loading onto a GPU (try 0.25).
        #[arg(long, default_value_t = 0.0, value_name = "FRACTION")]
        min_zstd_gain: f64,
        /// Words per chunk: the unit of parallelism and random access.
        #[arg(long, default_value_t = tpde::limits::DEFAULT_CHUNK_WORDS)]
        chunk_words: u64,
        /// Overwrite DELTA if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        threads: Threads,
    },
    /// Rebuild the target of DELTA, byte-identical to the original.
    #[command(
        after_help = "Examples:\n  tpde apply base.safetensors target.tpde -o target.safetensors\n  tpde apply base-dir/ step.tpde -o step-dir/"
    )]
    Apply {
        /// `[BASE] DELTA`: the base is needed unless DELTA is standalone.
        #[arg(value_name = "[BASE] DELTA", num_args = 1..=2, required = true)]
        inputs: Vec<PathBuf>,
        /// Where to write the target: a file, or a directory for a sharded target.
        #[arg(short, long, value_name = "OUT")]
        output: PathBuf,
        /// Overwrite OUT if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        threads: Threads,
    },
    /// Show per-tensor encodings, sizes and change fractions, after checking every
    /// chunk's checksum, streams and changed count (the rebuilt bytes need the base:
    /// `verify` proves them).
    Inspect {
        /// The delta file.
        delta: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        threads: Threads,
    },
    /// Check every checksum and digest; exit non-zero on any mismatch.
    #[command(
        after_help = "Examples:\n  tpde verify base.safetensors target.tpde\n  tpde verify base.safetensors target.tpde --target target.safetensors"
    )]
    Verify {
        /// `[BASE] DELTA`.
        #[arg(value_name = "[BASE] DELTA", num_args = 1..=2, required = true)]
        inputs: Vec<PathBuf>,
        /// Also compare the rebuilt target with this checkpoint, byte for byte.
        #[arg(long, value_name = "TARGET")]
        target: Option<PathBuf>,
        #[command(flatten)]
        threads: Threads,
    },
}

/// Progress bars on stderr; indicatif hides them when stderr is not a terminal.
struct Bars {
    bar: ProgressBar,
}

impl Bars {
    fn new() -> Self {
        let bar = ProgressBar::with_draw_target(Some(0), ProgressDrawTarget::stderr());
        bar.set_style(
            ProgressStyle::with_template("{msg:>14} [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}")
                .expect("a valid template")
                .progress_chars("=> "),
        );
        Self { bar }
    }
}

impl Progress for Bars {
    fn phase(&self, label: &str, total: u64) {
        self.bar.set_message(label.to_owned());
        self.bar.set_length(total);
        self.bar.set_position(0);
        self.bar.reset_eta();
    }

    fn advance(&self, bytes: u64) {
        self.bar.inc(bytes);
    }
}

impl Drop for Bars {
    fn drop(&mut self) {
        self.bar.finish_and_clear();
    }
}

fn split_base(inputs: &[PathBuf]) -> (Option<&Path>, &Path) {
    match inputs {
        [base, other] => (Some(base.as_path()), other.as_path()),
        [only] => (None, only.as_path()),
        _ => unreachable!("clap enforces one or two inputs"),
    }
}

/// Refuses an output that would replace one of the inputs: inputs are never modified.
fn check_not_an_input(output: &Path, inputs: &[PathBuf]) -> tpde::Result<()> {
    let Ok(output) = output.canonicalize() else { return Ok(()) };
    let clash = inputs.iter().any(|input| input.canonicalize().is_ok_and(|i| output == i || output.starts_with(&i)));
    if clash {
        return Err(
            tpde::Error::new(tpde::ErrorCode::InvalidArgument, "the output would overwrite an input").in_file(&output)
        );
    }
    Ok(())
}

fn open_optional(path: Option<&Path>) -> tpde::Result<Option<Checkpoint>> {
    path.map(Checkpoint::open).transpose()
}

#[allow(clippy::cast_precision_loss)] // sizes for display
fn human(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut value = bytes as f64;
    let mut unit = 0;
    while value >= 1024.0 && unit + 1 < UNITS.len() {
        value /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{bytes} B")
    } else {
        format!("{value:.2} {}", UNITS[unit])
    }
}

fn set_threads(threads: &Threads) {
    if let Some(n) = threads.threads {
        // Fails only if a pool exists already, which cannot happen this early.
        let _ = rayon::ThreadPoolBuilder::new().num_threads(n.max(1)).build_global();
    }
}

#[allow(clippy::cast_precision_loss)] // ratios for display
fn run(cli: Cli) -> tpde::Result<()> {
    match cli.command {
        Command::Encode { inputs, output, level, min_zstd_gain, chunk_words, force, threads } => {
            set_threads(&threads);
            tpde::output::check_free(&output, force)?;
            check_not_an_input(&output, &inputs)?;
            let (base_path, target_path) = split_base(&inputs);
            let base = open_optional(base_path)?;
            let target = Checkpoint::open(target_path)?;
            let options = EncodeOptions { settings: EncodeSettings { level, min_zstd_gain }, chunk_words };
            let summary = pipeline::encode::encode(base.as_ref(), &target, &output, options, &Bars::new())?;
            eprintln!(
                "wrote {} ({} of {} target, {:.2}%; {} tensors against the base, {} standalone)",
                output.display(),
                human(summary.delta_bytes),
                human(summary.target_bytes),
                100.0 * summary.delta_bytes as f64 / summary.target_bytes.max(1) as f64,
                summary.delta_tensors,
                summary.standalone_tensors,
            );
        }
        Command::Apply { inputs, output, force, threads } => {
            set_threads(&threads);
            tpde::output::check_free(&output, force)?;
            check_not_an_input(&output, &inputs)?;
            let (base_path, delta_path) = split_base(&inputs);
            let delta = DeltaFile::open(delta_path)?;
            let base = open_optional(base_path)?;
            let summary = pipeline::apply::apply(&delta, base.as_ref(), &output, force, &Bars::new())?;
            eprintln!(
                "wrote {} ({} in {} file(s)), every digest matched",
                output.display(),
                human(summary.target_bytes),
                summary.files
            );
        }
        Command::Inspect { delta, json, threads } => {
            set_threads(&threads);
            let delta = DeltaFile::open(&delta)?;
            let report = pipeline::inspect::inspect(&delta)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).expect("the report serialises"));
            } else {
                print!("{}", render_report(&report));
            }
        }
        Command::Verify { inputs, target, threads } => {
            set_threads(&threads);
            let (base_path, delta_path) = split_base(&inputs);
            let delta = DeltaFile::open(delta_path)?;
            let base = open_optional(base_path)?;
            let target = open_optional(target.as_deref())?;
            pipeline::apply::verify(&delta, base.as_ref(), target.as_ref(), &Bars::new())?;
            let compared = if target.is_some() { ", and the rebuilt target is byte-identical to TARGET" } else { "" };
            println!("ok: every checksum and digest matched{compared}");
        }
    }
    Ok(())
}

fn render_report(report: &pipeline::inspect::Report) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "format {}, written by {}, {} target file(s), {}",
        report.format_version,
        report.writer,
        report.target_files,
        if report.needs_base { "needs a base" } else { "standalone" }
    );
    let _ = writeln!(
        out,
        "{:<40} {:>6} {:>18} {:>7} {:>11} {:>11} {:>7} {:>8}",
        "tensor", "dtype", "chunks u/s/d/r", "kind", "target", "stored", "ratio", "changed"
    );
    for t in report.tensors.iter().chain(std::iter::once(&report.total)) {
        let c = t.chunks;
        let _ = writeln!(
            out,
            "{:<40} {:>6} {:>18} {:>7} {:>11} {:>11} {:>6.2}% {:>7.3}%",
            t.name,
            t.dtype,
            format!("{}/{}/{}/{}", c.unchanged, c.sparse, c.dense, c.raw),
            if t.delta { "delta" } else { "alone" },
            human(t.target_bytes),
            human(t.stored_bytes),
            100.0 * t.ratio,
            100.0 * t.changed_fraction,
        );
    }
    let _ = writeln!(out, "file size {}", human(report.file_bytes));
    let checked = report.checked;
    let _ = writeln!(
        out,
        "checked: {}{}{}; {}",
        if checked.structure { "structure" } else { "nothing" },
        if checked.chunk_checksums { ", every chunk checksum" } else { "" },
        if checked.chunk_payloads { ", streams and changed counts" } else { "" },
        if checked.rebuilt_digests {
            "rebuilt bytes proven by their digests"
        } else {
            "rebuilt bytes not checked (that needs the base): run `tpde verify` to prove them"
        }
    );
    out
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Interrupted runs leave no partial output behind.
    let _ = ctrlc::set_handler(|| {
        tpde::output::remove_pending_outputs();
        std::process::exit(130);
    });
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tpde: {err}");
            ExitCode::FAILURE
        }
    }
}
