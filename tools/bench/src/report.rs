//! Rendering BENCHMARKS.md from the measured cases.

use std::fmt::Write as _;
use std::process::Command;

use crate::bench::{to_f64, CaseResult, Outcome, RowResult};
use crate::methods::Family;

/// Facts about the run printed at the top of the report.
pub struct RunInfo {
    /// The command that regenerates the report.
    pub command: String,
    /// Seed of the corpus.
    pub seed: u64,
    /// Model description line.
    pub model: String,
    /// Threads given to the tools.
    pub threads: usize,
    /// /proc/loadavg at the start of the run: other work on the machine
    /// slows every row alike but skews absolute throughput.
    pub load_at_start: String,
    /// Tool name → version line (or why it is missing).
    pub versions: Vec<(String, String)>,
}

/// Renders the whole report.
pub fn render(info: &RunInfo, cases: &[CaseResult], probe: Option<&CaseResult>) -> String {
    let mut s = String::new();
    let _ = writeln!(s, "# tpde benchmarks\n");
    let _ = writeln!(
        s,
        "Regenerate with:\n\n```sh\n{}\n```\n\nThe corpus is synthetic and seeded (seed {}); see `tools/bench/README.md` for \
         what each case models and how each baseline is implemented. All numbers on this page \
         come from one run on one machine.\n",
        info.command, info.seed
    );
    machine_section(&mut s, info);
    legend(&mut s);
    summary(&mut s, cases);
    for c in cases {
        case_section(&mut s, c);
    }
    memory_section(&mut s, cases, probe);
    s
}

fn machine_section(s: &mut String, info: &RunInfo) {
    let _ = writeln!(s, "## Machine and tools\n");
    let _ = writeln!(s, "| item | value |\n|---|---|");
    let _ = writeln!(s, "| CPU | {} |", cpu_model());
    let _ = writeln!(
        s,
        "| cores | {} logical (tools run with {} threads) |",
        std::thread::available_parallelism().map_or(0, usize::from),
        info.threads
    );
    let _ = writeln!(s, "| RAM | {} |", mem_total());
    let _ = writeln!(s, "| load average (1/5/15 min) at start / end | {} / {} |", info.load_at_start, load_average());
    let _ = writeln!(s, "| model | {} |", info.model);
    for (tool, v) in &info.versions {
        let _ = writeln!(s, "| {tool} | {} |", v.replace('|', "\\|"));
    }
    let _ = writeln!(s);
}

fn legend(s: &mut String) {
    let _ = writeln!(
        s,
        "## How to read the tables\n\n\
- **ratio** = compressed bytes / target bytes (lower is better); the smallest ratio of a case is **bold**.\n\
- **enc MB/s** and **dec MB/s** = target bytes (10^6) per second of wall time of the compress and restore commands, \
including process start and file I/O.\n\
- **peak anon** = peak `RssAnon` of the process in MiB, sampled from `/proc/<pid>/status` every 2 ms \
(page cache of memory-mapped inputs is not counted).\n\
- Every row was restored and compared byte for byte with the original (every shard for sharded cases); \
a row that did not restore exactly says so instead of showing numbers.\n\
- **vs best baseline**: how much smaller tpde's output is than the smallest baseline output of the case \
(negative: larger). \"Best baseline\" is the smallest of all baselines, standalone and delta, at every level; \
the standalone tpde row is compared with the best standalone baseline.\n\
- Byte-level tools (zstd, xdelta3, zipnn, lmz) get a sharded checkpoint as one file: its shards and \
index concatenated in name order. BitX, PULSE, TRL and tpde read the shard directory.\n"
    );
}

