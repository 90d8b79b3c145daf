//! Memory-bound kernels of the network layers (BatchNorm statistics and application, ReLU, max
//! pooling), dispatched per instruction set like the convolution kernels.
//!
//! The crate is compiled for baseline x86-64, where the compiler may only auto-vectorize with
//! SSE2. These bodies are plain loops written to vectorize; compiled inside the dispatcher's
//! `#[target_feature]` functions they become AVX-512 or AVX2 code. Sums keep several
//! independent vector accumulators (so they vectorize and stay accurate over a plane) and are
//! combined across planes in f64 by the callers.

// Loop kernels take the vector type only to be instantiated once per instruction set by
// `simd_dispatch!`; their bodies are auto-vectorized inside the `#[target_feature]` wrapper.
#![allow(clippy::extra_unused_type_parameters)]

use super::simd::{Isa, SimdF32};

/// Σ v.
pub fn sum(isa: Isa, v: &[f32]) -> f32 {
    let mut out = [0.0];
    sum_dispatch(isa, v, 0.0, &mut out);
    out[0]
}

/// Σ (v − center)².
pub fn sum_sq_dev(isa: Isa, v: &[f32], center: f32) -> f32 {
    let mut out = [0.0];
    sum_sq_dispatch(isa, v, center, &mut out);
    out[0]
}

/// A ReLU applied to `x·scale + shift` (BatchNorm's output, the ReLU fused into it): the
/// backward kernels recompute where it passed the gradient from `x` rather than reading the
/// stored output — the same product and sum as [`scale_shift`], so the same sign, bit for bit
/// — which saves reading one activation-sized tensor per pass (the MNIST network's BatchNorm
/// backward reads its tensors from memory: two of its seven streams).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ReluOfAffine {
    /// Scale of the affine map the ReLU followed.
    pub scale: f32,
    /// Shift of the affine map the ReLU followed.
    pub shift: f32,
}

/// `(Σ g, Σ g·(x − center))` with `g = gy`, or `gy` where `x·scale + shift > 0` (the gradient
/// through the ReLU `relu`): BatchNorm's two backward sums in one pass over the planes.
pub fn grad_sums(
    isa: Isa,
    gy: &[f32],
    relu: Option<ReluOfAffine>,
    x: &[f32],
    center: f32,
) -> (f32, f32) {
    let mut out = [0.0; 2];
    match relu {
        Some(r) => grad_sums_relu_dispatch(isa, gy, r, x, center, &mut out),
        None => grad_sums_dispatch(isa, gy, x, center, &mut out),
    }
    (out[0], out[1])
}

crate::simd_dispatch!(fn sum_dispatch => sum_kernel(v: &[f32], center: f32, out: &mut [f32; 1]));
crate::simd_dispatch!(fn grad_sums_dispatch => grad_sums_kernel(
    gy: &[f32], x: &[f32], center: f32, out: &mut [f32; 2]
));
crate::simd_dispatch!(fn grad_sums_relu_dispatch => grad_sums_relu_kernel(
    gy: &[f32], relu: ReluOfAffine, x: &[f32], center: f32, out: &mut [f32; 2]
));

#[inline(always)]
unsafe fn grad_sums_kernel<S: SimdF32>(gy: &[f32], x: &[f32], center: f32, out: &mut [f32; 2]) {
    let n = gy.len().min(x.len());
    let c = unsafe { S::splat(-center) };
    unsafe {
        reduce::<S, 2>(
            n,
            out,
            |i| {
                let g = S::load(gy.as_ptr().add(i));
                [g, g.mul(S::load(x.as_ptr().add(i)).add(c))]
            },
            |i| [gy[i], gy[i] * (x[i] - center)],
        )
    }
}

#[inline(always)]
unsafe fn grad_sums_relu_kernel<S: SimdF32>(
    gy: &[f32],
    relu: ReluOfAffine,
    x: &[f32],
    center: f32,
    out: &mut [f32; 2],
) {
    let n = gy.len().min(x.len());
    let (c, scale, shift) = unsafe {
        (
            S::splat(-center),
            S::splat(relu.scale),
            S::splat(relu.shift),
        )
    };
    unsafe {
        reduce::<S, 2>(
            n,
            out,
            |i| {
                let v = S::load(x.as_ptr().add(i));
                // Multiply then add, as `scale_shift` computed the output (no fused rounding).
                let g = S::load(gy.as_ptr().add(i)).keep_where_positive(v.mul(scale).add(shift));
                [g, g.mul(v.add(c))]
            },
            |i| {
                let g = if x[i] * relu.scale + relu.shift > 0.0 {
                    gy[i]
                } else {
                    0.0
                };
                [g, g * (x[i] - center)]
            },
        )
    }
}

