//! The CUDA context, its kernels and the safe launch wrappers.
//!
//! Every kernel launch goes through a wrapper that validates, on the CPU,
//! that each descriptor's addresses lie inside live device buffers and that
//! its sizes match its chunk. The kernels then bounds-check positions, which
//! come from the (untrusted) delta, and raise the device error flag instead of
//! writing out of range.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use cudarc::driver::{
    result as cu, sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};

use tpde::{
    format::{rans::TableForm, ChunkRecord, ValueLayout},
    WordWidth,
};

use crate::error::flag;
use crate::error::{GpuError, Result};
use crate::kernels::{
    ChunkDesc, CopyRanges, FillDesc, KernelId, Kernels, RansDesc, KEYS, LEAF_DESC_BYTES, LEAF_FOLD_THREADS,
    LEAF_TERMS_GIVEN, LEAF_TERM_BYTES_PER_BLOCK, LEAF_TERM_THREADS, MAX_POSITION_STREAMS, MAX_VALUE_STREAMS,
    RANS_FORM_BYTES, RANS_FORM_PACKED, RANS_MAX_TABLE_BYTES, RANS_THREADS, THREADS,
};
use crate::pipeline::ChunkRef;
use crate::rans::{context, tiles_per_warp, Header};

/// Whether the CUDA driver library can be loaded on this machine. Checked
/// before the first CUDA call, because cudarc panics when it is missing.
#[must_use]
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the shared library by its candidate names.
    unsafe { sys::is_culib_present() }
}

/// The memory pool of the tensors this crate hands out. Unlike the device's
/// default pool, which returns freed memory to the driver at every
/// synchronization, it keeps what is freed for the next load, as torch's
/// caching allocator does: rebuilding 2 GiB into memory that the driver maps
/// afresh cost about 7 ms more on an H200 (`load_bench`). Other users of the
/// device cannot use that memory until [`Gpu::release_cached_memory`].
#[derive(Debug)]
struct OutputPool(sys::CUmemoryPool);

// SAFETY: a pool handle is an opaque driver object; the driver API may use
// it from any thread.
unsafe impl Send for OutputPool {}
// SAFETY: as above; this crate only passes the handle to the driver.
unsafe impl Sync for OutputPool {}

impl OutputPool {
    fn new(ctx: &Arc<CudaContext>) -> Result<Self> {
        ctx.bind_to_thread()?;
        // SAFETY: a plain C struct of integers and a null pointer, for which
        // all-zero bytes are valid.
        let mut props: sys::CUmemPoolProps = unsafe { std::mem::zeroed() };
        props.allocType = sys::CUmemAllocationType::CU_MEM_ALLOCATION_TYPE_PINNED;
        props.handleTypes = sys::CUmemAllocationHandleType::CU_MEM_HANDLE_TYPE_NONE;
        props.location.type_ = sys::CUmemLocationType::CU_MEM_LOCATION_TYPE_DEVICE;
        props.location.id = i32::try_from(ctx.ordinal()).map_err(|_| GpuError::invalid("device ordinal"))?;
        // SAFETY: `props` is a valid description of device memory.
        let pool = Self(unsafe { cu::mem_pool::create(&props) }?);
        let mut keep = u64::MAX;
        // SAFETY: the release threshold attribute is a `u64`.
        unsafe {
            cu::mem_pool::set_attribute(
                pool.0,
                sys::CUmemPool_attribute::CU_MEMPOOL_ATTR_RELEASE_THRESHOLD,
                std::ptr::from_mut(&mut keep).cast(),
            )
        }?;
        Ok(pool)
    }
}

impl Drop for OutputPool {
    fn drop(&mut self) {
        // SAFETY: created once by `new`, destroyed once here. Slices still
        // allocated from it stay valid: the driver frees the pool after them.
        let _ = unsafe { cu::mem_pool::destroy(self.0) };
    }
}

/// A CUDA device with the tpde kernels loaded.
///
/// Its context has cudarc's per-buffer event tracking off: this crate orders
/// its streams itself with events, and every public operation synchronizes
/// before it returns.
#[derive(Debug)]
pub struct Gpu {
    /// Declared first: destroyed while the context is still held.
    outputs: OutputPool,
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    name: String,
    decoder_warps: u64,
}

impl Gpu {
    /// Opens device `ordinal` and compiles the kernels (once per process).
    ///
    /// Returns [`GpuError::NoDriver`] when no CUDA driver is installed,
    /// [`GpuError::NoDevice`] when the ordinal does not exist and
    /// [`GpuError::NoNvrtc`] when the kernels cannot be compiled; it never
    /// panics.
    pub fn new(ordinal: usize) -> Result<Self> {
        if !driver_present() {
            return Err(GpuError::NoDriver);
        }
        let ctx = std::panic::catch_unwind(|| -> Result<Arc<CudaContext>> {
            cu::init()?;
            let count = CudaContext::device_count()?;
            if i32::try_from(ordinal).map_or(true, |o| o >= count) {
                return Err(GpuError::NoDevice { ordinal });
            }
            Ok(CudaContext::new(ordinal)?)
        })
        .map_err(|p| GpuError::DriverLoad(panic_message(&p)))??;
        // SAFETY: no buffer of this context exists yet; from here on this crate
        // orders every use of its buffers across streams with explicit events
        // and synchronizes before returning from public operations.
        unsafe { ctx.disable_event_tracking() };
        let stream = ctx.new_stream()?;
        let kernels = Kernels::load(&ctx)?;
        let name = ctx.name()?;
        let outputs = OutputPool::new(&ctx)?;
        let sms = ctx.attribute(sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)?;
        let blocks =
            kernels.get(KernelId::RansDecode).occupancy_max_active_blocks_per_multiprocessor(RANS_THREADS, 0, None)?;
        let decoder_warps = u64::try_from(sms).unwrap_or(0) * u64::from(blocks) * u64::from(RANS_THREADS / 32);
        Ok(Self { outputs, ctx, stream, kernels, name, decoder_warps })
    }

    /// Decoder warps the device holds at once (blocks of `RANS_THREADS`
    /// without tables, on every SM): what one wave of `rans_decode` takes.
    pub(crate) fn resident_decoder_warps(&self) -> u64 {
        self.decoder_warps
    }

    /// Allocates `len` bytes (at least one) on `stream` from the pool that
    /// holds the tensors this crate hands out ([`OutputPool`]). Freeing the
    /// slice returns them to that pool.
    ///
    /// # Safety
    /// The memory is uninitialized: it must be written before it is read.
    pub(crate) unsafe fn alloc_output(&self, stream: &Arc<CudaStream>, len: usize) -> Result<CudaSlice<u8>> {
        self.ctx.bind_to_thread()?;
        let len = len.max(1);
        // SAFETY: the pool and the stream belong to this live context.
        let ptr = unsafe { cu::mem_pool::alloc_async(self.outputs.0, len, stream.cu_stream()) }?;
        // SAFETY: `ptr` is a fresh allocation of `len` bytes in this context;
        // the slice's drop frees it with `cuMemFreeAsync`, which gives it back
        // to the pool it came from.
        Ok(unsafe { stream.upgrade_device_ptr(ptr, len) })
    }

    /// Gives the device memory that the tensors of earlier loads held, and that
    /// is now free, back to the driver (see `OutputPool`).
    pub fn release_cached_memory(&self) -> Result<()> {
        self.ctx.bind_to_thread()?;
        self.stream.synchronize()?;
        // SAFETY: the pool is live; trimming frees only unused memory.
        unsafe { cu::mem_pool::trim_to(self.outputs.0, 0) }?;
        Ok(())
    }

    /// The device's name, e.g. "NVIDIA H100 80GB HBM3".
    #[must_use]
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The cudarc context.
    #[must_use]
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// The main stream of this device handle.
    #[must_use]
    pub fn stream(&self) -> &Arc<CudaStream> {
        &self.stream
    }

    /// A new non-blocking stream.
    pub fn new_stream(&self) -> Result<Arc<CudaStream>> {
        Ok(self.ctx.new_stream()?)
    }

    /// Allocates `len` zeroed elements on the main stream and waits for it.
    pub fn alloc_zeros<T: DeviceRepr + ValidAsZeroBits>(&self, len: usize) -> Result<CudaSlice<T>> {
        let s = self.stream.alloc_zeros(len.max(1))?;
        self.stream.synchronize()?;
        Ok(s)
    }

    /// Copies host bytes into a new device buffer (setup path; pageable copy).
    pub fn upload(&self, bytes: &[u8]) -> Result<CudaSlice<u8>> {
        let s = self.stream.clone_htod(bytes)?;
        self.stream.synchronize()?;
        Ok(s)
    }

    /// Copies a device buffer back to the host.
    pub fn download<T: DeviceRepr + Default + Clone>(&self, buf: &CudaSlice<T>) -> Result<Vec<T>> {
        Ok(self.stream.clone_dtoh(buf)?)
    }

