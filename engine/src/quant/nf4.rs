//! NF4 (4-bit NormalFloat) with double quantization, exactly as bitsandbytes 0.50 computes it
//! on CPU (`quantize_4bit(quant_type="nf4", blocksize=64, compress_statistics=True)`):
//!
//! - weights are split, row-major, into blocks of 64; each block keeps its absolute maximum
//!   and each value the index of the nearest of 16 NF4 levels to `value / absmax` (a value
//!   exactly between two levels takes the lower one);
//! - two indices share a byte, the first element in the high nibble;
//! - the absmax values are themselves quantized ("double quantization"): their mean is
//!   subtracted, then they are stored as 8-bit indices into bitsandbytes' signed dynamic code,
//!   in blocks of 256 with one f32 scale each.
//!
//! That is 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight. The reference data for the tests
//! comes from bitsandbytes itself (`tests/oracle/nf4_reference.py`).

use std::sync::OnceLock;

use rayon::prelude::*;

/// The 16 NF4 levels (bitsandbytes `get_4bit_type("nf4")`).
pub const NF4_LEVELS: [f32; 16] = [
    -1.0,
    -0.696_192_8,
    -0.525_073_05,
    -0.394_917_5,
    -0.284_441_38,
    -0.184_773_43,
    -0.091_050_036,
    0.0,
    0.079_580_3,
    0.160_930_2,
    0.246_112_3,
    0.337_915_24,
    0.440_709_83,
    0.562_617,
    0.722_956_84,
    1.0,
];
/// Weights per absmax.
pub const BLOCK_SIZE: usize = 64;
/// Absmax values per f32 scale in the double quantization.
pub const NESTED_BLOCK_SIZE: usize = 256;
/// Blocks one parallel task quantizes: large enough that scheduling costs nothing.
const BLOCKS_PER_TASK: usize = 1024;
/// The smallest absmax bitsandbytes divides by (a partial block of zeros stores this).
const MIN_ABSMAX: f32 = 1e-38;
/// The NF4 index of 0.0, which pads an odd count.
const ZERO_INDEX: u8 = 7;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("NF4 weight of shape {shape:?} needs {expected} {what}, got {actual}")]
    Length {
        shape: (usize, usize),
        what: &'static str,
        expected: usize,
        actual: usize,
    },
}

/// A `[rows, cols]` matrix in NF4 with double-quantized block scales.
#[derive(Clone, Debug, PartialEq)]
pub struct Nf4Matrix {
    shape: (usize, usize),
    /// Two 4-bit indices per byte.
    packed: Vec<u8>,
    /// One 8-bit index into [`dynamic_code`] per block of [`BLOCK_SIZE`] weights.
    absmax: Vec<u8>,
    /// One scale per [`NESTED_BLOCK_SIZE`] entries of `absmax`.
    nested_absmax: Vec<f32>,
    /// Mean of the block absmax values, added back when dequantizing.
    offset: f32,
}

impl Nf4Matrix {
    /// Quantizes row-major `weights` of `shape`.
    pub fn quantize(weights: &[f32], shape: (usize, usize)) -> Result<Self, Error> {
        check_len(shape, "weights", shape.0 * shape.1, weights.len())?;
        // Blocks are independent: the work is spread over every core in runs of blocks (an
        // 8B model has 3.5 billion weights to quantize as it loads).
        let parts: Vec<(Vec<u8>, Vec<f32>)> = weights
            .par_chunks(BLOCK_SIZE * BLOCKS_PER_TASK)
            .map(|run| {
                let (indices, absmax) = quantize_4bit(run);
                (pack(&indices), absmax)
            })
            .collect();
        let mut packed = Vec::with_capacity(weights.len().div_ceil(2));
        let mut absmax = Vec::with_capacity(weights.len().div_ceil(BLOCK_SIZE));
        for (p, a) in parts {
            packed.extend_from_slice(&p);
            absmax.extend_from_slice(&a);
        }
        // bitsandbytes takes the mean in f32 with torch's cascaded sum; an f64 sum can differ
        // from it in the last bit, which moves no dequantized weight by more than an ulp of
        // its block's scale.
        #[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
        let offset =
            (absmax.iter().map(|&a| f64::from(a)).sum::<f64>() / absmax.len().max(1) as f64) as f32;
        let centred: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
        let (absmax, nested_absmax) = quantize_blockwise_8bit(&centred);
        Ok(Self {
            shape,
            packed,
            absmax,
            nested_absmax,
            offset,
        })
    }

