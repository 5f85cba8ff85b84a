//! Byte-level BPE tokenizer (GPT-2 style) built from a GGUF vocabulary.
//!
//! Encoding, as llama.cpp does it for `tokenizer.ggml.model = gpt2`:
//! 1. split the text on special tokens (control and user-defined token types), matched
//!    literally, longest first;
//! 2. pre-tokenize each remaining fragment: for the `smollm` family every numeric character
//!    becomes a piece of its own, then the GPT-2 pattern
//!    `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+` splits each
//!    piece (the look-ahead never sees past the piece);
//! 3. map each piece's bytes through the GPT-2 byte-to-unicode table;
//! 4. merge adjacent symbols by merge rank (lowest rank first, leftmost on ties) until no
//!    merge applies, and look the symbols up in the vocabulary.
//!
//! Unicode classes are approximated with `char::is_alphabetic` (`\p{L}`), `char::is_numeric`
//! (`\p{N}`) and `char::is_whitespace` (`\s`).

use super::gguf::Gguf;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;

/// Token type ids from `tokenizer.ggml.token_type` (llama.cpp's `llama_token_type`).
mod token_type {
    pub const NORMAL: i32 = 1;
    pub const CONTROL: i32 = 3;
    pub const USER_DEFINED: i32 = 4;
}

/// Why a tokenizer could not be built from a GGUF file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TokenizerError {
    /// A required metadata key is absent or has the wrong type.
    MissingKey(&'static str),
    /// `tokenizer.ggml.model` is not `gpt2`.
    UnsupportedModel(String),
    /// `tokenizer.ggml.pre` names a pre-tokenizer this crate does not implement.
    UnsupportedPreTokenizer(String),
    /// `tokenizer.ggml.token_type` has a different length than `tokenizer.ggml.tokens`.
    TokenTypeLength {
        /// Number of tokens.
        tokens: usize,
        /// Number of token types.
        types: usize,
    },
    /// More tokens than fit a `u32` id.
    TooManyTokens(usize),
}

impl fmt::Display for TokenizerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenizerError::MissingKey(k) => write!(f, "tokenizer: missing or mistyped key {k}"),
            TokenizerError::UnsupportedModel(m) => {
                write!(
                    f,
                    "tokenizer: unsupported tokenizer.ggml.model {m:?} (expected gpt2)"
                )
            }
            TokenizerError::UnsupportedPreTokenizer(p) => {
                write!(f, "tokenizer: unsupported tokenizer.ggml.pre {p:?}")
            }
            TokenizerError::TokenTypeLength { tokens, types } => {
                write!(f, "tokenizer: {types} token types for {tokens} tokens")
            }
            TokenizerError::TooManyTokens(n) => write!(f, "tokenizer: {n} tokens exceed u32 ids"),
        }
    }
}

impl std::error::Error for TokenizerError {}

/// The pre-tokenizer variants of the `gpt2` tokenizer model.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PreTokenizer {
    /// The plain GPT-2 pattern.
    Gpt2,
    /// Every numeric character split off first, then the GPT-2 pattern (SmolLM, StarCoder).
    DigitsThenGpt2,
}

impl PreTokenizer {
    /// The variant for a `tokenizer.ggml.pre` name, following llama.cpp's grouping.
    pub fn from_name(name: &str) -> Option<PreTokenizer> {
        match name {
            "gpt2" | "gpt-2" | "mpt" | "olmo" | "jais" => Some(PreTokenizer::Gpt2),
            "smollm" | "starcoder" | "refact" | "command-r" | "codeshell" | "exaone"
            | "minerva-7b" => Some(PreTokenizer::DigitsThenGpt2),
            _ => None,
        }
    }
}

/// The GPT-2 byte-to-unicode table: printable bytes (`!..=~`, `¡..=¬`, `®..=ÿ`) map to
/// themselves, the other 68 bytes to U+0100.. in byte order, so every byte has a visible,
/// non-space character.
fn byte_to_char_table() -> [char; 256] {
    let mut table = ['\0'; 256];
    let mut next = 256u32;
    for (b, slot) in (0u32..).zip(table.iter_mut()) {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        let cp = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        // Every code point here is below 0x144, never a surrogate.
        *slot = char::from_u32(cp).unwrap_or('\u{fffd}');
    }
    table
}

