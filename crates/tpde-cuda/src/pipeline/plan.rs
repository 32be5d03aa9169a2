//! Planning: a call's chunks become jobs (a chunk with its base and output
//! words), the output is prepared, and each batch of jobs is placed into a
//! slot (where every stream's bytes lie, and which the CPU decodes).

use tpde::{
    format::{Codec, Encoding, ValueLayout},
    WordWidth,
};

use super::faults::label_error;
use super::host_decode::StreamTask;
use super::inputs::{Checksums, ChunkRef, TensorRef};
use super::{align, Loader};
use crate::error::{GpuError, Result};
use crate::gpu::{Batch, DevRange, DeviceCopy, Stage};
use crate::kernels::{ChunkDesc, KEYS};
use crate::rans::{allowed_contexts, ChunkPlan, Header, RansWork};

/// A chunk to rebuild and where: `base` and `out` are its words in device
/// memory; `host` is its tensor's [`TensorRef::host`]; `label` its tensor's
/// name and its index in the file, which errors name.
pub(super) struct Job<'c, 'a> {
    pub(super) chunk: &'c ChunkRef<'a>,
    /// Whether the chunk's checksum is still to be checked (before upload).
    pub(super) checksums: Checksums,
    pub(super) width: WordWidth,
    pub(super) host: Option<&'a [u8]>,
    pub(super) base: DevRange,
    pub(super) out: DevRange,
    pub(super) label: Option<(&'c str, u64)>,
}

/// Where a stream's bytes lie in a slot: in the part uploaded from the
/// host slot, in the part only the device writes (lane rANS output and
/// scratch), or in the raw span copied straight from the page-locked host
/// delta (at that offset of the delta). Offsets are relative to their part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Place {
    Upload(usize),
    Device(usize),
    Host(usize),
}

/// A lane rANS stream of a batch: its checked header, its decoder level,
/// the contexts its place allows, where its stored bytes lie, and where its
/// scratch lies in the device part.
#[derive(Clone, Copy, Debug)]
pub(super) struct RansPlace {
    pub(super) header: Header,
    pub(super) level: u32,
    pub(super) allowed: u32,
    pub(super) stored: Place,
    pub(super) scratch: usize,
}

/// The streams of one job of a batch.
#[derive(Clone, Debug, Default)]
pub(super) struct JobPlace {
    /// Per stream, the decoded bytes that the apply kernels read.
    pub(super) streams: Vec<Place>,
    /// Per stream, lane rANS only.
    pub(super) rans: Vec<Option<RansPlace>>,
    /// Context 1 in a sparse chunk: the decoder level before which its
    /// positions are rebuilt, and their offset in the device part.
    pub(super) positions: Option<(u32, usize)>,
    /// Constant streams (codec 3) that the device fills: stream index and
    /// byte. They are never uploaded.
    pub(super) fills: Vec<(usize, u8)>,
}

/// Where the streams of one batch go in a slot. Device layout:
/// `[tables | upload part | device part | raw copy of the host delta]`,
/// the tables being the apply descriptors, then the lane rANS work's
/// ([`RansWork::write_tables`]); the host slot holds the tables and the
/// upload part, uploaded in one copy.
pub(super) struct Plan<'a> {
    /// Jobs in the batch.
    pub(super) count: usize,
    /// Bytes of the apply descriptor table (aligned).
    pub(super) table: usize,
    /// Bytes of the lane rANS tables (aligned), after the apply table.
    pub(super) rans_tables: usize,
    /// End of the upload part (tables included).
    pub(super) decoded_end: usize,
    /// Start of the device part.
    pub(super) device_start: usize,
    /// The host range copied as it is, and where it lands in the slot.
    pub(super) raw: Option<(&'a [u8], usize)>,
    /// The offset of that range in the host delta.
    raw_lo: usize,
    /// Every stream of every job.
    pub(super) places: Vec<JobPlace>,
    /// Streams to decode or copy into the host slot.
    pub(super) tasks: Vec<StreamTask<'a>>,
}

impl Plan<'_> {
    /// The slot offset of a place.
    pub(super) fn offset(&self, place: Place) -> usize {
        match (place, self.raw) {
            (Place::Upload(o), _) => self.table + self.rans_tables + o,
            (Place::Device(o), _) => self.device_start + o,
            (Place::Host(o), Some((_, at))) => at + o - self.raw_lo,
            // a host place implies a raw span
            (Place::Host(_), None) => usize::MAX,
        }
    }
}

