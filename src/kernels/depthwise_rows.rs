//! Depthwise forward at stride 1 or 2 reading the NCHW rows in place; stride-1 grad-input
//! runs here too, as the adjoint forward (see `kernels::conv2d_grad_input`).
//!
//! An output row is a few vectors of columns. Tap (i, j) of output row r is input row
//! `r + i·dh − pad_top` shifted by `j·dw − pad_left` columns: one masked load (lanes whose
//! column falls in the padding or past the row read as zero and touch no memory), no padded
//! copy, no transposes. Four output rows are computed together, so each input row is loaded
//! once for the four and each weight feeds four independent FMA chains; the kernel's taps stay
//! in registers (3 × 3 and 5 × 5, const-generic).
//!
//! At stride 2 (dilation 1) output row r reads input rows `2·r + i − pad_top`, and a vector of
//! output columns from c0 reads the `2·16 + kw − 2` input columns from `2·c0 − pad_left`:
//! three contiguous masked loads per input row, split into even and odd lanes by two
//! permutes, and shifted by one lane (`valignd`) for tap columns 2 to 4. The blocked kernel
//! transposes every input pixel there, four times as many as it computes: reference layer E's
//! 3 × 3 on one image (128 × 56², 2 threads, min of 300, alternated 3×) 0.040–0.053 →
//! 0.030–0.032 ms, on one thread 0.078–0.102 → 0.048–0.063; a 5 × 5 there on one thread
//! 0.181–0.186 → 0.096–0.123.
//!
//! Both gradients of such a layer (depth multiplier 1) run here too ([`backward`]),
//! for the same reason: the grad-weight reads the input rows as the forward does, the
//! grad-input adds each output-gradient row, loaded once, into the even and odd columns of the
//! input rows it reaches and interleaves each row once complete. On E's image (alternated 3×)
//! grad-input 0.057–0.067 → 0.050–0.054 ms, grad-weight 0.054–0.061 → 0.043–0.045; with the
//! forward, E's batch-1 depthwise training step 0.160–0.181 → 0.132–0.136 (alternated 4×). The
//! grad-input first summed, input row by input row, the output-gradient rows that reach it
//! (each loaded up to three times); added row by row it took 0.071 → 0.038–0.044 ms on one
//! thread, 0.30–0.45 → 0.16–0.20 at batch 8, and E's batch-1 depthwise step 0.134–0.138 →
//! 0.111–0.118 (alternated 3×).
//!
//! At 3 × 3 and stride 2 the forward goes two output rows at a time and the grad-weight one
//! (carrying the input row two consecutive output rows share): four rows' nine input rows, three
//! vectors each after the even/odd split, were spilled to the stack. Reference layer E (`sepconv
//! --threads 2 bench --layers E --variants dw,ds`, the build before alternated 4×): depthwise
//! forward 0.188–0.214 → 0.160–0.163 ms, training step 0.57–0.87 → 0.50–0.83; at batch 1 0.029
//! → 0.023 and 0.077–0.079 → 0.067–0.068, E's depthwise-separable step 0.888–0.898 →
//! 0.873–0.879; at batch 8 the depthwise-separable passes a tie (their depthwise share is small).
//!
//! The channel-blocked kernel ([`super::depthwise_blocked`]) transposes 16 planes into a
//! pixel-major layout and back, which on small planes costs more than the arithmetic. Called
//! over and over on the same tensors (2 threads, min of 100–300, AVX-512), this kernel measured
//! faster on every shape tried: 3 × 3 on 8 × 512 × 14² (reference layer D) 0.185–0.19 →
//! 0.117–0.122 ms, 8 × 1024 × 7² 0.141 → 0.131, 8 × 256 × 28² 0.323 → 0.197, 8 × 128 × 56²
//! 0.735 → 0.643–0.659, 8 × 32 × 112² 0.637 → 0.550, 2 × 32 × 224² 1.170 → 1.051, batch 1 of D
//! 0.023 → 0.015, of 32 × 112² 0.082 → 0.053; 5 × 5 on D 0.556 → 0.508, on 8 × 128 × 56² 2.19 →
//! 1.95. Inside training steps it lost on wide planes with large inputs (see [`applies`]),
//! which stay on the blocked kernel. With AVX2 it is 1.3–8× slower than the blocked kernel
//! (AVX2's masked loads are slow on this machine), so only AVX-512 takes it. A first
//! grad-weight counterpart (one accumulator vector per tap) beat the blocked grad-weight only
//! on 14² and 28² planes and lost on 7² and 56²; the stride-1 3 × 3 grad-weight now here
//! carries its rows and walks bands of rows, and takes rows of up to 64 columns
//! ([`grad_weight_applies`]); wider planes keep the blocked kernel's one-pass backward.

use std::ops::Range;

use super::simd::{Isa, SimdF32};
use super::{Exec, depthwise_blocked, for_each_task};
use crate::error::Result;
use crate::geometry::ConvGeometry;
use rayon::prelude::*;

/// Output rows computed together in the forward pass and the 5 × 5 grad-weight.
const ROWS: usize = 4;

/// Output rows computed together in the 3 × 3 stride-2 forward: its nine input rows of a
/// group of four (three vectors each after the even/odd split) did not fit the registers, and
/// the compiler spilled them to the stack. Reference layer E's image (128 × 56², one thread,
/// min of 2000, in cache; the build before alternated 2×): 0.052–0.065 → 0.041 ms (in one
/// build two rows 0.046, three 0.048, four 0.055). Stride 1 (B's 32 × 112² and D's 512 × 14²
/// images: 0.106–0.108 and 0.037–0.038 ms with four, 0.136–0.138 and 0.042–0.043 with two) and
/// 5 × 5 at stride 2 (0.116–0.118 against 0.140) measured faster with four.
const ROWS_3X3_STRIDE_2: usize = 2;

/// Output columns up to which this kernel runs on any input: on narrow planes the blocked
/// kernel's transposes cost the most, and reference layer D (14 columns, 3.2 MB at batch 8)
/// gained inside training steps too (its depthwise step 0.51–0.54 → 0.41–0.42 ms).
const MAX_OUTPUT_WIDTH: usize = 32;

