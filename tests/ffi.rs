//! The C ABI with bad input: NULL pointers, small or misaligned handle memory, bad specs,
//! wrong lengths, stale ids. Each gets a status; nothing crashes or changes.

use kvcache::ffi::*;
use std::ptr::{null, null_mut};

fn spec() -> KvcSpec {
    KvcSpec {
        layers: 2,
        q_heads: 4,
        kv_heads: 2,
        head_dim: 8,
        block_tokens: 4,
        k_format: 1,
        v_format: 0,
        max_seqs: 2,
        max_seq_tokens: 64,
        window: 0,
        sink_tokens: 0,
    }
}

#[repr(C, align(64))]
struct Handle([u8; 1024]);

#[test]
fn every_entry_point_refuses_bad_input() {
    unsafe {
        let mut bytes = 0usize;
        assert_eq!(
            kvc_arena_bytes(null(), 4, &mut bytes),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_arena_bytes(&spec(), 4, null_mut()),
            KvcStatus::NullPointer
        );
        let mut bad = spec();
        bad.k_format = 9;
        assert_eq!(kvc_arena_bytes(&bad, 4, &mut bytes), KvcStatus::BadSpec);
        bad = spec();
        bad.q_heads = 3;
        assert_eq!(kvc_arena_bytes(&bad, 4, &mut bytes), KvcStatus::BadSpec);
        assert_eq!(kvc_arena_bytes(&spec(), 4, &mut bytes), KvcStatus::Ok);

        let mut arena = vec![0u8; bytes];
        let mut handle = Box::new(Handle([0; 1024]));
        assert!(kvc_cache_size() <= 1024);
        let mut cache: *mut KvcCache = null_mut();
        let h = handle.0.as_mut_ptr();
        assert_eq!(
            kvc_cache_init(
                null_mut(),
                1024,
                &spec(),
                arena.as_mut_ptr(),
                bytes,
                &mut cache
            ),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_cache_init(
                h.add(1),
                1000,
                &spec(),
                arena.as_mut_ptr(),
                bytes,
                &mut cache
            ),
            KvcStatus::ArenaTooSmall
        );
        assert_eq!(
            kvc_cache_init(h, 8, &spec(), arena.as_mut_ptr(), bytes, &mut cache),
            KvcStatus::ArenaTooSmall
        );
        assert_eq!(
            kvc_cache_init(h, 1024, &spec(), arena.as_mut_ptr(), 10, &mut cache),
            KvcStatus::ArenaTooSmall
        );
        assert!(cache.is_null());
        assert_eq!(
            kvc_cache_init(h, 1024, &spec(), arena.as_mut_ptr(), bytes, &mut cache),
            KvcStatus::Ok
        );

        let mut seq = 0u64;
        assert_eq!(
            kvc_add_sequence(null_mut(), &mut seq),
            KvcStatus::NullPointer
        );
        assert_eq!(kvc_add_sequence(cache, null_mut()), KvcStatus::NullPointer);
        assert_eq!(kvc_add_sequence(cache, &mut seq), KvcStatus::Ok);
        let mut first = 7u32;
        assert_eq!(kvc_reserve(cache, seq, 3, &mut first), KvcStatus::Ok);
        assert_eq!(first, 0);
        assert_eq!(
            kvc_reserve(cache, seq, 1000, null_mut()),
            KvcStatus::TooLong
        );
        assert_eq!(
            kvc_reserve(cache, seq ^ (1 << 40), 1, null_mut()),
            KvcStatus::UnknownSequence
        );
        let k = [1.0f32; 3 * 16];
        assert_eq!(
            kvc_write(cache, seq, 0, 0, null(), k.as_ptr(), 48),
            KvcStatus::NullPointer
        );
        assert_eq!(
            kvc_write(cache, seq, 0, 0, k.as_ptr(), k.as_ptr(), 47),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_write(cache, seq, 5, 0, k.as_ptr(), k.as_ptr(), 48),
            KvcStatus::BadIndex
        );
        let nan = [f32::NAN; 48];
        assert_eq!(
            kvc_write(cache, seq, 0, 0, nan.as_ptr(), k.as_ptr(), 48),
            KvcStatus::Ok
        ); // float formats hold NaN
        assert_eq!(
            kvc_write(cache, seq, 0, 0, k.as_ptr(), k.as_ptr(), 48),
            KvcStatus::Ok
        );
        let (mut ko, mut vo) = (vec![0.0f32; 16], vec![0.0f32; 16]);
        assert_eq!(
            kvc_read(cache, seq, 0, 2, ko.as_mut_ptr(), vo.as_mut_ptr(), 16),
            KvcStatus::Ok
        );
        assert_eq!(ko, vec![1.0; 16]);
        assert_eq!(
            kvc_read(cache, seq, 0, 3, ko.as_mut_ptr(), vo.as_mut_ptr(), 16),
            KvcStatus::BadPosition
        );
        assert_eq!(
            kvc_read(cache, seq, 0, 0, null_mut(), vo.as_mut_ptr(), 16),
            KvcStatus::NullPointer
        );
        let mut child = 0u64;
        assert_eq!(kvc_fork(cache, seq, null_mut()), KvcStatus::NullPointer);
        assert_eq!(kvc_fork(cache, seq, &mut child), KvcStatus::Ok);
        assert_eq!(
            kvc_fork(cache, seq, &mut child),
            KvcStatus::TooManySequences
        );
        assert_eq!(kvc_truncate(cache, child, 9), KvcStatus::BadPosition);
        assert_eq!(kvc_remove(cache, child), KvcStatus::Ok);
        assert_eq!(kvc_remove(cache, child), KvcStatus::UnknownSequence);
        let mut scratch_len = 0usize;
        assert_eq!(
            kvc_attention_scratch_len(cache, &mut scratch_len),
            KvcStatus::Ok
        );
        let mut scratch = vec![0.0f32; scratch_len];
        let q = [0.5f32; 32];
        let mut out = vec![0.0f32; 32];
        let entry = KvcBatchEntry {
            seq,
            first_position: 2,
            tokens: 1,
        };
        assert_eq!(
            kvc_attention(
                cache,
                1,
                &entry,
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                32,
                scratch.as_mut_ptr(),
                scratch_len
            ),
            KvcStatus::Ok
        );
        assert_eq!(
            kvc_attention(
                cache,
                1,
                &entry,
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                31,
                scratch.as_mut_ptr(),
                scratch_len
            ),
            KvcStatus::BadShape
        );
        assert_eq!(
            kvc_attention(
                cache,
                1,
                &entry,
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                32,
                scratch.as_mut_ptr(),
                1
            ),
            KvcStatus::ScratchTooSmall
        );
        assert_eq!(
            kvc_attention(
                cache,
                1,
                null(),
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                32,
                scratch.as_mut_ptr(),
                scratch_len
            ),
            KvcStatus::NullPointer
        );
        let late = KvcBatchEntry {
            seq,
            first_position: 3,
            tokens: 1,
        };
        assert_eq!(
            kvc_attention(
                cache,
                1,
                &late,
                1,
                q.as_ptr(),
                out.as_mut_ptr(),
                32,
                scratch.as_mut_ptr(),
                scratch_len
            ),
            KvcStatus::BadPosition
        );
        let mut stats = KvcStats::default();
        assert_eq!(kvc_stats_get(cache, null_mut()), KvcStatus::NullPointer);
        assert_eq!(kvc_stats_get(cache, &mut stats), KvcStatus::Ok);
        assert_eq!((stats.sequences, stats.tokens), (1, 3));
        let mut message = [0 as std::ffi::c_char; 8];
        let full = kvc_status_message(7, message.as_mut_ptr(), message.len());
        assert_eq!(full, "out of blocks".len());
        assert_eq!(
            std::ffi::CStr::from_ptr(message.as_ptr()).to_str().unwrap(),
            "out of "
        );
        assert_eq!(
            kvc_status_message(999, null_mut(), 0),
            "unknown status".len()
        );
    }
}
