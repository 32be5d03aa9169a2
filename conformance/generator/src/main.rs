//! Writes the tpde conformance suite: `valid/`, `invalid/`, `forward-compat/` and
//! `manifest.json`, byte-identically on every run.
//!
//! ```text
//! cargo run -p tpde-conformance-generator -- conformance/
//! ```
//!
//! Valid cases are written with the library's writer (its encoder, or chunks built
//! from the spec and framed by its `DeltaWriter`), then checked by rebuilding the
//! target with the library. Invalid cases take the valid case `mixed` apart, change
//! exactly one thing and recompute every checksum and digest that covers it, so
//! that a reader reaches the check the case is named after. Entries under
//! `regression/` in an existing manifest are kept.

// Every size here is of a file the generator itself wrote, a few KB at most.
#![allow(clippy::cast_possible_truncation)]

mod constant;
mod forge;
mod forward;
mod invalid;
mod invalid_rans;
mod model;
mod packed_rans;
mod rans;
mod safet;
mod suite;
mod temporal;
mod valid;
mod valid_rans;
mod words;
mod zframe;

use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = match args.as_slice() {
        [] => PathBuf::from("conformance"),
        [dir] if !dir.starts_with('-') => PathBuf::from(dir),
        _ => {
            eprintln!("usage: tpde-conformance-generator [SUITE_DIR]   (default: conformance)");
            return ExitCode::from(2);
        }
    };
    let mut suite = suite::Suite::create(&root);
    valid::generate(&mut suite);
    invalid::generate(&mut suite);
    forward::generate(&mut suite);
    // Format 1.1 (lane rANS), after every case of 1.0 so that those keep their place.
    valid_rans::generate(&mut suite);
    invalid_rans::generate(&mut suite);
    // Format 1.2 (position coding 3).
    temporal::generate(&mut suite);
    // Format 1.3 (constant streams).
    constant::generate(&mut suite);
    // Format 1.4 (packed lane rANS).
    packed_rans::generate(&mut suite);
    let counts = suite.finish();
    eprintln!(
        "wrote {} valid, {} invalid, {} forward-compat cases ({} regression entries kept) to {}",
        counts.valid,
        counts.invalid,
        counts.forward,
        counts.regression,
        root.display()
    );
    ExitCode::SUCCESS
}
