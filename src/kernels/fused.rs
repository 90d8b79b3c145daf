//! The fused depthwise-separable forward pass: depthwise then pointwise, band by band, so the
//! intermediate activation never goes to memory.
//!
//! Unfused, the depthwise output (M·K channels × all pixels, 12.8 MB on reference layer B) is
//! written to memory and read back by the pointwise GEMM. Here each image is cut into bands of
//! output rows whose depthwise output (M·K × band pixels) fits in L2; the depthwise kernel
//! writes it there and the pointwise GEMM consumes it at once, writing the final output rows
//! of the band. A band's input rows include the kernel's halo.
//!
//! Work is split over the threads by images, or, with too few images for the threads
//! (`kernels::splits_inside_images`), by bands: each thread takes a run of every image's bands
//! and writes its own columns of the output ([`ColumnWindow`]). Either way a thread reads back
//! only what it wrote itself. The unfused pair at batch 1 splits the depthwise layer by
//! channels and the pointwise one by output rows, so each thread's depthwise output is read by
//! both, and in some processes the next depthwise pass then ran 8× slower (0.61 against
//! 0.077 ms on B's, its lines owned by the other core's cache). Harness, 2 threads, min of
//! 200, alternated: B at batch 1 0.37–0.90 → 0.31–0.32 ms, C 0.60–1.13 → 0.52–0.53, E 0.29–0.30 →
//! 0.28, D 0.49 → 0.48. Since the row kernel took the unfused depthwise layer at stride 2 and
//! the bands' depthwise step below, `sepconv bench --batch 1` (which reports the fused pass
//! against the two layers) measured B 1.05×, C 1.07×, D 1.00× and E 0.98× (0.263–0.264 ms
//! against 0.258–0.259, two runs): kept for E too, for the threads that never read each other's
//! intermediate. A harness alternating the two on nine shapes at batch 1 (min of 200, six
//! processes) found the unfused pair 3–8% faster in four processes (E 0.253–0.255 against
//! 0.271–0.274 ms, D 0.473–0.475 against 0.488–0.493) and 1.1–1.6× slower in two (B 0.495–0.505
//! against 0.314–0.320, C 0.69–0.74 against 0.51–0.56, 32 → 64 at 224² stride 2 0.67–0.69
//! against 0.42): the mode above. Putting the product's narrow edge blocks (E's columns split
//! at 392, 8 past a line) in register tiles of up to three vectors instead of one vector at a
//! time did not change E's fused time (0.271–0.282 against 0.274–0.283); not kept.
//!
//! The depthwise step runs on the row kernel ([`depthwise_rows`], channel by channel on the
//! band's rows in place) at stride 2 and where its planes fit in L1 with output rows of a
//! vector or more (C and E at batch 1, `sepconv bench --batch 1` alternated 3× with the blocked
//! kernel: 0.521–0.527 → 0.509–0.514 ms and 0.277–0.280 → 0.263–0.267; D a tie; see
//! `DepthwiseStep`), else on the channel-blocked kernel
//! ([`super::depthwise_blocked`]) where it applies (B ds forward 3.36–3.69 → 3.11–3.43 ms in one
//! sitting), else on the plane kernel. The blocked kernel's transposes cost less here than
//! their count suggests: a 3 × 3 kernel reading the NCHW rows in place (four output rows per
//! input row load, column shifts in registers, no transposes) measured the same on B
//! (harness, batch 8: 2.56–2.58 against 2.56–2.61 ms; 2% faster with the input in cache), also
//! with the next rows prefetched. Tried again later with each band's input prefetched during
//! the previous band's pointwise product (so that it is in cache) and bands sized for that:
//! faster in one series on buffers of 4 KiB pages (B 2.82 → 2.53 ms), but on the huge-page
//! buffers the bench and the layers allocate slower and bimodal across processes (2.70–3.55
//! against the blocked kernel's 2.53–2.60 ms, min of 10 calls in 10–15 rounds, variants
//! alternated each round); the blocked kernel with the same
//! prefetch was a wash over 12 shapes (−2% to +2%). Neither kept. Tried a third time (the
//! prefetch spread over the product as one run of rows per channel plane): in a harness in a
//! quiet phase B 2.61–2.66 → 2.55 ms, C and D 1–2% faster, E a tie, but `sepconv bench`
//! alternated against the build before it (B's ds forward, six pairs) 2.53–2.68 ms before
//! against 2.59–2.66 after, the build before faster in four; C slower in four of four. The row
//! kernel takes a plane column block by column block and so reads an input from memory down
//! one column of lines at a time (3.5–4.4 ms on B inside this kernel); row group by row group
//! it took 2.8–3.0, with its next rows prefetched 2.6–3.5 depending on the process, with the
//! band prefetch 2.63–2.70 against the blocked kernel's 2.62–2.64: alone on a cached image of
//! B it is 1.45× faster (0.13 against 0.19 ms, one thread), but here both spend about 0.7 ms
//! per thread on the depthwise step of four images, which waits on memory.
//! The pointwise product runs on [`super::pointwise`]'s unpacked register-blocked kernel, which
//! streams the output past the cache (measured faster than the packed GEMM on layers B–E).
//!
//! Used for inference (no intermediate is kept for a backward pass) on every
//! depthwise-separable pair, except where the row depthwise kernel takes an image, every
//! thread has images of its own, and one image's depthwise output fits in a band, its input
//! planes fit in L1 or its stride is 2: there each thread runs its images one by one as the
//! training forward does ([`super::fused_training`]), into a one-image buffer of its own
//! (the rule and its measurements at `runs_image_by_image`).

