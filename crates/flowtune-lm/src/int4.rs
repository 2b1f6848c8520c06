//! Group-wise 4-bit weights for the decoder's linear layers (opt-in, CPU).
//!
//! A weight `[N, K]` is stored as 4-bit codes `q` with one scale and one minimum per group of
//! [`INT4_GROUP`] consecutive inputs: `w[n, k] = scale[n, k / 32] * q[n, k] + min[n, k / 32]`.
//! This is exactly ggml's Q4_1 block (and Q4_0 with `min = -8 * scale`), so a Q4_0/Q4_1 GGUF
//! keeps its own blocks ([`crate::gguf::q4_blocks`]); other sources are quantised by min/max per
//! group ([`Int4Blocks::quantize`], the Q4_1 rule).
//!
//! Batch-1 and small-batch decoding on a CPU is bound by reading the weights; 4-bit codes read
//! about a quarter of the bytes of bf16. Two kernels take the codes: flowtune's own
//! ([`crate::cpu_kernels::Int4F32Weight`], x86-64 with AVX-512F; float32 scales and minima,
//! float32 or bf16 activations, float32 accumulation) and libtorch's
//! `_weight_int4pack_mm_for_cpu` (bf16/f16 activations), whose dequantisation is
//! `(q - 8) * scale + zero`, so the model passes `zero = min + 8 * scale`, rounded with the scale
//! to the activation dtype. Float32 and bf16 models take flowtune's where the CPU has AVX-512F;
//! `FLOWTUNE_INT4_BF16=libtorch` gives bf16 models libtorch's (slower at batch 8, a little
//! faster at batch 1 on the development CPU; docs/lm-running.md). Forwards with more than [`INT4_MAX_ROWS`] rows (prefill, training)
//! use the dense weight, which the model keeps as well.
use tch::{Device, Kind, Tensor};

use crate::{Error, Result};

/// Inputs per scale/minimum group (ggml's Q4 block size).
pub const INT4_GROUP: i64 = 32;

/// Forwards with at most this many rows (tokens) use the 4-bit kernel; above it the dense
/// weight is faster (measured on the development CPU: the int4 kernel is compute-bound and
/// falls behind bf16 oneDNN from 16 rows up).
pub const INT4_MAX_ROWS: i64 = 8;

/// The 4-bit codes and per-group scales and minima of one `[N, K]` weight.
#[derive(Debug)]
pub struct Int4Blocks {
    /// Codes in `0..=15`, uint8 `[N, K]`.
    q: Tensor,
    /// float32 `[N, K / 32]`.
    scale: Tensor,
    /// float32 `[N, K / 32]`.
    min: Tensor,
}

impl Int4Blocks {
    /// Blocks from codes (uint8 `[N, K]`, values 0..=15) and float32 scales and minima
    /// `[N, K / 32]`; `name` labels shape errors.
    pub fn new(name: &str, q: Tensor, scale: Tensor, min: Tensor) -> Result<Self> {
        let size = q.size();
        let bad = |expected: Vec<i64>, actual: Vec<i64>| Error::TensorShape {
            tensor: name.to_string(),
            expected,
            actual,
        };
        if size.len() != 2 || size[1] % INT4_GROUP != 0 {
            return Err(bad(
                vec![size.first().copied().unwrap_or(0), INT4_GROUP],
                size,
            ));
        }
        let groups = vec![size[0], size[1] / INT4_GROUP];
        for t in [&scale, &min] {
            if t.size() != groups {
                return Err(bad(groups, t.size()));
            }
        }
        Ok(Self {
            q: q.f_to_kind(Kind::Uint8)?,
            scale: scale.f_to_kind(Kind::Float)?,
            min: min.f_to_kind(Kind::Float)?,
        })
    }

