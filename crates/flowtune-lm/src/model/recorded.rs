//! A hand-written backward pass of the decoder for LoRA training on the CPU.
//!
//! Under autograd a training forward runs libtorch's general ops and keeps their graph, and
//! the backward replays it op by op: RMSNorm alone is about eight ops forward and more
//! backward, each LoRA site splits, casts and concatenates, and every intermediate is a fresh
//! allocation. [`Model::forward_recorded`] instead runs the inference forward (the fused CPU
//! kernels of [`crate::cpu_kernels`], no graph) and keeps what the backward needs per layer;
//! [`RecordedPass::backward`] then runs the layers in reverse with the matching fused backward
//! kernels ([`crate::cpu_kernels::rms_norm_backward_add`],
//! [`crate::cpu_kernels::silu_mul_backward`]) and libtorch's GEMMs. Only gradients with
//! respect to inputs are formed for the base weights (they are frozen); the LoRA factors get
//! theirs from the sites' [`SiteFactors`] ([`LoraGrads`]).
//!
//! Passes chain through a KV cache the way prompts do in inference: a prefix pass, then
//! [`KvCache::select_rows`] to repeat its rows, then a pass per member on top.
//! [`RecordedPass::backward`] returns the gradients of the keys and values that a pass read
//! from before it ([`KvGrads`]); [`KvGrads::fold_rows`] undoes the row repetition, and the
//! earlier pass takes them as extra gradients of its own keys and values.
//!
//! Numerics: gradients flow in the model's kind between layers' GEMMs, as autograd's do, but
//! the residual stream's gradient accumulates in float32 and the norms' and SwiGLU's backward
//! run in float32 inside; the forward's bf16 roundings are passed straight through, as
//! autograd does. In float32 the result equals autograd's to float rounding
//! (`tests/recorded_backward.rs`).
use tch::{Device, Kind, Tensor};

use super::SiteFactors;
use super::{
    eager_attention, reduced_matmul, site_columns, split2, Linear, LinearDelta, LogitsAt, Model,
    Packing,
};
use crate::kv::KvCache;
use crate::{Error, Result};

/// What one layer's backward needs from its forward (packed `[N, ...]` rows unless noted).
struct LayerRecord {
    /// The residual stream entering the layer.
    x_in: Tensor,
    /// `input_norm(x_in)`, the q/k/v projections' input.
    h1: Tensor,
    /// Queries after RoPE, `[B, nq, T, hd]`.
    q: Tensor,
    /// Every key and value the pass attended to, `[B, nkv, L, hd]` (views of the cache).
    keys: Tensor,
    values: Tensor,
    /// The attention output, `o_proj`'s input `[N, nq * hd]`.
    attn: Tensor,
    /// The residual stream after attention.
    x_mid: Tensor,
    /// `post_norm(x_mid)`, the MLP's input.
    h2: Tensor,
    /// The fused gate and up projections `[N, 2 * I]`.
    gate_up: Tensor,
    /// `silu(gate) * up`, `down_proj`'s input.
    act: Tensor,
}

/// One forward pass of [`Model::forward_recorded`]: what its backward needs.
pub struct RecordedPass {
    layers: Vec<LayerRecord>,
    packing: Packing,
    /// Additive attention bias `[B, 1, 1, T, L]` (0 visible, -inf hidden), float32.
    bias: Tensor,
    cos: Tensor,
    sin: Tensor,
    /// Cache slots before this pass.
    start: i64,
    /// Per row, the span of its real query columns in this pass and of the key slots they
    /// can see (from the row's first real key to its last query): `(q0, q1, k0, k1)`.
    spans: Vec<(i64, i64, i64, i64)>,
    /// The packed rows whose hidden states the pass returned.
    hidden_rows: Tensor,
    /// The pass returned no hidden states, so its last layer ran up to its keys and values
    /// only (its record holds nothing past the queries).
    keys_only_top: bool,
}

impl std::fmt::Debug for RecordedPass {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RecordedPass")
            .field("layers", &self.layers.len())
            .field("batch", &self.packing.b)
            .field("columns", &self.packing.t)
            .field("start", &self.start)
            .finish()
    }
}

/// Gradients with respect to the keys and values at the cache slots before a pass: per layer
/// `[B, nkv, slots, hd]` float32.
#[derive(Debug)]
pub struct KvGrads {
    keys: Vec<Tensor>,
    values: Vec<Tensor>,
}

