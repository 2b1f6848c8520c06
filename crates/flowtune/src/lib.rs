//! flowtune: online joint fine-tuning of multi-agent LLM flows.
//!
//! This facade re-exports the workspace's crates and holds the pieces that
//! compose them: the LM-engine backend for flows and the tch learner.
//!
//! | crate | what it is |
//! |---|---|
//! | [`graph`] | the flow DSL: nodes, the episode context, traces, exact replay |
//! | [`rollout`] | one-step-deviation credit assignment, the scheduler, the online loop |
//! | [`lm`] | Llama-family models over tch, GGUF/HF loading, tokenizer, batched engine |
//! | [`lora`] | a bank of named LoRA adapters over one frozen base, PEFT files |
//! | [`loss`] | weighted DPO, supervised NLL, label NLL |
//! | [`cocob`] | the COCOB-Backprop optimizer |

pub use flowtune_cocob as cocob;
pub use flowtune_graph as graph;
pub use flowtune_lm as lm;
pub use flowtune_lora as lora;
pub use flowtune_loss as loss;
pub use flowtune_rollout as rollout;
/// The tch version the workspace is built on (devices, dtypes).
pub use tch;
pub mod learner;
pub mod runtime;
