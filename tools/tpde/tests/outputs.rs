//! What `tpde` does to the file system around its outputs: it never removes what it
//! did not write, never replaces what appeared meanwhile, leaves nothing behind
//! after a terminating signal, and prints untrusted names escaped.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use safetensors::tensor::TensorView;
use safetensors::Dtype;

mod common;
use common::{code_of, error_code, noise, ok, run, TPDE};

/// Writes a safetensors file of U8 tensors.
fn write_safetensors(path: &Path, tensors: &[(&str, Vec<u8>)]) {
    let views: Vec<(String, TensorView<'_>)> = tensors
        .iter()
        .map(|(name, bytes)| {
            ((*name).to_owned(), TensorView::new(Dtype::U8, vec![bytes.len()], bytes).expect("a view"))
        })
        .collect();
    let metadata = HashMap::from([("format".to_owned(), "pt".to_owned())]);
    safetensors::serialize_to_file(views, Some(metadata), path).expect("write safetensors");
}

/// A sharded checkpoint of two shards and its index.
fn write_sharded(dir: &Path, seed: u64) {
    fs::create_dir_all(dir).unwrap();
    let shards = [("model-00001-of-00002.safetensors", "a"), ("model-00002-of-00002.safetensors", "b")];
    let mut weight_map = serde_json::Map::new();
    for (i, (file, tensor)) in shards.iter().enumerate() {
        write_safetensors(&dir.join(file), &[(tensor, noise(4096, seed + i as u64))]);
        weight_map.insert((*tensor).into(), (*file).into());
    }
    let index = serde_json::json!({"metadata": {"total_size": 8192}, "weight_map": weight_map});
    fs::write(dir.join("model.safetensors.index.json"), serde_json::to_string_pretty(&index).unwrap()).unwrap();
}

/// Every entry under `dir`, recursively, with file contents: what a test compares
/// before and after a run that must not touch anything.
fn snapshot(dir: &Path) -> Vec<(PathBuf, Option<Vec<u8>>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path.clone());
                out.push((path, None));
            } else {
                let bytes = fs::read(&path).unwrap();
                out.push((path, Some(bytes)));
            }
        }
    }
    out.sort();
    out
}

fn temporaries(dir: &Path) -> Vec<String> {
    fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tpde-tmp-"))
        .collect()
}

/// Regression: `apply models/base models/step.tpde -o models --force` removed the whole
/// `models/` directory, inputs and unrelated files included, and reported success.
#[test]
fn force_never_removes_inputs_or_files_tpde_did_not_write() {
    let tmp = tempfile::tempdir().unwrap();
    let models = tmp.path().join("models");
    write_sharded(&models.join("base"), 1);
    write_sharded(&models.join("step"), 2);
    fs::write(models.join("notes.txt"), b"mine").unwrap();
    let (base, step, delta) = (models.join("base"), models.join("step"), models.join("step.tpde"));
    ok(&[Path::new("encode"), &base, &step, Path::new("-o"), &delta]);
    let before = snapshot(&models);

    // OUT holds the inputs, or is one, or lies inside one.
    for out in [&models, &base, &base.join("new")] {
        let args = [Path::new("apply"), &base, &delta, Path::new("-o"), out, Path::new("--force")];
        assert_eq!(error_code(&args), "E_INVALID_ARGUMENT", "{out:?}");
    }
    let args = [Path::new("encode"), &base, &step, Path::new("-o"), &models, Path::new("--force")];
    assert_eq!(error_code(&args), "E_INVALID_ARGUMENT");
    assert_eq!(snapshot(&models), before, "nothing changed");

    // A directory holding anything but a checkpoint is not replaced.
    let other = tmp.path().join("other");
    write_sharded(&other, 3);
    fs::write(other.join("notes.txt"), b"mine").unwrap();
    let other_before = snapshot(&other);
    let args = [Path::new("apply"), &base, &delta, Path::new("-o"), &other, Path::new("--force")];
    assert_eq!(error_code(&args), "E_OUTPUT_EXISTS");
    assert_eq!(snapshot(&other), other_before);
    // Nor is a file replaced by a directory, or a directory by a file.
    let file = tmp.path().join("file.safetensors");
    fs::write(&file, b"mine").unwrap();
    let args = [Path::new("apply"), &base, &delta, Path::new("-o"), &file, Path::new("--force")];
    assert_eq!(error_code(&args), "E_OUTPUT_EXISTS");
    let args = [Path::new("encode"), &base, &step, Path::new("-o"), &other, Path::new("--force")];
    assert_eq!(error_code(&args), "E_OUTPUT_EXISTS");
    assert_eq!(fs::read(&file).unwrap(), b"mine");
    assert_eq!(snapshot(&other), other_before);

    // A shard that the index does not name is not part of the checkpoint.
    fs::rename(other.join("notes.txt"), other.join("mine.safetensors")).unwrap();
    let args = [Path::new("apply"), &base, &delta, Path::new("-o"), &other, Path::new("--force")];
    assert_eq!(error_code(&args), "E_OUTPUT_EXISTS");
    assert_eq!(fs::read(other.join("mine.safetensors")).unwrap(), b"mine");

    // A directory of nothing but a checkpoint is replaced.
    fs::remove_file(other.join("mine.safetensors")).unwrap();
    ok(&[Path::new("apply"), &base, &delta, Path::new("-o"), &other, Path::new("--force")]);
    let rebuilt: Vec<_> = snapshot(&other).into_iter().map(|(p, b)| (p.file_name().unwrap().to_owned(), b)).collect();
    let original: Vec<_> = snapshot(&step).into_iter().map(|(p, b)| (p.file_name().unwrap().to_owned(), b)).collect();
    assert_eq!(rebuilt, original);
    assert!(temporaries(tmp.path()).is_empty());
}