    /// Registers per thread and resident blocks per SM of every kernel, for
    /// reports: `(symbol, registers, blocks per SM)`.
    pub fn kernel_occupancy(&self) -> Result<Vec<(&'static str, i32, u32)>> {
        KernelId::ALL
            .iter()
            .map(|&id| {
                let f = self.kernels.get(id);
                Ok((
                    id.symbol(),
                    f.num_regs()?,
                    f.occupancy_max_active_blocks_per_multiprocessor(id.threads(), 0, None)?,
                ))
            })
            .collect()
    }

    /// Waits for all work of this context.
    pub fn synchronize(&self) -> Result<()> {
        Ok(self.ctx.synchronize()?)
    }
}

fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<String>()
        .cloned()
        .or_else(|| p.downcast_ref::<&str>().map(|s| (*s).to_string()))
        .unwrap_or_else(|| "panic".to_string())
}

/// A byte range of a live device buffer: the only way to hand an address to
/// a kernel. Made by [`DevRange::of`], which checks the bounds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DevRange {
    ptr: u64,
    len: usize,
}

impl DevRange {
    /// A range that no buffer backs, for tests of the host's side.
    #[cfg(test)]
    pub(crate) const fn detached(ptr: u64, len: usize) -> Self {
        Self { ptr, len }
    }

    /// Bytes `offset..offset + len` of `buf`, checked against its length.
    pub fn of<T>(buf: &CudaSlice<T>, stream: &CudaStream, offset: usize, len: usize) -> Result<Self> {
        let end = offset.checked_add(len).ok_or_else(|| GpuError::invalid("device range overflows"))?;
        if end > buf.num_bytes() {
            return Err(GpuError::invalid(format!(
                "device range {offset}..{end} exceeds buffer of {} bytes",
                buf.num_bytes()
            )));
        }
        let (ptr, _sync) = buf.device_ptr(stream);
        Ok(Self { ptr: ptr + offset as u64, len })
    }

    /// A range at any address, for tests of the host-side checks only
    /// (nothing is launched with it).
    #[cfg(test)]
    pub(crate) const fn unchecked(ptr: u64, len: usize) -> Self {
        Self { ptr, len }
    }

    /// The whole buffer.
    pub fn all<T>(buf: &CudaSlice<T>, stream: &CudaStream) -> Result<Self> {
        Self::of(buf, stream, 0, buf.num_bytes())
    }

    /// A sub-range, checked.
    pub fn sub(&self, offset: usize, len: usize) -> Result<Self> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(Self { ptr: self.ptr + offset as u64, len }),
            _ => Err(GpuError::invalid("device sub-range out of bounds")),
        }
    }

    /// Device address.
    #[must_use]
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Length in bytes.
    #[must_use]
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the range is empty.
    #[must_use]
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn end(&self) -> u64 {
        self.ptr + self.len as u64
    }

    fn overlaps(&self, o: &Self) -> bool {
        self.ptr < o.end() && o.ptr < self.end()
    }

    /// Sets every byte of the range to `byte`, asynchronously on `stream`
    /// (ordered with the kernels launched there).
    pub(crate) fn fill_async(&self, stream: &CudaStream, byte: u8) -> Result<()> {
        // SAFETY: the range lies inside a live device buffer (`DevRange::of`
        // checked it), the same contract the kernel launches rely on.
        unsafe { cu::memset_d8_async(self.ptr, byte, self.len, stream.cu_stream()) }?;
        Ok(())
    }

    /// Copies host bytes into the start of the range, asynchronously on
    /// `stream`. `src` should be page-locked, or the driver copies it
    /// through a staging buffer first.
    ///
    /// # Safety
    ///
    /// The copy reads `src` after this returns: the caller keeps `src` alive
    /// and does not write it until `stream` has passed the copy (it
    /// synchronizes, or waits for an event recorded after the copy).
    pub(crate) unsafe fn copy_from_host_async(&self, stream: &CudaStream, src: &[u8]) -> Result<()> {
        if src.len() > self.len {
            return Err(GpuError::invalid("host copy larger than its device range"));
        }
        // SAFETY: the bytes written lie inside the range (checked above),
        // which lies inside a live device buffer; the caller keeps `src`
        // alive and unwritten until the copy completes.
        unsafe { cu::memcpy_htod_async(self.ptr, src, stream.cu_stream()) }?;
        Ok(())
    }

    /// Copies the start of the range into `dst`, asynchronously on `stream`.
    ///
    /// # Safety
    ///
    /// The copy writes `dst` after this returns: the caller keeps `dst`
    /// alive and neither reads nor writes it until `stream` has passed the
    /// copy (it synchronizes). `dst` should be page-locked for the copy to
    /// be asynchronous.
    pub(crate) unsafe fn copy_to_host_async<T: DeviceRepr>(&self, stream: &CudaStream, dst: &mut [T]) -> Result<()> {
        if std::mem::size_of_val(dst) > self.len {
            return Err(GpuError::invalid("device copy larger than its device range"));
        }
        // SAFETY: the bytes read lie inside the range (checked above), which
        // lies inside a live device buffer; `T` is plain data (`DeviceRepr`);
        // the caller leaves `dst` alone until the copy completes.
        unsafe { cu::memcpy_dtoh_async(dst, self.ptr, stream.cu_stream()) }?;
        Ok(())
    }
}

/// A device-to-device copy, made with others in one launch
/// ([`Gpu::launch_copies`]).
#[derive(Clone, Copy, Debug)]
pub(crate) struct DeviceCopy {
    dst: DevRange,
    src: DevRange,
}

impl DeviceCopy {
    /// Two ranges of the same length that do not overlap.
    pub(crate) fn new(dst: DevRange, src: DevRange) -> Result<Self> {
        if src.len != dst.len || dst.overlaps(&src) {
            return Err(GpuError::invalid("device copy between ranges of different lengths or overlapping"));
        }
        Ok(Self { dst, src })
    }
}

/// Chunks of one word width with validated device addresses, ready to launch.
#[derive(Clone, Debug)]
pub(crate) struct Batch {
    width: WordWidth,
    descs: Vec<ChunkDesc>,
    tiles: u32,
    sparse: bool,
    /// Rows of the group table taken by grouped chunks.
    group_rows: u32,
    /// Whether some chunk goes to `apply_wN` (positional values or raw).
    positional: bool,
}

/// Most tiles of one launch (grid.x is limited to 2^31 - 1).
const MAX_TILES: u64 = 1 << 30;

impl Batch {
    pub fn new(width: WordWidth) -> Self {
        Self { width, descs: Vec::new(), tiles: 0, sparse: false, group_rows: 0, positional: false }
    }

    /// Tiles a chunk adds to a batch.
    pub fn tiles_of(record: &ChunkRecord, words: u32) -> u32 {
        ChunkDesc::from_record(record, words).map_or(0, |d| d.tile_count)
    }

    /// Rows of the group table a chunk adds to a batch (values grouped by
    /// base key only).
    pub fn group_rows_of(record: &ChunkRecord, words: u32) -> u32 {
        ChunkDesc::from_record(record, words).map_or(0, |d| d.group_rows())
    }

    /// The descriptor of a chunk with its streams' device ranges, checked:
    /// one range per stream, each at least the stream's decoded length, not
    /// overlapping `out`; word values aligned to the word.
    fn describe(&self, c: &ChunkRef<'_>, streams: &[DevRange], out: DevRange) -> Result<Option<ChunkDesc>> {
        c.check_shape(self.width)?;
        let Some(mut d) = ChunkDesc::from_record(&c.record, c.words) else {
            return Ok(None); // unchanged: nothing to launch
        };
        if streams.len() != c.streams.len() || streams.iter().enumerate().any(|(q, r)| r.len() < c.device_stream_len(q))
        {
            return Err(GpuError::invalid("device stream ranges do not match the chunk's streams"));
        }
        if streams.iter().any(|r| out.overlaps(r)) {
            return Err(GpuError::invalid("out overlaps the chunk's streams"));
        }
        let np = c.position_stream_count();
        let (pos, val) = streams.split_at(np);
        if pos.len() > MAX_POSITION_STREAMS || val.len() > MAX_VALUE_STREAMS {
            return Err(GpuError::invalid("too many streams for a chunk"));
        }
        let w = self.width.bytes() as u64;
        if c.record.value_layout == ValueLayout::Words && val.iter().any(|r| r.ptr() % w != 0) {
            return Err(GpuError::invalid("word values must be word aligned"));
        }
        for (slot, r) in d.pos.iter_mut().zip(pos) {
            *slot = r.ptr();
        }
        for (slot, r) in d.val.iter_mut().zip(val) {
            *slot = r.ptr();
        }
        let tiles = u64::from(self.tiles) + u64::from(d.tile_count);
        if tiles > MAX_TILES {
            return Err(GpuError::invalid("batch has too many tiles"));
        }
        d.tile_begin = self.tiles;
        Ok(Some(d))
    }

