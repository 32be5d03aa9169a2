//! The kernel registry: `kernels/*.cu` sources, compiled once per process by
//! NVRTC and loaded into a context as one module per source, with a function
//! table indexed by [`KernelId`] (one list defines the enum and the table).

use std::sync::{Arc, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, DeviceRepr};
use cudarc::nvrtc::{CompileOptions, Ptx};

use tpde::{
    format::{ChunkRecord, Encoding, PositionCoding, ValueOrder},
    WordWidth,
};

use crate::error::{GpuError, Result};

/// Source of the reconstruction kernels; NVRTC compiles [`APPLY_PROGRAM`].
#[cfg(test)]
pub const APPLY_SOURCE: &str = include_str!("../../../kernels/tpde_apply.cu");
/// What NVRTC compiles for [`Source::Apply`]: the dense apply kernels also
/// compute leaf digest terms ([`ChunkDesc::terms`]), with the device
/// functions of [`XXH3_SOURCE`] (its kernels left out).
pub const APPLY_PROGRAM: &str = concat!(
    "#define XXH3_DEVICE_FUNCTIONS_ONLY\n",
    include_str!("../../../kernels/tpde_xxh3.cu"),
    include_str!("../../../kernels/tpde_apply.cu")
);
/// Source of the leaf digest kernel (XXH3-128, spec §10).
pub const XXH3_SOURCE: &str = include_str!("../../../kernels/tpde_xxh3.cu");
/// Source of the lane rANS kernels (codec 2, spec §8.7).
pub const RANS_SOURCE: &str = include_str!("../../../kernels/tpde_rans.cu");

/// Threads per block of every kernel (`THREADS` in the source).
pub const THREADS: u32 = 256;
/// Gaps or words per tile (`TILE` in the source).
pub const TILE: u64 = 256 * 16;
/// Bitmap bytes per tile (`BITMAP_TILE_BYTES` in the source).
pub const BITMAP_TILE_BYTES: u64 = 256 * 16;
/// Base keys of grouped value order (`KEYS` in the source): one row of the
/// group table is this many `u32`.
pub const KEYS: usize = 256;

