//! Gradient-norm clipping, as `torch.nn.utils.clip_grad_norm_` does it.

use crate::Result;
use tch::{Kind, Tensor};

/// Scales the gradients of `params` in place so that their joint L2 norm is at most
/// `max_norm`, exactly like `torch.nn.utils.clip_grad_norm_` (norm type 2): the
/// coefficient is `max_norm / (total_norm + 1e-6)` clamped to 1. Parameters without a
/// gradient are ignored. Returns the total norm *before* clipping (0 if no gradients).
pub fn clip_grad_norm(params: &[Tensor], max_norm: f64) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let grads: Vec<Tensor> = params
        .iter()
        .map(|p| p.grad())
        .filter(|g| g.defined())
        .collect();
    if grads.is_empty() {
        return Ok(0.0);
    }
    let norms = grads
        .iter()
        .map(|g| g.f_norm()?.f_to_kind(Kind::Double))
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let total = Tensor::f_stack(&norms, 0)?.f_norm()?.f_double_value(&[])?;
    let coef = (max_norm / (total + 1e-6)).min(1.0);
    if coef < 1.0 {
        for mut g in grads {
            let _ = g.f_mul_scalar_(coef)?;
        }
    }
    Ok(total)
}

/// The joint L2 norm of the gradients of `params` (0 if none has a gradient).
pub fn grad_norm(params: &[Tensor]) -> Result<f64> {
    let _guard = tch::no_grad_guard();
    let mut sum_sq = 0.0;
    for p in params {
        let g = p.grad();
        if g.defined() {
            let n = g.f_norm()?.f_double_value(&[])?;
            sum_sq += n * n;
        }
    }
    Ok(sum_sq.sqrt())
}
