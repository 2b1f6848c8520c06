//! `adapter_config.json`: the fields of PEFT's `LoraConfig` that matter, other fields preserved.

use crate::error::{LoraError, Result};
use crate::site::{BaseShapes, Module, Site};
use serde::{Deserialize, Serialize};

/// PEFT's `target_modules`: a list of names (matched as PEFT does: the module path equals the
/// name or ends with `.name`; order irrelevant) or a single string (PEFT: a regex fully matched
/// against the module path).
///
/// Supported strings: `all-linear` (every base site), and regexes fully matched against the module
/// path (`model.layers.3.self_attn.q_proj`) like Python's `re.fullmatch`, within the subset
/// documented in `pattern.rs` (no lookarounds or backreferences; those are rejected with
/// [`LoraError::ConfigField`]).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum TargetModules {
    /// A set of module names, e.g. `["q_proj", "v_proj"]`.
    List(Vec<String>),
    /// A single string (regex in PEFT).
    Pattern(String),
}

/// PEFT's `layers_to_transform`: one layer index or a list of them.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum LayersToTransform {
    /// A single layer.
    One(usize),
    /// Several layers.
    Many(Vec<usize>),
}

fn default_peft_type() -> String {
    "LORA".to_string()
}
fn default_task_type() -> Option<String> {
    Some("CAUSAL_LM".to_string())
}
fn default_bias() -> String {
    "none".to_string()
}
fn default_r() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn serialize_alpha<S: serde::Serializer>(
    alpha: &f64,
    s: S,
) -> std::result::Result<S::Ok, S::Error> {
    if alpha.fract() == 0.0 && alpha.abs() < 1e15 {
        s.serialize_i64(*alpha as i64)
    } else {
        s.serialize_f64(*alpha)
    }
}
fn default_true() -> bool {
    true
}

/// The LoRA hyper-parameters of one adapter, in PEFT's `adapter_config.json` layout.
///
/// Unknown fields are kept in `extra` and written back on save. `lora_dropout` drops LoRA
/// inputs while the bank is in training mode ([`crate::AdapterBank::set_training`]), as PEFT
/// does in `train()` mode.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoraConfig {
    /// Always `"LORA"`.
    #[serde(default = "default_peft_type")]
    pub peft_type: String,
    /// PEFT task type, `"CAUSAL_LM"`.
    #[serde(default = "default_task_type")]
    pub task_type: Option<String>,
    /// Rank `r`.
    #[serde(default = "default_r")]
    pub r: usize,
    /// `lora_alpha` (written as an integer when integral, as PEFT does).
    #[serde(default = "default_alpha", serialize_with = "serialize_alpha")]
    pub lora_alpha: f64,
    /// rsLoRA: scale `alpha/√r` instead of `alpha/r`.
    #[serde(default)]
    pub use_rslora: bool,
    /// Which linear layers get an adapter; `None` means PEFT's Llama default (`q_proj`, `v_proj`).
    #[serde(default)]
    pub target_modules: Option<TargetModules>,
    /// Restrict to these layers (all when `None`).
    #[serde(default)]
    pub layers_to_transform: Option<LayersToTransform>,
    /// Dropout probability on the LoRA input, applied only in the bank's training mode.
    #[serde(default)]
    pub lora_dropout: f64,
    /// Must be `"none"`.
    #[serde(default = "default_bias")]
    pub bias: String,
    /// Must be `false` (weights stored `[out, in]`).
    #[serde(default)]
    pub fan_in_fan_out: bool,
    /// The base model this adapter was trained on (informative).
    #[serde(default)]
    pub base_model_name_or_path: Option<String>,
    /// PEFT's `inference_mode` flag (informative).
    #[serde(default = "default_true")]
    pub inference_mode: bool,
    /// Every other field of the file, preserved verbatim.
    #[serde(flatten)]
    pub extra: serde_json::Map<String, serde_json::Value>,
}

impl Default for LoraConfig {
    fn default() -> Self {
        LoraConfig {
            peft_type: default_peft_type(),
            task_type: default_task_type(),
            r: default_r(),
            lora_alpha: default_alpha(),
            use_rslora: false,
            target_modules: None,
            layers_to_transform: None,
            lora_dropout: 0.0,
            bias: default_bias(),
            fan_in_fan_out: false,
            base_model_name_or_path: None,
            inference_mode: true,
            extra: serde_json::Map::new(),
        }
    }
}

