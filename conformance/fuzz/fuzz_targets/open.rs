//! Header and chunk-map parsing: `DeltaFile::open` and `inspect` on any bytes must
//! return a clean error or a file whose chunk map is consistent, never panic.
#![no_main]

mod common;

use libfuzzer_sys::fuzz_target;
use tpde::{inspect, DeltaFile};

fuzz_target!(|data: &[u8]| {
    let path = common::delta_path(data);
    if let Ok(delta) = DeltaFile::open(&path) {
        let _ = inspect(&delta);
    }
});
