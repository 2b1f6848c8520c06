//! The Llama-family decoder over tch: embeddings, RMSNorm, RoPE (default,
//! linear, dynamic, llama3, longrope), GQA attention through libtorch SDPA,
//! SwiGLU MLP, tied or separate `lm_head`. Qwen2 q/k/v biases, Phi-3 fused
//! projections and Mistral/Qwen2 sliding windows are handled from the config.
//!
//! Every adapted linear goes through [`Model::project`] with its PEFT site
//! (layer, module name), where a [`LinearDelta`] (LoRA) adds its delta.
use std::collections::HashMap;

use tch::{Device, Kind, Tensor};

use crate::config::{ModelConfig, RopeKind};
use crate::int4::{Int4Blocks, Int4Linear};
use crate::kv::KvCache;
use crate::weights::WeightCodes;
use crate::{Error, Result};

mod recorded;
pub use recorded::{KvGrads, LoraGrads, RecordedPass};

/// Something that adds a low-rank delta to the output of a target linear, with
/// the adapter selection for the rows of the current batch bound inside.
pub trait LinearDelta {
    /// The delta for module `module` (PEFT name: `q_proj`, `gate_up_proj`, ...)
    /// of layer `layer` given its input `x` `[B, T, in]` (or `[N, in]`, the real tokens of a
    /// padded batch, when [`Self::row_independent`] or from [`Self::for_packed_tokens`]), or
    /// `None` when no adapter touches that site.
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> Result<Option<Tensor>>;

    /// Adds the delta of `module` of `layer` for input `x` in place into `y` (that site's base
    /// output, or a view of its columns in a fused output) when this implementation can, and
    /// says whether it did; the model then skips [`Self::delta`] for the site. The default
    /// never does.
    fn add_delta_in_place(
        &self,
        _layer: usize,
        _module: &str,
        _x: &Tensor,
        _y: &Tensor,
    ) -> Result<bool> {
        Ok(false)
    }

    /// Whether the delta treats every input row alike (one adapter, or none, for the whole
    /// batch), so the model may pass the real tokens of a padded batch packed as `[N, in]`
    /// instead of `[B, T, in]`. The default `false` keeps the batch layout.
    fn row_independent(&self) -> bool {
        false
    }

    /// This delta for the real tokens of a padded batch passed packed as `[N, in]`, token `i`
    /// coming from batch row `token_rows[i]`: for deltas that differ by row (rows with
    /// different adapters), so the model may still run its linears over the real tokens only.
    /// The default `None` keeps the batch layout; row-independent deltas need no such form.
    fn for_packed_tokens(&self, _token_rows: &[usize]) -> Option<Box<dyn LinearDelta + '_>> {
        None
    }

    /// The factors behind the delta of `module` of `layer`, for the hand-written backward
    /// pass ([`Model::forward_recorded`]). The default, [`SiteFactors::Opaque`], keeps callers
    /// on autograd.
    fn factors(&self, _layer: usize, _module: &str) -> Result<SiteFactors> {
        Ok(SiteFactors::Opaque)
    }
}

/// What a [`LinearDelta`] adds at one site, as the hand-written backward pass needs it.
#[derive(Debug)]
pub enum SiteFactors {
    /// Nothing: the site has no delta.
    Absent,
    /// One LoRA for every row: `scale · (x Aᵀ) Bᵀ` with `a` `[r, in]` and `b` `[out, r]`
    /// (float32 or the model's kind). These are the adapter's own tensors: gradients are
    /// reported against them ([`LoraGrads`]), for those that require gradients.
    Lora {
        /// The down projection `A`.
        a: Tensor,
        /// The up projection `B`.
        b: Tensor,
        /// The LoRA scale (`alpha / r`, or `alpha / sqrt(r)` for rsLoRA).
        scale: f64,
    },
    /// Anything else (rows with different adapters, dropout, another kind of delta).
    Opaque,
}

/// The LoRA bank with the batch's adapter selection bound in adds its deltas.
impl LinearDelta for flowtune_lora::SelectedAdapters<'_> {
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(flowtune_lora::SelectedAdapters::delta(
            self, layer, module, x,
        )?)
    }

    fn add_delta_in_place(
        &self,
        layer: usize,
        module: &str,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<bool> {
        // One adapter for the whole batch, no gradients, on the CPU: the fused kernel adds
        // into `y`, rounding once as PEFT does.
        match self.uniform_weights(layer, module)? {
            Some((w, scale)) => crate::cpu_kernels::lora_add(x, &w.a, &w.b, scale, y),
            None => Ok(false),
        }
    }

    fn row_independent(&self) -> bool {
        self.selection.is_uniform()
    }

    fn for_packed_tokens(&self, token_rows: &[usize]) -> Option<Box<dyn LinearDelta + '_>> {
        let flowtune_lora::AdapterSelection::PerRow(rows) = self.selection else {
            return None;
        };
        let per_token = token_rows
            .iter()
            .map(|&r| rows.get(r).copied())
            .collect::<Option<Vec<_>>>()?;
        Some(Box::new(TokenAdapters {
            bank: self.bank,
            selection: flowtune_lora::AdapterSelection::PerRow(per_token),
        }))
    }

    fn factors(&self, layer: usize, module: &str) -> Result<SiteFactors> {
        Ok(match self.uniform_site(layer, module)? {
            None => SiteFactors::Opaque,
            Some(None) => SiteFactors::Absent,
            Some(Some((w, scale))) => SiteFactors::Lora {
                a: w.a.shallow_clone(),
                b: w.b.shallow_clone(),
                scale,
            },
        })
    }
}

/// A bank's adapters selected token by token: [`LinearDelta::for_packed_tokens`] of a batch
/// whose rows use different adapters.
struct TokenAdapters<'a> {
    bank: &'a flowtune_lora::AdapterBank,
    selection: flowtune_lora::AdapterSelection,
}

impl LinearDelta for TokenAdapters<'_> {
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        Ok(self.bank.select(&self.selection).delta(layer, module, x)?)
    }
}

/// The positions a prompt pass reads the last layer's output at ([`Model::forward_cached`]).
struct LastLayerReads<'d> {
    /// Their rows in the layer's token layout (packed tokens, or flat `[B * T]` slots), in the
    /// logits' row order; empty when nothing is read.
    index: Tensor,
    /// Per `[B * T]` slot, whether the attention must produce its output (the others come out
    /// zero from the CPU kernel).
    queries: Vec<bool>,
    /// The delta for those rows, where the pass's delta differs by row.
    delta: Option<Box<dyn LinearDelta + 'd>>,
}

/// Which positions to compute logits at.
#[derive(Debug, Clone)]
pub enum LogitsAt {
    /// Every position: `[B, T, V]`.
    All,
    /// The last column of the input: `[B, V]`.
    Last,
    /// One column per row (e.g. each row's last real token): `[B, V]`.
    PerRow(Vec<usize>),
    /// No logits (prefill only); returns an empty tensor.
    None,
}

/// The most bytes of float32 weight copies a bf16 CPU model keeps for
/// [`crate::cpu_kernels::Bf16Gemm::ViaF32`] (a 1B-parameter model's worth).
const WIDE_MAX_BYTES: i64 = 4 << 30;

#[derive(Debug)]
struct Linear {
    weight: Tensor,
    bias: Option<Tensor>,
    /// The same weight in 4 bits, for forwards of a few rows (see [`crate::int4`]).
    int4: Option<Int4Linear>,
    /// The same weight in 8 bits (a Q8_0 GGUF's head in int4 mode), for forwards of a few rows.
    int8: Option<std::sync::Arc<crate::cpu_kernels::Int8F32Weight>>,
    /// A float32 copy of a bf16 CPU weight, for products of many rows where the CPU's float32
    /// GEMM is faster than its bf16 one ([`crate::cpu_kernels::Bf16Gemm::ViaF32`]).
    wide: Option<Tensor>,
    /// A float32 or bf16 CPU weight again in panels, for products of a few rows (decoding).
    panels: Option<crate::cpu_kernels::PanelWeight>,
}