fn summary(s: &mut String, cases: &[CaseResult]) {
    let _ = writeln!(s, "## Summary\n");
    let _ = writeln!(
        s,
        "| case | target | changed | best baseline | its ratio | tpde ratio | tpde vs best | tpde encode / zstd -3 compress | tpde apply / zstd -d |\n|---|---|---|---|---|---|---|---|---|"
    );
    for c in cases {
        let best = best_baseline(c);
        let tpde = tpde_default(c);
        let (bname, bratio) = best
            .map_or(("n/a".to_string(), "n/a".to_string()), |(r, b)| (r.name.clone(), ratio_str(b, c.target_bytes)));
        let (tratio, vs) = match (tpde, best) {
            (Some((_, tb)), Some((_, bb))) => (ratio_str(tb, c.target_bytes), pct_smaller(tb, bb)),
            (Some((_, tb)), None) => (ratio_str(tb, c.target_bytes), "n/a".into()),
            _ => (tpde_note(c), "n/a".into()),
        };
        let (enc_x, dec_x) = speed_vs_zstd(c);
        let _ = writeln!(
            s,
            "| {} | {} | {:.2}% | {} | {} | {} | {} | {} | {} |",
            c.spec.name,
            mb(c.target_bytes),
            100.0 * c.change.fraction(),
            bname,
            bratio,
            tratio,
            vs,
            enc_x,
            dec_x
        );
    }
    let _ = writeln!(
        s,
        "\nSpeed columns are same-run ratios of throughput: above 1.00× means tpde is faster than zstd \
on the same target.\n"
    );
}

fn case_section(s: &mut String, c: &CaseResult) {
    let p = c.change.fraction();
    let _ = writeln!(s, "## {}\n", c.spec.name);
    let _ = writeln!(s, "{}.\n", capitalise(c.spec.about));
    let _ = writeln!(
        s,
        "Target: {} ({} parameters{}); {} of {} words changed ({:.3}%).\n",
        mb(c.target_bytes),
        c.params,
        if c.spec.sharded() { ", 3 shards + index" } else { "" },
        c.change.changed,
        c.change.words,
        100.0 * p
    );
    position_cost_lines(s, c);
    let best_bytes = c.rows.iter().filter_map(ok_bytes).min().unwrap_or(u64::MAX);
    let best_base = best_baseline(c).map(|(_, b)| b);
    let best_standalone =
        c.rows.iter().filter(|r| !r.is_tpde && r.family == Family::Standalone).filter_map(ok_bytes).min();
    let _ = writeln!(
        s,
        "| method | kind | size | ratio | enc MB/s | dec MB/s | enc peak anon | dec peak anon | vs best baseline |\n|---|---|---|---|---|---|---|---|---|"
    );
    for r in &c.rows {
        let kind = match r.family {
            Family::Standalone => "target only",
            Family::Delta => "delta",
        };
        match &r.outcome {
            Outcome::Ok { bytes, enc, dec } => {
                let ratio = ratio_str(*bytes, c.target_bytes);
                let ratio = if *bytes == best_bytes { format!("**{ratio}**") } else { ratio };
                // Standalone tpde is compared with standalone baselines only.
                let reference = match r.family {
                    Family::Delta => best_base,
                    Family::Standalone => best_standalone,
                };
                let vs = match (r.is_tpde, reference) {
                    (true, Some(b)) => pct_smaller(*bytes, b),
                    _ => String::new(),
                };
                let _ = writeln!(
                    s,
                    "| {} | {kind} | {} | {ratio} | {} | {} | {} | {} | {vs} |",
                    r.name,
                    mb(*bytes),
                    rate(c.target_bytes, enc.wall.as_secs_f64()),
                    rate(c.target_bytes, dec.wall.as_secs_f64()),
                    mib(enc.peak_anon),
                    mib(dec.peak_anon),
                );
            }
            Outcome::Unavailable(why) => {
                let _ = writeln!(s, "| {} | {kind} | not available: {} | | | | | | |", r.name, one_line(why));
            }
            Outcome::Failed(why) => {
                let _ = writeln!(s, "| {} | {kind} | FAILED: {} | | | | | | |", r.name, one_line(why));
            }
        }
    }
    let _ = writeln!(s);
}

