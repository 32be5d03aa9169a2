//! Full decode: reseal the input's checksums (so that mutations reach the checks
//! behind them), open it, check the base and rebuild every tensor against a fixed
//! small base (the base of the golden case `mixed`). Any input must give a clean
//! error or a rebuilt target whose every digest matched, never a panic or a huge
//! allocation. Unsealed inputs are the `open` target's.
//!
//! An input that pins a position reference (format 1.2, position coding 3) is
//! decoded with the golden reference delta `valid/temporal-positions/delta-1.tpde`
//! and against that chain's base, so that mutations of the golden second step
//! reach the decoding of coding 3; when the pin does not match it, the input is
//! decoded without a reference.
#![no_main]

mod common;
mod reseal;

use std::sync::{Arc, OnceLock};

use libfuzzer_sys::fuzz_target;
use tpde::{verify, Checkpoint, DeltaFile, NoProgress};

static BASE_BYTES: &[u8] = include_bytes!("../../valid/mixed/base.safetensors");
static TEMPORAL_BASE_BYTES: &[u8] = include_bytes!("../../valid/temporal-positions/step-1.safetensors");
static REFERENCE_BYTES: &[u8] = include_bytes!("../../valid/temporal-positions/delta-1.tpde");

fn checkpoint(cell: &'static OnceLock<Checkpoint>, name: &str, bytes: &[u8]) -> &'static Checkpoint {
    cell.get_or_init(|| {
        let path = common::scratch().join(name);
        std::fs::write(&path, bytes).expect("write the base");
        Checkpoint::open(&path).expect("the golden base opens")
    })
}

fn base() -> &'static Checkpoint {
    static BASE: OnceLock<Checkpoint> = OnceLock::new();
    checkpoint(&BASE, "base.safetensors", BASE_BYTES)
}

fn temporal_base() -> &'static Checkpoint {
    static BASE: OnceLock<Checkpoint> = OnceLock::new();
    checkpoint(&BASE, "temporal-base.safetensors", TEMPORAL_BASE_BYTES)
}

fn reference() -> Arc<DeltaFile> {
    static REFERENCE: OnceLock<Arc<DeltaFile>> = OnceLock::new();
    Arc::clone(REFERENCE.get_or_init(|| {
        let path = common::scratch().join("reference.tpde");
        std::fs::write(&path, REFERENCE_BYTES).expect("write the reference");
        Arc::new(DeltaFile::open(&path).expect("the golden reference opens"))
    }))
}

fuzz_target!(|data: &[u8]| {
    let mut data = data.to_vec();
    reseal::reseal(&mut data);
    let path = common::delta_path(&data);
    let Ok(delta) = DeltaFile::open(&path) else { return };
    let temporal = delta.header().position_reference.is_some();
    let delta = if temporal {
        match delta.with_position_reference(reference()) {
            Ok(delta) => delta,
            // Another pin: decoded without the reference (E_REFERENCE_REQUIRED).
            Err(_) => match DeltaFile::open(&path) {
                Ok(delta) => delta,
                Err(_) => return,
            },
        }
    } else {
        delta
    };
    let chosen = if temporal { temporal_base() } else { base() };
    let with_base = delta.header().needs_base().then_some(chosen);
    let _ = verify(&delta, with_base, None, &NoProgress);
});
