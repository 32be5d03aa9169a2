//! The kernel registry: `kernels/*.cu` sources, compiled once per process by
//! NVRTC and loaded into a context as one module, with a typed function table.

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule};
use cudarc::nvrtc::{CompileOptions, Ptx};

use tpde::container::chunk_map::{ChunkRecord, Encoding, PositionCoding, ValueOrder};

use crate::error::{GpuError, Result};
use crate::width::WordWidth;

/// Source of the reconstruction kernels.
pub const APPLY_SOURCE: &str = include_str!("../../../kernels/tpde_apply.cu");

/// Threads per block of every kernel (`THREADS` in the source).
pub const THREADS: u32 = 256;
/// Gaps or words per tile (`TILE` in the source).
pub const TILE: u64 = 256 * 16;
/// Bitmap bytes per tile (`BITMAP_TILE_BYTES` in the source).
pub const BITMAP_TILE_BYTES: u64 = 256 * 16;
/// Base keys of grouped value order (`KEYS` in the source): one row of the
/// group table is this many `u32`.
pub const KEYS: usize = 256;

/// Every kernel of the registry.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum KernelId {
    /// Per tile sums of gaps / bitmap popcounts.
    TileTotals,
    /// Per chunk exclusive scan of the tile sums.
    TileScan,
    /// Reconstruction for 1-byte words.
    ApplyW1,
    /// Reconstruction for 2-byte words.
    ApplyW2,
    /// Reconstruction for 4-byte words.
    ApplyW4,
    /// Reconstruction for 8-byte words.
    ApplyW8,
    /// Positions of sparse chunks as `u32`.
    Positions,
    /// Per tile histograms of base keys (grouped value order), 1-byte words.
    GroupHistW1,
    /// The same for 2-byte words.
    GroupHistW2,
    /// The same for 4-byte words.
    GroupHistW4,
    /// The same for 8-byte words.
    GroupHistW8,
    /// Per chunk scan of the key histograms into value slots.
    GroupScan,
    /// Reconstruction of chunks with grouped values, 1-byte words.
    ApplyGroupedW1,
    /// The same for 2-byte words.
    ApplyGroupedW2,
    /// The same for 4-byte words.
    ApplyGroupedW4,
    /// The same for 8-byte words.
    ApplyGroupedW8,
}

impl KernelId {
    /// Every kernel, in table order.
    pub const ALL: [KernelId; 16] = [
        Self::TileTotals,
        Self::TileScan,
        Self::ApplyW1,
        Self::ApplyW2,
        Self::ApplyW4,
        Self::ApplyW8,
        Self::Positions,
        Self::GroupHistW1,
        Self::GroupHistW2,
        Self::GroupHistW4,
        Self::GroupHistW8,
        Self::GroupScan,
        Self::ApplyGroupedW1,
        Self::ApplyGroupedW2,
        Self::ApplyGroupedW4,
        Self::ApplyGroupedW8,
    ];

    /// The `extern "C"` symbol.
    #[must_use]
    pub const fn symbol(self) -> &'static str {
        match self {
            Self::TileTotals => "tile_totals",
            Self::TileScan => "tile_scan",
            Self::ApplyW1 => "apply_w1",
            Self::ApplyW2 => "apply_w2",
            Self::ApplyW4 => "apply_w4",
            Self::ApplyW8 => "apply_w8",
            Self::Positions => "positions",
            Self::GroupHistW1 => "group_hist_w1",
            Self::GroupHistW2 => "group_hist_w2",
            Self::GroupHistW4 => "group_hist_w4",
            Self::GroupHistW8 => "group_hist_w8",
            Self::GroupScan => "group_scan",
            Self::ApplyGroupedW1 => "apply_grouped_w1",
            Self::ApplyGroupedW2 => "apply_grouped_w2",
            Self::ApplyGroupedW4 => "apply_grouped_w4",
            Self::ApplyGroupedW8 => "apply_grouped_w8",
        }
    }

    /// The apply kernel of a word width.
    #[must_use]
    pub const fn apply(width: WordWidth) -> Self {
        match width {
            WordWidth::W1 => Self::ApplyW1,
            WordWidth::W2 => Self::ApplyW2,
            WordWidth::W4 => Self::ApplyW4,
            WordWidth::W8 => Self::ApplyW8,
        }
    }

    /// The key histogram kernel of a word width.
    #[must_use]
    pub const fn group_hist(width: WordWidth) -> Self {
        match width {
            WordWidth::W1 => Self::GroupHistW1,
            WordWidth::W2 => Self::GroupHistW2,
            WordWidth::W4 => Self::GroupHistW4,
            WordWidth::W8 => Self::GroupHistW8,
        }
    }

    /// The grouped-order apply kernel of a word width.
    #[must_use]
    pub const fn apply_grouped(width: WordWidth) -> Self {
        match width {
            WordWidth::W1 => Self::ApplyGroupedW1,
            WordWidth::W2 => Self::ApplyGroupedW2,
            WordWidth::W4 => Self::ApplyGroupedW4,
            WordWidth::W8 => Self::ApplyGroupedW8,
        }
    }
}

