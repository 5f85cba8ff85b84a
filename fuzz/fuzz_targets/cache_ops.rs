//! Decodes bytes into operations on a small cache (spec taken from the first bytes, windows
//! included) and checks after every step: the structural invariants, and every stored row of
//! every sequence against a plain model (a `Vec` of token tags per sequence, with the window's
//! evictions replayed). A failed operation must change nothing. Sequences are also saved and
//! restored (`export_sequence` / `import_sequence`), intact or damaged. Keys and values take
//! any of the five formats. With int8 / int4 keys and a key tail, the tail must hold the
//! positions the model says. int8 keys it holds read back exact (`f16` holds the model's
//! values exactly), other int8 rows within int8's half step. int4 rows, held or not, must read
//! back as the format's own steps replayed on the model's values ([`int4_row`]), bit for bit:
//! the Hadamard rotation, the tail's `f16`, each sequence's first key and value held exact,
//! and the per-channel key offsets, themselves checked against the mean of the run of tokens
//! the model says set them (the first write after `add_sequence` or a truncation to 0, kept
//! through forks and restores). Writes after a reserve are one run per layer, so offsets and
//! first keys differ; a fork, a truncation or a restore that loses or keeps the wrong state
//! shows.
#![no_main]

use kvcache::cache::NO_BLOCK;
use kvcache::half::{bf16_to_f32, f16_to_f32};
use kvcache::spec::Kind;
use kvcache::{kernels, quant};
use kvcache::{CacheSpec, Error, KvCache, KvFormat, Layout, SeqId};
use libfuzzer_sys::fuzz_target;

/// What `read_row` gives for an int4 row whose model values are `x`, replaying the cache's
/// steps: rotated (when `head_dim` is a power of two from 2), less the key offsets `mu` (zero
/// for values), then held exact (the sequence's first row), in the key tail's `f16`, or as an
/// int4 row; the offsets added back and the rotation undone.
fn int4_row(x: &[f32], mu: &[f32], first: bool, tail: bool) -> Vec<f32> {
    let head_dim = x.len();
    let mut y = x.to_vec();
    if quant::rotated(KvFormat::Int4, head_dim) {
        quant::hadamard(&mut y);
    }
    let mut out = vec![0.0f32; head_dim];
    if first {
        for ((o, &v), &m) in out.iter_mut().zip(&y).zip(mu) {
            *o = v - m;
        }
    } else if tail {
        let shifted: Vec<f32> = y.iter().zip(mu).map(|(&v, &m)| v - m).collect();
        let mut bytes = vec![0u8; 2 * head_dim];
        kernels::encode_row(KvFormat::F16, &shifted, &mut bytes);
        kernels::decode_row(KvFormat::F16, &bytes, &mut out);
    } else {
        let mut bytes = vec![0u8; KvFormat::Int4.row_bytes(head_dim).unwrap()];
        quant::encode_int4_shifted(&y, |d| mu[d], &mut bytes);
        kernels::decode_row(KvFormat::Int4, &bytes, &mut out);
    }
    for (o, &m) in out.iter_mut().zip(mu) {
        *o += m;
    }
    if quant::rotated(KvFormat::Int4, head_dim) {
        quant::hadamard(&mut out);
    }
    out
}

/// Exact in f32, f16 and bf16: multiples of 1/4 in [-32, 32).
fn value(tag: u32, layer: usize, kind: Kind, element: usize) -> f32 {
    let salt = (layer * 2 + (kind == Kind::V) as usize) as u32;
    ((tag.wrapping_mul(2654435761) ^ (element as u32 * 40503 + salt * 977)) % 256) as f32 / 4.0 - 32.0
}

struct ModelSeq {
    id: SeqId,
    tags: Vec<u32>,
    /// Logical blocks `sink_blocks..evict_end` were evicted by the window.
    evict_end: usize,
    /// The key tail holds `max(tail_from, len - key_tail_tokens)..len`.
    tail_from: usize,
    /// The tags of the run whose keys set the int4 key offsets (`None` until the first write).
    offset_tags: Option<Vec<u32>>,
}