crate::simd_dispatch!(fn sum_sq_dispatch => sum_sq_kernel(v: &[f32], center: f32, out: &mut [f32; 1]));

/// Accumulator blocks per reduction: 4 vectors in flight hide the add latency.
const ACC: usize = 4;

/// `out[m] = Σ_i term_m(i)` for `N` sums at once over `0 .. n`: vector terms from `term(i)`
/// (lanes i ..), `ACC` accumulators per sum, single vectors, then scalar terms for the tail.
#[inline(always)]
unsafe fn reduce<S: SimdF32, const N: usize>(
    n: usize,
    out: &mut [f32; N],
    mut term: impl FnMut(usize) -> [S; N],
    scalar: impl Fn(usize) -> [f32; N],
) {
    let l = S::LANES;
    let mut acc = [[unsafe { S::zero() }; ACC]; N];
    let mut i = 0;
    while i + ACC * l <= n {
        for q in 0..ACC {
            for (a, t) in acc.iter_mut().zip(term(i + q * l)) {
                a[q] = unsafe { a[q].add(t) };
            }
        }
        i += ACC * l;
    }
    // Single vectors next: planes of a few dozen elements (7×7) should not end up scalar.
    while i + l <= n {
        for (a, t) in acc.iter_mut().zip(term(i)) {
            a[0] = unsafe { a[0].add(t) };
        }
        i += l;
    }
    for (o, a) in out.iter_mut().zip(&acc) {
        *o = unsafe { a[0].add(a[1]).add(a[2].add(a[3])).reduce_sum() };
    }
    while i < n {
        for (o, t) in out.iter_mut().zip(scalar(i)) {
            *o += t;
        }
        i += 1;
    }
}

#[inline(always)]
unsafe fn sum_kernel<S: SimdF32>(v: &[f32], _center: f32, out: &mut [f32; 1]) {
    unsafe { reduce::<S, 1>(v.len(), out, |i| [S::load(v.as_ptr().add(i))], |i| [v[i]]) }
}

#[inline(always)]
unsafe fn sum_sq_kernel<S: SimdF32>(v: &[f32], center: f32, out: &mut [f32; 1]) {
    let c = unsafe { S::splat(-center) };
    unsafe {
        reduce::<S, 1>(
            v.len(),
            out,
            |i| {
                let d = S::load(v.as_ptr().add(i)).add(c);
                [d.mul(d)]
            },
            |i| [(v[i] - center) * (v[i] - center)],
        )
    }
}

/// `y = x·scale + shift`, then max(·, 0) if `relu`.
pub fn scale_shift(isa: Isa, x: &[f32], scale: f32, shift: f32, relu: bool, y: &mut [f32]) {
    scale_shift_dispatch(isa, x, scale, shift, relu, y)
}

crate::simd_dispatch!(fn scale_shift_dispatch => scale_shift_kernel(x: &[f32], scale: f32, shift: f32, relu: bool, y: &mut [f32]));

#[inline(always)]
unsafe fn scale_shift_kernel<S: SimdF32>(
    x: &[f32],
    scale: f32,
    shift: f32,
    relu: bool,
    y: &mut [f32],
) {
    if relu {
        for (o, &v) in y.iter_mut().zip(x) {
            let t = v * scale + shift;
            *o = if t < 0.0 { 0.0 } else { t };
        }
    } else {
        for (o, &v) in y.iter_mut().zip(x) {
            *o = v * scale + shift;
        }
    }
}

/// BatchNorm input gradient: `gx = k·(gy − mean_gy − (x − mu)·is·mean_gx̂)`; through a fused
/// ReLU `relu`, `gy` counts only where `x·scale + shift > 0`.
pub fn batchnorm_grad_input(
    isa: Isa,
    gy: &[f32],
    relu: Option<ReluOfAffine>,
    x: &[f32],
    coef: [f32; 5],
    gx: &mut [f32],
) {
    match relu {
        None => bn_grad_dispatch(isa, gy, x, coef, gx),
        Some(r) => bn_grad_relu_dispatch(isa, gy, r, x, coef, gx),
    }
}

