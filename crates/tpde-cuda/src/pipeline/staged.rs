//! The staged path: a delta decoded once into device memory
//! ([`DeviceDelta`]), then applied with kernels only.

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::CudaSlice;
use tpde::{
    format::{ChunkRecord, Digest128, Encoding, StreamRecord},
    WordWidth,
};

use super::digests::{hashed_by_apply, LeafCheck};
use super::faults::label_error;
use super::host_decode::decode_tasks;
use super::inputs::{ChunkRef, TensorRef};
use super::ring::host_prefix;
use super::timings::LoadTimings;
use super::{align, Loader};
use crate::error::{GpuError, Result};
use crate::gpu::{Batch, DevRange, DeviceCopy, RansContext, RansStream, Stage};
use crate::kernels::{ChunkDesc, KEYS};
use crate::rans::{self, allowed_contexts, ChunkPlan, RansWork};

impl Loader {
    /// Decodes every stream of `delta` once into one device buffer, so that
    /// later applies launch kernels only (weights sync of many fine-tunes of
    /// one base, or repeated just-in-time materialization). zstd streams are
    /// decoded by the CPU, lane rANS streams by the GPU; a lane rANS stream
    /// whose context needs the base (context 1, or the planes decoded under
    /// one) is kept as its stored bytes and decoded at each apply, against
    /// the base that apply is given ([`Loader::stage_for_base`] decodes
    /// those once too).
    pub fn stage_on_device(&mut self, delta: &[TensorRef<'_>]) -> Result<DeviceDelta> {
        self.stage(delta, None)
    }

    /// [`Loader::stage_on_device`] for one resident base: the streams whose
    /// context needs the base are decoded once too, against `base` (one
    /// tensor per delta tensor, each at least its target's size), so that
    /// every apply is the apply kernels alone. The case of many fine-tunes of
    /// one base served on one GPU.
    ///
    /// Every later apply must be given a base that holds the same words:
    /// the values were decoded against these. With digests on (the default)
    /// another base fails with `E_CHUNK_DIGEST`; with them off it rebuilds
    /// wrong words.
    pub fn stage_for_base(&mut self, delta: &[TensorRef<'_>], base: &[&CudaSlice<u8>]) -> Result<DeviceDelta> {
        if base.len() != delta.len() {
            return Err(GpuError::invalid("one base tensor per delta tensor"));
        }
        for (t, b) in delta.iter().zip(base) {
            if b.num_bytes() < t.bytes() {
                return Err(GpuError::invalid(format!(
                    "{}: the base is shorter than the target; stage_on_device decodes against each apply's base",
                    t.name
                )));
            }
        }
        self.stage(delta, Some(base))
    }

    /// Stages `delta`, and with `base`, decodes the streams that need it.
    fn stage(&mut self, delta: &[TensorRef<'_>], base: Option<&[&CudaSlice<u8>]>) -> Result<DeviceDelta> {
        // The data: [host part: streams decoded by the CPU or stored, and the
        // stored bytes of deferred streams | device part: lane rANS streams
        // decoded here]. Device part offsets are made absolute at the end.
        let mut tensors = Vec::with_capacity(delta.len());
        let (mut host_total, mut device_total) = (0usize, 0usize);
        let mut device_part: Vec<(usize, usize, usize)> = Vec::new();
        // Deferred streams decoded against `base`: where their decoded bytes
        // go, after the device part.
        let (mut bound_part, mut bound_total): (Vec<(usize, usize, usize, usize)>, usize) = (Vec::new(), 0);
        let mut order: Vec<StagePending<'_, '_>> = Vec::new();
        for (ti, t) in delta.iter().enumerate() {
            t.validate()?;
            t.check_checksums()?;
            let mut chunks = Vec::new();
            let mut word = 0u64;
            for (k, c) in t.chunks.iter().enumerate() {
                let index = t.first_chunk + k as u64;
                if c.record.encoding != Encoding::Unchanged {
                    let plan = ChunkPlan::new(c, t.width).map_err(|e| label_error(e, Some((&t.name, index))))?;
                    let host_start = host_total;
                    let mut at = Vec::with_capacity(c.streams.len());
                    for (q, r) in c.streams.iter().enumerate() {
                        if c.is_resolved_stream(q) {
                            // Coding 3: the positions resolved on the CPU, at
                            // stream 0's place; no other position stream is read.
                            if q == 0 {
                                at.push(Staged::Decoded(host_total));
                                host_total = align(host_total + c.device_stream_len(0), 16);
                            } else {
                                at.push(at[0]);
                            }
                            continue;
                        }
                        let needs_base = plan.as_ref().and_then(|p| p.streams[q].map(|_| p.needs_base[q]));
                        match needs_base {
                            Some(false) => {
                                device_part.push((ti, chunks.len(), q));
                                at.push(Staged::Decoded(device_total));
                                device_total = align(device_total + r.decoded_len as usize, 16);
                            }
                            Some(true) => {
                                at.push(Staged::Deferred(host_total));
                                host_total = align(host_total + r.stored_len as usize, 16);
                                if base.is_some() {
                                    bound_part.push((ti, chunks.len(), q, bound_total));
                                    bound_total = align(bound_total + r.decoded_len as usize, 16);
                                }
                            }
                            None => {
                                at.push(Staged::Decoded(host_total));
                                host_total = align(host_total + r.decoded_len as usize, 16);
                            }
                        }
                    }
                    order.push(StagePending {
                        chunk: c,
                        name: &t.name,
                        index,
                        width: t.width,
                        host: host_start..host_total,
                        at: (ti, chunks.len()),
                        plan: plan.clone(),
                    });
                    let deferred = at.iter().any(|a| matches!(a, Staged::Deferred(_)));
                    chunks.push(StagedChunk {
                        record: c.record,
                        streams: c.streams.to_vec(),
                        words: c.words,
                        resolved_positions: c.resolved_positions.clone(),
                        at,
                        plan: plan.filter(|_| deferred),
                        word,
                        index,
                    });
                }
                word += u64::from(c.words);
            }
            tensors.push(StagedTensor {
                name: t.name.clone(),
                width: t.width,
                words: t.words,
                needs_base: t.needs_base_words(),
                chunks,
                first_chunk: t.first_chunk,
                leaves: t
                    .chunks
                    .iter()
                    .map(|c| (c.record.digest, c.words, hashed_by_apply(&c.record, c.words)))
                    .collect(),
            });
        }
        for (ti, ci, q) in device_part {
            if let Staged::Decoded(o) = &mut tensors[ti].chunks[ci].at[q] {
                *o += host_total;
            }
        }
        let total = host_total + device_total;
        // SAFETY: every byte of a stream range is written by the uploads or
        // the decoder below before any kernel reads it; padding bytes are
        // never read.
        let data = unsafe { self.gpu.stream().alloc::<u8>((total + bound_total).max(1)) }?;
        self.begin(&[])?;
        self.queue(|l| {
            let mut i = 0;
            while i < order.len() {
                i += l.stage_batch(&order[i..], &tensors, &data, i)?;
            }
            Ok(())
        })?;
        self.finish(|job| order.get(job as usize).map(|p| (p.name, p.index)), None)?;
        let mut delta = DeviceDelta { data, tensors };
        if let Some(base) = base.filter(|_| !bound_part.is_empty()) {
            let mut bound: BoundAt =
                delta.tensors.iter().map(|t| t.chunks.iter().map(|c| vec![None; c.at.len()]).collect()).collect();
            for &(ti, ci, q, o) in &bound_part {
                bound[ti][ci][q] = Some(total + o);
            }
            self.decode_for_base(&delta, base, &bound)?;
            for (t, tb) in delta.tensors.iter_mut().zip(&bound) {
                for (c, cb) in t.chunks.iter_mut().zip(tb) {
                    for (a, b) in c.at.iter_mut().zip(cb) {
                        if let Some(o) = b {
                            *a = Staged::Decoded(*o);
                        }
                    }
                    if !c.at.iter().any(|a| matches!(a, Staged::Deferred(_))) {
                        c.plan = None;
                    }
                }
            }
        }
        Ok(delta)
    }

    /// Decodes the deferred streams of a staged delta against `base`, into
    /// the data at `bound[tensor][chunk][stream]`: the decoding of
    /// [`Loader::flush_staged`], without the apply, its outputs kept. Waits.
    fn decode_for_base(&mut self, delta: &DeviceDelta, base: &[&CudaSlice<u8>], bound: &BoundAt) -> Result<()> {
        let main = self.gpu.stream().clone();
        let bases = base.iter().map(|b| DevRange::all(*b, &main)).collect::<Result<Vec<_>>>()?;
        self.begin(&[])?;
        self.queue(|l| l.queue_staged(delta, &bases, &bases, Some(bound)))?;
        let labels: Vec<(&str, u64)> =
            delta.tensors.iter().flat_map(|t| t.chunks.iter().map(|c| (t.name.as_str(), c.index))).collect();
        self.finish(|job| labels.get(job as usize).copied(), None)
    }

    /// Stages a prefix of `order` that fits a slot (job indices from
    /// `first_job`): copies their host parts into the data through the slot
    /// and decodes their base-free lane rANS streams into the device part.
    /// Returns the number of chunks staged.
    fn stage_batch(
        &mut self,
        order: &[StagePending<'_, '_>],
        tensors: &[StagedTensor],
        data: &CudaSlice<u8>,
        first_job: usize,
    ) -> Result<usize> {
        // Host slot: [lane rANS table | their stored bytes | host part];
        // device slot: [lane rANS table | their stored bytes | scratch].
        let staged = |p: &StagePending<'_, '_>| &tensors[p.at.0].chunks[p.at.1];
        let on_device = |p: &StagePending<'_, '_>, q: usize| {
            p.plan.as_ref().and_then(|plan| plan.streams[q]).filter(|_| matches!(staged(p).at[q], Staged::Decoded(_)))
        };
        let first = order[0].host.start;
        let (mut end, mut count, mut stored, mut scratch) = (0, 0usize, 0usize, 0usize);
        while end < order.len() {
            let p = &order[end];
            let (mut c, mut st, mut sc) = (count, stored, scratch);
            for (q, r) in p.chunk.streams.iter().enumerate() {
                if let Some((h, _)) = on_device(p, q) {
                    c += 1;
                    st = align(st + r.stored_len as usize, 16);
                    sc += h.scratch_bytes(r.decoded_len);
                }
            }
            let used = p.host.end - first;
            if RansWork::table_bytes_for(c, 0, 0) + st + used.max(sc + 16) > self.cfg.slot_bytes {
                break;
            }
            (count, stored, scratch) = (c, st, sc);
            end += 1;
        }
        if end == 0 {
            return Err(GpuError::invalid("a chunk does not fit a staging slot; raise LoaderConfig::slot_bytes"));
        }
        let tables = RansWork::table_bytes_for(count, 0, 0);
        let hp = tables + stored;
        let used = order[end - 1].host.end - first;
        let mut tasks = Vec::new();
        let mut rans_at = Vec::new();
        let mut at = tables;
        for (k, p) in order[..end].iter().enumerate() {
            let sc = staged(p);
            if let (Some((record, list)), Staged::Decoded(o)) = (p.chunk.resolved_positions_stream()?, sc.at[0]) {
                tasks.push((hp + o - first, record, list, k));
            }
            for (q, (r, bytes)) in p.chunk.streams.iter().zip(p.chunk.stored_streams()).enumerate() {
                if p.chunk.is_resolved_stream(q) {
                    continue;
                }
                if on_device(p, q).is_some() {
                    tasks.push((at, *r, bytes, k));
                    rans_at.push(at);
                    at = align(at + r.stored_len as usize, 16);
                } else {
                    let (Staged::Decoded(o) | Staged::Deferred(o)) = sc.at[q];
                    tasks.push((hp + o - first, *r, bytes, k));
                }
            }
        }
        // decode_tasks takes the streams in increasing offsets
        tasks.sort_by_key(|t| t.0);
        let slot = self.take_slot()?;
        let s = &mut self.slots[slot];
        let host = s.host.as_mut_slice()?;
        let batch = &order[..end];
        decode_tasks(&mut host[..hp + used], &tasks, |k| Some((batch[k].name, batch[k].index)))?;
        let dev = DevRange::all(&s.dev, &s.stream)?;
        let all = DevRange::all(data, &s.stream)?;
        let mut work = RansWork::default();
        let mut rans_at = rans_at.into_iter();
        let mut scratch_at = align(hp, 16);
        for (k, p) in batch.iter().enumerate() {
            let sc = staged(p);
            let job = u32::try_from(first_job + k).map_err(|_| GpuError::invalid("too many chunks"))?;
            for (q, r) in p.chunk.streams.iter().enumerate() {
                let Some((header, level)) = on_device(p, q) else { continue };
                let context = match header.context {
                    rans::context::HIGHER_PLANE => {
                        let Staged::Decoded(above) = sc.at[q + 1] else {
                            return Err(GpuError::invalid("a base-free plane under a deferred one"));
                        };
                        RansContext::HigherPlane(all.sub(above, sc.streams[q + 1].decoded_len as usize)?)
                    }
                    _ => RansContext::None,
                };
                let Staged::Decoded(out) = sc.at[q] else { continue };
                let stream = RansStream {
                    stored: dev.sub(rans_at.next().unwrap_or(0), r.stored_len as usize)?,
                    decoded: all.sub(out, r.decoded_len as usize)?,
                    scratch: dev.sub(scratch_at, header.scratch_bytes(r.decoded_len))?,
                    context,
                    header,
                    allowed: allowed_contexts(p.chunk, q, p.width),
                    level,
                    job,
                };
                scratch_at += header.scratch_bytes(r.decoded_len);
                work.streams.push(&stream, r.stored_len, r.decoded_len)?;
            }
        }
        work.seal(self.gpu.resident_decoder_warps())?;
        work.write_tables(&mut host[..tables]);
        let part = all.sub(first, used)?;
        // SAFETY: the page-locked host bytes stay untouched until `uploaded`
        // completes.
        unsafe {
            if hp > 0 {
                dev.copy_from_host_async(&s.stream, host_prefix(&s.host, hp)?)?;
            }
            if used > 0 {
                part.copy_from_host_async(&s.stream, &host_prefix(&s.host, hp + used)?[hp..])?;
            }
        }
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        s.stream.wait(&self.start)?;
        if !work.is_empty() {
            let sums = DevRange::all(&s.sums, &s.stream)?;
            let groups = DevRange::all(&s.groups, &s.stream)?;
            let flag = DevRange::all(&self.flag, &s.stream)?;
            work.launch(&self.gpu, &s.stream, dev.sub(0, tables)?, sums, groups, flag)?;
        }
        Ok(end)
    }

    /// Rebuilds a device-resident delta in place over `bufs`, which hold the
    /// base tensors (each exactly the target's size). Kernels only: the
    /// streams are already decoded on the device.
    pub fn apply_staged_in_place(&mut self, delta: &DeviceDelta, bufs: &mut [CudaSlice<u8>]) -> Result<()> {
        if bufs.len() != delta.tensors.len() {
            return Err(GpuError::invalid("one buffer per delta tensor"));
        }
        let main = self.gpu.stream().clone();
        let outs = bufs
            .iter()
            .zip(&delta.tensors)
            .map(|(b, t)| {
                if b.num_bytes() != t.bytes() {
                    return Err(GpuError::invalid(format!("{}: in-place buffer size differs", t.name)));
                }
                DevRange::all(b, &main)
            })
            .collect::<Result<Vec<_>>>()?;
        // In place: every slot its batches (a chunk or more each) can take
        // is allocated before the first write.
        self.allocate_slots(delta.tensors.iter().map(|t| t.chunks.len()).sum())?;
        self.run_staged(delta, &outs.clone(), &outs, &[])
    }

    /// Rebuilds a device-resident delta from resident `base` tensors into
    /// `outs` (each at least the target's size).
    pub fn apply_staged(
        &mut self,
        delta: &DeviceDelta,
        base: &[&CudaSlice<u8>],
        outs: &mut [CudaSlice<u8>],
    ) -> Result<()> {
        if base.len() != delta.tensors.len() || outs.len() != delta.tensors.len() {
            return Err(GpuError::invalid("one base and one output per delta tensor"));
        }
        let main = self.gpu.stream().clone();
        let (mut bases, mut os, mut copies) = (Vec::new(), Vec::new(), Vec::new());
        for ((t, b), o) in delta.tensors.iter().zip(base).zip(outs.iter()) {
            let tb = t.bytes();
            if o.num_bytes() < tb {
                return Err(GpuError::invalid(format!("{}: output buffer too small", t.name)));
            }
            let b = DevRange::all(*b, &main)?;
            let o = DevRange::of(o, &main, 0, tb)?;
            let in_place = self.prepare_out(b, o, tb, t.width, t.needs_base, &mut copies)?;
            bases.push(if in_place { o } else { b });
            os.push(o);
        }
        self.run_staged(delta, &bases, &os, &copies)
    }

    fn run_staged(
        &mut self,
        delta: &DeviceDelta,
        bases: &[DevRange],
        outs: &[DevRange],
        copies: &[DeviceCopy],
    ) -> Result<()> {
        let mut checks = Vec::new();
        for (t, o) in delta.tensors.iter().zip(outs) {
            let w = t.width.bytes();
            let mut off = 0usize;
            for (k, &(digest, words, by_apply)) in t.leaves.iter().enumerate() {
                let n = words as usize * w;
                let chunk = t.first_chunk + k as u64;
                let check =
                    LeafCheck { out: o.sub(off, n)?, digest, tensor: &t.name, chunk, hashed_by_apply: by_apply };
                checks.push(check);
                off += n;
            }
        }
        self.launch_staged(delta, bases, outs, &checks, copies)
    }

    /// Makes the base `copies`, launches the apply kernels of every staged
    /// tensor, then (unless the caller opted out) the leaf digest passes of
    /// `checks`; waits once.
    fn launch_staged(
        &mut self,
        delta: &DeviceDelta,
        bases: &[DevRange],
        outs: &[DevRange],
        checks: &[LeafCheck<'_>],
        copies: &[DeviceCopy],
    ) -> Result<()> {
        let started = Instant::now();
        self.timings = LoadTimings::default();
        self.begin(copies)?;
        let leaves = self.prepare_leaves(checks)?;
        self.timings.setup = started.elapsed();
        let clock = Instant::now();
        self.queue(|l| l.queue_staged(delta, bases, outs, None))?;
        self.timings.queueing = clock.elapsed();
        let labels: Vec<(&str, u64)> =
            delta.tensors.iter().flat_map(|t| t.chunks.iter().map(|c| (t.name.as_str(), c.index))).collect();
        let clock = Instant::now();
        self.finish(|job| labels.get(job as usize).copied(), leaves.as_ref())?;
        self.timings.device_wait = clock.elapsed();
        leaves.map_or(Ok(()), |pass| self.compare_leaves(&pass, checks))
    }

    /// Queues the batches of [`Loader::launch_staged`], a tensor's chunks at
    /// a time; or, with `bound`, those of [`Loader::decode_for_base`]: the
    /// chunks with deferred streams, decoded and not applied.
    fn queue_staged(
        &mut self,
        delta: &DeviceDelta,
        bases: &[DevRange],
        outs: &[DevRange],
        bound: Option<&BoundAt>,
    ) -> Result<()> {
        let limits = SlotLimits {
            tiles: self.slots[0].sums.len(),
            rows: self.slots[0].groups.len() / KEYS,
            chunks: self.cfg.max_chunks.min(self.cfg.slot_bytes / ChunkDesc::BYTES),
            bytes: self.cfg.slot_bytes,
        };
        let mut first_job = 0usize;
        for (ti, ((t, b), o)) in delta.tensors.iter().zip(bases).zip(outs).enumerate() {
            // Decoding for a base takes only the chunks with deferred streams.
            let chunks: Vec<usize> =
                (0..t.chunks.len()).filter(|&ci| bound.is_none() || t.chunks[ci].plan.is_some()).collect();
            let needs: Vec<ChunkNeeds> = chunks.iter().map(|&ci| t.chunks[ci].needs()).collect();
            let w = t.width.bytes();
            let mut start = 0;
            for end in even_cuts(&needs, &limits)? {
                let pending = chunks[start..end]
                    .iter()
                    .map(|&ci| {
                        let c = &t.chunks[ci];
                        let nb = c.words as usize * w;
                        let off = usize::try_from(c.word)
                            .ok()
                            .and_then(|word| word.checked_mul(w))
                            .ok_or_else(|| GpuError::invalid("tensor too large"))?;
                        Ok((ci, b.sub(off, nb)?, o.sub(off, nb)?))
                    })
                    .collect::<Result<Vec<_>>>()?;
                self.flush_staged(delta, t, &pending, first_job, bound.map(|b| b[ti].as_slice()))?;
                if bound.is_none() {
                    self.timings.batches += 1;
                }
                start = end;
            }
            first_job += t.chunks.len();
        }
        Ok(())
    }

    /// Launches the chunks `pending` of tensor `t` of a device-resident
    /// delta (each with its base and output words) through a slot: uploads
    /// their descriptor tables, decodes the lane rANS streams that were
    /// deferred to the apply (into the slot), then applies. Chunk `ci` of
    /// the tensor is job `first_job + ci`, which faults report.
    fn flush_staged(
        &mut self,
        delta: &DeviceDelta,
        t: &StagedTensor,
        pending: &[(usize, DevRange, DevRange)],
        first_job: usize,
        bound: Option<&[Vec<Option<usize>>]>,
    ) -> Result<()> {
        if pending.is_empty() {
            return Ok(());
        }
        let (rans_count, positions_count) = pending.iter().fold((0, 0), |(r, p), (ci, _, _)| {
            let (rc, pc, _) = t.chunks[*ci].deferred_needs();
            (r + rc, p + pc)
        });
        let table = align(pending.len() * ChunkDesc::BYTES, 64);
        let rans_tables = RansWork::table_bytes_for(rans_count, positions_count, 0);
        let slot = self.take_slot()?;
        let s = &mut self.slots[slot];
        let dev = DevRange::all(&s.dev, &s.stream)?;
        let data = DevRange::all(&delta.data, &s.stream)?;
        let mut at = align(table + rans_tables, 16);
        let mut take = |len: usize| {
            let r = dev.sub(at, len);
            at = align(at + len, 16);
            r
        };
        let mut batch = Batch::new(t.width);
        let mut work = RansWork::default();
        for &(ci, base, out) in pending {
            let c = &t.chunks[ci];
            let chunk = ChunkRef {
                record: c.record,
                streams: &c.streams,
                stored: &[],
                words: c.words,
                resolved_positions: c.resolved_positions.clone(),
            };
            let streams = c
                .at
                .iter()
                .enumerate()
                .map(|(q, a)| match (*a, bound.and_then(|b| b[ci][q])) {
                    (Staged::Decoded(o), _) | (Staged::Deferred(_), Some(o)) => data.sub(o, chunk.device_stream_len(q)),
                    (Staged::Deferred(_), None) => take(chunk.device_stream_len(q)),
                })
                .collect::<Result<Vec<_>>>()?;
            let Some(plan) = &c.plan else {
                batch.push(&chunk, &streams, base, out)?;
                continue;
            };
            let positions = match plan.positions_before {
                Some(before) => {
                    let p = take(4 * c.record.changed_count as usize)?;
                    work.push_positions(before, &chunk, &streams, p, t.width)?;
                    Some(p)
                }
                None => None,
            };
            if bound.is_none() {
                batch.push_listed(&chunk, &streams, base, out, positions)?;
            }
            let job = u32::try_from(first_job + ci).map_err(|_| GpuError::invalid("too many chunks"))?;
            for (q, r) in c.streams.iter().enumerate() {
                let (Staged::Deferred(stored), Some((header, level))) = (c.at[q], plan.streams[q]) else { continue };
                let context = match header.context {
                    rans::context::NONE => RansContext::None,
                    rans::context::HIGHER_PLANE => RansContext::HigherPlane(streams[q + 1]),
                    _ => RansContext::BaseKey { base, width: t.width, positions },
                };
                let stream = RansStream {
                    stored: data.sub(stored, r.stored_len as usize)?,
                    decoded: streams[q],
                    scratch: take(header.scratch_bytes(r.decoded_len))?,
                    context,
                    header,
                    allowed: allowed_contexts(&chunk, q, t.width),
                    level,
                    job,
                };
                work.streams.push(&stream, r.stored_len, r.decoded_len)?;
            }
        }
        work.seal(self.gpu.resident_decoder_warps())?;
        if batch.table_bytes() > table || work.table_bytes() > rans_tables {
            return Err(GpuError::invalid("descriptor tables larger than planned"));
        }
        if bound.is_none() {
            self.term_rows.give(&mut batch);
        }
        let host = s.host.as_mut_slice()?;
        batch.write_table(&mut host[..batch.table_bytes()]);
        work.write_tables(&mut host[table..table + rans_tables]);
        let n = table + rans_tables;
        // SAFETY: the host bytes stay untouched until `uploaded` completes.
        unsafe { dev.copy_from_host_async(&s.stream, host_prefix(&s.host, n)?) }?;
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        s.stream.wait(&self.start)?;
        let sums = DevRange::all(&s.sums, &s.stream)?;
        let groups = DevRange::all(&s.groups, &s.stream)?;
        let flag = DevRange::all(&self.flag, &s.stream)?;
        work.launch(&self.gpu, &s.stream, dev.sub(table, rans_tables)?, sums, groups, flag)?;
        if bound.is_some() {
            return Ok(());
        }
        self.gpu.launch(&s.stream, &batch, Stage::Apply, dev.sub(0, batch.table_bytes())?, sums, groups, flag)
    }
}

/// Per tensor, chunk and stream of a staged delta: where a deferred
/// stream's bytes, decoded against the base it is staged for, go in the
/// data ([`Loader::stage_for_base`]).
type BoundAt = Vec<Vec<Vec<Option<usize>>>>;

/// Where a stream of a [`DeviceDelta`] lies in its data.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Staged {
    /// Its decoded bytes, at this offset.
    Decoded(usize),
    /// A lane rANS stream whose context needs the base: its stored bytes,
    /// at this offset, decoded at each apply.
    Deferred(usize),
}

/// A chunk of a [`DeviceDelta`]: where each stream lies, and the lane rANS
/// plan where some stream is deferred; its first word is `word` of the
/// tensor, and `index` its index in the file.
#[derive(Clone, Debug)]
struct StagedChunk {
    record: ChunkRecord,
    streams: Vec<StreamRecord>,
    words: u32,
    /// [`ChunkRef::resolved_positions`].
    resolved_positions: Option<Arc<[u8]>>,
    at: Vec<Staged>,
    plan: Option<ChunkPlan>,
    word: u64,
    index: u64,
}

/// What a staged chunk takes of a slot when it is applied.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct ChunkNeeds {
    tiles: usize,
    rows: usize,
    /// Lane rANS and position descriptors.
    rans: usize,
    positions: usize,
    /// Bytes of the device part: the deferred streams' output, scratch and
    /// positions.
    device: usize,
}

/// What a slot holds of one batch.
#[derive(Clone, Copy, Debug)]
struct SlotLimits {
    tiles: usize,
    rows: usize,
    chunks: usize,
    bytes: usize,
}

impl SlotLimits {
    /// Whether `batch` (the sums of its chunks' needs), `count` chunks, fits.
    fn fit(&self, count: usize, batch: &ChunkNeeds) -> bool {
        count <= self.chunks
            && batch.tiles <= self.tiles
            && batch.rows <= self.rows
            && align(count * ChunkDesc::BYTES, 64)
                + RansWork::table_bytes_for(batch.rans, batch.positions, 0)
                + 16
                + batch.device
                <= self.bytes
    }
}

impl ChunkNeeds {
    /// The needs of two chunks, or batches, together.
    fn plus(&self, other: &Self) -> Self {
        Self {
            tiles: self.tiles + other.tiles,
            rows: self.rows + other.rows,
            rans: self.rans + other.rans,
            positions: self.positions + other.positions,
            device: self.device + other.device,
        }
    }
}

/// The chunks that the next batch takes of `needs` (at least one): the
/// longest run, of at most `cap` chunks, that fits a slot.
fn batch_len(needs: &[ChunkNeeds], limits: &SlotLimits, cap: usize) -> Result<usize> {
    let mut batch = ChunkNeeds::default();
    for (count, n) in needs.iter().enumerate() {
        if n.rows > limits.rows {
            return Err(GpuError::invalid("a chunk has too many tiles; raise LoaderConfig::slot_bytes"));
        }
        if !limits.fit(1, n) {
            return Err(GpuError::invalid("a chunk does not fit a staging slot; raise LoaderConfig::slot_bytes"));
        }
        let with = batch.plus(n);
        if count > 0 && (count >= cap || !limits.fit(count + 1, &with)) {
            return Ok(count);
        }
        batch = with;
    }
    Ok(needs.len())
}

/// Where chunks of the given needs are cut into batches: each the longest
/// run of the chunks left that fits a slot. Returns the end of each batch.
fn greedy_cuts(needs: &[ChunkNeeds], limits: &SlotLimits) -> Result<Vec<usize>> {
    let mut cuts = Vec::new();
    let mut start = 0;
    while start < needs.len() {
        start += batch_len(&needs[start..], limits, usize::MAX)?;
        cuts.push(start);
    }
    Ok(cuts)
}

/// [`greedy_cuts`], with the batches of a tensor that takes more than one
/// made of about as many chunks each: each batch takes at most its even
/// share of the chunks left over the batches left. Cut only where a slot is
/// full, its last batch could hold a single chunk, whose decoding (one
/// tile's chain of steps, on few blocks) then outlasted a full batch's
/// (`BENCHMARKS-GPU.md`, "Batches cut evenly").
fn even_cuts(needs: &[ChunkNeeds], limits: &SlotLimits) -> Result<Vec<usize>> {
    let batches = greedy_cuts(needs, limits)?.len();
    let mut cuts = Vec::with_capacity(batches);
    let mut start = 0;
    while start < needs.len() {
        let share = (needs.len() - start).div_ceil(batches.saturating_sub(cuts.len()).max(1));
        start += batch_len(&needs[start..], limits, share)?;
        cuts.push(start);
    }
    Ok(cuts)
}

impl StagedChunk {
    /// What the chunk takes of a slot when it is applied.
    fn needs(&self) -> ChunkNeeds {
        let (rans, positions, device) = self.deferred_needs();
        ChunkNeeds {
            tiles: Batch::tiles_of(&self.record, self.words) as usize,
            rows: Batch::group_rows_of(&self.record, self.words) as usize,
            rans,
            positions,
            device,
        }
    }

    /// What applying the chunk needs beyond its descriptor: lane rANS
    /// descriptors, position descriptors, and slot bytes for the deferred
    /// streams' output, scratch and positions.
    fn deferred_needs(&self) -> (usize, usize, usize) {
        let Some(plan) = &self.plan else { return (0, 0, 0) };
        let (mut count, mut bytes) = (0, 0);
        for ((a, r), p) in self.at.iter().zip(&self.streams).zip(&plan.streams) {
            if let (Staged::Deferred(_), Some((h, _))) = (a, p) {
                count += 1;
                bytes += align(r.decoded_len as usize, 16) + align(h.scratch_bytes(r.decoded_len), 16);
            }
        }
        let positions = usize::from(plan.positions_before.is_some());
        bytes += positions * align(4 * self.record.changed_count as usize, 16);
        (count, positions, bytes)
    }
}

/// A chunk that [`Loader::stage_on_device`] stages: its stored bytes, names
/// for errors, the range of the data's host part it takes, and where its
/// [`StagedChunk`] is (tensor, chunk).
struct StagePending<'c, 'a> {
    chunk: &'c ChunkRef<'a>,
    name: &'c str,
    index: u64,
    width: WordWidth,
    host: std::ops::Range<usize>,
    at: (usize, usize),
    plan: Option<ChunkPlan>,
}

#[derive(Clone, Debug)]
struct StagedTensor {
    name: String,
    width: WordWidth,
    words: u64,
    needs_base: bool,
    chunks: Vec<StagedChunk>,
    /// As [`TensorRef::first_chunk`].
    first_chunk: u64,
    /// The digest and words of every chunk (unchanged ones too), in order,
    /// and whether its apply kernel hashes it as it writes it.
    leaves: Vec<(Digest128, u32, bool)>,
}

impl StagedTensor {
    fn bytes(&self) -> usize {
        usize::try_from(self.words).unwrap_or(usize::MAX) * self.width.bytes()
    }
}

/// A delta whose streams are decoded and resident in device memory
/// ([`Loader::stage_on_device`]). Lane rANS streams whose contexts need the
/// base (context 1, and the planes decoded under such a plane) are resident
/// as their stored bytes and decoded at each apply, into the loader's slots.
#[derive(Debug)]
pub struct DeviceDelta {
    data: CudaSlice<u8>,
    tensors: Vec<StagedTensor>,
}

impl DeviceDelta {
    /// Device bytes the decoded streams take.
    #[must_use]
    pub fn device_bytes(&self) -> usize {
        self.data.num_bytes()
    }

    /// Bytes of all target tensors.
    #[must_use]
    pub fn target_bytes(&self) -> usize {
        self.tensors.iter().map(StagedTensor::bytes).sum()
    }

    /// Whether some stream is decoded at each apply: a lane rANS stream
    /// whose context needs the base, staged by [`Loader::stage_on_device`]
    /// ([`Loader::stage_for_base`] decodes them once).
    #[must_use]
    pub fn decodes_at_apply(&self) -> bool {
        self.tensors.iter().flat_map(|t| &t.chunks).any(|c| c.plan.is_some())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(device: usize) -> ChunkNeeds {
        ChunkNeeds { tiles: 4, rows: 0, rans: 1, positions: 0, device }
    }

    /// A tensor that takes more than one batch is cut into batches of about
    /// as many chunks each, never more than a slot holds; one batch stays
    /// one; a chunk that no slot holds is refused.
    #[test]
    fn a_tensor_of_several_batches_is_cut_evenly() {
        // A slot of 64 MiB holds seven chunks of 8 MiB and their tables.
        let limits = SlotLimits { tiles: 1 << 20, rows: 1 << 20, chunks: 4096, bytes: 64 << 20 };
        let mib8 = chunk(8 << 20);
        assert_eq!(greedy_cuts(&[mib8; 8], &limits).unwrap(), [7, 8], "a slot's worth, then a remnant");
        assert_eq!(even_cuts(&[mib8; 8], &limits).unwrap(), [4, 8]);
        assert_eq!(even_cuts(&[mib8; 20], &limits).unwrap(), [7, 14, 20]);
        assert_eq!(even_cuts(&[mib8; 5], &limits).unwrap(), [5]);
        assert_eq!(even_cuts(&[], &limits).unwrap(), Vec::<usize>::new());
        // the chunk cap holds too: 3, 2, 2 rather than 3, 3, 1
        let capped = SlotLimits { chunks: 3, ..limits };
        assert_eq!(greedy_cuts(&[chunk(1 << 20); 7], &capped).unwrap(), [3, 6, 7]);
        assert_eq!(even_cuts(&[chunk(1 << 20); 7], &capped).unwrap(), [3, 5, 7]);
        assert!(even_cuts(&[chunk(64 << 20)], &limits).is_err());
        assert!(even_cuts(&[ChunkNeeds { rows: 1 << 21, ..chunk(0) }], &limits).is_err());
    }

    proptest::proptest! {
        /// Whatever the chunks' sizes, the even cuts split them in order and
        /// every batch fits a slot; chunks of one size take as many batches
        /// as the greedy cuts, of counts that differ by one at most.
        #[test]
        fn even_cuts_fit_and_balance(
            sizes in proptest::collection::vec(1usize..=16, 0..80),
            cap in 1usize..12,
            uniform in proptest::bool::ANY,
        ) {
            let limits = SlotLimits { tiles: 1 << 20, rows: 1 << 20, chunks: cap, bytes: 64 << 20 };
            let needs: Vec<ChunkNeeds> =
                sizes.iter().map(|&m| chunk(if uniform { 4 << 20 } else { m << 20 })).collect();
            let cuts = even_cuts(&needs, &limits).unwrap();
            let greedy = greedy_cuts(&needs, &limits).unwrap();
            proptest::prop_assert_eq!(cuts.last().copied().unwrap_or(0), needs.len());
            let mut start = 0;
            let mut counts = Vec::new();
            for &end in &cuts {
                proptest::prop_assert!(end > start);
                let batch = needs[start..end].iter().fold(ChunkNeeds::default(), |a, n| a.plus(n));
                proptest::prop_assert!(limits.fit(end - start, &batch));
                counts.push(end - start);
                start = end;
            }
            if uniform && !counts.is_empty() {
                proptest::prop_assert_eq!(cuts.len(), greedy.len());
                let (lo, hi) = (counts.iter().min().unwrap(), counts.iter().max().unwrap());
                proptest::prop_assert!(hi - lo <= 1, "{:?}", counts);
            }
        }
    }
}
