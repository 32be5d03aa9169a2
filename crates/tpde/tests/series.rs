//! Checkpoint series (spec/SERIES.md): runs added step by step come back byte for
//! byte, chains stay within `max_chain`, pruning keeps every kept step
//! rebuildable, and a failed or concurrent change leaves the series as it was.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use tpde::{
    chain_cut_alike,
    format::{MANIFEST_FILE, STEPS_DIR},
    AddOptions, Checkpoint, EncodeOptions, ErrorCode, Manifest, NoProgress, Series, StepKind,
};

mod safetensors_support;
use safetensors_support::{safetensors, Tensor};

/// A small xorshift generator: the tests' data is seeded and reproducible.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// BF16 weights of three tensors, as `u16` words.
fn initial_weights(rng: &mut Rng) -> Vec<Vec<u16>> {
    [3000usize, 1024, 64]
        .iter()
        .map(|&n| (0..n).map(|_| 0x3C00 | u16::try_from(rng.next() % 0x0400).expect("small")).collect())
        .collect()
}

/// One training step: `per_mille` of the words move by a unit or two in the last
/// place.
fn train(weights: &mut [Vec<u16>], rng: &mut Rng, per_mille: u64) {
    for w in weights.iter_mut().flat_map(|t| t.iter_mut()) {
        if rng.next() % 1000 < per_mille {
            *w = w.wrapping_add(1 + u16::try_from(rng.next() % 2).expect("small"));
        }
    }
}

fn tensors(weights: &[Vec<u16>]) -> Vec<Tensor> {
    let names = ["model.embed.weight", "model.layer.0.weight", "model.norm.weight"];
    weights
        .iter()
        .zip(names)
        .map(|(w, name)| Tensor {
            name: name.to_owned(),
            dtype: "BF16",
            shape: vec![w.len() as u64],
            bytes: w.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect()
}

fn write_step(dir: &Path, step: u64, weights: &[Vec<u16>]) -> PathBuf {
    let path = dir.join(format!("step-{step}.safetensors"));
    std::fs::write(&path, safetensors(&tensors(weights))).expect("write a checkpoint");
    path
}

fn options(max_chain: usize) -> AddOptions {
    AddOptions { max_chain, encode: EncodeOptions { chunk_words: 1024, ..EncodeOptions::default() }, temporal: false }
}

/// A run of `steps` steps (every fifth identical to the one before), added to a
/// series at `dir/run`; returns the checkpoints by step.
fn add_run(dir: &Path, steps: u64, max_chain: usize) -> (Series, BTreeMap<u64, PathBuf>) {
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
    let mut weights = initial_weights(&mut rng);
    let mut series = Series::open_or_create(&dir.join("run")).expect("a new series");
    let mut files = BTreeMap::new();
    for k in 0..steps {
        let step = 100 * k;
        if k % 5 != 4 {
            train(&mut weights, &mut rng, 20);
        }
        let path = write_step(dir, step, &weights);
        let added = series.add(&Checkpoint::open(&path).expect("opens"), step, &options(max_chain), &NoProgress);
        let added = added.expect("a step is added");
        assert!(added.depth <= max_chain, "step {step} rebuilds with {} deltas", added.depth);
        if k % 5 == 4 {
            assert_eq!(added.entry.kind, StepKind::Same, "step {step} equals the one before");
            assert_eq!(added.entry.file_bytes, 0);
        }
        files.insert(step, path);
    }
    (series, files)
}

fn assert_every_step_rebuilds(series: &Series, files: &BTreeMap<u64, PathBuf>, out_dir: &Path) {
    for (step, original) in files {
        let out = out_dir.join(format!("rebuilt-{step}.safetensors"));
        series.get(*step, &out, Default::default(), &NoProgress).expect("a step rebuilds");
        let (a, b) = (std::fs::read(&out).expect("read"), std::fs::read(original).expect("read"));
        assert!(a == b, "step {step} differs from the checkpoint that was added");
        std::fs::remove_file(&out).expect("remove");
    }
}

#[test]
fn a_run_added_step_by_step_comes_back_byte_for_byte() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (series, files) = add_run(dir.path(), 12, 3);
    let m = series.manifest();
    assert!(m.steps.iter().any(|s| s.kind == StepKind::Delta), "small steps are stored as deltas");
    for s in &m.steps {
        assert!(m.depth(s.step).expect("a step") <= 3);
    }
    // far smaller than keeping every checkpoint
    let checkpoints: u64 = files.values().map(|p| std::fs::metadata(p).expect("stat").len()).sum();
    assert!(series.stored_bytes() * 3 < checkpoints, "{} of {checkpoints}", series.stored_bytes());
    assert_every_step_rebuilds(&series, &files, dir.path());
    let checked = series.verify(&NoProgress).expect("the series verifies");
    assert_eq!(checked.steps, m.steps.iter().filter(|s| s.kind != StepKind::Same).count());
    assert!(checked.stray_files.is_empty());
    // reopened from disk, it is the same series
    let reopened = Series::open(series.root()).expect("opens");
    assert_eq!(reopened.manifest(), m);
    assert_eq!(
        reopened.get(150, &dir.path().join("x"), Default::default(), &NoProgress).unwrap_err().code(),
        ErrorCode::SeriesStep
    );
}

#[test]
fn the_previous_checkpoint_at_hand_stores_the_same_bytes() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (series, files) = add_run(dir.path(), 4, 10);
    let mut other = Series::open_or_create(&dir.path().join("other")).expect("a new series");
    let mut previous: Option<Checkpoint> = None;
    for (step, path) in &files {
        let ckpt = Checkpoint::open(path).expect("opens");
        match &previous {
            Some(p) => other.add_after(p, &ckpt, *step, &options(10), &NoProgress),
            None => other.add(&ckpt, *step, &options(10), &NoProgress),
        }
        .expect("added");
        previous = Some(ckpt);
    }
    assert_eq!(other.manifest(), series.manifest());
    // a checkpoint that is not the last step's is refused
    let wrong = Checkpoint::open(&files[&0]).expect("opens");
    let next = Checkpoint::open(&files[&300]).expect("opens");
    let err = other.add_after(&wrong, &next, 400, &options(10), &NoProgress).unwrap_err();
    assert_eq!(err.code(), ErrorCode::SeriesDigest);
}

