//! The CUDA context, its kernels and the safe launch wrappers.
//!
//! Every kernel launch goes through a wrapper that validates, on the CPU,
//! that each descriptor's addresses lie inside live device buffers and that
//! its sizes match its chunk. The kernels then bounds-check positions, which
//! come from the (untrusted) delta, and raise the device error flag instead of
//! writing out of range.

use std::sync::Arc;

use cudarc::driver::{
    result as cu, sys, CudaContext, CudaSlice, CudaStream, DevicePtr, DeviceRepr, PushKernelArg, ValidAsZeroBits,
};

use tpde::container::chunk_map::{ChunkRecord, ValueLayout};

use crate::error::{GpuError, Result};
use crate::kernels::{
    ChunkDesc, KernelId, Kernels, KEYS, LEAF_DESC_BYTES, LEAF_FOLD_THREADS, LEAF_TERM_BYTES_PER_BLOCK,
    LEAF_TERM_THREADS, MAX_POSITION_STREAMS, MAX_VALUE_STREAMS, THREADS,
};
use crate::pipeline::ChunkRef;
use crate::width::WordWidth;

/// Whether the CUDA driver library can be loaded on this machine. Checked
/// before the first CUDA call, because cudarc panics when it is missing.
#[must_use]
pub fn driver_present() -> bool {
    // SAFETY: only tries to open the shared library by its candidate names.
    unsafe { sys::is_culib_present() }
}

/// A CUDA device with the tpde kernels loaded.
///
/// Its context has cudarc's per-buffer event tracking off: this crate orders
/// its streams itself with events, and every public operation synchronizes
/// before it returns.
#[derive(Debug)]
pub struct Gpu {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    kernels: Kernels,
    name: String,
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
        Ok(Self { ctx, stream, kernels, name })
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

    pub fn tiles(&self) -> u32 {
        self.tiles
    }

    /// Rows of the group table (of [`KEYS`] `u32`) the batch needs.
    pub fn group_rows(&self) -> u32 {
        self.group_rows
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
        if streams.len() != c.streams.len()
            || streams.iter().zip(c.streams).any(|(r, s)| r.len() < s.decoded_len as usize)
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
        let Some(mut d) = self.describe(c, streams, out)? else {
            return Ok(());
        };
        let w = self.width.bytes() as u64;
        let nbytes = c.words as usize * self.width.bytes();
        if base.len() != nbytes || out.len() != nbytes {
            return Err(GpuError::invalid("base and out ranges must hold the chunk's words"));
        }
        if base.ptr() % w != 0 || out.ptr() % w != 0 {
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
        let Some(mut d) = self.describe(c, streams, out)?.filter(ChunkDesc::is_sparse) else {
            return Err(GpuError::invalid("only sparse chunks have positions"));
        };
        if out.len() < c.record.changed_count as usize * 4 || out.ptr() % 4 != 0 {
            return Err(GpuError::invalid("positions output range too short or misaligned"));
        }
        d.base = out.ptr();
        d.out = out.ptr();
        self.add(d)
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
        if table.len() < batch.table_bytes() || table.ptr() % 8 != 0 {
            return Err(GpuError::invalid("descriptor table range too short or misaligned"));
        }
        if sums.len() < batch.tiles as usize * 8 || sums.ptr() % 8 != 0 {
            return Err(GpuError::invalid("tile sums range too short or misaligned"));
        }
        if flag.len() < 4 || flag.ptr() % 4 != 0 {
            return Err(GpuError::invalid("flag range too short or misaligned"));
        }
        if groups.len() < batch.group_rows as usize * KEYS * 4 || groups.ptr() % 4 != 0 {
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
            // matching `apply_wN(const ChunkDesc*, u32, const u64*, u32*)`.
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
        if table.len() < batch.table_bytes() || table.ptr() % 8 != 0 {
            return Err(GpuError::invalid("leaf table range too short or misaligned"));
        }
        let term_bytes = usize::try_from(batch.blocks)
            .ok()
            .and_then(|b| b.checked_mul(LEAF_TERM_BYTES_PER_BLOCK))
            .ok_or_else(|| GpuError::invalid("leaf term table too large"))?;
        if terms.len() < term_bytes || terms.ptr() % 8 != 0 {
            return Err(GpuError::invalid("leaf term range too short or misaligned"));
        }
        if out.len() < batch.ranges.len() * 16 || out.ptr() % 8 != 0 {
            return Err(GpuError::invalid("leaf output range too short or misaligned"));
        }
        let config = |threads: u32, ctas: u64| -> Result<cudarc::driver::LaunchConfig> {
            let ctas = u32::try_from(ctas).map_err(|_| GpuError::invalid("leaf grid too large"))?;
            Ok(cudarc::driver::LaunchConfig { grid_dim: (ctas, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 })
        };
        let (t, w, o, blocks) = (table.ptr(), terms.ptr(), out.ptr(), batch.blocks);
        if blocks > 0 {
            let k = self.kernels.get(KernelId::LeafTerms);
            let cfg = config(LEAF_TERM_THREADS, (4 * blocks).div_ceil(u64::from(LEAF_TERM_THREADS)))?;
            // SAFETY: `LeafBatch::push` built every descriptor from a
            // `DevRange` of a live buffer that the caller keeps alive until the
            // stream is synchronized, with term rows ascending and ending at
            // `blocks`; the kernel reads whole blocks inside those ranges and
            // writes rows < `blocks` of `terms` (checked above). Signature
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

/// Byte ranges to hash in one pair of leaf digest launches, with the term
/// rows of their whole 1 KiB blocks numbered one after the other.
#[derive(Debug, Default)]
pub(crate) struct LeafBatch {
    /// Each range and its first term row.
    ranges: Vec<(DevRange, u64)>,
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

    /// Adds a range to hash (a live device range).
    pub fn push(&mut self, range: DevRange) {
        self.ranges.push((range, self.blocks));
        self.blocks += Self::blocks_of(range.len());
    }

    /// Bytes of the descriptor table.
    pub fn table_bytes(&self) -> usize {
        self.ranges.len() * LEAF_DESC_BYTES
    }

    /// Writes the `LeafDesc` table (address, length, first term row, 0) into
    /// `out`, at least [`LeafBatch::table_bytes`] long.
    pub fn write_table(&self, out: &mut [u8]) {
        for (dst, (range, row)) in out.chunks_exact_mut(LEAF_DESC_BYTES).zip(&self.ranges) {
            let fields = [range.ptr(), range.len() as u64, *row, 0];
            for (d, f) in dst.chunks_exact_mut(8).zip(fields) {
                d.copy_from_slice(&f.to_le_bytes());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::error::flag;
    use crate::kernels::kind;

    /// Term rows are numbered across the ranges of a batch (short ranges
    /// and ranges of at most 1 KiB take none) and written after address
    /// and length.
    #[test]
    fn leaf_batch_numbers_term_rows_across_ranges() {
        let lens = [0usize, 240, 241, 1024, 1025, 2049, 300, 1 << 22];
        let mut batch = LeafBatch::default();
        let mut ptr = 4096u64;
        for len in lens {
            batch.push(DevRange { ptr, len });
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
        assert_eq!(rows.iter().map(|r| r[1]).collect::<Vec<_>>(), lens.map(|l| l as u64));
        assert_eq!((rows[0][0], rows[1][0], rows[7][3]), (4096, 4097, 0));
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
            batch.push(all.sub(*o, *l).unwrap());
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
