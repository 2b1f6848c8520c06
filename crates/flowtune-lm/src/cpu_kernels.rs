//! Fused CPU kernels for the small per-token steps of decoding (inference only).
//!
//! Decoding a few rows spends most of its non-matmul time in libtorch's per-op overhead: an
//! RMSNorm is seven tensor ops (about 17 µs at `[1, 576]` bf16 on the development CPU) and
//! one-query attention over a KV-cache view is eight, some of which copy the strided cache
//! (about 90–170 µs per layer at 264 keys). These kernels do the same arithmetic in one pass over
//! the tensors' memory, with the same rounding points as the libtorch / HF formulation they
//! replace, so they agree with it to float rounding (tested in `tests/cpu_kernels.rs`).
//!
//! They only run where that is safe and pays: CPU tensors that do not require gradients, of the
//! kinds named per kernel. Every entry point returns `Ok(None)` when it does not apply and the
//! caller falls back to libtorch. RMSNorm is written over 16-lane accumulators that the compiler
//! vectorises (an AVX-512 and an AVX2 build, chosen at run time); attention and the float32
//! products are written in AVX-512F intrinsics. Measured on the development CPU (release build, bf16, SmolLM2 shapes,
//! 264 cached keys): RMSNorm of one row 1.1 µs against 16–25 µs, attention 17–19 µs against
//! 100–140 µs at batch 1 and 137–141 µs against 230–360 µs at batch 8.
//!
//! [`attention`] also serves prompt batches (many query positions per row, causal over the
//! cache), where libtorch's SDPA runs small per-block GEMMs (through MKL's generic bf16 path on
//! AMD Zen 4).
//!
//! The products: [`PanelWeight`] and [`linear_bf16_small`] for decoding a few rows,
//! [`Int4F32Weight`] for 4-bit weights with float32 activations, and [`Bf16Gemm`], the choice of
//! running bf16 products of many rows through float32 where that is faster on this CPU.
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::OnceLock;

use tch::{Device, Kind, Tensor};

use crate::Result;

const LANES: usize = 16;

/// Round an f32 to the nearest bf16 (ties to even), as libtorch's cast does; NaN stays a
/// (quiet) NaN. Branch-free so that loops over it vectorise.
#[inline(always)]
fn bf16_bits(x: f32) -> u16 {
    let bits = x.to_bits();
    let rounded = (bits.wrapping_add(0x7fff + ((bits >> 16) & 1)) >> 16) as u16;
    if x.is_nan() {
        ((bits >> 16) as u16) | 0x0040
    } else {
        rounded
    }
}

#[inline(always)]
fn bf16_value(bits: u16) -> f32 {
    f32::from_bits((bits as u32) << 16)
}

/// `Σ a[i] * b[i]` in f32 over 16 fused multiply-add lanes (vectorised; the order differs
/// from a plain loop only by float rounding).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; LANES];
    let (ac, ar) = a.as_chunks::<LANES>();
    let (bc, br) = b.as_chunks::<LANES>();
    for (x, y) in ac.iter().zip(bc) {
        for j in 0..LANES {
            acc[j] = x[j].mul_add(y[j], acc[j]);
        }
    }
    let mut s = 0f32;
    for (x, y) in ar.iter().zip(br) {
        s = x.mul_add(*y, s);
    }
    reduce(acc) + s
}

/// The sum of 16 lanes as a tree of halving vector adds (4 dependent steps, not 15).
#[inline(always)]
fn reduce(mut acc: [f32; LANES]) -> f32 {
    let mut w = LANES / 2;
    while w > 0 {
        for i in 0..w {
            acc[i] += acc[i + w];
        }
        w /= 2;
    }
    acc[0]
}

/// bf16 bits to f32 values (vectorisable).
#[inline(always)]
fn widen(src: &[u16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = bf16_value(*s);
    }
}

/// Call `$call` with `$m` bound to `$rows` (1..=8) as a constant, for the kernels that keep one
/// accumulator per row (or per 16 lanes of an attention head) in registers.
#[rustfmt::skip]
macro_rules! with_rows {
    ($rows:expr, $m:ident => $call:expr) => {
        match $rows {
            1 => { const $m: usize = 1; $call }
            2 => { const $m: usize = 2; $call }
            3 => { const $m: usize = 3; $call }
            4 => { const $m: usize = 4; $call }
            5 => { const $m: usize = 5; $call }
            6 => { const $m: usize = 6; $call }
            7 => { const $m: usize = 7; $call }
            _ => { const $m: usize = 8; $call }
        }
    };
}

/// One cache line of float32s.
#[derive(Clone, Copy)]
#[repr(C, align(64))]
struct Line([f32; LANES]);

/// A float32 scratch buffer that starts on a cache-line boundary, so the kernels' 16-lane
/// loads never straddle two lines (measured: the widened bf16 rows of the int4 and Q8_0
/// products, in a plain `Vec` at malloc's 16-byte alignment, made those products ~20 % slower
/// in bf16 than the same kernels over libtorch's aligned float32 tensors).
struct AlignedF32 {
    lines: Vec<Line>,
    len: usize,
}

impl AlignedF32 {
    /// `len` copies of `value`.
    fn filled(len: usize, value: f32) -> Self {
        Self {
            lines: vec![Line([value; LANES]); len.div_ceil(LANES)],
            len,
        }
    }

    /// `src` widened from bf16 to float32 (in AVX-512 or AVX2 code where the CPU has it:
    /// compiled for the baseline, the conversion ran 16 lanes through SSE2 one line at a time).
    fn widened(src: &[u16]) -> Self {
        let mut buf = Self::filled(src.len(), 0.0);
        widen_fast(src, buf.as_mut_slice());
        buf
    }

    fn as_slice(&self) -> &[f32] {
        // SAFETY: `Line` is `repr(C)` over `[f32; 16]` with size 64 = its alignment, so the
        // lines are `16 * lines.len() >= len` contiguous, initialised float32s.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<f32>(), self.len) }
    }

    fn as_mut_slice(&mut self) -> &mut [f32] {
        // SAFETY: as in `as_slice`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<f32>(), self.len) }
    }
}

static ENABLED: AtomicBool = AtomicBool::new(true);

/// Turn the kernels on or off for the whole process (on by default). Off, every entry point
/// returns `None` and the model runs libtorch's ops instead: for A/B comparisons and as an
/// escape hatch.
pub fn set_enabled(on: bool) {
    ENABLED.store(on, Ordering::Relaxed);
}

/// Whether this CPU runs the kernels and they are enabled: x86-64 with AVX2 and FMA (the loops
/// rely on fused multiply-adds; without them `mul_add` is a slow library call). Elsewhere every
/// entry point returns `None` and libtorch does the work.
pub fn available() -> bool {
    enabled_on_cpu(false)
}

/// How bf16 products of many rows (prefill, training) run on the CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bf16Gemm {
    /// libtorch's bf16 `linear` (oneDNN): fastest where the CPU multiplies bf16 natively at
    /// speed (AMX; AMD Zen 4 measured 2x its float32 rate).
    Native,
    /// Inputs widened to float32, multiplied by a float32 copy of the weight, the result rounded
    /// to bf16 once. bf16 x bf16 products are exact in float32 and oneDNN also accumulates in
    /// float32, so the two differ only by summation order; this is faster on CPUs whose bf16
    /// GEMM is slower than their float32 one (measured on the session-5 Intel Xeon without
    /// AMX: 164 against 306 GFLOP/s), at the cost of the float32 copy.
    ViaF32,
}

/// A kernel switch that tests and benchmarks can force on or off, or leave to the
/// environment (`None`).
struct Override(AtomicU8);

impl Override {
    const fn new() -> Self {
        Self(AtomicU8::new(0))
    }

    fn set(&self, choice: Option<bool>) {
        let v = match choice {
            None => 0,
            Some(true) => 1,
            Some(false) => 2,
        };
        self.0.store(v, Ordering::Relaxed);
    }

    fn get(&self) -> Option<bool> {
        match self.0.load(Ordering::Relaxed) {
            1 => Some(true),
            2 => Some(false),
            _ => None,
        }
    }
}

/// `Some(true)`: [`Bf16Gemm::Native`]; `Some(false)`: [`Bf16Gemm::ViaF32`].
static BF16_GEMM_OVERRIDE: Override = Override::new();

/// Force the choice [`bf16_gemm`] returns (`None`: back to the environment and the
/// measurement). It applies to models built afterwards.
pub fn set_bf16_gemm(choice: Option<Bf16Gemm>) {
    BF16_GEMM_OVERRIDE.set(choice.map(|c| c == Bf16Gemm::Native));
}

/// Which [`Bf16Gemm`] bf16 CPU models built now use: the [`set_bf16_gemm`] override, else
/// `FLOWTUNE_BF16_GEMM=native|f32`, else measured once per process: a `[512, 576] x
/// [576, 1536]` product both ways, best of 3, and `ViaF32` only when it is at least 1.3x
/// faster (a margin that keeps the choice stable between runs on one machine).
pub fn bf16_gemm() -> Bf16Gemm {
    match BF16_GEMM_OVERRIDE.get() {
        Some(true) => return Bf16Gemm::Native,
        Some(false) => return Bf16Gemm::ViaF32,
        None => {}
    }
    match std::env::var("FLOWTUNE_BF16_GEMM").as_deref() {
        Ok("native") => return Bf16Gemm::Native,
        Ok("f32") => return Bf16Gemm::ViaF32,
        _ => {}
    }
    static MEASURED: OnceLock<Bf16Gemm> = OnceLock::new();
    *MEASURED.get_or_init(|| match measure_bf16_gemm() {
        Ok((native, wide)) if native > 1.3 * wide => Bf16Gemm::ViaF32,
        _ => Bf16Gemm::Native,
    })
}

/// Seconds (best of 3, after a warm-up) of one bf16 product natively and through float32.
/// Constant inputs: the global random generator stays untouched.
fn measure_bf16_gemm() -> Result<(f64, f64)> {
    let bf = (Kind::BFloat16, Device::Cpu);
    let x = Tensor::f_full([512, 576], 0.5, bf)?;
    let w = Tensor::f_full([1536, 576], 0.25, bf)?;
    let w32 = w.f_to_kind(Kind::Float)?;
    let best = |f: &dyn Fn() -> Result<Tensor>| -> Result<f64> {
        let _ = f()?;
        let mut best = f64::INFINITY;
        for _ in 0..3 {
            let t = std::time::Instant::now();
            let _ = f()?;
            best = best.min(t.elapsed().as_secs_f64());
        }
        Ok(best)
    };
    let native = best(&|| Ok(x.f_linear::<Tensor>(&w, None)?))?;
    let wide = best(&|| {
        Ok(x.f_to_kind(Kind::Float)?
            .f_linear::<Tensor>(&w32, None)?
            .f_to_kind(Kind::BFloat16)?)
    })?;
    Ok((native, wide))
}

/// Whether the kernels are enabled and the CPU has FMA plus AVX-512F (`avx512`) or AVX2.
fn enabled_on_cpu(avx512: bool) -> bool {
    if !ENABLED.load(Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        let wide = if avx512 {
            std::arch::is_x86_feature_detected!("avx512f")
        } else {
            std::arch::is_x86_feature_detected!("avx2")
        };
        wide && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = avx512;
        false
    }
}

/// Define `$name` running `body` compiled for AVX-512 when the CPU has it, else for AVX2 (the
/// body is inlined into each version). Callers check [`available`] first.
macro_rules! multiversion {
    ($name:ident, fn($($arg:ident: $ty:ty),*) $body:block) => {
        #[allow(clippy::too_many_arguments)]
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            #[allow(clippy::too_many_arguments)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx512($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                #[allow(clippy::too_many_arguments)]
                unsafe fn avx2($($arg: $ty),*) { generic($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: the features `avx512` is compiled for were detected on this CPU.
                    return unsafe { avx512($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    // SAFETY: as above, for `avx2`.
                    return unsafe { avx2($($arg),*) };
                }
            }
            generic($($arg),*)
        }
    };
}

multiversion!(widen_fast, fn(src: &[u16], dst: &mut [f32]) {
    widen(src, dst)
});

/// Whether `t` is a CPU tensor the kernels may read directly (no autograd involved).
fn plain_cpu(t: &Tensor) -> bool {
    t.device() == Device::Cpu && !t.requires_grad()
}

/// The elements of a contiguous CPU tensor of `kind`'s element type `E`.
///
/// # Safety
/// `t` must be contiguous, on the CPU, and of an element type with the size and layout of `E`.
unsafe fn elements<E>(t: &Tensor) -> &[E] {
    let n = t.numel();
    if n == 0 {
        return &[];
    }
    // SAFETY: by the caller's contract the storage holds `n` contiguous `E` values starting at
    // `data_ptr`, alive as long as `t` is borrowed.
    unsafe { std::slice::from_raw_parts(t.data_ptr() as *const E, n) }
}

/// The elements of a freshly allocated contiguous CPU tensor, for writing.
///
/// # Safety
/// As [`elements`]; in addition no other view of `t`'s storage may be read or written while
/// the slice lives (true for a tensor just made by `empty`).
#[allow(clippy::mut_from_ref)]
unsafe fn elements_mut<E>(t: &Tensor) -> &mut [E] {
    let n = t.numel();
    if n == 0 {
        return &mut [];
    }
    // SAFETY: see the function's contract.
    unsafe { std::slice::from_raw_parts_mut(t.data_ptr() as *mut E, n) }
}

multiversion!(rms_norm_bf16_rows, fn(x: &[u16], w: &[u16], out: &mut [u16], h: usize, eps: f32) {
    let mut line = AlignedF32::filled(h, 0.0);
    let row = line.as_mut_slice();
    let wf = AlignedF32::widened(w);
    let wf = wf.as_slice();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        widen(xr, row);
        let inv = 1.0 / (dot(row, row) / h as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(row.iter()).zip(wf) {
            // HF: `weight * (x * rsqrt(var + eps)).to(bf16)`, the product rounded to bf16.
            *o = bf16_bits(g * bf16_value(bf16_bits(v * inv)));
        }
    }
});

multiversion!(rms_norm_f32_rows, fn(x: &[f32], w: &[f32], out: &mut [f32], h: usize, eps: f32) {
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        let inv = 1.0 / (dot(xr, xr) / h as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(xr).zip(w) {
            *o = g * (v * inv);
        }
    }
});

/// Whether [`rms_norm`] takes `x` with `weight`: bf16 or f32 CPU tensors of one kind without
/// gradients, `weight` `[h]` for `x` `[..., h]`.
fn rms_norm_takes(x: &Tensor, weight: &Tensor) -> bool {
    let kind = x.kind();
    let h = x.size().last().copied().unwrap_or(0);
    available()
        && plain_cpu(x)
        && plain_cpu(weight)
        && weight.kind() == kind
        && matches!(kind, Kind::BFloat16 | Kind::Float)
        && h > 0
        && weight.size() == [h]
}

/// `f` over `0..rows` split across libtorch's OpenMP team when `work` (multiply-adds or their
/// equivalent) is large enough, else on the calling thread.
fn split_rows(rows: usize, work: usize, f: &(dyn Fn(std::ops::Range<usize>) + Sync)) {
    #[cfg(target_arch = "x86_64")]
    omp::split(rows, 1, work, f);
    #[cfg(not(target_arch = "x86_64"))]
    {
        let _ = work;
        f(0..rows);
    }
}

/// Element addresses of [`norm_rows`]' tensors: `x`, `weight`, `(delta, sum)`, `normed`.
#[derive(Clone, Copy)]
struct NormAddrs {
    x: usize,
    weight: usize,
    delta_sum: Option<(usize, usize)>,
    normed: usize,
}

/// Rows `r` of [`norm_rows`] for element type `E`: `sum = add(x, delta)` then
/// `normed = norm(sum)`, or `normed = norm(x)` without a delta.
///
/// # Safety
/// As [`norm_rows`], with `E` the tensors' element type; no other thread touches rows `r` of
/// `sum` and `normed`.
unsafe fn norm_range<E>(
    at: NormAddrs,
    r: std::ops::Range<usize>,
    h: usize,
    eps: f32,
    add: fn(&[E], &[E], &mut [E]),
    norm: fn(&[E], &[E], &mut [E], usize, f32),
) {
    let (first, n) = (r.start * h, (r.end - r.start) * h);
    // SAFETY: rows `r` of each tensor lie inside its `rows * h` elements (the caller's
    // contract), and the weight holds `h`.
    unsafe {
        let x = std::slice::from_raw_parts((at.x as *const E).add(first), n);
        let w = std::slice::from_raw_parts(at.weight as *const E, h);
        let out = std::slice::from_raw_parts_mut((at.normed as *mut E).add(first), n);
        match at.delta_sum {
            Some((d, sum)) => {
                let d = std::slice::from_raw_parts((d as *const E).add(first), n);
                let sum = std::slice::from_raw_parts_mut((sum as *mut E).add(first), n);
                add(x, d, sum);
                norm(sum, w, out, h, eps);
            }
            None => norm(x, w, out, h, eps),
        }
    }
}

/// RMSNorm (and, with `delta`, the residual sum before it) of the rows of contiguous `x`
/// `[rows, h]` into `normed` (and `sum`), split across threads by rows.
///
/// # Safety
/// `x`, `delta`, `sum` and `normed` are contiguous CPU tensors of `kind` (bf16 or f32) with
/// `rows * h` elements, `weight` has `h`; `sum` and `normed` are fresh.
unsafe fn norm_rows(
    kind: Kind,
    x: &Tensor,
    delta: Option<(&Tensor, &Tensor)>,
    weight: &Tensor,
    normed: &Tensor,
    h: usize,
    eps: f32,
) {
    let rows = x.numel() / h;
    // Addresses, not pointers, so that the closure below is `Sync`.
    let at = NormAddrs {
        x: x.data_ptr() as usize,
        weight: weight.data_ptr() as usize,
        delta_sum: delta.map(|(d, sum)| (d.data_ptr() as usize, sum.data_ptr() as usize)),
        normed: normed.data_ptr() as usize,
    };
    let run = |r: std::ops::Range<usize>| {
        // SAFETY: as this function's contract; each thread writes only rows `r` of `sum` and
        // `normed` (joined before they are used).
        unsafe {
            match kind {
                Kind::BFloat16 => norm_range(at, r, h, eps, add_bf16, rms_norm_bf16_rows),
                _ => norm_range(at, r, h, eps, add_f32, rms_norm_f32_rows),
            }
        }
    };
    split_rows(rows, rows * h * 4, &run);
}

/// RMSNorm over the last dimension as HF's `LlamaRMSNorm` computes it (mean of squares and
/// the scaling in f32, the normalised value cast to the model dtype before the weight product),
/// for bf16 or f32 CPU inputs (rows split across threads when there are many); `None`
/// otherwise.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let kind = x.kind();
    let h = x.size().last().copied().unwrap_or(0);
    if !rms_norm_takes(x, weight) {
        return Ok(None);
    }
    let x = x.f_contiguous()?;
    let weight = weight.f_contiguous()?;
    let out = Tensor::f_empty(x.size(), (kind, Device::Cpu))?;
    // SAFETY: all three are contiguous CPU tensors of `kind` (bf16 = u16 bits, f32 = f32); `out`
    // was just allocated and is not shared.
    unsafe { norm_rows(kind, &x, None, &weight, &out, h as usize, eps as f32) };
    Ok(Some(out))
}

multiversion!(add_bf16, fn(a: &[u16], b: &[u16], out: &mut [u16]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = bf16_bits(bf16_value(x) + bf16_value(y));
    }
});

multiversion!(add_f32, fn(a: &[f32], b: &[f32], out: &mut [f32]) {
    for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
        *o = x + y;
    }
});

