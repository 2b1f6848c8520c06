//! GGUF files: header, metadata, tensor infos, dequantisation, and the mapping of
//! llama.cpp tensor names and metadata keys to their Hugging Face counterparts.
//!
//! The layout follows ggml's `docs/gguf.md`: a little-endian header (magic `GGUF`,
//! version 2 or 3), `kv_count` metadata entries, `tensor_count` tensor infos, padding
//! to `general.alignment` (32 by default), then the tensor data. Quantised block
//! layouts (Q8_0, Q4_0, Q4_1) are those of ggml's `ggml-quants.c`.
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use memmap2::Mmap;
use serde_json::{json, Map, Value as Json};

use crate::{Error, Result};

/// The four bytes every GGUF file starts with.
pub const GGUF_MAGIC: &[u8; 4] = b"GGUF";
/// Alignment of the tensor data when `general.alignment` is absent.
pub const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value, with GGUF's value types.
#[derive(Debug, Clone, PartialEq)]
pub enum GgufValue {
    /// Type 0.
    U8(u8),
    /// Type 1.
    I8(i8),
    /// Type 2.
    U16(u16),
    /// Type 3.
    I16(i16),
    /// Type 4.
    U32(u32),
    /// Type 5.
    I32(i32),
    /// Type 6.
    F32(f32),
    /// Type 7.
    Bool(bool),
    /// Type 8 (UTF-8).
    String(String),
    /// Type 9: an array of values of one type.
    Array(Vec<GgufValue>),
    /// Type 10.
    U64(u64),
    /// Type 11.
    I64(i64),
    /// Type 12.
    F64(f64),
}

impl GgufValue {
    /// The value as an unsigned integer, when it is a non-negative integer.
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            GgufValue::U8(v) => Some(v.into()),
            GgufValue::U16(v) => Some(v.into()),
            GgufValue::U32(v) => Some(v.into()),
            GgufValue::U64(v) => Some(v),
            GgufValue::I8(v) => u64::try_from(v).ok(),
            GgufValue::I16(v) => u64::try_from(v).ok(),
            GgufValue::I32(v) => u64::try_from(v).ok(),
            GgufValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    /// The value as a signed integer, when it is an integer that fits.
    pub fn as_i64(&self) -> Option<i64> {
        match *self {
            GgufValue::I8(v) => Some(v.into()),
            GgufValue::I16(v) => Some(v.into()),
            GgufValue::I32(v) => Some(v.into()),
            GgufValue::I64(v) => Some(v),
            _ => self.as_u64().and_then(|v| i64::try_from(v).ok()),
        }
    }

    /// The value as a float, when it is a number.
    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            GgufValue::F32(v) => Some(v.into()),
            GgufValue::F64(v) => Some(v),
            _ => self.as_i64().map(|v| v as f64),
        }
    }

    /// The value as a string slice, when it is a string.
    pub fn as_str(&self) -> Option<&str> {
        match self {
            GgufValue::String(s) => Some(s),
            _ => None,
        }
    }

    /// The value as a bool, when it is one.
    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            GgufValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// The elements, when the value is an array.
    pub fn as_array(&self) -> Option<&[GgufValue]> {
        match self {
            GgufValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// A JSON rendering (arrays longer than `max_array` are summarised by their length).
    pub fn to_json(&self, max_array: usize) -> Json {
        match self {
            GgufValue::U8(v) => json!(v),
            GgufValue::I8(v) => json!(v),
            GgufValue::U16(v) => json!(v),
            GgufValue::I16(v) => json!(v),
            GgufValue::U32(v) => json!(v),
            GgufValue::I32(v) => json!(v),
            GgufValue::F32(v) => json!(f64::from(*v)),
            GgufValue::Bool(v) => json!(v),
            GgufValue::String(v) => json!(v),
            GgufValue::U64(v) => json!(v),
            GgufValue::I64(v) => json!(v),
            GgufValue::F64(v) => json!(v),
            GgufValue::Array(v) if v.len() > max_array => json!({ "array_len": v.len() }),
            GgufValue::Array(v) => Json::Array(v.iter().map(|x| x.to_json(max_array)).collect()),
        }
    }
}

/// The ggml tensor types this crate knows by name (dequantisable or not).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GgmlType {
    /// 32-bit float.
    F32,
    /// IEEE half.
    F16,
    /// bfloat16.
    BF16,
    /// Blocks of 32: f16 scale, 32 × i8.
    Q8_0,
    /// Blocks of 32: f16 scale, 16 bytes of 4-bit values offset by 8.
    Q4_0,
    /// Blocks of 32: f16 scale, f16 minimum, 16 bytes of 4-bit values.
    Q4_1,
}

impl GgmlType {
    /// The type for ggml's numeric id, or `None` for one not supported here.
    pub fn from_id(id: u32) -> Option<Self> {
        match id {
            0 => Some(GgmlType::F32),
            1 => Some(GgmlType::F16),
            2 => Some(GgmlType::Q4_0),
            3 => Some(GgmlType::Q4_1),
            8 => Some(GgmlType::Q8_0),
            30 => Some(GgmlType::BF16),
            _ => None,
        }
    }