/// Input floats up to which it runs on wider rows too: an input this small stays in cache
/// through a training step. Wider planes were faster here in isolation (see the module), but
/// in training steps whose input comes from memory the blocked kernel's prefetching won:
/// reference layer B (112 columns) at batch 8, 12.8 MB of input (harness, min of 30,
/// alternated 2×): depthwise training step 2.54–2.66 → 3.08–3.39 ms, forward medians 0.70–0.93
/// → 1.54–2.03. On one or two images of B and C (1.6 and 3.2 MB; min of 100–200, alternated
/// 2×): B's depthwise training step 0.231–0.236 → 0.201–0.203 ms at batch 1 and 0.448–0.454 →
/// 0.387–0.401 at batch 2, its depthwise-separable step 1.084–1.097 → 0.989–0.996 and
/// 2.25–2.35 → 2.17–2.23; C's depthwise step 0.207–0.211 → 0.185–0.186 and 0.410 → 0.367–0.368,
/// its depthwise-separable step 1.702–1.705 → 1.637 and 3.31–3.41 → 3.32–3.33.
const MAX_WIDE_INPUT_FLOATS: usize = 1 << 20;

/// Whether `g` runs on this kernel with instruction set `isa`: depthwise (any depth
/// multiplier), a 3 × 3 or 5 × 5 kernel, any padding, AVX-512, and either stride 1 (any
/// dilation) with output rows of at most 32 columns (`MAX_OUTPUT_WIDTH`), an input of at
/// most 2²⁰ floats (`MAX_WIDE_INPUT_FLOATS`), or a 3 × 3 on larger inputs with rows of up to
/// 128 columns, walked a group of rows at a time ([`walks_rows_first`]); or stride 2 on both
/// axes (dilation 1).
///
/// The larger 3 × 3 inputs went to the blocked kernel until the rows-first walk: its
/// transposes in and out cost more than the row kernel's masked loads once the row kernel
/// stopped fetching the planes again per column block. Reference layers B and C at batch 8 (12.8
/// MB of input each; harness on the benchmark's buffers, the two ways switched in one process,
/// 8 rounds of min of 40): B's depthwise forward 0.64–0.87 → 0.57–0.84 ms (faster in 7 of 8
/// rounds), its depthwise training step 2.50–3.14 → 2.29–2.66 (8 of 8); C's 0.69–0.91 →
/// 0.60–0.68 and 2.27–2.52 → 2.14–2.35 (8 of 8); their depthwise-separable steps (fused
/// kernels) a tie. 5 × 5 kernels there stay on the blocked kernel, now faster
/// (`depthwise_blocked`'s `compute_rows`: 0.82–0.85 ms on 8 × 96 × 56², where the row kernel
/// took 1.54).
///
/// A 5 × 5 at stride 1 without dilation goes to the blocked kernel wherever that applies,
/// since its `compute_rows` shares row and weight loads over eight pixels: on every size
/// measured it won (2 threads, forward / training step, min, the two ways alternated 2× in one
/// build): 96 planes of 56 × 56 at batch 1 0.178–0.183 → 0.106–0.119 ms and 0.49 → 0.41–0.46,
/// at batch 2 0.35–0.37 → 0.20–0.22 and 0.92 → 0.69; 32 of 112 × 112 at batch 1 0.214 → 0.144
/// and 0.63 → 0.55; 8 × 96 of 28 × 28 0.354 → 0.201 and 0.92 → 0.70; 8 × 192 of 14 × 14
/// 0.200 → 0.118 and 0.49 → 0.45 (PyTorch's best layout: 0.117, 0.189, 0.141, 0.194, 0.134).
///
/// At stride 2 it won at every size: reference layer E at batch 8 (12.8 MB of input; harness, alternated
/// 3–6×) forward 0.319–0.328 → 0.272–0.281 ms, both gradients 1.53–1.63 → 0.95–1.34, its
/// depthwise training step 1.24–1.29 → 1.17–1.22 (min of 200), its depthwise-separable step a
/// tie (medians 7.58–7.87 → 7.45–7.65 in five of six).
pub fn applies(isa: Isa, g: &ConvGeometry) -> bool {
    g.is_depthwise()
        && match (g.stride_h, g.stride_w, g.dilation_h, g.dilation_w) {
            (1, 1, 1, 1) if (g.kernel_h, g.kernel_w) == (5, 5) && depthwise_blocked::applies(g) => {
                false
            }
            (1, 1, _, _) => {
                g.out_w <= MAX_OUTPUT_WIDTH
                    || g.input_len() <= MAX_WIDE_INPUT_FLOATS
                    || (walks_rows_first(g) && (g.kernel_h, g.kernel_w) == (3, 3))
            }
            (2, 2, 1, 1) => true,
            _ => false,
        }
        && matches!((g.kernel_h, g.kernel_w), (3, 3) | (5, 5))
        && isa == Isa::Avx512
}

/// Whether [`applies`] holds for one image of `g`: the passes that run image by image
/// (`fused_training`, and `fused`'s bands and images) call this kernel one image at a time,
/// where the rule's input size is one image's.
pub fn applies_per_image(isa: Isa, g: &ConvGeometry) -> bool {
    applies(isa, &ConvGeometry { batch: 1, ..*g })
}

/// Forward pass (`g` must satisfy [`applies`] for `exec`'s instruction set). Output planes
/// are split over the threads in runs; each is computed from its input plane alone, so the
/// threads share nothing however the planes fall.
pub fn forward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) -> Result<()> {
    assert!(
        applies(exec.isa(), g),
        "row depthwise kernel: unsupported geometry"
    );
    let planes = g.batch * g.out_channels;
    let tasks = exec.threads().min(planes);
    for_each_task(tasks, y, g.out_pixels(), &mut [], 0, |planes, yc, _| {
        forward_planes(exec.isa(), g, x, w, bias, planes, yc)
    });
    Ok(())
}

crate::simd_dispatch!(pub(super) fn forward_planes => forward_planes_kernel(
    g: &ConvGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>,
    planes: Range<usize>, y: &mut [f32]
));

