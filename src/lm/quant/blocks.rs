//! Block formats: 32 weights per block with their scale (and, for Q4_1, minimum), as in
//! llama.cpp's GGUF files, and activations quantized per block of 32 to int8.
//!
//! * `Q8_0`: `w = d · q`, `q` in −127..=127 (files may hold −128), 34 bytes per block on disk.
//! * `Q4_0`: `w = d · (q − 8)`, `q` in 0..=15, two per byte (element `i` in the low nibble of
//!   byte `i`, element `i + 16` in the high nibble), 18 bytes per block on disk.
//! * `Q4_1`: `w = d · q + m`, same packing, 20 bytes per block on disk.
//!
//! In memory scales are f32 and a `Q4_0` block is stored as `Q4_1` with `m = −8 d`, so one
//! kernel serves both. Two more of llama.cpp's formats decode exactly into these blocks:
//!
//! * `Q5_0`: `w = d · (q − 16)`, `q` in 0..=31 (four low bits packed as `Q4_0`, the fifth bits
//!   in a 32-bit mask), 22 bytes per block on disk: an 8-bit block with `q − 16` in −16..=15.
//! * `Q4_K`: super-blocks of 256 weights (144 bytes on disk): f16 `d` and `dmin`, eight
//!   6-bit sub-block scales `s_j` and minimums `m_j`, 4-bit `q`; sub-block `j` is
//!   `w = (d s_j) · q − (dmin m_j)`, a 4-bit block with scale `d s_j` and minimum
//!   `−dmin m_j`. Both products are exact in f32 (11 × 6 significant bits), so the
//!   weights are llama.cpp's own, bit for bit.

/// Weights per block.
pub(crate) const BLOCK: usize = 32;

/// A block of 32 int8 weights and their scale.
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ8 {
    pub(crate) d: f32,
    pub(crate) qs: [i8; BLOCK],
}

/// A block of 32 4-bit weights (`w = d · q + m`).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockQ4 {
    pub(crate) d: f32,
    pub(crate) m: f32,
    /// Element `i` in the low nibble of byte `i`, element `i + 16` in the high nibble.
    pub(crate) qs: [u8; BLOCK / 2],
}

/// A block of 32 activations quantized to int8, with `sum = d · Σ q` (the term a block's
/// minimum multiplies).
#[derive(Debug, Clone, Copy)]
#[repr(C)]
pub(crate) struct BlockX {
    pub(crate) d: f32,
    pub(crate) sum: f32,
    pub(crate) qs: [i8; BLOCK],
}

/// `v.round()` (half away from zero) for `|v| < 2²³`, written with `trunc`, which compiles
/// to one vector instruction where `round` is a libm call per element. Adding the largest
/// f32 below ½ never carries a value below a half to the next integer, and a half is
/// carried exactly (the sum rounds up to the integer).
#[inline(always)]
fn round_half_away(v: f32) -> f32 {
    const BELOW_HALF: f32 = 0.499_999_97;
    (v.abs() + BELOW_HALF).trunc().copysign(v)
}

/// Round-to-nearest int8 quantization of 32 values with scale `max |x| / 127`.
#[inline(always)]
fn quantize_i8(x: &[f32]) -> (f32, [i8; BLOCK]) {
    let amax = x.iter().fold(0f32, |m, v| m.max(v.abs()));
    let d = amax / 127.0;
    let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
    let mut qs = [0i8; BLOCK];
    for (q, v) in qs.iter_mut().zip(x) {
        *q = round_half_away(v * inv).clamp(-127.0, 127.0) as i8;
    }
    (d, qs)
}

impl BlockQ8 {
    /// Quantize 32 weights.
    pub(crate) fn quantize(x: &[f32]) -> Self {
        let (d, qs) = quantize_i8(x);
        Self { d, qs }
    }

    /// The 32 weights.
    pub(crate) fn dequantize(&self, out: &mut [f32]) {
        for (o, &q) in out.iter_mut().zip(&self.qs) {
            *o = self.d * f32::from(q);
        }
    }

    /// A GGUF `Q8_0` block: f16 scale, 32 int8.
    pub(crate) fn from_gguf(b: &[u8]) -> Self {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let mut qs = [0i8; BLOCK];
        for (q, &v) in qs.iter_mut().zip(&b[2..2 + BLOCK]) {
            *q = v as i8;
        }
        Self { d, qs }
    }

