//! `apply_chain`: a chain of deltas rebuilds its last target chunk by chunk, byte
//! for byte what applying the deltas one by one gives, and a chain whose links do
//! not follow one another is refused before anything is written.

use std::path::{Path, PathBuf};

use tpde::{apply, apply_chain, chain_cut_alike, encode, Checkpoint, DeltaFile, EncodeOptions, ErrorCode, NoProgress};

mod safetensors_support;
use safetensors_support::{safetensors, Tensor};

/// Seeded F32 words: `seed` picks the run, `moved` how many words in a thousand
/// differ from seed 0's.
fn words(n: usize, moved: u64, seed: u64) -> Vec<u8> {
    let mut state = 0x2545_F491_4F6C_DD1D_u64;
    let mut changes = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .flat_map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            changes ^= changes << 13;
            changes ^= changes >> 7;
            changes ^= changes << 17;
            let bump = u32::from(seed > 0 && changes % 1000 < moved);
            (0x3F80_0000 | (u32::try_from(state >> 41).expect("23 bits")) ^ bump).to_le_bytes()
        })
        .collect()
}

fn tensor(name: &str, n: usize, moved: u64, seed: u64) -> Tensor {
    Tensor { name: name.to_owned(), dtype: "F32", shape: vec![n as u64], bytes: words(n, moved, seed) }
}

fn write(dir: &Path, name: &str, tensors: &[Tensor]) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, safetensors(tensors)).expect("write a checkpoint");
    path
}

fn options(chunk_words: u64) -> EncodeOptions {
    EncodeOptions { chunk_words, ..EncodeOptions::default() }
}

fn delta(dir: &Path, name: &str, base: Option<&Path>, target: &Path, chunk_words: u64) -> DeltaFile {
    let path = dir.join(name);
    let base = base.map(|b| Checkpoint::open(b).expect("opens"));
    let target = Checkpoint::open(target).expect("opens");
    encode(base.as_ref(), &target, &path, options(chunk_words), &NoProgress).expect("encodes");
    DeltaFile::open(&path).expect("opens")
}

/// Three steps: the second changes words, grows one tensor by more than a chunk
/// and adds one; the third changes words again, shrinks the grown tensor and
/// drops one.
fn steps(dir: &Path) -> [PathBuf; 3] {
    let a =
        write(dir, "a.safetensors", &[tensor("w", 5000, 0, 0), tensor("grows", 700, 0, 0), tensor("goes", 300, 0, 0)]);
    let b = write(
        dir,
        "b.safetensors",
        &[tensor("w", 5000, 30, 1), tensor("grows", 3000, 30, 1), tensor("goes", 300, 30, 1), tensor("new", 90, 0, 5)],
    );
    let c =
        write(dir, "c.safetensors", &[tensor("w", 5000, 60, 2), tensor("grows", 1500, 60, 2), tensor("new", 90, 9, 6)]);
    [a, b, c]
}

#[test]
fn a_chain_rebuilds_its_last_target_byte_for_byte() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let [a, b, c] = steps(dir.path());
    let keyframe = delta(dir.path(), "k.tpde", None, &a, 1024);
    let first = delta(dir.path(), "ab.tpde", Some(&a), &b, 1024);
    let second = delta(dir.path(), "bc.tpde", Some(&b), &c, 1024);
    let expected = std::fs::read(&c).expect("read");
    // from a keyframe, through two deltas
    let chain = [keyframe, first, second];
    assert!(chain_cut_alike(&chain));
    let out = dir.path().join("from-keyframe.safetensors");
    apply_chain(&chain, None, &out, Default::default(), &NoProgress).expect("the chain applies");
    assert!(std::fs::read(&out).expect("read") == expected, "the chain's target differs");
    // from a checkpoint, through the same two deltas
    let [_, first, second] = chain;
    let out = dir.path().join("from-base.safetensors");
    let base = Checkpoint::open(&a).expect("opens");
    let chain = [first, second];
    apply_chain(&chain, Some(&base), &out, Default::default(), &NoProgress).expect("the chain applies");
    assert!(std::fs::read(&out).expect("read") == expected, "the chain's target differs");
    // and a chain of one is `apply`
    let out_one = dir.path().join("one.safetensors");
    let out_apply = dir.path().join("apply.safetensors");
    apply_chain(&chain[..1], Some(&base), &out_one, Default::default(), &NoProgress).expect("applies");
    apply(&chain[0], Some(&base), &out_apply, Default::default(), &NoProgress).expect("applies");
    assert_eq!(std::fs::read(&out_one).expect("read"), std::fs::read(&b).expect("read"));
    assert_eq!(std::fs::read(&out_apply).expect("read"), std::fs::read(&b).expect("read"));
}

#[test]
fn a_chain_whose_links_do_not_follow_is_refused_before_writing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let [a, b, c] = steps(dir.path());
    let out = dir.path().join("out.safetensors");
    // the second delta is against b, but the keyframe rebuilds a
    let skipped = [delta(dir.path(), "k.tpde", None, &a, 1024), delta(dir.path(), "bc.tpde", Some(&b), &c, 1024)];
    assert!(chain_cut_alike(&skipped), "cut alike, but not linked");
    let err = apply_chain(&skipped, None, &out, Default::default(), &NoProgress).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BaseMismatch, "{err}");
    assert_eq!(err.file(), Some(skipped[0].path()), "the error names the earlier delta: {err}");
    assert!(!out.exists(), "nothing is written");
    // same shapes, other content: the digests differ
    let a2 = write(
        dir.path(),
        "a2.safetensors",
        &[tensor("w", 5000, 30, 7), tensor("grows", 700, 0, 0), tensor("goes", 300, 0, 0)],
    );
    let wrong = [delta(dir.path(), "k2.tpde", None, &a2, 1024), delta(dir.path(), "ab.tpde", Some(&a), &b, 1024)];
    let err = apply_chain(&wrong, None, &out, Default::default(), &NoProgress).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BaseDigest, "{err}");
    assert_eq!(err.tensor(), Some("w"));
    assert!(!out.exists(), "nothing is written");
    // deltas cut into chunks of other sizes do not link
    let resized = [delta(dir.path(), "k3.tpde", None, &a, 1024), delta(dir.path(), "ab512.tpde", Some(&a), &b, 512)];
    assert!(!chain_cut_alike(&resized));
    let err = apply_chain(&resized, None, &out, Default::default(), &NoProgress).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BaseMismatch, "{err}");
    assert!(!out.exists(), "nothing is written");
    assert_eq!(
        apply_chain(&[], None, &out, Default::default(), &NoProgress).unwrap_err().code(),
        ErrorCode::InvalidArgument
    );
}
