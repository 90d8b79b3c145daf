//! Implicit-GEMM convolution: the im2col matrix is never written.
//!
//! Each input channel is laid out as its padded phase planes (the depthwise kernel's layout),
//! where tap (i, j) of output position `o = oh·wq + ow` is `o + off(i, j)` for every stride,
//! dilation and padding. Row (c, i, j) of the im2col matrix is then just channel c's buffer
//! shifted by `off(i, j)`: a table of K = C·kh·kw row offsets turns the unpacked
//! register-blocked GEMM ([`super::pointwise`]) into the whole convolution,
//! `Y_flat (N × out_h·wq) = W (N × K) · D`, with D's rows read straight from the planes (all
//! taps of a channel hit the same few cache lines). The flat output has `wq − out_w` wasted
//! columns per row, dropped when it is copied into NCHW. Where the output is as wide as the
//! input and the padding runs one way only (1 × k kernels with "same" width padding, k × 1
//! kernels with height padding whose weights are small against their planes), the product
//! reads the input planes in place and writes NCHW directly, and only the edge columns, whose
//! taps would wrap into the neighbouring row, or the padding rows, which run from small
//! zero-padded strips, are computed separately ([`reads_in_place`]). A 1 × k
//! kernel on a small image runs as its transpose, a k × 1 kernel on the transposed planes,
//! whose product needs no columns beyond the output's ([`runs_transposed`]).
//!
//! Used for convolutions Winograd does not cover (strided, dilated, non-3×3) when the batch
//! gives every thread images of its own; otherwise the forward (but a transposed one) splits
//! each image over the threads ([`forward_within_images_applies`]), and the rest runs im2col,
//! split the same way.

use rayon::prelude::*;

use super::depthwise::{GradInputLayout, PhaseLayout, fill_phases, gather_phases};
use super::fused::{band_geometry, row_bands};
use super::gemm::{MatView, gemm};
use super::pointwise::{ColumnWindow, Operands, Rows, Store, small_k_gemm};
use super::simd::SimdF32;
use super::{
    Exec, Workspace, collect_exact, for_each_image_task, for_each_task, splits_inside_images,
};
use crate::error::Result;

use crate::geometry::ConvGeometry;

/// Whether the implicit GEMM should compute `g`: images for every thread (it runs one image
/// per GEMM, single-threaded) and more than one input channel per group (one channel is the
/// depthwise kernel's job).
pub fn applies(exec: Exec, g: &ConvGeometry) -> bool {
    g.batch >= exec.threads() && shape_applies(g)
}

/// [`applies`] but for the batch: the shapes the implicit GEMM computes.
fn shape_applies(g: &ConvGeometry) -> bool {
    g.in_channels_per_group() > 1
        && !g.is_pointwise()
        && (g.out_pixels() >= MIN_PIXELS
            || (g.out_pixels() >= MIN_FLAT_PIXELS && (writes_output_flat(g) || runs_transposed(g))))
}

/// Whether [`grad_input`] computes `g`'s gradient with each image split over the threads
/// (each thread its input channels' products and their interleaving, from its own copy of the
/// output-gradient planes): where the batch does not give every thread images of its own, on the shapes
/// [`applies`] gives the implicit GEMM with more images. These ran im2col + col2im split
/// inside the images before. Harness, 2 threads, min of 10–20, alternated 3×: reference layer
/// E's 3 × 3 stride 2 at batch 1 2.55–2.60 → 2.36 ms (per image at batch 8: 2.25), its 3 × 1
/// half 0.53 → 0.45, a 32 → 64 3 × 3 stride 2 at 112² 1.05 → 0.62; E on 3 images (which gave
/// the implicit GEMM's image split 2 + 1) 9.08–9.14 → 6.84–6.88; batch 8 unchanged.
pub fn grad_input_within_images_applies(exec: Exec, g: &ConvGeometry) -> bool {
    splits_inside_images(exec.threads(), g.batch) && shape_applies(g)
}

/// Output pixels per image below which im2col (which batches small images into one GEMM) wins.
const MIN_PIXELS: usize = 256;

/// [`MIN_PIXELS`] for k × 1 kernels that need no phase-plane columns beyond the output's
/// ([`writes_output_flat`]): their product writes NCHW directly, with no wasted columns and no
/// copy. Reference layer D's 3 × 1 half (8 × 512 → 512 at 14 × 14, 196 pixels; harness, min
/// of 15, alternated): forward 12.0–12.1 → 11.6 ms, grad-input (its adjoint) 12.7–12.8 →
/// 12.4–12.5 ms against im2col + faer. Also for 1 × k kernels at that size, run as their
/// transposes ([`runs_transposed`]); reading in place recomputes 2 of 14 columns (13.9 against
/// 12.3 ms), and column-masked copies of the input (one per tap column, no recompute) only tie
/// with im2col (12.1–12.3 against 12.2–12.3 ms).
const MIN_FLAT_PIXELS: usize = 128;

/// Whether the forward product's columns are exactly the output pixels without reading in
/// place: a k × 1 kernel at stride 1 across, without width padding.
fn writes_output_flat(g: &ConvGeometry) -> bool {
    g.kernel_w == 1 && g.stride_w == 1 && g.pad_left + g.pad_right == 0
}

/// Whether [`grad_weight`] should compute `g`'s grad-weight: where [`applies`], with a long
/// im2col row (K = cin·kh·kw ≥ 512) and at least 128 output channels per group. Measured
/// against im2col + faer (2 threads, min of 15): reference layer E's std 22.1 → 20.0 ms,
/// C's std 41.8–43.2 → 40.8–41.2 ms; but slower on shorter products, where transposing the
/// output gradient costs more per multiplication (B std, K = 288: 21.4 → 23.4 ms; the 3×1
/// and 1×3 halves of B, C and E's spatially separable layers: 3–25% slower). Stride-1
/// same-width layers (C's std among them) and strided layers (E's std among them) go to the
/// per-tap GEMMs first ([`super::GradWeightKernel`]), so this is left with stride-1 layers
/// whose output is narrower than the input.
pub fn grad_weight_applies(exec: Exec, g: &ConvGeometry) -> bool {
    applies(exec, g)
        && g.out_pixels() >= MIN_PIXELS
        && g.col_rows() >= 512
        && g.out_channels_per_group() >= 128
}

/// How [`forward`] reads each image's input, chosen once per call.
enum Layout {
    /// The input planes themselves ([`reads_in_place`]), with their row table.
    InPlace(InPlace),
    /// Copies in padded phase planes ([`fill_phases`]).
    PhasePlanes,
    /// Transposed into the transposed geometry's phase planes ([`runs_transposed`]).
    Transposed(Transposes),
}

/// Per-task scratch of [`forward`]: the phase planes of one group's channels, then the flat
/// output; or, where the input is read in place, what its edges take
/// ([`InPlace::shared_scratch`], [`InPlace::run_scratch`]).
fn scratch_per_task(g: &ConvGeometry, l: &PhaseLayout, layout: &Layout) -> usize {
    if let Layout::InPlace(t) = layout {
        t.shared_scratch(g) + t.run_scratch(g, g.out_channels_per_group())
    } else {
        g.in_channels_per_group() * l.len + g.out_channels_per_group() * l.out_len()
    }
}

/// Whether [`forward`] reads the input planes in place instead of copying them into padded
/// phase planes: stride 1, an output as wide as the input, and padding one way only — a 1 × k
/// kernel with "same" width padding (the second half of a spatially separable layer) or a
/// k × 1 kernel with height padding (the first half), and their adjoints. Tap (i, j) of output
/// position p then reads input position `p + (i·dh − pad_top)·W + j·dw − pad_left`, inside the
/// plane for every p from `pad_top·W + pad_left` to `out_h·W − pad_bottom·W − pad_right`; only
/// the positions in the padding columns (which read a neighbouring row there) or padding rows
/// (outside that range) are left, and are computed separately (the edge columns recomputed,
/// the padding rows from strips). Saves the
/// phase-plane copy and the copy that drops the padded layout's wasted columns (together a
/// fifth of the time of reference layer B's 1 × 3 half).
pub fn reads_in_place(g: &ConvGeometry) -> bool {
    let (rows, cols) = (g.pad_top + g.pad_bottom, g.pad_left + g.pad_right);
    g.stride_h == 1
        && g.stride_w == 1
        && g.out_w == g.in_w
        && ((rows == 0 && cols > 0 && g.in_w > cols)
            || (cols == 0
                && rows > 0
                && g.out_h > rows
                && STRIP_WEIGHT_RATIO * g.out_channels_per_group() * g.kernel_h <= g.in_pixels()))
}

