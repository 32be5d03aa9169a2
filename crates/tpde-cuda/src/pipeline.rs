//! The loading pipeline: a ring of page-locked staging slots, each with its
//! own stream. For every batch of chunks, streams stored as they are go to
//! the device in one asynchronous copy straight from the host delta when it
//! sits in page-locked memory ([`TensorRef::host`]); only zstd streams are
//! decoded on the CPU (rayon) into the slot, which follows in a second copy;
//! then the batch's kernels run on the same stream. So the copy of batch k+1
//! overlaps the kernels of batch k, and the raw copy of a batch overlaps its
//! own CPU decoding. One synchronization at the end, and the device error
//! flag is read once.

use std::cell::RefCell;
use std::sync::Arc;

use cudarc::driver::{result as cu, CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use rayon::prelude::*;
use tpde::container::chunk_map::{ChunkRecord, Codec, Encoding, PositionCoding, StreamRecord, ValueLayout};
use tpde::digest::Digest128;
use tpde::{ErrorCode, Result as FormatResult};

use crate::error::{GpuError, Result};
use crate::gpu::{Batch, DevRange, Gpu, LeafBatch, Stage};
use crate::kernels::{ChunkDesc, KEYS, LEAF_TERM_BYTES_PER_BLOCK};
use crate::width::WordWidth;

/// One chunk of a delta, as the format library stores it: its record, its
/// stream records and its stored bytes (every stream back to back).
#[derive(Clone, Copy, Debug)]
pub struct ChunkRef<'a> {
    /// The chunk record (`spec/FORMAT.md` §6.1).
    pub record: ChunkRecord,
    /// One record per stream, positions first (§6.2).
    pub streams: &'a [StreamRecord],
    /// The stored bytes of all streams.
    pub stored: &'a [u8],
    /// Words in the chunk.
    pub words: u32,
}

impl<'a> ChunkRef<'a> {
    /// Checks the records against each other and the chunk size with the
    /// format library's [`tpde::delta::check_chunk_shape`] (§8.1–§8.4).
    /// Both value orders (§8.6) are read by the kernels.
    pub fn check_shape(&self, width: WordWidth) -> Result<()> {
        tpde::delta::check_chunk_shape(&self.record, self.streams, u64::from(self.words), width.bytes())?;
        Ok(())
    }

    /// [`ChunkRef::check_shape`], and that the stored bytes are as long as
    /// the record says.
    pub fn validate(&self, width: WordWidth) -> Result<()> {
        self.check_shape(width)?;
        if self.stored.len() != self.record.stored_len as usize {
            return Err(GpuError::corrupt("the chunk's stored bytes differ from its stored length"));
        }
        Ok(())
    }

    /// Number of position streams (they come first).
    #[must_use]
    pub fn position_stream_count(&self) -> usize {
        match (self.record.encoding, self.record.position_coding) {
            (Encoding::Sparse, PositionCoding::Gaps) => usize::from(self.record.gap_width),
            (Encoding::Sparse, PositionCoding::Bitmap) => 1,
            _ => 0,
        }
    }

    /// The stored bytes of each stream, in order (the chunk is validated).
    pub fn stored_streams(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let stored = self.stored;
        self.streams.iter().scan(0usize, move |at, r| {
            let start = *at;
            *at += r.stored_len as usize;
            stored.get(start..*at)
        })
    }

    /// Whether the kernels read the base words of the whole chunk range from
    /// the output (unchanged and sparse chunks leave words untouched).
    fn reads_out(&self) -> bool {
        !matches!(self.record.encoding, Encoding::Dense | Encoding::Raw)
    }
}

/// One tensor of a delta.
#[derive(Clone, Debug)]
pub struct TensorRef<'a> {
    /// Tensor name.
    pub name: String,
    /// Word width of its dtype.
    pub width: WordWidth,
    /// Words of the target tensor.
    pub words: u64,
    /// Words per chunk (the last chunk may be shorter).
    pub chunk_words: u32,
    /// Index of its first chunk in the delta file's chunk table, which
    /// errors name with the chunk's position (0 for tensors not from a file).
    pub first_chunk: u64,
    /// Its chunks, in order.
    pub chunks: Vec<ChunkRef<'a>>,
    /// A page-locked host buffer that holds the chunks' stored bytes (for
    /// example a whole delta file read into pinned memory,
    /// [`crate::delta::PinnedDelta`]). Streams stored as they are then go to
    /// the device by asynchronous copies straight from it, with no CPU copy.
    /// `None`: stored streams are copied through the staging ring. Pageable
    /// memory here is correct but slow.
    pub host: Option<&'a [u8]>,
}

impl TensorRef<'_> {
    /// Bytes of the target tensor.
    #[must_use]
    pub fn bytes(&self) -> usize {
        usize::try_from(self.words).unwrap_or(usize::MAX) * self.width.bytes()
    }

    /// Checks every chunk and that the chunks tile the tensor.
    pub fn validate(&self) -> Result<()> {
        let mut words = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            c.validate(self.width)?;
            let last = i + 1 == self.chunks.len();
            if (!last && c.words != self.chunk_words) || c.words > self.chunk_words || c.words == 0 {
                return Err(GpuError::corrupt(format!("{}: chunk {i} has a wrong size", self.name)));
            }
            words += u64::from(c.words);
        }
        if words != self.words {
            return Err(GpuError::corrupt(format!("{}: chunks do not cover the tensor", self.name)));
        }
        Ok(())
    }

    fn needs_base_words(&self) -> bool {
        self.chunks.iter().any(ChunkRef::reads_out)
    }
}

