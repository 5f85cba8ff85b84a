//! The `kvcache` command-line tool (`std` only): argument parsing and the commands.

/// `print!` to stdout that ends the process once stdout is closed (`kvcache memory | head`),
/// where `print!` would panic.
macro_rules! out {
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!($($arg)*))
    };
}

/// `println!` likewise.
macro_rules! outln {
    () => {
        $crate::cli::write_stdout(format_args!("\n"))
    };
    ($($arg:tt)*) => {
        $crate::cli::write_stdout(format_args!("{}\n", format_args!($($arg)*)))
    };
}

pub mod args;
pub mod bench;
pub mod demo;
pub mod generate;

use args::Args;

const USAGE: &str = "\
kvcache: a paged KV cache for transformer inference

usage:
  kvcache                    the main job: SmolLM2 answers a question (the demo without it)
  kvcache generate --prompt TEXT [-n 64] [--chat] [--ids] [--no-cache] [--temp X]
                   [--top-k K] [--top-p P] [--seed S] [--ctx 8192] [--chunk 256]
                   [--prompt-cache FILE]  restore the prompt's cache from FILE when it
                   holds a prefix of this prompt; save it there after the prompt
  kvcache ppl --file TEXT [--ctx 512] [--chunks N] [--chars N] [--decode-from N]
                             (--decode-from: prefill N tokens of each window, then
                             feed the rest one token at a time, as decoding does)
  kvcache bench decode [--depth 0] [-n 64] [--chunk 512] [--no-cache]
  kvcache bench attention [--shape smollm2|llama3-8b|llama2-7b] [--ctx 2048] [--batch 1] [--steps S]
                             (--kv f16,int8,int4: the formats' steps alternate in one
                             run, and each is reported as a ratio of the first's)
  kvcache demo               the built-in synthetic model through the cache
  kvcache memory [--shape smollm2|llama3-8b|llama2-7b] [--batch 1]
                             cache bytes by context length and format

options of generate, ppl and the benches:
  --kv FORMAT       key and value storage: f32, f16 (default), bf16, int8, int4
  --kv-v FORMAT     value storage when it differs from the keys' (not bench attention)
  --block-tokens N  token slots per block (default 16)
  --exact-values    int4 values summed exactly in f32, not with 8-bit integer weights
  --key-tail N      int8/int4 keys: each sequence's last N keys also kept in f16, and
                    attention scores them from there (default 32 for int4 keys, else 0)
  --threads T       threads (default: every core)
  --model PATH      the GGUF file (default $KVCACHE_MODEL, else
                    models/SmolLM2-135M-Instruct.Q4_1.gguf; not bench attention)
  --help, -h        this text, with any command
";

/// Writes to stdout and flushes. A reader that stopped early (`| head`) ends the process
/// quietly with status 141, as SIGPIPE would; any other write error ends it with a message.
pub(crate) fn write_stdout(args: core::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    if let Err(e) = stdout.write_fmt(args).and_then(|()| stdout.flush()) {
        if e.kind() != std::io::ErrorKind::BrokenPipe {
            eprintln!("kvcache: cannot write to stdout: {e}");
        }
        std::process::exit(if e.kind() == std::io::ErrorKind::BrokenPipe {
            141
        } else {
            1
        });
    }
}

/// Runs the CLI on `args` (without the program name); returns the process exit code.
pub fn main(args: Vec<String>) -> i32 {
    match run(args) {
        Ok(()) => 0,
        Err(message) => {
            eprintln!("kvcache: {message}");
            1
        }
    }
}

fn run(args: Vec<String>) -> Result<(), String> {
    if args.iter().any(|a| a == "--help" || a == "-h") || args.first().is_some_and(|a| a == "help")
    {
        out!("{USAGE}");
        return Ok(());
    }
    let args = Args::parse(args)?;
    match (args.positional(0), args.positional(1)) {
        (Some("demo"), _) => demo::demo(&args),
        (Some("memory"), _) => demo::memory(&args),
        (Some("bench"), Some("attention")) => bench::attention(&args),
        (Some("bench"), Some("decode")) => generate::bench_decode(&args),
        (Some("generate"), _) => generate::generate(&args),
        (Some("ppl"), _) => generate::ppl(&args),
        (None, _) => main_job(&args),
        (Some(other), _) => Err(format!("unknown command `{other}`\n{USAGE}")),
    }
}

/// The main job, `kvcache` without a command: SmolLM2 answers a question through the cache
/// when the model file is present (see `.ci/fetch-model`), else the built-in demo runs.
fn main_job(args: &Args) -> Result<(), String> {
    let path = generate::model_path(args);
    if std::path::Path::new(&path).exists() {
        let words = [
            "generate",
            "--model",
            &path,
            "--chat",
            "--prompt",
            "What is a KV cache in a transformer? Answer briefly.",
            "-n",
            "96",
        ];
        let args = Args::parse(words.iter().map(|w| w.to_string()))?;
        generate::generate(&args)
    } else {
        outln!("(no model at {path}: run .ci/fetch-model to get SmolLM2-135M; running the built-in demo)\n");
        demo::demo(&Args::default())
    }
}

/// Parses `--kv` into a storage format.
pub(crate) fn kv_format(args: &Args) -> Result<crate::KvFormat, String> {
    let name = args.string("kv").unwrap_or("f16");
    crate::KvFormat::from_name(name).ok_or_else(|| format!("unknown --kv format `{name}`"))
}

/// `--key-tail N`: recent keys kept at full precision per sequence (see
/// `CacheSpec::key_tail_tokens`); by default 32 for int4 keys and 0 for the others.
pub(crate) fn key_tail(args: &Args, k_format: crate::KvFormat) -> Result<usize, String> {
    let default = if k_format == crate::KvFormat::Int4 {
        DEFAULT_INT4_KEY_TAIL
    } else {
        0
    };
    let tail: usize = args.value("key-tail", default)?;
    if tail != 0 && k_format.is_float() {
        return Err("--key-tail needs int8 or int4 keys".into());
    }
    Ok(tail)
}

/// The key tail `--key-tail` gives int4 keys by default: 32 tokens (see the README's
/// "Accuracy" for how it was chosen).
pub const DEFAULT_INT4_KEY_TAIL: usize = 32;

/// `--kv` (both formats) and `--kv-v` (the values' format, when it should differ).
pub(crate) fn kv_formats(args: &Args) -> Result<(crate::KvFormat, crate::KvFormat), String> {
    let k = kv_format(args)?;
    let v = match args.string("kv-v") {
        None => k,
        Some(name) => crate::KvFormat::from_name(name)
            .ok_or_else(|| format!("unknown --kv-v format `{name}`"))?,
    };
    Ok((k, v))
}

/// The model shapes `--shape` names, the default first.
const SHAPES: [(&str, crate::CacheSpec); 3] = [
    ("smollm2", crate::CacheSpec::smollm2_135m()),
    ("llama3-8b", crate::CacheSpec::llama3_8b()),
    ("llama2-7b", crate::CacheSpec::llama2_7b()),
];

/// Parses `--shape` into a spec.
pub(crate) fn shape(args: &Args) -> Result<(&'static str, crate::CacheSpec), String> {
    let name = args.string("shape").unwrap_or(SHAPES[0].0);
    SHAPES
        .into_iter()
        .find(|(known, _)| *known == name)
        .ok_or_else(|| {
            let names: Vec<&str> = SHAPES.iter().map(|(known, _)| *known).collect();
            format!("unknown --shape `{name}` ({})", names.join(", "))
        })
}
