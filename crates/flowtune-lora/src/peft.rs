//! PEFT-format files: `adapter_config.json` + `adapter_model.safetensors`.

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, SafeTensors};
use tch::{Kind, Tensor};

use crate::bank::{AdapterBank, AdapterId, LoraWeights};
use crate::config::LoraConfig;
use crate::error::{LoraError, Result};
use crate::site::{Factor, Site};

/// File name of the adapter config in a PEFT adapter folder.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter weights in a PEFT adapter folder.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> LoraError + '_ {
    move |source| LoraError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Writes `bytes` to `path` atomically: a temp file in the same folder, synced, then renamed.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or_else(|| Path::new("."));
    let file_name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = dir.join(format!(".{file_name}.tmp{}", std::process::id()));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io_err(&tmp))?;
        f.write_all(bytes).map_err(io_err(&tmp))?;
        f.sync_all().map_err(io_err(&tmp))?;
        std::fs::rename(&tmp, path).map_err(io_err(path))
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// Reads and validates `adapter_config.json` from a PEFT adapter folder.
pub fn read_config(dir: &Path) -> Result<LoraConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    let config: LoraConfig =
        serde_json::from_str(&text).map_err(|source| LoraError::ConfigJson {
            path: path.clone(),
            source,
        })?;
    config.validate()?;
    Ok(config)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    match dtype {
        Dtype::F32 => Some(Kind::Float),
        Dtype::F16 => Some(Kind::Half),
        Dtype::BF16 => Some(Kind::BFloat16),
        Dtype::F64 => Some(Kind::Double),
        _ => None,
    }
}

fn dtype_of(kind: Kind) -> Option<Dtype> {
    match kind {
        Kind::Float => Some(Dtype::F32),
        Kind::Half => Some(Dtype::F16),
        Kind::BFloat16 => Some(Dtype::BF16),
        Kind::Double => Some(Dtype::F64),
        _ => None,
    }
}

fn to_bytes(t: &Tensor) -> Result<Vec<u8>> {
    let t = t
        .f_detach()?
        .f_to_device(tch::Device::Cpu)?
        .f_contiguous()?;
    let numel = t.numel();
    let mut buf = vec![0u8; numel * t.kind().elt_size_in_bytes()];
    t.f_copy_data_u8(&mut buf, numel)?;
    Ok(buf)
}

impl AdapterBank {
    /// Loads a PEFT adapter folder as adapter `name`. Every targeted site of the base must have
    /// both factors with shapes `[r, in]` / `[out, r]`; any other key is an error naming it.
    pub fn load_peft(&mut self, name: &str, dir: impl AsRef<Path>) -> Result<AdapterId> {
        let dir = dir.as_ref();
        let _span =
            tracing::debug_span!("lora_load_peft", adapter = name, dir = %dir.display()).entered();
        if self.id(name).is_ok() {
            return Err(LoraError::AdapterExists { name: name.into() });
        }
        let config = read_config(dir)?;
        let path: PathBuf = dir.join(WEIGHTS_FILE);
        let bytes = std::fs::read(&path).map_err(io_err(&path))?;
        let st = SafeTensors::deserialize(&bytes).map_err(|e| LoraError::SafeTensors {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let targets = config.target_sites(self.base_shapes());
        if targets.is_empty() {
            return Err(LoraError::NoTargetSites { name: name.into() });
        }
        let mut found: BTreeMap<(Site, Factor), Tensor> = BTreeMap::new();
        let mut names: Vec<String> = st.names().into_iter().map(str::to_string).collect();
        names.sort();
        for key in names {
            let unexpected = |reason: &str| LoraError::UnexpectedKey {
                path: path.clone(),
                key: key.clone(),
                reason: reason.into(),
            };
            let (site, factor) = Site::parse_peft_key(&key)
                .ok_or_else(|| unexpected("not a lora_A/lora_B weight of a decoder layer"))?;
            let Some(shape) = self.base_shapes().get(&site).copied() else {
                return Err(unexpected("the base model has no such layer"));
            };
            if !config.targets(&site) {
                return Err(unexpected("site not covered by target_modules"));
            }
            let view = st.tensor(&key).map_err(|e| LoraError::SafeTensors {
                path: path.clone(),
                reason: format!("{key}: {e}"),
            })?;
            let kind = kind_of(view.dtype()).ok_or_else(|| LoraError::UnsupportedDtype {
                path: path.clone(),
                key: key.clone(),
                dtype: format!("{:?}", view.dtype()),
            })?;
            let dims: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
            let r = config.r as i64;
            let expected = match factor {
                Factor::A => vec![r, shape.in_features as i64],
                Factor::B => vec![shape.out_features as i64, r],
            };
            if dims != expected {
                return Err(LoraError::ShapeMismatch {
                    key,
                    expected,
                    found: dims,
                });
            }
            let t = Tensor::f_from_data_size(view.data(), &dims, kind)?
                .f_to_dtype(self.kind(), false, true)?
                .f_to_device(self.device())?;
            if found.insert((site, factor), t).is_some() {
                return Err(unexpected("duplicate (with and without adapter name)"));
            }
        }
        let mut weights = BTreeMap::new();
        for site in targets {
            let mut take = |f: Factor| {
                found
                    .remove(&(site, f))
                    .ok_or_else(|| LoraError::MissingKey {
                        path: path.clone(),
                        key: site.peft_key(f),
                    })
            };
            let a = take(Factor::A)?;
            let b = take(Factor::B)?;
            weights.insert(site, LoraWeights { a, b });
        }
        self.add_with_weights(name, config, weights)
    }

    /// Saves adapter `name` as a PEFT folder (created if needed): `adapter_config.json` and
    /// `adapter_model.safetensors` with PEFT's keys (no adapter name), each written atomically.
    pub fn save_peft(&self, name: &str, dir: impl AsRef<Path>) -> Result<()> {
        let dir = dir.as_ref();
        let _span =
            tracing::debug_span!("lora_save_peft", adapter = name, dir = %dir.display()).entered();
        let adapter = self.get(name)?;
        std::fs::create_dir_all(dir).map_err(io_err(dir))?;
        let mut buffers: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
        for (key, t) in adapter.named_tensors() {
            let dtype = dtype_of(t.kind()).ok_or_else(|| LoraError::UnsupportedDtype {
                path: dir.join(WEIGHTS_FILE),
                key: key.clone(),
                dtype: format!("{:?}", t.kind()),
            })?;
            let shape = t.size().iter().map(|&d| d as usize).collect();
            buffers.push((key, shape, dtype, to_bytes(&t)?));
        }
        let weights_path = dir.join(WEIGHTS_FILE);
        let views = buffers
            .iter()
            .map(|(k, shape, dtype, data)| {
                safetensors::tensor::TensorView::new(*dtype, shape.clone(), data)
                    .map(|v| (k.clone(), v))
            })
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| LoraError::SafeTensors {
                path: weights_path.clone(),
                reason: e.to_string(),
            })?;
        let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
        let bytes =
            safetensors::serialize(views, Some(metadata)).map_err(|e| LoraError::SafeTensors {
                path: weights_path.clone(),
                reason: e.to_string(),
            })?;
        let config_path = dir.join(CONFIG_FILE);
        let json = serde_json::to_vec_pretty(adapter.config()).map_err(|source| {
            LoraError::ConfigJson {
                path: config_path.clone(),
                source,
            }
        })?;
        write_atomic(&weights_path, &bytes)?;
        write_atomic(&config_path, &json)?;
        Ok(())
    }
}
