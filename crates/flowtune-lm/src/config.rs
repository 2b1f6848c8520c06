//! Model configuration: a faithful mirror of the keys of an HF `config.json`
//! for the Llama family (llama, mistral, qwen2, phi3), with accessors that
//! resolve each key's default exactly as transformers does for that model type.
use serde::{Deserialize, Serialize};

use crate::{Error, Result};

/// The architectures the model supports (HF `model_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Architecture {
    /// Llama 1/2/3, SmolLM2.
    Llama,
    /// Mistral (sliding-window attention).
    Mistral,
    /// Qwen2 (q/k/v bias; optional sliding window on upper layers).
    Qwen2,
    /// Phi-3 (fused `qkv_proj`, fused `gate_up_proj`, long-rope scaling).
    Phi3,
}

/// One token id or a list of them (HF allows both for `eos_token_id`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TokenIds {
    /// A single id.
    One(u32),
    /// Several ids.
    Many(Vec<u32>),
}

impl TokenIds {
    /// The ids as a vector.
    pub fn to_vec(&self) -> Vec<u32> {
        match self {
            TokenIds::One(i) => vec![*i],
            TokenIds::Many(v) => v.clone(),
        }
    }
}

/// RoPE parameters as HF writes them in `rope_scaling` (transformers 4) or
/// `rope_parameters` (transformers 5). All keys optional; see [`RopeKind`] for
/// the resolved form.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RopeParameters {
    /// `rope_type` (`default`, `linear`, `dynamic`, `llama3`, `longrope`, `su`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_type: Option<String>,
    /// Legacy spelling of `rope_type`.
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub type_: Option<String>,
    /// Base wavelength (transformers 5 keeps it here).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// Scaling factor (linear, dynamic, llama3, longrope).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub factor: Option<f64>,
    /// llama3: low-frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub low_freq_factor: Option<f64>,
    /// llama3: high-frequency factor.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub high_freq_factor: Option<f64>,
    /// llama3 / longrope: pre-training context length.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// longrope: per-frequency factors for long sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub long_factor: Option<Vec<f64>>,
    /// longrope: per-frequency factors for short sequences.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub short_factor: Option<Vec<f64>>,
    /// longrope: cos/sin multiplier (derived from `factor` when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_factor: Option<f64>,
    /// Fraction of the head dimension that is rotated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
}

/// The resolved RoPE variant.
#[derive(Debug, Clone, PartialEq)]
pub enum RopeKind {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor`.
    Linear {
        /// The factor.
        factor: f64,
    },
    /// Dynamic NTK: the base grows once the sequence exceeds `max_position_embeddings`.
    Dynamic {
        /// The factor.
        factor: f64,
    },
    /// Llama 3.1 frequency-dependent scaling.
    Llama3 {
        /// The factor.
        factor: f64,
        /// Low-frequency factor.
        low_freq_factor: f64,
        /// High-frequency factor.
        high_freq_factor: f64,
        /// Pre-training context length.
        original_max_position_embeddings: usize,
    },
    /// Phi-3 LongRoPE (`su`).
    LongRope {
        /// Factors used when the sequence is longer than the original context.
        long_factor: Vec<f64>,
        /// Factors used otherwise.
        short_factor: Vec<f64>,
        /// cos/sin multiplier.
        attention_factor: f64,
        /// Pre-training context length.
        original_max_position_embeddings: usize,
    },
}

/// An HF `config.json` for the Llama family. Keys are HF's; optional keys keep
/// `None` when absent and the accessor methods apply transformers' defaults for
/// the `model_type`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    /// `model_type`.
    pub model_type: Architecture,
    /// Vocabulary size (rows of the embedding).
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Number of query heads.
    pub num_attention_heads: usize,
    /// Number of key/value heads (GQA); defaults to `num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub num_key_value_heads: Option<usize>,
    /// Head dimension; defaults to `hidden_size / num_attention_heads`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub head_dim: Option<usize>,
    /// Activation (`silu` only is supported).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden_act: Option<String>,
    /// Maximum positions.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_position_embeddings: Option<usize>,
    /// Phi-3: pre-training context length (top-level key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub original_max_position_embeddings: Option<usize>,
    /// RMSNorm epsilon.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rms_norm_eps: Option<f64>,
    /// RoPE base (transformers 4 top-level key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_theta: Option<f64>,
    /// RoPE scaling (transformers 4).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_scaling: Option<RopeParameters>,
    /// RoPE parameters (transformers 5).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rope_parameters: Option<RopeParameters>,
    /// Fraction of the head rotated (Phi-3 family key).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partial_rotary_factor: Option<f64>,
    /// Whether `lm_head` shares the embedding matrix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tie_word_embeddings: Option<bool>,
    /// Llama/Mistral: bias on q/k/v/o projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attention_bias: Option<bool>,
    /// Llama: bias on the MLP projections.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mlp_bias: Option<bool>,
    /// Sliding-window size (Mistral, Qwen2 when enabled, Phi-3).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sliding_window: Option<usize>,
    /// Qwen2: whether the sliding window is enabled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub use_sliding_window: Option<bool>,
    /// Qwen2: layers from this index on use the sliding window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_window_layers: Option<usize>,
    /// Beginning-of-sequence id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bos_token_id: Option<u32>,
    /// End-of-sequence id(s).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub eos_token_id: Option<TokenIds>,
    /// Padding id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pad_token_id: Option<u32>,
    /// Any other key of the file, kept for round trips.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl ModelConfig {
    /// Parse a `config.json` text; `file` names it in errors.
    pub fn from_json_str(text: &str, file: &std::path::Path) -> Result<Self> {
        let cfg: ModelConfig = serde_json::from_str(text).map_err(|e| Error::Config {
            file: file.to_path_buf(),
            message: e.to_string(),
        })?;
        cfg.validate(file)?;
        Ok(cfg)
    }

