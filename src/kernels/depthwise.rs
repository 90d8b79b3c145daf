//! Depthwise convolution (groups = in-channels, depth multiplier K, output channel m·K + k),
//! any stride and dilation, as 1-D correlations over flat buffers: a direct SIMD kernel, never
//! a loop of tiny convolutions.
//!
//! **Phase planes.** Each padded input plane (`Hp × Wp`) is split into `sh × sw` phase planes of
//! `hq × wq` (`hq = ⌈Hp / sh⌉`, `wq = ⌈Wp / sw⌉`): phase (a, b) holds padded pixels
//! (r·sh + a, c·sw + b). Output pixel (oh, ow) reads, through tap (i, j), padded pixel
//! (oh·sh + i·dh, ow·sw + j·dw), which is pixel (oh + ⌊i·dh / sh⌋, ow + ⌊j·dw / sw⌋) of phase
//! (i·dh mod sh, j·dw mod sw). In a flat buffer holding the phase planes one after another,
//! that is `o + off(i, j)` with `o = oh·wq + ow` and a constant `off(i, j)`. So a whole plane is
//! one correlation with constant tap offsets over `out_h · wq` positions: long vectors, no
//! per-row or per-stride special cases, at the price of `wq − out_w` wasted columns per row
//! (1–2 here). With stride 1 there is one phase plane: the padded plane itself.
//!
//! - forward: `y[o] = Σ_t w[t] · x_phases[o + off(t)]`; the 3×3 kernel keeps its weights in
//!   registers.
//! - grad-weight: `gw[t] = Σ_o gy[o] · x_phases[o + off(t)]`, with the output gradient laid out
//!   in the same `wq`-strided rows (zeros in the wasted columns), accumulated over the batch.
//! - grad-input: for each phase (a, b) of the input gradient, only the taps with
//!   (i·dh mod sh, j·dw mod sw) = (a, b) contribute, and they do so as a correlation of the
//!   zero-padded output gradient: `gx_phase(a, b)[r, c] = Σ w[i, j] · gy[r − ⌊i·dh / sh⌋,
//!   c − ⌊j·dw / sw⌋]`. Each tap is used exactly once over all phases: no multiplication by the
//!   zeros a strided transposed convolution would insert.

use std::ops::Range;

use super::elementwise;
use super::simd::SimdF32;
use super::{Exec, Workspace, collect_exact, for_each_task};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Outputs per inner-loop step: 4 vectors, enough independent FMA chains to hide latency.
const BLOCK: usize = 4;

/// Zero margin after each flat buffer: the last block of vectors may read past the data (one
/// vector more than the block in [`correlate_row_triples`]).
const MARGIN: usize = (BLOCK + 1) * 16;

/// The phase-plane layout of one input plane, shared by forward and grad-weight.
#[derive(Clone, Debug)]
pub(crate) struct PhaseLayout {
    /// Phase plane height and width.
    pub(crate) hq: usize,
    /// Phase plane width, also the row stride of the flat output.
    pub(crate) wq: usize,
    /// Flat positions computed: `out_h × wq`.
    pub(crate) positions: usize,
    /// Tap offsets, row-major over (i, j).
    pub(crate) offsets: Vec<usize>,
    /// Floats of the phase buffer (all phase planes, one spare row, margin).
    pub(crate) len: usize,
}

impl PhaseLayout {
    pub(crate) fn new(g: &ConvGeometry) -> Self {
        let (sh, sw) = (g.stride_h, g.stride_w);
        let hq = (g.in_h + g.pad_top + g.pad_bottom).div_ceil(sh);
        let wq = Self::phase_width(g);
        let plane = hq * wq;
        let offsets = collect_exact(
            g.kernel_h * g.kernel_w,
            (0..g.kernel_h)
                .flat_map(|i| (0..g.kernel_w).map(move |j| (i * g.dilation_h, j * g.dilation_w)))
                .map(|(di, dj)| ((di % sh) * sw + dj % sw) * plane + (di / sh) * wq + dj / sw),
        );
        PhaseLayout {
            hq,
            wq,
            positions: g.out_h * wq,
            offsets,
            len: sh * sw * plane + wq + MARGIN,
        }
    }

    /// Width of `g`'s phase planes, the row stride of its flat output.
    pub(crate) fn phase_width(g: &ConvGeometry) -> usize {
        (g.in_w + g.pad_left + g.pad_right).div_ceil(g.stride_w)
    }

    /// Floats of the flat output (or flat output gradient) of one plane.
    pub(crate) fn out_len(&self) -> usize {
        self.positions + MARGIN
    }
}