impl Linear {
    /// A linear over `weight` `[out, in]` stored in the layout that is fastest for it, with
    /// `blocks` packed for the int4 kernel when given and usable (CPU; bf16/f16, or float32 on
    /// AVX-512 CPUs; shape), and a float32 copy when `wide` and the weight is bf16 on the CPU.
    /// Without int4 blocks, decoding panels hold `codes` where they reproduce the weight, else
    /// its values.
    fn new(
        weight: Tensor,
        bias: Option<Tensor>,
        blocks: Option<Int4Blocks>,
        codes: Option<WeightCodes>,
        wide: bool,
    ) -> Result<Self> {
        let int4 = match blocks {
            Some(b) if weight.device() == Device::Cpu => Int4Linear::new(&b, weight.kind())?,
            _ => None,
        };
        let wide = if wide && weight.device() == Device::Cpu && weight.kind() == Kind::BFloat16 {
            Some(fast_weight_layout(weight.f_to_kind(Kind::Float)?)?)
        } else {
            None
        };
        let weight = fast_weight_layout(weight)?;
        // A 4-bit copy takes the same few-row products. From the stored layout: a float32
        // weight is already the `[in, out]` matrix the panels are cut from (no second copy).
        let panels = match (&int4, codes) {
            (Some(_), _) => None,
            (None, Some(codes)) => match codes.panels(&weight)? {
                Some(p) => Some(p),
                None => crate::cpu_kernels::PanelWeight::new(&weight)?,
            },
            (None, None) => crate::cpu_kernels::PanelWeight::new(&weight)?,
        };
        Ok(Self {
            panels,
            weight,
            bias,
            int4,
            int8: None,
            wide,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        if let Some(y) = self
            .int8
            .as_ref()
            .map(|q| q.matmul(x))
            .transpose()?
            .flatten()
        {
            return Ok(match &self.bias {
                Some(b) => y.f_add(b)?,
                None => y,
            });
        }
        if let Some(q) = self.int4.as_ref().filter(|q| q.applies(x)) {
            let y = q.forward(x)?;
            return Ok(match &self.bias {
                Some(b) => y.f_add(b)?,
                None => y,
            });
        }
        if let Some(p) = &self.panels {
            if let Some(y) = p.matmul(x, self.bias.as_ref())? {
                return Ok(y);
            }
        }
        dense_linear(x, &self.weight, self.bias.as_ref(), self.wide.as_ref())
    }

    /// The caller may change the dense weight in place (merging an adapter): the 4-bit and
    /// float32 copies would go stale, so they are dropped.
    fn drop_copies(&mut self) {
        self.int4 = None;
        self.int8 = None;
        self.wide = None;
        self.panels = None;
    }
}

/// `x @ weight.T + bias`. 1-8 bf16 rows take [`crate::cpu_kernels::linear_bf16_small`]
/// (where [`Linear`] has no panels, which it tries first); more bf16 rows with a float32 copy
/// `wide` of the weight run through it; elsewhere a single bf16 row on the CPU is a GEMV, where
/// libtorch's own kernel beats oneDNN (see [`onednn_switch`]); oneDNN stays on for everything
/// else, including the attention products around it.
fn dense_linear(
    x: &Tensor,
    weight: &Tensor,
    bias: Option<&Tensor>,
    wide: Option<&Tensor>,
) -> Result<Tensor> {
    if let Some(y) = crate::cpu_kernels::linear_bf16_small(x, weight, bias)? {
        return Ok(y);
    }
    if let Some(w32) = wide.filter(|_| x.kind() == Kind::BFloat16) {
        let b32 = bias.map(|b| b.f_to_kind(Kind::Float)).transpose()?;
        return Ok(x
            .f_to_kind(Kind::Float)?
            .f_linear(w32, b32.as_ref())?
            .f_to_kind(Kind::BFloat16)?);
    }
    let rows = x.numel() as i64 / x.size().last().copied().unwrap_or(1).max(1);
    let _gemv = (rows == 1 && x.kind() == Kind::BFloat16 && x.device() == Device::Cpu)
        .then(onednn_switch::Disabled::new);
    Ok(x.f_linear(weight, bias)?)
}

#[derive(Debug)]
struct Layer {
    input_norm: Tensor,
    post_norm: Tensor,
    /// q, k, v fused along the output dimension.
    qkv: Linear,
    o: Linear,
    /// gate and up fused along the output dimension.
    gate_up: Linear,
    down: Linear,
    sliding_window: Option<usize>,
}

/// The real tokens of a padded `[B, T]` batch: row-major flat indices of its valid slots.
/// Linears, norms and the MLP act on each token alone, so they run over the `[N, width]`
/// packed tokens; attention and the KV cache keep the `[B, T]` layout.
struct Packing {
    index: Tensor,
    /// Per slot, its row among the real tokens (`None`: padding).
    slot_rows: Vec<Option<u32>>,
    b: i64,
    t: i64,
}

impl Packing {
    /// `None` when fewer than 1/32 of the slots are padding (packing would not pay).
    fn new(valid: &[bool], b: i64, t: i64, device: Device) -> Result<Option<Self>> {
        let real = valid.iter().filter(|&&v| v).count() as i64;
        let slots = b * t;
        if (slots - real) * 32 < slots {
            return Ok(None);
        }
        Self::always(valid, b, t, device).map(Some)
    }

    /// The packing of `valid` (row-major `[b, t]`), however little padding there is.
    fn always(valid: &[bool], b: i64, t: i64, device: Device) -> Result<Self> {
        let index: Vec<i64> = valid
            .iter()
            .enumerate()
            .filter_map(|(i, &v)| v.then_some(i as i64))
            .collect();
        let mut slot_rows = vec![None; valid.len()];
        for (row, &slot) in index.iter().enumerate() {
            slot_rows[slot as usize] = Some(row as u32);
        }
        Ok(Self {
            index: Tensor::f_from_slice(&index)?.f_to(device)?,
            slot_rows,
            b,
            t,
        })
    }

    /// `[B, T, ...]` (or `[B, T]`) to the real tokens `[N, ...]`.
    fn pack(&self, x: &Tensor) -> Result<Tensor> {
        let size = x.size();
        let mut flat = vec![self.b * self.t];
        flat.extend_from_slice(size.get(2..).unwrap_or(&[]));
        Ok(x.f_reshape(flat.as_slice())?
            .f_index_select(0, &self.index)?)
    }

    /// `[N, width]` back to `[B, T, width]`, zeros in the padding slots.
    fn unpack(&self, y: &Tensor) -> Result<Tensor> {
        let w = y.size().last().copied().unwrap_or(0);
        let full =
            match crate::cpu_kernels::unpack_rows(y, &self.slot_rows)? {
                Some(full) => full,
                None => Tensor::f_zeros([self.b * self.t, w], (y.kind(), y.device()))?
                    .f_index_copy(0, &self.index, y)?,
            };
        Ok(full.f_view([self.b, self.t, w])?)
    }
}

/// A Llama-family decoder ready to run.
#[derive(Debug)]
pub struct Model {
    config: ModelConfig,
    embed: Tensor,
    layers: Vec<Layer>,
    norm: Tensor,
    lm_head: Linear,
    inv_freq: Tensor,
    inv_freq_long: Option<Tensor>,
    rope_scale: f64,
    device: Device,
    kind: Kind,
    /// bf16 on the CPU where its bf16 GEMM is the slow one
    /// ([`crate::cpu_kernels::Bf16Gemm::ViaF32`], decided when the model is built): attention's
    /// bf16 products go through float32 ([`reduced_matmul`]).
    bf16_products_via_f32: bool,
    fused_qkv_names: bool,
    fused_mlp_names: bool,
}

/// Store an `[out, in]` weight so that `linear` runs fastest. On the CPU in float32, MKL's GEMV
/// over a column-major `[in, out]` matrix streams the weight at close to full memory bandwidth
/// while the row-major `[out, in]` one reaches about half of it (measured 1.8x for M = 1 decode,
/// no change for prefill or batch 8), so the weight is kept as the transposed view of a contiguous
/// `[in, out]` copy (same values, same shape `[out, in]`, only the strides differ). Where the
/// model also keeps [`crate::cpu_kernels::PanelWeight`]s, decoding reads those instead and this
/// layout serves products of many rows. bf16 goes through oneDNN, which prefers the row-major
/// layout, so other kinds are left as they are.
fn fast_weight_layout(w: Tensor) -> Result<Tensor> {
    if w.device() == Device::Cpu && w.kind() == Kind::Float && w.dim() == 2 {
        Ok(w.f_transpose(0, 1)?.f_contiguous()?.f_transpose(0, 1)?)
    } else {
        Ok(w)
    }
}

/// Switches libtorch's oneDNN (mkldnn) matmul path off for the duration of a single-row bf16 CPU
/// linear ([`dense_linear`]). For `M = 1` bf16 `linear`, oneDNN streams the weights at about half the memory
/// bandwidth that libtorch's own reduced-precision GEMV kernel reaches (measured 12.2 ms vs
/// 6.9 ms for 30 gate/up projections of SmolLM2-135M on one core), while for `M >= 2` oneDNN
/// is much faster; libtorch only picks its GEMV kernel when oneDNN is disabled. tch does not
/// wrap `at::Context::setUserEnabledMkldnn`, so it is called through its exported C++ symbol.
/// Both kernels accumulate in float32; the results agree to bf16 rounding.
mod onednn_switch {
    use std::os::raw::c_void;
    use std::sync::Mutex;

    extern "C" {
        // `at::Context& at::globalContext()`: a reference is a pointer in the Itanium ABI.
        #[link_name = "_ZN2at13globalContextEv"]
        fn at_global_context() -> *mut c_void;
        // `void at::Context::setUserEnabledMkldnn(bool)`: non-virtual member, `this` first.
        #[link_name = "_ZN2at7Context20setUserEnabledMkldnnEb"]
        fn at_context_set_user_enabled_mkldnn(ctx: *mut c_void, enabled: bool);
        // `bool at::Context::userEnabledMkldnn() const`.
        #[link_name = "_ZNK2at7Context17userEnabledMkldnnEv"]
        fn at_context_user_enabled_mkldnn(ctx: *const c_void) -> bool;
    }

    /// (number of live guards, the setting to restore when the last one drops).
    static STATE: Mutex<(usize, bool)> = Mutex::new((0, true));

    /// oneDNN stays disabled while at least one guard lives (guards may overlap across threads;
    /// the setting found before the first one is restored after the last one).
    pub(super) struct Disabled;

    impl Disabled {
        pub(super) fn new() -> Self {
            let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
            if st.0 == 0 {
                // SAFETY: `globalContext()` returns the process-wide context, valid for the whole
                // process; the getter and setter only read/write a bool member and do not throw.
                unsafe {
                    let ctx = at_global_context();
                    st.1 = at_context_user_enabled_mkldnn(ctx);
                    at_context_set_user_enabled_mkldnn(ctx, false);
                }
            }
            st.0 += 1;
            Disabled
        }
    }

    impl Drop for Disabled {
        fn drop(&mut self) {
            let mut st = STATE.lock().unwrap_or_else(|p| p.into_inner());
            st.0 = st.0.saturating_sub(1);
            if st.0 == 0 {
                // SAFETY: as in `new`.
                unsafe { at_context_set_user_enabled_mkldnn(at_global_context(), st.1) };
            }
        }
    }
}

/// Training forwards in bf16 on the CPU take [`eager_attention`] up to this many attention
/// scores per layer (`B · heads · t · L`; SmolLM2's relevance label batches stay below it),
/// SDPA above.
const EAGER_TRAINING_MAX_SCORES: i64 = 1 << 22;

/// Attention of `t` query positions per row (`q` `[B, nq, t, hd]`, `k`/`v` `[B, nkv, L, hd]`),
/// written out as HF's eager attention does it: scores in the model dtype, softmax in float32,
/// the probabilities cast back before the product with `v`. Query heads are grouped onto their
/// key/value head by a reshape (head `h` reads kv head `h / (nq / nkv)`, as `repeat_kv`), so
/// every product is one batched GEMM over `[B, nkv]`. `mask` is `[B, 1, t, L]` (true =
/// visible); without one, query position `i` sees keys `j <= start + i`. The CPU kernel
/// ([`crate::cpu_kernels::attention`]) takes the call when it applies (no gradients).
///
/// Decoding on the 2-core development CPU in bf16 this took 4.2 ms per step for 30 layers at
/// B = 8 (L = 264, SmolLM2-135M shapes) where libtorch's SDPA takes 33.7 ms, and 2.5 vs 4.8 ms
/// at B = 1 (measured with torch 2.11 from Python, same shapes). With gradients (the learner)
/// in bf16 on the session-12 AMD Zen 4 VM, forward and backward took 19.6 against SDPA's
/// 30.8 ms at `[8, 9, 150, 64]` over 150 keys and 6.4 against 14.8 ms at `[16, 9, 30, 64]`
/// over 180 (torch 2.11 from Python): SDPA's bf16 block products go through MKL's generic path
/// there.
fn eager_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    (start, nkv): (i64, i64),
    via_f32: bool,
) -> Result<Tensor> {
    if let Some(out) = crate::cpu_kernels::attention(q, k, v, mask, None, start as usize)? {
        return Ok(out);
    }
    let size = q.size();
    let (b, nq, t, hd) = (size[0], size[1], size[2], size[3]);
    let l = k.size().get(2).copied().unwrap_or(0);
    let group = nq / nkv;
    let scale = 1.0 / (hd as f64).sqrt();
    // A power-of-two scale (head_dim 64, 256, ...) goes on `q` instead: exact in any float
    // kind and commuting with every rounding of the products, so the scores are the same
    // bits, and the float32 scores need no product of their own (one pass fewer over them
    // in the forward and one in the backward).
    let pow2 = scale.log2().fract() == 0.0;
    let q = if pow2 {
        q.f_mul_scalar(scale)?
    } else {
        q.shallow_clone()
    };
    let raw = reduced_matmul(
        &q.f_reshape([b, nkv, group * t, hd])?,
        &k.f_transpose(-1, -2)?,
        via_f32,
    )?
    .f_view([b, nkv, group, t, l])?;
    let widen = |raw: &Tensor| -> Result<Tensor> {
        let wide = raw.f_to_kind(Kind::Float)?;
        Ok(if pow2 {
            wide
        } else {
            wide.f_mul_scalar(scale)?
        })
    };
    let causal;
    let visible = match mask {
        Some(m) => Some(m),
        // One position after the whole cache sees every key.
        None if start + t >= l && t == 1 => None,
        None => {
            let qi = Tensor::f_arange_start(start, start + t, (Kind::Int64, q.device()))?
                .f_view([t, 1])?;
            let kj = Tensor::f_arange(l, (Kind::Int64, q.device()))?.f_view([1, l])?;
            causal = kj.f_le_tensor(&qi)?.f_view([1, 1, t, l])?;
            Some(&causal)
        }
    };
    let scores = match visible {
        // An additive mask (0 where visible, -inf elsewhere) rather than `masked_fill`: the
        // same scores (0 + x = x, -inf + x = -inf), a vectorised add instead of libtorch's
        // scalar fill loop, and nothing for the backward to do (the add passes its gradient
        // through), where `masked_fill` runs a second masked fill over the score gradients.
        Some(m) => {
            let bias = Tensor::f_zeros(m.size(), (Kind::Float, m.device()))?
                .f_masked_fill(&m.f_logical_not()?, f64::NEG_INFINITY)?
                .f_view([-1, 1, 1, t, l])?;
            bias.f_add(&widen(&raw)?)?
        }
        None => widen(&raw)?,
    };
    let probs = scores
        .f_softmax(-1, Kind::Float)?
        .f_to_kind(v.kind())?
        .f_view([b, nkv, group * t, l])?;
    Ok(reduced_matmul(&probs, v, via_f32)?.f_view([b, nq, t, hd])?)
}

/// `a @ b`; for bf16 operands with `via_f32` (the model's `bf16_products_via_f32`: a CPU whose
/// bf16 GEMM is slower than its float32 one, [`crate::cpu_kernels::Bf16Gemm::ViaF32`], where
/// libtorch's bf16 products take its scalar fallback) the operands are widened to float32,
/// multiplied there and the product rounded to bf16 once. bf16 × bf16 products are exact in
/// float32 and libtorch accumulates bf16 products in float32 too, so the two differ only by
/// summation order.
pub(crate) fn reduced_matmul(a: &Tensor, b: &Tensor, via_f32: bool) -> Result<Tensor> {
    if via_f32 && a.kind() == Kind::BFloat16 && b.kind() == Kind::BFloat16 {
        return Ok(a
            .f_to_kind(Kind::Float)?
            .f_matmul(&b.f_to_kind(Kind::Float)?)?
            .f_to_kind(Kind::BFloat16)?);
    }
    Ok(a.f_matmul(b)?)
}

/// The PEFT sites of a (possibly fused) linear's output as `(name, first column, width)`:
/// one per part of `parts` (names and widths), or the one `fused_name` over all of them.
fn site_columns<'a>(
    parts: &[(&'a str, i64)],
    fused_name: Option<&'a str>,
) -> Vec<(&'a str, i64, i64)> {
    let total: i64 = parts.iter().map(|p| p.1).sum();
    match fused_name {
        Some(name) => vec![(name, 0, total)],
        None => parts
            .iter()
            .scan(0, |at, &(name, width)| {
                *at += width;
                Some((name, *at - width, width))
            })
            .collect(),
    }
}

/// `x` split along `dim` into its first `a` and next `b` entries (views; `a + b` must be the
/// dimension's size).
fn split2(x: &Tensor, a: i64, b: i64, dim: i64) -> Result<[Tensor; 2]> {
    let parts = x.f_split_with_sizes([a, b], dim)?;
    <[Tensor; 2]>::try_from(parts)
        .map_err(|p| Error::ModelInput(format!("split into {a} + {b} gave {} parts", p.len())))
}

fn check_shape(name: &str, t: &Tensor, expected: &[i64]) -> Result<()> {
    if t.size() != expected {
        return Err(Error::TensorShape {
            tensor: name.to_string(),
            expected: expected.to_vec(),
            actual: t.size(),
        });
    }
    Ok(())
}

impl Model {
    /// Build from a config and weights by HF parameter name.
    /// Linears whose weights carry 4-bit blocks ([`crate::Weights::int4`]) get the int4 path;
    /// the others' decoding panels hold their block codes ([`crate::Weights::codes`]) where
    /// they have them.
    pub fn new(config: &ModelConfig, weights: &crate::weights::Weights) -> Result<Self> {
        let mut model = Self::from_source(
            config,
            |n| weights.get(n),
            |n| weights.contains(n),
            |n| weights.int4(n).map(Int4Blocks::shallow_clone),
            |n| weights.codes(n).map(WeightCodes::shallow_clone),
        )?;
        if let Some(head) = weights.int8("lm_head.weight") {
            let (n, k) = head.shape();
            if (n, k) != (config.vocab_size, config.hidden_size) {
                return Err(Error::TensorShape {
                    tensor: "lm_head.weight (8-bit blocks)".into(),
                    expected: vec![config.vocab_size as i64, config.hidden_size as i64],
                    actual: vec![n as i64, k as i64],
                });
            }
            if model.device == Device::Cpu {
                model.lm_head.int8 = Some(head);
                model.lm_head.panels = None;
            }
        }
        Ok(model)
    }

    /// Build from a map of HF parameter names to tensors (tests, random weights).
    pub fn from_tensors(config: &ModelConfig, tensors: &HashMap<String, Tensor>) -> Result<Self> {
        Self::from_source(
            config,
            |n| {
                tensors
                    .get(n)
                    .map(|t| t.shallow_clone())
                    .ok_or_else(|| Error::ModelInput(format!("missing tensor {n:?}")))
            },
            |n| tensors.contains_key(n),
            |_| None,
            |_| None,
        )
    }

    /// Build from a tensor getter; `get` names the missing tensor in its error. `int4` gives a
    /// linear weight's 4-bit blocks when it has them, `codes` the block codes its values were
    /// dequantised from (see [`WeightCodes`]).
    pub fn from_source(
        config: &ModelConfig,
        get: impl Fn(&str) -> Result<Tensor>,
        contains: impl Fn(&str) -> bool,
        int4: impl Fn(&str) -> Option<Int4Blocks>,
        codes: impl Fn(&str) -> Option<WeightCodes>,
    ) -> Result<Self> {
        // Blocks of a fused linear from its parts' blocks (all present, or none).
        let fused_blocks = |names: &[String]| -> Result<Option<Int4Blocks>> {
            let parts: Option<Vec<Int4Blocks>> = names.iter().map(|n| int4(n)).collect();
            match parts {
                Some(p) => Ok(Some(Int4Blocks::cat(&p.iter().collect::<Vec<_>>())?)),
                None => Ok(None),
            }
        };
        let fused_codes = |names: &[String]| -> Result<Option<WeightCodes>> {
            WeightCodes::fused(&names.iter().map(|n| codes(n)).collect::<Vec<_>>())
        };
        config.validate(std::path::Path::new("<config>"))?;
        let h = config.hidden_size as i64;
        let v = config.vocab_size as i64;
        let inter = config.intermediate_size as i64;
        let hd = config.head_dim() as i64;
        let nq = config.num_attention_heads as i64;
        let nkv = config.num_key_value_heads() as i64;
        let embed = get("model.embed_tokens.weight")?;
        check_shape("model.embed_tokens.weight", &embed, &[v, h])?;
        let device = embed.device();
        let kind = embed.kind();
        let fetch = |name: &str, shape: &[i64]| -> Result<Tensor> {
            let t = get(name)?;
            check_shape(name, &t, shape)?;
            Ok(t.f_to_device(device)?.f_to_kind(kind)?)
        };
        let fetch_bias = |name: &str, n: i64, present: bool| -> Result<Option<Tensor>> {
            if present || contains(name) {
                Ok(Some(fetch(name, &[n])?))
            } else {
                Ok(None)
            }
        };
        let mut layers = Vec::with_capacity(config.num_hidden_layers);
        let mut fused_qkv_names = false;
        let mut fused_mlp_names = false;
        let qkv_out = (nq + 2 * nkv) * hd;
        // bf16 CPU models keep a float32 copy of every linear weight (up to WIDE_MAX_BYTES)
        // where the CPU's float32 GEMM beats its bf16 one (see `cpu_kernels::Bf16Gemm`).
        let linear_params =
            config.num_hidden_layers as i64 * (qkv_out * h + h * nq * hd + 3 * inter * h) + v * h;
        let bf16_products_via_f32 = kind == Kind::BFloat16
            && device == Device::Cpu
            && crate::cpu_kernels::bf16_gemm() == crate::cpu_kernels::Bf16Gemm::ViaF32;
        let wide = bf16_products_via_f32 && linear_params.saturating_mul(4) <= WIDE_MAX_BYTES;
        for i in 0..config.num_hidden_layers {
            let p = format!("model.layers.{i}");
            let qkv = if contains(&format!("{p}.self_attn.qkv_proj.weight")) {
                fused_qkv_names = true;
                Linear::new(
                    fetch(&format!("{p}.self_attn.qkv_proj.weight"), &[qkv_out, h])?,
                    fetch_bias(&format!("{p}.self_attn.qkv_proj.bias"), qkv_out, false)?,
                    int4(&format!("{p}.self_attn.qkv_proj.weight")),
                    codes(&format!("{p}.self_attn.qkv_proj.weight")),
                    wide,
                )?
            } else {
                let q = fetch(&format!("{p}.self_attn.q_proj.weight"), &[nq * hd, h])?;
                let k = fetch(&format!("{p}.self_attn.k_proj.weight"), &[nkv * hd, h])?;
                let vv = fetch(&format!("{p}.self_attn.v_proj.weight"), &[nkv * hd, h])?;
                let bias_needed = config.qkv_bias();
                let qb = fetch_bias(&format!("{p}.self_attn.q_proj.bias"), nq * hd, bias_needed)?;
                let kb = fetch_bias(&format!("{p}.self_attn.k_proj.bias"), nkv * hd, bias_needed)?;
                let vb = fetch_bias(&format!("{p}.self_attn.v_proj.bias"), nkv * hd, bias_needed)?;
                let bias = match (qb, kb, vb) {
                    (None, None, None) => None,
                    (qb, kb, vb) => {
                        let z = |b: Option<Tensor>, n: i64| -> Result<Tensor> {
                            match b {
                                Some(b) => Ok(b),
                                None => Ok(Tensor::f_zeros([n], (kind, device))?),
                            }
                        };
                        Some(Tensor::f_cat(
                            &[z(qb, nq * hd)?, z(kb, nkv * hd)?, z(vb, nkv * hd)?],
                            0,
                        )?)
                    }
                };
                let names =
                    ["q_proj", "k_proj", "v_proj"].map(|m| format!("{p}.self_attn.{m}.weight"));
                let (blocks, codes) = (fused_blocks(&names)?, fused_codes(&names)?);
                Linear::new(Tensor::f_cat(&[q, k, vv], 0)?, bias, blocks, codes, wide)?
            };
            let o = Linear::new(
                fetch(&format!("{p}.self_attn.o_proj.weight"), &[h, nq * hd])?,
                fetch_bias(&format!("{p}.self_attn.o_proj.bias"), h, config.o_bias())?,
                int4(&format!("{p}.self_attn.o_proj.weight")),
                codes(&format!("{p}.self_attn.o_proj.weight")),
                wide,
            )?;
            let gate_up = if contains(&format!("{p}.mlp.gate_up_proj.weight")) {
                fused_mlp_names = true;
                Linear::new(
                    fetch(&format!("{p}.mlp.gate_up_proj.weight"), &[2 * inter, h])?,
                    None,
                    int4(&format!("{p}.mlp.gate_up_proj.weight")),
                    codes(&format!("{p}.mlp.gate_up_proj.weight")),
                    wide,
                )?
            } else {
                let g = fetch(&format!("{p}.mlp.gate_proj.weight"), &[inter, h])?;
                let u = fetch(&format!("{p}.mlp.up_proj.weight"), &[inter, h])?;
                let gb = fetch_bias(&format!("{p}.mlp.gate_proj.bias"), inter, config.mlp_bias())?;
                let ub = fetch_bias(&format!("{p}.mlp.up_proj.bias"), inter, config.mlp_bias())?;
                let bias = match (gb, ub) {
                    (Some(a), Some(b)) => Some(Tensor::f_cat(&[a, b], 0)?),
                    _ => None,
                };
                let names = ["gate_proj", "up_proj"].map(|m| format!("{p}.mlp.{m}.weight"));
                let (blocks, codes) = (fused_blocks(&names)?, fused_codes(&names)?);
                Linear::new(Tensor::f_cat(&[g, u], 0)?, bias, blocks, codes, wide)?
            };
            let down = Linear::new(
                fetch(&format!("{p}.mlp.down_proj.weight"), &[h, inter])?,
                fetch_bias(&format!("{p}.mlp.down_proj.bias"), h, config.mlp_bias())?,
                int4(&format!("{p}.mlp.down_proj.weight")),
                codes(&format!("{p}.mlp.down_proj.weight")),
                wide,
            )?;
            layers.push(Layer {
                input_norm: fetch(&format!("{p}.input_layernorm.weight"), &[h])?,
                post_norm: fetch(&format!("{p}.post_attention_layernorm.weight"), &[h])?,
                qkv,
                o,
                gate_up,
                down,
                sliding_window: config.sliding_window_for_layer(i),
            });
        }
        let norm = fetch("model.norm.weight", &[h])?;
        // The embedding lookup reads one row per token and does not mind the strides, so a tied
        // head keeps a single copy in the layout that is fastest for the `lm_head` GEMV.
        let (embed, lm_head) = if config.tie_word_embeddings() {
            let head = Linear::new(
                embed.f_to_device(device)?.f_to_kind(kind)?,
                None,
                None,
                codes("lm_head.weight"),
                wide,
            )?;
            (head.weight.shallow_clone(), head)
        } else {
            (
                embed,
                Linear::new(
                    fetch("lm_head.weight", &[v, h])?,
                    None,
                    None,
                    codes("lm_head.weight"),
                    wide,
                )?,
            )
        };
        let rot = config.rotary_dim();
        let theta = config.rope_theta();
        let kind_rope = config.rope_kind().map_err(|m| Error::ConfigField {
            file: "<config>".into(),
            field: "rope_scaling".into(),
            message: m,
        })?;
        let base_inv: Vec<f64> = (0..rot / 2)
            .map(|i| 1.0 / theta.powf((2 * i) as f64 / rot as f64))
            .collect();
        let (inv, inv_long, scale) = match &kind_rope {
            RopeKind::Default | RopeKind::Dynamic { .. } => (base_inv.clone(), None, 1.0),
            RopeKind::Linear { factor } => {
                (base_inv.iter().map(|f| f / factor).collect(), None, 1.0)
            }
            RopeKind::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                let old = *original_max_position_embeddings as f64;
                let low_wl = old / low_freq_factor;
                let high_wl = old / high_freq_factor;
                let inv = base_inv
                    .iter()
                    .map(|&f| {
                        let wl = 2.0 * std::f64::consts::PI / f;
                        let scaled = if wl > low_wl { f / factor } else { f };
                        let smooth =
                            (old / wl - low_freq_factor) / (high_freq_factor - low_freq_factor);
                        let medium = wl >= high_wl && wl <= low_wl;
                        if medium {
                            (1.0 - smooth) * scaled / factor + smooth * scaled
                        } else {
                            scaled
                        }
                    })
                    .collect();
                (inv, None, 1.0)
            }
            RopeKind::LongRope {
                long_factor,
                short_factor,
                attention_factor,
                ..
            } => {
                let short = base_inv
                    .iter()
                    .zip(short_factor)
                    .map(|(f, s)| f / s)
                    .collect();
                let long: Vec<f64> = base_inv
                    .iter()
                    .zip(long_factor)
                    .map(|(f, s)| f / s)
                    .collect();
                (short, Some(long), *attention_factor)
            }
        };
        // HF computes inv_freq in float32 from the float64 formula's float32 cast.
        let to_t = |v: &[f64]| -> Result<Tensor> {
            let f: Vec<f32> = v.iter().map(|&x| x as f32).collect();
            Ok(Tensor::f_from_slice(&f)?.f_to(device)?)
        };
        Ok(Self {
            config: config.clone(),
            embed,
            layers,
            norm,
            lm_head,
            inv_freq: to_t(&inv)?,
            inv_freq_long: match inv_long {
                Some(l) => Some(to_t(&l)?),
                None => None,
            },
            rope_scale: scale,
            device,
            kind,
            bf16_products_via_f32,
            fused_qkv_names,
            fused_mlp_names,
        })
    }

    /// Number of linears that have a 4-bit copy in use.
    pub fn int4_linears(&self) -> usize {
        self.layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .filter(|lin| lin.int4.is_some())
            .count()
    }

    /// Number of linears, the output head included, that keep a panel copy for products of a
    /// few rows ([`crate::cpu_kernels::PanelWeight`]).
    pub fn panel_linears(&self) -> usize {
        self.panels().count()
    }

    /// The bytes the panel copies take: half of a float32 model's where its weights are all
    /// bf16 or f16 values (a bf16 or f16 checkpoint loaded in float32), which its panels then
    /// store.
    pub fn panel_bytes(&self) -> usize {
        self.panels().map(|p| p.bytes()).sum()
    }

    /// The kind each panel copy is stored in (see
    /// [`crate::cpu_kernels::PanelWeight::stored_kind`]), the layers' linears in order, then
    /// the head.
    pub fn panel_kinds(&self) -> Vec<Kind> {
        self.panels().map(|p| p.stored_kind()).collect()
    }

    fn panels(&self) -> impl Iterator<Item = &crate::cpu_kernels::PanelWeight> {
        self.layers
            .iter()
            .flat_map(|l| [&l.qkv, &l.o, &l.gate_up, &l.down])
            .chain([&self.lm_head])
            .filter_map(|lin| lin.panels.as_ref())
    }

    /// Whether the output head runs from 8-bit blocks for forwards of a few rows (a Q8_0
    /// GGUF's own head, loaded in int4 mode on the CPU).
    pub fn int8_head(&self) -> bool {
        self.lm_head.int8.is_some()
    }

    /// The configuration.
    pub fn config(&self) -> &ModelConfig {
        &self.config
    }

    /// Device of the weights.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Element kind of the weights and activations.
    pub fn kind(&self) -> Kind {
        self.kind
    }

    /// An empty KV cache for `batch` rows with room for `capacity` slots.
    pub fn new_cache(&self, batch: usize, capacity: usize) -> Result<KvCache> {
        KvCache::new(
            self.layers.len(),
            batch,
            self.config.num_key_value_heads(),
            self.config.head_dim(),
            capacity,
            self.device,
            self.kind,
        )
    }

    /// A layer's queries and keys after RoPE and its values, `[B, heads, T, hd]`, from its
    /// normed input `h` (`[B, T, H]`, or packed `[N, H]` that `unpack` restores to `[B, T, ..]`)
    /// for a batch `[b, t]` with the step's RoPE tables `[cos, sin]`.
    #[allow(clippy::too_many_arguments)]
    fn queries_keys_values(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        delta: Option<&dyn LinearDelta>,
        unpack: &dyn Fn(Tensor) -> Result<Tensor>,
        [b, t]: [i64; 2],
        [cos, sin]: [&Tensor; 2],
    ) -> Result<[Tensor; 3]> {
        let (nq, nkv, hd) = self.head_dims();
        // q and k are the leading columns of the fused output, so RoPE runs on a view of
        // it (no split, no concatenation).
        let y = unpack(self.project(
            li,
            h,
            &layer.qkv,
            &[
                ("q_proj", nq * hd),
                ("k_proj", nkv * hd),
                ("v_proj", nkv * hd),
            ],
            self.fused_qkv_names.then_some("qkv_proj"),
            delta,
        )?)?;
        // Splits, not narrows: under autograd a split's backward is one concatenation of
        // the parts' gradients, where each narrow's fills a zeroed full-width tensor and
        // the engine then adds the two.
        let [qk, v] = split2(&y, (nq + nkv) * hd, nkv * hd, -1)?;
        let qk = qk.f_view([b, t, nq + nkv, hd])?.f_transpose(1, 2)?;
        let v = v.f_view([b, t, nkv, hd])?.f_transpose(1, 2)?;
        let qk = self.apply_rope(&qk, cos, sin)?;
        let [q, k] = split2(&qk, nq, nkv, 1)?;
        Ok([q, k, v])
    }

    /// A layer's MLP on its normed input `h`: `[gate_up, silu(gate) * up, down(..)]`.
    fn mlp(
        &self,
        li: usize,
        layer: &Layer,
        h: &Tensor,
        delta: Option<&dyn LinearDelta>,
    ) -> Result<[Tensor; 3]> {
        let inter = self.config.intermediate_size as i64;
        let gate_up = self.project(
            li,
            h,
            &layer.gate_up,
            &[("gate_proj", inter), ("up_proj", inter)],
            self.fused_mlp_names.then_some("gate_up_proj"),
            delta,
        )?;
        let [gate, up] = split2(&gate_up, inter, inter, -1)?;
        // On the CPU: `silu(gate) * up` in one pass, rounded at the same points.
        let act = match crate::cpu_kernels::silu_mul(&gate, &up)? {
            Some(act) => act,
            None => gate.f_silu()?.f_mul(&up)?,
        };
        let d = self.project(
            li,
            &act,
            &layer.down,
            &[("down_proj", self.config.hidden_size as i64)],
            None,
            delta,
        )?;
        Ok([gate_up, act, d])
    }

    /// (query heads, key/value heads, head dimension).
    fn head_dims(&self) -> (i64, i64, i64) {
        (
            self.config.num_attention_heads as i64,
            self.config.num_key_value_heads() as i64,
            self.config.head_dim() as i64,
        )
    }

    /// RMSNorm as HF's `LlamaRMSNorm` (float32 inside): the fused CPU kernel for a few rows
    /// without gradients ([`crate::cpu_kernels::rms_norm`]), libtorch's op otherwise.
    fn rms_norm(&self, x: &Tensor, weight: &Tensor) -> Result<Tensor> {
        if let Some(y) = crate::cpu_kernels::rms_norm(x, weight, self.config.rms_norm_eps())? {
            return Ok(y);
        }
        let h = x.size().last().copied().unwrap_or(0);
        Ok(x.f_rms_norm([h], Some(weight), self.config.rms_norm_eps())?)
    }

    /// `(x + delta, rms_norm(x + delta))`: one kernel call when decoding on the CPU, else the
    /// two ops.
    fn add_rms_norm(
        &self,
        x: &Tensor,
        delta: &Tensor,
        weight: &Tensor,
    ) -> Result<(Tensor, Tensor)> {
        let eps = self.config.rms_norm_eps();
        if let Some(pair) = crate::cpu_kernels::add_rms_norm(x, delta, weight, eps)? {
            return Ok(pair);
        }
        let sum = x.f_add(delta)?;
        let normed = self.rms_norm(&sum, weight)?;
        Ok((sum, normed))
    }

    /// cos/sin `[B, 1, T, rot]` for positions `[B, T]`, as HF computes them (float32, then cast);
    /// the first half of `sin` is negated (see [`Self::apply_rope`]).
    fn rope_tables(&self, positions: &Tensor, max_len: i64) -> Result<(Tensor, Tensor)> {
        let mut inv = match (&self.inv_freq_long, self.config.rope_kind()) {
            (
                Some(long),
                Ok(RopeKind::LongRope {
                    original_max_position_embeddings,
                    ..
                }),
            ) if max_len > original_max_position_embeddings as i64 => long.shallow_clone(),
            _ => self.inv_freq.shallow_clone(),
        };
        if let Ok(RopeKind::Dynamic { factor }) = self.config.rope_kind() {
            let max_pos = self.config.max_position_embeddings() as f64;
            if max_len as f64 > max_pos {
                let rot = self.config.rotary_dim() as f64;
                let base = self.config.rope_theta()
                    * ((factor * max_len as f64 / max_pos) - (factor - 1.0))
                        .powf(rot / (rot - 2.0));
                let v: Vec<f32> = (0..(rot as usize) / 2)
                    .map(|i| (1.0 / base.powf((2 * i) as f64 / rot)) as f32)
                    .collect();
                inv = Tensor::f_from_slice(&v)?.f_to(self.device)?;
            }
        }
        let freqs = positions
            .f_to_kind(Kind::Float)?
            .f_unsqueeze(-1)?
            .f_mul(&inv)?;
        let emb = Tensor::f_cat(&[&freqs, &freqs], -1)?;
        let mut cos = emb.f_cos()?;
        let mut sin = emb.f_sin()?;
        if self.rope_scale != 1.0 {
            cos = cos.f_mul_scalar(self.rope_scale)?;
            sin = sin.f_mul_scalar(self.rope_scale)?;
        }
        // `rotate_half(x) * sin == roll(x, half) * [-sin_lo, sin_hi]`: fold the sign into the
        // table once per step so each layer's RoPE is a roll, two products and a sum.
        let half = self.config.rotary_dim() as i64 / 2;
        let sin = Tensor::f_cat(
            &[
                sin.f_narrow(-1, 0, half)?.f_neg()?,
                sin.f_narrow(-1, half, half)?,
            ],
            -1,
        )?;
        Ok((
            cos.f_to_kind(self.kind)?.f_unsqueeze(1)?,
            sin.f_to_kind(self.kind)?.f_unsqueeze(1)?,
        ))
    }

    /// RoPE on `x` `[B, heads, T, head_dim]` with `cos` and the sign-folded `sin` of
    /// [`Self::rope_tables`].
    fn apply_rope(&self, x: &Tensor, cos: &Tensor, sin: &Tensor) -> Result<Tensor> {
        let rot = self.config.rotary_dim() as i64;
        let hd = self.config.head_dim() as i64;
        // Decoding on the CPU: the same products and sums in one pass (bit-identical).
        if let Some(y) = crate::cpu_kernels::rope(x, cos, sin, rot as usize)? {
            return Ok(y);
        }
        let (xr, pass) = if rot < hd {
            (
                x.f_narrow(-1, 0, rot)?,
                Some(x.f_narrow(-1, rot, hd - rot)?),
            )
        } else {
            (x.shallow_clone(), None)
        };
        let half = rot / 2;
        // roll by half = cat(x2, x1); with the sign in `sin` this is cat(-x2, x1) * sin exactly.
        let mut rotated = xr.f_roll([half], [-1])?;
        let _ = rotated.f_mul_(sin)?;
        let mut out = xr.f_mul(cos)?;
        let _ = out.f_add_(&rotated)?;
        Ok(match pass {
            Some(p) => Tensor::f_cat(&[&out, &p], -1)?,
            None => out,
        })
    }

    /// A target linear with its LoRA deltas, `[..., Σ widths]`: `lin` is the (possibly fused)
    /// weight, `parts` the PEFT module names and output widths it splits into, `fused_name`
    /// the one PEFT name of the whole output where the checkpoint fuses it (Phi-3). Deltas
    /// the [`LinearDelta`] cannot add in place are added out of place, part by part.
    fn project(
        &self,
        layer: usize,
        x: &Tensor,
        lin: &Linear,
        parts: &[(&str, i64)],
        fused_name: Option<&str>,
        delta: Option<&dyn LinearDelta>,
    ) -> Result<Tensor> {
        let y = lin.forward(x)?;
        let Some(d) = delta else {
            return Ok(y);
        };
        let sites = site_columns(parts, fused_name);
        // Each site's view of the output, and its delta when that could not go in place.
        let mut parts_left = Vec::with_capacity(sites.len());
        for &(name, at, width) in &sites {
            let view = y.f_narrow(-1, at, width)?;
            let left = if d.add_delta_in_place(layer, name, x, &view)? {
                None
            } else {
                d.delta(layer, name, x)?
            };
            parts_left.push((view, left));
        }
        if parts_left.iter().all(|(_, left)| left.is_none()) {
            return Ok(y);
        }
        let mut pieces = Vec::with_capacity(parts_left.len());
        for (view, left) in parts_left {
            pieces.push(match left {
                Some(dy) => view.f_add(&dy)?,
                None => view,
            });
        }
        Ok(match <[Tensor; 1]>::try_from(pieces) {
            Ok([whole]) => whole,
            Err(pieces) => Tensor::f_cat(&pieces, -1)?,
        })
    }

    fn pick_logits(&self, hidden: &Tensor, at: &LogitsAt) -> Result<Tensor> {
        let (b, t) = (hidden.size()[0], hidden.size()[1]);
        let sel = match at {
            LogitsAt::None => return Ok(Tensor::f_empty([0], (self.kind, self.device))?),
            LogitsAt::All => hidden.shallow_clone(),
            LogitsAt::Last => hidden.f_select(1, t - 1)?,
            LogitsAt::PerRow(cols) => {
                if cols.len() as i64 != b || cols.iter().any(|&c| c as i64 >= t) {
                    return Err(Error::ModelInput(format!(
                        "per-row logit columns {cols:?} for batch {b} x {t}"
                    )));
                }
                let idx: Vec<i64> = cols
                    .iter()
                    .enumerate()
                    .map(|(r, &c)| r as i64 * t + c as i64)
                    .collect();
                let idx = Tensor::f_from_slice(&idx)?.f_to(self.device)?;
                hidden.f_reshape([b * t, -1])?.f_index_select(0, &idx)?
            }
        };
        let sel = self.rms_norm(&sel, &self.norm)?;
        self.lm_head.forward(&sel)
    }

    /// Run `ids` (`[B, T]` int64) through the model on top of `cache`, appending
    /// their keys/values. `valid` (row-major `[B, T]`, `None` = all real) marks
    /// padding slots, which take no position and are never attended to. Returns
    /// logits (model dtype) at the positions `at` asks for.
    pub fn forward_cached(
        &self,
        ids: &Tensor,
        valid: Option<&[bool]>,
        cache: &mut KvCache,
        at: &LogitsAt,
        delta: Option<&dyn LinearDelta>,
    ) -> Result<Tensor> {
        let _span = tracing::trace_span!("lm_forward", t = ids.size().get(1).copied().unwrap_or(0))
            .entered();
        let size = ids.size();
        if size.len() != 2 || size[0] as usize != cache.batch() {
            return Err(Error::ModelInput(format!(
                "ids shape {size:?} for a cache of batch {}",
                cache.batch()
            )));
        }
        let (b, t) = (size[0], size[1]);
        let all_valid;
        let valid = match valid {
            Some(v) => v,
            None => {
                all_valid = vec![true; (b * t) as usize];
                &all_valid
            }
        };
        let start = cache.len() as i64;
        let (positions, _) = cache.append_slots(valid, t as usize)?;
        let total = start + t;
        let key_valid = cache.slots_view(total, true)?;
        let key_pos = cache.slots_view(total, false)?;
        let everything_valid = valid.iter().all(|&x| x) && start == 0;
        let max_len = cache.next_positions().iter().copied().max().unwrap_or(0);
        let (cos, sin) = self.rope_tables(&positions, max_len)?;
        // Pure causal prefill without padding: let SDPA use its causal kernel.
        let use_causal_flag = everything_valid && t > 1;
        let decode_no_pad = t == 1 && !cache.has_padding();
        let any_window = self.layers.iter().any(|l| l.sliding_window.is_some());
        let needs_masks = any_window || !(use_causal_flag || decode_no_pad);
        // One new token per row on the CPU: libtorch's flash-attention kernel runs one tiny
        // GEMV per (row, head) through MKL, which in bf16 is several times slower than the
        // whole step's weight GEMVs at batch 8 (see `eager_attention`; float32 too since
        // session 7).
        let reduced_cpu_decode = t == 1 && self.device == Device::Cpu;
        // Training in bf16 on the CPU: the eager products (oneDNN's bf16 GEMMs) with autograd
        // beat SDPA's forward and backward (see `eager_attention`).
        // Only up to `EAGER_TRAINING_MAX_SCORES` scores per layer: eager keeps its float32
        // soft-max for the backward, and on long MuSiQue-Full prompts that doubled peak memory
        // (12.0 against 6.7 GB) and ran slower (182.9 against 154.4 s for 6 episodes).
        let eager_cpu_training = self.device == Device::Cpu
            && self.kind == Kind::BFloat16
            && b * self.config.num_attention_heads as i64 * t * (start + t)
                <= EAGER_TRAINING_MAX_SCORES;

        // Masks [B, 1, T, total]: key j visible to query slot start+i iff it is a real token at or
        // before it (and inside the sliding window); the query's own slot is always visible so
        // padding rows never have an empty softmax.
        let (q_slot, k_slot) = if needs_masks {
            (
                Tensor::f_arange_start(start, total, (Kind::Int64, self.device))?
                    .f_view([1, 1, t, 1])?,
                Tensor::f_arange(total, (Kind::Int64, self.device))?.f_view([1, 1, 1, total])?,
            )
        } else {
            (Tensor::new(), Tensor::new())
        };
        let mut base_mask = None;
        let mut window_masks: HashMap<usize, Tensor> = HashMap::new();
        if needs_masks {
            let causal = k_slot.f_le_tensor(&q_slot)?;
            let diag = k_slot.f_eq_tensor(&q_slot)?;
            let base = causal
                .f_logical_and(&key_valid.f_view([b, 1, 1, total])?)?
                .f_logical_or(&diag)?;
            for layer in &self.layers {
                if let Some(w) = layer.sliding_window {
                    if let std::collections::hash_map::Entry::Vacant(e) = window_masks.entry(w) {
                        let qp = positions.f_view([b, 1, t, 1])?;
                        let kp = key_pos.f_view([b, 1, 1, total])?;
                        let inside = qp.f_sub(&kp)?.f_lt(w as i64)?;
                        e.insert(base.f_logical_and(&inside)?.f_logical_or(&diag)?);
                    }
                }
            }
            base_mask = Some(base);
        }

        let (nq, nkv, hd) = self.head_dims();
        // A padded prompt batch: the linears, norms and the MLP run over its real tokens only;
        // a delta that differs by row then applies token by token.
        let mut packing = (t > 1)
            .then(|| Packing::new(valid, b, t, self.device))
            .transpose()?
            .flatten();
        let token_delta = match (&packing, delta) {
            (Some(_), Some(d)) if !d.row_independent() => {
                let token_rows: Vec<usize> = valid
                    .iter()
                    .enumerate()
                    .filter_map(|(slot, &v)| v.then_some(slot / t as usize))
                    .collect();
                let packed = d.for_packed_tokens(&token_rows);
                if packed.is_none() {
                    packing = None;
                }
                packed
            }
            _ => None,
        };
        let last = self.last_layer_reads(at, valid, (b, t), packing.as_ref(), delta)?;
        let delta = token_delta.as_deref().or(delta);
        let pack = |x: &Tensor| -> Result<Tensor> {
            match &packing {
                Some(p) => p.pack(x),
                None => Ok(x.shallow_clone()),
            }
        };
        let unpack = |y: Tensor| -> Result<Tensor> {
            match &packing {
                Some(p) => p.unpack(&y),
                None => Ok(y),
            }
        };
        let mut x = Tensor::f_embedding(&self.embed, &pack(ids)?, -1, false, false)?;
        // The previous layer's MLP output, added to `x` together with the next RMSNorm.
        let mut pending: Option<Tensor> = None;
        let layers = self.layers.len();
        for (li, layer) in self.layers.iter().enumerate() {
            // The last layer's output is read at `last`'s positions only (when it is `Some`).
            let reads = last.as_ref().filter(|_| li + 1 == layers);
            let h = match pending.take() {
                Some(d) => {
                    let (sum, h) = self.add_rms_norm(&x, &d, &layer.input_norm)?;
                    x = sum;
                    h
                }
                None => self.rms_norm(&x, &layer.input_norm)?,
            };
            // q and k are the leading columns of the fused output, so RoPE runs on a view of
            // it (no split, no concatenation).
            let [q, k, v] =
                self.queries_keys_values(li, layer, &h, delta, &unpack, [b, t], [&cos, &sin])?;
            let (kk, vv) = cache.write_layer(li, start as usize, &k, &v)?;
            if reads.is_some_and(|r| r.index.numel() == 0) {
                // Nothing reads this layer's output: its keys and values are all it gives.
                cache.commit(t as usize);
                return self.pick_logits(&x, &LogitsAt::None);
            }
            let windowed = layer.sliding_window.and_then(|w| window_masks.get(&w));
            // `None` only without padding and window: causal visibility is all there is.
            let mask = windowed.or(base_mask.as_ref());
            let prompt_kernel = if t > 1 && self.device == Device::Cpu {
                let queries = reads.map_or(valid, |r| r.queries.as_slice());
                crate::cpu_kernels::attention(&q, &kk, &vv, mask, Some(queries), start as usize)?
            } else {
                None
            };
            let attn = if let Some(attn) = prompt_kernel {
                attn
            } else if reduced_cpu_decode
                || (eager_cpu_training
                    && (q.requires_grad() || kk.requires_grad() || vv.requires_grad()))
            {
                eager_attention(&q, &kk, &vv, mask, (start, nkv), self.bf16_products_via_f32)?
            } else if windowed.is_none() && use_causal_flag {
                Tensor::f_scaled_dot_product_attention::<Tensor>(
                    &q,
                    &kk,
                    &vv,
                    None,
                    0.0,
                    true,
                    None,
                    nkv != nq,
                )?
            } else if windowed.is_none() && decode_no_pad {
                Tensor::f_scaled_dot_product_attention::<Tensor>(
                    &q,
                    &kk,
                    &vv,
                    None,
                    0.0,
                    false,
                    None,
                    nkv != nq,
                )?
            } else {
                // Masks exist whenever neither mask-free branch above applies (`needs_masks`).
                let mask = windowed.or(base_mask.as_ref()).ok_or_else(|| {
                    Error::ModelInput("attention mask missing for a padded batch".into())
                })?;
                Tensor::f_scaled_dot_product_attention(
                    &q,
                    &kk,
                    &vv,
                    Some(mask),
                    0.0,
                    false,
                    None,
                    nkv != nq,
                )?
            };
            let mut attn = pack(&attn.f_transpose(1, 2)?.f_reshape([b, t, nq * hd])?)?;
            let mut delta = delta;
            if let Some(r) = reads {
                // From here on, the read positions only, in the logits' row order.
                let pick = |y: &Tensor| -> Result<Tensor> {
                    let width = y.size().last().copied().unwrap_or(0);
                    Ok(y.f_reshape([-1, width])?.f_index_select(0, &r.index)?)
                };
                attn = pick(&attn)?;
                x = pick(&x)?;
                delta = r.delta.as_deref().or(delta);
            }
            let o = self.project(
                li,
                &attn,
                &layer.o,
                &[("o_proj", self.config.hidden_size as i64)],
                None,
                delta,
            )?;
            let (sum, h) = self.add_rms_norm(&x, &o, &layer.post_norm)?;
            x = sum;
            let [_, _, d] = self.mlp(li, layer, &h, delta)?;
            pending = Some(d);
        }
        if let Some(d) = pending {
            x = x.f_add(&d)?;
        }
        cache.commit(t as usize);
        if last.is_some() {
            // `x` holds the read positions' hidden states, `[R, H]` in row order.
            return self.pick_logits(&x, &LogitsAt::All);
        }
        let x = unpack(x)?;
        self.pick_logits(&x, at)
    }

    /// Where the logits of a prompt pass (`t > 1`) read the last layer's output at a few
    /// positions (`Last`, `PerRow`, or none at all), which those are: only they need that
    /// layer's attention output, output projection and MLP, while every position's keys and
    /// values are still written. `None` (every position runs) for `All`, single-token steps,
    /// a read position that is padding or out of range (left to [`Self::pick_logits`] to
    /// report), and a delta that differs by row and has no per-token form.
    fn last_layer_reads<'d>(
        &self,
        at: &LogitsAt,
        valid: &[bool],
        (b, t): (i64, i64),
        packing: Option<&Packing>,
        delta: Option<&'d dyn LinearDelta>,
    ) -> Result<Option<LastLayerReads<'d>>> {
        let (b, t) = (b as usize, t as usize);
        let slots: Vec<usize> = match at {
            _ if t < 2 => return Ok(None),
            LogitsAt::All => return Ok(None),
            LogitsAt::None => Vec::new(),
            LogitsAt::Last => (0..b).map(|r| r * t + t - 1).collect(),
            LogitsAt::PerRow(cols) => {
                if cols.len() != b || cols.iter().any(|&c| c >= t) {
                    return Ok(None);
                }
                cols.iter().enumerate().map(|(r, &c)| r * t + c).collect()
            }
        };
        if slots
            .iter()
            .any(|&s| !valid.get(s).copied().unwrap_or(false))
        {
            return Ok(None);
        }
        let index: Vec<i64> = match packing {
            Some(p) => match slots
                .iter()
                .map(|&s| p.slot_rows.get(s).copied().flatten().map(i64::from))
                .collect::<Option<Vec<i64>>>()
            {
                Some(index) => index,
                None => return Ok(None),
            },
            None => slots.iter().map(|&s| s as i64).collect(),
        };
        let delta = match delta {
            Some(d) if !d.row_independent() => {
                let rows: Vec<usize> = slots.iter().map(|&s| s / t).collect();
                match d.for_packed_tokens(&rows) {
                    Some(per_read) => Some(per_read),
                    None => return Ok(None),
                }
            }
            _ => None,
        };
        let mut queries = vec![false; b * t];
        for &s in &slots {
            queries[s] = true;
        }
        Ok(Some(LastLayerReads {
            index: Tensor::f_from_slice(&index)?.f_to(self.device)?,
            queries,
            delta,
        }))
    }

    /// Full forward without a cache (training and reference checks): `ids`
    /// `[B, T]`, `attention_mask` `[B, T]` (1 = real token; left or right
    /// padding), returns logits `[B, T, V]` in the model dtype. Gradients flow
    /// when enabled (e.g. through a LoRA delta).
    pub fn forward(
        &self,
        ids: &Tensor,
        attention_mask: &Tensor,
        delta: Option<&dyn LinearDelta>,
    ) -> Result<Tensor> {
        let size = ids.size();
        if size.len() != 2 || attention_mask.size() != size {
            return Err(Error::ModelInput(format!(
                "ids shape {size:?} and attention mask shape {:?} must be equal [B, T]",
                attention_mask.size()
            )));
        }
        let mask: Vec<i64> =
            Vec::<i64>::try_from(attention_mask.f_to_kind(Kind::Int64)?.f_flatten(0, -1)?)?;
        let valid: Vec<bool> = mask.iter().map(|&m| m != 0).collect();
        let mut cache = self.new_cache(size[0] as usize, size[1] as usize)?;
        self.forward_cached(
            &ids.f_to(self.device)?,
            Some(&valid),
            &mut cache,
            &LogitsAt::All,
            delta,
        )
    }
}