use std::ops::Range;

use super::depthwise::{PhaseLayout, channel_outputs, fill_phases};
use super::fused_training::{self, Intermediate};
use super::{depthwise_blocked, depthwise_rows};
use rayon::prelude::*;

use super::pointwise::{ColumnWindow, Operands, Store};
use super::simd::SimdF32;
use super::{Exec, Workspace, for_each_task, splits_inside_images};
use crate::error::Result;
use crate::geometry::{Conv2dParams, ConvGeometry, Padding};

/// Floats of one band's depthwise output: 256K floats (1 MiB, this machine's L2 per core).
/// Bands of 64K floats (the size first chosen, for a quarter of L2) measured slower wherever
/// they cut an image more finely; whole images slower on large ones. Harness, 2 threads, min
/// of 200, alternated 2×, 64K / 256K / 1M / 4M floats: reference layer C at batch 8 4.50–4.66 /
/// 4.25–4.34 / 4.22–4.26 ms, at batch 1 0.56–0.57 / 0.52–0.53 / 0.53; 2 × 32→64 at 224²
/// 2.85–2.91 / 2.78–2.83 / 2.96–2.98 / 3.54; 2 × 64→128 at 160² 4.89–4.96 / 4.72–4.81 / 4.92 /
/// 5.44–5.47; B, D and E (one band per image from 64K or 256K on) within 1%.
const BAND_FLOATS: usize = 1 << 18;

/// One band of output rows of the depthwise step, as a geometry of its own (one image, one
/// channel), with the input rows it reads.
#[derive(Clone, Debug)]
pub(crate) struct Band {
    geometry: ConvGeometry,
    layout: PhaseLayout,
    /// Output rows of the full depthwise output.
    out_rows: Range<usize>,
    /// Input rows of the full input plane.
    in_rows: Range<usize>,
}

/// The bands of `dw`, each with `rows` output rows ([`row_bands`]), as geometries of one
/// channel.
fn bands(dw: &ConvGeometry, rows: usize) -> Result<Vec<Band>> {
    row_bands(dw, rows)
        .into_iter()
        .map(|rb| {
            let geometry = band_geometry(dw, &rb, [1, 1, 1])?;
            Ok(Band {
                layout: PhaseLayout::new(&geometry),
                geometry,
                out_rows: rb.out_rows,
                in_rows: rb.in_rows,
            })
        })
        .collect()
}

/// A band of output rows of a convolution, the input rows they read and the padding rows
/// above and below those.
#[derive(Clone, Debug)]
pub(crate) struct RowBand {
    pub(crate) out_rows: Range<usize>,
    pub(crate) in_rows: Range<usize>,
    top: usize,
    bottom: usize,
}

