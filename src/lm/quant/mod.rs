//! Quantized weight matrices multiplied without dequantizing: 8- and 4-bit blocks of 32
//! weights (llama.cpp's `Q8_0`, `Q4_0`, `Q4_1`; its `Q5_0` and `Q4_K` decode exactly into
//! them, see `blocks.rs`), activations quantized per block of 32 to
//! int8, integer dot products with f32 accumulation. The kernel is chosen at run time from
//! the CPU's features (`dot.rs`): AVX2, VNNI (256-bit `vpdpbusd`) and AVX-512 with VNNI
//! (512-bit two-by-four kernels) where present, all with the AVX2 kernels' sums; a portable
//! scalar kernel elsewhere. `SMC_STEER_CPU_KERNELS` caps them (`crate::lm::cpu`).

mod blocks;
mod dot;

use rayon::prelude::*;

use crate::lm::columns::ColumnWriter;

pub(crate) use blocks::BLOCK;
use blocks::{BlockQ4, BlockQ8, BlockX, Q4_K_BYTES, SUPER_BLOCK};

/// A block format a [`QMatrix`] is quantized into (or, from a file, decoded into).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum QFormat {
    /// 8-bit weights, one scale per block.
    Q8_0,
    /// 4-bit weights, one scale per block (stored as `Q4_1` with `m = −8 d`).
    Q4_0,
    /// 4-bit weights, scale and minimum per block.
    Q4_1,
}

/// A block type of GGUF files that is read without requantizing: each decodes exactly into
/// the blocks of one [`QFormat`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum GgufBlocks {
    Q8_0,
    Q4_0,
    Q4_1,
    /// 5-bit weights, held as 8-bit blocks.
    Q5_0,
    /// 256-weight super-blocks with 6-bit sub-block scales, held as `Q4_1` blocks.
    Q4K,
}

impl GgufBlocks {
    /// The format the blocks are held in.
    pub(crate) fn format(self) -> QFormat {
        match self {
            GgufBlocks::Q8_0 | GgufBlocks::Q5_0 => QFormat::Q8_0,
            GgufBlocks::Q4_0 => QFormat::Q4_0,
            GgufBlocks::Q4_1 | GgufBlocks::Q4K => QFormat::Q4_1,
        }
    }

    /// Weights and bytes per block on disk.
    fn block(self) -> (usize, usize) {
        match self {
            GgufBlocks::Q8_0 => (BLOCK, 34),
            GgufBlocks::Q4_0 => (BLOCK, 18),
            GgufBlocks::Q4_1 => (BLOCK, 20),
            GgufBlocks::Q5_0 => (BLOCK, 22),
            GgufBlocks::Q4K => (SUPER_BLOCK, Q4_K_BYTES),
        }
    }
}

#[derive(Debug, Clone)]
enum Rows {
    Q8(Vec<BlockQ8>),
    Q4(Vec<BlockQ4>),
}

/// A weight matrix `W: [rows, cols]` (`rows` outputs, `cols` inputs, `cols` a multiple of
/// 32) in 8- or 4-bit blocks, each row's blocks contiguous. (Which format the blocks came
/// from does not matter once they are held: `Q4_0` and `Q4_K` are `Q4_1` blocks, `Q5_0`
/// `Q8_0` blocks.)
#[derive(Debug, Clone)]
pub(crate) struct QMatrix {
    rows: usize,
    cols: usize,
    data: Rows,
}

/// Output rows per parallel task: enough work per task to amortise scheduling, small enough
/// to spread a 576-row matrix over every core.
const ROWS_PER_TASK: usize = 16;
/// Element counts below which the activation quantization runs on the calling thread (a
/// parallel region costs more than the work).
const SERIAL_BELOW: usize = 1 << 14;