/// Scatters input plane `x` (`in_h × in_w`) into its zero-padded phase planes in `buf`.
///
/// Only the positions of input pixels are written: padding and spare positions keep the zeros
/// `clear` wrote ([`clear_phase_padding`]), so a task clears its buffer once and then refills
/// plane after plane.
#[inline(always)]
pub(crate) fn fill_phases<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    x: &[f32],
    buf: &mut [f32],
    clear: bool,
) {
    let (sh, sw, plane) = (g.stride_h, g.stride_w, l.hq * l.wq);
    if clear {
        clear_phase_padding(g, l, buf);
    }
    let (pl, w) = (g.pad_left, g.in_w);
    // Padded row pr = r + pad_top is row pr / sh of phase row pr % sh, tracked incrementally:
    // a division per row was a visible share of a 14 × 14 plane's time.
    let (mut phase_row, mut phase_r) = (g.pad_top % sh, g.pad_top / sh);
    for row in x.chunks_exact(w) {
        let row_base = phase_row * sw * plane + phase_r * l.wq;
        phase_row += 1;
        if phase_row == sh {
            (phase_row, phase_r) = (0, phase_r + 1);
        }
        match sw {
            1 => {
                let at = row_base + pl;
                copy_row::<S>(&mut buf[at..at + w], row);
            }
            2 => {
                // Even source columns land in phase pl % 2 at column ⌊pl/2⌋, odd ones in the
                // other phase at column ⌈pl/2⌉; the two phase planes are disjoint.
                let at_e = row_base + (pl % 2) * plane + pl / 2;
                let at_o = row_base + (1 - pl % 2) * plane + pl.div_ceil(2);
                let (ne, no) = (w.div_ceil(2), w / 2);
                let split = at_e.max(at_o);
                let (head, tail) = buf.split_at_mut(split);
                let (even, odd) = if at_e < at_o {
                    (&mut head[at_e..at_e + ne], &mut tail[..no])
                } else {
                    (&mut tail[..ne], &mut head[at_o..at_o + no])
                };
                elementwise::deinterleave2(S::ISA, row, even, odd);
            }
            _ => {
                for b in 0..sw {
                    // Columns c with (c + pl) mod sw = b, at phase column (c + pl) / sw.
                    let c0 = (b + sw - pl % sw) % sw;
                    if c0 >= w {
                        continue;
                    }
                    let at = row_base + b * plane + (c0 + pl) / sw;
                    let count = (w - c0).div_ceil(sw);
                    let (dst, src) = (&mut buf[at..at + count], &row[c0..]);
                    for (k, d) in dst.iter_mut().enumerate() {
                        *d = src[k * sw];
                    }
                }
            }
        }
    }
}

/// Zeroes the positions of `l`'s phase buffer that [`fill_phases`] does not write: the rows
/// of padding, each input row's padding columns, the spare row and the margin. Clearing the
/// whole buffer wrote every input position twice; on one image, where each call clears once,
/// that was 2% of reference layer E's spatially separable training step (a profile).
fn clear_phase_padding(g: &ConvGeometry, l: &PhaseLayout, buf: &mut [f32]) {
    let (sh, sw, plane) = (g.stride_h, g.stride_w, l.hq * l.wq);
    let (pl, w) = (g.pad_left, g.in_w);
    for a in 0..sh {
        for b in 0..sw {
            // Phase (a, b) holds padded rows a, a + sh, … and, of each input row, the
            // columns c with (c + pl) mod sw = b, from phase column (c0 + pl) / sw on.
            let c0 = (b + sw - pl % sw) % sw;
            let (start, count) = if c0 < w {
                ((c0 + pl) / sw, (w - c0).div_ceil(sw))
            } else {
                (0, 0)
            };
            let phase = &mut buf[(a * sw + b) * plane..][..plane];
            for (q, row) in phase.chunks_exact_mut(l.wq).enumerate() {
                let input_row = (q * sh + a).wrapping_sub(g.pad_top);
                if input_row < g.in_h && count > 0 {
                    row[..start].fill(0.0);
                    row[start + count..].fill(0.0);
                } else {
                    row.fill(0.0);
                }
            }
        }
    }
    buf[sh * sw * plane..l.len].fill(0.0);
}

