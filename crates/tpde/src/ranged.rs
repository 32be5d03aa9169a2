//! A delta read by byte range from somewhere other than a local file (an object
//! store): its bytes live in a sparse buffer the length of the file, into which the
//! preamble, header and chunk map are read at open, and each chunk's stored bytes
//! before it is decoded. Untouched pages of the buffer cost no memory.

use std::ops::Range;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use memmap2::MmapMut;

use crate::error::{Error, ErrorCode, Result};

/// Receives what [`RangeSource::read_ranges`] reads, piece by piece as it arrives:
/// each piece's place in the object and its bytes.
pub type RangeSink<'a> = dyn Fn(Range<u64>, &[u8]) -> Result<()> + Sync + 'a;

/// Where the bytes of a delta read by range come from: an object in an object
/// store, say. `tpde-store` implements it over the `object_store` crate.
pub trait RangeSource: Send + Sync {
    /// The object's length in bytes, as found when it was opened.
    fn len(&self) -> u64;

    /// Whether the object is empty.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Reads every range of `ranges` (sorted, disjoint, each within
    /// [`RangeSource::len`]), with as many requests in flight as suits the
    /// source, and passes their bytes to `sink` in pieces: the pieces of one range
    /// in order and back to back, ranges in any order and from any thread. The
    /// first error, of the source or of `sink`, ends the read, and `sink` is not
    /// called after this returns.
    ///
    /// # Errors
    /// Whatever the source fails with (`E_REMOTE_*` codes), or `sink`'s error.
    fn read_ranges(&self, ranges: &[Range<u64>], sink: &RangeSink<'_>) -> Result<()>;
}

const ABSENT: u8 = 0;
const FETCHING: u8 = 1;
const RESIDENT: u8 = 2;

/// The largest request that adjacent chunks are merged into: large enough that
/// requests cost little each, small enough that many stay in flight.
pub(crate) const MAX_MERGED_REQUEST: u64 = 8 << 20;

/// The sparse buffer of a delta read by range, and which of its chunks are in it.
///
/// Soundness rests on one discipline: bytes are written only into chunks that this
/// buffer marked `FETCHING` under its lock (so no reference to them exists and no
/// other writer touches them), and references are handed out only to chunks marked
/// `RESIDENT`, which are never written again, or to the metadata written before the
/// buffer was shared, or to the whole buffer once it is frozen (no writes after).
pub(crate) struct SparseBytes {
    /// Keeps the mapping alive; accessed only through `ptr`.
    _map: MmapMut,
    ptr: *mut u8,
    len: usize,
    source: Arc<dyn RangeSource>,
    /// Per chunk: `ABSENT`, `FETCHING` or `RESIDENT`.
    state: Vec<AtomicU8>,
    /// Per chunk: its byte range in the file.
    ranges: Vec<Range<u64>>,
    lock: Mutex<Shared>,
    changed: Condvar,
}

#[derive(Default)]
struct Shared {
    /// Chunks being fetched now.
    fetching: usize,
    /// Set once the whole buffer was lent out: nothing is written after.
    frozen: bool,
}

// SAFETY: `ptr` points into `_map`, owned by this value. Writes through it happen
// only into chunks claimed under `lock` (see the type's docs), so threads never
// write the same bytes, nor bytes that another thread reads.
unsafe impl Send for SparseBytes {}
// SAFETY: as for `Send`; every shared access follows the discipline above.
unsafe impl Sync for SparseBytes {}

impl SparseBytes {
    /// A buffer of `source`'s length, with `metadata` (ranges of the file that are
    /// not chunks: the preamble, header, chunk map, trailer) read into it.
    pub(crate) fn new(source: Arc<dyn RangeSource>) -> Result<Self> {
        let len = usize::try_from(source.len())
            .map_err(|_| Error::new(ErrorCode::OutOfMemory, "the delta does not fit this machine's address space"))?;
        // An anonymous map: pages never touched cost nothing, so a chunk that is
        // never fetched costs no memory.
        // No swap reserved for it either: most of a large delta is never touched.
        let mut map = memmap2::MmapOptions::new().len(len.max(1)).no_reserve_swap().map_anon().map_err(|e| {
            Error::new(
                ErrorCode::OutOfMemory,
                format!("cannot reserve {len} bytes of address space for the delta: {e}"),
            )
        })?;
        // Fetched chunks fill whole pages: huge ones fault 512 times less often.
        #[cfg(target_os = "linux")]
        let _ = map.advise(memmap2::Advice::HugePage);
        let ptr = map.as_mut_ptr();
        Ok(Self {
            _map: map,
            ptr,
            len,
            source,
            state: Vec::new(),
            ranges: Vec::new(),
            lock: Mutex::new(Shared::default()),
            changed: Condvar::new(),
        })
    }

