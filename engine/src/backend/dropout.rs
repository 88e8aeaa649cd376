//! Dropout masks from a counter-based hash: the mask of one element is a function of the seed,
//! the layer, the projection, the element's row and its column, and of nothing drawn before
//! it. So a layer recomputed in the backward pass, a run resumed from a checkpoint, a
//! micro-batch split into shards, and the GPU (which computes each element in its own thread)
//! all see the same masks, bit for bit. `dropout.cu` computes [`DropoutMask::multiplier`] for
//! every element on a GPU; [`DropoutMask::fill`] is its CPU twin.

use candle_core::{DType, Device, Result, Tensor};

use crate::adapters::Site;

/// Dropout on the adapters' inputs while training, as PEFT applies it (each adapter its own
/// mask): the micro-batch's seed, and where its rows start.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Dropout {
    pub p: f64,
    pub seed: u64,
    /// The index of the first row of the input within its micro-batch, rows counted as
    /// `batch row · sequence length + position`: a shard of a micro-batch starts where its
    /// rows are in the whole, so it draws the masks the whole would.
    pub first_row: u64,
}

impl Dropout {
    /// The mask of projection `site` of layer `layer`.
    pub fn at(self, layer: usize, site: Site) -> DropoutMask {
        let key = mix(self.seed ^ mix(((layer as u64) << 8) | site as u64));
        // Rows keep with probability 1 − threshold / 2²⁴; the top 24 bits of a hash decide.
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let threshold = (self.p.clamp(0.0, 1.0) * f64::from(1u32 << 24)).round() as u32;
        #[allow(clippy::cast_possible_truncation)]
        let scale = (1.0 / (1.0 - self.p)) as f32;
        DropoutMask {
            key,
            threshold,
            scale,
            first_row: self.first_row,
        }
    }
}

/// The mask of one projection of one layer: `scale` (`1 / (1 − p)`) where an element is kept,
/// 0 where it is dropped.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct DropoutMask {
    pub key: u64,
    /// Dropped when the hash's top 24 bits are below it.
    pub threshold: u32,
    pub scale: f32,
    pub first_row: u64,
}

impl DropoutMask {
    /// The multiplier of column `col` of row `row` (counted from the input's first row) of
    /// an input with `cols` columns.
    pub fn multiplier(&self, row: u64, col: u64, cols: u64) -> f32 {
        let counter = (self.first_row + row) * cols + col;
        #[allow(clippy::cast_possible_truncation)]
        let top = (mix(self.key.wrapping_add(counter.wrapping_mul(GOLDEN))) >> 40) as u32;
        if top < self.threshold {
            0.0
        } else {
            self.scale
        }
    }

    /// Writes the mask of a `[rows, cols]` input (`out.len() / cols` rows) into `out`.
    pub fn fill(&self, out: &mut [f32], cols: usize) {
        for (row, values) in out.chunks_exact_mut(cols).enumerate() {
            for (col, value) in values.iter_mut().enumerate() {
                *value = self.multiplier(row as u64, col as u64, cols as u64);
            }
        }
    }

    /// The mask of an input of `shape` as a tensor on `device` in `dtype`: by the kernel on
    /// a GPU, by [`Self::fill`] on the CPU.
    pub fn tensor(&self, shape: &[usize], device: &Device, dtype: DType) -> Result<Tensor> {
        let cols = shape.last().copied().unwrap_or(1).max(1);
        #[cfg(feature = "cuda")]
        if let Device::Cuda(cuda) = device {
            return super::cuda::kernels::dropout_mask(cuda, self, shape, dtype);
        }
        let mut values = vec![0f32; shape.iter().product()];
        self.fill(&mut values, cols);
        Tensor::from_vec(values, shape, device)?.to_dtype(dtype)
    }
}

const GOLDEN: u64 = 0x9E37_79B9_7F4A_7C15;

/// SplitMix64's finaliser: every input bit moves every output bit, so consecutive counters
/// give independent-looking values.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mask(p: f64, seed: u64, first_row: u64) -> DropoutMask {
        Dropout { p, seed, first_row }.at(1, Site::VProj)
    }

    #[test]
    fn masks_are_seeded_and_keep_the_expected_share() {
        let values = |m: DropoutMask| {
            let mut out = vec![0f32; 4000];
            m.fill(&mut out, 100);
            out
        };
        let first = values(mask(0.25, 9, 0));
        assert_eq!(first, values(mask(0.25, 9, 0)));
        assert_ne!(first, values(mask(0.25, 10, 0)));
        let kept = first.iter().filter(|&&v| v != 0.0).count();
        assert!(
            (2850..3150).contains(&kept),
            "{kept} of 4000 kept at p = 0.25"
        );
        assert!(
            first
                .iter()
                .all(|&v| v == 0.0 || (v - 4.0 / 3.0).abs() < 1e-6)
        );
    }

    #[test]
    fn each_site_and_layer_has_its_own_mask_and_p_zero_keeps_everything() {
        let d = Dropout {
            p: 0.5,
            seed: 3,
            first_row: 0,
        };
        let draw = |m: DropoutMask| (0..64).map(|c| m.multiplier(0, c, 64)).collect::<Vec<_>>();
        assert_ne!(draw(d.at(0, Site::QProj)), draw(d.at(0, Site::KProj)));
        assert_ne!(draw(d.at(0, Site::QProj)), draw(d.at(1, Site::QProj)));
        let none = Dropout { p: 0.0, ..d }.at(0, Site::QProj);
        assert!(draw(none).iter().all(|&v| (v - 1.0).abs() < f32::EPSILON));
    }

    #[test]
    fn a_shard_draws_the_rows_of_the_whole_it_covers() {
        let (rows, cols) = (6, 10);
        let mut whole = vec![0f32; rows * cols];
        mask(0.3, 5, 0).fill(&mut whole, cols);
        let mut shard = vec![0f32; 2 * cols];
        mask(0.3, 5, 4).fill(&mut shard, cols);
        assert_eq!(shard, whole[4 * cols..]);
    }

    #[test]
    fn the_tensor_form_holds_the_filled_values_in_its_dtype() -> Result<()> {
        let m = mask(0.1, 1, 0);
        let t = m.tensor(&[2, 3, 8], &Device::Cpu, DType::BF16)?;
        assert_eq!(t.dims(), [2, 3, 8]);
        let mut expected = vec![0f32; 48];
        m.fill(&mut expected, 8);
        let expected: Vec<f32> = expected
            .iter()
            .map(|&v| half::bf16::from_f32(v).to_f32())
            .collect();
        assert_eq!(
            t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?,
            expected
        );
        Ok(())
    }
}
