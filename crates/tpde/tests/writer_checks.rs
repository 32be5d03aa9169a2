//! The writer checks everything the reader checks, before it writes a byte: a target
//! the format cannot hold is refused by `encode` with a stable code and leaves no
//! file, and any delta that `encode` accepts, the reader accepts (spec §12 item 3).
//! Also the base-checkpoint rules of spec §11.2 B0 and inputs that are not files.
//!
//! `PROPTEST_CASES` sets the number of property cases (default 32, for a debug build).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use proptest::prelude::*;
use tpde::{
    format::{Header, TargetFile, TargetLayout},
    Checkpoint, DeltaFile, EncodeOptions, ErrorCode, LayoutKind, NoProgress, TensorEntry,
};

mod safetensors_support;
use safetensors_support::{safetensors, safetensors_with, Tensor};

fn tensor(name: &str, dtype: &'static str, shape: &[u64]) -> Tensor {
    let width = match dtype {
        "F32" => 4,
        "BF16" => 2,
        _ => 1,
    };
    let len = shape.iter().product::<u64>() * width;
    let bytes = (0..len).map(|i| u8::try_from(i % 251).expect("small")).collect();
    Tensor { name: name.to_owned(), dtype, shape: shape.to_vec(), bytes }
}

/// A sharded checkpoint; the index maps each tensor to the first shard that holds it.
fn write_sharded(dir: &Path, shards: &[(&str, Vec<Tensor>)]) -> PathBuf {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut weight_map = BTreeMap::new();
    for (name, tensors) in shards {
        std::fs::write(dir.join(name), safetensors(tensors)).expect("write a shard");
        for t in tensors {
            weight_map.entry(t.name.clone()).or_insert_with(|| (*name).to_owned());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("write the index");
    dir.to_path_buf()
}

fn write_file(dir: &Path, name: &str, tensors: &[Tensor]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, safetensors(tensors)).expect("write");
    path
}

fn options() -> EncodeOptions {
    EncodeOptions { chunk_words: 16, ..EncodeOptions::default() }
}

/// Encodes and returns the code of the refusal, after checking that nothing was
/// written.
fn encode_refusal(base: Option<&Checkpoint>, target: &Checkpoint, dir: &Path) -> ErrorCode {
    let out = dir.join("out.tpde");
    let err = tpde::encode(base, target, &out, options(), &NoProgress).expect_err("encode refuses");
    let left: Vec<_> = std::fs::read_dir(dir).expect("list").filter_map(|e| e.ok()).map(|e| e.file_name()).collect();
    assert!(!out.exists(), "no delta is written");
    assert!(!left.iter().any(|n| n.to_string_lossy().contains("tmp")), "no temporary is left: {left:?}");
    err.code()
}

/// Encodes, then checks that the reader opens and verifies what was written.
fn encode_and_verify(base: Option<&Checkpoint>, target: &Checkpoint, out: &Path) -> tpde::Result<()> {
    tpde::encode(base, target, out, options(), &NoProgress)?;
    let delta = DeltaFile::open(out).expect("the reader opens what encode wrote");
    tpde::verify(&delta, base, Some(target), &NoProgress).expect("verify accepts what encode wrote");
    Ok(())
}

#[test]
fn single_target_file_named_model_st_is_recorded_under_a_name_readers_accept() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let target = Checkpoint::open(&write_file(dir.path(), "model.st", &[tensor("w", "F32", &[4])])).expect("opens");
    let out = dir.path().join("d.tpde");
    encode_and_verify(None, &target, &out).expect("encode accepts a single file of any name");
    let delta = DeltaFile::open(&out).expect("opens");
    assert_eq!(delta.header().target.files[0].name, "model.safetensors");
}

#[test]
fn shard_named_shard1_st_is_refused_before_writing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let ckpt = write_sharded(&dir.path().join("t"), &[("shard1.st", vec![tensor("w", "F32", &[4])])]);
    let target = Checkpoint::open(&ckpt).expect("a base may have any plain shard names");
    assert_eq!(encode_refusal(None, &target, dir.path()), ErrorCode::InvalidCheckpoint);
}

