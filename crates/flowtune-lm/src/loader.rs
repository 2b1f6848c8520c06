//! One entry point for loading a model: a `.gguf` file or an HF folder.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::gguf::{self, GgufFile};
use crate::int4::{self, Int4Blocks};
use crate::tokenizer::Tokenizer;
use crate::weights::{WeightCodes, Weights};
use crate::{hf, Error, Result};

/// Where and in which dtype to put the weights.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoadOptions {
    /// Target device.
    pub device: Device,
    /// Floating-point dtype for the weights (f32, bf16 or f16).
    pub dtype: Kind,
    /// How the decoder layers' linear weights are stored.
    pub linear_weights: LinearWeights,
}

impl Default for LoadOptions {
    fn default() -> Self {
        LoadOptions {
            device: Device::Cpu,
            dtype: Kind::Float,
            linear_weights: LinearWeights::Dense,
        }
    }
}

/// Storage of the decoder layers' linear weights.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LinearWeights {
    /// Dense in the load dtype (exact with respect to the source).
    #[default]
    Dense,
    /// Dense plus 4-bit group-wise codes ([`crate::int4`]) for small-batch decoding on the CPU
    /// (bf16/f16 through libtorch's kernel, float32 through flowtune's on AVX-512 CPUs). A
    /// Q4_0/Q4_1 GGUF keeps its own blocks; other sources are quantised.
    Int4,
}

impl std::str::FromStr for LinearWeights {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "dense" => Ok(Self::Dense),
            "int4" => Ok(Self::Int4),
            other => Err(format!("linear weights {other:?}: expected dense or int4")),
        }
    }
}

/// A loaded model: config, weights by HF name, tokenizer.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model config (from `config.json`, or built from GGUF metadata).
    pub config: ModelConfig,
    /// The weights on the requested device and dtype.
    pub weights: Weights,
    /// The tokenizer with its chat template.
    pub tokenizer: Tokenizer,
    /// The file or folder loaded.
    pub source: PathBuf,
}

/// Whether a path is loaded as GGUF (a file whose name ends in `.gguf`, or any
/// file starting with the GGUF magic).
pub fn is_gguf(path: &Path) -> bool {
    if !path.is_file() {
        return false;
    }
    if path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
    {
        return true;
    }
    let mut magic = [0u8; 4];
    std::fs::File::open(path)
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
        .map(|_| &magic == gguf::GGUF_MAGIC)
        .unwrap_or(false)
}

/// Load a model from a `.gguf` file or an HF folder.
pub fn load(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let _span = tracing::info_span!("load_model", path = %path.display()).entered();
    if !matches!(opts.dtype, Kind::Float | Kind::BFloat16 | Kind::Half) {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: format!("weight dtype {:?}", opts.dtype),
        });
    }
    if opts.linear_weights == LinearWeights::Int4
        && (opts.device != Device::Cpu
            || (opts.dtype == Kind::Float && !crate::cpu_kernels::int4_f32_available()))
    {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: format!(
                "int4 linear weights on {:?} in {:?} (they need the CPU, and for float32 a CPU \
                 with AVX-512F)",
                opts.device, opts.dtype
            ),
        });
    }
    if path.is_dir() {
        load_hf_dir(path, opts)
    } else if is_gguf(path) {
        load_gguf(path, opts)
    } else if path.exists() {
        Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: "neither a GGUF file nor an HF folder".into(),
        })
    } else {
        Err(Error::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such file or folder"),
        })
    }
}

/// Load an HF folder (`config.json`, safetensors, tokenizer files).
pub fn load_hf_dir(dir: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let config = hf::read_config(dir)?;
    let mut weights = hf::load_weights(dir, opts.device, opts.dtype)?;
    if opts.linear_weights == LinearWeights::Int4 {
        let names: Vec<String> = weights
            .names()
            .into_iter()
            .filter(|n| int4::is_int4_target(n))
            .map(String::from)
            .collect();
        for name in names {
            let blocks = Int4Blocks::quantize(&name, &weights.get(&name)?)?;
            weights.set_int4(&name, blocks);
        }
    }
    let mut tokenizer = Tokenizer::from_hf_dir(dir)?;
    tokenizer.add_eos_token_ids(&config.eos_token_ids());
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        source: dir.to_path_buf(),
    })
}

/// The config a GGUF file describes: its metadata as an HF-style `config.json`
/// object, deserialised into [`ModelConfig`] and validated.
pub fn gguf_config(file: &GgufFile) -> Result<ModelConfig> {
    let json = file.hf_config_json()?;
    let config: ModelConfig = serde_json::from_value(json).map_err(|e| Error::Config {
        file: file.path().to_path_buf(),
        message: format!("config built from GGUF metadata: {e}"),
    })?;
    config.validate(file.path())?;
    Ok(config)
}

