//! The `tpde` command: encode checkpoints to deltas, apply, inspect and verify them.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, Parser, Subcommand};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tpde::{EncodeOptions, EncodeSettings, Progress};
use tpde_store::{open_delta_at, url_of, OpenedCheckpoint};

mod series;

const EXAMPLES: &str = "\
Examples:
  tpde encode base.safetensors finetune.safetensors -o finetune.tpde
  tpde encode base-dir/ step-1000-dir/ -o step-1000.tpde      (sharded checkpoints)
  tpde encode model.safetensors -o model.tpde                 (standalone, no base)
  tpde apply base.safetensors finetune.tpde -o rebuilt.safetensors
  tpde inspect finetune.tpde --json
  tpde verify base.safetensors finetune.tpde --target finetune.safetensors
  tpde apply s3://bucket/base.safetensors s3://bucket/ft.tpde -o s3://bucket/ft.safetensors
  tpde series add run/ step-100.safetensors --step 100          (a training run as one series)";

/// Lossless checkpoint deltas for safetensors models.
/// Inputs and outputs may be `s3://`, `gs://`, `az://` or `http(s)://` URLs.
#[derive(Parser)]
#[command(version, about, after_help = EXAMPLES)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Args)]
struct Threads {
    /// Worker threads, at most 4 per core (default: one per core).
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
        /// Store a stream compressed only when compression saves at least this
        /// fraction of it (0 to 1). Raising it trades size for decoding that is
        /// mostly copying.
        #[arg(long = "min-gain", alias = "min-zstd-gain", default_value_t = 0.0, value_name = "FRACTION")]
        min_zstd_gain: f64,
        /// The newest format version the delta may need. 1.4 packs the lane rANS
        /// tables; 1.3 also stores a stream of one repeated byte as that byte; 1.1
        /// uses the lane rANS codec, which is smaller than zstd and decodes on a GPU;
        /// 1.0 uses zstd only. The file records the lowest version that its contents
        /// need.
        #[arg(long, default_value = tpde::WRITABLE_FORMAT_VERSIONS[0], value_parser = tpde::WRITABLE_FORMAT_VERSIONS)]
        format_version: String,
        /// Never use zstd: every stream is lane rANS, constant or stored, so that a
        /// GPU loader decodes the whole delta itself, for a slightly larger delta
        /// where zstd would have stored a repetitive stream smaller.
        #[arg(long)]
        no_zstd: bool,
        /// Words per chunk: the unit of parallelism and random access.
        #[arg(long, default_value_t = tpde::DEFAULT_CHUNK_WORDS)]
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
        /// Sync OUT to storage before renaming it into place. Off by default, since
        /// the target can be rebuilt from the delta; the rename is atomic either way.
        #[arg(long)]
        sync: bool,
        /// Rebuild only the tensors whose names match PATTERN (`*`, `?`, `[...]`;
        /// repeat it for more), into one safetensors file at OUT, even for a
        /// sharded target. The other tensors, and their base tensors, are not read.
        #[arg(long = "tensors", value_name = "PATTERN")]
        tensors: Vec<String>,
        #[command(flatten)]
        threads: Threads,
    },
    /// Show per-tensor encodings, sizes and change fractions, after checking every
    /// chunk's checksum, streams and changed count (the rebuilt bytes need the base:
    /// `verify` proves them). For a delta at a URL, only the structure is checked
    /// unless `--check-chunks` is given, so that only the metadata is fetched.
    Inspect {
        /// The delta file, or its URL.
        delta: PathBuf,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        /// Check the structure only (preamble, header, chunk map), reading no chunk.
        #[arg(long, conflicts_with = "check_chunks")]
        structure_only: bool,
        /// Check every chunk too, for a delta at a URL (which then fetches it whole).
        #[arg(long)]
        check_chunks: bool,
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
    /// Keep a training run as one series of keyframes and deltas; rebuild any step.
    #[command(subcommand, after_help = series::EXAMPLES)]
    Series(series::SeriesCommand),
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

/// Refuses an output that is, holds or lies inside an input: inputs are never
/// modified.
fn check_not_an_input(output: &Path, inputs: &[PathBuf]) -> tpde::Result<()> {
    let inputs: Vec<&Path> = inputs.iter().map(PathBuf::as_path).collect();
    tpde::check_not_an_input(output, &inputs)
}

/// Checks OUT before any work, and clears what killed runs left beside it.
fn prepare_output(output: &Path, inputs: &[PathBuf], force: bool) -> tpde::Result<()> {
    check_not_an_input(output, inputs)?;
    tpde::check_free(output, force)?;
    let parent = match output.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    for leftover in tpde::remove_stale_temporaries(parent) {
        let path = leftover.path.display().to_string();
        let path = escape(&path);
        if leftover.removed {
            eprintln!("tpde: removed {path}, a partial output of an interrupted run (process {})", leftover.pid);
        } else {
            eprintln!(
                "tpde: kept {path}, left by an interrupted run (process {}): it holds files tpde did not write",
                leftover.pid
            );
        }
    }
    Ok(())
}

fn open_optional(path: Option<&Path>) -> tpde::Result<Option<OpenedCheckpoint>> {
    path.map(OpenedCheckpoint::open).transpose()
}

/// Where a command writes: OUT itself, or for a URL a local temporary that is
/// uploaded once complete.
struct Output(tpde_store::OutputAt);

impl Output {
    /// Checks OUT before any work (as [`prepare_output`] does for a path).
    fn prepare(output: &Path, inputs: &[PathBuf], force: bool) -> tpde::Result<Self> {
        if url_of(output).is_none() {
            prepare_output(output, inputs, force)?;
        } else if inputs.iter().any(|i| i.as_path() == output) {
            return Err(tpde::Error::new(
                tpde::ErrorCode::InvalidArgument,
                "the output is an input; inputs are never modified",
            )
            .in_file(output));
        }
        tpde_store::OutputAt::new(output, force).map(Self)
    }
}

impl Output {
    /// Uploads a remote output; nothing to do for a local one.
    fn finish(self) -> tpde::Result<()> {
        self.0.finish()
    }
}

impl std::ops::Deref for Output {
    type Target = tpde_store::OutputAt;
    fn deref(&self) -> &tpde_store::OutputAt {
        &self.0
    }
}

/// For runs that read from object stores, what they fetched.
fn report_fetched(paths: &[&Path]) {
    if paths.iter().any(|p| url_of(p).is_some()) {
        let stats = tpde_store::stats();
        eprintln!("fetched {} from object stores in {} requests", human(stats.bytes), stats.requests);
    }
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

/// Worker threads per core at most: beyond a few per core, threads only cost
/// memory (every thread holds chunk buffers) and start-up time.
const MAX_THREADS_PER_CORE: usize = 4;

fn set_threads(threads: &Threads) -> tpde::Result<()> {
    let Some(n) = threads.threads else { return Ok(()) };
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let max = cores.saturating_mul(MAX_THREADS_PER_CORE);
    if !(1..=max).contains(&n) {
        return Err(tpde::Error::new(
            tpde::ErrorCode::InvalidArgument,
            format!("--threads {n} is not in 1..={max} ({MAX_THREADS_PER_CORE} per core, {cores} cores)"),
        ));
    }
    // Fails only if a pool exists already, which cannot happen this early.
    let _ = rayon::ThreadPoolBuilder::new().num_threads(n).build_global();
    Ok(())
}

#[allow(clippy::cast_precision_loss)] // ratios for display
fn run(cli: Cli) -> tpde::Result<()> {
    match cli.command {
        Command::Encode {
            inputs,
            output,
            level,
            min_zstd_gain,
            format_version,
            no_zstd,
            chunk_words,
            force,
            threads,
        } => {
            set_threads(&threads)?;
            if no_zstd && format_version == "1.0" {
                return Err(tpde::Error::new(
                    tpde::ErrorCode::InvalidArgument,
                    "--no-zstd needs the lane rANS codec of format 1.1; format 1.0 has zstd alone",
                ));
            }
            let out = Output::prepare(&output, &inputs, force)?;
            let (base_path, target_path) = split_base(&inputs);
            let base = open_optional(base_path)?;
            let target = OpenedCheckpoint::open(target_path)?;
            let settings = EncodeSettings { level, min_zstd_gain, zstd: !no_zstd, ..EncodeSettings::default() }
                .within_format_version(&format_version)
                .expect("clap admits only writable versions");
            let options = EncodeOptions { settings, chunk_words };
            let base = base.as_deref();
            let summary = tpde::encode_to(base, &target, out.local(), options, out.force(force), &Bars::new())?;
            out.finish()?;
            eprintln!(
                "wrote {} ({} of {} target, {:.2}%; {} tensors against the base, {} standalone)",
                escape(&output.display().to_string()),
                human(summary.delta_bytes),
                human(summary.target_bytes),
                100.0 * summary.delta_bytes as f64 / summary.target_bytes.max(1) as f64,
                summary.delta_tensors,
                summary.standalone_tensors,
            );
        }
        Command::Apply { inputs, output, force, sync, tensors, threads } => {
            set_threads(&threads)?;
            let patterns = tensors
                .iter()
                .map(|p| {
                    glob::Pattern::new(p).map_err(|e| {
                        tpde::Error::new(tpde::ErrorCode::InvalidArgument, format!("--tensors {p:?}: {e}"))
                    })
                })
                .collect::<Result<Vec<_>, _>>()?;
            let out = Output::prepare(&output, &inputs, force)?;
            let (base_path, delta_path) = split_base(&inputs);
            let delta = open_delta_at(delta_path)?;
            let base = open_optional(base_path)?;
            let options = tpde::ApplyOptions { force: out.force(force), sync };
            let summary = if patterns.is_empty() {
                tpde::apply(&delta, base.as_deref(), out.local(), options, &Bars::new())?
            } else {
                let select = |name: &str| patterns.iter().any(|p| p.matches(name));
                let (base, _download) = base.map(OpenedCheckpoint::into_parts).unzip();
                tpde::apply_tensors(delta, base, out.local(), &select, options, &Bars::new())?
            };
            out.finish()?;
            report_fetched(&[delta_path]);
            eprintln!(
                "wrote {} ({} in {} file(s)), every digest matched",
                escape(&output.display().to_string()),
                human(summary.target_bytes),
                summary.files
            );
        }
        Command::Inspect { delta: delta_path, json, structure_only, check_chunks, threads } => {
            set_threads(&threads)?;
            let delta = open_delta_at(&delta_path)?;
            let report = if structure_only || (delta.is_ranged() && !check_chunks) {
                tpde::inspect_structure(&delta)?
            } else {
                tpde::inspect(&delta)?
            };
            report_fetched(&[&delta_path]);
            let stdout_failed =
                |e: std::io::Error| tpde::Error::io(Path::new("<stdout>"), "cannot print the report", e);
            let mut stdout = std::io::stdout().lock();
            if json {
                // Streamed: the report may hold a writer name as long as the header.
                serde_json::to_writer_pretty(&mut stdout, &report).map_err(|e| stdout_failed(e.into()))?;
                writeln!(stdout).map_err(stdout_failed)?;
            } else {
                stdout.write_all(render_report(&report).as_bytes()).map_err(stdout_failed)?;
            }
        }
        Command::Verify { inputs, target, threads } => {
            set_threads(&threads)?;
            let (base_path, delta_path) = split_base(&inputs);
            let delta = open_delta_at(delta_path)?;
            let base = open_optional(base_path)?;
            let target = open_optional(target.as_deref())?;
            tpde::verify(&delta, base.as_deref(), target.as_deref(), &Bars::new())?;
            report_fetched(&[delta_path]);
            let compared = if target.is_some() { ", and the rebuilt target is byte-identical to TARGET" } else { "" };
            println!("ok: every checksum and digest matched{compared}");
        }
        Command::Series(command) => series::run(command)?,
    }
    Ok(())
}

/// Every name in a file is untrusted: printed for people, it is escaped.
fn escape(text: &str) -> std::borrow::Cow<'_, str> {
    tpde::escape_for_terminal(text)
}

/// At most `max` characters of `text`, then how long it was: a name in a table need
/// not be whole (`--json` keeps it exact).
fn abbreviate(text: &str, max: usize) -> std::borrow::Cow<'_, str> {
    match text.char_indices().nth(max) {
        Some((cut, _)) => format!("{}… ({} bytes)", &text[..cut], text.len()).into(),
        None => text.into(),
    }
}