#[test]
fn shard_named_with_a_backslash_is_refused_before_writing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let ckpt = write_sharded(&dir.path().join("t"), &[("a\\b.safetensors", vec![tensor("w", "F32", &[4])])]);
    // Spec §11.2 B0: a backslash is not part of a plain name, on any system.
    assert_eq!(Checkpoint::open(&ckpt).expect_err("refused").code(), ErrorCode::InvalidCheckpoint);
}

#[test]
fn one_tensor_in_two_shards_is_not_a_checkpoint() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let ckpt = write_sharded(
        &dir.path().join("t"),
        &[
            // The index agrees with the first shard that holds "w"; "v" makes it
            // name both shards.
            ("a.safetensors", vec![tensor("u", "F32", &[4]), tensor("w", "F32", &[4])]),
            ("b.safetensors", vec![tensor("v", "F32", &[4]), tensor("w", "F32", &[4])]),
        ],
    );
    // Spec §11.2 B0 for a base; the same open refuses it as a target.
    assert_eq!(Checkpoint::open(&ckpt).expect_err("refused").code(), ErrorCode::InvalidCheckpoint);
}

#[test]
fn empty_weight_map_is_an_empty_base_but_not_a_target() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let ckpt = write_sharded(&dir.path().join("t"), &[]);
    let empty = Checkpoint::open(&ckpt).expect("an empty checkpoint is a valid base (spec §11.2 B0)");
    assert_eq!(encode_refusal(None, &empty, dir.path()), ErrorCode::InvalidCheckpoint);
}

#[test]
fn tensor_of_rank_33_is_refused_before_writing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let target =
        Checkpoint::open(&write_file(dir.path(), "t.safetensors", &[tensor("w", "U8", &[1; 33])])).expect("opens");
    assert_eq!(encode_refusal(None, &target, dir.path()), ErrorCode::LimitExceeded);
}

#[test]
fn base_tensor_of_rank_33_is_not_paired() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let base =
        Checkpoint::open(&write_file(dir.path(), "b.safetensors", &[tensor("w", "U8", &[1; 33])])).expect("opens");
    let target =
        Checkpoint::open(&write_file(dir.path(), "t.safetensors", &[tensor("w", "U8", &[1; 32])])).expect("opens");
    // Ranks differ, so the tensor is stored without a base.
    encode_and_verify(Some(&base), &target, &dir.path().join("d.tpde")).expect("encoded standalone");
}

#[test]
fn header_with_more_than_2_20_tensors_is_refused_by_the_writer_check() {
    let entry = |i: usize| TensorEntry {
        name: format!("t{i}"),
        dtype_name: "U8".into(),
        shape: vec![0],
        file: 0,
        chunk_words: 1,
        first_chunk: 0,
        chunk_count: 0,
        digest: "00000000000000000000000000000000".into(),
        base: None,
    };
    let header = Header {
        writer: "test".into(),
        target: TargetLayout {
            kind: LayoutKind::File,
            files: vec![TargetFile { name: "m.safetensors".into(), safetensors_header: "{}".into() }],
            index_json: None,
        },
        tensors: (0..=tpde::format::MAX_TENSORS).map(entry).collect(),
        position_reference: None,
        extensions: BTreeMap::new(),
    };
    let err = tpde::format::check_header(&header, 0).expect_err("refused");
    assert_eq!(err.code(), ErrorCode::LimitExceeded);
}

#[test]
fn rebuilt_target_with_extra_tensor_members_is_accepted_as_a_base() {
    // Spec §11.2 B0 against §5.3 S2: members beyond dtype/shape/data_offsets.
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("b.safetensors");
    std::fs::write(&path, safetensors_with(&[tensor("w", "F32", &[4])], "\"org.example\":[1],")).expect("write");
    let base = Checkpoint::open(&path).expect("extra members are ignored");
    assert!(base.tensor("w").is_some());
}