impl QMatrix {
    /// Quantize a row-major f32 matrix. `None` when `cols` is not a multiple of 32 or the
    /// data has the wrong length.
    pub(crate) fn quantize(format: QFormat, w: &[f32], rows: usize, cols: usize) -> Option<Self> {
        if !cols.is_multiple_of(BLOCK) || w.len() != rows * cols {
            return None;
        }
        let chunks = w.par_chunks_exact(BLOCK);
        let data = match format {
            QFormat::Q8_0 => Rows::Q8(chunks.map(BlockQ8::quantize).collect()),
            QFormat::Q4_0 => Rows::Q4(chunks.map(BlockQ4::quantize_q4_0).collect()),
            QFormat::Q4_1 => Rows::Q4(chunks.map(BlockQ4::quantize).collect()),
        };
        Some(Self { rows, cols, data })
    }

    /// A matrix from GGUF block data. `None` when `cols` is not a multiple of the block
    /// size or the length does not match.
    pub(crate) fn from_gguf(
        kind: GgufBlocks,
        bytes: &[u8],
        rows: usize,
        cols: usize,
    ) -> Option<Self> {
        let (per_block, size) = kind.block();
        let expected = rows.checked_mul(cols / per_block)?.checked_mul(size)?;
        if !cols.is_multiple_of(per_block) || bytes.len() != expected {
            return None;
        }
        let blocks = bytes.chunks_exact(size);
        let data = match kind {
            GgufBlocks::Q8_0 => Rows::Q8(blocks.map(BlockQ8::from_gguf).collect()),
            GgufBlocks::Q5_0 => Rows::Q8(blocks.map(BlockQ8::from_gguf_q5_0).collect()),
            GgufBlocks::Q4_0 => Rows::Q4(blocks.map(BlockQ4::from_gguf_q4_0).collect()),
            GgufBlocks::Q4_1 => Rows::Q4(blocks.map(BlockQ4::from_gguf_q4_1).collect()),
            GgufBlocks::Q4K => Rows::Q4(blocks.flat_map(BlockQ4::from_gguf_q4_k).collect()),
        };
        Some(Self { rows, cols, data })
    }

    /// `[rows, cols]`.
    pub(crate) fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// Bytes held in memory.
    pub(crate) fn bytes(&self) -> usize {
        match &self.data {
            Rows::Q8(b) => std::mem::size_of_val(b.as_slice()),
            Rows::Q4(b) => std::mem::size_of_val(b.as_slice()),
        }
    }

