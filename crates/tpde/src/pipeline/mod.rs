//! Whole-checkpoint operations: encode, apply, verify and inspect. Each streams
//! tensor by tensor and chunk by chunk, so memory stays bounded whatever the
//! checkpoint's size; decoding stays within
//! [`crate::limits::DECODE_MEMORY_BUDGET`] whatever the thread count.

pub mod apply;
pub mod encode;
pub mod inspect;
pub mod subset;

/// Receives progress of long operations, in bytes of target data.
pub trait Progress: Sync {
    /// A new phase begins, covering `total` bytes.
    fn phase(&self, label: &str, total: u64);
    /// `bytes` more bytes are done.
    fn advance(&self, bytes: u64);
    /// Whether the caller wants the work to stop, asked between batches of chunks:
    /// a caller that cannot use signals (a Python binding's Ctrl-C) stops it here.
    fn interrupted(&self) -> bool {
        false
    }
    /// `E_INTERRUPTED` once [`Progress::interrupted`] says so.
    ///
    /// # Errors
    /// `E_INTERRUPTED`.
    fn check_interrupted(&self) -> crate::Result<()> {
        if self.interrupted() {
            return Err(crate::Error::new(crate::ErrorCode::Interrupted, "the caller stopped the work"));
        }
        Ok(())
    }
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

/// Cuts a run of chunks into consecutive batches of at most [`window`] chunks whose
/// costs sum to at most `limit`; a chunk that alone costs more than `limit` gets a
/// batch of its own.
pub(crate) fn batches(costs: &[u64], limit: u64) -> Vec<std::ops::Range<usize>> {
    let window = window();
    let mut out = Vec::new();
    let mut start = 0;
    let mut sum = 0u64;
    for (i, &cost) in costs.iter().enumerate() {
        if i > start && (i - start == window || sum.saturating_add(cost) > limit) {
            out.push(start..i);
            start = i;
            sum = 0;
        }
        sum = sum.saturating_add(cost);
    }
    if start < costs.len() {
        out.push(start..costs.len());
    }
    out
}

/// A count of bytes in use against a limit, shared by the threads that decode and
/// the thread that writes. A counter under a mutex, because the standard library
/// has no semaphore and rayon's pool has none that waits by weight.
pub(crate) struct MemoryBudget {
    limit: u64,
    state: std::sync::Mutex<BudgetState>,
    freed: std::sync::Condvar,
}

#[derive(Default)]
struct BudgetState {
    used: u64,
    closed: bool,
}

impl MemoryBudget {
    pub(crate) fn new(limit: u64) -> Self {
        Self { limit, state: std::sync::Mutex::default(), freed: std::sync::Condvar::new() }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, BudgetState> {
        // The state stays consistent even if a holder panicked: it is two plain fields.
        self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Waits until `bytes` more fit the limit (or nothing is in use, for a request
    /// larger than the limit), then counts them. Returns `false`, counting nothing,
    /// once the budget is closed.
    pub(crate) fn acquire(&self, bytes: u64) -> bool {
        let mut state = self.lock();
        while !state.closed && state.used > 0 && state.used.saturating_add(bytes) > self.limit {
            state = self.freed.wait(state).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        if state.closed {
            return false;
        }
        state.used += bytes;
        true
    }

    /// Counts `bytes` if they fit the limit now (or nothing is in use), without
    /// waiting; returns whether it did. A closed budget counts nothing.
    pub(crate) fn try_acquire(&self, bytes: u64) -> bool {
        let mut state = self.lock();
        let fits = !state.closed && (state.used == 0 || state.used.saturating_add(bytes) <= self.limit);
        if fits {
            state.used += bytes;
        }
        fits
    }

    /// Counts `bytes` as free again.
    pub(crate) fn release(&self, bytes: u64) {
        let mut state = self.lock();
        state.used = state.used.saturating_sub(bytes);
        drop(state);
        self.freed.notify_all();
    }

    /// Wakes every waiter for good: the consumer that frees memory has stopped.
    pub(crate) fn close(&self) {
        self.lock().closed = true;
        self.freed.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_stay_within_the_limit_and_cover_every_chunk() {
        let costs = [300, 300, 100, 900, 0, 0];
        let cut = batches(&costs, 512);
        assert_eq!(cut, vec![0..1, 1..3, 3..4, 4..6]);
        for range in &cut {
            let sum: u64 = costs[range.clone()].iter().sum();
            assert!(sum <= 512 || range.len() == 1, "{range:?}");
        }
        // Free chunks are still cut into windows, so the writer is fed as they come.
        let free = vec![0; window() * 2 + 1];
        assert_eq!(batches(&free, 512).len(), 3);
    }

    #[test]
    fn a_closed_budget_wakes_its_waiters() {
        let budget = MemoryBudget::new(512);
        assert!(budget.acquire(400));
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| budget.acquire(200));
            budget.close();
            assert!(!waiter.join().unwrap(), "a waiter gets no memory once the budget is closed");
        });
    }

    #[test]
    fn released_memory_admits_the_next_request() {
        let budget = MemoryBudget::new(512);
        assert!(budget.acquire(400));
        std::thread::scope(|scope| {
            let waiter = scope.spawn(|| budget.acquire(200));
            budget.release(400);
            assert!(waiter.join().unwrap());
        });
        // A request above the limit is admitted alone once nothing is in use.
        budget.release(200);
        assert!(budget.acquire(1000));
    }
}