/// The residual step of a decoder layer in one call: `sum = x + delta` (rounded to the dtype,
/// as libtorch's `add` rounds) and [`rms_norm`]`(sum, weight)`, returned as `(sum, normed)`.
/// Bit-identical to the two ops, in one pass over each row. The same inputs as [`rms_norm`]
/// take it (bf16 or f32 CPU tensors), with `delta` of `x`'s shape and kind; `None` otherwise.
pub fn add_rms_norm(
    x: &Tensor,
    delta: &Tensor,
    weight: &Tensor,
    eps: f64,
) -> Result<Option<(Tensor, Tensor)>> {
    let kind = x.kind();
    // `rms_norm`'s conditions, checked before anything is computed.
    if !plain_cpu(delta)
        || delta.kind() != kind
        || delta.size() != x.size()
        || !rms_norm_takes(x, weight)
    {
        return Ok(None);
    }
    let (x, delta, weight) = (
        x.f_contiguous()?,
        delta.f_contiguous()?,
        weight.f_contiguous()?,
    );
    let sum = Tensor::f_empty(x.size(), (kind, Device::Cpu))?;
    let normed = Tensor::f_empty(x.size(), (kind, Device::Cpu))?;
    let h = x.size().last().copied().unwrap_or(1) as usize;
    // SAFETY: `x`, `delta` and the fresh `sum` and `normed` are contiguous CPU tensors of
    // `kind` with the same number of elements (bf16 = u16 bits); `weight` has `h`.
    unsafe {
        norm_rows(
            kind,
            &x,
            Some((&delta, &sum)),
            &weight,
            &normed,
            h,
            eps as f32,
        )
    };
    Ok(Some((sum, normed)))
}

/// Strides and sizes of a `[B, heads, L, hd]` view whose rows of `hd` are contiguous.
#[derive(Clone, Copy)]
struct View4 {
    b: usize,
    h: usize,
    l: usize,
    stride: [usize; 3],
}

impl View4 {
    fn of(t: &Tensor) -> Option<Self> {
        let (size, stride) = (t.size(), t.stride());
        if size.len() != 4 || stride[3] != 1 || stride.iter().any(|&s| s < 0) {
            return None;
        }
        Some(Self {
            b: size[0] as usize,
            h: size[1] as usize,
            l: size[2] as usize,
            stride: [stride[0] as usize, stride[1] as usize, stride[2] as usize],
        })
    }

    fn at(&self, b: usize, h: usize, l: usize) -> usize {
        b * self.stride[0] + h * self.stride[1] + l * self.stride[2]
    }

    /// One past the furthest element the view reaches (with `hd` per row).
    fn extent(&self, hd: usize) -> usize {
        if self.b == 0 || self.h == 0 || self.l == 0 {
            return 0;
        }
        self.at(self.b - 1, self.h - 1, self.l - 1) + hd
    }
}

/// The shapes of one attention call.
#[derive(Clone, Copy)]
struct AttnShape {
    q: View4,
    k: View4,
    v: View4,
    hd: usize,
    group: usize,
    /// Work units per (row, kv head) pair and block of positions: 1, or `group` (one query
    /// head each) when there are too few to keep every thread busy (decoding at batch 1).
    parts: usize,
    /// Query positions per work unit.
    qb: usize,
    /// Query position `i` sees keys `j <= start + i` (the cache held `start` keys before them).
    start: usize,
    scale: f32,
}

/// One work unit of the attention kernels: row `b`, kv head `kvh`, query heads from `head0`
/// and positions `i0..i0 + np`. Its query row `r = g * np + ii` (`rows` of them) is head
/// `head0 + g` at position `i0 + ii`; no row sees keys from `end` on.
#[derive(Clone, Copy)]
struct AttnUnit<'a> {
    b: usize,
    kvh: usize,
    head0: usize,
    i0: usize,
    np: usize,
    rows: usize,
    end: usize,
    shape: AttnShape,
    queries: Option<&'a [bool]>,
}

impl AttnShape {
    /// Work unit `unit`: `((b * nkv + h) * parts + p) * blocks + i` is part `p` of the query
    /// heads that read kv head `h` of row `b`, at the `i`-th block of `qb` positions.
    /// `queries` (`[B * t]`, false = padding) as the kernels take it.
    fn unit<'a>(&self, unit: usize, queries: Option<&'a [bool]>) -> AttnUnit<'a> {
        let (l, t) = (self.k.l, self.q.l);
        let group = self.group / self.parts;
        let (rest, qblock) = (unit / t.div_ceil(self.qb), unit % t.div_ceil(self.qb));
        let (pair, part) = (rest / self.parts, rest % self.parts);
        let i0 = qblock * self.qb;
        let np = self.qb.min(t - i0);
        AttnUnit {
            b: pair / self.k.h,
            kvh: pair % self.k.h,
            head0: (pair % self.k.h) * self.group + part * group,
            i0,
            np,
            rows: group * np,
            end: l.min(self.start + i0 + np),
            shape: *self,
            queries,
        }
    }
}

