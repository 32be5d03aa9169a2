//! `tpde series`: a run added step by step from the command line comes back byte
//! for byte, `list` shows chains within `--max-chain`, `prune` keeps every kept step
//! rebuildable, and errors carry their series codes.

use std::fs;
use std::path::{Path, PathBuf};

mod common;
use common::{code_of, noise, ok, run};

/// A safetensors file of one BF16 tensor, written by hand (8-byte header length,
/// JSON header, data).
fn write_checkpoint(path: &Path, words: &[u8]) {
    let mut header = format!(
        "{{\"w\":{{\"dtype\":\"BF16\",\"shape\":[{}],\"data_offsets\":[0,{}]}}}}",
        words.len() / 2,
        words.len()
    );
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(words);
    fs::write(path, out).expect("write a checkpoint");
}

fn arg(p: &Path) -> &str {
    p.to_str().expect("a UTF-8 path")
}

#[test]
fn a_run_from_the_command_line_round_trips_and_prunes() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let run_dir = dir.path().join("run");
    let mut words = noise(1 << 16, 1);
    let mut steps: Vec<(u64, PathBuf)> = Vec::new();
    for (k, step) in (0..6u64).map(|k| 10 * k).enumerate() {
        // a sparse step: a few hundred words change
        for i in (k * 7..words.len()).step_by(211) {
            words[i] ^= 1;
        }
        let path = dir.path().join(format!("step-{k}.safetensors"));
        write_checkpoint(&path, &words);
        ok(&["series", "add", arg(&run_dir), arg(&path), "--step", &step.to_string(), "--max-chain", "2"]);
        steps.push((step, path));
    }
    let listed = ok(&["series", "list", arg(&run_dir)]);
    let table = String::from_utf8_lossy(&listed.stdout);
    assert!(table.contains("delta"), "{table}");
    let json = ok(&["series", "list", arg(&run_dir), "--json"]);
    let manifest = tpde::Manifest::parse(&String::from_utf8_lossy(&json.stdout)).expect("the JSON manifest");
    for s in &manifest.steps {
        assert!(manifest.depth(s.step).expect("a step") <= 2);
    }
    for (step, original) in &steps {
        let out = dir.path().join(format!("out-{step}.safetensors"));
        ok(&["series", "get", arg(&run_dir), "--step", &step.to_string(), "-o", arg(&out)]);
        assert!(fs::read(&out).expect("read") == fs::read(original).expect("read"), "step {step} differs");
    }
    ok(&["series", "verify", arg(&run_dir)]);
    ok(&["series", "prune", arg(&run_dir), "--keep", "20", "--keep-last", "1"]);
    let out = dir.path().join("kept.safetensors");
    ok(&["series", "get", arg(&run_dir), "--step", "20", "-o", arg(&out)]);
    assert!(fs::read(&out).expect("read") == fs::read(&steps[2].1).expect("read"));
    ok(&["series", "verify", arg(&run_dir)]);
    // a pruned step, an output that exists, a step not later than the last
    let gone = dir.path().join("gone.safetensors");
    assert_eq!(code_of(&run(&["series", "get", arg(&run_dir), "--step", "10", "-o", arg(&gone)])), "E_SERIES_STEP");
    assert_eq!(code_of(&run(&["series", "get", arg(&run_dir), "--step", "20", "-o", arg(&out)])), "E_OUTPUT_EXISTS");
    let late = ["series", "add", arg(&run_dir), arg(&steps[0].1), "--step", "50"];
    assert_eq!(code_of(&run(&late)), "E_SERIES_STEP");
    assert_eq!(code_of(&run(&["series", "prune", arg(&run_dir)])), "E_INVALID_ARGUMENT");
    assert!(!gone.exists());
}