#[inline(always)]
unsafe fn forward_planes_kernel<S: SimdF32>(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    planes: Range<usize>,
    y: &mut [f32],
) {
    let taps = g.kernel_h * g.kernel_w;
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let multiplier = g.depth_multiplier();
    // Output plane p is channel co of image n; it reads input channel co / multiplier.
    let (mut n, mut co) = (planes.start / g.out_channels, planes.start % g.out_channels);
    let rows_first = walks_rows_first(g) && g.out_w.div_ceil(S::LANES) <= MAX_ROW_MAJOR_BLOCKS;
    for yp in y.chunks_exact_mut(ohw).take(planes.len()) {
        let input = n * g.in_channels + co / multiplier;
        let xp = &x[input * hw..(input + 1) * hw];
        let wp = &w[co * taps..(co + 1) * taps];
        let b = bias.map_or(0.0, |b| b[co]);
        // SAFETY: xp and yp are whole planes of g's input and output shapes; g's kernel is
        // 3 × 3 or 5 × 5 (`applies`).
        unsafe {
            match (g.kernel_h, g.stride_h) {
                (3, 1) if rows_first => forward_plane_rows_first::<S, 3, 3, ROWS>(g, xp, wp, b, yp),
                (5, 1) if rows_first => forward_plane_rows_first::<S, 5, 5, ROWS>(g, xp, wp, b, yp),
                (3, 1) => forward_plane::<S, 3, 3, 1, ROWS>(g, xp, wp, b, yp),
                (3, _) => forward_plane::<S, 3, 3, 2, ROWS_3X3_STRIDE_2>(g, xp, wp, b, yp),
                (_, 1) => forward_plane::<S, 5, 5, 1, ROWS>(g, xp, wp, b, yp),
                _ => forward_plane::<S, 5, 5, 2, ROWS>(g, xp, wp, b, yp),
            }
        }
        co += 1;
        if co == g.out_channels {
            (n, co) = (n + 1, 0);
        }
    }
}

/// Where one output column block's input rows are read: the loads of each padded row
/// ([`Columns::row`]) at the addresses and lane masks worked out once per block.
#[derive(Clone, Copy)]
struct Columns<S: SimdF32, const KW: usize, const STRIDE: usize> {
    /// The address of lane 0 in input row 0 (before the row where it falls in the left
    /// padding, so only ever the base of a masked load): of each tap column `j`'s load at
    /// stride 1, of the block's first vector at stride 2.
    starts: [*const f32; KW],
    /// The lanes that read inside the row: of each tap column's load at stride 1, of the
    /// block's three contiguous vectors at stride 2.
    masks: [S::Lanes; 5],
}

impl<S: SimdF32, const KW: usize, const STRIDE: usize> Columns<S, KW, STRIDE> {
    /// The block of `n` output columns from `c0` of plane `xp`. At stride 2, tap column `j` of
    /// output column `c0 + l` reads element `2·l + j` of the block's `2·n + KW − 2` contiguous
    /// input elements: three vectors (`2·16 + 3 ≤ 48`) hold them all.
    #[inline(always)]
    unsafe fn new(g: &ConvGeometry, xp: &[f32], c0: usize, n: usize) -> Self {
        let lanes = S::LANES as isize;
        // Where element 0 of tap column j (at stride 2, of the block) lies in the row, and how
        // many elements it reads.
        let offset = |j: usize| (c0 * STRIDE + j * g.dilation_w) as isize - g.pad_left as isize;
        let len = if STRIDE == 1 { n } else { 2 * n + KW - 2 } as isize;
        // Loops, not `array::from_fn` (see `kernel_vectors`).
        let mut starts = [xp.as_ptr(); KW];
        for (j, p) in starts.iter_mut().enumerate() {
            *p = xp.as_ptr().wrapping_offset(offset(j));
        }
        // The lanes of the vector `base` elements into tap column j's that lie inside the row.
        let mask = |j: usize, base: isize| {
            let lo = (-offset(j)).clamp(0, len);
            let hi = (g.in_w as isize - offset(j)).clamp(lo, len);
            let (vlo, vhi) = ((lo - base).clamp(0, lanes), (hi - base).clamp(0, lanes));
            unsafe { S::lanes(vlo as usize, vhi.max(vlo) as usize) }
        };
        let mut masks = [unsafe { S::lanes(0, 0) }; 5];
        for (k, m) in masks.iter_mut().enumerate() {
            match (STRIDE, k) {
                (1, j) if j < KW => *m = mask(j, 0),
                (2, v) if v < 3 => *m = mask(0, v as isize * lanes),
                _ => {}
            }
        }
        Columns { starts, masks }
    }

    /// Input row `ir` (inside the plane of row length `in_w`) as seen by each tap column.
    #[inline(always)]
    unsafe fn row(&self, ir: usize, in_w: usize) -> [S; KW] {
        let lanes = S::LANES;
        unsafe {
            if STRIDE == 1 {
                let mut v = [S::zero(); KW];
                for (j, v) in v.iter_mut().enumerate() {
                    *v = S::load_masked(self.starts[j].wrapping_add(ir * in_w), self.masks[j]);
                }
                return v;
            }
            // No intrinsics inside closures below: a closure `from_fn` does not inline is
            // compiled without the caller's target features, and every intrinsic in it
            // becomes a call (the 5 × 5 forward measured 10× slower so).
            let at = self.starts[0].wrapping_add(ir * in_w);
            let m = &self.masks;
            let v0 = S::load_masked(at, m[0]);
            let v1 = S::load_masked(at.wrapping_add(lanes), m[1]);
            let v2 = S::load_masked(at.wrapping_add(2 * lanes), m[2]);
            let (even, odd) = S::deinterleave(v0, v1);
            // Tap columns 2 to 4 continue the even and odd lanes into the third vector.
            let (even2, odd2) = if KW > 3 {
                S::deinterleave(v2, v2)
            } else {
                (v2, v2)
            };
            let taps = [
                even,
                odd,
                S::shift_lanes::<1>(even, even2),
                S::shift_lanes::<1>(odd, odd2),
                S::shift_lanes::<2>(even, even2),
            ];
            let mut v = [S::zero(); KW];
            v.copy_from_slice(&taps[..KW]);
            v
        }
    }
}

/// One output plane, `S::LANES` columns at a time, in groups of `R` output rows: at stride
/// 1 rows `r0 + o·dh` (`dh` the row dilation), where tap row `i` of output row `r0 + o·dh`
/// reads input row `r0 + (o + i)·dh − pad_top`; at stride 2 (dilation 1) rows `r0 + o`, whose
/// tap row `i` reads input row `2·(r0 + o) + i − pad_top`. Either way the group's
/// `(R − 1)·STRIDE + KH` input rows are each loaded once ([`Columns::row`]: `KW` shifted
/// loads, at stride 2 three contiguous ones split into even and odd lanes) and feed every
/// output row of the group that reads them.
///
/// Written for the compiler: per-row scalar work is a large share of a narrow plane's time,
/// so each tap column's start and lane mask are hoisted out of the row loop and rows outside
/// the plane read as zeros instead of branching around the FMAs (with a loop over the
/// dilation phases inside each group, bounds-checked stores and the offsets recomputed per
/// row it measured 1.5× slower on reference layer D's 14 × 14 planes).
///
/// # Safety
/// `xp`, `yp` are whole planes of `g`'s input and output, `w` the plane's `KH × KW` taps, `g`'s
/// stride `STRIDE` on both axes (1 or 2; dilation 1 at 2).
#[inline(always)]
unsafe fn forward_plane<
    S: SimdF32,
    const KH: usize,
    const KW: usize,
    const STRIDE: usize,
    const R: usize,