    /// ggml's numeric id.
    pub fn id(self) -> u32 {
        match self {
            GgmlType::F32 => 0,
            GgmlType::F16 => 1,
            GgmlType::Q4_0 => 2,
            GgmlType::Q4_1 => 3,
            GgmlType::Q8_0 => 8,
            GgmlType::BF16 => 30,
        }
    }

    /// Elements per block.
    pub fn block_elems(self) -> u64 {
        match self {
            GgmlType::F32 | GgmlType::F16 | GgmlType::BF16 => 1,
            GgmlType::Q8_0 | GgmlType::Q4_0 | GgmlType::Q4_1 => 32,
        }
    }

    /// Bytes per block.
    pub fn block_bytes(self) -> u64 {
        match self {
            GgmlType::F32 => 4,
            GgmlType::F16 | GgmlType::BF16 => 2,
            GgmlType::Q8_0 => 34,
            GgmlType::Q4_0 => 18,
            GgmlType::Q4_1 => 20,
        }
    }
}

/// ggml's name for a type id (for messages), e.g. `Q4_K` for 12.
pub fn ggml_type_name(id: u32) -> &'static str {
    const NAMES: [&str; 40] = [
        "F32",
        "F16",
        "Q4_0",
        "Q4_1",
        "Q4_2",
        "Q4_3",
        "Q5_0",
        "Q5_1",
        "Q8_0",
        "Q8_1",
        "Q2_K",
        "Q3_K",
        "Q4_K",
        "Q5_K",
        "Q6_K",
        "Q8_K",
        "IQ2_XXS",
        "IQ2_XS",
        "IQ3_XXS",
        "IQ1_S",
        "IQ4_NL",
        "IQ3_S",
        "IQ2_S",
        "IQ4_XS",
        "I8",
        "I16",
        "I32",
        "I64",
        "F64",
        "IQ1_M",
        "BF16",
        "Q4_0_4_4",
        "Q4_0_4_8",
        "Q4_0_8_8",
        "TQ1_0",
        "TQ2_0",
        "IQ4_NL_4_4",
        "IQ4_NL_4_8",
        "IQ4_NL_8_8",
        "MXFP4",
    ];
    NAMES.get(id as usize).copied().unwrap_or("unknown")
}

/// One tensor's description in the file.
#[derive(Debug, Clone, PartialEq)]
pub struct GgufTensorInfo {
    /// llama.cpp name, e.g. `blk.0.attn_q.weight`.
    pub name: String,
    /// Dimensions in ggml order (`ne[0]` is the contiguous one: columns).
    pub dims: Vec<u64>,
    /// ggml type id (see [`GgmlType::from_id`]).
    pub type_id: u32,
    /// Offset from the start of the data section.
    pub offset: u64,
}

impl GgufTensorInfo {
    /// Number of elements.
    pub fn n_elements(&self) -> u64 {
        self.dims.iter().product()
    }

    /// Shape in row-major (PyTorch) order: ggml dims reversed.
    pub fn shape(&self) -> Vec<i64> {
        self.dims.iter().rev().map(|&d| d as i64).collect()
    }
}

/// The parsed front matter of a GGUF file (everything but the tensor data).
#[derive(Debug, Clone, PartialEq)]
pub struct GgufHeader {
    /// Format version (2 or 3).
    pub version: u32,
    /// Metadata in file order.
    pub metadata: BTreeMap<String, GgufValue>,
    /// Tensor infos in file order.
    pub tensors: Vec<GgufTensorInfo>,
    /// Absolute offset of the data section.
    pub data_offset: u64,
    /// The data alignment.
    pub alignment: u64,
}

struct Cursor<'a> {
    bytes: &'a [u8],
    pos: usize,
    path: &'a Path,
}

impl<'a> Cursor<'a> {
    fn err(&self, what: impl Into<String>) -> Error {
        Error::GgufFormat {
            path: self.path.to_path_buf(),
            offset: self.pos as u64,
            reason: what.into(),
        }
    }

    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        match end {
            Some(end) => {
                let s = &self.bytes[self.pos..end];
                self.pos = end;
                Ok(s)
            }
            None => Err(self.err(format!(
                "truncated: {what} needs {n} bytes, {} left",
                self.bytes.len() - self.pos
            ))),
        }
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    fn len(&mut self, what: &str) -> Result<usize> {
        let n = self.u64(what)?;
        usize::try_from(n)
            .map_err(|_| self.err(format!("{what}: length {n} does not fit in memory")))
    }

    fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what)?;
        let start = self.pos;
        let s = self.take(n, what)?;
        String::from_utf8(s.to_vec()).map_err(|e| Error::GgufFormat {
            path: self.path.to_path_buf(),
            offset: start as u64,
            reason: format!("{what}: invalid UTF-8: {e}"),
        })
    }

    fn value(&mut self, type_id: u32, key: &str, depth: usize) -> Result<GgufValue> {
        Ok(match type_id {
            0 => GgufValue::U8(self.array::<1>(key)?[0]),
            1 => GgufValue::I8(i8::from_le_bytes(self.array(key)?)),
            2 => GgufValue::U16(u16::from_le_bytes(self.array(key)?)),
            3 => GgufValue::I16(i16::from_le_bytes(self.array(key)?)),
            4 => GgufValue::U32(u32::from_le_bytes(self.array(key)?)),
            5 => GgufValue::I32(i32::from_le_bytes(self.array(key)?)),
            6 => GgufValue::F32(f32::from_le_bytes(self.array(key)?)),
            7 => {
                let b = self.array::<1>(key)?[0];
                match b {
                    0 => GgufValue::Bool(false),
                    1 => GgufValue::Bool(true),
                    _ => return Err(self.err(format!("metadata `{key}`: bool byte {b}"))),
                }
            }
            8 => GgufValue::String(self.string(key)?),
            9 => {
                if depth > 0 {
                    return Err(
                        self.err(format!("metadata `{key}`: nested arrays are not supported"))
                    );
                }
                let elem_type = self.u32(key)?;
                let n = self.len(key)?;
                // Every element takes at least one byte: never reserve more than what is left.
                let mut items =
                    Vec::with_capacity(n.min(self.bytes.len().saturating_sub(self.pos)));
                for _ in 0..n {
                    items.push(self.value(elem_type, key, depth + 1)?);
                }
                GgufValue::Array(items)
            }
            10 => GgufValue::U64(u64::from_le_bytes(self.array(key)?)),
            11 => GgufValue::I64(i64::from_le_bytes(self.array(key)?)),
            12 => GgufValue::F64(f64::from_le_bytes(self.array(key)?)),
            t => return Err(self.err(format!("metadata `{key}`: unknown value type {t}"))),
        })
    }
}

/// Parse the header, metadata and tensor infos of GGUF bytes; `path` names the file
/// in errors. Checks that every tensor's data lies within `bytes`. Never panics.
pub fn parse_header(bytes: &[u8], path: &Path) -> Result<GgufHeader> {
    let mut c = Cursor {
        bytes,
        pos: 0,
        path,
    };
    let magic = c.array::<4>("magic")?;
    if &magic != GGUF_MAGIC {
        return Err(Error::GgufFormat {
            path: path.to_path_buf(),
            offset: 0,
            reason: format!("not a GGUF file (magic {magic:02x?})"),
        });
    }
    let version = c.u32("version")?;
    if !(2..=3).contains(&version) {
        return Err(c.err(format!("unsupported GGUF version {version} (2 and 3 are)")));
    }
    let n_tensors = c.u64("tensor_count")?;
    let n_kv = c.u64("kv_count")?;
    let mut metadata = BTreeMap::new();
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let t = c.u32(&key)?;
        let v = c.value(t, &key, 0)?;
        metadata.insert(key, v);
    }
    let mut tensors = Vec::with_capacity((n_tensors as usize).min(bytes.len() / 24 + 1));
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32(&name)?;
        if n_dims > 4 {
            return Err(c.err(format!("tensor `{name}`: {n_dims} dimensions (at most 4)")));
        }
        let mut dims = Vec::with_capacity(n_dims as usize);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        let type_id = c.u32(&name)?;
        let offset = c.u64(&name)?;
        tensors.push(GgufTensorInfo {
            name,
            dims,
            type_id,
            offset,
        });
    }
    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(Error::GgufMetadata {
                    path: path.to_path_buf(),
                    key: "general.alignment".into(),
                    reason: format!("{v:?} is not a positive power of two"),
                })
            }
        },
    };
    let pos = c.pos as u64;
    let data_offset = pos.div_ceil(alignment) * alignment;
    let header = GgufHeader {
        version,
        metadata,
        tensors,
        data_offset,
        alignment,
    };
    for t in &header.tensors {
        header.tensor_byte_range(t, bytes.len() as u64, path)?;
    }
    Ok(header)
}

impl GgufHeader {
    /// Absolute byte range of a tensor's data, checked against the file length and
    /// the type's block size. Unknown types give [`Error::GgufUnsupportedType`].
    pub fn tensor_byte_range(
        &self,
        t: &GgufTensorInfo,
        file_len: u64,
        path: &Path,
    ) -> Result<std::ops::Range<usize>> {
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| Error::GgufUnsupportedType {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            type_id: t.type_id,
            type_name: ggml_type_name(t.type_id).into(),
        })?;
        let bad = |reason: String| Error::GgufTensor {
            path: path.to_path_buf(),
            tensor: t.name.clone(),
            reason,
        };
        let n = t
            .dims
            .iter()
            .try_fold(1u64, |a, &d| a.checked_mul(d))
            .ok_or_else(|| bad(format!("dimensions {:?} overflow", t.dims)))?;
        if n % ty.block_elems() != 0 {
            return Err(bad(format!(
                "{n} elements is not a multiple of the {:?} block size",
                ty
            )));
        }
        let size = (n / ty.block_elems())
            .checked_mul(ty.block_bytes())
            .ok_or_else(|| bad("byte size overflows".into()))?;
        let start = self
            .data_offset
            .checked_add(t.offset)
            .ok_or_else(|| bad("offset overflows".into()))?;
        let end = start
            .checked_add(size)
            .ok_or_else(|| bad("offset overflows".into()))?;
        if end > file_len {
            return Err(bad(format!(
                "data [{start}, {end}) extends past the end of the file ({file_len} bytes): truncated file?"
            )));
        }
        let conv =
            |v: u64| usize::try_from(v).map_err(|_| bad("offset does not fit in memory".into()));
        Ok(conv(start)?..conv(end)?)
    }

    /// A metadata value by key.
    pub fn get(&self, key: &str) -> Option<&GgufValue> {
        self.metadata.get(key)
    }

    /// `general.architecture`.
    pub fn architecture(&self, path: &Path) -> Result<&str> {
        self.get("general.architecture")
            .and_then(GgufValue::as_str)
            .ok_or_else(|| Error::GgufMetadata {
                path: path.to_path_buf(),
                key: "general.architecture".into(),
                reason: "missing or not a string".into(),
            })
    }
}