    /// Quantise a dense `[N, K]` weight (any float kind) with the Q4_1 rule per group of 32:
    /// `min` = the group's minimum, `scale = (max - min) / 15`, `q = round((w - min) / scale)`.
    /// A constant group gets scale 0 and codes 0.
    pub fn quantize(name: &str, w: &Tensor) -> Result<Self> {
        let size = w.size();
        if size.len() != 2 || size[1] % INT4_GROUP != 0 {
            return Err(Error::TensorShape {
                tensor: name.to_string(),
                expected: vec![size.first().copied().unwrap_or(0), INT4_GROUP],
                actual: size,
            });
        }
        let (n, k) = (size[0], size[1]);
        let g = w
            .f_to_device(Device::Cpu)?
            .f_to_kind(Kind::Float)?
            .f_reshape([n, k / INT4_GROUP, INT4_GROUP])?;
        let min = g.f_amin([-1i64].as_slice(), true)?;
        let max = g.f_amax([-1i64].as_slice(), true)?;
        let scale = max.f_sub(&min)?.f_div_scalar(15.0)?;
        let positive = scale.f_gt(0.0)?;
        let inv = scale
            .f_reciprocal()?
            .f_where_self(&positive, &scale.f_zeros_like()?)?;
        let q = g
            .f_sub(&min)?
            .f_mul(&inv)?
            .f_round()?
            .f_clamp(0.0, 15.0)?
            .f_to_kind(Kind::Uint8)?
            .f_reshape([n, k])?;
        Self::new(name, q, scale.f_squeeze_dim(-1)?, min.f_squeeze_dim(-1)?)
    }

    /// Output and input sizes `(N, K)`.
    pub fn shape(&self) -> (i64, i64) {
        let s = self.q.size();
        (s[0], s[1])
    }

    /// The weight these blocks represent, float32 `[N, K]`.
    pub fn dequantize(&self) -> Result<Tensor> {
        let (n, k) = self.shape();
        let q = self
            .q
            .f_to_kind(Kind::Float)?
            .f_reshape([n, k / INT4_GROUP, INT4_GROUP])?;
        Ok(q.f_mul(&self.scale.f_unsqueeze(-1)?)?
            .f_add(&self.min.f_unsqueeze(-1)?)?
            .f_reshape([n, k])?)
    }

    /// Codes (one per byte), scales and minima as row-major vectors.
    pub fn to_vecs(&self) -> Result<(Vec<u8>, Vec<f32>, Vec<f32>)> {
        let flat = |t: &Tensor| t.f_contiguous()?.f_flatten(0, -1);
        Ok((
            Vec::<u8>::try_from(flat(&self.q)?)?,
            Vec::<f32>::try_from(flat(&self.scale)?)?,
            Vec::<f32>::try_from(flat(&self.min)?)?,
        ))
    }

    /// A copy sharing storage with these blocks.
    pub fn shallow_clone(&self) -> Self {
        Self {
            q: self.q.shallow_clone(),
            scale: self.scale.shallow_clone(),
            min: self.min.shallow_clone(),
        }
    }

    /// Blocks stacked along the output dimension (fused q/k/v or gate/up).
    pub fn cat(parts: &[&Int4Blocks]) -> Result<Self> {
        let q: Vec<&Tensor> = parts.iter().map(|p| &p.q).collect();
        let s: Vec<&Tensor> = parts.iter().map(|p| &p.scale).collect();
        let m: Vec<&Tensor> = parts.iter().map(|p| &p.min).collect();
        Ok(Self {
            q: Tensor::f_cat(&q, 0)?,
            scale: Tensor::f_cat(&s, 0)?,
            min: Tensor::f_cat(&m, 0)?,
        })
    }
}

/// libtorch's int4 product for bf16/f16 activations: its packed codes and `[K / 32, N, 2]`
/// (scale, min + 8 * scale) in the activation dtype.
#[derive(Debug)]
pub(crate) struct LibtorchInt4 {
    packed: Tensor,
    scales_zeros: Tensor,
    out: i64,
    inp: i64,
}

impl LibtorchInt4 {
    /// `None` where libtorch's kernel does not take this kind and shape (`N` a multiple of 16,
    /// bf16/f16 activations).
    fn new(blocks: &Int4Blocks, kind: Kind) -> Result<Option<Self>> {
        let (n, k) = blocks.shape();
        if n % 16 != 0 || k % INT4_GROUP != 0 || !matches!(kind, Kind::BFloat16 | Kind::Half) {
            return Ok(None);
        }
        let packed = blocks
            .q
            .f_to_kind(Kind::Int)?
            .f_internal_convert_weight_to_int4pack_for_cpu(1)?;
        let zero = blocks.min.f_add(&blocks.scale.f_mul_scalar(8.0)?)?;
        let scales_zeros = Tensor::f_stack(&[&blocks.scale, &zero], -1)?
            .f_transpose(0, 1)?
            .f_contiguous()?
            .f_to_kind(kind)?;
        Ok(Some(Self {
            packed,
            scales_zeros,
            out: n,
            inp: k,
        }))
    }

