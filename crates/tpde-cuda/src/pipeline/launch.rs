//! Running planned batches: each is uploaded into a slot and its kernels are
//! launched on the slot's stream (lane rANS decoding, then apply or
//! positions).

use std::time::Instant;

use rayon::prelude::*;

use super::digests::LeafCheck;
use super::host_decode::decode_tasks;
use super::inputs::Checksums;
use super::plan::{batch_budget, Job, Plan};
use super::ring::host_prefix;
use super::timings::LoadTimings;
use super::Loader;
use crate::error::{GpuError, Result};
use crate::gpu::{Batch, DevRange, DeviceCopy, RansContext, RansStream, Stage};
use crate::rans::{self, RansWork};

impl Loader {
    /// Runs jobs, for a call that began at `started`, once the base
    /// `copies` into its outputs are made: batches them into slots, uploads,
    /// decodes, launches; unless the caller opted out
    /// ([`LoaderConfig::verify_digests`]), computes the leaf digest of every
    /// chunk in `checks` on the device behind them; then waits once, checks
    /// the device error flag and compares the digests with the chunks'
    /// records (spec §10): a mismatch is the library's `E_CHUNK_DIGEST`.
    ///
    /// [`LoaderConfig::verify_digests`]: super::LoaderConfig::verify_digests
    pub(super) fn run(
        &mut self,
        jobs: &[Job<'_, '_>],
        stage: Stage,
        checks: &[LeafCheck<'_>],
        copies: &[DeviceCopy],
        started: Instant,
    ) -> Result<()> {
        self.timings = LoadTimings::default();
        let clock = Instant::now();
        check_stored(jobs)?;
        let checksums = clock.elapsed();
        self.begin(copies)?;
        let leaves = self.prepare_leaves(checks)?;
        self.timings =
            LoadTimings { setup: started.elapsed().saturating_sub(checksums), checksums, ..LoadTimings::default() };
        let budget = batch_budget(jobs, self.cfg.slots, self.cfg.slot_bytes);
        self.queue(|l| {
            let mut i = 0;
            while i < jobs.len() {
                let mut clock = Instant::now();
                let plan = l.plan_batch(&jobs[i..], stage, budget)?;
                LoadTimings::lap(&mut l.timings.planning, &mut clock);
                l.flush(&jobs[i..i + plan.count], &plan, stage, i, clock)?;
                l.timings.batches += 1;
                i += plan.count;
            }
            Ok(())
        })?;
        let clock = Instant::now();
        self.finish(|job| jobs.get(job as usize).and_then(|j| j.label), leaves.as_ref())?;
        self.timings.device_wait = clock.elapsed();
        leaves.map_or(Ok(()), |pass| self.compare_leaves(&pass, checks))
    }

    /// Uploads one batch into a slot (the raw span first, straight from the
    /// page-locked host delta, while the CPU decodes the rest) and launches
    /// its kernels: the lane rANS work, then the apply (or positions)
    /// kernels. `first_job` is the index of the batch's first job in the run,
    /// which faults report; `clock` started where the timings stopped.
    fn flush(
        &mut self,
        jobs: &[Job<'_, '_>],
        plan: &Plan<'_>,
        stage: Stage,
        first_job: usize,
        mut clock: Instant,
    ) -> Result<()> {
        let slot = self.take_slot()?;
        LoadTimings::lap(&mut self.timings.slot_waits, &mut clock);
        let s = &mut self.slots[slot];
        let dev = DevRange::all(&s.dev, &s.stream)?;
        if let Some((span, at)) = plan.raw {
            let d = dev.sub(at, span.len())?;
            // SAFETY: `span` is borrowed for the whole call, which
            // synchronizes before it returns.
            unsafe { d.copy_from_host_async(&s.stream, span) }?;
        }
        let host = s.host.as_mut_slice()?;
        decode_tasks(&mut host[..plan.decoded_end], &plan.tasks, |j| jobs[j].label)?;
        LoadTimings::lap(&mut self.timings.staging, &mut clock);
        let mut batch = Batch::new(jobs[0].width);
        let mut work = RansWork::default();
        for (jj, (j, place)) in jobs.iter().zip(&plan.places).enumerate() {
            let c = j.chunk;
            let streams = place
                .streams
                .iter()
                .enumerate()
                .map(|(q, &p)| dev.sub(plan.offset(p), c.device_stream_len(q)))
                .collect::<Result<Vec<_>>>()?;
            let positions = match place.positions {
                Some((before, o)) => {
                    let p = dev.sub(plan.device_start + o, 4 * c.record.changed_count as usize)?;
                    work.push_positions(before, c, &streams, p, j.width)?;
                    Some(p)
                }
                None => None,
            };
            match stage {
                Stage::Apply => batch.push_listed(c, &streams, j.base, j.out, positions)?,
                Stage::Positions => batch.push_positions(c, &streams, j.out)?,
            }
            for &(q, value) in &place.fills {
                work.fills.push(streams[q], value)?;
            }
            let job = u32::try_from(first_job + jj).map_err(|_| GpuError::invalid("too many chunks"))?;
            for (q, rp) in place.rans.iter().enumerate() {
                let Some(rp) = rp else { continue };
                let r = &c.streams[q];
                let context = match rp.header.context {
                    rans::context::NONE => RansContext::None,
                    rans::context::HIGHER_PLANE => RansContext::HigherPlane(streams[q + 1]),
                    _ => RansContext::BaseKey { base: j.base, width: j.width, positions },
                };
                let stream = RansStream {
                    stored: dev.sub(plan.offset(rp.stored), r.stored_len as usize)?,
                    decoded: streams[q],
                    scratch: dev.sub(plan.device_start + rp.scratch, rp.header.scratch_bytes(r.decoded_len))?,
                    context,
                    header: rp.header,
                    allowed: rp.allowed,
                    level: rp.level,
                    job,
                };
                work.streams.push(&stream, r.stored_len, r.decoded_len)?;
            }
        }
        work.seal(self.gpu.resident_decoder_warps())?;
        if batch.table_bytes() > plan.table || work.table_bytes() > plan.rans_tables {
            return Err(GpuError::invalid("descriptor tables larger than planned"));
        }
        if stage == Stage::Apply {
            self.term_rows.give(&mut batch);
        }
        batch.write_table(&mut host[..batch.table_bytes()]);
        let tables = plan.table..plan.table + plan.rans_tables;
        work.write_tables(&mut host[tables.clone()]);
        // SAFETY: the page-locked host bytes stay untouched until `uploaded`
        // completes (take_slot waits for it before reuse).
        unsafe { dev.copy_from_host_async(&s.stream, host_prefix(&s.host, plan.decoded_end)?) }?;
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        s.stream.wait(&self.start)?;
        let sums = DevRange::all(&s.sums, &s.stream)?;
        let groups = DevRange::all(&s.groups, &s.stream)?;
        let flag = DevRange::all(&self.flag, &s.stream)?;
        work.launch(&self.gpu, &s.stream, dev.sub(tables.start, tables.len())?, sums, groups, flag)?;
        self.gpu.launch(&s.stream, &batch, stage, dev.sub(0, plan.table)?, sums, groups, flag)?;
        LoadTimings::lap(&mut self.timings.queueing, &mut clock);
        Ok(())
    }
}

/// Checks the checksums left to the loader ([`Checksums::OnUpload`]) in one
/// parallel pass, and reads a byte of every page of the other stored bytes
/// that are not page-locked. Both bring a fresh map of a delta file in on
/// every thread at once: left to the planning and copying of each batch,
/// which read a few chunks at a time, its page faults cost several times
/// this pass (`BENCHMARKS-GPU.md`, "A mapped delta").
fn check_stored(jobs: &[Job<'_, '_>]) -> Result<()> {
    // The smallest page of the platforms the loader runs on; larger pages
    // are read more than once, which costs nothing.
    const PAGE: usize = 4096;
    // Below this, waking the thread pool costs more than the pass.
    const PARALLEL_MIN: usize = 1 << 20;
    let pending = |j: &&Job<'_, '_>| j.checksums == Checksums::OnUpload || j.host.is_none();
    let check = |j: &Job<'_, '_>| match j.checksums {
        Checksums::OnUpload => j.chunk.check_checksum(j.label),
        Checksums::Checked => {
            let touched = j.chunk.stored.chunks(PAGE).fold(0u8, |x, page| x ^ page[0]);
            std::hint::black_box(touched);
            Ok(())
        }
    };
    let bytes: usize = jobs.iter().filter(pending).map(|j| j.chunk.stored.len()).sum();
    if bytes < PARALLEL_MIN {
        return jobs.iter().filter(pending).try_for_each(check);
    }
    // The first bad chunk in the call's order, whatever the threads' order.
    let checked: Vec<Result<()>> = jobs.par_iter().filter(pending).map(check).collect();
    checked.into_iter().collect()
}

#[cfg(test)]
mod tests {
    use tpde::{format::checksum64, ErrorCode, WordWidth};

