//! Finite-difference gradient checks of every op and pass (reference and fast kernels, single
//! convolutions and both separable pairs) over a matrix of geometries: stride 1–3, dilation
//! 1–2, valid/same/same-lower/explicit asymmetric padding, odd/even/non-square kernels, groups
//! 1, 2 and = channels with multiplier 1–3, batch 1–3.
//!
//! The loss is L = Σ r ⊙ y for a fixed random r, so ∂L/∂y = r. A convolution is linear in each
//! of x, w and b, so central differences are exact up to rounding even with a large step; the
//! tolerance only has to absorb f32 rounding of the outputs.

mod common;

use common::{Rng, execs};
use sepconv::kernels::{self, Workspace, reference};
use sepconv::separable::PairGrads;
use sepconv::{Conv2dParams, ConvGeometry, ConvPair, Padding};

const STEP: f32 = 0.5;
const TOL: f64 = 2e-4;

fn asym(top: usize, bottom: usize, left: usize, right: usize) -> Padding {
    Padding::Explicit {
        top,
        bottom,
        left,
        right,
    }
}

/// (input, weight, params): the geometry matrix.
fn matrix() -> Vec<([usize; 4], [usize; 4], Conv2dParams)> {
    let p = |pad: Padding, s: (usize, usize), d: (usize, usize), g: usize| Conv2dParams {
        stride: s,
        dilation: d,
        padding: pad,
        groups: g,
    };
    vec![
        // standard, odd / even / non-square kernels, every padding kind
        (
            [1, 3, 7, 6],
            [4, 3, 3, 3],
            p(Padding::Valid, (1, 1), (1, 1), 1),
        ),
        (
            [2, 2, 8, 7],
            [3, 2, 4, 4],
            p(Padding::Same, (1, 1), (1, 1), 1),
        ),
        (
            [1, 2, 9, 8],
            [2, 2, 2, 3],
            p(Padding::SameLower, (2, 2), (1, 1), 1),
        ),
        (
            [3, 2, 7, 9],
            [2, 2, 3, 1],
            p(asym(2, 0, 1, 3), (1, 2), (1, 1), 1),
        ),
        (
            [1, 3, 10, 9],
            [2, 3, 1, 3],
            p(Padding::Same, (3, 3), (2, 2), 1),
        ),
        (
            [2, 2, 11, 11],
            [3, 2, 5, 2],
            p(asym(0, 3, 2, 1), (2, 3), (2, 1), 1),
        ),
        // grouped
        (
            [2, 4, 8, 8],
            [6, 2, 3, 3],
            p(Padding::Same, (1, 1), (1, 1), 2),
        ),
        (
            [1, 4, 9, 7],
            [4, 2, 2, 3],
            p(Padding::SameLower, (2, 1), (1, 2), 2),
        ),
        (
            [3, 6, 7, 7],
            [4, 3, 3, 2],
            p(asym(1, 2, 0, 1), (3, 2), (1, 1), 2),
        ),
        // depthwise, multiplier 1–3
        (
            [2, 3, 9, 9],
            [3, 1, 3, 3],
            p(Padding::Same, (1, 1), (1, 1), 3),
        ),
        (
            [1, 4, 10, 8],
            [8, 1, 3, 3],
            p(Padding::Same, (2, 2), (1, 1), 4),
        ),
        (
            [3, 2, 9, 11],
            [6, 1, 4, 2],
            p(Padding::SameLower, (1, 3), (2, 1), 2),
        ),
        (
            [2, 3, 12, 10],
            [9, 1, 5, 3],
            p(asym(3, 1, 0, 2), (2, 1), (1, 2), 3),
        ),
        (
            [1, 5, 7, 7],
            [5, 1, 2, 2],
            p(Padding::Valid, (3, 3), (2, 2), 5),
        ),
        // pointwise
        (
            [2, 4, 5, 6],
            [3, 4, 1, 1],
            p(Padding::Valid, (1, 1), (1, 1), 1),
        ),
        (
            [1, 4, 7, 6],
            [3, 4, 1, 1],
            p(Padding::Same, (2, 2), (1, 1), 1),
        ),
    ]
}

/// Indices to probe: all of a small tensor, a seeded sample of a large one.
fn probe(n: usize, rng: &mut Rng) -> Vec<usize> {
    if n <= 40 {
        (0..n).collect()
    } else {
        (0..40).map(|_| rng.range(0, n - 1)).collect()
    }
}