/// How many times a k × 1 kernel's input plane must outweigh its output channels' taps
/// (`cog · kh`) for [`reads_in_place`]: per image, the copy into phase planes moves `cig · HW`
/// floats, and each padding-row strip's product reads the group's `cog · cig · kh` weights
/// once more, a few columns at a time. Harness (2 threads, min of 10–20, alternated 3×),
/// forward of the spatially separable layers' 3 × 1 halves at batch 8: reference layer B's
/// (ratio 130) 2.98–3.14 → 2.73–2.78 ms, C's (8) 11.09–11.27 → 11.12, D's (0.1) 11.1–11.2 →
/// 12.2–12.5.
const STRIP_WEIGHT_RATIO: usize = 16;

/// Whether [`forward`] computes `g` with each image split over the threads: where the batch
/// does not give every thread images of its own (one image, or an odd batch on two threads),
/// on the shapes [`applies`] would give the implicit GEMM with more images. Phase planes (or
/// transposed planes) are filled by input channels, the products (with their copy into NCHW,
/// their transposes back, or their edge columns) run by output rows. Small images (128–255
/// output pixels) written flat or run transposed joined later (harness, batch 1, quiet
/// minutes, against im2col split inside the image): reference layer D's 3 × 1 half forward
/// 1.51 → 1.38 ms and grad-input (its adjoint) 1.87–1.90 → 1.52–1.53, its 1 × 3 half
/// 1.52–1.53 → 1.40–1.41 and 2.02–2.04 → 1.54–1.56. Batch 1 on 2 threads (harness, min of 10, alternated 3×, against im2col split
/// inside the image): reference layer B's 1 × 3 half (read in place) 2.58–2.60 → 0.80 ms, C's
/// 3.23–3.32 → 1.56–1.58 (on 3 images 5.79–5.92 → 4.81–4.99); E's 3 × 3 stride 2 2.45–2.47 →
/// 2.30–2.33, C's 3 × 1 half 1.70–1.75 → 1.52–1.53 (on 3 images 5.56–5.99 → 4.41–4.44); B's
/// 3 × 1 half (0.64–0.66 → 0.54–0.73) and E's strided halves a tie.
pub fn forward_within_images_applies(exec: Exec, g: &ConvGeometry) -> bool {
    splits_inside_images(exec.threads(), g.batch) && shape_applies(g)
}

/// [`forward`] where [`forward_within_images_applies`].
#[allow(clippy::too_many_arguments)]
fn forward_within_images(
    exec: Exec,
    g: &ConvGeometry,
    l: &PhaseLayout,
    transposes: Option<&Transposes>,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut [f32],
) {
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let (hw, ohw, out_len) = (g.in_pixels(), g.out_pixels(), l.out_len());
    let (ins, outs) = (cig.div_ceil(exec.threads()), cog.div_ceil(exec.threads()));
    let (planes, flat) = scratch.split_at_mut(cig * l.len);
    let flat = &mut flat[..cog * out_len];
    let rows = im2col_rows(cig, l);
    for n in 0..g.batch {
        for grp in 0..g.groups {
            let xg = &x[(n * g.in_channels + grp * cig) * hw..][..cig * hw];
            // Padding positions are zeroed once (by the threads: on one, that took 7% of a
            // 3 × 1 stride-2 layer's time at batch 1); after that only pixels are rewritten.
            let clear = n == 0 && grp == 0;
            planes
                .par_chunks_mut(ins * l.len)
                .zip(xg.par_chunks(ins * hw))
                .for_each(|(pc, xc)| match transposes {
                    Some(t) => transpose_planes_in(exec.isa(), g, l, t, xc, pc, clear),
                    None => fill_planes(exec.isa(), g, l, xc, pc, clear),
                });
            let planes = &*planes;
            let ops = group_product(g, l, w, bias, grp, planes, &rows);
            let at = (n * g.out_channels + grp * cog) * ohw;
            let y_group = &mut y[at..at + cog * ohw];
            flat.par_chunks_mut(outs * out_len)
                .zip(y_group.par_chunks_mut(outs * ohw))
                .enumerate()
                .for_each(|(i, (fc, yc))| {
                    let o = i * outs..i * outs + yc.len() / ohw;
                    match transposes {
                        Some(t) => transposed_product(exec.isa(), g, t, ops.rows(o), fc, yc),
                        None => {
                            let mut yc = ColumnWindow::whole(yc, ohw);
                            phase_plane_product(exec.isa(), g, l, ops.rows(o), fc, &mut yc, 0, 0)
                        }
                    }
                });
        }
    }
}

/// The forward with each image split over the threads by bands of output rows (where
/// [`splits_by_bands`]): each thread fills the phase planes of the input rows its band reads
/// (every channel) and runs the product for every output channel of its rows, writing its own
/// columns of the output planes. No thread reads what another wrote.
fn forward_by_bands(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let bands = output_bands(g, exec.threads())?;
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let per_task = bands
        .iter()
        .map(|b| cig * b.layout.len + cog * b.layout.out_len())
        .max()
        .unwrap_or(0);
    let scratch = ws.take(per_task * bands.len())?;
    let ohw = g.out_pixels();
    let bounds: Vec<usize> = std::iter::once(0)
        .chain(bands.iter().map(|b| b.out_rows.end * g.out_w))
        .collect();
    for (n, y_image) in y.chunks_exact_mut(g.out_channels * ohw).enumerate() {
        ColumnWindow::split(y_image, ohw, &bounds)
            .into_par_iter()
            .zip(scratch.par_chunks_mut(per_task))
            .zip(&bands)
            .for_each(|((window, s), band)| {
                band_forward(exec.isa(), g, band, x, w, bias, n, window, s)
            });
    }
    Ok(())
}

/// Whether [`forward`], where the batch leaves threads without images of their own and the
/// input goes into phase planes (neither read in place nor transposed), splits each image by
/// bands of output rows, one per thread: with at least 256 output positions per thread. The
/// split it replaces (planes by input channels, then the products by output channels) passed
/// the planes between threads.
///
/// Harness, batch 1, 2 threads, min of 20, alternated with the VM's core-to-core round trip
/// read before and after each pair, about 300 pairs: in quiet minutes (53–90 ns) B's 3 × 1 half
/// 0.40–0.43 → 0.37 ms, E's 3 × 1 stride (2, 1) half 0.73–0.76 → 0.71, C's 3 × 1 half 1.41–1.42
/// → 1.37; in the spells with the vCPUs on different dies (300–340 ns) 0.72 → 0.37, 1.12–1.18 →
/// 0.72, 1.73–1.76 → 1.38–1.39. Reference layer D's halves (98 positions per band) were slower
/// (1.38–1.43 → 1.52–1.55). Bands of 256–511 positions joined later (harness, the same way,
/// 12 quiet pairs): reference layer E's 1 × 3 stride (1, 2) half (392 per band) 0.758–0.826 →
/// 0.749–0.754 ms, a 64 → 128 3 × 3 stride 2 at 56² 0.587–0.592 → 0.565–0.568, E's 3 × 3
/// stride 2 a tie (2.20–2.23 against 2.18–2.34); with the vCPUs on different dies 0.84 → 0.64
/// and 2.76 → 2.36. Inside E's spatially separable training step at batch 1 its 1 × 3 forward
/// was slower on bands (0.775–0.780 → 0.810–0.815 ms) and the step a tie in quiet minutes
/// (4.95–4.97 against 4.97, harness, min of 100), faster in the spells (5.19 → 5.08, 6.59 →
/// 6.15).
pub fn splits_by_bands(exec: Exec, g: &ConvGeometry) -> bool {
    g.out_pixels() >= MIN_BAND_POSITIONS * exec.threads()
}

/// Fewest output positions per thread for [`splits_by_bands`]: shorter products, and the rows
/// above and below a band that its planes repeat, cost more than the exchange saves.
const MIN_BAND_POSITIONS: usize = 256;

