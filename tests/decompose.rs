//! Decompositions are optimal (Eckart–Young), exact for exact separable products, reconstruct
//! what they predict, and run on the engine as the reconstructed standard conv does.

mod common;

use common::{Rng, assert_close, execs};
use proptest::prelude::*;
use sepconv::decompose::depthwise::{self, DepthwiseAnalysis};
use sepconv::decompose::spatial::{self, SpatialAnalysis};
use sepconv::decompose::{Truncation, Weight, relative_distance};
use sepconv::kernels::{self, Workspace};
use sepconv::{Conv2dParams, ConvGeometry, ConvPair, Padding, Tensor};

fn random_weight(shape: [usize; 4], seed: u64) -> Tensor {
    let mut r = Rng::new(seed);
    Tensor::new(&shape, r.vec(shape.iter().product())).unwrap()
}

/// Brute-force check of optimality for one channel matrix: no rank-k matrix built from other
/// directions does better than the truncation (perturbing the optimal factors only hurts).
fn perturbation_never_helps(w: &Weight, a: &DepthwiseAnalysis, k: usize, t: &Tensor) {
    let f = depthwise::decompose(w, a, k).unwrap();
    let best = relative_distance(
        depthwise::reconstruct(&f.depthwise, &f.pointwise, w.m)
            .unwrap()
            .data(),
        t.data(),
    );
    let mut rng = Rng::new(3);
    for _ in 0..5 {
        let dw: Vec<f32> = f
            .depthwise
            .data()
            .iter()
            .map(|&v| v + 0.01 * rng.uniform())
            .collect();
        let dw = Tensor::new(f.depthwise.shape(), dw).unwrap();
        let worse = relative_distance(
            depthwise::reconstruct(&dw, &f.pointwise, w.m)
                .unwrap()
                .data(),
            t.data(),
        );
        assert!(
            worse >= best - 1e-7,
            "a perturbed factor did better: {worse} < {best}"
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// The measured error of the reconstruction equals the error predicted from the discarded
    /// singular values (sqrt of their energy over the total), for every truncation.
    #[test]
    fn errors_equal_discarded_singular_value_energy(
        n in 1..=6usize, m in 1..=4usize, kh in 1..=4usize, kw in 1..=4usize, seed in any::<u64>(),
    ) {
        let t = random_weight([n, m, kh, kw], seed);
        let w = Weight::from_tensor(&t).unwrap();
        let dw = DepthwiseAnalysis::of(&w).unwrap();
        for k in 1..=(n.min(kh * kw) + 1) {
            let f = depthwise::decompose(&w, &dw, k).unwrap();
            let rec = depthwise::reconstruct(&f.depthwise, &f.pointwise, m).unwrap();
            let measured = relative_distance(rec.data(), t.data());
            prop_assert!((measured - f.predicted_error).abs() < 1e-5, "K {}: {} vs {}", k, measured, f.predicted_error);
            if k <= dw.errors.len() {
                prop_assert!((dw.errors[k - 1] - f.predicted_error).abs() < 1e-12);
            }
        }
        let sp = SpatialAnalysis::of(&w).unwrap();
        for r in 1..=((m * kh).min(n * kw) + 1) {
            let f = spatial::decompose(&w, &sp, r).unwrap();
            let rec = spatial::reconstruct(&f.vertical, &f.horizontal).unwrap();
            let measured = relative_distance(rec.data(), t.data());
            prop_assert!((measured - f.predicted_error).abs() < 1e-5, "R {}: {} vs {}", r, measured, f.predicted_error);
        }
        // Full rank is exact.
        let full = spatial::decompose(&w, &sp, (m * kh).min(n * kw)).unwrap();
        prop_assert!(full.predicted_error < 1e-6);
        perturbation_never_helps(&w, &dw, 1, &t);
    }
}

#[test]
fn exact_products_are_found_exactly() {
    let mut rng = Rng::new(11);
    // W[n, m] = C[n, m]·B[m]: depthwise separable with K = 1.
    let (n, m) = (6, 4);
    let b = rng.vec(m * 9);
    let c = rng.vec(n * m);
    let w: Vec<f32> = (0..n * m * 9)
        .map(|i| c[i / 9] * b[(i / 9 % m) * 9 + i % 9])
        .collect();
    let t = Tensor::new(&[n, m, 3, 3], w).unwrap();
    let wt = Weight::from_tensor(&t).unwrap();
    let a = DepthwiseAnalysis::of(&wt).unwrap();
    assert_eq!(a.exact_multiplier(), 1);
    let f = depthwise::decompose(&wt, &a, 1).unwrap();
    assert!(f.predicted_error < 1e-6);
    let rec = depthwise::reconstruct(&f.depthwise, &f.pointwise, m).unwrap();
    assert!(relative_distance(rec.data(), t.data()) < 1e-6);
    // A spatial product Σ_r H·V with R = 2 is found with rank 2 and error < 1e-6.
    let (r, n, m) = (2, 5, 3);
    let v = rng.vec(r * m * 3);
    let h = rng.vec(n * r * 3);
    let vt = Tensor::new(&[r, m, 3, 1], v).unwrap();
    let ht = Tensor::new(&[n, r, 1, 3], h).unwrap();
    let t = spatial::reconstruct(&vt, &ht).unwrap();
    let wt = Weight::from_tensor(&t).unwrap();
    let a = SpatialAnalysis::of(&wt).unwrap();
    assert_eq!(a.layer.rank(), 2);
    let f = spatial::decompose(&wt, &a, 2).unwrap();
    assert!(
        relative_distance(
            spatial::reconstruct(&f.vertical, &f.horizontal)
                .unwrap()
                .data(),
            t.data()
        ) < 1e-6
    );
}

#[test]
fn sobel_is_rank_one_and_unproportional_slices_need_two_terms() {
    let sobel = Tensor::new(
        &[1, 1, 3, 3],
        vec![-1.0, 0.0, 1.0, -2.0, 0.0, 2.0, -1.0, 0.0, 1.0],
    )
    .unwrap();
    let w = Weight::from_tensor(&sobel).unwrap();
    let a = SpatialAnalysis::of(&w).unwrap();
    assert_eq!(a.kernel_ranks, vec![1]);
    assert_eq!(a.separable_kernels(), 1);
    assert!(a.errors[0] < 1e-7);
    // Two filters over 3 channels whose channel slices are not proportional: per channel the
    // 2 × 9 matrix has rank 2, so K = 1 is not exact and K = 2 is.
    let mut rng = Rng::new(5);
    let t = Tensor::new(&[2, 3, 3, 3], rng.vec(54)).unwrap();
    let w = Weight::from_tensor(&t).unwrap();
    let a = DepthwiseAnalysis::of(&w).unwrap();
    assert_eq!(a.exact_multiplier(), 2);
    assert!(a.errors[0] > 0.1);
    assert!(a.errors[1] < 1e-7);
    assert_eq!(Truncation::MaxError(0.01).pick(&a.errors), 2);
    assert_eq!(Truncation::Rank(1).pick(&a.errors), 1);
}

/// The decomposed pair, run by the engine, equals the reconstructed standard conv run by the
/// engine (the approximation is in the weights, not in how it is computed).
#[test]
fn decomposed_pairs_run_as_the_reconstructed_conv() {
    let t = random_weight([6, 4, 3, 3], 21);
    let w = Weight::from_tensor(&t).unwrap();
    let x_shape = [2, 4, 11, 9];
    let x = Rng::new(8).vec(x_shape.iter().product());
    let p = Conv2dParams::with_padding(Padding::Same);
    let run_std = |wt: &Tensor| {
        let g = ConvGeometry::new(x_shape, wt.dims4("w").unwrap(), &p).unwrap();
        let mut y = vec![0.0; g.output_len()];
        kernels::conv2d_forward(
            execs()[0],
            &g,
            &x,
            wt.data(),
            None,
            &mut y,
            &mut Workspace::new(),
        )
        .unwrap();
        y
    };
    let run_pair = |pair: &ConvPair, a: &Tensor, b: &Tensor| {
        let mut mid = vec![0.0; pair.first.output_len()];
        let mut y = vec![0.0; pair.second.output_len()];
        pair.forward(
            execs()[0],
            &x,
            a.data(),
            b.data(),
            None,
            &mut mid,
            &mut y,
            &mut Workspace::new(),
        )
        .unwrap();
        y
    };
    let a = DepthwiseAnalysis::of(&w).unwrap();
    for k in [1, 2, 5] {
        let f = depthwise::decompose(&w, &a, k).unwrap();
        let pair = ConvPair::depthwise_separable(x_shape, k, 6, (3, 3), &p).unwrap();
        let want = run_std(&depthwise::reconstruct(&f.depthwise, &f.pointwise, 4).unwrap());
        assert_close(
            &run_pair(&pair, &f.depthwise, &f.pointwise),
            &want,
            1e-5,
            "depthwise pair",
        );
    }
    let a = SpatialAnalysis::of(&w).unwrap();
    for r in [1, 3, 12] {
        let f = spatial::decompose(&w, &a, r).unwrap();
        let pair = ConvPair::spatially_separable(x_shape, r, 6, (3, 3), &p).unwrap();
        let want = run_std(&spatial::reconstruct(&f.vertical, &f.horizontal).unwrap());
        assert_close(
            &run_pair(&pair, &f.vertical, &f.horizontal),
            &want,
            1e-5,
            "spatial pair",
        );
    }
}