    /// Rebuilds a matrix from its stored parts (e.g. a bitsandbytes state dict).
    pub fn from_parts(
        shape: (usize, usize),
        packed: Vec<u8>,
        absmax: Vec<u8>,
        nested_absmax: Vec<f32>,
        offset: f32,
    ) -> Result<Self, Error> {
        let n = shape.0 * shape.1;
        let blocks = n.div_ceil(BLOCK_SIZE);
        check_len(shape, "packed bytes", n.div_ceil(2), packed.len())?;
        check_len(shape, "absmax bytes", blocks, absmax.len())?;
        check_len(
            shape,
            "nested scales",
            blocks.div_ceil(NESTED_BLOCK_SIZE),
            nested_absmax.len(),
        )?;
        Ok(Self {
            shape,
            packed,
            absmax,
            nested_absmax,
            offset,
        })
    }

    pub fn shape(&self) -> (usize, usize) {
        self.shape
    }

    pub fn packed(&self) -> &[u8] {
        &self.packed
    }

    pub fn absmax(&self) -> &[u8] {
        &self.absmax
    }

    pub fn nested_absmax(&self) -> &[f32] {
        &self.nested_absmax
    }

    pub fn offset(&self) -> f32 {
        self.offset
    }

    /// Bytes held, for memory accounting.
    pub fn size_bytes(&self) -> usize {
        self.packed.len() + self.absmax.len() + 4 * self.nested_absmax.len() + 4
    }

    /// The dense row-major f32 weights.
    pub fn dequantize(&self) -> Vec<f32> {
        dequantize_parts(
            &self.packed,
            &self.absmax,
            &self.nested_absmax,
            self.offset,
            self.shape.0 * self.shape.1,
        )
    }
}

/// The first `n` weights of stored NF4 parts, in f32. The CUDA kernel (`cuda/nf4.cu`) does
/// the same arithmetic in the same order and must give the same bits.
pub fn dequantize_parts(
    packed: &[u8],
    absmax: &[u8],
    nested_absmax: &[f32],
    offset: f32,
    n: usize,
) -> Vec<f32> {
    let code = dynamic_code();
    // bitsandbytes' `dequantize_blockwise(absmax) + offset`.
    let scales: Vec<f32> = absmax
        .iter()
        .enumerate()
        .map(|(i, &q)| code[usize::from(q)] * nested_absmax[i / NESTED_BLOCK_SIZE] + offset)
        .collect();
    (0..n)
        .map(|i| {
            let byte = packed[i / 2];
            let index = if i % 2 == 0 { byte >> 4 } else { byte & 0x0f };
            NF4_LEVELS[usize::from(index)] * scales[i / BLOCK_SIZE]
        })
        .collect()
}

fn check_len(
    shape: (usize, usize),
    what: &'static str,
    expected: usize,
    actual: usize,
) -> Result<(), Error> {
    if expected == actual {
        Ok(())
    } else {
        Err(Error::Length {
            shape,
            what,
            expected,
            actual,
        })
    }
}

