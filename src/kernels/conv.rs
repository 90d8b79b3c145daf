//! Standard and grouped convolution as im2col + GEMM.
//!
//! For each image and group the convolution is `Y (cout × P) = W (cout × K) · col (K × P)`, where
//! `K = cin·kh·kw` and `P` the output pixels. The im2col matrix is built in tiles of output
//! pixels sized to stay in cache (a full one is 14 MB per image on reference layer C, which would
//! spend a third of the time streaming through memory). A 1×1 stride-1 unpadded kernel
//! (pointwise) needs no im2col at all: the input *is* the column matrix.
//!
//! Backward: grad-input is `colᵀ-grad = Wᵀ · gY` followed by col2im (scatter-add); grad-weight is
//! `gW += gY · colᵀ`. Work is split over images (each thread runs sequential GEMMs) when the
//! batch divides evenly over the threads, and otherwise given to a multithreaded GEMM.

use rayon::prelude::*;

use super::gemm::{MatView, gemm};
use super::{Exec, Workspace, for_each_task, task_count};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Floats of im2col tile per thread: 4 MiB keeps a tile in L2+L3 while leaving the GEMM a wide
/// enough panel (hundreds of pixels) to run at full speed.
const COL_TILE_FLOATS: usize = 1 << 20;

/// Output pixels per im2col tile.
fn tile_pixels(g: &ConvGeometry) -> usize {
    let p = g.out_pixels();
    if g.is_pointwise() {
        return p;
    }
    (COL_TILE_FLOATS / g.col_rows()).max(64).min(p)
}

/// Calls `f(row, pixel0, segment_len, oh, ow0)` for each output-row segment of pixels
/// `[p0, p0 + len)` of an `out_w`-wide image.
#[inline]
fn for_each_row_segment(
    out_w: usize,
    p0: usize,
    len: usize,
    mut f: impl FnMut(usize, usize, usize, usize),
) {
    let end = p0 + len;
    let mut p = p0;
    while p < end {
        let (oh, ow0) = (p / out_w, p % out_w);
        let seg = (out_w - ow0).min(end - p);
        f(p - p0, seg, oh, ow0);
        p += seg;
    }
}

/// Writes the im2col rows for output pixels `[p0, p0 + len)` of one group's input `xg`
/// (`cin_per_group × H × W`) into `col` (`K × len`, row-major).
pub(crate) fn im2col_tile(g: &ConvGeometry, xg: &[f32], p0: usize, len: usize, col: &mut [f32]) {
    let (kh, kw, hw) = (g.kernel_h, g.kernel_w, g.in_pixels());
    for c in 0..g.in_channels_per_group() {
        let xc = &xg[c * hw..(c + 1) * hw];
        for i in 0..kh {
            for j in 0..kw {
                let r = (c * kh + i) * kw + j;
                let dst = &mut col[r * len..(r + 1) * len];
                let valid = g.valid_out_cols(j);
                for_each_row_segment(g.out_w, p0, len, |at, seg_len, oh, ow0| {
                    let seg = &mut dst[at..at + seg_len];
                    let Some(ih) = g.input_row(oh, i) else {
                        seg.fill(0.0);
                        return;
                    };
                    let lo = valid.start.clamp(ow0, ow0 + seg_len);
                    let hi = valid.end.clamp(lo, ow0 + seg_len);
                    seg[..lo - ow0].fill(0.0);
                    seg[hi - ow0..].fill(0.0);
                    if lo == hi {
                        return;
                    }
                    let row = &xc[ih * g.in_w..(ih + 1) * g.in_w];
                    let first = lo * g.stride_w + j * g.dilation_w - g.pad_left;
                    let out = &mut seg[lo - ow0..hi - ow0];
                    if g.stride_w == 1 {
                        out.copy_from_slice(&row[first..first + (hi - lo)]);
                    } else {
                        for (o, &v) in out.iter_mut().zip(row[first..].iter().step_by(g.stride_w)) {
                            *o = v;
                        }
                    }
                });
            }
        }
    }
}

