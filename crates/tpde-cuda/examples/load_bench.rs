//! Whole-delta GPU loading of a real checkpoint pair, against a pinned upload
//! of the target measured in the same run on the same card.
//!
//! `cargo build --release --example load_bench -p tpde-cuda`, then on a GPU
//! machine, with `DELTA` written by `tpde encode BASE TARGET -o DELTA`:
//!
//! ```text
//! load_bench BASE TARGET DELTA [--reps N] [--in-place] [--no-digests] [--slots N] [--slot-mib N]
//! ```
//!
//! `BASE` and `TARGET` are `.safetensors` files or sharded checkpoint
//! directories. Not timed: the base is checked by the format library and
//! uploaded to the device, the delta is read into page-locked memory
//! ([`PinnedDelta`]) and its chunk checksums are verified once, and the
//! target's tensors are copied into one page-locked buffer. Timed, median of
//! `--reps` runs (5) after one warm-up:
//!
//! - (a) the pinned host-to-device upload of every target tensor into its
//!   own device buffer: the bus, the baseline;
//! - (b) [`Loader::load`] of the whole delta onto the resident base, into
//!   new device buffers;
//! - (c) with `--in-place`, [`Loader::apply_in_place`] over device copies of
//!   the base (restored between runs, not timed);
//! - (d) the whole call as a caller with only the file's path makes it (and as
//!   `tpde.torch.load` does): [`DeltaFile::open`] memory-maps the delta, and
//!   [`Loader::load_model`] verifies its checksums and rebuilds it onto the
//!   resident base tensors, found by name. Its parts go to stderr.
//!
//! The first (b) and (c) results are downloaded once and compared byte for
//! byte with the target file's tensors. Prints a markdown table with the
//! delta ratio (delta bytes / target bytes), (b)/(a), and the goal speedup
//! 0.8 / (delta ratio), that is 80% of what moving only the delta's bytes
//! would give. Exits 0 with "skipped: no GPU" where there is no CUDA
//! driver or device, and 1 when a result is not bit-exact.
#![allow(clippy::cast_precision_loss)]

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Instant;

use rayon::prelude::*;
use tpde::{Checkpoint, DeltaFile};
use tpde_cuda::{
    cudarc::driver::result as cu, cudarc::driver::CudaSlice, host_bases, tensor_refs, Base, DevRange, Gpu, GpuError,
    Loader, LoaderConfig, PinnedDelta, ResidentTensor, TensorRef,
};

mod common;
use common::{median, time};

/// The example's error type.
type R<T> = Result<T, Box<dyn std::error::Error>>;

const USAGE: &str =
    "usage: load_bench BASE TARGET DELTA [--reps N] [--in-place] [--no-digests] [--slots N] [--slot-mib N]";

struct Args {
    base: PathBuf,
    target: PathBuf,
    delta: PathBuf,
    reps: usize,
    in_place: bool,
    verify_digests: bool,
    slots: Option<usize>,
    slot_mib: Option<usize>,
}

fn parse_args() -> Result<Args, String> {
    let mut paths = Vec::new();
    let (mut reps, mut in_place, mut verify_digests) = (5usize, false, true);
    let (mut slots, mut slot_mib) = (None, None);
    let count = |it: &mut dyn Iterator<Item = String>, what: &str| {
        it.next().and_then(|n| n.parse().ok()).filter(|&n| n > 0).ok_or(format!("{what} takes a count ≥ 1"))
    };
    let mut it = std::env::args().skip(1);
    while let Some(a) = it.next() {
        match a.as_str() {
            "--reps" => {
                reps = count(&mut it, "--reps")?;
            }
            "--in-place" => in_place = true,
            "--no-digests" => verify_digests = false,
            "--slots" => slots = Some(count(&mut it, "--slots")?),
            "--slot-mib" => slot_mib = Some(count(&mut it, "--slot-mib")?),
            "-h" | "--help" => return Err(String::new()),
            _ if a.starts_with("--") => return Err(format!("unknown option {a}")),
            _ => paths.push(PathBuf::from(a)),
        }
    }
    let [base, target, delta]: [PathBuf; 3] =
        paths.try_into().map_err(|_| "expected three paths: BASE TARGET DELTA".to_string())?;
    Ok(Args { base, target, delta, reps, in_place, verify_digests, slots, slot_mib })
}

