//! Format 1.2: position coding 3, positions split by those of a reference delta
//! (spec §8.3). A chain of three steps written by the library's writer, each
//! delta against the previous one, a chunk forged to take its reference set from a
//! dense chunk, and one fault per check of §8.3, §11.1 H7, C4 and §11.2 R0, each
//! derived from the second step by changing one thing.

use tpde::{format::Header, Checkpoint, DeltaFile, EncodeOptions, NoProgress};

use crate::forge::{settings_1_0, WRITER};
use crate::model::{put, Model};
use crate::safet;
use crate::suite::Suite;
use crate::valid::{nudge, random_tensor, rng};
use crate::words;

const DIR: &str = "valid/temporal-positions";
const SPEC: &str = "§8.3";

/// Words that change in each step, per 64-word chunk of `w`; chunk 0 of step 2
/// keeps 9 of the 12 words of step 1 and adds 2, so that `|R| = 12 > m = 11`.
const W_STEP1: [&[usize]; 2] = [&[1, 4, 6, 9, 13, 17, 20, 26, 31, 40, 47, 55], &[0, 5, 10, 15, 20, 25, 30, 35, 40]];
const W_STEP2: [&[usize]; 2] = [&[1, 2, 4, 6, 9, 13, 17, 40, 47, 55, 60], &[0, 5, 10, 15, 20, 25, 30, 35, 40]];
const W_STEP3: [&[usize]; 2] = [&[1, 2, 4, 6, 9, 13, 17, 40, 47, 60], &[0, 5, 10, 15, 20, 25, 30, 35, 41]];
/// Words of `d` that change in step 2; in step 1 every word changes (a dense chunk).
const D_STEP2: &[usize] = &[3, 30];

fn in_w(chunks: [&[usize]; 2]) -> Vec<usize> {
    chunks.iter().enumerate().flat_map(|(c, words)| words.iter().map(move |&p| 64 * c + p)).collect()
}

/// Where checkpoint `i` of the chain is: the last one is no case's base, so it
/// stays outside the suite.
fn step_path(suite: &Suite, i: usize) -> std::path::PathBuf {
    if i < 3 {
        suite.path(&format!("{DIR}/step-{i}.safetensors"))
    } else {
        suite.scratch("temporal-step-3.safetensors")
    }
}

pub fn generate(suite: &mut Suite) {
    let mut r = rng("temporal-positions");
    let w0 = random_tensor(&mut r, "w", "BF16", &[2, 64]);
    let d0 = random_tensor(&mut r, "d", "BF16", &[64]);
    let all: Vec<usize> = (0..64).collect();
    let w1 = nudge(&w0, &in_w(W_STEP1));
    let d1 = nudge(&d0, &all);
    let w2 = nudge(&w1, &in_w(W_STEP2));
    let d2 = nudge(&d1, D_STEP2);
    let w3 = nudge(&w2, &in_w(W_STEP3));
    let steps = [vec![w0, d0], vec![w1, d1], vec![w2, d2.clone()], vec![w3, d2]];
    for (i, tensors) in steps.iter().enumerate() {
        let path = step_path(suite, i);
        std::fs::create_dir_all(path.parent().expect("a folder")).expect("create a folder");
        std::fs::write(path, safet::file(tensors, None).0).expect("write a step");
    }
    let options = EncodeOptions { chunk_words: 64, settings: settings_1_0() };
    let mut reference: Option<std::sync::Arc<DeltaFile>> = None;
    #[allow(clippy::needless_range_loop)] // `i` names files and steps alike
    for i in 1..=3 {
        let base = Checkpoint::open(&step_path(suite, i - 1)).expect("opens");
        let target = Checkpoint::open(&step_path(suite, i)).expect("opens");
        let delta = format!("{DIR}/delta-{i}.tpde");
        let path = suite.path(&delta);
        tpde::encode_sources_against(Some(&base), &target, &path, options, true, reference.as_deref(), &NoProgress)
            .expect("encodes");
        let mut model = Model::parse(&std::fs::read(&path).expect("read"));
        let mut header = model.header();
        header.writer = WRITER.to_owned();
        model.set_header(&header);
        std::fs::write(&path, model.to_bytes()).expect("write");
        let expected = format!("{DIR}/expected-{i}.json");
        suite.write_expected(&expected, &delta, &steps[i]);
        let refs: Vec<String> = (1..i).rev().map(|j| format!("{DIR}/delta-{j}.tpde")).collect();
        let refs: Vec<&str> = refs.iter().map(String::as_str).collect();
        let base_rel = format!("{DIR}/step-{}.safetensors", i - 1);
        let provenance = format!("generator temporal::generate step {i}");
        suite.with_references(
            &format!("temporal-step-{i}"),
            &delta,
            &base_rel,
            &refs,
            Ok(&expected),
            SPEC,
            &provenance,
        );
        let mut file = DeltaFile::open(&path).expect("opens");
        if let Some(own) = reference.take() {
            file = file.with_position_reference(own).expect("its reference");
        }
        reference = Some(std::sync::Arc::new(file));
    }
    let step2 = Model::parse(&suite.read(&format!("{DIR}/delta-2.tpde")));
    let first = |name: &str| {
        let header = step2.header();
        usize::try_from(header.tensors.iter().find(|t| t.name == name).expect("a tensor").first_chunk).expect("small")
    };
    let (w, d) = (first("w"), first("d"));
    assert_eq!(step2.parts[w].record[23], 3, "chunk 0 of w uses coding 3");
    assert_eq!(Model::parse(&suite.read(&format!("{DIR}/delta-1.tpde"))).parts[d].record[20], 2, "d is dense");
    dense_reference(suite, &step2, d);
    faults(suite, &step2, w);
}