fn loss(y: &[f32], r: &[f32]) -> f64 {
    y.iter().zip(r).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Central difference of `f` with respect to `v[i]`.
fn central(v: &mut [f32], i: usize, mut f: impl FnMut(&[f32]) -> f64) -> f64 {
    let orig = v[i];
    v[i] = orig + STEP;
    let up = f(v);
    v[i] = orig - STEP;
    let down = f(v);
    v[i] = orig;
    (up - down) / (2.0 * STEP as f64)
}

#[track_caller]
fn assert_grad(analytic: f32, numeric: f64, what: &str) {
    let err = (analytic as f64 - numeric).abs() / numeric.abs().max(1.0);
    assert!(
        err <= TOL,
        "{what}: analytic {analytic} vs numeric {numeric} (err {err:.2e})"
    );
}

/// Checks the gradients of one convolution, computed by `backward`, against finite differences
/// of the reference forward.
fn check_conv(
    g: &ConvGeometry,
    seed: u64,
    label: &str,
    backward: impl Fn(&[f32], &[f32], &[f32], &mut [f32], &mut [f32], &mut [f32]),
) {
    let mut rng = Rng::new(seed);
    let (mut x, mut w, mut b, r) = (
        rng.vec(g.input_len()),
        rng.vec(g.weight_len()),
        rng.vec(g.out_channels),
        rng.vec(g.output_len()),
    );
    let mut gx = vec![0.0; g.input_len()];
    let mut gw = vec![0.0; g.weight_len()];
    let mut gb = vec![0.0; g.out_channels];
    backward(&x, &w, &r, &mut gx, &mut gw, &mut gb);
    let forward = |x: &[f32], w: &[f32], b: &[f32]| {
        let mut y = vec![0.0; g.output_len()];
        reference::conv2d_forward(g, x, w, Some(b), &mut y);
        loss(&y, &r)
    };
    let what = format!("{label} {g:?}");
    for i in probe(x.len(), &mut rng) {
        let (wc, bc) = (w.clone(), b.clone());
        let num = central(&mut x, i, |x| forward(x, &wc, &bc));
        assert_grad(gx[i], num, &format!("grad-input[{i}] {what}"));
    }
    for i in probe(w.len(), &mut rng) {
        let (xc, bc) = (x.clone(), b.clone());
        let num = central(&mut w, i, |w| forward(&xc, w, &bc));
        assert_grad(gw[i], num, &format!("grad-weight[{i}] {what}"));
    }
    for (i, &g) in gb.iter().enumerate() {
        let (xc, wc) = (x.clone(), w.clone());
        let num = central(&mut b, i, |b| forward(&xc, &wc, b));
        assert_grad(g, num, &format!("grad-bias[{i}] {what}"));
    }
}

#[test]
fn reference_gradients_match_finite_differences() {
    for (k, (input, weight, p)) in matrix().into_iter().enumerate() {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        check_conv(&g, k as u64, "reference", |x, w, gy, gx, gw, gb| {
            reference::conv2d_grad_input(&g, gy, w, gx);
            reference::conv2d_grad_weight(&g, x, gy, gw);
            reference::conv2d_grad_bias(&g, gy, gb);
        });
    }
}

#[test]
fn fast_gradients_match_finite_differences() {
    for (k, (input, weight, p)) in matrix().into_iter().enumerate() {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        for exec in execs() {
            check_conv(
                &g,
                k as u64,
                &format!("{exec:?}"),
                |x, w, gy, gx, gw, gb| {
                    let mut ws = Workspace::new();
                    kernels::conv2d_grad_input(exec, &g, gy, w, gx, &mut ws).unwrap();
                    kernels::conv2d_grad_weight(exec, &g, x, gy, gw, &mut ws).unwrap();
                    kernels::conv2d_grad_bias(exec, &g, gy, gb);
                },
            );
        }
    }
}

/// The separable pairs: gradients of x, both weights and the bias through both convolutions.
#[test]
fn separable_pair_gradients_match_finite_differences() {
    let same = Conv2dParams::with_padding(Padding::Same);
    let pairs = [
        ConvPair::depthwise_separable([2, 3, 8, 7], 1, 4, (3, 3), &same).unwrap(),
        ConvPair::depthwise_separable([1, 2, 9, 9], 3, 3, (3, 2), &same.stride(2, 2)).unwrap(),
        // Stride 2, multiplier 1, an image per thread: trained image by image on AVX-512
        // (`kernels::fused_training`).
        ConvPair::depthwise_separable([2, 3, 9, 10], 1, 4, (3, 3), &same.stride(2, 2)).unwrap(),
        ConvPair::depthwise_separable(
            [3, 2, 10, 8],
            2,
            5,
            (2, 3),
            &Conv2dParams::with_padding(Padding::SameLower).dilation(2, 1),
        )
        .unwrap(),
        ConvPair::spatially_separable([2, 3, 8, 8], 3, 4, (3, 3), &same).unwrap(),
        ConvPair::spatially_separable(
            [1, 2, 11, 9],
            1,
            3,
            (5, 3),
            &same.stride(2, 3).dilation(1, 2),
        )
        .unwrap(),
        ConvPair::spatially_separable(
            [3, 2, 7, 9],
            2,
            2,
            (2, 4),
            &Conv2dParams::with_padding(asym(1, 0, 2, 1)),
        )
        .unwrap(),
    ];
    let mut image_by_image = 0;
    for (k, pair) in pairs.iter().enumerate() {
        let (g1, g2) = (&pair.first, &pair.second);
        let mut rng = Rng::new(100 + k as u64);
        let (mut x, mut w1, mut w2, mut b, r) = (
            rng.vec(g1.input_len()),
            rng.vec(g1.weight_len()),
            rng.vec(g2.weight_len()),
            rng.vec(g2.out_channels),
            rng.vec(g2.output_len()),
        );
        let forward = |x: &[f32], w1: &[f32], w2: &[f32], b: &[f32]| {
            let mut mid = vec![0.0; g1.output_len()];
            let mut y = vec![0.0; g2.output_len()];
            reference::conv2d_forward(g1, x, w1, None, &mut mid);
            reference::conv2d_forward(g2, &mid, w2, Some(b), &mut y);
            loss(&y, &r)
        };
        for exec in execs() {
            image_by_image += usize::from(kernels::fused_training::applies(exec, g1, g2));
            let mut ws = Workspace::new();
            let mut mid = vec![0.0; g1.output_len()];
            let mut y = vec![0.0; g2.output_len()];
            pair.forward(exec, &x, &w1, &w2, Some(&b), &mut mid, &mut y, &mut ws)
                .unwrap();
            let mut gx = vec![0.0; x.len()];
            let mut gw1 = vec![0.0; w1.len()];
            let mut gw2 = vec![0.0; w2.len()];
            let mut gb = vec![0.0; b.len()];
            let mut gmid = vec![0.0; mid.len()];
            let grads = PairGrads {
                input: Some(&mut gx),
                first_weight: &mut gw1,
                second_weight: &mut gw2,
                bias: Some(&mut gb),
            };
            pair.backward(exec, &x, &w1, &w2, &mid, &r, grads, &mut gmid, &mut ws)
                .unwrap();
            let what = format!("pair {k} {exec:?}");
            // The pair is bilinear in (w1, w2), so a central difference in one weight is exact.
            for i in probe(x.len(), &mut rng) {
                let num = central(&mut x, i, |x| forward(x, &w1, &w2, &b));
                assert_grad(gx[i], num, &format!("grad-input[{i}] {what}"));
            }
            for i in probe(w1.len(), &mut rng) {
                let num = central(&mut w1, i, |w1| forward(&x, w1, &w2, &b));
                assert_grad(gw1[i], num, &format!("grad-first-weight[{i}] {what}"));
            }
            for i in probe(w2.len(), &mut rng) {
                let num = central(&mut w2, i, |w2| forward(&x, &w1, w2, &b));
                assert_grad(gw2[i], num, &format!("grad-second-weight[{i}] {what}"));
            }
            for (i, &g) in gb.iter().enumerate() {
                let num = central(&mut b, i, |b| forward(&x, &w1, &w2, b));
                assert_grad(g, num, &format!("grad-bias[{i}] {what}"));
            }
        }
    }
    if sepconv::kernels::simd::Isa::available().contains(&sepconv::kernels::simd::Isa::Avx512) {
        assert_eq!(image_by_image, 2, "the stride-2 pair on 1 and 2 threads");
    }
}
