//! Depthwise forward and grad-weight on channel blocks: `LANES` channels at a time in a
//! pixel-major layout (NCHW16c inside the kernel, NCHW at the API), one vector per pixel.
//!
//! The plane-at-a-time kernel ([`super::depthwise`]) pays per plane for filling its padded
//! phase buffer, for up to `BLOCK·LANES − 1` positions past the plane's end, for copying the
//! rows out and for loads that split cache lines; on a 14 × 14 plane (reference layer D) that
//! overhead is most of the time. Here a block of `LANES` planes is transposed once into a
//! zero-padded pixel-major buffer (16 × 16 register transposes), every tap of every output
//! pixel is one aligned vector load and one FMA with the block's weight vector for that tap
//! (a 3 × 3 at stride 1 shares each row's loads across four output pixels), and the output
//! block is transposed back. Forward kernels up to 49 taps (7 × 7), grad-weight up to 25 (5 × 5),
//! any stride and dilation; depth multiplier 1; channels a multiple of 16 (so a block never
//! straddles images for any instruction set).
//!
//! Grad-input of a stride-1 depthwise layer is a depthwise forward of the output gradient with
//! the flipped kernel (see `kernels::conv2d_grad_input`), so it runs here too; grad-weight has
//! its own blocked kernel ([`grad_weight`]), and [`backward`] computes both in one pass over
//! the output gradient. Grad-input of strided layers gathers per residue class of the input
//! pixels ([`grad_input`]), and [`strided_backward`] computes it and grad-weight in one pass.

use std::ops::Range;

use rayon::prelude::*;

use super::simd::SimdF32;
use super::{Exec, Workspace, for_each_task};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Channels per block the gate asks for (the widest vector): every instruction set's lane
/// count divides it.
const CHANNEL_MULTIPLE: usize = 16;

/// Padded input pixels per plane up to which the blocked kernel runs: its per-task buffer
/// (pixels × 16 floats) stays at most 4 MiB. Measured faster than the plane-at-a-time kernel
/// on every reference layer (2 threads, min of 30–60 runs; forward and the grad-input that
/// runs as its adjoint): B 0.82–0.87 → 0.79–0.80 ms and 0.84–0.98 → 0.78–0.80 ms,
/// C 0.85–1.02 → 0.72–0.88 and 1.01–1.03 → 0.71–0.78, D 0.233 → 0.167 and 0.286 → 0.172,
/// E (stride 2, forward only) 0.43 → 0.37; grad-weight B 0.74–1.06 → 0.65–0.77,
/// C 0.91–1.06 → 0.62–0.71, D 0.255 → 0.151, E 0.40–0.49 → 0.46–0.47.
const MAX_PADDED_PIXELS: usize = 1 << 16;

/// Floats ahead of each source row that [`pack`] prefetches: its `LANES` planes are as many
/// streams, more than the hardware prefetcher follows. Depthwise forward (harness, min of 200,
/// alternated 3×): reference layer B 0.83–0.88 → 0.77–0.79 ms, C 0.79–0.81 → 0.70–0.75, E a
/// tie; E's grad-weight 0.46–0.47 → 0.44–0.45 (64 and 128 floats ahead measured alike).
const PACK_AHEAD: usize = 128;

/// Floats per block (`LANES` planes) up to which [`pack`] prefetches the block it packs next
/// instead: a small plane ends before `PACK_AHEAD` pays (on a 14 × 14 plane that address is
/// the next plane of the same block, already being loaded). Reference layer D (a 12.5 KiB
/// block) in a ds training step, where the depthwise layer's inputs come from memory (harness,
/// min of 20, alternated 3×): forward 0.38–0.41 → 0.30–0.36 ms, grad-weight 0.50–0.52 →
/// 0.39–0.40, grad-input 0.35–0.36 → 0.32–0.33, the one-pass backward 0.75–0.80 → 0.68–0.69;
/// 28 × 28 and 7 × 7 planes alike either way; on 56 × 56 planes (B, C, E) the next block is
/// too far ahead (E's backward 1.48–1.50 → 1.71–1.84 ms).
const PREFETCH_NEXT_BLOCK_FLOATS: usize = 4096;

/// Taps of the forward at most (a 7 × 7 kernel, ConvNeXt's): the forward keeps one weight
/// vector per tap in the block's buffer and loads it per use.
const MAX_FORWARD_TAPS: usize = 49;

/// Taps whose gradient sums stay in registers at most (a 5 × 5 kernel): grad-weight keeps one
/// accumulator per tap.
const MAX_SUM_TAPS: usize = 25;

/// Whether `g`'s forward runs on the channel-blocked kernel: depthwise with multiplier 1,
/// channels a multiple of 16, at most 49 taps, planes up to 256 × 256 padded pixels.
pub fn applies(g: &ConvGeometry) -> bool {
    g.is_depthwise()
        && g.depth_multiplier() == 1
        && g.in_channels.is_multiple_of(CHANNEL_MULTIPLE)
        && g.kernel_h * g.kernel_w <= MAX_FORWARD_TAPS
        && (g.in_h + g.pad_top + g.pad_bottom) * (g.in_w + g.pad_left + g.pad_right)
            <= MAX_PADDED_PIXELS
}

/// Whether [`grad_weight`] computes `g`'s weight gradient: where [`applies`], with at most 25
/// taps.
pub fn grad_weight_applies(g: &ConvGeometry) -> bool {
    applies(g) && g.kernel_h * g.kernel_w <= MAX_SUM_TAPS
}

/// The padded pixel-major input block: `hp × wp` pixels of `LANES` floats.
pub(crate) struct Layout {
    hp: usize,
    wp: usize,
}

impl Layout {
    /// The layout of `g`'s padded input plane.
    pub(crate) fn new(g: &ConvGeometry) -> Self {
        Layout {
            hp: g.in_h + g.pad_top + g.pad_bottom,
            wp: g.in_w + g.pad_left + g.pad_right,
        }
    }

    /// Scratch floats per task (and what [`forward_block`] needs with this layout): the input
    /// block, the output block (whole runs of `lanes` pixels) and the weight and bias vectors.
    pub(crate) fn scratch(&self, g: &ConvGeometry, lanes: usize) -> usize {
        (self.hp * self.wp + self.out_pixels(g, lanes) + g.kernel_h * g.kernel_w + 1) * lanes
    }

    /// Pixels of the output block: the plane's, rounded up to whole runs of `lanes`.
    fn out_pixels(&self, g: &ConvGeometry, lanes: usize) -> usize {
        g.out_pixels().next_multiple_of(lanes)
    }
}

/// Tap (i, j) of output pixel (oh, ow) is pixel (oh·sh + i·dh, ow·sw + j·dw) of the padded
/// block: a fixed offset (in floats) per tap from the output pixel's base. Returns the offsets
/// and their count (no allocation: this runs per block).
fn tap_offsets(g: &ConvGeometry, l: &Layout, lanes: usize) -> ([usize; MAX_FORWARD_TAPS], usize) {
    let mut off = [0; MAX_FORWARD_TAPS];
    let mut count = 0;
    for i in 0..g.kernel_h {
        for j in 0..g.kernel_w {
            off[count] = (i * g.dilation_h * l.wp + j * g.dilation_w) * lanes;
            count += 1;
        }
    }
    (off, count)
}

/// The stride of a 3 × 3, dilation-1 kernel with the same stride both ways, 1 or 2: where the
/// kernels that share row loads apply ([`compute_3x3`] at either, [`tap_sums_3x3`] at 1).
fn three_by_three_stride(g: &ConvGeometry) -> Option<usize> {
    let square = (g.kernel_h, g.kernel_w, g.dilation_h, g.dilation_w) == (3, 3, 1, 1);
    (square && g.stride_h == g.stride_w && g.stride_h <= 2).then_some(g.stride_h)
}

/// Whether `g` is a `k × k` kernel at stride 1 and dilation 1 both ways.
fn is_unit_stride(g: &ConvGeometry, k: usize) -> bool {
    (
        g.kernel_h,
        g.kernel_w,
        g.stride_h,
        g.stride_w,
        g.dilation_h,
        g.dilation_w,
    ) == (k, k, 1, 1, 1, 1)
}

/// Whether the 3 × 3, stride-1, dilation-1 kernels apply.
fn is_3x3_unit_stride(g: &ConvGeometry) -> bool {
    three_by_three_stride(g) == Some(1)
}