/// A band of output rows ([`row_bands`]), its geometry on one image with every channel, the
/// geometry's phase planes and their im2col rows.
struct OutputBand {
    out_rows: std::ops::Range<usize>,
    in_rows: std::ops::Range<usize>,
    geometry: ConvGeometry,
    layout: PhaseLayout,
    rows: Vec<usize>,
}

/// `bands` bands of output rows of one image (fewer if the image has fewer rows).
fn output_bands(g: &ConvGeometry, bands: usize) -> Result<Vec<OutputBand>> {
    row_bands(g, g.out_h.div_ceil(bands.max(1)))
        .into_iter()
        .map(|rb| {
            let geometry = band_geometry(g, &rb, [g.in_channels, g.out_channels, g.groups])?;
            let layout = PhaseLayout::new(&geometry);
            let rows = im2col_rows(g.in_channels_per_group(), &layout);
            Ok(OutputBand {
                out_rows: rb.out_rows,
                in_rows: rb.in_rows,
                geometry,
                layout,
                rows,
            })
        })
        .collect()
}

crate::simd_dispatch!(fn band_forward => band_forward_kernel(
    g: &ConvGeometry, band: &OutputBand, x: &[f32], w: &[f32], bias: Option<&[f32]>,
    n: usize, y: ColumnWindow<'_>, s: &mut [f32]
));

/// One thread of [`forward_by_bands`]: image `n`'s output rows of `band`, every group.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn band_forward_kernel<S: SimdF32>(
    g: &ConvGeometry,
    band: &OutputBand,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    n: usize,
    mut y: ColumnWindow<'_>,
    s: &mut [f32],
) {
    let (gb, l) = (&band.geometry, &band.layout);
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let (hw, ow) = (g.in_pixels(), g.out_w);
    let band_len = band.in_rows.len() * g.in_w;
    let (planes, flat) = s.split_at_mut(cig * l.len);
    let flat = &mut flat[..cog * l.out_len()];
    let col0 = band.out_rows.start * ow;
    for grp in 0..g.groups {
        for (c, buf) in planes.chunks_exact_mut(l.len).enumerate() {
            let plane = (n * g.in_channels + grp * cig + c) * hw + band.in_rows.start * g.in_w;
            // Padding positions are zeroed on the thread's first use of its planes.
            fill_phases::<S>(gb, l, &x[plane..plane + band_len], buf, n == 0 && grp == 0);
        }
        let ops = group_product(gb, l, w, bias, grp, planes, &band.rows);
        phase_plane_product(S::ISA, gb, l, ops, flat, &mut y, grp * cog, col0);
    }
}

crate::simd_dispatch!(fn fill_planes => fill_planes_kernel(
    g: &ConvGeometry, l: &PhaseLayout, x: &[f32], planes: &mut [f32], clear: bool
));

/// The padded phase planes of the input planes `x` into `planes` (`l.len` floats each),
/// zeroed first where `clear`.
#[inline(always)]
unsafe fn fill_planes_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    x: &[f32],
    planes: &mut [f32],
    clear: bool,
) {
    for (plane, buf) in x
        .chunks_exact(g.in_pixels())
        .zip(planes.chunks_exact_mut(l.len))
    {
        fill_phases::<S>(g, l, plane, buf, clear);
    }
}

crate::simd_dispatch!(fn transpose_planes_in => transpose_planes_in_kernel(
    g: &ConvGeometry, l: &PhaseLayout, t: &Transposes, x: &[f32], planes: &mut [f32],
    clear: bool
));

/// The input planes `x` transposed into the transposed geometry's phase planes `planes` (its
/// layout `l`, `l.len` floats each), zeroed first where `clear`.
#[inline(always)]
unsafe fn transpose_planes_in_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    t: &Transposes,
    x: &[f32],
    planes: &mut [f32],
    clear: bool,
) {
    if clear {
        planes.fill(0.0);
    }
    for (plane, buf) in x
        .chunks_exact(g.in_pixels())
        .zip(planes.chunks_exact_mut(l.len))
    {
        // SAFETY: the ISA is this CPU's (simd_dispatch).
        unsafe { transpose_plane::<S>(plane, g.in_h, g.in_w, buf, &t.input) };
    }
}

crate::simd_dispatch!(fn transposed_product => transposed_product_kernel(
    g: &ConvGeometry, t: &Transposes, ops: Operands<'_>, flat: &mut [f32], y: &mut [f32]
));

/// The product `ops` of a transposed geometry into `flat` (rows `flat.len() / n` apart),
/// then each row transposed back into its output plane of `y`. Through the caches: the
/// transposes read it back at once (streamed, the MNIST network's 1 × 3 took 1.10 ms instead
/// of 0.88).
#[inline(always)]
unsafe fn transposed_product_kernel<S: SimdF32>(
    g: &ConvGeometry,
    t: &Transposes,
    ops: Operands<'_>,
    flat: &mut [f32],
    y: &mut [f32],
) {
    let ohw = g.out_pixels();
    let ld = flat.len() / ops.n.max(1);
    small_k_gemm(S::ISA, ops, flat, ld, Store::Cached);
    for (src, dst) in flat.chunks_exact(ld).zip(y.chunks_exact_mut(ohw)) {
        // SAFETY: the ISA is this CPU's (simd_dispatch).
        unsafe { transpose_plane::<S>(&src[..ohw], g.out_w, g.out_h, dst, &t.output) };
    }
}

/// Forward pass.
pub fn forward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    // The product runs on the transposed geometry's phase planes where it runs transposed.
    let (l, layout) = if runs_transposed(g) {
        let gt = transposed(g);
        let l = PhaseLayout::new(&gt);
        let t = Transposes::new(g, &gt, &l);
        (l, Layout::Transposed(t))
    } else if reads_in_place(g) {
        (PhaseLayout::new(g), Layout::InPlace(InPlace::new(g)))
    } else {
        (PhaseLayout::new(g), Layout::PhasePlanes)
    };
    let per_task = scratch_per_task(g, &l, &layout);
    if forward_within_images_applies(exec, g) {
        if let Layout::PhasePlanes = layout
            && splits_by_bands(exec, g)
        {
            return forward_by_bands(exec, g, x, w, bias, y, ws);
        }
        let scratch = ws.take(per_task)?;
        match layout {
            Layout::InPlace(t) => {
                let (isa, splits) = (exec.isa(), exec.threads());
                forward_in_place(isa, splits, g, &t, x, w, bias, 0..g.batch, y, scratch)
            }
            Layout::PhasePlanes => forward_within_images(exec, g, &l, None, x, w, bias, y, scratch),
            Layout::Transposed(t) => {
                forward_within_images(exec, g, &l, Some(&t), x, w, bias, y, scratch)
            }
        }
        return Ok(());
    }
    let tasks = exec.threads().min(g.batch);
    let scratch = ws.take(per_task * tasks)?;
    let img_out = g.out_channels * g.out_pixels();
    // One table for all tasks (the in-place product reads the input planes without one).
    let rows = match layout {
        Layout::InPlace(_) => Vec::new(),
        _ => im2col_rows(g.in_channels_per_group(), &l),
    };
    for_each_task(tasks, y, img_out, scratch, per_task, |images, yc, buf| {
        forward_images(
            exec.isa(),
            g,
            &l,
            &layout,
            &rows,
            x,
            w,
            bias,
            images,
            yc,
            buf,
        )
    });
    Ok(())
}

/// Whether [`forward`] computes `g` as its transpose (rows and columns swapped): a 1 × k kernel
/// at stride 1 down, without row padding, on an image too small for the other implicit forwards
/// (under 256 output pixels, where they lost to im2col). The transpose is a k × 1 kernel whose
/// product writes the flat output with no wasted columns; the two transposes ride on copies the
/// other paths make anyway. Harness, 2 threads, min of 20, alternated 3×, against im2col +
/// faer: reference layer D's 1 × 3 half (8 × 512 → 512 at 14 × 14) forward 12.35–12.37 →
/// 11.20–11.26 ms, grad-input (the adjoint, a 1 × 3 too) 12.91–12.97 → 11.59–11.76; the MNIST
/// network's 1 × 3 of 32 → 64 at 14 × 14, batch 64, 1.07 → 0.88 ms. Not on larger images:
/// reference layer C's 1 × 3 (56 × 56, read in place) 12.3–13.8 against 14.1 ms transposed, and
/// E's strided 1 × 3 half (28 × 56, stride 2 across, padded phase planes) a tie (6.2–6.3 ms
/// both). Also on larger images whose width padding is more than an eighth of the output's
/// columns (`MAX_RECOMPUTED_COLUMNS_PER_8`).
pub fn runs_transposed(g: &ConvGeometry) -> bool {
    g.kernel_h == 1
        && g.kernel_w > 1
        && g.stride_h == 1
        && g.pad_top + g.pad_bottom == 0
        && (g.out_pixels() < MIN_PIXELS
            || 8 * (g.pad_left + g.pad_right) > MAX_RECOMPUTED_COLUMNS_PER_8 * g.out_w)
}