crate::simd_dispatch!(fn bn_grad_relu_dispatch => bn_grad_relu_kernel(gy: &[f32], relu: ReluOfAffine, x: &[f32], coef: [f32; 5], gx: &mut [f32]));

#[inline(always)]
unsafe fn bn_grad_relu_kernel<S: SimdF32>(
    gy: &[f32],
    relu: ReluOfAffine,
    x: &[f32],
    coef: [f32; 5],
    gx: &mut [f32],
) {
    let [k, mean_gy, mu, is, mean_gxhat] = coef;
    let slope = is * mean_gxhat;
    let ReluOfAffine { scale, shift } = relu;
    for ((o, &g), &v) in gx.iter_mut().zip(gy).zip(x) {
        let g = if v * scale + shift > 0.0 { g } else { 0.0 };
        *o = k * (g - mean_gy - (v - mu) * slope);
    }
}

crate::simd_dispatch!(fn bn_grad_dispatch => bn_grad_kernel(gy: &[f32], x: &[f32], coef: [f32; 5], gx: &mut [f32]));

#[inline(always)]
unsafe fn bn_grad_kernel<S: SimdF32>(gy: &[f32], x: &[f32], coef: [f32; 5], gx: &mut [f32]) {
    let [k, mean_gy, mu, is, mean_gxhat] = coef;
    let slope = is * mean_gxhat;
    for ((o, &g), &v) in gx.iter_mut().zip(gy).zip(x) {
        *o = k * (g - mean_gy - (v - mu) * slope);
    }
}

/// ReLU: `y = max(x, 0)`, keeping NaN.
pub fn relu(isa: Isa, x: &[f32], y: &mut [f32]) {
    relu_dispatch(isa, x, y)
}

/// ReLU backward: `gx = gy` where `y > 0`, else 0.
pub fn relu_backward(isa: Isa, y: &[f32], gy: &[f32], gx: &mut [f32]) {
    relu_backward_dispatch(isa, y, gy, gx)
}

crate::simd_dispatch!(fn relu_dispatch => relu_kernel(x: &[f32], y: &mut [f32]));
crate::simd_dispatch!(fn relu_backward_dispatch => relu_backward_kernel(y: &[f32], gy: &[f32], gx: &mut [f32]));

#[inline(always)]
unsafe fn relu_kernel<S: SimdF32>(x: &[f32], y: &mut [f32]) {
    for (o, &v) in y.iter_mut().zip(x) {
        // Not `v.max(0.0)`, which maps NaN to 0: a diverging run must stay visible.
        *o = if v < 0.0 { 0.0 } else { v };
    }
}

#[inline(always)]
unsafe fn relu_backward_kernel<S: SimdF32>(y: &[f32], gy: &[f32], gx: &mut [f32]) {
    for ((o, &g), &v) in gx.iter_mut().zip(gy).zip(y) {
        *o = if v > 0.0 { g } else { 0.0 };
    }
}

/// 2×2 stride-2 max pooling of one `h`×`w` plane (floor mode): output values and, per output,
/// the window position of the maximum (0..4, row-major; the first maximum wins ties; NaN wins).
pub fn maxpool2x2(isa: Isa, x: &[f32], w: usize, y: &mut [f32], arg: &mut [u8]) {
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `isa` is supported (checked by `Exec`).
        unsafe { maxpool2x2_avx512(x, w, y, arg) };
        return;
    }
    maxpool2x2_dispatch(isa, x, w, y, arg)
}

/// The mask of the first `n` of 16 lanes (all of them from 16 on): the masked loads and stores
/// of the AVX-512 kernels below at row ends and plane ends.
#[cfg(target_arch = "x86_64")]
fn first_lanes(n: usize) -> u16 {
    if n >= 16 {
        u16::MAX
    } else {
        ((1u32 << n) - 1) as u16
    }
}