/// The adjoint of [`im2col_tile`]: adds the column tile back into the image `gxg`.
pub(crate) fn col2im_tile(g: &ConvGeometry, col: &[f32], p0: usize, len: usize, gxg: &mut [f32]) {
    let (kh, kw, hw) = (g.kernel_h, g.kernel_w, g.in_pixels());
    for c in 0..g.in_channels_per_group() {
        let gxc = &mut gxg[c * hw..(c + 1) * hw];
        for i in 0..kh {
            for j in 0..kw {
                let r = (c * kh + i) * kw + j;
                let src = &col[r * len..(r + 1) * len];
                let valid = g.valid_out_cols(j);
                for_each_row_segment(g.out_w, p0, len, |at, seg_len, oh, ow0| {
                    let Some(ih) = g.input_row(oh, i) else { return };
                    let lo = valid.start.clamp(ow0, ow0 + seg_len);
                    let hi = valid.end.clamp(lo, ow0 + seg_len);
                    if lo == hi {
                        return;
                    }
                    let row = &mut gxc[ih * g.in_w..(ih + 1) * g.in_w];
                    let first = lo * g.stride_w + j * g.dilation_w - g.pad_left;
                    let seg = &src[at + lo - ow0..at + hi - ow0];
                    if g.stride_w == 1 {
                        for (o, &v) in row[first..first + seg.len()].iter_mut().zip(seg) {
                            *o += v;
                        }
                    } else {
                        for (o, &v) in row[first..].iter_mut().step_by(g.stride_w).zip(seg) {
                            *o += v;
                        }
                    }
                });
            }
        }
    }
}

/// Per-image slices of one group.
struct GroupSlices {
    cig: usize,
    cog: usize,
    k: usize,
    p: usize,
    in_group: usize,
    out_group: usize,
}

impl GroupSlices {
    fn new(g: &ConvGeometry) -> Self {
        let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
        GroupSlices {
            cig,
            cog,
            k: g.col_rows(),
            p: g.out_pixels(),
            in_group: cig * g.in_pixels(),
            out_group: cog * g.out_pixels(),
        }
    }
}

/// Forward pass: `y = conv(x, w) + bias`.
pub fn forward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let tasks = task_count(exec.threads(), g.batch);
    let gemm_threads = if tasks == 1 { exec.threads() } else { 1 };
    let pt = tile_pixels(g);
    let col_len = if g.is_pointwise() {
        0
    } else {
        g.col_rows() * pt
    };
    let scratch = ws.take(col_len * tasks)?;
    let s = GroupSlices::new(g);
    let (img_in, img_out) = (g.in_channels * g.in_pixels(), g.out_channels * s.p);
    for_each_task(tasks, y, img_out, scratch, col_len, |images, yc, col| {
        for (local, n) in images.enumerate() {
            let xn = &x[n * img_in..(n + 1) * img_in];
            let yn = &mut yc[local * img_out..(local + 1) * img_out];
            for grp in 0..g.groups {
                let xg = &xn[grp * s.in_group..(grp + 1) * s.in_group];
                let wg = MatView::dense(&w[grp * s.cog * s.k..(grp + 1) * s.cog * s.k], s.cog, s.k);
                let yg = &mut yn[grp * s.out_group..(grp + 1) * s.out_group];
                if let Some(b) = bias {
                    for (row, &bv) in yg.chunks_exact_mut(s.p).zip(&b[grp * s.cog..]) {
                        row.fill(bv);
                    }
                }
                let acc = bias.is_some();
                if g.is_pointwise() {
                    gemm(
                        yg,
                        s.p,
                        wg,
                        MatView::dense(xg, s.cig, s.p),
                        acc,
                        gemm_threads,
                    );
                    continue;
                }
                for p0 in (0..s.p).step_by(pt) {
                    let len = pt.min(s.p - p0);
                    let colt = &mut col[..s.k * len];
                    im2col_tile(g, xg, p0, len, colt);
                    gemm(
                        &mut yg[p0..],
                        s.p,
                        wg,
                        MatView::dense(colt, s.k, len),
                        acc,
                        gemm_threads,
                    );
                }
            }
        }
    });
    Ok(())
}