    /// The matrix as row-major f32 (for tests and accuracy reports).
    pub(crate) fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        let chunks = out.chunks_exact_mut(BLOCK);
        match &self.data {
            Rows::Q8(b) => chunks.zip(b).for_each(|(o, b)| b.dequantize(o)),
            Rows::Q4(b) => chunks.zip(b).for_each(|(o, b)| b.dequantize(o)),
        }
        out
    }

    /// Rows `ids` as row-major f32 (embedding lookups). `None` for a row out of range.
    pub(crate) fn rows_f32(&self, ids: &[u32]) -> Option<Vec<f32>> {
        let nb = self.cols / BLOCK;
        let mut out = vec![0f32; ids.len() * self.cols];
        for (&id, row) in ids.iter().zip(out.chunks_exact_mut(self.cols)) {
            let r = id as usize;
            if r >= self.rows {
                return None;
            }
            let chunks = row.chunks_exact_mut(BLOCK);
            match &self.data {
                Rows::Q8(b) => chunks
                    .zip(&b[r * nb..(r + 1) * nb])
                    .for_each(|(o, b)| b.dequantize(o)),
                Rows::Q4(b) => chunks
                    .zip(&b[r * nb..(r + 1) * nb])
                    .for_each(|(o, b)| b.dequantize(o)),
            }
        }
        Some(out)
    }

    /// Several matrices with the same `cols` and block width stacked by rows (fused
    /// projections).
    pub(crate) fn stack(parts: &[&QMatrix]) -> Option<Self> {
        let first = parts.first()?;
        // Blocks of one layout stack whatever format they came from (`Q4_0` and `Q4_K`
        // rows are `Q4_1` blocks in memory).
        let layout = |m: &QMatrix| matches!(m.data, Rows::Q8(_));
        if parts
            .iter()
            .any(|p| p.cols != first.cols || layout(p) != layout(first))
        {
            return None;
        }
        let rows = parts.iter().map(|p| p.rows).sum();
        let data = match &first.data {
            Rows::Q8(_) => Rows::Q8(
                parts
                    .iter()
                    .flat_map(|p| match &p.data {
                        Rows::Q8(b) => b.clone(),
                        Rows::Q4(_) => Vec::new(),
                    })
                    .collect(),
            ),
            Rows::Q4(_) => Rows::Q4(
                parts
                    .iter()
                    .flat_map(|p| match &p.data {
                        Rows::Q4(b) => b.clone(),
                        Rows::Q8(_) => Vec::new(),
                    })
                    .collect(),
            ),
        };
        Some(Self {
            rows,
            cols: first.cols,
            data,
        })
    }

    /// Rows `[from, from + n)` as a matrix of their own. `None` when out of range.
    pub(crate) fn slice_rows(&self, from: usize, n: usize) -> Option<Self> {
        if from + n > self.rows {
            return None;
        }
        let nb = self.cols / BLOCK;
        let range = from * nb..(from + n) * nb;
        let data = match &self.data {
            Rows::Q8(b) => Rows::Q8(b[range].to_vec()),
            Rows::Q4(b) => Rows::Q4(b[range].to_vec()),
        };
        Some(Self {
            rows: n,
            cols: self.cols,
            data,
        })
    }

    /// `y = x Wᵀ` for `x: [n, cols]` row-major; returns `[n, rows]` row-major.
    pub(crate) fn matmul(&self, x: &[f32], n: usize) -> Vec<f32> {
        self.matmul_with(dot::best(), x, n)
    }

    fn matmul_with(&self, k: dot::Kernels, x: &[f32], n: usize) -> Vec<f32> {
        let nb = self.cols / BLOCK;
        debug_assert_eq!(x.len(), n * self.cols);
        // A few rows are quantized in less time than a parallel region takes to start.
        let xq: Vec<BlockX> = if x.len() < SERIAL_BELOW {
            x.chunks_exact(BLOCK).map(BlockX::quantize).collect()
        } else {
            x.par_chunks_exact(BLOCK).map(BlockX::quantize).collect()
        };
        // Each task owns a run of weight rows (columns of `y: [n, rows]`), which stay in
        // cache while every activation row passes over them; it writes its columns of
        // every row of `y` directly (no transposed copy, nothing zeroed first).
        let mut y = ColumnWriter::new(n, self.rows);
        let out = y.columns();
        (0..self.rows.div_ceil(ROWS_PER_TASK))
            .into_par_iter()
            .for_each(|task| {
                let first = task * ROWS_PER_TASK;
                let rows = (self.rows - first).min(ROWS_PER_TASK);
                let w8 = |j: usize| match &self.data {
                    Rows::Q8(b) => &b[j * nb..(j + 1) * nb],
                    Rows::Q4(_) => &[],
                };
                let w4 = |j: usize| match &self.data {
                    Rows::Q4(b) => &b[j * nb..(j + 1) * nb],
                    Rows::Q8(_) => &[],
                };
                // SAFETY: column `j` is in this task's run `[first, first + rows)`, which
                // no other task writes.
                let put = |r: usize, j: usize, v: f32| unsafe { out.write(r, j, v) };
                let x_row = |i: usize| &xq[i * nb..(i + 1) * nb];
                // Activation rows `4g .. 4g + 4`.
                let x_quad = |g: usize| std::array::from_fn(|q| x_row(4 * g + q));
                let quads = n / 4;
                // Two weight rows and four activation rows at a time, then the leftovers
                // one weight row at a time (same sums, same order: see `dot`).
                let pairs = if quads > 0 { rows / 2 } else { 0 };
                for p in 0..pairs {
                    let j = first + 2 * p;
                    for g in 0..quads {
                        let xs = x_quad(g);
                        let y = match &self.data {
                            Rows::Q8(_) => (k.q8x2x4)([w8(j), w8(j + 1)], xs, g == 0),
                            Rows::Q4(_) => (k.q4x2x4)([w4(j), w4(j + 1)], xs, g == 0),
                        };
                        for (h, y) in y.iter().enumerate() {
                            for (q, &v) in y.iter().enumerate() {
                                put(4 * g + q, j + h, v);
                            }
                        }
                    }
                }
                for r in 0..rows {
                    let j = first + r;
                    let paired = r < 2 * pairs;
                    // Four activation rows per pass over the weight row, then the rest.
                    for g in 0..if paired { 0 } else { quads } {
                        let xs = x_quad(g);
                        let y = match &self.data {
                            Rows::Q8(_) => (k.q8x4)(w8(j), xs),
                            Rows::Q4(_) => (k.q4x4)(w4(j), xs),
                        };
                        for (q, &v) in y.iter().enumerate() {
                            put(4 * g + q, j, v);
                        }
                    }
                    for i in 4 * quads..n {
                        let v = match &self.data {
                            Rows::Q8(_) => (k.q8)(w8(j), x_row(i)),
                            Rows::Q4(_) => (k.q4)(w4(j), x_row(i)),
                        };
                        put(i, j, v);
                    }
                }
            });
        // SAFETY: the tasks' runs cover every column, and each task wrote every row of its
        // columns: rows `[0, 4·quads)` by the paired or four-row kernels, the rest one at
        // a time; the parallel loop has returned.
        unsafe { y.finish() }
    }
}

