//! `tpde series`: a training run kept as one series of keyframes and deltas.

use std::collections::BTreeSet;
use std::path::PathBuf;

use clap::Subcommand;
use tpde::{AddOptions, ApplyOptions, Checkpoint, EncodeOptions, EncodeSettings, Error, ErrorCode, Series, StepKind};

use crate::{escape, human, prepare_output, set_threads, Bars, Threads};

pub const EXAMPLES: &str = "\
Examples:
  tpde series add run/ step-100.safetensors --step 100
  tpde series add run/ ckpt-200/ --step 200 --max-chain 10     (sharded checkpoint)
  tpde series add run/ step-300.safetensors --step 300 --previous step-200.safetensors
  tpde series get run/ --step 200 -o step-200/
  tpde series list run/
  tpde series verify run/
  tpde series prune run/ --keep-every 1000 --keep-last 5";

#[derive(Subcommand)]
pub enum SeriesCommand {
    /// Add CKPT as step N, stored as the smallest of a keyframe, a delta against the
    /// previous step and a delta against the latest keyframe.
    Add {
        /// The series directory (created when missing or empty).
        run: PathBuf,
        /// A .safetensors file or a sharded checkpoint directory.
        checkpoint: PathBuf,
        /// The step number; later than every step the series holds.
        #[arg(long)]
        step: u64,
        /// Most deltas applied after a keyframe to rebuild any step.
        #[arg(long, default_value_t = 10, value_name = "K")]
        max_chain: usize,
        /// Words per chunk of the encoded files.
        #[arg(long, default_value_t = tpde::DEFAULT_CHUNK_WORDS)]
        chunk_words: u64,
        /// The previous step's checkpoint, if still at hand: checked against the
        /// series' digests, it saves rebuilding that step.
        #[arg(long, value_name = "PREV")]
        previous: Option<PathBuf>,
        /// Code the positions of a delta against the previous step's delta
        /// (format 1.2, position coding 3) where that stores smaller. The GPU
        /// loader decodes such positions on the CPU before it uploads them.
        #[arg(long)]
        temporal: bool,
        /// Never use zstd: every stream is lane rANS, constant or stored, so that a GPU
        /// worker stepping the series decodes each delta itself.
        #[arg(long)]
        no_zstd: bool,
        #[command(flatten)]
        threads: Threads,
    },
    /// Rebuild step N, byte-identical to the checkpoint that was added.
    Get {
        /// The series directory.
        run: PathBuf,
        #[arg(long)]
        step: u64,
        /// Where to write it: a file, or a directory for a sharded checkpoint.
        #[arg(short, long, value_name = "OUT")]
        output: PathBuf,
        /// Overwrite OUT if it exists.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        threads: Threads,
    },
    /// Show every step: how it is stored, its reference, size and chain depth.
    List {
        /// The series directory.
        run: PathBuf,
        /// Print the manifest as JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check every step file against its digest, and rebuild every step against the
    /// checkpoint digests the manifest pins.
    Verify {
        /// The series directory.
        run: PathBuf,
        #[command(flatten)]
        threads: Threads,
    },
    /// Remove steps; kept steps whose reference goes are stored anew, so every kept
    /// step still rebuilds.
    Prune {
        /// The series directory.
        run: PathBuf,
        /// Keep these steps (comma-separated).
        #[arg(long, value_delimiter = ',', value_name = "STEPS")]
        keep: Vec<u64>,
        /// Keep every step that is a multiple of N.
        #[arg(long, value_name = "N")]
        keep_every: Option<u64>,
        /// Keep the last K steps.
        #[arg(long, value_name = "K")]
        keep_last: Option<usize>,
        /// Most deltas after a keyframe for the steps stored anew.
        #[arg(long, default_value_t = 10, value_name = "K")]
        max_chain: usize,
        #[command(flatten)]
        threads: Threads,
    },
}

fn kind_name(kind: StepKind) -> &'static str {
    match kind {
        StepKind::Keyframe => "keyframe",
        StepKind::Delta => "delta",
        StepKind::Same => "same",
    }
}