#[test]
fn max_chain_zero_stores_keyframes_only() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (series, files) = add_run(dir.path(), 4, 0);
    assert!(series.manifest().steps.iter().all(|s| s.kind == StepKind::Keyframe));
    assert_every_step_rebuilds(&series, &files, dir.path());
}

#[test]
fn a_sharded_checkpoint_comes_back_as_its_directory() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut rng = Rng(7);
    let mut weights = initial_weights(&mut rng);
    let mut series = Series::open_or_create(&dir.path().join("run")).expect("a new series");
    let mut added = Vec::new();
    for step in [1u64, 2, 3] {
        train(&mut weights, &mut rng, 50);
        let ckpt = dir.path().join(format!("ckpt-{step}"));
        std::fs::create_dir_all(&ckpt).expect("mkdir");
        let t = tensors(&weights);
        std::fs::write(ckpt.join("model-00001-of-00002.safetensors"), safetensors(&t[..2])).expect("write");
        std::fs::write(ckpt.join("model-00002-of-00002.safetensors"), safetensors(&t[2..])).expect("write");
        let index = serde_json::json!({"metadata": {}, "weight_map": {
            "model.embed.weight": "model-00001-of-00002.safetensors",
            "model.layer.0.weight": "model-00001-of-00002.safetensors",
            "model.norm.weight": "model-00002-of-00002.safetensors",
        }});
        std::fs::write(ckpt.join("model.safetensors.index.json"), index.to_string()).expect("write");
        series.add(&Checkpoint::open(&ckpt).expect("opens"), step, &options(10), &NoProgress).expect("added");
        added.push((step, ckpt));
    }
    for (step, ckpt) in added {
        let out = dir.path().join(format!("out-{step}"));
        series.get(step, &out, Default::default(), &NoProgress).expect("rebuilds");
        for name in
            ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "model.safetensors.index.json"]
        {
            let (a, b) = (std::fs::read(out.join(name)).expect("read"), std::fs::read(ckpt.join(name)).expect("read"));
            assert!(a == b, "step {step}: {name} differs");
        }
    }
    series.verify(&NoProgress).expect("verifies");
}

