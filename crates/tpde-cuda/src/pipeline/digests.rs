//! Leaf digest checks (spec §10): every rebuilt chunk's XXH3-128 digest,
//! computed on the device and compared with its record.

use std::collections::{HashMap, HashSet};

use cudarc::driver::CudaSlice;
use tpde::{
    format::{ChunkRecord, Digest128},
    ErrorCode,
};

use super::inputs::TensorRef;
use super::Loader;
use crate::error::{GpuError, Result};
use crate::gpu::{Batch, DevRange, LeafBatch};
use crate::kernels::{ChunkDesc, LEAF_TERM_BYTES_PER_BLOCK};

/// A rebuilt chunk whose leaf digest is checked: its bytes on the device,
/// the digest its record states, the names an error gives, and whether its
/// apply kernel hashes it as it writes it ([`ChunkDesc::hashes_as_written`]).
pub(super) struct LeafCheck<'t> {
    pub(super) out: DevRange,
    pub(super) digest: Digest128,
    pub(super) tensor: &'t str,
    pub(super) chunk: u64,
    pub(super) hashed_by_apply: bool,
}

/// Whether the apply kernel of a chunk of `words` words hashes it as it
/// writes it.
pub(super) fn hashed_by_apply(record: &ChunkRecord, words: u32) -> bool {
    ChunkDesc::from_record(record, words).is_some_and(|d| d.hashes_as_written())
}

/// The leaf checks of every chunk of a tensor rebuilt into `out`.
pub(super) fn leaf_checks<'t>(t: &'t TensorRef<'_>, out: DevRange, checks: &mut Vec<LeafCheck<'t>>) -> Result<()> {
    let w = t.width.bytes();
    let mut off = 0usize;
    for (k, c) in t.chunks.iter().enumerate() {
        let n = c.words as usize * w;
        let chunk = t.first_chunk + k as u64;
        checks.push(LeafCheck {
            out: out.sub(off, n)?,
            digest: c.record.digest,
            tensor: &t.name,
            chunk,
            hashed_by_apply: hashed_by_apply(&c.record, c.words),
        });
        off += n;
    }
    Ok(())
}

/// Term rows (1 KiB blocks of input) of the leaf digest scratch: 1 GiB of
/// rebuilt bytes per pair of launches, 64 MiB of device memory. Each pair
/// costs a whole chunk's sequential fold whatever it holds, so fewer, larger
/// pairs check a large model faster. The largest chunk, 2^27 bytes (spec §11,
/// `chunk_words` ≤ 2^24 of ≤ 8 bytes), takes 2^17 rows, so every chunk fits
/// alone.
pub(super) const LEAF_SCRATCH_BLOCKS: u64 = 1 << 20;

/// Device buffers of the leaf digest check, allocated with the loader (the
/// term scratch) or on first need and only ever grown (table and digests),
/// then reused by every call.
pub(super) struct LeafScratch {
    /// Pass 1's block terms: [`LEAF_SCRATCH_BLOCKS`] rows of 8 `u64`.
    pub(super) terms: CudaSlice<u64>,
    /// `LeafDesc` tables of every batch of a call, one after the other.
    pub(super) table: CudaSlice<u8>,
    /// Two `u64` per checked chunk.
    pub(super) digests: CudaSlice<u64>,
}

/// The leaf digest passes of one call: their descriptor tables are on the
/// device before the call's kernels run, so that the passes follow the
/// rebuild on the main stream with no host work between, and one
/// synchronization ends the call.
pub(super) struct LeafPass {
    batches: Vec<LeafBatch>,
    checked: usize,
}

/// Term rows that the apply kernels fill instead of the digest's first pass
/// (a dense chunk's kernel writes every word of a tile, and hashes it while
/// it is in L2): those of the first leaf batch's chunks that their kernels
/// hash, by the device address of the chunk's bytes, and the chunks whose
/// kernels were given theirs. Set by each call; rows of the later batches
/// share the same scratch, which their own first pass writes.
#[derive(Debug, Default)]
pub(super) struct TermRows {
    rows: HashMap<u64, u64>,
    given: HashSet<u64>,
}