/// The bands of `g`'s output rows, `rows` each (the last may have fewer). Output rows that
/// read only padding (the top or bottom rows under a padding taller than the kernel's reach)
/// join their neighbour's band: a band needs an input row. One band is the whole image.
pub(crate) fn row_bands(g: &ConvGeometry, rows: usize) -> Vec<RowBand> {
    let mut ranges: Vec<Range<usize>> = Vec::new();
    let mut pending = None;
    for oh0 in (0..g.out_h).step_by(rows.max(1)) {
        let start = pending.take().unwrap_or(oh0);
        let range = start..(oh0 + rows).min(g.out_h);
        if band_input_rows(g, &range).is_empty() {
            pending = Some(start);
        } else {
            ranges.push(range);
        }
    }
    match (pending, ranges.last_mut()) {
        (Some(_), Some(last)) => last.end = g.out_h,
        (Some(start), None) => ranges.push(start..g.out_h),
        (None, _) => {}
    }
    if ranges.len() == 1 {
        return vec![RowBand {
            out_rows: 0..g.out_h,
            in_rows: 0..g.in_h,
            top: g.pad_top,
            bottom: g.pad_bottom,
        }];
    }
    ranges
        .into_iter()
        .map(|out_rows| {
            let padded = padded_input_rows(g, &out_rows);
            let in_rows = band_input_rows(g, &out_rows);
            let top = g.pad_top.saturating_sub(padded.start);
            let bottom = padded.len() - top - in_rows.len();
            RowBand {
                out_rows,
                in_rows,
                top,
                bottom,
            }
        })
        .collect()
}

/// The rows of the padded input that output rows `out_rows` of `g` read.
fn padded_input_rows(g: &ConvGeometry, out_rows: &Range<usize>) -> Range<usize> {
    let span_h = (g.kernel_h - 1) * g.dilation_h + 1;
    out_rows.start * g.stride_h..(out_rows.end - 1) * g.stride_h + span_h
}

/// The input rows that output rows `out_rows` of `g` read.
fn band_input_rows(g: &ConvGeometry, out_rows: &Range<usize>) -> Range<usize> {
    let padded = padded_input_rows(g, out_rows);
    let clip = |r: usize| r.saturating_sub(g.pad_top).min(g.in_h);
    clip(padded.start)..clip(padded.end)
}

/// The geometry of band `rb` of `g` on one image, with `[in_channels, out_channels, groups]`
/// (`g`'s own, or one channel for a depthwise band computed channel by channel).
pub(crate) fn band_geometry(
    g: &ConvGeometry,
    rb: &RowBand,
    [in_channels, out_channels, groups]: [usize; 3],
) -> Result<ConvGeometry> {
    let params = Conv2dParams {
        stride: (g.stride_h, g.stride_w),
        dilation: (g.dilation_h, g.dilation_w),
        padding: Padding::Explicit {
            top: rb.top,
            bottom: rb.bottom,
            left: g.pad_left,
            right: g.pad_right,
        },
        groups,
    };
    let geometry = ConvGeometry::new(
        [1, in_channels, rb.in_rows.len(), g.in_w],
        [out_channels, in_channels / groups, g.kernel_h, g.kernel_w],
        &params,
    )?;
    debug_assert_eq!(geometry.out_h, rb.out_rows.len());
    Ok(geometry)
}

/// The band with the most padded input rows.
fn tallest_band(bands: &[Band]) -> &Band {
    bands
        .iter()
        .max_by_key(|b| b.in_rows.len() + b.geometry.pad_top + b.geometry.pad_bottom)
        .expect("at least one band")
}

/// Whether the fused kernel computes `pw` after `dw`: a depthwise step followed by an ungrouped
/// pointwise one. It used to need an intermediate of at least 1 MiB per image and an image per
/// thread; with bands of 256K floats and the split by bands, fused measured faster or equal on
/// every reference layer at batch 8 and 1 (harness, 2 threads, min of 200, alternated 2×,
/// unfused against fused: D at batch 8 3.83–3.87 against 3.78–3.83 ms, E 2.17–2.20 against
/// 2.14–2.16, D at batch 1 0.49 against 0.48, E 0.29–0.30 against 0.28).
pub fn applies(dw: &ConvGeometry, pw: &ConvGeometry) -> bool {
    dw.is_depthwise() && pw.is_pointwise() && pw.groups == 1
}

