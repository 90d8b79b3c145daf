//! The fully connected layer's forward and input gradient: products with a few output
//! features and long rows (the MNIST network's classifier, 6272 → 10 at batch 64), which a
//! general GEMM blocks badly. faer, 2 threads: the forward 127 µs (33 GMAC/s, no faster than on
//! one thread), the input gradient 88 µs.
//!
//! - forward, `y = x · Wᵀ`: each output is the dot product of a row of `x` with a row of `W`;
//!   two rows of `x` against four of `W` at a time keep eight vector accumulators, so each
//!   loaded vector feeds two or four multiply-adds;
//! - input gradient, `gx = gy · W`: a product with K = the output features, the register-blocked
//!   small-K product of the pointwise layers ([`small_k_gemm`]).
//!
//! Both split the batch rows over the threads. Harness, the classifier's shapes, min of 300:
//! forward 127 → 62 µs, input gradient 88–100 → 42 µs on 2 threads (on one, 122 → 123 and 94 →
//! 81: the forward's gain is that it splits at all); in the MNIST ds network's training step the
//! layer took 0.33–0.68 → 0.25–0.27 ms (min of 150 steps, alternated 2×, a noisy VM phase). A
//! version reading W in 512-float column chunks (to keep W in L1) was no faster. The
//! grad-weight (K = batch) stays on faer, which runs it at 85 GMAC/s.

use super::pointwise::{Operands, Store, small_k_gemm};
use super::simd::SimdF32;
use super::{Exec, for_each_task};

/// `y (batch × out) = x (batch × k) · Wᵀ (+ bias)` with `w` row-major `out × k`.
pub fn forward(exec: Exec, x: &[f32], w: &[f32], bias: Option<&[f32]>, k: usize, y: &mut [f32]) {
    assert!(
        k > 0 && x.len().is_multiple_of(k) && w.len().is_multiple_of(k),
        "dense shapes"
    );
    let (rows, out) = (x.len() / k, w.len() / k);
    assert_eq!(y.len(), rows * out, "dense output length");
    assert!(bias.is_none_or(|b| b.len() == out), "dense bias length");
    let isa = exec.isa();
    for_each_task(exec.threads(), y, out, &mut [], 0, |r, yc, _| {
        rows_dot_rows(isa, &x[r.start * k..r.end * k], w, k, yc);
        if let Some(b) = bias {
            for row in yc.chunks_exact_mut(out) {
                for (v, &bv) in row.iter_mut().zip(b) {
                    *v += bv;
                }
            }
        }
    });
}

/// `gx (batch × k) = gy (batch × out) · W` with `w` row-major `out × k`.
pub fn grad_input(exec: Exec, gy: &[f32], w: &[f32], k: usize, gx: &mut [f32]) {
    assert!(
        k > 0 && gx.len().is_multiple_of(k),
        "dense input-gradient shape"
    );
    let rows = gx.len() / k;
    let out = gy.len() / rows.max(1);
    assert!(gy.len() == rows * out && w.len() == out * k, "dense shapes");
    let isa = exec.isa();
    for_each_task(exec.threads(), gx, k, &mut [], 0, |r, gxc, _| {
        let gyc = &gy[r.start * out..r.end * out];
        let ops = Operands::dense(gyc, r.len(), out, w, k, k, None);
        // Read back soon by the layer below's backward: through the caches.
        small_k_gemm(isa, ops, gxc, k, Store::Cached);
    });
}

crate::simd_dispatch!(fn rows_dot_rows => rows_dot_rows_kernel(x: &[f32], w: &[f32], k: usize, y: &mut [f32]));

/// `y[n · O + o] = x_n · w_o` over the rows n of `x` and the O rows o of `w` (`k` floats each).
#[inline(always)]
unsafe fn rows_dot_rows_kernel<S: SimdF32>(x: &[f32], w: &[f32], k: usize, y: &mut [f32]) {
    let (rows, outs) = (x.len() / k, w.len() / k);
    assert!(y.len() >= rows * outs);
    let mut n = 0;
    while n < rows {
        let pair = (rows - n).min(2);
        let mut o = 0;
        while o < outs {
            let block = (outs - o).min(4);
            // SAFETY: forwarded from this function's contract (the ISA is this CPU's); rows
            // n .. n + pair of x and o .. o + block of w are inside them.
            let sums = unsafe {
                match block {
                    4 => dots::<S, 4>(x, w, k, n, pair, o),
                    3 => dots::<S, 3>(x, w, k, n, pair, o),
                    2 => dots::<S, 2>(x, w, k, n, pair, o),
                    _ => dots::<S, 1>(x, w, k, n, pair, o),
                }
            };
            for (r, row_sums) in sums.iter().enumerate().take(pair) {
                y[(n + r) * outs + o..][..block].copy_from_slice(&row_sums[..block]);
            }
            o += block;
        }
        n += pair;
    }
}

