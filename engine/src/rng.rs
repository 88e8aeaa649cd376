//! A small seeded random generator (SplitMix64) whose whole state is one `u64`, so a training
//! checkpoint can store it and a resumed run draws the same numbers as an uninterrupted one.

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Rng {
    state: u64,
}

impl Rng {
    pub fn seed(seed: u64) -> Self {
        Self { state: seed }
    }

    /// The state to checkpoint; [`Rng::seed`] with it continues the sequence.
    pub fn state(&self) -> u64 {
        self.state
    }

    pub fn next_u64(&mut self) -> u64 {
        self.state = self.state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[0, 1)`, from the top 24 bits.
    #[allow(clippy::cast_precision_loss)]
    pub fn next_f32(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32
    }

    /// Uniform in `[low, high)`.
    pub fn uniform(&mut self, low: f32, high: f32) -> f32 {
        low + (high - low) * self.next_f32()
    }

    /// Normal with mean 0 and standard deviation `std` (Box–Muller; two uniforms per draw).
    pub fn normal(&mut self, std: f32) -> f32 {
        // 1 − u keeps the logarithm's argument in (0, 1].
        let (u, v) = (1.0 - self.next_f32(), self.next_f32());
        std * (-2.0 * u.ln()).sqrt() * (2.0 * std::f32::consts::PI * v).cos()
    }

    /// `0..n` in a Fisher–Yates shuffled order.
    pub fn permutation(&mut self, n: usize) -> Vec<usize> {
        let mut order: Vec<usize> = (0..n).collect();
        for i in (1..n).rev() {
            let j = usize::try_from(self.next_u64() % (i as u64 + 1)).expect("below n");
            order.swap(i, j);
        }
        order
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resuming_from_the_state_continues_the_sequence() {
        let mut a = Rng::seed(42);
        a.next_u64();
        let mut b = Rng::seed(a.state());
        assert_eq!(a.next_u64(), b.next_u64());
    }

    #[test]
    fn permutations_hold_each_index_once_and_depend_on_the_seed() {
        let order = Rng::seed(3).permutation(100);
        let mut sorted = order.clone();
        sorted.sort_unstable();
        assert_eq!(sorted, (0..100).collect::<Vec<_>>());
        assert_eq!(order, Rng::seed(3).permutation(100));
        assert_ne!(order, Rng::seed(4).permutation(100));
    }

    #[test]
    fn normal_values_have_the_asked_spread() {
        let mut rng = Rng::seed(5);
        let values: Vec<f32> = (0..20_000).map(|_| rng.normal(0.25)).collect();
        let mean = values.iter().sum::<f32>() / 20_000.0;
        let var = values.iter().map(|v| (v - mean).powi(2)).sum::<f32>() / 20_000.0;
        assert!(mean.abs() < 0.01, "mean {mean}");
        assert!((var.sqrt() - 0.25).abs() < 0.01, "std {}", var.sqrt());
    }

    #[test]
    fn uniform_values_stay_in_range_and_spread() {
        let mut rng = Rng::seed(7);
        let values: Vec<f32> = (0..10_000).map(|_| rng.uniform(-2.0, 2.0)).collect();
        assert!(values.iter().all(|v| (-2.0..2.0).contains(v)));
        let mean = values.iter().sum::<f32>() / 10_000.0;
        assert!(mean.abs() < 0.1, "mean {mean}");
    }
}