/// Copies a short row with vector loads and stores (a `memcpy` call per 14-float row costs
/// more than the copy itself).
#[inline(always)]
fn copy_row<S: SimdF32>(dst: &mut [f32], src: &[f32]) {
    let n = dst.len().min(src.len());
    let (l, d, s) = (S::LANES, dst.as_mut_ptr(), src.as_ptr());
    let mut i = 0;
    // SAFETY: i + l <= n for full vectors; the tail moves exactly n − i elements.
    unsafe {
        while i + l <= n {
            S::load(s.add(i)).store(d.add(i));
            i += l;
        }
        if i < n {
            S::load_partial(s.add(i), n - i).store_partial(d.add(i), n - i);
        }
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
    let l = PhaseLayout::new(g);
    let items = g.batch * g.in_channels;
    let tasks = exec.threads().min(items);
    let per_task = l.len + l.out_len();
    let scratch = ws.take(per_task * tasks)?;
    let out_item = g.depth_multiplier() * g.out_pixels();
    for_each_task(tasks, y, out_item, scratch, per_task, |planes, yc, buf| {
        forward_planes(exec.isa(), g, &l, x, w, bias, planes, yc, buf)
    });
    Ok(())
}

crate::simd_dispatch!(fn forward_planes => forward_planes_kernel(
    g: &ConvGeometry, l: &PhaseLayout, x: &[f32], w: &[f32], bias: Option<&[f32]>,
    planes: Range<usize>, y: &mut [f32], buf: &mut [f32]
));

#[inline(always)]
unsafe fn forward_planes_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    planes: Range<usize>,
    y: &mut [f32],
    buf: &mut [f32],
) {
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let (mult, taps) = (g.depth_multiplier(), g.kernel_h * g.kernel_w);
    let (xbuf, obuf) = buf.split_at_mut(l.len);
    for (local, item) in planes.enumerate() {
        fill_phases::<S>(g, l, &x[item * hw..(item + 1) * hw], xbuf, local == 0);
        let m = item % g.in_channels;

        let out = &mut y[local * mult * ohw..(local + 1) * mult * ohw];
        // SAFETY: xbuf holds the filled phase planes of layout `l`; obuf has l.out_len().
        unsafe {
            channel_outputs::<S>(
                g,
                l,
                &w[m * mult * taps..(m + 1) * mult * taps],
                bias.map(|b| &b[m * mult..(m + 1) * mult]),
                xbuf,
                obuf,
                out,
            )
        };
    }
}

/// The K output planes of one input channel whose phase planes are in `xbuf`: dense
/// `out_h × out_w` planes one after another in `out`. `w` holds the channel's K kernels.
///
/// # Safety
/// `xbuf` must hold `l.len` floats filled by [`fill_phases`] for `g`, `obuf` at least
/// `l.positions + MARGIN`.
#[inline(always)]
pub(crate) unsafe fn channel_outputs<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    w: &[f32],
    bias: Option<&[f32]>,
    xbuf: &[f32],
    obuf: &mut [f32],
    out: &mut [f32],
) {
    let (ohw, taps) = (g.out_pixels(), g.kernel_h * g.kernel_w);
    for (k, plane) in out.chunks_exact_mut(ohw).enumerate() {
        let b = bias.map_or(0.0, |b| b[k]);
        // SAFETY: reads stop below positions + max offset + BLOCK·LANES <= l.len (the largest
        // offset lands inside the last phase plane, which has a spare row and the margin after
        // it); writes stop below positions + BLOCK·LANES <= out_len.
        unsafe {
            correlate::<S>(
                xbuf,
                &l.offsets,
                &w[k * taps..(k + 1) * taps],
                b,
                l.positions,
                obuf,
                false,
            )
        };
        for (oh, row) in plane.chunks_exact_mut(g.out_w).enumerate() {
            copy_row::<S>(row, &obuf[oh * l.wq..oh * l.wq + g.out_w]);
        }
    }
}

/// `out[o] (+)= bias + Σ_t w[t] · src[o + off[t]]` for `o` in `0..positions` (rounded up to
/// whole blocks; callers' buffers have the margin).
#[inline(always)]
unsafe fn correlate<S: SimdF32>(
    src: &[f32],
    offsets: &[usize],
    w: &[f32],
    bias: f32,
    positions: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    debug_assert_eq!(offsets.len(), w.len());
    if let (Ok(off), Ok(wt)) = (<&[usize; 9]>::try_from(offsets), <&[f32; 9]>::try_from(w)) {
        // A 3×3 at stride 1 and dilation 1 in phase space: rows of adjacent taps share loads.
        if let Some(bases) = row_triples::<S>(offsets) {
            return unsafe {
                correlate_row_triples::<S>(src, bases, wt, bias, positions, out, accumulate)
            };
        }

        // 3×3: a fixed tap count unrolls fully and keeps the weights in registers.
        unsafe { correlate_fixed::<S, 9>(src, off, wt, bias, positions, out, accumulate) }
    } else {
        unsafe { correlate_any::<S>(src, offsets, w, bias, positions, out, accumulate) }
    }
}

