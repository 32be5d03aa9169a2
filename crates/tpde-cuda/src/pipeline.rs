//! The loading pipeline: zstd decoding on the CPU in parallel (rayon) into a
//! ring of page-locked staging slots, async uploads on one stream per slot,
//! and batched kernels on the same stream, so decoding of batch k+1 overlaps
//! the upload and kernels of batch k. No pageable copy is on the hot path.

use std::cell::RefCell;
use std::sync::Arc;

use cudarc::driver::{result as cu, CudaEvent, CudaSlice, CudaStream, PinnedHostSlice};
use rayon::prelude::*;

use crate::error::{GpuError, Result};
use crate::gpu::{Batch, DevRange, Gpu, Stage};
use crate::kernels::ChunkDesc;
use crate::spec::{ChunkKind, ChunkSpec, WordWidth};

/// How a stream's stored bytes are coded (`spec/FORMAT.md`, "Stream record").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Codec {
    /// Stored as is.
    Stored,
    /// One zstd frame, no trailing bytes.
    Zstd,
}

/// One stored stream of a chunk, borrowed from the delta's bytes.
#[derive(Clone, Copy, Debug)]
pub struct StreamRef<'a> {
    /// Codec of the stored bytes.
    pub codec: Codec,
    /// The stored bytes.
    pub bytes: &'a [u8],
    /// Length after decoding.
    pub decoded_len: usize,
}

/// One chunk: its description and its stored streams in format order.
#[derive(Clone, Debug)]
pub struct ChunkRef<'a> {
    /// The chunk's description.
    pub spec: ChunkSpec,
    /// Position streams, then value streams.
    pub streams: Vec<StreamRef<'a>>,
}

impl ChunkRef<'_> {
    /// Checks the streams against the description.
    pub fn validate(&self) -> Result<()> {
        self.spec.validate()?;
        let lens = self.spec.stream_lens();
        if lens.len() != self.streams.len()
            || lens
                .iter()
                .zip(&self.streams)
                .any(|(l, s)| *l != s.decoded_len)
        {
            return Err(GpuError::corrupt(
                "chunk streams do not match its description",
            ));
        }
        Ok(())
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
    /// Its chunks, in order.
    pub chunks: Vec<ChunkRef<'a>>,
}

impl TensorRef<'_> {
    /// Bytes of the target tensor.
    #[must_use]
    pub fn bytes(&self) -> usize {
        usize::try_from(self.words).unwrap_or(usize::MAX) * self.width.bytes()
    }

    /// Checks that the chunks tile the tensor.
    pub fn validate(&self) -> Result<()> {
        let mut words = 0u64;
        for (i, c) in self.chunks.iter().enumerate() {
            c.validate()?;
            if c.spec.width != self.width {
                return Err(GpuError::corrupt(format!(
                    "{}: chunk {i} has another width",
                    self.name
                )));
            }
            let last = i + 1 == self.chunks.len();
            if (!last && c.spec.words != self.chunk_words) || c.spec.words > self.chunk_words {
                return Err(GpuError::corrupt(format!(
                    "{}: chunk {i} has a wrong size",
                    self.name
                )));
            }
            words += u64::from(c.spec.words);
        }
        if words != self.words {
            return Err(GpuError::corrupt(format!(
                "{}: chunks do not cover the tensor",
                self.name
            )));
        }
        Ok(())
    }

    fn needs_base_words(&self) -> bool {
        self.chunks
            .iter()
            .any(|c| !matches!(c.spec.kind, ChunkKind::Dense | ChunkKind::Raw))
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
}

impl Default for LoaderConfig {
    fn default() -> Self {
        Self {
            slots: 4,
            slot_bytes: 32 << 20,
            max_chunks: 4096,
        }
    }
}

struct Slot {
    host: PinnedHostSlice<u8>,
    dev: CudaSlice<u8>,
    sums: CudaSlice<u64>,
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
}

