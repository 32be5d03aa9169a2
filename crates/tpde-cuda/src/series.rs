//! Stepping through a checkpoint series on the GPU (spec/SERIES.md): a worker
//! that holds one step in device memory reaches a later one by applying, in
//! place, the deltas of the chain between them, each step's rebuilt chunks
//! checked against their digests before the next is applied.

use std::sync::Arc;

use cudarc::driver::CudaSlice;
use tpde::{check_link, content_step, DeltaFile, Error, ErrorCode, Series, StepKind};

use crate::delta::tensor_refs;
use crate::error::Result;
use crate::pipeline::Loader;

/// Brings `bufs`, which hold step `from` of `series` (one buffer per tensor, in
/// the order of the series' deltas), to step `to` by applying in place the
/// deltas of `to`'s chain that come after `from`. Each step file is checked
/// against the digest the manifest pins before it is read, and each delta's
/// base against the target that the step before it records
/// ([`check_link`]), before anything is written; each applied step's rebuilt
/// chunks are checked against their digests ([`crate::LoaderConfig`]'s
/// `verify_digests`). So the base of every delta after the first is a checked
/// one, and a worker that holds `from`'s target as checked when it was loaded
/// needs no hashing of its buffers. Returns the number of deltas applied.
///
/// # Errors
/// `E_SERIES_STEP` when `from` is not on the chain of `to` (a keyframe between
/// them, or another branch: load `to` from its keyframe instead), any series
/// or format error of the step files, and any error of
/// [`Loader::apply_in_place`]. On an error, `bufs` may hold a partly applied
/// step.
pub fn step_in_place(
    loader: &mut Loader,
    series: &Series,
    from: u64,
    to: u64,
    bufs: &mut [CudaSlice<u8>],
) -> Result<usize> {
    let manifest = series.manifest();
    let from = content_step(manifest.entry(from)?);
    let chain = manifest.chain(to)?;
    let Some(at) = chain.iter().position(|e| e.step == from) else {
        let why = format!("step {from} is not on the chain of step {to}; load step {to} from its keyframe");
        return Err(Error::new(ErrorCode::SeriesStep, why).into());
    };
    let deltas = &chain[at + 1..];
    // What `bufs` hold, by the header of the step file that rebuilt it: read
    // for its target digests only, so its bytes are not hashed.
    // Each file serves as the position reference of the next, where that one
    // codes positions against it (spec §8.3).
    let mut earlier = Arc::new(DeltaFile::open(&series.root().join(chain[at].file.as_deref().unwrap_or_default()))?);
    for (before, entry) in chain[at..].iter().zip(deltas) {
        debug_assert_eq!(entry.kind, StepKind::Delta, "a chain holds deltas after its keyframe");
        let mut file = series.open_step_file(entry)?;
        if file.header().position_reference.is_some() {
            if earlier.header().position_reference.is_some() && earlier.position_reference().is_none() {
                // the held step's file, opened above without its own reference
                earlier = Arc::new(series.open_step_with_reference(before)?);
            }
            file = file.with_position_reference(Arc::clone(&earlier))?;
        }
        check_link(&earlier, &file)?;
        let refs = tensor_refs(&file, true)?;
        loader.apply_in_place(&refs, bufs)?;
        earlier = Arc::new(file);
    }
    Ok(deltas.len())
}
