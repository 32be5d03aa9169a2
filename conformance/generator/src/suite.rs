//! The suite on disk: case files, expected decodes and the manifest.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tpde::{Checkpoint, DeltaFile, NoProgress};

use crate::safet::Tensor;

/// Case counts by folder.
#[derive(Debug, Default)]
pub struct Counts {
    /// `valid/`.
    pub valid: usize,
    /// `invalid/`.
    pub invalid: usize,
    /// `forward-compat/`.
    pub forward: usize,
    /// `regression/` entries kept from the old manifest.
    pub regression: usize,
}

/// The suite being written.
pub struct Suite {
    root: PathBuf,
    entries: Vec<Value>,
    regression: Vec<Value>,
    scratch: tempfile::TempDir,
    disagreements: usize,
}

/// The canonical decode of the conformance CLI contract: tensors in header order,
/// each with dtype, name, SHA-256 of its bytes and shape; keys sorted, no
/// whitespace, one trailing newline.
pub fn canonical_json(tensors: &[&Tensor]) -> String {
    let list: Vec<Value> = tensors
        .iter()
        .map(|t| {
            json!({
                "dtype": t.dtype,
                "name": t.name,
                "sha256": hex::encode(Sha256::digest(&t.bytes)),
                "shape": t.shape,
            })
        })
        .collect();
    let mut text = serde_json::to_string(&json!({ "tensors": list })).expect("serialises");
    text.push('\n');
    text
}

impl Suite {
    /// Clears the generated folders under `root` and starts a new manifest, keeping
    /// the regression entries of the old one.
    pub fn create(root: &Path) -> Self {
        for dir in ["valid", "invalid", "forward-compat"] {
            let path = root.join(dir);
            if path.exists() {
                std::fs::remove_dir_all(&path).expect("clear a generated folder");
            }
            std::fs::create_dir_all(&path).expect("create a folder");
        }
        std::fs::create_dir_all(root.join("regression")).expect("create regression/");
        let regression = std::fs::read_to_string(root.join("manifest.json"))
            .ok()
            .and_then(|text| serde_json::from_str::<Value>(&text).ok())
            .and_then(|v| v.get("cases").and_then(Value::as_array).cloned())
            .unwrap_or_default()
            .into_iter()
            .filter(|e| e["path"].as_str().is_some_and(|p| p.starts_with("regression/")))
            .collect();
        Self {
            root: root.to_path_buf(),
            entries: Vec::new(),
            regression,
            scratch: tempfile::tempdir().expect("a scratch dir"),
            disagreements: 0,
        }
    }

    /// A scratch path for files that are not part of the suite.
    pub fn scratch(&self, name: &str) -> PathBuf {
        self.scratch.path().join(name)
    }

    /// The absolute path of a suite file.
    pub fn path(&self, rel: &str) -> PathBuf {
        self.root.join(rel)
    }

    /// Writes a suite file.
    pub fn write(&self, rel: &str, bytes: &[u8]) {
        let path = self.path(rel);
        std::fs::create_dir_all(path.parent().expect("has a parent")).expect("create a folder");
        std::fs::write(path, bytes).expect("write a suite file");
    }

    /// Reads a suite file.
    pub fn read(&self, rel: &str) -> Vec<u8> {
        std::fs::read(self.path(rel)).expect("read a suite file")
    }

    /// Writes `expected.json` for an accepted case: the target tensors, in the
    /// delta's header order.
    pub fn write_expected(&self, rel: &str, delta_rel: &str, targets: &[Tensor]) {
        let header = crate::model::Model::parse(&self.read(delta_rel)).header();
        let by_name: BTreeMap<&str, &Tensor> = targets.iter().map(|t| (t.name.as_str(), t)).collect();
        let ordered: Vec<&Tensor> = header.tensors.iter().map(|t| by_name[t.name.as_str()]).collect();
        assert_eq!(ordered.len(), targets.len(), "{delta_rel}: every target tensor is in the delta");
        self.write(rel, canonical_json(&ordered).as_bytes());
    }

    /// Records an accepted case; warns unless the library rebuilds `target` (a
    /// safetensors file or sharded directory) from it byte for byte.
    #[allow(clippy::too_many_arguments)]
    pub fn accept(
        &mut self,
        id: &str,
        delta: &str,
        base: Option<&str>,
        expected: &str,
        target: &Path,
        spec: &str,
        provenance: &str,
    ) {
        let rebuild = || -> tpde::Result<()> {
            let delta_file = DeltaFile::open(&self.path(delta))?;
            let base_ck = base.map(|b| Checkpoint::open(&self.path(b))).transpose()?;
            let target_ck = Checkpoint::open(target)?;
            tpde::verify(&delta_file, base_ck.as_ref(), Some(&target_ck), &NoProgress)
        };
        if let Err(e) = rebuild() {
            self.disagreements += 1;
            eprintln!("warning: {id}: the library does not rebuild the target: {e}");
        }
        let mut entry = json!({
            "id": id,
            "path": delta,
            "expect": "accept",
            "expected": expected,
            "spec": spec,
            "provenance": provenance,
        });
        if let Some(base) = base {
            entry["base"] = json!(base);
        }
        self.entries.push(entry);
    }

