//! "No allocation after construction", checked: a counting global allocator watches this
//! thread while a cache of every storage format (and a sliding window) goes through the whole
//! core API — sequences, prefill and decode writes, reads, forks with copy-on-write, truncation,
//! removal, accounting and invariants, page tables, attention in one call and as work items,
//! every error path of the brief — and through the C ABI. Not one allocation may happen.
//! (Its own test binary: a global allocator is per binary.)

use std::alloc::{GlobalAlloc, Layout as AllocLayout, System};
use std::cell::Cell;

use kvcache::attention::{
    attention, attention_scratch_len, AttentionOptions, AttentionPlan, BatchEntry,
};
use kvcache::ffi::*;
use kvcache::spec::Kind;
use kvcache::{CacheSpec, Error, KvCache, KvFormat, Layout, SeqId};

/// Counts allocations made by a thread while its `WATCHING` flag is set.
struct Counting;

thread_local! {
    // Per thread, so that tests running at the same time do not count each other.
    static WATCHING: Cell<bool> = const { Cell::new(false) };
    static ALLOCATIONS: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    if WATCHING.try_with(Cell::get).unwrap_or(false) {
        let _ = ALLOCATIONS.try_with(|n| n.set(n.get() + 1));
    }
}

// SAFETY: every call is forwarded unchanged to the system allocator; counting touches only
// const-initialized thread-local `Cell`s, which do not allocate.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: AllocLayout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc(layout) }
    }
    unsafe fn alloc_zeroed(&self, layout: AllocLayout) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.alloc_zeroed(layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: AllocLayout, new_size: usize) -> *mut u8 {
        count();
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.realloc(ptr, layout, new_size) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: AllocLayout) {
        // SAFETY: the caller's contract, forwarded.
        unsafe { System.dealloc(ptr, layout) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Allocations this thread makes while running `f`.
fn allocations_during(f: impl FnOnce()) -> usize {
    let before = ALLOCATIONS.with(Cell::get);
    WATCHING.with(|w| w.set(true));
    f();
    WATCHING.with(|w| w.set(false));
    ALLOCATIONS.with(Cell::get) - before
}

/// The counter works: a `Vec` is seen (so a zero below means something).
#[test]
fn the_counter_sees_an_allocation() {
    let n = allocations_during(|| {
        let v: Vec<u8> = std::hint::black_box(Vec::with_capacity(10));
        drop(v);
    });
    assert_eq!(n, 1);
}

fn values(seed: &mut u64, out: &mut [f32]) {
    for x in out {
        *seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        *x = ((*seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0;
    }
}

#[test]
fn the_core_allocates_nothing_after_construction() {
    let formats = [
        (KvFormat::F32, KvFormat::F32, 0),
        (KvFormat::F16, KvFormat::F16, 0),
        (KvFormat::Bf16, KvFormat::F16, 24),
        (KvFormat::Int8, KvFormat::Int8, 0),
        (KvFormat::Int4, KvFormat::Int4, 0),
        (KvFormat::Int8, KvFormat::Int4, 24),
    ];
    // Quantized keys run once more with a key tail.
    let tails = formats.iter().map(|&f| (f, 0)).chain([
        ((KvFormat::Int4, KvFormat::Int4, 0), 5),
        ((KvFormat::Int8, KvFormat::Int4, 24), 7),
    ]);
    for ((k_format, v_format, window), key_tail) in tails {
        let mut spec = CacheSpec::new(2, 6, 2, 32);
        spec.block_tokens = 8;
        spec.k_format = k_format;
        spec.v_format = v_format;
        spec.max_seqs = 3;
        spec.max_seq_tokens = 96;
        spec.window = window;
        spec.sink_tokens = if window > 0 { 4 } else { 0 };
        spec.key_tail_tokens = key_tail;
        let layout = Layout::new(spec).unwrap();
        let mut arena = vec![0u8; layout.arena_bytes(24).unwrap()];
        let row = spec.kv_heads * spec.head_dim;
        let q_row = spec.q_heads * spec.head_dim;
        let mut seed = 5u64;
        let mut kv = vec![0f32; 48 * row];
        values(&mut seed, &mut kv);
        let mut nan_kv = kv[..row].to_vec();
        nan_kv[3] = f32::NAN;
        let mut queries = vec![0f32; 2 * q_row];
        values(&mut seed, &mut queries);
        let mut out = vec![0f32; 2 * q_row];
        let mut read_k = vec![0f32; row];
        let mut read_v = vec![0f32; row];
        let mut one_row = vec![0f32; spec.head_dim];
        let options = AttentionOptions {
            splits: 3,
            query_tile: 4,
            ..AttentionOptions::default()
        };
        // Buffers for the work-item API, sized generously up front.
        let mut partials = vec![0f32; 1 << 16];
        let mut scratch = vec![0f32; 1 << 16];
        let mut snapshot = vec![0u8; 1 << 20];
        let mut cache = KvCache::new(spec, &mut arena).unwrap();
        assert!(attention_scratch_len(&cache, &options) <= scratch.len());

        let n = allocations_during(|| {
            let a = cache.add_sequence().unwrap();
            let b = cache.add_sequence().unwrap();
            // Prefill 40 tokens, then decode 5 one at a time.
            let first = cache.reserve(a, 40).unwrap().start;
            for layer in 0..spec.layers {
                cache
                    .write_run(a, layer, first, &kv[..40 * row], &kv[8 * row..48 * row])
                    .unwrap();
            }
            for step in 0..5 {
                let p = cache.reserve(a, 1).unwrap().start;
                for layer in 0..spec.layers {
                    let at = step * row;
                    cache
                        .write(a, layer, p, &kv[at..at + row], &kv[at + row..at + 2 * row])
                        .unwrap();
                }
            }
            let first = cache.reserve(b, 9).unwrap().start;
            for layer in 0..spec.layers {
                cache
                    .write_run(b, layer, first, &kv[..9 * row], &kv[..9 * row])
                    .unwrap();
            }
            // A fork, and its first write copying the shared tail block.
            let c = cache.fork(a).unwrap();
            let p = cache.reserve(c, 1).unwrap().start;
            for layer in 0..spec.layers {
                cache.write(c, layer, p, &kv[..row], &kv[..row]).unwrap();
            }
            cache.read(a, 1, 44, &mut read_k, &mut read_v).unwrap();
            cache.read_row(c, 0, Kind::V, 1, 45, &mut one_row).unwrap();
            // Attention: a decode entry and a 2-token prefill chunk, in one call and as work
            // items run in reverse and merged.
            let batch = [
                BatchEntry {
                    seq: a,
                    first_position: 44,
                    tokens: 1,
                },
                BatchEntry {
                    seq: b,
                    first_position: 8,
                    tokens: 1,
                },
            ];
            for layer in 0..spec.layers {
                attention(
                    &cache,
                    layer,
                    &batch,
                    &queries,
                    &mut out,
                    &mut scratch,
                    &options,
                )
                .unwrap();
                let plan = AttentionPlan::new(&cache, layer, &batch, &options).unwrap();
                let (items, len) = (plan.work_items(), plan.partial_len());
                assert!(items * len <= partials.len() && plan.scratch_len() <= scratch.len());
                for i in (0..items).rev() {
                    plan.run_item(
                        i,
                        &queries,
                        &mut partials[i * len..(i + 1) * len],
                        &mut scratch[..plan.scratch_len()],
                    )
                    .unwrap();
                }
                plan.merge(&partials[..items * len], &mut out).unwrap();
            }
            // Accounting, invariants, page tables.
            let stats = cache.stats();
            assert!(stats.sequences == 3 && cache.seq_stats(c).unwrap().len == 46);
            assert_eq!(cache.page_table(a).unwrap().len(), 6);
            assert!(!cache.block_storage().is_empty());
            cache.check_invariants().unwrap();
            // Every error path of the brief: refused, nothing allocated.
            assert!(matches!(cache.reserve(a, 1000), Err(Error::TooLong { .. })));
            assert!(matches!(
                cache.write(a, 0, 45, &kv[..row - 1], &kv[..row]),
                Err(Error::BadShape(_))
            ));
            assert!(matches!(
                cache.write(a, 9, 44, &kv[..row], &kv[..row]),
                Err(Error::BadIndex(_))
            ));
            assert!(matches!(
                cache.read(a, 0, 99, &mut read_k, &mut read_v),
                Err(Error::BadPosition { .. })
            ));
            if !k_format.is_float() {
                // Quantized formats cannot hold NaN (float formats store it as given).
                assert_eq!(
                    cache.write(a, 0, 44, &nan_kv, &kv[..row]),
                    Err(Error::NonFinite)
                );
            }
            let stale = SeqId::from_raw(u64::MAX);
            assert_eq!(cache.reserve(stale, 1), Err(Error::UnknownSequence));
            assert!(matches!(cache.add_sequence(), Err(Error::TooManySequences)));
            let short = &mut scratch[..1];
            assert!(matches!(
                attention(&cache, 0, &batch, &queries, &mut out, short, &options),
                Err(Error::ScratchTooSmall { .. })
            ));
            assert_eq!(
                cache.reserve_batch(&[(a, 1), (a, 1)]),
                Err(Error::DuplicateSequence)
            );
            // Shrinking and removing.
            cache.truncate(a, 42).unwrap();
            cache.remove(b).unwrap();
            cache.remove(c).unwrap();
            // Saving and restoring a sequence (refused once the window has thinned it).
            match cache.export_sequence(a, &mut snapshot) {
                Ok(n) => {
                    let restored = cache.import_sequence(&snapshot[..n]).unwrap();
                    cache.remove(restored).unwrap();
                    assert!(matches!(
                        cache.import_sequence(&snapshot[..n - 1]),
                        Err(Error::BadSnapshot(_))
                    ));
                }
                Err(e) => assert!(matches!(e, Error::Evicted { .. }), "{e}"),
            }
            let d = cache.add_sequence().unwrap();
            cache.reserve(d, 96).unwrap();
            let e = cache.add_sequence().unwrap();
            assert!(matches!(
                cache.reserve(e, 96),
                Err(Error::OutOfBlocks { .. })
            ));
            cache.check_invariants().unwrap();
        });
        assert_eq!(
            n, 0,
            "{k_format}/{v_format}, window {window}, key tail {key_tail}: {n} allocations"
        );
    }
}

/// A byte buffer written and read through C callbacks (no allocation in either).
struct Flash {
    bytes: *mut u8,
    len: usize,
    cap: usize,
}

unsafe extern "C" fn flash_write(user: *mut std::ffi::c_void, data: *const u8, len: usize) -> i32 {
    // SAFETY: `user` is the test's `Flash`, `data` has `len` readable bytes.
    unsafe {
        let f = &mut *user.cast::<Flash>();
        if len > f.cap - f.len {
            return 1;
        }
        std::ptr::copy_nonoverlapping(data, f.bytes.add(f.len), len);
        f.len += len;
    }
    0
}

unsafe extern "C" fn flash_read(
    user: *mut std::ffi::c_void,
    at: usize,
    buf: *mut u8,
    len: usize,
) -> i32 {
    // SAFETY: `user` is the test's `Flash`, `buf` has `len` writable bytes.
    unsafe {
        let f = &*user.cast::<Flash>();
        if at > f.len || len > f.len - at {
            return 1;
        }
        std::ptr::copy_nonoverlapping(f.bytes.add(at), buf, len);
    }
    0
}

#[test]
fn the_c_abi_allocates_nothing() {
    let spec = KvcSpec {
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 16,
        block_tokens: 4,
        k_format: 1,
        v_format: 3,
        max_seqs: 2,
        max_seq_tokens: 64,
        window: 0,
        sink_tokens: 0,
        key_tail_tokens: 0,
    };
    let mut bytes = 0usize;
    // SAFETY (every call): valid pointers and lengths; the arena and handle memory outlive the
    // handle's uses.
    unsafe { assert_eq!(kvc_arena_bytes(&spec, 16, &mut bytes), KvcStatus::Ok) };
    let mut arena = vec![0u8; bytes];
    let mut handle = vec![0u64; kvc_cache_size().div_ceil(8)];
    let kv = vec![0.25f32; 10 * 32];
    let mut snapshot = vec![0u8; 1 << 16];
    let queries = vec![0.5f32; 64];
    let mut out = vec![0f32; 64];
    let mut k_out = vec![0f32; 32];
    let mut v_out = vec![0f32; 32];
    let mut scratch = vec![0f32; 1 << 14];
    let mut table = [0u32; 16];
    let mut message = [0u8; 64];
    let mut cache: *mut KvcCache = std::ptr::null_mut();
    // Construction may allocate once per process, and only with `KVCACHE_FORCE_SCALAR` set
    // (reading that testing switch copies its value); nothing after it may.
    let status = unsafe {
        kvc_cache_init(
            handle.as_mut_ptr().cast(),
            handle.len() * 8,
            &spec,
            arena.as_mut_ptr(),
            bytes,
            &mut cache,
        )
    };
    assert_eq!(status, KvcStatus::Ok);
    let n = allocations_during(|| unsafe {
        let (mut seq, mut first, mut entries, mut len) = (0u64, 0u32, 0usize, 0usize);
        assert_eq!(kvc_add_sequence(cache, &mut seq), KvcStatus::Ok);
        assert_eq!(kvc_reserve(cache, seq, 10, &mut first), KvcStatus::Ok);
        for layer in 0..2 {
            assert_eq!(
                kvc_write(cache, seq, layer, first, kv.as_ptr(), kv.as_ptr(), kv.len()),
                KvcStatus::Ok
            );
        }
        assert_eq!(
            kvc_read(cache, seq, 1, 9, k_out.as_mut_ptr(), v_out.as_mut_ptr(), 32),
            KvcStatus::Ok
        );
        assert_eq!(kvc_attention_scratch_len(cache, &mut len), KvcStatus::Ok);
        let entry = KvcBatchEntry {
            seq,
            first_position: 9,
            tokens: 1,
        };
        let status = kvc_attention(
            cache,
            0,
            &entry,
            1,
            queries.as_ptr(),
            out.as_mut_ptr(),
            64,
            scratch.as_mut_ptr(),
            len,
        );
        assert_eq!(status, KvcStatus::Ok);
        let opts = KvcAttentionOptions {
            splits: 2,
            query_tile: 1,
            scale: 0.3,
            flags: KVC_ATTN_EXACT_VALUES,
        };
        assert_eq!(
            kvc_attention_scratch_len_ex(cache, &opts, &mut len),
            KvcStatus::Ok
        );
        assert!(len <= scratch.len());
        let status = kvc_attention_ex(
            cache,
            0,
            &entry,
            1,
            &opts,
            queries.as_ptr(),
            out.as_mut_ptr(),
            64,
            scratch.as_mut_ptr(),
            len,
        );
        assert_eq!(status, KvcStatus::Ok);
        assert_eq!(
            kvc_page_table(cache, seq, table.as_mut_ptr(), 16, &mut entries),
            KvcStatus::Ok
        );
        assert_eq!(
            kvc_write(cache, seq, 0, 0, kv.as_ptr(), kv.as_ptr(), 7),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_reserve(cache, seq ^ 1 << 40, 1, std::ptr::null_mut()),
            KvcStatus::UnknownSequence
        );
        kvc_status_message(
            KvcStatus::BadShape as u32,
            message.as_mut_ptr().cast(),
            message.len(),
        );
        let (mut saved, mut restored) = (0usize, 0u64);
        assert_eq!(
            kvc_seq_export(
                cache,
                seq,
                snapshot.as_mut_ptr(),
                snapshot.len(),
                &mut saved
            ),
            KvcStatus::Ok
        );
        assert_eq!(
            kvc_seq_import(cache, snapshot.as_ptr(), saved, &mut restored),
            KvcStatus::Ok
        );
        assert_eq!(
            kvc_seq_import(cache, snapshot.as_ptr(), saved - 1, &mut restored),
            KvcStatus::BadSnapshot
        );
        assert_eq!(kvc_remove(cache, restored), KvcStatus::Ok);
        // The same through callbacks (a preallocated buffer standing in for flash).
        let mut flash = Flash {
            bytes: snapshot.as_mut_ptr(),
            len: 0,
            cap: snapshot.len(),
        };
        let user = (&mut flash as *mut Flash).cast();
        assert_eq!(
            kvc_seq_export_to(cache, seq, Some(flash_write), user, &mut saved),
            KvcStatus::Ok
        );
        assert_eq!(
            kvc_seq_import_from(cache, saved, Some(flash_read), user, &mut restored),
            KvcStatus::Ok
        );
        assert_eq!(kvc_remove(cache, restored), KvcStatus::Ok);
        assert_eq!(kvc_remove(cache, seq), KvcStatus::Ok);
    });
    assert_eq!(n, 0, "{n} allocations through the C ABI");
}

/// The model runner (std) reuses its buffers: once a step has sized them, a decode step
/// allocates nothing on the calling thread. (Its rotary tables grow with the furthest position
/// seen, so "warm" here means the sequence has been that far before: it is run to 30 tokens,
/// truncated to 6, and 10 steps are watched.)
#[test]
fn a_warm_decode_step_allocates_nothing() {
    use kvcache::model::gguf::Gguf;
    use kvcache::model::llama::{Model, Runner, Step};
    let gguf = Gguf::from_bytes(kvcache::model::synthetic::synthetic_gguf(3)).unwrap();
    let model = Model::from_gguf(gguf).unwrap();
    for threads in [1, 2] {
        let spec = model.cache_spec(KvFormat::F16, 1, 64);
        let mut arena = vec![0u8; Layout::new(spec).unwrap().arena_bytes(8).unwrap()];
        let mut cache = KvCache::new(spec, &mut arena).unwrap();
        let mut runner = Runner::new(&model, threads);
        let vocab = model.config().vocab;
        let mut logits = vec![0f32; vocab];
        let seq = cache.add_sequence().unwrap();
        let forward =
            |runner: &mut Runner, cache: &mut KvCache, tokens: &[u32], logits: &mut [f32]| {
                runner
                    .forward(cache, &[Step { seq, tokens }], logits)
                    .unwrap()
            };
        forward(&mut runner, &mut cache, &[1, 2, 3, 4, 5], &mut logits);
        for token in 6..30u32 {
            forward(&mut runner, &mut cache, &[token], &mut logits);
        }
        cache.truncate(seq, 6).unwrap();
        let n = allocations_during(|| {
            for token in 7..17u32 {
                forward(&mut runner, &mut cache, &[token], &mut logits);
            }
        });
        assert_eq!(
            n, 0,
            "{threads} threads: {n} allocations in 10 decode steps"
        );
    }
}