    fn add(&mut self, mut d: ChunkDesc) -> Result<()> {
        if d.is_grouped() {
            d.group_begin = self.group_rows;
            self.group_rows = self
                .group_rows
                .checked_add(d.group_rows())
                .ok_or_else(|| GpuError::invalid("batch has too many group rows"))?;
        } else {
            self.positional = true;
        }
        self.tiles += d.tile_count;
        self.sparse |= d.is_sparse();
        self.descs.push(d);
        Ok(())
    }

    /// Adds a chunk: its decoded streams on the device (one range per
    /// stream) and `words` words of base and out (equal ranges for in place,
    /// else disjoint).
    pub fn push(&mut self, c: &ChunkRef<'_>, streams: &[DevRange], base: DevRange, out: DevRange) -> Result<()> {
        self.push_listed(c, streams, base, out, None)
    }

    /// As [`Batch::push`]; a sparse chunk of gaps whose `u32` positions were
    /// rebuilt before the apply (for a base-key context) into `positions` is
    /// applied from that list instead, which skips the scans of its gaps.
    /// The positions launch ran those scans and checked the gaps already.
    pub fn push_listed(
        &mut self,
        c: &ChunkRef<'_>,
        streams: &[DevRange],
        base: DevRange,
        out: DevRange,
        positions: Option<DevRange>,
    ) -> Result<()> {
        let Some(mut d) = self.describe(c, streams, out)? else {
            return Ok(());
        };
        if let Some(list) = positions.filter(|_| d.has_gaps()) {
            if list.len() < 4 * d.m as usize || !list.ptr().is_multiple_of(4) || list.overlaps(&out) {
                return Err(GpuError::invalid("positions range too short, misaligned or overlapping out"));
            }
            d.read_positions_from(list.ptr());
        }
        let w = self.width.bytes() as u64;
        let nbytes = c.words as usize * self.width.bytes();
        if base.len() != nbytes || out.len() != nbytes {
            return Err(GpuError::invalid("base and out ranges must hold the chunk's words"));
        }
        if !base.ptr().is_multiple_of(w) || !out.ptr().is_multiple_of(w) {
            return Err(GpuError::invalid("base and out must be word aligned"));
        }
        if base != out && base.overlaps(&out) {
            return Err(GpuError::invalid("base and out overlap without being equal"));
        }
        d.base = base.ptr();
        d.out = out.ptr();
        self.add(d)
    }

    /// Adds a sparse chunk whose `u32` positions go to `out` (`m` of them),
    /// for the [`Stage::Positions`] launch.
    pub fn push_positions(&mut self, c: &ChunkRef<'_>, streams: &[DevRange], out: DevRange) -> Result<()> {
        let Some(mut d) = self.describe(c, streams, out)?.filter(ChunkDesc::has_positions) else {
            return Err(GpuError::invalid("only sparse chunks have positions"));
        };
        if out.len() < c.record.changed_count as usize * 4 || !out.ptr().is_multiple_of(4) {
            return Err(GpuError::invalid("positions output range too short or misaligned"));
        }
        d.base = out.ptr();
        d.out = out.ptr();
        self.add(d)
    }

    /// Gives each dense positional chunk whose output `rows` holds its first
    /// leaf digest term row ([`ChunkDesc::terms`]), and adds its output to
    /// `given`.
    pub fn give_term_rows(&mut self, rows: &HashMap<u64, u64>, given: &mut HashSet<u64>) {
        for d in self.descs.iter_mut().filter(|d| d.hashes_as_written()) {
            if let Some(&row) = rows.get(&d.out) {
                d.terms = row;
                given.insert(d.out);
            }
        }
    }

    /// Bytes of the descriptor table.
    pub fn table_bytes(&self) -> usize {
        self.descs.len() * ChunkDesc::BYTES
    }

    /// Writes the descriptor table (to be uploaded to the device).
    pub fn write_table(&self, out: &mut [u8]) {
        for (d, dst) in self.descs.iter().zip(out.chunks_exact_mut(ChunkDesc::BYTES)) {
            d.write_to(dst);
        }
    }
}

/// What the apply stage of a launch does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Stage {
    /// Rebuild target words.
    Apply,
    /// Write the `u32` positions of sparse chunks to `out` instead.
    Positions,
}