/// A byte-level BPE tokenizer.
#[derive(Debug, Clone)]
pub struct Tokenizer {
    /// Token text as stored in the vocabulary (byte-mapped for normal tokens), by id.
    tokens: Vec<String>,
    /// Token id by vocabulary text.
    ids: HashMap<String, u32>,
    /// Decoded bytes of every token, concatenated; `byte_ranges[id]` indexes it.
    token_bytes: Vec<u8>,
    byte_ranges: Vec<(usize, usize)>,
    /// Whether each token is special (control or user-defined), by id.
    special: Vec<bool>,
    /// Special token ids bucketed by the first byte of their text, longest first.
    specials_by_first_byte: Vec<Vec<u32>>,
    /// `(left id, right id) -> (rank, merged id)`.
    merges: HashMap<(u32, u32), (u32, u32)>,
    byte_to_char: [char; 256],
    pre: PreTokenizer,
    bos: Option<u32>,
    eos: Option<u32>,
    unk: Option<u32>,
    add_bos: bool,
    /// The default system prompt the chat template inserts, if any.
    default_system: Option<String>,
}

impl Tokenizer {
    /// Builds the tokenizer from `tokenizer.ggml.*` metadata.
    pub fn from_gguf(g: &Gguf) -> Result<Tokenizer, TokenizerError> {
        let model = g
            .get_str("tokenizer.ggml.model")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.model"))?;
        if model != "gpt2" {
            return Err(TokenizerError::UnsupportedModel(model.to_owned()));
        }
        let pre_name = g.get_str("tokenizer.ggml.pre").unwrap_or("gpt2");
        let pre = PreTokenizer::from_name(pre_name)
            .ok_or_else(|| TokenizerError::UnsupportedPreTokenizer(pre_name.to_owned()))?;
        let tokens = g
            .get_string_array("tokenizer.ggml.tokens")
            .ok_or(TokenizerError::MissingKey("tokenizer.ggml.tokens"))?;
        let types = match g.get_i32_array("tokenizer.ggml.token_type") {
            Some(t) if t.len() == tokens.len() => t,
            Some(t) => {
                return Err(TokenizerError::TokenTypeLength {
                    tokens: tokens.len(),
                    types: t.len(),
                })
            }
            None => vec![token_type::NORMAL; tokens.len()],
        };
        let merges = g.get_string_array("tokenizer.ggml.merges").unwrap_or(&[]);
        let id = |key| g.get_u32(key).filter(|&i| (i as usize) < tokens.len());
        let mut tok = Tokenizer::new(tokens.to_vec(), &types, merges, pre)?;
        tok.bos = id("tokenizer.ggml.bos_token_id");
        tok.eos = id("tokenizer.ggml.eos_token_id");
        tok.unk = id("tokenizer.ggml.unknown_token_id");
        tok.add_bos = g.get_bool("tokenizer.ggml.add_bos_token").unwrap_or(false);
        tok.default_system = g
            .get_str("tokenizer.chat_template")
            .and_then(default_system_prompt);
        Ok(tok)
    }

    /// Builds a tokenizer from its parts: vocabulary texts by id, token types by id (same
    /// length), merges as `"left right"` strings in rank order.
    pub fn new(
        tokens: Vec<String>,
        types: &[i32],
        merges: &[String],
        pre: PreTokenizer,
    ) -> Result<Tokenizer, TokenizerError> {
        if types.len() != tokens.len() {
            return Err(TokenizerError::TokenTypeLength {
                tokens: tokens.len(),
                types: types.len(),
            });
        }
        if u32::try_from(tokens.len()).is_err() {
            return Err(TokenizerError::TooManyTokens(tokens.len()));
        }
        let byte_to_char = byte_to_char_table();
        let mut char_to_byte = HashMap::with_capacity(256);
        for (b, &c) in (0u8..=255).zip(byte_to_char.iter()) {
            char_to_byte.insert(c, b);
        }

        let mut ids = HashMap::with_capacity(tokens.len());
        let mut special = Vec::with_capacity(tokens.len());
        let mut token_bytes = Vec::new();
        let mut byte_ranges = Vec::with_capacity(tokens.len());
        let mut specials_by_first_byte = vec![Vec::new(); 256];
        for ((id, text), &ty) in (0u32..).zip(&tokens).zip(types) {
            // The first of duplicate texts wins, so lookups are stable.
            ids.entry(text.clone()).or_insert(id);
            let is_special = ty == token_type::CONTROL || ty == token_type::USER_DEFINED;
            special.push(is_special);
            let start = token_bytes.len();
            if is_special {
                token_bytes.extend_from_slice(text.as_bytes());
                if let Some(&first) = text.as_bytes().first() {
                    if let Some(bucket) = specials_by_first_byte.get_mut(usize::from(first)) {
                        bucket.push(id);
                    }
                }
            } else {
                // Normal tokens are byte-mapped; a character outside the table (not produced by
                // GPT-2 vocabularies) keeps its UTF-8 bytes.
                for c in text.chars() {
                    match char_to_byte.get(&c) {
                        Some(&b) => token_bytes.push(b),
                        None => {
                            token_bytes.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes())
                        }
                    }
                }
            }
            byte_ranges.push((start, token_bytes.len()));
        }
        for bucket in &mut specials_by_first_byte {
            bucket.sort_by_key(|&id| Reverse(tokens.get(id as usize).map_or(0, String::len)));
        }