>(
    g: &ConvGeometry,
    xp: &[f32],
    w: &[f32],
    bias: f32,
    yp: &mut [f32],
) {
    let lanes = S::LANES;
    let (oh, ow) = (g.out_h, g.out_w);
    // Output rows of a group lie `step` apart; at stride 2 the dilation is 1.
    let step = g.dilation_h;
    // SAFETY (all blocks): input loads read the lanes `Columns` found inside a row below
    // `in_h`; stores write `n ≤ lanes` columns of rows below `oh`.
    let wv = unsafe { kernel_vectors::<S, KH, KW>(w) };
    let bv = unsafe { S::splat(bias) };
    let (pad_top, in_h, in_w) = (g.pad_top, g.in_h, g.in_w);
    for c0 in (0..ow).step_by(lanes) {
        let n = lanes.min(ow - c0);
        let columns = unsafe { Columns::<S, KW, STRIDE>::new(g, xp, c0, n) };
        // Padded row r as seen by each tap column, zeros outside the plane.
        let row = |r: usize| unsafe { padded_row(&columns, r, pad_top, in_h, in_w) };
        for phase in 0..step.min(oh) {
            let mut r0 = phase;
            while r0 < oh {
                let mut acc = [bv; R];
                for k in 0..(R - 1) * STRIDE + KH {
                    let v = row(r0 * STRIDE + k * step);
                    // Output row o of the group reads this row through tap row k − o·STRIDE.
                    // Written out here rather than through `add_row`: so, a 3 × 3 dilated by 2
                    // on 8 × 128 × 28² measured 0.119–0.121 ms forward, through it 0.191–0.208.
                    for (o, a) in acc.iter_mut().enumerate() {
                        let i = k.wrapping_sub(o * STRIDE);
                        if i < KH {
                            for (&wt, &vj) in wv[i].iter().zip(&v) {
                                *a = unsafe { S::mul_add(wt, vj, *a) };
                            }
                        }
                    }
                }
                let rows = (oh - r0).div_ceil(step);
                for (o, a) in acc.iter().enumerate().take(rows) {
                    let dst = yp.as_mut_ptr().wrapping_add((r0 + o * step) * ow + c0);
                    unsafe { a.store_partial(dst, n) }
                }
                r0 += R * step;
            }
        }
    }
}

/// [`forward_plane`] at stride 1 where [`walks_rows_first`]: each group of `R` output rows
/// across every column block before the next group (see there), a 3 × 3 with one column of
/// left padding on rows of whole vectors carrying each input row's vectors across the blocks
/// ([`row_group_3x3_carried`]). A function of its own, so that the column walk's code stays
/// as it was measured (see [`kernel_vectors`] for what adding this walk beside it did to
/// reference layer D's forward).
///
/// # Safety
/// As [`forward_plane`], at stride 1 and dilation 1 with at most [`MAX_ROW_MAJOR_BLOCKS`]
/// column blocks.
#[inline(always)]
unsafe fn forward_plane_rows_first<S: SimdF32, const KH: usize, const KW: usize, const R: usize>(
    g: &ConvGeometry,
    xp: &[f32],
    w: &[f32],
    bias: f32,
    yp: &mut [f32],
) {
    let lanes = S::LANES;
    let (oh, ow) = (g.out_h, g.out_w);
    let wv = unsafe { kernel_vectors::<S, KH, KW>(w) };
    let bv = unsafe { S::splat(bias) };
    let blocks = ow.div_ceil(lanes);
    assert!((1..=MAX_ROW_MAJOR_BLOCKS).contains(&blocks));
    // Every column block's starts and masks, worked out once per plane.
    let mut columns = [unsafe { Columns::<S, KW, 1>::new(g, xp, 0, lanes) }; MAX_ROW_MAJOR_BLOCKS];
    for (b, c) in columns[..blocks].iter_mut().enumerate() {
        let c0 = b * lanes;
        *c = unsafe { Columns::new(g, xp, c0, lanes.min(ow - c0)) };
    }
    // Rows of whole vectors only: on rows of 56 columns (reference layer C), every other
    // row starting half a cache line in, the carried loads split lines anyway and it
    // measured slower (0.469–0.480 → 0.489–0.499 ms).
    let carries = KH == 3 && KW == 3 && R == 4 && g.pad_left == 1 && g.in_w.is_multiple_of(lanes);
    // The 3 × 3 kernel's vectors as such (the same as `wv` where `carries`).
    let mut w3 = [[unsafe { S::zero() }; 3]; 3];
    for (i, row) in w3.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = wv[i.min(KH - 1)][j.min(KW - 1)];
        }
    }
    let mut r0 = 0;
    while r0 < oh {
        // Most groups read input rows inside the plane only and write R whole output rows:
        // no row tests, no partial groups (B's depthwise forward at batch 8, 2 threads, 8
        // rounds in one process: 0.615 → 0.484 ms, C's 0.603 → 0.544).
        let inside = r0 >= g.pad_top && r0 + R - 1 + KH <= g.in_h + g.pad_top && r0 + R <= oh;
        if inside && carries {
            // SAFETY: the group's rows lie inside the plane and the output (tested).
            unsafe { row_group_3x3_carried::<S>(g, xp, &w3, bv, r0 - g.pad_top, r0, yp) };
        } else {
            for (b, columns) in columns[..blocks].iter().enumerate() {
                let c0 = b * lanes;
                // SAFETY: as above where `inside`; `row_group` tests each row at the edges.
                unsafe {
                    if inside {
                        row_group::<S, KH, KW, R, true>(g, columns, &wv, bv, r0, c0, yp);
                    } else {
                        row_group::<S, KH, KW, R, false>(g, columns, &wv, bv, r0, c0, yp);
                    }
                }
            }
        }
        r0 += R;
    }
}

/// The `KH × KW` taps `w` each splat into a vector. Loops, not `array::from_fn`: a closure
/// the compiler does not inline is compiled without the caller's target features, and each
/// intrinsic in it becomes a call (with the rows-first walk added beside it, the forward's
/// `from_fn` stopped being inlined: 13% of reference layer D's depthwise forward in
/// `try_from_fn`, 0.123 → 0.160 ms).
///
/// # Safety
/// The CPU must support `S`; `w` holds at least `KH·KW` taps.
#[inline(always)]
unsafe fn kernel_vectors<S: SimdF32, const KH: usize, const KW: usize>(w: &[f32]) -> [[S; KW]; KH] {
    let mut wv = [[unsafe { S::zero() }; KW]; KH];
    for (i, row) in wv.iter_mut().enumerate() {
        for (j, v) in row.iter_mut().enumerate() {
            *v = unsafe { S::splat(w[i * KW + j]) };
        }
    }
    wv
}

