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
