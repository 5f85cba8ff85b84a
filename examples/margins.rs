//! Teacher-forces a token sequence through the model and prints, per step, the model's top-2
//! tokens with their logits and the logit of the expected token.
//! `cargo run --release --example margins -- PROMPT_IDS... -- EXPECTED_IDS...`
use kvcache::model::llama::{Model, Runner, Step};
use kvcache::{KvCache, KvFormat};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let split = args
        .iter()
        .position(|a| a == "--")
        .expect("PROMPT_IDS -- EXPECTED_IDS");
    let prompt: Vec<u32> = args[..split].iter().map(|a| a.parse().unwrap()).collect();
    let expected: Vec<u32> = args[split + 1..]
        .iter()
        .map(|a| a.parse().unwrap())
        .collect();
    let model = Model::load(kvcache::cli::generate::DEFAULT_MODEL).unwrap();
    let (spec, mut arena) =
        kvcache::cli::generate::cache_arena(&model, KvFormat::F16, 1, 512).unwrap();
    let mut cache = KvCache::new(spec, arena.as_mut_slice()).unwrap();
    let seq = cache.add_sequence().unwrap();
    let mut runner = Runner::new(&model, 2);
    let mut logits = vec![0.0; model.config().vocab];
    runner
        .forward(
            &mut cache,
            &[Step {
                seq,
                tokens: &prompt,
            }],
            &mut logits,
        )
        .unwrap();
    for (i, &want) in expected.iter().enumerate() {
        let mut order: Vec<usize> = (0..logits.len()).collect();
        order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]));
        println!(
            "step {i:2}: top {} ({:.4}), second {} ({:.4}); expected {want} ({:.4})",
            order[0], logits[order[0]], order[1], logits[order[1]], logits[want as usize]
        );
        runner
            .forward(
                &mut cache,
                &[Step {
                    seq,
                    tokens: &[want],
                }],
                &mut logits,
            )
            .unwrap();
    }
}