impl AttnUnit<'_> {
    /// Row `r` sees keys below this: `j <= start + i` for its position `i`; 0 for a padding
    /// query, which sees nothing (its output is zero).
    fn limit(&self, r: usize) -> usize {
        let (s, ii) = (&self.shape, self.i0 + r % self.np);
        if self.queries.is_some_and(|v| !v[self.b * s.q.l + ii]) {
            0
        } else {
            s.k.l.min(s.start + ii + 1)
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The kernels' inner loops in AVX-512F intrinsics (16 f32 lanes).
    use std::arch::x86_64::*;

    use super::AttnShape;

    /// How many weight rows ahead `gemv_bf16` prefetches.
    const PREFETCH_ROWS: usize = 4;

    /// 16 bf16 values (bits) at `p` widened to f32.
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        // SAFETY (all functions here): callers pass pointers to at least 16 readable values
        // and run on a CPU with AVX-512F (checked by `int4_f32_available`).
        unsafe {
            let h = _mm256_loadu_si256(p as *const __m256i);
            _mm512_castsi512_ps(_mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(h)))
        }
    }

    /// Round 16 f32 values to bf16 (ties to even) and return them as f32; NaN lanes stay NaN.
    #[inline(always)]
    unsafe fn round_bf16(x: __m512) -> __m512 {
        unsafe {
            let bits = _mm512_castps_si512(x);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let biased = _mm512_add_epi32(_mm512_add_epi32(bits, _mm512_set1_epi32(0x7fff)), lsb);
            let rounded = _mm512_castsi512_ps(_mm512_and_si512(
                biased,
                _mm512_set1_epi32(0xffff_0000u32 as i32),
            ));
            let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(x, x);
            _mm512_mask_blend_ps(nan, rounded, x)
        }
    }

    /// `e^x` for `x <= 0` (soft-max inputs after subtracting the maximum): Cephes' `expf`
    /// range reduction and polynomial (relative error about 1e-7), 0 below -87.3 and for -inf.
    #[inline(always)]
    unsafe fn exp_nonpositive(x: __m512) -> __m512 {
        unsafe {
            let lo = _mm512_set1_ps(-87.3);
            let xc = _mm512_max_ps(x, lo);
            let n = _mm512_roundscale_ps::<{ _MM_FROUND_TO_NEG_INF | _MM_FROUND_NO_EXC }>(
                _mm512_fmadd_ps(
                    xc,
                    _mm512_set1_ps(std::f32::consts::LOG2_E),
                    _mm512_set1_ps(0.5),
                ),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            for c in [
                1.398_199_9e-3,
                8.333_452e-3,
                4.166_579_6e-2,
                1.666_666_5e-1,
                5e-1,
            ] {
                p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(c));
            }
            let e = _mm512_add_ps(
                _mm512_fmadd_ps(_mm512_mul_ps(p, r), r, r),
                _mm512_set1_ps(1.0),
            );
            let pow2 = _mm512_castsi512_ps(_mm512_slli_epi32::<23>(_mm512_add_epi32(
                _mm512_cvtps_epi32(n),
                _mm512_set1_epi32(127),
            )));
            let under = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, lo);
            _mm512_mask_blend_ps(under, _mm512_mul_ps(e, pow2), _mm512_setzero_ps())
        }
    }

    /// `y = x @ w.T` for `M` rows (see `super::Int4F32Weight`): per output and group, the
    /// dequantised weights `scale * q + min` (looked up in the group's 16-value table, shared by
    /// all rows) times the inputs in 16-lane fused multiply-adds.
    ///
    /// # Safety
    /// `y` points at `M * n` writable floats; outputs `from..to` of every row are written.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::needless_range_loop)] // `m` indexes the accumulators and the rows alike
    pub(super) unsafe fn int4_f32<const M: usize, const A: usize>(
        w: &super::Int4F32Weight,
        x: &[f32],
        y: *mut f32,
        from: usize,
        to: usize,
    ) {
        // `A` accumulator sets per row (2 or 4): the low and high halves of a group (and with
        // 4, even and odd groups) add into separate registers, summed at the end, so no row
        // waits on one chain of dependent FMAs (one set at 8 rows was measurably slower).
        debug_assert!(A == 2 || A == 4);
        let sets = A / 2;
        const G: usize = super::GROUP;
        let (n, k) = (w.n, w.k);
        let groups = k / G;
        let codes16 = _mm512_setr_ps(
            0.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0, 9.0, 10.0, 11.0, 12.0, 13.0, 14.0, 15.0,
        );
        // SAFETY: `packed` holds `n * k / 2` bytes, `scale`/`min` `n * groups` values, `x`
        // `M * k` and `y` `M * n` (checked by the caller's shapes); `from..to` lies in `0..n`.
        unsafe {
            for o in from..to {
                let mut acc = [[_mm512_setzero_ps(); M]; A];
                let codes = w.packed.as_ptr().add(o * k / 2);
                let ahead = (o + PREFETCH_ROWS < to).then(|| codes.add(PREFETCH_ROWS * k / 2));
                for g in 0..groups {
                    // Four groups of codes per cache line (see `gemv_bf16`).
                    if let Some(a) = ahead.filter(|_| g % 4 == 0) {
                        _mm_prefetch::<_MM_HINT_T0>(a.add(g * G / 2) as *const i8);
                    }
                    let bytes = _mm_loadu_si128(codes.add(g * G / 2) as *const __m128i);
                    let wide = _mm512_cvtepu8_epi32(bytes);
                    let s = _mm512_set1_ps(*w.scale.get_unchecked(o * groups + g));
                    let mn = _mm512_set1_ps(*w.min.get_unchecked(o * groups + g));
                    // The group's 16 possible weights `s * q + m` (one rounding each, as a
                    // fused multiply-add of the code would give), looked up by code: the
                    // permute reads only the low 4 bits of each lane, so the low nibble needs
                    // no mask (two instructions fewer per group than converting both halves).
                    let table = _mm512_fmadd_ps(codes16, s, mn);
                    let lo = _mm512_permutexvar_ps(wide, table);
                    let hi = _mm512_permutexvar_ps(_mm512_srli_epi32::<4>(wide), table);
                    let a = (g % sets) * 2;
                    for m in 0..M {
                        let xp = x.as_ptr().add(m * k + g * G);
                        acc[a][m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(xp), acc[a][m]);
                        acc[a + 1][m] =
                            _mm512_fmadd_ps(hi, _mm512_loadu_ps(xp.add(16)), acc[a + 1][m]);
                    }
                }
                for m in 0..M {
                    let mut sum = acc[0][m];
                    for set in acc.iter().skip(1) {
                        sum = _mm512_add_ps(sum, set[m]);
                    }
                    *y.add(m * n + o) = _mm512_reduce_add_ps(sum);
                }
            }
        }
    }

    /// `y = x @ w.T` for `M` rows over Q8_0 blocks (see `super::Int8F32Weight`): per output
    /// and group, the 32 codes widened and scaled once (shared by all rows), then 16-lane fused
    /// multiply-adds; `A` (1 or 2) accumulator sets per row, the low and high 16 inputs of a
    /// group in separate registers with 2.
    ///
    /// # Safety
    /// `x` holds `M * k` floats, `y` points at `M * n` writable floats; `from..to` lies in
    /// `0..n`.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::needless_range_loop)] // `m` indexes the accumulators and the rows alike
    pub(super) unsafe fn int8_f32<const M: usize, const A: usize>(
        w: &super::Int8F32Weight,
        x: &[f32],
        y: *mut f32,
        from: usize,
        to: usize,
    ) {
        const G: usize = super::GROUP;
        let (n, k) = (w.n, w.k);
        let groups = k / G;
        let hi = if A >= 2 { 1 } else { 0 };
        // SAFETY: `codes` holds `n * k` bytes and `scale` `n * groups` values (checked at
        // construction); `x`, `y` and `from..to` as the caller guarantees.
        unsafe {
            for o in from..to {
                let mut acc = [[_mm512_setzero_ps(); M]; A];
                let codes = w.codes.as_ptr().add(o * k);
                let ahead = (o + PREFETCH_ROWS < to).then(|| codes.add(PREFETCH_ROWS * k));
                for g in 0..groups {
                    // Two groups per cache line.
                    if let Some(a) = ahead.filter(|_| g % 2 == 0) {
                        _mm_prefetch::<_MM_HINT_T0>(a.add(g * G));
                    }
                    let s = _mm512_set1_ps(*w.scale.get_unchecked(o * groups + g));
                    let c = codes.add(g * G) as *const __m128i;
                    let w0 = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c))),
                        s,
                    );
                    let w1 = _mm512_mul_ps(
                        _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(c.add(1)))),
                        s,
                    );
                    for m in 0..M {
                        let xp = x.as_ptr().add(m * k + g * G);
                        acc[0][m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(xp), acc[0][m]);
                        acc[hi][m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(xp.add(16)), acc[hi][m]);
                    }
                }
                for m in 0..M {
                    let mut sum = acc[0][m];
                    for set in acc.iter().skip(1) {
                        sum = _mm512_add_ps(sum, set[m]);
                    }
                    *y.add(m * n + o) = _mm512_reduce_add_ps(sum);
                }
            }
        }
    }

    /// 32 weights of one panel row at `p` as two 16-lane float32 vectors: float32 values
    /// as they are, bf16 ones widened (exact).
    pub(super) trait PanelElem: Copy {
        /// # Safety
        /// `p` points at 32 readable values on a 64-byte boundary (float32: 128 bytes).
        unsafe fn load_row(p: *const Self) -> (__m512, __m512);
    }

    impl PanelElem for f32 {
        #[inline(always)]
        unsafe fn load_row(p: *const f32) -> (__m512, __m512) {
            // SAFETY: the caller's contract.
            unsafe { (_mm512_load_ps(p), _mm512_load_ps(p.add(16))) }
        }
    }

    impl PanelElem for u16 {
        #[inline(always)]
        unsafe fn load_row(p: *const u16) -> (__m512, __m512) {
            // SAFETY: the caller's contract.
            unsafe {
                let v = _mm512_load_si512(p as *const __m512i);
                let lo = _mm512_cvtepu16_epi32(_mm512_castsi512_si256(v));
                let hi = _mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64::<1>(v));
                (
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(lo)),
                    _mm512_castsi512_ps(_mm512_slli_epi32::<16>(hi)),
                )
            }
        }
    }

    /// The bits of one IEEE half-precision value (a panel element of a float32 weight whose
    /// values are all half-precision values).
    #[derive(Clone, Copy)]
    #[repr(transparent)]
    pub(super) struct F16(#[allow(dead_code)] pub(super) u16);

    impl PanelElem for F16 {
        #[inline(always)]
        unsafe fn load_row(p: *const F16) -> (__m512, __m512) {
            // SAFETY: the caller's contract.
            unsafe {
                let v = _mm512_load_si512(p as *const __m512i);
                (
                    _mm512_cvtph_ps(_mm512_castsi512_si256(v)),
                    _mm512_cvtph_ps(_mm512_extracti64x4_epi64::<1>(v)),
                )
            }
        }
    }

    /// The codes of one row (one input, 32 outputs) of a block-coded panel as two 16-lane
    /// float32 vectors (exact).
    pub(super) trait CodeRow {
        /// Bytes per row.
        const BYTES: usize;
        /// # Safety
        /// `p` points at `BYTES` readable bytes on a 16-byte boundary.
        unsafe fn load_codes(p: *const u8) -> (__m512, __m512);
    }

    /// 4-bit codes `0..=15`, two to a byte: output `c` in the low nibble of byte `c`, output
    /// `c + 16` in its high nibble.
    pub(super) struct Nibbles;

    impl CodeRow for Nibbles {
        const BYTES: usize = 16;
        #[inline(always)]
        unsafe fn load_codes(p: *const u8) -> (__m512, __m512) {
            // SAFETY: the caller's contract.
            unsafe {
                let v = _mm512_cvtepu8_epi32(_mm_load_si128(p as *const __m128i));
                let lo = _mm512_and_si512(v, _mm512_set1_epi32(0x0f));
                let hi = _mm512_srli_epi32::<4>(v);
                (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(hi))
            }
        }
    }

    /// Signed 8-bit codes, one byte per output.
    pub(super) struct Bytes;

    impl CodeRow for Bytes {
        const BYTES: usize = 32;
        #[inline(always)]
        unsafe fn load_codes(p: *const u8) -> (__m512, __m512) {
            // SAFETY: the caller's contract.
            unsafe {
                let lo = _mm512_cvtepi8_epi32(_mm_load_si128(p as *const __m128i));
                let hi = _mm512_cvtepi8_epi32(_mm_load_si128(p.add(16) as *const __m128i));
                (_mm512_cvtepi32_ps(lo), _mm512_cvtepi32_ps(hi))
            }
        }
    }

    /// The float32 lanes of `v` rounded to bf16 (ties to even, `super::bf16_bits` for every
    /// value but NaN) and widened back.
    #[inline(always)]
    unsafe fn round_to_bf16(v: __m512) -> __m512 {
        // SAFETY: register-only AVX-512F operations (the callers enable the feature).
        unsafe {
            let bits = _mm512_castps_si512(v);
            let lsb = _mm512_and_si512(_mm512_srli_epi32::<16>(bits), _mm512_set1_epi32(1));
            let up = _mm512_add_epi32(bits, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
            _mm512_castsi512_ps(_mm512_and_si512(up, _mm512_set1_epi32(-65536)))
        }
    }

    /// The float32 lanes of `w0` (outputs 0..16) and `w1` (16..32) rounded to bf16 by
    /// `vcvtne2ps2bf16` (ties to even; the same values as [`round_to_bf16`] for every normal
    /// or zero value, the only ones block codes make) and widened in two unpacks, which leave
    /// them interleaved: lane `4l + i` of the first holds output `8l + i`, of the second
    /// output `8l + 4 + i` (`l < 4`, `i < 4`).
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16")]
    #[inline]
    unsafe fn round_to_bf16_interleaved(w0: __m512, w1: __m512) -> (__m512, __m512) {
        // SAFETY: 32 bf16 values and 32 16-bit integers are the same 64 bytes.
        let packed: __m512i = unsafe { std::mem::transmute(_mm512_cvtne2ps_pbh(w1, w0)) };
        let zero = _mm512_setzero_si512();
        (
            _mm512_castsi512_ps(_mm512_unpacklo_epi16(zero, packed)),
            _mm512_castsi512_ps(_mm512_unpackhi_epi16(zero, packed)),
        )
    }

    /// How [`gemm_coded_panels`] rounds its widened weights: not at all (float32 weights).
    pub(super) const ROUND_NONE: u8 = 0;
    /// To bf16 in integer operations ([`round_to_bf16`]).
    pub(super) const ROUND_BF16: u8 = 1;
    /// To bf16 by `vcvtne2ps2bf16`, lanes interleaved ([`round_to_bf16_interleaved`]).
    pub(super) const ROUND_BF16_NATIVE: u8 = 2;

    /// Bytes of one block (32 inputs) of one block-coded panel: 32 f16 scales, 32 f16 minima
    /// when `MIN`, then 32 rows of codes.
    pub(super) const fn coded_block_bytes<C: CodeRow, const MIN: bool>() -> usize {
        64 * (1 + MIN as usize) + 32 * C::BYTES
    }

    /// The operands of one thread's share of a block-coded panel product: `M * k` inputs `x`,
    /// the panels' bytes `data` (see [`gemm_coded_panels`]), `n` outputs, and the panels
    /// `from..to` to run.
    #[derive(Clone, Copy)]
    pub(super) struct CodedJob<'a> {
        pub(super) x: &'a [f32],
        pub(super) data: &'a [u8],
        pub(super) n: usize,
        pub(super) k: usize,
        pub(super) from: usize,
        pub(super) to: usize,
    }

    /// [`gemm_panels`] over block-coded panels (see `super::PanelWeight::from_codes`): block `b`
    /// of panel `p` (inputs `32b..32b + 32`) is [`coded_block_bytes`] bytes at `(p · K/32 + b)`
    /// blocks into `data`. Each weight is `code * scale (+ min)`, a product and a sum each
    /// rounded to float32 as the loader dequantises it, then rounded to bf16 as the dense bf16
    /// weight was (`ROUND`: [`ROUND_NONE`] for float32 weights, [`ROUND_BF16`]); the products
    /// and sums after are `gemm_panels`' in the same order, so the outputs are the same bits as
    /// over panels of the dense weight.
    ///
    /// # Safety
    /// `data` holds `n.div_ceil(32) * k / 32` blocks starting on a 64-byte boundary, `x`
    /// `M * k` floats, `k` is a multiple of 32 and `to <= n.div_ceil(32)`.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn gemm_coded_panels<
        C: CodeRow,
        const MIN: bool,
        const ROUND: u8,
        const M: usize,
    >(
        job: CodedJob<'_>,
        out: &mut dyn FnMut(usize, usize, &[f32]),
    ) {
        // SAFETY: the caller's contract; `ROUND` is not the native rounding.
        unsafe { coded_panels::<C, MIN, ROUND, M>(job, out) }
    }

    /// [`gemm_coded_panels`] for bf16 weights on a CPU with AVX512-BF16, rounding with
    /// `vcvtne2ps2bf16` ([`ROUND_BF16_NATIVE`]): the same bits, fewer instructions.
    ///
    /// # Safety
    /// As [`gemm_coded_panels`]; the CPU has AVX512-BW and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
    pub(super) unsafe fn gemm_coded_panels_bf16<C: CodeRow, const MIN: bool, const M: usize>(
        job: CodedJob<'_>,
        out: &mut dyn FnMut(usize, usize, &[f32]),
    ) {
        // SAFETY: the caller's contract, which includes the native rounding's features.
        unsafe { coded_panels::<C, MIN, ROUND_BF16_NATIVE, M>(job, out) }
    }

    /// The body of [`gemm_coded_panels`] and [`gemm_coded_panels_bf16`].
    #[inline(always)]
    #[allow(clippy::needless_range_loop)] // `m` indexes the accumulators and the rows alike
    unsafe fn coded_panels<C: CodeRow, const MIN: bool, const ROUND: u8, const M: usize>(
        job: CodedJob<'_>,
        out: &mut dyn FnMut(usize, usize, &[f32]),
    ) {
        let CodedJob {
            x,
            data,
            n,
            k,
            from,
            to,
        } = job;
        let blocks = k / 32;
        let block = coded_block_bytes::<C, MIN>();
        let codes_at = 64 * (1 + MIN as usize);
        let mut sums = [0f32; 32];
        // SAFETY: block `b` of panel `p < to` spans `block` bytes (a multiple of 64) at
        // `(p * blocks + b) * block`, inside `data`; its scales, minima and code rows sit at
        // 32-, 64- and 16-byte boundaries; `x` holds `M * k` floats.
        unsafe {
            for p in from..to {
                let j = p * 32;
                let width = (n - j).min(32);
                let mut acc = [[_mm512_setzero_ps(); 2]; M];
                for b in 0..blocks {
                    let base = data.as_ptr().add((p * blocks + b) * block);
                    let half = |at: usize| {
                        _mm512_cvtph_ps(_mm256_load_si256(base.add(at) as *const __m256i))
                    };
                    let (d0, d1) = (half(0), half(32));
                    let (m0, m1) = if MIN {
                        (half(64), half(96))
                    } else {
                        (_mm512_setzero_ps(), _mm512_setzero_ps())
                    };
                    let rows = base.add(codes_at);
                    for i in 0..32 {
                        let (c0, c1) = C::load_codes(rows.add(i * C::BYTES));
                        // `code * scale` is exact (at most 8 + 11 significant bits), so
                        // the fused multiply-add rounds once where the loader's product and
                        // sum do: the same value.
                        let (mut w0, mut w1) = if MIN {
                            (_mm512_fmadd_ps(c0, d0, m0), _mm512_fmadd_ps(c1, d1, m1))
                        } else {
                            (_mm512_mul_ps(c0, d0), _mm512_mul_ps(c1, d1))
                        };
                        if ROUND == ROUND_BF16 {
                            w0 = round_to_bf16(w0);
                            w1 = round_to_bf16(w1);
                        } else if ROUND == ROUND_BF16_NATIVE {
                            (w0, w1) = round_to_bf16_interleaved(w0, w1);
                        }
                        accumulate_row(&mut acc, x, k, b * 32 + i, (w0, w1));
                    }
                }
                for m in 0..M {
                    spill(&acc[m], &mut sums);
                    if ROUND == ROUND_BF16_NATIVE {
                        let lanes = sums;
                        for l in 0..4 {
                            for i in 0..4 {
                                sums[8 * l + i] = lanes[4 * l + i];
                                sums[8 * l + 4 + i] = lanes[16 + 4 * l + i];
                            }
                        }
                    }
                    out(m, j, &sums[..width]);
                }
            }
        }
    }

    /// One input of a panel product: `x[m, kk]` times the row's weights `w` (outputs 0..16 and
    /// 16..32) added to row `m`'s accumulators, for every row, in fused multiply-adds. Both
    /// panel kernels take this step, so the same weights give the same sums in the same order.
    ///
    /// # Safety
    /// `x` holds `M * k` floats and `kk < k`; the callers enable AVX-512F and FMA.
    #[inline(always)]
    unsafe fn accumulate_row<const M: usize>(
        acc: &mut [[__m512; 2]; M],
        x: &[f32],
        k: usize,
        kk: usize,
        (w0, w1): (__m512, __m512),
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            for (m, row) in acc.iter_mut().enumerate() {
                let xm = _mm512_set1_ps(*x.get_unchecked(m * k + kk));
                row[0] = _mm512_fmadd_ps(xm, w0, row[0]);
                row[1] = _mm512_fmadd_ps(xm, w1, row[1]);
            }
        }
    }

    /// One row's 32 accumulated sums into `sums`.
    #[inline(always)]
    unsafe fn spill(row: &[__m512; 2], sums: &mut [f32; 32]) {
        // SAFETY: `sums` holds 32 floats; the callers enable AVX-512F.
        unsafe {
            _mm512_storeu_ps(sums.as_mut_ptr(), row[0]);
            _mm512_storeu_ps(sums.as_mut_ptr().add(16), row[1]);
        }
    }

    /// `out(m, j, Σ_k x[m, k] * w[j, k])` for the outputs of panels `from..to` of a
    /// [`super::PanelWeight`] (`wp`, 32 outputs per panel, each panel's `k × 32` values one
    /// sequential run): the sums of one panel for every row go through a 32-float buffer to
    /// `out`, which stores them (the last panel's columns past `n` are never handed over).
    ///
    /// # Safety
    /// `wp` holds `n.div_ceil(32) * k * 32` values starting on a 64-byte boundary, `x` `M * k`
    /// floats, and `to <= n.div_ceil(32)`.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::needless_range_loop)] // `m` indexes the accumulators and the rows alike
    pub(super) unsafe fn gemm_panels<E: PanelElem, const M: usize>(
        x: &[f32],
        wp: &[E],
        n: usize,
        k: usize,
        from: usize,
        to: usize,
        out: &mut dyn FnMut(usize, usize, &[f32]),
    ) {
        let mut sums = [0f32; 32];
        // SAFETY: panel `p < to` spans `wp[p * k * 32..(p + 1) * k * 32]`, its rows 32 values
        // (64 or 128 bytes) apart from a 64-byte boundary; `x` holds `M * k` floats.
        unsafe {
            for p in from..to {
                let j = p * 32;
                let width = (n - j).min(32);
                let panel = wp.as_ptr().add(p * k * 32);
                let mut acc = [[_mm512_setzero_ps(); 2]; M];
                for kk in 0..k {
                    accumulate_row(&mut acc, x, k, kk, E::load_row(panel.add(kk * 32)));
                }
                for m in 0..M {
                    spill(&acc[m], &mut sums);
                    out(m, j, &sums[..width]);
                }
            }
        }
    }

    /// `y[m, o] = bf16(Σ_k x[m, k] * w[o, k] + bias[o])` for outputs `from..to` (see
    /// `super::linear_bf16_small`): `O` weight rows at a time, each read once for all `M` input
    /// rows, widened to f32 and accumulated in 16-lane fused multiply-adds.
    ///
    /// # Safety
    /// `x` holds `M * k` floats, `w` `n * k` bf16 values, `bias` (when given) `n`, and `y`
    /// points at `M * n` writable values; `k` is a multiple of 16 and `from..to` lies in `0..n`.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::needless_range_loop, clippy::too_many_arguments)] // `m`/`o` index accumulators and rows alike
    pub(super) unsafe fn gemv_bf16<const M: usize, const O: usize>(
        x: &[f32],
        w: &[u16],
        bias: Option<&[u16]>,
        y: *mut u16,
        n: usize,
        k: usize,
        from: usize,
        to: usize,
    ) {
        let chunks = k / 16;
        // SAFETY: every pointer below stays inside the extents the caller guarantees.
        unsafe {
            let mut o0 = from;
            while o0 < to {
                // A tail of fewer than `O` outputs runs one output at a time.
                let width = if to - o0 >= O { O } else { 1 };
                let mut acc = [[_mm512_setzero_ps(); O]; M];
                for c in 0..chunks {
                    let mut xv = [_mm512_setzero_ps(); M];
                    for m in 0..M {
                        xv[m] = _mm512_loadu_ps(x.as_ptr().add(m * k + c * 16));
                    }
                    // The weight rows a few blocks ahead, so their lines are in cache when
                    // the FMAs get there (measured: the loads stall otherwise).
                    if c % 2 == 0 {
                        for o in 0..width {
                            if o0 + PREFETCH_ROWS + o < to {
                                _mm_prefetch::<_MM_HINT_T0>(
                                    w.as_ptr().add((o0 + PREFETCH_ROWS + o) * k + c * 16)
                                        as *const i8,
                                );
                            }
                        }
                    }
                    for o in 0..width {
                        let wv = load_bf16(w.as_ptr().add((o0 + o) * k + c * 16));
                        for m in 0..M {
                            acc[m][o] = _mm512_fmadd_ps(xv[m], wv, acc[m][o]);
                        }
                    }
                }
                for o in 0..width {
                    let b = bias.map_or(0.0, |b| super::bf16_value(*b.get_unchecked(o0 + o)));
                    for m in 0..M {
                        *y.add(m * n + o0 + o) =
                            super::bf16_bits(_mm512_reduce_add_ps(acc[m][o]) + b);
                    }
                }
                o0 += width;
            }
        }
    }

    /// An element type of the vector kernels (attention, SwiGLU): bf16 (`u16` bits; values
    /// rounded to bf16 wherever the reference's bf16 ops round them) or float32.
    pub(super) trait VecElem: super::Element {
        /// Whether intermediate values are rounded to bf16.
        const ROUND: bool;
        /// 16 values from `p` as float32.
        ///
        /// # Safety
        /// `p` points at 16 readable values; AVX-512F.
        unsafe fn load16(p: *const Self) -> __m512;
        /// Store 16 float32 values at `p` (bf16: they must already be rounded to bf16).
        ///
        /// # Safety
        /// `p` points at 16 writable values; AVX-512F.
        unsafe fn store16(p: *mut Self, v: __m512);
        /// The values as bf16 bits, when they are bf16.
        fn as_bf16(values: &[Self]) -> Option<&[u16]>;
    }

    impl VecElem for u16 {
        const ROUND: bool = true;
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            // SAFETY: as the caller guarantees.
            unsafe { load_bf16(p) }
        }
        #[inline(always)]
        unsafe fn store16(p: *mut Self, v: __m512) {
            // SAFETY: as the caller guarantees; the rounded values' low halves are zero.
            unsafe {
                let hi = _mm512_srli_epi32::<16>(_mm512_castps_si512(v));
                _mm256_storeu_si256(p as *mut __m256i, _mm512_cvtepi32_epi16(hi));
            }
        }
        fn as_bf16(values: &[Self]) -> Option<&[u16]> {
            Some(values)
        }
    }

    impl VecElem for f32 {
        const ROUND: bool = false;
        #[inline(always)]
        unsafe fn load16(p: *const Self) -> __m512 {
            // SAFETY: as the caller guarantees.
            unsafe { _mm512_loadu_ps(p) }
        }
        #[inline(always)]
        unsafe fn store16(p: *mut Self, v: __m512) {
            // SAFETY: as the caller guarantees.
            unsafe { _mm512_storeu_ps(p, v) }
        }
        fn as_bf16(_: &[Self]) -> Option<&[u16]> {
            None
        }
    }

    /// `out = silu(g) * u`, as libtorch computes `silu(g).mul(u)` (in float32 lanes):
    /// `silu(g) = g / (1 + e^-g)`, written for either sign through `e^-|g|` (so nothing
    /// overflows); in bf16 the `silu` value and the product are rounded to bf16, as the two
    /// bf16 ops round them. The tail past a multiple of 16, and chunks with an input below
    /// -87, run in scalar code.
    ///
    /// # Safety
    /// AVX-512F and FMA; the three slices have the same length.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn silu_mul<E: VecElem>(g: &[E], u: &[E], out: &mut [E]) {
        let n = out.len().min(g.len()).min(u.len());
        let body = n / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        let sign = _mm512_set1_ps(-0.0);
        let tiny = _mm512_set1_ps(-87.0);
        let r = |v: f32| if E::ROUND { E::round(v) } else { v };
        let scalar = |out: &mut [E], i: usize| {
            let x = g[i].get();
            out[i] = E::put(r(r(x / (1.0 + (-x).exp())) * u[i].get()));
        };
        // SAFETY: every 16-lane access lies below `body <= n`, inside all three slices.
        unsafe {
            for c in (0..body).step_by(16) {
                let x = E::load16(g.as_ptr().add(c));
                // Below -87, `e^x` leaves the range of `exp_nonpositive` (it flushes to 0 where
                // float32's subnormals still hold silu's value): those chunks run in scalar code.
                if _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, tiny) != 0 {
                    (c..c + 16).for_each(|i| scalar(out, i));
                    continue;
                }
                // t = e^-|x| in (0, 1]; silu = x / (1 + t) for x >= 0, x t / (1 + t) below.
                let neg_abs = _mm512_or_ps(x, sign);
                let t = exp_nonpositive(neg_abs);
                let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
                let num = _mm512_mask_mul_ps(x, below, x, t);
                let mut sv = _mm512_div_ps(num, _mm512_add_ps(one, t));
                if E::ROUND {
                    sv = round_bf16(sv);
                }
                let mut y = _mm512_mul_ps(sv, E::load16(u.as_ptr().add(c)));
                if E::ROUND {
                    y = round_bf16(y);
                }
                E::store16(out.as_mut_ptr().add(c), y);
            }
        }
        (body..n).for_each(|i| scalar(out, i));
    }

    /// The backward of `out = silu(g) * u` for an output gradient `d`: `dg = d · u · σ(g) ·
    /// (1 + g · (1 − σ(g)))` and `du = d · g · σ(g)` in float32 lanes (σ the logistic
    /// function, through `e^-|g|` as in [`silu_mul`]; the forward's bf16 roundings are passed
    /// straight through), each rounded once to `E`. The tail past a multiple of 16, and chunks
    /// with an input below -87, run in scalar code.
    ///
    /// # Safety
    /// AVX-512F and FMA; the five slices have the same length.
    #[target_feature(enable = "avx512f,fma")]
    pub(super) unsafe fn silu_mul_backward<E: VecElem>(
        g: &[E],
        u: &[E],
        d: &[E],
        dg: &mut [E],
        du: &mut [E],
    ) {
        let n = g
            .len()
            .min(u.len())
            .min(d.len())
            .min(dg.len())
            .min(du.len());
        let body = n / 16 * 16;
        let one = _mm512_set1_ps(1.0);
        let sign = _mm512_set1_ps(-0.0);
        let tiny = _mm512_set1_ps(-87.0);
        let scalar = |dg: &mut [E], du: &mut [E], i: usize| {
            let (x, up, dy) = (g[i].get(), u[i].get(), d[i].get());
            let s = 1.0 / (1.0 + (-x).exp());
            dg[i] = E::put(dy * up * s * (1.0 + x * (1.0 - s)));
            du[i] = E::put(dy * x * s);
        };
        // SAFETY: every 16-lane access lies below `body <= n`, inside all five slices.
        unsafe {
            for c in (0..body).step_by(16) {
                let x = E::load16(g.as_ptr().add(c));
                if _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, tiny) != 0 {
                    (c..c + 16).for_each(|i| scalar(dg, du, i));
                    continue;
                }
                // t = e^-|x|; σ(x) = 1 / (1 + t) for x >= 0, t / (1 + t) below.
                let t = exp_nonpositive(_mm512_or_ps(x, sign));
                let below = _mm512_cmp_ps_mask::<_CMP_LT_OQ>(x, _mm512_setzero_ps());
                let num = _mm512_mask_mov_ps(one, below, t);
                let s = _mm512_div_ps(num, _mm512_add_ps(one, t));
                let dy = E::load16(d.as_ptr().add(c));
                let up = E::load16(u.as_ptr().add(c));
                let ds = _mm512_mul_ps(dy, s);
                // 1 + x (1 - s)
                let slope = _mm512_fmadd_ps(x, _mm512_sub_ps(one, s), one);
                let mut a = _mm512_mul_ps(_mm512_mul_ps(ds, up), slope);
                let mut z = _mm512_mul_ps(ds, x);
                if E::ROUND {
                    a = round_bf16(a);
                    z = round_bf16(z);
                }
                E::store16(dg.as_mut_ptr().add(c), a);
                E::store16(du.as_mut_ptr().add(c), z);
            }
        }
        (body..n).for_each(|i| scalar(dg, du, i));
    }

    /// Lane `i` of the result is the sum of the 16 lanes of `v[i]`: a transposing tree of
    /// 45 shuffles and adds for 16 sums, where one `_mm512_reduce_add_ps` per sum costs 8.
    /// The sums associate differently from a lane-by-lane reduction (float rounding only).
    ///
    /// # Safety
    /// AVX-512F.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sum_lanes16(v: &[__m512; 16]) -> __m512 {
        // Within each 128-bit lane: [a0 + a2, b0 + b2, a1 + a3, b1 + b3] for a pair (a, b).
        let w: [__m512; 8] = std::array::from_fn(|i| {
            let (a, b) = (v[2 * i], v[2 * i + 1]);
            _mm512_add_ps(_mm512_unpacklo_ps(a, b), _mm512_unpackhi_ps(a, b))
        });
        // Within each 128-bit lane: the lane's partial sums of four consecutive inputs.
        let x: [__m512; 4] = std::array::from_fn(|i| {
            let (a, b) = (_mm512_castps_pd(w[2 * i]), _mm512_castps_pd(w[2 * i + 1]));
            _mm512_add_ps(
                _mm512_castpd_ps(_mm512_unpacklo_pd(a, b)),
                _mm512_castpd_ps(_mm512_unpackhi_pd(a, b)),
            )
        });
        // Add 128-bit lanes (0 + 1, 2 + 3) of two vectors, then the two halves.
        let halves = |a: __m512, b: __m512| {
            _mm512_add_ps(
                _mm512_shuffle_f32x4::<0b10_00_10_00>(a, b),
                _mm512_shuffle_f32x4::<0b11_01_11_01>(a, b),
            )
        };
        halves(halves(x[0], x[1]), halves(x[2], x[3]))
    }

    /// The kernel (see `super::attention`) for work units `units`: unit
    /// `((b * nkv + h) * parts + p) * blocks + i` is part `p` of the query heads that read kv
    /// head `h` of row `b` (all of them when `parts` is 1), at query positions
    /// `i * qb .. (i + 1) * qb` (`blocks` of them cover the `t` positions); `hd` is `16 * CH`.
    ///
    /// Keys and values are taken 16 at a time, widened once into a float32 block that every
    /// query (head and position) of the unit reads: a query's 16 dot products stay in
    /// registers and are summed by [`sum_lanes16`], and its output accumulates over the block
    /// in registers. Query position `i` sees keys `j <= start + i` (and, with a mask, those
    /// the mask allows), so key blocks past the unit's last position are never read; padding
    /// queries (`queries[b * t + i]` false) are skipped and get a zero output.
    ///
    /// # Safety
    /// `out` points at `B * t * nq * hd` writable values (`[B, t, nq, hd]`); each unit writes
    /// only its own queries.
    #[target_feature(enable = "avx512f,fma")]
    #[allow(clippy::needless_range_loop)] // `c` indexes the query, the block and the registers alike
    pub(super) unsafe fn attention<E: VecElem, const CH: usize>(
        [q, k, v]: [&[E]; 3],
        mask: Option<&[bool]>,
        queries: Option<&[bool]>,
        out: *mut E,
        s: AttnShape,
        units: std::ops::Range<usize>,
    ) {
        let (hd, l, t) = (s.hd, s.k.l, s.q.l);
        debug_assert_eq!(hd, 16 * CH);
        // Query heads per unit, and query rows (head, position) at most.
        let group = s.group / s.parts;
        let most = group * s.qb;
        let padded = l.div_ceil(16) * 16;
        let mut qf = super::AlignedF32::filled(most * hd, 0.0);
        let mut scores = super::AlignedF32::filled(most * padded, f32::NEG_INFINITY);
        let mut acc = super::AlignedF32::filled(most * hd, 0.0);
        let mut block = super::AlignedF32::filled(16 * hd, 0.0);
        let (qf, scores, acc, block) = (
            qf.as_mut_slice(),
            scores.as_mut_slice(),
            acc.as_mut_slice(),
            block.as_mut_slice(),
        );
        let scale = _mm512_set1_ps(s.scale);
        // SAFETY: every offset below comes from the views' sizes and strides, which
        // `attention` checked against the slices' extents; rows have `hd` elements; `block`
        // holds 16 rows of `hd`, `qf`/`acc` `most` rows and `scores` `most` rows of `padded`.
        unsafe {
            // Rows `j0..j0 + n` of `src` (keys or values of one kv head), widened into `block`,
            // with the next block's rows prefetched (measured: without it the loads of the
            // cache stalled for two thirds of this kernel's samples).
            let line = 64 / std::mem::size_of::<E>();
            let widen_block =
                |block: &mut [f32], src: &[E], view: &super::View4, b, kvh, j0, n, end| {
                    for i in 0..n {
                        if j0 + 16 + i < end {
                            let ahead = src.as_ptr().add(view.at(b, kvh, j0 + 16 + i));
                            for e in (0..hd).step_by(line) {
                                _mm_prefetch::<_MM_HINT_T0>(ahead.add(e) as *const i8);
                            }
                        }
                        let p = src.as_ptr().add(view.at(b, kvh, j0 + i));
                        for c in 0..CH {
                            _mm512_store_ps(
                                block.as_mut_ptr().add(i * hd + c * 16),
                                E::load16(p.add(c * 16)),
                            );
                        }
                    }
                };
            for unit in units {
                let u = s.unit(unit, queries);
                let (b, kvh, head0, i0, np, rows, end) =
                    (u.b, u.kvh, u.head0, u.i0, u.np, u.rows, u.end);
                let limit = |r: usize| u.limit(r);
                // How many of the `n` keys from `j0` on row `r` sees (0: skip the block).
                let seen = |r: usize, j0: usize, n: usize| limit(r).saturating_sub(j0).min(n);
                for r in 0..rows {
                    // Keys past a row's limit (and lanes past the last key) take no part in
                    // the soft-max.
                    scores[r * padded + limit(r)..(r + 1) * padded].fill(f32::NEG_INFINITY);
                    let at = s.q.at(b, head0 + r / np, i0 + r % np);
                    for (d, x) in qf[r * hd..(r + 1) * hd].iter_mut().zip(&q[at..at + hd]) {
                        *d = x.get();
                    }
                }
                for j0 in (0..end).step_by(16) {
                    let n = (end - j0).min(16);
                    widen_block(block, k, &s.k, b, kvh, j0, n, end);
                    for r in 0..rows {
                        let seen = seen(r, j0, n);
                        if seen == 0 {
                            continue;
                        }
                        let qv: [__m512; CH] = std::array::from_fn(|c| {
                            _mm512_load_ps(qf.as_ptr().add(r * hd + c * 16))
                        });
                        let mut dots = [_mm512_setzero_ps(); 16];
                        for (i, dot) in dots.iter_mut().enumerate().take(seen) {
                            let kp = block.as_ptr().add(i * hd);
                            let mut a = _mm512_mul_ps(qv[0], _mm512_load_ps(kp));
                            for c in 1..CH {
                                a = _mm512_fmadd_ps(qv[c], _mm512_load_ps(kp.add(c * 16)), a);
                            }
                            *dot = a;
                        }
                        _mm512_mask_storeu_ps(
                            scores.as_mut_ptr().add(r * padded + j0),
                            ((1u32 << seen) - 1) as u16,
                            sum_lanes16(&dots),
                        );
                    }
                    if let Some(m) = mask {
                        for ii in 0..np {
                            let mrow = &m[(b * t + i0 + ii) * l..][..l];
                            for j in (j0..j0 + n).filter(|&j| !mrow[j]) {
                                for g in 0..group {
                                    scores[(g * np + ii) * padded + j] = f32::NEG_INFINITY;
                                }
                            }
                        }
                    }
                }
                let lanes = end.div_ceil(16);
                for r in 0..rows {
                    let row = &mut scores[r * padded..(r + 1) * padded];
                    // bf16: scores rounded to bf16 (the reference's bf16 product), then scaled.
                    let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
                    for c in 0..lanes {
                        let p = row.as_mut_ptr().add(c * 16);
                        let raw = _mm512_loadu_ps(p);
                        let x = _mm512_mul_ps(if E::ROUND { round_bf16(raw) } else { raw }, scale);
                        _mm512_storeu_ps(p, x);
                        mx = _mm512_max_ps(mx, x);
                    }
                    let top = _mm512_reduce_max_ps(mx);
                    if top == f32::NEG_INFINITY {
                        // Nothing visible (a padding query, or a mask without the query's own
                        // key): zero output.
                        row[..lanes * 16].fill(0.0);
                        continue;
                    }
                    let max = _mm512_set1_ps(top);
                    let mut sum = _mm512_setzero_ps();
                    for c in 0..lanes {
                        let p = row.as_mut_ptr().add(c * 16);
                        let e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p), max));
                        _mm512_storeu_ps(p, e);
                        sum = _mm512_add_ps(sum, e);
                    }
                    let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
                    for c in 0..lanes {
                        let p = row.as_mut_ptr().add(c * 16);
                        let x = _mm512_mul_ps(_mm512_loadu_ps(p), inv);
                        _mm512_storeu_ps(p, if E::ROUND { round_bf16(x) } else { x });
                    }
                }
                acc[..rows * hd].iter_mut().for_each(|a| *a = 0.0);
                for j0 in (0..end).step_by(16) {
                    let n = (end - j0).min(16);
                    widen_block(block, v, &s.v, b, kvh, j0, n, end);
                    for r in 0..rows {
                        let seen = seen(r, j0, n);
                        if seen == 0 {
                            continue;
                        }
                        let ap = acc.as_mut_ptr().add(r * hd);
                        let mut a: [__m512; CH] =
                            std::array::from_fn(|c| _mm512_load_ps(ap.add(c * 16)));
                        for i in 0..seen {
                            let p = scores[r * padded + j0 + i];
                            if p == 0.0 {
                                continue;
                            }
                            let pv = _mm512_set1_ps(p);
                            let vp = block.as_ptr().add(i * hd);
                            for c in 0..CH {
                                a[c] = _mm512_fmadd_ps(pv, _mm512_load_ps(vp.add(c * 16)), a[c]);
                            }
                        }
                        for c in 0..CH {
                            _mm512_store_ps(ap.add(c * 16), a[c]);
                        }
                    }
                }
                for r in 0..rows {
                    let at = ((b * t + i0 + r % np) * s.q.h + head0 + r / np) * hd;
                    for (i, a) in acc[r * hd..(r + 1) * hd].iter().enumerate() {
                        *out.add(at + i) = E::put(*a);
                    }
                }
            }
        }
    }

    /// `acc + Σ` over the 16 lanes' bf16 pairs of `a` and `b` (`vdpbf16ps`: element `2i` is the
    /// low half of 32-bit lane `i`; products of bf16 values are exact in float32).
    #[inline(always)]
    unsafe fn dot_pairs(acc: __m512, a: __m512i, b: __m512i) -> __m512 {
        // SAFETY: AVX512-BF16, as the calling kernel's target features guarantee; the
        // transmutes reinterpret 64 bytes as 32 bf16 values.
        unsafe {
            _mm512_dpbf16_ps(
                acc,
                std::mem::transmute::<__m512i, __m512bh>(a),
                std::mem::transmute::<__m512i, __m512bh>(b),
            )
        }
    }

    /// [`attention`] for bf16 on CPUs with AVX512-BF16, for units of many query rows (prompt
    /// batches): the same units, visibility rules and rounding points, with the products in
    /// `vdpbf16ps` (32 bf16 products per instruction, accumulated in float32) and no
    /// horizontal sums:
    /// - scores with query rows in lanes: a unit's queries are transposed once into 16-row
    ///   groups of bf16 pairs, and each key's pairs are broadcast straight from the cache;
    /// - the soft-max runs down the keys for 16 rows at once;
    /// - the probabilities, packed as pairs of consecutive keys, multiply values interleaved
    ///   the same way (value dimensions in lanes), one row pair at a time.
    ///
    /// # Safety
    /// As [`attention`]; the CPU has AVX512-BW and AVX512-BF16.
    #[target_feature(enable = "avx512f,avx512bw,avx512bf16,fma")]
    #[allow(clippy::needless_range_loop)] // `c` indexes the block and the registers alike
    pub(super) unsafe fn attention_bf16_rows<const CH: usize>(
        [q, k, v]: [&[u16]; 3],
        mask: Option<&[bool]>,
        queries: Option<&[bool]>,
        out: *mut u16,
        s: AttnShape,
        units: std::ops::Range<usize>,
    ) {
        let (hd, l, t) = (s.hd, s.k.l, s.q.l);
        debug_assert_eq!(hd, 16 * CH);
        let pairs = hd / 2;
        let group = s.group / s.parts;
        let groups16 = (group * s.qb).div_ceil(16);
        // Keys rounded up to pairs.
        let lp = l.div_ceil(2) * 2;
        let kp = lp / 2;
        let mut qt = super::AlignedF32::filled(groups16 * pairs * 16, 0.0);
        let mut sc = super::AlignedF32::filled(groups16 * lp * 16, 0.0);
        let mut p2 = super::AlignedF32::filled(groups16 * kp * 16, 0.0);
        let mut vp = super::AlignedF32::filled(kp * hd, 0.0);
        let mut gends = vec![0usize; groups16];
        let (qt, sc, p2, vp) = (
            qt.as_mut_slice().as_mut_ptr() as *mut u32,
            sc.as_mut_slice().as_mut_ptr(),
            p2.as_mut_slice().as_mut_ptr() as *mut u32,
            vp.as_mut_slice().as_mut_ptr() as *mut u32,
        );
        let scale = _mm512_set1_ps(s.scale);
        let ninf = _mm512_set1_ps(f32::NEG_INFINITY);
        // SAFETY: every offset below comes from the views' sizes and strides, which
        // `attention` checked against the slices' extents (rows of `hd` elements, read as
        // `hd / 2` unaligned u32 pairs); the scratch buffers hold `groups16` groups of 16
        // lanes for `pairs` query pairs, `lp` keys and `kp` key pairs, and `kp` rows of
        // `hd` interleaved values.
        unsafe {
            for unit in units {
                let u = s.unit(unit, queries);
                let (b, kvh, head0, i0, np, rows, end) =
                    (u.b, u.kvh, u.head0, u.i0, u.np, u.rows, u.end);
                let limit = |r: usize| u.limit(r);
                let gn = rows.div_ceil(16);
                // Queries, transposed: lane `r % 16` of pair `p` in group `r / 16`.
                for r in 0..gn * 16 {
                    let dst = qt.add((r / 16) * pairs * 16 + r % 16);
                    if r < rows {
                        let src =
                            q.as_ptr().add(s.q.at(b, head0 + r / np, i0 + r % np)) as *const u32;
                        for p in 0..pairs {
                            *dst.add(p * 16) = src.add(p).read_unaligned();
                        }
                    } else {
                        for p in 0..pairs {
                            *dst.add(p * 16) = 0;
                        }
                    }
                }
                // Scores, 8 keys at a time (8 independent accumulations).
                for g in 0..gn {
                    let lim: [i32; 16] = std::array::from_fn(|lane| {
                        let r = g * 16 + lane;
                        if r < rows {
                            limit(r) as i32
                        } else {
                            0
                        }
                    });
                    let gend = lim.iter().copied().max().unwrap_or(0) as usize;
                    gends[g] = gend;
                    let limv = _mm512_loadu_si512(lim.as_ptr() as *const _);
                    let qg = qt.add(g * pairs * 16);
                    let row = |j: usize| sc.add((g * lp + j) * 16);
                    let mut j = 0;
                    while j < gend {
                        let nk = (gend - j).min(8);
                        let kptr: [*const u32; 8] = std::array::from_fn(|i| {
                            k.as_ptr().add(s.k.at(b, kvh, j + i.min(nk - 1))) as *const u32
                        });
                        let mut a = [_mm512_setzero_ps(); 8];
                        for p in 0..pairs {
                            let qv = _mm512_load_si512(qg.add(p * 16) as *const _);
                            for i in 0..8 {
                                let kv = _mm512_set1_epi32(kptr[i].add(p).read_unaligned() as i32);
                                a[i] = dot_pairs(a[i], qv, kv);
                            }
                        }
                        for i in 0..nk {
                            // Scores rounded to bf16 (the reference's bf16 product), scaled;
                            // keys past a row's limit take no part.
                            let x = _mm512_mul_ps(round_bf16(a[i]), scale);
                            let seen =
                                _mm512_cmplt_epi32_mask(_mm512_set1_epi32((j + i) as i32), limv);
                            _mm512_store_ps(row(j + i), _mm512_mask_blend_ps(seen, ninf, x));
                        }
                        j += nk;
                    }
                    if gend % 2 == 1 {
                        _mm512_store_ps(row(gend), ninf);
                    }
                }
                if let Some(m) = mask {
                    // Keys the mask hides, 64 mask bytes (bools: 0 or 1) at a time.
                    let scanned = gends[..gn].iter().copied().max().unwrap_or(0);
                    for ii in 0..np {
                        let mrow = m[(b * t + i0 + ii) * l..][..l].as_ptr();
                        for j0 in (0..scanned).step_by(64) {
                            let n = (scanned - j0).min(64);
                            let live = if n == 64 { u64::MAX } else { (1u64 << n) - 1 };
                            let bytes = _mm512_maskz_loadu_epi8(live, mrow.add(j0) as *const i8);
                            let mut hidden = !_mm512_test_epi8_mask(bytes, bytes) & live;
                            while hidden != 0 {
                                let j = j0 + hidden.trailing_zeros() as usize;
                                hidden &= hidden - 1;
                                for gg in 0..group {
                                    let r = gg * np + ii;
                                    if j < gends[r / 16] {
                                        *sc.add(((r / 16) * lp + j) * 16 + r % 16) =
                                            f32::NEG_INFINITY;
                                    }
                                }
                            }
                        }
                    }
                }
                // Soft-max down the keys, 16 rows at once; probabilities rounded to bf16 and
                // packed in pairs of consecutive keys.
                for g in 0..gn {
                    let gend2 = gends[g].div_ceil(2) * 2;
                    let row = |j: usize| sc.add((g * lp + j) * 16);
                    let mut mx = ninf;
                    for j in 0..gend2 {
                        mx = _mm512_max_ps(mx, _mm512_load_ps(row(j)));
                    }
                    // Rows that see nothing (padding queries) get probabilities 0.
                    let none = _mm512_cmp_ps_mask::<_CMP_EQ_OQ>(mx, ninf);
                    let mx = _mm512_mask_blend_ps(none, mx, _mm512_setzero_ps());
                    let mut sum = _mm512_setzero_ps();
                    for j in 0..gend2 {
                        let e = exp_nonpositive(_mm512_sub_ps(_mm512_load_ps(row(j)), mx));
                        _mm512_store_ps(row(j), e);
                        sum = _mm512_add_ps(sum, e);
                    }
                    let inv = _mm512_maskz_div_ps(!none, _mm512_set1_ps(1.0), sum);
                    for jp in 0..gend2 / 2 {
                        let p0 = round_bf16(_mm512_mul_ps(_mm512_load_ps(row(2 * jp)), inv));
                        let p1 = round_bf16(_mm512_mul_ps(_mm512_load_ps(row(2 * jp + 1)), inv));
                        let packed = _mm512_or_si512(
                            _mm512_srli_epi32::<16>(_mm512_castps_si512(p0)),
                            _mm512_and_si512(
                                _mm512_castps_si512(p1),
                                _mm512_set1_epi32(0xffff_0000u32 as i32),
                            ),
                        );
                        _mm512_store_si512(p2.add((g * kp + jp) * 16) as *mut _, packed);
                    }
                    // A row pair may span two groups and read up to the unit's last key.
                    for jp in gend2 / 2..end.div_ceil(2) {
                        _mm512_store_si512(
                            p2.add((g * kp + jp) * 16) as *mut _,
                            _mm512_setzero_si512(),
                        );
                    }
                }
                // Values of key pairs interleaved: lane `d` of pair `jp` holds dimension `d`
                // of keys `2jp` (low half) and `2jp + 1`.
                for jp in 0..end.div_ceil(2) {
                    let r0 = v.as_ptr().add(s.v.at(b, kvh, 2 * jp));
                    let r1 = (2 * jp + 1 < end).then(|| v.as_ptr().add(s.v.at(b, kvh, 2 * jp + 1)));
                    for c in 0..CH {
                        let lo =
                            _mm512_cvtepu16_epi32(_mm256_loadu_si256(r0.add(c * 16) as *const _));
                        let hi = match r1 {
                            Some(r1) => _mm512_slli_epi32::<16>(_mm512_cvtepu16_epi32(
                                _mm256_loadu_si256(r1.add(c * 16) as *const _),
                            )),
                            None => _mm512_setzero_si512(),
                        };
                        _mm512_store_si512(
                            vp.add((jp * CH + c) * 16) as *mut _,
                            _mm512_or_si512(lo, hi),
                        );
                    }
                }
                // Outputs, two rows at a time (2 * CH independent accumulations).
                let mut r = 0;
                while r < rows {
                    let two = (r + 1 < rows) as usize + 1;
                    let lims = [limit(r), if two == 2 { limit(r + 1) } else { 0 }];
                    let mut acc = [[_mm512_setzero_ps(); CH]; 2];
                    let w_at = |rr: usize| p2.add((rr / 16) * kp * 16 + rr % 16);
                    let (w0, w1) = (w_at(r), w_at(r + two - 1));
                    for jp in 0..lims[0].max(lims[1]).div_ceil(2) {
                        let wa = _mm512_set1_epi32(*w0.add(jp * 16) as i32);
                        let wb = _mm512_set1_epi32(*w1.add(jp * 16) as i32);
                        for c in 0..CH {
                            let vv = _mm512_load_si512(vp.add((jp * CH + c) * 16) as *const _);
                            acc[0][c] = dot_pairs(acc[0][c], vv, wa);
                            acc[1][c] = dot_pairs(acc[1][c], vv, wb);
                        }
                    }
                    for (x, rr) in (r..r + two).enumerate() {
                        let at = ((b * t + i0 + rr % np) * s.q.h + head0 + rr / np) * hd;
                        let mut lane = [0f32; 16];
                        for c in 0..CH {
                            _mm512_storeu_ps(lane.as_mut_ptr(), acc[x][c]);
                            for (i, a) in lane.iter().enumerate() {
                                *out.add(at + c * 16 + i) = super::bf16_bits(*a);
                            }
                        }
                    }
                    r += two;
                }
            }
        }
    }
}