/// `y = pointwise(depthwise(x, wd), wp) + bias`, without materializing the depthwise output.
pub fn depthwise_pointwise_forward(
    exec: Exec,
    dw: &ConvGeometry,
    pw: &ConvGeometry,
    x: &[f32],
    wd: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    assert_eq!(x.len(), dw.input_len());
    assert_eq!(wd.len(), dw.weight_len());
    assert_eq!(wp.len(), pw.weight_len());
    assert_eq!(y.len(), pw.output_len());
    assert_eq!(pw.input_shape(), dw.output_shape());
    assert!(bias.is_none_or(|b| b.len() == pw.out_channels));
    if runs_image_by_image(exec, dw, pw) {
        let mid = Intermediate::Scratch(ws);
        return fused_training::forward(exec, dw, pw, x, wd, wp, bias, mid, y);
    }
    forward_in_bands(exec, dw, pw, x, wd, wp, bias, y, ws, BAND_FLOATS)
}

/// Whether [`depthwise_pointwise_forward`] runs image by image on the row depthwise kernel
/// ([`fused_training::forward`], each image's depthwise output in a buffer of its
/// thread's, the next image's input prefetched during the pointwise product) rather than in
/// bands: where the row kernel takes one image, every thread has images of its own, and one
/// image's depthwise output fits in a band (so the bands would be whole images too), its
/// input planes fit in L1 ([`L1_PLANE_FLOATS`]) or its stride is 2 (where the blocked kernel
/// the bands would take transposes four input pixels per output).
///
/// Measured against the bands (2 threads, batch 8): `sepconv bench --layers D,E --variants ds
/// --passes forward`, alternated 3×, reference layer D 3.88–3.92 → 3.74–3.82 ms, E 2.12–2.19 →
/// 2.01–2.07; C (two bands per image, 56² planes), alternated 3× in a quiet phase, 4.37–4.43 →
/// 4.12–4.37 (better in five of six). Harness, min of 20, three rounds in a quiet phase:
/// 256 → 256 at 56² 16.33–16.49 → 15.87–16.06, 512 → 512 at 28² 16.14–16.29 → 15.24–15.52,
/// 64 → 128 at 112² stride 2 2.75–3.36 → 2.55–2.70. B (112² planes, two bands per image) was
/// slower image by image in the bench (2.63–3.27 against 2.53–2.70 ms in four alternations)
/// and stays on bands. At stride 2 on 224² planes (32 → 64, harness, min of 10, alternated
/// 3×): 4.65–5.10 → 4.32–4.50 ms.
fn runs_image_by_image(exec: Exec, dw: &ConvGeometry, pw: &ConvGeometry) -> bool {
    fused_training::runs_per_image(exec, dw, pw)
        && (dw.out_channels * dw.out_pixels() <= BAND_FLOATS
            || dw.in_pixels() <= L1_PLANE_FLOATS
            || dw.stride_h == 2)
}

/// Input plane floats up to which an image's depthwise output may exceed a band and still run
/// image by image: 16 KiB, half of L1. The row kernel walks a plane one column vector at a
/// time, top to bottom, so a plane larger than L1 comes from L2 or beyond once per column
/// vector (seven times on B's 112 columns).
const L1_PLANE_FLOATS: usize = 4096;

