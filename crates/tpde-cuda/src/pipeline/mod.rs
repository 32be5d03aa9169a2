//! The loading pipeline: a ring of page-locked staging slots, each with its
//! own stream. For every batch of chunks, streams stored as they are and the
//! stored bytes of lane rANS streams go to the device in one asynchronous
//! copy straight from the host delta when it sits in page-locked memory
//! ([`TensorRef::host`]); only zstd streams are decoded on the CPU (rayon)
//! into the slot, which follows in a second copy; then the batch's kernels
//! run on the same stream: the fill of its constant streams in the slot's
//! device part, the lane rANS parse launch, its decoder launches
//! by dependency level (each after the positions its base-key contexts read,
//! rebuilt by the `positions` kernel), then the apply kernels, which read a
//! decoded lane rANS stream from the slot's device part as they read any
//! other stream. So the copy of batch k+1 overlaps the kernels of batch k,
//! and the raw copy of a batch overlaps its own CPU decoding. One
//! synchronization at the end, and the device error flag words are read
//! once.

mod digests;
mod faults;
mod host_decode;
mod inputs;
mod launch;
mod plan;
mod ring;
mod staged;
mod timings;

use std::sync::Arc;
use std::time::Instant;

use cudarc::driver::{CudaEvent, CudaSlice, PinnedHostSlice};
use rayon::prelude::*;

use crate::error::{flag, GpuError, Result};
use crate::gpu::{DevRange, Gpu, Stage};
use crate::kernels::LEAF_TERM_BYTES_PER_BLOCK;
use digests::{leaf_checks, LeafScratch, TermRows, LEAF_SCRATCH_BLOCKS};
use faults::locate_device_fault;
use plan::Job;
use ring::Slot;
use tpde::WordWidth;

pub use host_decode::decode_stream;
pub use inputs::{Checksums, ChunkRef, TensorRef};
pub use staged::DeviceDelta;
pub use timings::LoadTimings;

/// Sizes of the staging ring.
#[derive(Clone, Copy, Debug)]
pub struct LoaderConfig {
    /// Staging slots (each with its own stream). At least 2 to overlap.
    pub slots: usize,
    /// Bytes of each slot, host and device. A chunk's decoded streams must
    /// fit, with, for lane rANS streams, their stored bytes (unless they are
    /// read from a page-locked delta), their scratch (about 1 KiB per table
    /// and 4 bytes per tile) and, for a base-key context in a sparse chunk,
    /// 4 bytes per position.
    pub slot_bytes: usize,
    /// Most chunks in one batch (one descriptor table).
    pub max_chunks: usize,
    /// Whether every rebuilt chunk's digest is checked on the device against
    /// its record (spec §10), as the library does on the CPU. On by default;
    /// turn it off only for deltas from a trusted source whose stored
    /// checksums are still verified (see `BENCHMARKS-GPU.md` for its cost).
    /// When on, the loader holds 64 MiB of device scratch for the check.
    pub verify_digests: bool,
}

impl Default for LoaderConfig {
    /// Four slots of 128 MiB: up to 512 MiB page-locked, as much on the
    /// device, allocated as calls first need them. A slot's next upload
    /// waits for the kernels of its last batch, so with fewer bytes in flight
    /// the device idles between the batches of a large model; and every batch
    /// costs the host a fixed time, which bounds a delta read from a mapped
    /// file (`BENCHMARKS-GPU.md`, "A mapped delta").
    fn default() -> Self {
        Self { slots: 4, slot_bytes: 128 << 20, max_chunks: 4096, verify_digests: true }
    }
}

