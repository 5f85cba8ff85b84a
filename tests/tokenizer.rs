//! Tokenizer: pre-tokenizer rules, a synthetic vocabulary, and the real SmolLM2 vocabulary
//! against llama.cpp's reference token ids (skipped when the model or reference is absent).

use kvcache::model::gguf::Gguf;
use kvcache::model::tokenizer::{pre_tokenize, PreTokenizer, StreamDecoder, Tokenizer};
use std::path::PathBuf;
use std::sync::OnceLock;

fn model_path() -> Option<PathBuf> {
    let p = std::env::var_os("KVCACHE_MODEL")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("models/SmolLM2-135M-Instruct.Q4_1.gguf")
        });
    p.exists().then_some(p)
}

/// The real tokenizer, loaded once for all tests; `None` (and a note) when the model is absent.
fn real() -> Option<&'static Tokenizer> {
    static TOK: OnceLock<Option<Tokenizer>> = OnceLock::new();
    let t = TOK
        .get_or_init(|| {
            let p = model_path()?;
            let g = Gguf::open(p).expect("model parses");
            Some(Tokenizer::from_gguf(&g).expect("tokenizer builds"))
        })
        .as_ref();
    if t.is_none() {
        println!("skipped: model file not found (set KVCACHE_MODEL or link models/)");
    }
    t
}

#[test]
fn pre_tokenizer_rules() {
    let d = |s| pre_tokenize(s, PreTokenizer::DigitsThenGpt2);
    let g = |s| pre_tokenize(s, PreTokenizer::Gpt2);
    assert_eq!(d("Hello, world!"), ["Hello", ",", " world", "!"]);
    assert_eq!(
        d("I'm here, they'll go"),
        ["I", "'m", " here", ",", " they", "'ll", " go"]
    );
    assert_eq!(d("don't 'Re 're"), ["don", "'t", " '", "Re", " '", "re"]);
    assert_eq!(d("a  b"), ["a", " ", " b"]);
    assert_eq!(d("a \n\nb"), ["a", " \n", "\n", "b"]);
    assert_eq!(d("end   "), ["end", "   "]);
    assert_eq!(d("12345"), ["1", "2", "3", "4", "5"]);
    assert_eq!(g("12345"), ["12345"]);
    assert_eq!(d("abc 123x"), ["abc", " ", "1", "2", "3", "x"]);
    assert_eq!(g("abc 123x"), ["abc", " 123", "x"]);
    assert_eq!(d("x  ...!? ok"), ["x", " ", " ...!?", " ok"]);
    assert_eq!(d("héllo wörld 日本語"), ["héllo", " wörld", " 日本語"]);
    assert_eq!(d("🦀🦀 ok"), ["🦀🦀", " ok"]);
    assert_eq!(d("\t\tx"), ["\t", "\t", "x"]);
    assert_eq!(d(""), Vec::<&str>::new());
    // Pieces always tile the input.
    for s in [
        "a  b\n\n\tc's 9 ",
        " ' '' 's",
        "ℕ① Ⅻ x²",
        "\u{a0}a\u{2003}\u{2003}b",
    ] {
        assert_eq!(d(s).concat(), s);
        assert_eq!(g(s).concat(), s);
    }
}

