//! Whole-checkpoint operations: encode, apply, verify and inspect. Each streams
//! tensor by tensor and chunk by chunk, so memory stays bounded by a window of
//! chunks whatever the checkpoint's size.

pub mod apply;
pub mod encode;
pub mod inspect;

/// Receives progress of long operations, in bytes of target data.
pub trait Progress: Sync {
    /// A new phase begins, covering `total` bytes.
    fn phase(&self, label: &str, total: u64);
    /// `bytes` more bytes are done.
    fn advance(&self, bytes: u64);
}

/// Progress that goes nowhere.
#[derive(Debug, Clone, Copy, Default)]
pub struct NoProgress;

impl Progress for NoProgress {
    fn phase(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
}

/// Chunks decoded or encoded at once: enough to keep every thread busy while the
/// writer drains the previous window, small enough to bound memory.
pub(crate) fn window() -> usize {
    rayon::current_num_threads() * 4
}