impl Gpu {
    /// Launches a batch on `stream`. `table` must hold the batch's descriptor
    /// table (already copied there on `stream`), `sums` room for one `u64` per
    /// tile, `groups` room for [`Batch::group_rows`] rows of [`KEYS`] `u32`,
    /// `flag` one `u32`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) fn launch(
        &self,
        stream: &CudaStream,
        batch: &Batch,
        stage: Stage,
        table: DevRange,
        sums: DevRange,
        groups: DevRange,
        flag: DevRange,
    ) -> Result<()> {
        if batch.tiles == 0 {
            return Ok(());
        }
        if table.len() < batch.table_bytes() || !table.ptr().is_multiple_of(8) {
            return Err(GpuError::invalid("descriptor table range too short or misaligned"));
        }
        if sums.len() < batch.tiles as usize * 8 || !sums.ptr().is_multiple_of(8) {
            return Err(GpuError::invalid("tile sums range too short or misaligned"));
        }
        if flag.len() < 4 || !flag.ptr().is_multiple_of(4) {
            return Err(GpuError::invalid("flag range too short or misaligned"));
        }
        if groups.len() < batch.group_rows as usize * KEYS * 4 || !groups.ptr().is_multiple_of(4) {
            return Err(GpuError::invalid("group table range too short or misaligned"));
        }
        let nd = u32::try_from(batch.descs.len()).map_err(|_| GpuError::invalid("too many chunks in one batch"))?;
        let grid = |blocks: u32| cudarc::driver::LaunchConfig {
            grid_dim: (blocks, 1, 1),
            block_dim: (THREADS, 1, 1),
            shared_mem_bytes: 0,
        };
        let (t, s, g, f) = (table.ptr(), sums.ptr(), groups.ptr(), flag.ptr());
        if batch.sparse {
            let k = self.kernels.get(KernelId::TileTotals);
            // SAFETY: `table` holds `nd` descriptors whose addresses were
            // validated by `Batch::push` against live buffers that the caller
            // keeps alive until the stream is synchronized; `sums` has room for
            // every tile and `flag` for one u32. The signature matches
            // `tile_totals(const ChunkDesc*, u32, u64*, u32*)`.
            unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&s).arg(&f).launch(grid(batch.tiles)) }?;
            let k = self.kernels.get(KernelId::TileScan);
            // SAFETY: as above; one block per descriptor, each scanning only
            // its own `tile_begin..tile_begin + tile_count` sums.
            unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&s).arg(&f).launch(grid(nd)) }?;
        }
        if stage == Stage::Positions {
            let k = self.kernels.get(KernelId::Positions);
            // SAFETY: as above. `positions` writes `u32` positions only at
            // indices < m of each descriptor's validated `out` range, matching
            // `positions(const ChunkDesc*, u32, const u64*, u32*)`.
            unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&s).arg(&f).launch(grid(batch.tiles)) }?;
            return Ok(());
        }
        let grouped = batch.group_rows > 0;
        if grouped {
            let k = self.kernels.get(KernelId::group_hist(batch.width));
            // SAFETY: as above. `group_hist_wN` reads base words at positions
            // < n (positions from the delta are checked) and writes row
            // `group_begin + 1 + t` of `groups` for each tile t of a grouped
            // chunk: inside the `group_rows` rows checked above. Signature
            // `group_hist_wN(const ChunkDesc*, u32, const u64*, u32*, u32*)`.
            unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&s).arg(&g).arg(&f).launch(grid(batch.tiles)) }?;
            let k = self.kernels.get(KernelId::GroupScan);
            // SAFETY: as above; one block per descriptor, each touching only
            // its own rows. Signature `group_scan(const ChunkDesc*, u32, u32*, u32*)`.
            unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&g).arg(&f).launch(grid(nd)) }?;
        }
        if batch.positional {
            let k = self.kernels.get(KernelId::apply(batch.width));
            // SAFETY: as above. The apply kernels read `positions`/`values` only
            // within the validated stream lengths, read `base` and write `out` only
            // at word indices < n (kernel-checked for positions from the delta),
            // and, for a chunk given term rows (`give_term_rows`), write its
            // `(n * width - 1) / 1024` rows there, which the loader's digest plan
            // placed inside its term scratch; matching
            // `apply_wN(const ChunkDesc*, u32, const u64*, u32*)`.
            unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&s).arg(&f).launch(grid(batch.tiles)) }?;
        }
        if grouped {
            let k = self.kernels.get(KernelId::apply_grouped(batch.width));
            // SAFETY: as above; value slots are checked against the value
            // count before they are read. Signature
            // `apply_grouped_wN(const ChunkDesc*, u32, const u64*, const u32*, u32*)`.
            unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&s).arg(&g).arg(&f).launch(grid(batch.tiles)) }?;
        }
        let k = self.kernels.get(KernelId::CheckCounts);
        // SAFETY: as above; one thread per descriptor reads its own counts.
        // Signature `check_counts(const ChunkDesc*, u32, u32*)`.
        unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&f).launch(grid(nd.div_ceil(THREADS))) }?;
        Ok(())
    }

    /// Launches `rans_parse` on `stream` for every stream of a sealed
    /// `batch`, whose table (already copied there on `stream`) is `table`;
    /// `flag` holds the [`flag::WORDS`] flag words.
    pub(crate) fn launch_rans_parse(
        &self,
        stream: &CudaStream,
        batch: &RansBatch,
        table: DevRange,
        flag: DevRange,
    ) -> Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        Self::check_rans_args(batch, table, flag)?;
        let nd = u32::try_from(batch.len()).map_err(|_| GpuError::invalid("too many lane rANS streams"))?;
        let cfg =
            cudarc::driver::LaunchConfig { grid_dim: (nd, 1, 1), block_dim: (RANS_THREADS, 1, 1), shared_mem_bytes: 0 };
        let (t, f) = (table.ptr(), flag.ptr());
        let k = self.kernels.get(KernelId::RansParse);
        // SAFETY: `table` holds `nd` descriptors built by `RansBatch::push`
        // from ranges of live buffers that the caller keeps alive until the
        // stream is synchronized; one block per descriptor reads its stored
        // bytes (bounded by `stored_len`) and writes its own scratch, whose
        // size `push` checked against the header. `flag` holds the flag
        // words. Signature `rans_parse(const RansDesc*, u32, u32*)`.
        unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&f).launch(cfg) }?;
        Ok(())
    }

    /// Launches `rans_decode` on `stream` for one level of a sealed `batch`
    /// (after its parse launch, on the same stream, and after every launch
    /// that writes what the level's contexts read).
    pub(crate) fn launch_rans_decode(
        &self,
        stream: &CudaStream,
        batch: &RansBatch,
        level: &RansLevel,
        table: DevRange,
        flag: DevRange,
    ) -> Result<()> {
        Self::check_rans_args(batch, table, flag)?;
        if !batch.levels.contains(level) || level.blocks == 0 {
            return Err(GpuError::invalid("not a level of this lane rANS batch"));
        }
        if level.shared > RANS_MAX_TABLE_BYTES {
            return Err(GpuError::invalid("lane rANS tables larger than the decoder allows"));
        }
        if level.threads == 0 || !level.threads.is_multiple_of(32) || level.threads > RANS_THREADS {
            return Err(GpuError::invalid("lane rANS decoder blocks of a whole number of warps, at most RANS_THREADS"));
        }
        let nd = u32::try_from(level.count).map_err(|_| GpuError::invalid("too many lane rANS streams"))?;
        let sub = table.sub(level.first * RansDesc::BYTES, level.count * RansDesc::BYTES)?;
        let shared = u32::try_from(level.shared).map_err(|_| GpuError::invalid("lane rANS tables too large"))?;
        let cfg = cudarc::driver::LaunchConfig {
            grid_dim: (level.blocks, 1, 1),
            block_dim: (level.threads, 1, 1),
            shared_mem_bytes: shared,
        };
        let (t, f) = (sub.ptr(), flag.ptr());
        let k = self.kernels.get(KernelId::RansDecode);
        // SAFETY: as in `launch_rans_parse`; the level's descriptors number
        // their blocks from 0 to `blocks` (`RansBatch::seal`), each block
        // decodes tiles of its stream into the output range that `push`
        // checked (`decoded_len` bytes), reading the stored bytes within
        // the tile offsets that `rans_parse` checked and wrote to the
        // scratch (the stream is skipped when they did not check out), and
        // its context within the ranges `push` checked. The dynamic shared
        // memory holds the level's largest tables (the function's limit was
        // raised to RANS_MAX_TABLE_BYTES at load). Signature
        // `rans_decode(const RansDesc*, u32, u32*)`.
        unsafe { stream.launch_builder(k).arg(&t).arg(&nd).arg(&f).launch(cfg) }?;
        Ok(())
    }

    /// Launches `copy_ranges` on `stream` for `copies`, up to
    /// [`CopyRanges::COUNT`] a launch: one launch where a copy call apiece
    /// cost each tensor of a many-tensor model a few microseconds of the
    /// host's time and of the device's.
    pub(crate) fn launch_copies(&self, stream: &CudaStream, copies: &[DeviceCopy]) -> Result<()> {
        // A block moves 16 bytes a thread a pass; a long copy takes at most
        // COPY_BLOCKS blocks, each striding over it.
        const COPY_BLOCKS: usize = 1024;
        let copies: Vec<&DeviceCopy> = copies.iter().filter(|c| c.dst.len > 0).collect();
        for part in copies.chunks(CopyRanges::COUNT) {
            let mut ranges = CopyRanges::EMPTY;
            for (i, c) in part.iter().enumerate() {
                (ranges.dst[i], ranges.src[i], ranges.len[i]) = (c.dst.ptr, c.src.ptr, c.dst.len as u64);
            }
            let longest = part.iter().map(|c| c.dst.len).max().unwrap_or(0);
            let blocks = longest.div_ceil(THREADS as usize * 16).clamp(1, COPY_BLOCKS);
            let n = u32::try_from(part.len()).map_err(|_| GpuError::invalid("too many copies"))?;
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (u32::try_from(blocks).unwrap_or(1), n, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let k = self.kernels.get(KernelId::CopyRanges);
            // SAFETY: each of the `n` ranges pairs two ranges of live device
            // buffers (`DevRange::of`), of the same length and disjoint
            // (`DeviceCopy::new`), which the caller keeps alive until the
            // stream is synchronized; a block touches only its range's bytes.
            // Signature `copy_ranges(CopyRanges, u32)`.
            unsafe { stream.launch_builder(k).arg(&ranges).arg(&n).launch(cfg) }?;
        }
        Ok(())
    }

    /// Launches `fill_streams` on `stream` for the constant streams of
    /// `batch`, whose descriptors `table` holds ([`FillBatch::write_table`]).
    pub(crate) fn launch_fill(&self, stream: &CudaStream, batch: &FillBatch, table: DevRange) -> Result<()> {
        if batch.descs.is_empty() {
            return Ok(());
        }
        if table.len() < batch.table_bytes() || !table.ptr().is_multiple_of(16) {
            return Err(GpuError::invalid("fill table range too short or misaligned"));
        }
        // A block stores 16 bytes per thread per pass; a long stream takes at
        // most FILL_BLOCKS blocks, each striding over it.
        const FILL_BLOCKS: u32 = 256;
        // The grid's y dimension (one descriptor each) is at most 65535.
        const MAX_GRID_Y: usize = 65_535;
        let passes = batch.longest.div_ceil(THREADS as usize * 16);
        let blocks = u32::try_from(passes).unwrap_or(FILL_BLOCKS).clamp(1, FILL_BLOCKS);
        for (i, part) in batch.descs.chunks(MAX_GRID_Y).enumerate() {
            let nd = u32::try_from(part.len()).map_err(|_| GpuError::invalid("too many constant streams"))?;
            let t = table.sub(i * MAX_GRID_Y * FillDesc::BYTES, part.len() * FillDesc::BYTES)?.ptr();
            let cfg = cudarc::driver::LaunchConfig {
                grid_dim: (blocks, nd, 1),
                block_dim: (THREADS, 1, 1),
                shared_mem_bytes: 0,
            };
            let k = self.kernels.get(KernelId::FillStreams);
            // SAFETY: `table` holds `nd` descriptors that `FillBatch::push`
            // built from ranges of live buffers, each exactly its `len`
            // bytes, which the caller keeps alive until the stream is
            // synchronized; a block writes only within its descriptor's
            // range. Signature `fill_streams(const FillDesc*, u32)`.
            unsafe { stream.launch_builder(k).arg(&t).arg(&nd).launch(cfg) }?;
        }
        Ok(())
    }

    fn check_rans_args(batch: &RansBatch, table: DevRange, flag: DevRange) -> Result<()> {
        if batch.levels.is_empty() {
            return Err(GpuError::invalid("lane rANS batch not sealed"));
        }
        if table.len() < batch.table_bytes() || !table.ptr().is_multiple_of(8) {
            return Err(GpuError::invalid("lane rANS table range too short or misaligned"));
        }
        if flag.len() < 4 * flag::WORDS || !flag.ptr().is_multiple_of(4) {
            return Err(GpuError::invalid("flag range too short or misaligned"));
        }
        Ok(())
    }

    /// Launches the two leaf digest kernels on `stream` for the ranges of
    /// `batch`: `table` holds its descriptors ([`LeafBatch::write_table`]),
    /// `terms` its term table (pass 1 writes it, pass 2 reads it) and `out`
    /// room for two `u64` per range.
    pub(crate) fn launch_leaves(
        &self,
        stream: &CudaStream,
        batch: &LeafBatch,
        table: DevRange,
        terms: DevRange,
        out: DevRange,
    ) -> Result<()> {
        if batch.ranges.is_empty() {
            return Ok(());
        }
        let n =
            u32::try_from(batch.ranges.len()).map_err(|_| GpuError::invalid("too many ranges in one leaf batch"))?;
        if table.len() < batch.table_bytes() || !table.ptr().is_multiple_of(8) {
            return Err(GpuError::invalid("leaf table range too short or misaligned"));
        }
        let term_bytes = usize::try_from(batch.blocks)
            .ok()
            .and_then(|b| b.checked_mul(LEAF_TERM_BYTES_PER_BLOCK))
            .ok_or_else(|| GpuError::invalid("leaf term table too large"))?;
        if terms.len() < term_bytes || !terms.ptr().is_multiple_of(8) {
            return Err(GpuError::invalid("leaf term range too short or misaligned"));
        }
        if out.len() < batch.ranges.len() * 16 || !out.ptr().is_multiple_of(8) {
            return Err(GpuError::invalid("leaf output range too short or misaligned"));
        }
        let config = |threads: u32, ctas: u64| -> Result<cudarc::driver::LaunchConfig> {
            let ctas = u32::try_from(ctas).map_err(|_| GpuError::invalid("leaf grid too large"))?;
            Ok(cudarc::driver::LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
        };
        let (t, w, o, blocks) = (table.ptr(), terms.ptr(), out.ptr(), batch.blocks);
        if batch.first_pass_needed() {
            let k = self.kernels.get(KernelId::LeafTerms);
            let cfg = config(LEAF_TERM_THREADS, (4 * blocks).div_ceil(u64::from(LEAF_TERM_THREADS)))?;
            // SAFETY: `LeafBatch::push` built every descriptor from a
            // `DevRange` of a live buffer that the caller keeps alive until the
            // stream is synchronized, with term rows ascending and ending at
            // `blocks`; the kernel reads whole blocks inside those ranges and
            // writes rows < `blocks` of `terms` (checked above), except those of
            // ranges marked given. Signature
            // `leaf_terms(const LeafDesc*, u32, u64, u64*)`.
            unsafe { stream.launch_builder(k).arg(&t).arg(&n).arg(&blocks).arg(&w).launch(cfg) }?;
        }
        let k = self.kernels.get(KernelId::LeafFold);
        let cfg = config(LEAF_FOLD_THREADS, (8 * u64::from(n)).div_ceil(u64::from(LEAF_FOLD_THREADS)))?;
        // SAFETY: as above; the kernel reads each range and its own term rows
        // (written by pass 1, earlier on the same stream) and writes
        // `out[2i..2i + 2]` for i < n, inside `out` (checked above). Signature
        // `leaf_fold(const LeafDesc*, u32, const u64*, u64*)`.
        unsafe { stream.launch_builder(k).arg(&t).arg(&n).arg(&w).arg(&o).launch(cfg) }?;
        Ok(())
    }
}

/// What a lane rANS stream's context reads on the device (spec §8.7).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RansContext {
    /// Context 0.
    None,
    /// Context 2: the decoded plane above, at least as long as the stream.
    HigherPlane(DevRange),
    /// Context 1: the chunk's base words (as many as it has), and for a
    /// sparse chunk its positions as `u32`, one per symbol.
    BaseKey { base: DevRange, width: WordWidth, positions: Option<DevRange> },
}

