//! Hugging Face model folders: `config.json`, and weights in `model.safetensors`
//! or shards listed by `model.safetensors.index.json`, memory-mapped.
use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};
use tch::{Device, Kind, Tensor};

use crate::config::ModelConfig;
use crate::weights::Weights;
use crate::{Error, Result};

/// File name of a single-file checkpoint.
pub const SAFETENSORS_FILE: &str = "model.safetensors";
/// File name of a sharded checkpoint's index.
pub const SAFETENSORS_INDEX_FILE: &str = "model.safetensors.index.json";
/// File name of the model config.
pub const CONFIG_FILE: &str = "config.json";

fn io_err(path: &Path) -> impl Fn(std::io::Error) -> Error + '_ {
    move |source| Error::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Read and parse `dir/config.json`.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join(CONFIG_FILE);
    let text = std::fs::read_to_string(&path).map_err(io_err(&path))?;
    ModelConfig::from_json_str(&text, &path)
}

/// The safetensors files of a folder: `model.safetensors`, or the shards named by
/// `model.safetensors.index.json` (sorted, deduplicated).
pub fn safetensors_files(dir: &Path) -> Result<Vec<PathBuf>> {
    let single = dir.join(SAFETENSORS_FILE);
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join(SAFETENSORS_INDEX_FILE);
    if !index.is_file() {
        return Err(Error::Safetensors {
            path: dir.to_path_buf(),
            reason: format!(
                "neither {SAFETENSORS_FILE} nor {SAFETENSORS_INDEX_FILE} in the folder"
            ),
        });
    }
    let text = std::fs::read_to_string(&index).map_err(io_err(&index))?;
    #[derive(serde::Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let parsed: Index = serde_json::from_str(&text).map_err(|e| Error::Safetensors {
        path: index.clone(),
        reason: format!("bad shard index: {e}"),
    })?;
    let mut files: Vec<PathBuf> = parsed.weight_map.values().map(|f| dir.join(f)).collect();
    files.sort();
    files.dedup();
    Ok(files)
}

fn kind_of(dtype: Dtype) -> Option<Kind> {
    Some(match dtype {
        Dtype::F32 => Kind::Float,
        Dtype::F16 => Kind::Half,
        Dtype::BF16 => Kind::BFloat16,
        Dtype::F64 => Kind::Double,
        Dtype::I64 => Kind::Int64,
        Dtype::I32 => Kind::Int,
        Dtype::I16 => Kind::Int16,
        Dtype::I8 => Kind::Int8,
        Dtype::U8 => Kind::Uint8,
        Dtype::BOOL => Kind::Bool,
        _ => return None,
    })
}

/// Load every tensor of one safetensors file (memory-mapped), converting floating
/// tensors to `dtype` and placing them on `device`.
pub fn load_safetensors_file(
    path: &Path,
    device: Device,
    dtype: Kind,
    out: &mut HashMap<String, Tensor>,
) -> Result<()> {
    let file = std::fs::File::open(path).map_err(io_err(path))?;
    // SAFETY: read-only map of a checkpoint that is not modified while loading.
    let mmap = unsafe { Mmap::map(&file) }.map_err(io_err(path))?;
    let st = SafeTensors::deserialize(&mmap).map_err(|e| Error::Safetensors {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    for (name, view) in st.iter() {
        let kind = kind_of(view.dtype()).ok_or_else(|| Error::Safetensors {
            path: path.to_path_buf(),
            reason: format!("tensor {name:?}: unsupported dtype {:?}", view.dtype()),
        })?;
        let shape: Vec<i64> = view.shape().iter().map(|&d| d as i64).collect();
        let t = Tensor::f_from_data_size(view.data(), &shape, kind)?;
        let t = if matches!(
            kind,
            Kind::Float | Kind::Half | Kind::BFloat16 | Kind::Double
        ) {
            t.to_device(device).to_kind(dtype)
        } else {
            t.to_device(device)
        };
        out.insert(name.to_string(), t);
    }
    Ok(())
}

/// Load the weights of an HF folder (single file or sharded).
pub fn load_weights(dir: &Path, device: Device, dtype: Kind) -> Result<Weights> {
    let _span = tracing::info_span!("load_hf_weights", dir = %dir.display()).entered();
    let mut map = HashMap::new();
    for f in safetensors_files(dir)? {
        load_safetensors_file(&f, device, dtype, &mut map)?;
    }
    Ok(Weights::from_map(map, dir))
}