/// Whether [`forward_plane`] walks `g`'s planes a group of rows at a time across every column
/// block, instead of a block at a time down every row: at stride 1 and dilation 1, on inputs
/// larger than [`MAX_WIDE_INPUT_FLOATS`] with rows of 2 to [`MAX_ROW_MAJOR_BLOCKS`] vectors.
/// A group's input rows are then read from L1 by each block and the output is written row by
/// row, where a column block walked down a plane that L1 does not hold fetched it again.
fn walks_rows_first(g: &ConvGeometry) -> bool {
    (g.stride_h, g.stride_w, g.dilation_h, g.dilation_w) == (1, 1, 1, 1)
        && g.input_len() > MAX_WIDE_INPUT_FLOATS
        && (2..=MAX_ROW_MAJOR_BLOCKS).contains(&g.out_w.div_ceil(16))
}

/// Column blocks of 16 up to which [`walks_rows_first`] holds (rows of up to 128 columns).
const MAX_ROW_MAJOR_BLOCKS: usize = 8;

/// One group of [`forward_plane_rows_first`]: `R` output rows from `r0` of the column block
/// from `c0` that `columns` reads. A group that reaches the padding or the output's last rows
/// (`INSIDE` false) tests each input row (zeros outside the plane) and stores only the output
/// rows that exist; one whose input rows all lie inside the plane and whose `R` output rows all
/// lie inside the output (`INSIDE`) loads every row and stores every output row, no tests.
///
/// # Safety
/// As [`forward_plane`]; `columns` is the block's from `c0` of `g`'s input plane; where
/// `INSIDE`, input rows `r0 − pad_top ..` and output rows `r0 .. r0 + R` lie inside.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn row_group<
    S: SimdF32,
    const KH: usize,
    const KW: usize,
    const R: usize,
    const INSIDE: bool,
>(
    g: &ConvGeometry,
    columns: &Columns<S, KW, 1>,
    wv: &[[S; KW]; KH],
    bv: S,
    r0: usize,
    c0: usize,
    yp: &mut [f32],
) {
    let (oh, ow) = (g.out_h, g.out_w);
    let n = S::LANES.min(ow - c0);
    let mut acc = [bv; R];
    for k in 0..R - 1 + KH {
        let v = if INSIDE {
            // SAFETY: the row lies inside the plane (the caller's contract).
            unsafe { columns.row(r0 + k - g.pad_top, g.in_w) }
        } else {
            // Padded row r0 + k as seen by each tap column, zeros outside the plane.
            unsafe { padded_row(columns, r0 + k, g.pad_top, g.in_h, g.in_w) }
        };
        // SAFETY: the caller's ISA.
        unsafe { add_row::<S, KH, KW, 1, R>(&mut acc, k, &v, wv) };
    }
    let stored = if INSIDE { R } else { R.min(oh - r0) };
    for (o, a) in acc.iter().enumerate().take(stored) {
        let dst = yp.as_mut_ptr().wrapping_add((r0 + o) * ow + c0);
        unsafe { a.store_partial(dst, n) }
    }
}

/// A group of four output rows of a 3 × 3 at stride 1 with one column of left padding, every
/// input row inside the plane, walked across the column blocks with each input row's vectors
/// carried from block to block: per row and block one aligned load (the next block's), the
/// shifted vectors by `valignd`, where [`row_group`] loads three shifted vectors (two of them
/// split across cache lines). Reference layer B's depthwise forward at batch 8 (rows of 112
/// columns; 2 threads, the two ways switched in one process, 8 rounds): 0.485–0.514 → 0.400–0.444
/// ms on plain buffers, 0.391 → 0.381 on the benchmark's, its training step 2.19 → 2.07.
///
/// # Safety
/// As [`forward_plane`]; input rows `ir0 .. ir0 + 6` and output rows `r0 .. r0 + 4` inside.
#[inline(always)]
unsafe fn row_group_3x3_carried<S: SimdF32>(
    g: &ConvGeometry,
    xp: &[f32],
    wv: &[[S; 3]; 3],
    bv: S,
    ir0: usize,
    r0: usize,
    yp: &mut [f32],
) {
    let lanes = S::LANES;
    let (ow, in_w) = (g.out_w, g.in_w);
    let base = xp.as_ptr().wrapping_add(ir0 * in_w);
    // The lanes of the vector at column c that lie inside the row.
    let inside = |c: usize| unsafe { S::lanes(0, in_w.saturating_sub(c).min(lanes)) };
    unsafe {
        let first = inside(0);
        let mut prev = [S::zero(); 6];
        let mut cur = [S::zero(); 6];
        for (k, v) in cur.iter_mut().enumerate() {
            *v = S::load_masked(base.add(k * in_w), first);
        }
        let mut c0 = 0;
        while c0 < ow {
            let next_lanes = inside(c0 + lanes);
            let mut acc = [bv; 4];
            for k in 0..6 {
                let next = S::load_masked(base.wrapping_add(k * in_w + c0 + lanes), next_lanes);
                let v = [
                    S::shift_lanes::<15>(prev[k], cur[k]),
                    cur[k],
                    S::shift_lanes::<1>(cur[k], next),
                ];
                add_row::<S, 3, 3, 1, 4>(&mut acc, k, &v, wv);
                prev[k] = cur[k];
                cur[k] = next;
            }
            let n = lanes.min(ow - c0);
            let dst = yp.as_mut_ptr().wrapping_add(r0 * ow + c0);
            for (o, a) in acc.iter().enumerate() {
                a.store_partial(dst.wrapping_add(o * ow), n);
            }
            c0 += lanes;
        }
    }
}

/// Adds row `k` of a group (`v`, as seen by each tap column) into the group's output rows:
/// output row `o` reads it through tap row `k − o·STRIDE`.
///
/// # Safety
/// The CPU must support `S`.
#[inline(always)]
unsafe fn add_row<
    S: SimdF32,
    const KH: usize,
    const KW: usize,
    const STRIDE: usize,
    const R: usize,
>(
    acc: &mut [S; R],
    k: usize,
    v: &[S; KW],
    wv: &[[S; KW]; KH],
) {
    for (o, a) in acc.iter_mut().enumerate() {
        let i = k.wrapping_sub(o * STRIDE);
        if i < KH {
            for (&wt, &vj) in wv[i].iter().zip(v) {
                *a = unsafe { S::mul_add(wt, vj, *a) };
            }
        }
    }
}