    /// Reads `range` of the file into the buffer, before any chunk is known: only
    /// while the buffer is not yet shared (`&mut self`).
    pub(crate) fn read_metadata(&mut self, range: Range<u64>) -> Result<()> {
        let (ptr, asked) = (self.ptr as usize, range.clone());
        self.source.read_ranges(std::slice::from_ref(&range), &|range, bytes| {
            let start = usize::try_from(range.start).unwrap_or(usize::MAX);
            if range.start < asked.start || range.end > asked.end || bytes.len() as u64 != range.end - range.start {
                return Err(Error::new(ErrorCode::Io, "the object store returned another range than asked for"));
            }
            // SAFETY: the range lies within the buffer (checked above), and the
            // buffer is not shared yet (`&mut self`), so nothing else reads or
            // writes it.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), (ptr as *mut u8).add(start), bytes.len()) };
            Ok(())
        })
    }

    /// The whole buffer, while it is not yet shared: for validating the metadata.
    pub(crate) fn metadata_view(&mut self) -> &[u8] {
        // SAFETY: `&mut self` excludes every other access; the map is `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }

    /// Sets the chunks' byte ranges, once they are validated; empty chunks are
    /// resident from the start.
    pub(crate) fn set_chunks(&mut self, ranges: Vec<Range<u64>>) {
        self.state = ranges.iter().map(|r| AtomicU8::new(if r.is_empty() { RESIDENT } else { ABSENT })).collect();
        self.ranges = ranges;
    }

    fn shared(&self) -> MutexGuard<'_, Shared> {
        // A panic while holding the lock leaves `Shared` consistent: its updates
        // are single assignments.
        self.lock.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether chunk `index` is in the buffer.
    pub(crate) fn is_resident(&self, index: usize) -> bool {
        self.state.get(index).is_some_and(|s| s.load(Ordering::Acquire) == RESIDENT)
    }

    /// The stored bytes of chunk `index`, if they are in the buffer.
    pub(crate) fn chunk(&self, index: usize) -> Option<&[u8]> {
        if !self.is_resident(index) {
            return None;
        }
        let range = &self.ranges[index];
        let (start, len) = (usize::try_from(range.start).ok()?, usize::try_from(range.end - range.start).ok()?);
        // SAFETY: a resident chunk is never written again (the Acquire load above
        // pairs with the Release store after its bytes were copied), and its range
        // was validated to lie within the buffer.
        Some(unsafe { std::slice::from_raw_parts(self.ptr.add(start), len) })
    }

    /// The file's length.
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Bytes of chunks in the buffer.
    pub(crate) fn resident_bytes(&self) -> u64 {
        self.ranges.iter().enumerate().filter(|&(i, _)| self.is_resident(i)).map(|(_, r)| r.end - r.start).sum()
    }

    /// Fetches the chunks of `indices` that are not in the buffer, adjacent ones
    /// merged into one request up to [`MAX_MERGED_REQUEST`], all requests in
    /// flight together (as the source allows). Waits for chunks that another
    /// thread is fetching.
    pub(crate) fn fetch(&self, indices: &[u64]) -> Result<()> {
        let mut wanted = self.not_resident(indices);
        loop {
            let (claimed, waiting) = self.claim(&wanted);
            if !claimed.is_empty() {
                self.fetch_claimed(&claimed)?;
            }
            if !waiting {
                break;
            }
            let mut shared = self.shared();
            while wanted.iter().any(|&i| self.state[i].load(Ordering::Acquire) == FETCHING) {
                shared = self.changed.wait(shared).unwrap_or_else(std::sync::PoisonError::into_inner);
            }
            drop(shared);
            // Chunks that another thread failed to fetch are ABSENT again: claim them.
            wanted.retain(|&i| !self.is_resident(i));
        }
        match wanted.iter().find(|&&i| !self.is_resident(i)) {
            Some(&i) => Err(Error::new(
                ErrorCode::InvalidArgument,
                "the whole delta was lent out (DeltaFile::bytes) before this chunk could be fetched",
            )
            .in_chunk(i as u64)),
            None => Ok(()),
        }
    }

    /// Starts fetching the chunks of `indices` that are neither in the buffer nor
    /// being fetched, on a thread of its own, and returns at once: the read-ahead
    /// of a pipeline, which keeps requests in flight across its batches rather than
    /// waiting for them at the end of each. A chunk that fails to arrive is absent
    /// again, for [`SparseBytes::fetch`] to retry and report.
    pub(crate) fn prefetch(self: &Arc<Self>, indices: &[u64]) {
        let (claimed, _) = self.claim(&self.not_resident(indices));
        if claimed.is_empty() {
            return;
        }
        let this = Arc::clone(self);
        let started = std::thread::Builder::new().name("tpde-read-ahead".into()).spawn({
            let claimed = claimed.clone();
            move || {
                // Failures are retried and reported by whoever needs the chunks.
                let _ = this.fetch_claimed(&claimed);
            }
        });
        if started.is_err() {
            // No thread: the chunks are fetched when they are needed instead.
            self.release(&claimed);
        }
    }

    /// The chunks of `indices` that are not in the buffer, by offset, once each.
    fn not_resident(&self, indices: &[u64]) -> Vec<usize> {
        let mut wanted: Vec<usize> = indices
            .iter()
            .filter_map(|&i| usize::try_from(i).ok())
            .filter(|&i| i < self.state.len() && !self.is_resident(i))
            .collect();
        wanted.sort_unstable_by_key(|&i| self.ranges[i].start);
        wanted.dedup();
        wanted
    }

    /// Marks the absent chunks of `wanted` as `FETCHING` by the caller, who must
    /// then fetch them ([`SparseBytes::fetch_claimed`]); also says whether some
    /// of `wanted` are being fetched by another thread.
    fn claim(&self, wanted: &[usize]) -> (Vec<usize>, bool) {
        let mut claimed = Vec::new();
        let mut waiting = false;
        let mut shared = self.shared();
        for &i in wanted {
            match self.state[i].load(Ordering::Acquire) {
                ABSENT if !shared.frozen => {
                    self.state[i].store(FETCHING, Ordering::Relaxed);
                    claimed.push(i);
                }
                FETCHING => waiting = true,
                _ => {}
            }
        }
        shared.fetching += claimed.len();
        (claimed, waiting)
    }

    /// Marks chunks that were claimed and did not arrive as absent again, and
    /// wakes the threads that wait for them.
    fn release(&self, claimed: &[usize]) {
        let mut shared = self.shared();
        for &i in claimed {
            if self.state[i].load(Ordering::Relaxed) == FETCHING {
                self.state[i].store(ABSENT, Ordering::Relaxed);
            }
        }
        shared.fetching -= claimed.len();
        drop(shared);
        self.changed.notify_all();
    }

    /// Fetches chunks claimed as `FETCHING` by this thread, sorted by offset.
    fn fetch_claimed(&self, claimed: &[usize]) -> Result<()> {
        // Adjacent chunks, merged into requests.
        let mut requests: Vec<(Range<u64>, Vec<usize>)> = Vec::new();
        for &i in claimed {
            let range = self.ranges[i].clone();
            match requests.last_mut() {
                Some((merged, members))
                    if merged.end == range.start && range.end - merged.start <= MAX_MERGED_REQUEST =>
                {
                    merged.end = range.end;
                    members.push(i);
                }
                _ => requests.push((range, vec![i])),
            }
        }
        let ranges: Vec<Range<u64>> = requests.iter().map(|(r, _)| r.clone()).collect();
        // Per request: bytes reserved by a piece (each piece must follow on from
        // these, and is reserved before it is copied, so no two copies overlap),
        // and bytes copied (the copy that completes a request marks its chunks
        // resident, once every copy into them is done).
        let reserved: Vec<AtomicU64> = requests.iter().map(|_| AtomicU64::new(0)).collect();
        let copied: Vec<AtomicU64> = requests.iter().map(|_| AtomicU64::new(0)).collect();
        let result = self.source.read_ranges(&ranges, &|piece, bytes| {
            let k = requests.partition_point(|(r, _)| r.start <= piece.start).wrapping_sub(1);
            let Some((request, members)) = requests.get(k) else {
                return Err(Error::new(ErrorCode::Io, "the object store returned a range that was not asked for"));
            };
            let len = bytes.len() as u64;
            let offset = piece.start - request.start;
            let fits = piece.end <= request.end && len == piece.end - piece.start;
            if !fits || reserved[k].compare_exchange(offset, offset + len, Ordering::AcqRel, Ordering::Relaxed).is_err()
            {
                return Err(Error::new(ErrorCode::Io, "the object store returned another range than asked for"));
            }
            let start = usize::try_from(piece.start).expect("a validated chunk offset");
            // SAFETY: every chunk of this request is FETCHING, claimed by this
            // thread, and stays so until all of the request is copied: no
            // reference to these bytes exists. This piece's bytes were reserved
            // above, so no other copy writes them; it lies within the request, so
            // within the buffer. No copy runs once `freeze` has found no fetch in
            // flight.
            unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.ptr.add(start), bytes.len()) };
            if copied[k].fetch_add(len, Ordering::AcqRel) + len == request.end - request.start {
                for &i in members {
                    self.state[i].store(RESIDENT, Ordering::Release);
                }
            }
            Ok(())
        });
        // Whatever did not arrive is ABSENT again, for another try.
        self.release(claimed);
        result
    }