fn render_report(report: &tpde::Report<'_>) -> String {
    use std::fmt::Write;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "format {}, written by {}, {} target file(s), {}",
        escape(&report.format_version),
        escape(&abbreviate(report.writer, 200)),
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
            escape(&t.name),
            escape(&t.dtype),
            format!("{}/{}/{}/{}", c.unchanged, c.sparse, c.dense, c.raw),
            if t.delta { "delta" } else { "alone" },
            human(t.target_bytes),
            human(t.stored_bytes),
            100.0 * t.ratio,
            100.0 * t.changed_fraction,
        );
    }
    let _ = writeln!(
        out,
        "file size {}; {} in zstd streams, which a GPU loader decodes on the CPU",
        human(report.file_bytes),
        human(report.total.cpu_only_bytes)
    );
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

/// The signals that end a process unless handled, and that a process may catch.
/// SIGKILL cannot be caught: a run removes what a killed run left instead
/// ([`tpde::remove_stale_temporaries`]).
#[cfg(unix)]
const TERMINATING_SIGNALS: &[libc::c_int] = &[
    libc::SIGINT,
    libc::SIGTERM,
    libc::SIGHUP,
    libc::SIGQUIT,
    libc::SIGUSR1,
    libc::SIGUSR2,
    libc::SIGALRM,
    libc::SIGVTALRM,
    libc::SIGPROF,
    libc::SIGXCPU,
    libc::SIGXFSZ,
];

