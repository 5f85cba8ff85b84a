//! Criterion bench of one attention decode step over the paged cache (one layer and every
//! layer of SmolLM2's shape) at several context lengths and formats.

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use kvcache::attention::{attention, attention_scratch_len, AttentionOptions, BatchEntry};
use kvcache::spec::Kind;
use kvcache::{CacheSpec, KvCache, KvFormat, Layout};
use std::hint::black_box;

fn decode_step(c: &mut Criterion) {
    let mut group = c.benchmark_group("decode_step");
    group.sample_size(10);
    for format in [KvFormat::F32, KvFormat::F16, KvFormat::Bf16] {
        for ctx in [512usize, 2048] {
            let mut spec = CacheSpec::smollm2_135m();
            spec.k_format = format;
            spec.v_format = format;
            spec.max_seqs = 1;
            spec.max_seq_tokens = ctx;
            let layout = Layout::new(spec).unwrap();
            let blocks = ctx.div_ceil(spec.block_tokens);
            let mut arena = vec![0u8; layout.arena_bytes(blocks).unwrap()];
            let mut cache = KvCache::new(spec, &mut arena).unwrap();
            let seq = cache.add_sequence().unwrap();
            cache.reserve(seq, ctx).unwrap();
            let elems = ctx * spec.kv_heads * spec.head_dim;
            let values: Vec<f32> = (0..elems)
                .map(|i| ((i * 7919) % 2000) as f32 / 1000.0 - 1.0)
                .collect();
            for layer in 0..spec.layers {
                cache.write_run(seq, layer, 0, &values, &values).unwrap();
            }
            let options = AttentionOptions {
                query_tile: 1,
                ..AttentionOptions::default()
            };
            let mut scratch = vec![0.0; attention_scratch_len(&cache, &options)];
            let query: Vec<f32> = (0..spec.q_heads * spec.head_dim)
                .map(|i| (i % 17) as f32 / 17.0)
                .collect();
            let mut out = vec![0.0; query.len()];
            let entry = [BatchEntry {
                seq,
                first_position: ctx - 1,
                tokens: 1,
            }];
            let bytes = (ctx
                * spec.layers
                * spec.kv_heads
                * (layout.row_bytes(Kind::K) + layout.row_bytes(Kind::V)))
                as u64;
            group.throughput(Throughput::Bytes(bytes));
            group.bench_function(format!("{format}/ctx{ctx}/all_layers"), |b| {
                b.iter(|| {
                    for layer in 0..spec.layers {
                        attention(
                            &cache,
                            layer,
                            &entry,
                            black_box(&query),
                            &mut out,
                            &mut scratch,
                            &options,
                        )
                        .unwrap();
                    }
                    black_box(&out);
                })
            });
        }
    }
    group.finish();
}

criterion_group!(benches, decode_step);
criterion_main!(benches);