/// Regression: `--threads 5000` took 30 s and 830 MB, and 2^64 - 1 hung.
#[test]
fn the_thread_count_is_bounded() {
    let tmp = tempfile::tempdir().unwrap();
    let delta = tmp.path().join("d.tpde");
    for threads in ["0", "5000", "1000000", "18446744073709551615"] {
        let args = [Path::new("inspect"), &delta, Path::new("--threads"), Path::new(threads)];
        assert_eq!(error_code(&args), "E_INVALID_ARGUMENT", "--threads {threads}");
    }
}

/// Regression: output names of 236 to 255 bytes failed, because the temporary's name
/// was the output's name plus a suffix.
#[test]
fn output_names_of_255_bytes_work() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t.safetensors");
    write_safetensors(&target, &[("w", noise(1000, 1))]);
    let long = |ext: &str| tmp.path().join(format!("{}{ext}", "n".repeat(255 - ext.len())));
    let (delta, out) = (long(".tpde"), long(".safetensors"));
    ok(&[Path::new("encode"), &target, Path::new("-o"), &delta]);
    ok(&[Path::new("apply"), &delta, Path::new("-o"), &out]);
    assert_eq!(fs::read(&out).unwrap(), fs::read(&target).unwrap());

    let sharded = tmp.path().join("sharded");
    write_sharded(&sharded, 4);
    let sharded_delta = tmp.path().join("s.tpde");
    ok(&[Path::new("encode"), &sharded, Path::new("-o"), &sharded_delta]);
    let out_dir = long("");
    ok(&[Path::new("apply"), &sharded_delta, Path::new("-o"), &out_dir]);
    assert_eq!(fs::read_dir(&out_dir).unwrap().count(), 3);
    assert!(temporaries(tmp.path()).is_empty());
}

/// Regression: a temporary left by a process that was killed stayed forever. A later
/// run beside it removes it and says so; a running process's temporary stays.
#[test]
fn a_dead_process_s_temporary_is_removed_by_the_next_run() {
    let tmp = tempfile::tempdir().unwrap();
    let target = tmp.path().join("t.safetensors");
    write_safetensors(&target, &[("w", noise(1000, 1))]);
    // No process has this ID (Linux IDs are at most 2^22).
    let stale = tmp.path().join(".tpde-tmp-2147483647-Ab3dE6");
    fs::write(&stale, b"partial").unwrap();
    let stale_dir = tmp.path().join(".tpde-tmp-2147483647-Zx9yW8");
    fs::create_dir(&stale_dir).unwrap();
    fs::write(stale_dir.join("model-00001-of-00002.safetensors"), b"partial").unwrap();
    // As earlier releases named them.
    let legacy = tmp.path().join(".d.tpde.tpde-tmp-2147483647");
    fs::write(&legacy, b"partial").unwrap();
    let live = tmp.path().join(format!(".tpde-tmp-{}-Qr5sT7", std::process::id()));
    fs::write(&live, b"in progress").unwrap();
    let out = ok(&[Path::new("encode"), &target, Path::new("-o"), &tmp.path().join("d.tpde")]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!stale.exists() && !stale_dir.exists() && !legacy.exists());
    assert!(stderr.contains(".tpde-tmp-2147483647-Ab3dE6"), "the removed leftover is named: {stderr}");
    assert!(live.exists(), "a running process's temporary stays");
}

