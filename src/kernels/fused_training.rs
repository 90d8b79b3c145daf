//! The depthwise-separable training passes image by image, with the depthwise layer's memory
//! brought in while the pointwise products compute.
//!
//! Unfused, each pointwise pass runs over the whole batch at the FMA peak with the memory
//! system nearly idle, and each depthwise pass over the whole batch at the memory's pace: on
//! reference layer E (128 → 256 at 56², stride 2) the depthwise backward reads the 12.8 MB
//! input and writes the 12.8 MB input gradient with little arithmetic between, about a
//! millisecond at this VM's 25–50 GB/s, and the forward reads the input again. Here each
//! thread takes a run of images and interleaves the two layers image by image:
//!
//! - forward: the depthwise output of an image (the intermediate the backward needs, written
//!   to `mid`) goes straight into its pointwise product from L2, and that product prefetches
//!   the next image's input ([`Ahead`]);
//! - backward: an image's pointwise grad-weight and grad-bias (`conv::PointwiseImages`), then its
//!   grad-input product (the depthwise layer's output gradient) a block of channels at a time
//!   into a one-image buffer, each block followed by that block's depthwise gradients
//!   ([`depthwise_rows`]); the product prefetches the block's input and input-gradient lines
//!   (up to 1 MiB, `BLOCK_FLOATS`), which the depthwise step then finds in L2.
//!
//! The inference forward ([`super::fused::depthwise_pointwise_forward`]) runs the same image
//! by image pass, into a one-image buffer per thread, where every thread has images of its own
//! and one image's depthwise output fits in L2, its input planes fit in L1 or its stride is 2
//! (reference layers C, D and E at batch 8; the measurements are at `fused`'s rule).
//!
//! Both passes apply where the depthwise layer runs on the stride-2 row kernel (reference
//! layer E) and the pointwise layer splits over images; the forward also at stride 1 where the
//! row kernel takes one image (B, C and D). At stride 1 the backward stays unfused: run the
//! same way, block by block through the one-image depthwise kernels, it measured a tie on C
//! (10.52–10.89 against 10.62–10.79 ms) and slower on B (7.69 against 7.23), while the forward
//! gained on C and D in every alternation of their steps (harness, 2 threads, min of 30,
//! alternated 4×: C's depthwise-separable step 16.81–17.38 → 16.11–16.80 ms, D's 12.82–12.93 →
//! 12.52–12.76 on a slow VM; B's mixed, 10.40–11.31 against 10.07–12.04).

use rayon::prelude::*;

use super::conv::{PointwiseImages, pointwise_backward_applies, with_transposed_weight};
use super::depthwise_rows;
use super::pointwise::{Ahead, Operands, Store, small_k_gemm_ahead};
use super::{Exec, ImageRuns, Workspace, sum_task_sums};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Whether [`forward`] and [`backward`] compute `dw` then `pw`: a depthwise layer on the
/// stride-2 row kernel ([`depthwise_rows::backward_applies`]) followed by an ungrouped
/// pointwise layer whose images go to threads of their own.
pub fn applies(exec: Exec, dw: &ConvGeometry, pw: &ConvGeometry) -> bool {
    depthwise_rows::backward_applies(exec.isa(), dw)
        && pw.groups == 1
        && pw.input_shape() == dw.output_shape()
        && pointwise_backward_applies(exec, pw)
}

/// Whether [`forward`] computes `dw` then `pw` for training: where [`applies`], and at stride
/// 1 (multiplier 1) where [`runs_per_image`].
pub fn forward_applies(exec: Exec, dw: &ConvGeometry, pw: &ConvGeometry) -> bool {
    let stride_1 = dw.stride_h == 1 && dw.stride_w == 1 && dw.depth_multiplier() == 1;
    applies(exec, dw, pw) || (stride_1 && runs_per_image(exec, dw, pw))
}