fn main() -> ExitCode {
    let args = match parse_args() {
        Ok(a) => a,
        Err(why) => {
            if !why.is_empty() {
                eprintln!("load_bench: {why}");
            }
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let gpu = match Gpu::new(0) {
        Ok(g) => Arc::new(g),
        Err(e @ (GpuError::NoDriver | GpuError::NoDevice { .. })) => {
            println!("skipped: no GPU ({e})");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("load_bench: cannot start the GPU: {e}");
            return ExitCode::FAILURE;
        }
    };
    match run(&gpu, &args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("load_bench: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Names of the rebuilt tensors whose bytes differ from the target's.
fn mismatches(gpu: &Gpu, refs: &[TensorRef<'_>], got: &[CudaSlice<u8>], want: &[&[u8]]) -> R<Vec<String>> {
    let mut bad = Vec::new();
    for ((t, g), w) in refs.iter().zip(got).zip(want) {
        let mut bytes = gpu.download(g)?;
        bytes.truncate(t.bytes());
        if bytes != *w {
            bad.push(t.name.clone());
        }
    }
    Ok(bad)
}

fn gb(bytes: usize) -> String {
    format!("{bytes} ({:.2} GB)", bytes as f64 / 1e9)
}

/// (a): every target tensor from one page-locked buffer into its own
/// device buffer, median seconds.
fn time_upload(gpu: &Gpu, want: &[&[u8]], reps: usize) -> R<f64> {
    let total: usize = want.iter().map(|w| w.len()).sum();
    // SAFETY: every byte is written below before any use.
    let mut host = unsafe { gpu.context().alloc_pinned_with_flags::<u8>(total.max(1), 0) }?;
    {
        let mut rest = host.as_mut_slice()?;
        let mut parts = Vec::with_capacity(want.len());
        for w in want {
            let (part, tail) = rest.split_at_mut(w.len());
            parts.push(part);
            rest = tail;
        }
        parts.into_par_iter().zip(want.par_iter()).for_each(|(d, s)| d.copy_from_slice(s));
    }
    let stream = gpu.stream().clone();
    let dev = want.iter().map(|w| gpu.alloc_zeros::<u8>(w.len())).collect::<Result<Vec<_>, _>>()?;
    let ranges = dev.iter().map(|d| DevRange::all(d, &stream)).collect::<Result<Vec<_>, _>>()?;
    let src = host.as_slice()?;
    time(reps, || {
        let mut at = 0;
        for (r, w) in ranges.iter().zip(want) {
            let n = w.len();
            if n > 0 {
                // SAFETY: `r` is a live device buffer of at least `n` bytes
                // and `src[at..at + n]` page-locked memory that nothing
                // writes while the copy runs (we wait for it).
                unsafe { cu::memcpy_htod_async(r.ptr(), &src[at..at + n], stream.cu_stream()) }?;
            }
            at += n;
        }
        stream.synchronize()?;
        Ok(())
    })
}

/// Device copies of the base, one per delta tensor at the target's size
/// (zero past the base's end), as `apply_in_place` takes them.
struct InPlace<'a> {
    bufs: Vec<CudaSlice<u8>>,
    bases: &'a [CudaSlice<u8>],
    base_lens: Vec<usize>,
}

impl InPlace<'_> {
    /// Writes the base into every buffer again (not timed).
    fn restore(&self, gpu: &Gpu) -> R<()> {
        let stream = gpu.stream();
        for ((b, d), &n) in self.bufs.iter().zip(self.bases).zip(&self.base_lens) {
            let dst = DevRange::all(b, stream)?;
            let n = n.min(dst.len());
            if n > 0 {
                let src = DevRange::of(d, stream, 0, n)?;
                // SAFETY: distinct live buffers, both at least `n` bytes.
                unsafe { cu::memcpy_dtod_async(dst.ptr(), src.ptr(), n, stream.cu_stream()) }?;
            }
            if n < dst.len() {
                let tail = dst.sub(n, dst.len() - n)?;
                // SAFETY: `tail` lies within the live buffer `b`.
                unsafe { cu::memset_d8_async(tail.ptr(), 0, tail.len(), stream.cu_stream()) }?;
            }
        }
        stream.synchronize()?;
        Ok(())
    }
}

/// (c): median seconds of `apply_in_place` over restored copies of the
/// base, and whether its first result is bit-exact.
fn time_in_place(
    loader: &mut Loader,
    refs: &[TensorRef<'_>],
    bases: &[CudaSlice<u8>],
    base_lens: Vec<usize>,
    want: &[&[u8]],
    runs: usize,
) -> R<(f64, bool)> {
    let gpu = loader.gpu().clone();
    let bufs = refs.iter().map(|t| gpu.alloc_zeros::<u8>(t.bytes())).collect::<Result<Vec<_>, _>>()?;
    let mut copies = InPlace { bufs, bases, base_lens };
    let mut samples = Vec::with_capacity(runs);
    let mut exact = true;
    for run in 0..=runs {
        copies.restore(&gpu)?;
        let t = Instant::now();
        loader.apply_in_place(refs, &mut copies.bufs)?;
        let secs = t.elapsed().as_secs_f64();
        if run == 0 {
            // The warm-up run is the one checked.
            let bad = mismatches(&gpu, refs, &copies.bufs, want)?;
            if !bad.is_empty() {
                exact = false;
                eprintln!("apply_in_place: {} tensor(s) differ from the target, first {:?}", bad.len(), bad[0]);
            }
        } else {
            samples.push(secs);
        }
    }
    Ok((median(samples), exact))
}

/// What the report prints.
struct Report<'a> {
    args: &'a Args,
    cfg: LoaderConfig,
    tensors: usize,
    target_bytes: usize,
    delta_bytes: usize,
    exact: bool,
    upload: f64,
    load: f64,
    in_place: Option<f64>,
    mapped: f64,
}

fn print_report(gpu: &Gpu, r: &Report<'_>) {
    let ratio = r.delta_bytes as f64 / r.target_bytes.max(1) as f64;
    let goal = 0.8 / ratio;
    println!(
        "load_bench on {} ({} CPU threads; loader: {} slots of {} MiB, device digests {})\n",
        gpu.name(),
        rayon::current_num_threads(),
        r.cfg.slots,
        r.cfg.slot_bytes >> 20,
        if r.cfg.verify_digests { "on" } else { "off" }
    );
    println!("| | |\n|---|---|");
    println!("| base | {} |", r.args.base.display());
    println!("| target | {} ({} tensors) |", r.args.target.display(), r.tensors);
    println!("| delta | {} |", r.args.delta.display());
    println!("| target tensor bytes | {} |", gb(r.target_bytes));
    println!("| delta bytes | {} |", gb(r.delta_bytes));
    println!("| delta ratio (delta / target) | {ratio:.4} |");
    println!("| goal speedup over (a), 0.8 / delta ratio | {goal:.2}× (time ratio ≤ {:.3}) |", 1.0 / goal);
    println!(
        "| bit-exact | {} |",
        if r.exact { "yes: every tensor of (b) and (c) equals the target's bytes" } else { "NO (see stderr)" }
    );
    println!();
    println!(
        "| measurement (median of {}) | time | target GB/s | time / (a) | speedup over (a) | goal met |",
        r.args.reps
    );
    println!("|---|---|---|---|---|---|");
    let row = |what: &str, secs: f64, judged: bool| {
        let met = match (judged, r.upload / secs >= goal) {
            (false, _) => "—",
            (true, true) => "yes",
            (true, false) => "no",
        };
        println!(
            "| {what} | {:.2} ms | {:.1} | {:.3} | {:.2}× | {met} |",
            secs * 1e3,
            r.target_bytes as f64 / secs / 1e9,
            secs / r.upload,
            r.upload / secs,
        );
    };
    row("(a) pinned host-to-device upload of the target's tensors", r.upload, false);
    row("(b) `Loader::load`: pinned delta onto the resident base", r.load, true);
    if let Some(secs) = r.in_place {
        row("(c) `Loader::apply_in_place`: pinned delta over a copy of the base", secs, true);
    }
    row("(d) `DeltaFile::open` + `Loader::load_model`: mapped delta onto resident tensors by name", r.mapped, true);
}

/// (d): median seconds of the whole call from the delta's path onto resident
/// base tensors, and, on stderr, the medians of its parts.
fn time_mapped(loader: &mut Loader, path: &std::path::Path, bases: &[CudaSlice<u8>], lens: &[usize]) -> R<f64> {
    let file = DeltaFile::open(path)?;
    let resident = file
        .header()
        .tensors
        .iter()
        .zip(bases.iter().zip(lens))
        .map(|(t, (buffer, &bytes))| {
            Ok(ResidentTensor {
                name: &t.name,
                dtype: t.dtype()?,
                shape: t.base.as_ref().map_or(&t.shape[..], |b| &b.shape[..]),
                buffer,
                bytes,
            })
        })
        .collect::<tpde::Result<Vec<_>>>()?;
    let reps = 5;
    let open = time(reps, || {
        DeltaFile::open(path)?;
        Ok(())
    })?;
    let checksums = time(reps, || {
        tensor_refs(&file, true)?;
        Ok(())
    })?;
    let whole = time(reps, || {
        let file = DeltaFile::open(path)?;
        loader.load_model(&file, Base::Resident(&resident))?;
        Ok(())
    })?;
    eprintln!(
        "(d) parts: open {:.2} ms, checksums (tensor_refs) {:.2} ms, whole {:.2} ms",
        open * 1e3,
        checksums * 1e3,
        whole * 1e3
    );
    eprintln!("(d) host, last run: {}", loader.last_timings());
    Ok(whole)
}

/// Runs the benchmark; `Ok(false)` when a result is not bit-exact.
fn run(gpu: &Arc<Gpu>, args: &Args) -> R<bool> {
    let setup = Instant::now();
    let base = Checkpoint::open(&args.base)?;
    let target = Checkpoint::open(&args.target)?;
    let pinned = PinnedDelta::open(gpu, &args.delta)?;
    // The base is checked (names, dtypes, shapes, digests) before anything
    // reaches the device.
    let host = host_bases(pinned.file(), Some(&base))?;
    let refs = pinned.tensor_refs(true)?;
    let mut want: Vec<&[u8]> = Vec::with_capacity(refs.len());
    for t in &refs {
        let (f, loc) = target.tensor(&t.name).ok_or_else(|| format!("the target lacks tensor {:?}", t.name))?;
        let bytes = f.tensor_bytes(loc);
        if bytes.len() != t.bytes() {
            let why = format!("tensor {:?}: {} bytes in the target, {} in the delta", t.name, bytes.len(), t.bytes());
            return Err(why.into());
        }
        want.push(bytes);
    }
    let target_tensors: usize = target.files.iter().map(|f| f.tensors.len()).sum();
    if target_tensors != refs.len() {
        return Err(format!("the target has {target_tensors} tensors, the delta {}", refs.len()).into());
    }
    let dbases = host
        .iter()
        .map(|b| if b.is_empty() { gpu.alloc_zeros::<u8>(1) } else { gpu.upload(b) })
        .collect::<Result<Vec<_>, _>>()?;
    let dref: Vec<&CudaSlice<u8>> = dbases.iter().collect();
    eprintln!("setup (open, pin the delta, check and upload the base): {:.1} s", setup.elapsed().as_secs_f64());

    let upload = time_upload(gpu, &want, args.reps)?;

    let default = LoaderConfig::default();
    let cfg = LoaderConfig {
        verify_digests: args.verify_digests,
        slots: args.slots.unwrap_or(default.slots),
        slot_bytes: args.slot_mib.map_or(default.slot_bytes, |m| m << 20),
        ..default
    };
    let clock = Instant::now();
    let mut loader = Loader::new(gpu.clone(), cfg)?;
    let new_secs = clock.elapsed().as_secs_f64();
    let staged_new = loader.staging_bytes();
    let clock = Instant::now();
    let outs = loader.load(&refs, &dref)?;
    eprintln!(
        "loader: new {:.1} ms ({} MiB page-locked), first load {:.1} ms ({} MiB page-locked after it)",
        new_secs * 1e3,
        staged_new >> 20,
        clock.elapsed().as_secs_f64() * 1e3,
        loader.staging_bytes() >> 20
    );
    let bad = mismatches(gpu, &refs, &outs, &want)?;
    drop(outs);
    let mut exact = bad.is_empty();
    if !exact {
        eprintln!("load: {} tensor(s) differ from the target, first {:?}", bad.len(), bad[0]);
    }
    let load = time(args.reps, || {
        loader.load(&refs, &dref)?;
        Ok(())
    })?;
    eprintln!("(b) host, last run: {}", loader.last_timings());

    let in_place = if !args.in_place {
        None
    } else if refs.iter().any(|t| t.bytes() == 0) {
        eprintln!("apply_in_place skipped: the delta has an empty tensor");
        None
    } else {
        let lens = host.iter().map(|h| h.len()).collect();
        let (secs, ok) = time_in_place(&mut loader, &refs, &dbases, lens, &want, args.reps)?;
        eprintln!("(c) host, last run: {}", loader.last_timings());
        exact &= ok;
        Some(secs)
    };

    let lens: Vec<usize> = host.iter().map(|h| h.len()).collect();
    let mapped = time_mapped(&mut loader, &args.delta, &dbases, &lens)?;

    let report = Report {
        args,
        cfg,
        tensors: refs.len(),
        target_bytes: want.iter().map(|w| w.len()).sum(),
        delta_bytes: usize::try_from(pinned.file().file_len())?,
        exact,
        upload,
        load,
        in_place,
        mapped,
    };
    print_report(gpu, &report);
    Ok(exact)
}