/// A lane rANS stream to decode on the device: where its stored bytes,
/// its output and its scratch lie, what its context reads, its checked
/// fixed header bytes, the decoder launch it belongs to (its level) and the
/// index of its chunk in the caller's jobs, which a fault reports.
#[derive(Clone, Copy, Debug)]
pub(crate) struct RansStream {
    pub stored: DevRange,
    pub decoded: DevRange,
    pub scratch: DevRange,
    pub context: RansContext,
    pub header: Header,
    /// Contexts allowed in the stream ([`crate::rans::allowed_contexts`]).
    pub allowed: u32,
    pub level: u32,
    pub job: u32,
}

/// The decoder launches of one level: descriptors `first..first + count`
/// of the sorted table, `blocks` blocks, `shared` bytes of dynamic shared
/// memory (the largest tables of the level).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct RansLevel {
    pub level: u32,
    pub first: usize,
    pub count: usize,
    pub blocks: u32,
    /// Threads of a decoder block: 32 per warp.
    pub threads: u32,
    pub shared: usize,
}

/// Warps of a decoder block for one launch of streams that need `units`
/// warps' worth of tiles each ([`tiles_per_warp`]), on a device that holds
/// `resident` decoder warps at once.
///
/// Where blocks of eight warps all fit at once, eight: the launch takes one
/// wave, and the most threads spread each block's tables fastest. Otherwise
/// 1, 2, 4 or 8, whichever leaves the fewest warps idle, counting each
/// block's table spread as two warps of work: idle warps still hold their
/// registers, which bound the decoder's occupancy, and streams of one or two
/// tiles each (sparse planes) would leave 7 of 8 warps idle in waves after
/// waves.
pub(crate) fn decoder_warps(units: impl Iterator<Item = u32> + Clone, resident: u64) -> u32 {
    const FULL: u32 = RANS_THREADS / 32;
    const SPREAD: u64 = 2;
    if units.clone().map(|u| u64::from(u.div_ceil(FULL)) * u64::from(FULL)).sum::<u64>() <= resident {
        return FULL;
    }
    [1u32, 2, 4, 8]
        .into_iter()
        .min_by_key(|&w| units.clone().map(|u| u64::from(u.div_ceil(w)) * (u64::from(w) + SPREAD)).sum::<u64>())
        .unwrap_or(FULL)
}

/// Constant streams (codec 3, spec §8.8) of a batch, filled by one launch
/// before the lane rANS and apply launches that read them.
#[derive(Clone, Debug, Default)]
pub(crate) struct FillBatch {
    descs: Vec<FillDesc>,
    /// The longest stream, which sizes the launch.
    longest: usize,
}

impl FillBatch {
    /// Adds a stream of `out.len()` bytes, each `value`.
    pub fn push(&mut self, out: DevRange, value: u8) -> Result<()> {
        let len = u32::try_from(out.len()).map_err(|_| GpuError::invalid("a constant stream over 4 GiB"))?;
        self.descs.push(FillDesc { dst: out.ptr(), len, value });
        self.longest = self.longest.max(out.len());
        Ok(())
    }

    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Bytes of the descriptor table.
    #[must_use]
    pub fn table_bytes(&self) -> usize {
        self.descs.len() * FillDesc::BYTES
    }

    /// Writes the descriptors into `out` ([`FillBatch::table_bytes`] long).
    pub fn write_table(&self, out: &mut [u8]) {
        for (d, dst) in self.descs.iter().zip(out.chunks_exact_mut(FillDesc::BYTES)) {
            d.write_to(dst);
        }
    }
}

/// Lane rANS streams with validated device addresses, ready to launch:
/// one parse launch for all of them, then one decoder launch per level, in
/// increasing level order.
#[derive(Clone, Debug, Default)]
pub(crate) struct RansBatch {
    /// Descriptors and levels, in the order pushed until [`RansBatch::seal`].
    descs: Vec<(u32, RansDesc)>,
    /// Set by [`RansBatch::seal`].
    levels: Vec<RansLevel>,
}

impl RansBatch {
    pub fn len(&self) -> usize {
        self.descs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.descs.is_empty()
    }