/// A tiny byte-level vocabulary: the 256 byte symbols, a few merges, two specials.
fn synthetic() -> Tokenizer {
    // Recreate the GPT-2 byte-to-unicode mapping to name the byte symbols.
    let mut tokens: Vec<String> = Vec::new();
    let mut next = 256u32;
    for b in 0u32..256 {
        let printable = (0x21..=0x7e).contains(&b) || (0xa1..=0xac).contains(&b) || b >= 0xae;
        let cp = if printable {
            b
        } else {
            next += 1;
            next - 1
        };
        tokens.push(char::from_u32(cp).unwrap().to_string());
    }
    let merges: Vec<String> = ["Ġ t", "h e", "Ġt he", "l l", "e ll", "h ell", "hell o"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    for m in &merges {
        tokens.push(m.replace(' ', ""));
    }
    tokens.push("<|s|>".into());
    tokens.push("<|ss|>".into());
    let mut types = vec![1; tokens.len()];
    let n = types.len();
    types[n - 2] = 3;
    types[n - 1] = 4;
    Tokenizer::new(tokens, &types, &merges, PreTokenizer::DigitsThenGpt2).unwrap()
}

#[test]
fn synthetic_bpe_and_specials() {
    let t = synthetic();
    let id = |s: &str| t.token_id(s).unwrap();
    // "hello": h e l l o -> "he" is rank 1, "ll" rank 3, then "ell"? no: "e" is merged into
    // "he" first, so "e ll" cannot apply; "h ell" cannot apply either. Result: he ll o.
    assert_eq!(t.encode("hello"), [id("he"), id("ll"), id("o")]);
    assert_eq!(t.encode(" the"), [id("Ġthe")]);
    assert_eq!(
        t.encode("a<|s|>b<|ss|>"),
        [id("a"), id("<|s|>"), id("b"), id("<|ss|>")]
    );
    assert_eq!(t.encode_ordinary("<|s|>").len(), 5);
    assert!(t.is_special(id("<|s|>")) && !t.is_special(id("a")));
    for s in ["hello the world", "a<|s|>b", "\u{0}\u{7f} é🦀", "  x\n\n"] {
        assert_eq!(t.decode_all(&t.encode(s)), s);
    }
    assert_eq!(t.decode(u32::MAX), b"");
    assert_eq!(t.token_bytes(id("Ġt")), Some(&b" t"[..]));
}

#[test]
fn stream_decoder_buffers_partial_utf8() {
    let mut d = StreamDecoder::new();
    let crab = "🦀".as_bytes();
    assert_eq!(d.push(&crab[..1]), "");
    assert_eq!(d.push(&crab[1..3]), "");
    assert!(d.has_pending());
    assert_eq!(d.push(&crab[3..]), "🦀");
    assert!(!d.has_pending());
    assert_eq!(d.push(b"ab\xffc"), "ab\u{fffd}c");
    assert_eq!(d.push(b"\xe6\x97"), "");
    assert_eq!(d.finish(), "\u{fffd}");
    assert_eq!(d.push("é".as_bytes()), "é");
}

#[test]
fn reference_prompt_ids_match_llama_cpp() {
    let Some(t) = real() else { return };
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/smollm2-greedy.json");
    let Ok(json) = std::fs::read_to_string(&path) else {
        println!("skipped: reference {} not found", path.display());
        return;
    };
    let cases = reference_cases(&json);
    assert_eq!(cases.len(), 2, "two reference cases");
    for (prompt, ids) in cases {
        assert_eq!(t.encode(&prompt), ids, "prompt {prompt:?}");
    }
}

#[test]
fn real_vocabulary_facts() {
    let Some(t) = real() else { return };
    assert_eq!(t.vocab_size(), 49152);
    assert_eq!(t.eos_id(), Some(2));
    assert_eq!(t.bos_id(), Some(1));
    assert!(!t.add_bos());
    assert_eq!(t.token_id("<|im_start|>"), Some(1));
    assert_eq!(t.token_id("<|im_end|>"), Some(2));
    assert_eq!(t.token_id("<|endoftext|>"), Some(0));
    assert_eq!(t.decode(2), b"<|im_end|>");
    assert_eq!(t.decode(504), b"The");
    assert_eq!(t.decode(3575), b" capital");
    assert_eq!(
        t.encode("12345"),
        t.encode("1")
            .into_iter()
            .chain(t.encode("2"))
            .chain(t.encode("3"))
            .chain(t.encode("4"))
            .chain(t.encode("5"))
            .collect::<Vec<_>>()
    );
    assert_eq!(t.encode("12345").len(), 5);
}

#[test]
fn real_special_tokens_and_chat_prompt() {
    let Some(t) = real() else { return };
    let ids = t.encode("<|im_start|>user\nHi<|im_end|>\n");
    assert_eq!(ids.first(), Some(&1));
    assert!(ids.contains(&2));
    assert_eq!(t.decode_all(&ids), "<|im_start|>user\nHi<|im_end|>\n");
    assert!(!t.encode_ordinary("<|im_end|>").contains(&2));
    // Longest match first: the text of a special token embedded in other text.
    assert_eq!(t.encode("x<|endoftext|>y").get(1), Some(&0));

    let p = t.chat_prompt("What is 2+2?");
    assert_eq!(
        p,
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging \
         Face<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    );
    let ids = t.encode(&p);
    assert_eq!(ids.first(), Some(&1));
    assert_eq!(ids.iter().filter(|&&i| i == 1).count(), 3);
    assert_eq!(ids.iter().filter(|&&i| i == 2).count(), 2);
}

#[test]
fn real_round_trips() {
    let Some(t) = real() else { return };
    for s in [
        "",
        "Hello, world!",
        "The year 2024 had 366 days; 12345 and 3.14159.",
        "I'm sure they'll say it's what we've done, isn't it? She'd go. We're here.",
        "multiple   spaces    and\ttabs\t\there",
        "line one\nline two\n\n\nline five\r\nwindows",
        "  leading and trailing  ",
        "unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語のテキスト, 한국어",
        "emoji: 🦀🚀 👩‍👩‍👧 ✓ — “quotes” …",
        "code: fn main() { println!(\"{}\", x[0] >= 1 && y != 2); } // ok",
        "<|im_start|>mixed<|im_end|> specials",
        "\u{0}\u{1}\u{7f}\u{80} control bytes",
    ] {
        let ids = t.encode(s);
        assert_eq!(t.decode_all(&ids), s, "round trip {s:?}");
        // Streaming gives the same text.
        let mut d = StreamDecoder::new();
        let streamed: String =
            ids.iter().map(|&i| d.push_token(t, i)).collect::<String>() + &d.finish();
        assert_eq!(streamed, s);
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
    }
}

/// Reads `(prompt, prompt_ids)` pairs from the reference JSON. A minimal reader for this
/// file's shape: string values with JSON escapes, integer arrays.
fn reference_cases(json: &str) -> Vec<(String, Vec<u32>)> {
    let mut prompts = Vec::new();
    let mut ids = Vec::new();
    let mut rest = json;
    while let Some(i) = rest.find('"') {
        rest = &rest[i + 1..];
        let Some(end) = rest.find('"') else { break };
        let key = &rest[..end];
        rest = rest[end + 1..].trim_start();
        let Some(after_colon) = rest.strip_prefix(':') else {
            continue;
        };
        let v = after_colon.trim_start();
        match key {
            "prompt" => {
                let (s, tail) = json_string(v);
                prompts.push(s);
                rest = tail;
            }
            "prompt_ids" => {
                let close = v.find(']').unwrap();
                ids.push(
                    v[1..close]
                        .split(',')
                        .map(|x| x.trim())
                        .filter(|x| !x.is_empty())
                        .map(|x| x.parse().unwrap())
                        .collect(),
                );
                rest = &v[close..];
            }
            _ => rest = v,
        }
    }
    prompts.into_iter().zip(ids).collect()
}

/// Parses a JSON string literal at the start of `s`; returns it and the text after it.
fn json_string(s: &str) -> (String, &str) {
    let mut out = String::new();
    let mut chars = s.char_indices().skip(1);
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return (out, &s[i + 1..]),
            '\\' => match chars.next().map(|(_, e)| e) {
                Some('n') => out.push('\n'),
                Some('t') => out.push('\t'),
                Some('r') => out.push('\r'),
                Some('u') => {
                    let hex: String = (0..4)
                        .filter_map(|_| chars.next().map(|(_, h)| h))
                        .collect();
                    out.push(char::from_u32(u32::from_str_radix(&hex, 16).unwrap()).unwrap());
                }
                Some(e) => out.push(e),
                None => break,
            },
            c => out.push(c),
        }
    }
    (out, "")
}

