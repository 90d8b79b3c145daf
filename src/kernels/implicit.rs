//! Implicit-GEMM convolution: the im2col matrix is never written.
//!
//! Each input channel is laid out as its padded phase planes (the depthwise kernel's layout),
//! where tap (i, j) of output position `o = oh·wq + ow` is `o + off(i, j)` for every stride,
//! dilation and padding. Row (c, i, j) of the im2col matrix is then just channel c's buffer
//! shifted by `off(i, j)`: a table of K = C·kh·kw row offsets turns the unpacked
//! register-blocked GEMM ([`super::pointwise`]) into the whole convolution,
//! `Y_flat (N × out_h·wq) = W (N × K) · D`, with D's rows read straight from the planes (all
//! taps of a channel hit the same few cache lines). The flat output has `wq − out_w` wasted
//! columns per row, dropped when it is copied into NCHW.
//!
//! Used for convolutions Winograd does not cover (strided, dilated, non-3×3) when the batch
//! gives every thread images of its own; otherwise im2col + a multithreaded GEMM.

use super::depthwise::{PhaseLayout, fill_phases};
use super::pointwise::{Operands, small_k_gemm};
use super::simd::SimdF32;
use super::{Exec, Workspace, for_each_task};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Whether the implicit GEMM should compute `g`: images for every thread (it runs one image
/// per GEMM, single-threaded) and more than one input channel per group (one channel is the
/// depthwise kernel's job).
pub fn applies(exec: Exec, g: &ConvGeometry) -> bool {
    g.batch >= exec.threads()
        && g.in_channels_per_group() > 1
        && !g.is_pointwise()
        && g.out_pixels() >= MIN_PIXELS
}

/// Output pixels per image below which im2col (which batches small images into one GEMM) wins.
const MIN_PIXELS: usize = 256;

/// Per-task scratch: the phase planes of one group's channels, then the flat output.
fn scratch_per_task(g: &ConvGeometry, l: &PhaseLayout) -> usize {
    g.in_channels_per_group() * l.len + g.out_channels_per_group() * l.out_len()
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
    let l = PhaseLayout::new(g);
    let tasks = exec.threads().min(g.batch);
    let per_task = scratch_per_task(g, &l);
    let scratch = ws.take(per_task * tasks)?;
    let img_out = g.out_channels * g.out_pixels();
    for_each_task(tasks, y, img_out, scratch, per_task, |images, yc, buf| {
        forward_images(exec.isa(), g, &l, x, w, bias, images, yc, buf)
    });
    Ok(())
}

crate::simd_dispatch!(fn forward_images => forward_images_kernel(
    g: &ConvGeometry, l: &PhaseLayout, x: &[f32], w: &[f32], bias: Option<&[f32]>,
    images: std::ops::Range<usize>, y: &mut [f32], buf: &mut [f32]
));

#[inline(always)]
unsafe fn forward_images_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
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
    let (hw, ohw, ow) = (g.in_pixels(), g.out_pixels(), g.out_w);
    let (planes, flat) = buf.split_at_mut(cig * l.len);
    // Row (c, t) of the implicit im2col matrix: channel c's planes shifted by tap t's offset.
    // (One small table per call; the row order matches the OIHW weight's columns.)
    let rows: Vec<usize> = (0..cig)
        .flat_map(|c| l.offsets.iter().map(move |&off| c * l.len + off))
        .collect();
    debug_assert_eq!(rows.len(), k);
    let out_len = l.out_len();
    for (local, n) in images.enumerate() {
        for grp in 0..g.groups {
            for (c, buf) in planes.chunks_exact_mut(l.len).enumerate() {
                let plane = (n * g.in_channels + grp * cig + c) * hw;
                // Each channel's buffer is cleared once; after that only pixels are rewritten.
                fill_phases::<S>(g, l, &x[plane..plane + hw], buf, local == 0 && grp == 0);
            }
            let ops = Operands {
                c: &w[grp * cog * k..(grp + 1) * cog * k],
                ldc: k,
                c_col: 1,
                d: planes,
                ldd: 0,
                n: cog,
                k,
                p: l.positions,
                bias: bias.map(|b| &b[grp * cog..(grp + 1) * cog]),
                d_rows: Some(&rows),
            };
            small_k_gemm(S::ISA, ops, flat, out_len, false);
            let at = local * g.out_channels * ohw + grp * cog * ohw;
            for (oc, plane) in y[at..at + cog * ohw].chunks_exact_mut(ohw).enumerate() {
                for (oh, row) in plane.chunks_exact_mut(ow).enumerate() {
                    let src = oc * out_len + oh * l.wq;
                    row.copy_from_slice(&flat[src..src + ow]);
                }
            }
        }
    }
}
