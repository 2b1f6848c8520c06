//! COCOB-Backprop, a parameter-free optimizer, over tch tensors.
//!
//! The update is exactly the one of the `parameterfree` Python package's `COCOB`
//! (Orabona & Tommasi 2017, "Training Deep Networks without Learning Rates Through
//! Coin Betting"), per coordinate, with `g` the gradient and `x` the parameter:
//!
//! ```text
//! first step:  θ = 0, G = 0, L = eps, reward = 0, x0 = x
//! L = max(L, |g|);  θ -= g;  G += |g|
//! reward = max(reward - g·(x - x0), 0)
//! x = x0 + (reward + L)·θ / (max(G + L, α·L)·L)
//! ```
//!
//! Defaults: α = 100, eps = 1e-8, no weight decay (the paper this project follows
//! ran α = 1000). State is kept in the parameter's dtype, like the reference.

mod clip;
pub mod error;

pub use clip::{clip_grad_norm, grad_norm};
pub use error::{Error, Result};

use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};
use tch::Tensor;

/// Hyper-parameters of COCOB (serde, so runs record them).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct CocobConfig {
    /// Warm-up strength: roughly the number of warm-up rounds (reference default 100).
    pub alpha: f64,
    /// Initial value of the per-coordinate gradient scale `L` (reference default 1e-8).
    pub eps: f64,
    /// L2 penalty added to the gradient (`g + wd·x`), reference default 0.
    pub weight_decay: f64,
}

impl Default for CocobConfig {
    fn default() -> Self {
        Self {
            alpha: 100.0,
            eps: 1e-8,
            weight_decay: 0.0,
        }
    }
}

impl CocobConfig {
    /// The paper's setting (α = 1000, otherwise the defaults).
    pub fn paper() -> Self {
        Self {
            alpha: 1000.0,
            ..Self::default()
        }
    }

    fn validate(&self) -> Result<()> {
        let check = |field: &'static str, v: f64| {
            if v.is_finite() && v >= 0.0 {
                Ok(())
            } else {
                Err(Error::InvalidConfig {
                    field,
                    reason: format!("must be finite and >= 0, got {v}"),
                })
            }
        };
        check("alpha", self.alpha)?;
        check("eps", self.eps)?;
        check("weight_decay", self.weight_decay)
    }
}

/// Per-parameter state, created lazily on the first step that sees a gradient.
#[derive(Debug)]
struct ParamState {
    sum_negative_gradients: Tensor,
    grad_norm_sum: Tensor,
    scale: Tensor,
    reward: Tensor,
    x0: Tensor,
}

const STATE_FIELDS: [&str; 5] = [
    "sum_negative_gradients",
    "grad_norm_sum",
    "L",
    "reward",
    "x0",
];

impl ParamState {
    fn init(p: &Tensor, eps: f64) -> Result<Self> {
        Ok(Self {
            sum_negative_gradients: p.f_zeros_like()?,
            grad_norm_sum: p.f_zeros_like()?,
            scale: p.f_ones_like()?.f_mul_scalar(eps)?,
            reward: p.f_zeros_like()?,
            x0: p.f_detach_copy()?,
        })
    }

    fn fields(&self) -> [&Tensor; 5] {
        [
            &self.sum_negative_gradients,
            &self.grad_norm_sum,
            &self.scale,
            &self.reward,
            &self.x0,
        ]
    }
}

/// Metadata written next to the state tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CocobStateMeta {
    /// Format version (1).
    pub format: u32,
    /// The optimizer's hyper-parameters.
    pub config: CocobConfig,
    /// Number of `step` calls so far.
    pub steps: u64,
    /// Parameters in order: name, shape, and whether their state exists yet.
    pub params: Vec<ParamMeta>,
}

/// Metadata of one parameter in a saved state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ParamMeta {
    /// Parameter name.
    pub name: String,
    /// Shape of the parameter.
    pub shape: Vec<i64>,
    /// Whether state tensors were saved (false before its first gradient).
    pub initialized: bool,
}

/// File name of the state tensors inside a state directory.
pub const STATE_TENSORS_FILE: &str = "cocob_state.safetensors";
/// File name of the state metadata inside a state directory.
pub const STATE_META_FILE: &str = "cocob_state.json";

/// COCOB-Backprop over a list of named tch tensors (leaf tensors with `requires_grad`).
///
/// The optimizer holds shallow clones of the parameters and updates them in place.
#[derive(Debug)]
pub struct Cocob {
    config: CocobConfig,
    names: Vec<String>,
    params: Vec<Tensor>,
    states: Vec<Option<ParamState>>,
    steps: u64,
}