struct Fuzz<'a> {
    cache: KvCache<'a>,
    spec: CacheSpec,
    seqs: Vec<ModelSeq>,
    removed: Vec<SeqId>,
    next_tag: u32,
}

impl Fuzz<'_> {
    fn sink_blocks(&self) -> usize {
        if self.spec.window == 0 { 0 } else { self.spec.sink_tokens.div_ceil(self.spec.block_tokens) }
    }

    fn held(&self, seq: &ModelSeq) -> core::ops::Range<usize> {
        let len = seq.tags.len();
        seq.tail_from.max(len.saturating_sub(self.spec.key_tail_tokens))..len
    }

    fn evicted(&self, seq: &ModelSeq, position: usize) -> bool {
        let block = position / self.spec.block_tokens;
        block >= self.sink_blocks() && block < seq.evict_end
    }

    /// Writes the tokens `tags` from `position` on, one run per layer, and records them as
    /// the run that sets the key offsets if nothing has yet.
    fn write_tokens(&mut self, index: usize, position: usize, tags: &[u32]) -> Result<(), Error> {
        if tags.is_empty() {
            return Ok(()); // the cache refuses an empty run as a bad shape
        }
        let elems = self.spec.kv_heads * self.spec.head_dim;
        let id = self.seqs[index].id;
        for layer in 0..self.spec.layers {
            let run = |kind| -> Vec<f32> {
                tags.iter().flat_map(|&tag| (0..elems).map(move |e| value(tag, layer, kind, e))).collect()
            };
            self.cache.write_run(id, layer, position, &run(Kind::K), &run(Kind::V))?;
        }
        let seq = &mut self.seqs[index];
        if seq.offset_tags.is_none() {
            seq.offset_tags = Some(tags.to_vec());
        }
        Ok(())
    }

    /// The int4 key offsets the cache must hold for `seq`'s `layer` and `head`: the mean of
    /// the run that set them, summed in `f64` in token order, rounded to `f32`, rotated.
    fn expected_offsets(&self, seq: &ModelSeq, layer: usize, head: usize) -> Vec<f32> {
        let head_dim = self.spec.head_dim;
        let tags = seq.offset_tags.as_deref().expect("offsets set by a write");
        let mut mu: Vec<f32> = (0..head_dim)
            .map(|d| {
                let sum: f64 = tags.iter().map(|&tag| value(tag, layer, Kind::K, head * head_dim + d) as f64).sum();
                (sum / tags.len() as f64) as f32
            })
            .collect();
        if quant::rotated(KvFormat::Int4, head_dim) {
            quant::hadamard(&mut mu);
        }
        mu
    }

    /// What the cache's window drops when sequence `index` grows from `old_len` by `n` tokens
    /// (nothing when `n == 0`: reserving nothing changes nothing).
    fn replay_eviction(&mut self, index: usize, old_len: usize, n: usize) {
        let window = self.spec.window;
        if n > 0 && window != 0 && old_len + 1 > window {
            let end = (old_len + 1 - window) / self.spec.block_tokens;
            let seq = &mut self.seqs[index];
            seq.evict_end = seq.evict_end.max(end);
        }
    }

    /// The public page tables and block storage say the same as `read_row`: one entry per
    /// logical block, `NO_BLOCK` exactly where the window evicted, and each token's K row of
    /// layer 0, head 0 decoded from the bytes at its physical block's documented offset.
    fn verify_page_tables(&self) {
        let layout = *self.cache.layout();
        let storage = self.cache.block_storage();
        assert_eq!(storage.len(), self.cache.capacity_blocks() * layout.block_bytes());
        for seq in &self.seqs {
            let table = self.cache.page_table(seq.id).expect("live sequence");
            assert_eq!(table.len(), seq.tags.len().div_ceil(self.spec.block_tokens));
            for (position, &tag) in seq.tags.iter().enumerate() {
                let block = table[position / self.spec.block_tokens];
                assert_eq!(block == NO_BLOCK, self.evicted(seq, position));
                if block == NO_BLOCK {
                    continue;
                }
                assert!((block as usize) < self.cache.capacity_blocks());
                let slot = position % self.spec.block_tokens;
                let at = block as usize * layout.block_bytes() + layout.row_offset(0, Kind::K, 0, slot);
                let bytes = &storage[at..at + layout.row_bytes(Kind::K)];
                let got = match self.spec.k_format {
                    KvFormat::F32 => f32::from_le_bytes(bytes[..4].try_into().unwrap()),
                    KvFormat::F16 => f16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]])),
                    KvFormat::Bf16 => bf16_to_f32(u16::from_le_bytes([bytes[0], bytes[1]])),
                    _ => continue,
                };
                assert_eq!(got, value(tag, 0, Kind::K, 0));
            }
        }
        for &id in &self.removed {
            assert_eq!(self.cache.page_table(id), Err(Error::UnknownSequence));
        }
    }

    fn verify(&mut self) {
        self.cache.check_invariants().expect("invariant");
        assert_eq!(self.cache.sequences(), self.seqs.len());
        let elems = self.spec.head_dim;
        let mut row = vec![0.0f32; elems];
        for seq in &self.seqs {
            assert_eq!(self.cache.len(seq.id), Ok(seq.tags.len()));
            let held = self.held(seq);
            if self.spec.key_tail_tokens > 0 {
                let (_, range) = self.cache.tail_rows(seq.id, self.spec.layers - 1, 0).expect("a tail");
                assert_eq!(range, held);
            }
            for (position, &tag) in seq.tags.iter().enumerate() {
                for layer in 0..self.spec.layers {
                    for kind in [Kind::K, Kind::V] {
                        for head in 0..self.spec.kv_heads {
                            let result = self.cache.read_row(seq.id, layer, kind, head, position, &mut row);
                            if self.evicted(seq, position) {
                                assert_eq!(result, Err(Error::Evicted { position }));
                                continue;
                            }
                            result.expect("read");
                            let want: Vec<f32> = (0..elems).map(|d| value(tag, layer, kind, head * elems + d)).collect();
                            let format = match kind {
                                Kind::K => self.spec.k_format,
                                Kind::V => self.spec.v_format,
                            };
                            let tail = kind == Kind::K && held.contains(&position);
                            match format {
                                // Outside the tail: within half a step of the group's scale,
                                // at most 32 / 127 rounded up to bfloat16 (0.25390625).
                                KvFormat::Int8 if !tail => {
                                    for (&got, &want) in row.iter().zip(&want) {
                                        assert!((got - want).abs() <= 0.253_906_25 / 2.0, "{got} vs {want}");
                                    }
                                }
                                KvFormat::Int4 => {
                                    let mut mu = vec![0.0f32; elems];
                                    if kind == Kind::K {
                                        let set = self.cache.key_offsets(seq.id, layer, head, &mut mu).expect("offsets");
                                        assert!(set, "int4 key offsets unset for a written sequence");
                                        assert_eq!(mu, self.expected_offsets(seq, layer, head), "int4 key offsets");
                                    }
                                    let expected = int4_row(&want, &mu, position == 0, tail);
                                    assert_eq!(row, expected, "int4 {kind:?} layer {layer} head {head} position {position}");
                                }
                                _ => assert_eq!(row, want),
                            }
                        }
                    }
                }
            }
        }
        self.verify_page_tables();
        for &id in &self.removed {
            assert_eq!(self.cache.len(id), Err(Error::UnknownSequence));
        }
    }
}