/// Columns of padding per 8 output columns above which a 1 × k kernel runs transposed on any
/// image: reading in place recomputes every padding column's output apart (a wide kernel on
/// a narrow image: 6 of Inception's 17 columns under its 1 × 7). Forward and training step,
/// batch 8, "same" (sweep harness, 2 threads, min, the two rules alternated 2× in one build):
/// 128 → 128 1 × 7 on 17 × 17 3.48–3.52 → 2.49–2.57 ms and 10.2–10.5 → 8.1–8.6 (PyTorch 2.15
/// and 7.26), 64 → 64 1 × 7 on 35 × 35 3.13–3.15 → 2.64–2.65, a 1 × 5 on 28 × 28 1.43–1.45 →
/// 1.25–1.26; 1 × 3 kernels on 20, 28 and 56 columns (one or two padding columns per 8, the
/// last reference layer C's half) a tie either way.
const MAX_RECOMPUTED_COLUMNS_PER_8: usize = 1;

/// `g` with rows and columns swapped: the convolution of the transposed planes by the
/// transposed kernels, whose output is the transposed output. A 1 × k kernel's weights are
/// already the k × 1 kernel's, element for element.
fn transposed(g: &ConvGeometry) -> ConvGeometry {
    ConvGeometry {
        in_h: g.in_w,
        in_w: g.in_h,
        kernel_h: g.kernel_w,
        kernel_w: g.kernel_h,
        stride_h: g.stride_w,
        stride_w: g.stride_h,
        dilation_h: g.dilation_w,
        dilation_w: g.dilation_h,
        pad_top: g.pad_left,
        pad_bottom: g.pad_right,
        pad_left: g.pad_top,
        pad_right: g.pad_bottom,
        out_h: g.out_w,
        out_w: g.out_h,
        ..*g
    }
}

/// Where [`forward`] writes the rows of its transposes where it [`runs_transposed`]: each
/// input plane's column c goes to `input[c]` of its buffer of the transposed geometry's phase
/// planes (in place of the copy [`fill_phases`] makes), and each column r of a plane of the
/// transposed output to `output[r]` of the output plane.
struct Transposes {
    input: Vec<usize>,
    output: Vec<usize>,
}

impl Transposes {
    /// For `g`, whose transpose `gt` has the phase planes `l`.
    fn new(g: &ConvGeometry, gt: &ConvGeometry, l: &PhaseLayout) -> Self {
        debug_assert!(writes_output_flat(gt) && l.positions == g.out_pixels());
        // Column c is padded row c + pad of the transposed plane: row (c + pad) / stride of
        // phase plane (c + pad) mod stride.
        let (plane, s, pad) = (l.hq * l.wq, gt.stride_h, gt.pad_top);
        Transposes {
            input: (0..g.in_w)
                .map(|c| ((c + pad) % s) * plane + (c + pad) / s * l.wq)
                .collect(),
            output: (0..g.out_h).map(|r| r * g.out_w).collect(),
        }
    }
}

/// Plane `src` (`h × w`) transposed into `dst`: its column c becomes the `h` floats at
/// `dst[rows[c]..]`. In `LANES × LANES` blocks transposed in registers, partial at the edges.
///
/// # Safety
/// `S` must be supported by this CPU.
#[inline(always)]
unsafe fn transpose_plane<S: SimdF32>(
    src: &[f32],
    h: usize,
    w: usize,
    dst: &mut [f32],
    rows: &[usize],
) {
    let l = S::LANES;
    assert!(src.len() >= h * w && rows.len() >= w && l <= 16);
    assert!(rows[..w].iter().all(|&r| r + h <= dst.len()));
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: the ISA is this CPU's (the caller's contract).
    let mut block = [unsafe { S::zero() }; 16];
    for y0 in (0..h).step_by(l) {
        let nh = l.min(h - y0);
        for x0 in (0..w).step_by(l) {
            let nw = l.min(w - x0);
            // SAFETY: rows y0 .. y0 + nh, columns x0 .. x0 + nw of src; destination rows
            // rows[x0 + j] (j < nw), floats y0 .. y0 + nh of each (asserted above). Lanes
            // past nh or nw hold stale values that no store writes out.
            unsafe {
                for (i, r) in block[..nh].iter_mut().enumerate() {
                    let at = sp.add((y0 + i) * w + x0);
                    *r = if nw == l {
                        S::load(at)
                    } else {
                        S::load_partial(at, nw)
                    };
                }
                S::transpose(&mut block[..l]);
                for (j, r) in block[..nw].iter().enumerate() {
                    let at = dp.add(rows[x0 + j] + y0);
                    if nh == l {
                        r.store(at)
                    } else {
                        r.store_partial(at, nh)
                    }
                }
            }
        }
    }
}

crate::simd_dispatch!(fn forward_images => forward_images_kernel(
    g: &ConvGeometry, l: &PhaseLayout, layout: &Layout, rows: &[usize], x: &[f32], w: &[f32],
    bias: Option<&[f32]>, images: std::ops::Range<usize>, y: &mut [f32], buf: &mut [f32]
));

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn forward_images_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    layout: &Layout,
    rows: &[usize],
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    images: std::ops::Range<usize>,
    y: &mut [f32],
    buf: &mut [f32],
) {
    let (cig, cog, k) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        g.col_rows(),
    );
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let transposes = match layout {
        Layout::InPlace(t) => {
            // SAFETY: forwarded from this function's contract.
            forward_in_place(S::ISA, 1, g, t, x, w, bias, images, y, buf);
            return;
        }
        Layout::PhasePlanes => None,
        Layout::Transposed(t) => Some(t),
    };
    let (planes, flat) = buf.split_at_mut(cig * l.len);
    debug_assert_eq!(rows.len(), k);
    for (local, n) in images.enumerate() {
        for grp in 0..g.groups {
            let xg = &x[(n * g.in_channels + grp * cig) * hw..][..cig * hw];
            // Padding positions are zeroed once; after that only pixels are rewritten.
            let clear = local == 0 && grp == 0;
            // SAFETY: forwarded from this function's contract.
            unsafe {
                match transposes {
                    Some(t) => transpose_planes_in_kernel::<S>(g, l, t, xg, planes, clear),
                    None => fill_planes_kernel::<S>(g, l, xg, planes, clear),
                }
            }
            let ops = group_product(g, l, w, bias, grp, planes, rows);
            let at = local * g.out_channels * ohw + grp * cog * ohw;
            let y_group = &mut y[at..at + cog * ohw];
            match transposes {
                Some(t) => transposed_product(S::ISA, g, t, ops, &mut flat[..cog * ohw], y_group),
                None => {
                    let mut y_group = ColumnWindow::whole(y_group, ohw);
                    phase_plane_product(S::ISA, g, l, ops, flat, &mut y_group, 0, 0)
                }
            }
        }
    }
}

/// Group `grp`'s product over its phase planes `planes` (D's rows at `rows`): its weights
/// times the implicit im2col matrix, plus its bias.
fn group_product<'a>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    w: &'a [f32],
    bias: Option<&'a [f32]>,
    grp: usize,
    planes: &'a [f32],
    rows: &'a [usize],
) -> Operands<'a> {
    let (cog, k) = (g.out_channels_per_group(), g.col_rows());
    let wg = &w[grp * cog * k..(grp + 1) * cog * k];
    let bg = bias.map(|b| &b[grp * cog..(grp + 1) * cog]);
    Operands::weights_times_rows(wg, cog, k, planes, rows, l.positions, bg)
}

