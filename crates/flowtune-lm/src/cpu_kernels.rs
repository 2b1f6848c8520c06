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
//! vectorises (an AVX-512 and an AVX2 build, chosen at run time); attention is written in
//! AVX-512F intrinsics. Measured on the development CPU (release build, bf16, SmolLM2 shapes,
//! 264 cached keys): RMSNorm of one row 1.1 µs against 16–25 µs, attention 17–19 µs against
//! 100–140 µs at batch 1 and 137–141 µs against 230–360 µs at batch 8.
use std::sync::atomic::{AtomicBool, Ordering};

use tch::{Device, Kind, Tensor};

use crate::Result;

/// RMSNorm of at most this many rows runs here (above it libtorch's threaded kernels win).
pub const RMS_NORM_MAX_ROWS: i64 = 64;

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
    if !ENABLED.load(Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Define `$name` running `body` compiled for AVX-512 when the CPU has it, else for AVX2 (the
/// body is inlined into each version). Callers check [`available`] first.
macro_rules! multiversion {
    ($name:ident, fn($($arg:ident: $ty:ty),*) $body:block) => {
        fn $name($($arg: $ty),*) {
            #[inline(always)]
            fn generic($($arg: $ty),*) $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx2,fma")]
                unsafe fn avx512($($arg: $ty),*) { generic($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
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
    let mut row = vec![0f32; h];
    let wf: Vec<f32> = w.iter().map(|&b| bf16_value(b)).collect();
    for (xr, or) in x.chunks_exact(h).zip(out.chunks_exact_mut(h)) {
        widen(xr, &mut row);
        let inv = 1.0 / (dot(&row, &row) / h as f32 + eps).sqrt();
        for ((o, &v), &g) in or.iter_mut().zip(&row).zip(&wf) {
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

/// RMSNorm over the last dimension as HF's `LlamaRMSNorm` computes it (mean of squares and
/// the scaling in f32, the normalised value cast to the model dtype before the weight product),
/// for bf16 or f32 CPU inputs of at most [`RMS_NORM_MAX_ROWS`] rows; `None` otherwise.
pub fn rms_norm(x: &Tensor, weight: &Tensor, eps: f64) -> Result<Option<Tensor>> {
    let kind = x.kind();
    let h = x.size().last().copied().unwrap_or(0);
    if !available()
        || !plain_cpu(x)
        || !plain_cpu(weight)
        || weight.kind() != kind
        || !matches!(kind, Kind::BFloat16 | Kind::Float)
        || h == 0
        || weight.size() != [h]
        || x.numel() as i64 / h > RMS_NORM_MAX_ROWS
    {
        return Ok(None);
    }
    let x = x.f_contiguous()?;
    let weight = weight.f_contiguous()?;
    let out = Tensor::f_empty(x.size(), (kind, Device::Cpu))?;
    let h = h as usize;
    // SAFETY: all three are contiguous CPU tensors of `kind` (bf16 = u16 bits, f32 = f32); `out`
    // was just allocated and is not shared.
    unsafe {
        match kind {
            Kind::BFloat16 => rms_norm_bf16_rows(
                elements::<u16>(&x),
                elements::<u16>(&weight),
                elements_mut::<u16>(&out),
                h,
                eps as f32,
            ),
            _ => rms_norm_f32_rows(
                elements::<f32>(&x),
                elements::<f32>(&weight),
                elements_mut::<f32>(&out),
                h,
                eps as f32,
            ),
        }
    }
    Ok(Some(out))
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

/// The shapes of one decode-attention call.
#[derive(Clone, Copy)]
struct AttnShape {
    q: View4,
    k: View4,
    v: View4,
    hd: usize,
    group: usize,
    scale: f32,
}

/// Whether the attention kernel runs on this CPU (x86-64 with AVX-512F).
fn attention_available() -> bool {
    if !ENABLED.load(Ordering::Relaxed) {
        return false;
    }
    #[cfg(target_arch = "x86_64")]
    {
        std::arch::is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    //! The attention kernel's inner loops in AVX-512F intrinsics (16 f32 lanes).
    use std::arch::x86_64::*;

    use super::AttnShape;

    /// 16 bf16 values (bits) at `p` widened to f32.
    #[inline(always)]
    unsafe fn load_bf16(p: *const u16) -> __m512 {
        // SAFETY (all functions here): callers pass pointers to at least 16 readable values
        // and run on a CPU with AVX-512F (checked by `attention_available`).
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
                _mm512_fmadd_ps(xc, _mm512_set1_ps(std::f32::consts::LOG2_E), _mm512_set1_ps(0.5)),
            );
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693_359_4), xc);
            let r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.121_944_4e-4), r);
            let mut p = _mm512_set1_ps(1.987_569_1e-4);
            for c in [1.398_199_9e-3, 8.333_452e-3, 4.166_579_6e-2, 1.666_666_5e-1, 5.000_000_1e-1] {
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

    /// The kernel (see `super::decode_attention`); `hd` is a multiple of 16.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn attention_bf16(
        q: &[u16],
        k: &[u16],
        v: &[u16],
        mask: Option<&[bool]>,
        out: &mut [u16],
        s: AttnShape,
    ) {
        let (hd, group, l) = (s.hd, s.group, s.k.l);
        let chunks = hd / 16;
        let padded = l.div_ceil(16) * 16;
        let mut qf = vec![0f32; group * hd];
        let mut scores = vec![f32::NEG_INFINITY; group * padded];
        let mut acc = vec![0f32; group * hd];
        let scale = _mm512_set1_ps(s.scale);
        // SAFETY: every offset below comes from the views' sizes and strides, which
        // `decode_attention` checked against the slices' extents; rows have `hd` elements.
        unsafe {
            for b in 0..s.k.b {
                for kvh in 0..s.k.h {
                    for g in 0..group {
                        // Lanes past the last key take no part in the soft-max.
                        scores[g * padded + l..(g + 1) * padded].fill(f32::NEG_INFINITY);
                        let at = s.q.at(b, kvh * group + g, 0);
                        for (d, x) in qf[g * hd..(g + 1) * hd].iter_mut().zip(&q[at..at + hd]) {
                            *d = super::bf16_value(*x);
                        }
                    }
                    for j in 0..l {
                        if mask.is_some_and(|m| !m[b * l + j]) {
                            for g in 0..group {
                                scores[g * padded + j] = f32::NEG_INFINITY;
                            }
                            continue;
                        }
                        let kp = k.as_ptr().add(s.k.at(b, kvh, j));
                        for g in 0..group {
                            let qp = qf.as_ptr().add(g * hd);
                            let mut a = _mm512_setzero_ps();
                            for c in 0..chunks {
                                a = _mm512_fmadd_ps(
                                    _mm512_loadu_ps(qp.add(c * 16)),
                                    load_bf16(kp.add(c * 16)),
                                    a,
                                );
                            }
                            scores[g * padded + j] = _mm512_reduce_add_ps(a);
                        }
                    }
                    for g in 0..group {
                        let row = &mut scores[g * padded..(g + 1) * padded];
                        // Scores rounded to bf16 (the reference's bf16 product), then scaled.
                        let mut mx = _mm512_set1_ps(f32::NEG_INFINITY);
                        for c in 0..padded / 16 {
                            let p = row.as_mut_ptr().add(c * 16);
                            let x = _mm512_mul_ps(round_bf16(_mm512_loadu_ps(p)), scale);
                            _mm512_storeu_ps(p, x);
                            mx = _mm512_max_ps(mx, x);
                        }
                        let max = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
                        let mut sum = _mm512_setzero_ps();
                        for c in 0..padded / 16 {
                            let p = row.as_mut_ptr().add(c * 16);
                            let e = exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(p), max));
                            _mm512_storeu_ps(p, e);
                            sum = _mm512_add_ps(sum, e);
                        }
                        let inv = _mm512_set1_ps(1.0 / _mm512_reduce_add_ps(sum));
                        for c in 0..padded / 16 {
                            let p = row.as_mut_ptr().add(c * 16);
                            _mm512_storeu_ps(p, round_bf16(_mm512_mul_ps(_mm512_loadu_ps(p), inv)));
                        }
                    }
                    acc.iter_mut().for_each(|a| *a = 0.0);
                    for j in 0..l {
                        let vp = v.as_ptr().add(s.v.at(b, kvh, j));
                        for g in 0..group {
                            let p = scores[g * padded + j];
                            if p == 0.0 {
                                continue;
                            }
                            let pv = _mm512_set1_ps(p);
                            let ap = acc.as_mut_ptr().add(g * hd);
                            for c in 0..chunks {
                                let a = ap.add(c * 16);
                                _mm512_storeu_ps(
                                    a,
                                    _mm512_fmadd_ps(pv, load_bf16(vp.add(c * 16)), _mm512_loadu_ps(a)),
                                );
                            }
                        }
                    }
                    for g in 0..group {
                        let at = (b * s.q.h + kvh * group + g) * hd;
                        for (o, a) in out[at..at + hd].iter_mut().zip(&acc[g * hd..(g + 1) * hd]) {
                            *o = super::bf16_bits(*a);
                        }
                    }
                }
            }
        }
    }
}

/// Attention for one query per row in bf16 on the CPU, with the rounding points of HF's eager
/// attention (scores `q·k` rounded to bf16, scaled and soft-maxed in f32, probabilities rounded
/// to bf16, the product with `v` accumulated in f32). `q` is `[B, nq, 1, hd]`, `k`/`v` are
/// `[B, nkv, L, hd]` views (e.g. of a KV cache) whose rows of `hd` are contiguous, `mask`
/// `[B, 1, 1, L]` bool (true = visible) or `None`. Query head `h` reads key/value head
/// `h / (nq / nkv)`. Returns `[B, nq, 1, hd]`, or `None` where the kernel does not apply.
pub fn decode_attention(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    mask: Option<&Tensor>,
) -> Result<Option<Tensor>> {
    let all = [q, k, v];
    if !attention_available() || all.iter().any(|t| !plain_cpu(t) || t.kind() != Kind::BFloat16) {
        return Ok(None);
    }
    let (Some(qv), Some(kv), Some(vv)) = (View4::of(q), View4::of(k), View4::of(v)) else {
        return Ok(None);
    };
    let hd = q.size()[3] as usize;
    if qv.l != 1
        || k.size()[3] as usize != hd
        || v.size()[3] as usize != hd
        || kv.b != qv.b
        || vv.b != qv.b
        || kv.h == 0
        || vv.h != kv.h
        || vv.l != kv.l
        || kv.l == 0
        || qv.h % kv.h != 0
        || hd % 16 != 0
    {
        return Ok(None);
    }
    let mask = match mask {
        Some(m) => {
            if !plain_cpu(m) || m.kind() != Kind::Bool || m.numel() != qv.b * kv.l {
                return Ok(None);
            }
            Some(m.f_contiguous()?)
        }
        None => None,
    };
    let shape = AttnShape {
        q: qv,
        k: kv,
        v: vv,
        hd,
        group: qv.h / kv.h,
        scale: 1.0 / (hd as f32).sqrt(),
    };
    let out = Tensor::f_empty([qv.b as i64, qv.h as i64, 1, hd as i64], (Kind::BFloat16, Device::Cpu))?;
    // SAFETY: q, k and v are CPU bf16 tensors (u16 bits); the slices start at each tensor's
    // first element and span its furthest element (`View4::extent`), which lies inside its
    // storage because the view's sizes and non-negative strides describe elements of it. The
    // mask is a contiguous bool tensor (one byte per element, 0 or 1) and `out` is fresh.
    unsafe {
        let span = |t: &Tensor, view: &View4| -> &[u16] {
            std::slice::from_raw_parts(t.data_ptr() as *const u16, view.extent(hd))
        };
        #[cfg(target_arch = "x86_64")]
        avx512::attention_bf16(
            span(q, &qv),
            span(k, &kv),
            span(v, &vv),
            mask.as_ref().map(|m| elements::<bool>(m)),
            elements_mut::<u16>(&out),
            shape,
        );
    }
    Ok(Some(out))
}