impl KvGrads {
    /// The gradients of the cache before [`KvCache::select_rows`]`(rows)` over a cache of
    /// `batch` rows: row `i` of these adds into row `rows[i]`.
    pub fn fold_rows(&self, rows: &[usize], batch: usize) -> Result<Self> {
        if let Some(&bad) = rows.iter().find(|&&r| r >= batch) {
            return Err(Error::ModelInput(format!(
                "row {bad} out of range for batch {batch}"
            )));
        }
        let index: Vec<i64> = rows.iter().map(|&r| r as i64).collect();
        let device = self.keys.first().map_or(Device::Cpu, Tensor::device);
        let index = Tensor::f_from_slice(&index)?.f_to(device)?;
        let fold = |t: &Tensor| -> Result<Tensor> {
            let size = t.size();
            if size.first().copied() != Some(rows.len() as i64) {
                return Err(Error::ModelInput(format!(
                    "{} rows of key/value gradients for {} row indices",
                    size.first().copied().unwrap_or(0),
                    rows.len()
                )));
            }
            let mut shape = size;
            shape[0] = batch as i64;
            Ok(Tensor::f_zeros(shape.as_slice(), (t.kind(), t.device()))?
                .f_index_add(0, &index, t)?)
        };
        let _guard = tch::no_grad_guard();
        Ok(Self {
            keys: self.keys.iter().map(fold).collect::<Result<_>>()?,
            values: self.values.iter().map(fold).collect::<Result<_>>()?,
        })
    }
}

/// Gradients of LoRA factors from [`RecordedPass::backward`], summed per factor tensor (the
/// tensors [`SiteFactors::Lora`] handed out; only those that require gradients).
#[derive(Debug, Default)]
pub struct LoraGrads {
    entries: Vec<(Tensor, Tensor)>,
}

impl LoraGrads {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    fn add(&mut self, factor: &Tensor, grad: Tensor) -> Result<()> {
        let at = factor.data_ptr();
        match self.entries.iter_mut().find(|(f, _)| f.data_ptr() == at) {
            Some((_, g)) => {
                let _ = g.f_add_(&grad)?;
            }
            None => self.entries.push((factor.shallow_clone(), grad)),
        }
        Ok(())
    }

    /// The gradient of `factor` (the same tensor storage), if it got one.
    pub fn get(&self, factor: &Tensor) -> Option<&Tensor> {
        let at = factor.data_ptr();
        self.entries
            .iter()
            .find(|(f, _)| f.data_ptr() == at)
            .map(|(_, g)| g)
    }

    /// How many factors got a gradient.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether no factor got a gradient.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

/// The delta of a recorded forward: LoRA sites added in place by the fused kernel (no
/// gradients are needed here), anything else through the wrapped delta.
struct InPlaceLora<'a>(&'a dyn LinearDelta);

impl LinearDelta for InPlaceLora<'_> {
    fn delta(&self, layer: usize, module: &str, x: &Tensor) -> Result<Option<Tensor>> {
        self.0.delta(layer, module, x)
    }

    fn add_delta_in_place(
        &self,
        layer: usize,
        module: &str,
        x: &Tensor,
        y: &Tensor,
    ) -> Result<bool> {
        match self.0.factors(layer, module)? {
            SiteFactors::Lora { a, b, scale } => {
                crate::cpu_kernels::lora_add(x, &a.detach(), &b.detach(), scale, y)
            }
            _ => self.0.add_delta_in_place(layer, module, x, y),
        }
    }

    fn row_independent(&self) -> bool {
        self.0.row_independent()
    }
}

impl Linear {
    /// `dy @ weight` (the gradient with respect to the input; the weight is frozen), in
    /// `dy`'s kind; through the float32 copy where the forward uses it.
    fn input_grad(&self, dy: &Tensor) -> Result<Tensor> {
        if let Some(w32) = self.wide.as_ref().filter(|_| dy.kind() == Kind::BFloat16) {
            return Ok(dy
                .f_to_kind(Kind::Float)?
                .f_matmul(w32)?
                .f_to_kind(Kind::BFloat16)?);
        }
        Ok(dy.f_matmul(&self.weight)?)
    }
}

