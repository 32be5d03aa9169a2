//! The series manifest, `series.json` (spec/SERIES.md): every step, what it is
//! stored as, the step it is stored against, and the digests that pin its file and
//! the checkpoint it rebuilds.

use std::collections::BTreeMap;
use std::path::Path;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::checkpoint::{Checkpoint, INDEX_FILE};
use crate::container::header::LayoutKind;
use crate::container::json::check_unique_keys;
use crate::{Error, ErrorCode, Result};

/// The manifest's file name in a series directory.
pub const MANIFEST_FILE: &str = "series.json";
/// The folder of step files in a series directory.
pub const STEPS_DIR: &str = "steps";
/// The series version this crate writes; it reads every `1.x`.
pub const SERIES_VERSION: &str = "1.0";
/// Largest manifest read, in bytes (spec/SERIES.md M1).
pub const MAX_MANIFEST_BYTES: u64 = 1 << 30;
/// Largest step number and byte count: JSON integers that every reader holds
/// exactly (spec/SERIES.md §2).
pub const MAX_JSON_INTEGER: u64 = (1 << 53) - 1;

/// How a step is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum StepKind {
    /// A standalone tpde file: rebuilt without a base.
    Keyframe,
    /// A tpde delta against the checkpoint of `reference`.
    Delta,
    /// No file: the checkpoint is byte for byte the one of `reference`.
    Same,
}

/// One file of a checkpoint, pinned by its SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FileDigest {
    /// The file's name: a shard or the index of a sharded checkpoint; the
    /// informative name of a single file.
    pub name: String,
    /// Its length in bytes.
    pub bytes: u64,
    /// SHA-256 of its bytes, lowercase hex.
    pub sha256: String,
}

/// What a step rebuilds: one safetensors file or a sharded directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CheckpointDigest {
    /// `file` or `sharded`.
    pub kind: LayoutKind,
    /// Its files: the single file, or the shards and the index in name order.
    pub files: Vec<FileDigest>,
}

impl CheckpointDigest {
    /// The digests of an opened checkpoint (SHA-256 of every file, in parallel).
    ///
    /// # Errors
    /// None today; kept fallible for checkpoints read from elsewhere.
    pub fn of(checkpoint: &Checkpoint) -> Result<Self> {
        use rayon::prelude::*;
        let mut files: Vec<FileDigest> = checkpoint
            .files
            .par_iter()
            .map(|f| FileDigest { name: f.name.clone(), bytes: f.bytes().len() as u64, sha256: sha256_hex(f.bytes()) })
            .collect();
        if let Some(index) = &checkpoint.index_json {
            files.push(FileDigest {
                name: INDEX_FILE.to_owned(),
                bytes: index.len() as u64,
                sha256: sha256_hex(index.as_bytes()),
            });
        }
        files.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(Self { kind: checkpoint.kind, files })
    }

    /// Whether two checkpoints hold the same bytes. A single file's name is
    /// informative (spec §11.3) and not compared.
    #[must_use]
    pub fn same_bytes(&self, other: &Self) -> bool {
        self.kind == other.kind
            && self.files.len() == other.files.len()
            && self.files.iter().zip(&other.files).all(|(a, b)| {
                a.bytes == b.bytes && a.sha256 == b.sha256 && (self.kind == LayoutKind::File || a.name == b.name)
            })
    }

    /// Bytes of the checkpoint.
    #[must_use]
    pub fn total_bytes(&self) -> u64 {
        self.files.iter().map(|f| f.bytes).sum()
    }
}

/// One step of a series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StepEntry {
    /// The step number; steps strictly increase through the manifest.
    pub step: u64,
    /// How it is stored.
    pub kind: StepKind,
    /// The earlier step it is stored against (`delta`) or equal to (`same`);
    /// `null` for a keyframe.
    pub reference: Option<u64>,
    /// Its file, relative to the series directory (see [`step_file_name`]);
    /// `null` for `same`.
    pub file: Option<String>,
    /// Length of the file in bytes (0 for `same`).
    pub file_bytes: u64,
    /// SHA-256 of the file, lowercase hex (`null` for `same`).
    pub file_sha256: Option<String>,
    /// The checkpoint the step rebuilds.
    pub checkpoint: CheckpointDigest,
}

