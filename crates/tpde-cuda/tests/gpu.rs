//! GPU tests: bit-exact with the format library's decoder and the CPU
//! reference. They need a CUDA GPU, so CI reports them as ignored; run them
//! with `--include-ignored` on a GPU machine.
#![allow(clippy::cast_possible_truncation)]

mod common;

use std::sync::{Arc, OnceLock};

use common::*;
use tpde::{
    format::{rans::TableForm, Codec, PositionCoding, StreamRecord, ValueLayout, ValueOp, ValueOrder},
    EncodeSettings,
};
use tpde_cuda::{
    reference, reference::flag, Checksums, ChunkRef, EncodedTensor, Gpu, GpuError, Loader, LoaderConfig, PinnedDelta,
    TensorRef, WordWidth,
};

/// Level 3 with lane rANS (and constant streams) or without, either table form,
/// and zstd kept wherever it gains `min_zstd_gain`, with no floor in bytes, so that
/// these small tests meet zstd streams too.
fn settings(min_zstd_gain: f64, rans: bool, packed_tables: bool) -> EncodeSettings {
    EncodeSettings { level: 3, min_zstd_gain, rans, zstd: true, constant: rans, packed_tables, zstd_min_saving: 0 }
}

fn gpu() -> Arc<Gpu> {
    static GPU: OnceLock<Arc<Gpu>> = OnceLock::new();
    GPU.get_or_init(|| Arc::new(Gpu::new(0).expect("a CUDA GPU"))).clone()
}

fn loader(slot_bytes: usize) -> Loader {
    Loader::new(gpu(), LoaderConfig { slots: 3, slot_bytes, max_chunks: 64, verify_digests: true }).unwrap()
}

/// Every chunk's stored bytes back to back, as in a delta file, with an
/// odd offset in front so that word values land misaligned too.
fn packed(t: &EncodedTensor) -> Vec<u8> {
    let mut v = vec![0u8; 3];
    for c in &t.chunks {
        v.extend_from_slice(&c.data);
    }
    v
}

