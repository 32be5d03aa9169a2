//! End-to-end tests of the `tpde` command: byte-identical round trips, and every
//! fault of bad input leaving a clear error code and no output behind.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use safetensors::tensor::TensorView;
use safetensors::Dtype;

mod common;
use common::{noise, run, TPDE};

/// Flips a few bytes every `every` bytes: a sparse change.
fn perturb(bytes: &[u8], every: usize) -> Vec<u8> {
    let mut out = bytes.to_vec();
    for i in (0..out.len()).step_by(every) {
        out[i] ^= 0x01;
    }
    out
}

struct Tensor {
    name: &'static str,
    dtype: &'static str,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

fn dtype(name: &str) -> Dtype {
    serde_json::from_value(serde_json::Value::String(name.into())).expect("a safetensors dtype")
}

fn write_safetensors(path: &Path, tensors: &[Tensor]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|t| (t.name.to_owned(), TensorView::new(dtype(t.dtype), t.shape.clone(), &t.bytes).expect("valid view")))
        .collect();
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(metadata), path).expect("write safetensors");
}

fn tensor(name: &'static str, dtype: &'static str, shape: &[usize], seed: u64) -> Tensor {
    let bits: usize = match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E4M3" | "F8_E5M2" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        _ => 64,
    };
    let len = shape.iter().product::<usize>() * bits / 8;
    let mut bytes = noise(len, seed);
    if dtype == "BOOL" {
        bytes.iter_mut().for_each(|b| *b &= 1);
    }
    Tensor { name, dtype, shape: shape.to_vec(), bytes }
}

fn ok(args: &[&Path]) {
    common::ok(args);
}

/// Runs a command that must fail, and returns the stable code it printed on its one
/// line of error.
fn error_code(args: &[&Path]) -> String {
    let out = run(args);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(stderr.lines().count(), 1, "one line of error: {stderr}");
    common::code_of(&out)
}

fn p(s: &str) -> &Path {
    Path::new(s)
}

/// No file of `dir` is a leftover temporary output.
fn assert_no_leftovers(dir: &Path) {
    for entry in fs::read_dir(dir).expect("readable") {
        let name = entry.expect("entry").file_name();
        assert!(!name.to_string_lossy().contains(".tpde-tmp-"), "leftover {name:?}");
    }
}

struct Pair {
    dir: tempfile::TempDir,
}

impl Pair {
    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }
}

/// A base and a target with every dtype, plus added, removed, grown, reshaped and
/// retyped tensors.
fn pair() -> Pair {
    let dir = tempfile::tempdir().expect("temp dir");
    let dtypes = [
        "BOOL", "U8", "I8", "F8_E4M3", "F8_E5M2", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2", "I16", "U16", "F16", "BF16",
        "I32", "U32", "F32", "C64", "I64", "U64", "F64",
    ];
    let mut base = Vec::new();
    let mut target = Vec::new();
    for (i, &dtype) in dtypes.iter().enumerate() {
        let name: &'static str = Box::leak(format!("layer.{dtype}").into_boxed_str());
        let t = tensor(name, dtype, &[16, 24], i as u64);
        let every = if i % 2 == 0 { 7 } else { 1 };
        target.push(Tensor { bytes: perturb(&t.bytes, every), ..tensor(name, dtype, &[16, 24], i as u64) });
        base.push(t);
    }
    base.push(tensor("embed", "BF16", &[100, 8], 99));
    let mut grown = tensor("embed", "BF16", &[120, 8], 100);
    grown.bytes[..1600].copy_from_slice(&base.last().expect("embed").bytes);
    target.push(grown);
    base.push(tensor("removed", "F32", &[4], 5));
    target.push(tensor("added", "I64", &[3, 3], 6));
    base.push(tensor("reshaped", "F32", &[6, 4], 7));
    target.push(tensor("reshaped", "F32", &[4, 6], 7));
    base.push(tensor("retyped", "F32", &[8], 8));
    target.push(tensor("retyped", "F16", &[16], 8));
    base.push(tensor("scalar", "F64", &[], 9));
    target.push(tensor("scalar", "F64", &[], 10));
    base.push(tensor("empty", "BF16", &[0, 4], 11));
    target.push(tensor("empty", "BF16", &[0, 4], 11));
    let pair = Pair { dir };
    write_safetensors(&pair.path("base.safetensors"), &base);
    write_safetensors(&pair.path("target.safetensors"), &target);
    pair
}