    /// Fetches every chunk not in the buffer.
    pub(crate) fn fetch_all(&self) -> Result<()> {
        let all: Vec<u64> = (0..self.state.len() as u64).collect();
        self.fetch(&all)
    }

    /// The whole buffer. No chunk is fetched after this: chunks not yet fetched
    /// read as zeros for good.
    pub(crate) fn freeze(&self) -> &[u8] {
        let mut shared = self.shared();
        while shared.fetching > 0 {
            shared = self.changed.wait(shared).unwrap_or_else(std::sync::PoisonError::into_inner);
        }
        shared.frozen = true;
        drop(shared);
        // SAFETY: frozen with no fetch in flight, so nothing writes the buffer any
        // more; the map is `len` bytes.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;

    use super::*;

    /// An object of known bytes that logs its requests, can fail them, and can
    /// hold those for the second chunk until released.
    struct Object {
        bytes: Vec<u8>,
        requests: Mutex<Vec<Range<u64>>>,
        fail: AtomicBool,
        held: Mutex<bool>,
        released: Condvar,
    }

    impl Object {
        fn new(len: usize) -> Arc<Self> {
            Arc::new(Self {
                bytes: (0..len).map(|i| u8::try_from((i * 7 + 3) % 251).unwrap()).collect(),
                requests: Mutex::new(Vec::new()),
                fail: AtomicBool::new(false),
                held: Mutex::new(false),
                released: Condvar::new(),
            })
        }

        fn hold(&self, held: bool) {
            *self.held.lock().unwrap() = held;
            self.released.notify_all();
        }
    }

    impl RangeSource for Object {
        fn len(&self) -> u64 {
            self.bytes.len() as u64
        }

        fn read_ranges(&self, ranges: &[Range<u64>], sink: &RangeSink<'_>) -> Result<()> {
            // Holds only requests for the second chunk (bytes 2000..3000).
            let mut held = self.held.lock().unwrap();
            while *held && ranges.iter().any(|r| r.start == 2000) {
                held = self.released.wait(held).unwrap();
            }
            drop(held);
            self.requests.lock().unwrap().extend(ranges.iter().cloned());
            if self.fail.load(Ordering::Relaxed) {
                return Err(Error::new(ErrorCode::RemoteRetries, "refused"));
            }
            for range in ranges {
                let at = usize::try_from(range.start).unwrap()..usize::try_from(range.end).unwrap();
                sink(range.clone(), &self.bytes[at])?;
            }
            Ok(())
        }
    }

    /// Four chunks of 1000 bytes, apart (so that none merge into one request).
    fn buffer(object: &Arc<Object>) -> Arc<SparseBytes> {
        let mut sparse = SparseBytes::new(object.clone()).unwrap();
        sparse.set_chunks((0..4).map(|k| k * 2000..k * 2000 + 1000).collect());
        Arc::new(sparse)
    }

    #[test]
    fn fetching_waits_for_the_read_ahead_rather_than_asking_again() {
        let object = Object::new(8000);
        let sparse = buffer(&object);
        object.hold(true);
        sparse.prefetch(&[1, 2]);
        let waiter = std::thread::spawn({
            let sparse = sparse.clone();
            move || sparse.fetch(&[1, 2, 3])
        });
        // Chunk 3 arrives at once; 1 and 2 only once the read-ahead is let through.
        while !sparse.is_resident(3) {
            std::thread::yield_now();
        }
        assert!(!sparse.is_resident(1) && !waiter.is_finished());
        object.hold(false);
        waiter.join().unwrap().unwrap();
        for k in 1..4usize {
            assert_eq!(sparse.chunk(k).unwrap(), &object.bytes[k * 2000..k * 2000 + 1000]);
        }
        let mut requests = object.requests.lock().unwrap().clone();
        requests.sort_by_key(|r| r.start);
        assert_eq!(requests, [2000..3000, 4000..5000, 6000..7000], "each chunk is asked for once");
    }

    #[test]
    fn a_failed_read_ahead_is_asked_again_and_its_error_reported_when_needed() {
        let object = Object::new(8000);
        let sparse = buffer(&object);
        object.fail.store(true, Ordering::Relaxed);
        sparse.prefetch(&[0]);
        // The failed read-ahead leaves the chunk absent, and fetching it asks again.
        let error = sparse.fetch(&[0]).unwrap_err();
        assert_eq!(error.code(), ErrorCode::RemoteRetries);
        assert!(!sparse.is_resident(0));
        object.fail.store(false, Ordering::Relaxed);
        sparse.fetch(&[0]).unwrap();
        assert_eq!(sparse.chunk(0).unwrap(), &object.bytes[..1000]);
        assert!(object.requests.lock().unwrap().len() >= 3);
    }
}