/// The (q/k/v, o, gate/up, down) linears of a layer with their PEFT parts.
struct Sites<'a> {
    qkv: Vec<(&'a str, i64, i64)>,
    o: Vec<(&'a str, i64, i64)>,
    gate_up: Vec<(&'a str, i64, i64)>,
    down: Vec<(&'a str, i64, i64)>,
}

impl Model {
    fn sites(&self) -> Sites<'static> {
        let c = &self.config;
        let (nq, nkv, hd) = self.head_dims();
        let inter = c.intermediate_size as i64;
        let hidden = c.hidden_size as i64;
        let qkv_parts = [
            ("q_proj", nq * hd),
            ("k_proj", nkv * hd),
            ("v_proj", nkv * hd),
        ];
        let gate_up_parts = [("gate_proj", inter), ("up_proj", inter)];
        Sites {
            qkv: site_columns(&qkv_parts, self.fused_qkv_names.then_some("qkv_proj")),
            o: site_columns(&[("o_proj", hidden)], None),
            gate_up: site_columns(
                &gate_up_parts,
                self.fused_mlp_names.then_some("gate_up_proj"),
            ),
            down: site_columns(&[("down_proj", hidden)], None),
        }
    }

    /// Whether [`Self::forward_recorded`] takes this model with `delta`: on the CPU, in bf16
    /// or float32, without sliding windows, with a delta that treats every row alike and is
    /// plain LoRA ([`SiteFactors::Lora`]) or nothing at every site.
    pub fn recorded_backward_supported(&self, delta: &dyn LinearDelta) -> Result<bool> {
        if self.device != Device::Cpu
            || !matches!(self.kind, Kind::BFloat16 | Kind::Float)
            || self.layers.iter().any(|l| l.sliding_window.is_some())
            || !delta.row_independent()
        {
            return Ok(false);
        }
        let sites = self.sites();
        for li in 0..self.layers.len() {
            for (name, _, _) in sites
                .qkv
                .iter()
                .chain(&sites.o)
                .chain(&sites.gate_up)
                .chain(&sites.down)
            {
                if matches!(delta.factors(li, name)?, SiteFactors::Opaque) {
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }

    /// Final norm and head over hidden states `[..., H]` (e.g. from
    /// [`Self::forward_recorded`]): logits in the model's kind, with gradients where `hidden`
    /// requires them.
    pub fn logits_of_hidden(&self, hidden: &Tensor) -> Result<Tensor> {
        self.pick_logits(hidden, &LogitsAt::All)
    }

    /// [`Self::forward_cached`] without autograd, keeping what [`RecordedPass::backward`]
    /// needs. Returns the final hidden states before the last norm at the positions `at`
    /// asks for (`[R, H]`: `Last` and `PerRow` one per row, `All` every real token in
    /// row-major order, `None` none; see [`Self::logits_of_hidden`]) and the pass. Only where
    /// [`Self::recorded_backward_supported`] (an error otherwise).
    pub fn forward_recorded(
        &self,
        ids: &Tensor,
        valid: &[bool],
        cache: &mut KvCache,
        at: &LogitsAt,
        delta: &dyn LinearDelta,
    ) -> Result<(Tensor, RecordedPass)> {
        let _span = tracing::trace_span!(
            "lm_forward_recorded",
            t = ids.size().get(1).copied().unwrap_or(0)
        )
        .entered();
        let _guard = tch::no_grad_guard();
        if !self.recorded_backward_supported(delta)? {
            return Err(Error::ModelInput(
                "the recorded backward takes CPU bf16/float32 models without sliding windows and plain uniform LoRA deltas".into(),
            ));
        }
        let size = ids.size();
        if size.len() != 2
            || size[0] as usize != cache.batch()
            || valid.len() as i64 != size[0] * size[1]
        {
            return Err(Error::ModelInput(format!(
                "ids shape {size:?} with {} validity entries for a cache of batch {}",
                valid.len(),
                cache.batch()
            )));
        }
        let (b, t) = (size[0], size[1]);
        let start = cache.len() as i64;
        let (positions, _) = cache.append_slots(valid, t as usize)?;
        let total = start + t;
        let key_valid = cache.slots_view(total, true)?;
        let max_len = cache.next_positions().iter().copied().max().unwrap_or(0);
        let (cos, sin) = self.rope_tables(&positions, max_len)?;
        // Key j visible to query slot start+i iff it is a real token at or before it; the
        // query's own slot always (padding rows never have an empty soft-max).
        let q_slot = Tensor::f_arange_start(start, total, (Kind::Int64, self.device))?
            .f_view([1, 1, t, 1])?;
        let k_slot =
            Tensor::f_arange(total, (Kind::Int64, self.device))?.f_view([1, 1, 1, total])?;
        let mask = k_slot
            .f_le_tensor(&q_slot)?
            .f_logical_and(&key_valid.f_view([b, 1, 1, total])?)?
            .f_logical_or(&k_slot.f_eq_tensor(&q_slot)?)?;
        let bias = Tensor::f_zeros(mask.size(), (Kind::Float, self.device))?
            .f_masked_fill(&mask.f_logical_not()?, f64::NEG_INFINITY)?
            .f_view([b, 1, 1, t, total])?;
        let key_valid_host: Vec<bool> = Vec::<bool>::try_from(key_valid.f_flatten(0, -1)?)?;
        let mut spans = Vec::with_capacity(b as usize);
        for r in 0..b as usize {
            let row = &valid[r * t as usize..(r + 1) * t as usize];
            let q0 = row.iter().position(|&v| v).unwrap_or(0) as i64;
            let q1 = row
                .iter()
                .rposition(|&v| v)
                .map_or(q0 + 1, |p| p as i64 + 1);
            let keys = &key_valid_host[r * total as usize..(r + 1) * total as usize];
            let k1 = start + q1;
            let k0 = (keys.iter().position(|&v| v).unwrap_or(0) as i64).min(start + q0);
            spans.push((q0, q1, k0, k1));
        }

        let c = &self.config;
        let (nq, nkv, hd) = self.head_dims();
        let delta = InPlaceLora(delta);
        let packing = Packing::always(valid, b, t, self.device)?;
        let mut x = Tensor::f_embedding(&self.embed, &packing.pack(ids)?, -1, false, false)?;
        let mut pending: Option<Tensor> = None;
        let mut layers = Vec::with_capacity(self.layers.len());
        let keys_only_top = matches!(at, LogitsAt::None);
        for (li, layer) in self.layers.iter().enumerate() {
            let (x_in, h1) = match pending.take() {
                Some(d) => self.add_rms_norm(&x, &d, &layer.input_norm)?,
                None => (x.shallow_clone(), self.rms_norm(&x, &layer.input_norm)?),
            };
            let [q, k, v] = self.queries_keys_values(
                li,
                layer,
                &h1,
                Some(&delta),
                &|y| packing.unpack(&y),
                [b, t],
                [&cos, &sin],
            )?;
            let (keys, values) = cache.write_layer(li, start as usize, &k, &v)?;
            if keys_only_top && li + 1 == self.layers.len() {
                // Nothing reads the last layer's output: only its keys and values matter.
                let none = Tensor::new;
                layers.push(LayerRecord {
                    x_in,
                    h1,
                    q,
                    keys,
                    values,
                    attn: none(),
                    x_mid: none(),
                    h2: none(),
                    gate_up: none(),
                    act: none(),
                });
                break;
            }
            let attn = match crate::cpu_kernels::attention(
                &q,
                &keys,
                &values,
                Some(&mask),
                Some(valid),
                start as usize,
            )? {
                Some(a) => a,
                None => eager_attention(
                    &q,
                    &keys,
                    &values,
                    Some(&mask),
                    (start, nkv),
                    self.bf16_products_via_f32,
                )?,
            };
            let attn = packing.pack(&attn.f_transpose(1, 2)?.f_reshape([b, t, nq * hd])?)?;
            let o = self.project(
                li,
                &attn,
                &layer.o,
                &[("o_proj", c.hidden_size as i64)],
                None,
                Some(&delta),
            )?;
            let (x_mid, h2) = self.add_rms_norm(&x_in, &o, &layer.post_norm)?;
            let [gate_up, act, d] = self.mlp(li, layer, &h2, Some(&delta))?;
            pending = Some(d);
            x = x_mid.shallow_clone();
            layers.push(LayerRecord {
                x_in,
                h1,
                q,
                keys,
                values,
                attn,
                x_mid,
                h2,
                gate_up,
                act,
            });
        }
        if let Some(d) = pending {
            x = x.f_add(&d)?;
        }
        cache.commit(t as usize);
        let slots: Vec<usize> = match at {
            LogitsAt::None => Vec::new(),
            LogitsAt::Last => (0..b as usize)
                .map(|r| r * t as usize + t as usize - 1)
                .collect(),
            LogitsAt::PerRow(cols) => {
                if cols.len() as i64 != b || cols.iter().any(|&c| c as i64 >= t) {
                    return Err(Error::ModelInput(format!(
                        "per-row hidden columns {cols:?} for batch {b} x {t}"
                    )));
                }
                cols.iter()
                    .enumerate()
                    .map(|(r, &c)| r * t as usize + c)
                    .collect()
            }
            LogitsAt::All => (0..valid.len()).filter(|&s| valid[s]).collect(),
        };
        let mut rows = Vec::with_capacity(slots.len());
        for s in slots {
            match packing.slot_rows[s] {
                Some(r) => rows.push(i64::from(r)),
                None => {
                    return Err(Error::ModelInput(format!(
                        "hidden state asked for at padding slot {} of row {}",
                        s % t as usize,
                        s / t as usize
                    )))
                }
            }
        }
        let hidden_rows = Tensor::f_from_slice(&rows)?.f_to(self.device)?;
        let hidden = x.f_index_select(0, &hidden_rows)?;
        Ok((
            hidden,
            RecordedPass {
                layers,
                packing,
                bias,
                cos,
                sin,
                start,
                spans,
                hidden_rows,
                keys_only_top,
            },
        ))
    }

    /// The gradient with respect to the input of a (possibly fused) linear whose output
    /// gradient is `dy` (`[N, out]`, model kind) and input `x`, with the LoRA factors' own
    /// gradients added into `grads`; in the model's kind.
    #[allow(clippy::too_many_arguments)]
    fn linear_backward(
        &self,
        layer: usize,
        lin: &Linear,
        x: &Tensor,
        dy: &Tensor,
        sites: &[(&str, i64, i64)],
        delta: &dyn LinearDelta,
        grads: &mut LoraGrads,
    ) -> Result<Tensor> {
        let base = lin.input_grad(dy)?;
        let mut extra: Option<Tensor> = None;
        for &(name, at, width) in sites {
            let (a, b, scale) = match delta.factors(layer, name)? {
                SiteFactors::Absent => continue,
                SiteFactors::Lora { a, b, scale } => (a, b, scale),
                SiteFactors::Opaque => {
                    return Err(Error::ModelInput(format!(
                    "layer {layer} {name}: a delta without LoRA factors has no recorded backward"
                )))
                }
            };
            // The forward: h = x Aᵀ, y += scale · h Bᵀ, in the factors' kind.
            let (a_kind, a_plain, b_plain) = (a.kind(), a.detach(), b.detach());
            let g = dy.f_narrow(-1, at, width)?.f_to_kind(a_kind)?;
            let xk = x.f_to_kind(a_kind)?;
            if b.requires_grad() {
                let h = xk.f_matmul(&a_plain.f_tr()?)?;
                grads.add(&b, g.f_tr()?.f_matmul(&h)?.f_mul_scalar(scale)?)?;
            }
            let gh = g.f_matmul(&b_plain)?.f_mul_scalar(scale)?;
            if a.requires_grad() {
                grads.add(&a, gh.f_tr()?.f_matmul(&xk)?)?;
            }
            let e = gh.f_matmul(&a_plain)?;
            extra = Some(match extra {
                Some(s) => s.f_add(&e)?,
                None => e,
            });
        }
        Ok(match extra {
            Some(e) => base
                .f_to_kind(Kind::Float)?
                .f_add(&e)?
                .f_to_kind(self.kind)?,
            None => base,
        })
    }

    /// `dx += rms_norm'(x)ᵀ dy` (float32 `dx`), by the fused kernel or libtorch's ops.
    fn rms_norm_backward_add(
        &self,
        x: &Tensor,
        weight: &Tensor,
        dy: &Tensor,
        dx: &Tensor,
    ) -> Result<()> {
        let eps = self.config.rms_norm_eps();
        if crate::cpu_kernels::rms_norm_backward_add(x, weight, dy, eps, dx)? {
            return Ok(());
        }
        let xf = x.f_to_kind(Kind::Float)?;
        let h = xf.size().last().copied().unwrap_or(1) as f64;
        let r = xf
            .f_square()?
            .f_mean_dim(-1, true, Kind::Float)?
            .f_add_scalar(eps)?
            .f_rsqrt()?;
        let xhat = xf.f_mul(&r)?;
        let dn = dy
            .f_to_kind(Kind::Float)?
            .f_mul(&weight.f_to_kind(Kind::Float)?)?;
        let c = dn
            .f_mul(&xhat)?
            .f_sum_dim_intlist(-1, true, Kind::Float)?
            .f_div_scalar(h)?;
        let mut dx = dx.shallow_clone();
        let _ = dx.f_add_(&r.f_mul(&dn.f_sub(&xhat.f_mul(&c)?)?)?)?;
        Ok(())
    }
}

/// RoPE's backward for `d` `[B, H, T, hd]` with the forward's `cos` and sign-folded `sin`
/// (`[B, 1, T, rot]`): the forward is `x·cos + roll(x, rot/2)·sin` on the first `rot` values,
/// a rolling by half its length is its own inverse, so `dx = d·cos + roll(d·sin, rot/2)`.
fn rope_backward(d: &Tensor, cos: &Tensor, sin: &Tensor, rot: i64, hd: i64) -> Result<Tensor> {
    let (dr, pass) = if rot < hd {
        (
            d.f_narrow(-1, 0, rot)?,
            Some(d.f_narrow(-1, rot, hd - rot)?),
        )
    } else {
        (d.shallow_clone(), None)
    };
    let mut out = dr.f_mul(cos)?;
    let _ = out.f_add_(&dr.f_mul(sin)?.f_roll([rot / 2], [-1])?)?;
    Ok(match pass {
        Some(p) => Tensor::f_cat(&[&out, &p], -1)?,
        None => out,
    })
}

/// The backward of attention as the forward computes it (bf16: scores from bf16 products,
/// soft-max in float32, probabilities rounded to bf16): `(dq [B, nq, T, hd]` in `q`'s kind,
/// `dk`, `dv [B, nkv, L, hd]` float32`)` for the output gradient `d_out` `[B, nq, T, hd]`,
/// recomputing the probabilities from `q`, `k` and the additive `bias` `[B, 1, 1, T, L]`;
/// bf16 products through float32 with `via_f32` ([`reduced_matmul`]).
fn attention_backward(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    bias: &Tensor,
    d_out: &Tensor,
    (nkv, via_f32): (i64, bool),
) -> Result<(Tensor, Tensor, Tensor)> {
    let size = q.size();
    let (b, nq, t, hd) = (size[0], size[1], size[2], size[3]);
    let l = k.size()[2];
    let group = nq / nkv;
    let kind = q.kind();
    let scale = 1.0 / (hd as f64).sqrt();
    // As `eager_attention`: a power-of-two scale goes on `q` (exact), else on the scores.
    let pow2 = scale.log2().fract() == 0.0;
    let qs = if pow2 {
        q.f_mul_scalar(scale)?
    } else {
        q.shallow_clone()
    };
    let qg = qs.f_reshape([b, nkv, group * t, hd])?;
    let raw =
        reduced_matmul(&qg, &k.f_transpose(-1, -2)?, via_f32)?.f_view([b, nkv, group, t, l])?;
    let mut scores = raw.f_to_kind(Kind::Float)?;
    if !pow2 {
        scores = scores.f_mul_scalar(scale)?;
    }
    let p = scores.f_add(bias)?.f_softmax(-1, Kind::Float)?;
    let pk = p.f_to_kind(kind)?.f_view([b, nkv, group * t, l])?;
    let dog = d_out.f_reshape([b, nkv, group * t, hd])?;
    let dv = reduced_matmul(&pk.f_transpose(-1, -2)?, &dog, via_f32)?.f_to_kind(Kind::Float)?;
    let dp = reduced_matmul(&dog, &v.f_transpose(-1, -2)?, via_f32)?
        .f_to_kind(Kind::Float)?
        .f_view([b, nkv, group, t, l])?;
    let mut ds = Tensor::f_internal_softmax_backward_data(&dp, &p, -1, Kind::Float)?;
    if !pow2 {
        ds = ds.f_mul_scalar(scale)?;
    }
    let ds = ds.f_to_kind(kind)?.f_view([b, nkv, group * t, l])?;
    let mut dq = reduced_matmul(&ds, k, via_f32)?;
    if pow2 {
        dq = dq.f_mul_scalar(scale)?;
    }
    let dk = reduced_matmul(&ds.f_transpose(-1, -2)?, &qg, via_f32)?.f_to_kind(Kind::Float)?;
    Ok((dq.f_view([b, nq, t, hd])?, dk, dv))
}

impl RecordedPass {
    /// [`attention_backward`] row by row over each row's real queries and the keys they
    /// can see ([`RecordedPass::spans`]): padding costs nothing. `dq` in the model's kind,
    /// `dk`/`dv` float32, all zero outside the spans.
    fn attention_backward(
        &self,
        rec: &LayerRecord,
        d_attn: &Tensor,
        (nkv, via_f32): (i64, bool),
    ) -> Result<(Tensor, Tensor, Tensor)> {
        let dq = rec.q.f_zeros_like()?;
        let kv_shape = rec.keys.size();
        let dk = Tensor::f_zeros(kv_shape.as_slice(), (Kind::Float, rec.keys.device()))?;
        let dv = dk.f_zeros_like()?;
        for (r, &(q0, q1, k0, k1)) in self.spans.iter().enumerate() {
            let r = r as i64;
            let (nq_cols, nk) = (q1 - q0, k1 - k0);
            let row = |t: &Tensor, from: i64, len: i64| -> Result<Tensor> {
                Ok(t.f_narrow(0, r, 1)?.f_narrow(2, from, len)?)
            };
            let bias = self
                .bias
                .f_narrow(0, r, 1)?
                .f_narrow(3, q0, nq_cols)?
                .f_narrow(4, k0, nk)?;
            let (gq, gk, gv) = attention_backward(
                &row(&rec.q, q0, nq_cols)?,
                &row(&rec.keys, k0, nk)?,
                &row(&rec.values, k0, nk)?,
                &bias,
                &row(d_attn, q0, nq_cols)?,
                (nkv, via_f32),
            )?;
            row(&dq, q0, nq_cols)?.f_copy_(&gq)?;
            row(&dk, k0, nk)?.f_copy_(&gk)?;
            row(&dv, k0, nk)?.f_copy_(&gv)?;
        }
        Ok((dq, dk, dv))
    }

    /// Backpropagates through the pass: `d_hidden` is the gradient of the hidden states it
    /// returned (`[R, H]`), `d_kv` that of the keys and values it wrote, from passes after it
    /// that read them ([`KvGrads`] over this pass's `start + T` slots, or fewer). Adds the LoRA
    /// factors' gradients into `grads` and returns the gradients of the keys and values this
    /// pass read from the cache before it (`None` when it started on an empty cache). `model`
    /// and `delta` must be the forward's.
    pub fn backward(
        &self,
        model: &Model,
        delta: &dyn LinearDelta,
        d_hidden: Option<&Tensor>,
        d_kv: Option<&KvGrads>,
        grads: &mut LoraGrads,
    ) -> Result<Option<KvGrads>> {
        let _span =
            tracing::trace_span!("lm_backward_recorded", layers = self.layers.len()).entered();
        let _guard = tch::no_grad_guard();
        if self.layers.len() != model.layers.len()
            || d_kv.is_some_and(|kv| {
                kv.keys.len() != self.layers.len() || kv.values.len() != self.layers.len()
            })
        {
            return Err(Error::ModelInput(
                "recorded pass and model (or key/value gradients) differ in layers".into(),
            ));
        }
        let c = &model.config;
        let (nq, nkv, hd) = model.head_dims();
        let rot = c.rotary_dim() as i64;
        let inter = c.intermediate_size as i64;
        let kind = model.kind;
        let (b, t) = (self.packing.b, self.packing.t);
        let n = self.packing.index.size()[0];
        let sites = model.sites();
        let dx = Tensor::f_zeros([n, c.hidden_size as i64], (Kind::Float, model.device))?;
        if let Some(dh) = d_hidden {
            let mut acc = dx.shallow_clone();
            let _ = acc.f_index_add_(0, &self.hidden_rows, &dh.f_to_kind(Kind::Float)?)?;
        }
        let mut earlier = (Vec::new(), Vec::new());
        for (li, (rec, layer)) in self.layers.iter().zip(&model.layers).enumerate().rev() {
            // A last layer that ran to its keys and values only gets no gradient but theirs.
            let (dq, mut dk, mut dv) = if self.keys_only_top && li + 1 == self.layers.len() {
                let dk = Tensor::f_zeros(rec.keys.size().as_slice(), (Kind::Float, model.device))?;
                (rec.q.f_zeros_like()?, dk.f_zeros_like()?, dk)
            } else {
                // MLP: x_out = x_mid + down(silu(gate) · up), gate/up from post_norm(x_mid).
                let d_down = dx.f_to_kind(kind)?;
                let d_act = model.linear_backward(
                    li,
                    &layer.down,
                    &rec.act,
                    &d_down,
                    &sites.down,
                    delta,
                    grads,
                )?;
                let [gate, up] = split2(&rec.gate_up, inter, inter, -1)?;
                let d_gate_up = match crate::cpu_kernels::silu_mul_backward(&gate, &up, &d_act)? {
                    Some(g) => g,
                    None => {
                        let (gf, uf, df) = (
                            gate.f_to_kind(Kind::Float)?,
                            up.f_to_kind(Kind::Float)?,
                            d_act.f_to_kind(Kind::Float)?,
                        );
                        let s = gf.f_sigmoid()?;
                        let slope = gf
                            .f_mul(&s.f_neg()?.f_add_scalar(1.0)?)?
                            .f_add_scalar(1.0)?;
                        let dg = df.f_mul(&uf)?.f_mul(&s)?.f_mul(&slope)?;
                        let du = df.f_mul(&gf)?.f_mul(&s)?;
                        Tensor::f_cat(&[dg, du], -1)?.f_to_kind(kind)?
                    }
                };
                let d_h2 = model.linear_backward(
                    li,
                    &layer.gate_up,
                    &rec.h2,
                    &d_gate_up,
                    &sites.gate_up,
                    delta,
                    grads,
                )?;
                model.rms_norm_backward_add(&rec.x_mid, &layer.post_norm, &d_h2, &dx)?;

                // Attention: x_mid = x_in + o(attention(rope(q), rope(k), v)), q/k/v from
                // input_norm(x_in).
                let d_o = dx.f_to_kind(kind)?;
                let d_attn =
                    model.linear_backward(li, &layer.o, &rec.attn, &d_o, &sites.o, delta, grads)?;
                let d_attn = self
                    .packing
                    .unpack(&d_attn)?
                    .f_view([b, t, nq, hd])?
                    .f_transpose(1, 2)?;
                self.attention_backward(rec, &d_attn, (nkv, model.bf16_products_via_f32))?
            };
            if let Some(kv) = d_kv {
                let (gk, gv) = (&kv.keys[li], &kv.values[li]);
                let slots = gk.size().get(2).copied().unwrap_or(0);
                if slots > self.start + t || gv.size() != gk.size() {
                    return Err(Error::ModelInput(format!(
                        "key/value gradients over {slots} slots for a pass ending at slot {}",
                        self.start + t
                    )));
                }
                let _ = dk.f_narrow(2, 0, slots)?.f_add_(gk)?;
                let _ = dv.f_narrow(2, 0, slots)?.f_add_(gv)?;
            }
            if self.start > 0 {
                earlier.0.push(dk.f_narrow(2, 0, self.start)?);
                earlier.1.push(dv.f_narrow(2, 0, self.start)?);
            }
            dk = dk.f_narrow(2, self.start, t)?.f_to_kind(kind)?;
            dv = dv.f_narrow(2, self.start, t)?.f_to_kind(kind)?;
            let dqk = rope_backward(
                &Tensor::f_cat(&[&dq, &dk], 1)?,
                &self.cos,
                &self.sin,
                rot,
                hd,
            )?;
            let d_y = Tensor::f_cat(
                &[
                    dqk.f_transpose(1, 2)?.f_reshape([b, t, (nq + nkv) * hd])?,
                    dv.f_transpose(1, 2)?.f_reshape([b, t, nkv * hd])?,
                ],
                -1,
            )?;
            let d_y = self.packing.pack(&d_y)?;
            let d_h1 =
                model.linear_backward(li, &layer.qkv, &rec.h1, &d_y, &sites.qkv, delta, grads)?;
            if li > 0 {
                model.rms_norm_backward_add(&rec.x_in, &layer.input_norm, &d_h1, &dx)?;
            }
        }
        if self.start == 0 {
            return Ok(None);
        }
        earlier.0.reverse();
        earlier.1.reverse();
        Ok(Some(KvGrads {
            keys: earlier.0,
            values: earlier.1,
        }))
    }
}
