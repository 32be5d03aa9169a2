//! Fault location: turning the device error flag into the library's error,
//! naming the tensor and chunk, and confirming it with the library's own
//! checks where it can.

use tpde::{format::rans::TableForm, ErrorCode, WordWidth};

use super::host_decode::decode_stream;
use super::inputs::{ChunkRef, TensorRef};
use crate::error::{flag, GpuError};
use crate::rans::{self, allowed_contexts, Header};

/// The error of the device flag `words` ([`flag::WORDS`] of them). A lane
/// rANS fault comes with the job index of a chunk that showed it, which
/// `label` turns into its tensor and chunk index.
pub(super) fn device_error<'n>(words: &[u32], label: impl Fn(u32) -> Option<(&'n str, u64)>) -> GpuError {
    let e = GpuError::from_flag(words[0]);
    let GpuError::Format(f) = e else { return e };
    let bit = match f.code() {
        ErrorCode::RansHeader => flag::RANS_HEADER,
        ErrorCode::RansDecode => flag::RANS_DECODE,
        _ => return GpuError::Format(f),
    };
    let job = flag::job_word(bit).and_then(|w| words.get(w)).copied().unwrap_or(u32::MAX);
    GpuError::Format(label_error(f, label(job)))
}

/// `e`, naming the tensor and chunk of `label` when there is one.
pub(super) fn label_error(e: tpde::Error, label: Option<(&str, u64)>) -> tpde::Error {
    match label {
        Some((tensor, chunk)) => e.in_tensor(tensor).in_chunk(chunk),
        None => e,
    }
}

