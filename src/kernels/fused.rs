//! The fused depthwise-separable forward pass: depthwise then pointwise, band by band, so the
//! intermediate activation never goes to memory.
//!
//! Unfused, the depthwise output (M·K channels × all pixels, 12.8 MB on reference layer B) is
//! written to memory and read back by the pointwise GEMM. Here each image is cut into bands of
//! output rows sized so the band's depthwise output (M·K × band pixels) stays in L2; the
//! depthwise kernel writes it there and the pointwise GEMM consumes it at once, writing the
//! final output rows of the band. A band's input rows include the kernel's halo.
//!
//! The depthwise step runs on the channel-blocked kernel ([`super::depthwise_blocked`]) where
//! it applies (B ds forward 3.36–3.69 → 3.11–3.43 ms in one sitting), else on the plane kernel.
//! Its transposes cost less here than their count suggests: a 3 × 3 kernel reading the NCHW
//! rows in place (four output rows per input row load, column shifts in registers, no
//! transposes) measured the same on B (harness, batch 8: 2.56–2.58 against 2.56–2.61 ms; 2%
//! faster with the input in cache), also with the next rows prefetched.
//! The pointwise product runs on [`super::pointwise`]'s unpacked register-blocked kernel, which
//! streams the output past the cache (measured faster than the packed GEMM on layers B–E).
//!
//! Used for inference (no intermediate is kept for a backward pass) when there are at least
//! as many images as threads; otherwise the unfused pair is parallel inside each op.

use std::ops::Range;

use super::depthwise::{PhaseLayout, channel_outputs, fill_phases};
use super::depthwise_blocked;
use super::pointwise::{Operands, Store, small_k_gemm};
use super::simd::SimdF32;
use super::{Exec, Workspace, for_each_task};
use crate::error::Result;
use crate::geometry::{Conv2dParams, ConvGeometry, Padding};

/// Floats of one band's depthwise output: 64K floats (256 KiB), a quarter of L2.
const BAND_FLOATS: usize = 1 << 16;

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

/// The bands of `dw`, each with `rows` output rows (the last may have fewer).
fn bands(dw: &ConvGeometry, rows: usize) -> Result<Vec<Band>> {
    let span_h = (dw.kernel_h - 1) * dw.dilation_h + 1;
    let mut out = Vec::new();
    for oh0 in (0..dw.out_h).step_by(rows) {
        let oh1 = (oh0 + rows).min(dw.out_h);
        // Padded input rows [pr0, pr1) feed output rows [oh0, oh1).
        let (pr0, pr1) = (oh0 * dw.stride_h, (oh1 - 1) * dw.stride_h + span_h);
        let (ih0, ih1) = (
            pr0.saturating_sub(dw.pad_top).min(dw.in_h),
            pr1.saturating_sub(dw.pad_top).min(dw.in_h),
        );
        let top = dw.pad_top.saturating_sub(pr0);
        let bottom = (pr1 - pr0) - top - (ih1 - ih0);
        let params = Conv2dParams {
            stride: (dw.stride_h, dw.stride_w),
            dilation: (dw.dilation_h, dw.dilation_w),
            padding: Padding::Explicit {
                top,
                bottom,
                left: dw.pad_left,
                right: dw.pad_right,
            },
            groups: 1,
        };
        let geometry = ConvGeometry::new(
            [1, 1, ih1 - ih0, dw.in_w],
            [1, 1, dw.kernel_h, dw.kernel_w],
            &params,
        )?;
        debug_assert_eq!(geometry.out_h, oh1 - oh0);
        out.push(Band {
            layout: PhaseLayout::new(&geometry),
            geometry,
            out_rows: oh0..oh1,
            in_rows: ih0..ih1,
        });
    }
    Ok(out)
}

/// The band with the most padded input rows.
fn tallest_band(bands: &[Band]) -> &Band {
    bands
        .iter()
        .max_by_key(|b| b.in_rows.len() + b.geometry.pad_top + b.geometry.pad_bottom)
        .expect("at least one band")
}

/// Whether the fused kernel should run: a depthwise step followed by a pointwise one, with at
/// least as many images as threads (images are the unit of parallel work).
pub fn applies(exec: Exec, dw: &ConvGeometry, pw: &ConvGeometry) -> bool {
    let intermediate_per_image = dw.out_channels * dw.out_pixels() * 4;
    dw.is_depthwise()
        && pw.is_pointwise()
        && pw.groups == 1
        && dw.batch >= exec.threads()
        && intermediate_per_image >= MIN_INTERMEDIATE_BYTES
}