/// Dequantise `n` elements of ggml type `ty` from `data` into f32. `data` must hold
/// exactly `n / block_elems * block_bytes` bytes.
pub fn dequantize(ty: GgmlType, data: &[u8], n: usize) -> std::result::Result<Vec<f32>, String> {
    let be = ty.block_elems() as usize;
    let bb = ty.block_bytes() as usize;
    if !n.is_multiple_of(be) || data.len() != n / be * bb {
        return Err(format!(
            "{ty:?}: {} bytes for {n} elements (expected {})",
            data.len(),
            n / be * bb
        ));
    }
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let mut out = Vec::with_capacity(n);
    match ty {
        GgmlType::F32 => out.extend(
            data.chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])),
        ),
        GgmlType::F16 => out.extend(
            data.chunks_exact(2)
                .map(|c| f16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::BF16 => out.extend(
            data.chunks_exact(2)
                .map(|c| bf16::from_le_bytes([c[0], c[1]]).to_f32()),
        ),
        GgmlType::Q8_0 => {
            for b in data.chunks_exact(bb) {
                let d = f16_at(b, 0);
                out.extend(b[2..34].iter().map(|&q| d * f32::from(q as i8)));
            }
        }
        GgmlType::Q4_0 => {
            for b in data.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let qs = &b[2..18];
                out.extend(qs.iter().map(|&q| f32::from((q & 0x0f) as i8 - 8) * d));
                out.extend(qs.iter().map(|&q| f32::from((q >> 4) as i8 - 8) * d));
            }
        }
        GgmlType::Q4_1 => {
            for b in data.chunks_exact(bb) {
                let d = f16_at(b, 0);
                let m = f16_at(b, 2);
                let qs = &b[4..20];
                out.extend(qs.iter().map(|&q| f32::from(q & 0x0f) * d + m));
                out.extend(qs.iter().map(|&q| f32::from(q >> 4) * d + m));
            }
        }
    }
    Ok(out)
}

/// The block size of `ty` after checking that `data` holds exactly the blocks of `n` elements
/// (32 per block).
fn block_bytes_for(ty: GgmlType, data: &[u8], n: usize) -> std::result::Result<usize, String> {
    let bb = ty.block_bytes() as usize;
    if !n.is_multiple_of(32) || data.len() != n / 32 * bb {
        return Err(format!(
            "{ty:?}: {} bytes for {n} elements (expected {})",
            data.len(),
            n / 32 * bb
        ));
    }
    Ok(bb)
}

/// 4-bit codes with one scale and one minimum per 32-element block.
pub type Q4Blocks = (Vec<u8>, Vec<f32>, Vec<f32>);

/// The codes and per-block scales and minima of `n` elements of a Q4_0 or Q4_1 tensor, so that
/// `w = scale * q + min` for each element of a 32-element block (Q4_0: `min = -8 * scale`), in
/// row-major order; `None` for other types. [`dequantize`] computes exactly these products.
pub fn q4_blocks(
    ty: GgmlType,
    data: &[u8],
    n: usize,
) -> std::result::Result<Option<Q4Blocks>, String> {
    if !matches!(ty, GgmlType::Q4_0 | GgmlType::Q4_1) {
        return Ok(None);
    }
    let bb = block_bytes_for(ty, data, n)?;
    let f16_at = |b: &[u8], i: usize| f16::from_le_bytes([b[i], b[i + 1]]).to_f32();
    let (mut q, mut scale, mut min) = (
        Vec::with_capacity(n),
        Vec::with_capacity(n / 32),
        Vec::with_capacity(n / 32),
    );
    for b in data.chunks_exact(bb) {
        let d = f16_at(b, 0);
        let (m, qs) = match ty {
            GgmlType::Q4_0 => (-8.0 * d, &b[2..18]),
            _ => (f16_at(b, 2), &b[4..20]),
        };
        scale.push(d);
        min.push(m);
        q.extend(qs.iter().map(|&x| x & 0x0f));
        q.extend(qs.iter().map(|&x| x >> 4));
    }
    Ok(Some((q, scale, min)))
}

