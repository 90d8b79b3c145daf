//! The factorizations are exact where the theory says so:
//! (a) a spatially separable pair with column u and row v equals the standard convolution with
//!     kernel u·vᵀ (the Sobel filter as a named case);
//! (b) a depthwise-separable pair with depthwise B and pointwise C equals the standard
//!     convolution with W[n, m] = Σ_k C[n, m·K + k]·B[m·K + k].

mod common;

use common::{Rng, assert_close, execs};
use proptest::prelude::*;
use sepconv::kernels::{self, Workspace};
use sepconv::{Conv2dParams, ConvGeometry, ConvPair, Padding};

fn padding() -> impl Strategy<Value = Padding> {
    prop_oneof![
        Just(Padding::Valid),
        Just(Padding::Same),
        Just(Padding::SameLower),
        (0..3usize, 0..3usize, 0..3usize, 0..3usize).prop_map(|(top, bottom, left, right)| {
            Padding::Explicit {
                top,
                bottom,
                left,
                right,
            }
        }),
    ]
}

/// Runs a pair with the fast kernels: the training forward (keeping the intermediate) and the
/// inference forward (for depthwise-separable pairs the fused kernel), on every variant.
fn run_pair(pair: &ConvPair, x: &[f32], w1: &[f32], w2: &[f32], b: &[f32]) -> Vec<Vec<f32>> {
    let mut out = Vec::new();
    for exec in execs() {
        let mut mid = vec![0.0; pair.first.output_len()];
        let mut y = vec![0.0; pair.second.output_len()];
        pair.forward(
            exec,
            x,
            w1,
            w2,
            Some(b),
            &mut mid,
            &mut y,
            &mut Workspace::new(),
        )
        .unwrap();
        out.push(y);
        let mut y = vec![f32::NAN; pair.second.output_len()];
        let mut scratch = Vec::new();
        pair.forward_inference(
            exec,
            x,
            w1,
            w2,
            Some(b),
            &mut y,
            &mut scratch,
            &mut Workspace::new(),
        )
        .unwrap();
        out.push(y);
    }
    out
}

/// Runs one standard convolution with the fast kernels (best variant, 2 threads).
fn run_standard(g: &ConvGeometry, x: &[f32], w: &[f32], b: &[f32]) -> Vec<f32> {
    let mut y = vec![0.0; g.output_len()];
    kernels::conv2d_forward(execs()[1], g, x, w, Some(b), &mut y, &mut Workspace::new()).unwrap();
    y
}

/// Standard weight [N, M, kh, kw] of a spatially separable pair: W[n, m, i, j] =
/// Σ_r H[n, r, 0, j]·V[r, m, i, 0].
fn spatial_product(
    v: &[f32],
    h: &[f32],
    m: usize,
    r: usize,
    n: usize,
    kh: usize,
    kw: usize,
) -> Vec<f32> {
    let mut w = vec![0.0; n * m * kh * kw];
    for no in 0..n {
        for mi in 0..m {
            for i in 0..kh {
                for j in 0..kw {
                    w[((no * m + mi) * kh + i) * kw + j] = (0..r)
                        .map(|ri| h[(no * r + ri) * kw + j] * v[(ri * m + mi) * kh + i])
                        .sum();
                }
            }
        }
    }
    w
}

/// Standard weight of a depthwise-separable pair: W[n, m] = Σ_k C[n, m·K + k]·B[m·K + k].
fn depthwise_product(b: &[f32], c: &[f32], m: usize, k: usize, n: usize, taps: usize) -> Vec<f32> {
    let mut w = vec![0.0; n * m * taps];
    for no in 0..n {
        for mi in 0..m {
            for t in 0..taps {
                w[(no * m + mi) * taps + t] = (0..k)
                    .map(|ki| c[no * m * k + mi * k + ki] * b[(mi * k + ki) * taps + t])
                    .sum();
            }
        }
    }
    w
}