/// A float element the elementwise kernels read and write: bf16 (`u16` bits; every op's
/// result rounded to bf16, as libtorch's bf16 ops round) or float32.
trait Element: Copy {
    fn get(self) -> f32;
    fn put(v: f32) -> Self;
    /// `v` rounded to this type's precision (identity for float32).
    fn round(v: f32) -> f32;
}

impl Element for u16 {
    #[inline(always)]
    fn get(self) -> f32 {
        bf16_value(self)
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        bf16_bits(v)
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        bf16_value(bf16_bits(v))
    }
}

impl Element for f32 {
    #[inline(always)]
    fn get(self) -> f32 {
        self
    }
    #[inline(always)]
    fn put(v: f32) -> Self {
        v
    }
    #[inline(always)]
    fn round(v: f32) -> f32 {
        v
    }
}

/// The rotation of [`rope`] for the (row, position) pairs `positions` (flattened `b * T + t`)
/// of `view`, every head, written `[positions, H, hd]` into `out`: `x * cos + roll(x, rot / 2) * sin` over the first `rot` values (each product
/// and the sum rounded as the element type's ops round), the rest copied.
#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn rope_rows<E: Element>(
    x: &[E],
    view: View4,
    cos: &[E],
    sin: &[E],
    out: &mut [E],
    hd: usize,
    rot: usize,
    positions: std::ops::Range<usize>,
) {
    let half = rot / 2;
    let first = positions.start;
    for p in positions {
        let (b, t) = (p / view.l, p % view.l);
        {
            let table = p * rot;
            let (c, s) = (&cos[table..table + rot], &sin[table..table + rot]);
            for h in 0..view.h {
                let src = &x[view.at(b, h, t)..view.at(b, h, t) + hd];
                let at = ((p - first) * view.h + h) * hd;
                let dst = &mut out[at..at + hd];
                // `roll(x, half)` over the first `rot` values: the second half comes first. Two
                // straight loops (no `%` per element) so that both vectorise.
                let (lo, hi) = (&src[..half], &src[half..rot]);
                for (rolled, from) in [(hi, 0), (lo, half)] {
                    let to = from + rolled.len();
                    let ins = src[from..to].iter().zip(rolled);
                    let tables = c[from..to].iter().zip(&s[from..to]);
                    for ((o, (x, r)), (cv, sv)) in dst[from..to].iter_mut().zip(ins).zip(tables) {
                        let a = E::round(x.get() * cv.get());
                        let r = E::round(r.get() * sv.get());
                        *o = E::put(a + r);
                    }
                }
                dst[rot..].copy_from_slice(&src[rot..]);
            }
        }
    }
}