/// [`depthwise_pointwise_forward`] with bands of at most `band_floats` floats of depthwise
/// output (at least one row): the tests cut small images into many bands with it.
fn forward_in_bands(
    exec: Exec,
    dw: &ConvGeometry,
    pw: &ConvGeometry,
    x: &[f32],
    wd: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut Workspace,
    band_floats: usize,
) -> Result<()> {
    let (mk, threads) = (dw.out_channels, exec.threads());
    let within = splits_inside_images(threads, dw.batch);
    let mut count = dw
        .out_h
        .div_ceil((band_floats / (mk * dw.out_w).max(1)).max(1));
    if within {
        // A run of bands per thread, of equal height where the rows allow.
        count = count.next_multiple_of(threads);
    }
    let rows = dw.out_h.div_ceil(count.min(dw.out_h));
    let bands = bands(dw, rows)?;
    let step = DepthwiseStep::choose(exec, dw, &bands);
    let depthwise_len = depthwise_scratch(&bands, &step, exec.isa().lanes());
    // Bands joined to rows that read only padding are taller than `rows`.
    let tallest_rows = bands.iter().map(|b| b.out_rows.len()).max().unwrap_or(0);
    let per_task = mk * tallest_rows * dw.out_w + depthwise_len;
    let p = pw.out_pixels();
    let run = |bands: &[Band], images: Range<usize>, y: ColumnWindow, buf: &mut [f32]| {
        fused_images(
            exec.isa(),
            dw,
            pw,
            bands,
            &step,
            x,
            wd,
            wp,
            bias,
            images,
            y,
            buf,
        )
    };
    if within {
        let nb = bands.len();
        let share = |t: usize| t * nb / threads..(t + 1) * nb / threads;
        let bounds: Vec<usize> = (0..=threads)
            .map(|t| {
                bands
                    .get(share(t).start)
                    .map_or(p, |b| b.out_rows.start * dw.out_w)
            })
            .collect();
        let scratch = ws.take(per_task * threads)?;
        ColumnWindow::split(y, p, &bounds)
            .into_par_iter()
            .zip(scratch.par_chunks_mut(per_task))
            .enumerate()
            .for_each(|(t, (window, buf))| run(&bands[share(t)], 0..dw.batch, window, buf));
    } else {
        let tasks = threads.min(dw.batch);
        let scratch = ws.take(per_task * tasks)?;
        let image_out = pw.out_channels * p;
        for_each_task(tasks, y, image_out, scratch, per_task, |images, yc, buf| {
            run(&bands, images, ColumnWindow::whole(yc, p), buf)
        });
    }
    Ok(())
}

/// Which kernel computes the bands' depthwise step.
enum DepthwiseStep {
    /// The row kernel, channel by channel on the band's rows in place
    /// ([`depthwise_rows::forward_planes`]): where it takes the image, at depth multiplier 1,
    /// at stride 2 (where the blocked kernel transposes four input pixels per output: 32 → 64
    /// at 224², batch 1, 0.52 → 0.34 ms; 64 → 128 at 112² 0.31 → 0.28) and at stride 1 on
    /// planes that fit in L1 ([`L1_PLANE_FLOATS`]; on larger planes it walks each from memory
    /// once per column vector) with output rows of a vector or more (narrower rows leave
    /// lanes idle, where the blocked kernel fills every lane with a channel: the MNIST
    /// network's 7² and 14² blocks at batch 1 measured 4–5 µs slower per image on it).
    Rows,
    /// The channel-blocked kernel, with the tallest band's layout for every band, so the
    /// buffer's padding columns stay where the first call cleared them whatever the band's
    /// height.
    Blocked(depthwise_blocked::Layout),
    /// The plane kernel on phase planes.
    Planes,
}

impl DepthwiseStep {
    fn choose(exec: Exec, dw: &ConvGeometry, bands: &[Band]) -> Self {
        let stride_1_fits = dw.in_pixels() <= L1_PLANE_FLOATS && dw.out_w >= exec.isa().lanes();
        if depthwise_rows::applies_per_image(exec.isa(), dw)
            && dw.depth_multiplier() == 1
            && (dw.stride_h == 2 || stride_1_fits)
        {
            DepthwiseStep::Rows
        } else if depthwise_blocked::applies(dw) {
            DepthwiseStep::Blocked(depthwise_blocked::Layout::new(
                &tallest_band(bands).geometry,
            ))
        } else {
            DepthwiseStep::Planes
        }
    }
}

/// Floats of scratch the depthwise step of `bands` needs with `lanes`-float vectors: none on
/// the row kernel, the blocked layout's, or the largest phase planes and flat output of the
/// plane kernel.
fn depthwise_scratch(bands: &[Band], step: &DepthwiseStep, lanes: usize) -> usize {
    let largest = |len: fn(&Band) -> usize| bands.iter().map(len).max().unwrap_or(0);
    match step {
        DepthwiseStep::Rows => 0,
        DepthwiseStep::Blocked(tallest) => bands
            .iter()
            .map(|b| tallest.scratch(&b.geometry, lanes))
            .max()
            .unwrap_or(0),
        DepthwiseStep::Planes => largest(|b| b.layout.len) + largest(|b| b.layout.out_len()),
    }
}

crate::simd_dispatch!(fn fused_images => fused_images_kernel(
    dw: &ConvGeometry, pw: &ConvGeometry, bands: &[Band],
    step: &DepthwiseStep, x: &[f32], wd: &[f32], wp: &[f32],
    bias: Option<&[f32]>, images: Range<usize>, y: ColumnWindow<'_>, buf: &mut [f32]
));