/// Defines [`KernelId`] with its source, its symbol and [`KernelId::ALL`]
/// from one list, so that no kernel can be left out of the table: the table
/// is indexed by the enum's discriminant.
macro_rules! kernel_registry {
    ($($(#[doc = $doc:literal])* $id:ident => $source:ident, $symbol:literal;)*) => {
        /// Every kernel of the registry.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        #[repr(usize)]
        pub enum KernelId {
            $($(#[doc = $doc])* $id,)*
        }

        impl KernelId {
            /// Every kernel, in discriminant order: `ALL[id as usize] == id`.
            pub const ALL: &'static [KernelId] = &[$(Self::$id,)*];

            /// The `extern "C"` symbol.
            #[must_use]
            pub const fn symbol(self) -> &'static str {
                match self {
                    $(Self::$id => $symbol,)*
                }
            }

            /// The source file that defines the kernel.
            #[must_use]
            pub const fn source(self) -> Source {
                match self {
                    $(Self::$id => Source::$source,)*
                }
            }
        }
    };
}

kernel_registry! {
    /// Per tile sums of gaps / bitmap popcounts.
    TileTotals => Apply, "tile_totals";
    /// Per chunk exclusive scan of the tile sums.
    TileScan => Apply, "tile_scan";
    /// Reconstruction for 1-byte words.
    ApplyW1 => Apply, "apply_w1";
    /// Reconstruction for 2-byte words.
    ApplyW2 => Apply, "apply_w2";
    /// Reconstruction for 4-byte words.
    ApplyW4 => Apply, "apply_w4";
    /// Reconstruction for 8-byte words.
    ApplyW8 => Apply, "apply_w8";
    /// Positions of sparse chunks as `u32`.
    Positions => Apply, "positions";
    /// Per tile histograms of base keys (grouped value order), 1-byte words.
    GroupHistW1 => Apply, "group_hist_w1";
    /// The same for 2-byte words.
    GroupHistW2 => Apply, "group_hist_w2";
    /// The same for 4-byte words.
    GroupHistW4 => Apply, "group_hist_w4";
    /// The same for 8-byte words.
    GroupHistW8 => Apply, "group_hist_w8";
    /// Per chunk scan of the key histograms into value slots.
    GroupScan => Apply, "group_scan";
    /// Reconstruction of chunks with grouped values, 1-byte words.
    ApplyGroupedW1 => Apply, "apply_grouped_w1";
    /// The same for 2-byte words.
    ApplyGroupedW2 => Apply, "apply_grouped_w2";
    /// The same for 4-byte words.
    ApplyGroupedW4 => Apply, "apply_grouped_w4";
    /// The same for 8-byte words.
    ApplyGroupedW8 => Apply, "apply_grouped_w8";
    /// Compares the words each chunk changed with its changed count.
    CheckCounts => Apply, "check_counts";
    /// Copies base bytes into a call's outputs, many ranges a launch.
    CopyRanges => Apply, "copy_ranges";
    /// Fills constant streams (codec 3, spec §8.8), before any kernel reads them.
    FillStreams => Apply, "fill_streams";
    /// XXH3-128 of byte ranges (the chunk leaf digests, spec §10), pass 1:
    /// the stripe terms of every whole 1 KiB block.
    LeafTerms => Xxh3, "leaf_terms";
    /// Pass 2: folds each range's block terms, finishes and merges.
    LeafFold => Xxh3, "leaf_fold";
    /// Lane rANS (spec §8.7): checks each stream's header and parses its
    /// tables and tile lengths into its scratch, one block per stream.
    RansParse => Rans, "rans_parse";
    /// Lane rANS: decodes runs of tiles, one warp per tile, one state per lane.
    RansDecode => Rans, "rans_decode";
}

// The table is indexed by discriminant; the macro keeps `ALL` in that order.
const _: () = {
    let mut i = 0;
    while i < KernelId::ALL.len() {
        assert!(KernelId::ALL[i] as usize == i);
        i += 1;
    }
};

/// A kernel source file, compiled by NVRTC into one module.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Source {
    /// `kernels/tpde_apply.cu`: reconstruction.
    Apply,
    /// `kernels/tpde_xxh3.cu`: leaf digests.
    Xxh3,
    /// `kernels/tpde_rans.cu`: lane rANS decoding.
    Rans,
}

impl Source {
    /// Every source file.
    pub const ALL: [Source; 3] = [Source::Apply, Source::Xxh3, Source::Rans];

    /// The CUDA source text.
    #[must_use]
    pub const fn text(self) -> &'static str {
        match self {
            Self::Apply => APPLY_PROGRAM,
            Self::Xxh3 => XXH3_SOURCE,
            Self::Rans => RANS_SOURCE,
        }
    }
}

impl KernelId {
    /// Threads per block the kernel is compiled for (`__launch_bounds__`).
    #[must_use]
    pub const fn threads(self) -> u32 {
        match self {
            Self::LeafTerms => LEAF_TERM_THREADS,
            Self::LeafFold => LEAF_FOLD_THREADS,
            Self::RansParse | Self::RansDecode => RANS_THREADS,
            _ => THREADS,
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

/// PTX of a source, compiled at most once per process.
fn ptx(source: Source) -> Result<Ptx> {
    type Compiled = OnceLock<std::result::Result<String, String>>;
    static PTX: [Compiled; Source::ALL.len()] = [OnceLock::new(), OnceLock::new(), OnceLock::new()];
    let src = PTX[source as usize].get_or_init(|| {
        // SAFETY: only probes whether the NVRTC shared library can be opened.
        if !unsafe { cudarc::nvrtc::sys::is_culib_present() } {
            return Err(String::new());
        }
        // Line info maps profiler samples to source lines; it does not change the code.
        let opts = CompileOptions {
            options: vec!["--std=c++17".into(), "--generate-line-info".into()],
            ..CompileOptions::default()
        };
        std::panic::catch_unwind(|| cudarc::nvrtc::compile_ptx_with_opts(source.text(), opts))
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

/// The loaded modules of one context and their functions.
#[derive(Debug)]
pub struct Kernels {
    _modules: Vec<Arc<CudaModule>>,
    /// Indexed by `KernelId as usize`.
    functions: Vec<CudaFunction>,
}

impl Kernels {
    /// Compiles (once per process) and loads every kernel into `ctx`.
    pub fn load(ctx: &Arc<CudaContext>) -> Result<Self> {
        let modules = Source::ALL.iter().map(|&s| Ok(ctx.load_module(ptx(s)?)?)).collect::<Result<Vec<_>>>()?;
        let functions = KernelId::ALL
            .iter()
            .map(|id| modules[id.source() as usize].load_function(id.symbol()))
            .collect::<std::result::Result<Vec<_>, _>>()?;
        // The decoder's tables take up to 64 KiB of dynamic shared memory,
        // above the default limit of 48 KiB.
        let table_bytes = i32::try_from(RANS_MAX_TABLE_BYTES).unwrap_or(i32::MAX);
        functions[KernelId::RansDecode as usize].set_attribute(
            cudarc::driver::sys::CUfunction_attribute::CU_FUNC_ATTRIBUTE_MAX_DYNAMIC_SHARED_SIZE_BYTES,
            table_bytes,
        )?;
        Ok(Self { _modules: modules, functions })
    }

    /// The function of a kernel.
    #[must_use]
    pub fn get(&self, id: KernelId) -> &CudaFunction {
        &self.functions[id as usize]
    }
}

/// Kind codes of `ChunkDesc.kind` (`KIND_*` in the source).
pub(crate) mod kind {
    pub const SPARSE_GAPS: u32 = 1;
    pub const SPARSE_BITMAP: u32 = 2;
    pub const DENSE: u32 = 3;
    pub const RAW: u32 = 4;
    /// Position coding 3, its positions resolved on the CPU: `pos[0]` holds
    /// `m` increasing `u32`.
    pub const SPARSE_LIST: u32 = 5;
}

/// Most position streams of a chunk (`pos[4]` in the source): 4-byte gaps.
pub(crate) const MAX_POSITION_STREAMS: usize = 4;
/// Most value streams of a chunk (`val[8]` in the source): 8-byte words.
pub(crate) const MAX_VALUE_STREAMS: usize = 8;

/// One chunk as the kernels read it: `struct ChunkDesc` of the source,
/// 168 bytes, with one device address per stream. The source pins the
/// layout with `static_assert`s, which a test compares with `ChunkDesc::FIELDS`.
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
    /// 0, or the device address of the chunk's first row in the leaf digest
    /// term table: the apply kernel of a dense or raw positional chunk then writes
    /// the terms of its whole 1 KiB blocks there, and the digest pass skips
    /// them.
    pub terms: u64,
}

impl ChunkDesc {
    pub const BYTES: usize = 168;

    /// Byte offset of each field of the source's `struct ChunkDesc`, as
    /// [`ChunkDesc::write_to`] writes it. `changed` is counted by the kernels
    /// and `reserved` stays 0; both are written as 0.
    #[cfg(test)]
    pub const FIELDS: [(&'static str, usize); 17] = [
        ("pos", 0),
        ("val", 32),
        ("base", 96),
        ("out", 104),
        ("n", 112),
        ("m", 116),
        ("tile_begin", 120),
        ("tile_count", 124),
        ("kind", 128),
        ("op", 132),
        ("layout", 136),
        ("gap_width", 140),
        ("order", 144),
        ("group_begin", 148),
        ("changed", 152),
        ("reserved", 156),
        ("terms", 160),
    ];

    /// Kind, op, layout, gap width and tile count of a chunk of `words`
    /// words (no addresses). `None` for unchanged chunks, which need no
    /// kernel. The record's shape has been checked
    /// ([`tpde::format::check_chunk_shape`]).
    pub fn from_record(record: &ChunkRecord, words: u32) -> Option<Self> {
        let (kind, gap_width, tiles) = match (record.encoding, record.position_coding) {
            (Encoding::Unchanged, _) => return None,
            (Encoding::Sparse, PositionCoding::Bitmap) => {
                (kind::SPARSE_BITMAP, 0, u64::from(words).div_ceil(8).div_ceil(BITMAP_TILE_BYTES))
            }
            (Encoding::Sparse, PositionCoding::SplitByReference) => {
                (kind::SPARSE_LIST, 0, u64::from(record.changed_count).div_ceil(TILE))
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

    /// Whether the chunk's positions need the tile scans (`tile_totals`,
    /// `tile_scan`) before the apply.
    pub fn is_sparse(&self) -> bool {
        self.kind == kind::SPARSE_GAPS || self.kind == kind::SPARSE_BITMAP
    }

    /// Whether the chunk's positions are coded as gaps.
    pub fn has_gaps(&self) -> bool {
        self.kind == kind::SPARSE_GAPS
    }

    /// Makes a chunk of gaps read its positions from a list of `m` `u32` at
    /// device address `list` instead, rebuilt from those gaps: the same tiles
    /// of [`TILE`] positions, without the scans of the gaps.
    pub fn read_positions_from(&mut self, list: u64) {
        debug_assert!(self.has_gaps());
        self.kind = kind::SPARSE_LIST;
        self.gap_width = 0;
        self.pos = [0; MAX_POSITION_STREAMS];
        self.pos[0] = list;
    }

    /// Whether the chunk has positions (every sparse kind).
    pub fn has_positions(&self) -> bool {
        self.is_sparse() || self.kind == kind::SPARSE_LIST
    }

    /// Whether the chunk's apply kernel writes every word of each of its
    /// tiles, and so can hash them as it writes them ([`ChunkDesc::terms`]):
    /// a dense or raw chunk of positional values, which goes to `apply_wN`.
    pub fn hashes_as_written(&self) -> bool {
        matches!(self.kind, kind::DENSE | kind::RAW) && self.order == 0
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

    /// Writes the descriptor into `out` ([`ChunkDesc::BYTES`] bytes) at the
    /// offsets of `ChunkDesc::FIELDS`.
    pub fn write_to(&self, out: &mut [u8]) {
        let fields64 = self.pos.iter().chain(&self.val).chain([&self.base, &self.out]);
        for (dst, f) in out.chunks_exact_mut(8).zip(fields64) {
            dst.copy_from_slice(&f.to_le_bytes());
        }
        // n .. group_begin, then changed and reserved (both 0)
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
            0,
            0,
        ];
        for (dst, f) in out[112..160].chunks_exact_mut(4).zip(fields32) {
            dst.copy_from_slice(&f.to_le_bytes());
        }
        out[160..Self::BYTES].copy_from_slice(&self.terms.to_le_bytes());
    }
}

/// Bytes of one `LeafDesc` of `kernels/tpde_xxh3.cu`: device address,
/// length, first term row and flags, all `u64` (pinned there by
/// `static_assert`s).
pub(crate) const LEAF_DESC_BYTES: usize = 32;
/// `LeafDesc.flags`: an apply kernel writes the range's term rows, so
/// `leaf_terms` skips it (`LEAF_TERMS_GIVEN` in the source).
pub(crate) const LEAF_TERMS_GIVEN: u64 = 1;
/// Threads per block of `leaf_terms` (`TERM_THREADS` in the source): four
/// per 1 KiB block of input.
pub(crate) const LEAF_TERM_THREADS: u32 = 256;
/// Threads per block of `leaf_fold` (`FOLD_THREADS` in the source): eight
/// per range.
pub(crate) const LEAF_FOLD_THREADS: u32 = 64;
/// Bytes of the term table per whole 1 KiB block: 8 `u64` lanes.
pub(crate) const LEAF_TERM_BYTES_PER_BLOCK: usize = 64;

/// Threads per block of the lane rANS kernels (`RANS_THREADS` in
/// `kernels/tpde_rans.cu`): eight warps, one tile each at a time.
pub const RANS_THREADS: u32 = 256;
/// Largest `prob_bits` (`RANS_MAX_PROB_BITS` in the source, spec §8.7).
pub(crate) const RANS_MAX_PROB_BITS: u32 = 11;
/// Most tables of a stream (`RANS_MAX_TABLES` in the source).
pub(crate) const RANS_MAX_TABLES: u32 = 8;
/// Dynamic shared memory of the largest decoder tables: eight tables of
/// 2^11 slots of one `u32` entry.
pub(crate) const RANS_MAX_TABLE_BYTES: usize = (RANS_MAX_TABLES as usize) << RANS_MAX_PROB_BITS << 2;
/// `u32` words of a stream's scratch header (`RANS_SCRATCH_HEAD`).
pub(crate) const RANS_SCRATCH_HEAD: usize = 16;
/// Entries per table in the scratch (`RANS_TABLE_STRIDE`): one per symbol.
pub(crate) const RANS_TABLE_STRIDE: usize = 256;
/// [`RansDesc::table_form`] of codec 2's tables (`RANS_FORM_BYTES`).
pub(crate) const RANS_FORM_BYTES: u32 = 0;
/// [`RansDesc::table_form`] of codec 4's packed tables (`RANS_FORM_PACKED`).
pub(crate) const RANS_FORM_PACKED: u32 = 1;

/// One lane rANS stream as the kernels of `kernels/tpde_rans.cu` read it:
/// `struct RansDesc` of the source, 96 bytes, pinned there by
/// `static_assert`s that a test compares with `RansDesc::FIELDS`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct RansDesc {
    pub stored: u64,
    pub decoded: u64,
    pub context: u64,
    pub positions: u64,
    pub scratch: u64,
    pub stored_len: u32,
    pub decoded_len: u32,
    pub base_words: u32,
    pub word_bytes: u32,
    pub allowed: u32,
    pub prob_bits: u32,
    pub ctx_kind: u32,
    pub table_count: u32,
    pub tile_log2: u32,
    pub tiles: u32,
    pub block_begin: u32,
    pub tiles_per_block: u32,
    pub job: u32,
    /// How the stream lists its context map and tables:
    /// [`RANS_FORM_BYTES`] or [`RANS_FORM_PACKED`].
    pub table_form: u32,
}

impl RansDesc {
    pub const BYTES: usize = 96;

    /// Byte offset of each field of the source's `struct RansDesc`, as
    /// [`RansDesc::write_to`] writes it.
    #[cfg(test)]
    pub const FIELDS: [(&'static str, usize); 19] = [
        ("stored", 0),
        ("decoded", 8),
        ("context", 16),
        ("positions", 24),
        ("scratch", 32),
        ("stored_len", 40),
        ("decoded_len", 44),
        ("base_words", 48),
        ("word_bytes", 52),
        ("allowed", 56),
        ("prob_bits", 60),
        ("ctx_kind", 64),
        ("table_count", 68),
        ("tile_log2", 72),
        ("tiles", 76),
        ("block_begin", 80),
        ("tiles_per_block", 84),
        ("job", 88),
        ("table_form", 92),
    ];

    /// Writes the descriptor into `out` ([`RansDesc::BYTES`] bytes) at the
    /// offsets of `RansDesc::FIELDS`.
    pub fn write_to(&self, out: &mut [u8]) {
        let fields64 = [self.stored, self.decoded, self.context, self.positions, self.scratch];
        for (dst, f) in out.chunks_exact_mut(8).zip(fields64) {
            dst.copy_from_slice(&f.to_le_bytes());
        }
        let fields32 = [
            self.stored_len,
            self.decoded_len,
            self.base_words,
            self.word_bytes,
            self.allowed,
            self.prob_bits,
            self.ctx_kind,
            self.table_count,
            self.tile_log2,
            self.tiles,
            self.block_begin,
            self.tiles_per_block,
            self.job,
            self.table_form,
        ];
        for (dst, f) in out[40..Self::BYTES].chunks_exact_mut(4).zip(fields32) {
            dst.copy_from_slice(&f.to_le_bytes());
        }
    }
}

/// Ranges copied by one `copy_ranges` launch: `struct CopyRanges` of
/// `kernels/tpde_apply.cu`, passed by value as the kernel's parameter (under
/// the 4 KiB that every CUDA device takes), pinned there by a
/// `static_assert` that a test compares with [`CopyRanges::COUNT`].
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub(crate) struct CopyRanges {
    pub dst: [u64; CopyRanges::COUNT],
    pub src: [u64; CopyRanges::COUNT],
    pub len: [u64; CopyRanges::COUNT],
}

impl CopyRanges {
    /// Ranges per launch (`COPY_RANGES`).
    pub const COUNT: usize = 160;
    pub const EMPTY: Self = Self { dst: [0; Self::COUNT], src: [0; Self::COUNT], len: [0; Self::COUNT] };
}

// SAFETY: a `repr(C)` struct of `u64` arrays, laid out as the kernel's
// `struct CopyRanges` (the test below compares the two).
unsafe impl DeviceRepr for CopyRanges {}

/// One constant stream (codec 3, spec §8.8) as `fill_streams` reads it:
/// `struct FillDesc` of `kernels/tpde_apply.cu`, 16 bytes, pinned there by a
/// `static_assert` that a test compares with [`FillDesc::BYTES`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct FillDesc {
    pub dst: u64,
    pub len: u32,
    pub value: u8,
}

impl FillDesc {
    pub const BYTES: usize = 16;

    /// Writes the descriptor into `out` ([`FillDesc::BYTES`] bytes): `dst`,
    /// `len`, then `value` widened to a `u32`.
    pub fn write_to(&self, out: &mut [u8]) {
        out[..8].copy_from_slice(&self.dst.to_le_bytes());
        out[8..12].copy_from_slice(&self.len.to_le_bytes());
        out[12..16].copy_from_slice(&u32::from(self.value).to_le_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copy_ranges_layout_matches_the_kernel_source() {
        assert!(APPLY_SOURCE.contains(&format!("#define COPY_RANGES {}\n", CopyRanges::COUNT)));
        let bytes = std::mem::size_of::<CopyRanges>();
        assert!(APPLY_SOURCE.contains(&format!("static_assert(sizeof(CopyRanges) == {bytes}")));
        assert!(bytes <= 4096 - 8, "the kernel's parameters, with its count, fit 4 KiB");
        let fields: Vec<&str> = APPLY_SOURCE
            .split("struct CopyRanges {")
            .nth(1)
            .and_then(|rest| rest.split("};").next())
            .unwrap()
            .split(';')
            .map(str::trim)
            .filter(|f| !f.is_empty())
            .collect();
        assert_eq!(fields, ["u64 dst[COPY_RANGES]", "u64 src[COPY_RANGES]", "u64 len[COPY_RANGES]"]);
    }

    #[test]
    fn fill_desc_layout_matches_the_kernel_source() {
        assert!(APPLY_SOURCE.contains(&format!("static_assert(sizeof(FillDesc) == {}", FillDesc::BYTES)));
        let fields: String = APPLY_SOURCE
            .split("struct FillDesc {")
            .nth(1)
            .and_then(|rest| rest.split("};").next())
            .expect("struct FillDesc in the source")
            .split_whitespace()
            .collect::<Vec<_>>()
            .join(" ");
        assert_eq!(fields, "u64 dst; u32 len; u32 value;");
        let mut out = [0xAAu8; FillDesc::BYTES];
        FillDesc { dst: 0x0102_0304_0506_0708, len: 0x1122_3344, value: 0x7F }.write_to(&mut out);
        assert_eq!(out, [8, 7, 6, 5, 4, 3, 2, 1, 0x44, 0x33, 0x22, 0x11, 0x7F, 0, 0, 0]);
    }

    /// The `static_assert`s of `kernels/tpde_apply.cu` state the layout the
    /// kernels compile with (NVRTC refuses the source otherwise); the Rust
    /// side must write the same offsets.
    #[test]
    fn chunk_desc_layout_matches_the_kernel_source() {
        let mut stated = Vec::new();
        let mut size = None;
        for line in APPLY_SOURCE.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("static_assert(OFFSET_OF(ChunkDesc, ") {
                let (field, rest) = rest.split_once(')').unwrap();
                let offset = rest.trim_start_matches(" == ").split(',').next().unwrap();
                stated.push((field.to_string(), offset.parse::<usize>().unwrap()));
            } else if let Some(rest) = line.strip_prefix("static_assert(sizeof(ChunkDesc) == ") {
                size = Some(rest.split(',').next().unwrap().parse::<usize>().unwrap());
            }
        }
        let ours: Vec<(String, usize)> = ChunkDesc::FIELDS.iter().map(|(f, o)| ((*f).to_string(), *o)).collect();
        assert_eq!(stated, ours);
        assert_eq!(size, Some(ChunkDesc::BYTES));

        // write_to puts each field where FIELDS says.
        let d = ChunkDesc {
            pos: [1, 2, 3, 4],
            val: [5, 6, 7, 8, 9, 10, 11, 12],
            base: 13,
            out: 14,
            n: 15,
            m: 16,
            tile_begin: 17,
            tile_count: 18,
            kind: 19,
            op: 20,
            layout: 21,
            gap_width: 22,
            order: 23,
            group_begin: 24,
            terms: 25,
        };
        let mut bytes = vec![0xAA; ChunkDesc::BYTES];
        d.write_to(&mut bytes);
        let u64_at = |o: usize| u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap());
        let u32_at = |o: usize| u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap());
        let at = |name: &str| ChunkDesc::FIELDS.iter().find(|(f, _)| *f == name).unwrap().1;
        assert_eq!((0..4).map(|k| u64_at(at("pos") + 8 * k)).collect::<Vec<_>>(), d.pos);
        assert_eq!((0..8).map(|k| u64_at(at("val") + 8 * k)).collect::<Vec<_>>(), d.val);
        assert_eq!((u64_at(at("base")), u64_at(at("out"))), (13, 14));
        let u32s = ["n", "m", "tile_begin", "tile_count", "kind", "op", "layout", "gap_width", "order", "group_begin"];
        for (name, value) in u32s.iter().zip(15u32..) {
            assert_eq!(u32_at(at(name)), value, "{name}");
        }
        assert_eq!((u32_at(at("changed")), u32_at(at("reserved"))), (0, 0));
        assert_eq!(u64_at(at("terms")), 25);
    }

    /// `LeafBatch::write_table` writes address, length and first term row
    /// as three `u64` and the flags; the source states that layout and flag.
    #[test]
    fn leaf_desc_layout_matches_the_kernel_source() {
        let mut stated = Vec::new();
        let mut size = None;
        for line in XXH3_SOURCE.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("static_assert(__builtin_offsetof(LeafDesc, ") {
                let (field, rest) = rest.split_once(')').unwrap();
                let offset = rest.trim_start_matches(" == ").split(',').next().unwrap();
                stated.push((field.to_string(), offset.parse::<usize>().unwrap()));
            } else if let Some(rest) = line.strip_prefix("static_assert(sizeof(LeafDesc) == ") {
                size = Some(rest.split(',').next().unwrap().parse::<usize>().unwrap());
            }
        }
        let expected = [("ptr", 0), ("len", 8), ("terms", 16), ("flags", 24)].map(|(f, o)| (f.to_string(), o));
        assert_eq!(stated, expected);
        assert_eq!(size, Some(LEAF_DESC_BYTES));
        assert!(XXH3_SOURCE.contains(&format!("#define LEAF_TERMS_GIVEN {LEAF_TERMS_GIVEN}ull\n")));
        for (id, threads) in [(KernelId::LeafTerms, "TERM_THREADS"), (KernelId::LeafFold, "FOLD_THREADS")] {
            let stated = XXH3_SOURCE
                .lines()
                .find_map(|l| l.strip_prefix(&format!("#define {threads} ")))
                .and_then(|r| r.split_whitespace().next())
                .map(|n| n.parse::<u32>().unwrap());
            assert_eq!(stated, Some(id.threads()), "{threads}");
        }
    }

    #[test]
    fn every_kernel_is_in_its_slot_of_the_table() {
        for (i, id) in KernelId::ALL.iter().enumerate() {
            assert_eq!(*id as usize, i);
        }
        let symbols: std::collections::HashSet<_> = KernelId::ALL.iter().map(|k| k.symbol()).collect();
        assert_eq!(symbols.len(), KernelId::ALL.len());
    }

    /// The `static_assert`s of `kernels/tpde_rans.cu` state the layout of
    /// `RansDesc`; `RansDesc::write_to` writes the same offsets, and the
    /// constants the host sizes scratch and launches with are the source's.
    #[test]
    fn rans_desc_layout_and_constants_match_the_kernel_source() {
        let mut stated = Vec::new();
        let mut size = None;
        for line in RANS_SOURCE.lines() {
            let line = line.trim();
            if let Some(rest) = line.strip_prefix("static_assert(OFFSET_OF(RansDesc, ") {
                let (field, rest) = rest.split_once(')').unwrap();
                let offset = rest.trim_start_matches(" == ").split(',').next().unwrap();
                stated.push((field.to_string(), offset.parse::<usize>().unwrap()));
            } else if let Some(rest) = line.strip_prefix("static_assert(sizeof(RansDesc) == ") {
                size = Some(rest.split(',').next().unwrap().parse::<usize>().unwrap());
            }
        }
        let ours: Vec<(String, usize)> = RansDesc::FIELDS.iter().map(|(f, o)| ((*f).to_string(), *o)).collect();
        assert_eq!(stated, ours);
        assert_eq!(size, Some(RansDesc::BYTES));
        let define = |name: &str| {
            RANS_SOURCE
                .lines()
                .find_map(|l| l.strip_prefix(&format!("#define {name} ")))
                .and_then(|r| r.split_whitespace().next())
                .map(|n| n.trim_end_matches('u').parse::<usize>().unwrap())
        };
        assert_eq!(define("RANS_THREADS"), Some(RANS_THREADS as usize));
        assert_eq!(define("RANS_MAX_PROB_BITS"), Some(RANS_MAX_PROB_BITS as usize));
        assert_eq!(define("RANS_MAX_TABLES"), Some(RANS_MAX_TABLES as usize));
        assert_eq!(define("RANS_SCRATCH_HEAD"), Some(RANS_SCRATCH_HEAD));
        assert_eq!(define("RANS_TABLE_STRIDE"), Some(RANS_TABLE_STRIDE));
        assert_eq!(define("RANS_FORM_BYTES"), Some(RANS_FORM_BYTES as usize));
        assert_eq!(define("RANS_FORM_PACKED"), Some(RANS_FORM_PACKED as usize));
        assert_eq!(define("ERR_RANS_HEADER"), Some(crate::error::flag::RANS_HEADER as usize));
        assert_eq!(define("ERR_RANS_DECODE"), Some(crate::error::flag::RANS_DECODE as usize));
        assert_eq!(define("ERR_BAD_DESCRIPTOR"), Some(crate::error::flag::BAD_DESCRIPTOR as usize));

        let d = RansDesc {
            stored: 1,
            decoded: 2,
            context: 3,
            positions: 4,
            scratch: 5,
            stored_len: 6,
            decoded_len: 7,
            base_words: 8,
            word_bytes: 9,
            allowed: 10,
            prob_bits: 11,
            ctx_kind: 12,
            table_count: 13,
            tile_log2: 14,
            tiles: 15,
            block_begin: 16,
            tiles_per_block: 17,
            job: 18,
            table_form: 19,
        };
        let mut bytes = vec![0xAA; RansDesc::BYTES];
        d.write_to(&mut bytes);
        let at = |name: &str| RansDesc::FIELDS.iter().find(|(f, _)| *f == name).unwrap().1;
        for (k, name) in ["stored", "decoded", "context", "positions", "scratch"].iter().enumerate() {
            let o = at(name);
            assert_eq!(u64::from_le_bytes(bytes[o..o + 8].try_into().unwrap()), k as u64 + 1, "{name}");
        }
        for ((name, _), value) in RansDesc::FIELDS[5..].iter().zip(6u32..) {
            let o = at(name);
            assert_eq!(u32::from_le_bytes(bytes[o..o + 4].try_into().unwrap()), value, "{name}");
        }
    }
}