/// Forward pass (`g` must satisfy [`applies`]).
pub fn forward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    assert!(
        applies(g),
        "channel-blocked depthwise kernel: unsupported geometry"
    );
    let lanes = exec.isa().lanes();
    let l = Layout::new(g);
    let items = g.batch * g.in_channels / lanes;
    let tasks = exec.threads().min(items);
    let per_task = l.scratch(g, lanes);
    let scratch = ws.take(per_task * tasks)?;
    for_each_task(
        tasks,
        y,
        lanes * g.out_pixels(),
        scratch,
        per_task,
        |blocks, yc, buf| forward_blocks(exec.isa(), g, &l, x, w, bias, blocks, yc, buf),
    );
    Ok(())
}

crate::simd_dispatch!(fn forward_blocks => forward_blocks_kernel(
    g: &ConvGeometry, l: &Layout, x: &[f32], w: &[f32], bias: Option<&[f32]>,
    blocks: Range<usize>, y: &mut [f32], buf: &mut [f32]
));

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn forward_blocks_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &Layout,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    blocks: Range<usize>,
    y: &mut [f32],
    buf: &mut [f32],
) {
    let lanes = S::LANES;
    let (hw, ohw, taps) = (g.in_pixels(), g.out_pixels(), g.kernel_h * g.kernel_w);
    for (local, block) in blocks.enumerate() {
        // Channels c0 .. c0 + lanes of image n (multiplier 1: output channel = input channel).
        let first = block * lanes;
        let c0 = first % g.in_channels;
        // SAFETY: x holds planes first .. first + lanes, y the task's output blocks, buf the
        // scratch of `l`.
        unsafe {
            forward_block::<S>(
                g,
                l,
                &x[first * hw..],
                hw,
                &w[c0 * taps..(c0 + lanes) * taps],
                bias.map(|b| &b[c0..c0 + lanes]),
                &mut y[local * lanes * ohw..(local + 1) * lanes * ohw],
                buf,
                local == 0,
            )
        };
    }
}

/// `LANES` channels of `g`'s depthwise forward: input planes `plane_stride` floats apart from
/// the start of `x` (only `g`'s plane shape, kernel, stride, dilation and padding are used, so
/// a band of rows of larger planes works too), the channels' kernels `w` (`LANES × taps`) and
/// bias, into `LANES` dense output planes in `y`. `l` is `g`'s layout or a taller one with the
/// same width (bands of different heights then share one buffer: the rows below the band are
/// zeroed on every call), and `buf` holds [`Layout::scratch`] floats for it; `clear` on the
/// buffer's first use zeroes the left and right padding, which is never written after that.
///
/// # Safety
/// The CPU must support `S`; the slices must have the sizes stated.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
pub(crate) unsafe fn forward_block<S: SimdF32>(
    g: &ConvGeometry,
    l: &Layout,
    x: &[f32],
    plane_stride: usize,
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    buf: &mut [f32],
    clear: bool,
) {
    let lanes = S::LANES;
    let taps = g.kernel_h * g.kernel_w;
    assert!(w.len() >= lanes * taps && bias.is_none_or(|b| b.len() >= lanes));
    debug_assert!({
        let own = Layout::new(g);
        l.wp == own.wp && l.hp >= own.hp
    });
    let (xb, rest) = buf.split_at_mut(l.hp * l.wp * lanes);
    let (ob, rest) = rest.split_at_mut(l.out_pixels(g, lanes) * lanes);
    let (wb, bb) = rest.split_at_mut(taps * lanes);
    let row = l.wp * lanes;
    if clear {
        xb.fill(0.0);
    } else {
        xb[..g.pad_top * row].fill(0.0);
        xb[(g.pad_top + g.in_h) * row..].fill(0.0);
    }
    for (lane, b) in bb[..lanes].iter_mut().enumerate() {
        *b = bias.map_or(0.0, |b| b[lane]);
    }
    // SAFETY: x holds `lanes` planes at plane_stride; xb, ob, wb, bb have the layout's sizes.
    unsafe {
        tap_vectors::<S>(w, taps, wb);
        pack::<S>(PackShape::input(g, l, plane_stride), x, xb);
        compute_in_bands::<S>(g, l, xb, wb, bb, ob, y);
    }
}

/// Every output pixel of the padded block `xb` (layout `l`) into `LANES` NCHW planes `y`, a
/// band of output rows at a time (see [`BAND_PIXELS`]): each band is computed into `ob` and
/// transposed back into `y` at once, while it is in L1.
///
/// # Safety
/// The CPU must support `S`; `xb` holds the layout's block, `ob` a band (whole runs of
/// `LANES` pixels), `wb` and `bb` the weight and bias vectors, `y` the planes.
#[inline(always)]
unsafe fn compute_in_bands<S: SimdF32>(
    g: &ConvGeometry,
    l: &Layout,
    xb: &[f32],
    wb: &[f32],
    bb: &[f32],
    ob: &mut [f32],
    y: &mut [f32],
) {
    let shared_rows = three_by_three_stride(g);
    let (offsets, count) = tap_offsets(g, l, S::LANES);
    for (rows, pixels) in row_bands(g.out_w, g.out_h, S::LANES) {
        // SAFETY: the caller's contract; each band's pixels fit in ob.
        unsafe {
            match shared_rows {
                Some(1) => compute_3x3::<S, 1>(g, l, xb, wb, bb, rows, ob),
                Some(2) => compute_3x3::<S, 2>(g, l, xb, wb, bb, rows, ob),
                _ if is_unit_stride(g, 5) => compute_rows::<S, 5>(g, l, xb, wb, bb, rows, ob),
                _ if is_unit_stride(g, 7) => compute_rows::<S, 7>(g, l, xb, wb, bb, rows, ob),
                _ => compute::<S>(g, l, &offsets[..count], xb, wb, bb, rows, ob),
            }
            unpack::<S>(pixels, g.out_pixels(), ob, y);
        }
    }
}

/// The kernels of `LANES` channels (`w`: channel-major, `taps` each) as one vector of channels
/// per tap in `wb` (`[tap][lane]`), the blocked kernels' weight layout: the kernels are
/// `LANES` planes of `taps` pixels, transposed by [`pack`]. The scalar copy this replaces was
/// compiled to a scatter per lane; on 8 × 768 planes of 7 × 7 under a 7 × 7 kernel it took a
/// fifth of the forward's time.
///
/// # Safety
/// The CPU must support `S`.
#[inline(always)]
unsafe fn tap_vectors<S: SimdF32>(w: &[f32], taps: usize, wb: &mut [f32]) {
    // SAFETY: pack checks the sizes.
    unsafe { pack::<S>(PackShape::run(taps), w, wb) }
}

/// Where [`pack`] puts `LANES` planes of `h × w` pixels: at row `top`, column `left` of a
/// pixel-major block whose rows are `stride` pixels apart.
#[derive(Clone, Copy)]
struct PackShape {
    h: usize,
    w: usize,
    top: usize,
    left: usize,
    stride: usize,
    /// Floats between the source planes.
    plane_stride: usize,
    /// Floats from these planes to the ones the caller packs next, when not the `LANES`
    /// planes that follow (where [`pack`] prefetches small planes).
    next_block: Option<usize>,
}

impl PackShape {
    /// The input planes of `g` into the interior of the padded block.
    fn input(g: &ConvGeometry, l: &Layout, plane_stride: usize) -> Self {
        PackShape {
            h: g.in_h,
            w: g.in_w,
            top: g.pad_top,
            left: g.pad_left,
            stride: l.wp,
            plane_stride,
            next_block: None,
        }
    }

    /// The output-gradient planes of `g` into the margined block of its strided grad-input.
    fn gradient_block(g: &ConvGeometry, b: &GradientBlock) -> Self {
        PackShape {
            h: g.out_h,
            w: g.out_w,
            top: b.top,
            left: b.left,
            stride: b.cols,
            plane_stride: g.out_pixels(),
            next_block: None,
        }
    }

    /// The output planes of `g` as one unpadded run of pixels.
    fn output(g: &ConvGeometry) -> Self {
        Self::run(g.out_pixels())
    }

    /// Planes of `p` pixels, `p` floats apart, as one unpadded run of pixels.
    fn run(p: usize) -> Self {
        PackShape {
            h: 1,
            w: p,
            top: 0,
            left: 0,
            stride: p,
            plane_stride: p,
            next_block: None,
        }
    }