#[test]
fn sobel_is_a_column_times_a_row() {
    // Sobel-x = [1, 2, 1]ᵀ · [-1, 0, 1]: a 3×1 smoothing then a 1×3 difference.
    let u = [1.0, 2.0, 1.0];
    let v = [-1.0, 0.0, 1.0];
    let sobel = [-1.0, 0.0, 1.0, -2.0, 0.0, 2.0, -1.0, 0.0, 1.0];
    assert_eq!(spatial_product(&u, &v, 1, 1, 1, 3, 3), sobel);
    let mut rng = Rng::new(7);
    let x = rng.vec(15 * 15);
    let pair =
        ConvPair::spatially_separable([1, 1, 15, 15], 1, 1, (3, 3), &Conv2dParams::default())
            .unwrap();
    // The textbook's sequence: 3×1 over 15×15 gives 13×15, then 1×3 gives 13×13.
    assert_eq!(pair.mid_shape(), [1, 1, 13, 15]);
    assert_eq!(pair.output_shape(), [1, 1, 13, 13]);
    let cost = pair.cost(false);
    assert_eq!(cost.forward_macs_nominal, 585 + 507);
    let g = ConvGeometry::new([1, 1, 15, 15], [1, 1, 3, 3], &Conv2dParams::default()).unwrap();
    let want = run_standard(&g, &x, &sobel, &[0.0]);
    for y in run_pair(&pair, &x, &u, &v, &[0.0]) {
        assert_close(&y, &want, 1e-5, "Sobel separable vs standard");
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 120, ..ProptestConfig::default() })]

    #[test]
    fn spatially_separable_pair_equals_standard_with_outer_product_kernel(
        batch in 1..=2usize, m in 1..=4usize, r in 1..=3usize, n in 1..=4usize,
        kh in 1..=5usize, kw in 1..=5usize, sh in 1..=3usize, sw in 1..=3usize,
        dh in 1..=2usize, dw in 1..=2usize, pad in padding(), h in 4..=14usize, w in 4..=14usize,
        seed in any::<u64>(),
    ) {
        let p = Conv2dParams { stride: (sh, sw), dilation: (dh, dw), padding: pad, groups: 1 };
        let Ok(pair) = ConvPair::spatially_separable([batch, m, h, w], r, n, (kh, kw), &p) else {
            return Ok(());
        };
        let g = ConvGeometry::new([batch, m, h, w], [n, m, kh, kw], &p).unwrap();
        prop_assert_eq!(pair.output_shape(), g.output_shape());
        let mut rng = Rng::new(seed);
        let (x, v, hz, b) = (rng.vec(g.input_len()), rng.vec(r * m * kh), rng.vec(n * r * kw), rng.vec(n));
        let want = run_standard(&g, &x, &spatial_product(&v, &hz, m, r, n, kh, kw), &b);
        for y in run_pair(&pair, &x, &v, &hz, &b) {
            assert_close(&y, &want, 1e-4, "spatial pair vs standard");
        }
    }

    #[test]
    fn depthwise_separable_pair_equals_standard_with_rank_k_kernel(
        batch in 1..=3usize, m in 1..=4usize, k in 1..=3usize, n in 1..=4usize,
        kh in 1..=5usize, kw in 1..=5usize, sh in 1..=3usize, sw in 1..=3usize,
        dh in 1..=2usize, dw in 1..=2usize, pad in padding(), h in 4..=40usize, w in 4..=40usize,
        seed in any::<u64>(),
    ) {
        let p = Conv2dParams { stride: (sh, sw), dilation: (dh, dw), padding: pad, groups: 1 };
        let Ok(pair) = ConvPair::depthwise_separable([batch, m, h, w], k, n, (kh, kw), &p) else {
            return Ok(());
        };
        let g = ConvGeometry::new([batch, m, h, w], [n, m, kh, kw], &p).unwrap();
        prop_assert_eq!(pair.output_shape(), g.output_shape());
        let mut rng = Rng::new(seed);
        let taps = kh * kw;
        let (x, bw, cw, b) = (rng.vec(g.input_len()), rng.vec(m * k * taps), rng.vec(n * m * k), rng.vec(n));
        let want = run_standard(&g, &x, &depthwise_product(&bw, &cw, m, k, n, taps), &b);
        for y in run_pair(&pair, &x, &bw, &cw, &b) {
            assert_close(&y, &want, 1e-4, "depthwise-separable pair vs standard");
        }
    }
}

#[test]
fn textbook_depthwise_separable_costs() {
    let pair =
        ConvPair::depthwise_separable([1, 3, 15, 15], 1, 10, (3, 3), &Conv2dParams::default())
            .unwrap();
    let std = ConvGeometry::new([1, 3, 15, 15], [10, 3, 3, 3], &Conv2dParams::default()).unwrap();
    assert_eq!(
        sepconv::ConvCost::of(&std, false).forward_macs_nominal,
        45_630
    );
    assert_eq!(ConvCostParts::of(&pair), (4_563, 5_070));
    assert_eq!(pair.cost(false).forward_macs_nominal, 9_633);
}

struct ConvCostParts;
impl ConvCostParts {
    fn of(pair: &ConvPair) -> (u64, u64) {
        (
            sepconv::ConvCost::of(&pair.first, false).forward_macs_nominal,
            sepconv::ConvCost::of(&pair.second, false).forward_macs_nominal,
        )
    }
}

/// The fused kernel on shapes with several bands per image at its real band budget (256K
/// floats of intermediate; `kernels::fused`'s own tests cut finer), split by images (batch 2
/// on two threads) and by bands (batches 1 and 3), against the unfused pair.
#[test]
fn fused_forward_matches_unfused_on_banded_images() {
    let same = Conv2dParams::with_padding(Padding::Same);
    for (input, k, n, kernel, p) in [
        ([2, 64, 70, 70], 1, 16, (3, 3), same),
        ([1, 48, 95, 61], 2, 8, (3, 3), same.stride(2, 2)),
        (
            [3, 32, 90, 30],
            1,
            12,
            (5, 3),
            Conv2dParams::with_padding(Padding::SameLower).dilation(2, 1),
        ),
        ([1, 16, 45, 45], 3, 8, (3, 3), Conv2dParams::default()),
    ] {
        let pair = ConvPair::depthwise_separable(input, k, n, kernel, &p).unwrap();
        let mut rng = Rng::new(9);
        let (x, w1, w2, b) = (
            rng.vec(pair.first.input_len()),
            rng.vec(pair.first.weight_len()),
            rng.vec(pair.second.weight_len()),
            rng.vec(n),
        );
        let ys = run_pair(&pair, &x, &w1, &w2, &b);
        for y in &ys[1..] {
            assert_close(y, &ys[0], 1e-5, &format!("fused vs unfused {input:?}"));
        }
    }
}