impl Loader {
    /// Prepares `out` for a tensor and appends its chunks to `jobs`, and
    /// the copy of its base words to `copies`, if it needs one.
    pub(super) fn plan_tensor<'c, 'a>(
        &mut self,
        t: &'c TensorRef<'a>,
        base: DevRange,
        out: DevRange,
        jobs: &mut Vec<Job<'c, 'a>>,
        copies: &mut Vec<DeviceCopy>,
    ) -> Result<()> {
        if self.prepare_out(base, out, t.bytes(), t.width, t.needs_base_words(), copies)? {
            self.plan_chunks(t, out, out, jobs)
        } else {
            self.plan_chunks(t, base, out, jobs)
        }
    }

    /// Prepares `out` where the chunks need the base words in it (sparse or
    /// unchanged chunks, or a base shorter than the target, whose missing
    /// words read as 0 per spec "Words"): the base's copy is appended to
    /// `copies`, which [`Loader::begin`] makes in one launch, and the missing
    /// words are zeroed on the main stream. Returns whether the chunks then
    /// apply in place on `out`.
    pub(super) fn prepare_out(
        &mut self,
        base: DevRange,
        out: DevRange,
        tb: usize,
        width: WordWidth,
        needs_base: bool,
        copies: &mut Vec<DeviceCopy>,
    ) -> Result<bool> {
        if base.len() == tb && !needs_base {
            return Ok(false);
        }
        let main = self.gpu.stream().clone();
        let n = base.len().min(tb) / width.bytes() * width.bytes();
        if base.ptr() < out.ptr() + tb as u64 && out.ptr() < base.ptr() + n as u64 {
            return Err(GpuError::invalid("base and output overlap"));
        }
        if n > 0 {
            copies.push(DeviceCopy::new(out.sub(0, n)?, base.sub(0, n)?)?);
        }
        if n < tb {
            out.sub(n, tb - n)?.fill_async(&main, 0)?;
        }
        Ok(true)
    }

    pub(super) fn plan_chunks<'c, 'a>(
        &self,
        t: &'c TensorRef<'a>,
        base: DevRange,
        out: DevRange,
        jobs: &mut Vec<Job<'c, 'a>>,
    ) -> Result<()> {
        let w = t.width.bytes();
        let mut off = 0usize;
        for (k, c) in t.chunks.iter().enumerate() {
            let n = c.words as usize * w;
            if c.record.encoding != Encoding::Unchanged {
                jobs.push(Job {
                    chunk: c,
                    checksums: t.checksums,
                    width: t.width,
                    host: t.host,
                    base: base.sub(off, n)?,
                    out: out.sub(off, n)?,
                    label: Some((&t.name, t.first_chunk + k as u64)),
                });
            } else if t.checksums == Checksums::OnUpload {
                // No job checks it later: its record's checksum (of no bytes)
                // is checked as the format library checks it.
                c.check_checksum(Some((&t.name, t.first_chunk + k as u64)))?;
            }
            off += n;
        }
        Ok(())
    }