/// Whether the parent set `signal` to be ignored, as `nohup` does for SIGHUP.
#[cfg(unix)]
fn is_ignored(signal: libc::c_int) -> bool {
    // SAFETY: an all-zero `sigaction` is a valid value for the kernel to overwrite.
    let mut current: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: a null new action only reads the current one into `current`, which is
    // a valid, writable `sigaction`.
    let rc = unsafe { libc::sigaction(signal, std::ptr::null(), &raw mut current) };
    rc == 0 && current.sa_sigaction == libc::SIG_IGN
}

/// On any terminating signal, removes the outputs still being written, then ends the
/// process as the signal would have (so the parent sees which signal it was). A
/// signal that the parent set to be ignored stays ignored.
#[cfg(unix)]
fn remove_partial_outputs_on_signals() {
    let signals: Vec<libc::c_int> = TERMINATING_SIGNALS.iter().copied().filter(|&s| !is_ignored(s)).collect();
    // Registration fails only for a forbidden signal, which none of these is.
    let Ok(mut signals) = signal_hook::iterator::Signals::new(&signals) else { return };
    std::thread::spawn(move || {
        if let Some(signal) = signals.forever().next() {
            tpde::remove_pending_outputs();
            tpde_store::abort_uploads();
            tpde_store::remove_local_copies();
            let _ = signal_hook::low_level::emulate_default_handler(signal);
            std::process::exit(128 + signal);
        }
    });
}

