//! IEEE 754 binary16 (`f16`) and bfloat16 (`bf16`) conversions, written by hand.
//!
//! Both directions round to nearest, ties to even, and keep infinities and NaN (a NaN stays a
//! NaN; its payload is not preserved). These scalar routines are the reference the SIMD
//! kernels (F16C `vcvtph2ps`) are tested against.

/// Converts the bits of an IEEE binary16 value to `f32` (exact: every f16 is an f32).
#[inline]
pub fn f16_to_f32(bits: u16) -> f32 {
    let sign = ((bits as u32) & 0x8000) << 16;
    let exponent = ((bits >> 10) & 0x1f) as u32;
    let mantissa = (bits & 0x3ff) as u32;
    let magnitude = if exponent == 0 {
        // Zero or subnormal: mantissa * 2^-24, exact in f32.
        return f32::from_bits(sign) + sign_of(sign) * (mantissa as f32) * (1.0 / 16_777_216.0);
    } else if exponent == 0x1f {
        0x7f80_0000 | (mantissa << 13)
    } else {
        ((exponent + 112) << 23) | (mantissa << 13)
    };
    f32::from_bits(sign | magnitude)
}

#[inline]
fn sign_of(sign_bit: u32) -> f32 {
    if sign_bit != 0 {
        -1.0
    } else {
        1.0
    }
}

/// Converts `f32` to IEEE binary16 bits, rounding to nearest even; overflow gives infinity.
#[inline]
pub fn f32_to_f16(value: f32) -> u16 {
    let bits = value.to_bits();
    let sign = ((bits >> 16) & 0x8000) as u16;
    let exponent = ((bits >> 23) & 0xff) as i32;
    let mantissa = bits & 0x7f_ffff;
    if exponent == 0xff {
        // Infinity or NaN (keep NaN quiet and non-zero).
        return sign | 0x7c00 | if mantissa != 0 { 0x200 } else { 0 };
    }
    let unbiased = exponent - 127;
    if unbiased > 15 {
        return sign | 0x7c00;
    }
    if unbiased >= -14 {
        // Normal f16: drop 13 mantissa bits with round-to-nearest-even; a carry may roll into
        // the exponent, which is exactly right (and gives infinity past the top).
        let half_exponent = (unbiased + 15) as u32;
        let combined = (half_exponent << 10) | (mantissa >> 13);
        let rest = mantissa & 0x1fff;
        let round_up = rest > 0x1000 || (rest == 0x1000 && (combined & 1) == 1);
        return sign | (combined + round_up as u32) as u16;
    }
    if unbiased < -25 {
        return sign; // Rounds to zero.
    }
    // Subnormal f16: value = m * 2^-24 with m < 1024.
    let full = mantissa | 0x80_0000; // 24-bit significand, value = full * 2^(unbiased-23)
    let shift = (-unbiased - 14 + 13) as u32; // bits to drop so the unit is 2^-24
    let kept = full >> shift;
    let rest = full & ((1u32 << shift) - 1);
    let halfway = 1u32 << (shift - 1);
    let round_up = rest > halfway || (rest == halfway && (kept & 1) == 1);
    sign | (kept + round_up as u32) as u16
}

/// Converts the bits of a bfloat16 value to `f32` (exact).
#[inline]
pub fn bf16_to_f32(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// Converts `f32` to bfloat16 bits, rounding to nearest even; NaN stays NaN.
#[inline]
pub fn f32_to_bf16(value: f32) -> u16 {
    let bits = value.to_bits();
    if value.is_nan() {
        return ((bits >> 16) | 0x40) as u16;
    }
    let round = 0x7fff + ((bits >> 16) & 1);
    (bits.wrapping_add(round) >> 16) as u16
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f16_round_trips_every_finite_value() {
        for bits in 0u16..=u16::MAX {
            let value = f16_to_f32(bits);
            if value.is_nan() {
                assert!(f16_to_f32(f32_to_f16(value)).is_nan());
            } else {
                assert_eq!(f32_to_f16(value), bits, "bits {bits:#06x} value {value}");
            }
        }
    }

    #[test]
    fn f16_known_values() {
        assert_eq!(f16_to_f32(0x3c00), 1.0);
        assert_eq!(f16_to_f32(0xc000), -2.0);
        assert_eq!(f16_to_f32(0x7bff), 65504.0);
        assert_eq!(f16_to_f32(0x0001), 5.960_464_5e-8);
        assert_eq!(f32_to_f16(65520.0), 0x7c00); // rounds up to infinity
        assert_eq!(f32_to_f16(1.0 + 1.0 / 2048.0), 0x3c00); // tie to even (down)
        assert_eq!(f32_to_f16(1.0 + 3.0 / 2048.0), 0x3c02); // tie to even (up)
        assert_eq!(f32_to_f16(1e-9), 0);
        assert_eq!(f32_to_f16(-0.0), 0x8000);
    }

    #[test]
    fn f16_rounding_matches_f64_nearest() {
        // Every f32 between two neighbouring f16 values must go to the nearer one.
        let mut x = 1.0e-8f32;
        while x < 65504.0 {
            let h = f32_to_f16(x);
            let back = f16_to_f32(h) as f64;
            let err = (back - x as f64).abs();
            if h > 0 {
                let below = f16_to_f32(h - 1) as f64;
                assert!(
                    err <= (below - x as f64).abs(),
                    "{x} h={h:#x} back={back} below={below}"
                );
            }
            if h < 0x7c00 {
                let above = f16_to_f32(h + 1) as f64;
                assert!(err <= (above - x as f64).abs(), "{x}");
            }
            x *= 1.013;
        }
    }

    #[test]
    fn bf16_round_trip_and_rounding() {
        for bits in 0u16..=u16::MAX {
            let value = bf16_to_f32(bits);
            if !value.is_nan() {
                assert_eq!(f32_to_bf16(value), bits);
            }
        }
        assert_eq!(f32_to_bf16(1.0 + 1.0 / 256.0), 0x3f80); // tie to even
        assert!(bf16_to_f32(f32_to_bf16(f32::NAN)).is_nan());
    }
}
