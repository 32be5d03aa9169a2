//! Memory of NumPy arrays, read and written in place through the array interface
//! protocol (`__array_interface__`), which the stable ABI allows where the buffer
//! protocol does not (it joined the limited API only in Python 3.11).

use pyo3::prelude::*;
use pyo3::types::{PyDict, PyTuple};

use crate::errors::invalid_argument;

/// The bytes of a C-contiguous array, kept alive by a reference to the array.
///
/// The caller must not resize or write the array while tpde uses it (numpy refuses
/// to resize an array that others reference; writes are the caller's promise).
pub struct HostBuffer {
    ptr: *mut u8,
    len: usize,
    // Keeps the memory alive: the array interface promises that the pointer stays
    // valid as long as the object lives.
    _owner: Py<PyAny>,
}

// SAFETY: the buffer is plain memory owned by the Python object, which `_owner`
// keeps alive; it is not tied to the thread that created it, and `Py<PyAny>` is
// itself Send and Sync.
unsafe impl Send for HostBuffer {}
// SAFETY: shared access only reads (`AsRef`); writes need `&mut self`.
unsafe impl Sync for HostBuffer {}

impl HostBuffer {
    /// The memory of `array`, which must be C-contiguous, and writable when
    /// `writable` is asked for.
    pub fn new(array: &Bound<'_, PyAny>, writable: bool) -> PyResult<Self> {
        let interface = array
            .getattr("__array_interface__")
            .map_err(|_| invalid_argument("expected a NumPy array (an object with __array_interface__)"))?
            .cast_into::<PyDict>()?;
        let item = |key: &str| -> PyResult<Bound<'_, PyAny>> {
            interface.get_item(key)?.ok_or_else(|| invalid_argument(format!("__array_interface__ lacks {key:?}")))
        };
        if !item("strides")?.is_none() {
            return Err(invalid_argument("the array is not C-contiguous"));
        }
        let (address, readonly): (usize, bool) = item("data")?.cast_into::<PyTuple>()?.extract()?;
        if writable && readonly {
            return Err(invalid_argument("the array is read-only"));
        }
        let typestr: String = item("typestr")?.extract()?;
        let item_bytes: usize = typestr
            .get(2..)
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| invalid_argument(format!("cannot read the item size of {typestr:?}")))?;
        let shape: Vec<usize> = item("shape")?.extract()?;
        let len = shape
            .iter()
            .try_fold(item_bytes, |acc, &d| acc.checked_mul(d))
            .ok_or_else(|| invalid_argument("the array's size overflows"))?;
        Ok(Self { ptr: address as *mut u8, len, _owner: array.clone().unbind() })
    }

    /// The bytes, for writing.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        if self.len == 0 {
            return &mut [];
        }
        // SAFETY: the array interface promises `len` bytes at `ptr`, alive while the
        // owner lives, and `new` checked that they are writable; `&mut self` keeps
        // this the only slice that tpde holds.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.len) }
    }
}

impl AsRef<[u8]> for HostBuffer {
    fn as_ref(&self) -> &[u8] {
        if self.len == 0 {
            return &[];
        }
        // SAFETY: the array interface promises `len` readable bytes at `ptr`, alive
        // while the owner lives.
        unsafe { std::slice::from_raw_parts(self.ptr, self.len) }
    }
}