/// A correlation block's starting accumulators: what `out` holds when accumulating, else the
/// bias.
#[inline(always)]
unsafe fn block_start<S: SimdF32>(out: *const f32, bias: S, accumulate: bool) -> [S; BLOCK] {
    let mut acc = [bias; BLOCK];
    if accumulate {
        for (q, a) in acc.iter_mut().enumerate() {
            // SAFETY: the caller's `out` has BLOCK vectors from here.
            *a = unsafe { S::load(out.add(q * S::LANES)) };
        }
    }
    acc
}

/// Stores a correlation block's accumulators at `out`.
#[inline(always)]
unsafe fn block_store<S: SimdF32>(acc: &[S; BLOCK], out: *mut f32) {
    for (q, a) in acc.iter().enumerate() {
        // SAFETY: the caller's `out` has BLOCK vectors from here.
        unsafe { a.store(out.add(q * S::LANES)) };
    }
}

/// Each weight broadcast to a vector (kept in registers across a plane).
#[inline(always)]
unsafe fn splat_all<S: SimdF32, const T: usize>(w: &[f32; T]) -> [S; T] {
    let mut wv = [unsafe { S::zero() }; T];
    for (v, &x) in wv.iter_mut().zip(w) {
        *v = unsafe { S::splat(x) };
    }
    wv
}

#[inline(always)]
unsafe fn correlate_fixed<S: SimdF32, const T: usize>(
    src: &[f32],
    off: &[usize; T],
    w: &[f32; T],
    bias: f32,
    positions: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    let l = S::LANES;
    let (sp, op) = (src.as_ptr(), out.as_mut_ptr());
    let mut o = 0;
    unsafe {
        let wv = splat_all::<S, T>(w);
        let b = S::splat(bias);
        while o < positions {
            let mut acc = block_start(op.add(o), b, accumulate);
            for t in 0..T {
                let p = sp.add(o + off[t]);
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = S::mul_add(wv[t], S::load(p.add(q * l)), *a);
                }
            }
            block_store(&acc, op.add(o));
            o += BLOCK * l;
        }
    }
}

/// [`correlate`] for taps in three rows of three adjacent offsets (`bases[r] + 0, 1, 2`, weights
/// row by row): each row loads `BLOCK + 1` vectors once and forms the shifted ones in registers,
/// 3 loads per output vector instead of 9 (most of which split a cache line).
#[inline(always)]
unsafe fn correlate_row_triples<S: SimdF32>(
    src: &[f32],
    bases: [usize; 3],
    w: &[f32; 9],
    bias: f32,
    positions: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    let l = S::LANES;
    let (sp, op) = (src.as_ptr(), out.as_mut_ptr());
    let mut o = 0;
    unsafe {
        let wv = splat_all::<S, 9>(w);
        let b = S::splat(bias);
        while o < positions {
            let mut acc = block_start(op.add(o), b, accumulate);
            for (r, &base) in bases.iter().enumerate() {
                let p = sp.add(o + base);
                let mut v = [S::zero(); BLOCK + 1];
                for (q, x) in v.iter_mut().enumerate() {
                    *x = S::load(p.add(q * l));
                }
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = S::mul_add(wv[3 * r], v[q], *a);
                    *a = S::mul_add(wv[3 * r + 1], S::shift_lanes::<1>(v[q], v[q + 1]), *a);
                    *a = S::mul_add(wv[3 * r + 2], S::shift_lanes::<2>(v[q], v[q + 1]), *a);
                }
            }
            block_store(&acc, op.add(o));
            o += BLOCK * l;
        }
    }
}

#[inline(always)]
unsafe fn correlate_any<S: SimdF32>(
    src: &[f32],
    offsets: &[usize],
    w: &[f32],
    bias: f32,
    positions: usize,
    out: &mut [f32],
    accumulate: bool,
) {
    let l = S::LANES;
    let (sp, op) = (src.as_ptr(), out.as_mut_ptr());
    let mut o = 0;
    unsafe {
        let b = S::splat(bias);
        while o < positions {
            let mut acc = block_start(op.add(o), b, accumulate);
            for (&off, &wt) in offsets.iter().zip(w) {
                let wv = S::splat(wt);
                let p = sp.add(o + off);
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = S::mul_add(wv, S::load(p.add(q * l)), *a);
                }
            }
            block_store(&acc, op.add(o));
            o += BLOCK * l;
        }
    }
}