/// A dequantised tensor: HF name, f32 data, row-major shape.
pub type HfTensorData = (String, Vec<f32>, Vec<i64>);

/// Dequantise one GGUF tensor that has an HF counterpart to f32, with llama.cpp's
/// Q/K row permutation undone: `(hf_name, data, row-major shape)`, or `None` for a
/// tensor with no HF counterpart.
pub fn gguf_hf_tensor(
    file: &GgufFile,
    info: &gguf::GgufTensorInfo,
    config: &ModelConfig,
) -> Result<Option<HfTensorData>> {
    let arch = file.header.architecture(file.path())?;
    let Some(name) = gguf::hf_tensor_name(arch, &info.name) else {
        tracing::debug!(tensor = %info.name, "GGUF tensor with no HF counterpart skipped");
        return Ok(None);
    };
    let (mut data, shape) = file.dequantize_tensor(info)?;
    if gguf::is_rope_permuted(arch, &info.name) {
        let heads = if info.name.contains(".attn_q.") {
            config.num_attention_heads
        } else {
            config.num_key_value_heads()
        };
        data = gguf::reverse_permute(&data, &shape, heads).map_err(|reason| Error::GgufTensor {
            path: file.path().to_path_buf(),
            tensor: info.name.clone(),
            reason,
        })?;
    }
    Ok(Some((name, data, shape)))
}

/// Every GGUF tensor with an HF counterpart, dequantised (see [`gguf_hf_tensor`]).
/// Holds all of them in f32 at once: for large models prefer [`load_gguf`], which
/// converts tensor by tensor.
pub fn gguf_hf_tensors(file: &GgufFile, config: &ModelConfig) -> Result<Vec<HfTensorData>> {
    let mut out = Vec::with_capacity(file.header.tensors.len());
    for info in &file.header.tensors {
        if let Some(t) = gguf_hf_tensor(file, info, config)? {
            out.push(t);
        }
    }
    Ok(out)
}

/// Dequantise, cast and place every tensor, a few at a time on worker threads, so
/// that at most one f32 copy per worker exists besides the result.
/// One converted GGUF tensor: HF name, dense tensor, and its 4-bit blocks in int4 mode.
type Converted = (String, Tensor, Option<Int4Blocks>);

/// A Q4_0/Q4_1 linear's own blocks with llama.cpp's Q/K row permutation undone (rows are
/// output features, so codes, scales and minima are permuted like the dense rows).
fn gguf_hf_q4_blocks(
    file: &GgufFile,
    info: &gguf::GgufTensorInfo,
    config: &ModelConfig,
    name: &str,
) -> Result<Option<Int4Blocks>> {
    let Some(((q, scale, min), shape)) = file.q4_tensor(info)? else {
        return Ok(None);
    };
    let rows = shape.first().copied().unwrap_or(0);
    let cols = shape.get(1).copied().unwrap_or(0);
    let mut q: Vec<f32> = q.into_iter().map(f32::from).collect();
    let (mut scale, mut min) = (scale, min);
    if gguf::is_rope_permuted(file.header.architecture(file.path())?, &info.name) {
        let heads = if info.name.contains(".attn_q.") {
            config.num_attention_heads
        } else {
            config.num_key_value_heads()
        };
        let err = |reason| Error::GgufTensor {
            path: file.path().to_path_buf(),
            tensor: info.name.clone(),
            reason,
        };
        let group_shape = [rows, cols / int4::INT4_GROUP];
        q = gguf::reverse_permute(&q, &shape, heads).map_err(err)?;
        scale = gguf::reverse_permute(&scale, &group_shape, heads).map_err(err)?;
        min = gguf::reverse_permute(&min, &group_shape, heads).map_err(err)?;
    }
    let groups = [rows, cols / int4::INT4_GROUP];
    Ok(Some(Int4Blocks::new(
        name,
        Tensor::f_from_slice(&q)?.f_reshape(&shape[..])?,
        Tensor::f_from_slice(&scale)?.f_reshape(groups)?,
        Tensor::f_from_slice(&min)?.f_reshape(groups)?,
    )?))
}