impl TermRows {
    /// Gives every chunk of `batch` that has a row its row.
    pub(super) fn give(&mut self, batch: &mut Batch) {
        if !self.rows.is_empty() {
            batch.give_term_rows(&self.rows, &mut self.given);
        }
    }
}

impl Loader {
    /// Uploads the descriptor tables of `checks` on the main stream and sets
    /// the term rows that the apply kernels fill ([`TermRows`]). `None` when
    /// the caller opted out of digests or nothing is checked.
    pub(super) fn prepare_leaves(&mut self, checks: &[LeafCheck<'_>]) -> Result<Option<LeafPass>> {
        let Some(leaf) = self.leaf.as_mut().filter(|_| self.cfg.verify_digests && !checks.is_empty()) else {
            return Ok(None);
        };
        let terms = DevRange::all(&leaf.terms, self.gpu.stream())?.ptr();
        let mut batches = vec![LeafBatch::default()];
        for c in checks {
            let blocks = LeafBatch::blocks_of(c.out.len());
            if blocks > LEAF_SCRATCH_BLOCKS {
                return Err(GpuError::invalid("chunk larger than the leaf digest scratch"));
            }
            if batches.last().is_some_and(|b| b.blocks() + blocks > LEAF_SCRATCH_BLOCKS) {
                batches.push(LeafBatch::default());
            }
            let by_apply = c.hashed_by_apply && blocks > 0 && batches.len() == 1;
            if let Some(b) = batches.last_mut() {
                let row = b.push(c.out, by_apply);
                let at = terms + row * LEAF_TERM_BYTES_PER_BLOCK as u64;
                if by_apply && self.term_rows.rows.insert(c.out.ptr(), at).is_some() {
                    return Err(GpuError::invalid("two leaf checks of the same bytes"));
                }
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
        // From pageable memory the driver stages the bytes at once, so the
        // table may be dropped when this returns.
        self.gpu.stream().memcpy_htod(&table, &mut leaf.table.slice_mut(..table_bytes))?;
        Ok(Some(LeafPass { batches, checked: checks.len() }))
    }

    /// Launches the two passes of every batch on the main stream, behind
    /// whatever the main stream already waits for.
    pub(super) fn launch_leaves(&self, pass: &LeafPass) -> Result<()> {
        let Some(leaf) = self.leaf.as_ref() else {
            return Err(GpuError::invalid("leaf digest pass without its scratch"));
        };
        let main = self.gpu.stream().clone();
        let (table_all, terms, digests_all) = (
            DevRange::all(&leaf.table, &main)?,
            DevRange::all(&leaf.terms, &main)?,
            DevRange::all(&leaf.digests, &main)?,
        );
        let (mut table_at, mut first) = (0, 0);
        for b in &pass.batches {
            let t = table_all.sub(table_at, b.table_bytes())?;
            let o = digests_all.sub(16 * first, 16 * b.len())?;
            self.gpu.launch_leaves(&main, b, t, terms, o)?;
            table_at += b.table_bytes();
            first += b.len();
        }
        Ok(())
    }

    /// Compares the digests that the passes computed with the chunks'
    /// records, once the main stream has finished them; a mismatch is the
    /// library's `E_CHUNK_DIGEST`, naming the first such chunk.
    pub(super) fn compare_leaves(&mut self, pass: &LeafPass, checks: &[LeafCheck<'_>]) -> Result<()> {
        let Some(leaf) = self.leaf.as_ref().filter(|_| pass.checked == checks.len()) else {
            return Err(GpuError::invalid("leaf digest pass and checks differ"));
        };
        // Every row that the first pass skipped was given to an apply kernel.
        if self.term_rows.given.len() != self.term_rows.rows.len() {
            return Err(GpuError::invalid("a chunk's leaf digest terms were left to an apply kernel that did not run"));
        }
        self.timings.hashed_by_apply = self.term_rows.given.len();
        let leaves = self.gpu.stream().clone_dtoh(&leaf.digests.slice(..2 * checks.len()))?;
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