#[test]
fn every_dtype_and_shape_change_round_trips_byte_identically() {
    let t = pair();
    let (base, target, delta, out) =
        (t.path("base.safetensors"), t.path("target.safetensors"), t.path("d.tpde"), t.path("out.safetensors"));
    ok(&[p("encode"), &base, &target, p("-o"), &delta]);
    ok(&[p("apply"), &base, &delta, p("-o"), &out]);
    assert_eq!(fs::read(&out).unwrap(), fs::read(&target).unwrap());
    ok(&[p("verify"), &base, &delta, p("--target"), &target]);
    let inspect = run(&[p("inspect"), &delta, p("--json")]);
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("inspect prints JSON");
    assert!(report["needs_base"].as_bool().unwrap());
    let delta_of = |name: &str| {
        report["tensors"].as_array().unwrap().iter().find(|t| t["name"] == name).unwrap()["delta"].as_bool()
    };
    assert_eq!(delta_of("embed"), Some(true), "a grown tensor is a delta against the base's rows");
    assert_eq!(delta_of("retyped"), Some(false));
    assert_eq!(delta_of("added"), Some(false));
}

#[test]
fn standalone_encoding_needs_no_base() {
    let t = pair();
    let (target, file, out) = (t.path("target.safetensors"), t.path("s.tpde"), t.path("out.safetensors"));
    ok(&[p("encode"), &target, p("-o"), &file]);
    ok(&[p("apply"), &file, p("-o"), &out]);
    assert_eq!(fs::read(&out).unwrap(), fs::read(&target).unwrap());
    ok(&[p("verify"), &file, p("--target"), &target]);
}

#[test]
fn the_same_inputs_give_the_same_bytes_whatever_the_thread_count() {
    let t = pair();
    let (base, target) = (t.path("base.safetensors"), t.path("target.safetensors"));
    ok(&[p("encode"), &base, &target, p("-o"), &t.path("a.tpde"), p("--threads"), p("1"), p("--chunk-words"), p("64")]);
    ok(&[p("encode"), &base, &target, p("-o"), &t.path("b.tpde"), p("--threads"), p("2"), p("--chunk-words"), p("64")]);
    assert_eq!(fs::read(t.path("a.tpde")).unwrap(), fs::read(t.path("b.tpde")).unwrap());
}

/// A BF16 fine-tune step that moves 1.3% of the words by one unit: the values'
/// high byte plane is constant, which zstd stores in about 20 bytes.
fn one_unit_steps(t: &Pair) -> (PathBuf, PathBuf) {
    one_unit_steps_at(t, 13)
}

/// [`one_unit_steps`] moving `per_mille` of the words.
fn one_unit_steps_at(t: &Pair, per_mille: u64) -> (PathBuf, PathBuf) {
    let base = tensor("w", "BF16", &[256, 1024], 21);
    let mut bytes = base.bytes.clone();
    let mut state = 0x2545_F491_4F6C_DD1Du64;
    for word in bytes.chunks_exact_mut(2) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if state % 1000 < per_mille {
            let v = u16::from_le_bytes([word[0], word[1]]) ^ 1;
            word.copy_from_slice(&v.to_le_bytes());
        }
    }
    let target = Tensor { bytes, ..tensor("w", "BF16", &[256, 1024], 21) };
    let (b, tg) =
        (t.path(&format!("steps-{per_mille}-base.safetensors")), t.path(&format!("steps-{per_mille}.safetensors")));
    write_safetensors(&b, &[base]);
    write_safetensors(&tg, &[target]);
    (b, tg)
}