    /// Check the fields the model relies on; `file` names the source in errors.
    pub fn validate(&self, file: &std::path::Path) -> Result<()> {
        let bad = |field: &str, message: String| Error::ConfigField {
            file: file.to_path_buf(),
            field: field.to_string(),
            message,
        };
        if self.num_attention_heads == 0 {
            return Err(bad("num_attention_heads", "must be positive".into()));
        }
        if self.head_dim.is_none() && !self.hidden_size.is_multiple_of(self.num_attention_heads) {
            return Err(bad(
                "hidden_size",
                format!(
                    "{} is not a multiple of num_attention_heads {}",
                    self.hidden_size, self.num_attention_heads
                ),
            ));
        }
        let kv = self.num_key_value_heads();
        if kv == 0 || !self.num_attention_heads.is_multiple_of(kv) {
            return Err(bad(
                "num_key_value_heads",
                format!(
                    "{kv} does not divide num_attention_heads {}",
                    self.num_attention_heads
                ),
            ));
        }
        if let Some(act) = &self.hidden_act {
            if act != "silu" && act != "swish" {
                return Err(bad(
                    "hidden_act",
                    format!("unsupported activation {act:?} (only silu)"),
                ));
            }
        }
        if !self.head_dim().is_multiple_of(2) || !self.rotary_dim().is_multiple_of(2) {
            return Err(bad(
                "head_dim",
                format!("rotary dimension {} must be even", self.rotary_dim()),
            ));
        }
        self.rope_kind().map_err(|m| bad("rope_scaling", m))?;
        Ok(())
    }

    /// Key/value heads.
    pub fn num_key_value_heads(&self) -> usize {
        self.num_key_value_heads.unwrap_or(self.num_attention_heads)
    }

    /// The shapes of the linears a LoRA adapter can target (PEFT's q/k/v/o and gate/up/down
    /// per layer; fused checkpoints' parts too), for an [`flowtune_lora::AdapterBank`].
    pub fn lora_base_shapes(&self) -> flowtune_lora::BaseShapes {
        flowtune_lora::llama_base_shapes(
            self.num_hidden_layers,
            self.hidden_size,
            self.num_attention_heads,
            self.num_key_value_heads(),
            self.head_dim(),
            self.intermediate_size,
        )
    }

    /// Head dimension.
    pub fn head_dim(&self) -> usize {
        self.head_dim
            .unwrap_or(self.hidden_size / self.num_attention_heads.max(1))
    }

    /// RMSNorm epsilon (phi3 1e-5, others 1e-6).
    pub fn rms_norm_eps(&self) -> f64 {
        self.rms_norm_eps.unwrap_or(match self.model_type {
            Architecture::Phi3 => 1e-5,
            _ => 1e-6,
        })
    }

    /// Maximum positions.
    pub fn max_position_embeddings(&self) -> usize {
        self.max_position_embeddings
            .unwrap_or(match self.model_type {
                Architecture::Llama => 2048,
                Architecture::Mistral => 4096 * 32,
                Architecture::Qwen2 => 32768,
                Architecture::Phi3 => 4096,
            })
    }

    /// Whether `lm_head` is tied to the embedding (HF default false).
    pub fn tie_word_embeddings(&self) -> bool {
        self.tie_word_embeddings.unwrap_or(false)
    }

    /// Whether q/k/v carry a bias (always for Qwen2).
    pub fn qkv_bias(&self) -> bool {
        match self.model_type {
            Architecture::Qwen2 => true,
            Architecture::Phi3 => false,
            _ => self.attention_bias.unwrap_or(false),
        }
    }