/// Rebuilds target tensors on the GPU from host-resident deltas.
pub struct Loader {
    gpu: Arc<Gpu>,
    cfg: LoaderConfig,
    slots: Vec<Slot>,
    next: usize,
    flag: CudaSlice<u32>,
    flag_host: PinnedHostSlice<u32>,
    start: CudaEvent,
    /// `None` when digests are not checked.
    leaf: Option<LeafScratch>,
    /// The call's term rows that the apply kernels may fill.
    term_rows: TermRows,
    /// One zero byte: the base of tensors that have none.
    zero: Arc<CudaSlice<u8>>,
    /// The host's time in the last call, by phase.
    timings: LoadTimings,
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader").field("gpu", &self.gpu.name()).field("cfg", &self.cfg).finish()
    }
}

const fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

impl Loader {
    /// Allocates the first slot of the staging ring: a page-locked host
    /// buffer (plain, not write-combined, since the decoder reads back its
    /// own output) and a device buffer. The other slots are allocated when a
    /// call first needs them, so that a loader of small models does not
    /// page-lock memory it never uses.
    pub fn new(gpu: Arc<Gpu>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.slots == 0 || cfg.slot_bytes < 4096 || cfg.max_chunks == 0 {
            return Err(GpuError::invalid("loader needs ≥ 1 slot of ≥ 4096 bytes"));
        }
        let ctx = gpu.context().clone();
        let mut slots = Vec::with_capacity(cfg.slots);
        slots.push(Slot::new(&gpu, &cfg)?);
        let flag = gpu.alloc_zeros::<u32>(flag::WORDS)?;
        // SAFETY: only ever read after a device-to-host copy fills it.
        let flag_host = unsafe { ctx.alloc_pinned_with_flags::<u32>(flag::WORDS, 0) }?;
        let start = ctx.new_event(None)?;
        let leaf = if cfg.verify_digests {
            let rows = usize::try_from(LEAF_SCRATCH_BLOCKS).unwrap_or(usize::MAX);
            Some(LeafScratch {
                terms: gpu.alloc_zeros::<u64>(rows * LEAF_TERM_BYTES_PER_BLOCK / 8)?,
                table: gpu.alloc_zeros::<u8>(1)?,
                digests: gpu.alloc_zeros::<u64>(1)?,
            })
        } else {
            None
        };
        let zero = Arc::new(gpu.alloc_zeros::<u8>(1)?);
        Ok(Self {
            gpu,
            cfg,
            slots,
            next: 0,
            flag,
            flag_host,
            start,
            leaf,
            term_rows: TermRows::default(),
            zero,
            timings: LoadTimings::default(),
        })
    }

    /// The device.
    #[must_use]
    pub fn gpu(&self) -> &Arc<Gpu> {
        &self.gpu
    }

    /// The configuration.
    #[must_use]
    pub fn config(&self) -> LoaderConfig {
        self.cfg
    }

    /// Page-locked host bytes the staging ring holds now (as many device
    /// bytes besides): slots are allocated as calls first need them.
    #[must_use]
    pub fn staging_bytes(&self) -> usize {
        self.slots.len() * self.cfg.slot_bytes
    }

    /// Where the host's time went in the last call that rebuilt chunks (all
    /// zero when it failed before its first batch). A call on a
    /// device-resident delta ([`Loader::apply_staged`]) has no checksums,
    /// planning or staging to time.
    #[must_use]
    pub fn last_timings(&self) -> LoadTimings {
        self.timings
    }

    /// A device buffer of one zero byte, which the kernels read as zero words:
    /// the base of a tensor that has none. Shared, so that no call allocates
    /// (and synchronizes) for it.
    #[must_use]
    pub fn zero_byte(&self) -> Arc<CudaSlice<u8>> {
        Arc::clone(&self.zero)
    }