    /// Chooses the next batch (a prefix of `jobs` of one word width that fits
    /// a slot) and places its streams: stored streams and the stored bytes
    /// of lane rANS streams are read where they land when they lie in the
    /// page-locked host delta, else copied into the upload part; zstd
    /// streams are decoded there by the CPU; lane rANS streams decode on the
    /// device into the device part, with their scratch and, for context 1
    /// in sparse chunks, their positions.
    ///
    /// The batch fills at most `budget` bytes of the slot, unless its first
    /// chunk alone needs more (up to the whole slot).
    pub(super) fn plan_batch<'c, 'a: 'c>(&self, jobs: &[Job<'c, 'a>], stage: Stage, budget: usize) -> Result<Plan<'c>> {
        let width = jobs[0].width;
        let max_tiles = self.slots[0].sums.len();
        let max_rows = self.slots[0].groups.len() / KEYS;
        let host = jobs[0].host;
        let mut places: Vec<JobPlace> = Vec::new();
        let (mut upload, mut device) = (0usize, 0usize);
        let mut raw: Option<(usize, usize)> = None;
        let (mut tiles, mut rows, mut rans_count, mut positions_count) = (0usize, 0usize, 0usize, 0usize);
        let mut fill_count = 0usize;
        for job in jobs.iter().take(self.cfg.max_chunks) {
            let c = job.chunk;
            if job.width != width {
                break;
            }
            c.validate(width)?;
            // Every checksum left to the loader was checked before the first
            // batch, so a corrupt chunk is reported as such before its bytes
            // are judged (spec §11.2).
            let plan = ChunkPlan::new(c, width).map_err(|e| label_error(e, job.label))?;
            let np = c.position_stream_count();
            let (mut up, mut dev, mut span) = (upload, device, raw);
            let mut place = JobPlace::default();
            let mut rc = 0;
            for (k, (r, bytes)) in c.streams.iter().zip(c.stored_streams()).enumerate() {
                if c.is_resolved_stream(k) {
                    // Coding 3: the positions resolved on the CPU go up at
                    // stream 0's place; the kernels read no other position stream.
                    place.rans.push(None);
                    place.streams.push(if k == 0 {
                        let o = up;
                        up = align(up + c.device_stream_len(0), 16);
                        Place::Upload(o)
                    } else {
                        place.streams[0]
                    });
                    continue;
                }
                if r.codec == Codec::Constant {
                    // Filled on the device: neither decoded nor uploaded.
                    place.rans.push(None);
                    place.streams.push(Place::Device(dev));
                    dev = align(dev + r.decoded_len as usize, 16);
                    if let (Some(&value), true) = (bytes.first(), stage == Stage::Apply || k < np) {
                        place.fills.push((k, value));
                    }
                    continue;
                }
                let rans = plan.as_ref().and_then(|p| p.streams[k]);
                // Bytes copied as they are (a stored stream, or a lane rANS
                // stream's stored bytes) are read where they land, if they lie
                // in the page-locked host buffer; a stored stream of words
                // keeps its word alignment.
                let at = host
                    .filter(|_| job.host.map(<[u8]>::as_ptr) == host.map(<[u8]>::as_ptr))
                    .and_then(|h| offset_in(h, bytes))
                    .filter(|&o| {
                        rans.is_some()
                            || (r.codec == Codec::Stored
                                && (k < np || c.record.value_layout != ValueLayout::Words || o % width.bytes() == 0))
                    });
                let at = at.filter(|_| rans.is_none() || stage == Stage::Apply || k < np);
                if let Some(o) = at {
                    let end = o + bytes.len();
                    span = Some(span.map_or((o, end), |(lo, hi)| (lo.min(o), hi.max(end))));
                }
                let decoded = stage == Stage::Apply || k < np;
                match rans {
                    Some(_) if !decoded => {
                        // not needed by the positions stage: room only
                        place.rans.push(None);
                        place.streams.push(Place::Device(dev));
                        dev = align(dev + r.decoded_len as usize, 16);
                    }
                    Some((header, level)) => {
                        let stored = at.map_or_else(
                            || {
                                let o = up;
                                up = align(up + r.stored_len as usize, 16);
                                Place::Upload(o)
                            },
                            Place::Host,
                        );
                        place.streams.push(Place::Device(dev));
                        dev = align(dev + r.decoded_len as usize, 16);
                        let scratch = dev;
                        dev += header.scratch_bytes(r.decoded_len);
                        let allowed = allowed_contexts(c, k, width);
                        place.rans.push(Some(RansPlace { header, level, allowed, stored, scratch }));
                        rc += 1;
                    }
                    None => {
                        place.rans.push(None);
                        place.streams.push(at.map_or_else(
                            || {
                                let o = up;
                                up = align(up + r.decoded_len as usize, 16);
                                Place::Upload(o)
                            },
                            Place::Host,
                        ));
                    }
                }
            }
            let mut pc = 0;
            if let (Some(before), Stage::Apply) = (plan.as_ref().and_then(|p| p.positions_before), stage) {
                place.positions = Some((before, dev));
                dev = align(dev + 4 * c.record.changed_count as usize, 16);
                pc = 1;
            }
            let t = Batch::tiles_of(&c.record, c.words) as usize;
            let g = Batch::group_rows_of(&c.record, c.words) as usize;
            let tables = align((places.len() + 1) * ChunkDesc::BYTES, 64)
                + RansWork::table_bytes_for(rans_count + rc, positions_count + pc, fill_count + place.fills.len());
            let raw_len = span.map_or(0, |(lo, hi)| hi - lo + 16);
            let limit = if places.is_empty() { self.cfg.slot_bytes } else { budget.min(self.cfg.slot_bytes) };
            if tables + up + 16 + dev + 16 + raw_len > limit || tiles + t > max_tiles || rows + g > max_rows {
                if places.is_empty() {
                    return Err(GpuError::invalid(
                        "a chunk does not fit a staging slot; raise LoaderConfig::slot_bytes",
                    ));
                }
                break;
            }
            (upload, device, raw) = (up, dev, span);
            tiles += t;
            rows += g;
            rans_count += rc;
            positions_count += pc;
            fill_count += place.fills.len();
            places.push(place);
        }
        let count = places.len();
        let table = align(count * ChunkDesc::BYTES, 64);
        let rans_tables = RansWork::table_bytes_for(rans_count, positions_count, fill_count);
        let decoded_end = table + rans_tables + upload;
        let device_start = align(decoded_end, 16);
        let raw_lo = raw.map_or(0, |(lo, _)| lo);
        let raw = match (raw, host) {
            // Same offset modulo 16 on both sides keeps every stream's alignment.
            (Some((lo, hi)), Some(h)) => Some((&h[lo..hi], align(device_start + device, 16) + lo % 16)),
            _ => None,
        };
        let mut tasks = Vec::new();
        for (j, (job, place)) in jobs.iter().zip(&places).enumerate() {
            if let (Some((record, list)), Place::Upload(o)) = (job.chunk.resolved_positions_stream()?, place.streams[0])
            {
                tasks.push((table + rans_tables + o, record, list, j));
            }
            for (k, (r, bytes)) in job.chunk.streams.iter().zip(job.chunk.stored_streams()).enumerate() {
                if job.chunk.is_resolved_stream(k) {
                    continue;
                }
                match (place.rans[k], place.streams[k]) {
                    (Some(RansPlace { stored: Place::Upload(o), .. }), _) | (None, Place::Upload(o)) => {
                        tasks.push((table + rans_tables + o, *r, bytes, j));
                    }
                    _ => {}
                }
            }
        }
        Ok(Plan { count, table, rans_tables, decoded_end, device_start, raw, raw_lo, places, tasks })
    }
}