/// Fusion pays when one image's intermediate does not fit in L2 (1 MiB here): measured +4–6%
/// on reference layers B and C (1.6 MB per image), −2% and −5% on D and E (0.4 MB), where the
/// unfused pair's intermediate stays in cache anyway. Measured again on E later (harness,
/// alternated 3×): unfused 2.27–2.31 ms, fused 2.31–2.34, fused with the second thread's bands
/// shifted by half a band (so one thread reads its input while the other multiplies)
/// 2.43–2.44, with bands a quarter as tall 2.54–2.64.
const MIN_INTERMEDIATE_BYTES: usize = 1 << 20;

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
    let mk = dw.out_channels;
    let rows = (BAND_FLOATS / (mk * dw.out_w).max(1)).clamp(1, dw.out_h);
    let bands = bands(dw, rows)?;
    let phase_len = bands.iter().map(|b| b.layout.len).max().unwrap_or(0);
    let flat_len = bands.iter().map(|b| b.layout.out_len()).max().unwrap_or(0);
    // One blocked layout for every band: the tallest band's, so the buffer's padding columns
    // stay where the first call cleared them whatever the band's height.
    let blocked = depthwise_blocked::applies(dw)
        .then(|| depthwise_blocked::Layout::new(&tallest_band(&bands).geometry));
    let depthwise_len = match &blocked {
        Some(tallest) => bands
            .iter()
            .map(|b| tallest.scratch(&b.geometry, exec.isa().lanes()))
            .max()
            .unwrap_or(0),
        None => phase_len + flat_len,
    };
    let per_task = mk * rows * dw.out_w + depthwise_len;
    let tasks = exec.threads().min(dw.batch);
    let scratch = ws.take(per_task * tasks)?;
    let image_out = pw.out_channels * pw.out_pixels();
    for_each_task(tasks, y, image_out, scratch, per_task, |images, yc, buf| {
        let blocked = blocked.as_ref();
        fused_images(
            exec.isa(),
            dw,
            pw,
            &bands,
            blocked,
            x,
            wd,
            wp,
            bias,
            images,
            yc,
            buf,
        )
    });
    Ok(())
}

crate::simd_dispatch!(fn fused_images => fused_images_kernel(
    dw: &ConvGeometry, pw: &ConvGeometry, bands: &[Band],
    blocked: Option<&depthwise_blocked::Layout>, x: &[f32], wd: &[f32], wp: &[f32],
    bias: Option<&[f32]>, images: Range<usize>, y: &mut [f32], buf: &mut [f32]
));

/// `blocked`: the channel-blocked layout all bands share, where that kernel applies.
#[inline(always)]
unsafe fn fused_images_kernel<S: SimdF32>(
    dw: &ConvGeometry,
    pw: &ConvGeometry,
    bands: &[Band],
    blocked: Option<&depthwise_blocked::Layout>,
    x: &[f32],
    wd: &[f32],
    wp: &[f32],
    bias: Option<&[f32]>,
    images: Range<usize>,
    y: &mut [f32],
    buf: &mut [f32],
) {
    let (m, mult, taps) = (
        dw.in_channels,
        dw.depth_multiplier(),
        dw.kernel_h * dw.kernel_w,
    );
    let (mk, n_out, p) = (dw.out_channels, pw.out_channels, pw.out_pixels());
    let (hw, w_in, ow) = (dw.in_pixels(), dw.in_w, dw.out_w);
    let max_band = bands.iter().map(|b| b.out_rows.len()).max().unwrap_or(0) * ow;
    let (dbuf, rest) = buf.split_at_mut(mk * max_band);
    let phase_len = bands.iter().map(|b| b.layout.len).max().unwrap_or(0);
    let mut first = true;
    for (local, img) in images.enumerate() {
        let yi = &mut y[local * n_out * p..(local + 1) * n_out * p];
        for band in bands {
            let (g, l) = (&band.geometry, &band.layout);
            let bp = band.out_rows.len() * ow;
            if let Some(tallest) = blocked {
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
            } else {
                let (xbuf, obuf) = rest.split_at_mut(phase_len);
                for c in 0..m {
                    let plane = (img * m + c) * hw;
                    let xb = &x[plane + band.in_rows.start * w_in..plane + band.in_rows.end * w_in];
                    // Band layouts differ only in their top and bottom padding rows, so the buffer
                    // is cleared for every band's first channel.
                    fill_phases::<S>(g, l, xb, xbuf, first || c == 0);
                    first = false;
                    let d = &mut dbuf[c * mult * bp..(c + 1) * mult * bp];
                    // SAFETY: xbuf was just filled for layout `l`; obuf has the largest out_len.
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
            let col0 = band.out_rows.start * ow;
            let ops = Operands::dense(wp, n_out, mk, &dbuf[..mk * bp], bp, bp, bias);
            small_k_gemm(S::ISA, ops, &mut yi[col0..], p, Store::Stream);
        }
    }
}