        let mut merge_map = HashMap::with_capacity(merges.len());
        for (rank, m) in (0u32..).zip(merges) {
            // Split at the first space after the first character; symbols never contain a
            // space (it is byte-mapped to 'Ġ').
            let Some(split) = m
                .char_indices()
                .skip(1)
                .find(|&(_, c)| c == ' ')
                .map(|(i, _)| i)
            else {
                continue;
            };
            let (left, right) = (&m[..split], &m[split + 1..]);
            let (Some(&l), Some(&r)) = (ids.get(left), ids.get(right)) else {
                continue;
            };
            let Some(&merged) = ids.get(&format!("{left}{right}")) else {
                continue;
            };
            // Keep the lowest rank if a pair is listed twice.
            merge_map.entry((l, r)).or_insert((rank, merged));
        }

        Ok(Tokenizer {
            tokens,
            ids,
            token_bytes,
            byte_ranges,
            special,
            specials_by_first_byte,
            merges: merge_map,
            byte_to_char,
            pre,
            bos: None,
            eos: None,
            unk: None,
            add_bos: false,
            default_system: None,
        })
    }

    /// Number of tokens in the vocabulary.
    pub fn vocab_size(&self) -> usize {
        self.tokens.len()
    }

    /// The id of the token whose vocabulary text is exactly `text` (byte-mapped form for
    /// normal tokens, e.g. `"Ġthe"`; literal text for special tokens, e.g. `"<|im_end|>"`).
    pub fn token_id(&self, text: &str) -> Option<u32> {
        self.ids.get(text).copied()
    }

    /// The vocabulary text of token `id`.
    pub fn token_text(&self, id: u32) -> Option<&str> {
        self.tokens.get(id as usize).map(String::as_str)
    }

    /// The bytes token `id` stands for (special tokens: their text).
    pub fn token_bytes(&self, id: u32) -> Option<&[u8]> {
        let &(start, end) = self.byte_ranges.get(id as usize)?;
        self.token_bytes.get(start..end)
    }

    /// The bytes token `id` stands for; empty for an out-of-range id.
    pub fn decode(&self, id: u32) -> &[u8] {
        self.token_bytes(id).unwrap_or(&[])
    }

    /// The text of a token sequence, invalid UTF-8 replaced by U+FFFD.
    pub fn decode_all(&self, ids: &[u32]) -> String {
        let bytes: Vec<u8> = ids
            .iter()
            .flat_map(|&id| self.decode(id))
            .copied()
            .collect();
        String::from_utf8_lossy(&bytes).into_owned()
    }

    /// Whether `id` is a special (control or user-defined) token.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.get(id as usize).copied().unwrap_or(false)
    }

    /// End-of-sequence token (`tokenizer.ggml.eos_token_id`).
    pub fn eos_id(&self) -> Option<u32> {
        self.eos
    }

    /// Beginning-of-sequence token (`tokenizer.ggml.bos_token_id`).
    pub fn bos_id(&self) -> Option<u32> {
        self.bos
    }

    /// Whether prompts should start with BOS (`tokenizer.ggml.add_bos_token`). [`encode`]
    /// never adds it; the caller decides.
    ///
    /// [`encode`]: Tokenizer::encode
    pub fn add_bos(&self) -> bool {
        self.add_bos
    }

    /// The pre-tokenizer in use.
    pub fn pre_tokenizer(&self) -> PreTokenizer {
        self.pre
    }

    /// The default system prompt the chat template inserts, if it has one.
    pub fn default_system_prompt(&self) -> Option<&str> {
        self.default_system.as_deref()
    }

    /// The ChatML prompt for one user turn, as the GGUF chat template renders it with
    /// `add_generation_prompt`: the template's default system turn (if any), the user turn,
    /// and the opening of the assistant turn.
    pub fn chat_prompt(&self, user_text: &str) -> String {
        self.chat_prompt_with_system(self.default_system.as_deref(), user_text)
    }

    /// Like [`Tokenizer::chat_prompt`] with an explicit system prompt (`None`: no system
    /// turn).
    pub fn chat_prompt_with_system(&self, system: Option<&str>, user_text: &str) -> String {
        let mut s = String::new();
        if let Some(sys) = system {
            s.push_str("<|im_start|>system\n");
            s.push_str(sys);
            s.push_str("<|im_end|>\n");
        }
        s.push_str("<|im_start|>user\n");
        s.push_str(user_text);
        s.push_str("<|im_end|>\n<|im_start|>assistant\n");
        s
    }

    /// Tokenizes `text`, recognising special tokens written literally in it. Never adds BOS.
    pub fn encode(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        let mut fragment_start = 0;
        let mut pos = 0;
        let bytes = text.as_bytes();
        while let Some(&b) = bytes.get(pos) {
            if let Some((id, len)) = self.special_at(&text[pos..], b) {
                self.encode_fragment(&text[fragment_start..pos], &mut out);
                out.push(id);
                pos += len;
                fragment_start = pos;
            } else {
                // Advance to the next character boundary.
                pos += text[pos..].chars().next().map_or(1, char::len_utf8);
            }
        }
        self.encode_fragment(&text[fragment_start..], &mut out);
        out
    }

    /// Tokenizes `text` as ordinary text: special-token texts in it are split like any other
    /// text (use for untrusted input that must not inject control tokens).
    pub fn encode_ordinary(&self, text: &str) -> Vec<u32> {
        let mut out = Vec::new();
        self.encode_fragment(text, &mut out);
        out
    }

    /// The longest special token that `rest` starts with (`first` is its first byte).
    fn special_at(&self, rest: &str, first: u8) -> Option<(u32, usize)> {
        let bucket = self.specials_by_first_byte.get(usize::from(first))?;
        bucket.iter().find_map(|&id| {
            let t = self.tokens.get(id as usize)?;
            rest.starts_with(t.as_str()).then_some((id, t.len()))
        })
    }

    /// Pre-tokenizes and BPE-encodes text that contains no special tokens.
    fn encode_fragment(&self, text: &str, out: &mut Vec<u32>) {
        let mut mapped = String::new();
        for piece in pre_tokenize(text, self.pre) {
            mapped.clear();
            for &b in piece.as_bytes() {
                mapped.push(self.byte_to_char[usize::from(b)]);
            }
            self.bpe(&mapped, out);
        }
    }

    /// Applies the merges to one byte-mapped piece and appends the resulting token ids.
    fn bpe(&self, word: &str, out: &mut Vec<u32>) {
        /// One symbol of the word, in a doubly linked list over `syms`.
        struct Sym {
            id: Option<u32>,
            prev: Option<usize>,
            next: Option<usize>,
            alive: bool,
        }
        let mut syms: Vec<Sym> = word
            .chars()
            .enumerate()
            .map(|(i, c)| Sym {
                id: self.ids.get(c.encode_utf8(&mut [0; 4]) as &str).copied(),
                prev: i.checked_sub(1),
                next: Some(i + 1),
                alive: true,
            })
            .collect();
        if let Some(last) = syms.last_mut() {
            last.next = None;
        }

        // Candidate merges as (rank, left index, left id, right index, right id); the heap
        // pops the lowest rank, leftmost first. Entries go stale when a neighbour merges, so
        // each is re-validated when popped.
        let mut heap = BinaryHeap::new();
        let push = |heap: &mut BinaryHeap<_>, syms: &[Sym], l: usize| {
            let (Some(left), Some(r)) = (syms.get(l), syms.get(l).and_then(|s| s.next)) else {
                return;
            };
            let Some(right) = syms.get(r) else { return };
            if let (Some(a), Some(b)) = (left.id, right.id) {
                if let Some(&(rank, _)) = self.merges.get(&(a, b)) {
                    heap.push(Reverse((rank, l, a, r, b)));
                }
            }
        };
        for l in 0..syms.len() {
            push(&mut heap, &syms, l);
        }
        while let Some(Reverse((_, l, a, r, b))) = heap.pop() {
            let valid = matches!(
                (syms.get(l), syms.get(r)),
                (Some(x), Some(y)) if x.alive && y.alive && x.next == Some(r)
                    && x.id == Some(a) && y.id == Some(b)
            );
            let Some(&(_, merged)) = self.merges.get(&(a, b)).filter(|_| valid) else {
                continue;
            };
            let after = syms.get(r).and_then(|s| s.next);
            if let Some(y) = syms.get_mut(r) {
                y.alive = false;
            }
            if let Some(x) = syms.get_mut(l) {
                x.id = Some(merged);
                x.next = after;
            }
            if let Some(z) = after.and_then(|n| syms.get_mut(n)) {
                z.prev = Some(l);
            }
            if let Some(p) = syms.get(l).and_then(|s| s.prev) {
                push(&mut heap, &syms, p);
            }
            push(&mut heap, &syms, l);
        }

        let mut cur = if syms.is_empty() { None } else { Some(0) };
        while let Some(i) = cur {
            let Some(s) = syms.get(i) else { break };
            // A character missing from the vocabulary cannot happen with a GPT-2 byte-level
            // vocabulary; emit the unknown token if there is one rather than dropping silently.
            if let Some(id) = s.id.or(self.unk) {
                out.push(id);
            }
            cur = s.next;
        }
    }
}