multiversion!(rope_bf16, fn(x: &[u16], view: View4, cos: &[u16], sin: &[u16], out: &mut [u16], hd: usize, rot: usize, positions: std::ops::Range<usize>) {
    rope_rows(x, view, cos, sin, out, hd, rot, positions)
});

multiversion!(rope_f32, fn(x: &[f32], view: View4, cos: &[f32], sin: &[f32], out: &mut [f32], hd: usize, rot: usize, positions: std::ops::Range<usize>) {
    rope_rows(x, view, cos, sin, out, hd, rot, positions)
});

/// A [`rope`] kernel over one element type.
type RopeKernel<E> = fn(&[E], View4, &[E], &[E], &mut [E], usize, usize, std::ops::Range<usize>);

/// An element type [`rope`] takes, with its kernel.
trait RopeElem: Element {
    /// `rope_bf16` or `rope_f32`.
    const KERNEL: RopeKernel<Self>;
}

impl RopeElem for u16 {
    const KERNEL: RopeKernel<u16> = rope_bf16;
}

impl RopeElem for f32 {
    const KERNEL: RopeKernel<f32> = rope_f32;
}

/// [`rope`] over `positions`, in `E`: `x`, `cos` and `sin` at addresses `src` (`extent`,
/// `table` and `table` elements), the positions' `[H, hd]` blocks written into `out`.
///
/// # Safety
/// The addresses hold that many `E` values; `out` holds `[B * T, H, hd]` values of `E`, of
/// which no other thread writes these positions' blocks.
#[allow(clippy::too_many_arguments)]
unsafe fn rope_positions<E: RopeElem>(
    src: [usize; 3],
    out: *mut u8,
    (extent, table): (usize, usize),
    view: View4,
    hd: usize,
    rot: usize,
    positions: std::ops::Range<usize>,
) {
    let per = view.h * hd;
    let (at, n) = (positions.start * per, positions.len() * per);
    // SAFETY: as the caller guarantees.
    unsafe {
        E::KERNEL(
            std::slice::from_raw_parts(src[0] as *const E, extent),
            view,
            std::slice::from_raw_parts(src[1] as *const E, table),
            std::slice::from_raw_parts(src[2] as *const E, table),
            std::slice::from_raw_parts_mut((out as *mut E).add(at), n),
            hd,
            rot,
            positions,
        )
    }
}

/// Rotary position embedding of `x` `[B, H, T, hd]` (a view whose rows of `hd` are contiguous,
/// e.g. heads transposed out of a projection) with `cos`/`sin` `[B, 1, T, rot]` in `x`'s
/// dtype, the first half of `sin` negated: exactly the model's libtorch formulation
/// `x * cos + roll(x, rot / 2) * sin` on the first `rot` values, the rest passed through, in one
/// pass instead of four ops (bit-identical: the same products and sums, rounded at the same
/// points), split across threads by (row, position) when there are many. bf16 or float32 CPU
/// tensors; `None` otherwise. The result is `[B, H, T, hd]`, laid out `[B, T, H, hd]`.
pub fn rope(x: &Tensor, cos: &Tensor, sin: &Tensor, rot: usize) -> Result<Option<Tensor>> {
    let kind = x.kind();
    let Some(view) = View4::of(x) else {
        return Ok(None);
    };
    let hd = x.size()[3] as usize;
    let table = [view.b as i64, 1, view.l as i64, rot as i64];
    if !available()
        || !matches!(kind, Kind::BFloat16 | Kind::Float)
        || [x, cos, sin]
            .iter()
            .any(|t| !plain_cpu(t) || t.kind() != kind)
        || rot == 0
        || !rot.is_multiple_of(2)
        || rot > hd
        || cos.size() != table
        || sin.size() != table
        || view.h == 0
    {
        return Ok(None);
    }
    let (cos, sin) = (cos.f_contiguous()?, sin.f_contiguous()?);
    let out = Tensor::f_empty(
        [view.b as i64, view.l as i64, view.h as i64, hd as i64],
        (kind, Device::Cpu),
    )?;
    // Addresses, not pointers, so that the closure below is `Sync`.
    let src = [x.data_ptr(), cos.data_ptr(), sin.data_ptr()].map(|p| p as usize);
    let oa = OutPtr(out.data_ptr() as *mut u8);
    let (sizes, per) = ((view.extent(hd), view.b * view.l * rot), view.h * hd);
    let run = |r: std::ops::Range<usize>| {
        // Capture the whole `OutPtr` (Send), not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let oa = oa;
        // SAFETY: `x`'s slice starts at its first element and spans its furthest one (the
        // view's sizes and non-negative strides describe elements of its storage); `cos`/`sin`
        // are contiguous `[B, 1, T, rot]` and `out` fresh `[B, T, H, hd]`, all of `kind` (bf16
        // = u16 bits); each thread writes only its positions' `[H, hd]` blocks of `out`
        // (joined before `out` is used).
        unsafe {
            match kind {
                Kind::BFloat16 => rope_positions::<u16>(src, oa.0, sizes, view, hd, rot, r),
                _ => rope_positions::<f32>(src, oa.0, sizes, view, hd, rot, r),
            }
        }
    };
    let positions = view.b * view.l;
    split_rows(positions, positions * per * 4, &run);
    Ok(Some(out.f_transpose(1, 2)?))
}

/// `(rows, width, row stride)` of a tensor whose last dimension is contiguous and whose
/// leading dimensions collapse into one evenly strided row index (e.g. a `narrow` of the
/// last dimension of a contiguous tensor).
fn strided_rows(t: &Tensor) -> Option<(usize, usize, usize)> {
    let (size, stride) = (t.size(), t.stride());
    let (&width, lead) = size.split_last()?;
    if stride.last() != Some(&1) || width <= 0 {
        return None;
    }
    let rows: i64 = lead.iter().product();
    // The innermost leading dimension's stride, or the width for a single row.
    let step = if lead.is_empty() {
        width
    } else {
        stride[lead.len() - 1]
    };
    let mut expect = step;
    for d in (0..lead.len()).rev() {
        if size[d] > 1 && stride[d] != expect {
            return None;
        }
        expect *= size[d];
    }
    (step >= width).then_some((rows as usize, width as usize, step as usize))
}

/// How many elements `(rows, width, row stride)` rows ([`strided_rows`]) span, first to last.
fn strided_extent((rows, width, step): (usize, usize, usize)) -> usize {
    if rows == 0 {
        0
    } else {
        (rows - 1) * step + width
    }
}

/// The rows of a padded batch back from its packed real tokens: `[rows.len(), w]` where slot
/// `s` holds row `rows[s]` of `y` (`[N, w]`, contiguous, any element type) or zeros where
/// `rows[s]` is `None` (a padding slot); libtorch's `zeros` + `index_copy` in one pass, split
/// across threads. `None` where it does not apply: gradients, another shape, a row out of
/// range, or a tensor off the CPU.
pub fn unpack_rows(y: &Tensor, rows: &[Option<u32>]) -> Result<Option<Tensor>> {
    let size = y.size();
    let [n, w] = size[..] else {
        return Ok(None);
    };
    if !plain_cpu(y) || !y.is_contiguous() || rows.iter().flatten().any(|&r| i64::from(r) >= n) {
        return Ok(None);
    }
    let out = Tensor::f_empty([rows.len() as i64, w], (y.kind(), Device::Cpu))?;
    let row_bytes = w as usize * y.kind().elt_size_in_bytes();
    // SAFETY: `y` is a contiguous CPU tensor of `n` rows of `row_bytes` bytes and every source
    // row is below `n` (checked); `out` is fresh and contiguous with `rows.len()` rows of the
    // same size; threads write disjoint slots and are joined (the end of the parallel region)
    // before `out` is returned.
    unsafe {
        let src = y.data_ptr() as usize;
        let dst = OutPtr(out.data_ptr() as *mut u8);
        let run = |slots: std::ops::Range<usize>| {
            // Capture the whole `OutPtr` (Send), not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let dst = dst;
            for s in slots {
                let to = dst.0.add(s * row_bytes);
                match rows[s] {
                    Some(r) => std::ptr::copy_nonoverlapping(
                        (src as *const u8).add(r as usize * row_bytes),
                        to,
                        row_bytes,
                    ),
                    None => std::ptr::write_bytes(to, 0, row_bytes),
                }
            }
        };
        // A copy costs about a multiply-add per byte here, for the split threshold.
        omp::split(rows.len(), 1, rows.len() * row_bytes, &run);
    }
    Ok(Some(out))
}

/// `silu(gate) * up` (SwiGLU's product) in one pass over the rows (split across threads) of
/// bf16 or float32 CPU tensors of one shape, e.g. the two halves of a fused `gate_up` output;
/// `None` otherwise. libtorch's `silu(gate).mul(up)` rounds at the same points (bf16: the
/// `silu` value, then the product); the exponential is Cephes' `expf` (relative error ~1e-7),
/// so float32 results agree with libtorch's to a few units in the last place.
pub fn silu_mul(gate: &Tensor, up: &Tensor) -> Result<Option<Tensor>> {
    let kind = gate.kind();
    let (Some(gs), Some(us)) = (strided_rows(gate), strided_rows(up)) else {
        return Ok(None);
    };
    if !int4_f32_available()
        || !matches!(kind, Kind::BFloat16 | Kind::Float)
        || [gate, up].iter().any(|t| !plain_cpu(t) || t.kind() != kind)
        || gate.size() != up.size()
    {
        return Ok(None);
    }
    let out = Tensor::f_empty(gate.size(), (kind, Device::Cpu))?;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: each input's slice spans its rows (`strided_rows` checked the layout against
    // its sizes and strides); `out` is fresh and contiguous `[rows, width]`; the CPU has
    // AVX-512F and FMA (`int4_f32_available`).
    unsafe {
        if kind == Kind::BFloat16 {
            silu_mul_rows::<u16>(gate, up, &out, gs, us);
        } else {
            silu_mul_rows::<f32>(gate, up, &out, gs, us);
        }
    }
    Ok(Some(out))
}

/// [`silu_mul`]'s rows, split across the OpenMP team.
///
/// # Safety
/// `gate` and `up` hold `E` values laid out as their `strided_rows` `gs` and `us` say; `out`
/// is a fresh contiguous `[rows, width]` of `E`; the CPU has AVX-512F and FMA.
#[cfg(target_arch = "x86_64")]
unsafe fn silu_mul_rows<E: avx512::VecElem + Sync>(
    gate: &Tensor,
    up: &Tensor,
    out: &Tensor,
    gs: (usize, usize, usize),
    us: (usize, usize, usize),
) {
    let (rows, width) = (gs.0, gs.1);
    // SAFETY: by the caller's contract; each thread writes only its own rows of `out`, and
    // the threads are joined (the end of the parallel region) before `out` is read.
    unsafe {
        let g = std::slice::from_raw_parts(gate.data_ptr() as *const E, strided_extent(gs));
        let u = std::slice::from_raw_parts(up.data_ptr() as *const E, strided_extent(us));
        let dst = OutPtr(out.data_ptr() as *mut E);
        let run = |rows: std::ops::Range<usize>| {
            // Capture the whole `OutPtr` (Send), not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let dst = dst;
            for row in rows {
                let (ga, ua) = (row * gs.2, row * us.2);
                let o = std::slice::from_raw_parts_mut(dst.0.add(row * width), width);
                avx512::silu_mul(&g[ga..ga + width], &u[ua..ua + width], o);
            }
        };
        // Rows split across the team from a few thousand elements on (batch 8 of SmolLM2's
        // 1536-wide MLP: ~17 µs on one thread); an exponential costs about as much as 64
        // multiply-adds here, which is how the split threshold counts it.
        omp::split(rows, 1, rows * width * 64, &run);
    }
}

/// The backward of [`silu_mul`] for the output gradient `d` (`[rows, width]`, contiguous):
/// `[dgate | dup]` as one contiguous `[rows, 2 * width]` tensor (the gradient of a fused
/// `gate_up` output), in the inputs' kind (see `avx512::silu_mul_backward`; the forward's bf16
/// roundings are passed straight through, as autograd does). `gate` and `up` as
/// [`silu_mul`] takes them; bf16 or float32 CPU tensors of one kind; `None` otherwise.
pub fn silu_mul_backward(gate: &Tensor, up: &Tensor, d: &Tensor) -> Result<Option<Tensor>> {
    let kind = gate.kind();
    let (Some(gs), Some(us)) = (strided_rows(gate), strided_rows(up)) else {
        return Ok(None);
    };
    if !int4_f32_available()
        || !matches!(kind, Kind::BFloat16 | Kind::Float)
        || [gate, up, d]
            .iter()
            .any(|t| !plain_cpu(t) || t.kind() != kind)
        || gate.size() != up.size()
        || d.size() != gate.size()
    {
        return Ok(None);
    }
    let d = d.f_contiguous()?;
    let (rows, width) = (gs.0, gs.1);
    let out = Tensor::f_empty([rows as i64, 2 * width as i64], (kind, Device::Cpu))?;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `gate` and `up` span their rows (`strided_rows` checked their layouts), `d` is
    // contiguous `[rows, width]` and `out` fresh and contiguous `[rows, 2 * width]`, all of
    // `kind`; each thread writes only its own rows of `out` and is joined before `out` is
    // returned; the CPU has AVX-512F and FMA (`int4_f32_available`).
    unsafe {
        if kind == Kind::BFloat16 {
            silu_mul_backward_rows::<u16>(gate, up, &d, &out, gs, us);
        } else {
            silu_mul_backward_rows::<f32>(gate, up, &d, &out, gs, us);
        }
    }
    Ok(Some(out))
}

/// [`silu_mul_backward`]'s rows, split across the OpenMP team.
///
/// # Safety
/// As [`silu_mul_rows`], with `d` a contiguous `[rows, width]` and `out` a fresh contiguous
/// `[rows, 2 * width]` of `E`.
#[cfg(target_arch = "x86_64")]
unsafe fn silu_mul_backward_rows<E: avx512::VecElem + Sync>(
    gate: &Tensor,
    up: &Tensor,
    d: &Tensor,
    out: &Tensor,
    gs: (usize, usize, usize),
    us: (usize, usize, usize),
) {
    let (rows, width) = (gs.0, gs.1);
    // SAFETY: by the caller's contract.
    unsafe {
        let g = std::slice::from_raw_parts(gate.data_ptr() as *const E, strided_extent(gs));
        let u = std::slice::from_raw_parts(up.data_ptr() as *const E, strided_extent(us));
        let dy = std::slice::from_raw_parts(d.data_ptr() as *const E, rows * width);
        let dst = OutPtr(out.data_ptr() as *mut E);
        let run = |rows: std::ops::Range<usize>| {
            // Capture the whole `OutPtr` (Send), not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let dst = dst;
            for row in rows {
                let (ga, ua, da) = (row * gs.2, row * us.2, row * width);
                let o = std::slice::from_raw_parts_mut(dst.0.add(row * 2 * width), 2 * width);
                let (dg, du) = o.split_at_mut(width);
                avx512::silu_mul_backward(
                    &g[ga..ga + width],
                    &u[ua..ua + width],
                    &dy[da..da + width],
                    dg,
                    du,
                );
            }
        };
        omp::split(rows, 1, rows * width * 64, &run);
    }
}

/// One row of [`rms_norm_backward_add`]: `x` widened into `line`, then `dx += r · (dn − x̂ ·
/// mean(dn · x̂))` with `r = 1 / sqrt(mean(x²) + eps)`, `x̂ = x · r` and `dn = dy · w`, all in
/// float32.
#[inline(always)]
fn rms_norm_backward_row<E: Element>(
    x: &[E],
    w: &[E],
    dy: &[E],
    dx: &mut [f32],
    line: &mut [f32],
    eps: f32,
) {
    let h = x.len();
    for (l, v) in line.iter_mut().zip(x) {
        *l = v.get();
    }
    let r = 1.0 / (dot(line, line) / h as f32 + eps).sqrt();
    let mut acc = [0f32; LANES];
    let (lc, lr) = line.as_chunks::<LANES>();
    let (dc, dr) = dy.as_chunks::<LANES>();
    let (wc, wr) = w.as_chunks::<LANES>();
    for ((l, d), g) in lc.iter().zip(dc).zip(wc) {
        for j in 0..LANES {
            acc[j] = (d[j].get() * g[j].get()).mul_add(l[j], acc[j]);
        }
    }
    let mut tail = 0f32;
    for ((l, d), g) in lr.iter().zip(dr).zip(wr) {
        tail = (d.get() * g.get()).mul_add(*l, tail);
    }
    // mean(dn · x̂) = r · mean(dn · x)
    let c = (reduce(acc) + tail) * r / h as f32;
    for (((o, l), d), g) in dx.iter_mut().zip(line.iter()).zip(dy).zip(w) {
        *o += r * (d.get() * g.get() - l * r * c);
    }
}

multiversion!(rms_norm_backward_bf16, fn(x: &[u16], w: &[u16], dy: &[u16], dx: &mut [f32], eps: f32) {
    let h = w.len();
    let mut line = AlignedF32::filled(h, 0.0);
    for ((xr, dr), or) in x.chunks_exact(h).zip(dy.chunks_exact(h)).zip(dx.chunks_exact_mut(h)) {
        rms_norm_backward_row(xr, w, dr, or, line.as_mut_slice(), eps);
    }
});

multiversion!(rms_norm_backward_f32, fn(x: &[f32], w: &[f32], dy: &[f32], dx: &mut [f32], eps: f32) {
    let h = w.len();
    let mut line = AlignedF32::filled(h, 0.0);
    for ((xr, dr), or) in x.chunks_exact(h).zip(dy.chunks_exact(h)).zip(dx.chunks_exact_mut(h)) {
        rms_norm_backward_row(xr, w, dr, or, line.as_mut_slice(), eps);
    }
});

