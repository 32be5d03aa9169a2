//! The whole conformance suite (`conformance/manifest.json`) through the GPU
//! loader: each delta read into page-locked memory and validated there
//! ([`PinnedDelta`]), its base checked by the library and uploaded to the
//! device, every tensor rebuilt by [`Loader::load`] with device digests on.
//!
//! - A valid case must be bit-exact: the canonical decode of the GPU's bytes
//!   (SHA-256 of each tensor, spec §11.4) equals the manifest's expected
//!   decode and the library's.
//! - An invalid case must fail with the code that the manifest names and
//!   that the library (the CLI's code) gives.
//!
//! Needs a CUDA GPU, so CI reports it as ignored. On a GPU machine:
//! `cargo test -p tpde-cuda --release --test conformance_gpu -- --include-ignored --nocapture`
//! prints a summary table for `BENCHMARKS-GPU.md`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tpde::Checkpoint;
use tpde_cuda::{host_bases, Gpu, GpuError, Loader, LoaderConfig, PinnedDelta};

/// `conformance/`, found from the crate's folder: `CARGO_MANIFEST_DIR` at
/// run time (set by cargo, or by hand where the test binary was copied to
/// another machine), else where the crate was built.
fn suite() -> PathBuf {
    let crate_dir =
        std::env::var_os("CARGO_MANIFEST_DIR").map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), PathBuf::from);
    crate_dir.join("../../conformance")
}

/// Rebuilds every tensor of `delta` on the GPU; the canonical decode line.
/// `references` is the delta's chain of position references (spec §11.4),
/// nearest first.
fn gpu_decode(
    gpu: &Arc<Gpu>,
    loader: &mut Loader,
    delta: &Path,
    base: Option<&Path>,
    references: &[PathBuf],
) -> Result<String, GpuError> {
    let mut pinned = PinnedDelta::open(gpu, delta)?;
    if let Some((first, rest)) = references.split_first() {
        pinned = pinned.with_position_reference(Arc::new(tpde_conformance::open_chain(first, rest)?))?;
    }
    let base = base.map(Checkpoint::open).transpose()?;
    // The base is checked before anything is uploaded.
    let host = host_bases(pinned.file(), base.as_ref())?;
    let refs = pinned.tensor_refs(true)?;
    let device_bases = host
        .iter()
        .map(|b| if b.is_empty() { gpu.alloc_zeros::<u8>(1) } else { gpu.upload(b) })
        .collect::<Result<Vec<_>, _>>()?;
    let outs = loader.load(&refs, &device_bases.iter().collect::<Vec<_>>())?;
    let mut tensors = Vec::new();
    for ((t, out), entry) in refs.iter().zip(&outs).zip(&pinned.file().header().tensors) {
        let mut bytes = gpu.download(out)?;
        bytes.truncate(t.bytes());
        tensors.push(json!({
            "dtype": entry.dtype_name,
            "name": entry.name,
            "sha256": hex::encode(Sha256::digest(&bytes)),
            "shape": entry.shape,
        }));
    }
    Ok(tpde_conformance::canonical(&json!({ "tensors": tensors })))
}

#[derive(Default)]
struct Tally {
    cases: usize,
    passed: usize,
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_conformance_case_through_the_gpu_loader() {
    let root = suite();
    let manifest: Value = serde_json::from_slice(&std::fs::read(root.join("manifest.json")).unwrap()).unwrap();
    let gpu = Arc::new(Gpu::new(0).expect("a CUDA GPU"));
    let mut loader = Loader::new(gpu.clone(), LoaderConfig::default()).unwrap();
    let mut tallies: BTreeMap<String, Tally> = BTreeMap::new();
    let mut failures = Vec::new();
    for case in manifest["cases"].as_array().unwrap() {
        let id = case["id"].as_str().unwrap();
        let path = root.join(case["path"].as_str().unwrap());
        let base = case["base"].as_str().map(|b| root.join(b));
        let references: Vec<PathBuf> = case["references"]
            .as_array()
            .map(|r| r.iter().filter_map(Value::as_str).map(|p| root.join(p)).collect())
            .unwrap_or_default();
        let accept = case["expect"] == "accept";
        let folder = case["path"].as_str().unwrap().split('/').next().unwrap().to_string();
        let kind = format!("{folder} ({})", if accept { "accept" } else { "reject" });
        let library = tpde_conformance::decode_with_references(&path, base.as_deref(), &references);
        let gpu_result = gpu_decode(&gpu, &mut loader, &path, base.as_deref(), &references);
        let verdict = if accept {
            let expected: Value =
                serde_json::from_slice(&std::fs::read(root.join(case["expected"].as_str().unwrap())).unwrap()).unwrap();
            match (&gpu_result, &library) {
                (Ok(line), Ok(lib)) => {
                    let got: Value = serde_json::from_str(line).unwrap();
                    if got != expected {
                        Err(format!("GPU decode differs from expected: {line}"))
                    } else if line != lib {
                        Err(format!("GPU decode differs from the library's: {line} vs {lib}"))
                    } else {
                        Ok(())
                    }
                }
                (Err(e), _) => Err(format!("GPU refused a valid case: {} ({e})", code_of(e))),
                (_, Err(e)) => Err(format!("library refused a valid case: {}", e.code().as_str())),
            }
        } else {
            let want = case["error"].as_str().unwrap();
            let lib = library.as_ref().err().map(|e| e.code().as_str());
            match &gpu_result {
                Ok(_) => Err(format!("GPU accepted an invalid case (want {want})")),
                Err(e) if code_of(e) != want => Err(format!("GPU gave {} ({e}), want {want}", code_of(e))),
                Err(_) if lib != Some(want) => Err(format!("library gave {lib:?}, want {want}")),
                Err(_) => Ok(()),
            }
        };
        let tally = tallies.entry(kind).or_default();
        tally.cases += 1;
        match verdict {
            Ok(()) => tally.passed += 1,
            Err(why) => failures.push(format!("{id}: {why}")),
        }
    }
    println!("device: {}\n", gpu.name());
    println!("| cases | count | pass | fail |\n|---|---|---|---|");
    let (mut all, mut pass) = (0, 0);
    for (kind, t) in &tallies {
        println!("| {kind} | {} | {} | {} |", t.cases, t.passed, t.cases - t.passed);
        all += t.cases;
        pass += t.passed;
    }
    println!("| **all** | {all} | {pass} | {} |", all - pass);
    for f in &failures {
        println!("FAIL {f}");
    }
    assert!(failures.is_empty(), "{} of {all} cases differ from the library", failures.len());
}

/// The library's code for a GPU error (the CLI prints the same), or the
/// GPU crate's own code where the error is not a format fault.
fn code_of(e: &GpuError) -> &'static str {
    e.format_code().map_or(e.code(), tpde::ErrorCode::as_str)
}