/// Splits text (free of special tokens) into pre-tokens.
pub fn pre_tokenize(text: &str, pre: PreTokenizer) -> Vec<&str> {
    let mut out = Vec::new();
    match pre {
        PreTokenizer::Gpt2 => gpt2_split(text, &mut out),
        PreTokenizer::DigitsThenGpt2 => {
            // Each numeric character is a piece of its own; runs between them go through the
            // GPT-2 pattern separately, so its look-ahead stops at a digit.
            let mut run_start = 0;
            for (i, c) in text.char_indices() {
                if c.is_numeric() {
                    gpt2_split(&text[run_start..i], &mut out);
                    let end = i + c.len_utf8();
                    out.push(&text[i..end]);
                    run_start = end;
                }
            }
            gpt2_split(&text[run_start..], &mut out);
        }
    }
    out
}

/// The GPT-2 pattern
/// `'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+`, matched by
/// hand over `text`, appending the pieces to `out`.
fn gpt2_split<'t>(text: &'t str, out: &mut Vec<&'t str>) {
    #[derive(Clone, Copy, PartialEq, Eq)]
    enum Class {
        Letter,
        Number,
        Space,
        Other,
    }
    fn class(c: char) -> Class {
        if c.is_alphabetic() {
            Class::Letter
        } else if c.is_numeric() {
            Class::Number
        } else if c.is_whitespace() {
            Class::Space
        } else {
            Class::Other
        }
    }

    let chars: Vec<(usize, char)> = text.char_indices().collect();
    let n = chars.len();
    let at = |i: usize| chars.get(i).map(|&(_, c)| c);
    let byte_at = |i: usize| chars.get(i).map_or(text.len(), |&(b, _)| b);
    let mut pos = 0;
    while pos < n {
        let Some(c) = at(pos) else { break };
        let len = 'rule: {
            // Contractions (lower case only, as in GPT-2).
            if c == '\'' {
                match (at(pos + 1), at(pos + 2)) {
                    (Some('s' | 't' | 'm' | 'd'), _) => break 'rule 2,
                    (Some('r'), Some('e')) | (Some('v'), Some('e')) | (Some('l'), Some('l')) => {
                        break 'rule 3
                    }
                    _ => {}
                }
            }
            // ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: an optional single space, then a
            // run of one class.
            let lead =
                usize::from(c == ' ' && at(pos + 1).is_some_and(|d| class(d) != Class::Space));
            if let Some(first) = at(pos + lead) {
                let k = class(first);
                if k != Class::Space {
                    let mut end = pos + lead;
                    while at(end).is_some_and(|d| class(d) == k) {
                        end += 1;
                    }
                    break 'rule end - pos;
                }
            }
            // `\s+(?!\S)` then `\s+`: a whitespace run, leaving its last character to prefix
            // the following word when one follows.
            let mut end = pos;
            while at(end).is_some_and(char::is_whitespace) {
                end += 1;
            }
            let run = end - pos;
            if run > 1 && end < n {
                run - 1
            } else {
                run.max(1)
            }
        };
        let end = pos + len;
        if let Some(piece) = text.get(byte_at(pos)..byte_at(end)) {
            out.push(piece);
        }
        pos = end;
    }
}

