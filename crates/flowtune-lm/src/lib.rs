//! Llama-family language models over tch: weights from HF safetensors folders and
//! GGUF files, the tokenizer and HF chat templates, a KV cache, and a batched
//! engine that generates (greedy, sampling, beam, diverse beam) and scores.
//!
//! Module ownership while the crate is being built: `gguf`, `weights`,
//! `tokenizer`, `loader` (loading); `config`, `model`, `kv`, `engine`, the CLI
//! (running). `locate` finds the test model.

pub mod error;
pub mod locate;

pub use error::{Error, Result};
pub use locate::{locate_test_model, TEST_MODEL_ENV};
