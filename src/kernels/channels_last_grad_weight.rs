//! Grad-weight on a channels-last copy of the input: each image's input channels (one group's)
//! are transposed once into zero-padded, pixel-major planes, a row of channels per padded
//! pixel. Tap (i, j) of output pixel (oh, ow) reads padded pixel (oh·sh + i·dh, ow·sw + j·dw):
//! a row at a per-position table entry plus the tap's constant offset. Each tap's gradient
//!
//! `gW_t (cout × cin) += gY (cout × P) · X_t (P × cin)`
//!
//! is then one unpacked register-blocked product ([`small_k_gemm`]): the output gradient's
//! rows broadcast along its NCHW rows, the table's channel rows loaded as vectors. Nothing is
//! packed, no im2col matrix is written, and unlike the per-tap GEMM on the planes
//! ([`super::tap_grad_weight`]) no position is wasted or wraps into a neighbouring row.
//!
//! It pays where many channels meet small images: there the per-tap GEMMs' wrapped positions
//! and faer's packing per short product cost most (see [`applies`]).

use super::implicit::{PixelRows, transpose_planes, transposed_stride};
use super::pointwise::{Operands, Rows, Store, small_k_gemm};
use super::simd::SimdF32;
use super::{Exec, Workspace, collect_exact};
use crate::error::Result;
use crate::geometry::ConvGeometry;
use rayon::prelude::*;

/// Whether [`grad_weight`] computes `g`'s grad-weight: not pointwise, images for every thread,
/// at least 256 input and output channels per group and at most 1024 output pixels per image
/// (a product's D slice, positions × 48 channels, then stays in L2).
///
/// Measured against the kernel chosen before (2 threads, batch 8, min of 10, alternated
/// twice): reference layer D's sizes (512 → 512 at 14 × 14) 1 × 3 12.31–12.44 against
/// 12.58–13.04 ms (im2col + faer), 3 × 3 39.2–41.0 against 41.5–42.0 (im2col + faer), 3 × 1
/// 12.35–12.48 against 12.41–12.60 (per-tap GEMM); 3 × 3 256 → 256 at 28 × 28 37.3–37.6
/// against 40.7–41.6, at stride 2 to 512 channels 20.4–20.9 against 21.7; 512 → 512 at 7 × 7
/// 10.9–12.8 against 13.3–13.6; 1 × 3 256 → 256 at 14 × 14 a tie (3.30–3.32 against
/// 3.23–3.36). Slower with 128 channels at 56 × 56 (reference layer C's 3 × 3 40.6–40.8
/// against 36.5, its 1 × 3 15.6 against 12.9: long products over few channels, where faer's
/// packed panels win) and on the MNIST network's 64 → 128 at 7 × 7 (3.2–4.0 against 2.7–3.2).
pub fn applies(exec: Exec, g: &ConvGeometry) -> bool {
    !g.is_pointwise()
        && g.batch >= exec.threads()
        && g.in_channels_per_group() >= 256
        && g.out_channels_per_group() >= 256
        && g.out_pixels() <= 1024
}

/// The padded channels-last copy of one image's group: its row width and row stride, and the
/// first row of every output position (tap (0, 0)).
struct Layout {
    rows: PixelRows,
    /// Floats in the copy.
    len: usize,
    /// Output position → start of the row tap (0, 0) reads.
    table: Vec<usize>,
    /// Tap → offset of its row from the position's tap-(0, 0) row.
    taps: Vec<usize>,
}

impl Layout {
    fn new(g: &ConvGeometry) -> Self {
        let hp = g.in_h + g.pad_top + g.pad_bottom;
        let wp = g.in_w + g.pad_left + g.pad_right;
        let ld = transposed_stride(g.in_channels_per_group());
        let table = collect_exact(
            g.out_pixels(),
            (0..g.out_h).flat_map(|oh| {
                (0..g.out_w).map(move |ow| (oh * g.stride_h * wp + ow * g.stride_w) * ld)
            }),
        );
        let taps = collect_exact(
            g.kernel_h * g.kernel_w,
            (0..g.kernel_h).flat_map(|i| {
                (0..g.kernel_w).map(move |j| (i * g.dilation_h * wp + j * g.dilation_w) * ld)
            }),
        );
        Layout {
            rows: PixelRows {
                top: g.pad_top,
                left: g.pad_left,
                row_width: wp,
                ld,
            },
            len: hp * wp * ld,
            table,
            taps,
        }
    }
}

/// Output positions per product: the D slice a register block reads (positions × 48
/// channels) stays in L2 and the products' accumulators are stored once per this many FMAs.
const CHUNK: usize = 512;

/// Images transposed per round (then multiplied by every thread).
const ROUND_IMAGES: usize = 8;