/// A Q8_0 tensor's signed 8-bit codes (one per element, file order) and float32 scales (one
/// per 32 elements): element `i` is `scale[i / 32] * q[i]`, exactly ggml's dequantisation.
pub type Q8Blocks = (Vec<i8>, Vec<f32>);

/// The codes and scales of Q8_0 data of `n` elements; `None` for other types.
pub fn q8_0_blocks(
    ty: GgmlType,
    data: &[u8],
    n: usize,
) -> std::result::Result<Option<Q8Blocks>, String> {
    if ty != GgmlType::Q8_0 {
        return Ok(None);
    }
    let bb = block_bytes_for(ty, data, n)?;
    let (mut q, mut scale) = (Vec::with_capacity(n), Vec::with_capacity(n / 32));
    for b in data.chunks_exact(bb) {
        scale.push(f16::from_le_bytes([b[0], b[1]]).to_f32());
        q.extend(b[2..34].iter().map(|&x| x as i8));
    }
    Ok(Some((q, scale)))
}

/// A memory-mapped GGUF file with its parsed header.
pub struct GgufFile {
    path: PathBuf,
    mmap: Mmap,
    /// The parsed header.
    pub header: GgufHeader,
}

impl std::fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.header.version)
            .field("tensors", &self.header.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Open and memory-map a GGUF file, parsing its header.
    pub fn open(path: &Path) -> Result<Self> {
        let io = |source| Error::Io {
            path: path.to_path_buf(),
            source,
        };
        let file = std::fs::File::open(path).map_err(io)?;
        // SAFETY: the map is read-only; the file is not expected to change while
        // mapped (the same assumption as llama.cpp and safetensors make).
        let mmap = unsafe { Mmap::map(&file) }.map_err(io)?;
        let header = parse_header(&mmap, path)?;
        Ok(GgufFile {
            path: path.to_path_buf(),
            mmap,
            header,
        })
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The tensor info by llama.cpp name.
    pub fn tensor_info(&self, name: &str) -> Result<&GgufTensorInfo> {
        self.header
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| Error::MissingTensor {
                path: self.path.clone(),
                tensor: name.into(),
            })
    }

    /// Raw bytes of a tensor's data.
    pub fn tensor_bytes(&self, t: &GgufTensorInfo) -> Result<&[u8]> {
        let r = self
            .header
            .tensor_byte_range(t, self.mmap.len() as u64, &self.path)?;
        Ok(&self.mmap[r])
    }

    /// A tensor dequantised to f32 (row-major, in the file's layout: no renaming or
    /// permutation), with its row-major shape.
    pub fn dequantize_tensor(&self, t: &GgufTensorInfo) -> Result<(Vec<f32>, Vec<i64>)> {
        let bytes = self.tensor_bytes(t)?;
        let ty = GgmlType::from_id(t.type_id).ok_or_else(|| Error::GgufUnsupportedType {
            path: self.path.clone(),
            tensor: t.name.clone(),
            type_id: t.type_id,
            type_name: ggml_type_name(t.type_id).into(),
        })?;
        let n = usize::try_from(t.n_elements()).map_err(|_| Error::GgufTensor {
            path: self.path.clone(),
            tensor: t.name.clone(),
            reason: "too many elements".into(),
        })?;
        let data = dequantize(ty, bytes, n).map_err(|reason| Error::GgufTensor {
            path: self.path.clone(),
            tensor: t.name.clone(),
            reason,
        })?;
        Ok((data, t.shape()))
    }

    /// A Q4_0/Q4_1 tensor's codes, scales and minima (see [`q4_blocks`]) in the file's layout,
    /// with its row-major shape; `None` for other types.
    pub fn q4_tensor(&self, t: &GgufTensorInfo) -> Result<Option<(Q4Blocks, Vec<i64>)>> {
        let Some(ty) = GgmlType::from_id(t.type_id) else {
            return Ok(None);
        };
        let bytes = self.tensor_bytes(t)?;
        let n = usize::try_from(t.n_elements()).map_err(|_| Error::GgufTensor {
            path: self.path.clone(),
            tensor: t.name.clone(),
            reason: "too many elements".into(),
        })?;
        let blocks = q4_blocks(ty, bytes, n).map_err(|reason| Error::GgufTensor {
            path: self.path.clone(),
            tensor: t.name.clone(),
            reason,
        })?;
        Ok(blocks.map(|b| (b, t.shape())))
    }

    /// A Q8_0 tensor's codes and scales (see [`q8_0_blocks`]) with its row-major shape; `None`
    /// for other types.
    pub fn q8_0_tensor(&self, t: &GgufTensorInfo) -> Result<Option<(Q8Blocks, Vec<i64>)>> {
        let Some(ty) = GgmlType::from_id(t.type_id) else {
            return Ok(None);
        };
        let bytes = self.tensor_bytes(t)?;
        let err = |reason: String| Error::GgufTensor {
            path: self.path.clone(),
            tensor: t.name.clone(),
            reason,
        };
        let n = usize::try_from(t.n_elements()).map_err(|_| err("too many elements".into()))?;
        let blocks = q8_0_blocks(ty, bytes, n).map_err(err)?;
        Ok(blocks.map(|b| (b, t.shape())))
    }

    /// A metadata value by key, or a typed error naming the key.
    pub fn require(&self, key: &str) -> Result<&GgufValue> {
        self.header.get(key).ok_or_else(|| Error::GgufMetadata {
            path: self.path.clone(),
            key: key.into(),
            reason: "missing".into(),
        })
    }

    /// An HF-style `config.json` object built from the metadata (see [`hf_config_json`]).
    pub fn hf_config_json(&self) -> Result<Json> {
        hf_config_json(&self.header, &self.path)
    }
}