/// Text for the round-trip property: words, numbers, whitespace runs, punctuation, contractions,
/// any Unicode (controls included) and special-token text, mixed.
fn text() -> impl proptest::strategy::Strategy<Value = String> {
    use proptest::prelude::*;
    let piece = prop_oneof![
        "[A-Za-z]{1,12}",
        "[0-9]{1,9}",
        "[ \t\n\r]{1,6}",
        "[!-/:-@\\[-`{-~]{1,4}",
        "'(s|t|re|ve|m|ll|d|S|T)",
        "\\PC{1,6}",
        any::<String>(),
        Just("<|im_start|>".to_string()),
        Just("<|im_end|>".to_string()),
        Just("<|endoftext|>".to_string()),
    ];
    proptest::collection::vec(piece, 0..12).prop_map(|pieces| pieces.concat())
}

proptest::proptest! {
    #![proptest_config(proptest::prelude::ProptestConfig { cases: 1000, ..Default::default() })]

    /// Byte-level BPE loses nothing: any text encodes to ids in the vocabulary that decode,
    /// at once or streamed token by token, to the same text; the pre-tokenizer's pieces tile
    /// the text.
    #[test]
    fn any_text_round_trips_through_the_real_vocabulary(s in text()) {
        let Some(t) = real() else { return Ok(()) };
        let pieces = pre_tokenize(&s, t.pre_tokenizer());
        proptest::prop_assert_eq!(pieces.concat(), s.clone());
        let ids = t.encode(&s);
        proptest::prop_assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
        proptest::prop_assert_eq!(t.decode_all(&ids), s.clone());
        let mut d = StreamDecoder::new();
        let streamed: String =
            ids.iter().map(|&i| d.push_token(t, i)).collect::<String>() + &d.finish();
        proptest::prop_assert_eq!(streamed, s);
    }
}
