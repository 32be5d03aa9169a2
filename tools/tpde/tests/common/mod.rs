//! Helpers shared by the command's integration tests: running `tpde`, reading the
//! stable code of a failure, and deterministic test bytes.
// Each test binary uses its own subset.
#![allow(dead_code)]

use std::ffi::OsStr;
use std::process::{Command, Output, Stdio};
use std::time::Duration;

/// The `tpde` binary under test.
pub const TPDE: &str = env!("CARGO_BIN_EXE_tpde");

/// Runs `tpde ARGS…` to completion. A run that has not ended after a minute is
/// killed and fails the test, so that a hang is a failure rather than a stuck suite.
pub fn run<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    let mut child = Command::new(TPDE)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("tpde runs");
    for _ in 0..600 {
        if child.try_wait().expect("wait").is_some() {
            return child.wait_with_output().expect("output");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    child.kill().expect("kill");
    panic!("tpde {args:?} hung");
}

/// Runs a command that must succeed, and returns its output.
pub fn ok<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> Output {
    let out = run(args);
    assert!(out.status.success(), "tpde {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    out
}

/// The stable code of a failed run, from the last line of stderr (`tpde: E_...:
/// message`); notices about leftovers may come before it.
pub fn code_of(out: &Output) -> String {
    assert!(!out.status.success(), "tpde should have failed");
    let stderr = String::from_utf8_lossy(&out.stderr);
    let last = stderr.lines().last().unwrap_or_default();
    let code = last.trim_start_matches("tpde: ").split(':').next().unwrap_or_default();
    assert!(code.starts_with("E_"), "a stable code: {stderr}");
    code.to_owned()
}

/// Runs a command that must fail, and returns the stable code it printed.
pub fn error_code<S: AsRef<OsStr> + std::fmt::Debug>(args: &[S]) -> String {
    code_of(&run(args))
}

/// Deterministic bytes: a xorshift stream.
pub fn noise(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[5]
        })
        .collect()
}