impl Cocob {
    /// Creates an optimizer over `params` (name, tensor). Names must be unique; they key
    /// the saved state.
    pub fn new<I, S>(params: I, config: CocobConfig) -> Result<Self>
    where
        I: IntoIterator<Item = (S, Tensor)>,
        S: Into<String>,
    {
        config.validate()?;
        let mut names = Vec::new();
        let mut tensors = Vec::new();
        let mut seen = HashSet::new();
        for (name, t) in params {
            let name: String = name.into();
            if !t.defined() {
                return Err(Error::InvalidParameter {
                    name,
                    reason: "undefined tensor".into(),
                });
            }
            if !t.is_floating_point() {
                return Err(Error::InvalidParameter {
                    name,
                    reason: format!("dtype {:?} is not floating point", t.kind()),
                });
            }
            if !seen.insert(name.clone()) {
                return Err(Error::DuplicateParameter { name });
            }
            names.push(name);
            tensors.push(t.shallow_clone());
        }
        let states = tensors.iter().map(|_| None).collect();
        Ok(Self {
            config,
            names,
            params: tensors,
            states,
            steps: 0,
        })
    }

    /// The hyper-parameters.
    pub fn config(&self) -> &CocobConfig {
        &self.config
    }

    /// Number of `step` calls so far.
    pub fn steps(&self) -> u64 {
        self.steps
    }

    /// The optimised tensors (shallow clones), in order.
    pub fn params(&self) -> &[Tensor] {
        &self.params
    }

    /// The parameter names, in order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// Clears the gradients of all parameters.
    pub fn zero_grad(&mut self) {
        for p in &mut self.params {
            p.zero_grad();
        }
    }

    /// Clips the joint gradient norm to `max_norm` (see [`clip_grad_norm`]); returns the
    /// norm before clipping.
    pub fn clip_grad_norm(&self, max_norm: f64) -> Result<f64> {
        clip_grad_norm(&self.params, max_norm)
    }

    /// One COCOB step from the current gradients. Parameters without a gradient are
    /// skipped (and keep no state until they get one), like the reference.
    pub fn step(&mut self) -> Result<()> {
        let _span = tracing::trace_span!("cocob_step", step = self.steps).entered();
        let _guard = tch::no_grad_guard();
        let alpha = self.config.alpha;
        for ((p, state), name) in self
            .params
            .iter_mut()
            .zip(self.states.iter_mut())
            .zip(self.names.iter())
        {
            let mut grad = p.grad();
            if !grad.defined() {
                continue;
            }
            if grad.is_sparse() {
                return Err(Error::InvalidParameter {
                    name: name.clone(),
                    reason: "sparse gradients are not supported".into(),
                });
            }
            if state.is_none() {
                *state = Some(ParamState::init(p, self.config.eps)?);
            }
            let Some(st) = state.as_mut() else {
                // Proven invariant: initialised just above.
                continue;
            };
            if self.config.weight_decay != 0.0 {
                grad = grad.f_add(&p.f_mul_scalar(self.config.weight_decay)?)?;
            }
            let abs_grad = grad.f_abs()?;
            // L = max(L, |g|)
            st.scale = st.scale.f_maximum(&abs_grad)?;
            // θ -= g
            let _ = st.sum_negative_gradients.f_sub_(&grad)?;
            // G += |g|
            let _ = st.grad_norm_sum.f_add_(&abs_grad)?;
            // reward += (-g)·(x - x0), the same fused kernel as `addcmul_(value=-1)`
            let shift = p.f_sub(&st.x0)?;
            let _ = st.reward.f_addcmul_(&grad.f_neg()?, &shift)?;
            // reward = max(reward, 0)
            st.reward = st.reward.f_maximum(&st.reward.f_zeros_like()?)?;
            // den = max(G + L, α·L)·L
            let den = st
                .grad_norm_sum
                .f_add(&st.scale)?
                .f_maximum(&st.scale.f_mul_scalar(alpha)?)?
                .f_mul(&st.scale)?;
            // x = (reward + L)·θ / den + x0
            let new = st
                .reward
                .f_add(&st.scale)?
                .f_mul(&st.sum_negative_gradients)?
                .f_div(&den)?
                .f_add(&st.x0)?;
            p.f_copy_(&new)?;
        }
        self.steps += 1;
        Ok(())
    }