/// AVX-512 version of [`maxpool2x2`]: up to 16 windows at a time, deinterleaving even and odd
/// columns with permutes; masked loads and stores cover row ends and narrow planes (MNIST's
/// rows are 14 windows wide).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn maxpool2x2_avx512(x: &[f32], w: usize, y: &mut [f32], arg: &mut [u8]) {
    use std::arch::x86_64::*;
    let ow = w / 2;
    if ow == 0 {
        return;
    }
    let even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    for ((yr, ar), rows) in y
        .chunks_exact_mut(ow)
        .zip(arg.chunks_exact_mut(ow))
        .zip(x.chunks_exact(2 * w))
    {
        let (r0, r1) = rows.split_at(w);
        let mut c = 0;
        while c < ow {
            let n = (ow - c).min(16);
            let (ml, mh) = (first_lanes(2 * n), first_lanes((2 * n).saturating_sub(16)));
            // SAFETY: the masks limit loads to columns 2c .. 2c + 2n <= 2·ow <= w of each row
            // and stores to outputs c .. c + n <= ow.
            unsafe {
                let p0 = r0.as_ptr().add(2 * c);
                let p1 = r1.as_ptr().add(2 * c);
                let (l0, h0) = (
                    _mm512_maskz_loadu_ps(ml, p0),
                    _mm512_maskz_loadu_ps(mh, p0.add(16)),
                );
                let (l1, h1) = (
                    _mm512_maskz_loadu_ps(ml, p1),
                    _mm512_maskz_loadu_ps(mh, p1.add(16)),
                );
                let cand = [
                    _mm512_permutex2var_ps(l0, even, h0),
                    _mm512_permutex2var_ps(l0, odd, h0),
                    _mm512_permutex2var_ps(l1, even, h1),
                    _mm512_permutex2var_ps(l1, odd, h1),
                ];
                let mut m = cand[0];
                let mut idx = _mm512_setzero_si512();
                for (k, &v) in cand.iter().enumerate().skip(1) {
                    // Take v if it is greater, or if it is NaN and the maximum so far is not.
                    let gt = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, m);
                    let nan = _mm512_cmp_ps_mask::<_CMP_UNORD_Q>(v, v)
                        & _mm512_cmp_ps_mask::<_CMP_ORD_Q>(m, m);
                    let take = gt | nan;
                    m = _mm512_mask_blend_ps(take, m, v);
                    idx = _mm512_mask_blend_epi32(take, idx, _mm512_set1_epi32(k as i32));
                }
                let mo = first_lanes(n);
                _mm512_mask_storeu_ps(yr.as_mut_ptr().add(c), mo, m);
                _mm512_mask_cvtepi32_storeu_epi8(ar.as_mut_ptr().add(c) as *mut i8, mo, idx);
            }
            c += n;
        }
    }
}

crate::simd_dispatch!(fn maxpool2x2_dispatch => maxpool2x2_kernel(x: &[f32], w: usize, y: &mut [f32], arg: &mut [u8]));

#[inline(always)]
unsafe fn maxpool2x2_kernel<S: SimdF32>(x: &[f32], w: usize, y: &mut [f32], arg: &mut [u8]) {
    let ow = w / 2;
    if ow == 0 {
        return;
    }
    for ((yr, ar), rows) in y
        .chunks_exact_mut(ow)
        .zip(arg.chunks_exact_mut(ow))
        .zip(x.chunks_exact(2 * w))
    {
        let (r0, r1) = rows.split_at(w);
        for c in 0..ow {
            let (a, b, d, e) = (r0[2 * c], r0[2 * c + 1], r1[2 * c], r1[2 * c + 1]);
            // Branch-free selects (first maximum wins: later ones must be strictly greater).
            let (mut m, mut i) = (a, 0u8);
            let take = b > m || (b.is_nan() && !m.is_nan());
            m = if take { b } else { m };
            i = if take { 1 } else { i };
            let take = d > m || (d.is_nan() && !m.is_nan());
            m = if take { d } else { m };
            i = if take { 2 } else { i };
            let take = e > m || (e.is_nan() && !m.is_nan());
            m = if take { e } else { m };
            i = if take { 3 } else { i };
            yr[c] = m;
            ar[c] = i;
        }
    }
}

/// Backward of [`maxpool2x2`] for one plane: writes the whole input-gradient plane (gradient at
/// each window's maximum, zero elsewhere, including an odd last row/column).
pub fn maxpool2x2_backward(isa: Isa, gy: &[f32], arg: &[u8], w: usize, gx: &mut [f32]) {
    let ow = w / 2;
    if ow == 0 {
        gx.fill(0.0);
        return;
    }
    // Every element of the covered rows is written by the kernels; only an odd last column and
    // an odd last row lie outside every window (a full clear first was a second pass over gx).
    if w % 2 == 1 {
        for row in gx.chunks_exact_mut(w) {
            row[w - 1] = 0.0;
        }
    }
    let covered = (gy.len() / ow * 2 * w).min(gx.len());
    gx[covered..].fill(0.0);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `isa` is supported (checked by `Exec`).
        unsafe { maxpool2x2_backward_avx512(gy, arg, w, gx) };
        return;
    }
    maxpool2x2_backward_dispatch(isa, gy, arg, w, gx)
}