/// The model's adaptable linear weights, for merging a LoRA adapter into the base
/// (single-adapter deployment) and unmerging it. Fused projections (`qkv_proj`,
/// `gate_up_proj`) are stored fused; their parts are row views that share storage,
/// so an in-place update of a part updates the fused weight.
impl flowtune_lora::BaseLinears for Model {
    fn base_weight(&mut self, site: &flowtune_lora::Site) -> Option<Tensor> {
        use flowtune_lora::Module;
        let q = (self.config.num_attention_heads * self.config.head_dim()) as i64;
        let kv = (self.config.num_key_value_heads() * self.config.head_dim()) as i64;
        let inter = self.config.intermediate_size as i64;
        let layer = self.layers.get_mut(site.layer)?;
        // The caller may change the dense weight (merging an adapter): its 4-bit and float32
        // copies would go stale, so that linear goes back to the dense bf16 path.
        match site.module {
            Module::QProj | Module::KProj | Module::VProj | Module::QkvProj => {
                layer.qkv.drop_copies()
            }
            Module::OProj => layer.o.drop_copies(),
            Module::GateProj | Module::UpProj | Module::GateUpProj => layer.gate_up.drop_copies(),
            Module::DownProj => layer.down.drop_copies(),
        }
        let w = match site.module {
            Module::QProj => layer.qkv.weight.narrow(0, 0, q),
            Module::KProj => layer.qkv.weight.narrow(0, q, kv),
            Module::VProj => layer.qkv.weight.narrow(0, q + kv, kv),
            Module::QkvProj => layer.qkv.weight.shallow_clone(),
            Module::OProj => layer.o.weight.shallow_clone(),
            Module::GateProj => layer.gate_up.weight.narrow(0, 0, inter),
            Module::UpProj => layer.gate_up.weight.narrow(0, inter, inter),
            Module::GateUpProj => layer.gate_up.weight.shallow_clone(),
            Module::DownProj => layer.down.weight.shallow_clone(),
        };
        Some(w)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Packing keeps exactly the valid slots in row-major order and unpacking puts them back
    /// (zeros elsewhere); a batch with under 1/32 padding is not packed.
    #[test]
    fn packing_round_trips_the_real_tokens() -> Result<()> {
        let valid = [false, true, true, true, true, false, false, true];
        let p = Packing::new(&valid, 2, 4, Device::Cpu)?.ok_or_else(|| {
            Error::ModelInput("a batch with 3 padding slots of 8 must be packed".into())
        })?;
        let x = Tensor::f_arange(24, (Kind::Float, Device::Cpu))?.f_view([2, 4, 3])?;
        let packed = p.pack(&x)?;
        assert_eq!(packed.size(), [5, 3]);
        let firsts: Vec<f32> = Vec::try_from(packed.f_select(1, 0)?)?;
        assert_eq!(firsts, [3.0, 6.0, 9.0, 12.0, 21.0]);
        let back = p.unpack(&packed)?;
        let mask = Tensor::f_from_slice(&valid)?.f_view([2, 4, 1])?;
        let expected = x.f_mul(&mask.f_to_kind(Kind::Float)?)?;
        assert!(back.equal(&expected));
        let ids = Tensor::f_arange(8, (Kind::Int64, Device::Cpu))?.f_view([2, 4])?;
        let ids: Vec<i64> = Vec::try_from(p.pack(&ids)?)?;
        assert_eq!(ids, [1, 2, 3, 4, 7]);

        let mut mostly = vec![true; 64];
        mostly[0] = false;
        assert!(Packing::new(&mostly, 2, 32, Device::Cpu)?.is_none());
        mostly[1] = false;
        assert!(Packing::new(&mostly, 2, 32, Device::Cpu)?.is_some());
        Ok(())
    }

    /// The eager attention's training form (gradients on, so the CPU kernel declines) against
    /// the plain formulation it replaced (float32 scores scaled after the product, `masked_fill`
    /// with -inf, soft-max, the product with `v`): outputs and the gradients of `q`, `k` and `v`
    /// are the same bits (no tolerance), in bf16 and float32, with a head size whose scale is a
    /// power of two (64: the scale moves onto `q`) and one whose is not (48), with a padding
    /// mask and with the causal mask built inside.
    #[test]
    fn eager_attention_training_form_is_bit_identical_to_the_plain_one() -> Result<()> {
        let plain = |q: &Tensor, k: &Tensor, v: &Tensor, visible: &Tensor| -> Result<Tensor> {
            let (b, nq, t, hd) = (q.size()[0], q.size()[1], q.size()[2], q.size()[3]);
            let (nkv, l) = (k.size()[1], k.size()[2]);
            let group = nq / nkv;
            let scores = q
                .f_reshape([b, nkv, group * t, hd])?
                .f_matmul(&k.f_transpose(-1, -2)?)?
                .f_to_kind(Kind::Float)?
                .f_mul_scalar(1.0 / (hd as f64).sqrt())?
                .f_view([b, nkv, group, t, l])?
                .f_masked_fill(
                    &visible.f_logical_not()?.f_view([-1, 1, 1, t, l])?,
                    f64::NEG_INFINITY,
                )?;
            let probs = scores
                .f_softmax(-1, Kind::Float)?
                .f_to_kind(v.kind())?
                .f_view([b, nkv, group * t, l])?;
            Ok(probs.f_matmul(v)?.f_view([b, nq, t, hd])?)
        };
        for kind in [Kind::BFloat16, Kind::Float] {
            for hd in [64i64, 48] {
                for padded in [true, false] {
                    tch::manual_seed(hd + padded as i64);
                    let (b, nq, nkv, t, start) = (2i64, 6i64, 2i64, 5i64, 3i64);
                    let l = start + t;
                    let leaf = |heads: i64, len: i64| -> Result<Tensor> {
                        Ok(Tensor::f_randn([b, heads, len, hd], (kind, Device::Cpu))?
                            .set_requires_grad(true))
                    };
                    let (q, k, v) = (leaf(nq, t)?, leaf(nkv, l)?, leaf(nkv, l)?);
                    // Causal, and row 1's first two keys padding (the diagonal stays visible).
                    let qi = Tensor::f_arange_start(start, l, (Kind::Int64, Device::Cpu))?
                        .f_view([1, 1, t, 1])?;
                    let kj =
                        Tensor::f_arange(l, (Kind::Int64, Device::Cpu))?.f_view([1, 1, 1, l])?;
                    let mut real = vec![true; (b * l) as usize];
                    real[l as usize] = false;
                    real[l as usize + 1] = false;
                    let real = Tensor::f_from_slice(&real)?.f_view([b, 1, 1, l])?;
                    let causal = kj.f_le_tensor(&qi)?;
                    let visible = causal
                        .f_logical_and(&real)?
                        .f_logical_or(&kj.f_eq_tensor(&qi)?)?;
                    let (mask, reference_mask) = if padded {
                        (Some(&visible), visible.shallow_clone())
                    } else {
                        (None, causal.f_expand([b, 1, t, l], false)?)
                    };
                    let upstream = Tensor::f_randn([b, nq, t, hd], (kind, Device::Cpu))?;
                    let mut runs = Vec::new();
                    for ours in [true, false] {
                        for x in [&q, &k, &v] {
                            let mut x = x.shallow_clone();
                            x.zero_grad();
                        }
                        let out = if ours {
                            let via_f32 = crate::cpu_kernels::bf16_gemm()
                                == crate::cpu_kernels::Bf16Gemm::ViaF32;
                            eager_attention(&q, &k, &v, mask, (start, nkv), via_f32)?
                        } else {
                            plain(&q, &k, &v, &reference_mask)?
                        };
                        out.f_mul(&upstream)?.f_sum(Kind::Float)?.f_backward()?;
                        runs.push((
                            out.f_detach()?,
                            q.grad().copy(),
                            k.grad().copy(),
                            v.grad().copy(),
                        ));
                    }
                    let case = format!("{kind:?} head_dim {hd} padded {padded}");
                    let (a, r) = (&runs[0], &runs[1]);
                    assert!(a.0.equal(&r.0), "{case}: outputs differ");
                    assert!(a.1.equal(&r.1), "{case}: q gradients differ");
                    assert!(a.2.equal(&r.2), "{case}: k gradients differ");
                    assert!(a.3.equal(&r.3), "{case}: v gradients differ");
                }
            }
        }
        Ok(())
    }
}