/// The dot products of rows n .. n + pair (1 or 2) of `x` with rows o .. o + B of `w`.
///
/// # Safety
/// `S` must be supported by this CPU.
#[inline(always)]
unsafe fn dots<S: SimdF32, const B: usize>(
    x: &[f32],
    w: &[f32],
    k: usize,
    n: usize,
    pair: usize,
    o: usize,
) -> [[f32; 4]; 2] {
    let l = S::LANES;
    let x0 = &x[n * k..(n + 1) * k];
    // With one row left, the second accumulator set reads it again and is dropped.
    let x1 = &x[(n + pair - 1) * k..(n + pair) * k];
    let ws: [&[f32]; B] = std::array::from_fn(|j| &w[(o + j) * k..(o + j + 1) * k]);
    // SAFETY: the ISA is this CPU's (the caller's contract); every load reads lanes i .. i + l
    // with i + l <= k of a k-float row.
    let (mut a0, mut a1) = unsafe { ([S::zero(); B], [S::zero(); B]) };
    let full = k / l * l;
    let mut i = 0;
    while i < full {
        unsafe {
            let (v0, v1) = (S::load(x0.as_ptr().add(i)), S::load(x1.as_ptr().add(i)));
            for j in 0..B {
                let wv = S::load(ws[j].as_ptr().add(i));
                a0[j] = S::mul_add(v0, wv, a0[j]);
                a1[j] = S::mul_add(v1, wv, a1[j]);
            }
        }
        i += l;
    }
    let mut out = [[0.0f32; 4]; 2];
    for j in 0..B {
        let tail = |row: &[f32]| -> f32 { (full..k).map(|t| row[t] * ws[j][t]).sum() };
        // SAFETY: as above.
        unsafe {
            out[0][j] = a0[j].reduce_sum() + tail(x0);
            out[1][j] = a1[j].reduce_sum() + tail(x1);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::Isa;

    fn data(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 1999) as f32 / 999.5) - 1.0)
            .collect()
    }

    /// Forward and input gradient against f64 sums on every instruction set and thread count,
    /// for odd batches (a last row without a partner), output counts that leave blocks of 1–3
    /// rows of W, and row lengths with vector tails.
    #[test]
    fn dense_products_match_f64_sums() {
        for isa in Isa::available() {
            for threads in [1, 2, 3] {
                let exec = Exec::splitting_every_call(threads, isa);
                for (batch, k, out) in [
                    (1, 7, 1),
                    (3, 16, 10),
                    (5, 37, 6),
                    (4, 100, 3),
                    (2, 33, 9),
                    (3, 1100, 5),
                ] {
                    let (x, w, b) = (data(batch * k, 1), data(out * k, 2), data(out, 3));
                    let mut y = vec![f32::NAN; batch * out];
                    forward(exec, &x, &w, Some(&b), k, &mut y);
                    for n in 0..batch {
                        for o in 0..out {
                            let want: f64 = b[o] as f64
                                + (0..k)
                                    .map(|i| x[n * k + i] as f64 * w[o * k + i] as f64)
                                    .sum::<f64>();
                            let got = y[n * out + o] as f64;
                            assert!((got - want).abs() < 1e-4, "{isa} {threads} forward {n},{o}");
                        }
                    }
                    let gy = data(batch * out, 4);
                    let mut gx = vec![f32::NAN; batch * k];
                    grad_input(exec, &gy, &w, k, &mut gx);
                    for n in 0..batch {
                        for i in 0..k {
                            let want: f64 = (0..out)
                                .map(|o| gy[n * out + o] as f64 * w[o * k + i] as f64)
                                .sum();
                            let got = gx[n * k + i] as f64;
                            assert!((got - want).abs() < 1e-4, "{isa} {threads} grad {n},{i}");
                        }
                    }
                }
            }
        }
    }
}