/// The manifest of a series.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// `1.0`: a reader of series 1.x reads every 1.x manifest.
    pub series_version: String,
    /// Every step, in increasing step order.
    pub steps: Vec<StepEntry>,
}

impl Default for Manifest {
    fn default() -> Self {
        Self { series_version: SERIES_VERSION.to_owned(), steps: Vec::new() }
    }
}

/// SHA-256 of `bytes` as lowercase hex.
#[must_use]
pub fn sha256_hex(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// The file of a step whose file hashes to `sha256`: the step in 20 digits, so
/// that names sort as steps do, and the start of the digest, so that a step
/// re-encoded by `prune` never overwrites the file that the manifest still names.
#[must_use]
pub fn step_file_name(step: u64, sha256: &str) -> String {
    format!("{STEPS_DIR}/{step:020}-{}.tpde", &sha256[..16.min(sha256.len())])
}

fn invalid(message: impl Into<String>) -> Error {
    Error::new(ErrorCode::SeriesInvalid, message)
}

fn is_digest(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

impl Manifest {
    /// Reads and checks `series.json` of the series at `root`.
    ///
    /// # Errors
    /// `E_IO` when it cannot be read, `E_SERIES_INVALID` when it breaks a rule of
    /// spec/SERIES.md, naming the file.
    pub fn read(root: &Path) -> Result<Self> {
        let path = root.join(MANIFEST_FILE);
        let file = std::fs::File::open(&path).map_err(|e| Error::io(&path, "cannot open the series manifest", e))?;
        let len = file.metadata().map_err(|e| Error::io(&path, "cannot read the series manifest", e))?.len();
        if len > MAX_MANIFEST_BYTES {
            return Err(invalid(format!("the manifest has {len} bytes, more than {MAX_MANIFEST_BYTES}")).in_file(&path));
        }
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, "cannot read the series manifest", e))?;
        Self::parse_bytes(&bytes).map_err(|e| e.in_file(&path))
    }

    /// Parses and checks a manifest's bytes, which must be UTF-8 (M1).
    ///
    /// # Errors
    /// As [`Manifest::parse`].
    pub fn parse_bytes(bytes: &[u8]) -> Result<Self> {
        let text = std::str::from_utf8(bytes).map_err(|e| invalid(format!("the series manifest is not UTF-8: {e}")))?;
        Self::parse(text)
    }

    /// Parses and checks a manifest's text.
    ///
    /// # Errors
    /// `E_SERIES_INVALID` for a duplicate key, a member the schema lacks, or a
    /// broken rule of spec/SERIES.md §3.
    ///
    /// A reader refuses these before it reads any step file.
    pub fn parse(text: &str) -> Result<Self> {
        check_unique_keys(text, "the series manifest").map_err(|e| invalid(e.message()))?;
        let manifest: Self = serde_json::from_str(text).map_err(|e| invalid(format!("the series manifest: {e}")))?;
        manifest.validate()?;
        Ok(manifest)
    }

    /// Checks the rules of spec/SERIES.md §3 (M2 to M8).
    ///
    /// # Errors
    /// `E_SERIES_INVALID`, naming the step.
    pub fn validate(&self) -> Result<()> {
        let major = self.series_version.split('.').next().unwrap_or_default();
        let minor_ok = self.series_version.split('.').nth(1).is_some_and(|m| !m.is_empty());
        if major != "1" || !minor_ok || self.series_version.split('.').count() != 2 {
            return Err(invalid(format!("series version {:?} is not 1.x", self.series_version)));
        }
        let mut kinds: BTreeMap<u64, (StepKind, &CheckpointDigest)> = BTreeMap::new();
        let mut last = None;
        for s in &self.steps {
            let at = |m: String| invalid(format!("step {}: {m}", s.step));
            let too_large = s.step > MAX_JSON_INTEGER
                || s.file_bytes > MAX_JSON_INTEGER
                || s.checkpoint.files.iter().any(|f| f.bytes > MAX_JSON_INTEGER);
            if too_large {
                return Err(at(format!("a step number or length above {MAX_JSON_INTEGER}")));
            }
            if last.is_some_and(|l| s.step <= l) {
                return Err(at("steps must strictly increase".into()));
            }
            last = Some(s.step);
            match (s.kind, s.reference, &s.file, &s.file_sha256) {
                (StepKind::Keyframe, None, Some(file), Some(sha))
                | (StepKind::Delta, Some(_), Some(file), Some(sha)) => {
                    if !is_digest(sha) {
                        return Err(at("file_sha256 is not 64 lowercase hex digits".into()));
                    }
                    if *file != step_file_name(s.step, sha) {
                        return Err(at(format!("its file must be {}", step_file_name(s.step, sha))));
                    }
                }
                (StepKind::Same, Some(_), None, None) if s.file_bytes == 0 => {}
                _ => return Err(at("kind, reference, file, file_bytes and file_sha256 do not agree".into())),
            }
            if let Some(r) = s.reference {
                match kinds.get(&r) {
                    None => return Err(at(format!("reference {r} is not an earlier step"))),
                    Some((StepKind::Same, _)) => return Err(at(format!("reference {r} is itself a same step"))),
                    Some((_, digest)) if s.kind == StepKind::Same && !digest.same_bytes(&s.checkpoint) => {
                        return Err(at(format!("a same step's checkpoint differs from step {r}'s")));
                    }
                    Some(_) => {}
                }
            }
            let c = &s.checkpoint;
            let names_ok = c.files.windows(2).all(|w| w[0].name < w[1].name)
                && c.files
                    .iter()
                    .all(|f| crate::container::header::is_plain_file_name(&f.name) && is_digest(&f.sha256));
            let count_ok = match c.kind {
                LayoutKind::File => c.files.len() == 1,
                LayoutKind::Sharded => c.files.iter().any(|f| f.name == INDEX_FILE),
            };
            if !names_ok || !count_ok {
                return Err(at("its checkpoint's files are not plain, sorted, digested names of its layout".into()));
            }
            kinds.insert(s.step, (s.kind, &s.checkpoint));
        }
        Ok(())
    }

    /// The entry of `step`.
    ///
    /// # Errors
    /// `E_SERIES_STEP` when the series does not hold it.
    pub fn entry(&self, step: u64) -> Result<&StepEntry> {
        self.steps
            .binary_search_by_key(&step, |s| s.step)
            .map(|i| &self.steps[i])
            .map_err(|_| Error::new(ErrorCode::SeriesStep, format!("the series has no step {step}")))
    }

    /// The steps whose files rebuild `step`, from its keyframe on: a `same` step
    /// rebuilds as its reference.
    ///
    /// # Errors
    /// `E_SERIES_STEP` when the series does not hold it.
    pub fn chain(&self, step: u64) -> Result<Vec<&StepEntry>> {
        let mut chain = Vec::new();
        let mut at = self.entry(step)?;
        loop {
            if at.kind != StepKind::Same {
                chain.push(at);
            }
            match at.reference {
                // validate() made every reference an earlier step
                Some(r) if at.kind == StepKind::Delta || at.kind == StepKind::Same => at = self.entry(r)?,
                _ => break,
            }
            if at.kind == StepKind::Keyframe {
                chain.push(at);
                break;
            }
        }
        chain.reverse();
        Ok(chain)
    }

    /// Deltas applied after the keyframe to rebuild `step`.
    ///
    /// # Errors
    /// `E_SERIES_STEP` when the series does not hold it.
    pub fn depth(&self, step: u64) -> Result<usize> {
        Ok(self.chain(step)?.len() - 1)
    }

    /// The manifest as the series stores it: pretty JSON and a newline.
    #[must_use]
    pub fn to_text(&self) -> String {
        let mut text = serde_json::to_string_pretty(self).unwrap_or_default();
        text.push('\n');
        text
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn digest(c: char) -> String {
        std::iter::repeat_n(c, 64).collect()
    }

    fn checkpoint(c: char) -> CheckpointDigest {
        CheckpointDigest {
            kind: LayoutKind::File,
            files: vec![FileDigest { name: "model.safetensors".into(), bytes: 10, sha256: digest(c) }],
        }
    }

    fn entry(step: u64, kind: StepKind, reference: Option<u64>, c: char) -> StepEntry {
        let sha = (kind != StepKind::Same).then(|| digest('e'));
        StepEntry {
            step,
            kind,
            reference,
            file: sha.as_ref().map(|s| step_file_name(step, s)),
            file_bytes: if kind == StepKind::Same { 0 } else { 5 },
            file_sha256: sha,
            checkpoint: checkpoint(c),
        }
    }

    fn series(steps: Vec<StepEntry>) -> Manifest {
        Manifest { steps, ..Manifest::default() }
    }

    #[test]
    fn chains_follow_references_back_to_a_keyframe() {
        let m = series(vec![
            entry(0, StepKind::Keyframe, None, 'a'),
            entry(10, StepKind::Delta, Some(0), 'b'),
            entry(20, StepKind::Same, Some(10), 'b'),
            entry(30, StepKind::Delta, Some(10), 'c'),
            entry(40, StepKind::Keyframe, None, 'd'),
            entry(50, StepKind::Delta, Some(0), 'e'),
        ]);
        m.validate().unwrap();
        let steps = |s: u64| m.chain(s).unwrap().iter().map(|e| e.step).collect::<Vec<_>>();
        assert_eq!(steps(0), [0]);
        assert_eq!(steps(20), [0, 10]);
        assert_eq!(steps(30), [0, 10, 30]);
        assert_eq!(steps(40), [40]);
        assert_eq!(steps(50), [0, 50]);
        assert_eq!(m.depth(30).unwrap(), 2);
        assert_eq!(m.depth(20).unwrap(), 1);
        assert_eq!(m.chain(35).unwrap_err().code(), ErrorCode::SeriesStep);
        let text = m.to_text();
        assert_eq!(Manifest::parse(&text).unwrap(), m);
    }

    #[test]
    fn broken_manifests_are_refused() {
        let ok = || vec![entry(0, StepKind::Keyframe, None, 'a'), entry(10, StepKind::Delta, Some(0), 'b')];
        let mut cases: Vec<(&str, Manifest)> = Vec::new();
        let mut m = series(ok());
        m.series_version = "2.0".into();
        cases.push(("major version 2", m));
        let mut steps = ok();
        steps[1].step = 0;
        cases.push(("a step repeated", series(steps)));
        let mut steps = ok();
        steps[1].reference = Some(5);
        cases.push(("a reference to no step", series(steps)));
        let mut steps = ok();
        steps.push(entry(20, StepKind::Same, Some(10), 'c'));
        cases.push(("a same step whose checkpoint differs", series(steps)));
        let mut steps = ok();
        steps.push(entry(20, StepKind::Same, Some(10), 'b'));
        steps.push(entry(30, StepKind::Delta, Some(20), 'd'));
        cases.push(("a reference to a same step", series(steps)));
        let mut steps = ok();
        steps[1].file = Some("../../etc/passwd".into());
        cases.push(("a file outside the steps folder", series(steps)));
        let mut steps = ok();
        steps[0].reference = Some(0);
        cases.push(("a keyframe with a reference", series(steps)));
        let mut steps = ok();
        steps[0].checkpoint.files[0].sha256 = "ABC".into();
        cases.push(("a digest that is not hex", series(steps)));
        let mut steps = ok();
        steps[0].checkpoint.kind = LayoutKind::Sharded;
        cases.push(("a sharded checkpoint without its index", series(steps)));
        for (what, m) in cases {
            assert_eq!(m.validate().unwrap_err().code(), ErrorCode::SeriesInvalid, "{what}");
            assert_eq!(Manifest::parse(&m.to_text()).unwrap_err().code(), ErrorCode::SeriesInvalid, "{what}");
        }
        // strict JSON: an unknown member, a duplicate key
        let text = series(ok()).to_text();
        let unknown = text.replacen("\"series_version\"", "\"extra\": 1, \"series_version\"", 1);
        assert_eq!(Manifest::parse(&unknown).unwrap_err().code(), ErrorCode::SeriesInvalid);
        let twice = text.replacen("\"series_version\"", "\"series_version\": \"1.0\", \"series_version\"", 1);
        assert_eq!(Manifest::parse(&twice).unwrap_err().code(), ErrorCode::SeriesInvalid);
        // a newer minor version reads
        let mut m = series(ok());
        m.series_version = "1.7".into();
        assert!(Manifest::parse(&m.to_text()).is_ok());
    }
}