/// The HF parameter name for a llama.cpp tensor name, or `None` for tensors with no
/// HF counterpart (e.g. `rope_freqs.weight`, `rope_factors_*`). `arch` is
/// `general.architecture`; for `phi3`, `ffn_up` is the fused `gate_up_proj` and
/// `attn_qkv` the fused `qkv_proj`.
pub fn hf_tensor_name(arch: &str, name: &str) -> Option<String> {
    match name {
        "token_embd.weight" => return Some("model.embed_tokens.weight".into()),
        "output_norm.weight" => return Some("model.norm.weight".into()),
        "output.weight" => return Some("lm_head.weight".into()),
        _ => {}
    }
    let rest = name.strip_prefix("blk.")?;
    let (layer, rest) = rest.split_once('.')?;
    let layer: usize = layer.parse().ok()?;
    let (module, suffix) = rest.split_once('.')?;
    if suffix != "weight" && suffix != "bias" {
        return None;
    }
    let hf = match (module, arch) {
        ("attn_q", _) => "self_attn.q_proj",
        ("attn_k", _) => "self_attn.k_proj",
        ("attn_v", _) => "self_attn.v_proj",
        ("attn_qkv", _) => "self_attn.qkv_proj",
        ("attn_output", _) => "self_attn.o_proj",
        ("ffn_gate", _) => "mlp.gate_proj",
        ("ffn_up", "phi3") => "mlp.gate_up_proj",
        ("ffn_up", _) => "mlp.up_proj",
        ("ffn_down", _) => "mlp.down_proj",
        ("attn_norm", _) => "input_layernorm",
        ("ffn_norm", _) => "post_attention_layernorm",
        _ => return None,
    };
    Some(format!("model.layers.{layer}.{hf}.{suffix}"))
}

/// Whether llama.cpp permuted this tensor's rows for its RoPE layout (Q and K of
/// `llama`/`mistral` architectures), and so whether loading must undo it.
pub fn is_rope_permuted(arch: &str, name: &str) -> bool {
    matches!(arch, "llama" | "mistral")
        && name.starts_with("blk.")
        && (name.contains(".attn_q.") || name.contains(".attn_k."))
}

/// Undo llama.cpp's Q/K row permutation (transformers' `_reverse_permute_weights`):
/// rows viewed as `[n_head, dim/2... ]`: `reshape(n_head, rows/n_head/2, 2, rest)`,
/// swap axes 1 and 2, reshape back. `shape` is row-major; works for 1-D biases too.
pub fn reverse_permute(
    data: &[f32],
    shape: &[i64],
    n_head: usize,
) -> std::result::Result<Vec<f32>, String> {
    let rows = *shape.first().ok_or("empty shape")? as usize;
    let cols: usize = shape[1..].iter().map(|&d| d as usize).product();
    if n_head == 0 || !rows.is_multiple_of(2 * n_head) || data.len() != rows * cols {
        return Err(format!(
            "cannot un-permute shape {shape:?} with {n_head} heads"
        ));
    }
    let dim = rows / n_head / 2;
    let mut out = vec![0f32; data.len()];
    for h in 0..n_head {
        for d in 0..dim {
            for j in 0..2 {
                // source row (h, d, j) -> destination row (h, j, d)
                let src = (h * dim + d) * 2 + j;
                let dst = (h * 2 + j) * dim + d;
                out[dst * cols..(dst + 1) * cols]
                    .copy_from_slice(&data[src * cols..(src + 1) * cols]);
            }
        }
    }
    Ok(out)
}

/// The architectures whose GGUF metadata this crate turns into a config.
pub const SUPPORTED_ARCHITECTURES: &[&str] = &["llama", "mistral", "qwen2", "phi3"];