/// NF4 indices of `weights` and one absmax per block, as bitsandbytes' default (torch) kernel:
/// full blocks are scaled by `x * (1 / absmax)`, the last partial block by `x / absmax`.
fn quantize_4bit(weights: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let bounds: Vec<f32> = NF4_LEVELS
        .windows(2)
        .map(|w| torch_mean(w[0], w[1]))
        .collect();
    let level = |scaled: f32| {
        // `torch.bucketize(right=False)`: the number of bounds strictly below the value.
        let count = bounds.iter().take_while(|&&b| b < scaled).count();
        u8::try_from(count).unwrap_or(ZERO_INDEX)
    };
    let mut indices = Vec::with_capacity(weights.len());
    let mut absmax = Vec::with_capacity(weights.len().div_ceil(BLOCK_SIZE));
    for block in weights.chunks(BLOCK_SIZE) {
        let max = block.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        if block.len() == BLOCK_SIZE {
            let inverse = 1.0 / max.max(MIN_ABSMAX);
            indices.extend(block.iter().map(|&x| level((x * inverse).clamp(-1.0, 1.0))));
            absmax.push(max);
        } else {
            let max = max.max(MIN_ABSMAX);
            indices.extend(block.iter().map(|&x| level((x / max).clamp(-1.0, 1.0))));
            absmax.push(max);
        }
    }
    (indices, absmax)
}

fn pack(indices: &[u8]) -> Vec<u8> {
    indices
        .chunks(2)
        .map(|pair| (pair[0] << 4) | pair.get(1).copied().unwrap_or(ZERO_INDEX))
        .collect()
}

/// bitsandbytes' CPU `quantize_blockwise`: per block of 256 an f32 absmax, per value the
/// entry of a 65536-slot lookup table over `[-1, 1]` (not an exact nearest-code search).
fn quantize_blockwise_8bit(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let parts: Vec<(Vec<u8>, Vec<f32>)> = values
        .par_chunks(NESTED_BLOCK_SIZE * 64)
        .map(quantize_blockwise_8bit_run)
        .collect();
    let mut indices = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(NESTED_BLOCK_SIZE));
    for (i, s) in parts {
        indices.extend_from_slice(&i);
        scales.extend_from_slice(&s);
    }
    (indices, scales)
}

/// [`quantize_blockwise_8bit`] of a run of whole blocks (or the last, partial one).
fn quantize_blockwise_8bit_run(values: &[f32]) -> (Vec<u8>, Vec<f32>) {
    let table = lookup_table();
    let mut indices = Vec::with_capacity(values.len());
    let mut scales = Vec::with_capacity(values.len().div_ceil(NESTED_BLOCK_SIZE));
    for block in values.chunks(NESTED_BLOCK_SIZE) {
        let max = block.iter().fold(0.0f32, |m, &x| m.max(x.abs()));
        scales.push(max);
        if max == 0.0 {
            indices.extend(std::iter::repeat_n(0u8, block.len()));
            continue;
        }
        let inverse = 1.0 / max;
        indices.extend(block.iter().map(|&x| {
            let v = (x * inverse).clamp(-1.0, 1.0);
            // In [0, 65535.5): truncation is the intended rounding.
            #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
            let slot = ((v + 1.0) * 0.5 * 65535.0 + 0.5) as usize;
            table[slot.min(65535)]
        }));
    }
    (indices, scales)
}

fn lookup_table() -> &'static [u8; 65536] {
    static TABLE: OnceLock<Box<[u8; 65536]>> = OnceLock::new();
    TABLE.get_or_init(|| {
        let code = dynamic_code();
        let mids: Vec<f32> = code.windows(2).map(|w| 0.5 * (w[0] + w[1])).collect();
        let mut table = vec![0u8; 65536];
        let mut below = 0usize;
        for (slot, entry) in table.iter_mut().enumerate() {
            #[allow(clippy::cast_precision_loss)]
            let value = -1.0f32 + (2.0f32 * slot as f32) / 65535.0;
            while below < mids.len() && mids[below] < value {
                below += 1;
            }
            *entry = u8::try_from(below).unwrap_or(u8::MAX);
        }
        table
            .into_boxed_slice()
            .try_into()
            .expect("the table has 65536 slots")
    })
}