/// `bands` of every image of `images` into `y` (the images' output rows, at least the bands'
/// columns), the depthwise step on `step`.
#[inline(always)]
unsafe fn fused_images_kernel<S: SimdF32>(
    dw: &ConvGeometry,
    pw: &ConvGeometry,
    bands: &[Band],
    step: &DepthwiseStep,
    x: &[f32],
    wd: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    images: Range<usize>,
    mut y: ColumnWindow<'_>,
    buf: &mut [f32],
) {
    let (m, mult, taps) = (
        dw.in_channels,
        dw.depth_multiplier(),
        dw.kernel_h * dw.kernel_w,
    );
    let (mk, n_out) = (dw.out_channels, pw.out_channels);
    let (hw, w_in, ow) = (dw.in_pixels(), dw.in_w, dw.out_w);
    let max_band = bands.iter().map(|b| b.out_rows.len()).max().unwrap_or(0) * ow;
    let (dbuf, rest) = buf.split_at_mut(mk * max_band);
    // The depthwise kernels below write their scratch unchecked.
    assert!(
        rest.len() >= depthwise_scratch(bands, step, S::LANES),
        "fused scratch too short"
    );
    let phase_len = bands.iter().map(|b| b.layout.len).max().unwrap_or(0);
    let mut first = true;
    for (local, img) in images.enumerate() {
        for band in bands {
            let (g, l) = (&band.geometry, &band.layout);
            let bp = band.out_rows.len() * ow;
            match step {
                DepthwiseStep::Rows => {
                    for c in 0..m {
                        let plane = (img * m + c) * hw + band.in_rows.start * w_in;
                        let xb = &x[plane..plane + band.in_rows.len() * w_in];
                        let d = &mut dbuf[c * bp..(c + 1) * bp];
                        let w = &wd[c * taps..(c + 1) * taps];
                        depthwise_rows::forward_planes(S::ISA, g, xb, w, None, 0..1, d);
                    }
                }
                DepthwiseStep::Blocked(tallest) => {
                    // The channel-blocked kernel, a block of channels at a time (see its module).
                    let lanes = S::LANES;
                    for c0 in (0..m).step_by(lanes) {
                        let plane = (img * m + c0) * hw + band.in_rows.start * w_in;
                        // SAFETY: x holds `lanes` planes from `plane` at stride hw; dbuf has the
                        // block's bp-pixel planes; rest has the blocked scratch of every band.
                        unsafe {
                            depthwise_blocked::forward_block::<S>(
                                g,
                                tallest,
                                &x[plane..],
                                hw,
                                &wd[c0 * taps..(c0 + lanes) * taps],
                                None,
                                &mut dbuf[c0 * bp..(c0 + lanes) * bp],
                                rest,
                                first,
                            )
                        };
                        first = false;
                    }
                }
                DepthwiseStep::Planes => {
                    let (xbuf, obuf) = rest.split_at_mut(phase_len);
                    for c in 0..m {
                        let plane = (img * m + c) * hw;
                        let xb =
                            &x[plane + band.in_rows.start * w_in..plane + band.in_rows.end * w_in];
                        // Band layouts differ only in their top and bottom padding rows, so the
                        // buffer is cleared for every band's first channel.
                        fill_phases::<S>(g, l, xb, xbuf, first || c == 0);
                        first = false;
                        let d = &mut dbuf[c * mult * bp..(c + 1) * mult * bp];
                        // SAFETY: xbuf was just filled for layout `l`; obuf has the largest
                        // out_len.
                        unsafe {
                            channel_outputs::<S>(
                                g,
                                l,
                                &wd[c * mult * taps..(c + 1) * mult * taps],
                                None,
                                xbuf,
                                obuf,
                                d,
                            )
                        };
                    }
                }
            }
            let col0 = band.out_rows.start * ow;
            let ops = Operands::dense(wp, n_out, mk, &dbuf[..mk * bp], bp, bp, bias);
            y.product(S::ISA, ops, local * n_out, col0, Store::Stream);
        }
    }
}

#[cfg(test)]
pub(super) mod tests {
    use super::*;
    use crate::kernels::reference;
    use crate::kernels::simd::Isa;

