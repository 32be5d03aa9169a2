//! Test support: kernel sources built for the host with the system C++
//! compiler (`$CXX`, else `c++`), warnings as errors.
#![allow(dead_code)] // each harness takes what it needs

use std::path::{Path, PathBuf};
use std::process::Command;

/// Flags of a harness that runs blocks on CPU threads (`std::barrier`).
pub const THREADED: &[&str] =
    &["-std=c++20", "-O1", "-pthread", "-Wall", "-Wextra", "-Werror", "-Wno-unused-parameter", "-Wno-unknown-pragmas"];

/// Writes `program` to `dir/harness.cpp`, compiles it with `flags`, and
/// returns the executable's path; the compiler's errors fail the test.
pub fn compile(dir: &Path, program: &str, flags: &[&str]) -> PathBuf {
    let src = dir.join("harness.cpp");
    std::fs::write(&src, program).unwrap();
    let exe = dir.join("harness");
    let compiler = std::env::var("CXX").unwrap_or_else(|_| "c++".to_string());
    let out = Command::new(&compiler)
        .args(flags)
        .arg("-o")
        .arg(&exe)
        .arg(&src)
        .output()
        .unwrap_or_else(|e| panic!("cannot run the C++ compiler `{compiler}`: {e}"));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    exe
}