/// Grad-weight: every tap's dot product of the flat output gradient (zeros in the wasted
/// columns) with the shifted phase buffer, accumulated over the batch. Work is split over
/// output channels, so a layer with few input channels and a large depth multiplier (a first
/// conv over a grayscale image is depthwise with multiplier = out-channels) still uses every
/// thread; each input plane is filled once per image for all its output channels in a task.
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let l = PhaseLayout::new(g);
    let items = g.out_channels;
    let tasks = exec.threads().min(items);
    let per_task = l.len + l.out_len();
    let scratch = ws.take(per_task * tasks)?;
    let out_item = g.kernel_h * g.kernel_w;
    for_each_task(
        tasks,
        gw,
        out_item,
        scratch,
        per_task,
        |channels, gwc, buf| grad_weight_channels(exec.isa(), g, &l, x, gy, channels, gwc, buf),
    );
    Ok(())
}

crate::simd_dispatch!(fn grad_weight_channels => grad_weight_channels_kernel(
    g: &ConvGeometry, l: &PhaseLayout, x: &[f32], gy: &[f32],
    channels: Range<usize>, gw: &mut [f32], buf: &mut [f32]
));

/// Taps accumulated at once (vector registers); larger kernels take several passes.
const TAP_BLOCK: usize = 9;

/// `Σ_o gy[o] · x[o + off[t]]` for each of the T taps, over `0..positions` (whole vectors).
#[inline(always)]
unsafe fn dot_taps<S: SimdF32, const T: usize>(
    x: &[f32],
    gy: &[f32],
    off: &[usize; T],
    positions: usize,
) -> [f32; T] {
    let (xp, gp, l) = (x.as_ptr(), gy.as_ptr(), S::LANES);
    unsafe {
        let mut acc = [S::zero(); T];
        let mut o = 0;
        while o < positions {
            let gv = S::load(gp.add(o));
            for t in 0..T {
                acc[t] = S::mul_add(gv, S::load(xp.add(o + off[t])), acc[t]);
            }
            o += l;
        }
        let mut out = [0f32; T];
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = a.reduce_sum();
        }
        out
    }
}

/// [`dot_taps`] for a 3×3 whose taps form three rows of adjacent offsets (`bases[r] + 0, 1, 2`):
/// each row loads one new vector per step and forms the shifted ones in registers, as
/// [`correlate_row_triples`] does.
#[inline(always)]
unsafe fn dot_taps_row_triples<S: SimdF32>(
    x: &[f32],
    gy: &[f32],
    bases: [usize; 3],
    positions: usize,
) -> [f32; 9] {
    let (xp, gp, l) = (x.as_ptr(), gy.as_ptr(), S::LANES);
    unsafe {
        let mut acc = [S::zero(); 9];
        let mut cur = [S::zero(); 3];
        for (c, &base) in cur.iter_mut().zip(&bases) {
            *c = S::load(xp.add(base));
        }
        let mut o = 0;
        while o < positions {
            let gv = S::load(gp.add(o));
            for (r, &base) in bases.iter().enumerate() {
                let next = S::load(xp.add(o + base + l));
                acc[3 * r] = S::mul_add(gv, cur[r], acc[3 * r]);
                acc[3 * r + 1] = S::mul_add(gv, S::shift_lanes::<1>(cur[r], next), acc[3 * r + 1]);
                acc[3 * r + 2] = S::mul_add(gv, S::shift_lanes::<2>(cur[r], next), acc[3 * r + 2]);
                cur[r] = next;
            }
            o += l;
        }
        let mut out = [0f32; 9];
        for (o, a) in out.iter_mut().zip(&acc) {
            *o = a.reduce_sum();
        }
        out
    }
}

/// The row bases of a 3×3 tap set whose offsets are three rows of three adjacent positions
/// (`[b0, b0+1, b0+2, b1, …]`), where the row-triple kernels apply: on 16-lane vectors only,
/// whose in-register shift (AVX-512 `valignd`) is cheaper than the split loads it replaces.
#[inline(always)]
fn row_triples<S: SimdF32>(offsets: &[usize]) -> Option<[usize; 3]> {
    let off = <&[usize; 9]>::try_from(offsets).ok()?;
    let adjacent =
        (0..3).all(|r| off[3 * r + 1] == off[3 * r] + 1 && off[3 * r + 2] == off[3 * r] + 2);
    (S::LANES == 16 && adjacent).then_some([off[0], off[3], off[6]])
}

