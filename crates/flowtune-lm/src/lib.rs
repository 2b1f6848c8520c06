//! Llama-family language models over tch: weights from HF safetensors folders and
//! GGUF files, the tokenizer and HF chat templates, a KV cache, and a batched
//! engine that generates (greedy, sampling, beam, diverse beam) and scores.
//!
//! Module ownership while the crate is being built: `gguf`, `weights`,
//! `tokenizer`, `loader` (loading); `config`, `model`, `kv`, `engine`, the CLI
//! (running). `locate` finds the test model.

pub mod config;
pub mod cpu_kernels;
pub mod engine;
pub mod error;
pub mod gguf;
pub mod heap;
pub mod hf;
pub mod int4;
pub mod kv;
pub mod loader;
pub mod locate;
pub mod model;
mod prefix_store;
pub mod tokenizer;
pub mod weights;

pub use error::{Error, Result};
pub use loader::{load, LinearWeights, LoadOptions, LoadedModel};
pub use locate::{locate_test_model, TEST_MODEL_ENV};
pub use tokenizer::{ChatMessage, Tokenizer};
pub use weights::Weights;
