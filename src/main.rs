//! The `kvcache` command-line tool.
fn main() {}