/// AVX-512 version of [`maxpool2x2_backward`]'s covered rows: 16 windows at a time, each of the
/// four window positions a masked copy of the gradient, interleaved into the two rows with
/// permutes. On the MNIST network's first pool (64 × 32 × 28 × 28, 2 threads): 0.09 ms, where
/// the scalar loop took 0.32 and a first version of this one, copying each chunk's argmax
/// bytes into a buffer (a memcpy call per 14 windows), 0.23.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn maxpool2x2_backward_avx512(gy: &[f32], arg: &[u8], w: usize, gx: &mut [f32]) {
    use std::arch::x86_64::*;
    let ow = w / 2;
    let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let windows = gy.len().min(arg.len()) / ow * ow;
    for (r, (gr, rows)) in gy[..windows]
        .chunks_exact(ow)
        .zip(gx.chunks_exact_mut(2 * w))
        .enumerate()
    {
        let (r0, r1) = rows.split_at_mut(w);
        let mut c = 0;
        while c < ow {
            let n = (ow - c).min(16);
            let at_arg = r * ow + c;
            // Sixteen bytes straight from the plane's argmax where they lie inside it (the
            // lanes past n are masked off below), else through a copy (AVX-512F has no masked
            // byte load).
            let mut bytes = [0u8; 16];
            let src = if at_arg + 16 <= arg.len() {
                arg[at_arg..].as_ptr()
            } else {
                bytes[..n].copy_from_slice(&arg[at_arg..at_arg + n]);
                bytes.as_ptr()
            };
            let (mo, ml, mh) = (
                first_lanes(n),
                first_lanes(2 * n),
                first_lanes((2 * n).saturating_sub(16)),
            );
            // SAFETY: `src` holds 16 readable bytes (checked above); the masks limit loads to
            // windows c .. c + n <= ow and stores to columns 2c .. 2c + 2n <= 2·ow <= w of
            // each row.
            unsafe {
                let g = _mm512_maskz_loadu_ps(mo, gr.as_ptr().add(c));
                let a = _mm512_cvtepu8_epi32(_mm_loadu_si128(src as *const __m128i));
                let at = |k: i32| {
                    _mm512_maskz_mov_ps(_mm512_cmpeq_epi32_mask(a, _mm512_set1_epi32(k)), g)
                };
                for (row, (left, right)) in [(&mut *r0, (at(0), at(1))), (&mut *r1, (at(2), at(3)))]
                {
                    let p = row.as_mut_ptr().add(2 * c);
                    _mm512_mask_storeu_ps(p, ml, _mm512_permutex2var_ps(left, lo, right));
                    _mm512_mask_storeu_ps(p.add(16), mh, _mm512_permutex2var_ps(left, hi, right));
                }
            }
            c += n;
        }
    }
}

crate::simd_dispatch!(fn maxpool2x2_backward_dispatch => maxpool2x2_backward_kernel(gy: &[f32], arg: &[u8], w: usize, gx: &mut [f32]));

/// The covered rows of [`maxpool2x2_backward`] (its caller clears the rest).
#[inline(always)]
unsafe fn maxpool2x2_backward_kernel<S: SimdF32>(gy: &[f32], arg: &[u8], w: usize, gx: &mut [f32]) {
    let ow = w / 2;
    for ((gr, ar), rows) in gy
        .chunks_exact(ow)
        .zip(arg.chunks_exact(ow))
        .zip(gx.chunks_exact_mut(2 * w))
    {
        let (r0, r1) = rows.split_at_mut(w);
        for c in 0..ow {
            let (g, i) = (gr[c], ar[c]);
            r0[2 * c] = if i == 0 { g } else { 0.0 };
            r0[2 * c + 1] = if i == 1 { g } else { 0.0 };
            r1[2 * c] = if i == 2 { g } else { 0.0 };
            r1[2 * c + 1] = if i == 3 { g } else { 0.0 };
        }
    }
}