/// PTX of the kernels, compiled at most once per process.
fn ptx() -> Result<Ptx> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let src = PTX.get_or_init(|| {
        // SAFETY: only probes whether the NVRTC shared library can be opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(String::new());
        }
        let opts = CompileOptions { options: vec!["--std=c++17".into()], ..CompileOptions::default() };
        std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(APPLY_SOURCE, opts))
            .map_err(|_| "NVRTC panicked".to_string())?
            .map(|ptx| ptx.to_src())
            .map_err(|e| e.to_string())
    });
    match src {
        Ok(s) => Ok(Ptx::from_src(s.clone())),
        Err(e) if e.is_empty() => Err(GpuError::NoNvrtc),
        Err(e) => Err(GpuError::Compile(e.clone())),
    }
}

/// The loaded module of one context and its functions.
#[derive(Debug)]
pub struct Kernels {
    _module: Arc<CudaModule>,
    functions: Vec<CudaFunction>,
}

impl Kernels {
    /// Compiles (once per process) and loads every kernel into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let module = ctx.load_module(ptx()?)?;
        let functions = KernelId::ALL
            .iter()
            .map(|id| module.load_function(id.symbol()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        Ok(Self { _module: module, functions })
    }

    /// The function of a kernel.
    #[must_use]
    pub fn get(&self, id: KernelId) -> &CudaFunction {
        let i = KernelId::ALL.iter().position(|k| *k == id).unwrap_or(0);
        &self.functions[i]
    }
}

/// Kind codes of `ChunkDesc.kind` (`KIND_*` in the source).
pub(crate) mod kind {
    pub const SPARSE_GAPS: u32 = 1;
    pub const SPARSE_BITMAP: u32 = 2;
    pub const DENSE: u32 = 3;
    pub const RAW: u32 = 4;
}

/// Most position streams of a chunk (`pos[4]` in the source): 4-byte gaps.
pub(crate) const MAX_POSITION_STREAMS: usize = 4;
/// Most value streams of a chunk (`val[8]` in the source): 8-byte words.
pub(crate) const MAX_VALUE_STREAMS: usize = 8;

/// One chunk as the kernels read it: `struct ChunkDesc` of the source,
/// 152 bytes, with one device address per stream.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ChunkDesc {
    pub pos: [u64; MAX_POSITION_STREAMS],
    pub val: [u64; MAX_VALUE_STREAMS],
    pub base: u64,
    pub out: u64,
    pub n: u32,
    pub m: u32,
    pub tile_begin: u32,
    pub tile_count: u32,
    pub kind: u32,
    pub op: u32,
    pub layout: u32,
    pub gap_width: u32,
    pub order: u32,
    pub group_begin: u32,
}

impl ChunkDesc {
    pub const BYTES: usize = 152;

    /// Kind, op, layout, gap width and tile count of a chunk of `words`
    /// words (no addresses). `None` for unchanged chunks, which need no
    /// kernel. The record's shape has been checked
    /// ([`tpde::delta::check_chunk_shape`]).
    pub fn from_record(record: &ChunkRecord, words: u32) -> Option<Self> {
        let (kind, gap_width, tiles) = match (record.encoding, record.position_coding) {
            (Encoding::Unchanged, _) => return None,
            (Encoding::Sparse, PositionCoding::Bitmap) => {
                (kind::SPARSE_BITMAP, 0, u64::from(words).div_ceil(8).div_ceil(BITMAP_TILE_BYTES))
            }
            (Encoding::Sparse, _) => {
                (kind::SPARSE_GAPS, u32::from(record.gap_width), u64::from(record.changed_count).div_ceil(TILE))
            }
            (Encoding::Dense, _) => (kind::DENSE, 0, u64::from(words).div_ceil(TILE)),
            (Encoding::Raw, _) => (kind::RAW, 0, u64::from(words).div_ceil(TILE)),
        };
        Some(Self {
            n: words,
            m: record.changed_count,
            // at most 2^32 / 4096 tiles per chunk
            tile_count: u32::try_from(tiles).unwrap_or(u32::MAX),
            kind,
            op: u32::from(record.value_op as u8),
            layout: u32::from(record.value_layout as u8),
            gap_width,
            order: u32::from(record.value_order == ValueOrder::GroupedByBase),
            ..Self::default()
        })
    }

    pub fn is_sparse(&self) -> bool {
        self.kind == kind::SPARSE_GAPS || self.kind == kind::SPARSE_BITMAP
    }

    /// Whether the values are grouped by base key (§8.6): the chunk goes to
    /// the grouped kernels. Raw chunks are always positional.
    pub fn is_grouped(&self) -> bool {
        self.order == 1 && self.kind != kind::RAW
    }

    /// Rows of the group table a grouped chunk takes: `start` and one per tile.
    pub fn group_rows(&self) -> u32 {
        if self.is_grouped() {
            self.tile_count + 1
        } else {
            0
        }
    }

    pub fn write_to(&self, out: &mut [u8]) {
        let fields64 = self.pos.iter().chain(&self.val).chain([&self.base, &self.out]);
        for (dst, f) in out.chunks_exact_mut(8).zip(fields64) {
            dst.copy_from_slice(&f.to_le_bytes());
        }
        let fields32 = [
            self.n,
            self.m,
            self.tile_begin,
            self.tile_count,
            self.kind,
            self.op,
            self.layout,
            self.gap_width,
            self.order,
            self.group_begin,
        ];
        for (dst, f) in out[112..].chunks_exact_mut(4).zip(fields32) {
            dst.copy_from_slice(&f.to_le_bytes());
        }
    }
}