    /// Adds a stream, checking its ranges: the stored range exactly the
    /// stored length, the output and context ranges long enough, scratch
    /// as the header needs, alignment of words, positions and scratch, and
    /// an output that overlaps nothing it reads.
    pub fn push(&mut self, s: &RansStream, stored_len: u32, decoded_len: u32) -> Result<()> {
        if !self.levels.is_empty() {
            return Err(GpuError::invalid("lane rANS batch already sealed"));
        }
        let h = &s.header;
        let n = decoded_len as usize;
        if s.stored.len() != stored_len as usize || s.decoded.len() < n || n == 0 {
            return Err(GpuError::invalid("lane rANS stream ranges do not match its record"));
        }
        if h.table_bytes() > RANS_MAX_TABLE_BYTES {
            return Err(GpuError::invalid("lane rANS tables larger than the decoder allows"));
        }
        if s.scratch.len() < h.scratch_bytes(decoded_len) || !s.scratch.ptr().is_multiple_of(16) {
            return Err(GpuError::invalid("lane rANS scratch range too short or misaligned"));
        }
        let mut d = RansDesc {
            stored: s.stored.ptr(),
            decoded: s.decoded.ptr(),
            scratch: s.scratch.ptr(),
            stored_len,
            decoded_len,
            allowed: s.allowed,
            prob_bits: h.prob_bits,
            ctx_kind: h.context,
            table_count: h.table_count,
            tile_log2: h.tile_log2,
            tiles: h.tiles(decoded_len),
            tiles_per_block: 0, // by `seal`, once the level's block size is known
            job: s.job,
            table_form: match h.form {
                TableForm::Bytes => RANS_FORM_BYTES,
                TableForm::Packed => RANS_FORM_PACKED,
            },
            ..RansDesc::default()
        };
        let mut reads = vec![s.stored, s.scratch];
        match (h.context, s.context) {
            (context::NONE, RansContext::None) => {}
            (context::HIGHER_PLANE, RansContext::HigherPlane(above)) => {
                if above.len() < n {
                    return Err(GpuError::invalid("the plane above is shorter than the stream"));
                }
                d.context = above.ptr();
                reads.push(above);
            }
            (context::BASE_KEY, RansContext::BaseKey { base, width, positions }) => {
                let wb = width.bytes();
                if base.ptr() % wb as u64 != 0 {
                    return Err(GpuError::invalid("base words must be word aligned"));
                }
                d.base_words = u32::try_from(base.len() / wb).map_err(|_| GpuError::invalid("chunk too large"))?;
                d.word_bytes = width.bits() / 8;
                d.context = base.ptr();
                reads.push(base);
                if let Some(p) = positions {
                    if p.len() < 4 * n || p.ptr() % 4 != 0 {
                        return Err(GpuError::invalid("positions range too short or misaligned"));
                    }
                    d.positions = p.ptr();
                    reads.push(p);
                }
            }
            _ => return Err(GpuError::invalid("the context source does not fit the stream's context")),
        }
        let out = s.decoded.sub(0, n)?;
        if reads.iter().any(|r| r.overlaps(&out)) || s.scratch.sub(0, h.scratch_bytes(decoded_len))?.overlaps(&s.stored)
        {
            return Err(GpuError::invalid("a lane rANS output or scratch overlaps what the stream reads"));
        }
        self.descs.push((s.level, d));
        Ok(())
    }

    /// Orders the descriptors by level (stably), sizes each level's decoder
    /// blocks for a device that holds `resident` decoder warps at once
    /// ([`decoder_warps`]) and numbers them; no stream can be added after.
    pub fn seal(&mut self, resident: u64) -> Result<()> {
        self.descs.sort_by_key(|(level, _)| *level);
        let mut i = 0;
        while i < self.descs.len() {
            let level = self.descs[i].0;
            let (mut blocks, mut shared) = (0u64, 0usize);
            let first = i;
            let end = first + self.descs[first..].iter().take_while(|(l, _)| *l == level).count();
            let units = |d: &RansDesc| d.tiles.div_ceil(tiles_per_warp(d.tile_log2));
            let warps = decoder_warps(self.descs[first..end].iter().map(|(_, d)| units(d)), resident);
            while i < end {
                let d = &mut self.descs[i].1;
                d.tiles_per_block = warps * tiles_per_warp(d.tile_log2);
                d.block_begin = u32::try_from(blocks).map_err(|_| GpuError::invalid("too many decoder blocks"))?;
                blocks += u64::from(d.tiles.div_ceil(d.tiles_per_block));
                shared = shared.max((d.table_count as usize) << d.prob_bits << 2);
                i += 1;
            }
            let blocks = u32::try_from(blocks)
                .ok()
                .filter(|&b| b < 1 << 31)
                .ok_or_else(|| GpuError::invalid("too many decoder blocks"))?;
            self.levels.push(RansLevel { level, first, count: i - first, blocks, threads: 32 * warps, shared });
        }
        Ok(())
    }

    /// The decoder launches, in order (after [`RansBatch::seal`]).
    pub fn levels(&self) -> &[RansLevel] {
        &self.levels
    }

    /// Bytes of the descriptor table.
    pub fn table_bytes(&self) -> usize {
        self.descs.len() * RansDesc::BYTES
    }

    /// Writes the descriptor table, in sealed order.
    pub fn write_table(&self, out: &mut [u8]) {
        for ((_, d), dst) in self.descs.iter().zip(out.chunks_exact_mut(RansDesc::BYTES)) {
            d.write_to(dst);
        }
    }
}

/// Byte ranges to hash in one pair of leaf digest launches, with the term
/// rows of their whole 1 KiB blocks numbered one after the other.
#[derive(Debug, Default)]
pub(crate) struct LeafBatch {
    /// Each range, its first term row, and whether an apply kernel writes
    /// its terms (`LEAF_TERMS_GIVEN`: the first pass skips it).
    ranges: Vec<(DevRange, u64, bool)>,
    /// Term rows taken so far.
    blocks: u64,
}

impl LeafBatch {
    /// Whole blocks of a range, each a row of the term table: XXH3's long
    /// path scrambles `(len - 1) / 1024` blocks; short inputs (≤ 240 bytes)
    /// take none.
    pub fn blocks_of(len: usize) -> u64 {
        if len <= 240 {
            0
        } else {
            (len as u64 - 1) / 1024
        }
    }

    /// Ranges in the batch.
    pub fn len(&self) -> usize {
        self.ranges.len()
    }

    /// Term rows the batch needs.
    pub fn blocks(&self) -> u64 {
        self.blocks
    }

    /// Adds a range to hash (a live device range), `given` when an apply
    /// kernel writes its terms; returns its first term row.
    pub fn push(&mut self, range: DevRange, given: bool) -> u64 {
        let row = self.blocks;
        self.ranges.push((range, row, given));
        self.blocks += Self::blocks_of(range.len());
        row
    }

    /// Whether the first pass has blocks to hash: some range with whole
    /// blocks whose terms no apply kernel writes.
    fn first_pass_needed(&self) -> bool {
        self.ranges.iter().any(|(r, _, given)| !given && Self::blocks_of(r.len()) > 0)
    }

    /// Bytes of the descriptor table.
    pub fn table_bytes(&self) -> usize {
        self.ranges.len() * LEAF_DESC_BYTES
    }