/// Ideal vs achieved bits per changed element for the position part.
fn position_cost_lines(s: &mut String, c: &CaseResult) {
    let p = c.change.fraction();
    if p <= 0.0 || p >= 0.5 {
        return;
    }
    let h = -(p * p.log2() + (1.0 - p) * (1.0 - p).log2());
    let _ = write!(s, "Position cost per changed element: ideal for independent changes H(p)/p = {:.2} bits", h / p);
    // The smaller PULSE output is the better estimate of what gaps cost.
    let pulse = c
        .rows
        .iter()
        .filter(|r| r.name.starts_with("PULSE"))
        .filter_map(|r| r.stats.zip(ok_bytes(r)))
        .min_by_key(|(_, bytes)| *bytes);
    if let Some((st, _)) = pulse.filter(|(st, _)| st.changed_words > 0) {
        let _ = write!(s, "; PULSE gaps+zstd {:.2} bits", 8.0 * to_f64(st.position_bytes) / to_f64(st.changed_words));
    }
    match c.rows.iter().find(|r| r.is_tpde && r.family == Family::Delta).and_then(|r| r.tpde_positions.as_ref()) {
        Some(Ok(pc)) if pc.sparse_changed > 0 => {
            let _ = write!(
                s,
                "; tpde {:.2} bits (sparse chunks: {:.1}% of the changed words)",
                8.0 * to_f64(pc.position_bytes) / to_f64(pc.sparse_changed),
                100.0 * to_f64(pc.sparse_changed) / to_f64(pc.changed.max(1))
            );
        }
        Some(Ok(_)) => {
            let _ = write!(s, "; tpde coded no chunk as sparse");
        }
        Some(Err(e)) => {
            let _ = write!(s, "; tpde: could not read its tables ({})", one_line(e));
        }
        None => {
            let _ = write!(s, "; tpde: {}", tpde_note(c));
        }
    }
    let _ = writeln!(s, ".\n");
}

fn memory_section(s: &mut String, cases: &[CaseResult], probe: Option<&CaseResult>) {
    let Some(big) = probe else { return };
    let Some(small) = cases.iter().find(|c| c.spec.name == "finetune-bf16") else {
        return;
    };
    let _ = writeln!(s, "## Memory flatness\n");
    let _ = writeln!(
        s,
        "The same fine-tune at two model sizes: {} and {} of target ({:.1}×). Flat means the peak stays \
put while the model grows.\n",
        mb(small.target_bytes),
        mb(big.target_bytes),
        to_f64(big.target_bytes) / to_f64(small.target_bytes.max(1))
    );
    let _ = writeln!(
        s,
        "| method | phase | peak anon at {} | peak anon at {} | growth |\n|---|---|---|---|---|",
        mb(small.target_bytes),
        mb(big.target_bytes)
    );
    for r in &big.rows {
        let Some(sr) = small.rows.iter().find(|x| x.name == r.name) else {
            continue;
        };
        match (&sr.outcome, &r.outcome) {
            (Outcome::Ok { enc: se, dec: sd, .. }, Outcome::Ok { enc: be, dec: bd, .. }) => {
                for (phase, a, b) in [("encode", se, be), ("restore", sd, bd)] {
                    let growth = to_f64(b.peak_anon) / to_f64(a.peak_anon.max(1));
                    let _ = writeln!(
                        s,
                        "| {} | {phase} | {} | {} | {growth:.2}× |",
                        r.name,
                        mib(a.peak_anon),
                        mib(b.peak_anon)
                    );
                }
            }
            (_, Outcome::Unavailable(why)) | (_, Outcome::Failed(why)) => {
                let _ = writeln!(s, "| {} | | {} | | |", r.name, one_line(why));
            }
            _ => {}
        }
    }
    let _ = writeln!(s);
}

fn ok_bytes(r: &RowResult) -> Option<u64> {
    match r.outcome {
        Outcome::Ok { bytes, .. } => Some(bytes),
        _ => None,
    }
}

fn best_baseline(c: &CaseResult) -> Option<(&RowResult, u64)> {
    c.rows.iter().filter(|r| !r.is_tpde).filter_map(|r| ok_bytes(r).map(|b| (r, b))).min_by_key(|(_, b)| *b)
}

