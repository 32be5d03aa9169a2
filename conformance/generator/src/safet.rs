//! Safetensors files written by hand, so that the bytes (key order, padding,
//! `__metadata__`) are exactly what the case asks for.

use std::collections::BTreeMap;

/// One tensor: name, dtype string, shape and its little-endian bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tensor {
    /// The tensor's name.
    pub name: String,
    /// The safetensors dtype string.
    pub dtype: &'static str,
    /// The shape.
    pub shape: Vec<u64>,
    /// The raw bytes.
    pub bytes: Vec<u8>,
}

impl Tensor {
    /// A tensor; panics if the byte length does not fit the dtype and shape.
    pub fn new(name: &str, dtype: &'static str, shape: &[u64], bytes: Vec<u8>) -> Self {
        let expected = byte_len(dtype, shape);
        assert_eq!(bytes.len() as u64, expected, "tensor {name}: {dtype} {shape:?}");
        Self { name: name.to_owned(), dtype, shape: shape.to_vec(), bytes }
    }
}

/// Bits per element of each dtype (spec §7).
pub fn bits(dtype: &str) -> u64 {
    match dtype {
        "F4" => 4,
        "F6_E2M3" | "F6_E3M2" => 6,
        "BOOL" | "U8" | "I8" | "F8_E5M2" | "F8_E4M3" | "F8_E8M0" => 8,
        "I16" | "U16" | "F16" | "BF16" => 16,
        "I32" | "U32" | "F32" => 32,
        "C64" | "F64" | "I64" | "U64" => 64,
        other => panic!("unknown dtype {other}"),
    }
}

/// Word width of each dtype (spec §7).
pub fn word_bytes(dtype: &str) -> usize {
    match dtype {
        "C64" => 4,
        d => usize::try_from(bits(d).div_ceil(8)).expect("small"),
    }
}

/// Bytes of a tensor.
pub fn byte_len(dtype: &str, shape: &[u64]) -> u64 {
    let elements: u64 = shape.iter().product();
    let b = elements * bits(dtype);
    assert_eq!(b % 8, 0, "{dtype} {shape:?} is not whole bytes");
    b / 8
}

/// A whole safetensors file and its JSON header text (padding included), with the
/// tensors in the given order and the header padded with spaces to 8 bytes.
pub fn file(tensors: &[Tensor], metadata: Option<&BTreeMap<String, String>>) -> (Vec<u8>, String) {
    let mut header = String::from("{");
    let mut first = true;
    if let Some(meta) = metadata {
        header.push_str("\"__metadata__\":");
        header.push_str(&serde_json::to_string(meta).expect("strings"));
        first = false;
    }
    let mut offset = 0u64;
    for t in tensors {
        if !first {
            header.push(',');
        }
        first = false;
        let end = offset + t.bytes.len() as u64;
        header.push_str(&format!(
            "{}:{{\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{offset},{end}]}}",
            serde_json::to_string(&t.name).expect("a string"),
            t.dtype,
            serde_json::to_string(&t.shape).expect("numbers"),
        ));
        offset = end;
    }
    header.push('}');
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for t in tensors {
        out.extend_from_slice(&t.bytes);
    }
    (out, header)
}

/// A safetensors file from a header text (padded with spaces to 8 bytes) and data.
pub fn raw_file(header: &str, data: &[u8]) -> Vec<u8> {
    let mut header = header.to_owned();
    while !header.len().is_multiple_of(8) {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    out.extend_from_slice(data);
    out
}

/// One tensor object's JSON member, `extra` spliced in before `dtype`.
pub fn member(t: &Tensor, offset: u64, extra: &str) -> String {
    format!(
        "{}:{{{extra}\"dtype\":\"{}\",\"shape\":{},\"data_offsets\":[{offset},{}]}}",
        serde_json::to_string(&t.name).expect("a string"),
        t.dtype,
        serde_json::to_string(&t.shape).expect("numbers"),
        offset + t.bytes.len() as u64,
    )
}