    /// Writes the `LeafDesc` table (address, length, first term row, flags)
    /// into `out`, at least [`LeafBatch::table_bytes`] long.
    pub fn write_table(&self, out: &mut [u8]) {
        for (dst, (range, row, given)) in out.chunks_exact_mut(LEAF_DESC_BYTES).zip(&self.ranges) {
            let fields = [range.ptr(), range.len() as u64, *row, if *given { LEAF_TERMS_GIVEN } else { 0 }];
            for (d, f) in dst.chunks_exact_mut(8).zip(fields) {
                d.copy_from_slice(&f.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::kind;
    use crate::rans::Header;

    #[test]
    fn decoder_blocks_shrink_to_the_streams_they_decode() {
        // one tile a stream (sparse planes), more than a wave: one warp a block
        assert_eq!(decoder_warps([1u32; 500].into_iter(), 2112), 1);
        assert_eq!(decoder_warps([2u32; 500].into_iter(), 2112), 2);
        // but blocks of eight while they all fit at once
        assert_eq!(decoder_warps([1u32; 264].into_iter(), 2112), 8);
        assert_eq!(decoder_warps([1u32; 265].into_iter(), 2112), 1);
        // long streams: whole blocks of eight warps
        assert_eq!(decoder_warps([1000u32, 3].into_iter(), 0), 8);
        assert_eq!(decoder_warps([16u32; 10].into_iter(), 0), 8);
        // a mix leans to the streams that hold most of the work
        assert_eq!(decoder_warps([3u32, 18].into_iter(), 0), 4);
        assert_eq!(decoder_warps(std::iter::empty(), 0), 8);
    }

    /// A sparse chunk of gaps whose positions were rebuilt for a base-key
    /// context is applied from that list: the same tiles, no tile scans for
    /// its batch; a list too short for its positions, or over the output, is
    /// refused.
    #[test]
    fn a_chunk_with_rebuilt_positions_is_applied_from_them() {
        let n = 20_000usize;
        let base = vec![0u8; 4 * n];
        let mut target = base.clone();
        for i in (0..n).step_by(7) {
            target[4 * i] = 1;
        }
        let plain =
            tpde::EncodeSettings { rans: false, zstd: false, constant: false, ..tpde::EncodeSettings::default() };
        let t = crate::EncodedTensor::encode("t", Some(&base), &target, WordWidth::W4, 20_000, false, plain).unwrap();
        let r = t.as_ref();
        let c = &r.chunks[0];
        let m = c.record.changed_count as usize;
        assert_eq!(m, n.div_ceil(7));
        let (base, out) = (DevRange { ptr: 0x100_0000, len: 4 * n }, DevRange { ptr: 0x200_0000, len: 4 * n });
        let streams: Vec<DevRange> = (0..c.streams.len())
            .map(|q| DevRange { ptr: 0x300_0000 + 0x10_0000 * q as u64, len: c.device_stream_len(q) })
            .collect();
        let list = DevRange { ptr: 0x900_0000, len: 4 * m };

        let mut gaps = Batch::new(WordWidth::W4);
        gaps.push(c, &streams, base, out).unwrap();
        let mut listed = Batch::new(WordWidth::W4);
        listed.push_listed(c, &streams, base, out, Some(list)).unwrap();
        assert_eq!(gaps.descs[0].kind, kind::SPARSE_GAPS);
        assert!(gaps.sparse && !listed.sparse, "only the gaps need the tile scans");
        assert_eq!(
            (listed.descs[0].kind, listed.descs[0].pos[0], listed.descs[0].gap_width),
            (kind::SPARSE_LIST, list.ptr(), 0)
        );
        assert_eq!(listed.tiles, gaps.tiles);

        let short = DevRange { len: 4 * m - 4, ..list };
        assert!(Batch::new(WordWidth::W4).push_listed(c, &streams, base, out, Some(short)).is_err());
        let over_out = DevRange { ptr: out.ptr + 64, ..list };
        assert!(Batch::new(WordWidth::W4).push_listed(c, &streams, base, out, Some(over_out)).is_err());
    }

    /// Term rows are numbered across the ranges of a batch (short ranges
    /// and ranges of at most 1 KiB take none) and written after address
    /// and length, with the flag of the ranges whose terms an apply kernel
    /// writes; the first pass runs while some range with rows has no such
    /// kernel.
    #[test]
    fn leaf_batch_numbers_term_rows_across_ranges() {
        let lens = [0usize, 240, 241, 1024, 1025, 2049, 300, 1 << 22];
        let mut batch = LeafBatch::default();
        let mut ptr = 4096u64;
        let mut first_rows = Vec::new();
        for (k, len) in lens.into_iter().enumerate() {
            // the apply kernels write the terms of the ranges of 1025 and 2049 bytes
            first_rows.push(batch.push(DevRange { ptr, len }, k == 4 || k == 5));
            ptr += len as u64 + 1;
        }
        assert_eq!(lens.map(LeafBatch::blocks_of), [0, 0, 0, 0, 1, 2, 0, 4095]);
        assert_eq!(batch.blocks(), 4098);
        let mut table = vec![0xAA; batch.table_bytes()];
        batch.write_table(&mut table);
        let rows: Vec<[u64; 4]> = table
            .chunks_exact(LEAF_DESC_BYTES)
            .map(|d| std::array::from_fn(|k| u64::from_le_bytes(d[8 * k..8 * k + 8].try_into().unwrap())))
            .collect();
        assert_eq!(rows.iter().map(|r| r[2]).collect::<Vec<_>>(), [0, 0, 0, 0, 0, 1, 3, 3]);
        assert_eq!(first_rows, [0, 0, 0, 0, 0, 1, 3, 3]);
        assert_eq!(rows.iter().map(|r| r[1]).collect::<Vec<_>>(), lens.map(|l| l as u64));
        assert_eq!(rows.iter().map(|r| r[0]).take(2).collect::<Vec<_>>(), [4096, 4097]);
        assert_eq!(
            rows.iter().map(|r| r[3]).collect::<Vec<_>>(),
            [0, 0, 0, 0, LEAF_TERMS_GIVEN, LEAF_TERMS_GIVEN, 0, 0]
        );
        assert!(batch.first_pass_needed(), "the last range's rows are not given");
        let mut given = LeafBatch::default();
        for len in lens {
            given.push(DevRange { ptr, len }, len > 1024);
            ptr += len as u64 + 1;
        }
        assert!(!given.first_pass_needed(), "every range with rows is given");
    }

    /// Only dense and raw chunks of positional values are given their term
    /// rows: no other kernel writes whole tiles of a chunk.
    #[test]
    fn only_chunks_written_whole_are_given_term_rows() {
        let mut batch = Batch::new(WordWidth::W4);
        let chunks = [(kind::DENSE, 0), (kind::DENSE, 1), (kind::SPARSE_GAPS, 0), (kind::RAW, 0), (kind::DENSE, 0)];
        for (k, (kind, order)) in (1u64..).zip(chunks) {
            batch.descs.push(ChunkDesc { kind, order, out: 0x1000 * k, ..ChunkDesc::default() });
        }
        // the last chunk's bytes have no rows (a later leaf batch)
        let rows: HashMap<u64, u64> = (1..=4).map(|k| (0x1000 * k, 0x9000 + 64 * k)).collect();
        let mut given = HashSet::new();
        batch.give_term_rows(&rows, &mut given);
        assert_eq!(batch.descs.iter().map(|d| d.terms).collect::<Vec<_>>(), [0x9040, 0, 0, 0x9100, 0]);
        assert_eq!(given, HashSet::from([0x1000, 0x4000]));
    }

    fn rans_stream(at: u64, n: u32, header: Header, context: RansContext, level: u32, job: u32) -> RansStream {
        RansStream {
            stored: DevRange { ptr: at, len: 1000 },
            decoded: DevRange { ptr: at + 0x1_0000, len: n as usize },
            scratch: DevRange { ptr: at + 0x10_0000, len: header.scratch_bytes(n) },
            context,
            header,
            allowed: 0b111,
            level,
            job,
        }
    }

    /// A lane rANS batch checks each stream's ranges against its record and
    /// header, then orders the streams by level (stably) and numbers each
    /// level's decoder blocks from 0, with the shared memory of its largest
    /// tables.
    #[test]
    fn lane_rans_batches_check_their_ranges_and_order_their_levels() {
        let none = Header { form: TableForm::Packed, prob_bits: 6, context: 0, table_count: 1, tile_log2: 12 };
        let above = Header { form: TableForm::Bytes, prob_bits: 11, context: 2, table_count: 8, tile_log2: 8 };
        let key = Header { form: TableForm::Packed, prob_bits: 9, context: 1, table_count: 3, tile_log2: 16 };
        let plane = RansContext::HigherPlane(DevRange { ptr: 0x90_0000, len: 50_000 });
        let keyed = RansContext::BaseKey {
            base: DevRange { ptr: 0xA0_0000, len: 4 * 50_000 },
            width: WordWidth::W4,
            positions: Some(DevRange { ptr: 0xB0_0000, len: 4 * 50_000 }),
        };
        let mut b = RansBatch::default();
        let streams = [
            rans_stream(0x100_0000, 50_000, above, plane, 2, 0),
            rans_stream(0x200_0000, 9_000, none, RansContext::None, 0, 1),
            rans_stream(0x300_0000, 50_000, key, keyed, 1, 2),
            rans_stream(0x400_0000, 70_000, none, RansContext::None, 0, 3),
        ];
        for s in &streams {
            b.push(s, 1000, u32::try_from(s.decoded.len()).unwrap()).unwrap();
        }
        b.seal(0).unwrap();
        // level 0: 9 000 symbols in tiles of 4096 (3 tiles), then 70 000 (18
        // tiles), in blocks of 4 warps: 1 + 5 blocks; level 1: one tile of
        // 65 536, one warp; level 2: 196 tiles of 256, 16 a warp, 8 warps
        // and 128 tiles a block
        let levels: Vec<_> =
            b.levels().iter().map(|l| (l.level, l.first, l.count, l.blocks, l.threads, l.shared)).collect();
        assert_eq!(levels, [(0, 0, 2, 6, 128, 256), (1, 2, 1, 1, 32, 3 << 11), (2, 3, 1, 2, 256, 64 << 10)]);
        let mut table = vec![0u8; b.table_bytes()];
        b.write_table(&mut table);
        let field = |d: usize, name: &str| {
            let at = d * RansDesc::BYTES + RansDesc::FIELDS.iter().find(|(f, _)| *f == name).unwrap().1;
            u32::from_le_bytes(table[at..at + 4].try_into().unwrap())
        };
        assert_eq!((0..4).map(|d| field(d, "job")).collect::<Vec<_>>(), [1, 3, 2, 0]);
        assert_eq!((0..4).map(|d| field(d, "block_begin")).collect::<Vec<_>>(), [0, 1, 0, 0]);
        assert_eq!((0..4).map(|d| field(d, "tiles_per_block")).collect::<Vec<_>>(), [4, 4, 1, 128]);
        assert_eq!((field(2, "base_words"), field(2, "word_bytes"), field(2, "ctx_kind")), (50_000, 4, 1));
        // the form of each stream's tables: codec 4 packed, codec 2 bytes
        assert_eq!((0..4).map(|d| field(d, "table_form")).collect::<Vec<_>>(), [1, 1, 1, 0]);
        assert!(b.push(&streams[1], 1000, 9_000).is_err(), "sealed");

        let bad = |s: RansStream, stored_len: u32, n: u32| RansBatch::default().push(&s, stored_len, n).unwrap_err();
        let ok = rans_stream(0x100_0000, 4096, none, RansContext::None, 0, 0);
        assert!(RansBatch::default().push(&ok, 1000, 4096).is_ok());
        assert!(matches!(bad(ok, 999, 4096), GpuError::InvalidArgument(_)), "stored length");
        assert!(matches!(bad(ok, 1000, 4097), GpuError::InvalidArgument(_)), "output too short");
        let short = RansStream { scratch: DevRange { len: ok.scratch.len() - 16, ..ok.scratch }, ..ok };
        assert!(matches!(bad(short, 1000, 4096), GpuError::InvalidArgument(_)), "scratch");
        let over = RansStream { decoded: DevRange { ptr: ok.stored.ptr() + 999, len: 4096 }, ..ok };
        assert!(matches!(bad(over, 1000, 4096), GpuError::InvalidArgument(_)), "output over the stored bytes");
        let wrong = RansStream { context: plane, ..ok };
        assert!(matches!(bad(wrong, 1000, 4096), GpuError::InvalidArgument(_)), "context of another kind");
        let misaligned = RansContext::BaseKey {
            base: DevRange { ptr: 0xA0_0002, len: 4 * 4096 },
            width: WordWidth::W4,
            positions: None,
        };
        let s = rans_stream(0x100_0000, 4096, key, misaligned, 0, 0);
        assert!(matches!(bad(s, 1000, 4096), GpuError::InvalidArgument(_)), "base words misaligned");
        let few = RansContext::BaseKey {
            base: DevRange { ptr: 0xA0_0000, len: 4 * 4096 },
            width: WordWidth::W4,
            positions: Some(DevRange { ptr: 0xB0_0000, len: 4 * 4095 }),
        };
        let s = rans_stream(0x100_0000, 4096, key, few, 0, 0);
        assert!(matches!(bad(s, 1000, 4096), GpuError::InvalidArgument(_)), "positions too few");
    }

    /// The two-pass leaf kernels give XXH3-128 of every range, whatever
    /// its length and alignment, next to ranges of no whole block, and
    /// refuse a term table too short for the batch.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn the_leaf_kernels_match_the_library_digest() {
        let gpu = Gpu::new(0).unwrap();
        let s = gpu.stream().clone();
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let data: Vec<u8> = (0..(9 << 20))
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x.to_le_bytes()[3]
            })
            .collect();
        let dev = gpu.upload(&data).unwrap();
        let all = DevRange::all(&dev, &s).unwrap();
        let mut ranges = Vec::new();
        let mut off = 0;
        for len in [0, 1, 16, 17, 128, 129, 240, 241, 1024, 1025, 1088, 2047, 2049, 65 * 1024 + 63, 3, 1 << 22, 0]
            .into_iter()
            .chain([(1 << 22) + 77, 241, 5000])
        {
            ranges.push((off + 3, len));
            off += len + 11;
        }
        let mut batch = LeafBatch::default();
        for (o, l) in &ranges {
            batch.push(all.sub(*o, *l).unwrap(), false);
        }
        let mut bytes = vec![0u8; batch.table_bytes()];
        batch.write_table(&mut bytes);
        let table = gpu.upload(&bytes).unwrap();
        let terms = gpu.alloc_zeros::<u64>(usize::try_from(batch.blocks()).unwrap() * 8).unwrap();
        let out = gpu.alloc_zeros::<u64>(2 * ranges.len()).unwrap();
        let r = |b| DevRange::all(b, &s).unwrap();
        let (t, w, o) = (r(&table), DevRange::all(&terms, &s).unwrap(), DevRange::all(&out, &s).unwrap());
        let short = w.sub(0, w.len() - 8).unwrap();
        assert!(matches!(gpu.launch_leaves(&s, &batch, t, short, o), Err(GpuError::InvalidArgument(_))));
        gpu.launch_leaves(&s, &batch, t, w, o).unwrap();
        let got = gpu.download(&out).unwrap();
        for ((o, l), halves) in ranges.iter().zip(got.chunks_exact(2)) {
            let expected = xxhash_rust::xxh3::xxh3_128(&data[*o..o + l]);
            assert_eq!((u128::from(halves[1]) << 64) | u128::from(halves[0]), expected, "{l} bytes at {o}");
        }
    }

    /// Ranges copied in one launch or several: of one alignment or of two,
    /// one byte or several blocks long, empty, and more than a launch holds.
    /// Every byte outside the ranges is left as it was.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn copy_ranges_copies_every_range_and_nothing_else() {
        let gpu = Gpu::new(0).unwrap();
        let s = gpu.stream().clone();
        let n = 3 << 20;
        let src_bytes: Vec<u8> =
            (0..n).map(|i: usize| (i.wrapping_mul(2_654_435_761) >> 13).to_le_bytes()[0]).collect();
        let src = gpu.upload(&src_bytes).unwrap();
        let dst = gpu.upload(&vec![0xEEu8; n]).unwrap();
        let (sr, dr) = (DevRange::all(&src, &s).unwrap(), DevRange::all(&dst, &s).unwrap());
        // (destination offset, source offset, length)
        let mut ranges = vec![(0, 0, 1 << 20), (1 << 20, 1 << 20, 1), ((1 << 20) + 35, 3, 1 << 20), (2_200_000, 7, 0)];
        ranges.extend((0..200).map(|i| (2_300_000 + 1000 * i, 17 * i, 1 + 37 * i % 900)));
        ranges.push(((3 << 20) - 1000, (2 << 20) + 5, 1000));
        let copies: Vec<DeviceCopy> = ranges
            .iter()
            .map(|&(d, o, len)| DeviceCopy::new(dr.sub(d, len).unwrap(), sr.sub(o, len).unwrap()).unwrap())
            .collect();
        assert!(copies.len() > CopyRanges::COUNT);
        gpu.launch_copies(&s, &copies).unwrap();
        let mut want = vec![0xEEu8; n];
        for &(d, o, len) in &ranges {
            want[d..d + len].copy_from_slice(&src_bytes[o..o + len]);
        }
        assert!(gpu.download(&dst).unwrap() == want);
        // ranges of different lengths, or overlapping, are refused
        assert!(DeviceCopy::new(dr.sub(0, 8).unwrap(), sr.sub(0, 9).unwrap()).is_err());
        assert!(DeviceCopy::new(dr.sub(0, 8).unwrap(), dr.sub(4, 8).unwrap()).is_err());
    }