fn tpde_default(c: &CaseResult) -> Option<(&RowResult, u64)> {
    c.rows.iter().find(|r| r.is_tpde && r.family == Family::Delta).and_then(|r| ok_bytes(r).map(|b| (r, b)))
}

fn tpde_note(c: &CaseResult) -> String {
    match c.rows.iter().find(|r| r.is_tpde && r.family == Family::Delta).map(|r| &r.outcome) {
        Some(Outcome::Unavailable(_)) => "not available".into(),
        Some(Outcome::Failed(_)) => "failed".into(),
        _ => "n/a".into(),
    }
}

fn speed_vs_zstd(c: &CaseResult) -> (String, String) {
    let zstd = c.rows.iter().find(|r| r.name.starts_with("zstd -3 -T") && r.family == Family::Standalone);
    match (tpde_default(c), zstd.map(|r| &r.outcome)) {
        (Some((t, _)), Some(Outcome::Ok { enc: ze, dec: zd, .. })) => {
            let Outcome::Ok { enc, dec, .. } = &t.outcome else {
                return ("n/a".into(), "n/a".into());
            };
            (
                format!("{:.2}×", ze.wall.as_secs_f64() / enc.wall.as_secs_f64()),
                format!("{:.2}×", zd.wall.as_secs_f64() / dec.wall.as_secs_f64()),
            )
        }
        _ => ("n/a".into(), "n/a".into()),
    }
}

fn ratio_str(bytes: u64, target: u64) -> String {
    let r = to_f64(bytes) / to_f64(target.max(1));
    if r < 0.001 {
        format!("{:.4}% ({:.0}×)", 100.0 * r, 1.0 / r.max(1e-12))
    } else {
        format!("{:.2}% ({:.2}×)", 100.0 * r, 1.0 / r)
    }
}

fn pct_smaller(tpde: u64, best: u64) -> String {
    let d = 100.0 * (1.0 - to_f64(tpde) / to_f64(best.max(1)));
    format!("{d:+.1}%")
}

fn mb(bytes: u64) -> String {
    let b = to_f64(bytes);
    if b >= 1e6 {
        format!("{:.2} MB", b / 1e6)
    } else {
        format!("{:.1} KB", b / 1e3)
    }
}

fn mib(bytes: u64) -> String {
    format!("{:.1} MiB", to_f64(bytes) / (1024.0 * 1024.0))
}

fn rate(bytes: u64, secs: f64) -> String {
    format!("{:.1}", to_f64(bytes) / 1e6 / secs.max(1e-9))
}

fn one_line(s: &str) -> String {
    let s = s.replace(['\n', '|'], " ");
    if s.len() > 160 {
        let mut end = 160;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        format!("{}…", &s[..end])
    } else {
        s
    }
}

fn capitalise(s: &str) -> String {
    let mut c = s.chars();
    c.next().map(|f| f.to_uppercase().collect::<String>() + c.as_str()).unwrap_or_default()
}

fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

/// The 1, 5 and 15 minute load averages.
pub fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "unknown".into())
}

fn mem_total() -> String {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|t| {
            let line = t.lines().find(|l| l.starts_with("MemTotal:"))?;
            let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
            Some(format!("{:.1} GiB", to_f64(kib) / (1024.0 * 1024.0)))
        })
        .unwrap_or_else(|| "unknown".into())
}

/// First line of `program args...` stdout (or stderr), or why it failed.
pub fn version_of(program: &str, args: &[&str]) -> String {
    match Command::new(program).args(args).output() {
        Ok(o) => {
            let text = if o.stdout.is_empty() { o.stderr } else { o.stdout };
            let text = String::from_utf8_lossy(&text);
            let line = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("").trim();
            if line.is_empty() {
                format!("(no output from `{program} {}`)", args.join(" "))
            } else {
                // Keep the version, drop banners and copyright notices.
                let line = line.trim_matches('*').trim();
                line.split(", Copyright").next().unwrap_or(line).to_string()
            }
        }
        Err(e) => format!("not found ({e})"),
    }
}