/// The product `ops` over phase planes (its rows: output channels; `g`'s output rows, all of
/// them or a band's) into rows `row0 ..` and columns `col0 ..` of the NCHW planes `y` (a
/// window of them, one plane per row), through the scratch `flat` (`ops.n` rows of
/// `l.out_len()`) where the flat output has wasted columns.
#[allow(clippy::too_many_arguments)]
fn phase_plane_product(
    isa: super::Isa,
    g: &ConvGeometry,
    l: &PhaseLayout,
    ops: Operands<'_>,
    flat: &mut [f32],
    y: &mut ColumnWindow<'_>,
    row0: usize,
    col0: usize,
) {
    let (ow, out_len) = (g.out_w, l.out_len());
    if l.wq == ow {
        // No wasted columns (no left/right padding, stride 1 across): the flat output is the
        // NCHW plane, so the product writes it directly. Saves the copy, which reads back what
        // the streaming stores just sent to memory (B's 3×1 half of the spatially separable
        // layer: 3.6–3.8 → 3.3 ms).
        y.product(isa, ops, row0, col0, Store::Stream);
        return;
    }
    // Dropping the wasted columns with a copy measured faster than one product per output row
    // straight into NCHW (C's 1×3 half: 12.4 → 15.6 ms row by row). Scratch read back at once
    // goes through the caches (a tie with streamed stores on E's strided 1 × 3 half, whose flat
    // output is larger than L2).
    let n = ops.n;
    small_k_gemm(isa, ops, flat, out_len, Store::Cached);
    for (oc, src) in flat[..n * out_len].chunks_exact(out_len).enumerate() {
        for (oh, src_row) in src.chunks_exact(l.wq).take(g.out_h).enumerate() {
            let at = col0 + oh * ow;
            y.row_columns(row0 + oc, at..at + ow)
                .copy_from_slice(&src_row[..ow]);
        }
    }
}

/// Where [`reads_in_place`]: the table of D's rows (c, i, j) relative to the first interior
/// output position (`pad_top` rows and `pad_left` columns in), and how the edge positions,
/// whose taps read outside the plane or a neighbouring row, are computed.
struct InPlace {
    rows: Vec<usize>,
    edges: Edges,
}

/// The edge positions of an in-place product.
enum Edges {
    /// A 1 × k kernel's edge columns: the im2col rows of their positions (column by column,
    /// `out_h` each) gathered and multiplied by the weights on their own.
    Columns(Vec<usize>),
    /// A k × 1 kernel's padding rows, above and below where there are any ([`RowStrip`]):
    /// whole rows, products as fast as the interior's.
    Rows(Vec<RowStrip>),
}

/// Output rows `out_rows` of a k × 1 kernel without width padding, computed from a copy of
/// the input rows they read, zero-padded: strip row r of channel c is input row
/// `first_row + r` (zero outside the plane), `rows` the table of D's rows (c, i) in the
/// strips, `len` the floats of one channel's strip.
struct RowStrip {
    out_rows: std::ops::Range<usize>,
    first_row: isize,
    rows: Vec<usize>,
    len: usize,
}

impl RowStrip {
    fn new(g: &ConvGeometry, out_rows: std::ops::Range<usize>) -> Self {
        let height = out_rows.len() + (g.kernel_h - 1) * g.dilation_h;
        let len = height * g.in_w;
        let rows = collect_exact(
            g.in_channels_per_group() * g.kernel_h,
            (0..g.in_channels_per_group())
                .flat_map(|c| (0..g.kernel_h).map(move |i| c * len + i * g.dilation_h * g.in_w)),
        );
        RowStrip {
            first_row: out_rows.start as isize - g.pad_top as isize,
            out_rows,
            rows,
            len,
        }
    }

    /// Floats of one image's group's strips (`cig · len`).
    fn floats(&self, g: &ConvGeometry) -> usize {
        g.in_channels_per_group() * self.len
    }

    /// Copies the strip's input rows of one image's group `xg` into `strip` (`cig · len`).
    fn fill(&self, g: &ConvGeometry, xg: &[f32], strip: &mut [f32]) {
        let (hw, width) = (g.in_pixels(), g.in_w);
        for (plane, dst) in xg.chunks_exact(hw).zip(strip.chunks_exact_mut(self.len)) {
            for (r, row) in dst.chunks_exact_mut(width).enumerate() {
                match usize::try_from(self.first_row + r as isize) {
                    Ok(ih) if ih < g.in_h => {
                        row.copy_from_slice(&plane[ih * width..(ih + 1) * width])
                    }
                    _ => row.fill(0.0),
                }
            }
        }
    }
}