    /// The same, where the caller packs the planes `floats` on next.
    fn next_block_at(self, floats: usize) -> Self {
        PackShape {
            next_block: Some(floats),
            ..self
        }
    }
}

/// Transposes `LANES` planes (`h × w` pixels each, `plane_stride` apart in `planes`) into the
/// pixel-major block `dst`.
///
/// The register block is always loaded and stored with loops of the full, compile-time lane
/// count (a run-time count makes the compiler keep it in memory and copy it with memcpy).
#[inline(always)]
unsafe fn pack<S: SimdF32>(s: PackShape, planes: &[f32], dst: &mut [f32]) {
    let (lanes, w, hw) = (S::LANES, s.w, s.plane_stride);
    assert!(planes.len() >= (lanes - 1) * hw + s.h * w && lanes <= 16 && hw >= s.h * w);
    assert!(dst.len() >= ((s.top + s.h - 1) * s.stride + s.left + w) * lanes);
    let (src, dst) = (planes.as_ptr(), dst.as_mut_ptr());
    let mut rows = [unsafe { S::zero() }; 16];
    let ahead = if lanes * hw <= PREFETCH_NEXT_BLOCK_FLOATS {
        s.next_block.unwrap_or(lanes * hw)
    } else {
        PACK_AHEAD
    };
    for r in 0..s.h {
        let row_base = ((r + s.top) * s.stride + s.left) * lanes;
        for c0 in (0..w).step_by(lanes) {
            let n = lanes.min(w - c0);
            // SAFETY: pixels c0 .. c0 + n of row r of each plane, and pixels of row r + top
            // inside the block (asserted sizes).
            unsafe {
                for (lane, v) in rows[..lanes].iter_mut().enumerate() {
                    let at = src.add(lane * hw + r * w + c0);
                    // A hint: the address may lie past the planes (never dereferenced).
                    S::prefetch(at.wrapping_add(ahead));
                    *v = if n == lanes {
                        S::load(at)
                    } else {
                        S::load_partial(at, n)
                    };
                }
                S::transpose(&mut rows[..lanes]);
                for (j, v) in rows[..lanes].iter().enumerate() {
                    if j < n {
                        v.store(dst.add(row_base + (c0 + j) * lanes));
                    }
                }
            }
        }
    }
}

/// Every output pixel of the block: `bias + Σ_t w_t · x[base + off_t]`, four pixels at a time
/// (any kernel, stride and dilation).
#[inline(always)]
unsafe fn compute<S: SimdF32>(
    g: &ConvGeometry,
    l: &Layout,
    offsets: &[usize],
    xb: &[f32],
    wb: &[f32],
    bb: &[f32],
    rows: Range<usize>,
    ob: &mut [f32],
) {
    let lanes = S::LANES;
    let taps = offsets.len();
    assert!(taps <= MAX_FORWARD_TAPS && wb.len() >= taps * lanes);
    assert!(rows.end <= g.out_h && ob.len() >= rows.len() * g.out_w * lanes);
    let (xp, wp, op) = (xb.as_ptr(), wb.as_ptr(), ob.as_mut_ptr());
    let step = g.stride_w * lanes;
    // SAFETY: every base + offset is a pixel of the padded block (the geometry's output size
    // guarantees the kernel span fits), and every output pixel is inside ob.
    unsafe {
        let b = S::load(bb.as_ptr());
        for oh in rows.clone() {
            let row = xp.add(oh * g.stride_h * l.wp * lanes);
            let out = op.add((oh - rows.start) * g.out_w * lanes);
            let mut ow = 0;
            while ow + 4 <= g.out_w {
                let base = row.add(ow * step);
                let mut acc = [b; 4];
                for (t, &off) in offsets.iter().enumerate() {
                    let wv = S::load(wp.add(t * lanes));
                    for (q, a) in acc.iter_mut().enumerate() {
                        *a = S::mul_add(wv, S::load(base.add(off + q * step)), *a);
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    a.store(out.add((ow + q) * lanes));
                }
                ow += 4;
            }
            while ow < g.out_w {
                let base = row.add(ow * step);
                let mut a = b;
                for (t, &off) in offsets.iter().enumerate() {
                    a = S::mul_add(S::load(wp.add(t * lanes)), S::load(base.add(off)), a);
                }
                a.store(out.add(ow * lanes));
                ow += 1;
            }
        }
    }
}

/// [`compute`] for a 3 × 3 kernel at stride `STRIDE` (1 or 2 both ways), dilation 1: the nine
/// weight vectors stay in registers, and four adjacent output pixels share each input row's
/// loads (at stride 1 six, 18 per 36 FMAs instead of 36; at stride 2 nine, 27 instead of 36
/// and the nine weight loads). Forward at stride 2 (harness, batch 8, min of 100): reference
/// layer E 0.380–0.391 → 0.325–0.326 ms, 64 planes of 112 × 112 0.94–0.97 → 0.86.
#[inline(always)]
unsafe fn compute_3x3<S: SimdF32, const STRIDE: usize>(
    g: &ConvGeometry,
    l: &Layout,
    xb: &[f32],
    wb: &[f32],
    bb: &[f32],
    rows: Range<usize>,
    ob: &mut [f32],
) {
    const OUT: usize = 4;
    // Input pixels of one row that OUT adjacent output pixels read (at most stride 2).
    const MAX_ROW: usize = (OUT - 1) * 2 + 3;
    let row_pixels = (OUT - 1) * STRIDE + 3;
    let lanes = S::LANES;
    assert!(STRIDE <= 2 && (g.stride_h, g.stride_w) == (STRIDE, STRIDE));
    assert!(wb.len() >= 9 * lanes && xb.len() >= l.hp * l.wp * lanes);
    assert!(rows.end <= g.out_h && ob.len() >= rows.len() * g.out_w * lanes);
    assert!((g.out_h - 1) * STRIDE + 3 <= l.hp && (g.out_w - 1) * STRIDE + 3 <= l.wp);
    let (xp, op) = (xb.as_ptr(), ob.as_mut_ptr());
    // SAFETY: output pixel (oh, ow) reads padded pixels (oh·s + i, ow·s + j), i, j < 3, inside
    // the block (asserted), and writes pixel (oh, ow) of ob.
    unsafe {
        let mut wv = [S::zero(); 9];
        for (t, v) in wv.iter_mut().enumerate() {
            *v = S::load(wb.as_ptr().add(t * lanes));
        }
        let b = S::load(bb.as_ptr());
        for oh in rows.clone() {
            let out = op.add((oh - rows.start) * g.out_w * lanes);
            let mut ow = 0;
            while ow + OUT <= g.out_w {
                let mut acc = [b; OUT];
                for i in 0..3 {
                    let row = xp.add(((oh * STRIDE + i) * l.wp + ow * STRIDE) * lanes);
                    let mut v = [S::zero(); MAX_ROW];
                    for (q, x) in v[..row_pixels].iter_mut().enumerate() {
                        *x = S::load(row.add(q * lanes));
                    }
                    for (q, a) in acc.iter_mut().enumerate() {
                        for j in 0..3 {
                            *a = S::mul_add(wv[3 * i + j], v[q * STRIDE + j], *a);
                        }
                    }
                }
                for (q, a) in acc.iter().enumerate() {
                    a.store(out.add((ow + q) * lanes));
                }
                ow += OUT;
            }
            while ow < g.out_w {
                let mut a = b;
                for i in 0..3 {
                    let row = xp.add(((oh * STRIDE + i) * l.wp + ow * STRIDE) * lanes);
                    for j in 0..3 {
                        a = S::mul_add(wv[3 * i + j], S::load(row.add(j * lanes)), a);
                    }
                }
                a.store(out.add(ow * lanes));
                ow += 1;
            }
        }
    }
}

/// [`compute`] for a `K × K` kernel at stride 1, dilation 1, too large to keep its weights in
/// registers: eight adjacent output pixels share each input row's `K + 7` loads and each weight
/// vector's load, so a row of taps costs `2K + 7` loads per `8K` FMAs (17 per 40 at 5 × 5)
/// instead of [`compute`]'s `5K` per `4K`. A 5 × 5 forward (2 threads, batch 8, the two ways
/// switched in one process, min over 6 rounds): 96 planes of 56 × 56 1.58 → 0.82–0.85 ms (its
/// training step, whose grad-input is the adjoint forward, 5.27–5.38 → 3.96–4.02), 32 planes of
/// 112 × 112 1.97–2.12 → 1.27–1.31 (7.46–7.56 → 5.51–5.82). PyTorch's channels-last 5 × 5 on
/// the first: 0.64 ms.
///
/// A 7 × 7 (ConvNeXt's) ran on the plane-at-a-time kernel before; here, batch 8, "same", 2
/// threads (sweep harness, min; PyTorch's best layout in the same session): 96 planes of
/// 56 × 56 2.61 → 1.37–1.40 ms (PyTorch 1.34), 192 of 28 × 28 1.26 → 0.70–0.73 (0.69), 384 of
/// 14 × 14 0.87 → 0.42–0.45 (0.39), 768 of 7 × 7 0.74 → 0.31–0.36 (0.23). The narrow planes
/// owe half of it to the rest of a row running as one group (14 × 14 0.64 → 0.42 against
/// single pixels).
#[inline(always)]
unsafe fn compute_rows<S: SimdF32, const K: usize>(
    g: &ConvGeometry,
    l: &Layout,
    xb: &[f32],
    wb: &[f32],
    bb: &[f32],
    rows: Range<usize>,
    ob: &mut [f32],
) {
    let lanes = S::LANES;
    assert!(is_unit_stride(g, K));
    assert!(wb.len() >= K * K * lanes && xb.len() >= l.hp * l.wp * lanes);
    assert!(rows.end <= g.out_h && ob.len() >= rows.len() * g.out_w * lanes);
    assert!(g.out_h - 1 + K <= l.hp && g.out_w - 1 + K <= l.wp);
    // SAFETY: every group's pixels lie in row oh of the output (ow + OUT ≤ out_w), so its reads
    // lie in the block and its writes in ob (asserted above).
    unsafe {
        let b = S::load(bb.as_ptr());
        for oh in rows.clone() {
            let out = ob.as_mut_ptr().add((oh - rows.start) * g.out_w * lanes);
            let mut ow = 0;
            while ow + 8 <= g.out_w {
                row_group::<S, K, 8>(l, xb, wb, b, oh, ow, out);
                ow += 8;
            }
            // The rest in one group: a narrow plane's rows (7 pixels on a 7 × 7 plane) are
            // mostly rest, and one group loads each weight vector once for all of it.
            match g.out_w - ow {
                0 => {}
                1 => row_group::<S, K, 1>(l, xb, wb, b, oh, ow, out),
                2 => row_group::<S, K, 2>(l, xb, wb, b, oh, ow, out),
                3 => row_group::<S, K, 3>(l, xb, wb, b, oh, ow, out),
                4 => row_group::<S, K, 4>(l, xb, wb, b, oh, ow, out),
                5 => row_group::<S, K, 5>(l, xb, wb, b, oh, ow, out),
                6 => row_group::<S, K, 6>(l, xb, wb, b, oh, ow, out),
                _ => row_group::<S, K, 7>(l, xb, wb, b, oh, ow, out),
            }
        }
    }
}

/// `OUT` adjacent output pixels (oh, ow ..) of [`compute_rows`]' `K × K` kernel into `out`
/// (output row oh of the band): per kernel row, the `OUT + K − 1` input pixels are loaded once
/// and each weight vector once.
///
/// # Safety
/// The CPU must support `S`; the pixels must lie in the plane (see [`compute_rows`]).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn row_group<S: SimdF32, const K: usize, const OUT: usize>(
    l: &Layout,
    xb: &[f32],
    wb: &[f32],
    b: S,
    oh: usize,
    ow: usize,
    out: *mut f32,
) {
    let lanes = S::LANES;
    let (xp, wp) = (xb.as_ptr(), wb.as_ptr());
    // SAFETY: the caller's contract.
    unsafe {
        let mut acc = [b; OUT];
        for i in 0..K {
            let row = xp.add(((oh + i) * l.wp + ow) * lanes);
            // OUT + K − 1 pixels; sized for the largest group and kernel this runs (8, 7).
            let mut v = [S::zero(); 8 + 6];
            for (q, x) in v[..OUT + K - 1].iter_mut().enumerate() {
                *x = S::load(row.add(q * lanes));
            }
            for j in 0..K {
                let wv = S::load(wp.add((i * K + j) * lanes));
                for (q, a) in acc.iter_mut().enumerate() {
                    *a = S::mul_add(wv, v[q + j], *a);
                }
            }
        }
        for (q, a) in acc.iter().enumerate() {
            a.store(out.add((ow + q) * lanes));
        }
    }
}