/// Sizes of the staging ring.
#[derive(Clone, Copy, Debug)]
pub struct LoaderConfig {
    /// Staging slots (each with its own stream). At least 2 to overlap.
    pub slots: usize,
    /// Bytes of each slot, host and device. A chunk's decoded streams must fit.
    pub slot_bytes: usize,
    /// Most chunks in one batch (one descriptor table).
    pub max_chunks: usize,
    /// Whether every rebuilt chunk's digest is checked on the device against
    /// its record (spec §10), as the library does on the CPU. On by default;
    /// turn it off only for deltas from a trusted source whose stored
    /// checksums are still verified (see `BENCHMARKS-GPU.md` for its cost).
    /// When on, the loader holds 16 MiB of device scratch for the check.
    pub verify_digests: bool,
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self { slots: 4, slot_bytes: 32 << 20, max_chunks: 4096, verify_digests: true }
    }
}

/// A rebuilt chunk whose leaf digest is checked: its bytes on the device,
/// the digest its record states, and the names an error gives.
struct LeafCheck<'t> {
    out: DevRange,
    digest: Digest128,
    tensor: &'t str,
    chunk: u64,
}

/// The leaf checks of every chunk of a tensor rebuilt into `out`.
fn leaf_checks<'t>(t: &'t TensorRef<'_>, out: DevRange, checks: &mut Vec<LeafCheck<'t>>) -> Result<()> {
    let w = t.width.bytes();
    let mut off = 0usize;
    for (k, c) in t.chunks.iter().enumerate() {
        let n = c.words as usize * w;
        let chunk = t.first_chunk + k as u64;
        checks.push(LeafCheck { out: out.sub(off, n)?, digest: c.record.digest, tensor: &t.name, chunk });
        off += n;
    }
    Ok(())
}

/// Term rows (1 KiB blocks of input) of the leaf digest scratch: 256 MiB of
/// rebuilt bytes per pair of launches, 16 MiB of device memory. The largest
/// chunk, 2^27 bytes (spec §11, `chunk_words` ≤ 2^24 of ≤ 8 bytes), takes
/// 2^17 rows, so every chunk fits alone.
const LEAF_SCRATCH_BLOCKS: u64 = 1 << 18;

/// Device buffers of the leaf digest check, allocated with the loader (the
/// term scratch) or on first need and only ever grown (table and digests),
/// then reused by every call.
struct LeafScratch {
    /// Pass 1's block terms: [`LEAF_SCRATCH_BLOCKS`] rows of 8 `u64`.
    terms: CudaSlice<u64>,
    /// `LeafDesc` tables of every batch of a call, one after the other.
    table: CudaSlice<u8>,
    /// Two `u64` per checked chunk.
    digests: CudaSlice<u64>,
}

struct Slot {
    host: PinnedHostSlice<u8>,
    dev: CudaSlice<u8>,
    sums: CudaSlice<u64>,
    /// The group table of grouped value order: rows of [`KEYS`] `u32`.
    groups: CudaSlice<u32>,
    stream: Arc<CudaStream>,
    uploaded: CudaEvent,
    done: CudaEvent,
    in_use: bool,
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
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader").field("gpu", &self.gpu.name()).field("cfg", &self.cfg).finish()
    }
}

/// A chunk to rebuild and where: `base` and `out` are its words in device
/// memory; `host` is its tensor's [`TensorRef::host`]; `label` its tensor's
/// name and its index in the file, which errors name.
struct Job<'c, 'a> {
    chunk: &'c ChunkRef<'a>,
    width: WordWidth,
    host: Option<&'a [u8]>,
    base: DevRange,
    out: DevRange,
    label: Option<(&'c str, u64)>,
}

/// A stream to decode or copy into a host slot: its offset there, its
/// record, its stored bytes, and which chunk of the batch it belongs to.
type StreamTask<'a> = (usize, StreamRecord, &'a [u8], usize);

const fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
}

/// Where the streams of one batch go in a slot. Device layout:
/// `[descriptor table | decoded streams | raw copy of the host delta]`;
/// the host slot holds the first two parts, uploaded in one copy.
struct Plan<'a> {
    /// Jobs in the batch.
    count: usize,
    /// Bytes of the descriptor table (aligned).
    table: usize,
    /// End of the decoded part (table included).
    decoded_end: usize,
    /// The host range copied as it is, and where it lands in the slot.
    raw: Option<(&'a [u8], usize)>,
    /// Device offset of every stream of every job.
    offsets: Vec<Vec<usize>>,
    /// Streams to decode or copy into the host slot.
    tasks: Vec<StreamTask<'a>>,
}

impl Loader {
    /// Allocates the staging ring: `slots` page-locked host buffers (plain,
    /// not write-combined, since the decoder reads back its own output) and
    /// as many device buffers.
    pub fn new(gpu: Arc<Gpu>, cfg: LoaderConfig) -> Result<Self> {
        if cfg.slots == 0 || cfg.slot_bytes < 4096 || cfg.max_chunks == 0 {
            return Err(GpuError::invalid("loader needs ≥ 1 slot of ≥ 4096 bytes"));
        }
        let ctx = gpu.context().clone();
        let max_tiles = cfg.slot_bytes / 64 + cfg.max_chunks + 1;
        let group_rows = Self::max_group_rows(&cfg);
        let mut slots = Vec::with_capacity(cfg.slots);
        for _ in 0..cfg.slots {
            // SAFETY: the memory is uninitialized bytes; every byte is written
            // (decoded or copied) before it is uploaded, and `u8` has no
            // invalid bit patterns.
            let host = unsafe { ctx.alloc_pinned_with_flags::<u8>(cfg.slot_bytes, 0) }?;
            let stream = gpu.new_stream()?;
            let dev = gpu.alloc_zeros::<u8>(cfg.slot_bytes)?;
            let sums = gpu.alloc_zeros::<u64>(max_tiles)?;
            let groups = gpu.alloc_zeros::<u32>(group_rows * KEYS)?;
            let uploaded = ctx.new_event(None)?;
            let done = ctx.new_event(None)?;
            slots.push(Slot { host, dev, sums, groups, stream, uploaded, done, in_use: false });
        }
        let flag = gpu.alloc_zeros::<u32>(1)?;
        // SAFETY: only ever read after a device-to-host copy fills it.
        let flag_host = unsafe { ctx.alloc_pinned_with_flags::<u32>(1, 0) }?;
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
        Ok(Self { gpu, cfg, slots, next: 0, flag, flag_host, start, leaf })
    }

