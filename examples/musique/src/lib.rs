//! MuSiQue multi-hop QA with flowtune: official data loading and metrics, a synthetic
//! MuSiQue-like generator, prompts, the paper's Answerable and Full flows, and a CLI.

pub mod app;
pub mod data;
pub mod error;
pub mod flow;
pub mod io;
pub mod metrics;
pub mod synth;

pub use error::{Error, Result};