/// Build an HF-style `config.json` object from GGUF metadata (as transformers'
/// GGUF loading does): `{arch}.block_count` → `num_hidden_layers`, and so on;
/// `tie_word_embeddings` is true when `output.weight` is absent.
pub fn hf_config_json(h: &GgufHeader, path: &Path) -> Result<Json> {
    let arch = h.architecture(path)?.to_string();
    if !SUPPORTED_ARCHITECTURES.contains(&arch.as_str()) {
        return Err(Error::Unsupported {
            path: path.to_path_buf(),
            what: format!("GGUF architecture `{arch}` (supported: {SUPPORTED_ARCHITECTURES:?})"),
        });
    }
    let key = |k: &str| format!("{arch}.{k}");
    let need = |k: &str| -> Result<&GgufValue> {
        let full = key(k);
        h.get(&full).ok_or_else(|| Error::GgufMetadata {
            path: path.to_path_buf(),
            key: full,
            reason: "missing".into(),
        })
    };
    let uint = |k: &str| -> Result<u64> {
        let v = need(k)?;
        v.as_u64().ok_or_else(|| Error::GgufMetadata {
            path: path.to_path_buf(),
            key: key(k),
            reason: format!("expected an unsigned integer, found {v:?}"),
        })
    };
    let float = |k: &str| -> Result<f64> {
        let v = need(k)?;
        v.as_f64().ok_or_else(|| Error::GgufMetadata {
            path: path.to_path_buf(),
            key: key(k),
            reason: format!("expected a number, found {v:?}"),
        })
    };
    // As transformers does: llama.cpp writes Mistral as `llama`, and transformers
    // treats it as Mistral when `general.name` is exactly "mistral".
    let model_type = match (
        arch.as_str(),
        h.get("general.name").and_then(GgufValue::as_str),
    ) {
        ("llama", Some("mistral")) => "mistral".to_string(),
        _ => arch.clone(),
    };
    let hidden = uint("embedding_length")?;
    let n_head = uint("attention.head_count")?;
    let mut c = Map::new();
    c.insert("model_type".into(), json!(model_type));
    let class = match model_type.as_str() {
        "llama" => "LlamaForCausalLM",
        "mistral" => "MistralForCausalLM",
        "qwen2" => "Qwen2ForCausalLM",
        _ => "Phi3ForCausalLM",
    };
    c.insert("architectures".into(), json!([class]));
    c.insert("hidden_size".into(), json!(hidden));
    c.insert(
        "intermediate_size".into(),
        json!(uint("feed_forward_length")?),
    );
    c.insert("num_hidden_layers".into(), json!(uint("block_count")?));
    c.insert("num_attention_heads".into(), json!(n_head));
    let n_kv = if h.get(&key("attention.head_count_kv")).is_some() {
        uint("attention.head_count_kv")?
    } else {
        n_head
    };
    c.insert("num_key_value_heads".into(), json!(n_kv));
    c.insert(
        "max_position_embeddings".into(),
        json!(uint("context_length")?),
    );
    c.insert(
        "rms_norm_eps".into(),
        json!(float("attention.layer_norm_rms_epsilon")?),
    );
    let theta = if h.get(&key("rope.freq_base")).is_some() {
        float("rope.freq_base")?
    } else {
        10000.0
    };
    c.insert("rope_theta".into(), json!(theta));
    let head_dim = if h.get(&key("attention.key_length")).is_some() {
        uint("attention.key_length")?
    } else if matches!(arch.as_str(), "llama" | "mistral")
        && h.get(&key("rope.dimension_count")).is_some()
    {
        uint("rope.dimension_count")?
    } else {
        hidden / n_head.max(1)
    };
    c.insert("head_dim".into(), json!(head_dim));
    if arch == "phi3" && h.get(&key("rope.dimension_count")).is_some() {
        let rot = uint("rope.dimension_count")?;
        if rot != head_dim && head_dim > 0 {
            c.insert(
                "partial_rotary_factor".into(),
                json!(rot as f64 / head_dim as f64),
            );
        }
    }
    let vocab = match h.get(&key("vocab_size")).and_then(GgufValue::as_u64) {
        Some(v) => v,
        None => h
            .get("tokenizer.ggml.tokens")
            .and_then(GgufValue::as_array)
            .map(|a| a.len() as u64)
            .ok_or_else(|| Error::GgufMetadata {
                path: path.to_path_buf(),
                key: key("vocab_size"),
                reason: "missing, and no tokenizer.ggml.tokens to count".into(),
            })?,
    };
    c.insert("vocab_size".into(), json!(vocab));
    if let Some(w) = h
        .get(&key("attention.sliding_window"))
        .and_then(GgufValue::as_u64)
    {
        c.insert("sliding_window".into(), json!(w));
    }
    let tied = !h.tensors.iter().any(|t| t.name == "output.weight");
    c.insert("tie_word_embeddings".into(), json!(tied));
    for (hf, gg) in [
        ("bos_token_id", "tokenizer.ggml.bos_token_id"),
        ("eos_token_id", "tokenizer.ggml.eos_token_id"),
        ("pad_token_id", "tokenizer.ggml.padding_token_id"),
    ] {
        let v = h.get(gg).and_then(GgufValue::as_u64);
        c.insert(hf.into(), v.map_or(Json::Null, |v| json!(v)));
    }
    if let Some(kind) = h.get(&key("rope.scaling.type")).and_then(GgufValue::as_str) {
        let mut rs = Map::new();
        rs.insert("rope_type".into(), json!(kind));
        rs.insert("type".into(), json!(kind));
        if let Some(f) = h
            .get(&key("rope.scaling.factor"))
            .and_then(GgufValue::as_f64)
        {
            rs.insert("factor".into(), json!(f));
        }
        if let Some(f) = h
            .get(&key("rope.scaling.original_context_length"))
            .and_then(GgufValue::as_u64)
        {
            rs.insert("original_max_position_embeddings".into(), json!(f));
        }
        c.insert("rope_scaling".into(), Json::Object(rs));
    }
    Ok(Json::Object(c))
}

