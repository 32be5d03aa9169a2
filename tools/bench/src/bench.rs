//! Running every method on one corpus case and checking its round trip.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use rayon::prelude::*;

use crate::baselines::DeltaStats;
use crate::checkpoint::{
    checkpoint_files, checkpoint_size, first_difference, is_safetensors, resolve, SafetensorsFile, TensorIndex,
};
use crate::corpus::{CasePaths, CaseSpec};
use crate::dtype::word_bytes;
use crate::measure::{self, Measured};
use crate::methods::{Family, Io, MethodSpec};
use crate::tpde_stats::{self, PositionCost};

/// How one method fared on one case.
pub enum Outcome {
    /// Ran and round-tripped byte for byte.
    Ok {
        /// Compressed size in bytes.
        bytes: u64,
        /// The compress run.
        enc: Measured,
        /// The restore run.
        dec: Measured,
    },
    /// Not run; the reason is shown in the table.
    Unavailable(String),
    /// Ran but failed or did not restore the exact bytes.
    Failed(String),
}

/// One row of a case table.
pub struct RowResult {
    /// Display name.
    pub name: String,
    /// Standalone or delta.
    pub family: Family,
    /// Whether the row is tpde.
    pub is_tpde: bool,
    /// Result.
    pub outcome: Outcome,
    /// Stats written by the in-process baselines.
    pub stats: Option<DeltaStats>,
    /// Position cost read from a tpde delta.
    pub tpde_positions: Option<Result<PositionCost, String>>,
}

/// Everything measured on one case.
pub struct CaseResult {
    /// The case.
    pub spec: CaseSpec,
    /// Parameter count of its model.
    pub params: usize,
    /// Target checkpoint size in bytes (all files).
    pub target_bytes: u64,
    /// Words of the target and how many differ from the base.
    pub change: ChangeCount,
    /// One per method.
    pub rows: Vec<RowResult>,
}

/// Changed words between base and target.
#[derive(Clone, Copy, Debug, Default)]
pub struct ChangeCount {
    /// Words in the target.
    pub words: u64,
    /// Words that differ from the zero-padded base.
    pub changed: u64,
}

impl ChangeCount {
    /// Fraction of words changed.
    pub fn fraction(&self) -> f64 {
        if self.words == 0 {
            0.0
        } else {
            to_f64(self.changed) / to_f64(self.words)
        }
    }
}

/// Lossless u64 → f64 for the magnitudes here (well below 2^53).
pub fn to_f64(x: u64) -> f64 {
    // Counts and byte sizes in this harness stay far below 2^53.
    #[allow(clippy::cast_precision_loss)]
    let y = x as f64;
    y
}

/// Counts changed words tensor by tensor, matching tensors by name.
pub fn count_changes(base: &Path, target: &Path) -> Result<ChangeCount> {
    let base = TensorIndex::open(base)?;
    let mut total = ChangeCount::default();
    for rel in checkpoint_files(target)? {
        let path = resolve(target, &rel);
        if !is_safetensors(&path) {
            continue;
        }
        let file = SafetensorsFile::open(&path)?;
        let counts: Vec<(u64, u64)> = file
            .tensors
            .par_iter()
            .map(|t| {
                let w = word_bytes(&t.dtype);
                let data = file.data(t);
                let b = base.get(&t.name).unwrap_or(&[]);
                let words = data.len() / w;
                let changed = data
                    .chunks_exact(w)
                    .enumerate()
                    .filter(|(i, word)| {
                        b.get(i * w..(i + 1) * w).map_or(word.iter().any(|&x| x != 0), |bw| bw != *word)
                    })
                    .count();
                (words as u64, changed as u64)
            })
            .collect();
        for (w, c) in counts {
            total.words += w;
            total.changed += c;
        }
    }
    Ok(total)
}

/// Concatenates every file of a sharded checkpoint (sorted by name) into one
/// file, for byte-level tools that take one input. Restoring that file and
/// comparing it with the concatenation checks every shard's bytes.
pub fn concatenate(root: &Path, out: &Path) -> Result<PathBuf> {
    if out.exists() {
        return Ok(out.to_path_buf());
    }
    let tmp = out.with_extension("partial");
    let mut w = BufWriter::new(File::create(&tmp)?);
    for rel in checkpoint_files(root)? {
        let mut r = File::open(resolve(root, &rel))?;
        std::io::copy(&mut r, &mut w)?;
    }
    w.into_inner().map_err(|e| e.into_error())?.sync_all()?;
    std::fs::rename(&tmp, out)?;
    Ok(out.to_path_buf())
}