    /// Whether o_proj carries a bias.
    pub fn o_bias(&self) -> bool {
        match self.model_type {
            Architecture::Llama | Architecture::Mistral => self.attention_bias.unwrap_or(false),
            _ => false,
        }
    }

    /// Whether the MLP projections carry a bias.
    pub fn mlp_bias(&self) -> bool {
        match self.model_type {
            Architecture::Llama => self.mlp_bias.unwrap_or(false),
            _ => false,
        }
    }

    /// End-of-sequence ids from the config (may be empty).
    pub fn eos_token_ids(&self) -> Vec<u32> {
        self.eos_token_id
            .as_ref()
            .map(|e| e.to_vec())
            .unwrap_or_default()
    }

    /// The sliding window of layer `layer`, if that layer uses one.
    pub fn sliding_window_for_layer(&self, layer: usize) -> Option<usize> {
        match self.model_type {
            Architecture::Mistral => self.sliding_window.or(Some(4096)),
            Architecture::Phi3 => self.sliding_window,
            Architecture::Qwen2 => {
                if self.use_sliding_window.unwrap_or(false)
                    && layer >= self.max_window_layers.unwrap_or(28)
                {
                    self.sliding_window.or(Some(4096))
                } else {
                    None
                }
            }
            Architecture::Llama => None,
        }
    }

    fn rope_params(&self) -> RopeParameters {
        self.rope_parameters
            .clone()
            .or_else(|| self.rope_scaling.clone())
            .unwrap_or_default()
    }

    /// RoPE base wavelength.
    pub fn rope_theta(&self) -> f64 {
        self.rope_params()
            .rope_theta
            .or(self.rope_theta)
            .unwrap_or(match self.model_type {
                Architecture::Qwen2 => 10000.0,
                _ => 10000.0,
            })
    }

    /// Number of rotated dimensions of each head.
    pub fn rotary_dim(&self) -> usize {
        let f = self
            .rope_params()
            .partial_rotary_factor
            .or(self.partial_rotary_factor)
            .unwrap_or(1.0);
        (self.head_dim() as f64 * f) as usize
    }

    /// The resolved RoPE variant; the error message names what is wrong.
    pub fn rope_kind(&self) -> std::result::Result<RopeKind, String> {
        let p = self.rope_params();
        let ty = p
            .rope_type
            .clone()
            .or(p.type_.clone())
            .unwrap_or_else(|| "default".into());
        let need =
            |v: Option<f64>, k: &str| v.ok_or_else(|| format!("rope type {ty:?} needs {k:?}"));
        Ok(match ty.as_str() {
            "default" => RopeKind::Default,
            "linear" => RopeKind::Linear {
                factor: need(p.factor, "factor")?,
            },
            "dynamic" => RopeKind::Dynamic {
                factor: need(p.factor, "factor")?,
            },
            "llama3" => RopeKind::Llama3 {
                factor: need(p.factor, "factor")?,
                low_freq_factor: need(p.low_freq_factor, "low_freq_factor")?,
                high_freq_factor: need(p.high_freq_factor, "high_freq_factor")?,
                original_max_position_embeddings: p
                    .original_max_position_embeddings
                    .or(self.original_max_position_embeddings)
                    .unwrap_or(self.max_position_embeddings()),
            },
            "longrope" | "su" | "yarn"
                if self.model_type == Architecture::Phi3 || ty == "longrope" =>
            {
                let original = self
                    .original_max_position_embeddings
                    .or(p.original_max_position_embeddings)
                    .unwrap_or(self.max_position_embeddings());
                let long = p
                    .long_factor
                    .clone()
                    .ok_or("longrope needs \"long_factor\"")?;
                let short = p
                    .short_factor
                    .clone()
                    .ok_or("longrope needs \"short_factor\"")?;
                let half = self.rotary_dim() / 2;
                if long.len() != half || short.len() != half {
                    return Err(format!(
                        "longrope factors have {} / {} entries, expected rotary_dim/2 = {half}",
                        long.len(),
                        short.len()
                    ));
                }
                let factor = p
                    .factor
                    .unwrap_or(self.max_position_embeddings() as f64 / original as f64);
                let attention_factor = p.attention_factor.unwrap_or(if factor <= 1.0 {
                    1.0
                } else {
                    (1.0 + factor.ln() / (original as f64).ln()).sqrt()
                });
                RopeKind::LongRope {
                    long_factor: long,
                    short_factor: short,
                    attention_factor,
                    original_max_position_embeddings: original,
                }
            }
            other => return Err(format!("unsupported rope type {other:?}")),
        })
    }
}