/// Names of the int8 dot-product kernels this CPU runs as capped by
/// [`KERNELS_ENV`](crate::lm::KERNELS_ENV), the one in use last (for reports).
pub fn cpu_kernels() -> Vec<&'static str> {
    dot::in_use().iter().map(|k| k.name).collect()
}

#[cfg(test)]
mod tests {
    use rand::{Rng, SeedableRng};
    use rand_pcg::Pcg64;

    use super::*;

    /// Seed of the random matrices.
    const SEED: u64 = 0xB10C;

    fn random(rng: &mut Pcg64, len: usize) -> Vec<f32> {
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// The activations as the products see them: quantized per block of 32, widened back.
    fn quantized_activations(x: &[f32]) -> Vec<f32> {
        x.chunks_exact(BLOCK)
            .flat_map(|c| {
                let b = BlockX::quantize(c);
                b.qs.map(|v| b.d * f32::from(v))
            })
            .collect()
    }

    /// The weights of a candle (ggml) quantized tensor, dequantized by candle's port of
    /// ggml's dequantizers, row-major.
    fn ggml_weights(q: &candle_core::quantized::QTensor) -> Vec<f32> {
        q.dequantize(&candle_core::Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    /// Row `j` of `w` dotted with row `i` of `x` (both `cols` wide), in f32.
    fn row_dot(w: &[f32], x: &[f32], cols: usize, j: usize, i: usize) -> f32 {
        (0..cols).map(|c| w[j * cols + c] * x[i * cols + c]).sum()
    }

    /// The quantized product equals the f32 product of the dequantized weights with the
    /// dequantized activations (exactly up to f32 rounding: the integer sums are exact), for
    /// every kernel; and it is close to the f32 product of the original matrices, within
    /// the format's rounding: per weight at most `d/2` (`d = max|w|/127` for Q8_0,
    /// `(max − min)/15` for Q4), per activation at most `max|x|/254`.
    #[test]
    fn quantized_products_match_their_definition() {
        let mut rng = Pcg64::seed_from_u64(SEED);
        let (rows, cols, n) = (37, 96, 5);
        let w = random(&mut rng, rows * cols);
        let x = random(&mut rng, n * cols);
        for format in [QFormat::Q8_0, QFormat::Q4_0, QFormat::Q4_1] {
            let q = QMatrix::quantize(format, &w, rows, cols).unwrap();
            let wd = q.dequantize();
            let xd = quantized_activations(&x);
            for k in dot::available() {
                let y = q.matmul_with(k, &x, n);
                for i in 0..n {
                    for j in 0..rows {
                        let exact = row_dot(&wd, &xd, cols, j, i);
                        let full: f32 = (0..cols).map(|c| w[j * cols + c] * x[i * cols + c]).sum();
                        let got = y[i * rows + j];
                        assert!(
                            (got - exact).abs() < 1e-4,
                            "{format:?} {}: {got} vs {exact}",
                            k.name
                        );
                        // Rounding bound: Σ |Δw x| + |w Δx| + |Δw Δx| with the bounds above.
                        // Weights in [-1, 1): Q8_0 step max|w|/127, Q4_1 (max − min)/15,
                        // error half a step; Q4_0 step max|w|/8, and a full step where the
                        // top level (+7 steps) clamps a weight of the opposite sign.
                        let dw = match format {
                            QFormat::Q8_0 => 1.0 / 127.0,
                            QFormat::Q4_0 => 2.0 / 8.0,
                            QFormat::Q4_1 => 2.0 / 15.0,
                        } / 2.0;
                        let dx = 1.0 / 254.0;
                        let bound = cols as f32 * (dw + dx + dw * dx);
                        assert!((got - full).abs() <= bound, "{format:?}: {got} vs {full}");
                    }
                }
            }
        }
    }

    /// Our quantizers give the weights of candle's port of ggml's reference quantizers
    /// (`quantize_row_q8_0`, `_q4_0`, `_q4_1`), to f16 rounding of the scales.
    #[test]
    fn quantizers_match_ggml() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let mut rng = Pcg64::seed_from_u64(SEED + 1);
        let (rows, cols) = (8, 256);
        let w = random(&mut rng, rows * cols);
        let t = Tensor::from_vec(w.clone(), (rows, cols), &Device::Cpu).unwrap();
        for (format, dtype) in [
            (QFormat::Q8_0, GgmlDType::Q8_0),
            (QFormat::Q4_0, GgmlDType::Q4_0),
            (QFormat::Q4_1, GgmlDType::Q4_1),
        ] {
            let theirs = ggml_weights(&QTensor::quantize(&t, dtype).unwrap());
            let ours = QMatrix::quantize(format, &w, rows, cols)
                .unwrap()
                .dequantize();
            // ggml stores scales as f16: a relative difference of 2^-11 per weight, plus
            // a level where rounding of a value exactly between two levels differs.
            let step = |i: usize| {
                let b = &w[i / BLOCK * BLOCK..(i / BLOCK + 1) * BLOCK];
                b.iter().fold(0f32, |m, v| m.max(v.abs())) / 4.0
            };
            let bad = (0..w.len())
                .filter(|&i| (ours[i] - theirs[i]).abs() > 1e-3 * (1.0 + ours[i].abs()))
                .filter(|&i| (ours[i] - theirs[i]).abs() > step(i))
                .count();
            let differ = (0..w.len())
                .filter(|&i| (ours[i] - theirs[i]).abs() > 1e-3 * (1.0 + ours[i].abs()))
                .count();
            assert_eq!(
                bad, 0,
                "{format:?}: {bad} weights differ by more than a level"
            );
            assert!(
                differ * 100 <= w.len(),
                "{format:?}: {differ} of {} weights differ",
                w.len()
            );
        }
    }

    /// `Q5_0` and `Q4_K` blocks (made by candle's port of ggml's quantizers) decode into our
    /// blocks as exactly the weights candle's port of ggml's dequantizer gives, bit for bit;
    /// the product of the decoded matrix is the product of those weights.
    #[test]
    fn q5_0_and_q4_k_decode_to_ggml_weights_exactly() {
        use candle_core::quantized::{GgmlDType, QTensor};
        use candle_core::{Device, Tensor};
        let mut rng = Pcg64::seed_from_u64(SEED + 2);
        let (rows, cols, n) = (6, 512, 3);
        let w = random(&mut rng, rows * cols);
        let x = random(&mut rng, n * cols);
        let t = Tensor::from_vec(w, (rows, cols), &Device::Cpu).unwrap();
        for (kind, dtype) in [
            (GgufBlocks::Q5_0, GgmlDType::Q5_0),
            (GgufBlocks::Q4K, GgmlDType::Q4K),
        ] {
            let q = QTensor::quantize(&t, dtype).unwrap();
            let theirs = ggml_weights(&q);
            let ours = QMatrix::from_gguf(kind, &q.data().unwrap(), rows, cols).unwrap();
            // Held in the blocks of the format they decode into.
            let eight_bit = matches!(ours.data, Rows::Q8(_));
            assert_eq!(eight_bit, kind.format() == QFormat::Q8_0, "{kind:?}");
            let decoded = ours.dequantize();
            let differ = (0..decoded.len())
                .filter(|&i| decoded[i].to_bits() != theirs[i].to_bits())
                .count();
            assert_eq!(differ, 0, "{kind:?}: {differ} weights differ");
            // The product uses those weights (exactly, up to f32 summation order).
            let xd = quantized_activations(&x);
            for k in dot::available() {
                let y = ours.matmul_with(k, &x, n);
                for i in 0..n {
                    for j in 0..rows {
                        let want = row_dot(&theirs, &xd, cols, j, i);
                        let got = y[i * rows + j];
                        assert!(
                            (got - want).abs() < 1e-3,
                            "{kind:?} {}: {got} vs {want}",
                            k.name
                        );
                    }
                }
            }
        }
        // A `Q4_K` row must hold whole super-blocks of 256.
        assert!(QMatrix::from_gguf(GgufBlocks::Q4K, &[0; 144], 2, 128).is_none());
        assert!(QMatrix::from_gguf(GgufBlocks::Q4K, &[0; 143], 1, 256).is_none());
    }

    /// GGUF blocks decode as llama.cpp defines them.
    #[test]
    fn gguf_blocks_decode() {
        let mut q8 = vec![0u8; 34];
        q8[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        q8[2] = (-3i8) as u8;
        q8[3] = 7;
        let m = QMatrix::from_gguf(GgufBlocks::Q8_0, &q8, 1, 32).unwrap();
        assert_eq!(&m.dequantize()[..3], &[-1.5, 3.5, 0.0]);
        let mut q4 = vec![0u8; 18];
        q4[..2].copy_from_slice(&half::f16::from_f32(2.0).to_le_bytes());
        q4[2] = 0x3A; // element 0: 10, element 16: 3
        let m = QMatrix::from_gguf(GgufBlocks::Q4_0, &q4, 1, 32).unwrap();
        let d = m.dequantize();
        assert_eq!((d[0], d[16], d[1]), (4.0, -10.0, -16.0));
        let mut q41 = vec![0u8; 20];
        q41[..2].copy_from_slice(&half::f16::from_f32(0.25).to_le_bytes());
        q41[2..4].copy_from_slice(&half::f16::from_f32(-1.0).to_le_bytes());
        q41[4] = 0xF1;
        let m = QMatrix::from_gguf(GgufBlocks::Q4_1, &q41, 1, 32).unwrap();
        let d = m.dequantize();
        assert_eq!((d[0], d[16], d[1]), (-0.75, 2.75, -1.0));
        assert!(QMatrix::from_gguf(GgufBlocks::Q4_1, &q41[..19], 1, 32).is_none());
        // Q5_0: element 0 low nibble 0x3 with fifth bit set (19 − 16 = 3), element 16 high
        // nibble 0xF without (15 − 16 = −1), element 17 fifth bit set (16 + 0 − 16 = 0).
        let mut q5 = vec![0u8; 22];
        q5[..2].copy_from_slice(&half::f16::from_f32(0.5).to_le_bytes());
        q5[2..6].copy_from_slice(&(1u32 | 1 << 17).to_le_bytes());
        q5[6] = 0xF3;
        let m = QMatrix::from_gguf(GgufBlocks::Q5_0, &q5, 1, 32).unwrap();
        let d = m.dequantize();
        assert_eq!((d[0], d[16], d[1], d[17]), (1.5, -0.5, -8.0, 0.0));
        assert!(QMatrix::quantize(QFormat::Q8_0, &[0.0; 40], 1, 40).is_none());
    }
}