    /// A GGUF `Q5_0` block (f16 scale, the fifth bits as a little-endian `u32`, 16 bytes of
    /// low nibbles packed as in `Q4_0`): `w = d · (q − 16)` held exactly as `d · i8`.
    pub(crate) fn from_gguf_q5_0(b: &[u8]) -> Self {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let high = u32::from_le_bytes([b[2], b[3], b[4], b[5]]);
        let mut qs = [0i8; BLOCK];
        for (j, &byte) in b[6..6 + BLOCK / 2].iter().enumerate() {
            // Element `j`'s fifth bit is bit `j` of the mask, element `j + 16`'s bit `j + 16`.
            let lo = (byte & 0x0F) | (((high >> j) & 1) as u8) << 4;
            let hi = (byte >> 4) | (((high >> (j + 16)) & 1) as u8) << 4;
            qs[j] = lo as i8 - 16;
            qs[j + BLOCK / 2] = hi as i8 - 16;
        }
        Self { d, qs }
    }
}

/// Weights per `Q4_K` super-block.
pub(crate) const SUPER_BLOCK: usize = 256;
/// Bytes of a `Q4_K` super-block on disk.
pub(crate) const Q4_K_BYTES: usize = 144;

/// The 6-bit scale and minimum of sub-block `j` of a `Q4_K` super-block, from its 12 bytes
/// of packed scales: sub-blocks 0–3 in the low six bits of bytes `j` and `j + 4`; 4–7 as
/// four low bits in byte `j + 4` (scale low nibble, minimum high nibble) and two high bits
/// in the top bits of bytes `j − 4` (scale) and `j` (minimum).
fn q4_k_scale_min(j: usize, packed: &[u8]) -> (u8, u8) {
    if j < 4 {
        (packed[j] & 63, packed[j + 4] & 63)
    } else {
        (
            (packed[j + 4] & 0x0F) | ((packed[j - 4] >> 6) << 4),
            (packed[j + 4] >> 4) | ((packed[j] >> 6) << 4),
        )
    }
}

impl BlockQ4 {
    /// A GGUF `Q4_K` super-block as its eight 4-bit blocks (see the module's note). The
    /// nibbles come in runs of 64 weights: 32 bytes whose low nibbles are the first 32
    /// weights and high nibbles the next 32; they are repacked to this type's order.
    pub(crate) fn from_gguf_q4_k(b: &[u8]) -> [Self; SUPER_BLOCK / BLOCK] {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let dmin = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
        let packed = &b[4..16];
        let nibbles = &b[16..Q4_K_BYTES];
        std::array::from_fn(|j| {
            let (s, m) = q4_k_scale_min(j, packed);
            let run = &nibbles[(j / 2) * 32..(j / 2) * 32 + 32];
            let q = |i: usize| {
                if j % 2 == 0 {
                    run[i] & 0x0F
                } else {
                    run[i] >> 4
                }
            };
            let mut qs = [0u8; BLOCK / 2];
            for (i, byte) in qs.iter_mut().enumerate() {
                *byte = q(i) | (q(i + BLOCK / 2) << 4);
            }
            Self {
                d: d * f32::from(s),
                m: -(dmin * f32::from(m)),
                qs,
            }
        })
    }
    /// Quantize 32 weights to `Q4_1` (`d = (max − min) / 15`, `m = min`).
    pub(crate) fn quantize(x: &[f32]) -> Self {
        let (lo, hi) = x
            .iter()
            .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
                (a.min(v), b.max(v))
            });
        let d = (hi - lo) / 15.0;
        let inv = if d > 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| ((v - lo) * inv).round().clamp(0.0, 15.0) as u8;
        let mut qs = [0u8; BLOCK / 2];
        for (i, byte) in qs.iter_mut().enumerate() {
            *byte = q(x[i]) | (q(x[i + BLOCK / 2]) << 4);
        }
        Self { d, m: lo, qs }
    }

    /// Quantize 32 weights to `Q4_0` as llama.cpp does: `d = −w* / 8` for the weight `w*` of
    /// largest magnitude (so that it maps to level 0 exactly), `q = round(w / d) + 8`.
    pub(crate) fn quantize_q4_0(x: &[f32]) -> Self {
        let extreme = x
            .iter()
            .fold(0f32, |m, &v| if v.abs() > m.abs() { v } else { m });
        let d = extreme / -8.0;
        let inv = if d != 0.0 { 1.0 / d } else { 0.0 };
        let q = |v: f32| (v * inv + 8.5).clamp(0.0, 15.0) as u8;
        let mut qs = [0u8; BLOCK / 2];
        for (i, byte) in qs.iter_mut().enumerate() {
            *byte = q(x[i]) | (q(x[i + BLOCK / 2]) << 4);
        }
        Self { d, m: -8.0 * d, qs }
    }

    /// The 32 weights.
    pub(crate) fn dequantize(&self, out: &mut [f32]) {
        for (i, &b) in self.qs.iter().enumerate() {
            out[i] = self.d * f32::from(b & 0x0F) + self.m;
            out[i + BLOCK / 2] = self.d * f32::from(b >> 4) + self.m;
        }
    }

    /// A GGUF `Q4_0` block: f16 scale, 16 bytes of nibbles (`w = d · (q − 8)`).
    pub(crate) fn from_gguf_q4_0(b: &[u8]) -> Self {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let mut qs = [0u8; BLOCK / 2];
        qs.copy_from_slice(&b[2..2 + BLOCK / 2]);
        Self { d, m: -8.0 * d, qs }
    }

    /// A GGUF `Q4_1` block: f16 scale, f16 minimum, 16 bytes of nibbles.
    pub(crate) fn from_gguf_q4_1(b: &[u8]) -> Self {
        let d = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
        let m = half::f16::from_le_bytes([b[2], b[3]]).to_f32();
        let mut qs = [0u8; BLOCK / 2];
        qs.copy_from_slice(&b[4..4 + BLOCK / 2]);
        Self { d, m, qs }
    }
}