/// Adds the backward of [`rms_norm`] (HF's `LlamaRMSNorm`) for the output gradient `dy` into
/// `dx`: `dx += r · (dn − x̂ · mean(dn · x̂))` per row, with `r = 1 / sqrt(mean(x²) + eps)`,
/// `x̂ = x · r` and `dn = dy · weight`, all in float32 (the forward's bf16 rounding of `x̂` passed
/// straight through, as autograd does). `x` and `dy` are `[rows, h]` and `weight` `[h]` CPU
/// tensors of one kind (bf16 or float32), `dx` a contiguous float32 `[rows, h]` that nothing
/// else reads or writes during the call; rows split across threads. Returns whether it applied
/// (`false`: other kinds, shapes or devices, and `dx` is untouched).
pub fn rms_norm_backward_add(
    x: &Tensor,
    weight: &Tensor,
    dy: &Tensor,
    eps: f64,
    dx: &Tensor,
) -> Result<bool> {
    let kind = x.kind();
    let h = weight.size().first().copied().unwrap_or(0);
    if !available()
        || !rms_norm_takes(x, weight)
        || !plain_cpu(dy)
        || dy.kind() != kind
        || dy.size() != x.size()
        || !plain_cpu(dx)
        || dx.kind() != Kind::Float
        || dx.size() != x.size()
        || !dx.is_contiguous()
    {
        return Ok(false);
    }
    let (x, weight, dy) = (
        x.f_contiguous()?,
        weight.f_contiguous()?,
        dy.f_contiguous()?,
    );
    let (h, rows) = (h as usize, x.numel() / h as usize);
    let at = [x.data_ptr(), weight.data_ptr(), dy.data_ptr()].map(|p| p as usize);
    let dst = OutPtr(dx.data_ptr() as *mut f32);
    let run = |r: std::ops::Range<usize>| {
        // Capture the whole `OutPtr` (Send), not its raw-pointer field.
        #[allow(clippy::redundant_locals)]
        let dst = dst;
        let (first, n) = (r.start * h, r.len() * h);
        // SAFETY: `x`, `dy` are contiguous `[rows, h]`, `weight` `[h]`, of `kind` (bf16 = u16
        // bits); `dx` is contiguous float32 `[rows, h]` that only this call touches, and each
        // thread writes only its rows `r` (joined before returning).
        unsafe {
            let out = std::slice::from_raw_parts_mut(dst.0.add(first), n);
            match kind {
                Kind::BFloat16 => rms_norm_backward_bf16(
                    std::slice::from_raw_parts((at[0] as *const u16).add(first), n),
                    std::slice::from_raw_parts(at[1] as *const u16, h),
                    std::slice::from_raw_parts((at[2] as *const u16).add(first), n),
                    out,
                    eps as f32,
                ),
                _ => rms_norm_backward_f32(
                    std::slice::from_raw_parts((at[0] as *const f32).add(first), n),
                    std::slice::from_raw_parts(at[1] as *const f32, h),
                    std::slice::from_raw_parts((at[2] as *const f32).add(first), n),
                    out,
                    eps as f32,
                ),
            }
        }
    };
    split_rows(rows, rows * h * 6, &run);
    Ok(true)
}

/// Attention of `t` new query positions per row over a KV cache, in bf16 or float32 on the
/// CPU, without gradients. bf16 keeps the rounding points of HF's eager attention (scores `q·k`
/// rounded to bf16, scaled and soft-maxed in f32, probabilities rounded to bf16, the product
/// with `v` accumulated in f32); float32 rounds nowhere in between.
///
/// `q` is `[B, nq, t, hd]`, `k`/`v` are `[B, nkv, L, hd]` views (e.g. of a KV cache) whose rows
/// of `hd` are contiguous. Query position `i` sees keys `j <= start + i` (causal, the cache
/// holding `start` keys before the new ones), and of those, with `mask` (`[B, 1, t, L]` bool,
/// true = visible), only the ones it allows. With `queries` (`[B * t]`, false = a padding
/// slot whose output nobody reads) padding queries are skipped: their output is zero. Query
/// head `h` reads key/value head
/// `h / (nq / nkv)`. Returns `[B, nq, t, hd]` (a view of a contiguous `[B, t, nq, hd]`, so the
/// usual transpose back is free), or `None` where the kernel does not apply (head dimensions
/// that are not a multiple of 16 or above `16 * ATTENTION_MAX_CHUNKS`, tensors that need
/// gradients, a query past the keys: `start + t > L`).
///
/// In bf16, units of at least 16 query rows (prompt batches) run with AVX512-BF16 dot products
/// where the CPU has them (`vdpbf16ps`: the same bf16 products, accumulated in float32 in
/// another order), with query rows in vector lanes; see `avx512::attention_bf16_rows`.
///
/// Why: libtorch's SDPA runs small GEMMs per (row, head, block) through MKL: for one new token
/// per row that is one GEMV each (12 % of a batch-8 float32 decode step on the session-7
/// CPU); for prompt batches on AMD Zen 4 its bf16 GEMMs go through MKL's generic path (bf16
/// widened, then float32 GEMM), 22 % of a `musique eval` run there.
pub fn attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
    queries: Option<&[bool]>,
    start: usize,
) -> Result<Option<Tensor>> {
    let all = [q, k, v];
    let kind = q.kind();
    if !int4_f32_available()
        || !matches!(kind, Kind::BFloat16 | Kind::Float)
        || all.iter().any(|t| !plain_cpu(t) || t.kind() != kind)
    {
        return Ok(None);
    }
    let (Some(qv), Some(kv), Some(vv)) = (View4::of(q), View4::of(k), View4::of(v)) else {
        return Ok(None);
    };
    let hd = q.size()[3] as usize;
    if qv.l == 0
        || k.size()[3] as usize != hd
        || v.size()[3] as usize != hd
        || kv.b != qv.b
        || vv.b != qv.b
        || kv.h == 0
        || vv.h != kv.h
        || vv.l != kv.l
        || kv.l == 0
        || start + qv.l > kv.l
        || queries.is_some_and(|v| v.len() != qv.b * qv.l)
        || qv.h % kv.h != 0
        || !hd.is_multiple_of(16)
        || hd > 16 * ATTENTION_MAX_CHUNKS
    {
        return Ok(None);
    }
    let mask = match mask {
        Some(m) => {
            if !plain_cpu(m) || m.kind() != Kind::Bool || m.numel() != qv.b * qv.l * kv.l {
                return Ok(None);
            }
            Some(m.f_contiguous()?)
        }
        None => None,
    };
    let group = qv.h / kv.h;
    // Positions per unit: enough query rows that a widened key block is read by many
    // (16 rows of 64 values per block; 48 rows at SmolLM2's three heads per kv head).
    let qb = qv.l.min(16);
    let blocks = qv.l.div_ceil(qb);
    let shape = AttnShape {
        q: qv,
        k: kv,
        v: vv,
        hd,
        group,
        // Fewer units than 4 (decoding at batch 1 of a GQA model with 3 kv heads) leave a
        // thread idle or unevenly loaded: split them by query head.
        parts: if qv.b * kv.h * blocks < 4 { group } else { 1 },
        qb,
        start,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let out = Tensor::f_empty(
        [qv.b as i64, qv.l as i64, qv.h as i64, hd as i64],
        (kind, Device::Cpu),
    )?;
    let ms = mask.as_ref().map(|m| {
        // SAFETY: a contiguous CPU bool tensor: one byte per element, 0 or 1.
        unsafe { elements::<bool>(m) }
    });
    #[cfg(target_arch = "x86_64")]
    match kind {
        // SAFETY: q, k and v are CPU tensors of the element type (bf16 as u16 bits).
        Kind::BFloat16 => unsafe { attention_views::<u16>([q, k, v], ms, queries, &out, shape) },
        // SAFETY: as above, float32.
        _ => unsafe { attention_views::<f32>([q, k, v], ms, queries, &out, shape) },
    }
    Ok(Some(out.f_transpose(1, 2)?))
}

/// The attention kernel keeps a query's output (`hd / 16` registers) and the query itself in
/// registers: head dimensions up to 128 (Llama, Mistral, Qwen2, Phi-3's 96, SmolLM2's 64).
pub const ATTENTION_MAX_CHUNKS: usize = 8;

/// Run the attention kernel over `qkv` (views described by `shape`) into `out`.
///
/// # Safety
/// The tensors hold elements of type `E`, `out` is a fresh contiguous `[B, t, nq, hd]` tensor
/// of that type, and `shape` describes the views (checked by `attention`).
#[cfg(target_arch = "x86_64")]
unsafe fn attention_views<E: avx512::VecElem + Sync>(
    qkv: [&Tensor; 3],
    mask: Option<&[bool]>,
    queries: Option<&[bool]>,
    out: &Tensor,
    shape: AttnShape,
) {
    let hd = shape.hd;
    // SAFETY: the slices start at each tensor's first element and span its furthest element
    // (`View4::extent`), which lies inside its storage because the view's sizes and
    // non-negative strides describe elements of it; `out` is fresh.
    unsafe {
        let span = |t: &Tensor, view: &View4| -> &[E] {
            std::slice::from_raw_parts(t.data_ptr() as *const E, view.extent(hd))
        };
        let (qs, ks, vs) = (
            span(qkv[0], &shape.q),
            span(qkv[1], &shape.k),
            span(qkv[2], &shape.v),
        );
        let os = OutPtr(elements_mut::<E>(out).as_mut_ptr());
        let units = shape.k.b * shape.k.h * shape.parts * shape.q.l.div_ceil(shape.qb);
        // bf16 units of at least 16 query rows (prompts) take the AVX512-BF16 kernel where the
        // CPU has it; decoding (a few rows per unit) keeps the float32-lane one.
        let bf16_rows = match (E::as_bf16(qs), E::as_bf16(ks), E::as_bf16(vs)) {
            (Some(q), Some(k), Some(v))
                if shape.group / shape.parts * shape.qb >= 16 && bf16_dot_available() =>
            {
                Some([q, k, v])
            }
            _ => None,
        };
        let run = |range: std::ops::Range<usize>| {
            // Capture the whole `OutPtr` (Send), not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let os = os;
            // `attention` checked `hd` = 16 * (1..=ATTENTION_MAX_CHUNKS).
            match bf16_rows {
                Some(qkv) => {
                    with_rows!(hd / 16, CH => avx512::attention_bf16_rows::<CH>(qkv, mask, queries, os.0 as *mut u16, shape, range))
                }
                None => {
                    with_rows!(hd / 16, CH => avx512::attention::<E, CH>([qs, ks, vs], mask, queries, os.0, shape, range))
                }
            }
        };
        // Units split across threads when there is enough work (batch 8 at SmolLM2 shapes:
        // 137 µs on one thread). Reading the keys and values is the cost that counts at batch
        // 1: one thread streams a layer's cache (356 KB at SmolLM2's 232-token context, in
        // float32) at about 10 GB/s, so count four units of work per cached element read.
        let macs = shape.k.b * shape.k.h * shape.k.l * shape.group * shape.q.l * hd;
        let cached = shape.k.b * shape.k.h * shape.k.l * hd * 2;
        omp::split(units, 1, macs.max(4 * cached), &run);
    }
}

/// `Some(true)`: `vcvtne2ps2bf16` where the CPU has it; `Some(false)`: integer rounding.
static BF16_ROUNDING_OVERRIDE: Override = Override::new();

/// Force how bf16 block-coded panels round their widened weights (`Some(false)`: integer
/// operations; `None`: back to `FLOWTUNE_PANEL_BF16_ROUNDING`). Both give the same bits.
pub fn set_panel_bf16_rounding(native: Option<bool>) {
    BF16_ROUNDING_OVERRIDE.set(native);
}

/// Whether bf16 block-coded panels round with `vcvtne2ps2bf16`: the AVX-512 kernels run, the
/// CPU has AVX512-BW and AVX512-BF16, and neither [`set_panel_bf16_rounding`] nor
/// `FLOWTUNE_PANEL_BF16_ROUNDING=integer` asks for the integer rounding (the same bits, more
/// instructions).
fn coded_panels_native_bf16() -> bool {
    static CPU: OnceLock<bool> = OnceLock::new();
    let cpu = *CPU.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        {
            int4_f32_available()
                && std::arch::is_x86_feature_detected!("avx512bw")
                && std::arch::is_x86_feature_detected!("avx512bf16")
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            false
        }
    });
    cpu && BF16_ROUNDING_OVERRIDE.get().unwrap_or_else(|| {
        std::env::var("FLOWTUNE_PANEL_BF16_ROUNDING").as_deref() != Ok("integer")
    })
}

/// Whether the bf16 attention kernel for prompt batches may use `vdpbf16ps`: the AVX-512
/// kernels run ([`int4_f32_available`]), the CPU has AVX512-BW and AVX512-BF16, and its bf16
/// products are fast ([`bf16_gemm`] is [`Bf16Gemm::Native`]: on the session-11 Intel Xeon,
/// where libtorch's bf16 GEMM ran at half its float32 speed, `vdpbf16ps` measured 85 GFLOP/s
/// per core against 188 for float32 FMAs).
fn bf16_dot_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        int4_f32_available()
            && std::arch::is_x86_feature_detected!("avx512bw")
            && std::arch::is_x86_feature_detected!("avx512bf16")
            && bf16_gemm() == Bf16Gemm::Native
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Whether the AVX-512 kernels (float32 int4 and small-batch products, attention)
/// run on this CPU: x86-64 with AVX-512F and FMA, the kernels not switched off.
pub fn int4_f32_available() -> bool {
    enabled_on_cpu(true)
}

/// Inputs per int4 group (ggml's Q4 block).
const GROUP: usize = 32;

/// A linear weight `[N, K]` in 4-bit codes with a float32 scale and minimum per group of 32
/// inputs (`w = scale * q + min`, ggml's Q4_1 block), for float32 activations of a few rows.
///
/// libtorch's int4 kernel takes bf16/f16 activations at full speed but float32 ones about 30x
/// slower than a dense float32 `linear`; this kernel keeps the float32 model's numerics (the
/// weights are the same values; only the summation order differs) while reading an eighth of
/// the bytes. Each group's 16 bytes hold inputs `j` (low nibble) and `j + 16` (high nibble).
#[derive(Debug)]
pub struct Int4F32Weight {
    packed: Vec<u8>,
    scale: Vec<f32>,
    min: Vec<f32>,
    n: usize,
    k: usize,
}

/// A fresh CPU tensor of `kind` shaped like `x` with the last dimension `n` (a product's output).
fn output_for(x: &Tensor, n: usize, kind: Kind) -> Result<Tensor> {
    let mut shape = x.size();
    if let Some(last) = shape.last_mut() {
        *last = n as i64;
    }
    Ok(Tensor::f_empty(shape.as_slice(), (kind, Device::Cpu))?)
}

/// The output pointer of one kernel call, shared by the threads that write disjoint parts.
struct OutPtr<T>(*mut T);
impl<T> Clone for OutPtr<T> {
    fn clone(&self) -> Self {
        *self
    }
}
impl<T> Copy for OutPtr<T> {}
// SAFETY: the threads given an `OutPtr` write disjoint elements of one live allocation and are
// joined (the end of the OpenMP parallel region) before the tensor that owns it is used again.
unsafe impl<T> Send for OutPtr<T> {}
unsafe impl<T> Sync for OutPtr<T> {}

/// Forwards with at most this many rows take the int4 float32 kernel.
pub const INT4_F32_MAX_ROWS: usize = 8;

impl Int4F32Weight {
    /// Pack codes (uint8 `[N, K]`, values 0..=15, `K` a multiple of 32) with float32 scales and
    /// minima `[N, K / 32]`; `None` when the shapes do not fit.
    pub fn new(q: &Tensor, scale: &Tensor, min: &Tensor) -> Result<Option<Self>> {
        let size = q.size();
        if size.len() != 2 || size[1] % GROUP as i64 != 0 {
            return Ok(None);
        }
        let (n, k) = (size[0] as usize, size[1] as usize);
        let groups = [n as i64, (k / GROUP) as i64];
        if scale.size() != groups || min.size() != groups {
            return Ok(None);
        }
        let codes = Vec::<u8>::try_from(q.f_to_kind(Kind::Uint8)?.f_flatten(0, -1)?)?;
        let mut packed = Vec::with_capacity(n * k / 2);
        for block in codes.chunks_exact(GROUP) {
            for j in 0..GROUP / 2 {
                packed.push((block[j] & 0x0f) | (block[j + GROUP / 2] << 4));
            }
        }
        let floats = |t: &Tensor| -> Result<Vec<f32>> {
            Ok(Vec::<f32>::try_from(
                t.f_to_kind(Kind::Float)?.f_flatten(0, -1)?,
            )?)
        };
        Ok(Some(Self {
            packed,
            scale: floats(scale)?,
            min: floats(min)?,
            n,
            k,
        }))
    }

    /// Whether `x @ w.T` for this input takes the kernel: a float32 CPU tensor without
    /// gradient, `[..., K]` with at most [`INT4_F32_MAX_ROWS`] rows, on a CPU that has it.
    pub fn applies(&self, x: &Tensor) -> bool {
        takes_small_rows(x, self.k)
    }

    /// `x @ w.T` for float32 or bf16 `x` `[..., K]` (see [`Self::applies`]; `None` where it
    /// does not).
    pub fn matmul(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.applies(x) {
            return Ok(None);
        }
        small_product(x, self.n, self.k, &|xs, y, rows, r| {
            // SAFETY: `small_product` hands over `rows * k` inputs and `rows * n` outputs, and
            // `applies` checked the CPU.
            #[cfg(target_arch = "x86_64")]
            with_rows!(rows, M => if M <= 2 {
                unsafe { avx512::int4_f32::<M, 4>(self, xs, y, r.start, r.end) }
            } else {
                unsafe { avx512::int4_f32::<M, 2>(self, xs, y, r.start, r.end) }
            })
        })
        .map(Some)
    }
}

/// [`lora_add`]'s rows: for each row of `x` (`inp` float32s), `h = x Aᵀ` (`a` `[rank, inp]`),
/// then for each output `o`, `y[o] = round(y[o] + (Σ_r h[r] Bᵀ[r][o]) · scale)` where row `i`
/// of `y` starts at `i * stride` and `round` rounds to `E` (PEFT adds its float32 delta to the
/// base output in float32 and casts the sum back to the base's dtype).
#[inline(always)]
fn lora_rows<E: Element>(
    x: &[f32],
    a: &[f32],
    bt: &[f32],
    y: &mut [E],
    stride: usize,
    (inp, out): (usize, usize),
    scale: f32,
) {
    const R: usize = 8;
    let rank = a.len() / inp.max(1);
    let mut h = [0f32; LORA_MAX_RANK];
    let full = inp / LANES * LANES;
    for (i, xr) in x.chunks_exact(inp).enumerate() {
        // `x · A[r]` for eight ranks at once: each 16-input slice of x is loaded once and
        // feeds eight independent accumulators.
        for r0 in (0..rank).step_by(R) {
            let n = R.min(rank - r0);
            let mut acc = [[0f32; LANES]; R];
            for c in (0..full).step_by(LANES) {
                let xv = &xr[c..c + LANES];
                for (k, acc) in acc.iter_mut().enumerate().take(n) {
                    let av = &a[(r0 + k) * inp + c..][..LANES];
                    for j in 0..LANES {
                        acc[j] = xv[j].mul_add(av[j], acc[j]);
                    }
                }
            }
            for (k, acc) in acc.into_iter().enumerate().take(n) {
                let mut tail = 0f32;
                for c in full..inp {
                    tail = xr[c].mul_add(a[(r0 + k) * inp + c], tail);
                }
                h[r0 + k] = reduce(acc) + tail;
            }
        }
        // `Σ_r h[r] · Bᵀ[r]` sixteen outputs at a time, in registers, then scaled and added.
        let yr = &mut y[i * stride..i * stride + out];
        let (yc, yt) = yr.as_chunks_mut::<LANES>();
        for (o, yv) in yc.iter_mut().enumerate() {
            let mut v = [0f32; LANES];
            for (r, &hr) in h[..rank].iter().enumerate() {
                let bv = &bt[r * out + o * LANES..][..LANES];
                for j in 0..LANES {
                    v[j] = bv[j].mul_add(hr, v[j]);
                }
            }
            for j in 0..LANES {
                yv[j] = E::put(yv[j].get() + v[j] * scale);
            }
        }
        let base = yc.len() * LANES;
        for (k, yo) in yt.iter_mut().enumerate() {
            let mut v = 0f32;
            for (r, &hr) in h[..rank].iter().enumerate() {
                v = bt[r * out + base + k].mul_add(hr, v);
            }
            *yo = E::put(yo.get() + v * scale);
        }
    }
}