#[allow(clippy::cast_precision_loss)] // ratios for display
pub fn run(command: SeriesCommand) -> tpde::Result<()> {
    match command {
        SeriesCommand::Add { run, checkpoint, step, max_chain, chunk_words, previous, temporal, no_zstd, threads } => {
            set_threads(&threads)?;
            let ckpt = Checkpoint::open(&checkpoint)?;
            let previous = previous.as_deref().map(Checkpoint::open).transpose()?;
            let mut series = Series::open_or_create(&run)?;
            let settings = EncodeSettings { zstd: !no_zstd, ..EncodeSettings::default() };
            let options = AddOptions { max_chain, encode: EncodeOptions { settings, chunk_words }, temporal };
            let added = match &previous {
                Some(previous) => series.add_after(previous, &ckpt, step, &options, &Bars::new())?,
                None => series.add(&ckpt, step, &options, &Bars::new())?,
            };
            let e = &added.entry;
            let against = e.reference.map_or(String::new(), |r| format!(" against step {r}"));
            eprintln!(
                "added step {step}: {}{against}, {} of {} checkpoint ({:.2}%), chain depth {}",
                kind_name(e.kind),
                human(e.file_bytes),
                human(e.checkpoint.total_bytes()),
                100.0 * e.file_bytes as f64 / e.checkpoint.total_bytes().max(1) as f64,
                added.depth
            );
            for c in &added.candidates {
                let what = c.reference.map_or("keyframe".to_owned(), |r| format!("delta against step {r}"));
                eprintln!("  measured {what}: {}", human(c.bytes));
            }
        }
        SeriesCommand::Get { run, step, output, force, threads } => {
            set_threads(&threads)?;
            let series = Series::open(&run)?;
            prepare_output(&output, std::slice::from_ref(&run), force)?;
            let depth = series.manifest().depth(step)?;
            series.get(step, &output, ApplyOptions { force, sync: false }, &Bars::new())?;
            eprintln!(
                "wrote {} (step {step}, {depth} delta(s) after its keyframe), every digest matched",
                escape(&output.display().to_string())
            );
        }
        SeriesCommand::List { run, json } => {
            let series = Series::open(&run)?;
            let m = series.manifest();
            if json {
                print!("{}", m.to_text());
                return Ok(());
            }
            println!("{:>12}  {:<8}  {:>9}  {:>12}  {:>5}", "step", "kind", "reference", "bytes", "depth");
            for s in &m.steps {
                let reference = s.reference.map_or("-".to_owned(), |r| r.to_string());
                println!(
                    "{:>12}  {:<8}  {reference:>9}  {:>12}  {:>5}",
                    s.step,
                    kind_name(s.kind),
                    s.file_bytes,
                    m.depth(s.step)?
                );
            }
            let checkpoints: u64 = m.steps.iter().map(|s| s.checkpoint.total_bytes()).sum();
            println!(
                "{} steps in {} ({:.2}% of the {} their checkpoints take)",
                m.steps.len(),
                human(series.stored_bytes()),
                100.0 * series.stored_bytes() as f64 / checkpoints.max(1) as f64,
                human(checkpoints)
            );
        }
        SeriesCommand::Verify { run, threads } => {
            set_threads(&threads)?;
            let series = Series::open(&run)?;
            let checked = series.verify(&Bars::new())?;
            for path in &checked.stray_files {
                eprintln!(
                    "tpde: {} is not part of the series (an interrupted write left it)",
                    escape(&path.display().to_string())
                );
            }
            println!("ok: {} steps rebuilt, every file and checkpoint digest matched", checked.steps);
        }
        SeriesCommand::Prune { run, keep, keep_every, keep_last, max_chain, threads } => {
            set_threads(&threads)?;
            if keep.is_empty() && keep_every.is_none() && keep_last.is_none() {
                return Err(Error::new(
                    ErrorCode::InvalidArgument,
                    "say which steps to keep: --keep, --keep-every or --keep-last",
                ));
            }
            if keep_every == Some(0) {
                return Err(Error::new(ErrorCode::InvalidArgument, "--keep-every must be at least 1"));
            }
            let mut series = Series::open(&run)?;
            let steps: Vec<u64> = series.manifest().steps.iter().map(|s| s.step).collect();
            let last: BTreeSet<u64> = steps.iter().rev().take(keep_last.unwrap_or(0)).copied().collect();
            let listed: BTreeSet<u64> = keep.into_iter().collect();
            let keeps =
                |s: u64| listed.contains(&s) || last.contains(&s) || keep_every.is_some_and(|n| s.is_multiple_of(n));
            let options = AddOptions { max_chain, ..AddOptions::default() };
            let pruned = series.prune(keeps, &options, &Bars::new())?;
            eprintln!(
                "removed {} step(s), stored {} anew; {} → {}",
                pruned.removed.len(),
                pruned.reencoded.len(),
                human(pruned.bytes_before),
                human(pruned.bytes_after)
            );
        }
    }
    Ok(())
}
