//! Safetensors files built by hand for the tests, byte for byte, so that a test
//! controls what the `safetensors` crate would normalise.
// Each test binary uses its own subset.
#![allow(dead_code)]

/// One tensor to write.
#[derive(Debug, Clone)]
pub struct Tensor {
    pub name: String,
    pub dtype: &'static str,
    pub shape: Vec<u64>,
    pub bytes: Vec<u8>,
}

/// A safetensors file holding `tensors` in order; `extra` is spliced into every
/// tensor object (members that readers ignore).
pub fn safetensors_with(tensors: &[Tensor], extra: &str) -> Vec<u8> {
    let mut offset = 0;
    let entries: Vec<String> = tensors
        .iter()
        .map(|t| {
            let end = offset + t.bytes.len();
            let entry = format!(
                "{}:{{{extra}\"dtype\":\"{}\",\"shape\":{:?},\"data_offsets\":[{offset},{end}]}}",
                serde_json::to_string(&t.name).expect("a string"),
                t.dtype,
                t.shape
            );
            offset = end;
            entry
        })
        .collect();
    let mut header = format!("{{{}}}", entries.join(","));
    while header.len() % 8 != 0 {
        header.push(' ');
    }
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(header.as_bytes());
    for t in tensors {
        out.extend_from_slice(&t.bytes);
    }
    out
}

/// A safetensors file holding `tensors` in order.
pub fn safetensors(tensors: &[Tensor]) -> Vec<u8> {
    safetensors_with(tensors, "")
}