    use super::*;
    use crate::pipeline::ChunkRef;

    /// Checksums left to the loader are all checked before the first batch:
    /// with two corrupt chunks, the first in the call's order is the one
    /// named, whether the pass runs on one thread (a small call) or on many.
    #[test]
    fn the_first_corrupt_chunk_in_order_is_named() {
        let settings = tpde::EncodeSettings::default();
        let target: Vec<u8> = (0..4096u32).map(|i| u8::try_from(i % 251).unwrap()).collect();
        let record = tpde::format::encode_chunk(&target, None, WordWidth::W4, false, settings).unwrap().record;
        for len in [64usize, 1 << 20] {
            let stored: Vec<Vec<u8>> = (0..6u8).map(|k| vec![k; len]).collect();
            let records: Vec<_> = stored
                .iter()
                .enumerate()
                .map(|(k, s)| {
                    let checksum = checksum64(s) ^ u64::from(k == 2 || k == 4);
                    tpde::format::ChunkRecord { checksum, ..record }
                })
                .collect();
            let chunks: Vec<ChunkRef<'_>> = stored
                .iter()
                .zip(&records)
                .map(|(s, &record)| ChunkRef { record, streams: &[], stored: s, words: 1024, resolved_positions: None })
                .collect();
            let range = DevRange::detached(0x100_0000, 4096);
            let jobs = |checksums| -> Vec<Job<'_, '_>> {
                (0..chunks.len())
                    .map(|k| Job {
                        chunk: &chunks[k],
                        checksums,
                        width: WordWidth::W4,
                        host: None,
                        base: range,
                        out: range,
                        label: Some(("w", 10 + k as u64)),
                    })
                    .collect()
            };
            let Err(GpuError::Format(e)) = check_stored(&jobs(Checksums::OnUpload)) else {
                panic!("corrupt chunks passed ({len} bytes each)")
            };
            assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::ChunkChecksum, Some("w"), Some(12)));
            // Checksums already checked are not checked again.
            check_stored(&jobs(Checksums::Checked)).expect("only pages read");
        }
    }

    /// A call's streams are spread evenly over at least as many batches as
    /// slots, between the least batch and a whole slot; a coded stream
    /// counts its stored bytes besides its decoded ones, a stored stream
    /// once; records not validated yet cannot overflow the sum.
    #[test]
    fn the_batch_budget_spreads_a_call_over_the_slots() {
        use tpde::format::{Codec, StreamRecord};
        let record = tpde::format::encode_chunk(&[0; 64], None, WordWidth::W4, false, tpde::EncodeSettings::default())
            .unwrap()
            .record;
        let budget = |streams: &[StreamRecord]| {
            let chunk = ChunkRef { record, streams, stored: &[], words: 16, resolved_positions: None };
            let range = DevRange::detached(0x100_0000, 64);
            let job = Job {
                chunk: &chunk,
                checksums: Checksums::Checked,
                width: WordWidth::W4,
                host: None,
                base: range,
                out: range,
                label: None,
            };
            batch_budget(&[job], 4, 128 << 20)
        };
        let stream = |stored_len: u32, decoded_len: u32, codec| StreamRecord { stored_len, decoded_len, codec };
        const MIB: u32 = 1 << 20;
        let mib = MIB as usize;
        assert_eq!(budget(&[]), 64 * mib, "the least batch");
        let even = 100 * mib + 100 * mib / 32;
        assert_eq!(budget(&[stream(400 * MIB, 400 * MIB, Codec::Stored)]), even);
        assert_eq!(budget(&[stream(160 * MIB, 240 * MIB, Codec::Rans)]), even);
        // 4.25 slots' worth: five even batches, not four full ones and a remnant.
        let b = budget(&[stream(544 * MIB, 544 * MIB, Codec::Stored)]);
        assert!(5 * b >= 544 * mib && 4 * b < 544 * mib && b < 128 * mib, "{b}");
        assert_eq!(budget(&[stream(u32::MAX, u32::MAX, Codec::Zstd); 3]), 128 * mib, "a whole slot at most");
    }
}