#[test]
fn a_pruned_series_rebuilds_every_kept_step() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (mut series, files) = add_run(dir.path(), 12, 10);
    let keep = |step: u64| step % 300 == 200 || step == 1100;
    let kept: BTreeMap<u64, PathBuf> = files.iter().filter(|(s, _)| keep(**s)).map(|(s, p)| (*s, p.clone())).collect();
    assert_eq!(kept.keys().copied().collect::<Vec<_>>(), [200, 500, 800, 1100]);
    let pruned = series.prune(keep, &options(10), &NoProgress).expect("prunes");
    assert_eq!(pruned.removed.len(), files.len() - kept.len());
    assert!(!pruned.reencoded.is_empty(), "the first kept step lost its keyframe");
    assert_eq!(
        series.manifest().steps.iter().map(|s| s.step).collect::<Vec<_>>(),
        kept.keys().copied().collect::<Vec<_>>()
    );
    assert_every_step_rebuilds(&series, &kept, dir.path());
    let checked = series.verify(&NoProgress).expect("verifies");
    assert!(checked.stray_files.is_empty(), "{:?}", checked.stray_files);
    let out = dir.path().join("gone.safetensors");
    assert_eq!(series.get(0, &out, Default::default(), &NoProgress).unwrap_err().code(), ErrorCode::SeriesStep);
    let none = series.prune(|_| false, &options(10), &NoProgress).unwrap_err();
    assert_eq!(none.code(), ErrorCode::InvalidArgument);
}

#[test]
fn steps_cut_into_other_chunk_sizes_still_rebuild() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let mut rng = Rng(0x5DEE_CE66_D1CE_4E5B);
    let mut weights = initial_weights(&mut rng);
    let mut series = Series::open_or_create(&dir.path().join("run")).expect("a new series");
    let mut files = BTreeMap::new();
    for k in 0..6 {
        train(&mut weights, &mut rng, 20);
        let path = write_step(dir.path(), k, &weights);
        let chunk_words = if k < 3 { 1024 } else { 512 };
        let options = AddOptions {
            max_chain: 10,
            encode: EncodeOptions { chunk_words, ..EncodeOptions::default() },
            temporal: false,
        };
        series.add(&Checkpoint::open(&path).expect("opens"), k, &options, &NoProgress).expect("a step is added");
        files.insert(k, path);
    }
    // the last step's chain crosses the change of chunk size, so its files do
    // not link chunk by chunk and `get` rebuilds it one step at a time
    let chain = series.manifest().chain(5).expect("a step");
    assert!(chain.len() > 3, "the run is one chain: {chain:?}");
    let chain_files: Vec<_> = chain.iter().map(|e| series.open_step_file(e).expect("opens")).collect();
    assert!(!chain_cut_alike(&chain_files));
    assert_every_step_rebuilds(&series, &files, dir.path());
}

#[test]
fn a_failed_add_leaves_the_series_as_it_was() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (mut series, _) = add_run(dir.path(), 3, 10);
    let manifest_path = series.root().join(MANIFEST_FILE);
    let before = std::fs::read(&manifest_path).expect("read");
    let files_before = std::fs::read_dir(series.root().join(STEPS_DIR)).expect("list").count();
    let mut rng = Rng(3);
    let late = write_step(dir.path(), 9999, &initial_weights(&mut rng));
    let ckpt = Checkpoint::open(&late).expect("opens");
    // not later than the last step
    let err = series.add(&ckpt, 200, &options(10), &NoProgress).unwrap_err();
    assert_eq!(err.code(), ErrorCode::SeriesStep);
    // an encoding that fails part way: a chunk size the writer refuses
    let bad = AddOptions {
        max_chain: 10,
        encode: EncodeOptions { chunk_words: 0, ..EncodeOptions::default() },
        temporal: false,
    };
    assert_eq!(series.add(&ckpt, 300, &bad, &NoProgress).unwrap_err().code(), ErrorCode::InvalidArgument);
    assert_eq!(std::fs::read(&manifest_path).expect("read"), before);
    assert_eq!(std::fs::read_dir(series.root().join(STEPS_DIR)).expect("list").count(), files_before);
    let leftovers: Vec<_> = std::fs::read_dir(series.root())
        .expect("list")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with(".tmp"))
        .collect();
    assert!(leftovers.is_empty(), "scratch left behind: {leftovers:?}");
}

