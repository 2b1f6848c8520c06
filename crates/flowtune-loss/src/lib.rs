//! Weighted DPO, supervised NLL and label NLL losses over tch tensors.
//!
//! Conventions (the caller shifts, so position `t` of `logits` predicts `targets[t]`):
//! - `logits` `[B, T, V]` (f32, f64, bf16 or f16), `targets` `[B, T]` int64, `mask`
//!   `[B, T]` (bool or numeric; nonzero = a completion token that counts). Prompt and
//!   padding positions are masked out; their target ids may be anything (e.g. -100).
//! - Log-probs are computed as `logit[target] − logsumexp(logits)` without
//!   materialising a full `log_softmax`; half-precision logits are upcast to f32 one
//!   batch row at a time (like TRL's `selective_log_softmax`), so the result is f32
//!   (f64 for f64 logits).
//! - Weighted losses are `Σᵢ wᵢ·ℓᵢ / N` with `N` the number of records given (zero
//!   weights count in `N` but contribute no gradient).

pub mod error;

pub use error::{Error, Result};

use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

fn check_dims(arg: &'static str, t: &Tensor, dims: usize, expected: &str) -> Result<Vec<i64>> {
    let size = t.size();
    if size.len() != dims {
        return Err(Error::Shape {
            arg,
            got: size,
            expected: expected.to_string(),
        });
    }
    Ok(size)
}

fn check_same(arg: &'static str, t: &Tensor, want: &[i64], expected: &str) -> Result<()> {
    if t.size() != want {
        return Err(Error::Shape {
            arg,
            got: t.size(),
            expected: expected.to_string(),
        });
    }
    Ok(())
}

fn check_float(arg: &'static str, t: &Tensor) -> Result<()> {
    if !t.is_floating_point() {
        return Err(Error::Dtype {
            arg,
            got: t.kind(),
            expected: "a floating-point dtype",
        });
    }
    Ok(())
}

fn as_bool_mask(mask: &Tensor) -> Result<Tensor> {
    Ok(if mask.kind() == Kind::Bool {
        mask.shallow_clone()
    } else {
        mask.f_ne(0)?
    })
}

/// The dtype log-probs are computed in for logits of dtype `kind`.
fn compute_kind(kind: Kind) -> Kind {
    if kind == Kind::Double {
        Kind::Double
    } else {
        Kind::Float
    }
}

/// Per-token log-probs `[B, T]` of `targets` under `logits`, zero where `mask` is 0.
/// See the crate docs for the conventions.
pub fn token_logprobs(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    let size = check_dims("logits", logits, 3, "[B, T, V]")?;
    check_float("logits", logits)?;
    check_same("targets", targets, &size[..2], "[B, T] matching logits")?;
    check_same("mask", mask, &size[..2], "[B, T] matching logits")?;
    if targets.kind() != Kind::Int64 {
        return Err(Error::Dtype {
            arg: "targets",
            got: targets.kind(),
            expected: "int64",
        });
    }
    let mask = as_bool_mask(mask)?;
    let safe_targets = targets.f_where_scalarother(&mask, 0)?;
    let vocab = size[2];
    // Validate ids where they count (a bad id would otherwise abort inside gather).
    if size[0] * size[1] > 0 {
        let max_id = safe_targets.f_max()?.f_int64_value(&[])?;
        let min_id = safe_targets.f_min()?.f_int64_value(&[])?;
        if max_id >= vocab || min_id < 0 {
            let bad = if min_id < 0 { min_id } else { max_id };
            return Err(Error::Index {
                arg: "targets",
                index: bad,
                bound: vocab,
            });
        }
    }
    let kind = compute_kind(logits.kind());
    let index = safe_targets.f_unsqueeze(-1)?;
    let per_token = if logits.kind() == Kind::Float || logits.kind() == Kind::Double {
        let picked = logits.f_gather(-1, &index, false)?.f_squeeze_dim(-1)?;
        picked.f_sub(&logits.f_logsumexp([-1i64], false)?)?
    } else {
        // Half precision: upcast one row at a time to bound peak memory.
        let mut rows = Vec::with_capacity(size[0] as usize);
        for b in 0..size[0] {
            let row = logits.f_get(b)?.f_to_kind(kind)?;
            let picked = row
                .f_gather(-1, &index.f_get(b)?, false)?
                .f_squeeze_dim(-1)?;
            rows.push(picked.f_sub(&row.f_logsumexp([-1i64], false)?)?);
        }
        Tensor::f_stack(&rows, 0)?
    };
    let zeros = per_token.f_zeros_like()?;
    Ok(per_token.f_where_self(&mask, &zeros)?)
}

