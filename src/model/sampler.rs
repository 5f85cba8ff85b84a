//! Next-token sampling: greedy, or temperature softmax with top-k and top-p (nucleus)
//! filtering, drawn with a seeded xoshiro256** generator so runs are reproducible.
//!
//! Order of operations: logits are scaled by `1 / temperature`, the `top_k` most likely
//! tokens are kept, their softmax is taken, the smallest prefix (by descending probability)
//! whose mass reaches `top_p` is kept, and one token is drawn from what remains in proportion
//! to its probability. NaN logits count as `-inf` (never drawn), `+inf` as the largest finite
//! value.

/// Sampling parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct SamplerConfig {
    /// Softmax temperature; `0` (or any non-positive or NaN value) means greedy argmax.
    pub temperature: f32,
    /// Keep only the `top_k` highest logits; `0` disables the filter.
    pub top_k: usize,
    /// Keep the smallest set of most likely tokens whose probability reaches `top_p`;
    /// `>= 1` disables the filter, `<= 0` keeps only the most likely token.
    pub top_p: f32,
    /// PRNG seed.
    pub seed: u64,
}

impl SamplerConfig {
    /// Greedy decoding (temperature 0).
    pub fn greedy() -> Self {
        SamplerConfig {
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            seed: 0,
        }
    }
}

impl Default for SamplerConfig {
    /// Greedy decoding, so the default is deterministic.
    fn default() -> Self {
        SamplerConfig::greedy()
    }
}

/// xoshiro256** (Blackman and Vigna), seeded through splitmix64 so that any seed, including
/// 0, gives a well-mixed non-zero state.
#[derive(Clone, Debug)]
pub struct Rng {
    s: [u64; 4],
}

impl Rng {
    /// A generator seeded with `seed`.
    pub fn new(seed: u64) -> Self {
        let mut x = seed;
        let mut splitmix = || {
            x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = x;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        };
        Rng {
            s: [splitmix(), splitmix(), splitmix(), splitmix()],
        }
    }

    /// The next 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        let [s0, s1, s2, s3] = &mut self.s;
        let result = s1.wrapping_mul(5).rotate_left(7).wrapping_mul(9);
        let t = *s1 << 17;
        *s2 ^= *s0;
        *s3 ^= *s1;
        *s1 ^= *s2;
        *s0 ^= *s3;
        *s2 ^= t;
        *s3 = s3.rotate_left(45);
        result
    }

    /// A uniform `f64` in `[0, 1)` with 53 random bits.
    pub fn next_f64(&mut self) -> f64 {
        // 2^-53: the top 53 bits fill an f64 mantissa exactly.
        (self.next_u64() >> 11) as f64 * (1.0 / (1u64 << 53) as f64)
    }
}

/// Draws token ids from logits.
#[derive(Clone, Debug)]
pub struct Sampler {
    config: SamplerConfig,
    rng: Rng,
    /// Scratch `(logit, id)` pairs, reused across calls to avoid allocating per token.
    candidates: Vec<(f32, u32)>,
    /// Scratch probabilities parallel to `candidates`.
    probs: Vec<f64>,
}

impl Sampler {
    /// A sampler with `config`, its PRNG seeded from `config.seed`.
    pub fn new(config: SamplerConfig) -> Self {
        Sampler {
            config,
            rng: Rng::new(config.seed),
            candidates: Vec::new(),
            probs: Vec::new(),
        }
    }

    /// The configuration.
    pub fn config(&self) -> &SamplerConfig {
        &self.config
    }

    /// Restarts the PRNG from `seed`.
    pub fn reseed(&mut self, seed: u64) {
        self.config.seed = seed;
        self.rng = Rng::new(seed);
    }

    /// Picks the next token from `logits` (one per vocabulary entry). Returns 0 for empty
    /// logits or when every logit is NaN or `-inf`.
    pub fn sample(&mut self, logits: &[f32]) -> u32 {
        let t = self.config.temperature;
        if !(t > 0.0) || self.config.top_k == 1 {
            return argmax(logits);
        }

        // Candidates: every token with a chance, `+inf` clamped so the arithmetic stays finite.
        self.candidates.clear();
        self.candidates.extend(
            (0u32..)
                .zip(logits)
                .filter(|(_, l)| !l.is_nan() && **l != f32::NEG_INFINITY)
                .map(|(id, &l)| (l.min(f32::MAX), id)),
        );
        if self.candidates.is_empty() {
            return argmax(logits);
        }

        // Descending logit, ties to the lower id, so filtering is deterministic.
        let order = |a: &(f32, u32), b: &(f32, u32)| b.0.total_cmp(&a.0).then(a.1.cmp(&b.1));
        let k = self.config.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, order);
            self.candidates.truncate(k);
        }
        let top_p = self.config.top_p;
        let nucleus = !(top_p >= 1.0);
        if nucleus {
            // Only the nucleus filter needs the full order.
            self.candidates.sort_unstable_by(order);
        }

        // Softmax in f64 relative to the maximum, so exp never overflows.
        let max = self.candidates.iter().map(|c| c.0).fold(f32::MIN, f32::max);
        let inv_t = 1.0 / f64::from(t);
        self.probs.clear();
        self.probs.extend(
            self.candidates
                .iter()
                .map(|c| ((f64::from(c.0) - f64::from(max)) * inv_t).exp()),
        );
        let total: f64 = self.probs.iter().sum();

        let mut keep = self.probs.len();
        if nucleus {
            // The smallest prefix whose mass reaches top_p; at least one token.
            let target = f64::from(top_p.max(0.0)) * total;
            let mut mass = 0.0;
            keep = 0;
            for &p in &self.probs {
                mass += p;
                keep += 1;
                if mass >= target {
                    break;
                }
            }
            keep = keep.max(1);
        }
        let kept = self.probs.get(..keep).unwrap_or(&self.probs);
        let kept_total: f64 = kept.iter().sum();

        // Inverse-CDF draw over the kept tokens.
        let u = self.rng.next_f64() * kept_total;
        let mut acc = 0.0;
        for (&p, &(_, id)) in kept.iter().zip(&self.candidates) {
            acc += p;
            if u < acc {
                return id;
            }
        }
        // Rounding left `u` at or beyond the sum: take the last kept token with any mass.
        kept.iter()
            .zip(&self.candidates)
            .rev()
            .find(|(&p, _)| p > 0.0)
            .or_else(|| kept.iter().zip(&self.candidates).next())
            .map_or(0, |(_, &(_, id))| id)
    }
}

/// The index of the largest logit, the lowest index on ties; NaN counts as `-inf`. Returns 0
/// for empty logits or when none is larger than `-inf`.
pub fn argmax(logits: &[f32]) -> u32 {
    let mut best = (f32::NEG_INFINITY, 0u32);
    for (id, &l) in (0u32..).zip(logits) {
        // Strictly greater keeps the lowest id on ties; NaN compares false and is skipped.
        if l > best.0 {
            best = (l, id);
        }
    }
    best.1
}