    /// Rows of the group table per slot. A chunk that fits a slot has at
    /// most `slot_bytes / 4096 + 1` tiles (each tile covers at least 4096
    /// bytes of decoded streams) and takes one row more; batches of many
    /// small grouped chunks are cut at this bound.
    fn max_group_rows(cfg: &LoaderConfig) -> usize {
        cfg.slot_bytes / 4096 + 2 * cfg.max_chunks.min(512) + 2
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
        let mut outs = Vec::with_capacity(delta.len());
        for t in delta {
            t.validate()?;
            // SAFETY: every byte is written before use: by the base copy or
            // zero fill in `prepare`, or by dense/raw chunks covering it all.
            outs.push(unsafe { self.gpu.stream().alloc::<u8>(t.bytes().max(1)) }?);
        }
        let mut jobs = Vec::new();
        let mut checks = Vec::new();
        for ((t, b), o) in delta.iter().zip(base).zip(&outs) {
            let main = self.gpu.stream().clone();
            let b = DevRange::all(*b, &main)?;
            let o = DevRange::of(o, &main, 0, t.bytes())?;
            self.plan_tensor(t, b, o, &mut jobs)?;
            leaf_checks(t, o, &mut checks)?;
        }
        self.run(&jobs, Stage::Apply).map_err(|e| locate_device_fault(delta, e))?;
        self.check_leaves(&checks)?;
        Ok(outs)
    }

    /// API (a), in place: `bufs` hold the base tensors (each exactly the
    /// target's size) and are overwritten with the target.
    pub fn apply_in_place(&mut self, delta: &[TensorRef<'_>], bufs: &mut [CudaSlice<u8>]) -> Result<()> {
        if bufs.len() != delta.len() {
            return Err(GpuError::invalid("one buffer per delta tensor"));
        }
        let mut jobs = Vec::new();
        let mut checks = Vec::new();
        let main = self.gpu.stream().clone();
        for (t, b) in delta.iter().zip(bufs.iter()) {
            t.validate()?;
            if b.num_bytes() != t.bytes() {
                return Err(GpuError::invalid(format!("{}: in-place buffer size differs from the target's", t.name)));
            }
            let r = DevRange::all(b, &main)?;
            self.plan_chunks(t, r, r, &mut jobs)?;
            leaf_checks(t, r, &mut checks)?;
        }
        self.run(&jobs, Stage::Apply).map_err(|e| locate_device_fault(delta, e))?;
        self.check_leaves(&checks)
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
            let mut out = self.gpu.alloc_zeros::<u8>(t.bytes())?;
            let n = b.len().min(t.bytes());
            self.upload_staged(&b[..n], &mut out)?;
            outs.push(out);
        }
        self.apply_in_place(delta, &mut outs)?;
        Ok(outs)
    }

    /// API (b): rebuilds one tensor into `out` from its resident `base`.
    pub fn materialize_into(&mut self, t: &TensorRef<'_>, base: &CudaSlice<u8>, out: &mut CudaSlice<u8>) -> Result<()> {
        t.validate()?;
        if out.num_bytes() < t.bytes() {
            return Err(GpuError::invalid(format!("{}: output buffer too small", t.name)));
        }
        let main = self.gpu.stream().clone();
        let b = DevRange::all(base, &main)?;
        let o = DevRange::of(out, &main, 0, t.bytes())?;
        let mut jobs = Vec::new();
        self.plan_tensor(t, b, o, &mut jobs)?;
        let mut checks = Vec::new();
        leaf_checks(t, o, &mut checks)?;
        self.run(&jobs, Stage::Apply).map_err(|e| locate_device_fault(std::slice::from_ref(t), e))?;
        self.check_leaves(&checks)
    }

    /// API (b), in place: `buf` holds the base and is overwritten with the target.
    pub fn materialize_in_place(&mut self, t: &TensorRef<'_>, buf: &mut CudaSlice<u8>) -> Result<()> {
        self.apply_in_place(std::slice::from_ref(t), std::slice::from_mut(buf))
    }

    /// Absolute positions of a sparse chunk, rebuilt on the GPU (prefix sum of
    /// the gaps, or ranks of the bitmap), copied back.
    pub fn positions(&mut self, chunk: &ChunkRef<'_>, width: WordWidth) -> Result<Vec<u32>> {
        chunk.validate(width)?;
        let m = chunk.record.changed_count as usize;
        let out = self.gpu.alloc_zeros::<u32>(m.max(1))?;
        let r = DevRange::of(&out, self.gpu.stream(), 0, m * 4)?;
        self.run(&[Job { chunk, width, host: None, base: r, out: r, label: None }], Stage::Positions)?;
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
        let mut off = 0;
        while off < src.len() {
            let n = (src.len() - off).min(self.cfg.slot_bytes);
            let slot = self.take_slot()?;
            let s = &mut self.slots[slot];
            let host = s.host.as_mut_slice()?;
            host[..n]
                .par_chunks_mut(1 << 20)
                .zip(src[off..off + n].par_chunks(1 << 20))
                .for_each(|(d, s)| d.copy_from_slice(s));
            let d = DevRange::of(dst, &s.stream, off, n)?;
            // SAFETY: `d` is inside `dst`; the host bytes are page-locked and
            // are not written again before `uploaded` completes (take_slot).
            unsafe { cu::memcpy_htod_async(d.ptr(), &host[..n], s.stream.cu_stream()) }?;
            s.uploaded.record(&s.stream)?;
            s.in_use = true;
            off += n;
        }
        for s in &self.slots {
            s.stream.synchronize()?;
        }
        Ok(())
    }

