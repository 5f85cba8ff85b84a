//! Sampler: greedy, determinism, empirical distribution, top-k / top-p filtering, hostile
//! logits.

use kvcache::model::sampler::{argmax, Rng, Sampler, SamplerConfig};
use proptest::prelude::*;

fn cfg(temperature: f32, top_k: usize, top_p: f32, seed: u64) -> SamplerConfig {
    SamplerConfig {
        temperature,
        top_k,
        top_p,
        seed,
    }
}

fn counts(s: &mut Sampler, logits: &[f32], draws: usize) -> Vec<usize> {
    let mut c = vec![0; logits.len()];
    for _ in 0..draws {
        c[s.sample(logits) as usize] += 1;
    }
    c
}

fn softmax(logits: &[f32], t: f32) -> Vec<f64> {
    let m = logits.iter().copied().fold(f32::MIN, f32::max) as f64;
    let e: Vec<f64> = logits
        .iter()
        .map(|&l| ((l as f64 - m) / t as f64).exp())
        .collect();
    let z: f64 = e.iter().sum();
    e.iter().map(|x| x / z).collect()
}

/// Pearson chi-square statistic of observed counts against expected probabilities.
fn chi_square(obs: &[usize], p: &[f64]) -> f64 {
    let n: usize = obs.iter().sum();
    obs.iter()
        .zip(p)
        .filter(|(_, &p)| p > 0.0)
        .map(|(&o, &p)| {
            let e = p * n as f64;
            (o as f64 - e).powi(2) / e
        })
        .sum()
}

#[test]
fn greedy_is_argmax_lowest_id_on_ties() {
    let mut s = Sampler::new(SamplerConfig::greedy());
    assert_eq!(s.sample(&[0.1, 3.0, -1.0, 2.9]), 1);
    assert_eq!(s.sample(&[1.0, 5.0, 5.0, 2.0]), 1);
    assert_eq!(s.sample(&[f32::NAN, -1.0, f32::NAN]), 1);
    assert_eq!(s.sample(&[f32::NAN, f32::NAN]), 0);
    assert_eq!(s.sample(&[]), 0);
    assert_eq!(s.sample(&[f32::NEG_INFINITY, f32::INFINITY]), 1);
    assert_eq!(argmax(&[-3.0, -2.0, -2.0]), 1);
    // Negative and NaN temperatures are greedy too.
    assert_eq!(
        Sampler::new(cfg(-1.0, 0, 1.0, 1)).sample(&[0.0, 1.0, 0.5]),
        1
    );
    assert_eq!(
        Sampler::new(cfg(f32::NAN, 0, 1.0, 1)).sample(&[0.0, 1.0, 0.5]),
        1
    );
}

#[test]
fn top_k_one_equals_greedy() {
    let mut rng = Rng::new(7);
    let mut s = Sampler::new(cfg(1.5, 1, 0.9, 42));
    for _ in 0..200 {
        let logits: Vec<f32> = (0..50)
            .map(|_| (rng.next_f64() * 10.0 - 5.0) as f32)
            .collect();
        assert_eq!(s.sample(&logits), argmax(&logits));
    }
}

#[test]
fn same_seed_same_draws() {
    let logits: Vec<f32> = (0..100).map(|i| ((i * 37) % 17) as f32 * 0.3).collect();
    let mut a = Sampler::new(cfg(0.8, 40, 0.95, 1234));
    let mut b = Sampler::new(cfg(0.8, 40, 0.95, 1234));
    let da: Vec<u32> = (0..500).map(|_| a.sample(&logits)).collect();
    let db: Vec<u32> = (0..500).map(|_| b.sample(&logits)).collect();
    assert_eq!(da, db);
    let mut c = Sampler::new(cfg(0.8, 40, 0.95, 1235));
    let dc: Vec<u32> = (0..500).map(|_| c.sample(&logits)).collect();
    assert_ne!(da, dc);
    a.reseed(1234);
    let again: Vec<u32> = (0..500).map(|_| a.sample(&logits)).collect();
    assert_eq!(da, again);
}

#[test]
fn frequencies_match_softmax() {
    let logits = [1.0f32, 2.0, 0.5, 3.0, -1.0, 2.5];
    for (t, seed) in [(1.0f32, 1u64), (0.7, 2), (2.0, 3)] {
        let mut s = Sampler::new(cfg(t, 0, 1.0, seed));
        let obs = counts(&mut s, &logits, 200_000);
        let x2 = chi_square(&obs, &softmax(&logits, t));
        // 5 degrees of freedom: P(X² > 25) ≈ 1.4e-4.
        assert!(x2 < 25.0, "t={t}: chi-square {x2}, counts {obs:?}");
    }
}

