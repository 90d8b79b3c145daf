//! Depthwise convolution (groups = in-channels, depth multiplier K): a direct SIMD kernel.
//!
//! Each input plane is first copied into a scratch layout where every row is zero-padded left
//! and right and split into `stride_w` phases (phase q holds padded columns q, q + s, q + 2s, …).
//! In that layout the input column read by output column `ow` through tap `j` is always
//! `ow + constant` within one phase, so every tap of every stride, dilation and padding reads
//! contiguous memory and the inner loops are plain vector FMAs. The copy costs one pass over
//! the input; the kernel then does kh·kw FMAs per output element from L1/L2.
//!
//! - forward: per output row, each vector of outputs accumulates all taps in registers.
//! - grad-input: the adjoint; each vector of output gradients is scattered (vector FMA into the
//!   padded phase layout), then the layout is folded back into the input plane.
//! - grad-weight: per channel, kh·kw vector accumulators run over all images and pixels.

use std::ops::Range;

use super::simd::SimdF32;
use super::{Exec, Workspace, for_each_task};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Largest vector width of any instruction set: the zero margin every phase row carries so
/// full-width loads at the end of a row stay inside the buffer.
const MAX_LANES: usize = 16;

/// Where the padded, phase-split copy of one input plane lives in scratch.
#[derive(Clone, Debug)]
pub(crate) struct PlaneLayout {
    /// Elements per phase row (padded width / stride, plus margin).
    phase_len: usize,
    /// Elements per input row: `stride_w × phase_len`.
    row_len: usize,
    /// Elements per plane: `in_h × row_len`.
    plane_len: usize,
    /// For each kernel column j: offset within a row of the element output column 0 reads.
    tap_offset: Vec<usize>,
}

impl PlaneLayout {
    pub(crate) fn new(g: &ConvGeometry) -> Self {
        let s = g.stride_w;
        let padded = g.pad_left + g.in_w + g.pad_right;
        let max_shift = (g.kernel_w - 1) * g.dilation_w / s;
        let phase_len = padded.div_ceil(s).max(g.out_w + max_shift) + MAX_LANES;
        let tap_offset = (0..g.kernel_w)
            .map(|j| {
                let c = j * g.dilation_w;
                (c % s) * phase_len + c / s
            })
            .collect();
        PlaneLayout {
            phase_len,
            row_len: s * phase_len,
            plane_len: g.in_h * s * phase_len,
            tap_offset,
        }
    }
}

/// Copies plane `xp` (`in_h × in_w`) into `buf` in the padded, phase-split layout.
fn fill_plane(g: &ConvGeometry, l: &PlaneLayout, xp: &[f32], buf: &mut [f32]) {
    let (s, pl, w) = (g.stride_w, g.pad_left, g.in_w);
    for (row, dst) in xp.chunks_exact(w).zip(buf.chunks_exact_mut(l.row_len)) {
        if s == 1 {
            dst[..pl].fill(0.0);
            dst[pl..pl + w].copy_from_slice(row);
            dst[pl + w..].fill(0.0);
            continue;
        }
        for (q, phase) in dst.chunks_exact_mut(l.phase_len).enumerate() {
            for (k, v) in phase.iter_mut().enumerate() {
                let c = q + s * k;
                *v = if c >= pl && c - pl < w {
                    row[c - pl]
                } else {
                    0.0
                };
            }
        }
    }
}

/// Adds the padded, phase-split accumulator `buf` back into plane `gxp` (overwriting it).
fn fold_plane(g: &ConvGeometry, l: &PlaneLayout, buf: &[f32], gxp: &mut [f32]) {
    let (s, pl, w) = (g.stride_w, g.pad_left, g.in_w);
    for (dst, src) in gxp.chunks_exact_mut(w).zip(buf.chunks_exact(l.row_len)) {
        if s == 1 {
            dst.copy_from_slice(&src[pl..pl + w]);
            continue;
        }
        for (iw, v) in dst.iter_mut().enumerate() {
            let c = iw + pl;
            *v = src[(c % s) * l.phase_len + c / s];
        }
    }
}

