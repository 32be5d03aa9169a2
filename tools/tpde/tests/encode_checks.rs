//! `tpde encode` refuses, before writing, a target the format cannot hold, and every
//! command refuses an input that is not a regular file or a directory instead of
//! hanging on it. Each case checks the stable code and that no output is left.

use std::collections::BTreeMap;
use std::path::Path;

mod common;
use common::{code_of, run};

/// A U8 tensor: name and shape.
type Tensor<'a> = (&'a str, Vec<u64>);

/// A safetensors file of U8 tensors, data counting up.
fn write_safetensors(path: &Path, tensors: &[Tensor<'_>]) {
    let mut header = String::from("{");
    let mut offset = 0u64;
    for (i, (name, shape)) in tensors.iter().enumerate() {
        let end = offset + shape.iter().product::<u64>();
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"U8\",\"shape\":{shape:?},\"data_offsets\":[{offset},{end}]}}"
        ));
        offset = end;
    }
    header.push('}');
    let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
    bytes.extend_from_slice(header.as_bytes());
    bytes.extend((0..offset).map(|i| u8::try_from(i % 251).expect("small")));
    std::fs::write(path, bytes).expect("write");
}

/// A sharded checkpoint: shard name → tensors; the index maps each tensor to the first
/// shard that holds it.
fn write_sharded(dir: &Path, shards: &[(&str, Vec<Tensor<'_>>)]) {
    std::fs::create_dir_all(dir).expect("mkdir");
    let mut weight_map = BTreeMap::new();
    for (shard, tensors) in shards {
        write_safetensors(&dir.join(shard), tensors);
        for (name, _) in tensors {
            weight_map.entry((*name).to_owned()).or_insert_with(|| (*shard).to_owned());
        }
    }
    let index = serde_json::json!({ "metadata": {}, "weight_map": weight_map });
    std::fs::write(dir.join("model.safetensors.index.json"), index.to_string()).expect("write the index");
}

/// Runs `tpde ARGS`; a run that outlives a minute is killed and fails the test (a
/// FIFO opened for reading blocks forever).
fn encode_refused_with(target: &Path, dir: &Path, code: &str) {
    let out = dir.join("out.tpde");
    let output = run(&[Path::new("encode"), target, Path::new("-o"), &out]);
    assert_eq!(code_of(&output), code);
    assert!(!out.exists(), "no delta is written");
    let leftovers: Vec<_> = std::fs::read_dir(dir)
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".out.tpde"))
        .collect();
    assert!(leftovers.is_empty(), "no temporary is left: {leftovers:?}");
}

#[test]
fn encode_refuses_a_shard_named_shard1_st() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let target = dir.path().join("t");
    write_sharded(&target, &[("shard1.st", vec![("w", vec![4])])]);
    encode_refused_with(&target, dir.path(), "E_INVALID_CHECKPOINT");
}

#[test]
fn encode_refuses_one_tensor_in_two_shards() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let target = dir.path().join("t");
    write_sharded(
        &target,
        // The index agrees with the first shard that holds "w"; "v" makes it name both.
        &[
            ("a.safetensors", vec![("u", vec![4]), ("w", vec![4])]),
            ("b.safetensors", vec![("v", vec![4]), ("w", vec![4])]),
        ],
    );
    encode_refused_with(&target, dir.path(), "E_INVALID_CHECKPOINT");
}

#[test]
fn encode_refuses_an_empty_weight_map() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let target = dir.path().join("t");
    write_sharded(&target, &[]);
    encode_refused_with(&target, dir.path(), "E_INVALID_CHECKPOINT");
}

#[test]
fn encode_refuses_a_tensor_of_rank_33() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let target = dir.path().join("t.safetensors");
    write_safetensors(&target, &[("w", vec![1; 33])]);
    encode_refused_with(&target, dir.path(), "E_LIMIT_EXCEEDED");
}

#[test]
fn target_named_model_st_round_trips() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let target = dir.path().join("model.st");
    write_safetensors(&target, &[("w", vec![4])]);
    let delta = dir.path().join("d.tpde");
    let encoded = run(&[Path::new("encode"), &target, Path::new("-o"), &delta]);
    assert!(encoded.status.success(), "{}", String::from_utf8_lossy(&encoded.stderr));
    let verified = run(&[Path::new("verify"), &delta, Path::new("--target"), &target]);
    assert!(verified.status.success(), "{}", String::from_utf8_lossy(&verified.stderr));
}

fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let name = std::ffi::CString::new(path.as_os_str().as_bytes()).expect("no NUL");
    // SAFETY: `name` is a valid NUL-terminated path that outlives the call.
    let rc = unsafe { libc::mkfifo(name.as_ptr(), 0o600) };
    assert_eq!(rc, 0, "mkfifo {}", path.display());
}

#[test]
fn fifo_inputs_are_refused_not_waited_on() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (d, fifo_delta, fifo_st) = (dir.path(), dir.path().join("f.tpde"), dir.path().join("f.safetensors"));
    mkfifo(&fifo_delta);
    mkfifo(&fifo_st);
    let target = d.join("t.safetensors");
    write_safetensors(&target, &[("w", vec![4])]);
    let delta = d.join("d.tpde");
    assert!(run(&[Path::new("encode"), &target, Path::new("-o"), &delta]).status.success());
    let sharded = d.join("s");
    write_sharded(&sharded, &[("a.safetensors", vec![("w", vec![4])])]);
    std::fs::remove_file(sharded.join("a.safetensors")).expect("rm");
    mkfifo(&sharded.join("a.safetensors"));

    let out = d.join("out.safetensors");
    let cases: [&[&Path]; 5] = [
        &[Path::new("inspect"), &fifo_delta],
        &[Path::new("apply"), &fifo_st, &delta, Path::new("-o"), &out],
        &[Path::new("encode"), &fifo_st, Path::new("-o"), &d.join("x.tpde")],
        &[Path::new("verify"), &delta, Path::new("--target"), &fifo_st],
        &[Path::new("encode"), &sharded, Path::new("-o"), &d.join("y.tpde")],
    ];
    for args in cases {
        assert_eq!(code_of(&run(args)), "E_IO", "tpde {args:?}");
    }
}