multiversion!(lora_rows_bf16, fn(x: &[f32], a: &[f32], bt: &[f32], y: &mut [u16], stride: usize, shape: (usize, usize), scale: f32) {
    lora_rows(x, a, bt, y, stride, shape, scale)
});

multiversion!(lora_rows_f32, fn(x: &[f32], a: &[f32], bt: &[f32], y: &mut [f32], stride: usize, shape: (usize, usize), scale: f32) {
    lora_rows(x, a, bt, y, stride, shape, scale)
});

/// Adapters of at most this rank take [`lora_add`].
pub const LORA_MAX_RANK: usize = 64;

/// Adds the LoRA delta `scale · (x Aᵀ) Bᵀ` of one site, without gradients, in place into the
/// base output `y`: `x` `[..., in]` bf16 or float32 on the CPU, `a` `[r, in]` and `b`
/// `[out, r]` float32 (PEFT keeps adapters in float32 over a bf16 base and casts the input
/// up, as this does), `y` `[..., out]` of `x`'s kind and leading shape whose rows are evenly
/// strided (e.g. a column slice of a fused projection's output). Each delta is computed in
/// float32, added to the float32 value of `y` and the sum rounded once, as PEFT's
/// `result + lora_B(lora_A(x)) * scaling` followed by the cast back. Returns whether it
/// applied: `false` (and `y` untouched) for other kinds or shapes, a rank above
/// [`LORA_MAX_RANK`], or tensors that need gradients.
pub fn lora_add(x: &Tensor, a: &Tensor, b: &Tensor, scale: f64, y: &Tensor) -> Result<bool> {
    let (asz, bsz, xsz, ysz) = (a.size(), b.size(), x.size(), y.size());
    let inp = xsz.last().copied().unwrap_or(0);
    let rows_y = strided_rows(y);
    if !int4_f32_available()
        || ![x, a, b, y].iter().all(|t| plain_cpu(t))
        || !matches!(x.kind(), Kind::BFloat16 | Kind::Float)
        || y.kind() != x.kind()
        || a.kind() != Kind::Float
        || b.kind() != Kind::Float
        || asz.len() != 2
        || bsz.len() != 2
        || asz[1] != inp
        || bsz[1] != asz[0]
        || inp == 0
        || asz[0] as usize > LORA_MAX_RANK
        || xsz.split_last().map(|p| p.1) != ysz.split_last().map(|p| p.1)
        || ysz.last() != Some(&bsz[0])
        || rows_y.is_none()
    {
        return Ok(false);
    }
    let Some((rows, out, stride)) = rows_y else {
        return Ok(false);
    };
    if rows == 0 {
        return Ok(true);
    }
    let inp = inp as usize;
    let x = x.f_contiguous()?;
    let a = a.f_contiguous()?;
    let bt = b.f_tr()?.f_contiguous()?;
    let bf16 = x.kind() == Kind::BFloat16;
    let span = |r: &std::ops::Range<usize>| r.start * stride..(r.end - 1) * stride + out;
    // SAFETY: `x`, `a` and `bt` are contiguous float32 (or bf16 for `x`) CPU tensors of the
    // sizes checked above; `y`'s `rows` rows of `out` values start `stride` elements apart
    // (`strided_rows`), so the span of a range of rows covers exactly their elements, and
    // threads given disjoint row ranges write disjoint spans; they are joined (the end of the
    // parallel region) before `y` is read.
    unsafe {
        let (av, btv) = (elements::<f32>(&a), elements::<f32>(&bt));
        let yp = OutPtr(y.data_ptr() as *mut u8);
        let (x16, x32) = if bf16 {
            (elements::<u16>(&x), &[][..])
        } else {
            (&[][..], elements::<f32>(&x))
        };
        let run = |r: std::ops::Range<usize>| {
            // Capture the whole `OutPtr` (Send), not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let yp = yp;
            let s = span(&r);
            if bf16 {
                // Each thread widens its own rows of the input.
                let xf = AlignedF32::widened(&x16[r.start * inp..r.end * inp]);
                let yr = std::slice::from_raw_parts_mut((yp.0 as *mut u16).add(s.start), s.len());
                lora_rows_bf16(xf.as_slice(), av, btv, yr, stride, (inp, out), scale as f32);
            } else {
                let yr = std::slice::from_raw_parts_mut((yp.0 as *mut f32).add(s.start), s.len());
                let xr = &x32[r.start * inp..r.end * inp];
                lora_rows_f32(xr, av, btv, yr, stride, (inp, out), scale as f32);
            }
        };
        omp::split(rows, 1, rows * av.len() * 2, &run);
    }
    Ok(true)
}

/// Whether a quantised-weight kernel over `k` inputs takes `x`: a float32 or bf16 CPU tensor
/// without gradient, `[..., k]` with at most [`INT4_F32_MAX_ROWS`] rows, on a CPU that has the
/// kernels.
fn takes_small_rows(x: &Tensor, k: usize) -> bool {
    int4_f32_available()
        && plain_cpu(x)
        && matches!(x.kind(), Kind::Float | Kind::BFloat16)
        && x.size().last().copied() == Some(k as i64)
        && x.numel() / k.max(1) <= INT4_F32_MAX_ROWS
}

/// One product kernel call, `kernel(x, y, rows, outputs)`: reads `rows * k` floats at `x`,
/// writes outputs `outputs` of every row into `y` (`rows * n` floats).
type SmallKernel<'a> = dyn Fn(&[f32], *mut f32, usize, std::ops::Range<usize>) + Sync + 'a;

/// Run a quantised-weight product kernel over `x` `[..., k]` (float32 or bf16, contiguous CPU,
/// at most [`INT4_F32_MAX_ROWS`] rows, checked by the caller) into a fresh `[..., n]` of `x`'s
/// kind: bf16 inputs are widened to float32 and each float32 sum rounded once to bf16, as
/// libtorch's bf16 products do. Outputs are split across the OpenMP team in blocks of 16.
fn small_product(x: &Tensor, n: usize, k: usize, kernel: &SmallKernel<'_>) -> Result<Tensor> {
    let x = x.f_contiguous()?;
    let rows = x.numel() / k.max(1);
    let bf16 = x.kind() == Kind::BFloat16;
    let out = output_for(&x, n, x.kind())?;
    // SAFETY: `x` is a contiguous f32 or bf16 CPU tensor of `rows * k` values; `out` is fresh,
    // of the same kind, and holds `rows * n`; bf16 inputs and outputs go through float32
    // buffers of those sizes (the output one reserved, not initialised: each thread reads only
    // the elements its own kernel call has just written); threads write disjoint output ranges
    // and are joined (the end of the parallel region) before `out` is read or returned.
    #[cfg(target_arch = "x86_64")]
    unsafe {
        let xf;
        let mut yf: Vec<f32> = Vec::new();
        let (xs, yp) = if bf16 {
            xf = AlignedF32::widened(elements::<u16>(&x));
            let xs = xf.as_slice();
            // Every element is written by the kernel before it is read (below).
            yf.reserve_exact(rows * n);
            (xs, yf.as_mut_ptr())
        } else {
            (elements::<f32>(&x), elements_mut::<f32>(&out).as_mut_ptr())
        };
        let ys = OutPtr(yp);
        let dst = OutPtr(if bf16 {
            elements_mut::<u16>(&out).as_mut_ptr()
        } else {
            std::ptr::null_mut()
        });
        let run = |r: std::ops::Range<usize>| {
            // Capture the whole `OutPtr`s (Send), not their raw-pointer fields (edition 2021
            // closures capture disjoint fields).
            #[allow(clippy::redundant_locals)]
            let (ys, dst) = (ys, dst);
            kernel(xs, ys.0, rows, r.clone());
            if bf16 {
                // Each thread rounds the outputs it computed, row by row.
                for m in 0..rows {
                    let at = m * n + r.start;
                    let src = std::slice::from_raw_parts(ys.0.add(at), r.len());
                    let out = std::slice::from_raw_parts_mut(dst.0.add(at), r.len());
                    for (d, v) in out.iter_mut().zip(src) {
                        *d = bf16_bits(*v);
                    }
                }
            }
        };
        omp::split(n, 16, rows * n * k, &run);
    }
    Ok(out)
}

/// A linear weight `[N, K]` in ggml's Q8_0 blocks: signed 8-bit codes with a float32 scale per
/// group of 32 inputs (`w = scale * q`), for float32 or bf16 activations of a few rows. A
/// Q8_0 GGUF's `lm_head` (or tied token embeddings) keeps its own blocks this way in int4 mode:
/// the values are the file's exactly, and the head reads a bit over half the bytes of bf16.
#[derive(Debug)]
pub struct Int8F32Weight {
    codes: Vec<i8>,
    scale: Vec<f32>,
    n: usize,
    k: usize,
}

impl Int8F32Weight {
    /// Codes (`n * k`, row-major) and scales (`n * k / 32`); `None` when the sizes do not fit
    /// or the CPU lacks the kernel.
    pub fn new(codes: Vec<i8>, scale: Vec<f32>, n: usize, k: usize) -> Option<Self> {
        let fits = k > 0
            && k.is_multiple_of(GROUP)
            && codes.len() == n * k
            && scale.len() == n * k / GROUP;
        (fits && int4_f32_available()).then_some(Self { codes, scale, n, k })
    }

    /// Output and input sizes `(N, K)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.n, self.k)
    }

    /// The codes and scales.
    pub fn codes(&self) -> BlockCodes<'_> {
        BlockCodes::Q8 {
            codes: &self.codes,
            scale: &self.scale,
        }
    }

    /// The weight these blocks represent, float32 `[N, K]` (`scale * q`, exact).
    pub fn dequantize(&self) -> Result<Tensor> {
        let w: Vec<f32> = self
            .codes
            .chunks_exact(GROUP)
            .zip(&self.scale)
            .flat_map(|(q, &s)| q.iter().map(move |&c| s * f32::from(c)))
            .collect();
        Ok(Tensor::f_from_slice(&w)?.f_reshape([self.n as i64, self.k as i64])?)
    }

    /// Whether `x @ w.T` takes the kernel: a float32 or bf16 CPU tensor without gradient,
    /// `[..., K]` with at most [`INT4_F32_MAX_ROWS`] rows.
    pub fn applies(&self, x: &Tensor) -> bool {
        takes_small_rows(x, self.k)
    }

    /// `x @ w.T` (see [`Self::applies`]; `None` where it does not).
    pub fn matmul(&self, x: &Tensor) -> Result<Option<Tensor>> {
        if !self.applies(x) {
            return Ok(None);
        }
        small_product(x, self.n, self.k, &|xs, y, rows, r| {
            // SAFETY: `small_product` hands over `rows * k` inputs and `rows * n` outputs, and
            // `applies` checked the CPU.
            #[cfg(target_arch = "x86_64")]
            with_rows!(rows, M => if M <= 2 {
                unsafe { avx512::int8_f32::<M, 2>(self, xs, y, r.start, r.end) }
            } else {
                unsafe { avx512::int8_f32::<M, 1>(self, xs, y, r.start, r.end) }
            })
        })
        .map(Some)
    }
}

/// Output columns per panel of [`PanelWeight`].
const PANEL: usize = 32;

/// `Some(true)`: panels; `Some(false)`: none.
static PANELS_OVERRIDE: Override = Override::new();

/// Force whether models built from now on keep [`PanelWeight`] copies (`None`: back to
/// `FLOWTUNE_DECODE_PANELS`, else on).
pub fn set_decode_panels(choice: Option<bool>) {
    PANELS_OVERRIDE.set(choice);
}

/// Whether models built now keep a [`PanelWeight`] copy of their float32 and bf16 CPU linears:
/// the [`set_decode_panels`] override, else `FLOWTUNE_DECODE_PANELS=0` (off) or `1`, else on.
/// The copy doubles the memory of those weights; off, decoding reads the dense weights.
pub fn decode_panels() -> bool {
    PANELS_OVERRIDE.get().unwrap_or_else(|| {
        !matches!(
            std::env::var("FLOWTUNE_DECODE_PANELS").as_deref(),
            Ok("0") | Ok("false") | Ok("off")
        )
    })
}

/// A float32 or bf16 linear weight `[N, K]` laid out for products of a few rows
/// ([`Self::matmul`], decoding): panels of 32 outputs, panel `p` holding `w[32p + c, kk]` at
/// `(p·K + kk)·32 + c`, the last one zero-padded, so a panel is one sequential run of `K` rows
/// of 64 (bf16) or 128 (float32) bytes. Over the dense layouts the streams are worse: a
/// 32-column tile of the transposed `[K, N]` float32 matrix (the layout libtorch's GEMMs read,
/// `model::fast_weight_layout`) reads 128 bytes per row one row stride apart, which neither
/// the hardware prefetchers nor the TLB follow, and the row-major bf16 GEMV reads four rows
/// at a time. Measured on the session-15 AMD Zen 4 VM (one input row, a 30-matrix working
/// set): float32 3.7-5.4 GB/s against 21-25 GB/s for panels on one thread; bf16 19-25 against
/// 33-34 GB/s on two. A second copy of the weight: the model keeps one next to each dense
/// float32 or bf16 CPU linear where [`decode_panels`] says so, on AVX-512 CPUs.
///
/// A float32 weight whose every value is a bf16 value (a bf16 checkpoint loaded in float32)
/// is stored in bf16, and one whose every value is a half-precision value (an f16 checkpoint)
/// in f16: widening is exact and the products and sums are the same float32 operations in the
/// same order, so the outputs are the same bits at half the bytes read. A weight dequantised
/// from ggml blocks can keep those blocks instead ([`Self::from_codes`]), again with the same
/// bits out.
pub struct PanelWeight {
    lines: Vec<Line>,
    /// The kind of the inputs and outputs (the weight's own).
    kind: Kind,
    /// The kind the panels hold: `kind`, or bf16 (f16) for a float32 weight whose values are
    /// all bf16 (f16) values, or the codes' kind for block-coded panels (uint8: 4-bit codes
    /// with scales and minima; int8: 8-bit codes with scales).
    stored: Kind,
    n: usize,
    k: usize,
}

impl std::fmt::Debug for PanelWeight {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PanelWeight")
            .field("kind", &self.kind)
            .field("stored", &self.stored)
            .field("n", &self.n)
            .field("k", &self.k)
            .finish_non_exhaustive()
    }
}

impl PanelWeight {
    /// The panels of `w` `[N, K]` (float32 or bf16, CPU, any strides); `None` on a CPU
    /// without the kernel, with [`decode_panels`] off, or for another kind, device or shape.
    pub fn new(w: &Tensor) -> Result<Option<Self>> {
        let Some((n, k)) = panel_operand(w) else {
            return Ok(None);
        };
        // `[K, N]` contiguous: row `kk` holds every output's weight for input `kk`.
        let wt = w.f_detach()?.f_transpose(0, 1)?.f_contiguous()?;
        let values = n.div_ceil(PANEL) * k * PANEL;
        let mut panels = Self {
            lines: Vec::new(),
            kind: w.kind(),
            stored: w.kind(),
            n,
            k,
        };
        // A half-width copy where one holds the same values: bf16 weights as they are, float32
        // ones whose values are all bf16 or all f16 values.
        // SAFETY: `wt` is a contiguous CPU tensor of `k * n` float32 values where it is one.
        let half = match w.kind() {
            Kind::Float => half_width_copy(&wt, unsafe { elements::<f32>(&wt) })?,
            _ => Some((Kind::BFloat16, wt.shallow_clone())),
        };
        // SAFETY: `wt` (and `half`, of the same shape) are contiguous CPU tensors of `k * n`
        // values of the element type read.
        unsafe {
            match half {
                Some((stored, half)) => {
                    panels.stored = stored;
                    panels.lines = vec![Line([0.0; LANES]); values.div_ceil(2 * LANES)];
                    fill_panels(elements::<u16>(&half), panels.values_mut::<u16>(), n, k);
                }
                None => {
                    panels.lines = vec![Line([0.0; LANES]); values.div_ceil(LANES)];
                    fill_panels(elements::<f32>(&wt), panels.values_mut::<f32>(), n, k);
                }
            }
        }
        Ok(Some(panels))
    }

    /// The panels of `w` `[N, K]` (float32 or bf16, CPU) kept as the ggml block codes its
    /// values were dequantised from (a GGUF's Q4_1 linears, its Q8_0 head) where `codes`
    /// reproduces every value of `w` bit for bit: `code * scale (+ min)`, each operation
    /// rounded to float32 as [`crate::gguf::dequantize`] does, then rounded to bf16 for a bf16
    /// `w` as libtorch's cast does. The kernel widens the codes the same way, so the products
    /// are the same bits as over panels of `w`'s values, at about a sixth (4-bit codes) or a
    /// quarter (8-bit) of the bytes of float32 panels. `None` where [`Self::new`] would be,
    /// for `K` not a multiple of 32, codes of another size, scales or minima that are not
    /// finite half-precision values, or any value not reproduced (ggml's Q4_0 blocks, say, whose
    /// `(q - 8) * scale` can be a negative zero where `q * scale + min` is a positive one).
    pub fn from_codes(w: &Tensor, codes: BlockCodes<'_>) -> Result<Option<Self>> {
        let Some((n, k)) = panel_operand(w).filter(|&(_, k)| k % GROUP == 0) else {
            return Ok(None);
        };
        if codes.len() != n * k {
            return Ok(None);
        }
        let (scale, min, nibbles) = match codes {
            BlockCodes::Q4 { scale, min, .. } => (scale, Some(min), true),
            BlockCodes::Q8 { scale, .. } => (scale, None, false),
        };
        let groups = n * k / GROUP;
        let as_half = |v: &[f32]| -> Option<Vec<half::f16>> {
            let h: Vec<half::f16> = v.iter().map(|&x| half::f16::from_f32(x)).collect();
            let exact = h
                .iter()
                .zip(v)
                .all(|(h, x)| x.is_finite() && h.to_f32().to_bits() == x.to_bits());
            exact.then_some(h)
        };
        let (Some(scale16), true) = (as_half(scale), scale.len() == groups) else {
            return Ok(None);
        };
        let min16 = match min {
            Some(m) if m.len() == groups => match as_half(m) {
                Some(h) => Some(h),
                None => return Ok(None),
            },
            Some(_) => return Ok(None),
            None => None,
        };
        // The dense value of element `at` (row-major) as the loader computed it.
        let bf16 = w.kind() == Kind::BFloat16;
        let value = |at: usize| -> u32 {
            let g = at / GROUP;
            let v = codes.code(at) * scale[g];
            let v = min.map_or(v, |m| v + m[g]);
            if bf16 {
                u32::from(bf16_bits(v))
            } else {
                v.to_bits()
            }
        };
        let dense = w.f_detach()?.f_contiguous()?;
        // SAFETY: `dense` is a contiguous CPU tensor of `n * k` values of its kind.
        let same = unsafe {
            if bf16 {
                elements::<u16>(&dense)
                    .iter()
                    .enumerate()
                    .all(|(at, &v)| u32::from(v) == value(at))
            } else {
                elements::<f32>(&dense)
                    .iter()
                    .enumerate()
                    .all(|(at, &v)| v.to_bits() == value(at))
            }
        };
        if !same {
            return Ok(None);
        }
        drop(dense);
        let blocks = k / GROUP;
        use avx512::CodeRow;
        let (block, row) = if nibbles {
            (
                avx512::coded_block_bytes::<avx512::Nibbles, true>(),
                avx512::Nibbles::BYTES,
            )
        } else {
            (
                avx512::coded_block_bytes::<avx512::Bytes, false>(),
                avx512::Bytes::BYTES,
            )
        };
        let line = std::mem::size_of::<Line>();
        let mut panels = Self {
            lines: vec![Line([0.0; LANES]); n.div_ceil(PANEL) * blocks * block / line],
            kind: w.kind(),
            stored: if nibbles { Kind::Uint8 } else { Kind::Int8 },
            n,
            k,
        };
        let bytes = panels.values_mut::<u8>();
        for p in 0..n.div_ceil(PANEL) {
            let width = (n - p * PANEL).min(PANEL);
            for b in 0..blocks {
                let at = (p * blocks + b) * block;
                let out = &mut bytes[at..at + block];
                for c in 0..width {
                    let o = p * PANEL + c;
                    let g = o * blocks + b;
                    out[2 * c..2 * c + 2].copy_from_slice(&scale16[g].to_le_bytes());
                    if let Some(m) = &min16 {
                        out[64 + 2 * c..64 + 2 * c + 2].copy_from_slice(&m[g].to_le_bytes());
                    }
                }
                let rows = &mut out[block - 32 * row..];
                for i in 0..GROUP {
                    let r = &mut rows[i * row..(i + 1) * row];
                    for c in 0..width {
                        let src = (p * PANEL + c) * k + b * GROUP + i;
                        match codes {
                            BlockCodes::Q4 { codes, .. } => {
                                r[c % 16] |= (codes[src] & 0x0f) << (4 * (c / 16));
                            }
                            BlockCodes::Q8 { codes, .. } => r[c] = codes[src] as u8,
                        }
                    }
                }
            }
        }
        Ok(Some(panels))
    }