/// Transposes the pixel-major block `ob`, pixels `pixels` of `LANES` NCHW planes of
/// `plane_pixels` pixels each (`ob` starts at pixel `pixels.start`), into those planes. Runs
/// of `LANES` pixels start at `pixels.start` (the block has room for whole runs; see [`pack`]
/// for the fixed-count loops).
#[inline(always)]
unsafe fn unpack<S: SimdF32>(
    pixels: Range<usize>,
    plane_pixels: usize,
    ob: &[f32],
    planes: &mut [f32],
) {
    let lanes = S::LANES;
    let count = pixels.len();
    assert!(ob.len() >= count.next_multiple_of(lanes) * lanes && lanes <= 16);
    assert!(pixels.end <= plane_pixels && planes.len() >= (lanes - 1) * plane_pixels + pixels.end);
    let (src, dst) = (ob.as_ptr(), planes.as_mut_ptr());
    let mut rows = [unsafe { S::zero() }; 16];
    // The block is one long row of pixels: transpose it in runs of `lanes` pixels.
    for p0 in (0..count).step_by(lanes) {
        let n = lanes.min(count - p0);
        // SAFETY: pixels p0 .. p0 + lanes of the block (rounded-up size) and pixels.start + p0
        // .. + n of each plane (asserted sizes).
        unsafe {
            for (j, v) in rows[..lanes].iter_mut().enumerate() {
                *v = S::load(src.add((p0 + j) * lanes));
            }
            S::transpose(&mut rows[..lanes]);
            for (lane, v) in rows[..lanes].iter().enumerate() {
                let at = dst.add(lane * plane_pixels + pixels.start + p0);
                if n == lanes {
                    v.store(at);
                } else {
                    v.store_partial(at, n);
                }
            }
        }
    }
}

/// Grad-weight on channel blocks (`g` must satisfy [`applies`]): per block, the input planes
/// (padded) and output-gradient planes are transposed to pixel-major once per image, and each
/// tap's gradient is `Σ_p gy[p] · x[p + off_t]` with one vector of 16 channels per pixel, so
/// the sums need no horizontal reductions. Tasks take whole channel blocks over all images:
/// no partial sums to add.
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    assert!(
        grad_weight_applies(g),
        "channel-blocked depthwise grad-weight: unsupported geometry"
    );
    let lanes = exec.isa().lanes();
    let l = Layout::new(g);
    let taps = g.kernel_h * g.kernel_w;
    let blocks = g.in_channels / lanes;
    let tasks = exec.threads().min(blocks);
    let per_task = l.scratch(g, lanes);
    let scratch = ws.take(per_task * tasks)?;
    for_each_task(
        tasks,
        gw,
        lanes * taps,
        scratch,
        per_task,
        |blocks, gwc, buf| grad_weight_blocks(exec.isa(), g, &l, x, gy, blocks, gwc, buf),
    );
    Ok(())
}

crate::simd_dispatch!(fn grad_weight_blocks => grad_weight_blocks_kernel(
    g: &ConvGeometry, l: &Layout, x: &[f32], gy: &[f32],
    blocks: Range<usize>, gw: &mut [f32], buf: &mut [f32]
));