/// Runs one method on one case and checks the restored bytes.
pub fn run_method(m: &MethodSpec, case: &CasePaths, flat: &CasePaths, scratch: &Path) -> RowResult {
    let mut row = RowResult {
        name: m.name.clone(),
        family: m.family,
        is_tpde: m.is_tpde,
        outcome: Outcome::Unavailable(String::new()),
        stats: None,
        tpde_positions: None,
    };
    if let Some(why) = &m.unavailable {
        row.outcome = Outcome::Unavailable(why.clone());
        return row;
    }
    let (inputs, sharded) = if m.understands_checkpoints { (case, case.target.is_dir()) } else { (flat, false) };
    let io = Io {
        base: inputs.base.clone(),
        target: inputs.target.clone(),
        delta: scratch.join(format!("{}.delta", m.slug)),
        restored: scratch.join(if sharded {
            format!("{}.restored", m.slug)
        } else {
            format!("{}.restored.bin", m.slug)
        }),
    };
    row.outcome = match run_and_verify(m, &io, scratch) {
        Ok(o) => o,
        Err(e) => Outcome::Failed(format!("{e:#}")),
    };
    if m.writes_stats {
        row.stats = std::fs::read(stats_path(&io.delta)).ok().and_then(|b| serde_json::from_slice(&b).ok());
    }
    if m.is_tpde && m.family == Family::Delta && matches!(row.outcome, Outcome::Ok { .. }) {
        row.tpde_positions = Some(tpde_stats::position_cost(&io.delta).map_err(|e| format!("{e:#}")));
    }
    for p in [&io.delta, &io.restored, &stats_path(&io.delta)] {
        remove(p);
    }
    row
}

fn run_and_verify(m: &MethodSpec, io: &Io, scratch: &Path) -> Result<Outcome> {
    remove(&io.delta);
    remove(&io.restored);
    let err = scratch.join(format!("{}.stderr", m.slug));

    let mut enc = (m.encode)(io);
    let enc_m = measure::run(&mut enc.cmd, enc.stdout.as_deref(), &err)?;
    if !enc_m.success {
        return Ok(Outcome::Failed(format!("encode failed: {}", enc_m.stderr_tail)));
    }
    if !io.delta.exists() {
        return Ok(Outcome::Failed("encode wrote no output".into()));
    }
    let bytes = checkpoint_size(&io.delta)?;

    let mut dec = (m.decode)(io);
    let dec_m = measure::run(&mut dec.cmd, dec.stdout.as_deref(), &err)?;
    if !dec_m.success {
        return Ok(Outcome::Failed(format!("restore failed: {}", dec_m.stderr_tail)));
    }
    if !io.restored.exists() {
        return Ok(Outcome::Failed("restore wrote no output".into()));
    }
    if let Some(diff) =
        first_difference(&io.target, &io.restored).with_context(|| format!("compare {}", io.restored.display()))?
    {
        return Ok(Outcome::Failed(format!("round trip NOT byte-exact: {diff}")));
    }
    remove(&err);
    Ok(Outcome::Ok { bytes, enc: enc_m, dec: dec_m })
}

/// Where the in-process baselines put their stats.
pub fn stats_path(delta: &Path) -> PathBuf {
    let mut s = delta.as_os_str().to_owned();
    s.push(".stats.json");
    PathBuf::from(s)
}

/// Writes stats beside a delta.
pub fn write_stats(delta: &Path, stats: &DeltaStats) -> Result<()> {
    let mut f = File::create(stats_path(delta))?;
    f.write_all(&serde_json::to_vec(stats)?)?;
    Ok(())
}

fn remove(p: &Path) {
    // Missing files are the normal case here; anything else would surface
    // later as an encode or compare error.
    let _ = if p.is_dir() { std::fs::remove_dir_all(p) } else { std::fs::remove_file(p) };
}

/// The target's most common float dtype, spelled as zipnn wants it.
pub fn zipnn_dtype(target: &Path) -> Result<&'static str> {
    let mut bytes_by: std::collections::BTreeMap<String, usize> = Default::default();
    for rel in checkpoint_files(target)? {
        let path = resolve(target, &rel);
        if is_safetensors(&path) {
            for t in SafetensorsFile::open(&path)?.tensors {
                *bytes_by.entry(t.dtype).or_default() += t.end - t.start;
            }
        }
    }
    let top = bytes_by.into_iter().max_by_key(|(_, n)| *n).map(|(d, _)| d);
    Ok(match top.as_deref() {
        Some("F32") => "float32",
        Some("F16") => "float16",
        _ => "bfloat16",
    })
}
