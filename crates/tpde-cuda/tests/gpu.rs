//! GPU tests: bit-exact with the CPU reference. They need a CUDA GPU, so CI
//! reports them as ignored; run them with `--include-ignored` on a GPU machine.
#![allow(
    clippy::cast_possible_truncation,
    clippy::cast_precision_loss,
    clippy::cast_sign_loss
)]

use std::sync::{Arc, OnceLock};

use tpde_cuda::encode::{EncodeSettings, EncodedTensor};
use tpde_cuda::error::flag;
use tpde_cuda::reference::{self, write_word, EncodeChoice};
use tpde_cuda::{
    ChunkKind, ChunkRef, Codec, Gpu, GpuError, Loader, LoaderConfig, PositionCoding, StreamRef,
    TensorRef, ValueLayout, ValueOp, WordWidth,
};

fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Arc::new(Gpu::new(0).expect("a CUDA GPU")))
        .clone()
}

fn loader(slot_bytes: usize) -> Loader {
    Loader::new(
        gpu(),
        LoaderConfig {
            slots: 3,
            slot_bytes,
            max_chunks: 64,
        },
    )
    .unwrap()
}

fn lcg(seed: u64) -> impl FnMut() -> u64 {
    let mut s = seed;
    move || {
        s = s
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        s >> 11
    }
}

/// A base and a target with every `every`-th word changed (plus a few far
/// apart, so that gaps need 2 and 4 bytes).
fn pair(w: WordWidth, n: usize, every: usize, seed: u64) -> (Vec<u8>, Vec<u8>) {
    let mut r = lcg(seed);
    let base: Vec<u8> = (0..n * w.bytes()).map(|_| r() as u8).collect();
    let mut target = base.clone();
    for i in (0..n).step_by(every) {
        let mut v = r() & w.mask();
        if v == reference::read_word(&base, w, i) {
            v ^= 1;
        }
        write_word(&mut target, w, i, v);
    }
    (base, target)
}

const CHOICES: [EncodeChoice; 4] = [
    EncodeChoice::SparseGaps,
    EncodeChoice::SparseBitmap,
    EncodeChoice::Dense,
    EncodeChoice::Raw,
];
const LAYOUTS: [ValueLayout; 3] = [
    ValueLayout::Words,
    ValueLayout::BytePlanes,
    ValueLayout::RotatedBytePlanes,
];

