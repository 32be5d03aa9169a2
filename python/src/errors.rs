//! Every failure reaches Python as `tpde.TpdeError`, carrying the library's stable
//! code, so that callers match on `.code`, never on the message.

use pyo3::prelude::*;

pyo3::create_exception!(
    tpde,
    TpdeError,
    pyo3::exceptions::PyException,
    "A tpde failure. `.code` is the stable error code (such as \"E_BASE_MISMATCH\"); \
     `.file`, `.tensor` and `.chunk` say where, when known (else None)."
);

/// The Python exception for a library error: its one-line message, with the code,
/// file, tensor and chunk also as attributes.
pub fn to_py(err: &tpde::Error) -> PyErr {
    Python::attach(|py| {
        let exception = TpdeError::new_err(err.to_string());
        let value = exception.value(py);
        let located = value
            .setattr("code", err.code().as_str())
            .and_then(|()| value.setattr("file", err.file().map(|p| p.display().to_string())))
            .and_then(|()| value.setattr("tensor", err.tensor()))
            .and_then(|()| value.setattr("chunk", err.chunk()));
        // Setting attributes on a fresh exception fails only if Python is out of memory.
        located.err().unwrap_or(exception)
    })
}

/// A failure of work run with the GIL released, turned into `TpdeError` once the
/// GIL is held again.
pub trait Fault: Send {
    /// The Python exception.
    fn into_py(self) -> PyErr;
}

impl Fault for tpde::Error {
    fn into_py(self) -> PyErr {
        to_py(&self)
    }
}

/// `E_INVALID_ARGUMENT` for a caller's mistake found in the bindings.
pub fn invalid_argument(message: impl Into<String>) -> PyErr {
    to_py(&tpde::Error::new(tpde::ErrorCode::InvalidArgument, message))
}

/// A `TpdeError` with a code of the bindings' own (the GPU loader's failures that
/// are no fault of a file, such as `E_GPU_NO_DRIVER`), shaped like `to_py`'s.
pub fn coded(code: &str, message: &str) -> PyErr {
    Python::attach(|py| {
        let exception = TpdeError::new_err(format!("{code}: {message}"));
        let value = exception.value(py);
        let located = value
            .setattr("code", code)
            .and_then(|()| value.setattr("file", py.None()))
            .and_then(|()| value.setattr("tensor", py.None()))
            .and_then(|()| value.setattr("chunk", py.None()));
        located.err().unwrap_or(exception)
    })
}