#[test]
fn base_whose_data_has_trailing_bytes_is_refused() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut bytes = safetensors(&[tensor("w", "F32", &[4])]);
    bytes.push(0);
    let path = dir.path().join("b.safetensors");
    std::fs::write(&path, bytes).expect("write");
    assert_eq!(Checkpoint::open(&path).expect_err("refused").code(), ErrorCode::InvalidCheckpoint);
}

#[test]
fn unknown_dtype_comes_before_other_base_faults() {
    // Spec §11.2 B0 precedence: after strict JSON, an unknown dtype is reported first.
    let dir = tempfile::tempdir().expect("a temp dir");
    let header =
        r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,9]},"b":{"dtype":"Q4","shape":[0],"data_offsets":[0,0]}}"#;
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend_from_slice(&[0; 4]);
    let path = dir.path().join("b.safetensors");
    std::fs::write(&path, bytes).expect("write");
    assert_eq!(Checkpoint::open(&path).expect_err("refused").code(), ErrorCode::UnknownDtype);
}

#[test]
fn missing_shard_comes_after_every_shard_name_is_checked() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let ckpt = dir.path().join("t");
    std::fs::create_dir_all(&ckpt).expect("mkdir");
    // "a.safetensors" is missing and sorts first; "../x" is not a plain name.
    let index = r#"{"weight_map":{"w":"a.safetensors","v":"../x.safetensors"}}"#;
    std::fs::write(ckpt.join("model.safetensors.index.json"), index).expect("write");
    assert_eq!(Checkpoint::open(&ckpt).expect_err("refused").code(), ErrorCode::InvalidCheckpoint);
    let index = r#"{"weight_map":{"w":"a.safetensors"}}"#;
    std::fs::write(ckpt.join("model.safetensors.index.json"), index).expect("write");
    assert_eq!(Checkpoint::open(&ckpt).expect_err("refused").code(), ErrorCode::MissingShard);
}

#[test]
fn many_files_and_tensors_open() {
    // Opening was quadratic in files × tensors (each file scanned every tensor);
    // this shape took minutes before, and is linear now.
    let files = 2048;
    let dir = tempfile::tempdir().expect("a temp dir");
    let shards: Vec<(String, Vec<Tensor>)> = (0..files)
        .map(|f| (format!("s{f:05}.safetensors"), (0..4).map(|t| tensor(&format!("f{f}.t{t}"), "U8", &[2])).collect()))
        .collect();
    let borrowed: Vec<(&str, Vec<Tensor>)> = shards.iter().map(|(n, t)| (n.as_str(), t.clone())).collect();
    let target = Checkpoint::open(&write_sharded(&dir.path().join("t"), &borrowed)).expect("opens");
    let out = dir.path().join("d.tpde");
    tpde::encode(None, &target, &out, options(), &NoProgress).expect("encodes");
    let delta = DeltaFile::open(&out).expect("opens");
    assert_eq!(delta.header().tensors.len(), files * 4);
}