#[inline(always)]
unsafe fn grad_weight_blocks_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &Layout,
    x: &[f32],
    gy: &[f32],
    blocks: Range<usize>,
    gw: &mut [f32],
    buf: &mut [f32],
) {
    let lanes = S::LANES;
    let (hw, ohw, taps) = (g.in_pixels(), g.out_pixels(), g.kernel_h * g.kernel_w);
    let (xb, rest) = buf.split_at_mut(l.hp * l.wp * lanes);
    let (gb, _) = rest.split_at_mut(l.out_pixels(g, lanes) * lanes);
    // The padding is never written after this.
    xb.fill(0.0);
    let (offsets, count) = tap_offsets(g, l, lanes);
    let three_by_three_unit_stride = is_3x3_unit_stride(g);
    // Per-image sums are f32 vector lanes; across images they accumulate in f64.
    let mut acc64 = vec![0f64; taps * lanes];
    for (local, cb) in blocks.enumerate() {
        acc64.fill(0.0);
        for n in 0..g.batch {
            let first = n * g.in_channels + cb * lanes;
            let mut sums = [0f32; MAX_SUM_TAPS * 16];
            // SAFETY: x and gy hold planes first .. first + lanes; xb and gb have the sizes of
            // the layout; sums has room for every tap's vector.
            unsafe {
                // The task's next block is the next image's.
                pack::<S>(
                    PackShape::input(g, l, hw).next_block_at(g.in_channels * hw),
                    &x[first * hw..(first + lanes) * hw],
                    xb,
                );
                pack::<S>(
                    PackShape::output(g).next_block_at(g.in_channels * ohw),
                    &gy[first * ohw..(first + lanes) * ohw],
                    gb,
                );
                let gpix = GradientPixels::dense(g);
                if three_by_three_unit_stride {
                    tap_sums_3x3::<S>(g, l, xb, gb, gpix, &mut sums);
                } else {
                    tap_sums::<S>(g, l, &offsets[..count], xb, gb, gpix, &mut sums);
                }
            }
            for (a, &v) in acc64.iter_mut().zip(&sums[..taps * lanes]) {
                *a += v as f64;
            }
        }
        // acc64 is [tap][lane]; the weight gradient is [channel][tap].
        let out = &mut gw[local * lanes * taps..(local + 1) * lanes * taps];
        for lane in 0..lanes {
            for t in 0..taps {
                out[lane * taps + t] = acc64[t * lanes + lane] as f32;
            }
        }
    }
}

/// Whether [`backward`] computes both gradients of `g`, whose grad-input is the depthwise
/// forward `adj` (stride 1: see `kernels::conv2d_grad_input`): both on the blocked kernel.
pub fn backward_applies(g: &ConvGeometry, adj: &ConvGeometry) -> bool {
    grad_weight_applies(g) && applies(adj) && g.stride_h == 1 && g.stride_w == 1
}

/// Grad-input and grad-weight of a stride-1 depthwise layer in one pass over the output
/// gradient (`g`, `adj` as [`backward_applies`]; `wt` holds the adjoint's flipped kernel).
/// Each block of `LANES` channels of one image is transposed once: its input planes into `g`'s
/// padded layout, its output-gradient planes into `adj`'s, where they serve both the tap sums
/// of grad-weight (read at their interior pixels) and the adjoint forward, whose output is
/// the grad-input. Separately, grad-weight and grad-input each read and transposed the output
/// gradient. Tasks take runs of (image, block) items; each sums its items' tap sums in f64
/// (per-image sums in f32 lanes, as [`grad_weight`]), and the tasks' sums are added in task
/// order at the end.
#[allow(clippy::too_many_arguments)]
pub fn backward(
    exec: Exec,
    g: &ConvGeometry,
    adj: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    wt: &[f32],
    gx: &mut [f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    assert!(
        backward_applies(g, adj),
        "channel-blocked depthwise backward: unsupported geometry"
    );
    let plan = GradInput::Adjoint {
        adj,
        l: Layout::new(adj),
        wt,
    };
    backward_with(exec, g, &plan, x, gy, gx, gw, ws)
}

/// Grad-input and grad-weight of a strided depthwise layer (`g` must satisfy
/// [`grad_input_applies`]) in one pass over the output gradient, as [`backward`] does at
/// stride 1: each block's output gradient is transposed once into [`grad_input`]'s margined
/// block, which serves both the tap sums (read at its interior pixels) and the gather per
/// residue class. Separately, grad-weight and grad-input each read and transposed it, and
/// each split the work its own way. Harness, 2 threads, min of 100–200, alternated: reference
/// layer E's two gradients (3 × 3, stride 2, batch 8) 0.873–0.909 → 0.861–0.874 ms, 8 × 256
/// × 28² 0.420–0.428 → 0.397–0.412, 8 × 64 × 112² 2.32–2.36 → 2.12–2.33, E at batch 1
/// 0.097–0.098 → 0.094; E's depthwise-separable training step 7.54–7.60 → 7.33–7.58.
#[allow(clippy::too_many_arguments)]
pub fn strided_backward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    w: &[f32],
    gx: &mut [f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    assert!(
        grad_input_applies(g),
        "channel-blocked strided depthwise backward: unsupported geometry"
    );
    let plan = GradInput::Strided {
        s: StridedGradInput::new(g),
        w,
    };
    backward_with(exec, g, &plan, x, gy, gx, gw, ws)
}

/// How [`backward_with`] turns a block's packed output gradient into its grad-input.
enum GradInput<'a> {
    /// Stride 1: the adjoint forward `adj`, whose padded input layout `l` the output gradient
    /// is packed into, with the flipped kernel `wt`.
    Adjoint {
        adj: &'a ConvGeometry,
        l: Layout,
        wt: &'a [f32],
    },
    /// Strided: the gather per residue class ([`grad_input`]) with the layer's kernel `w`.
    Strided { s: StridedGradInput, w: &'a [f32] },
}

impl GradInput<'_> {
    /// Floats of the output-gradient block, and of the pixels it produces before they go back
    /// to NCHW.
    fn blocks(&self, g: &ConvGeometry, lanes: usize) -> (usize, usize) {
        match self {
            GradInput::Adjoint { adj, l, .. } => {
                (l.hp * l.wp * lanes, l.out_pixels(adj, lanes) * lanes)
            }
            GradInput::Strided { s, .. } => (
                s.block.rows * s.block.cols * lanes,
                band_pixels(g.in_w, g.in_h, lanes) * lanes,
            ),
        }
    }

    /// Where the output-gradient block holds `g`'s output pixel (0, 0), and its row stride.
    fn pixels(&self) -> GradientPixels {
        match self {
            // g's output pixel (oh, ow) is the adjoint's padded input pixel (oh + top, ow +
            // left).
            GradInput::Adjoint { adj, l, .. } => GradientPixels {
                first: adj.pad_top * l.wp + adj.pad_left,
                row: l.wp,
            },
            GradInput::Strided { s, .. } => GradientPixels {
                first: s.block.top * s.block.cols + s.block.left,
                row: s.block.cols,
            },
        }
    }

    /// How a block's output-gradient planes (`g`'s) are packed into the gradient block.
    fn pack_shape(&self, g: &ConvGeometry) -> PackShape {
        match self {
            GradInput::Adjoint { adj, l, .. } => PackShape::input(adj, l, g.out_pixels()),
            GradInput::Strided { s, .. } => PackShape::gradient_block(g, &s.block),
        }
    }

    /// The kernel whose tap vectors the grad-input multiplies.
    fn weights(&self) -> &[f32] {
        match self {
            GradInput::Adjoint { wt, .. } => wt,
            GradInput::Strided { w, .. } => w,
        }
    }
}