#[inline(always)]
unsafe fn grad_weight_channels_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    x: &[f32],
    gy: &[f32],
    channels: Range<usize>,
    gw: &mut [f32],
    buf: &mut [f32],
) {
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let (mult, taps) = (g.depth_multiplier(), g.kernel_h * g.kernel_w);
    let (xbuf, gbuf) = buf.split_at_mut(l.len);
    // The flat gradient: `positions` entries (zeros past out_w in each row, never written) and
    // a zero margin so whole vectors can be read.
    gbuf[..l.out_len()].fill(0.0);
    // Per-image sums are f32 vector lanes; across images they accumulate in f64.
    let mut acc64 = vec![0f64; channels.len() * taps];
    let mut first = true;
    for n in 0..g.batch {
        let mut filled = usize::MAX;
        for (local, co) in channels.clone().enumerate() {
            let m = co / mult;
            if m != filled {
                let plane = n * g.in_channels + m;
                fill_phases::<S>(g, l, &x[plane * hw..(plane + 1) * hw], xbuf, first);
                (first, filled) = (false, m);
            }
            let op = n * g.out_channels + co;
            for (oh, row) in gy[op * ohw..(op + 1) * ohw]
                .chunks_exact(g.out_w)
                .enumerate()
            {
                copy_row::<S>(&mut gbuf[oh * l.wq..oh * l.wq + g.out_w], row);
            }
            for t0 in (0..taps).step_by(TAP_BLOCK) {
                let tn = TAP_BLOCK.min(taps - t0);
                let offsets = &l.offsets[t0..t0 + tn];
                // SAFETY: reads stay below positions + max offset + LANES <= l.len in xbuf and
                // below out_len in gbuf.
                let sums = unsafe {
                    if let Some(bases) = row_triples::<S>(offsets) {
                        dot_taps_row_triples::<S>(xbuf, gbuf, bases, l.positions)
                    } else if let Ok(off) = <&[usize; TAP_BLOCK]>::try_from(offsets) {
                        // Full block (all of a 3×3 kernel): fixed count, unrolled.
                        dot_taps::<S, TAP_BLOCK>(xbuf, gbuf, off, l.positions)
                    } else {
                        let mut off = [0usize; TAP_BLOCK];
                        off[..tn].copy_from_slice(offsets);
                        // Unused taps read offset 0 and are discarded below.
                        dot_taps::<S, TAP_BLOCK>(xbuf, gbuf, &off, l.positions)
                    }
                };
                for (a, &v) in acc64[local * taps + t0..local * taps + t0 + tn]
                    .iter_mut()
                    .zip(&sums)
                {
                    *a += v as f64;
                }
            }
        }
    }
    for (o, a) in gw.iter_mut().zip(&acc64) {
        *o = *a as f32;
    }
}

/// The grad-input layout: the zero-padded output gradient and, per input phase, its taps.
/// Shared with the implicit-GEMM grad-input of strided standard convolutions.
#[derive(Clone, Debug)]
pub(crate) struct GradInputLayout {
    /// Rows and columns of zeros before the output gradient in its padded plane.
    qh: usize,
    qw: usize,
    /// Row stride of the padded output gradient (and of each phase's flat result).
    wg: usize,
    /// Floats of one padded output-gradient plane (with spare row and margin).
    pub(crate) gy_len: usize,
    /// Flat positions per phase: (phase plane height) × `wg`.
    pub(crate) positions: usize,
    /// Per phase (a, b): the taps (indices into the kernel) and their offsets.
    pub(crate) phases: Vec<(usize, usize, Vec<usize>, Vec<usize>)>,
}

impl GradInputLayout {
    pub(crate) fn new(g: &ConvGeometry) -> Self {
        let (sh, sw) = (g.stride_h, g.stride_w);
        let qh = (g.kernel_h - 1) * g.dilation_h / sh;
        let qw = (g.kernel_w - 1) * g.dilation_w / sw;
        let hq = (g.in_h + g.pad_top + g.pad_bottom).div_ceil(sh);
        let wq = PhaseLayout::phase_width(g);
        // As wide as the phase planes: that holds a gradient row with its `qw` zeros in front
        // (out_w + qw ≤ wq, from out_w = ⌊(Wp − span) / sw⌋ + 1 and qw = ⌊(span − 1) / sw⌋),
        // and a position's read runs at most `qw` columns past its row, into the next row's
        // leading zeros. Zero columns after each row, as many as `qw`, cost a product over
        // them: a 30th of reference layer E's 1 × 3 half at stride 2 across. With the padding
        // rows left out as well (`input_rows`), E's grad-inputs (implicit GEMM; harness, min of
        // 30, alternated 3×): the 1 × 3 half 6.45–6.52 → 6.17–6.30 ms, the 3 × 1 half
        // 6.32–6.53 → 6.14–6.53, the 3 × 3 19.1–19.9 → 18.2–18.3.
        let wg = wq;
        let hg = (hq + qh).max(g.out_h + qh);
        let mut phases = Vec::with_capacity(sh * sw);
        for a in 0..sh {
            for b in 0..sw {
                let mut pairs = Vec::with_capacity(g.kernel_h * g.kernel_w);
                for i in 0..g.kernel_h {
                    for j in 0..g.kernel_w {
                        let (di, dj) = (i * g.dilation_h, j * g.dilation_w);
                        if di % sh == a && dj % sw == b {
                            pairs.push((i * g.kernel_w + j, (qh - di / sh) * wg + (qw - dj / sw)));
                        }
                    }
                }
                // Ascending offsets: a flipped 3×3 at stride 1 then forms the rows of adjacent
                // taps that `correlate` reads with shared loads.
                pairs.sort_by_key(|&(_, off)| off);
                let (taps, offsets) = pairs.into_iter().unzip();
                phases.push((a, b, taps, offsets));
            }
        }
        GradInputLayout {
            qh,
            qw,
            wg,
            gy_len: (hg + 1) * wg + MARGIN,
            positions: hq * wg,
            phases,
        }
    }