/// bitsandbytes' `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`,
/// computed in f32 the way torch does it (linspace rounds each value once from its nearer end).
pub fn dynamic_code() -> &'static [f32; 256] {
    static CODE: OnceLock<[f32; 256]> = OnceLock::new();
    CODE.get_or_init(|| {
        let mut data = Vec::with_capacity(256);
        for exponent in 0..7i32 {
            let points = (1usize << exponent) + 1;
            let bounds = linspace(0.1, 1.0, points);
            #[allow(clippy::cast_possible_truncation)]
            let scale = 10f64.powi(exponent - 6) as f32;
            let means: Vec<f32> = bounds.windows(2).map(|w| torch_mean(w[0], w[1])).collect();
            data.extend(means.iter().map(|&m| scale * m));
            data.extend(means.iter().map(|&m| -scale * m));
        }
        data.push(0.0);
        data.push(1.0);
        data.sort_by(f32::total_cmp);
        let mut code = [0.0f32; 256];
        code.copy_from_slice(&data);
        code
    })
}

/// `(a + b) / 2` as torch computes it in f32: the sum rounds first. (`f32::midpoint` rounds
/// the exact mean once and can differ in the last bit.)
#[allow(clippy::manual_midpoint)]
fn torch_mean(a: f32, b: f32) -> f32 {
    (a + b) / 2.0
}

/// `torch.linspace(start, end, points, dtype=float32)`.
#[allow(clippy::cast_precision_loss, clippy::cast_possible_truncation)]
fn linspace(start: f32, end: f32, points: usize) -> Vec<f32> {
    let step = (end - start) / (points - 1) as f32;
    let half = points / 2;
    (0..points)
        .map(|i| {
            if i < half {
                (f64::from(start) + f64::from(step) * i as f64) as f32
            } else {
                (f64::from(end) - f64::from(step) * (points - 1 - i) as f64) as f32
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_level_times_a_scale_round_trips_exactly() {
        let mut weights: Vec<f32> = NF4_LEVELS.iter().map(|l| l * 0.5).collect();
        weights.resize(BLOCK_SIZE, 0.0);
        weights[63] = 0.5; // the block's absmax
        let matrix = Nf4Matrix::quantize(&weights, (1, BLOCK_SIZE)).expect("quantize");
        // One block: the double-quantized scale is the offset itself, exact.
        assert_eq!(matrix.dequantize(), weights);
    }

    #[test]
    fn the_first_element_goes_in_the_high_nibble_and_odd_counts_pad_with_zero() {
        let matrix = Nf4Matrix::quantize(&[-1.0, 1.0, 0.0], (1, 3)).expect("quantize");
        assert_eq!(matrix.packed(), [0x0f, 0x77]);
    }

    #[test]
    fn a_value_between_two_levels_takes_the_lower_one() {
        let mid = torch_mean(NF4_LEVELS[9], NF4_LEVELS[10]);
        let matrix = Nf4Matrix::quantize(&[mid, 1.0], (1, 2)).expect("quantize");
        assert_eq!(matrix.packed(), [0x9f]);
    }

    #[test]
    #[allow(clippy::cast_precision_loss)]
    fn about_four_and_an_eighth_bits_per_weight() {
        let n: u32 = 1024 * 1024;
        let weights: Vec<f32> = (0..n).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect();
        let matrix = Nf4Matrix::quantize(&weights, (1024, 1024)).expect("quantize");
        let bits = 8.0 * matrix.size_bytes() as f64 / f64::from(n);
        assert!((4.12..4.14).contains(&bits), "{bits} bits per weight");
    }

    #[test]
    fn parts_of_the_wrong_length_are_refused() {
        let error = Nf4Matrix::from_parts((2, 64), vec![0; 63], vec![0; 2], vec![1.0], 0.0)
            .expect_err("short packed data");
        assert!(error.to_string().contains("packed bytes"), "{error}");
    }
}
