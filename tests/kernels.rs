//! Property tests over random geometries: every fast kernel variant equals the reference
//! (forward and all backward outputs), and the reference's counted multiplications equal the
//! analytic executed MACs of the cost model.

mod common;

use common::{Rng, assert_close, exec, execs};
use proptest::prelude::*;
use sepconv::kernels::{self, ConvAlgorithm, GradWeightKernel, Workspace, reference};
use sepconv::{Conv2dParams, ConvCost, ConvGeometry, Padding};

/// Random valid geometries: standard, grouped (2 groups) and depthwise with multiplier 1–3;
/// kernels 1–5 per axis, stride 1–3, dilation 1–2, all padding kinds, batch 1–3.
fn geometry() -> impl Strategy<Value = ConvGeometry> {
    let padding = prop_oneof![
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
    ];
    (
        1..=3usize,
        0..3usize,
        1..=4usize,
        1..=3usize,
        (1..=5usize, 1..=5usize),
        (1..=3usize, 1..=3usize),
        (1..=2usize, 1..=2usize),
        padding,
        (1..=13usize, 1..=13usize),
        prop::bool::weighted(0.2),
    )
        .prop_filter_map(
            "kernel larger than padded input",
            |(batch, kind, c, o, (kh, kw), (sh, sw), (dh, dw), padding, (h, w), pointwise)| {
                // A fifth of the cases are exactly pointwise (1×1, stride 1, no padding): the
                // direct-GEMM path.
                let ((kh, kw), (sh, sw), padding) = if pointwise {
                    ((1, 1), (1, 1), Padding::Valid)
                } else {
                    ((kh, kw), (sh, sw), padding)
                };
                let (cin, cout, groups) = match kind {
                    0 => (c, o, 1),
                    1 => (2 * c, 2 * o, 2),
                    _ => (c, c * o, c), // depthwise, multiplier o
                };
                let p = Conv2dParams {
                    stride: (sh, sw),
                    dilation: (dh, dw),
                    padding,
                    groups,
                };
                ConvGeometry::new([batch, cin, h, w], [cout, cin / groups, kh, kw], &p).ok()
            },
        )
}

/// Explicit padding: rows above and below, columns left and right.
fn explicit(top: usize, bottom: usize, left: usize, right: usize) -> Conv2dParams {
    Conv2dParams::with_padding(Padding::Explicit {
        top,
        bottom,
        left,
        right,
    })
}

struct Data {
    x: Vec<f32>,
    w: Vec<f32>,
    b: Vec<f32>,
    gy: Vec<f32>,
}

fn data(g: &ConvGeometry, seed: u64) -> Data {
    let mut r = Rng::new(seed);
    Data {
        x: r.vec(g.input_len()),
        w: r.vec(g.weight_len()),
        b: r.vec(g.out_channels),
        gy: r.vec(g.output_len()),
    }
}

fn check_fast_against_reference(g: &ConvGeometry, seed: u64) {
    let d = data(g, seed);
    let mut y_ref = vec![0.0; g.output_len()];
    let mut gx_ref = vec![0.0; g.input_len()];
    let mut gw_ref = vec![0.0; g.weight_len()];
    let mut gb_ref = vec![0.0; g.out_channels];
    reference::conv2d_forward(g, &d.x, &d.w, Some(&d.b), &mut y_ref);
    reference::conv2d_grad_input(g, &d.gy, &d.w, &mut gx_ref);
    reference::conv2d_grad_weight(g, &d.x, &d.gy, &mut gw_ref);
    reference::conv2d_grad_bias(g, &d.gy, &mut gb_ref);
    let what = format!("{g:?}");
    for exec in execs() {
        let mut ws = Workspace::new();
        // Outputs start as NaN so a kernel that forgets to write an element fails.
        let mut y = vec![f32::NAN; g.output_len()];
        let mut gx = vec![f32::NAN; g.input_len()];
        let mut gw = vec![f32::NAN; g.weight_len()];
        let mut gb = vec![f32::NAN; g.out_channels];
        kernels::conv2d_forward(exec, g, &d.x, &d.w, Some(&d.b), &mut y, &mut ws).unwrap();
        kernels::conv2d_grad_input(exec, g, &d.gy, &d.w, &mut gx, &mut ws).unwrap();
        kernels::conv2d_grad_weight(exec, g, &d.x, &d.gy, &mut gw, &mut ws).unwrap();
        kernels::conv2d_grad_bias(exec, g, &d.gy, &mut gb);
        assert_close(&y, &y_ref, 1e-4, &format!("forward {exec:?} {what}"));
        assert_close(&gx, &gx_ref, 1e-4, &format!("grad-input {exec:?} {what}"));
        assert_close(&gw, &gw_ref, 1e-4, &format!("grad-weight {exec:?} {what}"));
        assert_close(&gb, &gb_ref, 1e-4, &format!("grad-bias {exec:?} {what}"));
        // All gradients in one call (one pass over gy for blocked depthwise layers, image by
        // image for pointwise ones); grad-bias bit for bit as the separate pass.
        let gb_alone = gb.clone();
        gx.fill(f32::NAN);
        gw.fill(f32::NAN);
        gb.fill(f32::NAN);
        let (gxo, gbo) = (Some(&mut gx[..]), Some(&mut gb[..]));
        kernels::conv2d_backward(exec, g, &d.x, &d.gy, &d.w, gxo, &mut gw, gbo, &mut ws).unwrap();
        assert_close(&gx, &gx_ref, 1e-4, &format!("backward gx {exec:?} {what}"));
        assert_close(&gw, &gw_ref, 1e-4, &format!("backward gw {exec:?} {what}"));
        assert_eq!(gb, gb_alone, "backward gb {exec:?} {what}");
        // Without grad-input and grad-bias (a network's first layer).
        gw.fill(f32::NAN);
        kernels::conv2d_backward(exec, g, &d.x, &d.gy, &d.w, None, &mut gw, None, &mut ws).unwrap();
        assert_close(
            &gw,
            &gw_ref,
            1e-4,
            &format!("backward gw alone {exec:?} {what}"),
        );
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 300, ..ProptestConfig::default() })]

    #[test]
    fn fast_equals_reference(g in geometry(), seed in any::<u64>()) {
        check_fast_against_reference(&g, seed);
    }

    #[test]
    fn reference_counts_equal_executed_macs(g in geometry()) {
        let d = data(&g, 1);
        let cost = ConvCost::of(&g, false);
        let mut y = vec![0.0; g.output_len()];
        let mut gx = vec![0.0; g.input_len()];
        let mut gw = vec![0.0; g.weight_len()];
        prop_assert_eq!(reference::conv2d_forward(&g, &d.x, &d.w, None, &mut y), cost.forward_macs_executed);
        prop_assert_eq!(reference::conv2d_grad_input(&g, &d.gy, &d.w, &mut gx), cost.grad_input_macs_executed);
        prop_assert_eq!(reference::conv2d_grad_weight(&g, &d.x, &d.gy, &mut gw), cost.grad_weight_macs_executed);
        prop_assert!(cost.forward_macs_executed <= cost.forward_macs_nominal);
    }

    #[test]
    fn nominal_is_textbook_formula_for_valid_padding(
        batch in 1..=3usize, cin in 1..=4usize, cout in 1..=4usize,
        kh in 1..=5usize, kw in 1..=5usize, h in 5..=15usize, w in 5..=15usize,
        s in 1..=3usize,
    ) {
        let g = ConvGeometry::new(
            [batch, cin, h, w], [cout, cin, kh, kw], &Conv2dParams::default().stride(s, s),
        ).unwrap();
        let (oh, ow) = ((h - kh) / s + 1, (w - kw) / s + 1);
        let textbook = (batch * oh * ow * kh * kw * cin * cout) as u64;
        let cost = ConvCost::of(&g, false);
        prop_assert_eq!(cost.forward_macs_nominal, textbook);
        prop_assert_eq!(cost.forward_macs_executed, textbook);
    }
}

