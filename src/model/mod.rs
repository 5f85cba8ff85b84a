//! The model runner (`std` only): a GGUF reader, quantized weights and their kernels, a
//! tokenizer, a sampler and the Llama-family forward pass that drives the cache.

pub mod gguf;
pub mod llama;
pub mod quant;
pub mod sampler;
pub mod synthetic;
pub mod threads;
pub mod tokenizer;