    /// The element kind (float32 or bf16) and the output and input sizes `(N, K)`.
    pub fn shape(&self) -> (Kind, usize, usize) {
        (self.kind, self.n, self.k)
    }

    /// The kind the panels are stored in: the weight's own, or bf16 (f16) for a float32 weight
    /// whose values are all bf16 (f16) values, or for panels built by [`Self::from_codes`]
    /// uint8 (4-bit codes) or int8 (8-bit codes).
    pub fn stored_kind(&self) -> Kind {
        self.stored
    }

    /// The bytes the panels take.
    pub fn bytes(&self) -> usize {
        self.lines.len() * std::mem::size_of::<Line>()
    }

    /// The lines as `E` values (`E` of the kind's size).
    fn values<E>(&self) -> &[E] {
        let len = self.lines.len() * std::mem::size_of::<Line>() / std::mem::size_of::<E>();
        // SAFETY: `Line` is `repr(C)` plain data, 64-byte aligned; every bit pattern is a
        // valid float32 or u16, and `E` is one of them.
        unsafe { std::slice::from_raw_parts(self.lines.as_ptr().cast::<E>(), len) }
    }

    fn values_mut<E>(&mut self) -> &mut [E] {
        let len = self.lines.len() * std::mem::size_of::<Line>() / std::mem::size_of::<E>();
        // SAFETY: as in `values`, borrowed mutably.
        unsafe { std::slice::from_raw_parts_mut(self.lines.as_mut_ptr().cast::<E>(), len) }
    }

    /// `x @ w.T + bias` for `x` `[..., K]` of the weight's kind with 1 to
    /// [`INT4_F32_MAX_ROWS`] rows and no gradient: the weight is streamed once for all rows,
    /// panels split across libtorch's OpenMP team, each output accumulated over `k` in order
    /// with float32 fused multiply-adds, the bias (of the weight's kind) added to the sum, and
    /// a bf16 result rounded once, as libtorch's bf16 `linear` does. `None` where it does not
    /// apply (another kind, more rows, gradients, a bias of another kind or size).
    pub fn matmul(&self, x: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
        let bias_fits = bias
            .is_none_or(|b| plain_cpu(b) && b.kind() == self.kind && b.size() == [self.n as i64]);
        if !takes_small_rows(x, self.k) || x.kind() != self.kind || x.numel() == 0 || !bias_fits {
            return Ok(None);
        }
        let (n, k) = (self.n, self.k);
        let x = x.f_contiguous()?;
        let rows = x.numel() / k;
        let out = output_for(&x, n, self.kind)?;
        let bias = bias
            .map(|b| b.f_to_kind(Kind::Float)?.f_contiguous())
            .transpose()?;
        #[cfg(target_arch = "x86_64")]
        // SAFETY: `x` holds `rows * k` values of the weight's kind and `out`, fresh, `rows * n`;
        // `bias` (checked) `n` floats; the panels hold `n.div_ceil(32) * k * 32` values of
        // that kind on a cache-line boundary; threads write disjoint panels' columns and are
        // joined before `out` is returned.
        unsafe {
            let xf;
            let xs = if self.kind == Kind::BFloat16 {
                xf = AlignedF32::widened(elements::<u16>(&x));
                xf.as_slice()
            } else {
                elements::<f32>(&x)
            };
            let bs = bias.as_ref().map(|b| elements::<f32>(b));
            let bf16 = self.kind == Kind::BFloat16;
            let native = bf16 && coded_panels_native_bf16();
            let stored = self.stored;
            let ys = OutPtr(out.data_ptr() as *mut u8);
            let run = |r: std::ops::Range<usize>| {
                // Capture the whole `OutPtr` (Send), not its raw-pointer field.
                #[allow(clippy::redundant_locals)]
                let ys = ys;
                let mut store = |m: usize, j: usize, sums: &[f32]| {
                    let at = m * n + j;
                    let plus = |c: usize, v: f32| bs.map_or(v, |b| v + b[j + c]);
                    if bf16 {
                        let y =
                            std::slice::from_raw_parts_mut((ys.0 as *mut u16).add(at), sums.len());
                        for (c, (d, &v)) in y.iter_mut().zip(sums).enumerate() {
                            *d = bf16_bits(plus(c, v));
                        }
                    } else {
                        let y =
                            std::slice::from_raw_parts_mut((ys.0 as *mut f32).add(at), sums.len());
                        for (c, (d, &v)) in y.iter_mut().zip(sums).enumerate() {
                            *d = plus(c, v);
                        }
                    }
                };
                let job = avx512::CodedJob {
                    x: xs,
                    data: self.values::<u8>(),
                    n,
                    k,
                    from: r.start,
                    to: r.end,
                };
                with_rows!(rows, M => match stored {
                    Kind::Uint8 if bf16 && native => avx512::gemm_coded_panels_bf16::<avx512::Nibbles, true, M>(job, &mut store),
                    Kind::Uint8 if bf16 => avx512::gemm_coded_panels::<avx512::Nibbles, true, { avx512::ROUND_BF16 }, M>(job, &mut store),
                    Kind::Uint8 => avx512::gemm_coded_panels::<avx512::Nibbles, true, { avx512::ROUND_NONE }, M>(job, &mut store),
                    Kind::Int8 if bf16 && native => avx512::gemm_coded_panels_bf16::<avx512::Bytes, false, M>(job, &mut store),
                    Kind::Int8 if bf16 => avx512::gemm_coded_panels::<avx512::Bytes, false, { avx512::ROUND_BF16 }, M>(job, &mut store),
                    Kind::Int8 => avx512::gemm_coded_panels::<avx512::Bytes, false, { avx512::ROUND_NONE }, M>(job, &mut store),
                    Kind::BFloat16 => avx512::gemm_panels::<u16, M>(xs, self.values::<u16>(), n, k, r.start, r.end, &mut store),
                    Kind::Half => avx512::gemm_panels::<avx512::F16, M>(xs, self.values::<avx512::F16>(), n, k, r.start, r.end, &mut store),
                    _ => avx512::gemm_panels::<f32, M>(xs, self.values::<f32>(), n, k, r.start, r.end, &mut store),
                })
            };
            omp::split(n.div_ceil(PANEL), 1, rows * n * k, &run);
        }
        Ok(Some(out))
    }
}

/// A weight's ggml block codes, row-major over `[N, K]` with one scale (and minimum) per 32
/// inputs: `w[o, i] = code[o, i] * scale[g] (+ min[g])`, `g = (o * K + i) / 32`, each
/// operation rounded to float32 (see [`PanelWeight::from_codes`]).
#[derive(Debug, Clone, Copy)]
pub enum BlockCodes<'a> {
    /// 4-bit codes `0..=15`, one per byte, with scales and minima (Q4_1's blocks).
    Q4 {
        /// `N * K` codes.
        codes: &'a [u8],
        /// `N * K / 32` scales.
        scale: &'a [f32],
        /// `N * K / 32` minima.
        min: &'a [f32],
    },
    /// Signed 8-bit codes with scales (Q8_0's blocks).
    Q8 {
        /// `N * K` codes.
        codes: &'a [i8],
        /// `N * K / 32` scales.
        scale: &'a [f32],
    },
}

/// The output and input sizes `(N, K)` of `w` where it can have panels: this CPU runs the
/// kernels, [`decode_panels`] is on, and `w` is a non-empty 2-d float32 or bf16 CPU tensor.
fn panel_operand(w: &Tensor) -> Option<(usize, usize)> {
    let size = w.size();
    let fits = int4_f32_available()
        && decode_panels()
        && w.device() == Device::Cpu
        && matches!(w.kind(), Kind::Float | Kind::BFloat16)
        && size.len() == 2
        && !size.contains(&0);
    fits.then(|| (size[0] as usize, size[1] as usize))
}

impl BlockCodes<'_> {
    /// How many codes there are.
    fn len(&self) -> usize {
        match self {
            BlockCodes::Q4 { codes, .. } => codes.len(),
            BlockCodes::Q8 { codes, .. } => codes.len(),
        }
    }

    /// Code `at` as a float (exact).
    fn code(&self, at: usize) -> f32 {
        match self {
            BlockCodes::Q4 { codes, .. } => f32::from(codes[at]),
            BlockCodes::Q8 { codes, .. } => f32::from(codes[at]),
        }
    }
}

/// `wt` (float32, contiguous, its values `values`) in bf16 when every value is a bf16 value
/// (its low 16 bits are zero), else in f16 when every value is an f16 value (converting back
/// gives the same bits), else `None`; with the kind. For f16 the first 4096 values are checked
/// first, so most float32 weights are turned down without converting them all.
fn half_width_copy(wt: &Tensor, values: &[f32]) -> Result<Option<(Kind, Tensor)>> {
    if values.iter().all(|v| v.to_bits() & 0xffff == 0) {
        return Ok(Some((Kind::BFloat16, wt.f_to_kind(Kind::BFloat16)?)));
    }
    let round_trips = |t: &Tensor, half: &Tensor| -> Result<bool> {
        Ok(half
            .f_to_kind(Kind::Float)?
            .f_eq_tensor(t)?
            .f_all()?
            .int64_value(&[])
            != 0)
    };
    let head = Tensor::f_from_slice(&values[..values.len().min(4096)])?;
    if !round_trips(&head, &head.f_to_kind(Kind::Half)?)? {
        return Ok(None);
    }
    let half = wt.f_to_kind(Kind::Half)?;
    Ok(round_trips(wt, &half)?.then_some((Kind::Half, half)))
}

/// Copy the contiguous `[K, N]` matrix `wt` into panels `dst` (zeroed, `n.div_ceil(32) * k *
/// 32` values; see [`PanelWeight`]).
fn fill_panels<E: Copy>(wt: &[E], dst: &mut [E], n: usize, k: usize) {
    for p in 0..n.div_ceil(PANEL) {
        let j = p * PANEL;
        let width = (n - j).min(PANEL);
        for kk in 0..k {
            let at = (p * k + kk) * PANEL;
            dst[at..at + width].copy_from_slice(&wt[kk * n + j..kk * n + j + width]);
        }
    }
}

/// `x @ w.T + bias` in bf16 for 1 to [`INT4_F32_MAX_ROWS`] rows, where `w` `[N, K]` is a
/// contiguous bf16 matrix and `K` a multiple of 16: each weight row is streamed once for all
/// rows, widened to float32 and accumulated in fused multiply-adds, the bias added in float32
/// and the sum rounded once to bf16, as libtorch's bf16 `linear` does (only the summation order
/// differs). libtorch's bf16 GEMV read the weight at 15-23 GB/s on the session-5 Intel Xeon
/// (no AMX; 25-90 GB/s for float32), so bf16 decoding was bound by it. `None`
/// where it does not apply (other kinds or layouts, more rows, gradients, no AVX-512F).
pub fn linear_bf16_small(x: &Tensor, w: &Tensor, bias: Option<&Tensor>) -> Result<Option<Tensor>> {
    let ws = w.size();
    if !int4_f32_available()
        || !plain_cpu(x)
        || !plain_cpu(w)
        || x.kind() != Kind::BFloat16
        || w.kind() != Kind::BFloat16
        || ws.len() != 2
        || !w.is_contiguous()
        || x.size().last().copied() != Some(ws[1])
        || ws[1] == 0
        || ws[1] % 16 != 0
        || bias.is_some_and(|b| {
            !plain_cpu(b) || b.kind() != Kind::BFloat16 || b.size() != [ws[0]] || !b.is_contiguous()
        })
    {
        return Ok(None);
    }
    let (n, k) = (ws[0] as usize, ws[1] as usize);
    let rows = x.numel() / k;
    if !(1..=INT4_F32_MAX_ROWS).contains(&rows) {
        return Ok(None);
    }
    let x = x.f_contiguous()?;
    let out = output_for(&x, n, Kind::BFloat16)?;
    #[cfg(target_arch = "x86_64")]
    // SAFETY: `w` is a contiguous `[N, K]` bf16 CPU matrix, `bias` (checked above) `N` bf16
    // values, `x` holds `rows * k` bf16 values and `out`, fresh, `rows * n`; threads write
    // disjoint output ranges and are joined before `out` is returned.
    unsafe {
        let xf = AlignedF32::widened(elements::<u16>(&x));
        let xs = xf.as_slice();
        let wb = elements::<u16>(w);
        let bs = bias.map(|b| elements::<u16>(b));
        let ys = OutPtr(elements_mut::<u16>(&out).as_mut_ptr());
        let run = |r: std::ops::Range<usize>| {
            // Capture the whole `OutPtr` (Send), not its raw-pointer field.
            #[allow(clippy::redundant_locals)]
            let ys = ys;
            // Four outputs at a time while the accumulators fit in registers, else two.
            with_rows!(rows, M => if M <= 2 {
                avx512::gemv_bf16::<M, 4>(xs, wb, bs, ys.0, n, k, r.start, r.end)
            } else {
                avx512::gemv_bf16::<M, 2>(xs, wb, bs, ys.0, n, k, r.start, r.end)
            })
        };
        // Output blocks of 16 rows of `w`.
        omp::split(n, 16, rows * n * k, &run);
    }
    Ok(Some(out))
}

/// Run a closure on every thread of libtorch's OpenMP team (GNU libgomp, which the PyTorch
/// builds tch links load) as one parallel region, so the kernels share libtorch's threads instead
/// of competing with them: a second thread pool loses its core to libgomp's spin-waiting workers
/// (measured: a rayon split of the int4 kernel was 10-25 % slower than one thread). The entry
/// points are looked up at run time; without them the closure runs once, on the calling thread.
mod omp {
    use std::ffi::{c_char, c_int, c_uint, c_void};
    use std::ops::Range;
    use std::sync::OnceLock;

    type Body = unsafe extern "C" fn(*mut c_void);
    type Parallel = unsafe extern "C" fn(Body, *mut c_void, c_uint, c_uint);
    type Query = unsafe extern "C" fn() -> c_int;

    extern "C" {
        fn dlsym(handle: *mut c_void, symbol: *const c_char) -> *mut c_void;
    }

    struct Gomp {
        parallel: Parallel,
        thread_num: Query,
        num_threads: Query,
    }

    fn gomp() -> Option<&'static Gomp> {
        static GOMP: OnceLock<Option<Gomp>> = OnceLock::new();
        GOMP.get_or_init(|| {
            // SAFETY: `dlsym(RTLD_DEFAULT = NULL, name)` searches the loaded objects; the
            // symbols, when present, are libgomp's public entry points with these signatures.
            unsafe {
                let find =
                    |name: &[u8]| dlsym(std::ptr::null_mut(), name.as_ptr() as *const c_char);
                let (p, t, n) = (
                    find(b"GOMP_parallel\0"),
                    find(b"omp_get_thread_num\0"),
                    find(b"omp_get_num_threads\0"),
                );
                if p.is_null() || t.is_null() || n.is_null() {
                    return None;
                }
                Some(Gomp {
                    parallel: std::mem::transmute::<*mut c_void, Parallel>(p),
                    thread_num: std::mem::transmute::<*mut c_void, Query>(t),
                    num_threads: std::mem::transmute::<*mut c_void, Query>(n),
                })
            }
        })
        .as_ref()
    }

    struct Job<'a> {
        f: &'a (dyn Fn(usize, usize) + Sync),
        gomp: &'static Gomp,
    }

    unsafe extern "C" fn body(data: *mut c_void) {
        // SAFETY: `data` is the `Job` that `parallel` keeps alive until the region ends.
        let job = unsafe { &*(data as *const Job<'_>) };
        // SAFETY: libgomp's thread queries, called inside its parallel region.
        let (t, n) = unsafe { ((job.gomp.thread_num)(), (job.gomp.num_threads)()) };
        // A panic must not unwind into C; the kernels do not panic, so this is a last resort.
        if std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            (job.f)(t.max(0) as usize, n.max(1) as usize)
        }))
        .is_err()
        {
            std::process::abort();
        }
    }

    /// Kernel calls of at least this many multiply-adds split across the team.
    const PARALLEL_MACS: usize = 1 << 18;

    /// `f(range)` over `0..len` split into one range per team thread, each a whole number of
    /// `unit`s (except at the end), when `macs` (the call's multiply-adds) is large enough;
    /// otherwise `f(0..len)` on the calling thread.
    pub(super) fn split(len: usize, unit: usize, macs: usize, f: &(dyn Fn(Range<usize>) + Sync)) {
        if len < 2 || macs < PARALLEL_MACS {
            return f(0..len);
        }
        parallel(&|t: usize, threads: usize| {
            let per = len.div_ceil(unit).div_ceil(threads.max(1)) * unit;
            let from = (t * per).min(len);
            let to = (from + per).min(len);
            if from < to {
                f(from..to);
            }
        });
    }

    /// `f(thread, threads)` once on each thread of the team (`thread` in `0..threads`); returns
    /// when all have finished.
    fn parallel(f: &(dyn Fn(usize, usize) + Sync)) {
        let Some(gomp) = gomp() else {
            return f(0, 1);
        };
        let job = Job { f, gomp };
        // SAFETY: `GOMP_parallel(fn, data, 0 = the default team size, 0)` runs `fn(data)` on
        // each team thread and joins them before returning, so `job` outlives every use.
        unsafe { (gomp.parallel)(body, &job as *const Job<'_> as *mut c_void, 0, 0) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buffers_start_on_a_cache_line_and_keep_their_values() {
        for len in [0, 1, 15, 16, 17, 577, 8 * 1536] {
            let value = |i: usize| (i % 32) as f32 - 3.5; // exact in bf16
            let bits: Vec<u16> = (0..len).map(|i| bf16_bits(value(i))).collect();
            let buf = AlignedF32::widened(&bits);
            let s = buf.as_slice();
            assert_eq!(s.len(), len);
            assert_eq!(s.as_ptr() as usize % 64, 0, "len {len}");
            for (i, v) in s.iter().enumerate() {
                assert_eq!(*v, value(i));
            }
            let filled = AlignedF32::filled(len, f32::NEG_INFINITY);
            assert!(filled.as_slice().iter().all(|v| *v == f32::NEG_INFINITY));
        }
    }

    /// The attention kernel's transposing reduction: lane `i` is the sum of vector `i`. Inputs
    /// are small integers, so every association gives the exact sum (tolerance 0).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn sum_lanes16_puts_each_vectors_sum_in_its_lane() {
        if !int4_f32_available() {
            return;
        }
        let vals: Vec<[f32; 16]> = (0..16)
            .map(|i| std::array::from_fn(|j| ((i * 7 + j * 13) % 23) as f32 - 11.0))
            .collect();
        // SAFETY: AVX-512F checked above; each array is 16 readable floats.
        let got: [f32; 16] = unsafe {
            use std::arch::x86_64::*;
            let v: [__m512; 16] = std::array::from_fn(|i| _mm512_loadu_ps(vals[i].as_ptr()));
            let mut out = [0f32; 16];
            _mm512_storeu_ps(out.as_mut_ptr(), avx512::sum_lanes16(&v));
            out
        };
        for (i, row) in vals.iter().enumerate() {
            assert_eq!(got[i], row.iter().sum::<f32>(), "lane {i}");
        }
    }
}