/// Runs `open` on another thread and fails the test if it has not returned in a
/// minute: a FIFO opened for reading blocks forever.
#[cfg(unix)]
fn refused_without_hanging(open: impl FnOnce() -> Option<ErrorCode> + Send + 'static) -> ErrorCode {
    let (send, receive) = std::sync::mpsc::channel();
    std::thread::spawn(move || send.send(open()));
    let code = receive.recv_timeout(std::time::Duration::from_secs(60)).expect("the open returns instead of hanging");
    code.expect("the open is refused")
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: `name` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(name.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

#[cfg(unix)]
#[test]
fn fifo_as_delta_base_target_or_shard_is_refused() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let fifo = dir.path().join("fifo.safetensors");
    mkfifo(&fifo);
    let delta_fifo = dir.path().join("fifo.tpde");
    mkfifo(&delta_fifo);
    let (a, b) = (fifo.clone(), delta_fifo.clone());
    assert_eq!(refused_without_hanging(move || DeltaFile::open(&b).err().map(|e| e.code())), ErrorCode::Io);
    // The same open serves a base, a target and `verify --target`.
    assert_eq!(refused_without_hanging(move || Checkpoint::open(&a).err().map(|e| e.code())), ErrorCode::Io);

    let sharded = write_sharded(&dir.path().join("s"), &[("a.safetensors", vec![tensor("w", "F32", &[4])])]);
    std::fs::remove_file(sharded.join("a.safetensors")).expect("rm");
    mkfifo(&sharded.join("a.safetensors"));
    assert_eq!(refused_without_hanging(move || Checkpoint::open(&sharded).err().map(|e| e.code())), ErrorCode::Io);

    let index_fifo = dir.path().join("i");
    std::fs::create_dir_all(&index_fifo).expect("mkdir");
    mkfifo(&index_fifo.join("model.safetensors.index.json"));
    assert_eq!(refused_without_hanging(move || Checkpoint::open(&index_fifo).err().map(|e| e.code())), ErrorCode::Io);
}

/// Shard and tensor names drawn to include ones the format cannot hold.
fn shard_name() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("a.safetensors".to_owned()),
        Just("b.safetensors".to_owned()),
        Just("shard1.st".to_owned()),
        Just("a\\b.safetensors".to_owned()),
        Just(".safetensors".to_owned()),
        Just("é.safetensors".to_owned()),
    ]
}

#[derive(Debug, Clone)]
struct PlannedTensor {
    name: String,
    dtype: &'static str,
    shape: Vec<u64>,
}

fn planned_tensor() -> impl Strategy<Value = PlannedTensor> {
    (
        prop_oneof![Just("w"), Just("v"), Just("x.y"), Just("é"), Just("")],
        prop_oneof![Just("F32"), Just("BF16"), Just("U8")],
        prop_oneof![prop::collection::vec(0u64..4, 0..3), (31usize..=34).prop_map(|rank| vec![1u64; rank]),],
    )
        .prop_map(|(name, dtype, shape)| PlannedTensor { name: name.to_owned(), dtype, shape })
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(32);
    ProptestConfig { cases, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    /// Any delta that `encode` accepts, the reader opens and `verify` accepts.
    #[test]
    fn any_delta_that_encode_accepts_verify_accepts(
        sharded in any::<bool>(),
        shards in prop::collection::vec((shard_name(), prop::collection::vec(planned_tensor(), 0..4)), 0..4),
        with_base in any::<bool>(),
    ) {
        let dir = tempfile::tempdir().expect("a temp dir");
        let realise = |plans: &[PlannedTensor]| -> Vec<Tensor> {
            plans.iter().map(|p| tensor(&p.name, p.dtype, &p.shape)).collect()
        };
        let target_path = if sharded {
            let shards: Vec<(&str, Vec<Tensor>)> = shards.iter().map(|(n, t)| (n.as_str(), realise(t))).collect();
            write_sharded(&dir.path().join("target"), &shards)
        } else {
            let tensors = shards.first().map(|(_, t)| realise(t)).unwrap_or_default();
            write_file(dir.path(), shards.first().map_or("model.st", |(n, _)| n.as_str()), &tensors)
        };
        // A checkpoint that is not valid (spec §11.2 B0) is refused at open: fine.
        let Ok(target) = Checkpoint::open(&target_path) else { return Ok(()) };
        let base_path = write_file(dir.path(), "base.sft", &target.files.iter().flat_map(|f| {
            f.tensors.iter().map(|t| Tensor { name: t.name.clone(), dtype: "F32", shape: vec![2], bytes: vec![1; 8] })
        }).take(1).collect::<Vec<_>>());
        let base = if with_base { Checkpoint::open(&base_path).ok() } else { None };
        let out = dir.path().join("d.tpde");
        match encode_and_verify(base.as_ref(), &target, &out) {
            Ok(()) => {}
            Err(e) => {
                prop_assert!(!out.exists(), "a refused encode leaves no delta");
                prop_assert!(
                    matches!(e.code(), ErrorCode::InvalidCheckpoint | ErrorCode::LimitExceeded),
                    "refused with {:?}", e.code()
                );
            }
        }
    }
}