/// Whether [`backward`] computes `g`'s gradients with `isa`: a depthwise layer of depth
/// multiplier 1 that [`applies`] at stride 2.
pub fn backward_applies(isa: Isa, g: &ConvGeometry) -> bool {
    applies(isa, g) && g.stride_h == 2 && g.depth_multiplier() == 1
}

/// Whether [`backward`] computes `g`'s weight gradient alone with `isa`: where
/// [`backward_applies`], and for a 3 × 3 at stride 1 without dilation (depth multiplier 1)
/// that [`applies`], whose grad-input is the adjoint forward on this kernel too. The planes
/// are read in place, as at stride 2, where the blocked kernel's one-pass backward transposed
/// the input and output-gradient planes in and the grad-input out: on reference layer D's 14 ×
/// 14 planes those transposes were half its time (perf: `pack` 40%, `unpack` 10%).
pub fn grad_weight_applies(isa: Isa, g: &ConvGeometry) -> bool {
    backward_applies(isa, g)
        || (applies(isa, g)
            && g.depth_multiplier() == 1
            && (g.kernel_h, g.kernel_w, g.stride_h, g.stride_w) == (3, 3, 1, 1)
            && (g.dilation_h, g.dilation_w) == (1, 1)
            && g.out_w <= MAX_GRAD_WEIGHT_WIDTH)
}

/// Output rows the stride-1 3 × 3 grad-weight walks down one column block before the next
/// block ([`grad_weight_plane_3x3`]), on planes of more than twice as many rows. Walked down the
/// whole plane, a block reads each row's lines of input and output gradient once more per
/// block on a plane that L1 does not hold with the rest; in a band of 8 rows they stay there
/// from one block to the next, for 2 input rows loaded again per band. `sepconv bench
/// --layers C,D,E --variants dw,ds --no-peak`, bands switched in one build, alternated 2×:
/// reference layer C's depthwise training step 1.46–1.72 → 1.40–1.42 ms (bands of 4: 1.46–1.49,
/// of 16: 1.41–1.62), its depthwise-separable step 13.86–14.11 → 13.57–13.66; D's 14 rows
/// stay one band (two bands: 0.39 → 0.40). At stride 2, E's 28 rows measured a tie in bands
/// (against the build before, alternated 4×), and walk the whole plane.
const GRAD_WEIGHT_BAND_ROWS: usize = 8;

/// Output columns up to which a stride-1 grad-weight runs here ([`grad_weight_applies`]), and
/// a stride-1 backward as two passes on this kernel instead of the blocked kernel's one pass.
/// Against the build before (`sepconv bench`, 2 threads, min, alternated 3×): reference layer
/// D (14 columns) depthwise training step 0.419–0.448 → 0.384–0.412 ms, its depthwise-separable
/// step 12.57–12.64 → 11.62–11.74 (2×). With the grad-weight walked down the whole plane, C's
/// 56 columns gained on the depthwise step but lost 2.5% on the depthwise-separable one (the
/// output gradient comes from the pointwise half, and the two passes read it twice); walked
/// in bands ([`GRAD_WEIGHT_BAND_ROWS`]) C gains on both against the blocked kernel (`sepconv
/// bench --layers C --variants dw,ds --no-peak`, min, against the build before, alternated
/// 3×): depthwise step 1.67–1.70 → 1.35–1.40 ms, depthwise-separable step 13.70–13.96 →
/// 13.47–13.50. B's 112 columns still lose in bands (depthwise step 1.78–1.89 → 1.90–1.92,
/// depthwise-separable step 8.72–8.95 → 9.05–9.11), so they stay on the blocked kernel.
const MAX_GRAD_WEIGHT_WIDTH: usize = 64;

/// Gradients of a stride-2 depthwise layer (`g` must satisfy [`backward_applies`] for `exec`'s
/// instruction set) reading the NCHW planes in place, in one pass over the output gradient
/// `gy`: the input gradient when `grad_input` = `(w, gx)` is given, the weight gradient when
/// `grad_weight` = `(x, gw)` is. The weight gradient alone also at stride 1
/// ([`grad_weight_applies`]). Planes are split over the threads in runs (each plane's
/// grad-input depends on its own output gradient alone); each thread sums its planes' weight
/// gradients in f64 (per plane in f32 lanes, as the blocked kernels do), and the threads' sums
/// are added in order.
pub fn backward(
    exec: Exec,
    g: &ConvGeometry,
    gy: &[f32],
    grad_input: Option<(&[f32], &mut [f32])>,
    grad_weight: Option<(&[f32], &mut [f32])>,
) -> Result<()> {
    assert!(
        backward_applies(exec.isa(), g)
            || (grad_input.is_none() && grad_weight_applies(exec.isa(), g)),
        "row depthwise backward: unsupported geometry"
    );
    let planes = g.batch * g.in_channels;
    let tasks = exec.threads().min(planes);
    let per_task = planes.div_ceil(tasks);
    let (x, gw) = grad_weight.map_or((None, None), |(x, gw)| (Some(x), Some(gw)));
    let acc_len = if x.is_some() { g.weight_len() } else { 0 };
    let run = |t: usize, gi: Option<(&[f32], &mut [f32])>| -> Vec<f64> {
        let range = t * per_task..((t + 1) * per_task).min(planes);
        let mut acc = vec![0f64; acc_len];
        backward_planes(exec.isa(), g, x, gy, range, gi, &mut acc);
        acc
    };
    let sums: Vec<Vec<f64>> = match grad_input {
        Some((w, gx)) => gx
            .par_chunks_mut(per_task * g.in_pixels())
            .enumerate()
            .map(|(t, gxc)| run(t, Some((w, gxc))))
            .collect(),
        None => (0..tasks).into_par_iter().map(|t| run(t, None)).collect(),
    };
    if let Some(gw) = gw {
        super::sum_task_sums(&sums, gw);
    }
    Ok(())
}

crate::simd_dispatch!(pub(super) fn backward_planes => backward_planes_kernel(
    g: &ConvGeometry, x: Option<&[f32]>, gy: &[f32], planes: Range<usize>,
    grad_input: Option<(&[f32], &mut [f32])>, acc: &mut [f64]
));

