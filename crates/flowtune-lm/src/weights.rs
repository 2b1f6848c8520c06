//! Model weights by HF parameter name, already on the requested device and dtype.
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use tch::Tensor;

use crate::cpu_kernels::{BlockCodes, Int8F32Weight, PanelWeight};
use crate::int4::Int4Blocks;
use crate::{Error, Result};

/// Tensors by HF parameter name (`model.embed_tokens.weight`,
/// `model.layers.{i}.self_attn.q_proj.weight`, ...; `lm_head.weight` absent when the
/// embeddings are tied).
#[derive(Debug)]
pub struct Weights {
    tensors: HashMap<String, Tensor>,
    int4: HashMap<String, Int4Blocks>,
    int8: HashMap<String, Arc<Int8F32Weight>>,
    codes: HashMap<String, WeightCodes>,
    source: PathBuf,
}

/// A dense weight's own ggml block codes (a GGUF's Q4_1 linears, its Q8_0 head), from which
/// its decoding panels are built where the codes reproduce it bit for bit
/// ([`PanelWeight::from_codes`]): the same products as over its values, fewer bytes read.
#[derive(Debug)]
pub enum WeightCodes {
    /// 4-bit codes with a scale and a minimum per 32 inputs.
    Q4(Int4Blocks),
    /// 8-bit codes with a scale per 32 inputs.
    Q8(Arc<Int8F32Weight>),
}

impl WeightCodes {
    /// A copy sharing storage with these codes.
    pub fn shallow_clone(&self) -> Self {
        match self {
            WeightCodes::Q4(b) => WeightCodes::Q4(b.shallow_clone()),
            WeightCodes::Q8(w) => WeightCodes::Q8(Arc::clone(w)),
        }
    }

    /// Codes of a fused linear from its parts' (all 4-bit, stacked along the outputs), or
    /// `None` when a part has none or other codes.
    pub fn fused(parts: &[Option<WeightCodes>]) -> Result<Option<WeightCodes>> {
        let mut q4 = Vec::with_capacity(parts.len());
        for part in parts {
            match part {
                Some(WeightCodes::Q4(b)) => q4.push(b),
                _ => return Ok(None),
            }
        }
        Ok(Some(WeightCodes::Q4(Int4Blocks::cat(&q4)?)))
    }

    /// Decoding panels of `weight` holding these codes; `None` where
    /// [`PanelWeight::from_codes`] declines (another shape, values not reproduced, ...).
    pub fn panels(&self, weight: &Tensor) -> Result<Option<PanelWeight>> {
        match self {
            WeightCodes::Q4(b) => {
                let (codes, scale, min) = b.to_vecs()?;
                let codes = BlockCodes::Q4 {
                    codes: &codes,
                    scale: &scale,
                    min: &min,
                };
                PanelWeight::from_codes(weight, codes)
            }
            WeightCodes::Q8(w) => PanelWeight::from_codes(weight, w.codes()),
        }
    }
}

impl Weights {
    /// Weights from a map of named tensors; `source` names where they came from in
    /// errors (tests with random weights may pass any descriptive path).
    pub fn from_map(tensors: HashMap<String, Tensor>, source: impl Into<PathBuf>) -> Self {
        Weights {
            tensors,
            int4: HashMap::new(),
            int8: HashMap::new(),
            codes: HashMap::new(),
            source: source.into(),
        }
    }

    /// The 4-bit blocks of a linear weight, present when loaded with
    /// [`crate::loader::LinearWeights::Int4`].
    pub fn int4(&self, name: &str) -> Option<&Int4Blocks> {
        self.int4.get(name)
    }

    /// Attach 4-bit blocks to the linear weight `name` (its dense tensor stays).
    pub fn set_int4(&mut self, name: &str, blocks: Int4Blocks) {
        self.int4.insert(name.to_string(), blocks);
    }

    /// The 8-bit blocks of a weight (a Q8_0 GGUF's `lm_head.weight` in int4 mode; see
    /// [`Int8F32Weight`]).
    pub fn int8(&self, name: &str) -> Option<Arc<Int8F32Weight>> {
        self.int8.get(name).cloned()
    }

    /// Attach 8-bit blocks to the weight `name` (its dense tensor stays).
    pub fn set_int8(&mut self, name: &str, blocks: Int8F32Weight) {
        self.int8.insert(name.to_string(), Arc::new(blocks));
    }

    /// The file's own block codes of the dense weight `name` (see [`WeightCodes`]).
    pub fn codes(&self, name: &str) -> Option<&WeightCodes> {
        self.codes.get(name)
    }

    /// Attach the block codes `name`'s dense values were dequantised from.
    pub fn set_codes(&mut self, name: &str, codes: WeightCodes) {
        self.codes.insert(name.to_string(), codes);
    }

    /// The tensor by HF name (a shallow clone sharing storage), or
    /// [`Error::MissingTensor`] naming it and the source file.
    pub fn get(&self, name: &str) -> Result<Tensor> {
        self.tensors
            .get(name)
            .map(Tensor::shallow_clone)
            .ok_or_else(|| Error::MissingTensor {
                path: self.source.clone(),
                tensor: name.into(),
            })
    }

    /// Whether a tensor of that name exists.
    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    /// All tensor names, sorted.
    pub fn names(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.tensors.keys().map(String::as_str).collect();
        v.sort_unstable();
        v
    }

    /// Number of tensors.
    pub fn len(&self) -> usize {
        self.tensors.len()
    }

    /// Whether there are no tensors.
    pub fn is_empty(&self) -> bool {
        self.tensors.is_empty()
    }

    /// The file or folder the weights were loaded from.
    pub fn source(&self) -> &Path {
        &self.source
    }

    /// Total number of parameters.
    pub fn num_parameters(&self) -> i64 {
        self.tensors
            .values()
            .map(Tensor::numel)
            .map(|n| n as i64)
            .sum()
    }

    /// Consume into the underlying map.
    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.tensors
    }
}
