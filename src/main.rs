//! The `kvcache` command-line tool; see `kvcache --help`.

fn main() {
    let code = kvcache::cli::main(std::env::args().skip(1).collect());
    std::process::exit(code);
}