/// The bytes one batch may fill of a slot in a call of `jobs`: the call's
/// streams spread evenly over at least as many batches as there are slots,
/// so that a delta smaller than the ring still overlaps the upload of each
/// batch with the kernels of the one before, and a delta larger than the
/// ring ends with a batch as large as the others rather than a remnant
/// whose decoding, one tile's chain of steps on few blocks, outlasts a full
/// batch's; but no fewer than `MIN_BATCH` bytes (or half a slot, in a ring
/// of small slots), below which a batch's fixed costs outweigh the overlap.
pub(super) fn batch_budget(jobs: &[Job<'_, '_>], slots: usize, slot_bytes: usize) -> usize {
    /// Measured: `BENCHMARKS-GPU.md`, "Batches sized to the call".
    const MIN_BATCH: usize = 64 << 20;
    // What every stream places: its decoded bytes, and the stored bytes of
    // a coded one. Read from records not validated yet, so saturating.
    let placed = |r: &tpde::format::StreamRecord| {
        let stored = if r.codec == Codec::Stored { 0 } else { r.stored_len as usize };
        stored.saturating_add(r.decoded_len as usize)
    };
    let bytes = jobs.iter().flat_map(|j| j.chunk.streams).map(placed).fold(0, usize::saturating_add);
    let batches = bytes.div_ceil(slot_bytes.max(1)).max(slots).max(1);
    // 1/32 more than the even share: tables and alignment are not counted,
    // and a batch cut a little short would leave a remnant after the last.
    let share = bytes / batches;
    share.saturating_add(share / 32).clamp(MIN_BATCH.min(slot_bytes / 2), slot_bytes)
}

/// Offset of `part` in `whole`, if `part` lies inside it.
fn offset_in(whole: &[u8], part: &[u8]) -> Option<usize> {
    let (w, p) = (whole.as_ptr() as usize, part.as_ptr() as usize);
    (p >= w && p + part.len() <= w + whole.len()).then(|| p - w)
}
