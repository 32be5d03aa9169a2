//! `tpde-bench`: generates a seeded corpus of checkpoint pairs, runs tpde and
//! the field's baselines on the same files, checks every round trip byte for
//! byte, and writes BENCHMARKS.md. `gen-case` writes one corpus case on its
//! own, `gen-llama` a Llama-3-8B-shaped pair for the GPU loading benchmark.
//! See tools/bench/README.md.

mod baselines;
mod bench;
mod checkpoint;
mod corpus;
mod dtype;
mod llama8b;
mod measure;
mod methods;
mod report;
mod series;
mod tpde_stats;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use anyhow::{bail, Context, Result};
use clap::{Parser, Subcommand};

use crate::baselines::Method;
use crate::bench::CaseResult;
use crate::corpus::{CasePaths, CaseSpec, ModelShape, CASES};
use crate::methods::{Family, Toolchain};

/// Benchmark tpde against the field's delta and checkpoint compressors.
#[derive(Parser)]
#[command(version, args_conflicts_with_subcommands = true)]
struct Cli {
    /// Report to write (Markdown).
    #[arg(long, default_value = "BENCHMARKS.md")]
    out: PathBuf,
    /// Scratch directory for the corpus and outputs (never the repository).
    #[arg(long, default_value = "/tmp/tpde-bench")]
    work_dir: PathBuf,
    /// Grow the model's layers and vocabulary by this factor.
    #[arg(long, default_value_t = 1.0)]
    scale: f64,
    /// Tiny models, for smoke testing the harness.
    #[arg(long)]
    quick: bool,
    /// Corpus seed.
    #[arg(long, default_value_t = 20_250_705)]
    seed: u64,
    /// The tpde binary [default: $CARGO_TARGET_DIR/release/tpde, else target/release/tpde].
    #[arg(long)]
    tpde: Option<PathBuf>,
    /// `--level` for the max-level tpde row.
    #[arg(long, default_value_t = 19)]
    tpde_max_level: i32,
    /// Threads for every tool that takes a thread count [default: all cores].
    #[arg(long)]
    threads: Option<usize>,
    /// Only these cases (comma-separated names).
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Skip the slow zstd -19 / xdelta3 -9 rows.
    #[arg(long)]
    no_max_levels: bool,
    /// Skip the Python baselines (zipnn, lmzip).
    #[arg(long)]
    no_python: bool,
    /// Skip the 4x model of the memory-flatness check.
    #[arg(long)]
    no_memory_probe: bool,

    #[command(subcommand)]
    command: Option<Sub>,
}