/// Forward pass: `y = depthwise(x, w) + bias`.
pub fn forward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let layout = PlaneLayout::new(g);
    let items = g.batch * g.in_channels;
    let tasks = exec.threads().min(items);
    let scratch = ws.take(layout.plane_len * tasks)?;
    let out_item = g.depth_multiplier() * g.out_pixels();
    for_each_task(
        tasks,
        y,
        out_item,
        scratch,
        layout.plane_len,
        |planes, yc, buf| forward_planes(exec.isa(), g, &layout, x, w, bias, planes, yc, buf),
    );
    Ok(())
}

crate::simd_dispatch!(fn forward_planes => forward_planes_kernel(
    g: &ConvGeometry, layout: &PlaneLayout, x: &[f32], w: &[f32], bias: Option<&[f32]>,
    planes: Range<usize>, y: &mut [f32], buf: &mut [f32]
));

#[inline(always)]
unsafe fn forward_planes_kernel<S: SimdF32>(
    g: &ConvGeometry,
    layout: &PlaneLayout,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    planes: Range<usize>,
    y: &mut [f32],
    buf: &mut [f32],
) {
    let (hw, ohw, ow_n) = (g.in_pixels(), g.out_pixels(), g.out_w);
    let (mult, taps) = (g.depth_multiplier(), g.kernel_h * g.kernel_w);
    let buf = &mut buf[..layout.plane_len];
    for (local, item) in planes.enumerate() {
        fill_plane(g, layout, &x[item * hw..(item + 1) * hw], buf);
        let m = item % g.in_channels;
        for k in 0..mult {
            let co = m * mult + k;
            let wk = &w[co * taps..(co + 1) * taps];
            let b = bias.map_or(0.0, |b| b[co]);
            let yp = &mut y[(local * mult + k) * ohw..(local * mult + k + 1) * ohw];
            for (oh, out) in yp.chunks_exact_mut(ow_n).enumerate() {
                let rows = g.valid_kernel_rows(oh);
                let row0 = (oh * g.stride_h + rows.start * g.dilation_h).wrapping_sub(g.pad_top);
                // SAFETY: rows are valid input rows; `layout` guarantees every tap offset plus
                // out_w plus a full vector stays inside a row.
                unsafe { forward_row::<S>(g, layout, buf, rows, row0, wk, b, out) };
            }
        }
    }
}

/// One output row: every vector of outputs accumulates all valid taps in registers.
#[inline(always)]
unsafe fn forward_row<S: SimdF32>(
    g: &ConvGeometry,
    layout: &PlaneLayout,
    buf: &[f32],
    rows: Range<usize>,
    row0: usize,
    wk: &[f32],
    bias: f32,
    out: &mut [f32],
) {
    let l = S::LANES;
    let kw = g.kernel_w;
    let n = out.len();
    let base = buf.as_ptr();
    let dst = out.as_mut_ptr();
    let mut ow = 0;
    unsafe {
        while ow + 2 * l <= n {
            let (mut a0, mut a1) = (S::splat(bias), S::splat(bias));
            for (r, i) in rows.clone().enumerate() {
                let rp = base.add((row0 + r * g.dilation_h) * layout.row_len + ow);
                for j in 0..kw {
                    let wv = S::splat(*wk.get_unchecked(i * kw + j));
                    let p = rp.add(*layout.tap_offset.get_unchecked(j));
                    a0 = S::mul_add(wv, S::load(p), a0);
                    a1 = S::mul_add(wv, S::load(p.add(l)), a1);
                }
            }
            a0.store(dst.add(ow));
            a1.store(dst.add(ow + l));
            ow += 2 * l;
        }
        while ow < n {
            let mut a0 = S::splat(bias);
            for (r, i) in rows.clone().enumerate() {
                let rp = base.add((row0 + r * g.dilation_h) * layout.row_len + ow);
                for j in 0..kw {
                    let wv = S::splat(*wk.get_unchecked(i * kw + j));
                    a0 = S::mul_add(wv, S::load(rp.add(*layout.tap_offset.get_unchecked(j))), a0);
                }
            }
            if ow + l <= n {
                a0.store(dst.add(ow));
            } else {
                a0.store_partial(dst.add(ow), n - ow);
            }
            ow += l;
        }
    }
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
    let layout = PlaneLayout::new(g);
    let items = g.batch * g.in_channels;
    let tasks = exec.threads().min(items);
    let scratch = ws.take(layout.plane_len * tasks)?;
    for_each_task(
        tasks,
        gx,
        g.in_pixels(),
        scratch,
        layout.plane_len,
        |planes, gxc, buf| grad_input_planes(exec.isa(), g, &layout, gy, w, planes, gxc, buf),
    );
    Ok(())
}

