//! CPU decoding of streams into page-locked slots: zstd (and stored) streams
//! by the format library's decoder, in parallel ([`decode_stream`]). Constant
//! streams are filled here only where a loader path stages decoded bytes;
//! the batched path fills them on the device.

use std::cell::RefCell;

use rayon::prelude::*;
use tpde::{
    format::{
        rans::{self, ContextKind, Contexts, TableForm},
        Codec, StreamRecord,
    },
    ErrorCode, Result as FormatResult,
};

use crate::error::{GpuError, Result};
use crate::rans::is_rans;

/// A stream to decode or copy into a host slot: its offset there, its
/// record, its stored bytes, and which chunk of the batch it belongs to.
pub(super) type StreamTask<'a> = (usize, StreamRecord, &'a [u8], usize);

/// Bytes of stored bytes that one thread copies at a time.
const COPY_PIECE: usize = 256 << 10;

/// Decodes (zstd) or copies (stored) streams into `host` at their offsets,
/// in parallel. Offsets increase and the streams do not overlap. A format
/// error names the tensor and chunk that `label` gives for the task's chunk.
pub(super) fn decode_tasks<'n>(
    host: &mut [u8],
    tasks: &[StreamTask<'_>],
    label: impl Fn(usize) -> Option<(&'n str, u64)> + Sync,
) -> Result<()> {
    let mut rest = host;
    let mut at = 0usize;
    let mut work = Vec::with_capacity(tasks.len());
    for (off, r, bytes, chunk) in tasks {
        // the stored bytes of a lane rANS stream go to the device as they are
        let len = if is_rans(r.codec) { r.stored_len } else { r.decoded_len } as usize;
        if *off < at || off + len - at > rest.len() {
            return Err(GpuError::invalid("streams exceed the staging slot"));
        }
        let (_, tail) = std::mem::take(&mut rest).split_at_mut(off - at);
        let (dst, tail) = tail.split_at_mut(len);
        rest = tail;
        at = off + len;
        work.push((dst, r, *bytes, *chunk));
    }
    work.into_par_iter().try_for_each(|(dst, r, bytes, chunk)| {
        if is_rans(r.codec) {
            // In pieces, so that one large stream does not hold up the batch
            // on one thread.
            dst.par_chunks_mut(COPY_PIECE).zip(bytes.par_chunks(COPY_PIECE)).for_each(|(d, s)| d.copy_from_slice(s));
            return Ok(());
        }
        decode_stream(r, bytes, dst).map_err(|e| match (e, label(chunk)) {
            (GpuError::Format(e), Some((tensor, index))) => GpuError::Format(e.in_tensor(tensor).in_chunk(index)),
            (e, _) => e,
        })
    })
}

thread_local! {
    /// Decoded bytes of one zstd stream, reused from stream to stream: the
    /// library's decoder appends to a `Vec`, and the result is copied into
    /// the page-locked slot.
    static DECODED: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Decodes one stream into `dst` (exactly its decoded length) with the
/// format library's own decoder, which enforces the zstd profile of
/// `spec/FORMAT.md` §8.5 (one frame with its content size, no trailing
/// bytes, a bounded window) and the rules of lane rANS (§8.7, §8.9), and reports
/// the library's codes. A lane rANS stream must have context 0 here (the
/// plane above or the base that another context reads is not given);
/// the loader decodes every lane rANS stream on the device.
pub fn decode_stream(record: &StreamRecord, stored: &[u8], dst: &mut [u8]) -> Result<()> {
    let len = record.decoded_len as usize;
    if dst.len() != len || stored.len() != record.stored_len as usize {
        return Err(GpuError::invalid("stream lengths differ from the stream record"));
    }
    match record.codec {
        Codec::Stored => {
            if stored.len() != len {
                let e = tpde::Error::new(
                    ErrorCode::StreamLength,
                    "a stored stream's length differs from its decoded length",
                );
                return Err(GpuError::Format(e));
            }
            dst.copy_from_slice(stored);
            Ok(())
        }
        Codec::Constant => {
            let [value] = *stored else {
                let e = tpde::Error::new(ErrorCode::StreamLength, "a constant stream stores other than one byte");
                return Err(GpuError::Format(e));
            };
            dst.fill(value);
            Ok(())
        }
        Codec::Zstd => DECODED
            .with(|cell| -> FormatResult<()> {
                let mut decoded = cell.borrow_mut();
                decoded.clear();
                tpde::format::zstd::decompress_into(stored, len, &mut decoded)?;
                dst.copy_from_slice(&decoded);
                Ok(())
            })
            .map_err(GpuError::Format),
        // Context 0 only: the plane above or the base that another context
        // reads is not at hand here; the loader decodes those on the device.
        Codec::Rans | Codec::RansPacked => {
            let form = if record.codec == Codec::Rans { TableForm::Bytes } else { TableForm::Packed };
            if rans::context_kind(stored)? != ContextKind::None {
                return Err(GpuError::invalid("a lane rANS stream with a context needs its context to decode"));
            }
            DECODED
                .with(|cell| -> FormatResult<()> {
                    let mut decoded = cell.borrow_mut();
                    rans::decode_into(form, stored, len, Contexts::None, &mut decoded)?;
                    dst.copy_from_slice(&decoded);
                    Ok(())
                })
                .map_err(GpuError::Format)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A constant stream fills its slot with its one byte; any other stored
    /// length is the library's `E_STREAM_LENGTH`.
    #[test]
    fn a_constant_stream_fills_its_slot() {
        let record = |stored_len| StreamRecord { stored_len, decoded_len: 5, codec: Codec::Constant };
        let mut dst = [0u8; 5];
        decode_stream(&record(1), &[0xA7], &mut dst).unwrap();
        assert_eq!(dst, [0xA7; 5]);
        for (stored_len, stored) in [(0, &[][..]), (2, &[1, 1])] {
            let e = decode_stream(&record(stored_len), stored, &mut dst).unwrap_err();
            let GpuError::Format(e) = e else { panic!("{e}") };
            assert_eq!(e.code(), ErrorCode::StreamLength);
        }
    }

    /// A stream the library's decoder refuses is reported with its code,
    /// naming the tensor and the chunk's index in the file.
    #[test]
    fn a_bad_stream_names_its_tensor_and_chunk() {
        let good = tpde::format::zstd::compress(&[3u8; 64], tpde::format::zstd::Effort::Level(1)).unwrap();
        let mut trailing = good.clone();
        trailing.push(0);
        let record = |stored: &[u8]| StreamRecord {
            stored_len: u32::try_from(stored.len()).unwrap(),
            decoded_len: 64,
            codec: Codec::Zstd,
        };
        let tasks = [(0, record(&good), good.as_slice(), 0), (64, record(&trailing), trailing.as_slice(), 1)];
        let mut host = vec![0u8; 128];
        let labels = [("a", 3u64), ("b", 7)];
        let e = decode_tasks(&mut host, &tasks, |k| Some(labels[k])).unwrap_err();
        let GpuError::Format(e) = e else { panic!("{e}") };
        assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::ZstdProfile, Some("b"), Some(7)));
    }
}
