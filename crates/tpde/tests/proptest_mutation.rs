//! Any byte of a valid file changed, inserted or cut: the reader gives a clean error
//! or the identical decode, never a panic, a hang or a huge allocation. Mutations
//! are tried as they are (stopped by checksums) and resealed (every checksum
//! recomputed, so that they reach the checks behind the checksums).
//!
//! `PROPTEST_CASES` sets the number of cases per property (default 192).

mod conformance_support;
#[path = "../../../conformance/fuzz/fuzz_targets/reseal.rs"]
mod reseal;

use std::alloc::{GlobalAlloc, Layout, System};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::time::Duration;

use conformance_support::{cases, suite_dir};
use proptest::prelude::*;

/// Records the largest single allocation, to catch allocations sized by a
/// corrupted count.
struct Watch;

static LARGEST: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is passed to the system allocator unchanged.
unsafe impl GlobalAlloc for Watch {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LARGEST.fetch_max(layout.size(), Ordering::Relaxed);
        // SAFETY: the caller's contract is forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        // SAFETY: the caller's contract is forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LARGEST.fetch_max(new_size, Ordering::Relaxed);
        // SAFETY: the caller's contract is forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static WATCH: Watch = Watch;

/// Inputs are at most a few hundred KB; nothing they describe legitimately needs
/// more than this in one piece.
const HUGE: usize = 64 << 20;

/// A valid golden delta, its base and its canonical decode.
struct Golden {
    bytes: Vec<u8>,
    base: Option<std::path::PathBuf>,
    expected: String,
}

fn goldens() -> &'static [Golden] {
    static GOLDENS: std::sync::OnceLock<Vec<Golden>> = std::sync::OnceLock::new();
    GOLDENS.get_or_init(|| {
        let dir = suite_dir();
        cases()
            .into_iter()
            .filter(|c| c.accept && c.known_bug().is_none())
            .map(|c| Golden {
                bytes: std::fs::read(dir.join(&c.path)).expect("read a golden"),
                base: c.base.map(|b| dir.join(b)),
                expected: std::fs::read_to_string(dir.join(c.expected.expect("an accept has one"))).expect("read"),
            })
            .collect()
    })
}

/// Decodes `bytes` on another thread: a panic, a timeout or a huge allocation is a
/// failure; otherwise an error, or the golden's own decode.
fn check(golden: &Golden, bytes: Vec<u8>) -> Result<(), TestCaseError> {
    let dir = tempfile::tempdir().expect("a temp dir");
    let path = dir.path().join("mutated.tpde");
    std::fs::write(&path, &bytes).expect("write");
    let base = golden.base.clone();
    let (send, receive) = mpsc::channel();
    let worker_path = path.clone();
    std::thread::spawn(move || {
        let result =
            std::panic::catch_unwind(AssertUnwindSafe(|| conformance_support::decode(&worker_path, base.as_deref())));
        let _ = send.send(result);
    });
    let outcome =
        receive.recv_timeout(Duration::from_secs(20)).map_err(|_| TestCaseError::fail("decoding hung (20 s)"))?;
    let largest = LARGEST.load(Ordering::Relaxed);
    prop_assert!(largest < HUGE, "an allocation of {largest} bytes");
    match outcome {
        Err(_) => Err(TestCaseError::fail("the reader panicked")),
        Ok(Err(_)) => Ok(()),
        Ok(Ok(decoded)) => {
            prop_assert_eq!(decoded, golden.expected.clone(), "accepted with a different decode");
            Ok(())
        }
    }
}

#[derive(Debug, Clone)]
enum Mutation {
    /// XOR bytes at positions given as fractions of the length.
    Flip(Vec<(f64, u8)>),
    /// Overwrite 8 bytes with an interesting value.
    Word(f64, u64),
    /// Cut the file.
    Truncate(f64),
    /// Insert a byte.
    Insert(f64, u8),
}

fn mutation() -> impl Strategy<Value = Mutation> {
    let interesting = prop_oneof![
        Just(0u64),
        Just(1),
        Just(0xff),
        Just(0xffff),
        Just(u64::from(u32::MAX)),
        Just(u64::MAX),
        Just(1 << 31),
        Just(1 << 63),
        any::<u64>()
    ];
    prop_oneof![
        prop::collection::vec((0.0..1.0f64, 1u8..=255), 1..4).prop_map(Mutation::Flip),
        (0.0..1.0f64, interesting).prop_map(|(at, v)| Mutation::Word(at, v)),
        (0.0..1.0f64).prop_map(Mutation::Truncate),
        (0.0..1.0f64, any::<u8>()).prop_map(|(at, b)| Mutation::Insert(at, b)),
    ]
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss, clippy::cast_precision_loss)]
fn apply(bytes: &[u8], mutation: &Mutation) -> Vec<u8> {
    let at = |f: f64, len: usize| ((f * len as f64) as usize).min(len.saturating_sub(1));
    let mut out = bytes.to_vec();
    match mutation {
        Mutation::Flip(flips) => {
            for &(f, x) in flips {
                let i = at(f, out.len());
                out[i] ^= x;
            }
        }
        Mutation::Word(f, v) => {
            let i = at(*f, out.len().saturating_sub(8));
            out[i..i + 8].copy_from_slice(&v.to_le_bytes());
        }
        Mutation::Truncate(f) => out.truncate(at(*f, out.len())),
        Mutation::Insert(f, b) => out.insert(at(*f, out.len()), *b),
    }
    out
}

fn config() -> ProptestConfig {
    let cases = std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(192);
    ProptestConfig { cases, failure_persistence: None, ..ProptestConfig::default() }
}

proptest! {
    #![proptest_config(config())]

    #[test]
    fn a_mutated_file_is_rejected_cleanly_or_decodes_identically(pick in any::<prop::sample::Index>(), m in mutation()) {
        let golden = &goldens()[pick.index(goldens().len())];
        check(golden, apply(&golden.bytes, &m))?;
    }

    #[test]
    fn a_mutated_and_resealed_file_is_rejected_cleanly_or_decodes_identically(pick in any::<prop::sample::Index>(), m in mutation()) {
        let golden = &goldens()[pick.index(goldens().len())];
        let mut bytes = apply(&golden.bytes, &m);
        reseal::reseal(&mut bytes);
        check(golden, bytes)?;
    }
}