#[test]
fn scratch_that_a_killed_writer_left_goes_with_the_next_change() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (mut series, files) = add_run(dir.path(), 2, 10);
    let stale = series.root().join(".tmp-killed");
    std::fs::create_dir_all(stale.join("inner")).expect("mkdir");
    std::fs::write(stale.join("inner/step.safetensors"), b"partial").expect("write");
    let stray = series.root().join(STEPS_DIR).join("00000000000000000999-0000000000000000.tpde");
    std::fs::write(&stray, b"an interrupted rename").expect("write");
    assert_eq!(series.verify(&NoProgress).expect("verifies").stray_files, std::slice::from_ref(&stray));
    let ckpt = Checkpoint::open(&files[&100]).expect("opens");
    series.add(&ckpt, 200, &options(10), &NoProgress).expect("added");
    assert!(!stale.exists() && !stray.exists());
}

#[test]
fn a_changed_step_file_is_detected() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (series, _) = add_run(dir.path(), 3, 10);
    let entry = series.manifest().steps.iter().find(|s| s.kind == StepKind::Delta).expect("a delta").clone();
    let path = series.root().join(entry.file.as_deref().expect("a file"));
    let mut bytes = std::fs::read(&path).expect("read");
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    std::fs::write(&path, bytes).expect("write");
    let out = dir.path().join("out.safetensors");
    let err = series.get(entry.step, &out, Default::default(), &NoProgress).unwrap_err();
    assert!(matches!(err.code(), ErrorCode::SeriesDigest | ErrorCode::BadTrailer), "{err}");
    assert!(!out.exists());
    assert!(series.verify(&NoProgress).is_err());
}

#[test]
fn a_manifest_that_skips_a_link_is_refused_before_writing() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (series, _) = add_run(dir.path(), 4, 10);
    // step 300's delta is against step 200; the manifest now says step 100
    let manifest_path = series.root().join(MANIFEST_FILE);
    let mut manifest = Manifest::read(series.root()).expect("reads");
    let entry = manifest.steps.iter_mut().find(|s| s.step == 300).expect("step 300");
    assert_eq!((entry.kind, entry.reference), (StepKind::Delta, Some(200)), "the run is one chain");
    entry.reference = Some(100);
    std::fs::write(&manifest_path, manifest.to_text()).expect("write");
    let series = Series::open(series.root()).expect("still a valid manifest");
    let out = dir.path().join("out").join("step-300.safetensors");
    std::fs::create_dir(out.parent().expect("a parent")).expect("mkdir");
    let err = series.get(300, &out, Default::default(), &NoProgress).unwrap_err();
    assert_eq!(err.code(), ErrorCode::BaseDigest, "{err}");
    let named = err.file().expect("a file").to_string_lossy().into_owned();
    assert!(named.contains(STEPS_DIR), "the error names the step file whose target differs: {named}");
    let left: Vec<_> = std::fs::read_dir(out.parent().expect("a parent")).expect("list").collect();
    assert!(left.is_empty(), "nothing is written beside the output: {left:?}");
}

