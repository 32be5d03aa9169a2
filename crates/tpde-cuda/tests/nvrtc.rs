//! Every `kernels/*.cu` compiles with NVRTC, with no driver and no GPU: this
//! catches a kernel that no longer compiles and a broken `static_assert` on
//! the descriptor layout before a GPU machine sees them.
//!
//! It needs the NVRTC library, which `tools/test-all.sh` installs from PyPI
//! (`nvidia-cuda-nvrtc`, which ships `libnvrtc.so.13`) and puts on
//! `LD_LIBRARY_PATH` before it runs this test with `--ignored`.

use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions};

#[test]
#[ignore = "needs the NVRTC library (tools/test-all.sh installs it)"]
fn every_kernel_source_compiles_with_nvrtc() {
    // SAFETY: only probes whether the NVRTC shared library can be opened.
    assert!(
        unsafe { cudarc::nvrtc::sys::is_culib_present() },
        "no NVRTC library found (LD_LIBRARY_PATH={:?})",
        std::env::var("LD_LIBRARY_PATH")
    );
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../kernels");
    let mut sources: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "cu"))
        .collect();
    sources.sort();
    assert!(sources.len() >= 2, "kernels/*.cu: {sources:?}");
    for path in sources {
        let mut source = std::fs::read_to_string(&path).unwrap();
        // as kernels.rs's APPLY_PROGRAM: after the digest's device functions
        if path.ends_with("tpde_apply.cu") {
            let xxh3 = std::fs::read_to_string(path.with_file_name("tpde_xxh3.cu")).unwrap();
            source = format!("#define XXH3_DEVICE_FUNCTIONS_ONLY\n{xxh3}{source}");
        }
        // the layout checks of tpde_apply.cu must run here, not be skipped
        let options = CompileOptions {
            options: vec!["--std=c++17".into(), "-DREQUIRE_LAYOUT_CHECKS".into()],
            ..CompileOptions::default()
        };
        if let Err(e) = compile_ptx_with_opts(source, options) {
            panic!("{} does not compile: {e:?}", path.display());
        }
    }
}
