//! libtorch is linked and works: a bf16 matmul agrees with the f32 one, and
//! CUDA (when present) is detected through the force-linked libtorch_cuda.
use tch::{Device, Kind, Tensor};

#[test]
fn bf16_matmul_agrees_with_f32() {
    tch::manual_seed(0);
    let a = Tensor::randn([64, 128], (Kind::Float, Device::Cpu));
    let b = Tensor::randn([128, 32], (Kind::Float, Device::Cpu));
    let exact = a.matmul(&b);
    let bf16 = a
        .to_kind(Kind::BFloat16)
        .matmul(&b.to_kind(Kind::BFloat16))
        .to_kind(Kind::Float);
    // bf16 has an 8-bit mantissa: relative error per product ~2^-8; over a
    // 128-term sum of unit normals (|sum| ~ 11) an absolute error below 0.5 is generous
    // but still catches a wrong kernel (a transposed operand gives O(10) errors).
    let err = (&exact - &bf16).abs().max().double_value(&[]);
    assert!(err < 0.5, "bf16 matmul deviates by {err}");
    let err32 = (&exact - a.mm(&b)).abs().max().double_value(&[]);
    assert_eq!(err32, 0.0);
}

#[test]
fn cuda_detection_matches_runtime() {
    // On a CPU-only machine both are false; on a GPU machine libtorch_cuda must
    // have been force-linked, or Cuda::is_available() would wrongly say false.
    let n = tch::Cuda::device_count();
    assert_eq!(tch::Cuda::is_available(), n > 0);
    if n > 0 {
        let x = Tensor::ones([4, 4], (Kind::BFloat16, Device::Cuda(0)));
        let y = x
            .matmul(&x)
            .to_kind(Kind::Float)
            .sum(Kind::Float)
            .double_value(&[]);
        assert_eq!(y, 64.0);
    }
}
