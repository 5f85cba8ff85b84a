use kvcache::attention::*;
use kvcache::*;
fn main() {
    let mut spec = CacheSpec::new(1, 9, 3, 64);
    spec.k_format = KvFormat::F16;
    spec.v_format = KvFormat::F16;
    let layout = Layout::new(spec).unwrap();
    let mut arena = vec![0u8; layout.arena_bytes(8).unwrap()];
    let mut cache = KvCache::new(spec, &mut arena).unwrap();
    let seq = cache.add_sequence().unwrap();
    let n = 5;
    cache.reserve(seq, n).unwrap();
    let kv: Vec<f32> = (0..n * 192)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0))
        .collect();
    cache.write_run(seq, 0, 0, &kv, &kv).unwrap();
    let q: Vec<f32> = (0..n * 576)
        .map(|i| ((i * 104729 % 997) as f32 / 98.0 - 5.0))
        .collect();
    let opts = AttentionOptions::default();
    let mut scratch = vec![0.0; attention_scratch_len(&cache, &opts)];
    let mut whole = vec![0.0; n * 576];
    attention(
        &cache,
        0,
        &[BatchEntry {
            seq,
            first_position: 0,
            tokens: n,
        }],
        &q,
        &mut whole,
        &mut scratch,
        &opts,
    )
    .unwrap();
    for t in 0..n {
        let mut one = vec![0.0; 576];
        attention(
            &cache,
            0,
            &[BatchEntry {
                seq,
                first_position: t,
                tokens: 1,
            }],
            &q[t * 576..(t + 1) * 576],
            &mut one,
            &mut scratch,
            &opts,
        )
        .unwrap();
        let diff = one
            .iter()
            .zip(&whole[t * 576..])
            .filter(|(a, b)| a.to_bits() != b.to_bits())
            .count();
        let worst = one
            .iter()
            .zip(&whole[t * 576..])
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        println!("token {t}: {diff} differ, worst {worst}");
    }
}
