//! Computes completion log-probs from toy logits and a weighted DPO loss with its stats.
//!
//! Run: `cargo run -p flowtune-loss --example dpo`

use flowtune_loss::{completion_logprobs, dpo_loss};
use tch::{Device, Kind, Tensor};

fn main() -> flowtune_loss::Result<()> {
    tch::manual_seed(0);
    // 2 pairs -> 4 sequences [chosen0, chosen1, rejected0, rejected1], 6 positions, vocab 16.
    let logits = Tensor::randn([4, 6, 16], (Kind::Float, Device::Cpu)).set_requires_grad(true);
    let targets = Tensor::randint(16, [4, 6], (Kind::Int64, Device::Cpu));
    // first 2 positions are prompt, the rest completion
    let mask = Tensor::ones([4, 6], (Kind::Bool, Device::Cpu)).narrow(1, 0, 6);
    let _ = mask.narrow(1, 0, 2).fill_(0);
    let logps = completion_logprobs(&logits, &targets, &mask)?;
    let (pc, pr) = (logps.narrow(0, 0, 2), logps.narrow(0, 2, 2));
    let reference = logps.detach();
    let (rc, rr) = (reference.narrow(0, 0, 2), reference.narrow(0, 2, 2));
    let weights = Tensor::from_slice(&[1.0f32, 0.5]);
    let (loss, stats) = dpo_loss(&pc, &pr, &rc, &rr, &weights, 1.0)?;
    loss.backward();
    println!(
        "loss {:.4} (ln 2 · mean weight at policy = reference)",
        stats.loss
    );
    println!("stats {stats:?}");
    println!(
        "grad norm on logits {:.4}",
        logits.grad().norm().double_value(&[])
    );
    Ok(())
}
