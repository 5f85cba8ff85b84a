//! Feeds arbitrary bytes to the GGUF reader and touches everything a successful parse exposes.
#![no_main]

use kvcache::model::gguf::Gguf;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(g) = Gguf::from_bytes(data.to_vec()) else {
        return;
    };
    let mut acc = 0u64;
    for (key, value) in g.metadata_entries() {
        // Lookup by key must find the same entry (compared by identity: NaN != NaN).
        assert!(g.metadata(key).is_some_and(|found| std::ptr::eq(found, value)));
        acc = acc.wrapping_add(value.as_u64().unwrap_or(0));
    }
    for info in g.tensors() {
        let view = g
            .tensor(&info.name)
            .expect("every listed tensor has a view");
        assert_eq!(view.data.len() as u64, info.size);
        assert_eq!(view.dims, &info.dims[..]);
        acc = view
            .data
            .iter()
            .fold(acc, |a, &b| a.wrapping_add(u64::from(b)));
    }
    std::hint::black_box(acc);
});