/// Whether [`forward`] can compute `dw` then `pw` image by image at all: the row kernel takes
/// one image of `dw` ([`depthwise_rows::applies_per_image`]) and `pw`, ungrouped on `dw`'s
/// output, gives every thread images of its own ([`pointwise_backward_applies`]).
pub fn runs_per_image(exec: Exec, dw: &ConvGeometry, pw: &ConvGeometry) -> bool {
    depthwise_rows::applies_per_image(exec.isa(), dw)
        && pw.groups == 1
        && pw.input_shape() == dw.output_shape()
        && pointwise_backward_applies(exec, pw)
}

/// Panics unless the input and the two weights have the pair's shapes (both passes read them;
/// each checks its intermediate itself, which the inference forward takes from scratch).
fn check_inputs(dw: &ConvGeometry, pw: &ConvGeometry, x: &[f32], w1: &[f32], w2: &[f32]) {
    assert_eq!(x.len(), dw.input_len());
    assert_eq!(w1.len(), dw.weight_len());
    assert_eq!(w2.len(), pw.weight_len());
}

/// Where [`forward`] writes each image's depthwise output.
pub enum Intermediate<'a> {
    /// The whole batch's, kept for [`backward`] (the training forward; the pair must satisfy
    /// [`forward_applies`]).
    Kept(&'a mut [f32]),
    /// One image's per thread, taken from the workspace and overwritten image after image
    /// (the inference forward, [`super::fused::depthwise_pointwise_forward`], which decides
    /// where it runs this way).
    Scratch(&'a mut Workspace),
}

/// `y = pw(dw(x, w1), w2) + bias` image by image, each thread a run of images: an image's
/// depthwise output (into `mid`) on the row kernel, then its pointwise product from L2 while
/// the next image's input is prefetched. The same values as the unfused pair's (the same
/// kernels, image by image). The pair must satisfy [`runs_per_image`].
#[allow(clippy::too_many_arguments)]
pub fn forward(
    exec: Exec,
    dw: &ConvGeometry,
    pw: &ConvGeometry,
    x: &[f32],
    w1: &[f32],
    w2: &[f32],
    bias: Option<&[f32]>,
    mid: Intermediate<'_>,
    y: &mut [f32],
) -> Result<()> {
    assert!(
        runs_per_image(exec, dw, pw),
        "fused forward: unsupported pair"
    );
    check_inputs(dw, pw, x, w1, w2);
    assert!(bias.is_none_or(|b| b.len() == pw.out_channels));
    assert_eq!(y.len(), pw.output_len());
    let (img_x, img_mid, img_y) = (
        dw.in_channels * dw.in_pixels(),
        pw.in_channels * pw.in_pixels(),
        pw.out_channels * pw.out_pixels(),
    );
    let (p, channels) = (pw.out_pixels(), dw.out_channels);
    let isa = exec.isa();
    let runs = ImageRuns::new(exec.threads(), pw.batch);
    let per_task = runs.per_task;
    // Kept: a slot per image of each task's run; scratch: one slot per task, reused.
    let (mid, mid_chunk, slot_stride) = match mid {
        Intermediate::Kept(mid) => {
            assert!(
                forward_applies(exec, dw, pw),
                "fused training: unsupported pair"
            );
            assert_eq!(mid.len(), pw.input_len(), "intermediate length");
            (mid, per_task * img_mid, img_mid)
        }
        Intermediate::Scratch(ws) => (ws.take(runs.tasks * img_mid)?, img_mid, 0),
    };
    let task = |t: usize, midc: &mut [f32], yc: &mut [f32]| {
        let run = runs.run(t);
        for (local, n) in run.clone().enumerate() {
            let midn = &mut midc[local * slot_stride..][..img_mid];
            depthwise_rows::forward_planes(
                isa,
                dw,
                x,
                w1,
                None,
                n * channels..(n + 1) * channels,
                midn,
            );
            // The next image's input, which the next depthwise step reads.
            let next = if n + 1 < run.end {
                &x[(n + 1) * img_x..][..img_x]
            } else {
                &[]
            };
            let ops = Operands::dense(w2, pw.out_channels, channels, midn, p, p, bias);
            let yn = &mut yc[local * img_y..][..img_y];
            small_k_gemm_ahead(isa, ops, yn, p, Store::Stream, Ahead::of(next, &[]));
        }
    };
    mid.par_chunks_mut(mid_chunk)
        .zip(y.par_chunks_mut(per_task * img_y))
        .enumerate()
        .for_each(|(t, (midc, yc))| task(t, midc, yc));
    Ok(())
}

/// Floats of input and input gradient of the depthwise layer that one block of channels of the
/// backward takes: 2¹⁸ (1 MiB, this machine's L2 per core). The pointwise grad-input product
/// of a block's rows prefetches them, and the block's depthwise gradients follow at once.
/// Whole images (3.2 MB on reference layer E) sent the prefetched lines on to L3. E's backward
/// (harness, 2 threads, min of 20 × 5, alternated 3×) with blocks of 128 (whole images) / 64 /
/// 48 / 40 / 32 / 16 / 8 channels: 4.65–4.91 / 4.59–4.81 / 4.40–4.48 / 4.45–4.49 / 4.36–4.61 /
/// 4.54–4.55 / 4.60–4.65 ms.
const BLOCK_FLOATS: usize = 1 << 18;

/// Channels per block of the backward on planes of `hw` input pixels: as many as
/// [`BLOCK_FLOATS`] holds twice (input and its gradient), in multiples of 8 (the product's
/// register block of rows), at least 8.
fn channel_block(hw: usize) -> usize {
    (BLOCK_FLOATS / (2 * hw.max(1)) / 8 * 8).max(8)
}

/// Every gradient of `y = pw(dw(x, w1), w2) + bias` from the output gradient `gy`, given the
/// forward's `x` and intermediate `mid`: `gx` (when given), `gw1`, `gw2` and `gb` (when
/// given), all overwritten. Equal to the unfused pair's (`conv2d_backward` of `pw`, then of
/// `dw`) up to the order of the depthwise weight gradient's per-thread sums.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    exec: Exec,
    dw: &ConvGeometry,
    pw: &ConvGeometry,
    x: &[f32],
    w1: &[f32],
    w2: &[f32],
    mid: &[f32],
    gy: &[f32],
    gx: Option<&mut [f32]>,
    gw1: &mut [f32],
    gw2: &mut [f32],
    gb: Option<&mut [f32]>,
    ws: &mut Workspace,
) -> Result<()> {
    let block = channel_block(dw.in_pixels());
    let grads = (gx, gw1, gw2, gb);
    backward_in_blocks(exec, dw, pw, x, w1, w2, mid, gy, grads, ws, block)
}

