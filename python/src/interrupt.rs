//! Long work runs on its own thread with the GIL released, while the calling thread
//! polls for signals, so that Ctrl-C stops it: the pipelines then stop between
//! batches of chunks and remove what they had begun to write.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pyo3::prelude::*;
use tpde::Progress;

use crate::errors::{invalid_argument, Fault};

/// How often the calling thread looks for signals while the work runs.
const SIGNAL_POLL: Duration = Duration::from_millis(50);

/// Worker threads per core at most, as the command line allows.
const MAX_THREADS_PER_CORE: usize = 4;

/// Progress that reports nothing and says when Python asked to stop.
#[derive(Default)]
pub struct Interrupt(AtomicBool);

impl Progress for Interrupt {
    fn phase(&self, _: &str, _: u64) {}
    fn advance(&self, _: u64) {}
    fn interrupted(&self) -> bool {
        self.0.load(Ordering::Relaxed)
    }
}

/// A pool of `threads` workers, or `None` for rayon's global pool (one per core).
fn thread_pool(threads: Option<usize>) -> PyResult<Option<rayon::ThreadPool>> {
    let Some(n) = threads else { return Ok(None) };
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    let max = cores.saturating_mul(MAX_THREADS_PER_CORE);
    if !(1..=max).contains(&n) {
        return Err(invalid_argument(format!(
            "threads={n} is not in 1..={max} ({MAX_THREADS_PER_CORE} per core, {cores} cores)"
        )));
    }
    rayon::ThreadPoolBuilder::new()
        .num_threads(n)
        .build()
        .map(Some)
        .map_err(|e| invalid_argument(format!("cannot start {n} threads: {e}")))
}

/// Runs `work` on `threads` workers with the GIL released. On a signal (Ctrl-C),
/// asks the work to stop, waits for it, and raises what the signal handler raised
/// (`KeyboardInterrupt`).
pub fn run_interruptible<T: Send>(
    py: Python<'_>,
    threads: Option<usize>,
    work: impl FnOnce(&Interrupt) -> tpde::Result<T> + Send,
) -> PyResult<T> {
    run_interruptible_with(py, threads, work)
}

/// [`run_interruptible`] for work that fails with another error than the
/// library's (the GPU loader's).
pub fn run_interruptible_with<T: Send, E: Fault>(
    py: Python<'_>,
    threads: Option<usize>,
    work: impl FnOnce(&Interrupt) -> Result<T, E> + Send,
) -> PyResult<T> {
    let pool = thread_pool(threads)?;
    let interrupt = Interrupt::default();
    let finished = AtomicBool::new(false);
    let caller = std::thread::current();
    std::thread::scope(|scope| {
        let (interrupt, finished) = (&interrupt, &finished);
        let worker = scope.spawn(move || {
            let result = match &pool {
                Some(pool) => pool.install(|| work(interrupt)),
                None => work(interrupt),
            };
            finished.store(true, Ordering::Release);
            caller.unpark();
            result
        });
        loop {
            // A panicking worker never sets `finished`; `is_finished` covers it.
            if finished.load(Ordering::Acquire) || worker.is_finished() {
                break;
            }
            py.detach(|| std::thread::park_timeout(SIGNAL_POLL));
            if finished.load(Ordering::Acquire) {
                break; // done: a signal now is Python's to handle, after the result
            }
            if let Err(signal) = py.check_signals() {
                interrupt.0.store(true, Ordering::Relaxed);
                // The work stops at its next check and cleans up; its result is moot.
                let _ = py.detach(|| worker.join());
                return Err(signal);
            }
        }
        match py.detach(|| worker.join()) {
            Ok(result) => result.map_err(Fault::into_py),
            Err(panic) => std::panic::resume_unwind(panic),
        }
    })
}