/// Bytes of a delta's streams that only the CPU decodes (zstd), from `inspect`.
fn cpu_only_bytes(delta: &Path) -> u64 {
    let inspect = run(&[p("inspect"), delta, p("--json")]);
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("inspect prints JSON");
    report["total"]["cpu_only_bytes"].as_u64().expect("a byte count")
}

/// A BF16 step that moves 5% of the words by a pattern of 64 values repeated over
/// and over: zstd's matches store its value planes many kilobytes smaller than any
/// order-0 or order-1 coder.
fn repeating_steps(t: &Pair) -> (PathBuf, PathBuf) {
    let base = tensor("w", "BF16", &[1024, 1024], 23);
    let pattern: Vec<u16> = noise(128, 24).chunks_exact(2).map(|b| u16::from_le_bytes([b[0], b[1]]) | 0x0101).collect();
    let mut bytes = base.bytes.clone();
    let mut state = 0x9E37_79B9_7F4A_7C15u64;
    let mut moved = 0;
    for word in bytes.chunks_exact_mut(2) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        if state % 100 < 5 {
            let v = u16::from_le_bytes([word[0], word[1]]) ^ pattern[moved % pattern.len()];
            word.copy_from_slice(&v.to_le_bytes());
            moved += 1;
        }
    }
    let target = Tensor { bytes, ..tensor("w", "BF16", &[1024, 1024], 23) };
    let (b, tg) = (t.path("repeating-base.safetensors"), t.path("repeating.safetensors"));
    write_safetensors(&b, &[base]);
    write_safetensors(&tg, &[target]);
    (b, tg)
}

/// The default writer keeps zstd only where it saves kilobytes, so a one-unit step
/// leaves the CPU nothing, and a step that repeats a pattern keeps it; with
/// `--no-zstd` neither does. Each rebuilds the target.
#[test]
fn no_zstd_deltas_leave_nothing_to_the_cpu_and_round_trip() {
    let t = pair();
    let (steps_base, steps_target) = one_unit_steps(&t);
    let steps = t.path("steps.tpde");
    ok(&[p("encode"), &steps_base, &steps_target, p("-o"), &steps]);
    assert_eq!(cpu_only_bytes(&steps), 0, "zstd saves too little on a one-unit step to be kept");
    let steps_13 = t.path("steps-1.3.tpde");
    ok(&[p("encode"), &steps_base, &steps_target, p("-o"), &steps_13, p("--format-version"), p("1.3")]);
    assert!(cpu_only_bytes(&steps_13) > 0, "format 1.3's writer kept zstd wherever it was smaller");
    let (base, target) = repeating_steps(&t);
    let (default, gpu) = (t.path("default.tpde"), t.path("no-zstd.tpde"));
    ok(&[p("encode"), &base, &target, p("-o"), &default]);
    ok(&[p("encode"), &base, &target, p("-o"), &gpu, p("--no-zstd")]);
    assert!(cpu_only_bytes(&default) > 0, "the default writer keeps zstd where it saves kilobytes");
    assert_eq!(cpu_only_bytes(&gpu), 0);
    for (delta, out) in [(&default, t.path("a.safetensors")), (&gpu, t.path("b.safetensors"))] {
        ok(&[p("apply"), &base, delta, p("-o"), &out]);
        assert_eq!(fs::read(&out).unwrap(), fs::read(&target).unwrap());
    }
    let refused = [p("encode"), &base, &target, p("-o"), &t.path("c.tpde"), p("--no-zstd"), p("--format-version")];
    assert_eq!(error_code(&[&refused[..], &[p("1.0")]].concat()), "E_INVALID_ARGUMENT");
    assert!(!t.path("c.tpde").exists());
}

fn format_version(delta: &Path) -> String {
    let inspect = run(&[p("inspect"), delta, p("--json")]);
    let report: serde_json::Value = serde_json::from_slice(&inspect.stdout).expect("inspect prints JSON");
    report["format_version"].as_str().expect("a version").to_owned()
}