    /// Floats of one phase's flat result (positions and margin).
    pub(crate) fn out_len(&self) -> usize {
        self.positions + MARGIN
    }

    /// The flat positions of phase row `a` that hold input pixels: whole rows, from the first
    /// whose input row is not in the top padding to the last that is not in the bottom one
    /// (the rest of the `positions` are padding, which nothing reads).
    pub(crate) fn input_rows(&self, g: &ConvGeometry, a: usize) -> Range<usize> {
        let sh = g.stride_h;
        let first = g.pad_top.saturating_sub(a).div_ceil(sh);
        let end = (g.in_h + g.pad_top).saturating_sub(a).div_ceil(sh);
        first * self.wg..end.max(first) * self.wg
    }

    /// Copies output-gradient plane `gy` (`out_h × out_w`) into the interior of its padded
    /// plane `buf`; the zero border is never written, so it is cleared once per buffer.
    #[inline(always)]
    pub(crate) fn fill_gradient<S: SimdF32>(&self, g: &ConvGeometry, gy: &[f32], buf: &mut [f32]) {
        for (oh, row) in gy.chunks_exact(g.out_w).enumerate() {
            let at = (oh + self.qh) * self.wg + self.qw;
            copy_row::<S>(&mut buf[at..at + g.out_w], row);
        }
    }
}

/// Grad-input: per input channel, each phase of the input gradient is a correlation of the
/// padded output gradients (all K of the channel) with that phase's taps.
pub fn grad_input(
    exec: Exec,
    g: &ConvGeometry,
    gy: &[f32],
    w: &[f32],
    gx: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let l = GradInputLayout::new(g);
    let items = g.batch * g.in_channels;
    let tasks = exec.threads().min(items);
    let per_task =
        l.gy_len * g.depth_multiplier() + l.out_len() * l.phases.len() + g.kernel_h * g.kernel_w;
    let scratch = ws.take(per_task * tasks)?;
    for_each_task(
        tasks,
        gx,
        g.in_pixels(),
        scratch,
        per_task,
        |planes, gxc, buf| grad_input_planes(exec.isa(), g, &l, gy, w, planes, gxc, buf),
    );
    Ok(())
}

crate::simd_dispatch!(fn grad_input_planes => grad_input_planes_kernel(
    g: &ConvGeometry, l: &GradInputLayout, gy: &[f32], w: &[f32],
    planes: Range<usize>, gx: &mut [f32], buf: &mut [f32]
));

#[inline(always)]
unsafe fn grad_input_planes_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &GradInputLayout,
    gy: &[f32],
    w: &[f32],
    planes: Range<usize>,
    gx: &mut [f32],
    buf: &mut [f32],
) {
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let (mult, taps) = (g.depth_multiplier(), g.kernel_h * g.kernel_w);
    let (gbufs, rest) = buf.split_at_mut(l.gy_len * mult);
    let (obufs, wsel) = rest.split_at_mut(l.out_len() * l.phases.len());
    // Only the output-gradient interior is rewritten per plane; the zero border stays.
    gbufs.fill(0.0);
    for (local, item) in planes.enumerate() {
        let (n, m) = (item / g.in_channels, item % g.in_channels);
        for (k, gb) in gbufs.chunks_exact_mut(l.gy_len).enumerate() {
            let plane = n * g.out_channels + m * mult + k;
            l.fill_gradient::<S>(g, &gy[plane * ohw..(plane + 1) * ohw], gb);
        }
        for ((_, _, tap_ids, offsets), obuf) in
            l.phases.iter().zip(obufs.chunks_exact_mut(l.out_len()))
        {
            if tap_ids.is_empty() {
                // No tap reaches this phase: those input pixels get no gradient.
                obuf[..l.positions].fill(0.0);
                continue;
            }
            for k in 0..mult {
                let co = m * mult + k;
                let wsel = &mut wsel[..tap_ids.len()];
                for (d, &t) in wsel.iter_mut().zip(tap_ids) {
                    *d = w[co * taps + t];
                }
                let gb = &gbufs[k * l.gy_len..(k + 1) * l.gy_len];
                // SAFETY: positions + max offset + BLOCK·LANES <= (hq + qh + 1)·wg + MARGIN
                // <= gy_len; writes stay below out_len.
                unsafe { correlate::<S>(gb, offsets, wsel, 0.0, l.positions, obuf, k > 0) };
            }
        }
        gather_phases::<S>(
            g,
            l,
            obufs,
            l.out_len(),
            &mut gx[local * hw..(local + 1) * hw],
        );
    }
}

