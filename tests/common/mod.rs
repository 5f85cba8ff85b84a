//! Helpers shared by the integration tests (a module of each test crate that uses it).

/// The oracle: three plain loops in f64 over contiguous K and V (`[position][head_dim]`).
pub fn naive_attention(
    query: &[f32],
    keys: &[Vec<f32>],
    values: &[Vec<f32>],
    visible: &[bool],
    scale: f64,
) -> Vec<f64> {
    let scores: Vec<f64> = keys
        .iter()
        .map(|k| {
            k.iter()
                .zip(query)
                .map(|(&a, &b)| a as f64 * b as f64)
                .sum::<f64>()
                * scale
        })
        .collect();
    let max = scores
        .iter()
        .zip(visible)
        .filter(|(_, &v)| v)
        .map(|(s, _)| *s)
        .fold(f64::NEG_INFINITY, f64::max);
    let weights: Vec<f64> = scores
        .iter()
        .zip(visible)
        .map(|(s, &v)| if v { (s - max).exp() } else { 0.0 })
        .collect();
    let total: f64 = weights.iter().sum();
    let mut out = vec![0.0f64; query.len()];
    for (w, v) in weights.iter().zip(values) {
        for (o, &x) in out.iter_mut().zip(v) {
            *o += w / total * x as f64;
        }
    }
    out
}

/// Small deterministic generator (SplitMix64) for test data.
pub struct Rng(pub u64);
impl Rng {
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn value(&mut self) -> f32 {
        (self.next() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
}