/// `--format-version` bounds the features a delta may need, and the file records
/// the lowest version that its contents need: the default packs the lane rANS
/// tables (format 1.4), 1.3 does not but stores the constant top planes of
/// one-unit steps as constant streams, 1.1 stores them otherwise, 1.0 uses zstd
/// alone. Each rebuilds the target.
#[test]
fn each_format_version_writes_what_its_readers_read() {
    let t = pair();
    let (base, target) = one_unit_steps(&t);
    let mut sizes = Vec::new();
    let versions =
        [(None, "1.4"), (Some("1.4"), "1.4"), (Some("1.3"), "1.3"), (Some("1.1"), "1.1"), (Some("1.0"), "1.0")];
    for (flag, newest) in versions {
        let delta = t.path(&format!("{newest}-{}.tpde", flag.is_some()));
        let mut args = vec![p("encode"), &base, &target, p("-o"), &delta];
        if let Some(flag) = flag {
            args.extend([p("--format-version"), p(flag)]);
        }
        ok(&args);
        let version = format_version(&delta);
        // packed tables and constant planes are used wherever they are allowed
        let exact = matches!(newest, "1.4" | "1.3");
        assert!(if exact { version == newest } else { version.as_str() <= newest }, "{flag:?}: {version}");
        let out = t.path(&format!("{newest}-{}.safetensors", flag.is_some()));
        ok(&[p("apply"), &base, &delta, p("-o"), &out]);
        assert_eq!(fs::read(&out).unwrap(), fs::read(&target).unwrap(), "{flag:?}");
        sizes.push(fs::metadata(&delta).unwrap().len());
    }
    assert_eq!(sizes[0], sizes[1], "1.4 is the default");
    // Sizes are multiples of 64 bytes (spec §2): where zstd may win, the packed
    // tables' gain can vanish in the alignment, but never turn into a loss.
    assert!(sizes[1] <= sizes[2], "packed tables store no larger: {sizes:?}");
    assert!(sizes[2] < sizes[3], "constant streams store smaller: {sizes:?}");
    // At 5% the gap planes are lane rANS streams of many symbols either way.
    let (base, target) = one_unit_steps_at(&t, 50);
    let no_zstd = ["1.4", "1.3"].map(|version| {
        let delta = t.path(&format!("{version}-no-zstd.tpde"));
        ok(&[p("encode"), &base, &target, p("-o"), &delta, p("--no-zstd"), p("--format-version"), p(version)]);
        fs::metadata(&delta).unwrap().len()
    });
    assert!(no_zstd[0] < no_zstd[1], "packed tables store smaller: {no_zstd:?}");
}

fn encoded() -> (Pair, PathBuf) {
    let t = pair();
    let delta = t.path("d.tpde");
    ok(&[
        p("encode"),
        &t.path("base.safetensors"),
        &t.path("target.safetensors"),
        p("-o"),
        &delta,
        p("--chunk-words"),
        p("64"),
    ]);
    (t, delta)
}

#[test]
fn a_truncated_delta_is_rejected_and_leaves_no_output() {
    let (t, delta) = encoded();
    let bytes = fs::read(&delta).unwrap();
    for cut in [10, 200, bytes.len() / 2, bytes.len() - 1] {
        let cut_path = t.path("cut.tpde");
        fs::write(&cut_path, &bytes[..cut]).unwrap();
        let out = t.path("out.safetensors");
        let code = error_code(&[p("apply"), &t.path("base.safetensors"), &cut_path, p("-o"), &out]);
        assert!(["E_TRUNCATED", "E_BAD_TRAILER"].contains(&code.as_str()), "{code} at {cut}");
        assert!(!out.exists());
    }
    assert_no_leftovers(t.dir.path());
}

#[test]
fn a_flipped_byte_anywhere_is_an_error_and_leaves_no_output() {
    let (t, delta) = encoded();
    let bytes = fs::read(&delta).unwrap();
    let out = t.path("out.safetensors");
    // Every 97th byte: preamble, chunk data, header, tables and trailer are all hit.
    for at in (0..bytes.len()).step_by(97) {
        let mut flipped = bytes.clone();
        flipped[at] ^= 0x10;
        let bad = t.path("bad.tpde");
        fs::write(&bad, &flipped).unwrap();
        error_code(&[p("apply"), &t.path("base.safetensors"), &bad, p("-o"), &out]);
        assert!(!out.exists(), "output left after a flip at {at}");
    }
    assert_no_leftovers(t.dir.path());
}