    fn applies(&self, x: &Tensor) -> bool {
        let rows = x.numel() as i64 / self.inp.max(1);
        rows <= INT4_MAX_ROWS
            && !x.requires_grad()
            && x.device() == Device::Cpu
            && x.kind() == self.scales_zeros.kind()
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut shape = x.size();
        let x2 = x.f_reshape([-1, self.inp])?.f_contiguous()?;
        let y =
            x2.f_internal_weight_int4pack_mm_for_cpu(&self.packed, INT4_GROUP, &self.scales_zeros)?;
        if let Some(last) = shape.last_mut() {
            *last = self.out;
        }
        Ok(y.f_reshape(shape.as_slice())?)
    }
}

/// A linear's weight packed for one CPU int4 kernel: flowtune's own
/// ([`crate::cpu_kernels::Int4F32Weight`]: float32 scales and minima, float32 or bf16
/// activations, x86-64 with AVX-512F) or libtorch's (bf16/f16 activations).
///
/// Float32 and bf16 models take flowtune's (on AVX-512F CPUs); bf16 ones take libtorch's with
/// `FLOWTUNE_INT4_BF16=libtorch`. Measured on the session-9 Intel Xeon (SmolLM2-135M,
/// `bench --weights int4 --dtype bf16`, tok/s): libtorch's 127 at batch 1 and 326 at batch 8;
/// flowtune's 117 and 366 with the same surroundings, 120-125 and 375-393 with its table-lookup
/// dequantisation. (Session 7 measured flowtune's slower at batch 8 too: its bf16 rows were
/// widened into a buffer at malloc's 16-byte alignment, fixed in session 9.)
#[derive(Debug)]
pub(crate) enum Int4Linear {
    Own(crate::cpu_kernels::Int4F32Weight),
    Libtorch(LibtorchInt4),
}

impl Int4Linear {
    /// Pack `blocks` for activations of `kind` on the CPU, or `None` when no kernel takes this
    /// kind and shape.
    pub(crate) fn new(blocks: &Int4Blocks, kind: Kind) -> Result<Option<Self>> {
        let own_bf16 = !std::env::var("FLOWTUNE_INT4_BF16").is_ok_and(|v| v == "libtorch");
        if crate::cpu_kernels::int4_f32_available()
            && (kind == Kind::Float || (kind == Kind::BFloat16 && own_bf16))
        {
            return Ok(crate::cpu_kernels::Int4F32Weight::new(
                &blocks.q,
                &blocks.scale,
                &blocks.min,
            )?
            .map(Self::Own));
        }
        Ok(LibtorchInt4::new(blocks, kind)?.map(Self::Libtorch))
    }

    /// Whether a forward over `x` should take the 4-bit path.
    pub(crate) fn applies(&self, x: &Tensor) -> bool {
        match self {
            Self::Own(w) => w.applies(x),
            Self::Libtorch(l) => l.applies(x),
        }
    }

    /// `x @ w.T` for `x` `[..., K]` (where [`Self::applies`]).
    pub(crate) fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Libtorch(l) => l.forward(x),
            Self::Own(w) => w.matmul(x)?.ok_or_else(|| {
                Error::ModelInput("int4 kernel called on an input it does not take".into())
            }),
        }
    }
}

/// Whether an HF parameter name is a decoder-layer linear weight that int4 mode stores in
/// 4 bits (attention and MLP projections; not embeddings, norms or `lm_head`).
pub fn is_int4_target(name: &str) -> bool {
    const SUFFIXES: [&str; 9] = [
        ".q_proj.weight",
        ".k_proj.weight",
        ".v_proj.weight",
        ".qkv_proj.weight",
        ".o_proj.weight",
        ".gate_proj.weight",
        ".up_proj.weight",
        ".gate_up_proj.weight",
        ".down_proj.weight",
    ];
    name.starts_with("model.layers.") && SUFFIXES.iter().any(|s| name.ends_with(s))
}