/// Each row strip with its span of the edges buffer ([`InPlace::fill_edges`]), one after the
/// other.
fn strip_spans<'a>(
    strips: &'a [RowStrip],
    g: &'a ConvGeometry,
) -> impl Iterator<Item = (&'a RowStrip, std::ops::Range<usize>)> + 'a {
    strips.iter().scan(0, move |at, strip| {
        let span = *at..*at + strip.floats(g);
        *at = span.end;
        Some((strip, span))
    })
}

impl InPlace {
    fn new(g: &ConvGeometry) -> Self {
        let (hw, width, kh, kw) = (g.in_pixels(), g.in_w, g.kernel_h, g.kernel_w);
        let cig = g.in_channels_per_group();
        let rows = collect_exact(
            cig * kh * kw,
            (0..cig).flat_map(|c| {
                (0..kh * kw).map(move |t| {
                    c * hw + (t / kw) * g.dilation_h * width + (t % kw) * g.dilation_w
                })
            }),
        );
        let edges = if g.pad_left + g.pad_right == 0 {
            // A side without padding has no strip.
            let sides = [0..g.pad_top, g.out_h - g.pad_bottom..g.out_h];
            Edges::Rows(
                sides
                    .into_iter()
                    .filter(|rows| !rows.is_empty())
                    .map(|rows| RowStrip::new(g, rows))
                    .collect(),
            )
        } else {
            Edges::Columns((0..g.pad_left).chain(width - g.pad_right..width).collect())
        };
        InPlace { rows, edges }
    }

    /// The interior's flat output positions: every position from the first one with all its
    /// taps inside the plane to the last one (those between in edge columns included: their
    /// taps wrap into the neighbouring row, and the edge product overwrites them).
    fn interior(g: &ConvGeometry) -> std::ops::Range<usize> {
        let start = g.pad_top * g.out_w + g.pad_left;
        start..g.out_pixels() - g.pad_bottom * g.out_w - g.pad_right
    }

    /// Scratch floats that all output channels of one image's group share: the edge columns'
    /// im2col rows, or the row strips.
    fn shared_scratch(&self, g: &ConvGeometry) -> usize {
        match &self.edges {
            Edges::Columns(e) => g.col_rows() * e.len() * g.out_h,
            Edges::Rows(strips) => strips.iter().map(|s| s.floats(g)).sum(),
        }
    }

    /// Scratch floats of a run of `outs` output channels: their products at the edge columns
    /// (none for row strips, whose products go straight into the output).
    fn run_scratch(&self, g: &ConvGeometry, outs: usize) -> usize {
        match &self.edges {
            Edges::Columns(e) => outs * e.len() * g.out_h,
            Edges::Rows(_) => 0,
        }
    }

    /// Prepares the edges of one image's group `xg` in `buf` ([`Self::shared_scratch`]
    /// floats): the edge columns' im2col rows (zeros where a tap leaves the image), or the row
    /// strips' copies.
    fn fill_edges(&self, g: &ConvGeometry, xg: &[f32], buf: &mut [f32]) {
        let (hw, width, kh, kw) = (g.in_pixels(), g.in_w, g.kernel_h, g.kernel_w);
        match &self.edges {
            Edges::Columns(edge_cols) => {
                let count = edge_cols.len() * g.out_h;
                let cols = &mut buf[..g.col_rows() * count];
                for (kk, row) in cols.chunks_exact_mut(count).enumerate() {
                    let (c, i, j) = (kk / (kh * kw), kk / kw % kh, kk % kw);
                    let plane = &xg[c * hw..(c + 1) * hw];
                    for (e, &u) in edge_cols.iter().enumerate() {
                        let col = (u + j * g.dilation_w)
                            .checked_sub(g.pad_left)
                            .filter(|&v| v < width);
                        for oh in 0..g.out_h {
                            row[e * g.out_h + oh] =
                                col.map_or(0.0, |v| plane[(oh + i * g.dilation_h) * width + v]);
                        }
                    }
                }
            }
            Edges::Rows(strips) => {
                for (strip, span) in strip_spans(strips, g) {
                    strip.fill(g, xg, &mut buf[span]);
                }
            }
        }
    }

    /// Output channels `outs` of one image's group (`y_rows`: their planes; `wg`, `bg` the
    /// group's weights and bias; `edges` from [`Self::fill_edges`]; `products` scratch of
    /// `outs.len()` × edge columns): one product over the interior positions, D's rows being
    /// the input planes themselves, then the edge positions from their own products.
    #[allow(clippy::too_many_arguments)]
    fn rows_of_outputs(
        &self,
        isa: super::Isa,
        g: &ConvGeometry,
        xg: &[f32],
        wg: &[f32],
        bg: Option<&[f32]>,
        outs: std::ops::Range<usize>,
        edges: &[f32],
        products: &mut [f32],
        y_rows: &mut [f32],
    ) {
        let (cog, k, ohw) = (g.out_channels_per_group(), g.col_rows(), g.out_pixels());
        let interior = Self::interior(g);
        let ops = Operands::weights_times_rows(wg, cog, k, xg, &self.rows, interior.len(), bg);
        small_k_gemm(
            isa,
            ops.rows(outs.clone()),
            &mut y_rows[interior.start..],
            ohw,
            Store::Stream,
        );
        match &self.edges {
            Edges::Columns(edge_cols) => {
                let (n, count) = (outs.len(), edge_cols.len() * g.out_h);
                let products = &mut products[..n * count];
                let w_rows = MatView::dense(&wg[outs.start * k..outs.end * k], n, k);
                let cols = MatView::dense(&edges[..k * count], k, count);
                gemm(products, count, w_rows, cols, false, 1);
                for (o, (plane, prod)) in y_rows
                    .chunks_exact_mut(ohw)
                    .zip(products.chunks_exact(count))
                    .enumerate()
                {
                    let b = bg.map_or(0.0, |b| b[outs.start + o]);
                    for (e, &u) in edge_cols.iter().enumerate() {
                        for oh in 0..g.out_h {
                            plane[oh * g.in_w + u] = prod[e * g.out_h + oh] + b;
                        }
                    }
                }
            }
            Edges::Rows(strips) => {
                for (strip, span) in strip_spans(strips, g) {
                    let mine = &edges[span];
                    let columns = strip.out_rows.len() * g.out_w;
                    let ops =
                        Operands::weights_times_rows(wg, cog, k, mine, &strip.rows, columns, bg);
                    small_k_gemm(
                        isa,
                        ops.rows(outs.clone()),
                        &mut y_rows[strip.out_rows.start * g.out_w..],
                        ohw,
                        Store::Stream,
                    );
                }
            }
        }
    }
}

/// [`forward_images_kernel`] where [`reads_in_place`] (`layout` built once per call), image by
/// image (`y` starts at image `images.start`), each image's output channels in `splits` runs,
/// run in parallel (one run inside an image task; the threads' count where the images are split
/// inside).
#[allow(clippy::too_many_arguments)]
fn forward_in_place(
    isa: super::Isa,
    splits: usize,
    g: &ConvGeometry,
    layout: &InPlace,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    images: std::ops::Range<usize>,
    y: &mut [f32],
    buf: &mut [f32],
) {
    let (cig, cog, k) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        g.col_rows(),
    );
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let outs = cog.div_ceil(splits.max(1));
    // The edges' shared part (im2col rows or strips), then each run's edge-column products.
    let (shared, per_run) = (layout.shared_scratch(g), layout.run_scratch(g, outs));
    let (edges, products) = buf.split_at_mut(shared);
    for (local, n) in images.enumerate() {
        for grp in 0..g.groups {
            let xg = &x[(n * g.in_channels + grp * cig) * hw..][..cig * hw];
            let wg = &w[grp * cog * k..(grp + 1) * cog * k];
            let bg = bias.map(|b| &b[grp * cog..(grp + 1) * cog]);
            layout.fill_edges(g, xg, edges);
            let edges = &*edges;
            let at = (local * g.out_channels + grp * cog) * ohw;
            let runs = y[at..at + cog * ohw].par_chunks_mut(outs * ohw).enumerate();
            let run = |i: usize, yc: &mut [f32], pc: &mut [f32]| {
                let o = i * outs..i * outs + yc.len() / ohw;
                layout.rows_of_outputs(isa, g, xg, wg, bg, o, edges, pc, yc);
            };
            // Row strips need no products of their own.
            if per_run == 0 {
                runs.for_each(|(i, yc)| run(i, yc, &mut []));
            } else {
                runs.zip(products.par_chunks_mut(per_run))
                    .for_each(|((i, yc), pc)| run(i, yc, pc));
            }
        }
    }
}

/// Grad-input as implicit GEMMs, one per input phase, for convolutions whose grad-input is not
/// a forward convolution (strides above 1; see `conv2d_grad_input`).
///
/// Phase (a, b) of the input gradient (input pixels at padded position ≡ (a, b) mod the
/// stride) receives only the taps (i, j) with (i·dh, j·dw) ≡ (a, b), and receives them as a
/// stride-1 correlation of the zero-padded output gradient (the depthwise grad-input's
/// `GradInputLayout`): `gX_phase (cin × positions) = W_phase (cin × cout·T) · D`, where row
/// (co, t) of D is output-gradient plane co shifted by tap t's offset. Every tap is used
/// exactly once over the phases: none of the multiplications by inserted zeros that a
/// transposed convolution would do, and no col2im scatter. The phases are then interleaved
/// into NCHW.
pub fn grad_input(
    exec: Exec,
    g: &ConvGeometry,
    gy: &[f32],
    w: &[f32],
    gx: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let l = GradInputLayout::new(g);
    let (cig, cog, taps) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        g.kernel_h * g.kernel_w,
    );
    // Row (co, t) of each phase's D: output-gradient plane co shifted by the tap's offset.
    let rows: Vec<Vec<usize>> = l
        .phases
        .iter()
        .map(|(_, _, _, offsets)| {
            collect_exact(
                cog * offsets.len(),
                (0..cog).flat_map(|co| offsets.iter().map(move |&off| co * l.gy_len + off)),
            )
        })
        .collect();
    // Per phase and group, the weights of its taps as a cig × (cog·T) matrix, column
    // (co, t); phase by phase these use every weight once, so they fill a buffer of w's size.
    ws.with_weights(w.len(), "the per-phase kernels", |wsel, ws| {
        let mut starts = Vec::with_capacity(l.phases.len());
        let mut at = 0;
        for (_, _, tap_ids, _) in &l.phases {
            starts.push(at);
            at += g.groups * cig * cog * tap_ids.len();
        }
        // In parallel by rows (group, input channel): on one thread this took 0.17 ms of E's
        // 2.5 ms grad-input at batch 1.
        for ((_, _, tap_ids, _), &start) in l.phases.iter().zip(&starts) {
            let row = cog * tap_ids.len();
            if row == 0 {
                continue;
            }
            wsel[start..start + g.groups * cig * row]
                .par_chunks_mut(row)
                .enumerate()
                .for_each(|(r, out)| {
                    let (grp, ci) = (r / cig, r % cig);
                    for (co, o) in out.chunks_exact_mut(tap_ids.len()).enumerate() {
                        let src = ((grp * cog + co) * cig + ci) * taps;
                        for (o, &t) in o.iter_mut().zip(tap_ids) {
                            *o = w[src + t];
                        }
                    }
                });
        }
        let weights = PhaseWeights {
            w: wsel,
            starts: &starts,
            rows: &rows,
        };
        let flat_len = l.phases.len() * cig * l.out_len();
        if splits_inside_images(exec.threads(), g.batch) {
            let scratch = ws.take(exec.threads() * cog * l.gy_len + flat_len)?;
            grad_input_within_images(exec, g, &l, &weights, gy, gx, scratch);
            return Ok(());
        }
        let tasks = exec.threads().min(g.batch);
        let per_task = cog * l.gy_len + flat_len;
        let scratch = ws.take(per_task * tasks)?;
        let img_in = g.in_channels * g.in_pixels();
        for_each_task(tasks, gx, img_in, scratch, per_task, |images, gxc, buf| {
            grad_input_images(exec.isa(), g, &l, &weights, gy, images, gxc, buf)
        });
        Ok(())
    })
}

