//! The methods compared, as command lines: external tools, the in-process
//! baselines (run as a hidden subcommand of this binary so they are
//! measured exactly like the external tools), and tpde itself.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::baselines::Method;

/// Whether a method needs the base.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// Compresses the target alone.
    Standalone,
    /// Encodes the target against the base.
    Delta,
}

/// Paths one method run works with.
#[derive(Clone, Debug)]
pub struct Io {
    /// Base checkpoint (a concatenated file for byte-level tools).
    pub base: PathBuf,
    /// Target checkpoint (a concatenated file for byte-level tools).
    pub target: PathBuf,
    /// Where the compressed output goes.
    pub delta: PathBuf,
    /// Where the restored checkpoint goes.
    pub restored: PathBuf,
}

/// A command plus where its stdout should go, if anywhere.
pub struct Invocation {
    /// The command.
    pub cmd: Command,
    /// File to receive stdout.
    pub stdout: Option<PathBuf>,
}

impl From<Command> for Invocation {
    fn from(cmd: Command) -> Self {
        Self { cmd, stdout: None }
    }
}

type Build = Box<dyn Fn(&Io) -> Invocation>;

/// One row of a results table.
pub struct MethodSpec {
    /// Display name.
    pub name: String,
    /// File-name friendly name.
    pub slug: String,
    /// Standalone or delta.
    pub family: Family,
    /// Whether this row is tpde (not a baseline).
    pub is_tpde: bool,
    /// Whether the tool takes checkpoints as they are (directories for
    /// sharded cases) rather than one concatenated byte file.
    pub understands_checkpoints: bool,
    /// Whether the method writes a stats JSON beside the delta.
    pub writes_stats: bool,
    /// Command that compresses.
    pub encode: Build,
    /// Command that restores.
    pub decode: Build,
    /// Set when the tool is missing; the row is reported, not run.
    pub unavailable: Option<String>,
}

/// Settings that decide which rows exist and how they run.
pub struct Toolchain {
    /// The tpde binary, or why it cannot be used.
    pub tpde: Result<PathBuf, String>,
    /// `--level` used for tpde's max-level row.
    pub tpde_max_level: i32,
    /// Threads given to every tool that takes a thread count.
    pub threads: usize,
    /// This binary, for the in-process baselines.
    pub self_exe: PathBuf,
    /// Python interpreter for zipnn, or why it cannot be used.
    pub zipnn: Result<PathBuf, String>,
    /// The lmz CLI (from the lmzip package), or why it cannot be used.
    pub lmz: Result<PathBuf, String>,
    /// Whether the zstd -19 class rows run.
    pub max_levels: bool,
    /// Script that drives zipnn.
    pub zipnn_script: PathBuf,
}

fn spec(
    name: &str,
    family: Family,
    encode: impl Fn(&Io) -> Invocation + 'static,
    decode: impl Fn(&Io) -> Invocation + 'static,
) -> MethodSpec {
    MethodSpec {
        name: name.to_string(),
        slug: name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }).collect(),
        family,
        is_tpde: false,
        understands_checkpoints: false,
        writes_stats: false,
        encode: Box::new(encode),
        decode: Box::new(decode),
        unavailable: None,
    }
}

fn cmd(program: impl AsRef<std::ffi::OsStr>, args: &[&dyn AsRef<std::ffi::OsStr>]) -> Command {
    let mut c = Command::new(program);
    for a in args {
        c.arg(a);
    }
    c
}