#[test]
fn top_k_restricts_and_renormalises() {
    let logits = [1.0f32, 2.0, 0.5, 3.0, -1.0, 2.5];
    let mut s = Sampler::new(cfg(1.0, 3, 1.0, 9));
    let obs = counts(&mut s, &logits, 100_000);
    assert_eq!((obs[0], obs[2], obs[4]), (0, 0, 0), "{obs:?}");
    let kept = [logits[1], logits[3], logits[5]];
    let p = softmax(&kept, 1.0);
    let x2 = chi_square(&[obs[1], obs[3], obs[5]], &p);
    assert!(x2 < 20.0, "chi-square {x2}, counts {obs:?}");
}

#[test]
fn top_p_excludes_the_tail() {
    // Probabilities 0.5, 0.3, 0.15, 0.05 at temperature 1.
    let logits: Vec<f32> = [0.5f32, 0.3, 0.15, 0.05].iter().map(|p| p.ln()).collect();
    let mut s = Sampler::new(cfg(1.0, 0, 0.75, 5));
    let obs = counts(&mut s, &logits, 50_000);
    assert_eq!((obs[2], obs[3]), (0, 0), "{obs:?}");
    // The kept pair keeps its 5:3 ratio.
    let x2 = chi_square(&obs[..2], &[0.625, 0.375]);
    assert!(x2 < 15.0, "{obs:?}");
    // A top_p reaching into the third token keeps it; the fourth stays out.
    let mut s = Sampler::new(cfg(1.0, 0, 0.9, 6));
    let obs = counts(&mut s, &logits, 50_000);
    assert!(obs[2] > 0 && obs[3] == 0, "{obs:?}");
    // top_p <= 0 keeps only the most likely token.
    let mut s = Sampler::new(cfg(1.0, 0, 0.0, 7));
    assert!(counts(&mut s, &logits, 1000)[0] == 1000);
}

#[test]
fn nan_and_infinite_logits_never_drawn_or_panic() {
    let logits = [f32::NAN, 1.0, f32::NEG_INFINITY, 1.0, f32::NAN];
    let mut s = Sampler::new(cfg(1.0, 0, 0.9, 11));
    for _ in 0..1000 {
        let id = s.sample(&logits);
        assert!(id == 1 || id == 3, "{id}");
    }
    let mut s = Sampler::new(cfg(1.0, 2, 0.5, 12));
    assert_eq!(s.sample(&[f32::NAN; 8]), 0);
    assert_eq!(s.sample(&[]), 0);
    // +inf dominates.
    assert_eq!(s.sample(&[0.0, f32::INFINITY, 1.0]), 1);
    let mut s = Sampler::new(cfg(f32::INFINITY, 0, 1.0, 13));
    let _ = s.sample(&[f32::MAX, -f32::MAX, 0.0]);
    let mut s = Sampler::new(cfg(1e-30, 0, 1.0, 14));
    assert_eq!(s.sample(&[0.0, 1.0, 0.999]), 1);
}

#[test]
fn rng_is_roughly_uniform() {
    let mut r = Rng::new(0);
    let mut buckets = [0usize; 10];
    for _ in 0..100_000 {
        let x = r.next_f64();
        assert!((0.0..1.0).contains(&x));
        buckets[(x * 10.0) as usize] += 1;
    }
    let x2 = chi_square(&buckets, &[0.1; 10]);
    assert!(x2 < 35.0, "{buckets:?}");
}

proptest! {
    #[test]
    fn any_logits_give_an_in_range_id(
        logits in proptest::collection::vec(
            prop_oneof![any::<f32>(), Just(f32::NAN), Just(f32::INFINITY), Just(f32::NEG_INFINITY)],
            0..64,
        ),
        t in prop_oneof![Just(0.0f32), 0.01f32..5.0, any::<f32>()],
        k in 0usize..10,
        p in prop_oneof![Just(1.0f32), 0.0f32..1.0, any::<f32>()],
        seed in any::<u64>(),
    ) {
        let mut s = Sampler::new(cfg(t, k, p, seed));
        let id = s.sample(&logits);
        prop_assert!(logits.is_empty() && id == 0 || (id as usize) < logits.len());
        if !logits.is_empty() && logits.iter().any(|l| !l.is_nan() && *l > f32::NEG_INFINITY) {
            let l = logits[id as usize];
            prop_assert!(!l.is_nan() && l > f32::NEG_INFINITY);
        }
    }
}