/// Splits `src` into its even-indexed elements (`even[k] = src[2k]`) and odd-indexed ones
/// (`odd[k] = src[2k + 1]`); `even` and `odd` must hold ⌈n/2⌉ and ⌊n/2⌋ elements.
pub fn deinterleave2(isa: Isa, src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    assert!(even.len() == src.len().div_ceil(2) && odd.len() == src.len() / 2);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `isa` is supported (checked by `Exec`); lengths checked above.
        unsafe { deinterleave2_avx512(src, even, odd) };
        return;
    }
    let _ = isa;
    for (k, e) in even.iter_mut().enumerate() {
        *e = src[2 * k];
    }
    for (k, o) in odd.iter_mut().enumerate() {
        *o = src[2 * k + 1];
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn deinterleave2_avx512(src: &[f32], even: &mut [f32], odd: &mut [f32]) {
    use std::arch::x86_64::*;
    let ie = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
    let io = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
    let n = src.len();
    let mut k = 0;
    while 2 * k < n {
        let rest = n - 2 * k;
        // SAFETY: masks limit loads to src[2k .. n] and stores to even[k ..], odd[k ..] within
        // their lengths (⌈n/2⌉ and ⌊n/2⌋).
        unsafe {
            let lo = _mm512_maskz_loadu_ps(first_lanes(rest), src.as_ptr().add(2 * k));
            let hi = _mm512_maskz_loadu_ps(
                first_lanes(rest.saturating_sub(16)),
                src.as_ptr().add(2 * k + 16),
            );
            _mm512_mask_storeu_ps(
                even.as_mut_ptr().add(k),
                first_lanes(rest.div_ceil(2)),
                _mm512_permutex2var_ps(lo, ie, hi),
            );
            _mm512_mask_storeu_ps(
                odd.as_mut_ptr().add(k),
                first_lanes(rest / 2),
                _mm512_permutex2var_ps(lo, io, hi),
            );
        }
        k += 16;
    }
}

/// The inverse of [`deinterleave2`]: `dst[2k] = even[k]`, `dst[2k + 1] = odd[k]`, for a `dst` of
/// `even.len() + odd.len()` elements (`even` has ⌈n/2⌉, `odd` ⌊n/2⌋).
pub fn interleave2(isa: Isa, even: &[f32], odd: &[f32], dst: &mut [f32]) {
    let n = dst.len();
    assert!(even.len() >= n.div_ceil(2) && odd.len() >= n / 2);
    #[cfg(target_arch = "x86_64")]
    if isa == Isa::Avx512 {
        // SAFETY: `isa` is supported (checked by `Exec`); lengths checked above.
        unsafe { interleave2_avx512(even, odd, dst) };
        return;
    }
    let _ = isa;
    for (i, d) in dst.iter_mut().enumerate() {
        *d = if i % 2 == 0 { even[i / 2] } else { odd[i / 2] };
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn interleave2_avx512(even: &[f32], odd: &[f32], dst: &mut [f32]) {
    use std::arch::x86_64::*;
    let lo_idx = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
    let hi_idx = _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
    let n = dst.len();
    let mut k = 0;
    while 2 * k < n {
        let rest = n - 2 * k;
        // SAFETY: masks limit loads to even[k .. ⌈n/2⌉], odd[k .. ⌊n/2⌋] and stores to
        // dst[2k .. n].
        unsafe {
            let e = _mm512_maskz_loadu_ps(first_lanes(rest.div_ceil(2)), even.as_ptr().add(k));
            let o = _mm512_maskz_loadu_ps(first_lanes(rest / 2), odd.as_ptr().add(k));
            _mm512_mask_storeu_ps(
                dst.as_mut_ptr().add(2 * k),
                first_lanes(rest),
                _mm512_permutex2var_ps(e, lo_idx, o),
            );
            _mm512_mask_storeu_ps(
                dst.as_mut_ptr().add(2 * k + 16),
                first_lanes(rest.saturating_sub(16)),
                _mm512_permutex2var_ps(e, hi_idx, o),
            );
        }
        k += 16;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The one-pass BatchNorm backward sums equal plain f64 sums, masked and not, on every
    /// instruction set, for lengths with and without vector tails.
    #[test]
    fn grad_sums_match_plain_sums() {
        for isa in Isa::available() {
            for n in [1, 15, 16, 49, 64, 196, 1000] {
                let gy: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
                let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
                let relu = ReluOfAffine {
                    scale: 1.5,
                    shift: -0.4,
                };
                let center = 0.25f32;
                for masked in [false, true] {
                    let g = |i: usize| -> f64 {
                        let mut y = vec![0.0; 1];
                        scale_shift(isa, &x[i..=i], relu.scale, relu.shift, true, &mut y);
                        if masked && y[0] <= 0.0 {
                            0.0
                        } else {
                            gy[i] as f64
                        }
                    };
                    let want_s: f64 = (0..n).map(g).sum();
                    let want_sx: f64 = (0..n).map(|i| g(i) * (x[i] - center) as f64).sum();
                    let (s, sx) = grad_sums(isa, &gy, masked.then_some(relu), &x, center);
                    assert!(
                        (s as f64 - want_s).abs() < 1e-4,
                        "{isa} n={n} {masked}: {s} {want_s}"
                    );
                    assert!(
                        (sx as f64 - want_sx).abs() < 1e-4,
                        "{isa} n={n} {masked}: {sx} {want_sx}"
                    );
                }
            }
        }
    }

    /// The BatchNorm input gradient through a fused ReLU equals the formula with the gradient
    /// kept where the forward's output (`scale_shift`) is positive, on every instruction set,
    /// for lengths with and without vector tails; without the ReLU, the plain formula.
    #[test]
    fn batchnorm_grad_input_masks_where_the_forward_output_was_not_positive() {
        let coef = [1.3f32, 0.05, 0.1, 2.0, -0.2];
        let [k, mean_gy, mu, is, mean_gxhat] = coef;
        for isa in Isa::available() {
            for n in [1, 15, 16, 49, 64, 196, 1000] {
                let gy: Vec<f32> = (0..n).map(|i| ((i * 37 % 11) as f32 - 5.0) * 0.1).collect();
                let x: Vec<f32> = (0..n).map(|i| (i as f32 * 0.3).sin()).collect();
                let relu = ReluOfAffine {
                    scale: -0.7,
                    shift: 0.2,
                };
                let mut y = vec![0.0; n];
                scale_shift(isa, &x, relu.scale, relu.shift, true, &mut y);
                for masked in [false, true] {
                    let mut gx = vec![f32::NAN; n];
                    batchnorm_grad_input(isa, &gy, masked.then_some(relu), &x, coef, &mut gx);
                    for i in 0..n {
                        let g = if masked && y[i] <= 0.0 { 0.0 } else { gy[i] };
                        let want = k * (g - mean_gy - (x[i] - mu) * (is * mean_gxhat));
                        assert!((gx[i] - want).abs() < 1e-6, "{isa} n={n} {masked} at {i}");
                    }
                }
            }
        }
    }

    /// The 2 × 2 pooling backward writes every element of the input gradient: the output
    /// gradient at each window's maximum, zeros elsewhere, including an odd last row and column
    /// (the gradient starts as NaN, so an element left unwritten fails).
    #[test]
    fn maxpool_backward_writes_the_whole_plane() {
        for isa in Isa::available() {
            for (h, w) in [
                (4, 6),
                (5, 7),
                (7, 4),
                (3, 1),
                (6, 28),
                (5, 33),
                (4, 64),
                (3, 71),
            ] {
                let x: Vec<f32> = (0..h * w).map(|i| ((i * 29 % 17) as f32).sin()).collect();
                let (oh, ow) = (h / 2, w / 2);
                let (mut y, mut arg) = (vec![0.0; oh * ow], vec![0u8; oh * ow]);
                maxpool2x2(isa, &x[..oh * 2 * w], w, &mut y, &mut arg);
                let gy: Vec<f32> = (0..oh * ow).map(|i| i as f32 + 1.0).collect();
                let mut gx = vec![f32::NAN; h * w];
                maxpool2x2_backward(isa, &gy, &arg, w, &mut gx);
                let mut want = vec![0.0f32; h * w];
                for (o, (&g, &a)) in gy.iter().zip(&arg).enumerate() {
                    let (r, c) = (2 * (o / ow) + a as usize / 2, 2 * (o % ow) + a as usize % 2);
                    want[r * w + c] = g;
                }
                assert_eq!(gx, want, "{isa} {h}×{w}");
            }
        }
    }
}