/// Replaces the position streams of `chunk` by coding 3 with stored streams: the
/// reference bitmap and gap planes of width 1 (as given, so that faults can be
/// forged).
fn set_split(model: &mut Model, chunk: usize, bitmap: &[u8], gaps: &[u64]) {
    let part = &mut model.parts[chunk];
    let old = match (part.record[23], part.record[24]) {
        (1, g) => usize::from(g),
        (3, g) => 1 + usize::from(g),
        _ => 1,
    };
    let values: Vec<[u8; 16]> = part.streams[old..].to_vec();
    let value_bytes: usize = (old..part.streams.len()).map(|q| part.stream_data(q).len()).sum();
    let value_data = part.data[part.data.len() - value_bytes..].to_vec();
    let plane = words::gap_planes(gaps, 1).remove(0);
    let stored = |len: usize| {
        let mut r = [0u8; 16];
        put(&mut r, 0, &u32::try_from(len).expect("small").to_le_bytes());
        put(&mut r, 4, &u32::try_from(len).expect("small").to_le_bytes());
        r
    };
    part.streams = vec![stored(bitmap.len()), stored(plane.len())];
    part.streams.extend(values);
    part.data = [bitmap, &plane, &value_data].concat();
    part.record[23] = 3;
    part.record[24] = 1;
    model.relayout();
}

/// Bit `j` set for each `j` with `marked(reference[j])`.
fn bitmap_over(reference: &[usize], marked: &[usize]) -> Vec<u8> {
    let mut out = vec![0u8; reference.len().div_ceil(8)];
    for (j, r) in reference.iter().enumerate() {
        if marked.contains(r) {
            out[j / 8] |= 1 << (j % 8);
        }
    }
    out
}

/// Step 2 with the chunk of `d`, whose reference chunk is dense (R = every word),
/// forged into coding 3: a valid file the library's writer does not choose.
fn dense_reference(suite: &mut Suite, step2: &Model, d: usize) {
    let mut model = step2.clone();
    let all: Vec<usize> = (0..64).collect();
    set_split(&mut model, d, &bitmap_over(&all, D_STEP2), &[]);
    let rel = format!("{DIR}/delta-2-dense-reference.tpde");
    suite.write(&rel, &model.to_bytes());
    let refs = [format!("{DIR}/delta-1.tpde")];
    suite.with_references(
        "temporal-reference-dense",
        &rel,
        &format!("{DIR}/step-1.safetensors"),
        &[refs[0].as_str()],
        Ok(&format!("{DIR}/expected-2.json")),
        SPEC,
        "generator temporal::dense_reference",
    );
}

fn faults(suite: &mut Suite, step2: &Model, w: usize) {
    let reference = W_STEP1[0];
    let base = format!("{DIR}/step-1.safetensors");
    let delta1 = format!("{DIR}/delta-1.tpde");
    let delta2 = format!("{DIR}/delta-2.tpde");
    let delta3 = format!("{DIR}/delta-3.tpde");
    let provenance = "generator temporal::faults";
    // R0: no reference, and a reference that is not the pinned file.
    suite.with_references(
        "temporal-reference-required",
        &delta2,
        &base,
        &[],
        Err("E_REFERENCE_REQUIRED"),
        "§11.2",
        provenance,
    );
    suite.with_references(
        "temporal-reference-mismatch",
        &delta2,
        &base,
        &[delta3.as_str()],
        Err("E_REFERENCE_MISMATCH"),
        "§11.2",
        provenance,
    );

    // Chunk 0 of w: R = W_STEP1[0] (12 words), positions W_STEP2[0]; the ranks of
    // 2 and 60 in the complement are 1 and 48: gaps 1 and 47.
    let good_bitmap = bitmap_over(reference, W_STEP2[0]);
    let mut cases: Vec<(&str, &str, Model)> = Vec::new();
    let mut forged = |id: &'static str, code: &'static str, bitmap: &[u8], gaps: &[u64]| {
        let mut model = step2.clone();
        set_split(&mut model, w, bitmap, gaps);
        cases.push((id, code, model));
    };
    forged("temporal-bitmap-length", "E_STREAM_LENGTH", &good_bitmap[..1], &[1, 47]);
    let mut padded = good_bitmap.clone();
    padded[1] |= 0x80;
    forged("temporal-bitmap-padding-bit", "E_POSITIONS_OUT_OF_BOUNDS", &padded, &[1, 47]);
    forged("temporal-bitmap-more-than-changed-count", "E_CHANGED_COUNT", &[0xff, 0x0f], &[1, 47]);
    forged("temporal-gap-plane-length", "E_STREAM_LENGTH", &good_bitmap, &[1, 48, 1]);
    forged("temporal-zero-gap", "E_POSITIONS_NOT_INCREASING", &good_bitmap, &[1, 0]);
    forged("temporal-rank-past-complement", "E_POSITIONS_OUT_OF_BOUNDS", &good_bitmap, &[1, 51]);

    // H7 and C4: the feature bit without the pin, and coding 3 without either.
    let mut no_bit = step2.clone();
    no_bit.preamble[16] &= !0x4;
    cases.push(("temporal-pin-without-feature-bit", "E_HEADER_INVALID", no_bit.clone()));
    let mut header: Header = no_bit.header();
    header.position_reference = None;
    no_bit.set_header(&header);
    cases.push(("temporal-coding-3-without-feature-bit", "E_CHUNK_MAP_INVALID", no_bit));

    for (id, code, model) in cases {
        let rel = format!("invalid/{id}.tpde");
        suite.write(&rel, &model.to_bytes());
        let spec = if code == "E_HEADER_INVALID" || code == "E_CHUNK_MAP_INVALID" { "§11.1" } else { SPEC };
        suite.with_references(id, &rel, &base, &[delta1.as_str()], Err(code), spec, provenance);
    }
}