/// [`backward`] and [`strided_backward`]: tasks take runs of (image, block) items; each sums
/// its items' tap sums in f64 (per-image sums in f32 lanes, as [`grad_weight`]), and the
/// tasks' sums are added in task order at the end.
#[allow(clippy::too_many_arguments)]
fn backward_with(
    exec: Exec,
    g: &ConvGeometry,
    plan: &GradInput<'_>,
    x: &[f32],
    gy: &[f32],
    gx: &mut [f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let lanes = exec.isa().lanes();
    let lx = Layout::new(g);
    let taps = g.kernel_h * g.kernel_w;
    let items = g.batch * g.in_channels / lanes;
    let tasks = exec.threads().min(items);
    // The input block, the gradient block, its grad-input pixels, tap vectors and a bias.
    let (gradient, pixels) = plan.blocks(g, lanes);
    let per_task = lx.hp * lx.wp * lanes + gradient + pixels + (taps + 1) * lanes;
    let scratch = ws.take(per_task * tasks)?;
    let per_items = items.div_ceil(tasks);
    let sums: Vec<Vec<f64>> = gx
        .par_chunks_mut(per_items * lanes * g.in_pixels())
        .zip(scratch.par_chunks_mut(per_task))
        .enumerate()
        .map(|(t, (gxc, buf))| {
            let start = t * per_items;
            let end = (start + per_items).min(items);
            let mut acc = vec![0f64; g.in_channels * taps];
            backward_items(
                exec.isa(),
                g,
                plan,
                &lx,
                x,
                gy,
                start..end,
                gxc,
                buf,
                &mut acc,
            );
            acc
        })
        .collect();
    // sums[task] is [channel][tap], like gw.
    super::sum_task_sums(&sums, gw);
    Ok(())
}

crate::simd_dispatch!(fn backward_items => backward_items_kernel(
    g: &ConvGeometry, plan: &GradInput<'_>, lx: &Layout, x: &[f32], gy: &[f32],
    items: Range<usize>, gx: &mut [f32], buf: &mut [f32], acc64: &mut [f64]
));

/// [`backward_with`] for items (image, block) `items`, whose grad-input planes are `gx`; adds
/// the items' weight gradients to `acc64` (`[channel][tap]`, all channels).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn backward_items_kernel<S: SimdF32>(
    g: &ConvGeometry,
    plan: &GradInput<'_>,
    lx: &Layout,
    x: &[f32],
    gy: &[f32],
    items: Range<usize>,
    gx: &mut [f32],
    buf: &mut [f32],
    acc64: &mut [f64],
) {
    let lanes = S::LANES;
    let (hw, ohw, taps) = (g.in_pixels(), g.out_pixels(), g.kernel_h * g.kernel_w);
    let blocks = g.in_channels / lanes;
    let (gradient, pixels) = plan.blocks(g, lanes);
    let (xb, rest) = buf.split_at_mut(lx.hp * lx.wp * lanes);
    let (gb, rest) = rest.split_at_mut(gradient);
    let (ob, rest) = rest.split_at_mut(pixels);
    let (wb, bb) = rest.split_at_mut(taps * lanes);
    // The paddings and margins are never written after this; the bias of the adjoint is zero.
    xb.fill(0.0);
    gb.fill(0.0);
    bb[..lanes].fill(0.0);
    let (offsets, count) = tap_offsets(g, lx, lanes);
    let unit_3x3 = is_3x3_unit_stride(g);
    let (gpix, gshape) = (plan.pixels(), plan.pack_shape(g));
    for (local, item) in items.enumerate() {
        let c0 = item % blocks * lanes;
        let first = item / blocks * g.in_channels + c0;
        // SAFETY: the weights hold the block's lanes · taps floats.
        unsafe { tap_vectors::<S>(&plan.weights()[c0 * taps..], taps, wb) };
        let mut sums = [0f32; MAX_SUM_TAPS * 16];
        let gy_block = &gy[first * ohw..(first + lanes) * ohw];
        // SAFETY: x, gy hold planes first .. first + lanes; gx the item's planes; the block
        // buffers have their layouts' sizes (`GradInput::blocks`); every class read of the
        // strided gather lands in its margined block.
        unsafe {
            pack::<S>(
                PackShape::input(g, lx, hw),
                &x[first * hw..(first + lanes) * hw],
                xb,
            );
            pack::<S>(gshape, gy_block, gb);
            if unit_3x3 {
                tap_sums_3x3::<S>(g, lx, xb, gb, gpix, &mut sums);
            } else {
                tap_sums::<S>(g, lx, &offsets[..count], xb, gb, gpix, &mut sums);
            }
            let gx_item = &mut gx[local * lanes * hw..(local + 1) * lanes * hw];
            match plan {
                GradInput::Adjoint { adj, l, .. } => {
                    compute_in_bands::<S>(adj, l, gb, wb, bb, ob, gx_item)
                }
                GradInput::Strided { s, .. } => gather_into_planes::<S>(g, s, gb, wb, ob, gx_item),
            }
        }
        // sums is [tap][lane].
        for lane in 0..lanes {
            for t in 0..taps {
                acc64[(c0 + lane) * taps + t] += sums[t * lanes + lane] as f64;
            }
        }
    }
}

/// Whether [`grad_input`] computes `g`'s grad-input: strided layers where [`applies`] (at
/// stride 1 grad-input is the adjoint forward, on [`forward`]).
pub fn grad_input_applies(g: &ConvGeometry) -> bool {
    grad_weight_applies(g) && (g.stride_h > 1 || g.stride_w > 1) && {
        let b = GradientBlock::new(g);
        b.rows * b.cols <= MAX_PADDED_PIXELS
    }
}

/// The zero-margined output-gradient block of [`StridedGradInput`]: margins above and left of
/// pixel (0, 0) and the block's size, wide enough that every class read lands inside.
#[derive(Clone, Copy)]
struct GradientBlock {
    top: usize,
    left: usize,
    /// Pixels per row and rows.
    cols: usize,
    rows: usize,
}

impl GradientBlock {
    fn new(g: &ConvGeometry) -> Self {
        let (sh, sw) = (g.stride_h, g.stride_w);
        // Farthest a tap reaches back, in output pixels; then the margins that keep the first
        // and last input pixels' reads inside.
        let (back_h, back_w) = (
            (g.kernel_h - 1) * g.dilation_h / sh,
            (g.kernel_w - 1) * g.dilation_w / sw,
        );
        let top = back_h.saturating_sub(g.pad_top / sh);
        let left = back_w.saturating_sub(g.pad_left / sw);
        let bottom = ((g.pad_top + g.in_h - 1) / sh + 1).saturating_sub(g.out_h);
        let right = ((g.pad_left + g.in_w - 1) / sw + 1).saturating_sub(g.out_w);
        GradientBlock {
            top,
            left,
            cols: left + g.out_w + right,
            rows: top + g.out_h + bottom,
        }
    }
}

/// The gather form of a strided depthwise grad-input on pixel-major blocks. Padded input pixel
/// (y, x) receives tap (i, j) only when `y ≡ i·dh (mod sh)` and `x ≡ j·dw (mod sw)`, from
/// output pixel `(y div sh − ki, x div sw − kj)`, `ki = (i·dh − y mod sh) / sh` (an integer
/// ≥ 0 for such taps), and likewise kj. So each residue class (y mod sh, x mod sw) has a fixed
/// list of taps at fixed offsets in the output-gradient block, which is padded by margins
/// wide enough that every such read lands inside it (zeros outside the output).
struct StridedGradInput {
    /// The padded output-gradient block.
    block: GradientBlock,
    /// Per class `ry·sw + rx`: (tap, offset back from the class base pixel, in pixels).
    classes: Vec<Vec<(usize, usize)>>,
}

impl StridedGradInput {
    fn new(g: &ConvGeometry) -> Self {
        let (sh, sw) = (g.stride_h, g.stride_w);
        let block = GradientBlock::new(g);
        let cols = block.cols;
        let mut classes = vec![Vec::new(); sh * sw];
        for (class, taps) in classes.iter_mut().enumerate() {
            let (ry, rx) = (class / sw, class % sw);
            for i in 0..g.kernel_h {
                for j in 0..g.kernel_w {
                    let (a, b) = (i * g.dilation_h, j * g.dilation_w);
                    if a % sh == ry && b % sw == rx {
                        let (ki, kj) = ((a - ry) / sh, (b - rx) / sw);
                        taps.push((i * g.kernel_w + j, ki * cols + kj));
                    }
                }
            }
        }
        StridedGradInput { block, classes }
    }
}

/// Grad-input of a strided depthwise layer (`g` must satisfy [`grad_input_applies`]): per block
/// of `LANES` channels of one image, the output gradient is transposed into a padded
/// pixel-major block, every input pixel gathers its residue class's taps (1 to 4 vector FMAs
/// for a 3 × 3 at stride 2) straight into a dense pixel-major block, and that is transposed
/// back to NCHW. The plane kernel instead computes each stride phase separately and
/// interleaves them into the planes.
pub fn grad_input(
    exec: Exec,
    g: &ConvGeometry,
    gy: &[f32],
    w: &[f32],
    gx: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    assert!(
        grad_input_applies(g),
        "channel-blocked depthwise grad-input: unsupported geometry"
    );
    let lanes = exec.isa().lanes();
    let s = StridedGradInput::new(g);
    let items = g.batch * g.in_channels / lanes;
    let tasks = exec.threads().min(items);
    let taps = g.kernel_h * g.kernel_w;
    // The padded gradient block, one band of grad-input pixels, the weights.
    let per_task =
        (s.block.rows * s.block.cols + band_pixels(g.in_w, g.in_h, lanes) + taps) * lanes;
    let scratch = ws.take(per_task * tasks)?;
    for_each_task(
        tasks,
        gx,
        lanes * g.in_pixels(),
        scratch,
        per_task,
        |items, gxc, buf| grad_input_blocks(exec.isa(), g, &s, gy, w, items, gxc, buf),
    );
    Ok(())
}

