//! Staging shared by the GPU benchmarks: encoded tensors whose stored bytes sit in
//! page-locked memory, as a host-resident delta does.

use tpde_cuda::cudarc::driver::PinnedHostSlice;
use tpde_cuda::encode::EncodedTensor;
use tpde_cuda::{Gpu, TensorRef};

/// The examples' error type.
pub type R<T> = Result<T, Box<dyn std::error::Error>>;

/// Every chunk's stored bytes of `enc`, back to back in page-locked memory.
pub fn pin_all(gpu: &Gpu, enc: &[EncodedTensor]) -> R<PinnedHostSlice<u8>> {
    let total: usize = enc.iter().map(EncodedTensor::stored_bytes).sum();
    // SAFETY: every byte is written below before any use.
    let mut host = unsafe { gpu.context().alloc_pinned_with_flags::<u8>(total.max(1), 0) }?;
    let dst = host.as_mut_slice()?;
    let mut at = 0;
    for c in enc.iter().flat_map(|t| &t.chunks) {
        dst[at..at + c.data.len()].copy_from_slice(&c.data);
        at += c.data.len();
    }
    Ok(host)
}

/// Views of `enc` whose stored bytes are read from `host` ([`pin_all`]).
pub fn hosted<'a>(enc: &'a [EncodedTensor], host: &'a [u8]) -> Vec<TensorRef<'a>> {
    let mut at = 0;
    enc.iter()
        .map(|t| {
            let mut r = t.as_ref();
            for c in &mut r.chunks {
                c.stored = &host[at..at + c.stored.len()];
                at += c.stored.len();
            }
            r.host = Some(host);
            r
        })
        .collect()
}