/// Extracts the default system prompt from a ChatML template that inserts one, i.e. the
/// text between `<|im_start|>system` plus a newline and the next `<|im_end|>`.
fn default_system_prompt(template: &str) -> Option<String> {
    let start = template.find("<|im_start|>system")? + "<|im_start|>system".len();
    let rest = template.get(start..)?;
    // The template text may hold a real newline or a Jinja `\n` escape.
    let rest = rest
        .strip_prefix('\n')
        .or_else(|| rest.strip_prefix("\\n"))?;
    let end = rest.find("<|im_end|>")?;
    let sys = rest.get(..end)?;
    // A template that takes the system text from the messages has Jinja syntax here.
    if sys.contains("{{") || sys.contains("{%") || sys.contains('\'') {
        return None;
    }
    Some(sys.to_owned())
}

/// Turns token bytes arriving one token at a time into valid UTF-8 text, holding back an
/// incomplete multi-byte sequence until the bytes that complete it arrive.
#[derive(Debug, Default, Clone)]
pub struct StreamDecoder {
    pending: Vec<u8>,
}

impl StreamDecoder {
    /// An empty decoder.
    pub fn new() -> Self {
        StreamDecoder::default()
    }

    /// Adds token `id`'s bytes; returns the text that is now complete (possibly empty).
    pub fn push_token(&mut self, tokenizer: &Tokenizer, id: u32) -> String {
        self.push(tokenizer.decode(id))
    }