#[test]
fn a_manifest_that_is_not_a_series_is_refused() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (series, _) = add_run(dir.path(), 2, 10);
    let path = series.root().join(MANIFEST_FILE);
    let text = std::fs::read_to_string(&path).expect("read");
    let mut m = Manifest::parse(&text).expect("parses");
    m.steps[1].reference = Some(12345);
    std::fs::write(&path, m.to_text()).expect("write");
    assert_eq!(Series::open(series.root()).unwrap_err().code(), ErrorCode::SeriesInvalid);
    // a directory with other files is not made into a series
    let other = dir.path().join("other");
    std::fs::create_dir_all(&other).expect("mkdir");
    std::fs::write(other.join("notes.txt"), "x").expect("write");
    assert_eq!(Series::open_or_create(&other).unwrap_err().code(), ErrorCode::OutputExists);
}

#[cfg(unix)]
#[test]
fn a_series_being_changed_is_busy() {
    use std::os::fd::AsRawFd;
    let dir = tempfile::tempdir().expect("a temp dir");
    let (mut series, files) = add_run(dir.path(), 2, 10);
    let lock = std::fs::File::create(series.root().join(".lock")).expect("open the lock");
    // SAFETY: flock on a valid, open descriptor.
    assert_eq!(unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) }, 0);
    let ckpt = Checkpoint::open(&files[&100]).expect("opens");
    assert_eq!(series.add(&ckpt, 500, &options(10), &NoProgress).unwrap_err().code(), ErrorCode::SeriesBusy);
    drop(lock);
    series.add(&ckpt, 500, &options(10), &NoProgress).expect("added once the lock is gone");
}

/// Steps in which the words that moved in one step tend to move again in the
/// next (a fixed tenth of the words, nine times in ten; others rarely), added with
/// temporal positions: deltas code their positions against the delta before.
fn add_sticky_run(dir: &Path, steps: u64) -> (Series, BTreeMap<u64, PathBuf>) {
    let mut rng = Rng(0x2545_F491_4F6C_DD1D);
    let mut weights = initial_weights(&mut rng);
    let sticky: Vec<Vec<bool>> =
        weights.iter().map(|t| t.iter().map(|_| rng.next().is_multiple_of(10)).collect()).collect();
    let mut series = Series::open_or_create(&dir.join("run")).expect("a new series");
    let options = AddOptions { temporal: true, ..options(10) };
    let mut files = BTreeMap::new();
    for k in 0..steps {
        for (t, marks) in weights.iter_mut().zip(&sticky) {
            for (w, &mark) in t.iter_mut().zip(marks) {
                if rng.next() % 1000 < if mark { 900 } else { 2 } {
                    *w = w.wrapping_add(1);
                }
            }
        }
        let path = write_step(dir, 10 * k, &weights);
        series.add(&Checkpoint::open(&path).expect("opens"), 10 * k, &options, &NoProgress).expect("adds");
        files.insert(10 * k, path);
    }
    (series, files)
}

fn uses_temporal_positions(series: &Series, step: u64) -> bool {
    let entry = series.manifest().steps.iter().find(|s| s.step == step).expect("a step");
    entry.kind == StepKind::Delta && series.open_step_file(entry).expect("opens").header().position_reference.is_some()
}

#[test]
fn a_series_with_temporal_positions_rebuilds_verifies_and_prunes() {
    let dir = tempfile::tempdir().expect("a temp dir");
    let (mut series, files) = add_sticky_run(dir.path(), 6);
    let temporal: Vec<u64> = files.keys().copied().filter(|&s| uses_temporal_positions(&series, s)).collect();
    assert!(!temporal.is_empty(), "no delta uses temporal positions");
    assert_every_step_rebuilds(&series, &files, dir.path());
    series.verify(&NoProgress).expect("verifies");
    // Dropping the step whose file is the next one's reference re-encodes it.
    let dropped = temporal[0] - 10;
    let pruned = series.prune(|s| s != dropped, &options(10), &NoProgress).expect("prunes");
    assert!(pruned.reencoded.contains(&temporal[0]), "{pruned:?}");
    let kept: BTreeMap<u64, PathBuf> = files.into_iter().filter(|(s, _)| *s != dropped).collect();
    assert_every_step_rebuilds(&series, &kept, dir.path());
    series.verify(&NoProgress).expect("verifies");
}
