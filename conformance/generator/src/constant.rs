//! `valid/constant-*` and `invalid/constant-*`: files of format 1.3 whose streams
//! use the constant codec (spec §8.8), each stream forged from the spec. The
//! faults change one stream (or the feature bits) of `constant-streams` and
//! recompute every checksum that covers it.

use tpde::format::{Encoding, ValueLayout};

use crate::forge::{Entry, Force, Store};
use crate::model::{at, put, reseal, Model};
use crate::rans::Ctx;
use crate::safet::Tensor;
use crate::suite::Suite;
use crate::valid::{bases, forged_as, nudge, random_tensor, rng};

const SPEC: &str = "§8.8";

/// The valid case whose bytes the faults change.
const SOURCE: &str = "valid/constant-streams/delta.tpde";
/// Its base.
const BASE: &str = "valid/constant-streams/base.safetensors";
/// Chunk 3 of `constant-streams`: `c`, raw, one constant stream of `0x5A`.
const RAW_CHUNK: usize = 3;

fn forged(suite: &mut Suite, name: &str, entries: &[Entry]) {
    let provenance = format!("generator constant::{}", name.replace('-', "_"));
    forged_as(suite, name, SPEC, entries, &bases(entries), &provenance);
}

/// Tensors without a base whose streams are constant: `c`, `U8` bytes all `0x5A`
/// (raw, one stream), and `d`, `I64` bytes all `0xFF` (raw, words layout).
fn raw_entries() -> Vec<Entry> {
    let c = Tensor::new("c", "U8", &[24], vec![0x5A; 24]);
    let d = Tensor::new("d", "I64", &[3], vec![0xFF; 24]);
    vec![
        Entry::forced(c, None, 24, &[Force::new(Encoding::Raw).stream(0, Store::Constant)]),
        Entry::forced(d, None, 3, &[Force::new(Encoding::Raw).stream(0, Store::Constant)]),
    ]
}

/// Chunks:
///
/// - 0: `a` (`BF16`, only low bytes changed) dense in byte planes: plane 1
///   constant zero, plane 0 lane rANS on the plane above it, the constant one;
/// - 1: `a` again, plane 0 zstd, plane 1 constant;
/// - 2: `b` (`F32`) sparse, gaps of width 2 under 256 (gap plane 1 constant zero,
///   gap plane 0 lane rANS on it), byte planes: plane 0 stored, planes 1 to 3
///   constant zero;
/// - 3, 4: [`raw_entries`].
fn entries() -> Vec<Entry> {
    let mut r = rng("constant-streams");
    let a_base = random_tensor(&mut r, "a", "BF16", &[4, 16]);
    let a = nudge(&a_base, &(0..64).collect::<Vec<_>>());
    let b_base = random_tensor(&mut r, "b", "F32", &[40]);
    let b = nudge(&b_base, &[1, 6, 9, 30, 33]);
    let planes = Force::new(Encoding::Dense).layout(ValueLayout::BytePlanes);
    let mut entries = vec![
        Entry::forced(
            a,
            Some(a_base),
            32,
            &[
                planes.rans(Ctx::None, Ctx::HigherPlane).stream(1, Store::Constant),
                planes.zstd().stream(1, Store::Constant),
            ],
        ),
        Entry::forced(
            b,
            Some(b_base),
            40,
            &[Force::new(Encoding::Sparse)
                .gap_width(2)
                .layout(ValueLayout::BytePlanes)
                .stream(0, Store::Rans(Ctx::HigherPlane))
                .stream(1, Store::Constant)
                .stream(3, Store::Constant)
                .stream(4, Store::Constant)
                .stream(5, Store::Constant)],
        ),
    ];
    entries.extend(raw_entries());
    entries
}

/// The file's required feature bits and minor version.
pub fn features(suite: &Suite, rel: &str) -> (u64, u16) {
    let model = Model::parse(&suite.read(rel));
    let required = u64::from_le_bytes(model.preamble[at::REQUIRED..at::REQUIRED + 8].try_into().expect("8"));
    let minor = u16::from_le_bytes(model.preamble[at::MINOR..at::MINOR + 2].try_into().expect("2"));
    (required, minor)
}

/// Writes the valid constant-stream cases, then the faults.
pub fn generate(suite: &mut Suite) {
    forged(suite, "constant-streams", &entries());
    assert_eq!(features(suite, SOURCE), (0b1010, 3), "constant-streams: bits 1 and 3, format 1.3");
    // Bit 3 needs no other bit: no lane rANS stream here.
    forged(suite, "constant-without-rans", &raw_entries());
    assert_eq!(features(suite, "valid/constant-without-rans/delta.tpde"), (0b1000, 3), "bit 3 alone");
    faults(suite);
}

fn faults(suite: &mut Suite) {
    let good = suite.read(SOURCE);
    let mut emit = |name: &str, bytes: &[u8], error: &str, spec: &str, provenance: &str| {
        let rel = format!("invalid/{name}.tpde");
        suite.write(&rel, bytes);
        suite.reject(name, &rel, Some(BASE), error, spec, &format!("generator constant::{provenance}"));
    };

    // The feature bit (§3, §11.1 O20): codec 3 in a file without bit 3.
    let mut bytes = good.clone();
    put(&mut bytes, at::REQUIRED, &0b10u64.to_le_bytes());
    reseal(&mut bytes);
    emit("constant-codec-without-feature-bit", &bytes, "E_UNKNOWN_CODEC", "§11.1", "preamble_field");

    // A constant stream's stored length is 1 (C4), whatever its bytes.
    let with_stored = |stored: &[u8]| {
        let mut model = Model::parse(&good);
        model.parts[RAW_CHUNK].set_stream_data(0, stored);
        model.relayout();
        model.to_bytes()
    };
    emit("constant-stored-len-0", &with_stored(&[]), "E_STREAM_LENGTH", SPEC, "stored_len");
    emit("constant-stored-len-2", &with_stored(&[0x5A, 0x5A]), "E_STREAM_LENGTH", SPEC, "stored_len");
    // Another byte decodes, and the chunk's digest catches it.
    emit("constant-wrong-byte", &with_stored(&[0x5B]), "E_CHUNK_DIGEST", "§10", "stored_byte");
}