impl LoraConfig {
    /// An rsLoRA config (`scale = alpha/√r`) on the given modules.
    pub fn rslora(r: usize, lora_alpha: f64, modules: &[Module]) -> Self {
        LoraConfig {
            r,
            lora_alpha,
            use_rslora: true,
            target_modules: Some(TargetModules::List(
                modules.iter().map(|m| m.name().to_string()).collect(),
            )),
            ..LoraConfig::default()
        }
    }

    /// The multiplier of `B·A`: `alpha/√r` (rsLoRA) or `alpha/r`.
    pub fn scale(&self) -> f64 {
        if self.use_rslora {
            self.lora_alpha / (self.r as f64).sqrt()
        } else {
            self.lora_alpha / self.r as f64
        }
    }

    /// Checks the fields this crate relies on; errors name the field.
    pub fn validate(&self) -> Result<()> {
        let bad = |field: &str, reason: String| {
            Err(LoraError::ConfigField {
                field: field.to_string(),
                reason,
            })
        };
        if self.peft_type != "LORA" {
            return bad("peft_type", format!("`{}` is not LORA", self.peft_type));
        }
        if self.r == 0 {
            return bad("r", "rank must be at least 1".into());
        }
        if !(0.0..1.0).contains(&self.lora_dropout) {
            return bad(
                "lora_dropout",
                format!("{} is not a probability in [0, 1)", self.lora_dropout),
            );
        }
        if !self.lora_alpha.is_finite() {
            return bad("lora_alpha", format!("{} is not finite", self.lora_alpha));
        }
        if self.bias != "none" {
            return bad(
                "bias",
                format!("`{}` unsupported, only \"none\"", self.bias),
            );
        }
        if self.fan_in_fan_out {
            return bad(
                "fan_in_fan_out",
                "true is unsupported (Conv1D layers)".into(),
            );
        }
        if let Some(TargetModules::Pattern(p)) = &self.target_modules {
            if p != "all-linear" {
                if let Err(reason) = crate::pattern::Pattern::new(p) {
                    return bad("target_modules", format!("unsupported regex: {reason}"));
                }
            }
        }
        for (field, empty_ok) in [
            ("use_dora", false),
            ("rank_pattern", true),
            ("alpha_pattern", true),
            ("modules_to_save", true),
        ] {
            if let Some(v) = self.extra.get(field) {
                let trivial = match v {
                    serde_json::Value::Null => true,
                    serde_json::Value::Bool(b) => !b,
                    serde_json::Value::Object(o) => empty_ok && o.is_empty(),
                    serde_json::Value::Array(a) => empty_ok && a.is_empty(),
                    _ => false,
                };
                if !trivial {
                    return bad(field, format!("non-default value {v} unsupported"));
                }
            }
        }
        if let Some(v) = self.extra.get("exclude_modules") {
            if !v.is_null() && v != &serde_json::Value::Array(vec![]) {
                return bad(
                    "exclude_modules",
                    format!("non-empty value {v} unsupported"),
                );
            }
        }
        Ok(())
    }

    /// Whether a site is targeted (ignores whether the base has it).
    pub fn targets(&self, site: &Site) -> bool {
        if let Some(layers) = &self.layers_to_transform {
            let ok = match layers {
                LayersToTransform::One(l) => *l == site.layer,
                LayersToTransform::Many(ls) => ls.contains(&site.layer),
            };
            if !ok {
                return false;
            }
        }
        let path = site.module_path();
        let matches = |t: &str| path == t || path.ends_with(&format!(".{t}"));
        match &self.target_modules {
            None => matches!(site.module, Module::QProj | Module::VProj),
            Some(TargetModules::Pattern(p)) if p == "all-linear" => true,
            Some(TargetModules::Pattern(p)) => {
                crate::pattern::Pattern::new(p).is_ok_and(|re| re.full_match(&path))
            }
            Some(TargetModules::List(ts)) => ts.iter().any(|t| matches(t)),
        }
    }

    /// The sites of `base` this config adapts, in order.
    pub fn target_sites(&self, base: &BaseShapes) -> Vec<Site> {
        base.keys().filter(|s| self.targets(s)).copied().collect()
    }
}