    /// A depthwise-separable pair (depth multiplier `mult`, `n` outputs) on `input`: its two
    /// geometries, its operands (input, depthwise and pointwise weights, bias) from seeds
    /// `seed ..= seed + 3`, and the reference depthwise output.
    fn case(
        input: [usize; 4],
        mult: usize,
        n: usize,
        kernel: (usize, usize),
        params: &Conv2dParams,
        seed: usize,
    ) -> (ConvGeometry, ConvGeometry, [Vec<f32>; 4], Vec<f32>) {
        let dw = ConvGeometry::new(
            input,
            [input[1] * mult, 1, kernel.0, kernel.1],
            &params.groups(input[1]),
        )
        .unwrap();
        let pw = ConvGeometry::new(
            dw.output_shape(),
            [n, dw.out_channels, 1, 1],
            &Conv2dParams::default(),
        )
        .unwrap();
        let (x, wd) = (
            values(dw.input_len(), seed),
            values(dw.weight_len(), seed + 1),
        );
        let (wp, bias) = (values(pw.weight_len(), seed + 2), values(n, seed + 3));
        let mut mid = vec![0.0; dw.output_len()];
        reference::conv2d_forward(&dw, &x, &wd, None, &mut mid);
        (dw, pw, [x, wd, wp, bias], mid)
    }

