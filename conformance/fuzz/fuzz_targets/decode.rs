//! Full decode: reseal the input's checksums (so that mutations reach the checks
//! behind them), open it, check the base and rebuild every tensor against a fixed
//! small base (the base of the golden case `mixed`). Any input must give a clean
//! error or a rebuilt target whose every digest matched, never a panic or a huge
//! allocation. Unsealed inputs are the `open` target's.
#![no_main]

mod common;
mod reseal;

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use tpde::{verify, NoProgress, Checkpoint, DeltaFile};

static BASE_BYTES: &[u8] = include_bytes!("../../valid/mixed/base.safetensors");

fn base() -> &'static Checkpoint {
    static BASE: OnceLock<Checkpoint> = OnceLock::new();
    BASE.get_or_init(|| {
        let path = common::scratch().join("base.safetensors");
        std::fs::write(&path, BASE_BYTES).expect("write the base");
        Checkpoint::open(&path).expect("the golden base opens")
    })
}

fuzz_target!(|data: &[u8]| {
    let base = base();
    let mut data = data.to_vec();
    reseal::reseal(&mut data);
    let path = common::delta_path(&data);
    if let Ok(delta) = DeltaFile::open(&path) {
        let with_base = delta.header().needs_base().then_some(base);
        let _ = verify(&delta, with_base, None, &NoProgress);
    }
});