impl BlockX {
    /// Quantize 32 activations. Activations are quantized at every product, so the loop is
    /// also compiled for AVX2 (chosen at run time), where `round` becomes a vector
    /// instruction instead of a libm call per element; both give the same bits.
    pub(crate) fn quantize(x: &[f32]) -> Self {
        #[cfg(target_arch = "x86_64")]
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has AVX2 (checked just above).
            return unsafe { Self::quantize_avx2(x) };
        }
        Self::quantize_body(x)
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx2")]
    unsafe fn quantize_avx2(x: &[f32]) -> Self {
        Self::quantize_body(x)
    }

    #[inline(always)]
    fn quantize_body(x: &[f32]) -> Self {
        let (d, qs) = quantize_i8(x);
        let s: i32 = qs.iter().map(|&q| i32::from(q)).sum();
        Self {
            d,
            sum: d * s as f32,
            qs,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The rounding equals `f32::round` at every half, its neighbours and a fine grid of the
    /// range quantization uses.
    #[test]
    fn rounding_is_round_half_away_from_zero() {
        let mut values = Vec::new();
        for i in -260..=260 {
            let half = i as f32 * 0.5;
            values.extend([half, half.next_up(), half.next_down()]);
        }
        values.extend((-100_000..=100_000).map(|i| i as f32 * 0.001_3));
        for v in values {
            assert_eq!(round_half_away(v).to_bits(), v.round().to_bits(), "{v}");
        }
    }

    /// The AVX2 build of the activation quantization gives the bits of the portable one,
    /// ties included (`round` rounds half away from zero in both).
    #[test]
    fn activation_quantization_is_the_same_in_every_build() {
        // max |x| = 127 makes the scale 1, so the halves below are exact ties.
        let mut x: Vec<f32> = (0..BLOCK).map(|i| i as f32 - 15.5).collect();
        x[0] = 127.0;
        x[1] = -0.5;
        x[2] = 2.5;
        let portable = BlockX::quantize_body(&x);
        assert_eq!(portable.qs[1], -1);
        assert_eq!(portable.qs[2], 3);
        assert_eq!(portable.qs[3], -13, "−12.5 rounds away from zero");
        let chosen = BlockX::quantize(&x);
        assert_eq!(chosen.qs, portable.qs);
        assert_eq!(chosen.d.to_bits(), portable.d.to_bits());
        assert_eq!(chosen.sum.to_bits(), portable.sum.to_bits());
        // Random-looking values too.
        let y: Vec<f32> = (0..BLOCK)
            .map(|i| ((i * 37 % 23) as f32 - 11.3) * 0.173)
            .collect();
        let (a, b) = (BlockX::quantize(&y), BlockX::quantize_body(&y));
        assert_eq!((a.qs, a.d.to_bits()), (b.qs, b.d.to_bits()));
    }
}