/// Summed completion log-probs `[B]`: `Σ_t mask·log p(targets[t] | logits[t])`.
pub fn completion_logprobs(logits: &Tensor, targets: &Tensor, mask: &Tensor) -> Result<Tensor> {
    Ok(token_logprobs(logits, targets, mask)?.f_sum_dim_intlist(
        &[-1i64][..],
        false,
        None::<Kind>,
    )?)
}

/// Statistics of one DPO loss evaluation (means over pairs, unweighted, like TRL's logs).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct DpoStats {
    /// The loss value `Σ wᵢ ℓᵢ / N`.
    pub loss: f64,
    /// Number of pairs `N`.
    pub pairs: usize,
    /// Sum of the weights.
    pub weight_sum: f64,
    /// Mean implicit reward of the chosen completions, `β (π_c − ref_c)`.
    pub reward_chosen: f64,
    /// Mean implicit reward of the rejected completions, `β (π_r − ref_r)`.
    pub reward_rejected: f64,
    /// Mean reward margin (chosen − rejected).
    pub reward_margin: f64,
    /// Fraction of pairs whose chosen reward exceeds the rejected one.
    pub accuracy: f64,
}

fn check_pairs(args: [(&'static str, &Tensor); 5]) -> Result<i64> {
    let n = check_dims(args[0].0, args[0].1, 1, "[N]")?[0];
    for (name, t) in args {
        check_float(name, t)?;
        check_same(name, t, &[n], "[N] like policy_chosen")?;
    }
    Ok(n)
}

/// Per-pair DPO sigmoid losses `[N]`, unweighted:
/// `ℓᵢ = −log σ(β((π_c − π_r) − (ref_c − ref_r)))`, computed as `−logsigmoid(·)`
/// (= softplus(−·), stable at any magnitude; the same op as TRL's `-F.logsigmoid`).
/// The reference log-probs are detached (no gradient flows into them).
pub fn dpo_pair_losses(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    beta: f64,
) -> Result<Tensor> {
    if !(beta.is_finite() && beta > 0.0) {
        return Err(Error::Value {
            arg: "beta",
            value: beta,
            reason: "must be finite and > 0",
        });
    }
    let chosen_ratio = policy_chosen.f_sub(&ref_chosen.f_detach()?)?;
    let rejected_ratio = policy_rejected.f_sub(&ref_rejected.f_detach()?)?;
    let logits = chosen_ratio.f_sub(&rejected_ratio)?.f_mul_scalar(beta)?;
    Ok(logits.f_log_sigmoid()?.f_neg()?)
}

/// Weighted DPO loss `−Σᵢ wᵢ log σ(β((π_c − π_r) − (ref_c − ref_r))) / N` and its stats.
/// All inputs are `[N]` summed completion log-probs (see [`completion_logprobs`]);
/// `weights` `[N]` must be finite and ≥ 0 (checked).
pub fn dpo_loss(
    policy_chosen: &Tensor,
    policy_rejected: &Tensor,
    ref_chosen: &Tensor,
    ref_rejected: &Tensor,
    weights: &Tensor,
    beta: f64,
) -> Result<(Tensor, DpoStats)> {
    let n = check_pairs([
        ("policy_chosen", policy_chosen),
        ("policy_rejected", policy_rejected),
        ("ref_chosen", ref_chosen),
        ("ref_rejected", ref_rejected),
        ("weights", weights),
    ])?;
    check_weights(weights)?;
    let losses = dpo_pair_losses(
        policy_chosen,
        policy_rejected,
        ref_chosen,
        ref_rejected,
        beta,
    )?;
    let weights = weights.f_to_kind(losses.kind())?;
    let denom = (n.max(1)) as f64;
    let loss = losses
        .f_mul(&weights)?
        .f_sum(None::<Kind>)?
        .f_div_scalar(denom)?;
    let stats = {
        let _guard = tch::no_grad_guard();
        let rc = policy_chosen
            .f_sub(ref_chosen)?
            .f_mul_scalar(beta)?
            .f_to_kind(Kind::Double)?;
        let rr = policy_rejected
            .f_sub(ref_rejected)?
            .f_mul_scalar(beta)?
            .f_to_kind(Kind::Double)?;
        let mean = |t: &Tensor| -> Result<f64> {
            if n == 0 {
                Ok(0.0)
            } else {
                Ok(t.f_mean(None::<Kind>)?.f_double_value(&[])?)
            }
        };
        DpoStats {
            loss: loss.f_double_value(&[])?,
            pairs: n as usize,
            weight_sum: weights.f_sum(Kind::Double)?.f_double_value(&[])?,
            reward_chosen: mean(&rc)?,
            reward_rejected: mean(&rr)?,
            reward_margin: mean(&rc.f_sub(&rr)?)?,
            accuracy: mean(&rc.f_gt_tensor(&rr)?.f_to_kind(Kind::Double)?)?,
        }
    };
    Ok((loss, stats))
}

fn check_weights(weights: &Tensor) -> Result<()> {
    if weights.numel() == 0 {
        return Ok(());
    }
    let _guard = tch::no_grad_guard();
    let w = weights.f_to_kind(Kind::Double)?;
    let min = w.f_min()?.f_double_value(&[])?;
    let finite = w.f_isfinite()?.f_all()?.f_int64_value(&[])? != 0;
    if !finite || min < 0.0 {
        let bad = if !finite { f64::NAN } else { min };
        return Err(Error::Value {
            arg: "weights",
            value: bad,
            reason: "weights must be finite and >= 0",
        });
    }
    Ok(())
}

/// Statistics of a supervised NLL evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct NllStats {
    /// The loss value `Σᵢ wᵢ·NLLᵢ / N`.
    pub loss: f64,
    /// Number of sequences `N`.
    pub sequences: usize,
    /// Number of completion tokens counted.
    pub tokens: usize,
    /// Unweighted mean NLL per completion token (nats).
    pub mean_token_nll: f64,
}

/// Weighted supervised NLL on completion tokens: `Σᵢ wᵢ·(−Σ_t mask·log p) / N` with
/// the per-sequence NLL *summed* over its completion tokens (the same scale as DPO's
/// summed log-probs). `weights` `[B]`, finite and ≥ 0.
pub fn nll_loss(
    logits: &Tensor,
    targets: &Tensor,
    mask: &Tensor,
    weights: &Tensor,
) -> Result<(Tensor, NllStats)> {
    let logps = completion_logprobs(logits, targets, mask)?;
    let b = logps.size()[0];
    check_same("weights", weights, &[b], "[B] matching logits")?;
    check_float("weights", weights)?;
    check_weights(weights)?;
    let w = weights.f_to_kind(logps.kind())?;
    let loss = logps
        .f_neg()?
        .f_mul(&w)?
        .f_sum(None::<Kind>)?
        .f_div_scalar(b.max(1) as f64)?;
    let _guard = tch::no_grad_guard();
    let tokens = as_bool_mask(mask)?.f_sum(Kind::Int64)?.f_int64_value(&[])?;
    let total_nll = -logps.f_sum(Kind::Double)?.f_double_value(&[])?;
    let stats = NllStats {
        loss: loss.f_double_value(&[])?,
        sequences: b as usize,
        tokens: tokens as usize,
        mean_token_nll: if tokens > 0 {
            total_nll / tokens as f64
        } else {
            0.0
        },
    };
    Ok((loss, stats))
}

/// Log-probs `[B, K]` over a label set: `log_softmax` of `next_logits[:, label_ids]`
/// (the distribution renormalised over the K label tokens), in f32 (f64 for f64 input).
pub fn label_logprobs(next_logits: &Tensor, label_ids: &[i64]) -> Result<Tensor> {
    let size = check_dims("next_logits", next_logits, 2, "[B, V]")?;
    check_float("next_logits", next_logits)?;
    if label_ids.is_empty() {
        return Err(Error::Shape {
            arg: "label_ids",
            got: vec![0],
            expected: "at least one label".into(),
        });
    }
    for &id in label_ids {
        if id < 0 || id >= size[1] {
            return Err(Error::Index {
                arg: "label_ids",
                index: id,
                bound: size[1],
            });
        }
    }
    let ids = Tensor::from_slice(label_ids).f_to_device(next_logits.device())?;
    let picked = next_logits
        .f_index_select(1, &ids)?
        .f_to_kind(compute_kind(next_logits.kind()))?;
    Ok(picked.f_log_softmax(-1, None::<Kind>)?)
}

/// Statistics of a label NLL evaluation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct LabelStats {
    /// The loss value `Σᵢ wᵢ·(−log p(targetᵢ)) / N`.
    pub loss: f64,
    /// Number of records `N`.
    pub records: usize,
    /// Mean probability of the target label (renormalised over the label set).
    pub mean_target_prob: f64,
    /// Fraction of records whose most likely label is the target.
    pub accuracy: f64,
}