fn gguf_weights(file: &GgufFile, config: &ModelConfig, opts: &LoadOptions) -> Result<Weights> {
    let _span = tracing::info_span!("load_gguf_weights", path = %file.path().display()).entered();
    let infos = &file.header.tensors;
    let workers = std::thread::available_parallelism()
        .map_or(1, |n| n.get())
        .clamp(1, 4)
        .min(infos.len().max(1));
    let next = std::sync::atomic::AtomicUsize::new(0);
    // Dense CPU models keep the file's Q4 blocks (and Q8_0 head) for their decoding panels.
    let panel_codes = opts.linear_weights == LinearWeights::Dense
        && opts.device == Device::Cpu
        && matches!(opts.dtype, Kind::Float | Kind::BFloat16)
        && crate::cpu_kernels::int4_f32_available()
        && crate::cpu_kernels::decode_panels();
    let convert = |info: &gguf::GgufTensorInfo| -> Result<Option<Converted>> {
        let Some((name, data, shape)) = gguf_hf_tensor(file, info, config)? else {
            return Ok(None);
        };
        let blocks = if !int4::is_int4_target(&name) {
            None
        } else if opts.linear_weights == LinearWeights::Int4 {
            Some(match gguf_hf_q4_blocks(file, info, config, &name)? {
                Some(b) => b,
                None => {
                    let dense = Tensor::f_from_slice(&data)?.f_reshape(&shape[..])?;
                    Int4Blocks::quantize(&name, &dense)?
                }
            })
        } else if panel_codes {
            gguf_hf_q4_blocks(file, info, config, &name)?
        } else {
            None
        };
        let t = Tensor::f_from_slice(&data)?.f_reshape(&shape[..])?;
        drop(data);
        let t = if opts.dtype == Kind::Float {
            t
        } else {
            t.f_to_kind(opts.dtype)?
        };
        Ok(Some((name, t.f_to_device(opts.device)?, blocks)))
    };
    let results: Vec<Result<Vec<Converted>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<Vec<Converted>> {
                    let mut done = Vec::new();
                    loop {
                        let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(info) = infos.get(i) else {
                            return Ok(done);
                        };
                        if let Some(t) = convert(info)? {
                            done.push(t);
                        }
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(Error::GgufFormat {
                        path: file.path().to_path_buf(),
                        offset: 0,
                        reason: "a dequantisation worker panicked".into(),
                    })
                })
            })
            .collect()
    });
    let mut map = HashMap::new();
    let mut blocks = Vec::new();
    for r in results {
        for (name, t, b) in r? {
            if let Some(b) = b {
                blocks.push((name.clone(), b));
            }
            map.insert(name, t);
        }
    }
    let mut weights = Weights::from_map(map, file.path());
    for (name, b) in blocks {
        if opts.linear_weights == LinearWeights::Int4 {
            weights.set_int4(&name, b);
        } else {
            weights.set_codes(&name, WeightCodes::Q4(b));
        }
    }
    if opts.linear_weights == LinearWeights::Int4 && opts.device == Device::Cpu {
        if let Some(head) = gguf_q8_0_head(file)? {
            weights.set_int8("lm_head.weight", head);
        }
    } else if panel_codes {
        if let Some(head) = gguf_q8_0_head(file)? {
            weights.set_codes("lm_head.weight", WeightCodes::Q8(std::sync::Arc::new(head)));
        }
    }
    Ok(weights)
}

/// The output head's own Q8_0 blocks (`output.weight`, or `token_embd.weight` when the
/// embeddings are tied), for the 8-bit CPU kernel; `None` when it is stored otherwise or the
/// CPU lacks the kernel.
fn gguf_q8_0_head(file: &GgufFile) -> Result<Option<crate::cpu_kernels::Int8F32Weight>> {
    let infos = &file.header.tensors;
    let info = infos
        .iter()
        .find(|t| t.name == "output.weight")
        .or_else(|| infos.iter().find(|t| t.name == "token_embd.weight"));
    let Some(info) = info else {
        return Ok(None);
    };
    let Some(((q, scale), shape)) = file.q8_0_tensor(info)? else {
        return Ok(None);
    };
    let (rows, cols) = match shape[..] {
        [r, c] => (r as usize, c as usize),
        _ => {
            return Err(Error::GgufTensor {
                path: file.path().to_path_buf(),
                tensor: info.name.clone(),
                reason: format!("expected a 2-d head, found shape {shape:?}"),
            })
        }
    };
    Ok(crate::cpu_kernels::Int8F32Weight::new(q, scale, rows, cols))
}

/// Load a GGUF file: weights dequantised (then cast to the requested dtype),
/// config from metadata, tokenizer rebuilt from metadata.
pub fn load_gguf(path: &Path, opts: &LoadOptions) -> Result<LoadedModel> {
    let file = GgufFile::open(path)?;
    let config = gguf_config(&file)?;
    let tokenizer = Tokenizer::from_gguf(&file.header, path)?;
    let weights = gguf_weights(&file, &config, opts)?;
    let required = "model.embed_tokens.weight";
    if !weights.contains(required) {
        return Err(Error::MissingTensor {
            path: path.to_path_buf(),
            tensor: "token_embd.weight".into(),
        });
    }
    Ok(LoadedModel {
        config,
        weights,
        tokenizer,
        source: path.to_path_buf(),
    })
}