    /// Adds raw bytes; returns the text that is now complete (possibly empty). Bytes that can
    /// never become valid UTF-8 come out as U+FFFD so the stream never stalls.
    pub fn push(&mut self, bytes: &[u8]) -> String {
        self.pending.extend_from_slice(bytes);
        let mut out = String::new();
        let mut consumed = 0;
        loop {
            let rest = self.pending.get(consumed..).unwrap_or(&[]);
            match std::str::from_utf8(rest) {
                Ok(s) => {
                    out.push_str(s);
                    consumed = self.pending.len();
                    break;
                }
                Err(e) => {
                    let valid = e.valid_up_to();
                    if let Some(s) = rest.get(..valid).and_then(|v| std::str::from_utf8(v).ok()) {
                        out.push_str(s);
                    }
                    consumed += valid;
                    match e.error_len() {
                        // An invalid sequence: replace it and go on.
                        Some(bad) => {
                            out.push('\u{fffd}');
                            consumed += bad;
                        }
                        // An incomplete sequence at the end: wait for more bytes.
                        None => break,
                    }
                }
            }
        }
        self.pending.drain(..consumed.min(self.pending.len()));
        out
    }

    /// Whether bytes are held back waiting for the rest of a character.
    pub fn has_pending(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Ends the stream: returns any held-back bytes, lossily decoded.
    pub fn finish(&mut self) -> String {
        let s = String::from_utf8_lossy(&self.pending).into_owned();
        self.pending.clear();
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_table_is_a_visible_bijection() {
        let t = byte_to_char_table();
        let distinct: std::collections::HashSet<char> = t.iter().copied().collect();
        assert_eq!(distinct.len(), 256);
        assert!(t.iter().all(|c| !c.is_whitespace() && !c.is_control()));
        assert_eq!(t[usize::from(b' ')], '\u{120}'); // 'Ġ'
        assert_eq!(t[usize::from(b'\n')], '\u{10a}'); // 'Ċ'
        assert_eq!(t[usize::from(b'A')], 'A');
    }

    #[test]
    fn default_system_prompt_from_template() {
        let with = "{% if x %}{{ '<|im_start|>system\nBe brief.<|im_end|>\n' }}{% endif %}";
        assert_eq!(default_system_prompt(with).as_deref(), Some("Be brief."));
        let escaped = "{{ '<|im_start|>system\\nBe brief.<|im_end|>' }}";
        assert_eq!(default_system_prompt(escaped).as_deref(), Some("Be brief."));
        let from_messages = "{{'<|im_start|>system\n' + message['content'] + '<|im_end|>'}}";
        assert_eq!(default_system_prompt(from_messages), None);
        assert_eq!(default_system_prompt("{{ '<|im_start|>user\n' }}"), None);
    }
}
