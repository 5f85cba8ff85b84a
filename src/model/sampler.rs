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

/// SplitMix64 (Steele, Lea and Flood): advances `state` and returns the next 64 well-mixed
/// bits. Also the project's generator for seeded test and benchmark data.
pub fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A uniform `f32` in `[-1, 1)` from the top 24 bits of `bits`.
pub fn unit_f32(bits: u64) -> f32 {
    (bits >> 40) as f32 / (1u64 << 23) as f32 - 1.0
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
        Rng {
            s: [
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
                splitmix64(&mut x),
            ],
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
}

impl Sampler {
    /// A sampler with `config`, its PRNG seeded from `config.seed`.
    pub fn new(config: SamplerConfig) -> Self {
        Sampler {
            config,
            rng: Rng::new(config.seed),
            candidates: Vec::new(),
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
        if t.is_nan() || t <= 0.0 || self.config.top_k == 1 {
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

        let k = self.config.top_k;
        if k > 0 && k < self.candidates.len() {
            self.candidates.select_nth_unstable_by(k - 1, by_logit_desc);
            self.candidates.truncate(k);
        }

        // Softmax weights in f64 relative to the maximum, so exp never overflows; the
        // normalisation is folded into the draw.
        let max = f64::from(self.candidates.iter().map(|c| c.0).fold(f32::MIN, f32::max));
        let inv_t = 1.0 / f64::from(t);
        let weight = move |l: f32| ((f64::from(l) - max) * inv_t).exp();

        let top_p = self.config.top_p;
        let keep = if top_p.is_nan() || top_p < 1.0 {
            let total: f64 = self.candidates.iter().map(|c| weight(c.0)).sum();
            // NaN or negative top_p: a zero target keeps just the most likely token.
            nucleus_len(
                &mut self.candidates,
                f64::from(top_p.max(0.0)) * total,
                weight,
            )
        } else {
            self.candidates.len()
        };
        let kept = self.candidates.get(..keep).unwrap_or(&self.candidates);

        // Inverse-CDF draw over the kept tokens.
        let kept_total: f64 = kept.iter().map(|c| weight(c.0)).sum();
        let u = self.rng.next_f64() * kept_total;
        let mut acc = 0.0;
        for &(l, id) in kept {
            acc += weight(l);
            if u < acc {
                return id;
            }
        }
        // Rounding left `u` at or beyond the sum: take the last kept token with any mass.
        kept.iter()
            .rev()
            .find(|c| weight(c.0) > 0.0)
            .or(kept.first())
            .map_or(0, |c| c.1)
    }
}

/// Descending logit, ties to the lower id, so filtering is deterministic.
fn by_logit_desc(a: &(f32, u32), b: &(f32, u32)) -> std::cmp::Ordering {
    b.0.total_cmp(&a.0).then(a.1.cmp(&b.1))
}

/// Orders the head of `candidates` by descending logit and returns the length of the smallest
/// prefix whose weight reaches `target` (at least 1 if there are candidates). The nucleus is
/// usually small, so rather than sorting the whole vocabulary this selects and sorts
/// successive segments (64, 128, 256, ... candidates) of the unsorted tail, continuing the
/// running mass, until the target is reached.
fn nucleus_len(candidates: &mut [(f32, u32)], target: f64, weight: impl Fn(f32) -> f64) -> usize {
    let n = candidates.len();
    // `candidates[..done]` holds the `done` largest, sorted.
    let mut done = 0;
    let mut step = 64;
    let mut mass = 0.0;
    while done < n {
        let Some(tail) = candidates.get_mut(done..) else {
            break;
        };
        let seg_len = step.min(tail.len());
        if seg_len < tail.len() {
            tail.select_nth_unstable_by(seg_len - 1, by_logit_desc);
        }
        let Some(seg) = tail.get_mut(..seg_len) else {
            break;
        };
        seg.sort_unstable_by(by_logit_desc);
        for (i, c) in seg.iter().enumerate() {
            mass += weight(c.0);
            if mass >= target {
                return done + i + 1;
            }
        }
        done += seg_len;
        step = step.saturating_mul(2);
    }
    // Rounding kept the running sum just under the target: keep everything.
    n
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