    /// API (a): rebuilds every tensor of `delta` against device-resident base
    /// tensors (one per delta tensor, in order) into new device buffers.
    ///
    /// Device-resident bases are taken as the ones the delta was made
    /// against: check their host copies with [`crate::delta::host_bases`]
    /// before uploading them. With digests on, a wrong base still fails
    /// (`E_CHUNK_DIGEST`), but only after the outputs were written.
    pub fn load(&mut self, delta: &[TensorRef<'_>], base: &[&CudaSlice<u8>]) -> Result<Vec<CudaSlice<u8>>> {
        if base.len() != delta.len() {
            return Err(GpuError::invalid("one base tensor per delta tensor"));
        }
        let started = Instant::now();
        let mut outs = Vec::with_capacity(delta.len());
        for t in delta {
            t.validate()?;
            // SAFETY: every byte is written before use: by the base copy or
            // zero fill in `prepare`, or by dense/raw chunks covering it all.
            outs.push(unsafe { self.gpu.alloc_output(self.gpu.stream(), t.bytes()) }?);
        }
        let (mut jobs, mut checks, mut copies) = (Vec::new(), Vec::new(), Vec::new());
        for ((t, b), o) in delta.iter().zip(base).zip(&outs) {
            let main = self.gpu.stream().clone();
            let b = DevRange::all(*b, &main)?;
            let o = DevRange::of(o, &main, 0, t.bytes())?;
            self.plan_tensor(t, b, o, &mut jobs, &mut copies)?;
            leaf_checks(t, o, &mut checks)?;
        }
        self.run(&jobs, Stage::Apply, &checks, &copies, started).map_err(|e| locate_device_fault(delta, e))?;
        Ok(outs)
    }

    /// API (a), in place: `bufs` hold the base tensors (each exactly the
    /// target's size) and are overwritten with the target.
    pub fn apply_in_place(&mut self, delta: &[TensorRef<'_>], bufs: &mut [CudaSlice<u8>]) -> Result<()> {
        if bufs.len() != delta.len() {
            return Err(GpuError::invalid("one buffer per delta tensor"));
        }
        let main = self.gpu.stream().clone();
        let mut ranges = Vec::with_capacity(bufs.len());
        for (t, b) in delta.iter().zip(bufs.iter()) {
            if b.num_bytes() != t.bytes() {
                return Err(GpuError::invalid(format!("{}: in-place buffer size differs from the target's", t.name)));
            }
            ranges.push(DevRange::all(b, &main)?);
        }
        self.apply_in_place_ranges(delta, &ranges)
    }

    /// [`Loader::apply_in_place`] over device ranges that the caller holds
    /// exclusively, each exactly its target's size.
    pub(crate) fn apply_in_place_ranges(&mut self, delta: &[TensorRef<'_>], ranges: &[DevRange]) -> Result<()> {
        let started = Instant::now();
        let mut jobs = Vec::new();
        let mut checks = Vec::new();
        for (t, &r) in delta.iter().zip(ranges) {
            t.validate()?;
            if r.len() != t.bytes() {
                return Err(GpuError::invalid(format!("{}: in-place range size differs from the target's", t.name)));
            }
            self.plan_chunks(t, r, r, &mut jobs)?;
            leaf_checks(t, r, &mut checks)?;
        }
        // In place, a chunk found corrupt after others were written would
        // leave the buffers neither base nor target: `run` checks every
        // chunk left to it before its first upload. A batch holds at least
        // one job, so the slots its batches can take are allocated first.
        self.allocate_slots(jobs.len())?;
        self.run(&jobs, Stage::Apply, &checks, &[], started).map_err(|e| locate_device_fault(delta, e))
    }

    /// API (a) with a host-resident base: uploads each base tensor through the
    /// pinned ring, then rebuilds in place.
    pub fn load_host_base(&mut self, delta: &[TensorRef<'_>], base: &[&[u8]]) -> Result<Vec<CudaSlice<u8>>> {
        if base.len() != delta.len() {
            return Err(GpuError::invalid("one base tensor per delta tensor"));
        }
        let mut outs = Vec::with_capacity(delta.len());
        for (t, b) in delta.iter().zip(base) {
            t.validate()?;
            // SAFETY: written before use: the base bytes below, zeros after them.
            let mut out = unsafe { self.gpu.alloc_output(self.gpu.stream(), t.bytes()) }?;
            let n = b.len().min(t.bytes());
            let main = self.gpu.stream().clone();
            let rest = DevRange::of(&out, &main, n, t.bytes() - n)?;
            if !rest.is_empty() {
                rest.fill_async(&main, 0)?;
            }
            self.upload_staged(&b[..n], &mut out)?;
            outs.push(out);
        }
        self.apply_in_place(delta, &mut outs)?;
        Ok(outs)
    }

    /// API (b): rebuilds one tensor into `out` from its resident `base`.
    pub fn materialize_into(&mut self, t: &TensorRef<'_>, base: &CudaSlice<u8>, out: &mut CudaSlice<u8>) -> Result<()> {
        let started = Instant::now();
        t.validate()?;
        if out.num_bytes() < t.bytes() {
            return Err(GpuError::invalid(format!("{}: output buffer too small", t.name)));
        }
        let main = self.gpu.stream().clone();
        let b = DevRange::all(base, &main)?;
        let o = DevRange::of(out, &main, 0, t.bytes())?;
        let (mut jobs, mut checks, mut copies) = (Vec::new(), Vec::new(), Vec::new());
        self.plan_tensor(t, b, o, &mut jobs, &mut copies)?;
        leaf_checks(t, o, &mut checks)?;
        self.run(&jobs, Stage::Apply, &checks, &copies, started)
            .map_err(|e| locate_device_fault(std::slice::from_ref(t), e))
    }

    /// API (b), in place: `buf` holds the base and is overwritten with the target.
    pub fn materialize_in_place(&mut self, t: &TensorRef<'_>, buf: &mut CudaSlice<u8>) -> Result<()> {
        self.apply_in_place(std::slice::from_ref(t), std::slice::from_mut(buf))
    }

    /// Absolute positions of a sparse chunk, rebuilt on the GPU (prefix sum of
    /// the gaps, or ranks of the bitmap), copied back.
    pub fn positions(&mut self, chunk: &ChunkRef<'_>, width: WordWidth) -> Result<Vec<u32>> {
        let started = Instant::now();
        chunk.validate(width)?;
        let m = chunk.record.changed_count as usize;
        let out = self.gpu.alloc_zeros::<u32>(m.max(1))?;
        let r = DevRange::of(&out, self.gpu.stream(), 0, m * 4)?;
        let job = Job { chunk, checksums: Checksums::Checked, width, host: None, base: r, out: r, label: None };
        self.run(&[job], Stage::Positions, &[], &[], started)?;
        let mut v = self.gpu.download(&out)?;
        v.truncate(m);
        Ok(v)
    }

    /// Copies host bytes into the start of `dst` through the pinned ring
    /// (no pageable copy), and waits.
    pub fn upload_staged(&mut self, src: &[u8], dst: &mut CudaSlice<u8>) -> Result<()> {
        if src.len() > dst.num_bytes() {
            return Err(GpuError::invalid("upload larger than the destination"));
        }
        self.restart_ring();
        self.queue(|l| {
            let mut off = 0;
            while off < src.len() {
                let n = (src.len() - off).min(l.cfg.slot_bytes);
                let slot = l.take_slot()?;
                let s = &mut l.slots[slot];
                let host = s.host.as_mut_slice()?;
                host[..n]
                    .par_chunks_mut(1 << 20)
                    .zip(src[off..off + n].par_chunks(1 << 20))
                    .for_each(|(d, s)| d.copy_from_slice(s));
                let d = DevRange::of(dst, &s.stream, off, n)?;
                // SAFETY: the host bytes are page-locked and are not written
                // again before `uploaded` completes (take_slot).
                unsafe { d.copy_from_host_async(&s.stream, &host[..n]) }?;
                s.uploaded.record(&s.stream)?;
                s.in_use = true;
                off += n;
            }
            Ok(())
        })?;
        for s in &self.slots {
            s.stream.synchronize()?;
        }
        Ok(())
    }
}
