//! The series manifest parser (spec/SERIES.md §2, §3): any input is refused with
//! `E_SERIES_INVALID` or accepted as a manifest whose every step has a chain that
//! starts at a keyframe, ends at the step, and is no longer than the series.
#![no_main]

use libfuzzer_sys::fuzz_target;
use tpde::{Manifest, StepKind};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    let Ok(manifest) = Manifest::parse(text) else { return };
    for s in &manifest.steps {
        let chain = manifest.chain(s.step).expect("a step of the manifest has a chain");
        assert!(chain.len() <= manifest.steps.len());
        assert_eq!(chain.first().map(|e| e.kind), Some(StepKind::Keyframe));
        assert!(chain.iter().skip(1).all(|e| e.kind == StepKind::Delta));
        if s.kind != StepKind::Same {
            assert_eq!(chain.last().map(|e| e.step), Some(s.step));
        }
    }
});