/// Weighted label NLL: `Σᵢ wᵢ·(−log p(label_ids[targetᵢ] | label set)) / N`, where
/// `next_logits` `[B, V]` are the logits at the next-token position, `targets` `[B]`
/// int64 indices into `label_ids`, `weights` `[B]` finite and ≥ 0.
pub fn label_nll(
    next_logits: &Tensor,
    label_ids: &[i64],
    targets: &Tensor,
    weights: &Tensor,
) -> Result<(Tensor, LabelStats)> {
    let logps = label_logprobs(next_logits, label_ids)?;
    let b = logps.size()[0];
    check_same("targets", targets, &[b], "[B] matching next_logits")?;
    check_same("weights", weights, &[b], "[B] matching next_logits")?;
    check_float("weights", weights)?;
    check_weights(weights)?;
    if targets.kind() != Kind::Int64 {
        return Err(Error::Dtype {
            arg: "targets",
            got: targets.kind(),
            expected: "int64",
        });
    }
    let k = label_ids.len() as i64;
    if b > 0 {
        let max = targets.f_max()?.f_int64_value(&[])?;
        let min = targets.f_min()?.f_int64_value(&[])?;
        if min < 0 || max >= k {
            return Err(Error::Index {
                arg: "targets",
                index: if min < 0 { min } else { max },
                bound: k,
            });
        }
    }
    let target_logp = logps
        .f_gather(1, &targets.f_unsqueeze(-1)?, false)?
        .f_squeeze_dim(-1)?;
    let w = weights.f_to_kind(target_logp.kind())?;
    let loss = target_logp
        .f_neg()?
        .f_mul(&w)?
        .f_sum(None::<Kind>)?
        .f_div_scalar(b.max(1) as f64)?;
    let _guard = tch::no_grad_guard();
    let (mean_p, acc) = if b == 0 {
        (0.0, 0.0)
    } else {
        let p = target_logp
            .f_exp()?
            .f_mean(Kind::Double)?
            .f_double_value(&[])?;
        let hits = logps.f_argmax(-1, false)?.f_eq_tensor(targets)?;
        (
            p,
            hits.f_to_kind(Kind::Double)?
                .f_mean(None::<Kind>)?
                .f_double_value(&[])?,
        )
    };
    let stats = LabelStats {
        loss: loss.f_double_value(&[])?,
        records: b as usize,
        mean_target_prob: mean_p,
        accuracy: acc,
    };
    Ok((loss, stats))
}