fuzz_target!(|data: &[u8]| {
    if data.len() < 6 {
        return;
    }
    let formats = [KvFormat::F32, KvFormat::F16, KvFormat::Bf16, KvFormat::Int8, KvFormat::Int4];
    let mut spec = CacheSpec::new(1 + data[0] as usize % 2, 2, 1 + data[1] as usize % 2, 1 + data[2] as usize % 4);
    spec.q_heads = spec.kv_heads * (1 + data[1] as usize / 2 % 3);
    spec.block_tokens = 1 + data[3] as usize % 5;
    spec.k_format = formats[data[4] as usize % 5];
    spec.v_format = formats[data[4] as usize / 5 % 5];
    // Quantized keys with a key tail of 1..=6 tokens for some inputs.
    if data[3] >= 0xc0 && !spec.k_format.is_float() {
        spec.key_tail_tokens = 1 + data[3] as usize % 6;
    }
    spec.max_seqs = 4;
    spec.max_seq_tokens = 24;
    spec.window = if data[5] % 3 == 0 { 1 + data[5] as usize / 3 % 10 } else { 0 };
    spec.sink_tokens = data[5] as usize / 32 % 4;
    let blocks = 1 + data[0] as usize / 2 % 20;
    let Ok(layout) = Layout::new(spec) else { return };
    // A misaligned start: the arena begins `offset` bytes into the allocation.
    let offset = data[2] as usize / 32;
    let mut arena = vec![0u8; layout.arena_bytes(blocks).unwrap() + offset];
    let mut fuzz = Fuzz {
        cache: KvCache::new(spec, &mut arena[offset..]).expect("arena sized by arena_bytes"),
        spec,
        seqs: Vec::new(),
        removed: Vec::new(),
        next_tag: 0,
    };
    for pair in data[6..].chunks(2) {
        let (op, arg) = (pair[0], *pair.get(1).unwrap_or(&0) as usize);
        let pick = |n: usize| if n == 0 { 0 } else { arg % n };
        match op % 9 {
            0 => match fuzz.cache.add_sequence() {
                Ok(id) => fuzz.seqs.push(ModelSeq { id, tags: Vec::new(), evict_end: 0, tail_from: 0, offset_tags: None }),
                Err(e) => assert_eq!(e, Error::TooManySequences),
            },
            1 | 2 if !fuzz.seqs.is_empty() => {
                let index = pick(fuzz.seqs.len());
                let n = arg / 8 % 9;
                let id = fuzz.seqs[index].id;
                let old_len = fuzz.seqs[index].tags.len();
                match fuzz.cache.reserve(id, n) {
                    Ok(range) => {
                        assert_eq!(range, old_len..old_len + n);
                        fuzz.replay_eviction(index, old_len, n);
                        let tags: Vec<u32> = (1..=n as u32).map(|i| fuzz.next_tag + i).collect();
                        fuzz.next_tag += n as u32;
                        fuzz.write_tokens(index, old_len, &tags).expect("write after reserve");
                        fuzz.seqs[index].tags.extend(&tags);
                    }
                    Err(Error::OutOfBlocks { .. }) => {}
                    Err(Error::TooLong { .. }) => assert!(old_len + n > spec.max_seq_tokens),
                    Err(e) => panic!("reserve: {e}"),
                }
            }
            3 if !fuzz.seqs.is_empty() => {
                let index = pick(fuzz.seqs.len());
                let len = fuzz.seqs[index].tags.len();
                let position = arg / 4 % (len + 2);
                fuzz.next_tag += 1;
                let tag = fuzz.next_tag;
                match fuzz.write_tokens(index, position, &[tag]) {
                    Ok(()) => fuzz.seqs[index].tags[position] = tag,
                    Err(Error::BadPosition { .. }) => assert!(position >= len),
                    Err(Error::Evicted { .. }) => assert!(fuzz.evicted(&fuzz.seqs[index], position)),
                    Err(Error::OutOfBlocks { .. }) => {}
                    Err(e) => panic!("write: {e}"),
                }
            }
            4 if !fuzz.seqs.is_empty() => {
                let index = pick(fuzz.seqs.len());
                match fuzz.cache.fork(fuzz.seqs[index].id) {
                    Ok(id) => {
                        let parent = &fuzz.seqs[index];
                        let (tags, evict_end, tail_from) = (parent.tags.clone(), parent.evict_end, parent.tail_from);
                        let offset_tags = parent.offset_tags.clone();
                        fuzz.seqs.push(ModelSeq { id, tags, evict_end, tail_from, offset_tags });
                    }
                    Err(e) => assert_eq!(e, Error::TooManySequences),
                }
            }
            5 if !fuzz.seqs.is_empty() => {
                let index = pick(fuzz.seqs.len());
                let len = fuzz.seqs[index].tags.len();
                let keep = arg / 4 % (len + 3);
                match fuzz.cache.truncate(fuzz.seqs[index].id, keep) {
                    Ok(()) => {
                        // Positions whose ring rows later writes overwrote leave the tail.
                        let from = fuzz.held(&fuzz.seqs[index]).start.min(keep);
                        fuzz.seqs[index].tail_from = from;
                        fuzz.seqs[index].tags.truncate(keep);
                        // Truncating to nothing clears the int4 state; the next write sets it.
                        if keep == 0 {
                            fuzz.seqs[index].offset_tags = None;
                        }
                    }
                    Err(Error::BadPosition { .. }) => assert!(keep > len),
                    Err(Error::Evicted { .. }) => assert!(fuzz.seqs[index].evict_end > fuzz.sink_blocks()),
                    Err(e) => panic!("truncate: {e}"),
                }
            }
            6 if !fuzz.seqs.is_empty() => {
                let seq = fuzz.seqs.remove(pick(fuzz.seqs.len()));
                fuzz.cache.remove(seq.id).expect("remove live");
                fuzz.removed.push(seq.id);
            }
            7 => {
                // Batch reserve over every sequence, including a stale id when arg says so.
                let mut requests: Vec<(SeqId, usize)> = fuzz.seqs.iter().map(|s| (s.id, arg % 3)).collect();
                if arg & 0x80 != 0 {
                    if let Some(&gone) = fuzz.removed.last() {
                        requests.push((gone, 1));
                    }
                }
                let lens: Vec<usize> = fuzz.seqs.iter().map(|s| s.tags.len()).collect();
                if fuzz.cache.reserve_batch(&requests).is_ok() {
                    for (index, &(_, n)) in requests.iter().enumerate().take(fuzz.seqs.len()) {
                        fuzz.replay_eviction(index, lens[index], n);
                        let tags: Vec<u32> = (1..=n as u32).map(|i| fuzz.next_tag + i).collect();
                        fuzz.next_tag += n as u32;
                        fuzz.write_tokens(index, lens[index], &tags).expect("write after batch reserve");
                        fuzz.seqs[index].tags.extend(&tags);
                    }
                }
            }
            8 if !fuzz.seqs.is_empty() => {
                // Save a sequence and restore it as a new one, the bytes intact, one bit
                // flipped, or cut short: only intact bytes may restore.
                let source = pick(fuzz.seqs.len());
                let (id, thinned) = (fuzz.seqs[source].id, fuzz.seqs[source].evict_end > fuzz.sink_blocks());
                let len = fuzz.cache.exported_len(id).expect("live sequence");
                let mut bytes = vec![0u8; len];
                match fuzz.cache.export_sequence(id, &mut bytes) {
                    Err(Error::Evicted { .. }) => assert!(thinned),
                    Err(e) => panic!("export: {e}"),
                    Ok(n) => {
                        assert!(!thinned && n == len);
                        let flip = arg & 0x40 != 0;
                        if flip {
                            bytes[(arg * 7919) % len] ^= 1 << (arg % 8);
                        }
                        let cut = if arg & 0x20 != 0 { arg % 3 + 1 } else { 0 };
                        match fuzz.cache.import_sequence(&bytes[..len - cut]) {
                            Ok(restored) => {
                                assert!(!flip && cut == 0, "damaged bytes restored");
                                let tags = fuzz.seqs[source].tags.clone();
                                // The restored tail holds what the source's held.
                                let tail_from = fuzz.held(&fuzz.seqs[source]).start;
                                let offset_tags = fuzz.seqs[source].offset_tags.clone();
                                fuzz.seqs.push(ModelSeq { id: restored, tags, evict_end: 0, tail_from, offset_tags });
                            }
                            Err(Error::TooManySequences | Error::OutOfBlocks { .. }) => {}
                            Err(e) => assert!(flip || cut > 0, "intact bytes refused: {e}"),
                        }
                    }
                }
            }
            _ => {}
        }
        fuzz.verify();
    }
});