    /// Records an accepted case whose target file is not at hand (its delta differs
    /// from another case's only in ways that do not change the tensors); warns
    /// unless the library accepts it and checks every digest.
    pub fn accept_decoded(
        &mut self,
        id: &str,
        delta: &str,
        base: Option<&str>,
        expected: &str,
        spec: &str,
        provenance: &str,
    ) {
        if let Some(code) = self.library_code(delta, base) {
            self.disagreements += 1;
            eprintln!("warning: {id}: the library rejects a valid case with {code}");
        }
        let mut entry = json!({
            "id": id,
            "path": delta,
            "expect": "accept",
            "expected": expected,
            "spec": spec,
            "provenance": provenance,
        });
        if let Some(base) = base {
            entry["base"] = json!(base);
        }
        self.entries.push(entry);
    }

    /// Records a rejected case; warns when the library reports another code.
    pub fn reject(&mut self, id: &str, delta: &str, base: Option<&str>, error: &str, spec: &str, provenance: &str) {
        let got = self.library_code(delta, base);
        if got.as_deref() != Some(error) {
            self.disagreements += 1;
            eprintln!("warning: {id}: the manifest expects {error}, the library gives {got:?}");
        }
        let mut entry = json!({
            "id": id,
            "path": delta,
            "expect": "reject",
            "error": error,
            "spec": spec,
            "provenance": provenance,
        });
        if let Some(base) = base {
            entry["base"] = json!(base);
        }
        self.entries.push(entry);
    }

    /// The code the library gives for a case, or `None` when it accepts it.
    fn library_code(&self, delta: &str, base: Option<&str>) -> Option<String> {
        let run = || -> tpde::Result<()> {
            let delta = DeltaFile::open(&self.path(delta))?;
            let base = base.map(|b| Checkpoint::open(&self.path(b))).transpose()?;
            tpde::verify(&delta, base.as_ref(), None, &NoProgress)
        };
        run().err().map(|e| e.code().as_str().to_owned())
    }

    /// Opens `delta` with its chain of reference deltas, nearest first (spec §11.2 R0).
    fn open_chain(&self, delta: &str, references: &[&str]) -> tpde::Result<DeltaFile> {
        let paths: Vec<PathBuf> = references.iter().map(|rel| self.path(rel)).collect();
        DeltaFile::open(&self.path(delta))?.with_reference_chain(&paths)
    }

    /// Records a case whose delta is decoded with reference deltas (spec §11.4,
    /// `references`): accepted with `expected`, or rejected with `error`; warns when
    /// the library disagrees.
    #[allow(clippy::too_many_arguments)]
    pub fn with_references(
        &mut self,
        id: &str,
        delta: &str,
        base: &str,
        references: &[&str],
        verdict: Result<&str, &str>,
        spec: &str,
        provenance: &str,
    ) {
        let run = || -> tpde::Result<()> {
            let file = self.open_chain(delta, references)?;
            let base = Checkpoint::open(&self.path(base))?;
            tpde::verify(&file, Some(&base), None, &NoProgress)
        };
        let got = run().err().map(|e| e.code().as_str().to_owned());
        let mut entry = json!({ "id": id, "path": delta, "base": base });
        match verdict {
            Ok(expected) => {
                entry["expect"] = json!("accept");
                entry["expected"] = json!(expected);
            }
            Err(error) => {
                entry["expect"] = json!("reject");
                entry["error"] = json!(error);
            }
        }
        if got.as_deref() != verdict.err() {
            self.disagreements += 1;
            eprintln!("warning: {id}: the manifest expects {verdict:?}, the library gives {got:?}");
        }
        if !references.is_empty() {
            entry["references"] = json!(references);
        }
        entry["spec"] = json!(spec);
        entry["provenance"] = json!(provenance);
        self.entries.push(entry);
    }

    /// Writes `manifest.json` and returns the counts.
    pub fn finish(self) -> Counts {
        let mut counts = Counts { regression: self.regression.len(), ..Counts::default() };
        for entry in &self.entries {
            let path = entry["path"].as_str().unwrap_or_default();
            if path.starts_with("valid/") && entry["expect"] == "accept" {
                counts.valid += 1;
            } else if path.starts_with("forward-compat/") {
                counts.forward += 1;
            } else {
                counts.invalid += 1;
            }
        }
        let mut cases = self.entries;
        cases.extend(self.regression);
        let manifest = json!({
            "format": "tpde conformance manifest",
            "version": 1,
            "cases": cases,
        });
        let mut text = serde_json::to_string_pretty(&manifest).expect("serialises");
        text.push('\n');
        std::fs::write(self.root.join("manifest.json"), text).expect("write the manifest");
        if self.disagreements > 0 {
            eprintln!("warning: the library disagrees with {} case(s)", self.disagreements);
        }
        counts
    }
}