/// Grad-weight `gw` (overwritten) of a convolution where [`applies`]. In rounds of
/// 8 images: their channels-last copies are made in parallel, then the threads
/// split the output channels, each accumulating its rows over every image and tap. Splitting
/// rows rather than images needs no private copies of the gradient to sum, and each thread's
/// share of one tap's gradient stays in L2 (half of D's 1 MB tap on 2 threads).
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let layout = Layout::new(g);
    let (cig, cog, taps) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        layout.taps.len(),
    );
    let (hw, ohw, row_len) = (g.in_pixels(), g.out_pixels(), taps * cig);
    let round = ROUND_IMAGES.min(g.batch);
    let scratch = ws.take(gw.len() + round * g.groups * layout.len)?;
    // Rows (group·cog + o) of taps × cig floats: tap t's gradient at column t·cig.
    let (rows_by_tap, copies) = scratch.split_at_mut(gw.len());
    rows_by_tap.fill(0.0);
    let isa = exec.isa();
    let per_thread = g.out_channels.div_ceil(exec.threads()).next_multiple_of(8);
    for n0 in (0..g.batch).step_by(round) {
        let count = round.min(g.batch - n0);
        copies[..count * g.groups * layout.len]
            .par_chunks_mut(layout.len)
            .enumerate()
            .for_each(|(i, copy)| {
                let (n, grp) = (n0 + i / g.groups, i % g.groups);
                let planes = &x[(n * g.in_channels + grp * cig) * hw..][..cig * hw];
                channels_last(isa, g, &layout, planes, copy);
            });
        let copies = &*copies;
        rows_by_tap
            .par_chunks_mut(per_thread * row_len)
            .enumerate()
            .for_each(|(b, block)| {
                let (first, end) = (b * per_thread, b * per_thread + block.len() / row_len);
                let mut r = first;
                while r < end {
                    // The rows of one group at a time.
                    let (grp, o0) = (r / cog, r % cog);
                    let rows = (cog - o0).min(end - r);
                    for i in 0..count {
                        let copy = &copies[(i * g.groups + grp) * layout.len..][..layout.len];
                        let gy_rows = &gy[((n0 + i) * g.out_channels + r) * ohw..][..rows * ohw];
                        for (t, &off) in layout.taps.iter().enumerate() {
                            let out = &mut block[(r - first) * row_len + t * cig..];
                            for p0 in (0..ohw).step_by(CHUNK) {
                                let len = CHUNK.min(ohw - p0);
                                let ops = Operands {
                                    c: &gy_rows[p0..],
                                    c_rows: Rows::Strided(ohw),
                                    c_col: 1,
                                    d: &copy[off..],
                                    d_rows: Rows::Table(&layout.table[p0..p0 + len]),
                                    n: rows,
                                    k: len,
                                    p: cig,
                                    bias: None,
                                };
                                small_k_gemm(isa, ops, out, row_len, Store::Accumulate);
                            }
                        }
                    }
                    r += rows;
                }
            });
    }
    // gw[row][c·taps + t] = rows_by_tap[row][t·cig + c].
    let rows_by_tap = &*rows_by_tap;
    gw.par_chunks_mut(row_len)
        .zip(rows_by_tap.par_chunks(row_len))
        .for_each(|(out, src)| {
            for (c, o) in out.chunks_exact_mut(taps).enumerate() {
                for (t, v) in o.iter_mut().enumerate() {
                    *v = src[t * cig + c];
                }
            }
        });
    Ok(())
}

crate::simd_dispatch!(fn channels_last => channels_last_kernel(
    g: &ConvGeometry, layout: &Layout, planes: &[f32], copy: &mut [f32]
));

/// One image's group of input planes into its padded channels-last copy (the padding zeroed,
/// the interior transposed).
#[inline(always)]
unsafe fn channels_last_kernel<S: SimdF32>(
    g: &ConvGeometry,
    layout: &Layout,
    planes: &[f32],
    copy: &mut [f32],
) {
    let PixelRows {
        top,
        left,
        row_width,
        ld,
    } = layout.rows;
    let right = row_width - left - g.in_w;
    let (row_floats, interior_end) = (row_width * ld, (top + g.in_h) * row_width * ld);
    copy[..top * row_floats].fill(0.0);
    copy[interior_end..].fill(0.0);
    for y in 0..g.in_h {
        let row = &mut copy[(top + y) * row_floats..][..row_floats];
        row[..left * ld].fill(0.0);
        row[(left + g.in_w) * ld..][..right * ld].fill(0.0);
    }
    let cig = g.in_channels_per_group();
    // SAFETY: the ISA is this CPU's (simd_dispatch); the copy holds the padded planes.
    unsafe { transpose_planes::<S>(planes, cig, g.in_h, g.in_w, layout.rows, copy) };
}