    /// Saves the state into `dir` (created if missing) as [`STATE_TENSORS_FILE`] +
    /// [`STATE_META_FILE`]; both files are written atomically (temp file + rename).
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).map_err(|source| Error::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        let mut params = Vec::new();
        for ((name, p), st) in self.names.iter().zip(&self.params).zip(&self.states) {
            params.push(ParamMeta {
                name: name.clone(),
                shape: p.size(),
                initialized: st.is_some(),
            });
            if let Some(st) = st {
                for (field, t) in STATE_FIELDS.iter().zip(st.fields()) {
                    tensors.push((format!("{name}/{field}"), t.f_contiguous()?));
                }
            }
        }
        let meta = CocobStateMeta {
            format: 1,
            config: self.config,
            steps: self.steps,
            params,
        };
        let st_path = dir.join(STATE_TENSORS_FILE);
        let tmp = temp_path(&st_path);
        Tensor::write_safetensors(&tensors, &tmp)?;
        rename(&tmp, &st_path)?;
        let meta_path = dir.join(STATE_META_FILE);
        let json = serde_json::to_vec_pretty(&meta).map_err(|source| Error::Json {
            path: meta_path.clone(),
            source,
        })?;
        write_atomic(&meta_path, &json)
    }

    /// Loads a state saved by [`Cocob::save`] into this optimizer (for exact resume).
    /// The parameter names and shapes must match; the saved config replaces this one.
    /// The parameters' own values are not touched (restore them separately).
    pub fn load(&mut self, dir: &Path) -> Result<()> {
        let meta_path = dir.join(STATE_META_FILE);
        let bytes = std::fs::read(&meta_path).map_err(|source| Error::Io {
            path: meta_path.clone(),
            source,
        })?;
        let meta: CocobStateMeta =
            serde_json::from_slice(&bytes).map_err(|source| Error::Json {
                path: meta_path.clone(),
                source,
            })?;
        meta.config.validate()?;
        if meta.params.len() != self.params.len() {
            return Err(Error::StateMismatch {
                path: meta_path,
                what: format!(
                    "{} parameters saved, optimizer has {}",
                    meta.params.len(),
                    self.params.len()
                ),
            });
        }
        let st_path = dir.join(STATE_TENSORS_FILE);
        let mut saved: HashMap<String, Tensor> =
            Tensor::read_safetensors(&st_path)?.into_iter().collect();
        let mut states = Vec::with_capacity(self.params.len());
        for ((pm, name), p) in meta.params.iter().zip(&self.names).zip(&self.params) {
            if &pm.name != name || pm.shape != p.size() {
                return Err(Error::StateMismatch {
                    path: meta_path,
                    what: format!(
                        "saved parameter `{}` {:?} vs optimizer parameter `{}` {:?}",
                        pm.name,
                        pm.shape,
                        name,
                        p.size()
                    ),
                });
            }
            if !pm.initialized {
                states.push(None);
                continue;
            }
            let mut fields = Vec::with_capacity(5);
            for field in STATE_FIELDS {
                let key = format!("{name}/{field}");
                let t = saved
                    .remove(&key)
                    .ok_or_else(|| Error::MissingStateTensor {
                        path: st_path.clone(),
                        key: key.clone(),
                    })?;
                if t.size() != p.size() {
                    return Err(Error::StateMismatch {
                        path: st_path,
                        what: format!(
                            "tensor `{key}` has shape {:?}, expected {:?}",
                            t.size(),
                            p.size()
                        ),
                    });
                }
                fields.push(t.f_to_device(p.device())?.f_to_kind(p.kind())?);
            }
            let mut it = fields.into_iter();
            let mut next = || {
                it.next().ok_or_else(|| Error::MissingStateTensor {
                    path: st_path.clone(),
                    key: format!("{name}/?"),
                })
            };
            states.push(Some(ParamState {
                sum_negative_gradients: next()?,
                grad_norm_sum: next()?,
                scale: next()?,
                reward: next()?,
                x0: next()?,
            }));
        }
        self.states = states;
        self.config = meta.config;
        self.steps = meta.steps;
        Ok(())
    }
}

fn temp_path(path: &Path) -> PathBuf {
    let mut name = path
        .file_name()
        .map(|n| n.to_os_string())
        .unwrap_or_default();
    name.push(format!(".tmp{}", std::process::id()));
    path.with_file_name(name)
}

fn rename(from: &Path, to: &Path) -> Result<()> {
    std::fs::rename(from, to).map_err(|source| Error::Io {
        path: to.to_path_buf(),
        source,
    })
}

/// Writes `bytes` to `path` atomically: a temp file in the same directory, then rename.
fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = temp_path(path);
    std::fs::write(&tmp, bytes).map_err(|source| Error::Io {
        path: tmp.clone(),
        source,
    })?;
    rename(&tmp, path)
}