/// [`grad_input`] with too few images for the threads ([`splits_inside_images`]): each thread
/// fills every padded output-gradient plane of the image into its own buffer (`scratch` holds
/// one per thread, then the flat buffer), then computes the phase products of its input
/// channels and their interleaving into NCHW, its channels `[channel][phase][pixel]` in the
/// flat buffer (one contiguous run per thread). No thread reads what another wrote: the planes
/// filled by output channels, a half by each thread, and read whole by both, measured slower
/// (harness, batch 1, 2 threads, min of 60–150, 10 pairs alternated, round trip 61–68 ns):
/// reference layer E's 1 × 3 stride (1, 2) half 0.835–0.836 → 0.824–0.826 ms, a 64 → 128
/// 3 × 3 stride 2 at 56² 0.620–0.625 → 0.615–0.621, E's 3 × 3 a tie at batch 1 and 3; with
/// the vCPUs on different dies E's 3 × 3 2.70 → 2.49 ms at batch 1, 7.68 → 7.21 at batch 3.
fn grad_input_within_images(
    exec: Exec,
    g: &ConvGeometry,
    l: &GradInputLayout,
    weights: &PhaseWeights<'_>,
    gy: &[f32],
    gx: &mut [f32],
    scratch: &mut [f32],
) {
    let (cig, cog, threads) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        exec.threads(),
    );
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let (gbufs, flat) = scratch.split_at_mut(threads * cog * l.gy_len);
    let strides = FlatStrides {
        channel: l.phases.len() * l.out_len(),
        phase: l.out_len(),
    };
    let channels_per_task = cig.div_ceil(threads);
    for n in 0..g.batch {
        for grp in 0..g.groups {
            let gyg = &gy[(n * g.out_channels + grp * cog) * ohw..][..cog * ohw];
            let first = n == 0 && grp == 0;
            let gxg = &mut gx[(n * g.in_channels + grp * cig) * hw..][..cig * hw];
            flat.par_chunks_mut(channels_per_task * strides.channel)
                .zip(gxg.par_chunks_mut(channels_per_task * hw))
                .zip(gbufs.par_chunks_mut(cog * l.gy_len))
                .enumerate()
                .for_each(|(t, ((flat, gxc), planes))| {
                    if first {
                        // The padded planes' zero borders are never written after this.
                        planes.fill(0.0);
                    }
                    fill_gradient_planes(exec.isa(), g, l, gyg, planes);
                    let c0 = t * channels_per_task;
                    let channels = c0..c0 + gxc.len() / hw;
                    phase_gradients(
                        exec.isa(),
                        g,
                        l,
                        weights,
                        grp,
                        planes,
                        channels,
                        flat,
                        strides,
                        gxc,
                    );
                });
        }
    }
}

/// The per-phase weight matrices of [`grad_input`] and the row tables of their D operands.
struct PhaseWeights<'a> {
    /// All phases' matrices, phase after phase, each group after group.
    w: &'a [f32],
    /// Where each phase's matrices start in `w`.
    starts: &'a [usize],
    /// Per phase, the D row offsets into one group's padded output-gradient planes.
    rows: &'a [Vec<usize>],
}

/// Where [`phase_gradients`] puts input channel c's gradient at phase ph in its flat buffer:
/// at `c·channel + ph·phase` (the image split: `[phase][channel][pixel]`, each phase's product
/// one block; the split inside the images: `[channel][phase][pixel]`, each thread's channels
/// one block).
#[derive(Clone, Copy)]
struct FlatStrides {
    channel: usize,
    phase: usize,
}

crate::simd_dispatch!(fn grad_input_images => grad_input_images_kernel(
    g: &ConvGeometry, l: &GradInputLayout, weights: &PhaseWeights<'_>, gy: &[f32],
    images: std::ops::Range<usize>, gx: &mut [f32], buf: &mut [f32]
));

#[inline(always)]
unsafe fn grad_input_images_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &GradInputLayout,
    weights: &PhaseWeights<'_>,
    gy: &[f32],
    images: std::ops::Range<usize>,
    gx: &mut [f32],
    buf: &mut [f32],
) {
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let (gbufs, flat) = buf.split_at_mut(cog * l.gy_len);
    let strides = FlatStrides {
        channel: l.out_len(),
        phase: cig * l.out_len(),
    };
    // The padded planes' zero borders are never written after this.
    gbufs.fill(0.0);
    for (local, n) in images.enumerate() {
        for grp in 0..g.groups {
            let gyg = &gy[(n * g.out_channels + grp * cog) * ohw..][..cog * ohw];
            // SAFETY: the caller's (this CPU's ISA).
            unsafe { fill_gradient_planes_kernel::<S>(g, l, gyg, gbufs) };
            let gxg = &mut gx[(local * g.in_channels + grp * cig) * hw..][..cig * hw];
            // SAFETY: as above.
            unsafe {
                phase_gradients_kernel::<S>(g, l, weights, grp, gbufs, 0..cig, flat, strides, gxg)
            };
        }
    }
}

crate::simd_dispatch!(fn fill_gradient_planes => fill_gradient_planes_kernel(
    g: &ConvGeometry, l: &GradInputLayout, gy: &[f32], planes: &mut [f32]
));

/// The padded planes (`l.gy_len` floats each) of the output-gradient planes `gy`, interiors only.
#[inline(always)]
unsafe fn fill_gradient_planes_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &GradInputLayout,
    gy: &[f32],
    planes: &mut [f32],
) {
    let ohw = g.out_pixels();
    for (gb, gyp) in planes.chunks_exact_mut(l.gy_len).zip(gy.chunks_exact(ohw)) {
        l.fill_gradient::<S>(g, gyp, gb);
    }
}

crate::simd_dispatch!(fn phase_gradients => phase_gradients_kernel(
    g: &ConvGeometry, l: &GradInputLayout, weights: &PhaseWeights<'_>, grp: usize,
    gbufs: &[f32], channels: std::ops::Range<usize>, flat: &mut [f32], strides: FlatStrides,
    gx: &mut [f32]
));

/// Input channels `channels` of group `grp`'s gradient: each phase's product from the padded
/// output-gradient planes `gbufs` into `flat` (from the first channel's row), then the phases
/// interleaved into the channels' NCHW planes `gx`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn phase_gradients_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &GradInputLayout,
    weights: &PhaseWeights<'_>,
    grp: usize,
    gbufs: &[f32],
    channels: std::ops::Range<usize>,
    flat: &mut [f32],
    strides: FlatStrides,
    gx: &mut [f32],
) {
    let (cig, cog, hw, out_len) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        g.in_pixels(),
        l.out_len(),
    );
    for (ph, &(a, _, ref tap_ids, _)) in l.phases.iter().enumerate() {
        let out = &mut flat[ph * strides.phase..];
        if tap_ids.is_empty() {
            // No tap reaches this phase: those input pixels get no gradient.
            for c in 0..channels.len() {
                out[c * strides.channel..][..out_len].fill(0.0);
            }
            continue;
        }
        // Only the rows that hold input pixels (a phase row of padding is a 29th of reference
        // layer E's 3 × 1 half at stride 2 down).
        let rows = l.input_rows(g, a);
        let k = cog * tap_ids.len();
        let start = weights.starts[ph] + grp * cig * k;
        let ops = Operands::weights_times_rows(
            &weights.w[start..start + cig * k],
            cig,
            k,
            &gbufs[rows.start..],
            &weights.rows[ph],
            rows.len(),
            None,
        )
        .rows(channels.clone());
        // Through the caches: gathered at once (a tie with streamed stores on E's spatially
        // separable halves).
        small_k_gemm(
            S::ISA,
            ops,
            &mut out[rows.start..],
            strides.channel,
            Store::Cached,
        );
    }
    for (c, plane) in gx.chunks_exact_mut(hw).enumerate() {
        gather_phases::<S>(g, l, &flat[c * strides.channel..], strides.phase, plane);
    }
}

/// Output positions per grad-weight product: the transposed gradient slice one register block
/// reads (positions × 48 output channels) stays in L1, and each block of the result is loaded
/// and stored once per this many FMAs per accumulator.
const GRAD_WEIGHT_CHUNK: usize = 128;