#[test]
#[ignore = "needs a CUDA GPU"]
fn every_encoding_width_op_and_layout_is_bit_exact() {
    let g = gpu();
    let mut l = loader(1 << 20);
    for w in WordWidth::ALL {
        for (k, every) in [1usize, 3, 97, 70_001].into_iter().enumerate() {
            let n = 150_003;
            let (base, target) = pair(w, n, every, 11 + k as u64);
            let dbase = g.upload(&base).unwrap();
            for choice in CHOICES {
                for op in [ValueOp::Xor, ValueOp::Sub] {
                    for layout in LAYOUTS {
                        let s = EncodeSettings {
                            choice,
                            op,
                            layout,
                            zstd_level: (k % 2 == 0).then_some(1),
                            chunk_words: 40_000,
                        };
                        let t = EncodedTensor::encode("t", &base, &target, w, s).unwrap();
                        let tr = t.as_ref();
                        let ctx = format!("{w:?} every={every} {choice:?} {op:?} {layout:?}");
                        // into a new buffer, against a resident base
                        let out = l.load(std::slice::from_ref(&tr), &[&dbase]).unwrap();
                        assert!(g.download(&out[0]).unwrap() == target, "load {ctx}");
                        // in place on a copy of the base
                        let mut buf = vec![g.upload(&base).unwrap()];
                        l.apply_in_place(std::slice::from_ref(&tr), &mut buf)
                            .unwrap();
                        assert!(g.download(&buf[0]).unwrap() == target, "in place {ctx}");
                    }
                }
            }
        }
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn materialize_and_host_base_paths_are_bit_exact() {
    let g = gpu();
    let mut l = loader(256 << 10);
    let (base, target) = pair(WordWidth::W4, 1 << 20, 20, 5);
    let s = EncodeSettings {
        choice: EncodeChoice::SparseGaps,
        op: ValueOp::Xor,
        layout: ValueLayout::BytePlanes,
        zstd_level: Some(3),
        chunk_words: 1 << 16,
    };
    let t = EncodedTensor::encode("w", &base, &target, WordWidth::W4, s).unwrap();
    let tr = t.as_ref();
    let dbase = g.upload(&base).unwrap();
    let mut out = g.alloc_zeros::<u8>(target.len()).unwrap();
    for _ in 0..3 {
        l.materialize_into(&tr, &dbase, &mut out).unwrap();
        assert!(g.download(&out).unwrap() == target);
    }
    let mut buf = g.upload(&base).unwrap();
    l.materialize_in_place(&tr, &mut buf).unwrap();
    assert!(g.download(&buf).unwrap() == target);
    let outs = l
        .load_host_base(std::slice::from_ref(&tr), &[&base])
        .unwrap();
    assert!(g.download(&outs[0]).unwrap() == target);
    // the base was left untouched by materialize_into
    assert!(g.download(&dbase).unwrap() == base);
    // a delta decoded once into device memory, applied by kernels only
    let staged = l.stage_on_device(std::slice::from_ref(&tr)).unwrap();
    let mut outs = vec![g.alloc_zeros::<u8>(target.len()).unwrap()];
    l.apply_staged(&staged, &[&dbase], &mut outs).unwrap();
    assert!(g.download(&outs[0]).unwrap() == target);
    let mut bufs = vec![g.upload(&base).unwrap()];
    l.apply_staged_in_place(&staged, &mut bufs).unwrap();
    assert!(g.download(&bufs[0]).unwrap() == target);
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_shorter_base_reads_as_zero_words() {
    let g = gpu();
    let mut l = loader(1 << 20);
    let (base, target) = pair(WordWidth::W2, 10_000, 7, 9);
    let short = &base[..6_000];
    let mut padded = short.to_vec();
    padded.resize(base.len(), 0);
    for choice in CHOICES {
        let s = EncodeSettings {
            choice,
            op: ValueOp::Sub,
            layout: ValueLayout::Words,
            zstd_level: None,
            chunk_words: 3_000,
        };
        let t = EncodedTensor::encode("t", &padded, &target, WordWidth::W2, s).unwrap();
        let d = g.upload(short).unwrap();
        let out = l.load(&[t.as_ref()], &[&d]).unwrap();
        assert!(g.download(&out[0]).unwrap() == target, "{choice:?}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn positions_are_rebuilt_on_the_gpu() {
    let mut l = loader(8 << 20);
    // 2.5 M gaps: more than 256 tiles, so the scan carries between passes
    let (base, target) = pair(WordWidth::W1, 5_000_000, 2, 3);
    for choice in [EncodeChoice::SparseGaps, EncodeChoice::SparseBitmap] {
        let c = reference::encode_chunk(
            &base,
            &target,
            WordWidth::W1,
            choice,
            ValueOp::Xor,
            ValueLayout::Words,
        )
        .unwrap();
        let expect = reference::chunk_positions(&c.spec, &c.positions()).unwrap();
        let streams: Vec<StreamRef<'_>> = c
            .streams
            .iter()
            .map(|s| StreamRef {
                codec: Codec::Stored,
                bytes: s,
                decoded_len: s.len(),
            })
            .collect();
        let got = l
            .positions(&ChunkRef {
                spec: c.spec,
                streams,
            })
            .unwrap();
        assert!(got == expect, "{choice:?}");
    }
}

fn corrupt_chunk_error(spec_kind: ChunkKind, positions: Vec<u8>, m: u32, n: u32) -> GpuError {
    let g = gpu();
    let mut l = loader(1 << 20);
    let w = WordWidth::W4;
    let values = vec![1u8; m as usize * 4];
    let spec = tpde_cuda::ChunkSpec {
        kind: spec_kind,
        op: ValueOp::Xor,
        layout: ValueLayout::Words,
        width: w,
        words: n,
        changed: m,
    };
    let np = spec.position_stream_count();
    let plen = positions.len() / np;
    let mut streams: Vec<StreamRef<'_>> = positions
        .chunks(plen)
        .map(|p| StreamRef {
            codec: Codec::Stored,
            bytes: p,
            decoded_len: p.len(),
        })
        .collect();
    streams.push(StreamRef {
        codec: Codec::Stored,
        bytes: &values,
        decoded_len: values.len(),
    });
    let t = TensorRef {
        name: "bad".into(),
        width: w,
        words: u64::from(n),
        chunk_words: n,
        chunks: vec![ChunkRef { spec, streams }],
    };
    let base = g.alloc_zeros::<u8>(n as usize * 4).unwrap();
    // a canary after the tensor must survive: nothing is written out of range
    let mut out = g.upload(&vec![0xAA; n as usize * 4 + 256]).unwrap();
    let e = l
        .materialize_into(&t, &base, &mut out)
        .expect_err("corrupt positions must be rejected");
    let back = g.download(&out).unwrap();
    assert!(
        back[n as usize * 4..].iter().all(|b| *b == 0xAA),
        "out-of-range write"
    );
    e
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_positions_raise_the_device_flag() {
    // position 10 in a chunk of 10 words
    let e = corrupt_chunk_error(
        ChunkKind::Sparse(PositionCoding::Gaps { width: 1 }),
        vec![3, 7],
        2,
        10,
    );
    assert!(
        matches!(e, GpuError::DeviceFlag(f) if f & flag::POSITION_RANGE != 0),
        "{e}"
    );
    // a zero gap after the first
    let e = corrupt_chunk_error(
        ChunkKind::Sparse(PositionCoding::Gaps { width: 1 }),
        vec![3, 0],
        2,
        10,
    );
    assert!(
        matches!(e, GpuError::DeviceFlag(f) if f & flag::ZERO_GAP != 0),
        "{e}"
    );
    // a huge 4-byte gap that would wrap a 32-bit sum
    let e = corrupt_chunk_error(
        ChunkKind::Sparse(PositionCoding::Gaps { width: 4 }),
        vec![1, 0xff, 0, 0xff, 0, 0xff, 0, 0xff],
        2,
        10,
    );
    assert!(
        matches!(e, GpuError::DeviceFlag(f) if f & flag::POSITION_RANGE != 0),
        "{e}"
    );
    // bitmap padding bit and a count mismatch
    let e = corrupt_chunk_error(
        ChunkKind::Sparse(PositionCoding::Bitmap),
        vec![1, 0x80],
        1,
        10,
    );
    assert!(
        matches!(e, GpuError::DeviceFlag(f) if f & flag::BITMAP_PADDING != 0),
        "{e}"
    );
    let e = corrupt_chunk_error(
        ChunkKind::Sparse(PositionCoding::Bitmap),
        vec![0b101, 0],
        1,
        10,
    );
    assert!(
        matches!(e, GpuError::DeviceFlag(f) if f & flag::COUNT_MISMATCH != 0),
        "{e}"
    );
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn zstd_streams_with_trailing_frames_are_rejected() {
    let g = gpu();
    let mut l = loader(1 << 20);
    let values = vec![7u8; 64];
    let mut z = zstd::bulk::compress(&values, 1).unwrap();
    let z2 = z.clone();
    z.extend_from_slice(&z2);
    let spec = tpde_cuda::ChunkSpec {
        kind: ChunkKind::Raw,
        op: ValueOp::Xor,
        layout: ValueLayout::Words,
        width: WordWidth::W4,
        words: 16,
        changed: 16,
    };
    let t = TensorRef {
        name: "z".into(),
        width: WordWidth::W4,
        words: 16,
        chunk_words: 16,
        chunks: vec![ChunkRef {
            spec,
            streams: vec![StreamRef {
                codec: Codec::Zstd,
                bytes: &z,
                decoded_len: 64,
            }],
        }],
    };
    let base = g.alloc_zeros::<u8>(64).unwrap();
    let e = l.load(&[t], &[&base]).expect_err("two frames");
    assert!(matches!(e, GpuError::Corrupt(_)), "{e}");
}

/// Writes a one-tensor-per-entry safetensors file.
fn write_safetensors(path: &std::path::Path, tensors: &[(&str, &str, Vec<u64>, &[u8])]) {
    let mut header = String::from("{");
    let mut off = 0usize;
    for (i, (name, dtype, shape, bytes)) in tensors.iter().enumerate() {
        let shape: Vec<String> = shape.iter().map(u64::to_string).collect();
        if i > 0 {
            header.push(',');
        }
        header.push_str(&format!(
            "\"{name}\":{{\"dtype\":\"{dtype}\",\"shape\":[{}],\"data_offsets\":[{off},{}]}}",
            shape.join(","),
            off + bytes.len()
        ));
        off += bytes.len();
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for (_, _, _, b) in tensors {
        out.extend_from_slice(b);
    }
    std::fs::write(path, out).unwrap();
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_delta_file_written_by_the_format_library_loads_bit_exact() {
    let g = gpu();
    let dir = std::env::temp_dir().join(format!("tpde-cuda-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let (b32, t32) = pair(WordWidth::W4, 300_000, 19, 21);
    let (b16, t16) = pair(WordWidth::W2, 70_000, 1, 22);
    let (b8, t8) = pair(WordWidth::W8, 50_000, 1000, 23);
    let (b1, t1) = pair(WordWidth::W1, 99_999, 5, 24);
    write_safetensors(
        &dir.join("base.safetensors"),
        &[
            ("a", "F32", vec![300_000], &b32),
            ("b", "BF16", vec![70_000], &b16),
            ("c", "I64", vec![50_000], &b8),
            ("d", "U8", vec![99_999], &b1),
        ],
    );
    write_safetensors(
        &dir.join("target.safetensors"),
        &[
            ("a", "F32", vec![300_000], &t32),
            ("b", "BF16", vec![70_000], &t16),
            ("c", "I64", vec![50_000], &t8),
            ("d", "U8", vec![99_999], &t1),
        ],
    );
    let base = tpde::Checkpoint::open(&dir.join("base.safetensors")).unwrap();
    let target = tpde::Checkpoint::open(&dir.join("target.safetensors")).unwrap();
    let opts = tpde::pipeline::encode::EncodeOptions {
        chunk_words: 32_768,
        ..Default::default()
    };
    let path = dir.join("d.tpde");
    tpde::pipeline::encode::encode(
        Some(&base),
        &target,
        &path,
        opts,
        &tpde::pipeline::NoProgress,
    )
    .unwrap();
    let file = tpde::DeltaFile::open(&path).unwrap();
    let refs = tpde_cuda::delta::tensor_refs(&file, true).unwrap();
    let host = tpde_cuda::delta::host_bases(&file, &base).unwrap();
    let mut l = loader(4 << 20);
    let outs = l.load_host_base(&refs, &host).unwrap();
    for (t, o) in refs.iter().zip(&outs) {
        let (f, loc) = target.tensor(&t.name).unwrap();
        assert!(g.download(o).unwrap() == f.tensor_bytes(loc), "{}", t.name);
    }
    // device-resident base, materialize one tensor at a time
    for (t, hb) in refs.iter().zip(&host) {
        let db = g.upload(hb).unwrap();
        let mut out = g.alloc_zeros::<u8>(t.bytes()).unwrap();
        l.materialize_into(t, &db, &mut out).unwrap();
        let (f, loc) = target.tensor(&t.name).unwrap();
        assert!(
            g.download(&out).unwrap() == f.tensor_bytes(loc),
            "{}",
            t.name
        );
    }
    std::fs::remove_dir_all(&dir).ok();
}