/// One tensor to write with [`encode_gguf`]: llama.cpp name, ggml dims (`ne[0]`
/// first), ggml type id, and its raw data bytes.
#[derive(Debug, Clone)]
pub struct GgufTensorData {
    /// llama.cpp name.
    pub name: String,
    /// Dimensions in ggml order.
    pub dims: Vec<u64>,
    /// ggml type id.
    pub type_id: u32,
    /// Raw bytes (already in the type's block layout).
    pub data: Vec<u8>,
}

fn put_str(out: &mut Vec<u8>, s: &str) {
    out.extend_from_slice(&(s.len() as u64).to_le_bytes());
    out.extend_from_slice(s.as_bytes());
}

fn value_type(v: &GgufValue) -> u32 {
    match v {
        GgufValue::U8(_) => 0,
        GgufValue::I8(_) => 1,
        GgufValue::U16(_) => 2,
        GgufValue::I16(_) => 3,
        GgufValue::U32(_) => 4,
        GgufValue::I32(_) => 5,
        GgufValue::F32(_) => 6,
        GgufValue::Bool(_) => 7,
        GgufValue::String(_) => 8,
        GgufValue::Array(_) => 9,
        GgufValue::U64(_) => 10,
        GgufValue::I64(_) => 11,
        GgufValue::F64(_) => 12,
    }
}

fn put_value(out: &mut Vec<u8>, v: &GgufValue) {
    match v {
        GgufValue::U8(x) => out.push(*x),
        GgufValue::I8(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I16(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::U32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F32(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::Bool(x) => out.push(u8::from(*x)),
        GgufValue::String(x) => put_str(out, x),
        GgufValue::Array(items) => {
            let t = items.first().map_or(4, value_type);
            out.extend_from_slice(&t.to_le_bytes());
            out.extend_from_slice(&(items.len() as u64).to_le_bytes());
            for i in items {
                put_value(out, i);
            }
        }
        GgufValue::U64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::I64(x) => out.extend_from_slice(&x.to_le_bytes()),
        GgufValue::F64(x) => out.extend_from_slice(&x.to_le_bytes()),
    }
}

/// Serialise a GGUF v3 file (default alignment 32 unless `general.alignment` is in
/// `metadata`). Used to build small test files and by tools that export models.
pub fn encode_gguf(metadata: &[(String, GgufValue)], tensors: &[GgufTensorData]) -> Vec<u8> {
    let alignment = metadata
        .iter()
        .find(|(k, _)| k == "general.alignment")
        .and_then(|(_, v)| v.as_u64())
        .filter(|a| a.is_power_of_two())
        .unwrap_or(DEFAULT_ALIGNMENT) as usize;
    let mut out = Vec::new();
    out.extend_from_slice(GGUF_MAGIC);
    out.extend_from_slice(&3u32.to_le_bytes());
    out.extend_from_slice(&(tensors.len() as u64).to_le_bytes());
    out.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        put_str(&mut out, k);
        out.extend_from_slice(&value_type(v).to_le_bytes());
        put_value(&mut out, v);
    }
    let mut offset = 0usize;
    let mut offsets = Vec::with_capacity(tensors.len());
    for t in tensors {
        offsets.push(offset);
        offset = (offset + t.data.len()).div_ceil(alignment) * alignment;
    }
    for (t, off) in tensors.iter().zip(&offsets) {
        put_str(&mut out, &t.name);
        out.extend_from_slice(&(t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            out.extend_from_slice(&d.to_le_bytes());
        }
        out.extend_from_slice(&t.type_id.to_le_bytes());
        out.extend_from_slice(&(*off as u64).to_le_bytes());
    }
    let data_start = out.len().div_ceil(alignment) * alignment;
    out.resize(data_start, 0);
    for (t, off) in tensors.iter().zip(&offsets) {
        out.resize(data_start + off, 0);
        out.extend_from_slice(&t.data);
    }
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn reverse_permute_matches_index_formula() {
        // 2 heads, head_dim 4 (dim 2), 1 column: rows [h0: 0 1 2 3, h1: 4 5 6 7]
        let data: Vec<f32> = (0..8).map(|x| x as f32).collect();
        let out = reverse_permute(&data, &[8, 1], 2).unwrap();
        // numpy: arange(8).reshape(2,2,2,1).swapaxes(2,1).reshape(8)
        assert_eq!(out, vec![0., 2., 1., 3., 4., 6., 5., 7.]);
    }

    #[test]
    fn q4_1_block_layout() {
        let mut b = Vec::new();
        b.extend_from_slice(&f16::from_f32(0.5).to_le_bytes());
        b.extend_from_slice(&f16::from_f32(-1.0).to_le_bytes());
        b.extend((0..16u8).map(|i| (15 - i) << 4 | i));
        let y = dequantize(GgmlType::Q4_1, &b, 32).unwrap();
        assert_eq!(y[0], -1.0);
        assert_eq!(y[15], 15.0 * 0.5 - 1.0);
        assert_eq!(y[16], 15.0 * 0.5 - 1.0);
        assert_eq!(y[31], -1.0);
    }
}