/// Grad-input: `gx = ∂L/∂x` (overwritten).
pub fn grad_input(
    exec: Exec,
    g: &ConvGeometry,
    gy: &[f32],
    w: &[f32],
    gx: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let tasks = task_count(exec.threads(), g.batch);
    let gemm_threads = if tasks == 1 { exec.threads() } else { 1 };
    let pt = tile_pixels(g);
    let col_len = if g.is_pointwise() {
        0
    } else {
        g.col_rows() * pt
    };
    let scratch = ws.take(col_len * tasks)?;
    let s = GroupSlices::new(g);
    let (img_in, img_out) = (g.in_channels * g.in_pixels(), g.out_channels * s.p);
    for_each_task(tasks, gx, img_in, scratch, col_len, |images, gxc, col| {
        for (local, n) in images.enumerate() {
            let gyn = &gy[n * img_out..(n + 1) * img_out];
            let gxn = &mut gxc[local * img_in..(local + 1) * img_in];
            if !g.is_pointwise() {
                gxn.fill(0.0);
            }
            for grp in 0..g.groups {
                let wg =
                    MatView::dense(&w[grp * s.cog * s.k..(grp + 1) * s.cog * s.k], s.cog, s.k).t();
                let gyg = &gyn[grp * s.out_group..(grp + 1) * s.out_group];
                let gxg = &mut gxn[grp * s.in_group..(grp + 1) * s.in_group];
                if g.is_pointwise() {
                    gemm(
                        gxg,
                        s.p,
                        wg,
                        MatView::dense(gyg, s.cog, s.p),
                        false,
                        gemm_threads,
                    );
                    continue;
                }
                for p0 in (0..s.p).step_by(pt) {
                    let len = pt.min(s.p - p0);
                    let colt = &mut col[..s.k * len];
                    let gy_tile = MatView::row_major(&gyg[p0..], s.cog, len, s.p);
                    gemm(colt, len, wg, gy_tile, false, gemm_threads);
                    col2im_tile(g, colt, p0, len, gxg);
                }
            }
        }
    });
    Ok(())
}

/// Grad-weight: `gw = ∂L/∂w` (overwritten). With several tasks, each accumulates a private copy
/// of the weight gradient over its images and the copies are summed at the end.
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let tasks = task_count(exec.threads(), g.batch);
    let gemm_threads = if tasks == 1 { exec.threads() } else { 1 };
    let pt = tile_pixels(g);
    let col_len = if g.is_pointwise() {
        0
    } else {
        g.col_rows() * pt
    };
    let s = GroupSlices::new(g);
    let (img_in, img_out) = (g.in_channels * g.in_pixels(), g.out_channels * s.p);
    let accumulate_images = |images: std::ops::Range<usize>, gw: &mut [f32], col: &mut [f32]| {
        gw.fill(0.0);
        for n in images {
            let xn = &x[n * img_in..(n + 1) * img_in];
            let gyn = &gy[n * img_out..(n + 1) * img_out];
            for grp in 0..g.groups {
                let xg = &xn[grp * s.in_group..(grp + 1) * s.in_group];
                let gyg = &gyn[grp * s.out_group..(grp + 1) * s.out_group];
                let gwg = &mut gw[grp * s.cog * s.k..(grp + 1) * s.cog * s.k];
                if g.is_pointwise() {
                    let xt = MatView::dense(xg, s.cig, s.p).t();
                    gemm(
                        gwg,
                        s.k,
                        MatView::dense(gyg, s.cog, s.p),
                        xt,
                        true,
                        gemm_threads,
                    );
                    continue;
                }
                for p0 in (0..s.p).step_by(pt) {
                    let len = pt.min(s.p - p0);
                    let colt = &mut col[..s.k * len];
                    im2col_tile(g, xg, p0, len, colt);
                    let gy_tile = MatView::row_major(&gyg[p0..], s.cog, len, s.p);
                    gemm(
                        gwg,
                        s.k,
                        gy_tile,
                        MatView::dense(colt, s.k, len).t(),
                        true,
                        gemm_threads,
                    );
                }
            }
        }
    };
    if tasks == 1 {
        let col = ws.take(col_len)?;
        accumulate_images(0..g.batch, gw, col);
        return Ok(());
    }
    let wlen = gw.len();
    let per_task = wlen + col_len;
    let scratch = ws.take(per_task * tasks)?;
    let per_images = g.batch.div_ceil(tasks);
    scratch
        .par_chunks_mut(per_task)
        .enumerate()
        .for_each(|(t, s)| {
            let (part, col) = s.split_at_mut(wlen);
            let start = (t * per_images).min(g.batch);
            accumulate_images(start..(start + per_images).min(g.batch), part, col);
        });
    // Sum the private copies, in parallel over the weight.
    let chunk = wlen.div_ceil(exec.threads()).max(1);
    let scratch = &*scratch;
    gw.par_chunks_mut(chunk).enumerate().for_each(|(ci, out)| {
        let base = ci * chunk;
        out.copy_from_slice(&scratch[base..base + out.len()]);
        for t in 1..tasks {
            let part = &scratch[t * per_task + base..t * per_task + base + out.len()];
            for (o, &v) in out.iter_mut().zip(part) {
                *o += v;
            }
        }
    });
    Ok(())
}