/// A tensor named with terminal escape sequences.
const HOSTILE: &str = "w\x1b[2J\x1b]0;pwned\x07\u{9b}31m\u{202e}";

/// Regression: `inspect` and errors printed names raw, so escape sequences in a file
/// reached the terminal.
#[test]
fn names_are_escaped_for_the_terminal_and_exact_in_json() {
    let tmp = tempfile::tempdir().unwrap();
    let (base, target) = (tmp.path().join("b.safetensors"), tmp.path().join("t.safetensors"));
    write_safetensors(&base, &[(HOSTILE, noise(4096, 1))]);
    write_safetensors(&target, &[(HOSTILE, noise(4096, 2))]);
    let delta = tmp.path().join("d.tpde");
    ok(&[Path::new("encode"), &base, &target, Path::new("-o"), &delta]);
    let hostile_writer = set_writer(&delta, "\\u001b[2Jx");

    let unsafe_byte = |bytes: &[u8]| {
        let text = String::from_utf8_lossy(bytes);
        text.chars().find(|&c| c.is_control() && c != '\n' || ('\u{202a}'..='\u{202e}').contains(&c))
    };
    let table = ok(&[Path::new("inspect"), &hostile_writer]);
    assert_eq!(unsafe_byte(&table.stdout), None, "{}", String::from_utf8_lossy(&table.stdout));
    let text = String::from_utf8_lossy(&table.stdout);
    assert!(text.contains("w\\u{1b}[2J") && text.contains("written by \\u{1b}[2Jx"), "{text}");

    let json = ok(&[Path::new("inspect"), &hostile_writer, Path::new("--json")]);
    let report: serde_json::Value = serde_json::from_slice(&json.stdout).expect("exact JSON");
    assert_eq!(report["tensors"][0]["name"], HOSTILE);
    assert_eq!(report["writer"], "\x1b[2Jx");

    // An error that names the tensor: a base with other content.
    let wrong = tmp.path().join("wrong.safetensors");
    write_safetensors(&wrong, &[(HOSTILE, noise(4096, 3))]);
    let out = run(&[Path::new("apply"), &wrong, &delta, Path::new("-o"), &tmp.path().join("o.safetensors")]);
    assert_eq!(code_of(&out), "E_BASE_DIGEST");
    assert_eq!(unsafe_byte(&out.stderr), None, "{}", String::from_utf8_lossy(&out.stderr));
    // An error that names a file.
    let missing = tmp.path().join("\x1b[2Jmissing\x07.tpde");
    let out = run(&[Path::new("inspect"), &missing]);
    assert_eq!(code_of(&out), "E_IO");
    assert_eq!(unsafe_byte(&out.stderr), None, "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stderr).contains("\\u{1b}[2Jmissing\\u{7}.tpde"));
}

/// A copy of `delta` whose header names `writer` (JSON text of the same length as
/// the original's "tpde x.y.z"), with its checksums recomputed.
fn set_writer(delta: &Path, writer_json: &str) -> PathBuf {
    let mut bytes = fs::read(delta).unwrap();
    let u64_at = |b: &[u8], at: usize| u64::from_le_bytes(b[at..at + 8].try_into().unwrap());
    let (data_len, header_len) = (u64_at(&bytes, 32), u64_at(&bytes, 40));
    let layout = tpde::format::Layout::from_counts(data_len, header_len, u64_at(&bytes, 48), u64_at(&bytes, 56))
        .expect("a valid layout");
    let start = usize::try_from(layout.header_offset).unwrap();
    let header = start..start + usize::try_from(header_len).unwrap();
    let text = String::from_utf8(bytes[header.clone()].to_vec()).unwrap();
    let current = format!("\"writer\":\"tpde {}\"", env!("CARGO_PKG_VERSION"));
    let replaced = text.replace(&current, &format!("\"writer\":\"{writer_json}\""));
    assert_eq!(replaced.len(), text.len(), "the writer {writer_json} must keep the header's length");
    assert_ne!(replaced, text, "the header names the writer: {text}");
    bytes[header.clone()].copy_from_slice(replaced.as_bytes());
    let header_checksum = tpde::format::checksum64(&bytes[header]);
    bytes[64..72].copy_from_slice(&header_checksum.to_le_bytes());
    let preamble_checksum = tpde::format::checksum64(&bytes[..120]);
    bytes[120..128].copy_from_slice(&preamble_checksum.to_le_bytes());
    let out = delta.with_file_name("hostile-writer.tpde");
    fs::write(&out, bytes).unwrap();
    out
}

/// Signals and process states, for the tests that stop `tpde` mid-write.
#[cfg(target_os = "linux")]
mod process {
    use std::process::Child;
    use std::time::{Duration, Instant};

    pub fn signal(child: &Child, signal: libc::c_int) {
        let pid = libc::pid_t::try_from(child.id()).expect("a pid");
        // SAFETY: kill(2) on our own child, which has not been waited for yet, so
        // its ID cannot have been reused.
        let rc = unsafe { libc::kill(pid, signal) };
        assert_eq!(rc, 0, "kill({pid}, {signal}): {}", std::io::Error::last_os_error());
    }

    /// Whether the child is stopped now (state `T` in /proc), waiting until it is
    /// or has exited.
    pub fn wait_until_stopped(child: &Child) -> bool {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{}/stat", child.id())) else { return false };
            // The state follows the command name, which is in parentheses.
            match stat.rsplit_once(')').and_then(|(_, rest)| rest.split_whitespace().next()) {
                Some("T" | "t") => return true,
                Some("Z" | "X") | None => return false,
                Some(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
        panic!("tpde did not stop within a minute");
    }
}

/// A target that takes a while to apply: 8 MiB, decoded and hashed in many chunks.
fn big_standalone(dir: &Path) -> PathBuf {
    let target = dir.join("big.safetensors");
    // Large enough that writing the output takes many of the test's 1 ms slices,
    // now that `apply` does not sync it.
    let mut bytes = noise(1 << 20, 7);
    bytes.resize(48 << 20, 0);
    write_safetensors(&target, &[("w", bytes)]);
    let delta = dir.join("big.tpde");
    ok(&[Path::new("encode"), &target, Path::new("-o"), &delta]);
    fs::remove_file(&target).unwrap();
    delta
}

/// Starts `tpde args` and stops it once a temporary output exists in `dir`: it is
/// then between creating its output and renaming it into place. The child runs in
/// slices of a millisecond and is checked while stopped, so that this holds however
/// fast or slow the machine is.
#[cfg(target_os = "linux")]
fn start_and_stop_mid_write(args: &[&Path], dir: &Path) -> Child {
    let mut command = Command::new(TPDE);
    command.args(args);
    start_and_stop_mid_write_command(command, dir)
}

#[cfg(target_os = "linux")]
fn start_and_stop_mid_write_command(mut command: Command, dir: &Path) -> Child {
    let mut child = command.stdout(Stdio::null()).stderr(Stdio::piped()).spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        process::signal(&child, libc::SIGSTOP);
        let stopped = process::wait_until_stopped(&child);
        if stopped && !temporaries(dir).is_empty() {
            return child;
        }
        assert!(stopped, "tpde finished before it was seen writing: {:?}", child.wait_with_output());
        assert!(Instant::now() < deadline, "no temporary output appeared");
        process::signal(&child, libc::SIGCONT);
        std::thread::sleep(Duration::from_millis(1));
        let _ = child.try_wait();
    }
}

/// Regression: SIGTERM and SIGHUP left partial outputs behind; only SIGINT cleaned
/// up. After cleaning up, tpde ends as the signal would have ended it.
#[cfg(target_os = "linux")]
#[test]
fn every_terminating_signal_leaves_nothing_behind() {
    use std::os::unix::process::{CommandExt, ExitStatusExt};
    const SIGNALS: [libc::c_int; 5] = [libc::SIGTERM, libc::SIGHUP, libc::SIGINT, libc::SIGUSR1, libc::SIGALRM];
    let tmp = tempfile::tempdir().unwrap();
    let delta = big_standalone(tmp.path());
    let out = tmp.path().join("out.safetensors");
    for signal in SIGNALS {
        let mut command = Command::new(TPDE);
        command.args([Path::new("apply"), &delta, Path::new("-o"), &out]);
        // SAFETY: only signal(2), which is async-signal-safe, runs between fork and
        // exec. Default dispositions, in case this test runs under nohup or similar.
        unsafe {
            command.pre_exec(|| {
                for signal in SIGNALS {
                    libc::signal(signal, libc::SIG_DFL);
                }
                Ok(())
            });
        }
        let child = start_and_stop_mid_write_command(command, tmp.path());
        // Delivered when the process continues.
        process::signal(&child, signal);
        process::signal(&child, libc::SIGCONT);
        let status = child.wait_with_output().unwrap().status;
        assert_eq!(status.signal(), Some(signal), "signal {signal}: {status:?}");
        assert!(temporaries(tmp.path()).is_empty(), "signal {signal} left {:?}", temporaries(tmp.path()));
        assert!(!out.exists(), "signal {signal}");
    }
}

/// A signal that the parent ignores (`nohup` and SIGHUP) stays ignored: the run
/// goes on and completes.
#[cfg(target_os = "linux")]
#[test]
fn an_ignored_hangup_stays_ignored() {
    use std::os::unix::process::CommandExt;
    let tmp = tempfile::tempdir().unwrap();
    let delta = big_standalone(tmp.path());
    let out = tmp.path().join("out.safetensors");
    let mut command = Command::new(TPDE);
    command.args([Path::new("apply"), &delta, Path::new("-o"), &out]);
    // SAFETY: only signal(2), which is async-signal-safe, runs between fork and exec;
    // an ignored disposition survives exec, as with nohup.
    unsafe {
        command.pre_exec(|| {
            libc::signal(libc::SIGHUP, libc::SIG_IGN);
            Ok(())
        });
    }
    let child = start_and_stop_mid_write_command(command, tmp.path());
    process::signal(&child, libc::SIGHUP);
    process::signal(&child, libc::SIGCONT);
    let output = child.wait_with_output().unwrap();
    assert!(output.status.success(), "{output:?}");
    assert!(out.exists());
}

/// Regression: a directory created at OUT during a run was deleted by the final
/// rename, and two concurrent runs to one OUT both succeeded.
#[cfg(target_os = "linux")]
#[test]
fn what_appears_at_out_during_a_run_is_never_replaced() {
    let tmp = tempfile::tempdir().unwrap();
    let delta = big_standalone(tmp.path());
    let out = tmp.path().join("out.safetensors");
    for intruder_is_dir in [true, false] {
        let child = start_and_stop_mid_write(&[Path::new("apply"), &delta, Path::new("-o"), &out], tmp.path());
        if intruder_is_dir {
            fs::create_dir(&out).unwrap();
            fs::write(out.join("theirs"), b"theirs").unwrap();
        } else {
            fs::write(&out, b"theirs").unwrap();
        }
        process::signal(&child, libc::SIGCONT);
        assert_eq!(code_of(&child.wait_with_output().unwrap()), "E_OUTPUT_EXISTS");
        let theirs = if intruder_is_dir { out.join("theirs") } else { out.clone() };
        assert_eq!(fs::read(&theirs).unwrap(), b"theirs");
        assert!(temporaries(tmp.path()).is_empty());
        let _ = fs::remove_dir_all(&out).or_else(|_| fs::remove_file(&out));
    }

    // Two runs to one sharded OUT: the second to finish fails and leaves the
    // first one's output alone.
    let sharded = tmp.path().join("sharded");
    write_sharded(&sharded, 5);
    let sharded_delta = tmp.path().join("s.tpde");
    ok(&[Path::new("encode"), &sharded, Path::new("-o"), &sharded_delta]);
    let out_dir = tmp.path().join("out-dir");
    let first = start_and_stop_mid_write(&[Path::new("apply"), &sharded_delta, Path::new("-o"), &out_dir], tmp.path());
    ok(&[Path::new("apply"), &sharded_delta, Path::new("-o"), &out_dir]);
    let after_second = snapshot(&out_dir);
    process::signal(&first, libc::SIGCONT);
    assert_eq!(code_of(&first.wait_with_output().unwrap()), "E_OUTPUT_EXISTS");
    assert_eq!(snapshot(&out_dir), after_second);
    assert!(temporaries(tmp.path()).is_empty());
}