    /// Deterministic values in [-1, 1).
    pub(in crate::kernels) fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| ((i * 7919 + seed * 104_729) % 2000) as f32 / 1000.0 - 1.0)
            .collect()
    }

    /// The fused kernel against the reference depthwise then pointwise convolution, with bands
    /// from one row to whole images, on one thread and split by images or by bands (batches 1,
    /// 3 and 5 leave threads without images of their own; 3 threads on 2 rows of output leave
    /// one without bands), on every geometry the bands must handle: strides, dilations, asymmetric
    /// padding, depth multipliers, heights that the bands do not divide; and on each kernel of
    /// the depthwise step (the row kernel on AVX-512, the channel-blocked and the plane kernels).
    #[test]
    fn bands_match_the_reference_on_every_split() {
        let same = Conv2dParams::with_padding(Padding::Same);
        // The depthwise steps taken, per instruction set: (rows, blocked, planes).
        let mut steps: Vec<(Isa, [bool; 3])> = Vec::new();
        for (input, mult, n, kernel, params) in [
            ([1, 16, 9, 11], 1, 8, (3, 3), same),
            // The channel-blocked kernel (16 channels, a kernel the row kernel does not take).
            ([2, 16, 9, 11], 1, 8, (5, 3), same),
            // The row kernel (output rows of 16 or more), at stride 1 and 2, dilated.
            ([1, 4, 9, 19], 1, 8, (3, 3), same),
            ([2, 8, 13, 35], 1, 5, (3, 3), same.stride(2, 2)),
            (
                [1, 4, 12, 37],
                1,
                6,
                (5, 5),
                Conv2dParams::default().stride(2, 2),
            ),
            ([1, 4, 11, 20], 1, 3, (3, 3), same.dilation(2, 2)),
            ([3, 8, 13, 7], 2, 5, (3, 3), same.stride(2, 2)),
            ([5, 4, 10, 6], 1, 3, (5, 3), same.dilation(2, 1)),
            (
                [2, 6, 7, 9],
                3,
                4,
                (3, 2),
                Conv2dParams::with_padding(Padding::Explicit {
                    top: 2,
                    bottom: 0,
                    left: 1,
                    right: 0,
                }),
            ),
            ([1, 16, 4, 3], 1, 16, (3, 3), Conv2dParams::default()),
            // Output rows that read only padding, at the top and bottom.
            (
                [1, 4, 3, 5],
                1,
                3,
                (3, 3),
                Conv2dParams::with_padding(Padding::Explicit {
                    top: 4,
                    bottom: 4,
                    left: 1,
                    right: 1,
                }),
            ),
            // No output row reads an input row.
            (
                [2, 4, 1, 6],
                1,
                3,
                (1, 3),
                Conv2dParams::with_padding(Padding::Explicit {
                    top: 5,
                    bottom: 0,
                    left: 1,
                    right: 1,
                })
                .stride(10, 1),
            ),
        ] {
            let (dw, pw, [x, wd, wp, bias], mid) = case(input, mult, n, kernel, &params, 1);
            let mut want = vec![0.0; pw.output_len()];
            reference::conv2d_forward(&pw, &mid, &wp, Some(&bias), &mut want);
            let row = dw.out_channels * dw.out_w;
            for isa in Isa::available() {
                let exec = Exec::new(1).with_isa(isa).unwrap();
                let kind = match DepthwiseStep::choose(exec, &dw, &bands(&dw, 1).unwrap()) {
                    DepthwiseStep::Rows => 0,
                    DepthwiseStep::Blocked(_) => 1,
                    DepthwiseStep::Planes => 2,
                };
                match steps.iter_mut().find(|(i, _)| *i == isa) {
                    Some((_, seen)) => seen[kind] = true,
                    None => steps.push((isa, std::array::from_fn(|k| k == kind))),
                }
                for threads in [1, 2, 3] {
                    let exec = Exec::splitting_every_call(threads, isa);
                    for band_rows in [1, 2, 3, dw.out_h] {
                        let mut y = vec![f32::NAN; pw.output_len()];
                        let mut ws = Workspace::new();
                        forward_in_bands(
                            exec,
                            &dw,
                            &pw,
                            &x,
                            &wd,
                            &wp,
                            Some(&bias),
                            &mut y,
                            &mut ws,
                            band_rows * row,
                        )
                        .unwrap();
                        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                        for (i, (a, b)) in y.iter().zip(&want).enumerate() {
                            assert!(
                                (a - b).abs() <= 1e-4 * scale,
                                "{input:?} {isa} {threads} threads, {band_rows}-row bands, \
                                 y[{i}] = {a}, want {b}"
                            );
                        }
                    }
                }
            }
        }
        // Every kernel of the depthwise step ran: the row kernel where AVX-512 has it.
        for (isa, seen) in steps {
            assert_eq!(seen, [isa == Isa::Avx512, true, true], "{isa}");
        }
    }

    /// [`depthwise_pointwise_forward`] where it runs image by image (the row kernel; checked
    /// to be taken on AVX-512): against the reference pair, with and without bias, at stride 1
    /// and 2, 3 × 3 and 5 × 5, depth multipliers 1 and 2, batches that give 1, 2 and 3 threads
    /// runs of two or more images (the last run shorter on 9 images over 2 threads), each
    /// thread's buffer reused image after image.
    #[test]
    fn image_by_image_matches_the_reference() {
        let same = Conv2dParams::with_padding(Padding::Same);
        let mut taken = 0;
        for (input, mult, n, kernel, params) in [
            ([6, 16, 9, 11], 1, 8, (3, 3), same),
            ([9, 8, 13, 10], 1, 12, (3, 3), same.stride(2, 2)),
            ([6, 4, 12, 9], 2, 5, (5, 5), same),
            (
                [12, 6, 11, 14],
                2,
                7,
                (5, 5),
                Conv2dParams::default().stride(2, 2),
            ),
        ] {
            let (dw, pw, [x, wd, wp, bias], mid) = case(input, mult, n, kernel, &params, 5);
            for isa in Isa::available() {
                for threads in [1, 2, 3] {
                    let exec = Exec::splitting_every_call(threads, isa);
                    let image_by_image = runs_image_by_image(exec, &dw, &pw);
                    assert_eq!(image_by_image, isa == Isa::Avx512, "{input:?} {isa}");
                    taken += usize::from(image_by_image);
                    for b in [None, Some(&bias[..])] {
                        let mut want = vec![0.0; pw.output_len()];
                        reference::conv2d_forward(&pw, &mid, &wp, b, &mut want);
                        let mut y = vec![f32::NAN; pw.output_len()];
                        let mut ws = Workspace::new();
                        depthwise_pointwise_forward(
                            exec, &dw, &pw, &x, &wd, &wp, b, &mut y, &mut ws,
                        )
                        .unwrap();
                        let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                        for (i, (a, w)) in y.iter().zip(&want).enumerate() {
                            assert!(
                                (a - w).abs() <= 1e-4 * scale,
                                "{input:?} {isa} {threads} threads, bias {}, y[{i}] = {a}, \
                                 want {w}",
                                b.is_some()
                            );
                        }
                    }
                }
            }
        }
        if Isa::available().contains(&Isa::Avx512) {
            assert_eq!(taken, 12, "every case on AVX-512 runs image by image");
        }
    }
}