#[test]
fn a_corrupted_chunk_names_its_tensor_and_chunk() {
    let (t, delta) = encoded();
    let mut bytes = fs::read(&delta).unwrap();
    bytes[128 + 3] ^= 0xff; // inside the first chunk's stored bytes
    fs::write(&delta, &bytes).unwrap();
    let out = run(&[p("verify"), &t.path("base.safetensors"), &delta]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("tpde: E_CHUNK_CHECKSUM"), "{stderr}");
    assert!(stderr.contains("tensor \"") && stderr.contains("chunk 0"), "{stderr}");
}

#[test]
fn a_wrong_base_is_caught_before_anything_is_written() {
    let (t, delta) = encoded();
    let out = t.path("out.safetensors");
    // Same names, dtypes and shapes; one tensor's content differs.
    let mut base = fs::read(t.path("base.safetensors")).unwrap();
    let last = base.len() - 1;
    base[last] ^= 1;
    let wrong = t.path("wrong.safetensors");
    fs::write(&wrong, &base).unwrap();
    assert_eq!(error_code(&[p("apply"), &wrong, &delta, p("-o"), &out]), "E_BASE_DIGEST");
    assert!(!out.exists());
    // A different model altogether fails on names, shapes or dtypes first.
    assert!(["E_BASE_MISSING_TENSOR", "E_BASE_MISMATCH"]
        .contains(&error_code(&[p("apply"), &t.path("target.safetensors"), &delta, p("-o"), &out]).as_str()));
    assert_eq!(error_code(&[p("apply"), &delta, p("-o"), &out]), "E_BASE_REQUIRED");
    assert!(!out.exists());
    assert_no_leftovers(t.dir.path());
}

#[test]
fn absurd_sizes_in_the_preamble_are_rejected_before_allocation() {
    let (_pair, delta) = encoded();
    let mut bytes = fs::read(&delta).unwrap();
    bytes[48..56].copy_from_slice(&(1u64 << 60).to_le_bytes()); // chunk_count
    let checksum = tpde::format::checksum64(&bytes[..120]);
    bytes[120..128].copy_from_slice(&checksum.to_le_bytes());
    fs::write(&delta, &bytes).unwrap();
    assert_eq!(error_code(&[p("inspect"), &delta]), "E_LIMIT_EXCEEDED");
}

fn sharded(t: &Pair, name: &str, seed: u64) -> PathBuf {
    let dir = t.path(name);
    fs::create_dir(&dir).unwrap();
    let shards = [
        (
            "model-00001-of-00002.safetensors",
            vec![tensor("a", "BF16", &[64, 32], seed), tensor("b", "F32", &[10], seed + 1)],
        ),
        ("model-00002-of-00002.safetensors", vec![tensor("c", "BF16", &[32, 32], seed + 2)]),
    ];
    let mut weight_map = serde_json::Map::new();
    for (file, tensors) in &shards {
        write_safetensors(&dir.join(file), tensors);
        for t in tensors {
            weight_map.insert(t.name.into(), (*file).into());
        }
    }
    let index = serde_json::json!({"metadata": {"total_size": 4264}, "weight_map": weight_map});
    fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
    dir
}

