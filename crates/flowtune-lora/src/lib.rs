//! A bank of named LoRA adapters over one frozen base, PEFT-compatible.
//!
//! - [`AdapterBank`] holds named adapters (e.g. `query`, `query.ref`) over the base model's
//!   adaptable linear layers ([`BaseShapes`]: [`Site`] → in/out features).
//! - [`AdapterBank::delta`] computes the LoRA contribution `scale·(x Aᵀ) Bᵀ` at one site for a
//!   batch whose rows may use different adapters ([`AdapterSelection`]); the model adds it to the
//!   base linear's output.
//! - PEFT folders load and save ([`AdapterBank::load_peft`], [`AdapterBank::save_peft`]).
//! - [`AdapterBank::lerp`], [`AdapterBank::copy`], [`AdapterBank::reset`] manage reference copies;
//!   [`AdapterBank::merge_into`] / [`AdapterBank::unmerge_from`] fold an adapter into the base
//!   weights through [`BaseLinears`].

pub mod bank;
pub mod config;
pub mod error;
pub mod merge;
mod pattern;
pub mod peft;
pub mod site;

pub use bank::{
    Adapter, AdapterBank, AdapterId, AdapterSelection, DeltaStrategy, LoraWeights,
    SelectedAdapters, AUTO_GATHER_MIN_POSITIONS,
};
pub use config::{LayersToTransform, LoraConfig, TargetModules};
pub use error::{LoraError, Result};
pub use merge::BaseLinears;
pub use peft::{read_config, write_atomic, CONFIG_FILE, WEIGHTS_FILE};
pub use site::{llama_base_shapes, BaseShapes, Factor, LinearShape, Module, Site};