/// The rows for one case. `base_len` sizes xdelta3's source window.
/// `zipnn_dtype` is the dominant float dtype of the target, as zipnn wants it.
pub fn methods(tc: &Toolchain, base_len: u64, zipnn_dtype: &str) -> Vec<MethodSpec> {
    let t = format!("-T{}", tc.threads);
    let mut rows = Vec::new();

    // Standalone rows: the target on its own.
    for (level, long) in [(3, None), (19, Some(27))] {
        if level == 19 && !tc.max_levels {
            continue;
        }
        let long_flag = long.map(|w| format!("--long={w}"));
        let name = match long {
            Some(w) => format!("zstd -{level} --long={w} {t} (target only)"),
            None => format!("zstd -{level} {t} (target only)"),
        };
        let (t2, lf, lf2) = (t.clone(), long_flag.clone(), long_flag);
        rows.push(spec(
            &name,
            Family::Standalone,
            move |io| {
                let mut c = cmd("zstd", &[&format!("-{level}"), &t2, &"-q", &"-f"]);
                c.args(lf.iter());
                c.arg(&io.target).arg("-o").arg(&io.delta);
                c.into()
            },
            move |io| {
                let mut c = cmd("zstd", &[&"-d", &"-q", &"-f"]);
                c.args(lf2.iter());
                c.arg(&io.delta).arg("-o").arg(&io.restored);
                c.into()
            },
        ));
    }
    {
        let (py, script, dt) = (tc.zipnn.clone(), tc.zipnn_script.clone(), zipnn_dtype.to_string());
        let (py2, script2, dt2, threads) = (py.clone(), script.clone(), dt.clone(), tc.threads);
        let mut row = spec(
            "zipnn (target only)",
            Family::Standalone,
            move |io| {
                let p = py.clone().unwrap_or_default();
                let mut c = cmd(p, &[&script, &"compress", &io.target, &io.delta, &dt]);
                c.arg(threads.to_string());
                c.into()
            },
            move |io| {
                let p = py2.clone().unwrap_or_default();
                let mut c = cmd(p, &[&script2, &"decompress", &io.delta, &io.restored, &dt2]);
                c.arg(threads.to_string());
                c.into()
            },
        );
        row.unavailable = tc.zipnn.as_ref().err().cloned();
        rows.push(row);
    }
    {
        let (l1, l2, j1, j2) = (tc.lmz.clone(), tc.lmz.clone(), tc.threads.to_string(), tc.threads.to_string());
        let mut row = spec(
            "lmzip `lmz compress` (target only)",
            Family::Standalone,
            move |io| {
                let p = l1.clone().unwrap_or_default();
                cmd(p, &[&"compress", &"-q", &"-f", &"-j", &j1, &io.target, &io.delta]).into()
            },
            move |io| {
                let p = l2.clone().unwrap_or_default();
                cmd(p, &[&"decompress", &"-q", &"-f", &"-j", &j2, &io.delta, &io.restored]).into()
            },
        );
        row.unavailable = tc.lmz.as_ref().err().cloned();
        rows.push(row);
    }
    rows.push(tpde_row(tc, "tpde encode (target only)", Family::Standalone, None));

    // Delta rows.
    for level in [3, 19] {
        if level == 19 && !tc.max_levels {
            continue;
        }
        let t2 = t.clone();
        rows.push(spec(
            &format!("zstd -{level} --long=31 --patch-from {t}"),
            Family::Delta,
            move |io| {
                let mut c = cmd("zstd", &[&format!("-{level}"), &t2, &"-q", &"-f", &"--long=31"]);
                c.arg(patch_from(&io.base)).arg(&io.target).arg("-o").arg(&io.delta);
                c.into()
            },
            |io| {
                let mut c = cmd("zstd", &[&"-d", &"-q", &"-f", &"--long=31"]);
                c.arg(patch_from(&io.base)).arg(&io.delta).arg("-o").arg(&io.restored);
                c.into()
            },
        ));
    }
    // xdelta3 only matches within its source window (64 MiB by default), so
    // the window is widened to the whole base, capped at xdelta3's limit.
    let window = base_len.next_power_of_two().clamp(1 << 24, 1 << 30).to_string();
    for level in [None, Some(9)] {
        if level.is_some() && !tc.max_levels {
            continue;
        }
        let (w1, w2) = (window.clone(), window.clone());
        let name = match level {
            Some(l) => format!("xdelta3 -{l} -e -s BASE"),
            None => "xdelta3 -e -s BASE".to_string(),
        };
        rows.push(spec(
            &name,
            Family::Delta,
            move |io| {
                let mut c = cmd("xdelta3", &[&"-e", &"-f", &"-B", &w1]);
                if let Some(l) = level {
                    c.arg(format!("-{l}"));
                }
                c.arg("-s").arg(&io.base).arg(&io.target).arg(&io.delta);
                c.into()
            },
            move |io| cmd("xdelta3", &[&"-d", &"-f", &"-B", &w2, &"-s", &io.base, &io.delta, &io.restored]).into(),
        ));
    }
    for (method, label) in [(Method::Bitx, "BitX"), (Method::Pulse, "PULSE")] {
        for level in [3, 19] {
            if level == 19 && !tc.max_levels {
                continue;
            }
            rows.push(internal_row(tc, &format!("{label} (zstd -{level})"), method, level));
        }
    }
    rows.push(internal_row(tc, "HF TRL raw (int32 index + value)", Method::Trl, 0));
    rows.push(tpde_row(tc, "tpde (default level)", Family::Delta, None));
    rows.push(tpde_row(tc, &format!("tpde (--level {})", tc.tpde_max_level), Family::Delta, Some(tc.tpde_max_level)));
    rows
}

fn patch_from(base: &Path) -> std::ffi::OsString {
    let mut s = std::ffi::OsString::from("--patch-from=");
    s.push(base);
    s
}

fn internal_row(tc: &Toolchain, name: &str, method: Method, level: i32) -> MethodSpec {
    let (exe, exe2) = (tc.self_exe.clone(), tc.self_exe.clone());
    let threads = tc.threads.to_string();
    let threads2 = threads.clone();
    let method_name = format!("{method:?}").to_lowercase();
    let mut row = spec(
        name,
        Family::Delta,
        move |io| {
            let mut c = cmd(&exe, &[&"internal-encode", &"--method", &method_name]);
            c.args(["--level", &level.to_string(), "--threads", &threads]);
            c.arg(&io.base).arg(&io.target).arg(&io.delta);
            c.into()
        },
        move |io| {
            let mut c = cmd(&exe2, &[&"internal-decode", &"--threads", &threads2]);
            c.arg(&io.base).arg(&io.delta).arg(&io.restored);
            c.into()
        },
    );
    row.understands_checkpoints = true;
    row.writes_stats = true;
    row
}

fn tpde_row(tc: &Toolchain, name: &str, family: Family, level: Option<i32>) -> MethodSpec {
    let exe = tc.tpde.clone().unwrap_or_default();
    let exe2 = exe.clone();
    let threads = tc.threads.to_string();
    let threads2 = threads.clone();
    let mut row = spec(
        name,
        family,
        move |io| {
            let mut c = cmd(&exe, &[&"encode"]);
            if family == Family::Delta {
                c.arg(&io.base);
            }
            c.arg(&io.target).arg("-o").arg(&io.delta);
            c.args(["--threads", &threads, "--force"]);
            if let Some(l) = level {
                c.args(["--level", &l.to_string()]);
            }
            c.into()
        },
        move |io| {
            let mut c = cmd(&exe2, &[&"apply"]);
            if family == Family::Delta {
                c.arg(&io.base);
            }
            c.arg(&io.delta).arg("-o").arg(&io.restored);
            c.args(["--threads", &threads2, "--force"]);
            c.into()
        },
    );
    row.is_tpde = true;
    row.understands_checkpoints = true;
    row.unavailable = tc.tpde.as_ref().err().cloned();
    row
}
