//! The model-level API: a delta rebuilt on the GPU against a checkpoint, against
//! named tensors already on the device, or standalone, bit for bit the target's
//! tensors; a base that does not fit is refused with the library's codes. They
//! need a CUDA GPU, so CI reports them as ignored; run them with
//! `--include-ignored` on a GPU machine.
#![allow(clippy::cast_possible_truncation)] // small test values

use std::sync::Arc;

use tpde::{encode, Checkpoint, DeltaFile, Dtype, EncodeOptions, ErrorCode, NoProgress};
use tpde_cuda::{
    cudarc::driver::CudaSlice, Base, DeviceTensor, Gpu, GpuError, Loader, LoaderConfig, RebuiltTensor, ResidentTensor,
    ResidentTensorMut,
};

mod common;
use common::write_bf16_safetensors;

fn bytes(words: &[u16]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// A BF16 tensor of a base on the device that a call may overwrite.
fn resident_mut<'b>(name: &'b str, shape: &'b [u64], buffer: &'b mut CudaSlice<u8>) -> ResidentTensorMut<'b> {
    ResidentTensorMut { name, dtype: Dtype::BF16, shape, buffer, bytes: 2 * shape[0] as usize }
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
    // 400 KB of target fits one staging slot: one batch.
    assert_eq!(loader.last_timings().batches, 1, "{}", loader.last_timings());
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

/// The model-level in-place call: tensors whose target has their dtype and shape
/// are rebuilt inside them, the others into new buffers, bit for bit; a wrong base
/// is `E_BASE_DIGEST` with nothing written; tensors that share memory are refused.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_delta_rebuilds_in_place_over_named_resident_tensors() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let a: Vec<u16> = (0..300_000u32).map(|i| 0x3C00 | (i.wrapping_mul(2_654_435_761) >> 22) as u16).collect();
    let b: Vec<u16> = (0..5_000u32).map(|i| 0x3F80 | (i % 97) as u16).collect();
    let c: Vec<u16> = (0..1_000u32).map(|i| 0x3E00 | (i % 31) as u16).collect();
    let a2: Vec<u16> = a.iter().enumerate().map(|(i, &w)| if i % 29 == 0 { w.wrapping_add(1) } else { w }).collect();
    let c2: Vec<u16> = (0..1_500u32).map(|i| 0x3E00 | (i % 37) as u16).collect();
    let new: Vec<u16> = (0..777u32).map(|i| 0x4000 | (i % 13) as u16).collect();
    let (base_path, target_path) = (dir.path().join("base.safetensors"), dir.path().join("target.safetensors"));
    write_bf16_safetensors(&base_path, &[("a", &a), ("b", &b), ("c", &c)]);
    write_bf16_safetensors(&target_path, &[("a", &a2), ("b", &b), ("c", &c2), ("new", &new)]);
    let base = Checkpoint::open(&base_path).expect("opens");
    let target = Checkpoint::open(&target_path).expect("opens");
    let options = EncodeOptions { chunk_words: 4096, ..EncodeOptions::default() };
    let delta_path = dir.path().join("d.tpde");
    encode(Some(&base), &target, &delta_path, options, &NoProgress).expect("encodes");
    let delta = DeltaFile::open(&delta_path).expect("opens");

    let gpu = Arc::new(Gpu::new(0).expect("a CUDA GPU"));
    let mut loader = Loader::new(gpu.clone(), LoaderConfig::default()).expect("a loader");
    let shapes = [[a.len() as u64], [b.len() as u64], [c.len() as u64]];
    let upload = |words: &[u16]| gpu.upload(&bytes(words)).expect("upload");
    let (mut a_dev, mut b_dev, mut c_dev) = (upload(&a), upload(&b), upload(&c));

    // A wrong base: refused before anything is written.
    let mut other = a.clone();
    other[12_345] ^= 0x40;
    let mut other_dev = upload(&other);
    {
        let mut wrong = [
            resident_mut("a", &shapes[0], &mut other_dev),
            resident_mut("b", &shapes[1], &mut b_dev),
            resident_mut("c", &shapes[2], &mut c_dev),
        ];
        let Err(GpuError::Format(e)) = loader.apply_model_in_place(&delta, &mut wrong, true) else {
            panic!("a wrong base was applied")
        };
        assert_eq!((e.code(), e.tensor()), (ErrorCode::BaseDigest, Some("a")));
    }
    assert!(gpu.download(&other_dev).expect("download") == bytes(&other), "the wrong base was written");

    let rebuilt = {
        let mut on_device = [
            resident_mut("b", &shapes[1], &mut b_dev),
            resident_mut("a", &shapes[0], &mut a_dev),
            resident_mut("c", &shapes[2], &mut c_dev),
        ];
        loader.apply_model_in_place(&delta, &mut on_device, true).expect("applies")
    };
    let kinds: Vec<String> = rebuilt
        .iter()
        .map(|r| match r {
            RebuiltTensor::InPlace(i) => format!("in place {i}"),
            RebuiltTensor::New(t) => format!("new {}", t.name),
        })
        .collect();
    assert_eq!(kinds, ["in place 1", "in place 0", "new c", "new new"]);
    for (r, words) in rebuilt.iter().zip([&a2, &b, &c2, &new]) {
        if let RebuiltTensor::New(t) = r {
            let mut got = gpu.download(&t.buffer).expect("download");
            got.truncate(2 * words.len());
            assert!(got == bytes(words), "tensor {} differs from the target", t.name);
        }
    }
    assert!(gpu.download(&a_dev).expect("download") == bytes(&a2), "a was not rebuilt in place");
    assert!(gpu.download(&b_dev).expect("download") == bytes(&b), "b changed");
    assert!(gpu.download(&c_dev).expect("download") == bytes(&c), "c, rebuilt elsewhere, was written");

    // Two names over the same memory (tied weights) are refused.
    let mut first = upload(&a);
    let ptr = {
        let (ptr, _sync) = tpde_cuda::cudarc::driver::DevicePtr::device_ptr(&first, gpu.stream());
        ptr
    };
    // SAFETY: `ptr` is `first`'s allocation, alive for the whole test; the alias
    // is leaked below, never freed.
    let mut alias = unsafe { gpu.stream().upgrade_device_ptr::<u8>(ptr, 2 * a.len()) };
    let tied_shape = [a.len() as u64];
    let mut tied = [resident_mut("a", &shapes[0], &mut first), resident_mut("b", &tied_shape, &mut alias)];
    let delta_ab_path = dir.path().join("ab.tpde");
    let twin = dir.path().join("twin.safetensors");
    write_bf16_safetensors(&twin, &[("a", &a), ("b", &a)]);
    let twin_target = dir.path().join("twin-target.safetensors");
    write_bf16_safetensors(&twin_target, &[("a", &a2), ("b", &a2)]);
    let (twin, twin_target) = (Checkpoint::open(&twin).expect("opens"), Checkpoint::open(&twin_target).expect("opens"));
    encode(Some(&twin), &twin_target, &delta_ab_path, options, &NoProgress).expect("encodes");
    let delta_ab = DeltaFile::open(&delta_ab_path).expect("opens");
    let Err(e) = loader.apply_model_in_place(&delta_ab, &mut tied, false) else { panic!("tied tensors were rebuilt") };
    assert!(matches!(e, GpuError::InvalidArgument(_)), "{e}");
    let _ = alias.leak();
}
