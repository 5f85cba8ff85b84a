//! # kvcache
//!
//! A paged KV cache for autoregressive transformer inference, built to be embedded in edge and
//! firmware runtimes: the core is `no_std`, lives in one arena the caller hands over, never
//! allocates after construction, and answers bad input with a typed error instead of a panic.
//!
//! The parts, from the bottom up:
//! - [`spec`]: model geometry and storage formats; every size and stride derived once
//!   ([`spec::Layout`]).
//! - [`arena`]: carves the caller's bytes into aligned regions.
//! - [`pool`]: the fixed pool of physical blocks with reference counts.
//! - [`cache`]: sequences and their page tables: reserve, write, read, fork (copy-on-write),
//!   truncate, remove, sliding window, accounting and invariant checks.
//! - [`kernels`]: scalar and AVX2 row kernels (dot products, weighted sums, exp).
//! - [`attention`]: decode, prefill and chunked prefill over the paged cache for ragged batches,
//!   with online softmax and split-K work items.
//!
//! Under the `std` feature the crate also has the model runner ([`model`]) and the `kvcache`
//! CLI.
#![cfg_attr(not(any(test, feature = "std")), no_std)]
#![deny(unsafe_code)]
#![warn(missing_docs)]

#[cfg(feature = "alloc")]
extern crate alloc;

#[allow(unsafe_code)]
pub mod arena;
pub mod attention;
pub mod cache;
#[cfg(feature = "std")]
pub mod cli;
pub mod error;
#[allow(unsafe_code)]
pub mod ffi;
pub mod format;
pub mod half;
#[allow(unsafe_code)]
pub mod kernels;
pub mod memory;
pub mod pool;
pub mod quant;
pub mod spec;

#[cfg(feature = "std")]
#[allow(unsafe_code)]
pub mod model;

pub use cache::{KvCache, SeqId};
pub use error::Error;
pub use format::KvFormat;
pub use spec::{CacheSpec, Layout};

/// The README's Rust example, compiled and run as a doctest.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
