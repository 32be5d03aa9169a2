//! Without a CUDA driver the crate returns a typed error and never panics.

use tpde_cuda::{driver_present, Gpu, GpuError};

#[test]
fn opening_a_gpu_without_a_driver_is_a_typed_error() {
    let r = std::panic::catch_unwind(|| Gpu::new(0));
    let r = r.expect("Gpu::new must not panic");
    if driver_present() {
        // A machine with a driver: any failure must not claim a missing driver.
        assert!(!matches!(r, Err(GpuError::NoDriver)));
    } else {
        let e = r.expect_err("no driver, yet a GPU opened");
        assert!(matches!(e, GpuError::NoDriver), "{e}");
        assert_eq!(e.code(), "gpu.no_driver");
    }
}

#[test]
fn a_missing_device_ordinal_is_a_typed_error() {
    let e = Gpu::new(4096).expect_err("no machine has 4097 GPUs");
    assert!(matches!(e, GpuError::NoDriver | GpuError::NoDevice { ordinal: 4096 }), "{e}");
}