/// Generators, and the in-process baselines (hidden), which run as child
/// processes so they are measured like the external tools.
#[derive(Subcommand)]
enum Sub {
    /// Write one corpus case (base and target) into OUT/CASE.
    GenCase {
        /// The case, e.g. minilm-finetune-bf16.
        #[arg(long)]
        case: String,
        /// Directory that receives the case's folder.
        #[arg(long)]
        out: PathBuf,
        /// Corpus seed.
        #[arg(long, default_value_t = 20_250_705)]
        seed: u64,
        /// The run's model scale (Llama cases: layers and vocabulary).
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// The quick run's tiny shapes.
        #[arg(long)]
        quick: bool,
        /// Threads [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Write a Llama-3-8B-shaped BF16 pair (base and dense fine-tune, ~16 GB
    /// each) into OUT/base and OUT/target, with bounded memory.
    GenLlama {
        /// Directory that receives the pair.
        #[arg(long)]
        out: PathBuf,
        /// Seed of the pair.
        #[arg(long, default_value_t = 20_250_705)]
        seed: u64,
        /// Multiply every width (head dim, intermediate, vocabulary) by this,
        /// e.g. 0.0625 for a test of a few MB.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        /// Decoder layers.
        #[arg(long, default_value_t = 32)]
        layers: usize,
        /// Largest shard in bytes of tensor data (Hugging Face's "5GB").
        #[arg(long, default_value_t = llama8b::DEFAULT_SHARD_BYTES)]
        shard_bytes: u64,
        /// Write OUT/base.safetensors and OUT/target.safetensors instead of shards.
        #[arg(long)]
        single_file: bool,
        /// Replace an existing pair.
        #[arg(long)]
        force: bool,
        /// Threads [default: all cores].
        #[arg(long)]
        threads: Option<usize>,
    },
    /// Add seeded training runs to tpde series step by step and compare their size
    /// with consecutive deltas, TRL's anchors and PULSE's patches; writes a markdown
    /// section.
    Series {
        /// The `tpde` binary.
        #[arg(long, default_value = "target/release/tpde")]
        tpde: PathBuf,
        /// Scratch directory for the runs.
        #[arg(long, default_value = "/tmp/tpde-bench-series")]
        work: PathBuf,
        /// The report to write.
        #[arg(long)]
        out: PathBuf,
        /// Model size multiplier.
        #[arg(long, default_value_t = 1.0)]
        scale: f64,
        #[arg(long, default_value_t = 20_251_130)]
        seed: u64,
        /// `--max-chain` of the series, and the baselines' anchor period minus one.
        #[arg(long, default_value_t = 10)]
        max_chain: usize,
        /// Only these runs (default: all).
        #[arg(long, value_delimiter = ',')]
        cases: Vec<String>,
    },
    #[command(hide = true)]
    InternalEncode {
        #[arg(long, value_enum)]
        method: Method,
        #[arg(long, default_value_t = 3)]
        level: i32,
        #[arg(long, default_value_t = 1)]
        threads: usize,
        base: PathBuf,
        target: PathBuf,
        out: PathBuf,
    },
    #[command(hide = true)]
    InternalDecode {
        #[arg(long, default_value_t = 1)]
        threads: usize,
        base: PathBuf,
        delta: PathBuf,
        out: PathBuf,
    },
}

fn main() -> Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Some(Sub::InternalEncode { method, level, threads, base, target, out }) => {
            init_pool(threads)?;
            let stats = baselines::encode_checkpoint(method, level, &base, &target, &out)?;
            bench::write_stats(&out, &stats)
        }
        Some(Sub::InternalDecode { threads, base, delta, out }) => {
            init_pool(threads)?;
            baselines::decode_checkpoint(&base, &delta, &out)
        }
        Some(Sub::GenCase { case, out, seed, scale, quick, threads }) => {
            init_pool(threads.unwrap_or_else(all_cores))?;
            gen_case(&case, &out, seed, scale, quick)
        }
        Some(Sub::GenLlama { out, seed, scale, layers, shard_bytes, single_file, force, threads }) => {
            init_pool(threads.unwrap_or_else(all_cores))?;
            if !(scale > 0.0 && scale <= 1.0) {
                bail!("--scale must be in (0, 1]");
            }
            let shape = if (scale - 1.0).abs() < f64::EPSILON {
                ModelShape { layers, ..ModelShape::llama3_8b() }
            } else {
                ModelShape::llama3_8b_scaled(scale, layers)
            };
            let w = llama8b::generate(&llama8b::Options { out, seed, shape, shard_bytes, single_file, force })?;
            println!("base {}", w.base.display());
            println!("target {}", w.target.display());
            println!("tensor bytes {} per checkpoint, {} file(s) each", w.tensor_bytes, w.files);
            Ok(())
        }
        Some(Sub::Series { tpde, work, out, scale, seed, max_chain, cases }) => {
            series::run(&series::Options { tpde, work, out, scale, seed, max_chain, cases })
        }
        None => run(&cli),
    }
}

fn all_cores() -> usize {
    std::thread::available_parallelism().map_or(2, usize::from)
}

/// Writes one corpus case into `out/<case>` (the harness's layout and cache
/// stamp) and prints its base and target paths.
fn gen_case(name: &str, out: &Path, seed: u64, scale: f64, quick: bool) -> Result<()> {
    let Some(case) = CaseSpec::named(name) else {
        let names: Vec<_> = CASES.iter().map(|c| c.name).collect();
        bail!("no case {name:?}; the cases are {}", names.join(", "));
    };
    let dir = out.join(case.name);
    // The corpus replaces a stale case folder whole: only ever one it wrote.
    if dir.exists() && !dir.join("corpus.stamp").exists() {
        bail!("{} exists and is not a corpus case folder", dir.display());
    }
    let shape = if quick { ModelShape::quick() } else { ModelShape::default_scaled(scale) };
    let paths = corpus::ensure_case(&dir, case, &shape, seed)?;
    println!("base {}", paths.base.display());
    println!("target {}", paths.target.display());
    Ok(())
}