#[cfg(not(unix))]
fn remove_partial_outputs_on_signals() {}

/// Keeps freed memory in the process for reuse. Chunks of megabytes come and go on
/// every thread, and glibc's malloc maps each block above its (adaptive) threshold
/// afresh and hands freed memory at the top of a heap back to the kernel: each
/// such page is faulted in and zeroed again by the next chunk. Blocks up to 32 MiB
/// (the most `M_MMAP_THRESHOLD` takes) now come from the heaps, which are trimmed
/// only past 1 GiB free. A run's footprint stays what it holds at its peak; on a
/// 45 MB BF16 fine-tune, an encode took 7.2 K page faults instead of 22 K, and 10%
/// less CPU time than with mimalloc, which faulted 14 K.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn keep_freed_memory() {
    // SAFETY: mallopt only sets malloc's parameters, from integers; this runs first
    // in `main`, before any thread is started. A value it refuses leaves glibc's
    // default, which is correct, only slower.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 1 << 30);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn keep_freed_memory() {}

/// Faults the heap in pages of 4 KiB, even where the system gives transparent huge
/// pages to every mapping. A huge page is zeroed whole on its first touch, 2 MiB at
/// once for the first byte of a buffer, where most of a chunk's buffers are written
/// once and only in part. On the benchmark machine (a VM), after other processes
/// had run, an encode of a 17 MB FP8 checkpoint spent 0.3-0.9 s of system time
/// zeroing huge pages, against 0.01-0.03 s without them.
#[cfg(target_os = "linux")]
fn fault_in_small_pages() {
    // SAFETY: prctl with PR_SET_THP_DISABLE reads only its integer arguments and
    // changes only this process's THP eligibility; a failure (older kernels)
    // leaves the default, which is correct, only slower.
    unsafe { libc::prctl(libc::PR_SET_THP_DISABLE, 1, 0, 0, 0) };
}

#[cfg(not(target_os = "linux"))]
fn fault_in_small_pages() {}

fn main() -> ExitCode {
    fault_in_small_pages();
    keep_freed_memory();
    let cli = Cli::parse();
    remove_partial_outputs_on_signals();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("tpde: {err}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::abbreviate;

    /// A writer name as long as a hostile header is shown shortened in the table.
    #[test]
    fn long_names_are_abbreviated_for_the_table() {
        let long = "é".repeat(100_000);
        let shown = abbreviate(&long, 200);
        assert_eq!(shown.chars().filter(|&c| c == 'é').count(), 200);
        assert!(shown.ends_with("… (200000 bytes)"), "{shown}");
        assert_eq!(abbreviate("tpde 0.1.0", 200), "tpde 0.1.0");
    }
}
