//! GPU loader for tpde deltas: rebuilds `W_final = base ⊕ delta` in GPU memory.
//!
//! Only the delta crosses the bus. Chunks keep the format library's records
//! ([`tpde::format::ChunkRecord`]); their shapes are checked by the
//! library. Streams stored as they are go to the device by DMA straight from
//! a page-locked copy of the delta, and so do lane rANS streams (codec 2,
//! spec §8.7), which the GPU decodes: one block per stream checks its header
//! and parses its tables and tile lengths, then warps decode one tile each,
//! one rANS state per lane, in launches ordered by what each stream's
//! context reads (the plane above, or the base words at the chunk's
//! positions). Constant streams (codec 3, §8.8) are one stored byte, which
//! one launch per batch expands in device memory before anything reads it.
//! Only zstd streams are decoded by the CPU, in parallel, into
//! page-locked staging slots, and so are the positions of position coding 3
//! (temporal positions, §8.3), which need the reference delta's: they reach
//! the kernels as a list of `u32`. The GPU turns gap planes into
//! positions with a prefix sum, joins byte planes into words and combines
//! them with the base words (`spec/FORMAT.md` §8). Values listed grouped by
//! base key (§8.6, which the writer uses for floats where it pays) are found by one
//! stable radix-digit pass per chunk: per tile key histograms, a per chunk
//! scan, and a within-tile rank; keys are read from the base before any of
//! its words is overwritten, so in place works too. The kernels' CPU
//! reference is in [`reference`](mod@reference), and GPU results are
//! bit-exact with it and with the library's decoder.
//!
//! The GPU path enforces what the format library enforces, by calling the
//! library: deltas are validated by [`tpde::DeltaFile`] (in page-locked
//! memory, the very bytes the GPU reads), the base by the library's
//! [`tpde::resolve_base`] before anything is uploaded, zstd
//! streams by its decoder, and stored checksums on the CPU. Lane rANS
//! streams are checked by the kernels with every rule of §8.7 (their faults
//! name their chunk, and are confirmed by the library's decoder where it can
//! decode the stream without the base); position errors and changed counts
//! are checked by the kernels too, and every rebuilt chunk's
//! XXH3-128 leaf digest (§10) is computed on the device and compared with its
//! record unless [`LoaderConfig::verify_digests`] is turned off for trusted
//! files. Format faults carry the library's stable codes
//! ([`GpuError::format_code`]).
//!
//! - [`Gpu`]: a device with the kernels compiled (NVRTC, once per process).
//!   On a machine without CUDA, [`Gpu::new`] returns [`GpuError::NoDriver`].
//! - [`Loader`]: the staging ring and the two APIs: a whole delta onto the
//!   GPU ([`Loader::load`], [`Loader::apply_in_place`],
//!   [`Loader::load_host_base`]) and just-in-time tensors
//!   ([`Loader::materialize_into`], [`Loader::materialize_in_place`]).
//! - The model-level API: a delta and its [`Base`] (a checkpoint, or
//!   named tensors already on the device) in, named device tensors out
//!   ([`Loader::load_model`]).
//! - [`tensor_refs`]: maps a `tpde` delta file onto the loader's inputs, from
//!   its memory map or from page-locked memory ([`PinnedDelta`]).
//! - [`EncodedTensor`]: tensors in memory, encoded by the library's chunk
//!   encoder.
//!
//! Drivers: the crate is built against CUDA 13.0 (`cuda-13000`), so it needs
//! a driver of the 580 series or newer; the driver and NVRTC are loaded at
//! run time, and their absence is an error, not a panic.
//!
//! # The data path, for a newcomer
//!
//! The files below `src/`, in the order a delta's bytes go through them:
//!
//! 1. `delta.rs` (or `encode.rs` for tensors in memory): the delta file,
//!    validated by the format library, becomes the loader's inputs, the
//!    [`TensorRef`]s and [`ChunkRef`]s of `pipeline/inputs.rs`. `model.rs`
//!    does this by name, with the base's checks, for [`Loader::load_model`].
//! 2. `pipeline/mod.rs`: the [`Loader`] entry points check the inputs and
//!    the buffers they are given.
//! 3. `pipeline/plan.rs`: chunks become jobs (a chunk with its base and
//!    output words), the output gets the base words where it needs them,
//!    and each batch of jobs is placed into a staging slot.
//! 4. `pipeline/ring.rs`: each batch takes a slot of the staging ring (the
//!    run began there by resetting the device error flag).
//! 5. `pipeline/host_decode.rs`: zstd streams are decoded by the CPU into
//!    the slot; stored streams and the stored bytes of lane rANS streams
//!    are copied as they are; constant streams take only room in the slot's
//!    device part.
//! 6. `pipeline/launch.rs`: the slot goes to the device and the batch's
//!    kernels run, through the safe wrappers of `gpu.rs` (`rans.rs` plans
//!    the lane rANS launches; `kernels.rs` compiles `kernels/*.cu`).
//!    `pipeline/staged.rs` is the other route through steps 3 to 6: a
//!    [`DeviceDelta`] decoded once (for one resident base, every stream:
//!    [`Loader::stage_for_base`]), then applied with kernels only.
//! 7. `pipeline/ring.rs` again: the slots' streams are joined and the
//!    device error flag is read once; a fault is named by
//!    `pipeline/faults.rs` (tensor, chunk, the library's code, `error.rs`).
//! 8. `pipeline/digests.rs`: every rebuilt chunk's leaf digest is computed
//!    on the device and compared with its record. The apply kernel of a
//!    dense or raw chunk hashes each tile as it writes it (XXH3's per-block
//!    terms), so that the digest pass reads only its last block.
//! 9. The result: the rebuilt tensors in device memory. `reference.rs` is
//!    the kernels' CPU reference, which tests compare them with.
#![deny(missing_docs)]

mod delta;
mod encode;
mod error;
mod gpu;
mod kernels;
mod model;
mod pipeline;
mod rans;
pub mod reference;
mod series;

pub use cudarc;
pub use delta::{host_bases, tensor_ref, tensor_refs, tensor_refs_checked_on_upload, PinnedDelta};
pub use encode::EncodedTensor;
pub use error::{GpuError, Result};
pub use gpu::{driver_present, DevRange, Gpu};
pub use model::{
    check_resident_base, match_resident, Base, DeviceTensor, RebuiltTensor, ResidentTensor, ResidentTensorMut,
};
pub use pipeline::{decode_stream, Checksums, ChunkRef, DeviceDelta, LoadTimings, Loader, LoaderConfig, TensorRef};
pub use series::step_in_place;
/// The width of a word, shared with the format library.
pub use tpde::WordWidth;