fn init_pool(threads: usize) -> Result<()> {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build_global().context("thread pool")
}

fn run(cli: &Cli) -> Result<()> {
    let started = Instant::now();
    let load_at_start = report::load_average();
    let threads = cli.threads.unwrap_or_else(all_cores);
    init_pool(threads)?;
    if cli.work_dir.starts_with(repo_root()) {
        bail!("--work-dir must be outside the repository");
    }
    std::fs::create_dir_all(&cli.work_dir)?;
    let shape = if cli.quick { ModelShape::quick() } else { ModelShape::default_scaled(cli.scale) };
    let toolchain = toolchain(cli, threads)?;
    if let Err(why) = &toolchain.tpde {
        eprintln!("note: tpde rows skipped: {why}");
    }

    let selected: Vec<_> = CASES
        .iter()
        .filter(|c| cli.cases.is_empty() || cli.cases.iter().any(|n| n == c.name))
        .filter(|c| !(c.is_memory_probe() && cli.no_memory_probe))
        .collect();
    let mut results = Vec::new();
    let mut probe = None;
    for case in selected {
        let dir = cli.work_dir.join(case.name);
        let t0 = Instant::now();
        let paths = corpus::ensure_case(&dir, case, &shape, cli.seed)?;
        let case_shape = case.shape(&shape);
        eprintln!(
            "[{:>5.0}s] {}: corpus ready ({:.1}s)",
            started.elapsed().as_secs_f64(),
            case.name,
            t0.elapsed().as_secs_f64()
        );
        let flat = if case.sharded() {
            CasePaths {
                base: bench::concatenate(&paths.base, &dir.join("base.cat"))?,
                target: bench::concatenate(&paths.target, &dir.join("target.cat"))?,
            }
        } else {
            paths.clone()
        };
        let scratch = dir.join("out");
        std::fs::create_dir_all(&scratch)?;
        let base_len = checkpoint::checkpoint_size(&paths.base)?;
        let zipnn_dtype = bench::zipnn_dtype(&paths.target)?;
        let mut rows = methods::methods(&toolchain, base_len, zipnn_dtype);
        if case.is_memory_probe() {
            // The large model only answers the memory question: tpde plus
            // one external and one in-process reference.
            rows.retain(|m| {
                (m.is_tpde && m.family == Family::Delta && !m.name.contains("--level"))
                    || m.name.starts_with("zstd -3 -T")
                    || m.name == "BitX (zstd -3)"
            });
        }
        let change = bench::count_changes(&paths.base, &paths.target)?;
        let mut row_results = Vec::new();
        for m in &rows {
            let t = Instant::now();
            let r = bench::run_method(m, &paths, &flat, &scratch);
            eprintln!(
                "[{:>5.0}s] {}: {} ({:.1}s){}",
                started.elapsed().as_secs_f64(),
                case.name,
                m.name,
                t.elapsed().as_secs_f64(),
                match &r.outcome {
                    bench::Outcome::Ok { bytes, .. } => format!(" -> {bytes} bytes"),
                    bench::Outcome::Unavailable(_) => " skipped".into(),
                    bench::Outcome::Failed(e) => format!(" FAILED: {e}"),
                }
            );
            row_results.push(r);
        }
        let result = CaseResult {
            spec: *case,
            params: case_shape.params(),
            target_bytes: checkpoint::checkpoint_size(&paths.target)?,
            change,
            rows: row_results,
        };
        if case.is_memory_probe() {
            probe = Some(result);
        } else {
            results.push(result);
        }
    }

    let info = report::RunInfo {
        command: regenerate_command(cli),
        seed: cli.seed,
        model: format!(
            "Llama-like, hidden {}, intermediate {}, {} layers, vocab {} ({} parameters; the 4× probe scales layers and vocab)",
            shape.hidden,
            shape.intermediate,
            shape.layers,
            shape.vocab,
            shape.params()
        ),
        threads,
        load_at_start,
        versions: versions(&toolchain),
    };
    let text = report::render(&info, &results, probe.as_ref());
    std::fs::write(&cli.out, text).with_context(|| format!("write {}", cli.out.display()))?;
    eprintln!("wrote {} in {:.0}s", cli.out.display(), started.elapsed().as_secs_f64());
    Ok(())
}

