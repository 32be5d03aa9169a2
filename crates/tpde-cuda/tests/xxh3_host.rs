//! The device XXH3-128 of `kernels/tpde_xxh3.cu`, compiled for the host with
//! the system C++ compiler and checked against `xxhash-rust` (the library's
//! digest, spec §10) on every length up to 300 bytes, on long inputs around
//! the block and stripe boundaries, and at several alignments. The host form
//! is built from the same functions as the kernels, in their two passes (the
//! block terms of `leaf_terms` into a table, the fold of `leaf_fold`, then
//! the same finish and merge), so this proves their arithmetic without a GPU.

mod host_cxx;

use std::io::Write;
use std::path::Path;
use std::process::Command;

use xxhash_rust::xxh3::xxh3_128;

const SOURCE: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels/tpde_xxh3.cu");

/// Reads `data.bin`, then one `offset length` pair per line of stdin, and
/// prints each range's XXH3-128 as 32 hex digits (high half first).
const HARNESS: &str = r#"
#include <cstdio>
#include <vector>
int main(int argc, char** argv) {
    if (argc != 2) return 2;
    FILE* f = std::fopen(argv[1], "rb");
    if (!f) return 2;
    std::vector<xu8> data;
    int c;
    while ((c = std::fgetc(f)) != EOF) data.push_back((xu8)c);
    std::fclose(f);
    unsigned long long offset, len;
    while (std::scanf("%llu %llu", &offset, &len) == 2) {
        if (offset + len > data.size()) return 3;
        xu64 lo, hi;
        xxh3_128_host(data.data() + offset, len, &lo, &hi);
        std::printf("%016llx%016llx\n", hi, lo);
    }
    return 0;
}
"#;

fn compile(dir: &Path) -> std::path::PathBuf {
    let source = std::fs::canonicalize(SOURCE).expect("kernels/tpde_xxh3.cu exists");
    let program = format!("#include \"{}\"\n{HARNESS}", source.display());
    host_cxx::compile(dir, &program, &["-std=c++17", "-O2", "-Wall", "-Wextra", "-Werror"])
}

#[test]
fn the_kernel_xxh3_matches_the_library_digest_on_the_host() {
    let dir = tempfile::tempdir().unwrap();
    let exe = compile(dir.path());
    // Bytes that look random, so every lane sees distinct words.
    let mut x = 0x9E37_79B9_7F4A_7C15u64;
    let data: Vec<u8> = (0..(1 << 20) + 64)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x.to_le_bytes()[5]
        })
        .collect();
    std::fs::write(dir.path().join("data.bin"), &data).unwrap();
    let mut ranges: Vec<(usize, usize)> = Vec::new();
    for offset in [0, 1, 3, 7, 8] {
        ranges.extend((0..=300).map(|len| (offset, len)));
        for len in [1023, 1024, 1025, 1088, 2047, 2048, 2049, 16 * 1024 + 1, 65 * 1024 + 63, 1 << 20] {
            ranges.push((offset, len));
        }
    }
    let input: String = ranges.iter().map(|(o, l)| format!("{o} {l}\n")).collect();
    let mut child = Command::new(&exe)
        .arg(dir.path().join("data.bin"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child.stdin.take().unwrap().write_all(input.as_bytes()).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<&str> = std::str::from_utf8(&out.stdout).unwrap().lines().collect();
    assert_eq!(lines.len(), ranges.len());
    for ((offset, len), line) in ranges.iter().zip(lines) {
        let expected = format!("{:032x}", xxh3_128(&data[*offset..offset + len]));
        assert_eq!(line, expected, "XXH3-128 of {len} bytes at offset {offset}");
    }
}
