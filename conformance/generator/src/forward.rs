//! `forward-compat/`: what a reader does with files from later versions. Unknown
//! optional feature bits, unknown namespaced extension keys and higher minor
//! versions are read as if absent; unknown required feature bits and other major
//! versions are refused; format 1.1's feature bit 1 is read wherever it is set
//! (spec §3, §5.4).

use rand::Rng;
use serde_json::json;

use crate::invalid::{BASE, SOURCE};
use crate::model::{at, put, reseal, Model};
use crate::suite::Suite;

const EXPECTED: &str = "valid/mixed/expected.json";

/// Writes every forward-compatibility case.
pub fn generate(suite: &mut Suite) {
    let good = suite.read(SOURCE);
    let target = suite.scratch("mixed-target.safetensors");
    let p = |what: &str| format!("generator forward::{what}");

    let mut bytes = good.clone();
    put(&mut bytes, at::OPTIONAL, &u64::MAX.to_le_bytes());
    reseal(&mut bytes);
    suite.write("forward-compat/unknown-optional-feature-bits.tpde", &bytes);
    suite.accept(
        "unknown-optional-feature-bits",
        "forward-compat/unknown-optional-feature-bits.tpde",
        Some(BASE),
        EXPECTED,
        &target,
        "§3",
        &p("optional_bits"),
    );

    let mut model = Model::parse(&good);
    let mut header = model.header();
    header
        .extensions
        .insert("org.example.future".into(), json!({ "level": 3, "notes": ["ignored by 1.0 readers"] }).into());
    model.set_header(&header);
    suite.write("forward-compat/unknown-extension-key.tpde", &model.to_bytes());
    suite.accept(
        "unknown-extension-key",
        "forward-compat/unknown-extension-key.tpde",
        Some(BASE),
        EXPECTED,
        &target,
        "§5.4",
        &p("extension_key"),
    );

    let mut bytes = good.clone();
    put(&mut bytes, at::MINOR, &7u16.to_le_bytes());
    reseal(&mut bytes);
    suite.write("forward-compat/higher-minor-version.tpde", &bytes);
    suite.accept(
        "higher-minor-version",
        "forward-compat/higher-minor-version.tpde",
        Some(BASE),
        EXPECTED,
        &target,
        "§3",
        &p("minor_version"),
    );

    // Format 1.1's required bit 1 (`rans-lanes`) in a file without codec 2: it
    // allows lane rANS streams without requiring any, so a 1.1 reader accepts it;
    // set among the optional bits, it means nothing (§3).
    for (case, offset, why) in [
        ("rans-lanes-bit-without-rans-streams", at::REQUIRED, "required_rans_bit"),
        ("rans-lanes-bit-as-optional", at::OPTIONAL, "optional_rans_bit"),
    ] {
        let mut bytes = good.clone();
        put(&mut bytes, offset, &2u64.to_le_bytes());
        put(&mut bytes, at::MINOR, &1u16.to_le_bytes());
        reseal(&mut bytes);
        let path = format!("forward-compat/{case}.tpde");
        suite.write(&path, &bytes);
        suite.accept(case, &path, Some(BASE), EXPECTED, &target, "§3", &p(why));
    }

    let mut bytes = good.clone();
    put(&mut bytes, at::REQUIRED, &(1u64 << 63).to_le_bytes());
    reseal(&mut bytes);
    suite.write("forward-compat/unknown-required-feature-bit.tpde", &bytes);
    suite.reject(
        "unknown-required-feature-bit",
        "forward-compat/unknown-required-feature-bit.tpde",
        Some(BASE),
        "E_UNKNOWN_REQUIRED_FEATURE",
        "§3",
        &p("required_bit"),
    );

    let mut bytes = good.clone();
    put(&mut bytes, at::MAJOR, &2u16.to_le_bytes());
    reseal(&mut bytes);
    suite.write("forward-compat/major-version-2.tpde", &bytes);
    suite.reject(
        "major-version-2",
        "forward-compat/major-version-2.tpde",
        Some(BASE),
        "E_UNSUPPORTED_VERSION",
        "§3",
        &p("major_version"),
    );

    // A later major may lay out everything after the version differently: the
    // version is judged before any checksum.
    let mut r = crate::valid::rng("major-version-2-new-layout");
    let mut bytes = good[..at::MINOR].to_vec();
    put(&mut bytes, at::MAJOR, &2u16.to_le_bytes());
    bytes.extend((0..500).map(|_| r.gen::<u8>()));
    suite.write("forward-compat/major-version-2-new-layout.tpde", &bytes);
    suite.reject(
        "major-version-2-new-layout",
        "forward-compat/major-version-2-new-layout.tpde",
        Some(BASE),
        "E_UNSUPPORTED_VERSION",
        "§3",
        &p("major_version"),
    );

    // A later major's preamble may be shorter than 128 bytes: the version is judged
    // as soon as its two bytes are there, before the preamble's length (§11.1 O3).
    let mut bytes = good[..64].to_vec();
    put(&mut bytes, at::MAJOR, &2u16.to_le_bytes());
    suite.write("forward-compat/major-version-2-short-preamble.tpde", &bytes);
    suite.reject(
        "major-version-2-short-preamble",
        "forward-compat/major-version-2-short-preamble.tpde",
        Some(BASE),
        "E_UNSUPPORTED_VERSION",
        "§11.1",
        &p("major_version"),
    );
}