/// A view of `t` whose stored bytes are read from `host` (see [`packed`]),
/// so that stored streams take the direct-copy path.
fn hosted<'a>(t: &'a EncodedTensor, host: &'a [u8]) -> TensorRef<'a> {
    let mut r = t.as_ref();
    let mut at = 3;
    for c in &mut r.chunks {
        c.stored = &host[at..at + c.stored.len()];
        at += c.stored.len();
    }
    r.host = Some(host);
    r
}

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
            for (choice, grouped) in CHOICES.into_iter().flat_map(|c| GROUPED.map(|g| (c, g))) {
                for op in OPS {
                    for layout in LAYOUTS {
                        let level = (k % 2 == 0).then_some(1);
                        let t = forced_tensor_in(&base, &target, w, 40_000, choice, op, layout, level, grouped);
                        let host = packed(&t);
                        let ctx = format!("{w:?} every={every} {choice:?} {op:?} {layout:?} grouped {grouped}");
                        for (how, tr) in [("ring", t.as_ref()), ("host", hosted(&t, &host))] {
                            // into a new buffer, against a resident base
                            let out = l.load(std::slice::from_ref(&tr), &[&dbase]).unwrap();
                            assert!(g.download(&out[0]).unwrap() == target, "load {how} {ctx}");
                            // in place on a copy of the base
                            let mut buf = vec![g.upload(&base).unwrap()];
                            l.apply_in_place(std::slice::from_ref(&tr), &mut buf).unwrap();
                            assert!(g.download(&buf[0]).unwrap() == target, "in place {how} {ctx}");
                        }
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
    // What the writer chooses for float words at two settings, with and without
    // lane rANS (codec 4, and codec 2 once), and a tensor whose values are
    // grouped by base key whatever the writer would predict.
    let written = [(0.0, true, true), (0.0, true, false), (0.5, true, true), (0.0, false, false), (0.5, false, false)]
        .map(|(min_zstd_gain, rans, packed_tables)| {
            let s = settings(min_zstd_gain, rans, packed_tables);
            EncodedTensor::encode("w", Some(&base), &target, WordWidth::W4, 1 << 16, true, s).unwrap()
        });
    let grouped = forced_tensor_in(
        &base,
        &target,
        WordWidth::W4,
        1 << 16,
        Choice::SparseGaps,
        ValueOp::Sub,
        ValueLayout::BytePlanes,
        Some(1),
        true,
    );
    assert!(grouped.chunks.iter().all(|c| c.record.value_order == ValueOrder::GroupedByBase));
    for t in written.into_iter().chain([grouped]) {
        let host = packed(&t);
        for tr in [t.as_ref(), hosted(&t, &host)] {
            let dbase = g.upload(&base).unwrap();
            let mut out = g.alloc_zeros::<u8>(target.len()).unwrap();
            for _ in 0..3 {
                l.materialize_into(&tr, &dbase, &mut out).unwrap();
                assert!(g.download(&out).unwrap() == target);
            }
            let mut buf = g.upload(&base).unwrap();
            l.materialize_in_place(&tr, &mut buf).unwrap();
            assert!(g.download(&buf).unwrap() == target);
            let outs = l.load_host_base(std::slice::from_ref(&tr), &[&base]).unwrap();
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
    }
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
    for (choice, grouped) in CHOICES.into_iter().flat_map(|c| GROUPED.map(|g| (c, g))) {
        let t = forced_tensor_in(
            &padded,
            &target,
            WordWidth::W2,
            3_000,
            choice,
            ValueOp::Sub,
            ValueLayout::Words,
            None,
            grouped,
        );
        let d = g.upload(short).unwrap();
        let out = l.load(&[t.as_ref()], &[&d]).unwrap();
        assert!(g.download(&out[0]).unwrap() == target, "{choice:?} grouped {grouped}");
    }
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn positions_are_rebuilt_on_the_gpu() {
    let mut l = loader(8 << 20);
    // 2.5 M gaps: more than 256 tiles, so the scan carries between passes
    let (base, target) = pair(WordWidth::W1, 5_000_000, 2, 3);
    for choice in [Choice::SparseGaps, Choice::SparseBitmap] {
        let c = forced_chunk(&base, &target, WordWidth::W1, choice, ValueOp::Xor, ValueLayout::Words, None);
        let r = ChunkRef {
            record: c.record,
            streams: &c.streams,
            stored: &c.data,
            words: 5_000_000,
            resolved_positions: None,
        };
        let expect = reference::chunk_positions(&r, &reference::decode_streams(&r).unwrap()).unwrap();
        let got = l.positions(&r, WordWidth::W1).unwrap();
        assert!(got == expect, "{choice:?}");
    }
}

fn corrupt_chunk_error(coding: PositionCoding, gap_width: u8, planes: &[&[u8]], m: u32, n: u32) -> GpuError {
    let g = gpu();
    let mut l = loader(1 << 20);
    let values = vec![1u8; m as usize * 4];
    let mut streams: Vec<StreamRecord> = planes
        .iter()
        .map(|p| StreamRecord { stored_len: p.len() as u32, decoded_len: p.len() as u32, codec: Codec::Stored })
        .collect();
    streams.push(StreamRecord { stored_len: m * 4, decoded_len: m * 4, codec: Codec::Stored });
    let mut data = planes.concat();
    data.extend_from_slice(&values);
    let record = sparse_record(m, coding, gap_width, &streams);
    let t = TensorRef {
        name: "bad".into(),
        width: WordWidth::W4,
        words: u64::from(n),
        chunk_words: n,
        first_chunk: 0,
        chunks: vec![ChunkRef { record, streams: &streams, stored: &data, words: n, resolved_positions: None }],
        host: None,
        checksums: Checksums::Checked,
    };
    let base = g.alloc_zeros::<u8>(n as usize * 4).unwrap();
    // a canary after the tensor must survive: nothing is written out of range
    let mut out = g.upload(&vec![0xAA; n as usize * 4 + 256]).unwrap();
    let e = l.materialize_into(&t, &base, &mut out).expect_err("corrupt positions must be rejected");
    let back = g.download(&out).unwrap();
    assert!(back[n as usize * 4..].iter().all(|b| *b == 0xAA), "out-of-range write");
    e
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn bad_positions_raise_the_device_flag() {
    // each bit surfaces as the format library's code for the same fault
    let is = |e: GpuError, bit: u32| e.format_code().is_some() && e.format_code() == flag::format_code(bit);
    // position 10 in a chunk of 10 words; a zero gap after the first
    assert!(is(corrupt_chunk_error(PositionCoding::Gaps, 1, &[&[3, 7]], 2, 10), flag::POSITION_RANGE));
    assert!(is(corrupt_chunk_error(PositionCoding::Gaps, 1, &[&[3, 0]], 2, 10), flag::ZERO_GAP));
    // a huge 4-byte gap that would wrap a 32-bit sum
    let e = corrupt_chunk_error(PositionCoding::Gaps, 4, &[&[1, 0xff], &[0, 0xff], &[0, 0xff], &[0, 0xff]], 2, 10);
    assert!(is(e, flag::POSITION_RANGE));
    // bitmap padding bit, and a count mismatch
    assert!(is(corrupt_chunk_error(PositionCoding::Bitmap, 0, &[&[1, 0x80]], 1, 10), flag::BITMAP_PADDING));
    assert!(is(corrupt_chunk_error(PositionCoding::Bitmap, 0, &[&[0b101, 0]], 1, 10), flag::COUNT_MISMATCH));
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

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("tpde-cuda-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[test]
#[ignore = "needs a CUDA GPU"]
fn a_delta_file_written_by_the_format_library_loads_bit_exact() {
    let g = gpu();
    let dir = temp_dir("file");
    let (b32, t32) = pair(WordWidth::W4, 300_000, 19, 21);
    let (b16, t16) = pair(WordWidth::W2, 70_000, 1, 22);
    let (b8, t8) = pair(WordWidth::W8, 50_000, 1000, 23);
    let (b1, t1) = pair(WordWidth::W1, 99_999, 5, 24);
    write_safetensors(
        &dir.join("base.safetensors"),
        &[
            ("a", "F32", vec![300_000], &b32),
            ("b", "BF16", vec![70_000], &b16),
            ("c", "F64", vec![50_000], &b8),
            ("d", "U8", vec![99_999], &b1),
        ],
    );
    write_safetensors(
        &dir.join("target.safetensors"),
        &[
            ("a", "F32", vec![300_000], &t32),
            ("b", "BF16", vec![70_000], &t16),
            ("c", "F64", vec![50_000], &t8),
            ("d", "U8", vec![99_999], &t1),
        ],
    );
    let base = tpde::Checkpoint::open(&dir.join("base.safetensors")).unwrap();
    let target = tpde::Checkpoint::open(&dir.join("target.safetensors")).unwrap();
    // lane rANS in codec 4, then codec 2, then none
    for (min_zstd_gain, rans, packed_tables) in [(0.0, true, true), (0.5, true, false), (0.0, false, false)] {
        let opts = tpde::EncodeOptions { chunk_words: 32_768, settings: settings(min_zstd_gain, rans, packed_tables) };
        let path = dir.join("d.tpde");
        tpde::encode(Some(&base), &target, &path, opts, &tpde::NoProgress).unwrap();
        let file = tpde::DeltaFile::open(&path).unwrap();
        let pinned = PinnedDelta::open(&g, &path).unwrap();
        let host = tpde_cuda::host_bases(&file, Some(&base)).unwrap();
        let mut l = loader(4 << 20);
        for refs in [tpde_cuda::tensor_refs(&file, true).unwrap(), pinned.tensor_refs(true).unwrap()] {
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
                assert!(g.download(&out).unwrap() == f.tensor_bytes(loc), "{}", t.name);
            }
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// Vocabulary growth: every dtype width (float dtypes, whose values the
/// writer groups by base key, §8.6, and U8), the target with more rows than
/// the base; the first third of every target changes in every element, so
/// that the file has grouped dense chunks as well as grouped sparse ones.
/// The GPU result, copied back, must equal the library's
/// `DeltaFile::decode_tensor` (which checks every chunk digest) and match
/// each chunk's recorded XXH3-128 digest itself: into new buffers from a
/// resident base, and in place over the (zero-padded) base.
#[test]
#[ignore = "needs a CUDA GPU"]
fn gpu_results_match_the_library_decoder_and_its_digests_with_a_grown_vocabulary() {
    let g = gpu();
    let dir = temp_dir("vocab");
    let cols = 96usize;
    let (rows_b, rows_t) = (1000usize, 1337usize);
    let dtypes = [("U8", WordWidth::W1), ("BF16", WordWidth::W2), ("F32", WordWidth::W4), ("F64", WordWidth::W8)];
    let mut bases = Vec::new();
    let mut targets = Vec::new();
    for (i, (_, w)) in dtypes.iter().enumerate() {
        let (b, mut t) = pair(*w, rows_t * cols, 9, 40 + i as u64);
        for j in 0..rows_t * cols / 3 {
            write_word(&mut t, *w, j, read_word(&b, *w, j) ^ (1 + (j as u64 % 5)));
        }
        bases.push(b[..rows_b * cols * w.bytes()].to_vec());
        targets.push(t);
    }
    let names = ["u8", "bf16", "f32", "f64"];
    let entries = |data: &[Vec<u8>], rows: usize| -> Vec<(&str, &str, Vec<u64>, Vec<u8>)> {
        names
            .iter()
            .zip(&dtypes)
            .zip(data)
            .map(|((n, (d, _)), b)| (*n, *d, vec![rows as u64, cols as u64], b.clone()))
            .collect()
    };
    let write = |path: &std::path::Path, e: &[(&str, &str, Vec<u64>, Vec<u8>)]| {
        let refs: Vec<(&str, &str, Vec<u64>, &[u8])> =
            e.iter().map(|(n, d, s, b)| (*n, *d, s.clone(), b.as_slice())).collect();
        write_safetensors(path, &refs);
    };
    write(&dir.join("base.safetensors"), &entries(&bases, rows_b));
    write(&dir.join("target.safetensors"), &entries(&targets, rows_t));
    let base = tpde::Checkpoint::open(&dir.join("base.safetensors")).unwrap();
    let target = tpde::Checkpoint::open(&dir.join("target.safetensors")).unwrap();
    let mut l = loader(1 << 20);
    // lane rANS in codec 4, then codec 2, then none
    for (min_zstd_gain, rans, packed_tables) in [(0.0, true, true), (0.25, true, false), (0.0, false, false)] {
        let opts = tpde::EncodeOptions { chunk_words: 10_000, settings: settings(min_zstd_gain, rans, packed_tables) };
        let path = dir.join("d.tpde");
        tpde::encode(Some(&base), &target, &path, opts, &tpde::NoProgress).unwrap();
        let pinned = PinnedDelta::open(&g, &path).unwrap();
        let file = pinned.file();
        let host = tpde_cuda::host_bases(file, Some(&base)).unwrap();
        let refs = pinned.tensor_refs(true).unwrap();
        let expect: Vec<Vec<u8>> = refs
            .iter()
            .zip(&host)
            .map(|(t, hb)| file.decode_tensor(file.tensor(&t.name).unwrap(), Some(hb)).unwrap())
            .collect();
        let check = |t: &TensorRef<'_>, got: &[u8], expect: &[u8], how: &str| {
            assert!(got == expect, "{} {how}", t.name);
            let entry = file.tensor(&t.name).unwrap();
            let wb = t.width.bytes();
            for span in file.spans(entry).unwrap() {
                let at = span.first_word as usize * wb;
                let bytes = &got[at..at + span.words as usize * wb];
                assert_eq!(
                    tpde::format::leaf_digest(bytes),
                    file.chunk(span.index).digest,
                    "{} chunk {} {how}",
                    t.name,
                    span.index
                );
            }
        };
        for ((t, hb), e) in refs.iter().zip(&host).zip(&expect) {
            assert!(hb.len() < t.bytes(), "{}: the base must be shorter", t.name);
            let db = g.upload(hb).unwrap();
            let mut out = g.alloc_zeros::<u8>(t.bytes()).unwrap();
            l.materialize_into(t, &db, &mut out).unwrap();
            check(t, &g.download(&out).unwrap(), e, "materialize_into");
        }
        // every tensor at once: into new buffers, and in place
        let dbases: Vec<_> = host.iter().map(|hb| g.upload(hb).unwrap()).collect();
        let outs = l.load(&refs, &dbases.iter().collect::<Vec<_>>()).unwrap();
        for ((t, o), e) in refs.iter().zip(&outs).zip(&expect) {
            check(t, &g.download(o).unwrap(), e, "load");
        }
        let mut bufs: Vec<_> = refs
            .iter()
            .zip(&host)
            .map(|(t, hb)| {
                let mut padded = hb.to_vec();
                padded.resize(t.bytes(), 0);
                g.upload(&padded).unwrap()
            })
            .collect();
        l.apply_in_place(&refs, &mut bufs).unwrap();
        for ((t, o), e) in refs.iter().zip(&bufs).zip(&expect) {
            check(t, &g.download(o).unwrap(), e, "apply_in_place");
        }
        let outs = l.load_host_base(&refs, &host).unwrap();
        for ((t, o), e) in refs.iter().zip(&outs).zip(&expect) {
            check(t, &g.download(o).unwrap(), e, "load_host_base");
        }
        // decoded once into device memory, then kernels only
        let staged = l.stage_on_device(&refs).unwrap();
        let mut outs: Vec<_> = refs.iter().map(|t| g.alloc_zeros::<u8>(t.bytes()).unwrap()).collect();
        l.apply_staged(&staged, &dbases.iter().collect::<Vec<_>>(), &mut outs).unwrap();
        for ((t, o), e) in refs.iter().zip(&outs).zip(&expect) {
            check(t, &g.download(o).unwrap(), e, "apply_staged");
        }
    }
    std::fs::remove_dir_all(&dir).ok();
}

/// The bytes the GPU reads are the ones the format library validated: every
/// chunk's stored bytes lie inside the page-locked buffer that
/// `DeltaFile::from_bytes` checked, not in a second read of the file.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_pinned_delta_serves_the_bytes_that_were_validated() {
    let g = gpu();
    // run time first: the binary may run on another machine than it was built on
    let crate_dir = std::env::var_os("CARGO_MANIFEST_DIR")
        .map_or_else(|| env!("CARGO_MANIFEST_DIR").into(), std::path::PathBuf::from);
    let path = &crate_dir.join("../../conformance/valid/mixed/delta.tpde");
    let pinned = PinnedDelta::open(&g, path).unwrap();
    let validated = pinned.file().bytes();
    assert_eq!(validated, std::fs::read(path).unwrap().as_slice());
    let range = validated.as_ptr_range();
    for t in pinned.tensor_refs(true).unwrap() {
        assert_eq!(t.host.map(<[u8]>::as_ptr), Some(validated.as_ptr()));
        for c in &t.chunks {
            let r = c.stored.as_ptr_range();
            assert!(range.start <= r.start && r.end <= range.end, "{}", t.name);
        }
    }
}

/// A chunk whose rebuilt bytes differ from its recorded digest is the
/// library's `E_CHUNK_DIGEST`, naming the tensor and chunk, on every API;
/// with the check turned off (trusted files) the same load succeeds.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_wrong_chunk_digest_is_caught_on_the_device() {
    let g = gpu();
    let w = WordWidth::W2;
    let (base, target) = pair(w, 50_000, 7, 5);
    let mut t = EncodedTensor::encode("t", Some(&base), &target, w, 8192, true, EncodeSettings::default()).unwrap();
    t.chunks[3].record.digest[0] ^= 1;
    let r = t.as_ref();
    let db = g.upload(&base).unwrap();
    let is_digest = |e: GpuError| match e {
        GpuError::Format(e) => {
            e.code() == tpde::ErrorCode::ChunkDigest && e.tensor() == Some("t") && e.chunk() == Some(3)
        }
        _ => false,
    };
    let mut l = loader(1 << 20);
    let mut out = g.alloc_zeros::<u8>(r.bytes()).unwrap();
    assert!(is_digest(l.materialize_into(&r, &db, &mut out).unwrap_err()));
    assert!(is_digest(l.load(std::slice::from_ref(&r), &[&db]).unwrap_err()));
    assert!(is_digest(l.load_host_base(std::slice::from_ref(&r), &[&base]).unwrap_err()));
    let staged = l.stage_on_device(std::slice::from_ref(&r)).unwrap();
    let mut outs = vec![g.alloc_zeros::<u8>(r.bytes()).unwrap()];
    assert!(is_digest(l.apply_staged(&staged, &[&db], &mut outs).unwrap_err()));

    let trusted = LoaderConfig { slots: 3, slot_bytes: 1 << 20, max_chunks: 64, verify_digests: false };
    let mut l = Loader::new(g.clone(), trusted).unwrap();
    l.materialize_into(&r, &db, &mut out).unwrap();
    assert!(g.download(&out).unwrap() == target);
}

/// A dense chunk that changes more words than it declares is the library's
/// `E_CHANGED_COUNT` on the GPU too (the conformance suite's
/// `sparse-zero-value` covers a sparse value that changes nothing).
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_changed_count_that_the_values_contradict_is_caught_on_the_device() {
    let g = gpu();
    let w = WordWidth::W4;
    let (base, target) = pair(w, 20_000, 3, 9);
    for grouped in [false, true] {
        let mut c = forced_chunk_in(&base, &target, w, Choice::Dense, ValueOp::Xor, ValueLayout::Words, None, grouped);
        c.record.changed_count -= 1;
        let r = TensorRef {
            name: "t".into(),
            width: w,
            words: 20_000,
            chunk_words: 20_000,
            first_chunk: 0,
            chunks: vec![ChunkRef {
                record: c.record,
                streams: &c.streams,
                stored: &c.data,
                words: 20_000,
                resolved_positions: None,
            }],
            host: None,
            checksums: Checksums::Checked,
        };
        let db = g.upload(&base).unwrap();
        let mut out = g.alloc_zeros::<u8>(r.bytes()).unwrap();
        let e = loader(1 << 20).materialize_into(&r, &db, &mut out).unwrap_err();
        assert_eq!(e.format_code(), Some(tpde::ErrorCode::ChangedCount), "grouped {grouped}: {e}");
        // The kernel's flag names no chunk; the error does.
        let GpuError::Format(e) = e else { panic!("a format error: {e}") };
        assert_eq!((e.tensor(), e.chunk()), (Some("t"), Some(0)), "grouped {grouped}");
    }
}

/// The codecs of lane rANS tests: every context mix, and lane rANS next to
/// zstd and stored streams in one chunk, with packed tables (codec 4, what
/// the writer emits); and codec 2 with the mixes that reach every context.
const RANS_CODECS: [Codecs; 6] = [
    Codecs::Rans(RansMix::None, TableForm::Packed),
    Codecs::Rans(RansMix::Chained, TableForm::Packed),
    Codecs::Rans(RansMix::BaseKeys, TableForm::Packed),
    Codecs::Mixed(TableForm::Packed),
    Codecs::Rans(RansMix::Chained, TableForm::Bytes),
    Codecs::Rans(RansMix::BaseKeys, TableForm::Bytes),
];

/// Lane rANS streams (codec 2, spec §8.7, and codec 4, §8.9) decode on the
/// GPU from their stored bytes: every encoding, word width, value op, layout and order,
/// every context (none, the plane above, the base key, dense and sparse),
/// through the ring and straight from page-locked memory, into new buffers
/// and in place. The chunks are those the library's decoder rebuilds.
#[test]
#[ignore = "needs a CUDA GPU"]
fn lane_rans_streams_decode_on_the_gpu_for_every_encoding_and_width() {
    let g = gpu();
    let mut l = loader(1 << 20);
    for w in WordWidth::ALL {
        for (k, every) in [1usize, 7, 1500].into_iter().enumerate() {
            let n = 50_003;
            let (base, target) = pair(w, n, every, 61 + k as u64);
            let dbase = g.upload(&base).unwrap();
            for (choice, grouped) in CHOICES.into_iter().flat_map(|c| GROUPED.map(|g| (c, g))) {
                for op in OPS {
                    for layout in LAYOUTS {
                        for codecs in RANS_CODECS {
                            let t = forced_tensor_coded(&base, &target, w, 20_000, choice, op, layout, grouped, codecs);
                            let ctx = format!(
                                "{w:?} every={every} {choice:?} {op:?} {layout:?} grouped {grouped} {codecs:?}"
                            );
                            // the library rebuilds the same first chunk
                            let cb = 20_000 * w.bytes();
                            let got = library_decode(&t.chunks[0], &base[..cb], 20_000, w);
                            assert!(got == target[..cb], "library {ctx}");
                            let host = packed(&t);
                            for (how, tr) in [("ring", t.as_ref()), ("host", hosted(&t, &host))] {
                                let out = l.load(std::slice::from_ref(&tr), &[&dbase]).unwrap();
                                assert!(g.download(&out[0]).unwrap() == target, "load {how} {ctx}");
                                let mut buf = vec![g.upload(&base).unwrap()];
                                l.apply_in_place(std::slice::from_ref(&tr), &mut buf).unwrap();
                                assert!(g.download(&buf[0]).unwrap() == target, "in place {how} {ctx}");
                            }
                        }
                    }
                }
            }
        }
    }
}

/// Every other entry point with lane rANS streams: `materialize_into` (three
/// times into the same buffer), `materialize_in_place`, `load_host_base`, and
/// a delta staged on the device, whose base-key streams (and the planes
/// under them) are decoded at each apply against the base it is given.
#[test]
#[ignore = "needs a CUDA GPU"]
fn lane_rans_streams_decode_in_every_entry_point() {
    let g = gpu();
    // A chunk of 2^16 eight-byte words, its stored streams and their scratch.
    let mut l = loader(2 << 20);
    for w in WordWidth::ALL {
        let (base, target) = pair(w, 300_000, 9, 5);
        for (choice, codecs) in [
            (Choice::SparseGaps, Codecs::Rans(RansMix::BaseKeys, TableForm::Packed)),
            (Choice::SparseBitmap, Codecs::Rans(RansMix::Chained, TableForm::Packed)),
            (Choice::Dense, Codecs::Rans(RansMix::Chained, TableForm::Packed)),
            (Choice::Dense, Codecs::Mixed(TableForm::Packed)),
            (Choice::Raw, Codecs::Rans(RansMix::Chained, TableForm::Packed)),
            (Choice::SparseGaps, Codecs::Rans(RansMix::Chained, TableForm::Bytes)),
            (Choice::Dense, Codecs::Mixed(TableForm::Bytes)),
        ] {
            let t = forced_tensor_coded(
                &base,
                &target,
                w,
                1 << 16,
                choice,
                ValueOp::Sub,
                ValueLayout::RotatedBytePlanes,
                false,
                codecs,
            );
            let ctx = format!("{w:?} {choice:?} {codecs:?}");
            let host = packed(&t);
            for tr in [t.as_ref(), hosted(&t, &host)] {
                let dbase = g.upload(&base).unwrap();
                let mut out = g.alloc_zeros::<u8>(target.len()).unwrap();
                for _ in 0..3 {
                    l.materialize_into(&tr, &dbase, &mut out).unwrap();
                    assert!(g.download(&out).unwrap() == target, "materialize_into {ctx}");
                }
                let mut buf = g.upload(&base).unwrap();
                l.materialize_in_place(&tr, &mut buf).unwrap();
                assert!(g.download(&buf).unwrap() == target, "materialize_in_place {ctx}");
                let outs = l.load_host_base(std::slice::from_ref(&tr), &[&base]).unwrap();
                assert!(g.download(&outs[0]).unwrap() == target, "load_host_base {ctx}");
                assert!(g.download(&dbase).unwrap() == base, "the base is untouched {ctx}");
                let staged = l.stage_on_device(std::slice::from_ref(&tr)).unwrap();
                for _ in 0..2 {
                    let mut outs = vec![g.alloc_zeros::<u8>(target.len()).unwrap()];
                    l.apply_staged(&staged, &[&dbase], &mut outs).unwrap();
                    assert!(g.download(&outs[0]).unwrap() == target, "apply_staged {ctx}");
                }
                let mut bufs = vec![g.upload(&base).unwrap()];
                l.apply_staged_in_place(&staged, &mut bufs).unwrap();
                assert!(g.download(&bufs[0]).unwrap() == target, "apply_staged_in_place {ctx}");
            }
        }
    }
}

/// Gap planes in lane rANS (the low plane conditioned on the one above) are
/// decoded on the GPU before the positions are rebuilt from them.
#[test]
#[ignore = "needs a CUDA GPU"]
fn positions_are_rebuilt_from_lane_rans_gap_planes() {
    let mut l = loader(8 << 20);
    // gaps of 300: two gap planes, the low one conditioned on the high one
    let (base, target) = pair(WordWidth::W2, 3_000_000, 300, 8);
    for (choice, form) in
        [Choice::SparseGaps, Choice::SparseBitmap].into_iter().flat_map(|c| TABLE_FORMS.map(|f| (c, f)))
    {
        let c = forced_chunk_coded(
            &base,
            &target,
            WordWidth::W2,
            choice,
            ValueOp::Xor,
            ValueLayout::BytePlanes,
            false,
            Codecs::Rans(RansMix::Chained, form),
        );
        assert!(c.streams.iter().all(|s| s.codec == form.codec()));
        if choice == Choice::SparseGaps {
            assert_eq!(c.record.gap_width, 2);
        }
        let r = ChunkRef {
            record: c.record,
            streams: &c.streams,
            stored: &c.data,
            words: 3_000_000,
            resolved_positions: None,
        };
        let expect: Vec<u32> = (0..3_000_000u32)
            .filter(|&i| read_word(&base, WordWidth::W2, i as usize) != read_word(&target, WordWidth::W2, i as usize))
            .collect();
        assert!(l.positions(&r, WordWidth::W2).unwrap() == expect, "{choice:?} {form:?}");
    }
}

/// A corrupt lane rANS stream is the library's `E_RANS_HEADER` or
/// `E_RANS_DECODE`, raised by the kernels and naming its tensor and chunk, on
/// every entry point; nothing is written outside the output. The fixed
/// header bytes are checked on the host, with the same code. Codecs 2 and 4.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_corrupt_lane_rans_stream_is_a_device_fault_naming_its_chunk() {
    let g = gpu();
    let w = WordWidth::W4;
    let (base, target) = pair(w, 60_000, 4, 12);
    let cases =
        [(RansMix::None, Choice::Dense), (RansMix::BaseKeys, Choice::SparseGaps), (RansMix::Chained, Choice::Dense)];
    for ((mix, choice), form) in cases.into_iter().flat_map(|c| TABLE_FORMS.map(|f| (c, f))) {
        let clean = forced_tensor_coded(
            &base,
            &target,
            w,
            20_000,
            choice,
            ValueOp::Xor,
            ValueLayout::BytePlanes,
            false,
            Codecs::Rans(mix, form),
        );
        let bad_chunk = 1;
        let c = &clean.chunks[bad_chunk];
        let cb = 20_000 * w.bytes();
        let chunk_base = &base[bad_chunk * cb..(bad_chunk + 1) * cb];
        // the top value plane: its contexts are at hand (none or the base key)
        let q = c.streams.len() - 1;
        let start: usize = c.streams[..q].iter().map(|s| s.stored_len as usize).sum();
        let len = c.streams[q].stored_len as usize;
        let positions: Vec<u32> = (0..20_000u32)
            .filter(|&i| read_word(chunk_base, w, i as usize) != read_word(&target[bad_chunk * cb..], w, i as usize))
            .collect();
        let library = |stored: &[u8]| {
            let contexts = match tpde::format::rans::context_kind(stored).unwrap() {
                tpde::format::rans::ContextKind::BaseKey => tpde::format::rans::Contexts::BaseKeys {
                    base: chunk_base,
                    word_bytes: 4,
                    positions: (choice == Choice::SparseGaps).then_some(positions.as_slice()),
                },
                _ => tpde::format::rans::Contexts::None,
            };
            let mut out = Vec::new();
            tpde::format::rans::decode_into(form, stored, c.streams[q].decoded_len as usize, contexts, &mut out)
                .map_err(|e| e.code())
        };
        assert!(library(&c.data[start..start + len]).is_ok());
        // a table byte (header) and payload bytes (decode), as the library judges them
        let mut faults = Vec::new();
        for at in (4..len).rev().step_by(7) {
            let mut data = c.data.clone();
            data[start + at] ^= 0x10;
            if let Err(code) = library(&data[start..start + len]) {
                if !faults.iter().any(|(c, _)| *c == code) {
                    faults.push((code, data));
                }
            }
        }
        let mut fixed = c.data.clone();
        fixed[start] = 12; // prob_bits: refused on the host
        faults.push((tpde::ErrorCode::RansHeader, fixed));
        assert!(faults.iter().any(|(c, _)| *c == tpde::ErrorCode::RansDecode), "{mix:?} {form:?}: a decode fault");
        for (code, data) in faults {
            let mut t = clean.clone();
            t.chunks[bad_chunk].data = data;
            let r = t.as_ref();
            let is = |e: GpuError, how: &str| match e {
                GpuError::Format(e) => {
                    assert_eq!(
                        (e.code(), e.tensor(), e.chunk()),
                        (code, Some("t"), Some(bad_chunk as u64)),
                        "{mix:?} {form:?} {how}"
                    );
                }
                e => panic!("{mix:?} {form:?} {how}: {e}"),
            };
            let mut l = loader(1 << 20);
            let db = g.upload(&base).unwrap();
            let mut out = g.upload(&vec![0xAA; r.bytes() + 256]).unwrap();
            is(l.materialize_into(&r, &db, &mut out).unwrap_err(), "materialize_into");
            assert!(
                g.download(&out).unwrap()[r.bytes()..].iter().all(|b| *b == 0xAA),
                "{mix:?} {form:?}: out-of-range write"
            );
            is(l.load(std::slice::from_ref(&r), &[&db]).unwrap_err(), "load");
            let mut bufs = vec![g.upload(&base).unwrap()];
            is(l.apply_in_place(std::slice::from_ref(&r), &mut bufs).unwrap_err(), "apply_in_place");
            match l.stage_on_device(std::slice::from_ref(&r)) {
                Err(e) => is(e, "stage_on_device"),
                Ok(staged) => {
                    let mut outs = vec![g.alloc_zeros::<u8>(r.bytes()).unwrap()];
                    is(l.apply_staged(&staged, &[&db], &mut outs).unwrap_err(), "apply_staged");
                }
            }
            // the loader works again after a fault
            l.materialize_into(&clean.as_ref(), &db, &mut out).unwrap();
            assert!(g.download(&out).unwrap()[..target.len()] == target[..], "{mix:?} {form:?}: after the fault");
        }
    }
}

/// What the library's writer makes of fp32 weights where lane rANS pays
/// (every word changed by a small step: planes coded with the base key and
/// long tiles), with packed tables (codec 4) and without (codec 2), through
/// every entry point, against the library's decoder.
#[test]
#[ignore = "needs a CUDA GPU"]
fn the_writers_lane_rans_streams_decode_on_the_gpu() {
    let g = gpu();
    let mut l = loader(4 << 20);
    for (p, chunk_words, packed_tables) in
        [(1.0, 1 << 16, true), (1.0, 3000, true), (0.4, 1 << 16, true), (1.0, 1 << 16, false), (1.0, 3000, false)]
    {
        let (base, target) = float_pair(1 << 20, p, 17);
        let s = settings(0.0, true, packed_tables);
        let t = EncodedTensor::encode("w", Some(&base), &target, WordWidth::W4, chunk_words, true, s).unwrap();
        let ctx = format!("p {p}, chunks of {chunk_words} words, packed tables {packed_tables}");
        let codec = if packed_tables { Codec::RansPacked } else { Codec::Rans };
        let streams = || t.chunks.iter().flat_map(|c| &c.streams);
        let rans = streams().filter(|s| s.codec == codec).count();
        assert!(streams().all(|s| !s.codec.is_rans() || s.codec == codec), "{ctx}: one lane rANS codec");
        // Small chunks may pay more in tables than lane rANS saves; large ones do not.
        assert!(p < 1.0 || chunk_words < 1 << 16 || rans > 0, "{ctx}: the writer chose lane rANS");
        let cb = chunk_words as usize * 4;
        for (k, c) in t.chunks.iter().enumerate() {
            let (b, e) =
                (&base[k * cb..((k + 1) * cb).min(base.len())], &target[k * cb..((k + 1) * cb).min(base.len())]);
            assert!(library_decode(c, b, b.len() / 4, WordWidth::W4) == e, "{ctx}: library chunk {k}");
        }
        assert_every_entry_point_rebuilds(&g, &mut l, &t, &base, &target, &ctx);
    }
}

/// Constant streams (codec 3, spec §8.8) that the default writer chooses are
/// filled on the device, next to lane rANS planes coded on the plane above
/// them, through every entry point, bit-exact: a BF16 pair whose changes
/// touch only the low byte (the top value plane is constant), densely and
/// sparsely (the top gap plane is constant too).
#[test]
#[ignore = "needs a CUDA GPU"]
fn constant_streams_fill_on_the_gpu_in_every_entry_point() {
    let g = gpu();
    let mut l = loader(4 << 20);
    for (every, chunk_words) in [(1usize, 1 << 16), (1, 3000), (40, 1 << 16)] {
        let mut r = lcg(23 + every as u64);
        let words = 300_000;
        let base: Vec<u8> = (0..words * 2).map(|_| r() as u8).collect();
        let mut target = base.clone();
        for i in (0..words).step_by(every) {
            target[2 * i] ^= 1 + (r() % 7) as u8;
        }
        let s = EncodeSettings::default();
        let t = EncodedTensor::encode("w", Some(&base), &target, WordWidth::W2, chunk_words, true, s).unwrap();
        let ctx = format!("every {every}, chunks of {chunk_words} words");
        let constant = t.chunks.iter().flat_map(|c| &c.streams).filter(|s| s.codec == Codec::Constant).count();
        assert!(constant >= t.chunks.len(), "{ctx}: {constant} constant streams");
        assert_every_entry_point_rebuilds(&g, &mut l, &t, &base, &target, &ctx);
    }
}

/// Rebuilds `t` through every entry point, from the ring and from a
/// page-locked copy of its chunks: `materialize_into` twice into one buffer,
/// `load`, `apply_in_place`, `load_host_base` and a staged delta; each result
/// must be `target` byte for byte, and the resident base must be untouched.
fn assert_every_entry_point_rebuilds(
    g: &Gpu,
    l: &mut Loader,
    t: &EncodedTensor,
    base: &[u8],
    target: &[u8],
    ctx: &str,
) {
    let host = packed(t);
    for tr in [t.as_ref(), hosted(t, &host)] {
        let dbase = g.upload(base).unwrap();
        let mut out = g.alloc_zeros::<u8>(target.len()).unwrap();
        for _ in 0..2 {
            l.materialize_into(&tr, &dbase, &mut out).unwrap();
            assert!(g.download(&out).unwrap() == target, "materialize_into {ctx}");
        }
        let outs = l.load(std::slice::from_ref(&tr), &[&dbase]).unwrap();
        assert!(g.download(&outs[0]).unwrap() == target, "load {ctx}");
        let mut bufs = vec![g.upload(base).unwrap()];
        l.apply_in_place(std::slice::from_ref(&tr), &mut bufs).unwrap();
        assert!(g.download(&bufs[0]).unwrap() == target, "apply_in_place {ctx}");
        let outs = l.load_host_base(std::slice::from_ref(&tr), &[base]).unwrap();
        assert!(g.download(&outs[0]).unwrap() == target, "load_host_base {ctx}");
        let staged = l.stage_on_device(std::slice::from_ref(&tr)).unwrap();
        let mut outs = vec![g.alloc_zeros::<u8>(target.len()).unwrap()];
        l.apply_staged(&staged, &[&dbase], &mut outs).unwrap();
        assert!(g.download(&outs[0]).unwrap() == target, "apply_staged {ctx}");
        assert!(g.download(&dbase).unwrap() == base, "the base is untouched {ctx}");
    }
}

/// The slots of [`four_slots`].
const SLOT_BYTES: usize = 16 << 20;

/// A ring of four slots of [`SLOT_BYTES`], with the other settings default.
fn four_slots() -> LoaderConfig {
    LoaderConfig { slots: 4, slot_bytes: SLOT_BYTES, ..LoaderConfig::default() }
}

/// A call of one batch takes the ring's first slot only, call after call;
/// a call smaller than a slot but larger than the least batch (half a slot
/// in this ring) is spread over every slot, each allocated when first taken.
/// Bit-exact throughout.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_call_spreads_over_slots_allocated_on_first_use() {
    let (g, cfg, slot_bytes) = (gpu(), four_slots(), SLOT_BYTES);
    let mut l = Loader::new(g.clone(), cfg).unwrap();
    assert_eq!(l.staging_bytes(), slot_bytes, "one slot up front");
    let s = settings(0.0, true, true);
    // Every word of 32 MiB changed to random bits: 32 MiB of stored streams
    // in chunks of 4 MiB. Three fit a slot, one fits the batches of 8 MiB
    // that spread the call over the four slots.
    let (base, target) = pair(WordWidth::W4, 8 << 20, 1, 17);
    let big = EncodedTensor::encode("big", Some(&base), &target, WordWidth::W4, 1 << 20, false, s).unwrap();
    let (small_base, small_target) = (&base[..1 << 20], &target[..1 << 20]);
    let small =
        EncodedTensor::encode("small", Some(small_base), small_target, WordWidth::W4, 1 << 20, false, s).unwrap();
    let small_dev = g.upload(small_base).unwrap();
    for _ in 0..3 {
        let out = l.load(&[small.as_ref()], &[&small_dev]).unwrap();
        assert!(g.download(&out[0]).unwrap() == small_target);
        assert_eq!(l.last_timings().batches, 1);
        assert_eq!(l.staging_bytes(), slot_bytes, "a call of one batch took a second slot");
    }
    let big_dev = g.upload(&base).unwrap();
    let out = l.load(&[big.as_ref()], &[&big_dev]).unwrap();
    assert!(g.download(&out[0]).unwrap() == target);
    assert!(l.last_timings().batches >= 4, "{}", l.last_timings());
    assert_eq!(l.staging_bytes(), 4 * slot_bytes);
}

/// Where the chunks apply in place on a new output, the base words reach
/// every chunk, unchanged ones included, before any batch applies, and words
/// past a shorter base are zero. Checked with unchanged chunks between
/// changed ones, a base that ends inside a chunk, and batches small enough
/// that the chunks spread over several.
#[test]
#[ignore = "needs a CUDA GPU"]
fn base_words_reach_every_chunk_of_a_new_output() {
    use tpde::format::Encoding;
    let g = gpu();
    let words = 40_000;
    let (base, _) = pair(WordWidth::W4, words, 1, 23);
    let short = &base[..4 * (3 * 4096 + 100)];
    let mut target = short.to_vec();
    target.resize(base.len(), 0);
    for chunk in [1usize, 3, 4, 7] {
        for i in (chunk * 4096..((chunk + 1) * 4096).min(words)).step_by(5) {
            target[4 * i] ^= 0x5A;
        }
    }
    let mut padded = short.to_vec();
    padded.resize(base.len(), 0);
    let t = EncodedTensor::encode("w", Some(&padded), &target, WordWidth::W4, 4096, false, settings(0.0, true, true))
        .unwrap();
    let encodings: Vec<Encoding> = t.chunks.iter().map(|c| c.record.encoding).collect();
    assert!(encodings.contains(&Encoding::Unchanged) && encodings.contains(&Encoding::Sparse), "{encodings:?}");
    let d = g.upload(short).unwrap();
    for slot_bytes in [16 << 10, 1 << 20] {
        let mut l = loader(slot_bytes);
        let out = l.load(&[t.as_ref()], &[&d]).unwrap();
        assert!(g.download(&out[0]).unwrap() == target, "load, slots of {slot_bytes}");
        let mut into = g.upload(&vec![0xA5u8; target.len()]).unwrap();
        l.materialize_into(&t.as_ref(), &d, &mut into).unwrap();
        assert!(g.download(&into).unwrap() == target, "materialize_into, slots of {slot_bytes}");
    }
}

/// A call that writes in place allocates every slot its batches could take
/// (one job or more each) before its first write, so that an allocation
/// cannot fail with its buffers half rebuilt; a load into new buffers of the
/// same delta takes one slot. Bit-exact both ways.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_call_in_place_allocates_its_slots_before_it_writes() {
    let (g, cfg, slot_bytes) = (gpu(), four_slots(), SLOT_BYTES);
    // Four chunks of 64 KiB, every word changed: one batch.
    let (base, target) = pair(WordWidth::W4, 1 << 16, 1, 29);
    let t = EncodedTensor::encode("w", Some(&base), &target, WordWidth::W4, 1 << 14, false, settings(0.0, true, true))
        .unwrap();
    assert_eq!(t.chunks.len(), 4);
    let mut l = Loader::new(g.clone(), cfg).unwrap();
    let out = l.load(&[t.as_ref()], &[&g.upload(&base).unwrap()]).unwrap();
    assert!(g.download(&out[0]).unwrap() == target);
    assert_eq!((l.last_timings().batches, l.staging_bytes()), (1, slot_bytes));
    let mut l = Loader::new(g.clone(), cfg).unwrap();
    let mut bufs = vec![g.upload(&base).unwrap()];
    l.apply_in_place(&[t.as_ref()], &mut bufs).unwrap();
    assert!(g.download(&bufs[0]).unwrap() == target);
    assert_eq!((l.last_timings().batches, l.staging_bytes()), (1, 4 * slot_bytes));
}

/// Sparse chunks rebuilt into a new buffer get every word of it, the base's
/// and the changed ones: every width, position coding and value order, with
/// one tile or many, a tile spanning a whole chunk, and the writer's lane
/// rANS contexts. The output starts as a pattern that no word of the target
/// holds, and digests are off, so that only the bytes themselves can pass.
#[test]
#[ignore = "needs a CUDA GPU"]
fn sparse_chunks_write_every_word_of_a_new_output() {
    let g = gpu();
    let cfg = LoaderConfig { slots: 3, slot_bytes: 8 << 20, max_chunks: 64, verify_digests: false };
    let mut l = Loader::new(g.clone(), cfg).unwrap();
    let check = |l: &mut Loader, t: &EncodedTensor, base: &[u8], target: &[u8], ctx: &str| {
        let d = g.upload(base).unwrap();
        let mut out = g.upload(&vec![0xA5u8; target.len()]).unwrap();
        l.materialize_into(&t.as_ref(), &d, &mut out).unwrap();
        assert!(g.download(&out).unwrap() == target, "{ctx}");
    };
    for w in WordWidth::ALL {
        // 300_000 words a chunk: every 5000th word leaves one tile spanning
        // the chunk.
        for (k, every) in [3usize, 97, 5000].into_iter().enumerate() {
            let (base, target) = pair(w, 700_001, every, 41 + k as u64);
            for (choice, grouped) in
                [Choice::SparseGaps, Choice::SparseBitmap].into_iter().flat_map(|c| GROUPED.map(|g| (c, g)))
            {
                let t = forced_tensor_in(
                    &base,
                    &target,
                    w,
                    300_000,
                    choice,
                    ValueOp::Xor,
                    ValueLayout::Words,
                    None,
                    grouped,
                );
                check(&mut l, &t, &base, &target, &format!("{w:?} every {every} {choice:?} grouped {grouped}"));
            }
        }
    }
    // The writer's own choices: lane rANS values under base-key contexts,
    // whose sparse chunks apply from positions rebuilt as a list.
    for p in [0.05, 0.3] {
        let (base, target) = float_pair(600_000, p, 43);
        let t =
            EncodedTensor::encode("w", Some(&base), &target, WordWidth::W4, 1 << 17, false, settings(0.0, true, true))
                .unwrap();
        check(&mut l, &t, &base, &target, &format!("writer, p {p}"));
    }
}

/// Dense and raw chunks are hashed by their apply kernels as they are
/// written, and the digest pass skips their whole blocks: bit-exact with
/// digests checked, at every width, at lengths around XXH3's short input, its
/// block and a tile, into new buffers and in place; a wrong digest is still
/// caught.
#[test]
#[ignore = "needs a CUDA GPU"]
fn dense_and_raw_chunks_are_hashed_as_they_are_written() {
    let g = gpu();
    let mut l = loader(8 << 20);
    // 0, 0, 0 (the last block is never a term row), 1, 15, 48 and 976 whole blocks
    let lengths = [200usize, 1000, 1024, 1032, 16_384, 50_176, 1_000_008];
    for (w, choice) in WordWidth::ALL.into_iter().flat_map(|w| [(w, Choice::Dense), (w, Choice::Raw)]) {
        let cases: Vec<_> = lengths
            .iter()
            .enumerate()
            .map(|(k, &bytes)| {
                let n = bytes / w.bytes();
                let (base, target) = pair(w, n, 1, 90 + k as u64);
                let t =
                    forced_tensor_in(&base, &target, w, n, choice, ValueOp::Xor, ValueLayout::BytePlanes, None, false);
                (base, target, t)
            })
            .collect();
        let refs: Vec<TensorRef<'_>> = cases.iter().map(|(.., t)| t.as_ref()).collect();
        let bases: Vec<_> = cases.iter().map(|(b, ..)| g.upload(b).unwrap()).collect();
        let base_refs: Vec<_> = bases.iter().collect();
        let out = l.load(&refs, &base_refs).unwrap();
        for ((_, target, _), o) in cases.iter().zip(&out) {
            assert!(g.download(o).unwrap() == *target, "load {w:?} {choice:?}, {} bytes", target.len());
        }
        assert_eq!(l.last_timings().hashed_by_apply, 4, "load {w:?} {choice:?}");
        let mut bufs: Vec<_> = cases.iter().map(|(b, ..)| g.upload(b).unwrap()).collect();
        l.apply_in_place(&refs, &mut bufs).unwrap();
        for ((_, target, _), o) in cases.iter().zip(&bufs) {
            assert!(g.download(o).unwrap() == *target, "in place {w:?} {choice:?}, {} bytes", target.len());
        }
        assert_eq!(l.last_timings().hashed_by_apply, 4, "in place {w:?} {choice:?}");
        for k in 0..cases.len() {
            let mut wrong = cases[k].2.clone();
            wrong.chunks[0].record.digest[0] ^= 1;
            let mut refs = refs.clone();
            refs[k] = wrong.as_ref();
            let caught = match l.load(&refs, &base_refs) {
                Err(GpuError::Format(e)) => e.code() == tpde::ErrorCode::ChunkDigest,
                _ => false,
            };
            assert!(caught, "{w:?} {choice:?}, a wrong digest of {} bytes", lengths[k]);
        }
    }
}

/// A wrong digest is caught wherever its chunk falls in a call of several
/// batches (a changed chunk, unchanged ones before the first changed chunk,
/// between batches and after the last), named, by a load and in place; the
/// intact delta passes.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_wrong_digest_is_caught_wherever_its_chunk_falls() {
    let g = gpu();
    let words = 40_000;
    let (base, _) = pair(WordWidth::W4, words, 1, 31);
    let mut target = base.clone();
    for chunk in [1usize, 3, 4, 7] {
        for i in (chunk * 4096..(chunk + 1) * 4096).step_by(5) {
            target[4 * i] ^= 0x5A;
        }
    }
    let good =
        EncodedTensor::encode("w", Some(&base), &target, WordWidth::W4, 4096, false, settings(0.0, false, false))
            .unwrap();
    let unchanged: Vec<usize> = (0..good.chunks.len())
        .filter(|&k| good.chunks[k].record.encoding == tpde::format::Encoding::Unchanged)
        .collect();
    assert_eq!(unchanged, [0, 2, 5, 6, 8, 9]);
    let db = g.upload(&base).unwrap();
    // Slots of 48 KiB: batches of 24 KiB, one changed chunk each.
    let mut l = loader(48 << 10);
    let out = l.load(&[good.as_ref()], &[&db]).unwrap();
    assert!(g.download(&out[0]).unwrap() == target);
    assert!(l.last_timings().batches >= 3, "{}", l.last_timings());
    for k in [0u64, 3, 5, 9] {
        let mut t = good.clone();
        t.chunks[k as usize].record.digest[15] ^= 1;
        let is_digest = |e: GpuError| match e {
            GpuError::Format(e) => e.code() == tpde::ErrorCode::ChunkDigest && e.chunk() == Some(k),
            _ => false,
        };
        assert!(is_digest(l.load(&[t.as_ref()], &[&db]).unwrap_err()), "load, chunk {k}");
        let mut bufs = vec![g.upload(&base).unwrap()];
        assert!(is_digest(l.apply_in_place(&[t.as_ref()], &mut bufs).unwrap_err()), "in place, chunk {k}");
    }
}

/// A delta staged for its resident base decodes the streams coded against
/// the base once, so that every apply after is kernels only: bit-exact into
/// new buffers and in place, call after call, positional and grouped,
/// sparse and dense. Staged without a base, the same delta decodes them at
/// each apply. Another base fails its digests; a base shorter than the
/// target is refused.
#[test]
#[ignore = "needs a CUDA GPU"]
fn a_delta_staged_for_its_base_decodes_once() {
    let g = gpu();
    let mut l = loader(8 << 20);
    for (k, (p, grouped)) in [(0.05, false), (0.3, true), (1.0, false), (1.0, true)].into_iter().enumerate() {
        let ctx = format!("p {p}, grouped {grouped}");
        let (base, target) = float_pair(300_000, p, 60 + k as u64);
        let t = EncodedTensor::encode(
            "w",
            Some(&base),
            &target,
            WordWidth::W4,
            1 << 16,
            grouped,
            settings(0.0, true, true),
        )
        .unwrap();
        let db = g.upload(&base).unwrap();
        assert!(l.stage_on_device(&[t.as_ref()]).unwrap().decodes_at_apply(), "{ctx}: nothing coded against the base");
        let staged = l.stage_for_base(&[t.as_ref()], &[&db]).unwrap();
        assert!(!staged.decodes_at_apply(), "{ctx}");
        let mut outs = vec![g.alloc_zeros::<u8>(target.len()).unwrap()];
        for round in 0..2 {
            l.apply_staged(&staged, &[&db], &mut outs).unwrap();
            assert!(g.download(&outs[0]).unwrap() == target, "{ctx}: apply_staged, round {round}");
            let mut bufs = vec![g.upload(&base).unwrap()];
            l.apply_staged_in_place(&staged, &mut bufs).unwrap();
            assert!(g.download(&bufs[0]).unwrap() == target, "{ctx}: apply_staged_in_place, round {round}");
        }
        let mut other = base.clone();
        for word in other.chunks_exact_mut(4).step_by(997) {
            word[3] ^= 0x40;
        }
        let e = l.apply_staged(&staged, &[&g.upload(&other).unwrap()], &mut outs).unwrap_err();
        assert!(matches!(&e, GpuError::Format(f) if f.code() == tpde::ErrorCode::ChunkDigest), "{ctx}: {e:?}");
        let short = g.upload(&base[..base.len() - 4]).unwrap();
        assert!(matches!(l.stage_for_base(&[t.as_ref()], &[&short]), Err(GpuError::InvalidArgument(_))), "{ctx}");
    }
}