    /// A descriptor with an op or layout the kernels do not implement used
    /// to be read as SUB or as byte planes; now it raises the device flag
    /// and nothing is written.
    #[test]
    #[ignore = "needs a CUDA GPU"]
    fn an_unknown_op_or_layout_raises_the_device_flag() {
        let gpu = Gpu::new(0).unwrap();
        let s = gpu.stream().clone();
        for (op, layout, order) in [(2, 0, 0), (0, 3, 0), (0, 0, 2), (7, 7, 0)] {
            let values = gpu.upload(&[1u8; 256]).unwrap();
            let base = gpu.alloc_zeros::<u8>(256).unwrap();
            let out = gpu.alloc_zeros::<u8>(256).unwrap();
            let mut d =
                ChunkDesc { n: 64, m: 64, tile_count: 1, kind: kind::DENSE, op, layout, order, ..Default::default() };
            d.val[0] = DevRange::all(&values, &s).unwrap().ptr();
            d.base = DevRange::all(&base, &s).unwrap().ptr();
            d.out = DevRange::all(&out, &s).unwrap().ptr();
            let batch = Batch {
                width: WordWidth::W4,
                descs: vec![d],
                tiles: 1,
                sparse: false,
                group_rows: u32::from(order != 0) * 2,
                positional: true,
            };
            let mut bytes = vec![0u8; ChunkDesc::BYTES];
            batch.write_table(&mut bytes);
            let table = gpu.upload(&bytes).unwrap();
            let sums = gpu.alloc_zeros::<u64>(1).unwrap();
            let groups = gpu.alloc_zeros::<u32>(2 * KEYS).unwrap();
            let bits = gpu.alloc_zeros::<u32>(1).unwrap();
            let r = |b| DevRange::all(b, &s).unwrap();
            gpu.launch(
                &s,
                &batch,
                Stage::Apply,
                r(&table),
                DevRange::all(&sums, &s).unwrap(),
                DevRange::all(&groups, &s).unwrap(),
                DevRange::all(&bits, &s).unwrap(),
            )
            .unwrap();
            s.synchronize().unwrap();
            let raised = gpu.download(&bits).unwrap()[0];
            assert!(raised & flag::BAD_DESCRIPTOR != 0, "op {op} layout {layout} order {order}: flag {raised:#x}");
            assert!(gpu.download(&out).unwrap().iter().all(|b| *b == 0), "op {op} layout {layout}: written");
        }
    }
}