fn repo_root() -> PathBuf {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    std::fs::canonicalize(&root).unwrap_or(root)
}

fn toolchain(cli: &Cli, threads: usize) -> Result<Toolchain> {
    let tpde_path = cli.tpde.clone().unwrap_or_else(|| {
        std::env::var_os("CARGO_TARGET_DIR")
            .map_or_else(|| repo_root().join("target"), PathBuf::from)
            .join("release/tpde")
    });
    let zipnn_script = cli.work_dir.join("zipnn_driver.py");
    std::fs::write(&zipnn_script, include_str!("../zipnn_driver.py"))?;
    let python_off = || Err("--no-python given".to_string());
    Ok(Toolchain {
        tpde: check_tpde(&tpde_path),
        tpde_max_level: cli.tpde_max_level,
        threads,
        self_exe: std::env::current_exe().context("locate this binary")?,
        zipnn: if cli.no_python {
            python_off()
        } else {
            probe_ok("python3", &["-c", "import zipnn"]).map(|()| PathBuf::from("python3"))
        },
        lmz: if cli.no_python { python_off() } else { probe_ok("lmz", &["--version"]).map(|()| PathBuf::from("lmz")) },
        max_levels: !cli.no_max_levels,
        zipnn_script,
    })
}

/// tpde is usable when `tpde --version` answers; the CLI may still be a stub.
fn check_tpde(path: &Path) -> Result<PathBuf, String> {
    if !path.exists() {
        return Err(format!(
            "no tpde binary at {} (build it with `cargo build --release -p tpde-cli`, or pass --tpde)",
            path.display()
        ));
    }
    match Command::new(path).arg("--version").output() {
        Ok(o) if o.status.success() && !o.stdout.is_empty() => Ok(path.to_path_buf()),
        Ok(_) => Err(format!("{} does not answer --version (CLI not implemented yet)", path.display())),
        Err(e) => Err(format!("{}: {e}", path.display())),
    }
}

fn probe_ok(program: &str, args: &[&str]) -> Result<(), String> {
    match Command::new(program).args(args).output() {
        Ok(o) if o.status.success() => Ok(()),
        Ok(o) => Err(format!(
            "`{program} {}` failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
        )),
        Err(e) => Err(format!("{program} not found ({e})")),
    }
}

fn versions(tc: &Toolchain) -> Vec<(String, String)> {
    let mut v = vec![
        ("zstd".to_string(), report::version_of("zstd", &["--version"])),
        ("xdelta3".to_string(), report::version_of("xdelta3", &["-V"])),
        ("rustc".to_string(), report::version_of("rustc", &["--version"])),
        (
            "tpde".to_string(),
            match &tc.tpde {
                Ok(p) => report::version_of(&p.to_string_lossy(), &["--version"]),
                Err(why) => format!("not available: {why}"),
            },
        ),
    ];
    let pyver = |pkg: &str| {
        report::version_of(
            "python3",
            &["-c", &format!("import importlib.metadata as m; print('{pkg}', m.version('{pkg}'))")],
        )
    };
    v.push((
        "zipnn".into(),
        match &tc.zipnn {
            Ok(_) => pyver("zipnn"),
            Err(e) => format!("not available: {e}"),
        },
    ));
    v.push((
        "lmzip".into(),
        match &tc.lmz {
            Ok(_) => report::version_of("lmz", &["--version"]),
            Err(e) => format!("not available: {e}"),
        },
    ));
    v
}

fn regenerate_command(cli: &Cli) -> String {
    let mut extra = String::new();
    if cli.quick {
        extra.push_str(" --quick");
    }
    if (cli.scale - 1.0).abs() > f64::EPSILON {
        extra.push_str(&format!(" --scale {}", cli.scale));
    }
    if cli.no_max_levels {
        extra.push_str(" --no-max-levels");
    }
    if !cli.cases.is_empty() {
        extra.push_str(&format!(" --cases {}", cli.cases.join(",")));
    }
    format!("bash tools/bench/run.sh{extra}")
}