impl std::fmt::Debug for Loader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Loader")
            .field("gpu", &self.gpu.name())
            .field("cfg", &self.cfg)
            .finish()
    }
}

/// A chunk to rebuild and where: `base` and `out` are its words in device memory.
struct Job<'c, 'a> {
    chunk: &'c ChunkRef<'a>,
    base: DevRange,
    out: DevRange,
}

const fn align(x: usize, a: usize) -> usize {
    x.div_ceil(a) * a
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
        let mut slots = Vec::with_capacity(cfg.slots);
        for _ in 0..cfg.slots {
            // SAFETY: the memory is uninitialized bytes; every byte is written
            // (decoded or copied) before it is uploaded, and `u8` has no
            // invalid bit patterns.
            let host = unsafe { ctx.alloc_pinned_with_flags::<u8>(cfg.slot_bytes, 0) }?;
            let stream = gpu.new_stream()?;
            let dev = gpu.alloc_zeros::<u8>(cfg.slot_bytes)?;
            let sums = gpu.alloc_zeros::<u64>(max_tiles)?;
            let uploaded = ctx.new_event(None)?;
            let done = ctx.new_event(None)?;
            slots.push(Slot {
                host,
                dev,
                sums,
                stream,
                uploaded,
                done,
                in_use: false,
            });
        }
        let flag = gpu.alloc_zeros::<u32>(1)?;
        // SAFETY: only ever read after a device-to-host copy fills it.
        let flag_host = unsafe { ctx.alloc_pinned_with_flags::<u32>(1, 0) }?;
        let start = ctx.new_event(None)?;
        Ok(Self {
            gpu,
            cfg,
            slots,
            next: 0,
            flag,
            flag_host,
            start,
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

    /// API (a): rebuilds every tensor of `delta` against device-resident base
    /// tensors (one per delta tensor, in order) into new device buffers.
    pub fn load(
        &mut self,
        delta: &[TensorRef<'_>],
        base: &[&CudaSlice<u8>],
    ) -> Result<Vec<CudaSlice<u8>>> {
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
        for ((t, b), o) in delta.iter().zip(base).zip(&outs) {
            let main = self.gpu.stream().clone();
            let b = DevRange::all(*b, &main)?;
            let o = DevRange::of(o, &main, 0, t.bytes())?;
            self.plan_tensor(t, b, o, &mut jobs)?;
        }
        self.run(&jobs, Stage::Apply)?;
        Ok(outs)
    }

    /// API (a), in place: `bufs` hold the base tensors (each exactly the
    /// target's size) and are overwritten with the target.
    pub fn apply_in_place(
        &mut self,
        delta: &[TensorRef<'_>],
        bufs: &mut [CudaSlice<u8>],
    ) -> Result<()> {
        if bufs.len() != delta.len() {
            return Err(GpuError::invalid("one buffer per delta tensor"));
        }
        let mut jobs = Vec::new();
        let main = self.gpu.stream().clone();
        for (t, b) in delta.iter().zip(bufs.iter()) {
            t.validate()?;
            if b.num_bytes() != t.bytes() {
                return Err(GpuError::invalid(format!(
                    "{}: in-place buffer size differs from the target's",
                    t.name
                )));
            }
            let r = DevRange::all(b, &main)?;
            self.plan_chunks(t, r, r, &mut jobs)?;
        }
        self.run(&jobs, Stage::Apply)
    }

    /// API (a) with a host-resident base: uploads each base tensor through the
    /// pinned ring, then rebuilds in place.
    pub fn load_host_base(
        &mut self,
        delta: &[TensorRef<'_>],
        base: &[&[u8]],
    ) -> Result<Vec<CudaSlice<u8>>> {
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
    pub fn materialize_into(
        &mut self,
        t: &TensorRef<'_>,
        base: &CudaSlice<u8>,
        out: &mut CudaSlice<u8>,
    ) -> Result<()> {
        t.validate()?;
        if out.num_bytes() < t.bytes() {
            return Err(GpuError::invalid(format!(
                "{}: output buffer too small",
                t.name
            )));
        }
        let main = self.gpu.stream().clone();
        let b = DevRange::all(base, &main)?;
        let o = DevRange::of(out, &main, 0, t.bytes())?;
        let mut jobs = Vec::new();
        self.plan_tensor(t, b, o, &mut jobs)?;
        self.run(&jobs, Stage::Apply)
    }

    /// API (b), in place: `buf` holds the base and is overwritten with the target.
    pub fn materialize_in_place(
        &mut self,
        t: &TensorRef<'_>,
        buf: &mut CudaSlice<u8>,
    ) -> Result<()> {
        self.apply_in_place(std::slice::from_ref(t), std::slice::from_mut(buf))
    }

    /// Absolute positions of a sparse chunk, rebuilt on the GPU (prefix sum of
    /// the gaps, or ranks of the bitmap), copied back.
    pub fn positions(&mut self, chunk: &ChunkRef<'_>) -> Result<Vec<u32>> {
        chunk.validate()?;
        let m = chunk.spec.changed as usize;
        let out = self.gpu.alloc_zeros::<u32>(m.max(1))?;
        let r = DevRange::of(&out, self.gpu.stream(), 0, m * 4)?;
        self.run(
            &[Job {
                chunk,
                base: r,
                out: r,
            }],
            Stage::Positions,
        )?;
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
        for c in &t.chunks {
            let n = c.spec.words as usize * w;
            if c.spec.kind != ChunkKind::Unchanged {
                jobs.push(Job {
                    chunk: c,
                    base: base.sub(off, n)?,
                    out: out.sub(off, n)?,
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

    /// Runs jobs: batches them into slots, decodes, uploads, launches; then
    /// waits and checks the device error flag.
    fn run(&mut self, jobs: &[Job<'_, '_>], stage: Stage) -> Result<()> {
        let main = self.gpu.stream().clone();
        let flag = DevRange::all(&self.flag, &main)?;
        // SAFETY: the flag buffer is live and 4 bytes long.
        unsafe { cu::memset_d8_async(flag.ptr(), 0, 4, main.cu_stream()) }?;
        self.start.record(&main)?;
        for s in &self.slots {
            s.stream.wait(&self.start)?;
        }
        let max_tiles = self.slots[0].sums.len();
        let mut i = 0;
        while i < jobs.len() {
            let width = jobs[i].chunk.spec.width;
            let mut end = i;
            let mut bytes = 0usize;
            let mut tiles = 0usize;
            while end < jobs.len()
                && jobs[end].chunk.spec.width == width
                && end - i < self.cfg.max_chunks
            {
                let spec = &jobs[end].chunk.spec;
                let need = align(spec.position_bytes(), 16) + align(spec.value_bytes(), 16);
                let table = align((end - i + 1) * ChunkDesc::BYTES, 64);
                let t = Batch::tiles_of(spec) as usize;
                if table + bytes + need > self.cfg.slot_bytes || tiles + t > max_tiles {
                    if end == i {
                        return Err(GpuError::invalid(format!(
                            "a chunk needs {need} staging bytes; raise LoaderConfig::slot_bytes"
                        )));
                    }
                    break;
                }
                bytes += need;
                tiles += t;
                end += 1;
            }
            self.flush(&jobs[i..end], width, stage)?;
            i = end;
        }
        self.finish()
    }

    /// Decodes one batch into a slot, uploads it and launches its kernels.
    fn flush(&mut self, jobs: &[Job<'_, '_>], width: WordWidth, stage: Stage) -> Result<()> {
        let slot = self.take_slot()?;
        let table_len = align(jobs.len() * ChunkDesc::BYTES, 64);
        let chunks: Vec<&ChunkRef<'_>> = jobs.iter().map(|j| j.chunk).collect();
        let (ranges, used) = decode_into(&chunks, &mut self.slots[slot].host, table_len)?;
        let s = &mut self.slots[slot];
        let dev = DevRange::all(&s.dev, &s.stream)?;
        let mut batch = Batch::new(width);
        for (j, (po, vo)) in jobs.iter().zip(ranges) {
            let spec = &j.chunk.spec;
            let (p, v) = (
                dev.sub(po, spec.position_bytes())?,
                dev.sub(vo, spec.value_bytes())?,
            );
            match stage {
                Stage::Apply => batch.push(spec, p, v, j.base, j.out)?,
                Stage::Positions => batch.push_positions(spec, p, j.out)?,
            }
        }
        batch.write_table(&mut s.host.as_mut_slice()?[..batch.table_bytes()]);
        // SAFETY: `used` bytes fit the device slot (same size as the host
        // slot); the page-locked host bytes stay untouched until `uploaded`
        // completes (take_slot waits for it before reuse).
        unsafe {
            cu::memcpy_htod_async(dev.ptr(), host_prefix(&s.host, used)?, s.stream.cu_stream())
        }?;
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        let sums = DevRange::all(&s.sums, &s.stream)?;
        let flag = DevRange::all(&self.flag, &s.stream)?;
        self.gpu.launch(
            &s.stream,
            &batch,
            stage,
            dev.sub(0, batch.table_bytes())?,
            sums,
            flag,
        )
    }

    /// Decodes every stream of `delta` once into one device buffer, so that
    /// later applies launch kernels only (weights sync of many fine-tunes of
    /// one base, or repeated just-in-time materialization).
    pub fn stage_on_device(&mut self, delta: &[TensorRef<'_>]) -> Result<DeviceDelta> {
        let mut tensors = Vec::with_capacity(delta.len());
        let mut total = 0usize;
        let mut order: Vec<&ChunkRef<'_>> = Vec::new();
        for t in delta {
            t.validate()?;
            let mut chunks = Vec::new();
            let mut word = 0u64;
            for c in &t.chunks {
                let need = align(c.spec.position_bytes(), 16) + align(c.spec.value_bytes(), 16);
                if c.spec.kind != ChunkKind::Unchanged {
                    chunks.push(StagedChunk {
                        spec: c.spec,
                        offset: total,
                        word,
                    });
                    order.push(c);
                    total += need;
                }
                word += u64::from(c.spec.words);
            }
            tensors.push(StagedTensor {
                name: t.name.clone(),
                width: t.width,
                words: t.words,
                needs_base: t.needs_base_words(),
                chunks,
            });
        }
        // SAFETY: every byte of a stream range is written by the uploads below
        // before any kernel reads it; padding bytes are never read.
        let data = unsafe { self.gpu.stream().alloc::<u8>(total.max(1)) }?;
        self.gpu.stream().synchronize()?;
        let mut i = 0;
        let mut dev_off = 0usize;
        while i < order.len() {
            let mut end = i;
            let mut bytes = 0;
            while end < order.len() {
                let need = align(order[end].spec.position_bytes(), 16)
                    + align(order[end].spec.value_bytes(), 16);
                if bytes + need > self.cfg.slot_bytes {
                    break;
                }
                bytes += need;
                end += 1;
            }
            if end == i {
                return Err(GpuError::invalid(
                    "a chunk does not fit a staging slot; raise LoaderConfig::slot_bytes",
                ));
            }
            let slot = self.take_slot()?;
            let (_, used) = decode_into(&order[i..end], &mut self.slots[slot].host, 0)?;
            let s = &mut self.slots[slot];
            let d = DevRange::of(&data, &s.stream, dev_off, used)?;
            // SAFETY: `d` is inside `data`; the host bytes stay untouched
            // until `uploaded` completes.
            unsafe {
                cu::memcpy_htod_async(d.ptr(), host_prefix(&s.host, used)?, s.stream.cu_stream())
            }?;
            s.uploaded.record(&s.stream)?;
            s.in_use = true;
            dev_off += used;
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
    pub fn apply_staged_in_place(
        &mut self,
        delta: &DeviceDelta,
        bufs: &mut [CudaSlice<u8>],
    ) -> Result<()> {
        if bufs.len() != delta.tensors.len() {
            return Err(GpuError::invalid("one buffer per delta tensor"));
        }
        let main = self.gpu.stream().clone();
        let outs = bufs
            .iter()
            .zip(&delta.tensors)
            .map(|(b, t)| {
                if b.num_bytes() != t.bytes() {
                    return Err(GpuError::invalid(format!(
                        "{}: in-place buffer size differs",
                        t.name
                    )));
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
            return Err(GpuError::invalid(
                "one base and one output per delta tensor",
            ));
        }
        let main = self.gpu.stream().clone();
        let mut bases = Vec::new();
        let mut os = Vec::new();
        for ((t, b), o) in delta.tensors.iter().zip(base).zip(outs.iter()) {
            let tb = t.bytes();
            if o.num_bytes() < tb {
                return Err(GpuError::invalid(format!(
                    "{}: output buffer too small",
                    t.name
                )));
            }
            let b = DevRange::all(*b, &main)?;
            let o = DevRange::of(o, &main, 0, tb)?;
            let in_place = self.prepare_out(b, o, tb, t.width, t.needs_base)?;
            bases.push(if in_place { o } else { b });
            os.push(o);
        }
        self.run_staged(delta, &bases, &os)
    }

    fn run_staged(
        &mut self,
        delta: &DeviceDelta,
        bases: &[DevRange],
        outs: &[DevRange],
    ) -> Result<()> {
        let main = self.gpu.stream().clone();
        let flag = DevRange::all(&self.flag, &main)?;
        // SAFETY: the flag buffer is live and 4 bytes long.
        unsafe { cu::memset_d8_async(flag.ptr(), 0, 4, main.cu_stream()) }?;
        self.start.record(&main)?;
        for s in &self.slots {
            s.stream.wait(&self.start)?;
        }
        let data = DevRange::all(&delta.data, &main)?;
        let max_tiles = self.slots[0].sums.len();
        let table_cap = self.cfg.slot_bytes / ChunkDesc::BYTES;
        for ((t, b), o) in delta.tensors.iter().zip(bases).zip(outs) {
            let w = t.width.bytes() as u64;
            let mut batch = Batch::new(t.width);
            let mut count = 0;
            for c in &t.chunks {
                let nb = c.spec.words as usize * t.width.bytes();
                let off = usize::try_from(c.word * w)
                    .map_err(|_| GpuError::invalid("tensor too large"))?;
                if count == self.cfg.max_chunks.min(table_cap)
                    || batch.tiles() as usize + Batch::tiles_of(&c.spec) as usize > max_tiles
                {
                    self.launch_table(&batch)?;
                    batch = Batch::new(t.width);
                    count = 0;
                }
                let p = data.sub(c.offset, c.spec.position_bytes())?;
                let v = data.sub(
                    c.offset + align(c.spec.position_bytes(), 16),
                    c.spec.value_bytes(),
                )?;
                batch.push(&c.spec, p, v, b.sub(off, nb)?, o.sub(off, nb)?)?;
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
        unsafe {
            cu::memcpy_htod_async(dev.ptr(), host_prefix(&s.host, n)?, s.stream.cu_stream())
        }?;
        s.uploaded.record(&s.stream)?;
        s.in_use = true;
        let sums = DevRange::all(&s.sums, &s.stream)?;
        let flag = DevRange::all(&self.flag, &s.stream)?;
        self.gpu
            .launch(&s.stream, batch, Stage::Apply, dev.sub(0, n)?, sums, flag)
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
            return Err(GpuError::DeviceFlag(bits));
        }
        Ok(())
    }
}

/// A chunk of a [`DeviceDelta`]: its streams start at `offset` of the data.
#[derive(Clone, Copy, Debug)]
struct StagedChunk {
    spec: ChunkSpec,
    offset: usize,
    word: u64,
}

#[derive(Clone, Debug)]
struct StagedTensor {
    name: String,
    width: WordWidth,
    words: u64,
    needs_base: bool,
    chunks: Vec<StagedChunk>,
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

/// Decodes every stream of `chunks` into `host` from `start` on: each
/// chunk's position streams back to back, padded to 16 bytes, then its value
/// streams likewise. Returns each chunk's (positions, values) offsets and
/// the end.
fn decode_into(
    chunks: &[&ChunkRef<'_>],
    host: &mut PinnedHostSlice<u8>,
    start: usize,
) -> Result<(Vec<(usize, usize)>, usize)> {
    for c in chunks {
        c.validate()?;
    }
    let host = host.as_mut_slice()?;
    let mut rest = &mut host[start..];
    let mut tasks: Vec<(&mut [u8], &StreamRef<'_>)> = Vec::new();
    let mut ranges = Vec::with_capacity(chunks.len());
    let mut cursor = start;
    for c in chunks {
        let np = c.spec.position_stream_count();
        let mut at = [0usize; 2];
        for (part, streams) in [&c.streams[..np], &c.streams[np..]].into_iter().enumerate() {
            at[part] = cursor;
            let mut used = 0;
            for st in streams {
                if st.decoded_len > rest.len() {
                    return Err(GpuError::invalid("streams exceed the staging slot"));
                }
                let (d, r) = std::mem::take(&mut rest).split_at_mut(st.decoded_len);
                rest = r;
                tasks.push((d, st));
                used += st.decoded_len;
            }
            let pad = (align(used, 16) - used).min(rest.len());
            rest = &mut std::mem::take(&mut rest)[pad..];
            cursor += used + pad;
        }
        ranges.push((at[0], at[1]));
    }
    tasks
        .into_par_iter()
        .try_for_each(|(d, st)| decode_stream(st, d))?;
    Ok((ranges, cursor))
}

fn host_prefix(host: &PinnedHostSlice<u8>, n: usize) -> Result<&[u8]> {
    Ok(&host.as_slice()?[..n])
}

thread_local! {
    static DCTX: RefCell<Option<zstd::zstd_safe::DCtx<'static>>> = const { RefCell::new(None) };
}

/// Decodes one stream into `dst` (exactly its decoded length). A zstd stream
/// must be one frame with no trailing bytes (`spec/FORMAT.md`, "Stream record").
pub fn decode_stream(st: &StreamRef<'_>, dst: &mut [u8]) -> Result<()> {
    if dst.len() != st.decoded_len {
        return Err(GpuError::invalid(
            "destination length differs from the decoded length",
        ));
    }
    match st.codec {
        Codec::Stored => {
            if st.bytes.len() != st.decoded_len {
                return Err(GpuError::corrupt(
                    "stored stream length differs from its decoded length",
                ));
            }
            dst.copy_from_slice(st.bytes);
            Ok(())
        }
        Codec::Zstd => {
            match zstd::zstd_safe::find_frame_compressed_size(st.bytes) {
                Ok(n) if n == st.bytes.len() => {}
                Ok(_) => return Err(GpuError::corrupt("zstd stream has trailing bytes")),
                Err(_) => return Err(GpuError::corrupt("zstd stream is not one frame")),
            }
            DCTX.with(|c| {
                let mut c = c.borrow_mut();
                let dctx = c.get_or_insert_with(zstd::zstd_safe::DCtx::create);
                match dctx.decompress(dst, st.bytes) {
                    Ok(n) if n == st.decoded_len => Ok(()),
                    Ok(_) => Err(GpuError::corrupt("zstd stream decodes to the wrong length")),
                    Err(_) => Err(GpuError::corrupt("zstd stream does not decode")),
                }
            })
        }
    }
}