#[test]
fn sharded_checkpoints_round_trip_and_a_missing_shard_is_reported() {
    let t = Pair { dir: tempfile::tempdir().unwrap() };
    let base = sharded(&t, "base", 1);
    let target = sharded(&t, "target", 2);
    let delta = t.path("d.tpde");
    let out = t.path("out");
    ok(&[p("encode"), &base, &target, p("-o"), &delta]);
    ok(&[p("apply"), &base, &delta, p("-o"), &out]);
    for entry in fs::read_dir(&target).unwrap() {
        let name = entry.unwrap().file_name();
        assert_eq!(fs::read(out.join(&name)).unwrap(), fs::read(target.join(&name)).unwrap(), "{name:?}");
    }
    assert_eq!(fs::read_dir(&out).unwrap().count(), 3);
    // Output exists: refused without --force, replaced with it.
    assert_eq!(error_code(&[p("apply"), &base, &delta, p("-o"), &out]), "E_OUTPUT_EXISTS");
    ok(&[p("apply"), &base, &delta, p("-o"), &out, p("--force")]);

    fs::remove_file(base.join("model-00002-of-00002.safetensors")).unwrap();
    let out2 = t.path("out2");
    assert_eq!(error_code(&[p("apply"), &base, &delta, p("-o"), &out2]), "E_MISSING_SHARD");
    assert!(!out2.exists());
    assert_no_leftovers(t.dir.path());
}

#[test]
fn an_input_is_never_overwritten() {
    let (t, delta) = encoded();
    let base = t.path("base.safetensors");
    let before = fs::read(&base).unwrap();
    let code = error_code(&[p("apply"), &base, &delta, p("-o"), &base, p("--force")]);
    assert_eq!(code, "E_INVALID_ARGUMENT");
    assert_eq!(fs::read(&base).unwrap(), before);
}

