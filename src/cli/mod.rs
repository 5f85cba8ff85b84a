//! The `kvcache` command-line tool (`std` only): argument parsing and the commands.

pub mod args;
pub mod bench;
pub mod demo;
pub mod generate;

use args::Args;

const USAGE: &str = "\
kvcache: a paged KV cache for transformer inference

usage:
  kvcache generate --model PATH --prompt TEXT -n N [--kv FORMAT] [--threads T]
                   [--temp X --top-k K --top-p P --seed S] [--chat] [--ids] [--no-cache]
  kvcache ppl --model PATH --file TEXT [--ctx 512] [--kv FORMAT] [--chunks N]
  kvcache bench decode --model PATH --depth D [-n 64] [--kv FORMAT] [--threads T] [--no-cache]
  kvcache                              the main job: SmolLM2 answers a question (demo without it)
  kvcache demo                         run a built-in synthetic model through the cache
  kvcache memory [--shape S] [--kv F]  cache bytes by context, batch and format
  kvcache bench attention [--shape smollm2|llama3-8b] [--ctx N] [--batch B]
                          [--kv f32|f16|bf16] [--threads T] [--steps S]
";

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
    let args = Args::parse(args)?;
    match (args.positional(0), args.positional(1)) {
        (Some("demo"), _) => demo::demo(&args),
        (Some("memory"), _) => demo::memory(&args),
        (Some("bench"), Some("attention")) => bench::attention(&args),
        (Some("bench"), Some("decode")) => generate::bench_decode(&args),
        (Some("generate"), _) => generate::generate(&args),
        (Some("ppl"), _) => generate::ppl(&args),
        (None, _) if args.flag("help") => {
            print!("{USAGE}");
            Ok(())
        }
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
        println!("(no model at {path}: run .ci/fetch-model to get SmolLM2-135M; running the built-in demo)\n");
        demo::demo(&Args::default())
    }
}

/// Parses `--kv` into a storage format.
pub(crate) fn kv_format(args: &Args) -> Result<crate::KvFormat, String> {
    let name = args.string("kv").unwrap_or("f16");
    crate::KvFormat::from_name(name).ok_or_else(|| format!("unknown --kv format `{name}`"))
}

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

/// Parses `--shape` into a spec.
pub(crate) fn shape(args: &Args) -> Result<(&'static str, crate::CacheSpec), String> {
    match args.string("shape").unwrap_or("smollm2") {
        "smollm2" => Ok(("smollm2", crate::CacheSpec::smollm2_135m())),
        "llama3-8b" => Ok(("llama3-8b", crate::CacheSpec::llama3_8b())),
        other => Err(format!("unknown --shape `{other}` (smollm2, llama3-8b)")),
    }
}
