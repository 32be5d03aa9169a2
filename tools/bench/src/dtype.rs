//! Element types of the corpus: bit layouts by safetensors dtype name, and the
//! f32 → storage-dtype roundings the generator needs (BF16 and F16 come from
//! `half`; F8_E4M3 is done here so its bytes are exact and deterministic).

/// Sign/exponent/mantissa split of a floating-point dtype.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FloatLayout {
    /// Bits in the exponent field.
    pub exp_bits: u32,
    /// Bits in the mantissa field (the sign sits above the exponent).
    pub mant_bits: u32,
}

/// Bytes per element ("word") of a safetensors dtype. Unknown dtypes and the
/// packed sub-byte ones are handled as bytes.
pub fn word_bytes(dtype: &str) -> usize {
    match dtype {
        "F16" | "BF16" | "I16" | "U16" => 2,
        "F32" | "I32" | "U32" | "C64" => 4,
        "F64" | "I64" | "U64" => 8,
        _ => 1,
    }
}

/// Float layout of a dtype, or `None` for integer, bool and packed dtypes.
pub fn float_layout(dtype: &str) -> Option<FloatLayout> {
    let (exp_bits, mant_bits) = match dtype {
        "BF16" => (8, 7),
        "F16" => (5, 10),
        "F32" => (8, 23),
        "F64" => (11, 52),
        "F8_E4M3" => (4, 3),
        "F8_E5M2" => (5, 2),
        _ => return None,
    };
    Some(FloatLayout { exp_bits, mant_bits })
}

/// Largest finite F8_E4M3 (OCP "FN" variant: no infinities, S.1111.111 is NaN).
const E4M3_MAX: f32 = 448.0;

/// Rounds an f32 to F8_E4M3 (OCP E4M3FN): round to nearest, ties to even,
/// saturating to ±448 (infinities too), NaN → 0x7F with the sign kept.
pub fn f32_to_e4m3(x: f32) -> u8 {
    let sign: u8 = if x.is_sign_negative() { 0x80 } else { 0 };
    let a = x.abs();
    if a.is_nan() {
        return sign | 0x7F;
    }
    if a >= E4M3_MAX {
        return sign | 0x7E;
    }
    // Subnormals (exponent field 0) are multiples of 2^-9 below 2^-6. A value
    // that rounds up to 8 * 2^-9 = 2^-6 encodes as 0x08, the smallest normal,
    // so the integer is the code in both cases.
    if a < 2f32.powi(-6) {
        return sign | round_to_code(a * 512.0);
    }
    // Normal: a = q * 2^(e-3) with q in [8, 16). Scaling by a power of two is
    // exact, so the only rounding is the one to an integer q.
    let e = exponent_of(a);
    let mut q = round_to_code(a * 2f32.powi(3 - e));
    let mut e = e;
    if q == 16 {
        q = 8;
        e += 1;
    }
    // e ranges over -6..=8 here, so the biased exponent fits in 4 bits.
    let biased = u8::try_from(e + 7).unwrap_or(15);
    let code = (biased << 3) | (q - 8);
    // Rounding just below 448 can reach 480 (the NaN code); saturate instead.
    sign | code.min(0x7E)
}

/// Decodes an F8_E4M3 byte to f32 (exact); the tests use it as the oracle.
#[cfg(test)]
fn e4m3_to_f32(code: u8) -> f32 {
    let sign = if code & 0x80 != 0 { -1.0 } else { 1.0 };
    let exp = i32::from((code >> 3) & 0x0F);
    let mant = f32::from(code & 0x07);
    if exp == 15 && code & 0x07 == 7 {
        return f32::NAN;
    }
    if exp == 0 {
        sign * mant * 2f32.powi(-9)
    } else {
        sign * (1.0 + mant / 8.0) * 2f32.powi(exp - 7)
    }
}

/// floor(log2(a)) for a positive normal f32.
fn exponent_of(a: f32) -> i32 {
    let biased = (a.to_bits() >> 23) & 0xFF;
    // biased is 8 bits, so the conversion cannot fail.
    i32::try_from(biased).unwrap_or(0) - 127
}

/// Rounds a small non-negative f32 (< 17) to the nearest integer, ties to even.
fn round_to_code(v: f32) -> u8 {
    let r = v.round_ties_even();
    // Callers pass values in [0, 16.5), so the rounded value fits a u8.
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let code = r as u8;
    code
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e4m3_known_values() {
        let cases: &[(f32, u8)] = &[
            (0.0, 0x00),
            (-0.0, 0x80),
            (1.0, 0x38),
            (-1.0, 0xB8),
            (1.125, 0x39),
            // Midpoint of 1.0 and 1.125: ties to the even mantissa (1.0).
            (1.0625, 0x38),
            // Midpoint of 1.125 and 1.25: ties to the even mantissa (1.25).
            (1.1875, 0x3A),
            (448.0, 0x7E),
            (1000.0, 0x7E),
            (f32::INFINITY, 0x7E),
            (f32::NEG_INFINITY, 0xFE),
            (2f32.powi(-6), 0x08),
            (2f32.powi(-9), 0x01),
            // Half the smallest subnormal ties to even, i.e. to zero.
            (2f32.powi(-10), 0x00),
            (1.5 * 2f32.powi(-10), 0x01),
            (7.5 * 2f32.powi(-9), 0x08),
            (0.1, 0x1D),
            (-3.3, 0xC5),
        ];
        for &(x, want) in cases {
            assert_eq!(f32_to_e4m3(x), want, "f32_to_e4m3({x})");
        }
        assert_eq!(f32_to_e4m3(f32::NAN), 0x7F);
    }

    #[test]
    fn e4m3_round_trips_every_finite_code() {
        for code in 0u8..=255 {
            if code & 0x7F == 0x7F {
                assert!(e4m3_to_f32(code).is_nan());
                continue;
            }
            assert_eq!(f32_to_e4m3(e4m3_to_f32(code)), code, "code {code:#04x}");
        }
    }

    #[test]
    fn e4m3_is_nearest() {
        // Brute force: the chosen code is never farther than another finite code.
        let finite: Vec<f32> = (0u8..=0x7E).map(e4m3_to_f32).collect();
        let mut x = 0.0f32;
        while x < 460.0 {
            let got = e4m3_to_f32(f32_to_e4m3(x));
            let best = finite.iter().map(|c| (c - x).abs()).fold(f32::INFINITY, f32::min);
            assert!((got - x).abs() <= best, "x={x} got={got}");
            x += 0.013;
        }
    }

    #[test]
    fn layouts() {
        assert_eq!(word_bytes("BF16"), 2);
        assert_eq!(word_bytes("F8_E4M3"), 1);
        assert_eq!(float_layout("BF16").map(|l| l.mant_bits), Some(7));
        assert_eq!(float_layout("I32"), None);
    }
}