    /// Prepares `out` for a tensor and appends its chunks to `jobs`.
    fn plan_tensor<'c, 'a>(
        &mut self,
        t: &'c TensorRef<'a>,
        base: DevRange,
        out: DevRange,
        jobs: &mut Vec<Job<'c, 'a>>,
    ) -> Result<()> {
        if self.prepare_out(base, out, t.bytes(), t.width, t.needs_base_words())? {
            self.plan_chunks(t, out, out, jobs)
        } else {
            self.plan_chunks(t, base, out, jobs)
        }
    }

    /// Copies the base words into `out` on the main stream where the chunks
    /// need them (sparse or unchanged chunks, or a base shorter than the
    /// target, whose missing words read as 0 per spec "Words"). Returns
    /// whether the chunks then apply in place on `out`.
    fn prepare_out(
        &mut self,
        base: DevRange,
        out: DevRange,
        tb: usize,
        width: WordWidth,
        needs_base: bool,
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
            // SAFETY: both ranges lie inside live buffers (DevRange) and do
            // not overlap (checked above).
            unsafe { cu::memcpy_dtod_async(out.ptr(), base.ptr(), n, main.cu_stream()) }?;
        }
        if n < tb {
            // SAFETY: `out.ptr() + n .. + tb` is inside `out`.
            unsafe { cu::memset_d8_async(out.ptr() + n as u64, 0, tb - n, main.cu_stream()) }?;
        }
        Ok(true)
    }

    fn plan_chunks<'c, 'a>(
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
                    width: t.width,
                    host: t.host,
                    base: base.sub(off, n)?,
                    out: out.sub(off, n)?,
                    label: Some((&t.name, t.first_chunk + k as u64)),
                });
            }
            off += n;
        }
        Ok(())
    }

    fn take_slot(&mut self) -> Result<usize> {
        let i = self.next;
        self.next = (self.next + 1) % self.slots.len();
        let s = &mut self.slots[i];
        if s.in_use {
            s.uploaded.synchronize()?;
            s.in_use = false;
        }
        Ok(i)
    }

    /// Runs jobs: batches them into slots, uploads, decodes, launches; then
    /// waits once and checks the device error flag. Then, unless the caller
    /// opted out ([`LoaderConfig::verify_digests`]), the leaf digest of every
    /// rebuilt chunk is computed on the device and compared with the chunk's
    /// record (spec §10); a mismatch is the library's `E_CHUNK_DIGEST`.
    fn run(&mut self, jobs: &[Job<'_, '_>], stage: Stage) -> Result<()> {
        let main = self.gpu.stream().clone();
        let flag = DevRange::all(&self.flag, &main)?;
        // SAFETY: the flag buffer is live and 4 bytes long.
        unsafe { cu::memset_d8_async(flag.ptr(), 0, 4, main.cu_stream()) }?;
        // Kernels wait for this (the flag reset and the base copy into the
        // output); uploads do not.
        self.start.record(&main)?;
        let mut i = 0;
        while i < jobs.len() {
            let plan = self.plan_batch(&jobs[i..])?;
            self.flush(&jobs[i..i + plan.count], &plan, stage)?;
            i += plan.count;
        }
        self.finish()
    }

    /// Chooses the next batch (a prefix of `jobs` of one word width that fits
    /// a slot) and places its streams.
    fn plan_batch<'a>(&self, jobs: &[Job<'_, 'a>]) -> Result<Plan<'a>> {
        let width = jobs[0].width;
        let max_tiles = self.slots[0].sums.len();
        let max_rows = self.slots[0].groups.len() / KEYS;
        let host = jobs[0].host;
        // Per stream: Ok(offset in the decoded part) or Err(offset in `host`).
        let mut places: Vec<Vec<std::result::Result<usize, usize>>> = Vec::new();
        let mut decoded = 0usize;
        let mut raw: Option<(usize, usize)> = None;
        let mut tiles = 0usize;
        let mut rows = 0usize;
        for job in jobs.iter().take(self.cfg.max_chunks) {
            let c = job.chunk;
            if job.width != width {
                break;
            }
            c.validate(width)?;
            let np = c.position_stream_count();
            let mut dec = decoded;
            let mut span = raw;
            let mut place = Vec::with_capacity(c.streams.len());
            for (k, (r, bytes)) in c.streams.iter().zip(c.stored_streams()).enumerate() {
                // A stored stream is read where it lands, if it lies in the
                // page-locked host buffer and keeps its word alignment.
                let at = host
                    .filter(|_| job.host.map(<[u8]>::as_ptr) == host.map(<[u8]>::as_ptr))
                    .and_then(|h| offset_in(h, bytes))
                    .filter(|&o| {
                        r.codec == Codec::Stored
                            && (k < np || c.record.value_layout != ValueLayout::Words || o % width.bytes() == 0)
                    });
                match at {
                    Some(o) => {
                        let end = o + bytes.len();
                        span = Some(span.map_or((o, end), |(lo, hi)| (lo.min(o), hi.max(end))));
                        place.push(Err(o));
                    }
                    None => {
                        place.push(Ok(dec));
                        dec = align(dec + r.decoded_len as usize, 16);
                    }
                }
            }
            let t = Batch::tiles_of(&c.record, c.words) as usize;
            let g = Batch::group_rows_of(&c.record, c.words) as usize;
            let table = align((places.len() + 1) * ChunkDesc::BYTES, 64);
            let raw_len = span.map_or(0, |(lo, hi)| hi - lo + 16);
            if table + dec + 16 + raw_len > self.cfg.slot_bytes || tiles + t > max_tiles || rows + g > max_rows {
                if places.is_empty() {
                    return Err(GpuError::invalid(
                        "a chunk does not fit a staging slot; raise LoaderConfig::slot_bytes",
                    ));
                }
                break;
            }
            decoded = dec;
            raw = span;
            tiles += t;
            rows += g;
            places.push(place);
        }
        let count = places.len();
        let table = align(count * ChunkDesc::BYTES, 64);
        let decoded_end = table + decoded;
        let raw = match (raw, host) {
            // Same offset modulo 16 on both sides keeps every stream's alignment.
            (Some((lo, hi)), Some(h)) => Some((&h[lo..hi], align(decoded_end, 16) + lo % 16)),
            _ => None,
        };
        let mut tasks = Vec::new();
        let mut offsets = Vec::with_capacity(count);
        for (j, (job, place)) in jobs.iter().zip(&places).enumerate() {
            let mut offs = Vec::with_capacity(place.len());
            for ((p, r), bytes) in place.iter().zip(job.chunk.streams).zip(job.chunk.stored_streams()) {
                match (*p, raw, host) {
                    (Ok(d), _, _) => {
                        tasks.push((table + d, *r, bytes, j));
                        offs.push(table + d);
                    }
                    (Err(o), Some((span, at)), Some(h)) => {
                        let lo = offset_in(h, span).unwrap_or(0);
                        offs.push(at + o - lo);
                    }
                    _ => unreachable!("a raw stream implies a raw span"),
                }
            }
            offsets.push(offs);
        }
        Ok(Plan { count, table, decoded_end, raw, offsets, tasks })
    }

    /// Uploads one batch into a slot (the raw span first, straight from the
    /// page-locked host delta, while the CPU decodes the rest) and launches
    /// its kernels.
    fn flush(&mut self, jobs: &[Job<'_, '_>], plan: &Plan<'_>, stage: Stage) -> Result<()> {
        let slot = self.take_slot()?;
        let s = &mut self.slots[slot];
        let dev = DevRange::all(&s.dev, &s.stream)?;
        if let Some((span, at)) = plan.raw {
            let d = dev.sub(at, span.len())?;
            // SAFETY: `d` lies inside the slot's device buffer; `span` is
            // borrowed for the whole call, which synchronizes before it returns.
            unsafe { cu::memcpy_htod_async(d.ptr(), span, s.stream.cu_stream()) }?;
        }
        let host = s.host.as_mut_slice()?;
        decode_tasks(&mut host[..plan.decoded_end], &plan.tasks, |j| jobs[j].label)?;
        let mut batch = Batch::new(jobs[0].width);
        for (j, offs) in jobs.iter().zip(&plan.offsets) {
            let streams = offs
                .iter()
                .zip(j.chunk.streams)
                .map(|(&o, r)| dev.sub(o, r.decoded_len as usize))
                .collect::<Result<Vec<_>>>()?;
            match stage {
                Stage::Apply => batch.push(j.chunk, &streams, j.base, j.out)?,
                Stage::Positions => batch.push_positions(j.chunk, &streams, j.out)?,
            }
        }
        batch.write_table(&mut host[..batch.table_bytes()]);
        // SAFETY: the prefix fits the device slot (same size as the host
        // slot); the page-locked host bytes stay untouched until `uploaded`
        // completes (take_slot waits for it before reuse).
        unsafe { cu::memcpy_htod_async(dev.ptr(), host_prefix(&s.host, plan.decoded_end)?, s.stream.cu_stream()) }?;
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        s.stream.wait(&self.start)?;
        let sums = DevRange::all(&s.sums, &s.stream)?;
        let groups = DevRange::all(&s.groups, &s.stream)?;
        let flag = DevRange::all(&self.flag, &s.stream)?;
        self.gpu.launch(&s.stream, &batch, stage, dev.sub(0, plan.table)?, sums, groups, flag)
    }

    /// Decodes every stream of `delta` once into one device buffer, so that
    /// later applies launch kernels only (weights sync of many fine-tunes of
    /// one base, or repeated just-in-time materialization).
    pub fn stage_on_device(&mut self, delta: &[TensorRef<'_>]) -> Result<DeviceDelta> {
        let mut tensors = Vec::with_capacity(delta.len());
        let mut total = 0usize;
        // every chunk to decode, with its tensor's name and its index
        let mut order: Vec<(&ChunkRef<'_>, &str, u64)> = Vec::new();
        for t in delta {
            t.validate()?;
            let mut chunks = Vec::new();
            let mut word = 0u64;
            for (k, c) in t.chunks.iter().enumerate() {
                if c.record.encoding != Encoding::Unchanged {
                    let mut offsets = Vec::with_capacity(c.streams.len());
                    for r in c.streams {
                        offsets.push(total);
                        total = align(total + r.decoded_len as usize, 16);
                    }
                    chunks.push(StagedChunk {
                        record: c.record,
                        streams: c.streams.to_vec(),
                        words: c.words,
                        offsets,
                        word,
                    });
                    order.push((c, &t.name, t.first_chunk + k as u64));
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
                leaves: t.chunks.iter().map(|c| (c.record.digest, c.words)).collect(),
            });
        }
        let offsets: Vec<usize> =
            tensors.iter().flat_map(|t| t.chunks.iter().map(|c| c.offsets.first().copied().unwrap_or(0))).collect();
        // SAFETY: every byte of a stream range is written by the uploads below
        // before any kernel reads it; padding bytes are never read.
        let data = unsafe { self.gpu.stream().alloc::<u8>(total.max(1)) }?;
        self.gpu.stream().synchronize()?;
        let mut i = 0;
        while i < order.len() {
            // chunks i..end fit one slot
            let first = offsets[i];
            let mut end = i;
            while end < order.len() {
                let next = offsets.get(end + 1).copied().unwrap_or(total);
                if next - first > self.cfg.slot_bytes {
                    break;
                }
                end += 1;
            }
            if end == i {
                return Err(GpuError::invalid("a chunk does not fit a staging slot; raise LoaderConfig::slot_bytes"));
            }
            let used = offsets.get(end).copied().unwrap_or(total) - first;
            let mut tasks = Vec::new();
            for (k, ((c, _, _), o)) in order[i..end].iter().zip(&offsets[i..end]).enumerate() {
                let mut at = o - first;
                for (r, bytes) in c.streams.iter().zip(c.stored_streams()) {
                    tasks.push((at, *r, bytes, k));
                    at = align(at + r.decoded_len as usize, 16);
                }
            }
            let slot = self.take_slot()?;
            let s = &mut self.slots[slot];
            let batch = &order[i..end];
            decode_tasks(&mut s.host.as_mut_slice()?[..used], &tasks, |k| Some((batch[k].1, batch[k].2)))?;
            let d = DevRange::of(&data, &s.stream, first, used)?;
            // SAFETY: `d` is inside `data`; the host bytes stay untouched
            // until `uploaded` completes.
            unsafe { cu::memcpy_htod_async(d.ptr(), host_prefix(&s.host, used)?, s.stream.cu_stream()) }?;
            s.uploaded.record(&s.stream)?;
            s.in_use = true;
            i = end;
        }
        for s in &self.slots {
            s.stream.synchronize()?;
        }
        Ok(DeviceDelta { data, tensors })
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
        self.run_staged(delta, &outs.clone(), &outs)
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
        let mut bases = Vec::new();
        let mut os = Vec::new();
        for ((t, b), o) in delta.tensors.iter().zip(base).zip(outs.iter()) {
            let tb = t.bytes();
            if o.num_bytes() < tb {
                return Err(GpuError::invalid(format!("{}: output buffer too small", t.name)));
            }
            let b = DevRange::all(*b, &main)?;
            let o = DevRange::of(o, &main, 0, tb)?;
            let in_place = self.prepare_out(b, o, tb, t.width, t.needs_base)?;
            bases.push(if in_place { o } else { b });
            os.push(o);
        }
        self.run_staged(delta, &bases, &os)
    }

    fn run_staged(&mut self, delta: &DeviceDelta, bases: &[DevRange], outs: &[DevRange]) -> Result<()> {
        self.launch_staged(delta, bases, outs)?;
        let mut checks = Vec::new();
        for (t, o) in delta.tensors.iter().zip(outs) {
            let w = t.width.bytes();
            let mut off = 0usize;
            for (k, (digest, words)) in t.leaves.iter().enumerate() {
                let n = *words as usize * w;
                let chunk = t.first_chunk + k as u64;
                checks.push(LeafCheck { out: o.sub(off, n)?, digest: *digest, tensor: &t.name, chunk });
                off += n;
            }
        }
        self.check_leaves(&checks)
    }

    fn launch_staged(&mut self, delta: &DeviceDelta, bases: &[DevRange], outs: &[DevRange]) -> Result<()> {
        let main = self.gpu.stream().clone();
        let flag = DevRange::all(&self.flag, &main)?;
        // SAFETY: the flag buffer is live and 4 bytes long.
        unsafe { cu::memset_d8_async(flag.ptr(), 0, 4, main.cu_stream()) }?;
        self.start.record(&main)?;
        let data = DevRange::all(&delta.data, &main)?;
        let max_tiles = self.slots[0].sums.len();
        let max_rows = self.slots[0].groups.len() / KEYS;
        let table_cap = self.cfg.slot_bytes / ChunkDesc::BYTES;
        for ((t, b), o) in delta.tensors.iter().zip(bases).zip(outs) {
            let w = t.width.bytes() as u64;
            let mut batch = Batch::new(t.width);
            let mut count = 0;
            for c in &t.chunks {
                let chunk = ChunkRef { record: c.record, streams: &c.streams, stored: &[], words: c.words };
                let nb = c.words as usize * t.width.bytes();
                let off = usize::try_from(c.word * w).map_err(|_| GpuError::invalid("tensor too large"))?;
                let rows = Batch::group_rows_of(&c.record, c.words) as usize;
                if rows > max_rows {
                    return Err(GpuError::invalid("a chunk has too many tiles; raise LoaderConfig::slot_bytes"));
                }
                if count == self.cfg.max_chunks.min(table_cap)
                    || batch.tiles() as usize + Batch::tiles_of(&c.record, c.words) as usize > max_tiles
                    || batch.group_rows() as usize + rows > max_rows
                {
                    self.launch_table(&batch)?;
                    batch = Batch::new(t.width);
                    count = 0;
                }
                let streams = c
                    .offsets
                    .iter()
                    .zip(&c.streams)
                    .map(|(&o, r)| data.sub(o, r.decoded_len as usize))
                    .collect::<Result<Vec<_>>>()?;
                batch.push(&chunk, &streams, b.sub(off, nb)?, o.sub(off, nb)?)?;
                count += 1;
            }
            self.launch_table(&batch)?;
        }
        self.finish()
    }

    /// Uploads a batch's descriptor table through a slot and launches it.
    fn launch_table(&mut self, batch: &Batch) -> Result<()> {
        if batch.tiles() == 0 {
            return Ok(());
        }
        let slot = self.take_slot()?;
        let s = &mut self.slots[slot];
        let n = batch.table_bytes();
        batch.write_table(&mut s.host.as_mut_slice()?[..n]);
        let dev = DevRange::all(&s.dev, &s.stream)?;
        // SAFETY: the table fits the slot (checked by the caller through
        // `table_cap`); host bytes untouched until `uploaded` completes.
        unsafe { cu::memcpy_htod_async(dev.ptr(), host_prefix(&s.host, n)?, s.stream.cu_stream()) }?;
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        s.stream.wait(&self.start)?;
        let sums = DevRange::all(&s.sums, &s.stream)?;
        let groups = DevRange::all(&s.groups, &s.stream)?;
        let flag = DevRange::all(&self.flag, &s.stream)?;
        self.gpu.launch(&s.stream, batch, Stage::Apply, dev.sub(0, n)?, sums, groups, flag)
    }

    /// Joins every slot stream into the main stream, copies the device error
    /// flag back (page-locked), waits once and checks the flag.
    fn finish(&mut self) -> Result<()> {
        let main = self.gpu.stream().clone();
        for s in &self.slots {
            s.done.record(&s.stream)?;
            main.wait(&s.done)?;
        }
        let flag = DevRange::all(&self.flag, &main)?;
        let host = self.flag_host.as_mut_slice()?;
        // SAFETY: 4 bytes from the live flag buffer into page-locked memory
        // that nothing else touches until the synchronize below.
        unsafe { cu::memcpy_dtoh_async(&mut host[..1], flag.ptr(), main.cu_stream()) }?;
        main.synchronize()?;
        let bits = self.flag_host.as_slice()?[0];
        if bits != 0 {
            return Err(GpuError::from_flag(bits));
        }
        Ok(())
    }

    /// Computes the leaf digest of every checked chunk on the device and
    /// compares it with the chunk's record. The chunks go in batches of at
    /// most [`LEAF_SCRATCH_BLOCKS`] blocks, two launches each, all on the
    /// main stream, reusing the loader's scratch. Skipped when the caller
    /// opted out.
    fn check_leaves(&mut self, checks: &[LeafCheck<'_>]) -> Result<()> {
        let Some(leaf) = self.leaf.as_mut().filter(|_| self.cfg.verify_digests && !checks.is_empty()) else {
            return Ok(());
        };
        let mut batches = vec![LeafBatch::default()];
        for c in checks {
            let blocks = LeafBatch::blocks_of(c.out.len());
            if blocks > LEAF_SCRATCH_BLOCKS {
                return Err(GpuError::invalid("chunk larger than the leaf digest scratch"));
            }
            if batches.last().is_some_and(|b| b.blocks() + blocks > LEAF_SCRATCH_BLOCKS) {
                batches.push(LeafBatch::default());
            }
            if let Some(b) = batches.last_mut() {
                b.push(c.out);
            }
        }
        let table_bytes: usize = batches.iter().map(LeafBatch::table_bytes).sum();
        let mut table = vec![0u8; table_bytes];
        let mut at = 0;
        for b in &batches {
            b.write_table(&mut table[at..at + b.table_bytes()]);
            at += b.table_bytes();
        }
        // Grown only, to the next power of two; nothing on the device uses
        // the old buffers any more (every call synchronizes before it returns).
        if leaf.table.num_bytes() < table_bytes {
            leaf.table = self.gpu.alloc_zeros::<u8>(table_bytes.next_power_of_two())?;
        }
        if leaf.digests.len() < 2 * checks.len() {
            leaf.digests = self.gpu.alloc_zeros::<u64>((2 * checks.len()).next_power_of_two())?;
        }
        let main = self.gpu.stream().clone();
        main.memcpy_htod(&table, &mut leaf.table.slice_mut(..table_bytes))?;
        let (table_all, terms, digests_all) = (
            DevRange::all(&leaf.table, &main)?,
            DevRange::all(&leaf.terms, &main)?,
            DevRange::all(&leaf.digests, &main)?,
        );
        let (mut table_at, mut first) = (0, 0);
        for b in &batches {
            let t = table_all.sub(table_at, b.table_bytes())?;
            let o = digests_all.sub(16 * first, 16 * b.len())?;
            self.gpu.launch_leaves(&main, b, t, terms, o)?;
            table_at += b.table_bytes();
            first += b.len();
        }
        let leaves = main.clone_dtoh(&leaf.digests.slice(..2 * checks.len()))?;
        for (c, halves) in checks.iter().zip(leaves.chunks_exact(2)) {
            let leaf = ((u128::from(halves[1]) << 64) | u128::from(halves[0])).to_be_bytes();
            if leaf != c.digest {
                return Err(GpuError::Format(
                    tpde::Error::new(ErrorCode::ChunkDigest, "the rebuilt chunk does not match its digest")
                        .in_tensor(c.tensor)
                        .in_chunk(c.chunk),
                ));
            }
        }
        Ok(())
    }
}

/// A chunk of a [`DeviceDelta`]: its stream `i` starts at `offsets[i]` of
/// the data; its first word is `word` of the tensor.
#[derive(Clone, Debug)]
struct StagedChunk {
    record: ChunkRecord,
    streams: Vec<StreamRecord>,
    words: u32,
    offsets: Vec<usize>,
    word: u64,
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
    /// The digest and words of every chunk (unchanged ones too), in order.
    leaves: Vec<(Digest128, u32)>,
}

impl StagedTensor {
    fn bytes(&self) -> usize {
        usize::try_from(self.words).unwrap_or(usize::MAX) * self.width.bytes()
    }
}

/// A delta whose streams are decoded and resident in device memory
/// ([`Loader::stage_on_device`]).
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
}

/// A kernel's error flag says what is wrong with a delta but not where. The faults
/// it reports (positions, changed counts) need no base, so the format library's own
/// check of each chunk ([`tpde::delta::check_chunk_payload`]) finds the first chunk
/// with the same fault, and the error names its tensor and chunk. This runs only on
/// the error path; where no chunk shows the fault on the CPU, `err` is returned as
/// it is.
fn locate_device_fault(delta: &[TensorRef<'_>], err: GpuError) -> GpuError {
    let code = match &err {
        GpuError::Format(e) if e.chunk().is_none() => e.code(),
        _ => return err,
    };
    let mut scratch = tpde::delta::DecodeScratch::default();
    for t in delta {
        for (k, c) in t.chunks.iter().enumerate() {
            let input = tpde::delta::ChunkInput {
                record: &c.record,
                streams: c.streams,
                stored: c.stored,
                base: None,
                words: c.words as usize,
                word_bytes: t.width.bytes(),
            };
            match tpde::delta::check_chunk_payload(&input, &mut scratch) {
                Err(found) if found.code() == code => {
                    return GpuError::Format(found.in_tensor(&t.name).in_chunk(t.first_chunk + k as u64));
                }
                _ => {}
            }
        }
    }
    err
}

/// Decodes (zstd) or copies (stored) streams into `host` at their offsets,
/// in parallel. Offsets increase and the streams do not overlap. A format
/// error names the tensor and chunk that `label` gives for the task's chunk.
fn decode_tasks<'n>(
    host: &mut [u8],
    tasks: &[StreamTask<'_>],
    label: impl Fn(usize) -> Option<(&'n str, u64)> + Sync,
) -> Result<()> {
    let mut rest = host;
    let mut at = 0usize;
    let mut work = Vec::with_capacity(tasks.len());
    for (off, r, bytes, chunk) in tasks {
        let len = r.decoded_len as usize;
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
        decode_stream(r, bytes, dst).map_err(|e| match (e, label(chunk)) {
            (GpuError::Format(e), Some((tensor, index))) => GpuError::Format(e.in_tensor(tensor).in_chunk(index)),
            (e, _) => e,
        })
    })
}

/// Offset of `part` in `whole`, if `part` lies inside it.
fn offset_in(whole: &[u8], part: &[u8]) -> Option<usize> {
    let (w, p) = (whole.as_ptr() as usize, part.as_ptr() as usize);
    (p >= w && p + part.len() <= w + whole.len()).then(|| p - w)
}

fn host_prefix(host: &PinnedHostSlice<u8>, n: usize) -> Result<&[u8]> {
    Ok(&host.as_slice()?[..n])
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
/// bytes, a bounded window) and reports the library's codes.
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
        Codec::Zstd => DECODED
            .with(|cell| -> FormatResult<()> {
                let mut decoded = cell.borrow_mut();
                decoded.clear();
                tpde::codec::zstd_stream::decompress_into(stored, len, &mut decoded)?;
                dst.copy_from_slice(&decoded);
                Ok(())
            })
            .map_err(GpuError::Format),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stream the library's decoder refuses is reported with its code,
    /// naming the tensor and the chunk's index in the file.
    #[test]
    fn a_bad_stream_names_its_tensor_and_chunk() {
        let good = tpde::codec::zstd_stream::compress(&[3u8; 64], tpde::codec::zstd_stream::Effort::Level(1)).unwrap();
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

    /// A kernel's flag names no chunk; the library's check of each chunk finds
    /// the one with the same fault, and only that one.
    #[test]
    fn a_device_fault_is_located_by_the_library_check() {
        // Every word changed: a dense chunk, whose streams do not depend on the count.
        let base = vec![0u8; 4096];
        let target: Vec<u8> = (0..4096).map(|i| u8::try_from(i % 251 + 1).unwrap()).collect();
        let settings = tpde::delta::EncodeSettings::default();
        let good = tpde::delta::encode_chunk(&target, Some(&base), 4, false, settings).unwrap();
        assert_eq!(good.record.encoding, tpde::container::chunk_map::Encoding::Dense);
        let mut bad = good.clone();
        bad.record.changed_count -= 1;
        fn chunk(c: &tpde::delta::EncodedChunk) -> ChunkRef<'_> {
            ChunkRef { record: c.record, streams: &c.streams, stored: &c.data, words: 1024 }
        }
        let t = TensorRef {
            name: "w".into(),
            width: WordWidth::W4,
            words: 2048,
            chunk_words: 1024,
            first_chunk: 5,
            chunks: vec![chunk(&good), chunk(&bad)],
            host: None,
        };
        let flagged = GpuError::from_flag(crate::error::flag::COUNT_MISMATCH);
        let GpuError::Format(e) = locate_device_fault(std::slice::from_ref(&t), flagged) else { panic!() };
        assert_eq!((e.code(), e.tensor(), e.chunk()), (ErrorCode::ChangedCount, Some("w"), Some(6)));
        // A fault that no chunk shows on the CPU stays as the kernel reported it.
        let flagged = GpuError::from_flag(crate::error::flag::ZERO_GAP);
        let GpuError::Format(e) = locate_device_fault(std::slice::from_ref(&t), flagged) else { panic!() };
        assert_eq!((e.code(), e.chunk()), (ErrorCode::PositionsNotIncreasing, None));
    }
}