/// Assembles the input-gradient plane from its phases (each flat with row stride `wg`, phase
/// (a, b) at `(a·sw + b)·phase_stride` in `phases`): input pixel (ih, iw) is pixel
/// ((ih + pt) / sh, (iw + pl) / sw) of phase ((ih + pt) mod sh, (iw + pl) mod sw).
#[inline(always)]
pub(crate) fn gather_phases<S: SimdF32>(
    g: &ConvGeometry,
    l: &GradInputLayout,
    phases: &[f32],
    phase_stride: usize,
    gxp: &mut [f32],
) {
    let (sh, sw, pl) = (g.stride_h, g.stride_w, g.pad_left);
    // Input row ih is row r of phase row a, (a, r) = divmod(ih + pad_top, sh), incrementally.
    let (mut a, mut r) = (g.pad_top % sh, g.pad_top / sh);
    for row in gxp.chunks_exact_mut(g.in_w) {
        let phase = |b: usize| {
            let start = (a * sw + b) * phase_stride;
            &phases[start + r * l.wg..start + l.positions]
        };

        match sw {
            1 => copy_row::<S>(row, &phase(0)[pl..pl + g.in_w]),
            2 => {
                // Even input columns come from phase pl % 2, odd ones from the other.
                let (be, bo) = (pl % 2, 1 - pl % 2);
                let even = &phase(be)[pl / 2..];
                let odd = &phase(bo)[pl.div_ceil(2)..];
                elementwise::interleave2(S::ISA, even, odd, row);
            }
            _ => {
                for (iw, d) in row.iter_mut().enumerate() {
                    let pc = iw + pl;
                    *d = phase(pc % sw)[pc / sw];
                }
            }
        }
        a += 1;
        if a == sh {
            (a, r) = (0, r + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Conv2dParams, Padding};
    use crate::kernels::simd::Portable;

    /// Clearing only the padding, then filling, leaves the same buffer as filling a zeroed
    /// one, whatever the buffer held before (NaN here): strides 1–3, asymmetric and large
    /// padding, kernels wider than the image, rows and columns that read only padding.
    #[test]
    fn clearing_the_padding_then_filling_equals_filling_zeros() {
        for (h, w, kernel, stride, dilation, (top, bottom, left, right)) in [
            (7, 9, (3, 3), (1, 1), (1, 1), (1, 1, 1, 1)),
            (8, 11, (3, 3), (2, 2), (1, 1), (1, 0, 1, 0)),
            (10, 6, (5, 3), (3, 2), (1, 2), (2, 3, 0, 4)),
            (4, 5, (3, 1), (2, 1), (1, 1), (5, 4, 0, 0)),
            (3, 13, (1, 5), (1, 3), (1, 1), (0, 0, 7, 2)),
            (1, 1, (3, 3), (2, 3), (2, 1), (2, 2, 3, 3)),
        ] {
            let params = Conv2dParams::with_padding(Padding::Explicit {
                top,
                bottom,
                left,
                right,
            })
            .stride(stride.0, stride.1)
            .dilation(dilation.0, dilation.1);
            let g = ConvGeometry::new([1, 1, h, w], [1, 1, kernel.0, kernel.1], &params).unwrap();
            let l = PhaseLayout::new(&g);
            let x: Vec<f32> = (0..h * w).map(|i| i as f32 + 1.0).collect();
            let mut want = vec![0.0f32; l.len];
            fill_phases::<Portable>(&g, &l, &x, &mut want, false);
            let mut got = vec![f32::NAN; l.len];
            fill_phases::<Portable>(&g, &l, &x, &mut got, true);
            let same = got
                .iter()
                .zip(&want)
                .all(|(a, b)| a.to_bits() == b.to_bits());
            assert!(
                same,
                "{h} × {w}, stride {stride:?}, padding {top} {bottom} {left} {right}"
            );
            // Every input pixel landed somewhere: the fill is not vacuous.
            assert_eq!(want.iter().filter(|&&v| v != 0.0).count(), h * w);
        }
    }
}