/// Grad-weight as implicit GEMMs: `gWᵀ (K × cout) += D (K × P) · gYᵀ (P × cout)` over chunks of
/// output positions, where row (c, t) of D is channel c's phase planes shifted by tap t's offset
/// (as in [`forward`]) and gYᵀ is the chunk of the output gradient transposed to
/// position-major (zeros at the wasted columns). D is read by broadcasts, so its shifted,
/// unaligned rows cost nothing extra; neither operand is packed and no im2col matrix is
/// written. Each task accumulates its images into a private gWᵀ; the tasks' sums are added
/// and transposed into `gw` at the end.
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let l = PhaseLayout::new(g);
    let (cig, cog, k) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        g.col_rows(),
    );
    let rows = im2col_rows(cig, &l);
    let tasks = exec.threads().min(g.batch);
    let wlen = gw.len();
    let per_task = wlen + cig * l.len + l.positions * transposed_stride(cog);
    let scratch = ws.take(per_task * tasks)?;
    for_each_image_task(g.batch, scratch, per_task, |images, s| {
        grad_weight_images(exec.isa(), g, &l, &rows, x, gy, images, s)
    });

    // gw[grp·cog + co][kk] = Σ over tasks of gWᵀ[grp][kk][co].
    let scratch = &*scratch;
    gw.par_chunks_mut(cog * k)
        .enumerate()
        .for_each(|(grp, gwg)| {
            for (co, row) in gwg.chunks_exact_mut(k).enumerate() {
                for (kk, o) in row.iter_mut().enumerate() {
                    let at = grp * k * cog + kk * cog + co;
                    *o = (0..tasks).map(|t| scratch[t * per_task + at]).sum();
                }
            }
        });
    Ok(())
}

/// Row (c, t) of the implicit im2col matrix: channel c's phase planes shifted by tap t's
/// offset (the order of the OIHW weight's columns).
fn im2col_rows(cig: usize, l: &PhaseLayout) -> Vec<usize> {
    collect_exact(
        cig * l.offsets.len(),
        (0..cig).flat_map(|c| l.offsets.iter().map(move |&off| c * l.len + off)),
    )
}

crate::simd_dispatch!(fn grad_weight_images => grad_weight_images_kernel(
    g: &ConvGeometry, l: &PhaseLayout, rows: &[usize], x: &[f32], gy: &[f32],
    images: std::ops::Range<usize>, buf: &mut [f32]
));

#[inline(always)]
unsafe fn grad_weight_images_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    rows: &[usize],
    x: &[f32],
    gy: &[f32],
    images: std::ops::Range<usize>,
    buf: &mut [f32],
) {
    let (cig, cog, k) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        g.col_rows(),
    );
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let ld = transposed_stride(cog);
    let (gwt, rest) = buf.split_at_mut(g.groups * k * cog);
    let (planes, gyt) = rest.split_at_mut(cig * l.len);
    gwt.fill(0.0);
    for (local, n) in images.enumerate() {
        for grp in 0..g.groups {
            for (c, buf) in planes.chunks_exact_mut(l.len).enumerate() {
                let plane = (n * g.in_channels + grp * cig + c) * hw;
                fill_phases::<S>(g, l, &x[plane..plane + hw], buf, local == 0 && grp == 0);
            }
            let gy_group = &gy[(n * g.out_channels + grp * cog) * ohw..][..cog * ohw];
            // SAFETY: gyt holds positions × ld floats.
            unsafe { transpose_gradient::<S>(g, gy_group, cog, l.wq, ld, gyt) };
            for p0 in (0..l.positions).step_by(GRAD_WEIGHT_CHUNK) {
                let pc = GRAD_WEIGHT_CHUNK.min(l.positions - p0);
                let ops = Operands {
                    c: &planes[p0..],
                    c_rows: Rows::Table(rows),
                    c_col: 1,
                    d: &gyt[p0 * ld..(p0 + pc) * ld],
                    d_rows: Rows::Strided(ld),
                    n: k,
                    k: pc,
                    p: cog,
                    bias: None,
                };
                small_k_gemm(
                    S::ISA,
                    ops,
                    &mut gwt[grp * k * cog..(grp + 1) * k * cog],
                    cog,
                    Store::Accumulate,
                );
            }
        }
    }
}

/// Row stride of a transposed (pixel-major) copy of `channels` planes: a multiple of 16
/// floats (aligned rows) that is not a multiple of 128, so a channel's column, written position
/// after position, spreads over L1's sets instead of aliasing into a few of them (a 512-byte
/// stride, 128 channels, thrashed 8 of 64 sets and made the transpose a sixth of the time).
pub(crate) fn transposed_stride(channels: usize) -> usize {
    let ld = channels.next_multiple_of(16);
    if ld.is_multiple_of(128) { ld + 16 } else { ld }
}

/// gYᵀ of one image's group: row `oh·wq + w` (row stride `ld`) holds output pixel (oh, w) of
/// every output channel, zeros at the wasted columns w ≥ out_w.
#[inline(always)]
unsafe fn transpose_gradient<S: SimdF32>(
    g: &ConvGeometry,
    gy_group: &[f32],
    cog: usize,
    wq: usize,
    ld: usize,
    gyt: &mut [f32],
) {
    let ow = g.out_w;
    assert!(gyt.len() >= g.out_h * wq * ld);
    for oh in 0..g.out_h {
        gyt[(oh * wq + ow) * ld..(oh + 1) * wq * ld].fill(0.0);
    }
    let at = PixelRows {
        top: 0,
        left: 0,
        row_width: wq,
        ld,
    };
    // SAFETY: the caller's (this CPU's ISA).
    unsafe { transpose_planes::<S>(gy_group, cog, g.out_h, ow, at, gyt) };
}

/// Where [`transpose_planes`] puts pixel (y, x): row `(y + top)·row_width + x + left` of the
/// destination, whose rows are `ld` floats apart (channel c at column c).
#[derive(Clone, Copy, Debug)]
pub(crate) struct PixelRows {
    pub top: usize,
    pub left: usize,
    pub row_width: usize,
    pub ld: usize,
}

/// `channels` planes of `h × w` pixels (`src`, one after another) transposed into pixel rows
/// of `dst` ([`PixelRows`]), in `LANES × LANES` blocks transposed in registers: each block
/// reads `LANES` channels' contiguous runs and writes whole rows (a scalar loop here took a
/// sixth of the grad-weight time). Writes only the planes' pixels, columns up to `channels`
/// rounded up to 16 (zeros past the last channel); `ld` must be at least that.
///
/// # Safety
/// `S` must be supported by this CPU.
#[inline(always)]
pub(crate) unsafe fn transpose_planes<S: SimdF32>(
    src: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    at: PixelRows,
    dst: &mut [f32],
) {
    let (l, hw) = (S::LANES, h * w);
    let PixelRows {
        top,
        left,
        row_width,
        ld,
    } = at;
    assert!(src.len() >= channels * hw && S::LANES <= 16);
    assert!(ld >= channels.next_multiple_of(16) && left + w <= row_width);
    assert!(h == 0 || dst.len() >= ((top + h - 1) * row_width + left + w) * ld);
    let (sp, dp) = (src.as_ptr(), dst.as_mut_ptr());
    // SAFETY: the ISA is this CPU's (the caller's contract).
    let mut rows = [unsafe { S::zero() }; 16];
    for c0 in (0..channels).step_by(l) {
        let nc = l.min(channels - c0);
        // Rows past the last channel transpose into columns past `channels`, which nothing
        // reads; zeroed anyway so the padding holds no stale values.
        for r in &mut rows[nc..] {
            // SAFETY: as above.
            *r = unsafe { S::zero() };
        }
        for y in 0..h {
            let row = (y + top) * row_width + left;
            for x0 in (0..w).step_by(l) {
                let nw = l.min(w - x0);
                // SAFETY: channel planes c0 .. c0 + nc and pixels x0 .. x0 + nw of row y lie
                // in src; stored rows row + x0 + j (j < nw) and columns c0 .. c0 + l ≤ ld lie
                // in dst (asserted above).
                unsafe {
                    for (i, r) in rows[..nc].iter_mut().enumerate() {
                        let at = sp.add((c0 + i) * hw + y * w + x0);
                        S::prefetch(at.add(4 * l));
                        *r = if nw == l {
                            S::load(at)
                        } else {
                            S::load_partial(at, nw)
                        };
                    }
                    S::transpose(&mut rows[..l]);
                    for (j, r) in rows[..nw].iter().enumerate() {
                        r.store(dp.add((row + x0 + j) * ld + c0));
                    }
                }
            }
        }
    }
}