crate::simd_dispatch!(fn grad_input_planes => grad_input_planes_kernel(
    g: &ConvGeometry, layout: &PlaneLayout, gy: &[f32], w: &[f32],
    planes: Range<usize>, gx: &mut [f32], buf: &mut [f32]
));

#[inline(always)]
unsafe fn grad_input_planes_kernel<S: SimdF32>(
    g: &ConvGeometry,
    layout: &PlaneLayout,
    gy: &[f32],
    w: &[f32],
    planes: Range<usize>,
    gx: &mut [f32],
    buf: &mut [f32],
) {
    let (hw, ohw, ow_n) = (g.in_pixels(), g.out_pixels(), g.out_w);
    let (mult, taps, kw, l) = (
        g.depth_multiplier(),
        g.kernel_h * g.kernel_w,
        g.kernel_w,
        S::LANES,
    );
    let buf = &mut buf[..layout.plane_len];
    for (local, item) in planes.enumerate() {
        buf.fill(0.0);
        let m = item % g.in_channels;
        let acc = buf.as_mut_ptr();
        for k in 0..mult {
            let co = m * mult + k;
            let wk = &w[co * taps..(co + 1) * taps];
            // Output plane (n, co): n = item / in_channels, and channel index n·M·K + co.
            let out_plane = (item / g.in_channels) * g.out_channels + co;
            let gyp = &gy[out_plane * ohw..(out_plane + 1) * ohw];
            for (oh, gyr) in gyp.chunks_exact(ow_n).enumerate() {
                let rows = g.valid_kernel_rows(oh);
                let row0 = (oh * g.stride_h + rows.start * g.dilation_h).wrapping_sub(g.pad_top);
                let mut ow = 0;
                while ow < ow_n {
                    let rem = (ow_n - ow).min(l);
                    // SAFETY: as in forward_row; partial loads/stores keep lanes past the row
                    // end untouched so non-finite weights cannot leak into neighbouring pixels.
                    unsafe {
                        let gv = if rem == l {
                            S::load(gyr.as_ptr().add(ow))
                        } else {
                            S::load_partial(gyr.as_ptr().add(ow), rem)
                        };
                        for (r, i) in rows.clone().enumerate() {
                            let rp = acc.add((row0 + r * g.dilation_h) * layout.row_len + ow);
                            for j in 0..kw {
                                let wv = S::splat(*wk.get_unchecked(i * kw + j));
                                let p = rp.add(*layout.tap_offset.get_unchecked(j));
                                if rem == l {
                                    S::mul_add(wv, gv, S::load(p)).store(p);
                                } else {
                                    S::mul_add(wv, gv, S::load_partial(p, rem))
                                        .store_partial(p, rem);
                                }
                            }
                        }
                    }
                    ow += l;
                }
            }
        }
        fold_plane(g, layout, buf, &mut gx[local * hw..(local + 1) * hw]);
    }
}

