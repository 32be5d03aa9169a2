//! Ignored header JSON is skipped, not built (spec §5.4, §9): opening a delta whose
//! header holds a large value that readers ignore allocates at most a small multiple
//! of the header's size. Memory is counted by a global allocator, so the bound is
//! exact and does not depend on timing or on the machine.

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};

use tpde::{
    format::{align_up, checksum64, trailer_bytes, Layout, Preamble, PREAMBLE_LEN},
    DeltaFile, ErrorCode,
};

/// Counts live and peak heap bytes.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);
static PEAK: AtomicUsize = AtomicUsize::new(0);

// SAFETY: every call is forwarded to the system allocator unchanged; the counters
// are only bookkeeping.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let ptr = unsafe { System.alloc(layout) };
        if !ptr.is_null() {
            let live = LIVE.fetch_add(layout.size(), Ordering::Relaxed) + layout.size();
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        ptr
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: the caller's contract is the system allocator's.
        unsafe { System.dealloc(ptr, layout) };
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        // SAFETY: the caller's contract is the system allocator's.
        let new = unsafe { System.realloc(ptr, layout, new_size) };
        if !new.is_null() {
            LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
            let live = LIVE.fetch_add(new_size, Ordering::Relaxed) + new_size;
            PEAK.fetch_max(live, Ordering::Relaxed);
        }
        new
    }
}

#[global_allocator]
static ALLOCATOR: Counting = Counting;

/// Tests run on several threads; each holds this throughout, so that it counts
/// only its own allocations.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn alone() -> std::sync::MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The golden delta `valid/mixed` with its header replaced by `edit(header)`, every
/// length and checksum recomputed.
fn reheadered(edit: impl FnOnce(&str) -> String) -> Vec<u8> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../conformance/valid/mixed/delta.tpde");
    let file = std::fs::read(path).expect("the golden file");
    let old = Preamble::parse(&file).expect("a valid preamble");
    let at = |n: u64| usize::try_from(n).expect("small");
    let layout = Layout::from_counts(old.data_len, old.header_len, old.chunk_count, old.stream_count).expect("fits");
    let header = std::str::from_utf8(&file[at(layout.header_offset)..at(layout.header_offset + layout.header_len)])
        .expect("UTF-8");
    let tables = &file[at(layout.table_offset)..at(layout.trailer_offset)];
    let new_header = edit(header).into_bytes();
    let preamble = Preamble { header_len: new_header.len() as u64, header_checksum: checksum64(&new_header), ..old };
    let new = Layout::from_counts(old.data_len, preamble.header_len, old.chunk_count, old.stream_count).expect("fits");
    let mut out = preamble.to_bytes().to_vec();
    out.extend_from_slice(&file[PREAMBLE_LEN..at(layout.data_offset + layout.data_len)]);
    out.resize(at(new.header_offset), 0);
    out.extend_from_slice(&new_header);
    out.resize(at(align_up(new.header_offset + new.header_len).expect("fits")), 0);
    out.extend_from_slice(tables);
    out.extend_from_slice(&trailer_bytes(new.file_len));
    assert_eq!(out.len() as u64, new.file_len);
    out
}

/// Opens `bytes` and returns the result and the peak heap bytes allocated above
/// what was live before.
fn open_counting(bytes: Vec<u8>) -> (tpde::Result<DeltaFile>, usize) {
    let before = LIVE.load(Ordering::Relaxed);
    PEAK.store(before, Ordering::Relaxed);
    let result = DeltaFile::from_bytes(Path::new("hostile.tpde"), bytes);
    (result, PEAK.load(Ordering::Relaxed) - before)
}

const HEADER_BYTES: usize = 8 << 20;

#[test]
fn ignored_extension_array_is_not_built() {
    let _alone = alone();
    let bytes = reheadered(|h| {
        let zeros = "0,".repeat(HEADER_BYTES / 2);
        format!("{{\"extensions\":{{\"org.example.big\":[{zeros}0]}},{}", &h[1..])
    });
    let (result, peak) = open_counting(bytes);
    let delta = result.expect("an ignored extension is accepted");
    assert_eq!(delta.header().extensions.len(), 1);
    // Before: one 32-byte value per element, about 32 times the header.
    assert!(peak < 3 * HEADER_BYTES, "opening allocated {peak} bytes for a {HEADER_BYTES}-byte header");
}

#[test]
fn ignored_extension_object_of_many_keys_is_not_built() {
    let _alone = alone();
    let bytes = reheadered(|h| {
        let keys: Vec<String> = (0..HEADER_BYTES / 12).map(|i| format!("\"{i:x}\":0")).collect();
        format!("{{\"extensions\":{{\"org.example.keys\":{{{}}}}},{}", keys.join(","), &h[1..])
    });
    let len = bytes.len();
    let (result, peak) = open_counting(bytes);
    result.expect("an ignored extension is accepted");
    // Each key is kept once to find repeats (about 6 times its text); before, the
    // whole object was built as well (about 11 times).
    assert!(peak < 8 * len, "opening allocated {peak} bytes for a {len}-byte file");
}

#[test]
fn long_writer_string_costs_about_its_size() {
    let _alone = alone();
    let bytes = reheadered(|h| {
        let (_, rest) = h.split_once("\"target\":").expect("a target member");
        format!("{{\"writer\":\"{}\",\"target\":{rest}", "w".repeat(HEADER_BYTES))
    });
    let (result, peak) = open_counting(bytes);
    result.expect("any writer string is accepted");
    assert!(peak < 3 * HEADER_BYTES, "opening allocated {peak} bytes for a {HEADER_BYTES}-byte writer");
}

#[test]
fn duplicate_key_inside_an_ignored_value_is_still_refused() {
    let _alone = alone();
    // Spec §5.1 rule 3 holds inside extensions, also after unescaping.
    for dup in [r#"{"a":1,"a":2}"#, r#"[{"a":1,"\u0061":2}]"#] {
        let bytes = reheadered(|h| format!("{{\"extensions\":{{\"org.example.d\":{dup}}},{}", &h[1..]));
        let (result, _) = open_counting(bytes);
        assert_eq!(result.expect_err("refused").code(), ErrorCode::DuplicateKey);
    }
}