/// The gradients of [`backward`], `(gx, gw1, gw2, gb)`, with blocks of `block` channels: the
/// tests cut small images into several blocks with it.
#[allow(clippy::too_many_arguments, clippy::type_complexity)]
fn backward_in_blocks(
    exec: Exec,
    dw: &ConvGeometry,
    pw: &ConvGeometry,
    x: &[f32],
    w1: &[f32],
    w2: &[f32],
    mid: &[f32],
    gy: &[f32],
    (gx, gw1, gw2, gb): (
        Option<&mut [f32]>,
        &mut [f32],
        &mut [f32],
        Option<&mut [f32]>,
    ),
    ws: &mut Workspace,
    block: usize,
) -> Result<()> {
    assert!(applies(exec, dw, pw), "fused training: unsupported pair");
    check_inputs(dw, pw, x, w1, w2);
    assert_eq!(mid.len(), pw.input_len(), "intermediate length");
    assert_eq!(gy.len(), pw.output_len());
    assert!(gx.as_ref().is_none_or(|gx| gx.len() == dw.input_len()));
    assert_eq!(gw1.len(), dw.weight_len());
    assert_eq!(gw2.len(), pw.weight_len());
    let images = PointwiseImages::new(exec, pw, mid, gy, gb.is_some());
    let (tasks, runs) = (images.runs.tasks, images.runs);
    let per_task = images.per_task();
    let (hw, ohw) = (dw.in_pixels(), dw.out_pixels());
    let (img_x, img_mid) = (dw.in_channels * hw, pw.in_channels * ohw);
    let isa = exec.isa();
    let block = block.max(1);
    with_transposed_weight(exec, pw, w2, ws, |tw, ws| {
        let scratch = ws.take((per_task + img_mid) * tasks)?;
        let (sums, gmids) = scratch.split_at_mut(per_task * tasks);
        // One task's images; returns its depthwise weight-gradient sums ([channel][tap], f64,
        // as the row kernel sums a run of planes).
        let task = |t: usize, mut gxc: Option<&mut [f32]>, st: &mut [f32], gmid: &mut [f32]| {
            let mut acc = vec![0f64; dw.weight_len()];
            for (local, n) in runs.run(t).enumerate() {
                let xn = &x[n * img_x..][..img_x];
                let mut gxn = gxc.as_deref_mut().map(|g| &mut g[local * img_x..][..img_x]);
                images.image(st, n, None);
                for c0 in (0..dw.in_channels).step_by(block) {
                    let planes = c0..(c0 + block).min(dw.in_channels);
                    let span = planes.start * hw..planes.end * hw;
                    let gxb = gxn.as_deref_mut().map(|g| &mut g[span.clone()]);
                    let ahead = Ahead::of(&xn[span], gxb.as_deref().unwrap_or(&[]));
                    // Through the caches: the depthwise step reads it back at once.
                    let gmid_rows = &mut gmid[planes.start * ohw..planes.end * ohw];
                    images.grad_input_rows(tw, n, planes.clone(), gmid_rows, Store::Cached, ahead);
                    depthwise_rows::backward_planes(
                        isa,
                        dw,
                        Some(xn),
                        gmid,
                        planes,
                        gxb.map(|g| (w1, g)),
                        &mut acc,
                    );
                }
            }
            acc
        };
        let tasks_scratch = sums
            .par_chunks_mut(per_task)
            .zip(gmids.par_chunks_mut(img_mid));
        let acc: Vec<Vec<f64>> = match gx {
            Some(gx) => gx
                .par_chunks_mut(runs.per_task * img_x)
                .zip(tasks_scratch)
                .enumerate()
                .map(|(t, (gxc, (st, gmid)))| task(t, Some(gxc), st, gmid))
                .collect(),
            None => tasks_scratch
                .enumerate()
                .map(|(t, (st, gmid))| task(t, None, st, gmid))
                .collect(),
        };
        sum_task_sums(&acc, gw1);
        images.finish(exec, sums, gw2, gb);
        Ok(())
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Conv2dParams, Padding};
    use crate::kernels::fused::tests::values;
    use crate::kernels::simd::Isa;
    use crate::kernels::{conv2d_backward, reference};
    use crate::separable::ConvPair;

    fn assert_close(got: &[f32], want: &[f32], what: &str) {
        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((a - b).abs() <= 1e-4 * scale, "{what}[{i}] = {a}, want {b}");
        }
    }

    /// The forward (intermediate and output) and every gradient against the reference kernels,
    /// and against the unfused pair bit for bit (the same kernels image by image), the
    /// depthwise weight gradient where the unfused row kernel's runs of planes are the fused
    /// one's runs of images (the same per-task f64 sums). Stride-2 row geometries (3 × 3 and
    /// 5 × 5, "same" on odd and even sizes, valid), batches that split evenly over 1, 2 and 3
    /// threads and one (9 on 2) that does not, with and without the input gradient and bias;
    /// at stride 1 (3 × 3 and 5 × 5) the forward alone.
    #[test]
    fn both_passes_match_the_reference_and_the_unfused_pair() {
        let same_1 = Conv2dParams::with_padding(Padding::Same);
        let same = same_1.stride(2, 2);
        let valid = Conv2dParams::default().stride(2, 2);
        let cases = [
            // Stride 1: the forward only.
            ([2, 16, 9, 11], (3, 3), same_1, 8),
            ([4, 8, 12, 10], (5, 5), same_1, 6),
            ([4, 16, 15, 14], (3, 3), same, 24),
            ([6, 8, 12, 21], (3, 3), valid, 16),
            ([4, 5, 13, 18], (5, 5), same, 7),
            ([9, 16, 9, 10], (3, 3), same, 8),
            ([2, 20, 11, 12], (3, 3), same, 16),
        ];
        let (mut forwards, mut covered, mut exact) = (0, 0, 0);
        for (input, kernel, params, n) in cases {
            let pair = ConvPair::depthwise_separable(input, 1, n, kernel, &params).unwrap();
            let (dw, pw) = (pair.first, pair.second);
            let (x, w1, w2, gy) = (
                values(dw.input_len(), 1),
                values(dw.weight_len(), 2),
                values(pw.weight_len(), 3),
                values(pw.output_len(), 4),
            );
            let mut mid = vec![0.0; dw.output_len()];
            reference::conv2d_forward(&dw, &x, &w1, None, &mut mid);
            let bias = values(n, 5);
            let mut y_ref = vec![0.0; pw.output_len()];
            reference::conv2d_forward(&pw, &mid, &w2, Some(&bias), &mut y_ref);
            let mut gmid_ref = vec![0.0; pw.input_len()];
            reference::conv2d_grad_input(&pw, &gy, &w2, &mut gmid_ref);
            let mut gx_ref = vec![0.0; dw.input_len()];
            reference::conv2d_grad_input(&dw, &gmid_ref, &w1, &mut gx_ref);
            let (mut gw1_ref, mut gw2_ref) = (vec![0.0; w1.len()], vec![0.0; w2.len()]);
            reference::conv2d_grad_weight(&dw, &x, &gmid_ref, &mut gw1_ref);
            reference::conv2d_grad_weight(&pw, &mid, &gy, &mut gw2_ref);
            let mut gb_ref = vec![0.0; n];
            reference::conv2d_grad_bias(&pw, &gy, &mut gb_ref);
            for isa in Isa::available() {
                for threads in [1, 2, 3] {
                    // Every call split, as the fused passes split: the unfused pair's entry
                    // points would run these small shapes on one thread.
                    let exec = Exec::splitting_every_call(threads, isa);
                    if !forward_applies(exec, &dw, &pw) {
                        continue;
                    }
                    forwards += 1;
                    let what = format!("{input:?} {kernel:?} {isa} {threads} threads");
                    let mut ws = Workspace::new();
                    // The forward against the reference and the unfused pair.
                    let mut mid_u = vec![0.0; pw.input_len()];
                    let mut y_u = vec![0.0; pw.output_len()];
                    crate::kernels::conv2d_forward(exec, &dw, &x, &w1, None, &mut mid_u, &mut ws)
                        .unwrap();
                    crate::kernels::conv2d_forward(
                        exec,
                        &pw,
                        &mid_u,
                        &w2,
                        Some(&bias),
                        &mut y_u,
                        &mut ws,
                    )
                    .unwrap();
                    let (mut mid_f, mut y_f) = (
                        vec![f32::NAN; pw.input_len()],
                        vec![f32::NAN; pw.output_len()],
                    );
                    forward(
                        exec,
                        &dw,
                        &pw,
                        &x,
                        &w1,
                        &w2,
                        Some(&bias),
                        Intermediate::Kept(&mut mid_f),
                        &mut y_f,
                    )
                    .unwrap();
                    assert_close(&mid_f, &mid, &format!("{what} mid"));
                    assert_close(&y_f, &y_ref, &format!("{what} y"));
                    assert_eq!(mid_f, mid_u, "{what} mid against the unfused pair");
                    assert_eq!(y_f, y_u, "{what} y against the unfused pair");
                    if !applies(exec, &dw, &pw) {
                        continue;
                    }
                    covered += 1;
                    // Unfused: the pointwise layer's gradients, then the depthwise layer's.
                    let mut gmid = vec![0.0; pw.input_len()];
                    let (mut gx_u, mut gw1_u, mut gw2_u, mut gb_u) = (
                        vec![0.0; x.len()],
                        vec![0.0; w1.len()],
                        vec![0.0; w2.len()],
                        vec![0.0; n],
                    );
                    conv2d_backward(
                        exec,
                        &pw,
                        &mid,
                        &gy,
                        &w2,
                        Some(&mut gmid),
                        &mut gw2_u,
                        Some(&mut gb_u),
                        &mut ws,
                    )
                    .unwrap();
                    conv2d_backward(
                        exec,
                        &dw,
                        &x,
                        &gmid,
                        &w1,
                        Some(&mut gx_u),
                        &mut gw1_u,
                        None,
                        &mut ws,
                    )
                    .unwrap();
                    // Whole images, and blocks of 8 channels (16 in two, 20 in three, the
                    // last short; 5 in one).
                    for (with_input, block) in [(true, usize::MAX), (false, usize::MAX), (true, 8)]
                    {
                        let what = format!("{what} blocks of {block}");
                        let (mut gx, mut gw1, mut gw2, mut gb) = (
                            vec![f32::NAN; x.len()],
                            vec![f32::NAN; w1.len()],
                            vec![f32::NAN; w2.len()],
                            vec![f32::NAN; n],
                        );
                        let grads = (
                            with_input.then_some(&mut gx[..]),
                            &mut gw1[..],
                            &mut gw2[..],
                            with_input.then_some(&mut gb[..]),
                        );
                        backward_in_blocks(
                            exec, &dw, &pw, &x, &w1, &w2, &mid, &gy, grads, &mut ws, block,
                        )
                        .unwrap();
                        if with_input {
                            assert_close(&gx, &gx_ref, &format!("{what} gx"));
                            assert_eq!(gx, gx_u, "{what} gx against the unfused pair");
                            assert_close(&gb, &gb_ref, &format!("{what} gb"));
                            assert_eq!(gb, gb_u, "{what} gb against the unfused pair");
                        } else {
                            assert!(gx.iter().all(|v| v.is_nan()), "{what}: gx written");
                        }
                        assert_close(&gw1, &gw1_ref, &format!("{what} gw1"));
                        assert_close(&gw2, &gw2_ref, &format!("{what} gw2"));
                        assert_eq!(gw2, gw2_u, "{what} gw2 against the unfused pair");
                        // The unfused row kernel's runs of planes, the fused one's of images.
                        let planes = input[0] * input[1];
                        let unfused_run = planes.div_ceil(threads.min(planes));
                        let tasks = crate::kernels::task_count(threads, input[0]);
                        if unfused_run == input[0].div_ceil(tasks) * input[1] {
                            exact += 1;
                            assert_eq!(gw1, gw1_u, "{what} gw1 against the unfused pair");
                        }
                    }
                }
            }
        }
        // The row kernel is AVX-512's: without it the test checks nothing.
        if Isa::available().contains(&Isa::Avx512) {
            assert!(
                forwards >= 14,
                "only {forwards} cases took the fused forward"
            );
            assert!(
                covered >= 10,
                "only {covered} cases took the fused backward"
            );
            assert!(exact >= 8, "only {exact} exact comparisons of gw1");
        }
    }
}
