//! `inspect` (its JSON form) over every accepted golden file. A stale snapshot
//! fails CI (`CI=true` stops insta from writing new ones); review changes with
//! `cargo insta review`.

mod conformance_support;

use conformance_support::{cases, suite_dir};
use tpde::{inspect, DeltaFile};

#[test]
fn inspect_reports_of_the_golden_files() {
    let dir = suite_dir();
    let accepted: Vec<_> = cases()
        .into_iter()
        .filter(|c| c.accept && c.known_bug().is_none() && !c.path.starts_with("regression/"))
        .collect();
    assert!(!accepted.is_empty(), "the suite has accepted cases");
    for case in accepted {
        let delta = DeltaFile::open(&dir.join(&case.path)).unwrap_or_else(|e| panic!("{}: {e}", case.id));
        let report = inspect(&delta).unwrap_or_else(|e| panic!("{}: {e}", case.id));
        insta::assert_json_snapshot!(format!("inspect-{}", case.id), report);
    }
}