crate::simd_dispatch!(fn grad_input_blocks => grad_input_blocks_kernel(
    g: &ConvGeometry, s: &StridedGradInput, gy: &[f32], w: &[f32],
    items: Range<usize>, gx: &mut [f32], buf: &mut [f32]
));

#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn grad_input_blocks_kernel<S: SimdF32>(
    g: &ConvGeometry,
    s: &StridedGradInput,
    gy: &[f32],
    w: &[f32],
    items: Range<usize>,
    gx: &mut [f32],
    buf: &mut [f32],
) {
    let lanes = S::LANES;
    let (hw, ohw, taps) = (g.in_pixels(), g.out_pixels(), g.kernel_h * g.kernel_w);
    let (gb, rest) = buf.split_at_mut(s.block.rows * s.block.cols * lanes);
    let (ob, wb) = rest.split_at_mut(band_pixels(g.in_w, g.in_h, lanes) * lanes);
    // The margins are never written after this.
    gb.fill(0.0);
    let shape = PackShape::gradient_block(g, &s.block);
    for (local, item) in items.enumerate() {
        let first = item * lanes;
        let c0 = first % g.in_channels;
        // SAFETY: w holds the block's lanes · taps floats.
        unsafe { tap_vectors::<S>(&w[c0 * taps..], taps, wb) };
        // SAFETY: gy holds planes first .. first + lanes, gx the item's planes; the blocks
        // have the sizes computed in grad_input; every class read lands in the padded block
        // (StridedGradInput's margins).
        unsafe {
            pack::<S>(shape, &gy[first * ohw..(first + lanes) * ohw], gb);
            let gx_item = &mut gx[local * lanes * hw..(local + 1) * lanes * hw];
            gather_into_planes::<S>(g, s, gb, wb, ob, gx_item);
        }
    }
}

/// Pixels per band of the blocks that are transposed back to NCHW ([`compute_in_bands`],
/// [`grad_input`]'s gather), about: a band (8 KiB of 16-lane pixels) goes back while it is in
/// L1, where the whole plane's block (800 KiB on reference layer B, 200 KiB for E's
/// grad-input) went to L2 and came back. Grad-input at stride 2, batch 8 (harness, min of 100,
/// alternated 3×): reference layer E 0.399–0.404 → 0.375–0.378 ms, 64 planes of 112 × 112
/// 0.88–0.93 → 0.78–0.87, 512 of 14 × 14 0.155–0.163 → 0.122–0.128, 256 of 28 × 28
/// 0.203–0.206 → 0.188–0.195; bands of 64 pixels alike, of 256 about half the gain, of 512 and
/// more none. Forward (min of 60, alternated 3×): B 0.77–0.81 → 0.72–0.74 ms, C 0.69–0.72 →
/// 0.68–0.69, D and E alike; the stride-1 backward within noise.
const BAND_PIXELS: usize = 128;

/// Rows per band of a plane `width` pixels wide (see [`BAND_PIXELS`]): whole runs of `lanes`
/// pixels (so only the plane's last band ends inside a run), about [`BAND_PIXELS`] pixels, at
/// most the plane.
fn band_rows(width: usize, height: usize, lanes: usize) -> usize {
    // The fewest rows that hold whole runs: lanes / gcd(width, lanes).
    let mut gcd = (width, lanes);
    while gcd.1 != 0 {
        gcd = (gcd.1, gcd.0 % gcd.1);
    }
    let unit = lanes / gcd.0.max(1);
    let units = (BAND_PIXELS / (unit * width).max(1)).max(1);
    (unit * units).min(height).max(1)
}

/// The bands of a plane `width × height`, in order: each band's rows and its pixels (rows
/// times `width`).
fn row_bands(
    width: usize,
    height: usize,
    lanes: usize,
) -> impl Iterator<Item = (Range<usize>, Range<usize>)> {
    let band = band_rows(width, height, lanes);
    (0..height).step_by(band).map(move |r0| {
        let rows = r0..(r0 + band).min(height);
        let pixels = rows.start * width..rows.end * width;
        (rows, pixels)
    })
}

/// Pixels a band buffer holds: the tallest band's, rounded up to whole runs of `lanes`.
fn band_pixels(width: usize, height: usize, lanes: usize) -> usize {
    (band_rows(width, height, lanes) * width).next_multiple_of(lanes)
}

/// A block's strided grad-input from its packed output gradient `gb` (tap vectors `wb`) into
/// its `LANES` NCHW planes `gx`, band by band through `ob` (see [`BAND_PIXELS`]).
///
/// # Safety
/// As [`gather_classes`] and [`unpack`]: `gb` is the margined block of `s`, `ob` holds a band,
/// `gx` the block's planes.
#[inline(always)]
unsafe fn gather_into_planes<S: SimdF32>(
    g: &ConvGeometry,
    s: &StridedGradInput,
    gb: &[f32],
    wb: &[f32],
    ob: &mut [f32],
    gx: &mut [f32],
) {
    for (rows, pixels) in row_bands(g.in_w, g.in_h, S::LANES) {
        // SAFETY: the caller's.
        unsafe {
            gather_classes::<S>(g, s, gb, wb, rows, ob);
            unpack::<S>(pixels, g.in_pixels(), ob, gx);
        }
    }
}

/// Every input pixel of rows `rows`: `Σ w_t · gy[base − off_t]` over its class's taps, one
/// class of a row at a time (its pixels `sw` apart, its taps' weights in registers), into
/// `ob` from pixel (rows.start, 0) on.
#[inline(always)]
unsafe fn gather_classes<S: SimdF32>(
    g: &ConvGeometry,
    s: &StridedGradInput,
    gb: &[f32],
    wb: &[f32],
    rows: Range<usize>,
    ob: &mut [f32],
) {
    let (sh, sw) = (g.stride_h, g.stride_w);
    assert!(gb.len() >= s.block.rows * s.block.cols * S::LANES && rows.end <= g.in_h);
    assert!(ob.len() >= rows.len() * g.in_w * S::LANES);
    for ih in rows.clone() {
        let y = ih + g.pad_top;
        let row_base = (y / sh + s.block.top) * s.block.cols + s.block.left;
        for rx in 0..sw {
            // The row's first pixel of class rx, and how many there are.
            let iw0 = (rx + sw - g.pad_left % sw) % sw;
            if iw0 >= g.in_w {
                continue;
            }
            let run = ClassRun {
                base: row_base + (iw0 + g.pad_left) / sw,
                out: (ih - rows.start) * g.in_w + iw0,
                count: (g.in_w - iw0).div_ceil(sw),
                step: sw,
            };
            let taps = &s.classes[(y % sh) * sw + rx];
            // SAFETY: every read base + q − off lands in the padded block (the margins), and
            // every written pixel is in row ih of ob (asserted sizes).
            unsafe {
                match taps.len() {
                    0 => run.gather::<S, 0>(taps, gb, wb, ob),
                    1 => run.gather::<S, 1>(taps, gb, wb, ob),
                    2 => run.gather::<S, 2>(taps, gb, wb, ob),
                    3 => run.gather::<S, 3>(taps, gb, wb, ob),
                    4 => run.gather::<S, 4>(taps, gb, wb, ob),
                    _ => run.gather_any::<S>(taps, gb, wb, ob),
                }
            }
        }
    }
}

/// One row's pixels of one residue class: `count` input pixels from `out`, `step` apart,
/// whose class base pixels in the output-gradient block run from `base` one by one.
#[derive(Clone, Copy)]
struct ClassRun {
    base: usize,
    out: usize,
    count: usize,
    step: usize,
}

impl ClassRun {
    /// The run for a class of `T` taps (compile-time, so weights and offsets stay in
    /// registers).
    #[inline(always)]
    unsafe fn gather<S: SimdF32, const T: usize>(
        self,
        taps: &[(usize, usize)],
        gb: &[f32],
        wb: &[f32],
        ob: &mut [f32],
    ) {
        let lanes = S::LANES;
        let (gp, op) = (gb.as_ptr(), ob.as_mut_ptr());
        // SAFETY: the caller's contract (gather_classes).
        unsafe {
            let mut wv = [S::zero(); T];
            let mut off = [0usize; T];
            for k in 0..T {
                wv[k] = S::load(wb.as_ptr().add(taps[k].0 * lanes));
                off[k] = taps[k].1;
            }
            for q in 0..self.count {
                let base = self.base + q;
                let mut acc = S::zero();
                for k in 0..T {
                    acc = S::mul_add(wv[k], S::load(gp.add((base - off[k]) * lanes)), acc);
                }
                acc.store(op.add((self.out + q * self.step) * lanes));
            }
        }
    }

