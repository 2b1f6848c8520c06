//! Minimises a 1-D quadratic with COCOB (no learning rate anywhere), clipping
//! gradients at 1.0, then saves the optimizer state.
//!
//! Run: `cargo run -p flowtune-cocob --example quadratic`

use flowtune_cocob::{Cocob, CocobConfig};
use tch::Tensor;

fn main() -> flowtune_cocob::Result<()> {
    let x = Tensor::from_slice(&[5.0f64, -3.0]).set_requires_grad(true);
    let target = Tensor::from_slice(&[1.0f64, 2.0]);
    let mut opt = Cocob::new([("x", x.shallow_clone())], CocobConfig::paper())?;
    for step in 0..200 {
        opt.zero_grad();
        let loss = (&x - &target).square().sum(None);
        loss.backward();
        let norm = opt.clip_grad_norm(1.0)?;
        opt.step()?;
        if step % 40 == 0 {
            println!(
                "step {step:3}: loss {:.5} grad norm {norm:.3}",
                loss.double_value(&[])
            );
        }
    }
    println!(
        "x = {:?}",
        Vec::<f64>::try_from(&x.detach()).unwrap_or_default()
    );
    let dir = std::env::temp_dir().join("flowtune-cocob-example");
    opt.save(&dir)?;
    println!("state saved to {}", dir.display());
    Ok(())
}
