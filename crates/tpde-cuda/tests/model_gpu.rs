//! The model-level API: a delta rebuilt on the GPU against a checkpoint, against
//! named tensors already on the device, or standalone, bit for bit the target's
//! tensors; a base that does not fit is refused with the library's codes. They
//! need a CUDA GPU, so CI reports them as ignored; run them with
//! `--include-ignored` on a GPU machine.
#![allow(clippy::cast_possible_truncation)] // small test values

use std::sync::Arc;

use tpde::{encode, Checkpoint, DeltaFile, Dtype, EncodeOptions, ErrorCode, NoProgress};
use tpde_cuda::{cudarc::driver::CudaSlice, Base, DeviceTensor, Gpu, GpuError, Loader, LoaderConfig, ResidentTensor};

mod common;
use common::write_bf16_safetensors;

fn bytes(words: &[u16]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A BF16 tensor of a base on the device.
fn resident<'b>(name: &'b str, shape: &'b [u64], buffer: &'b CudaSlice<u8>) -> ResidentTensor<'b> {
    ResidentTensor { name, dtype: Dtype::BF16, shape, buffer, bytes: 2 * shape[0] as usize }
}

fn assert_target(gpu: &Gpu, got: &[DeviceTensor], expected: &[(&str, &[u16])]) {
    assert_eq!(got.len(), expected.len());
    for (tensor, (name, words)) in got.iter().zip(expected) {
        assert_eq!(tensor.name, *name);
        assert_eq!((tensor.dtype, tensor.shape.as_slice()), (Dtype::BF16, [words.len() as u64].as_slice()));
        let mut rebuilt = gpu.download(&tensor.buffer).expect("download");
        rebuilt.truncate(2 * words.len());
        assert!(rebuilt == bytes(words), "tensor {name} differs from the target");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_delta_rebuilds_by_name_against_every_kind_of_base() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let a: Vec<u16> = (0..300_000u32).map(|i| 0x3C00 | (i.wrapping_mul(2_654_435_761) >> 22) as u16).collect();
    let b: Vec<u16> = (0..5_000u32).map(|i| 0x3F80 | (i % 97) as u16).collect();
    let mut a2 = a.clone();
    for (i, w) in a2.iter_mut().enumerate() {
        if i % 29 == 0 {
            *w = w.wrapping_add(1);
        }
    }
    let new: Vec<u16> = (0..777u32).map(|i| 0x4000 | (i % 13) as u16).collect();
    let (base_path, target_path) = (dir.path().join("base.safetensors"), dir.path().join("target.safetensors"));
    write_bf16_safetensors(&base_path, &[("a", &a), ("b", &b)]);
    let target: [(&str, &[u16]); 3] = [("a", &a2), ("b", &b), ("new", &new)];
    write_bf16_safetensors(&target_path, &target);
    let base = Checkpoint::open(&base_path).expect("opens");
    let options = EncodeOptions { chunk_words: 4096, ..EncodeOptions::default() };
    let delta_path = dir.path().join("d.tpde");
    let target_ckpt = Checkpoint::open(&target_path).expect("opens");
    encode(Some(&base), &target_ckpt, &delta_path, options, &NoProgress).expect("encodes");
    let standalone_path = dir.path().join("standalone.tpde");
    encode(None, &target_ckpt, &standalone_path, options, &NoProgress).expect("encodes");
    let delta = DeltaFile::open(&delta_path).expect("opens");

    let gpu = Arc::new(Gpu::new(0).expect("a CUDA GPU"));
    let mut loader = Loader::new(gpu.clone(), LoaderConfig::default()).expect("a loader");
    let got = loader.load_model(&delta, Base::Checkpoint(&base)).expect("loads");
    assert_target(&gpu, &got, &target);
    let standalone = DeltaFile::open(&standalone_path).expect("opens");
    assert_target(&gpu, &loader.load_model(&standalone, Base::None).expect("loads"), &target);

    // the base already on the device, in another order than the delta's
    let (a_dev, b_dev) = (gpu.upload(&bytes(&a)).expect("upload"), gpu.upload(&bytes(&b)).expect("upload"));
    let shapes = [[a.len() as u64], [b.len() as u64], [1000]];
    let on_device = [resident("b", &shapes[1], &b_dev), resident("a", &shapes[0], &a_dev)];
    assert_target(&gpu, &loader.load_model(&delta, Base::Resident(&on_device)).expect("loads"), &target);
    assert_eq!(gpu.download(&a_dev).expect("download"), bytes(&a), "the resident base is left as it was");

    // bases that do not fit
    let code = |e: GpuError| match e {
        GpuError::Format(e) => e.code(),
        other => panic!("not a format error: {other}"),
    };
    let missing = [resident("a", &shapes[0], &a_dev)];
    assert_eq!(code(loader.load_model(&delta, Base::Resident(&missing)).unwrap_err()), ErrorCode::BaseMissingTensor);
    let short = [resident("a", &shapes[2], &a_dev), resident("b", &shapes[1], &b_dev)];
    assert_eq!(code(loader.load_model(&delta, Base::Resident(&short)).unwrap_err()), ErrorCode::BaseMismatch);
    let mut other = a.clone();
    other[12_345] ^= 0x40;
    let other_dev = gpu.upload(&bytes(&other)).expect("upload");
    let wrong = [resident("a", &shapes[0], &other_dev), resident("b", &shapes[1], &b_dev)];
    let err = loader.load_model(&delta, Base::Resident(&wrong)).unwrap_err();
    assert_eq!(code(err), ErrorCode::BaseDigest);
    assert_eq!(code(loader.load_model(&delta, Base::None).unwrap_err()), ErrorCode::BaseRequired);
}

/// Checksums left to the loader (`tensor_refs_checked_on_upload`, which
/// `load_model` uses) still refuse a corrupt chunk, naming the file, the tensor
/// and the chunk; in place, before anything is written.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_corrupt_chunk_is_refused_when_checked_on_upload() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let a: Vec<u16> = (0..200_000u32).map(|i| 0x3C00 | (i.wrapping_mul(2_654_435_761) >> 22) as u16).collect();
    let a2: Vec<u16> = a.iter().enumerate().map(|(i, &w)| if i % 7 == 0 { w ^ 3 } else { w }).collect();
    let (base_path, target_path) = (dir.path().join("base.safetensors"), dir.path().join("target.safetensors"));
    write_bf16_safetensors(&base_path, &[("a", &a)]);
    write_bf16_safetensors(&target_path, &[("a", &a2)]);
    let (base, target) = (Checkpoint::open(&base_path).expect("opens"), Checkpoint::open(&target_path).expect("opens"));
    let options = EncodeOptions { chunk_words: 16_384, ..EncodeOptions::default() };
    let good_path = dir.path().join("good.tpde");
    encode(Some(&base), &target, &good_path, options, &NoProgress).expect("encodes");
    // One byte of the last chunk's stored bytes flipped.
    let good = DeltaFile::open(&good_path).expect("opens");
    let last = good.header().tensors[0].first_chunk + good.header().tensors[0].chunk_count - 1;
    let at = good.stored_bytes(last).as_ptr() as usize - good.bytes().as_ptr() as usize;
    let mut file = good.bytes().to_vec();
    file[at] ^= 0x10;
    let bad_path = dir.path().join("bad.tpde");
    std::fs::write(&bad_path, &file).expect("writes");
    let bad = DeltaFile::open(&bad_path).expect("the header and chunk map are intact");

    let gpu = Arc::new(Gpu::new(0).expect("a CUDA GPU"));
    let mut loader = Loader::new(gpu.clone(), LoaderConfig::default()).expect("a loader");
    let a_dev = gpu.upload(&bytes(&a)).expect("upload");
    let shape = [a.len() as u64];
    let on_device = [resident("a", &shape, &a_dev)];
    assert_target(&gpu, &loader.load_model(&good, Base::Resident(&on_device)).expect("loads"), &[("a", &a2)]);
    let Err(GpuError::Format(e)) = loader.load_model(&bad, Base::Resident(&on_device)) else {
        panic!("a corrupt chunk was loaded")
    };
    assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::ChunkChecksum, Some("a"), Some(last)));
    assert_eq!(e.file(), Some(bad_path.as_path()));

    let refs = tpde_cuda::tensor_refs_checked_on_upload(&bad).expect("views");
    let mut bufs = vec![gpu.upload(&bytes(&a)).expect("upload")];
    let Err(GpuError::Format(e)) = loader.apply_in_place(&refs, &mut bufs) else { panic!("applied a corrupt chunk") };
    assert_eq!((e.code(), e.chunk()), (ErrorCode::ChunkChecksum, Some(last)));
    assert!(gpu.download(&bufs[0]).expect("download") == bytes(&a), "the buffer was written before the check");
}