/// A kernel's error flag says what is wrong with a delta but not where. The faults
/// it reports (positions, changed counts) need no base, so the format library's own
/// check of each chunk ([`tpde::format::check_chunk_payload`]) finds the first chunk
/// with the same fault, and the error names its tensor and chunk. A lane rANS fault
/// comes named by the device (the kernels record the chunk); the library's decoder
/// ([`tpde::format::rans::decode_into`]) then decodes that chunk's lane rANS streams
/// whose contexts need no base (§15.7), and where it finds the same fault, its error
/// (and message) is the one returned. This runs only on the error path; where no
/// chunk shows the fault on the CPU, `err` is returned as it is.
pub(super) fn locate_device_fault(delta: &[TensorRef<'_>], err: GpuError) -> GpuError {
    let (code, named) = match &err {
        GpuError::Format(e) => (e.code(), e.tensor().zip(e.chunk())),
        _ => return err,
    };
    if matches!(code, ErrorCode::RansHeader | ErrorCode::RansDecode) {
        for t in delta {
            for (k, c) in t.chunks.iter().enumerate() {
                let index = t.first_chunk + k as u64;
                if named.is_some_and(|(name, chunk)| name != t.name || chunk != index) {
                    continue;
                }
                if let Some(found) = library_rans_fault(c, t.width).filter(|f| f.code() == code) {
                    return GpuError::Format(found.in_tensor(&t.name).in_chunk(index));
                }
            }
        }
        return err;
    }
    if named.is_some() {
        return err;
    }
    let mut scratch = tpde::DecodeScratch::default();
    for t in delta {
        for (k, c) in t.chunks.iter().enumerate() {
            let input = tpde::format::ChunkInput {
                record: &c.record,
                streams: c.streams,
                stored: c.stored,
                base: None,
                words: c.words as usize,
                width: t.width,
                reference: None,
            };
            match tpde::format::check_chunk_payload(&input, &mut scratch) {
                Err(found) if found.code() == code => {
                    return GpuError::Format(found.in_tensor(&t.name).in_chunk(t.first_chunk + k as u64));
                }
                _ => {}
            }
        }
    }
    err
}

/// The format library's fault in a chunk's lane rANS streams, among those it can
/// decode without the base: context 0, and context 2 under a plane it decoded
/// (planes from the most significant down). `None` when it finds none.
fn library_rans_fault(c: &ChunkRef<'_>, width: WordWidth) -> Option<tpde::Error> {
    let n = c.streams.len();
    let stored: Vec<&[u8]> = c.stored_streams().collect();
    let mut decoded: Vec<Option<Vec<u8>>> = vec![None; n];
    for q in (0..n).rev() {
        let (r, bytes) = (&c.streams[q], *stored.get(q)?);
        let len = r.decoded_len as usize;
        let Some(form) = TableForm::of_codec(r.codec) else {
            let mut out = vec![0u8; len];
            decoded[q] = decode_stream(r, bytes, &mut out).ok().map(|()| out);
            continue;
        };
        let header = match Header::read(form, bytes, allowed_contexts(c, q, width)) {
            Ok(h) => h,
            Err(e) => return Some(e),
        };
        let contexts = match header.context {
            rans::context::NONE => tpde::format::rans::Contexts::None,
            rans::context::HIGHER_PLANE => match decoded.get(q + 1).and_then(Option::as_deref) {
                Some(above) => tpde::format::rans::Contexts::HigherPlane(above),
                None => continue,
            },
            // needs the base
            _ => continue,
        };
        let mut out = Vec::new();
        if let Err(e) = tpde::format::rans::decode_into(form, bytes, len, contexts, &mut out) {
            return Some(e);
        }
        decoded[q] = Some(out);
    }
    None
}

#[cfg(test)]
mod tests {
    use super::super::inputs::Checksums;
    use super::*;
    use tpde::format::{ChunkRecord, Encoding, PositionCoding, StreamRecord, ValueLayout};

    /// A kernel's flag names no chunk; the library's check of each chunk finds
    /// the one with the same fault, and only that one.
    #[test]
    fn a_device_fault_is_located_by_the_library_check() {
        // Every word changed: a dense chunk, whose streams do not depend on the count.
        let base = vec![0u8; 4096];
        let target: Vec<u8> = (0..4096).map(|i| u8::try_from(i % 251 + 1).unwrap()).collect();
        let settings = tpde::EncodeSettings::default();
        let good = tpde::format::encode_chunk(&target, Some(&base), WordWidth::W4, false, settings).unwrap();
        assert_eq!(good.record.encoding, tpde::format::Encoding::Dense);
        let mut bad = good.clone();
        bad.record.changed_count -= 1;
        fn chunk(c: &tpde::format::EncodedChunk) -> ChunkRef<'_> {
            ChunkRef { record: c.record, streams: &c.streams, stored: &c.data, words: 1024, resolved_positions: None }
        }
        let t = TensorRef {
            name: "w".into(),
            width: WordWidth::W4,
            words: 2048,
            chunk_words: 1024,
            first_chunk: 5,
            chunks: vec![chunk(&good), chunk(&bad)],
            host: None,
            checksums: Checksums::Checked,
        };
        let flagged = GpuError::from_flag(crate::error::flag::COUNT_MISMATCH);
        let GpuError::Format(e) = locate_device_fault(std::slice::from_ref(&t), flagged) else { panic!() };
        assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::ChangedCount, Some("w"), Some(6)));
        // A fault that no chunk shows on the CPU stays as the kernel reported it.
        let flagged = GpuError::from_flag(crate::error::flag::ZERO_GAP);
        let GpuError::Format(e) = locate_device_fault(std::slice::from_ref(&t), flagged) else { panic!() };
        assert_eq!((e.code(), e.chunk()), (ErrorCode::PositionsNotIncreasing, None));
    }
    /// A lane rANS fault comes named by the device (the job index the
    /// kernels recorded); the library's decoder finds the same fault in that
    /// chunk, and its error is the one returned. Unnamed, every chunk is
    /// searched. A chunk that the library finds sound leaves the device's
    /// error as it was. Codecs 2 and 4 alike.
    #[test]
    fn a_lane_rans_fault_is_named_by_the_device_and_confirmed_by_the_library() {
        for form in [TableForm::Bytes, TableForm::Packed] {
            lane_rans_fault_is_named_and_confirmed(form);
        }
    }

    fn lane_rans_fault_is_named_and_confirmed(form: TableForm) {
        use tpde::format::rans::{decode_into, encode, Contexts};
        let symbols: Vec<u8> = (0..5000u32).map(|i| u8::try_from(i % 7 + i % 3).unwrap()).collect();
        let good = encode(form, &symbols, Contexts::None);
        let decodes =
            |b: &[u8]| decode_into(form, b, symbols.len(), Contexts::None, &mut Vec::new()).map_err(|e| e.code());
        let bad = (4..good.len())
            .rev()
            .map(|at| {
                let mut b = good.clone();
                b[at] ^= 0x21;
                b
            })
            .find(|b| decodes(b) == Err(ErrorCode::RansDecode))
            .unwrap();
        let stream = |b: &[u8]| StreamRecord {
            stored_len: u32::try_from(b.len()).unwrap(),
            decoded_len: 5000,
            codec: form.codec(),
        };
        let record = |b: &[u8]| ChunkRecord {
            data_offset: 0,
            stored_len: u32::try_from(b.len()).unwrap(),
            changed_count: 5000,
            first_stream: 0,
            encoding: Encoding::Raw,
            value_op: tpde::format::ValueOp::Xor,
            value_layout: ValueLayout::Words,
            position_coding: PositionCoding::None,
            gap_width: 0,
            stream_count: 1,
            value_order: tpde::format::ValueOrder::Positional,
            checksum: 0,
            digest: [0; 16],
        };
        let (gs, bs) = ([stream(&good)], [stream(&bad)]);
        let chunk = |streams, b: &'static [u8]| ChunkRef {
            record: record(b),
            streams,
            stored: b,
            words: 5000,
            resolved_positions: None,
        };
        let (good, bad): (&'static [u8], &'static [u8]) = (good.leak(), bad.leak());
        let t = TensorRef {
            name: "w".into(),
            width: WordWidth::W1,
            words: 15_000,
            chunk_words: 5000,
            first_chunk: 5,
            chunks: vec![chunk(&gs, good), chunk(&bs, bad), chunk(&gs, good)],
            host: None,
            checksums: Checksums::Checked,
        };
        t.validate().unwrap();
        let labels = [("w", 5u64), ("w", 6), ("w", 7)];
        let words = [flag::RANS_DECODE, u32::MAX, 1, 0];
        let named = device_error(&words, |job| labels.get(job as usize).copied());
        let GpuError::Format(e) = &named else { panic!("{named}") };
        assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::RansDecode, Some("w"), Some(6)));
        for flagged in [named, GpuError::from_flag(flag::RANS_DECODE)] {
            let GpuError::Format(e) = locate_device_fault(std::slice::from_ref(&t), flagged) else { panic!() };
            assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::RansDecode, Some("w"), Some(6)));
            // the library's own error, not the kernel's
            assert!(!e.to_string().contains("GPU kernel"), "{e}");
        }
        // named at a chunk the library finds sound: the device's error stays
        let words = [flag::RANS_DECODE, u32::MAX, 2, 0];
        let GpuError::Format(e) = locate_device_fault(
            std::slice::from_ref(&t),
            device_error(&words, |job| labels.get(job as usize).copied()),
        ) else {
            panic!()
        };
        assert_eq!((e.code(), e.chunk()), (ErrorCode::RansDecode, Some(7)));
        // decode_stream decodes a context 0 stream with the library
        let mut out = vec![0u8; 5000];
        decode_stream(&gs[0], good, &mut out).unwrap();
        assert_eq!(out, symbols);
    }
}