/// [`backward`] for planes `planes` (image-major): their grad-input planes when
/// `grad_input` = `(w, gx)` is given, and their weight gradients added to `acc`
/// (`[channel][tap]`) when `x` is.
#[inline(always)]
unsafe fn backward_planes_kernel<S: SimdF32>(
    g: &ConvGeometry,
    x: Option<&[f32]>,
    gy: &[f32],
    planes: Range<usize>,
    mut grad_input: Option<(&[f32], &mut [f32])>,
    acc: &mut [f64],
) {
    let taps = g.kernel_h * g.kernel_w;
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    for (k, p) in planes.enumerate() {
        let c = p % g.in_channels;
        let gyp = &gy[p * ohw..(p + 1) * ohw];
        // SAFETY: whole planes of g's shapes; g's kernel is 3 × 3 or 5 × 5 at stride 2 and
        // dilation 1 (`backward_applies`).
        unsafe {
            if let Some((w, gx)) = grad_input.as_mut() {
                let wp = &w[c * taps..(c + 1) * taps];
                let gxp = &mut gx[k * hw..(k + 1) * hw];
                match g.kernel_h {
                    3 => grad_input_plane::<S, 3, 3>(g, gyp, wp, gxp),
                    _ => grad_input_plane::<S, 5, 5>(g, gyp, wp, gxp),
                }
            }
            if let Some(x) = x {
                let xp = &x[p * hw..(p + 1) * hw];
                let out = &mut acc[c * taps..(c + 1) * taps];
                match g.kernel_h {
                    3 if g.stride_h == 1 => grad_weight_plane_3x3::<S, 1>(g, xp, gyp, out),
                    3 => grad_weight_plane_3x3::<S, 2>(g, xp, gyp, out),
                    _ => grad_weight_plane::<S, 5, 5>(g, xp, gyp, out),
                }
            }
        }
    }
}

/// One input plane's gradient at stride 2, `2·S::LANES` padded columns at a time. Padded
/// column `2·c + j` is read by output column `c` through tap column `j`, so of a block from
/// padded column `2·c0` the even columns `2·(c0 + l)` take the even taps `j` from output column
/// `c0 + l − j/2`, the odd ones the odd taps from `c0 + l − (j − 1)/2`; padded row `2·r + i`
/// takes tap row `i` from output row `r`. Each output-gradient row is loaded once
/// (`(KW + 1)/2` shifted masked loads, lanes outside the row read as zero) and added into the
/// `KH` padded rows it reaches, kept as even and odd vectors; after row `r`, padded rows `2·r`
/// and `2·r + 1` are complete: interleaved and stored (masked to the input row). Input rows
/// no output reads get zeros.
///
/// # Safety
/// `gyp`, `gxp` are whole planes of `g`'s output and input, `w` the plane's `KH × KW` taps, `g`
/// at stride 2 and dilation 1.
#[inline(always)]
unsafe fn grad_input_plane<S: SimdF32, const KH: usize, const KW: usize>(
    g: &ConvGeometry,
    gyp: &[f32],
    w: &[f32],
    gxp: &mut [f32],
) {
    let lanes = S::LANES as isize;
    let (oh, ow, in_h, in_w) = (g.out_h, g.out_w, g.in_h, g.in_w);
    let (pt, pl) = (g.pad_top, g.pad_left);
    // SAFETY (all blocks): loads read the lanes inside an output row below `oh`, stores write
    // the lanes inside an input row below `in_h`.
    let wv = unsafe { kernel_vectors::<S, KH, KW>(w) };
    let zero = unsafe { S::zero() };
    for p0 in (0..pl + in_w).step_by(2 * S::LANES) {
        let c0 = (p0 / 2) as isize;
        // Output columns c0 − s + l inside the row, for shifts s = 0, 1, 2. (Loops, not
        // `array::from_fn`: see `kernel_vectors`.)
        let mut gy_masks = [unsafe { S::lanes(0, 0) }; 3];
        for (s, mask) in gy_masks.iter_mut().enumerate() {
            let lo = (s as isize - c0).clamp(0, lanes);
            let hi = (ow as isize + s as isize - c0).clamp(lo, lanes);
            *mask = unsafe { S::lanes(lo as usize, hi as usize) };
        }
        // Padded columns p0 + v·lanes + l, input columns inside the row.
        let mut gx_masks = [unsafe { S::lanes(0, 0) }; 2];
        for (v, mask) in gx_masks.iter_mut().enumerate() {
            let base = (p0 + v * S::LANES) as isize;
            let lo = (pl as isize - base).clamp(0, lanes);
            let hi = ((pl + in_w) as isize - base).clamp(lo, lanes);
            *mask = unsafe { S::lanes(lo as usize, hi as usize) };
        }
        let out = gxp.as_mut_ptr().wrapping_add(p0).wrapping_sub(pl);
        // Stores padded row t (even and odd columns) where it is an input row.
        let store = |t: usize, (even, odd): (S, S)| {
            let ih = t.wrapping_sub(pt);
            if ih < in_h {
                let dst = out.wrapping_add(ih * in_w);
                unsafe {
                    let (lo, hi) = S::interleave(even, odd);
                    lo.store_masked(dst, gx_masks[0]);
                    hi.store_masked(dst.wrapping_add(S::LANES), gx_masks[1]);
                }
            }
        };
        // rows[i]: padded row 2·r + i so far.
        let mut rows = [(zero, zero); KH];
        for r in 0..oh {
            let row = gyp.as_ptr().wrapping_add(r * ow + c0 as usize);
            for s in 0..KW.div_ceil(2) {
                let v = unsafe { S::load_masked(row.wrapping_sub(s), gy_masks[s]) };
                for ((even, odd), wi) in rows.iter_mut().zip(&wv) {
                    *even = unsafe { S::mul_add(wi[2 * s], v, *even) };
                    if 2 * s + 1 < KW {
                        *odd = unsafe { S::mul_add(wi[2 * s + 1], v, *odd) };
                    }
                }
            }
            store(2 * r, rows[0]);
            store(2 * r + 1, rows[1]);
            rows.copy_within(2.., 0);
            rows[KH - 2] = (zero, zero);
            rows[KH - 1] = (zero, zero);
        }
        // The rows the last output rows reach past 2·oh, then zeros to the plane's end.
        for (i, &pair) in rows.iter().enumerate().take(KH - 2) {
            store(2 * oh + i, pair);
        }
        for t in 2 * oh + KH - 2..pt + in_h {
            store(t, (zero, zero));
        }
    }
}