/// Shapes like the reference layers, scaled down: larger planes and channel counts than the
/// property test reaches, so tiling, vector tails and the thread split are exercised.
#[test]
fn fast_equals_reference_on_larger_shapes() {
    let same = Conv2dParams::with_padding(Padding::Same);
    let cases = [
        ([3, 16, 20, 20], [16, 1, 3, 3], same.groups(16)),
        ([2, 8, 23, 23], [24, 1, 3, 3], same.groups(8).stride(2, 2)),
        ([2, 16, 17, 17], [32, 16, 1, 1], Conv2dParams::default()),
        (
            [2, 12, 21, 19],
            [12, 12, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
        (
            [1, 4, 40, 40],
            [6, 4, 5, 5],
            same.stride(2, 2).dilation(2, 1),
        ),
        ([4, 6, 9, 33], [6, 1, 5, 3], same.groups(6).dilation(2, 2)),
        // Small images in batches: several images share one GEMM, split over tasks.
        ([8, 6, 7, 7], [10, 6, 3, 3], same),
        (
            [6, 4, 9, 5],
            [6, 2, 3, 2],
            Conv2dParams::with_padding(Padding::SameLower)
                .groups(2)
                .stride(2, 1),
        ),
        ([7, 12, 5, 6], [9, 12, 1, 1], Conv2dParams::default()),
        // Grouped pointwise, images split over the threads (image-by-image backward).
        (
            [4, 12, 9, 10],
            [9, 4, 1, 1],
            Conv2dParams::default().groups(3),
        ),
        ([64, 3, 14, 14], [8, 3, 3, 3], same),
        // im2col with too few images for the threads: split inside the images (odd channel
        // counts, so the threads' shares differ).
        (
            [1, 6, 20, 21],
            [10, 3, 3, 2],
            explicit(1, 0, 2, 1).groups(2).stride(2, 1),
        ),
        ([3, 5, 9, 7], [7, 5, 3, 3], same.stride(2, 2)),
        // ... grad-weight by pixel ranges, two per thread (K = 1053: 995-pixel tiles).
        ([1, 117, 40, 50], [4, 117, 3, 3], same),
        // Asymmetric explicit padding on an image too small for Winograd (20 tiles).
        ([4, 16, 9, 8], [8, 16, 3, 3], explicit(2, 0, 1, 2)),
        // Implicit GEMM (at least 256 output pixels, batch per thread): strided, dilated,
        // grouped, non-square, asymmetric padding.
        (
            [2, 6, 33, 35],
            [8, 3, 3, 2],
            explicit(2, 0, 1, 3).groups(2).stride(1, 2),
        ),
        (
            [2, 5, 40, 38],
            [7, 5, 5, 3],
            Conv2dParams::with_padding(Padding::SameLower)
                .dilation(2, 1)
                .stride(2, 1),
        ),
        (
            [3, 9, 18, 20],
            [4, 9, 1, 3],
            Conv2dParams::with_padding(Padding::symmetric(0, 1)),
        ),
    ];

    for (i, (input, weight, p)) in cases
        .into_iter()
        .chain(winograd_cases())
        .chain(winograd_f4_cases())
        .chain(winograd_f4_grad_weight_cases())
        .chain(strided_implicit_cases())
        .chain(implicit_grad_weight_cases())
        .chain(blocked_depthwise_cases())
        .chain(wide_depthwise_cases())
        .chain(shifted_grad_weight_cases())
        .chain(shifted_within_images_cases())
        .chain(in_place_cases())
        .chain(small_column_kernel_cases())
        .chain(transposed_cases())
        .chain(tap_grad_weight_cases())
        .chain(channels_last_cases())
        .chain(shifted_dispatch_cases())
        .chain(phase_grad_weight_cases())
        .chain(pointwise_split_cases())
        .chain(deep_pointwise_cases())
        .chain(implicit_within_images_cases())
        .chain(transposed_grad_weight_cases())
        .chain(band_forward_cases())
        .chain(row_depthwise_cases())
        .enumerate()
    {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        check_fast_against_reference(&g, i as u64);
    }
}

/// The larger-shapes test's pointwise layers whose images split over the threads (or run on
/// one) take the image-by-image backward; 7 images on 2 threads keep the three passes, split
/// inside the images (`pointwise_split`).
#[test]
fn pointwise_cases_take_the_image_by_image_backward() {
    let cases: [Case; 2] = [
        ([2, 16, 17, 17], [32, 16, 1, 1], Conv2dParams::default()),
        (
            [4, 12, 9, 10],
            [9, 4, 1, 1],
            Conv2dParams::default().groups(3),
        ),
    ];
    assert_for_every_case(cases, |exec, g| {
        sepconv::kernels::conv::pointwise_backward_applies(exec, g)
    });
    let odd = ConvGeometry::new([7, 12, 5, 6], [9, 12, 1, 1], &Conv2dParams::default()).unwrap();
    assert!(sepconv::kernels::conv::pointwise_backward_applies(
        exec(1),
        &odd
    ));
    assert!(!sepconv::kernels::conv::pointwise_backward_applies(
        exec(2),
        &odd
    ));
}

/// Pointwise layers with 512 output channels per group (in the larger-shapes test): their
/// grad-input reads a row-major copy of `Wᵀ` with every instruction set (K = 512), on whole
/// images (2 images) and split inside one (grouped, 1 image on 2 threads); 35 and 30 pixels
/// leave columns short of a vector.
fn deep_pointwise_cases() -> [Case; 2] {
    [
        ([2, 24, 5, 7], [512, 24, 1, 1], Conv2dParams::default()),
        (
            [1, 16, 6, 5],
            [1024, 8, 1, 1],
            Conv2dParams::default().groups(2),
        ),
    ]
}

/// Pointwise layers with fewer images than the threads can share evenly (in the larger-shapes
/// test).
fn pointwise_split_cases() -> [Case; 3] {
    [
        ([1, 16, 40, 52], [24, 16, 1, 1], Conv2dParams::default()),
        (
            [1, 20, 45, 46],
            [12, 10, 1, 1],
            Conv2dParams::default().groups(2),
        ),
        (
            [3, 12, 9, 10],
            [9, 4, 1, 1],
            Conv2dParams::default().groups(3),
        ),
    ]
}

/// Pointwise layers with fewer images than the threads can share evenly split inside the
/// images on two threads: grad-weight by pixel ranges (the first two, at least 1024 pixels per
/// task) or by rows (the third, whose runs of rows cross groups and images).
#[test]
fn pointwise_cases_with_few_images_split_inside_them() {
    for (input, weight, p) in pointwise_split_cases() {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        let split = sepconv::kernels::pointwise_split::applies;
        assert!(split(exec(2), &g), "{input:?}");
        assert!(!split(exec(1), &g), "{input:?}");
    }
}

/// Winograd 3 × 3 shapes: F(2×2, 3×3) on outputs under 20 columns (at least 32 tiles per
/// image), F(4×4, 3×3) on wider ones (29, 40, 66, 47, 27 and 23 columns): odd and even sizes
/// and sizes that are not multiples of the tile, valid, asymmetric and large padding
/// (grad-input falls back past pad 2), the packed-GEMM path (more than 256 input channels), and
/// images split over two threads by channels (too few tiles) or by tile rows (one image; three
/// images, an odd output height); small images several to a block (49 and 42 tiles: ten images
/// on one thread in blocks of six and four, five or three per thread on two); and one image of
/// 20 × 10 F(2×2) tiles, whose grad-weight two threads split inside it; and 128 channels on
/// 64-tile images, enough channels for blocks past the cache's size (four images to a block:
/// one thread's five images in blocks of four and one, two threads' three and two); and four
/// 7 × 7 images (16 tiles each, Winograd only with a batch of four or more).
fn winograd_cases() -> [Case; 17] {
    let same = Conv2dParams::with_padding(Padding::Same);
    [
        ([2, 8, 37, 29], [16, 8, 3, 3], same),
        ([3, 12, 17, 18], [9, 12, 3, 3], Conv2dParams::default()),
        ([4, 16, 15, 14], [8, 16, 3, 3], explicit(2, 0, 1, 2)),
        (
            [1, 10, 12, 12],
            [12, 10, 3, 3],
            Conv2dParams::with_padding(Padding::symmetric(3, 3)),
        ),
        ([2, 300, 12, 11], [9, 300, 3, 3], same),
        // One image on two threads: split inside it, over two blocks of tile rows.
        ([1, 300, 40, 40], [9, 300, 3, 3], same),
        // Split by tile rows: 35 × 33 tiles, each thread's run in blocks of 8 tile rows.
        ([1, 8, 70, 66], [12, 8, 3, 3], explicit(1, 0, 1, 1)),
        ([3, 10, 45, 47], [9, 10, 3, 3], same),
        ([10, 8, 14, 14], [16, 8, 3, 3], same),
        ([6, 9, 13, 11], [8, 9, 3, 3], same),
        ([2, 9, 23, 26], [10, 9, 3, 3], explicit(2, 0, 1, 2)),
        ([2, 8, 30, 25], [8, 8, 3, 3], Conv2dParams::default()),
        // One image of 20 × 10 tiles: on two threads, its grad-weight split inside it.
        ([1, 16, 40, 19], [16, 16, 3, 3], same),
        ([5, 128, 16, 16], [128, 128, 3, 3], same),
        // Blocks of whole images shared by two threads in the grad-weight: seven 36-tile
        // images and one (F(2×2, 3×3)), two 25-tile images (F(4×4, 3×3)).
        ([8, 256, 12, 12], [256, 256, 3, 3], same),
        ([2, 256, 20, 20], [256, 256, 3, 3], same),
        ([4, 9, 7, 7], [10, 9, 3, 3], same),
    ]
}

/// Winograd F(4, 3) shapes, 3 × 1 (down the columns) and 1 × 3 (along the rows), with the
/// channels it takes (harmonic mean at least 96): output sizes that are not multiples of the
/// 4-wide tile, "same", valid, asymmetric and cross-axis padding (rows of zeros above a 1 × 3
/// kernel, columns beside a 3 × 1), tile rows longer than a vector (1 × 3 across 150 columns:
/// 38 tiles), the packed GEMM (more than 256 input channels), small images several to a block
/// (ten 12 × 12), and one image split over two threads by tile rows (3 × 1 on 130 × 66, 33 × 66
/// tiles) or by channels.
fn winograd_f4_cases() -> [Case; 10] {
    let same = Conv2dParams::with_padding(Padding::Same);
    [
        ([2, 96, 13, 19], [100, 96, 3, 1], same),
        ([2, 100, 11, 37], [96, 100, 1, 3], same),
        ([2, 96, 18, 9], [112, 96, 3, 1], Conv2dParams::default()),
        ([2, 128, 9, 30], [80, 128, 1, 3], explicit(1, 2, 2, 0)),
        ([2, 80, 17, 12], [128, 80, 3, 1], explicit(2, 0, 1, 2)),
        ([1, 96, 6, 150], [96, 96, 1, 3], same),
        ([2, 300, 12, 11], [96, 300, 1, 3], same),
        ([10, 96, 12, 12], [96, 96, 3, 1], same),
        ([10, 96, 12, 12], [96, 96, 1, 3], same),
        ([1, 96, 130, 66], [100, 96, 3, 1], same),
    ]
}

/// 3 × 1 and 1 × 3 shapes with too few channels for F(4, 3)'s forward (harmonic mean 40–95)
/// on images of at least 128 tiles: their grad-weight alone runs on Winograd. Batches of two
/// (image by image) and one image (split inside it on two threads).
fn winograd_f4_grad_weight_cases() -> [Case; 3] {
    let same = Conv2dParams::with_padding(Padding::Same);
    [
        // 11 × 12 tiles of 4 × 1.
        ([2, 40, 44, 12], [48, 40, 3, 1], same),
        // 12 × 11 tiles of 1 × 4, the last one partial.
        ([1, 48, 12, 43], [40, 48, 1, 3], same),
        ([2, 32, 15, 36], [64, 32, 1, 3], explicit(1, 0, 2, 0)),
    ]
}

/// The low-channel F(4, 3) shapes take Winograd's grad-weight, and not its forward.
#[test]
fn low_channel_f4_cases_take_only_the_winograd_grad_weight() {
    assert_for_every_case(winograd_f4_grad_weight_cases(), |exec, g| {
        GradWeightKernel::choose(exec, g) == GradWeightKernel::Winograd
            && ConvAlgorithm::choose(exec, g) != ConvAlgorithm::Winograd
    });
}

/// Every Winograd shape of the larger-shapes test (F(2×2, 3×3) and F(4, 3)) runs on Winograd.
#[test]
fn winograd_cases_take_the_winograd_path() {
    let cases = winograd_cases().into_iter().chain(winograd_f4_cases());
    assert_for_every_case(cases, |exec, g| {
        ConvAlgorithm::choose(exec, g) == ConvAlgorithm::Winograd
    });
    // 7 × 7 images (16 tiles) only from four images up; 6 × 6 ones (9 tiles) never.
    let same = Conv2dParams::with_padding(Padding::Same);
    for (input, winograd) in [
        ([4, 16, 7, 7], true),
        ([3, 16, 7, 7], false),
        ([64, 16, 6, 6], false),
    ] {
        let g = ConvGeometry::new(input, [16, 16, 3, 3], &same).unwrap();
        let chosen = ConvAlgorithm::choose(exec(1), &g) == ConvAlgorithm::Winograd;
        assert_eq!(chosen, winograd, "{input:?}");
    }
}

/// The Winograd cases reach every transform: F(2×2, 3×3) and F(4×4, 3×3) among the 3 × 3
/// ones, F(4, 3) down and across among the others.
#[test]
fn winograd_cases_cover_every_transform() {
    use sepconv::kernels::winograd::Transform;
    let of =
        |(input, weight, p): Case| Transform::of(&ConvGeometry::new(input, weight, &p).unwrap());
    let count = |cases: &[Option<Transform>], t| cases.iter().filter(|&&c| c == Some(t)).count();
    let square: Vec<_> = winograd_cases().into_iter().map(of).collect();
    assert_eq!(count(&square, Transform::F2x2), 10);
    assert_eq!(count(&square, Transform::F4x4), 7);
    let axis: Vec<_> = winograd_f4_cases().into_iter().map(of).collect();
    assert_eq!(count(&axis, Transform::F4Down), 5);
    assert_eq!(count(&axis, Transform::F4Across), 5);
}

/// The Winograd shapes' grad-weight runs on Winograd too: on one thread all but the 8-channel
/// 70 × 66 image (the shifted kernel's); on two all but the one-, three- and five-image
/// batches of fewer than 128 tiles per image (81, 36, 100 and 64), which the threads would
/// split inside the images. Each count reaches every transform, and so do, on two threads,
/// the one- and three-image batches (split inside the images: transforms by channels,
/// products by ξ).
#[test]
fn winograd_cases_take_the_winograd_grad_weight() {
    use sepconv::kernels::winograd::Transform;
    let cases: Vec<ConvGeometry> = winograd_cases()
        .into_iter()
        .chain(winograd_f4_cases())
        .map(|(input, weight, p)| ConvGeometry::new(input, weight, &p).unwrap())
        .collect();
    let every = [
        Transform::F2x2,
        Transform::F4x4,
        Transform::F4Down,
        Transform::F4Across,
    ];
    for (threads, want) in [(1, 26), (2, 23)] {
        let on_winograd: Vec<&ConvGeometry> = cases
            .iter()
            .filter(|g| GradWeightKernel::choose(exec(threads), g) == GradWeightKernel::Winograd)
            .collect();
        assert_eq!(on_winograd.len(), want, "{threads} threads");
        let within: Vec<_> = on_winograd.iter().filter(|g| g.batch % 2 == 1).collect();
        for t in every {
            assert!(
                on_winograd.iter().any(|g| Transform::of(g) == Some(t)),
                "{t:?} on {threads} threads"
            );
            assert!(
                threads == 1 || within.iter().any(|g| Transform::of(g) == Some(t)),
                "{t:?} split inside the images"
            );
        }
    }
}

/// Winograd's per-task blocks of whole images are sized by the images a task runs, not by the
/// block the layer would like: 128 → 128 at 14 × 14 (49 tiles, F(2×2, 3×3)) wants five images
/// to a block, but at batch 8 on two threads each task has four, so the forward's workspace is
/// exactly two images' V and products (16 ξ × 256 channels × 49 tiles each) smaller than at
/// batch 10 (five a task); the grad-weight's too. They were the same size before.
#[test]
fn winograd_blocks_hold_only_a_tasks_images() {
    let bytes = |batch: usize, grad_weight: bool| {
        let g = ConvGeometry::new(
            [batch, 128, 14, 14],
            [128, 128, 3, 3],
            &Conv2dParams::with_padding(Padding::Same),
        )
        .unwrap();
        let mut rng = Rng::new(7);
        let x = rng.vec(g.input_len());
        let w = rng.vec(g.weight_len());
        let mut y = vec![0.0; g.output_len()];
        let mut ws = Workspace::new();
        kernels::conv2d_forward(exec(2), &g, &x, &w, None, &mut y, &mut ws).unwrap();
        if grad_weight {
            let mut ws = Workspace::new();
            let mut gw = vec![0.0; g.weight_len()];
            kernels::conv2d_grad_weight(exec(2), &g, &x, &y, &mut gw, &mut ws).unwrap();
            return ws.bytes();
        }
        ws.bytes()
    };
    let two_images = 2 * 16 * (128 + 128) * 49 * 4;
    for grad_weight in [false, true] {
        assert_eq!(bytes(10, grad_weight) - bytes(8, grad_weight), two_images);
    }
}

/// On two threads the grad-weight of the Winograd cases with 256 channels shares blocks of
/// their images (one dU for both threads), and no other case's does; on one thread none.
#[test]
fn many_channel_winograd_cases_share_image_blocks() {
    use sepconv::kernels::winograd_grad_weight::shares_image_blocks;
    for (input, weight, p) in winograd_cases().into_iter().chain(winograd_f4_cases()) {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        assert!(!shares_image_blocks(exec(1), &g), "{input:?}");
        let many = input[1] == 256;
        assert_eq!(shares_image_blocks(exec(2), &g), many, "{input:?}");
    }
}

/// A shape: input NCHW, weight OIHW, parameters.
type Case = ([usize; 4], [usize; 4], Conv2dParams);

/// Asserts `holds(exec, geometry)` for every case with one and two threads: the path tests,
/// which make sure the fast-vs-reference shapes reach the kernel they were chosen for.
fn assert_for_every_case(
    cases: impl IntoIterator<Item = Case>,
    holds: impl Fn(sepconv::Exec, &ConvGeometry) -> bool,
) {
    for (input, weight, p) in cases {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        for threads in [1, 2] {
            assert!(holds(exec(threads), &g), "{input:?}, {threads} threads");
        }
    }
}

/// Implicit GEMMs with too few images for the threads: on small images (128–255 output
/// pixels) a 1 × k kernel run transposed (one image) and a k × 1 written flat (three images);
/// a 1 × 1 at stride 2 (one image; three input phases get no tap, the threads 3 and 2 input
/// channels); read in place, a grouped 1 × k kernel (edge columns recomputed) and a k × 1
/// kernel (padding rows from strips), one image each; and a grouped strided layer whose flat
/// output is copied (three images; odd channel counts per thread). The strided ones'
/// grad-input splits inside the images too.
fn implicit_within_images_cases() -> [Case; 6] {
    [
        (
            [1, 6, 12, 14],
            [9, 6, 1, 3],
            Conv2dParams::with_padding(Padding::symmetric(0, 1)),
        ),
        (
            [3, 5, 14, 12],
            [7, 5, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
        (
            [1, 5, 40, 36],
            [7, 5, 1, 1],
            Conv2dParams::default().stride(2, 2),
        ),
        // Read in place: a grouped 1 × k "same" kernel (edge columns recomputed), then a k × 1
        // (padding rows from strips).
        (
            [1, 6, 24, 23],
            [10, 3, 1, 3],
            Conv2dParams::with_padding(Padding::symmetric(0, 1)).groups(2),
        ),
        (
            [1, 5, 30, 20],
            [7, 5, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
        (
            [3, 6, 33, 20],
            [10, 3, 3, 3],
            Conv2dParams::with_padding(Padding::Same)
                .groups(2)
                .stride(2, 1),
        ),
    ]
}

/// Their forward (and the strided ones' grad-input) splits each image over two threads, and
/// runs image by image on one.
#[test]
fn implicit_cases_with_few_images_split_inside_them() {
    use sepconv::kernels::implicit::{
        forward_within_images_applies, grad_input_within_images_applies,
    };
    for (input, weight, p) in implicit_within_images_cases() {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        let strided = g.stride_h > 1 || g.stride_w > 1;
        for (threads, within) in [(1, false), (2, true)] {
            let exec = exec(threads);
            assert_eq!(forward_within_images_applies(exec, &g), within, "{input:?}");
            if strided {
                assert_eq!(
                    grad_input_within_images_applies(exec, &g),
                    within,
                    "{input:?}"
                );
            }
        }
    }
}

/// Layers whose grad-weight splits each image over the threads by input channels, on a
/// transposed copy of each thread's channels (at least 16 per thread): a 3 × 3 stride 2 like
/// reference layer E (one image), a grouped 1 × 3 at stride (1, 2) on three images, a dilated
/// 3 × 2 (six taps: the interleave without a fixed tap count) with asymmetric padding, a
/// stride-1 3 × 1 on three images, and a 3 × 1 whose grad-weight is large enough to be
/// streamed (294 912 floats, like reference layer D's halves at batch 1).
fn transposed_grad_weight_cases() -> [Case; 5] {
    [
        (
            [1, 34, 34, 34],
            [20, 34, 3, 3],
            Conv2dParams::with_padding(Padding::Same).stride(2, 2),
        ),
        (
            [3, 64, 20, 40],
            [18, 32, 1, 3],
            Conv2dParams::with_padding(Padding::symmetric(0, 1))
                .groups(2)
                .stride(1, 2),
        ),
        (
            [1, 40, 36, 30],
            [32, 40, 3, 2],
            explicit(2, 0, 1, 3).dilation(1, 2).stride(2, 2),
        ),
        (
            [3, 40, 12, 14],
            [24, 40, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
        (
            [1, 256, 6, 7],
            [384, 256, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
    ]
}

/// They take that kernel on two threads and another on one.
#[test]
fn transposed_grad_weight_cases_take_that_path() {
    for (input, weight, p) in transposed_grad_weight_cases() {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        let (one, two) = (exec(1), exec(2));
        assert_eq!(
            GradWeightKernel::choose(two, &g),
            GradWeightKernel::TransposedInput,
            "{input:?}"
        );
        assert_ne!(
            GradWeightKernel::choose(one, &g),
            GradWeightKernel::TransposedInput,
            "{input:?}"
        );
    }
}

/// The split by input channels on 3 and 4 threads (uneven shares, down to 7 channels), run
/// directly: the dispatch gives it at most the threads the tests' machines have. Every
/// element is written (the output starts as NaN).
#[test]
fn transposed_grad_weight_splits_unevenly() {
    for (input, weight, p) in transposed_grad_weight_cases() {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        let d = data(&g, 7);
        let mut gw_ref = vec![0.0; g.weight_len()];
        reference::conv2d_grad_weight(&g, &d.x, &d.gy, &mut gw_ref);
        for threads in [3, 4] {
            let pool = rayon::ThreadPoolBuilder::new()
                .num_threads(threads)
                .build()
                .unwrap();
            let mut gw = vec![f32::NAN; g.weight_len()];
            pool.install(|| {
                sepconv::kernels::transposed_grad_weight::grad_weight(
                    exec(threads),
                    &g,
                    &d.x,
                    &d.gy,
                    &mut gw,
                    &mut Workspace::new(),
                )
            })
            .unwrap();
            assert_close(&gw, &gw_ref, 1e-4, &format!("{threads} threads {g:?}"));
        }
    }
}

/// Implicit-GEMM forwards with too few images for the threads that split each image by bands
/// of output rows (at least 256 output positions per thread): a 3 × 3 stride 2 with width
/// padding (the flat product copied into the band's rows), a 3 × 1 at stride (2, 1) without
/// (the product written into the band's rows directly), a grouped dilated 3 × 2 with
/// asymmetric padding on three images, a padding taller than a band's reach (the rows that
/// read only padding join the next band: one band), and a 1 × 3 at stride (1, 2) like reference
/// layer E's half with 280 positions per band.
fn band_forward_cases() -> [Case; 5] {
    [
        (
            [1, 6, 20, 56],
            [8, 6, 1, 3],
            Conv2dParams::with_padding(Padding::Same).stride(1, 2),
        ),
        (
            [1, 4, 80, 60],
            [6, 4, 3, 3],
            Conv2dParams::with_padding(Padding::Same).stride(2, 2),
        ),
        (
            [1, 8, 64, 40],
            [8, 8, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)).stride(2, 1),
        ),
        (
            [3, 6, 50, 30],
            [8, 3, 3, 2],
            explicit(3, 0, 1, 2).dilation(2, 1).groups(2),
        ),
        ([1, 3, 40, 40], [4, 3, 3, 2], explicit(45, 0, 1, 0)),
    ]
}

/// They split by bands on two threads, not on one.
#[test]
fn band_forward_cases_split_by_bands() {
    use sepconv::kernels::implicit::{forward_within_images_applies, splits_by_bands};
    for (input, weight, p) in band_forward_cases() {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        let (one, two) = (exec(1), exec(2));
        assert!(forward_within_images_applies(two, &g), "{input:?}");
        assert!(splits_by_bands(two, &g), "{input:?}");
        assert!(!forward_within_images_applies(one, &g), "{input:?}");
    }
}

/// Strided shapes on the implicit GEMM, whose grad-input runs per input phase: a 3×3 stride-2
/// layer like reference layer E, a 1×1 stride 2 (three phases receive no tap) and a stride-3
/// dilated non-square kernel with asymmetric padding.
fn strided_implicit_cases() -> [Case; 3] {
    [
        (
            [2, 6, 34, 34],
            [8, 6, 3, 3],
            Conv2dParams::with_padding(Padding::Same).stride(2, 2),
        ),
        (
            [2, 5, 40, 36],
            [7, 5, 1, 1],
            Conv2dParams::default().stride(2, 2),
        ),
        (
            [2, 4, 60, 57],
            [5, 4, 4, 2],
            explicit(2, 1, 0, 3).stride(3, 2).dilation(1, 2),
        ),
    ]
}

/// The strided shapes run on the implicit GEMM with one and two threads (so their grad-input
/// is the per-phase implicit GEMM), and their grad-weight on the per-tap GEMMs over phase
/// planes.
#[test]
fn strided_cases_take_the_implicit_path() {
    assert_for_every_case(strided_implicit_cases(), |exec, g| {
        ConvAlgorithm::choose(exec, g) == ConvAlgorithm::Implicit
            && GradWeightKernel::choose(exec, g) == GradWeightKernel::TapGemmPhases
    });
}

/// More strided shapes for the per-tap GEMMs over phase planes: a grouped 3 × 1 strided down
/// only, whose output gradient is used in place (its rows are as wide as the phase planes'),
/// and a 3 × 3 at stride 2 on three images (an uneven split over two tasks).
fn phase_grad_weight_cases() -> [Case; 2] {
    [
        (
            [2, 6, 20, 16],
            [8, 3, 3, 1],
            explicit(1, 1, 0, 0).groups(2).stride(2, 1),
        ),
        (
            [3, 5, 17, 19],
            [7, 5, 3, 3],
            Conv2dParams::with_padding(Padding::Same).stride(2, 2),
        ),
    ]
}

#[test]
fn strided_layers_take_the_phase_tap_grad_weight() {
    assert_for_every_case(phase_grad_weight_cases(), |exec, g| {
        GradWeightKernel::choose(exec, g) == GradWeightKernel::TapGemmPhases
    });
}

/// Shapes whose grad-weight runs on the implicit GEMM (long im2col rows, at least 128 output
/// channels per group, stride 1 without "same" padding, which the per-tap GEMMs take): a
/// channel count and width that leave partial transpose blocks (dilated across: undilated, the
/// grad-weight runs on Winograd), and grouped (a Winograd forward).
fn implicit_grad_weight_cases() -> [Case; 2] {
    [
        (
            [2, 64, 34, 34],
            [130, 64, 3, 3],
            Conv2dParams::default().dilation(1, 2),
        ),
        (
            [2, 128, 18, 20],
            [256, 64, 3, 3],
            Conv2dParams::default().groups(2),
        ),
    ]
}

#[test]
fn long_products_take_the_implicit_grad_weight() {
    assert_for_every_case(implicit_grad_weight_cases(), |exec, g| {
        GradWeightKernel::choose(exec, g) == GradWeightKernel::Implicit
    });
}

/// Implicit-GEMM shapes whose forward reads the input in place (stride 1, output as wide as the
/// input, padding one way only): a 1 × 3 kernel dilated across with asymmetric width padding
/// (its adjoint grad-input runs in place too) and a grouped 2 × 3 kernel, whose edge columns
/// are recomputed; then k × 1 kernels, whose padding rows run from strips: a 3 × 1 with
/// symmetric padding, a grouped, dilated 2 × 1 padded unevenly (one row above, two below), a
/// 5 × 1 on planes five rows high, whose strips reach past the plane at both ends, and a
/// 1 × 1 padded above only (one strip of one row, the other empty).
fn in_place_cases() -> [Case; 6] {
    [
        (
            [2, 6, 17, 40],
            [5, 6, 1, 3],
            explicit(0, 0, 1, 3).dilation(1, 2),
        ),
        ([2, 8, 20, 24], [6, 4, 2, 3], explicit(0, 0, 2, 0).groups(2)),
        (
            [2, 6, 40, 20],
            [4, 6, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
        (
            [3, 8, 36, 24],
            [6, 4, 2, 1],
            explicit(1, 2, 0, 0).groups(2).dilation(3, 1),
        ),
        (
            [2, 4, 5, 60],
            [3, 4, 5, 1],
            Conv2dParams::with_padding(Padding::symmetric(2, 0)),
        ),
        ([2, 3, 20, 16], [2, 3, 1, 1], explicit(1, 0, 0, 0)),
    ]
}

#[test]
fn one_way_padded_kernels_take_the_in_place_forward() {
    assert_for_every_case(in_place_cases(), |exec, g| {
        ConvAlgorithm::choose(exec, g) == ConvAlgorithm::Implicit
            && sepconv::kernels::implicit::reads_in_place(g)
    });
    // Where a k × 1 kernel's weights are large against its planes (reference layer D's 3 × 1
    // half), its padding-row products would read them again for a few columns: phase planes.
    let d = ConvGeometry::new(
        [8, 512, 14, 14],
        [512, 512, 3, 1],
        &Conv2dParams::with_padding(Padding::symmetric(1, 0)),
    )
    .unwrap();
    assert!(!sepconv::kernels::implicit::reads_in_place(&d));
}

/// k × 1 kernels on images of 128 to 255 output pixels, which the implicit GEMM computes only
/// because its product needs no columns beyond the output's: a grouped 3 × 1 whose 20 rows of
/// adjoint weight split unevenly into blocks across the groups, and a dilated 2 × 1 with padding
/// above only.
fn small_column_kernel_cases() -> [Case; 2] {
    [
        (
            [2, 20, 12, 14],
            [24, 10, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)).groups(2),
        ),
        (
            [3, 7, 16, 9],
            [5, 7, 2, 1],
            explicit(1, 0, 0, 0).dilation(2, 1),
        ),
    ]
}

/// 1 × k kernels on images of 128 to 255 output pixels, which the implicit GEMM computes as
/// their transposes (k × 1 on the transposed planes): a 1 × 3 on 14 × 14 like reference layer
/// D's half of the spatially separable layer; a grouped, dilated 1 × 5 strided across with
/// asymmetric padding (planes of 9 × 40, transposed phases of unequal length); and planes
/// taller and wider than one 16 × 16 register block with partial blocks on both edges, no
/// padding on the right. Then a 1 × 7 "same" on 17 × 17 (Inception's; 289 pixels, but 6 of
/// 17 columns padding), on a batch that splits over the threads and on one image split inside.
fn transposed_cases() -> [Case; 5] {
    [
        (
            [2, 6, 14, 14],
            [7, 6, 1, 3],
            Conv2dParams::with_padding(Padding::Same),
        ),
        (
            [3, 8, 9, 40],
            [10, 4, 1, 5],
            explicit(0, 0, 3, 1).groups(2).dilation(1, 2).stride(1, 2),
        ),
        ([2, 5, 18, 13], [9, 5, 1, 2], explicit(0, 0, 1, 0)),
        (
            [2, 12, 17, 17],
            [11, 12, 1, 7],
            Conv2dParams::with_padding(Padding::Same),
        ),
        (
            [1, 9, 17, 17],
            [6, 9, 1, 7],
            Conv2dParams::with_padding(Padding::Same),
        ),
    ]
}

#[test]
fn small_row_kernels_take_the_transposed_implicit_gemm() {
    use sepconv::kernels::implicit;
    assert_for_every_case(transposed_cases(), |exec, g| {
        (ConvAlgorithm::choose(exec, g) == ConvAlgorithm::Implicit
            || implicit::forward_within_images_applies(exec, g))
            && implicit::runs_transposed(g)
    });
}

#[test]
fn small_column_kernels_take_the_implicit_gemm() {
    assert_for_every_case(small_column_kernel_cases(), |exec, g| {
        ConvAlgorithm::choose(exec, g) == ConvAlgorithm::Implicit && g.out_pixels() < 256
    });
}

/// Stride-1, same-width shapes whose grad-weight runs as dot products over shifted planes:
/// column kernels with channel counts that leave partial register tiles (7 inputs, 9 outputs)
/// and a batch that splits unevenly; 128 channels on a plane larger than one chunk of rows;
/// grouped, dilated, with asymmetric height padding; a padding so large that the first tap
/// never lands; and kernels with column shifts (row segments) on rows at least 64 wide: a 1 × 3,
/// a dilated 1 × 3 with asymmetric width padding, and a grouped 3 × 3 with padding on one side.
/// Then shapes for the tiles that compute up to three taps at once (each tap's loads masked to
/// the columns where it lands): a 3 × 3 on rows 70 wide (not a whole number of vectors), a
/// dilated 5 × 5 (groups that span two kernel rows), an asymmetric 1 × 5 (groups of three and
/// two), and a dilated 2 × 1 whose two taps land on rows with a gap between them.
fn shifted_grad_weight_cases() -> [Case; 11] {
    [
        (
            [3, 7, 40, 52],
            [9, 7, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
        (
            [2, 128, 48, 48],
            [5, 128, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
        (
            [2, 8, 20, 36],
            [6, 4, 5, 1],
            explicit(3, 0, 0, 0).groups(2).dilation(2, 1),
        ),
        (
            [2, 3, 4, 40],
            [4, 3, 3, 1],
            explicit(10, 0, 0, 0).dilation(2, 1),
        ),
        (
            [3, 7, 5, 70],
            [9, 7, 1, 3],
            Conv2dParams::with_padding(Padding::symmetric(0, 1)),
        ),
        (
            [2, 5, 4, 67],
            [6, 5, 1, 3],
            explicit(0, 0, 3, 1).dilation(1, 2),
        ),
        ([2, 8, 6, 64], [6, 4, 3, 3], explicit(1, 1, 0, 2).groups(2)),
        (
            [2, 6, 5, 70],
            [7, 6, 3, 3],
            Conv2dParams::with_padding(Padding::symmetric(1, 1)),
        ),
        (
            [2, 4, 9, 66],
            [5, 4, 5, 5],
            explicit(2, 2, 5, 3).dilation(1, 2),
        ),
        ([2, 5, 4, 67], [6, 5, 1, 5], explicit(0, 0, 1, 3)),
        (
            [2, 5, 3, 48],
            [4, 5, 2, 1],
            explicit(4, 4, 0, 0).dilation(4, 1),
        ),
    ]
}

/// Shapes whose one image (or three) the shifted grad-weight splits over two threads by output
/// rows (at least 56 × 56 output pixels per thread): a 3 × 1, a 1 × 3 (row segments), and a
/// grouped 3 × 3 on three images.
fn shifted_within_images_cases() -> [Case; 3] {
    [
        (
            [1, 3, 80, 80],
            [4, 3, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
        (
            [1, 4, 70, 96],
            [5, 4, 1, 3],
            Conv2dParams::with_padding(Padding::symmetric(0, 1)),
        ),
        (
            [3, 4, 64, 100],
            [6, 2, 3, 3],
            Conv2dParams::with_padding(Padding::Same).groups(2),
        ),
    ]
}

/// They take the shifted grad-weight split inside the images on two threads, and the image
/// split (or another kernel) on one.
#[test]
fn shifted_within_images_cases_take_that_path() {
    use sepconv::kernels::shifted_grad_weight::within_images_applies;
    for (input, weight, p) in shifted_within_images_cases() {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        let two = exec(2);
        assert!(within_images_applies(two, &g), "{input:?}");
        assert_eq!(GradWeightKernel::choose(two, &g), GradWeightKernel::Shifted);
        assert!(!within_images_applies(exec(1), &g), "{input:?}");
    }
}

/// The shifted kernel covers every shape above, though the dispatch sends most of these small
/// ones to the per-tap GEMM: so it is run directly and checked against the reference here.
#[test]
fn shifted_grad_weight_equals_reference_where_it_applies() {
    assert_for_every_case(
        shifted_grad_weight_cases(),
        sepconv::kernels::shifted_grad_weight::applies,
    );
    for (i, (input, weight, p)) in shifted_grad_weight_cases().into_iter().enumerate() {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        let d = data(&g, 100 + i as u64);
        let mut gw_ref = vec![0.0; g.weight_len()];
        reference::conv2d_grad_weight(&g, &d.x, &d.gy, &mut gw_ref);
        for exec in execs() {
            let mut gw = vec![f32::NAN; g.weight_len()];
            kernels::shifted_grad_weight::grad_weight(
                exec,
                &g,
                &d.x,
                &d.gy,
                &mut gw,
                None,
                &mut Workspace::new(),
            )
            .unwrap();
            assert_close(&gw, &gw_ref, 1e-4, &format!("{exec:?} {g:?}"));
            // With grad-bias from the same pass: bit for bit the separate pass's.
            let (mut gw_b, mut gb) = (
                vec![f32::NAN; g.weight_len()],
                vec![f32::NAN; g.out_channels],
            );
            kernels::shifted_grad_weight::grad_weight(
                exec,
                &g,
                &d.x,
                &d.gy,
                &mut gw_b,
                Some(&mut gb),
                &mut Workspace::new(),
            )
            .unwrap();
            let mut gb_alone = vec![0.0; g.out_channels];
            kernels::conv2d_grad_bias(exec, &g, &d.gy, &mut gb_alone);
            assert_eq!(gw_b, gw, "grad-weight with grad-bias {exec:?} {g:?}");
            assert_eq!(gb, gb_alone, "grad-bias {exec:?} {g:?}");
        }
    }
}

/// Shapes whose grad-weight the dispatch sends to the shifted kernel (large images, few
/// channels): a 3 × 1 with 7 → 9 channels (partial tiles) on 3 images split over two tasks, and a
/// 1 × 3 dilated across with asymmetric width padding (row segments).
fn shifted_dispatch_cases() -> [Case; 2] {
    [
        (
            [3, 7, 60, 64],
            [9, 7, 3, 1],
            Conv2dParams::with_padding(Padding::symmetric(1, 0)),
        ),
        (
            [2, 5, 56, 67],
            [6, 5, 1, 3],
            explicit(0, 0, 3, 1).dilation(1, 2),
        ),
    ]
}

#[test]
fn large_images_with_few_channels_take_the_shifted_grad_weight() {
    assert_for_every_case(shifted_dispatch_cases(), |exec, g| {
        GradWeightKernel::choose(exec, g) == GradWeightKernel::Shifted
    });
}

/// Shapes on the per-tap GEMM grad-weight: column-shifted kernels, whose wrapped positions are
/// subtracted again (a 1 × 3 at width 9 where a fifth of the positions wrap, a dilated 1 × 3
/// with asymmetric width padding, a grouped 3 × 3 padded on one side), a 3 × 1 padded so far
/// above that its first tap never lands, and 5 × 1 dilated with 12 → 20 channels.
fn tap_grad_weight_cases() -> [Case; 5] {
    [
        (
            [3, 6, 7, 9],
            [5, 6, 1, 3],
            Conv2dParams::with_padding(Padding::symmetric(0, 1)),
        ),
        (
            [2, 5, 6, 20],
            [7, 5, 1, 3],
            explicit(0, 0, 3, 1).dilation(1, 2),
        ),
        ([2, 8, 9, 11], [6, 4, 3, 3], explicit(1, 1, 0, 2).groups(2)),
        (
            [2, 3, 4, 10],
            [4, 3, 3, 1],
            explicit(10, 0, 0, 0).dilation(2, 1),
        ),
        (
            [4, 12, 13, 8],
            [20, 12, 5, 1],
            explicit(4, 4, 0, 0).dilation(2, 1),
        ),
    ]
}

/// Shapes on the channels-last grad-weight (many channels, small images): channel counts that
/// are not multiples of 16 (a partial transpose block and copy row) or of 8 (a remainder row
/// block in each thread's share), a strided, dilated 3 × 2 with asymmetric padding, a grouped
/// 1 × 3, and a 3 × 3 dilated across over 980 output positions (two position chunks; undilated,
/// its grad-weight runs on Winograd).
fn channels_last_cases() -> [Case; 4] {
    let same = Conv2dParams::with_padding(Padding::Same);
    [
        ([2, 264, 5, 6], [257, 264, 3, 3], same),
        (
            [2, 256, 9, 7],
            [256, 256, 3, 2],
            explicit(2, 0, 1, 3).stride(2, 2).dilation(2, 1),
        ),
        ([2, 512, 4, 5], [512, 256, 1, 3], same.groups(2)),
        (
            [2, 256, 30, 35],
            [256, 256, 3, 3],
            explicit(0, 0, 2, 2).dilation(1, 2),
        ),
    ]
}

#[test]
fn many_channels_on_small_images_take_the_channels_last_grad_weight() {
    assert_for_every_case(channels_last_cases(), |exec, g| {
        GradWeightKernel::choose(exec, g) == GradWeightKernel::ChannelsLast
    });
}

#[test]
fn same_width_layers_take_the_tap_gemm_grad_weight() {
    assert_for_every_case(tap_grad_weight_cases(), |exec, g| {
        GradWeightKernel::choose(exec, g) == GradWeightKernel::TapGemm
    });
}

/// Depthwise shapes on the channel-blocked kernel: a 3 × 3 at stride 1 whose width leaves
/// partial transpose runs and a partial group of four output pixels (its grad-input runs there
/// too, as the adjoint), the same with valid padding (the adjoint pads by 2), a 5 × 3 kernel
/// at stride 2 with dilation and asymmetric padding (the general tap loop; its grad-input
/// gathers per residue class), a 5 × 3 at stride 1 dilated across with asymmetric padding (the
/// fused backward's general tap loops), a 3 × 3 at stride 2 "same" on odd and even sizes (as
/// reference layer E), a 3 × 1 strided down only, a 2 × 2 at stride 3 (a third of the input
/// rows get no tap), a 5 × 5 at stride 2 (classes of up to nine taps), a 3 × 3 at stride 2
/// without padding whose output rows are whole vectors on every instruction set (16 columns:
/// the last input column is read only by the last output's third tap), and a 5 × 5 at stride
/// 1 with asymmetric padding (eight output pixels at a time sharing row loads, then the 5 of
/// each 21-pixel row left; the row kernel takes it with AVX-512, this one with the others), and
/// one on more than 2^20 floats with rows wider than 32 columns (this kernel with AVX-512 too).
fn blocked_depthwise_cases() -> [Case; 11] {
    [
        (
            [2, 16, 13, 21],
            [16, 1, 3, 3],
            Conv2dParams::with_padding(Padding::Same).groups(16),
        ),
        (
            [3, 32, 9, 18],
            [32, 1, 3, 3],
            Conv2dParams::default().groups(32),
        ),
        (
            [2, 32, 17, 23],
            [32, 1, 5, 3],
            explicit(2, 1, 0, 3).groups(32).stride(2, 2).dilation(1, 2),
        ),
        (
            [2, 16, 11, 12],
            [16, 1, 5, 3],
            explicit(2, 1, 3, 0).groups(16).dilation(1, 2),
        ),
        (
            [2, 16, 15, 14],
            [16, 1, 3, 3],
            Conv2dParams::with_padding(Padding::Same)
                .groups(16)
                .stride(2, 2),
        ),
        (
            [3, 16, 10, 9],
            [16, 1, 3, 1],
            explicit(1, 1, 0, 0).groups(16).stride(2, 1),
        ),
        (
            [2, 16, 11, 13],
            [16, 1, 2, 2],
            explicit(1, 0, 0, 1).groups(16).stride(3, 3),
        ),
        (
            [2, 16, 12, 12],
            [16, 1, 5, 5],
            Conv2dParams::with_padding(Padding::Same)
                .groups(16)
                .stride(2, 2),
        ),
        (
            [2, 16, 9, 33],
            [16, 1, 3, 3],
            Conv2dParams::default().groups(16).stride(2, 2),
        ),
        (
            [2, 16, 13, 20],
            [16, 1, 5, 5],
            explicit(1, 3, 3, 2).groups(16),
        ),
        (
            [1, 32, 190, 180],
            [32, 1, 5, 5],
            Conv2dParams::with_padding(Padding::Same).groups(32),
        ),
    ]
}

/// Depthwise layers with more than 25 taps, whose forward (and grad-input at stride 1, the
/// adjoint forward) runs on the blocked kernel and whose grad-weight does not. 7 × 7 at stride
/// 1 (ConvNeXt's), in groups of eight output pixels and then one group of the rest: rows of
/// 7 ("same" on a 7 × 7 plane: the rest only), 21 (8 + 8 + 5), 19 with asymmetric padding
/// (8 + 8 + 3), and 9, 10, 12 and 14 (a rest of 1, 2, 4 and 6). Then the general tap loop: a
/// 7 × 7 at stride 2 and a 6 × 6 dilated across with asymmetric padding.
fn wide_depthwise_cases() -> [Case; 9] {
    let same = Conv2dParams::with_padding(Padding::Same);
    [
        ([2, 16, 7, 7], [16, 1, 7, 7], same.groups(16)),
        ([2, 32, 14, 21], [32, 1, 7, 7], same.groups(32)),
        (
            [2, 16, 12, 19],
            [16, 1, 7, 7],
            explicit(3, 1, 2, 4).groups(16),
        ),
        ([1, 16, 9, 9], [16, 1, 7, 7], same.groups(16)),
        ([1, 16, 8, 10], [16, 1, 7, 7], same.groups(16)),
        ([1, 16, 6, 12], [16, 1, 7, 7], same.groups(16)),
        ([1, 16, 5, 14], [16, 1, 7, 7], same.groups(16)),
        ([2, 16, 15, 16], [16, 1, 7, 7], same.groups(16).stride(2, 2)),
        (
            [2, 16, 13, 17],
            [16, 1, 6, 6],
            explicit(2, 3, 5, 5).groups(16).dilation(1, 2),
        ),
    ]
}

#[test]
fn wide_depthwise_kernels_take_the_blocked_forward_only() {
    use sepconv::kernels::{Isa, depthwise_rows};
    assert_for_every_case(wide_depthwise_cases(), |_, g| {
        sepconv::kernels::depthwise_blocked::applies(g)
            && !sepconv::kernels::depthwise_blocked::grad_weight_applies(g)
            && !sepconv::kernels::backward_is_fused(g)
            && !depthwise_rows::applies(Isa::Avx512, g)
    });
}

/// Depthwise layers for the row kernel (`depthwise_rows`, AVX-512). Stride 1: reference layer
/// D's 3 × 3 on 14 × 14 planes (one partial vector per row, rows not a multiple of the
/// four-row group); a 5 × 5 with row dilation 2 (two row phases) and asymmetric padding whose
/// first output rows read only padding through their top taps; depth multiplier 2 on rows of
/// 30 columns (a whole vector and a partial one); output rows of exactly 16 and 32 columns;
/// padding wider than the kernel reaches (output columns that read only padding); a 5 × 5 on
/// rows of 70 columns (four whole vectors and a partial one on AVX-512), a small input.
/// Stride 2: a 3 × 3 "same" on odd and even sizes (as reference layer E: the right and bottom
/// padding only); a 5 × 5 with asymmetric padding on rows of 70 columns (33 outputs: two whole
/// vectors and one column, the second vector of each tap's pair partly past the row); depth
/// multiplier 2 without padding on 19 output columns; output rows of exactly 16 and 32
/// columns (the last input column read only by the last output's third tap); padding wider
/// than the kernel reaches; an even number of rows without padding (the last input row read
/// by no output); five planes (split 3 + 2 over two threads). At stride 2 with depth
/// multiplier 1 their gradients run on it too. Last, an input of more than 2^20 floats with
/// rows of 111 columns (six whole vectors and a partial one), walked rows first, the same on
/// rows of 128 columns (whole vectors: each row's vectors carried across the blocks), a 5 × 5
/// walked rows first (rows of 30 columns; 24 channels, since on multiples of 16 5 × 5 kernels
/// go to the blocked kernel), a 3 × 3 dilated by 2 on planes tall enough for
/// groups whose rows all lie inside (two row phases), and two stride-1 3 × 3s whose
/// grad-weight walks bands of rows: 21 output rows (bands of 8, 8 and 5) on 56 columns, and
/// 35 rows with all the vertical padding on top (a band's first rows read the padding).
fn row_depthwise_cases() -> [Case; 22] {
    let same = Conv2dParams::with_padding(Padding::Same);
    [
        ([2, 16, 14, 14], [16, 1, 3, 3], same.groups(16)),
        (
            [2, 6, 13, 20],
            [6, 1, 5, 5],
            explicit(4, 1, 3, 1).groups(6).dilation(2, 1),
        ),
        (
            [3, 5, 9, 30],
            [10, 1, 3, 3],
            Conv2dParams::default().groups(5),
        ),
        (
            [1, 8, 7, 18],
            [8, 1, 3, 3],
            Conv2dParams::default().groups(8),
        ),
        ([2, 4, 11, 32], [4, 1, 3, 3], same.groups(4)),
        ([2, 3, 5, 6], [3, 1, 3, 3], explicit(3, 2, 4, 3).groups(3)),
        ([2, 4, 9, 70], [4, 1, 5, 5], same.groups(4)),
        ([2, 8, 15, 14], [8, 1, 3, 3], same.groups(8).stride(2, 2)),
        ([1, 4, 56, 56], [4, 1, 3, 3], same.groups(4).stride(2, 2)),
        (
            [2, 4, 11, 70],
            [4, 1, 5, 5],
            explicit(2, 1, 3, 2).groups(4).stride(2, 2),
        ),
        (
            [2, 3, 9, 40],
            [6, 1, 3, 3],
            Conv2dParams::default().groups(3).stride(2, 2),
        ),
        (
            [1, 4, 7, 33],
            [4, 1, 3, 3],
            Conv2dParams::default().groups(4).stride(2, 2),
        ),
        (
            [1, 4, 9, 65],
            [4, 1, 3, 3],
            Conv2dParams::default().groups(4).stride(2, 2),
        ),
        (
            [2, 3, 5, 6],
            [3, 1, 3, 3],
            explicit(3, 2, 4, 3).groups(3).stride(2, 2),
        ),
        (
            [2, 4, 10, 21],
            [4, 1, 3, 3],
            Conv2dParams::default().groups(4).stride(2, 2),
        ),
        ([1, 5, 9, 12], [5, 1, 3, 3], same.groups(5).stride(2, 2)),
        ([2, 8, 600, 111], [8, 1, 3, 3], same.groups(8)),
        ([1, 8, 1025, 128], [8, 1, 3, 3], same.groups(8)),
        ([3, 24, 600, 30], [24, 1, 5, 5], same.groups(24)),
        ([1, 4, 30, 20], [4, 1, 3, 3], same.groups(4).dilation(2, 2)),
        ([2, 4, 21, 56], [4, 1, 3, 3], same.groups(4)),
        ([1, 3, 35, 40], [3, 1, 3, 3], explicit(2, 0, 1, 1).groups(3)),
    ]
}

#[test]
fn row_depthwise_cases_take_the_row_kernel_with_avx512() {
    use sepconv::kernels::{GradWeightKernel, Isa, depthwise_rows};
    for isa in Isa::available() {
        for (input, weight, p) in row_depthwise_cases() {
            let g = ConvGeometry::new(input, weight, &p).unwrap();
            assert_eq!(
                depthwise_rows::applies(isa, &g),
                isa == Isa::Avx512,
                "{input:?} {isa}"
            );
            // Its gradients too at stride 2 with depth multiplier 1 (grad-weight named so).
            let backward = isa == Isa::Avx512 && g.stride_h == 2 && g.depth_multiplier() == 1;
            assert_eq!(
                depthwise_rows::backward_applies(isa, &g),
                backward,
                "{input:?} {isa}"
            );
            // Grad-weight alone also for a 3 × 3 at stride 1 without dilation on rows of up
            // to 64 columns.
            let unit_3x3 = g.stride_h == 1
                && (g.kernel_h, g.dilation_h, g.dilation_w) == (3, 1, 1)
                && g.depth_multiplier() == 1
                && g.out_w <= 64;
            let grad_weight = backward || (isa == Isa::Avx512 && unit_3x3);
            let exec = exec(2).with_isa(isa).unwrap();
            assert_eq!(
                GradWeightKernel::choose(exec, &g) == GradWeightKernel::DepthwiseRows,
                grad_weight,
                "{input:?} {isa}"
            );
        }
    }
    // Strided on one axis only, at stride 2 dilated, at stride 3, wider than 64 output columns
    // at stride 1 on an input of more than 2^20 floats, or a 3 × 1 kernel: other kernels.
    let same = Conv2dParams::with_padding(Padding::Same);
    for (input, weight, p) in [
        ([2, 16, 14, 14], [16, 1, 3, 3], same.groups(16).stride(2, 1)),
        (
            [2, 16, 14, 14],
            [16, 1, 3, 3],
            same.groups(16).stride(2, 2).dilation(2, 2),
        ),
        ([2, 16, 14, 14], [16, 1, 3, 3], same.groups(16).stride(3, 3)),
        ([2, 16, 180, 200], [16, 1, 3, 3], same.groups(16)),
        ([2, 16, 14, 14], [16, 1, 3, 1], same.groups(16)),
    ] {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        assert!(!depthwise_rows::applies(Isa::Avx512, &g), "{input:?}");
    }
}

#[test]
fn depthwise_cases_take_the_blocked_kernel_where_it_applies() {
    assert_for_every_case(blocked_depthwise_cases(), |_, g| {
        sepconv::kernels::depthwise_blocked::applies(g)
            && sepconv::kernels::backward_is_fused(g)
            && sepconv::kernels::depthwise_blocked::grad_input_applies(g) == (g.stride_h > 1)
    });

    // A depth multiplier, or channels that are not a multiple of 16, stay on the plane kernel.
    let same = Conv2dParams::with_padding(Padding::Same);
    for (input, weight, p) in [
        ([2, 16, 10, 10], [32, 1, 3, 3], same.groups(16)),
        ([2, 24, 10, 10], [24, 1, 3, 3], same.groups(24)),
    ] {
        let g = ConvGeometry::new(input, weight, &p).unwrap();
        assert!(
            !sepconv::kernels::depthwise_blocked::applies(&g),
            "{input:?}"
        );
    }
}

/// A call splits over the threads only from [`sepconv::Exec::MIN_SPLIT_MACS`] up, unless the
/// threshold is lowered.
#[test]
fn exec_splits_only_calls_of_enough_work() {
    let min = sepconv::Exec::MIN_SPLIT_MACS;
    let two = sepconv::Exec::new(2);
    assert_eq!(two.for_work(min - 1).threads(), 1);
    assert_eq!(two.for_work(min).threads(), 2);
    assert_eq!(two.with_min_split_macs(0).for_work(1).threads(), 2);
    assert_eq!(sepconv::Exec::new(1).for_work(1 << 40).threads(), 1);
    assert_eq!(two.for_work(1).isa(), two.isa());
}

/// The entry points ask the rule: a small backward on a default two-thread `Exec` gives the
/// one-thread result bit for bit, where splitting it sums the weight gradients of two runs of
/// three images (one per thread) rather than of all six in a row: another association, so other
/// bits whatever the kernel (checked, so that the comparison can tell the two apart).
#[test]
fn small_calls_run_on_one_thread() {
    let g = ConvGeometry::new([6, 2, 8, 8], [4, 2, 3, 3], &Conv2dParams::default()).unwrap();
    // Both gradients of the backward count.
    assert!(2 * g.macs() < sepconv::Exec::MIN_SPLIT_MACS);
    let d = data(&g, 3);
    let grads = |exec: sepconv::Exec| {
        let (mut gx, mut gw, mut gb) = (
            vec![0.0; g.input_len()],
            vec![0.0; g.weight_len()],
            vec![0.0; g.out_channels],
        );
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            kernels::conv2d_backward(
                exec,
                &g,
                &d.x,
                &d.gy,
                &d.w,
                Some(&mut gx),
                &mut gw,
                Some(&mut gb),
                &mut Workspace::new(),
            )
        })
        .unwrap();
        [gx, gw, gb]
    };
    for isa in sepconv::Isa::available() {
        let with = |e: sepconv::Exec| e.with_isa(isa).unwrap();
        let one = grads(with(sepconv::Exec::new(1)));
        assert_ne!(grads(with(exec(2))), one, "{isa}: split, another order");
        assert_eq!(grads(with(sepconv::Exec::new(2))), one, "{isa}");
    }
}