/// Grad-weight: `gw = ∂L/∂w` (overwritten). Parallel over channels; each channel's taps
/// accumulate over all images in vector registers.
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let layout = PlaneLayout::new(g);
    let items = g.in_channels;
    let tasks = exec.threads().min(items);
    let per_task = layout.plane_len * g.batch;
    let scratch = ws.take(per_task * tasks)?;
    let out_item = g.depth_multiplier() * g.kernel_h * g.kernel_w;
    for_each_task(
        tasks,
        gw,
        out_item,
        scratch,
        per_task,
        |channels, gwc, buf| {
            grad_weight_channels(exec.isa(), g, &layout, x, gy, channels, gwc, buf)
        },
    );
    Ok(())
}

crate::simd_dispatch!(fn grad_weight_channels => grad_weight_channels_kernel(
    g: &ConvGeometry, layout: &PlaneLayout, x: &[f32], gy: &[f32],
    channels: Range<usize>, gw: &mut [f32], buf: &mut [f32]
));

/// Taps accumulated at once per kernel row (vector registers); wider kernels loop.
const TAP_BLOCK: usize = 8;

#[inline(always)]
unsafe fn grad_weight_channels_kernel<S: SimdF32>(
    g: &ConvGeometry,
    layout: &PlaneLayout,
    x: &[f32],
    gy: &[f32],
    channels: Range<usize>,
    gw: &mut [f32],
    buf: &mut [f32],
) {
    let (hw, ohw, ow_n) = (g.in_pixels(), g.out_pixels(), g.out_w);
    let (mult, kh, kw, l) = (g.depth_multiplier(), g.kernel_h, g.kernel_w, S::LANES);
    let pl = layout.plane_len;
    for (local, m) in channels.enumerate() {
        for n in 0..g.batch {
            let plane = n * g.in_channels + m;
            fill_plane(
                g,
                layout,
                &x[plane * hw..(plane + 1) * hw],
                &mut buf[n * pl..(n + 1) * pl],
            );
        }
        for k in 0..mult {
            let co = m * mult + k;
            let gwk = &mut gw[(local * mult + k) * kh * kw..(local * mult + k + 1) * kh * kw];
            for i in 0..kh {
                for j0 in (0..kw).step_by(TAP_BLOCK) {
                    let jn = TAP_BLOCK.min(kw - j0);
                    // SAFETY: as in forward_row; the tail uses partial loads so lanes past the
                    // row end contribute exactly zero.
                    let sums = unsafe {
                        let mut acc = [S::zero(); TAP_BLOCK];
                        for n in 0..g.batch {
                            let xb = buf.as_ptr().add(n * pl);
                            let out_plane = n * g.out_channels + co;
                            let gyp = &gy[out_plane * ohw..(out_plane + 1) * ohw];
                            for oh in g.valid_out_rows(i) {
                                let ih = oh * g.stride_h + i * g.dilation_h - g.pad_top;
                                let rp = xb.add(ih * layout.row_len);
                                let gyr = gyp.as_ptr().add(oh * ow_n);
                                let mut ow = 0;
                                while ow + l <= ow_n {
                                    let gv = S::load(gyr.add(ow));
                                    for (jj, a) in acc.iter_mut().enumerate().take(jn) {
                                        let p =
                                            rp.add(*layout.tap_offset.get_unchecked(j0 + jj) + ow);
                                        *a = S::mul_add(gv, S::load(p), *a);
                                    }
                                    ow += l;
                                }
                                if ow < ow_n {
                                    let rem = ow_n - ow;
                                    let gv = S::load_partial(gyr.add(ow), rem);
                                    for (jj, a) in acc.iter_mut().enumerate().take(jn) {
                                        let p =
                                            rp.add(*layout.tap_offset.get_unchecked(j0 + jj) + ow);
                                        *a = S::mul_add(gv, S::load_partial(p, rem), *a);
                                    }
                                }
                            }
                        }
                        acc.map(|a| a.reduce_sum())
                    };
                    gwk[i * kw + j0..i * kw + j0 + jn].copy_from_slice(&sums[..jn]);
                }
            }
        }
    }
}