/// Padded row `t` of a plane as each tap column of `columns` sees it: zeros outside the plane
/// (rows `pt` to `pt + in_h` are the input's).
///
/// # Safety
/// `columns` was built for a plane of `in_h` rows of `in_w` floats.
#[inline(always)]
unsafe fn padded_row<S: SimdF32, const KW: usize, const STRIDE: usize>(
    columns: &Columns<S, KW, STRIDE>,
    t: usize,
    pt: usize,
    in_h: usize,
    in_w: usize,
) -> [S; KW] {
    let ir = t.wrapping_sub(pt);
    if ir < in_h {
        // SAFETY: row ir lies inside the plane.
        unsafe { columns.row(ir, in_w) }
    } else {
        [unsafe { S::zero() }; KW]
    }
}

/// [`grad_weight_plane`] for a 3 × 3 kernel, one output row at a time: output row `r` reads
/// padded rows `2·r`, `2·r + 1` and `2·r + 2`, and the last is the next row's first, so it is
/// carried over and each input row is loaded once (two per output row, where groups of four
/// output rows load nine). The grouped kernel's nine rows of three vectors did not fit the
/// registers (the compiler spilled them to the stack): reference layer E's image (128 × 56²,
/// one thread, min of 3000, in cache; the build before alternated 3×) 0.0485–0.0488 →
/// 0.0409–0.0410 ms. At stride 1 the middle row is carried too.
///
/// At stride 1, planes of more than twice [`GRAD_WEIGHT_BAND_ROWS`] output rows are walked in
/// bands of that many rows, every column block of a band before the next band (see there).
///
/// # Safety
/// As [`grad_weight_plane`], with a 3 × 3 kernel.
#[inline(always)]
unsafe fn grad_weight_plane_3x3<S: SimdF32, const STRIDE: usize>(
    g: &ConvGeometry,
    xp: &[f32],
    gyp: &[f32],
    acc: &mut [f64],
) {
    let (oh, ow, in_h, in_w, pt) = (g.out_h, g.out_w, g.in_h, g.in_w, g.pad_top);
    let mut sums = [[unsafe { S::zero() }; 3]; 3];
    let band = if STRIDE == 1 && oh > 2 * GRAD_WEIGHT_BAND_ROWS {
        GRAD_WEIGHT_BAND_ROWS
    } else {
        oh
    };
    for r0 in (0..oh).step_by(band) {
        let rows = r0..(r0 + band).min(oh);
        for c0 in (0..ow).step_by(S::LANES) {
            let n = S::LANES.min(ow - c0);
            // SAFETY (all blocks): loads read the lanes inside rows below `in_h` and `oh`.
            let columns = unsafe { Columns::<S, 3, STRIDE>::new(g, xp, c0, n) };
            let inside = unsafe { S::lanes(0, n) };
            let mut top = unsafe { padded_row(&columns, STRIDE * r0, pt, in_h, in_w) };
            // At stride 1 the middle row is the next output row's first, carried too.
            let mut carried = unsafe { padded_row(&columns, STRIDE * r0 + 1, pt, in_h, in_w) };
            for r in rows.clone() {
                let gv = unsafe { S::load_masked(gyp.as_ptr().wrapping_add(r * ow + c0), inside) };
                let middle = if STRIDE == 1 {
                    carried
                } else {
                    unsafe { padded_row(&columns, STRIDE * r + 1, pt, in_h, in_w) }
                };
                let bottom = unsafe { padded_row(&columns, STRIDE * r + 2, pt, in_h, in_w) };
                for (i, v) in [top, middle, bottom].iter().enumerate() {
                    for (s, &vj) in sums[i].iter_mut().zip(v) {
                        *s = unsafe { S::mul_add(gv, vj, *s) };
                    }
                }
                if STRIDE == 1 {
                    (top, carried) = (middle, bottom);
                } else {
                    top = bottom;
                }
            }
        }
    }
    for (a, s) in acc.iter_mut().zip(sums.iter().flatten()) {
        *a += unsafe { s.reduce_sum() } as f64;
    }
}

/// One plane's weight gradient at stride 2, added to `acc` (`KH × KW` taps): `gw[i, j] = Σ
/// gy[r, c] · x[2·r + i − pad_top, 2·c + j − pad_left]`, a vector of output columns at a time
/// with the input rows read as the forward reads them ([`Columns`]), summed in `KH × KW`
/// accumulator vectors (lanes past the output row multiply zeros). As in the forward, `ROWS`
/// output rows go together, so each of their `2·(ROWS − 1) + KH` input rows is read once (the
/// 5 × 5 kernel's; the 3 × 3 one goes row by row, [`grad_weight_plane_3x3`]).
///
/// # Safety
/// `xp`, `gyp` are whole planes of `g`'s input and output, `g` at stride 2 and dilation 1.
#[inline(always)]
unsafe fn grad_weight_plane<S: SimdF32, const KH: usize, const KW: usize>(
    g: &ConvGeometry,
    xp: &[f32],
    gyp: &[f32],
    acc: &mut [f64],
) {
    let (oh, ow, in_h, in_w, pt) = (g.out_h, g.out_w, g.in_h, g.in_w, g.pad_top);
    let zero = unsafe { S::zero() };
    let mut sums = [[zero; KW]; KH];
    for c0 in (0..ow).step_by(S::LANES) {
        let n = S::LANES.min(ow - c0);
        // SAFETY (all blocks): loads read the lanes inside rows below `in_h` and `oh`.
        let columns = unsafe { Columns::<S, KW, 2>::new(g, xp, c0, n) };
        let inside = unsafe { S::lanes(0, n) };
        for r0 in (0..oh).step_by(ROWS) {
            // The group's output-gradient rows, zeros past the plane.
            let mut gv = [zero; ROWS];
            for (o, v) in gv.iter_mut().enumerate() {
                if r0 + o < oh {
                    *v = unsafe {
                        S::load_masked(gyp.as_ptr().wrapping_add((r0 + o) * ow + c0), inside)
                    };
                }
            }
            for k in 0..2 * (ROWS - 1) + KH {
                // Zeros outside the plane rather than a branch around the FMAs: the loop
                // unrolls, and the accumulators stay in registers.
                let v = unsafe { padded_row(&columns, 2 * r0 + k, pt, in_h, in_w) };
                // Output row o of the group reads this row through tap row k − 2·o.
                for (o, &gvo) in gv.iter().enumerate() {
                    let i = k.wrapping_sub(2 * o);
                    if i < KH {
                        for (s, &vj) in sums[i].iter_mut().zip(&v) {
                            *s = unsafe { S::mul_add(gvo, vj, *s) };
                        }
                    }
                }
            }
        }
    }
    for (a, s) in acc.iter_mut().zip(sums.iter().flatten()) {
        *a += unsafe { s.reduce_sum() } as f64;
    }
}