    /// [`ClassRun::gather`] for any number of taps.
    #[inline(always)]
    unsafe fn gather_any<S: SimdF32>(
        self,
        taps: &[(usize, usize)],
        gb: &[f32],
        wb: &[f32],
        ob: &mut [f32],
    ) {
        let lanes = S::LANES;
        let (gp, wp, op) = (gb.as_ptr(), wb.as_ptr(), ob.as_mut_ptr());
        // SAFETY: the caller's contract (gather_classes).
        unsafe {
            for q in 0..self.count {
                let base = self.base + q;
                let mut acc = S::zero();
                for &(t, off) in taps {
                    let v = S::load(gp.add((base - off) * lanes));
                    acc = S::mul_add(S::load(wp.add(t * lanes)), v, acc);
                }
                acc.store(op.add((self.out + q * self.step) * lanes));
            }
        }
    }
}

/// Where the output-gradient block's pixels lie: pixel (oh, ow) at `first + oh·row + ow`
/// (dense: `row = out_w`, `first = 0`; inside the padded block of the adjoint: its width and
/// the offset of its first interior pixel).
#[derive(Clone, Copy)]
struct GradientPixels {
    first: usize,
    row: usize,
}

impl GradientPixels {
    fn dense(g: &ConvGeometry) -> Self {
        GradientPixels {
            first: 0,
            row: g.out_w,
        }
    }

    /// Pixels needed to hold `g`'s output gradient this way.
    fn extent(&self, g: &ConvGeometry) -> usize {
        self.first + (g.out_h - 1) * self.row + g.out_w
    }
}

/// `sums[t] = Σ_p gy[p] · x[base(p) + off_t]` over the block's output pixels (any kernel,
/// stride and dilation), one vector of channels per tap. The accumulators live in registers
/// only when their count is known at compile time (a run-time count keeps them on the stack:
/// a load and a store around every FMA), so the sums run on instances for up to 3 taps
/// (3 × 1, 1 × 3), 9 (3 × 3 at a stride) and 25 (5 × 5). Grad-weight, batch 8 (harness, 2
/// threads, min of 40): reference layer E 0.476–0.481 → 0.340–0.343 ms, a 3 × 3 at stride 2
/// on 64 planes of 112 × 112 1.04 → 0.78 and on 512 of 14 × 14 0.130 → 0.112, a 5 × 5 on 32
/// planes of 56 × 56 0.69 → 0.53 (stride 1) and 0.213 → 0.168 (stride 2), a 5 × 3
/// 0.45 → 0.34–0.39, a 2 × 2 at stride 2 0.090 → 0.077, a 3 × 1 on 64 0.425 → 0.269. The
/// forward's [`compute`] measured slower so (E 0.39 → 0.45 ms): its four pixels' accumulators
/// are in registers already, and 9 weights and offsets more crowd them.
#[inline(always)]
unsafe fn tap_sums<S: SimdF32>(
    g: &ConvGeometry,
    l: &Layout,
    offsets: &[usize],
    xb: &[f32],
    gb: &[f32],
    gpix: GradientPixels,
    sums: &mut [f32],
) {
    // SAFETY: the caller's contract, passed on.
    unsafe {
        match offsets.len() {
            3 => tap_sums_up_to::<S, 3, true>(g, l, offsets, xb, gb, gpix, sums),
            9 => tap_sums_up_to::<S, 9, true>(g, l, offsets, xb, gb, gpix, sums),
            MAX_SUM_TAPS => {
                tap_sums_up_to::<S, MAX_SUM_TAPS, true>(g, l, offsets, xb, gb, gpix, sums)
            }
            0..3 => tap_sums_up_to::<S, 3, false>(g, l, offsets, xb, gb, gpix, sums),
            4..9 => tap_sums_up_to::<S, 9, false>(g, l, offsets, xb, gb, gpix, sums),
            _ => tap_sums_up_to::<S, MAX_SUM_TAPS, false>(g, l, offsets, xb, gb, gpix, sums),
        }
    }
}

/// [`tap_sums`] for up to `T` taps (exactly `T` when `EXACT`): the loops run over all `T` (so
/// each accumulator is a register) and skip the taps past the kernel's, a branch that the
/// exact instances leave out (with it a 5 × 5's grad-weight took 7% longer).
#[inline(always)]
unsafe fn tap_sums_up_to<S: SimdF32, const T: usize, const EXACT: bool>(
    g: &ConvGeometry,
    l: &Layout,
    offsets: &[usize],
    xb: &[f32],
    gb: &[f32],
    gpix: GradientPixels,
    sums: &mut [f32],
) {
    let lanes = S::LANES;
    let taps = offsets.len();
    assert!(taps <= T && (taps == T || !EXACT) && sums.len() >= taps * lanes);
    assert!(gb.len() >= gpix.extent(g) * lanes);
    let mut off = [0usize; T];
    off[..taps].copy_from_slice(offsets);
    let (xp, gp) = (xb.as_ptr(), gb.as_ptr());
    // SAFETY: every base + offset is a pixel of the padded block, every output pixel of gb.
    unsafe {
        let mut acc = [S::zero(); T];
        for oh in 0..g.out_h {
            let row = xp.add(oh * g.stride_h * l.wp * lanes);
            for ow in 0..g.out_w {
                let gv = S::load(gp.add((gpix.first + oh * gpix.row + ow) * lanes));
                let base = row.add(ow * g.stride_w * lanes);
                for t in 0..T {
                    if EXACT || t < taps {
                        acc[t] = S::mul_add(gv, S::load(base.add(off[t])), acc[t]);
                    }
                }
            }
        }
        for (t, a) in acc[..taps].iter().enumerate() {
            a.store(sums.as_mut_ptr().add(t * lanes));
        }
    }
}

/// [`tap_sums`] for a 3 × 3 kernel at stride 1, dilation 1: nine accumulators in registers,
/// and four adjacent output pixels share each input row's six loads.
#[inline(always)]
unsafe fn tap_sums_3x3<S: SimdF32>(
    g: &ConvGeometry,
    l: &Layout,
    xb: &[f32],
    gb: &[f32],
    gpix: GradientPixels,
    sums: &mut [f32],
) {
    const OUT: usize = 4;
    let lanes = S::LANES;
    assert!(sums.len() >= 9 * lanes && xb.len() >= l.hp * l.wp * lanes);
    assert!(gb.len() >= gpix.extent(g) * lanes && g.out_h + 2 <= l.hp && g.out_w + 2 <= l.wp);
    let (xp, gp) = (xb.as_ptr(), gb.as_ptr());
    // SAFETY: output pixel (oh, ow) reads padded pixels (oh + i, ow + j), i, j < 3, inside the
    // block, and its gradient pixel of gb (asserted sizes).
    unsafe {
        let mut acc = [S::zero(); 9];
        for oh in 0..g.out_h {
            let grow = gp.add((gpix.first + oh * gpix.row) * lanes);
            let mut ow = 0;
            while ow + OUT <= g.out_w {
                let mut gv = [S::zero(); OUT];
                for (q, v) in gv.iter_mut().enumerate() {
                    *v = S::load(grow.add((ow + q) * lanes));
                }
                for i in 0..3 {
                    let row = xp.add(((oh + i) * l.wp + ow) * lanes);
                    let mut v = [S::zero(); OUT + 2];
                    for (q, x) in v.iter_mut().enumerate() {
                        *x = S::load(row.add(q * lanes));
                    }
                    for (q, &gq) in gv.iter().enumerate() {
                        for j in 0..3 {
                            acc[3 * i + j] = S::mul_add(gq, v[q + j], acc[3 * i + j]);
                        }
                    }
                }
                ow += OUT;
            }
            while ow < g.out_w {
                let gq = S::load(grow.add(ow * lanes));
                for i in 0..3 {
                    let row = xp.add(((oh + i) * l.wp + ow) * lanes);
                    for j in 0..3 {
                        acc[3 * i + j] =
                            S::mul_add(gq, S::load(row.add(j * lanes)), acc[3 * i + j]);
                    }
                }
                ow += 1;
            }
        }
        for (t, a) in acc.iter().enumerate() {
            a.store(sums.as_mut_ptr().add(t * lanes));
        }
    }
}