#[test]
fn pickles_are_refused_with_advice() {
    let t = pair();
    let pickle = t.path("pytorch_model.bin");
    fs::write(&pickle, b"\x80\x02}q\x00.").unwrap();
    let out = run(&[p("encode"), &pickle, p("-o"), &t.path("x.tpde")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.starts_with("tpde: E_PICKLE_INPUT") && stderr.contains("safetensors"), "{stderr}");
}

/// A write that fails midway (here: the file-size limit, as a full disk would)
/// leaves no output and no temporary file.
#[test]
fn a_failed_write_leaves_nothing_behind() {
    use std::os::unix::process::CommandExt;
    let (t, delta) = encoded();
    let out = t.path("out.safetensors");
    let mut command = Command::new(TPDE);
    command.args([p("apply"), &t.path("base.safetensors"), &delta, p("-o"), &out]);
    // SAFETY: only async-signal-safe calls (signal, setrlimit) run between fork and
    // exec. Ignoring SIGXFSZ makes an oversized write fail with EFBIG instead of
    // killing the process; the disposition survives exec.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit { rlim_cur: 4096, rlim_max: 4096 };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command.output().unwrap();
    assert!(!output.status.success());
    assert!(
        String::from_utf8_lossy(&output.stderr).starts_with("tpde: E_IO"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(!out.exists());
    assert_no_leftovers(t.dir.path());
}

/// A real full disk: an 8 KiB tmpfs. Mounting needs root, so `.ci/run` runs this
/// test explicitly where it is root.
#[test]
#[ignore = "needs root to mount a tmpfs"]
fn a_full_disk_leaves_nothing_behind() {
    let (t, delta) = encoded();
    let mount = t.path("small");
    fs::create_dir(&mount).unwrap();
    let status = Command::new("mount").args(["-t", "tmpfs", "-o", "size=8k", "tmpfs"]).arg(&mount).status().unwrap();
    assert!(status.success(), "mounting a tmpfs needs root");
    let out = mount.join("out.safetensors");
    let code = error_code(&[p("apply"), &t.path("base.safetensors"), &delta, p("-o"), &out]);
    let leftovers = fs::read_dir(&mount).unwrap().count();
    Command::new("umount").arg(&mount).status().unwrap();
    assert_eq!(code, "E_IO");
    assert_eq!(leftovers, 0, "the full disk holds no partial output");
}

/// The tensors of a safetensors file: name to (dtype, shape, bytes).
fn tensors_of(path: &Path) -> HashMap<String, (Dtype, Vec<usize>, Vec<u8>)> {
    let bytes = fs::read(path).expect("readable");
    let file = safetensors::SafeTensors::deserialize(&bytes).expect("a valid safetensors file");
    file.tensors().into_iter().map(|(name, t)| (name, (t.dtype(), t.shape().to_vec(), t.data().to_vec()))).collect()
}

#[test]
fn apply_tensors_rebuilds_only_the_matching_tensors_into_one_file() {
    let t = Pair { dir: tempfile::tempdir().unwrap() };
    let base = sharded(&t, "base", 1);
    let target = sharded(&t, "target", 2);
    let delta = t.path("d.tpde");
    ok(&[p("encode"), &base, &target, p("-o"), &delta]);
    let mut wanted = HashMap::new();
    for shard in ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"] {
        wanted.extend(tensors_of(&target.join(shard)));
    }

    // Tensors from both shards, by two patterns, into one file.
    let out = t.path("part.safetensors");
    ok(&[p("apply"), &base, &delta, p("-o"), &out, p("--tensors"), p("a"), p("--tensors"), p("[c-z]")]);
    let got = tensors_of(&out);
    assert_eq!(
        got.keys().collect::<std::collections::BTreeSet<_>>(),
        ["a", "c"].iter().map(|s| s.to_string()).collect::<Vec<_>>().iter().collect()
    );
    for (name, tensor) in &got {
        assert_eq!(tensor, &wanted[name], "{name} is the target's, bit for bit");
    }

    // A base tensor that is not selected is not read: corrupting it changes nothing.
    let shard = base.join("model-00001-of-00002.safetensors");
    let mut bytes = fs::read(&shard).unwrap();
    let data = 8 + usize::try_from(u64::from_le_bytes(bytes[..8].try_into().unwrap())).unwrap();
    bytes[data] ^= 0x10; // in `b`, the shard's first tensor (F32 before BF16, as safetensors orders them)
    fs::write(&shard, &bytes).unwrap();
    ok(&[p("apply"), &base, &delta, p("-o"), &out, p("--force"), p("--tensors"), p("c")]);
    assert_eq!(tensors_of(&out)["c"], wanted["c"]);
    // ... and selecting it is refused before anything is written.
    let refused = t.path("refused.safetensors");
    assert_eq!(error_code(&[p("apply"), &base, &delta, p("-o"), &refused, p("--tensors"), p("b")]), "E_BASE_DIGEST");
    assert!(!refused.exists());

    // A pattern that matches nothing, or is not a pattern, is a clear error.
    assert_eq!(
        error_code(&[p("apply"), &base, &delta, p("-o"), &refused, p("--tensors"), p("nope*")]),
        "E_INVALID_ARGUMENT"
    );
    assert_eq!(
        error_code(&[p("apply"), &base, &delta, p("-o"), &refused, p("--tensors"), p("[")]),
        "E_INVALID_ARGUMENT"
    );
    assert!(!refused.exists());
    assert_no_leftovers(t.dir.path());
}

#[test]
fn apply_tensors_of_every_tensor_of_one_file_is_the_target_itself() {
    let t = Pair { dir: tempfile::tempdir().unwrap() };
    let (base, target, delta) = (t.path("base.safetensors"), t.path("target.safetensors"), t.path("d.tpde"));
    write_safetensors(&base, &[tensor("w", "BF16", &[64, 16], 1), tensor("v", "F32", &[8], 2)]);
    write_safetensors(&target, &[tensor("w", "BF16", &[64, 16], 3), tensor("v", "F32", &[8], 4)]);
    ok(&[p("encode"), &base, &target, p("-o"), &delta]);
    let all = t.path("all.safetensors");
    ok(&[p("apply"), &base, &delta, p("-o"), &all, p("--tensors"), p("*")]);
    assert_eq!(fs::read(&all).unwrap(), fs::read(&target).unwrap());
    // One tensor: the target's bytes and the target's metadata.
    let one = t.path("one.safetensors");
    ok(&[p("apply"), &base, &delta, p("-o"), &one, p("--tensors"), p("w")]);
    let bytes = fs::read(&one).unwrap();
    let (_, metadata) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    assert_eq!(metadata.metadata().as_ref().and_then(|m| m.get("format")).map(String::as_str), Some("pt"));
    assert_eq!(tensors_of(&one).into_keys().collect::<Vec<_>>(), ["w"]);
    assert_eq!(tensors_of(&one)["w"], tensors_of(&target)["w"]);
}
