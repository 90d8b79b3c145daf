//! Standard and grouped convolution as im2col + GEMM.
//!
//! For each image and group the convolution is `Y (cout × P) = W (cout × K) · col (K × P)`, where
//! `K = cin·kh·kw` and `P` the output pixels. How the work is cut into GEMMs is decided once per
//! call by a `Plan`:
//!
//! - large images: the im2col matrix is built in tiles of output pixels sized to stay in cache
//!   (a full one is 14 MB per image on reference layer C, which would spend a third of the time
//!   streaming through memory), and the GEMM writes straight into the output;
//! - small images (fewer than [`MIN_GEMM_COLS`] output pixels, as in the later layers of a CNN):
//!   several whole images share one GEMM, so it has enough columns to run near peak; the output
//!   goes through a small tile that is scattered back to NCHW;
//! - pointwise (1×1, stride 1, no padding) on large images: no im2col at all, the input *is* the
//!   column matrix.
//!
//! Backward: grad-input is `col-grad = Wᵀ · gY` followed by col2im (scatter-add); grad-weight is
//! `gW += gY · colᵀ`. Work is split over images (each thread runs sequential GEMMs) when the
//! batch divides evenly over the threads, and otherwise inside each image: forward and
//! grad-input run im2col and col2im by input channels and the products by output rows,
//! grad-weight sums pixel ranges into per-task copies (pointwise layers:
//! [`super::pointwise_split`]). Before, one thread ran im2col while faer's threads shared each
//! product. Batch 1 on 2 threads (harness, min of 8, alternated 3×): reference layer E's
//! 3 × 3 stride 2 forward 2.94–2.97 → 2.47 ms, grad-input 3.14–3.17 → 2.57–2.62; a 3 × 1
//! 32 → 64 at 112 × 112 grad-input 1.21–1.79 → 0.93–1.02 (forward a tie); a 5 × 5 32 → 64 at
//! 56 × 56 grad-input 2.38 → 1.85, forward 2.12–2.15 → 2.18–2.25 (the products' 32-row halves
//! run a little slower than faer's split of all 64 rows). Grad-weight: see
//! `MIN_GRAD_WEIGHT_PIXELS_PER_TASK`.
//! A pointwise layer split over images computes all its gradients image by image
//! ([`pointwise_backward`]).

use std::ops::Range;

use rayon::prelude::*;

use super::gemm::{MatView, gemm};
use super::pointwise::{
    Ahead, Operands, Rows, Store, small_k_gemm, small_k_gemm_ahead, wants_row_major_c,
};
use super::pointwise_split;
use super::simd::{Isa, SimdF32};

use super::{
    Exec, ImageRuns, ImageSums, Workspace, for_each_image_task, for_each_task,
    splits_inside_images, task_count,
};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Floats of im2col tile per thread when one large image is tiled: 4 MiB keeps a tile in L3
/// while leaving the GEMM a wide panel (hundreds of pixels). Measured on layers B–E: better
/// than 512 KiB tiles by 5–10%.
const COL_TILE_FLOATS: usize = 1 << 20;

/// Floats of im2col tile per thread when several small images share a GEMM: 512 KiB, about
/// half of L2, measured best for the MNIST network's layers (14×14 and 7×7 images).
const SMALL_TILE_FLOATS: usize = 1 << 17;

/// Output pixels per image below which several images share one GEMM.
pub const MIN_GEMM_COLS: usize = 512;

/// How a convolution's work is cut into GEMMs and spread over threads.
#[derive(Clone, Copy, Debug)]
struct Plan {
    /// Parallel tasks, each over a contiguous range of images.
    tasks: usize,
    /// Several threads but one task: each image's steps are split over the threads instead
    /// (im2col and col2im by input channels, the products by rows).
    within_images: bool,
    /// Whole images per GEMM (more than 1 for small images).
    images_per_tile: usize,
    /// Output pixels per GEMM when one image is tiled.
    pixels_per_tile: usize,
    /// Pointwise on whole images: the unpacked register-blocked product (faster than the
    /// packed GEMM for a pointwise layer's short inner dimension) straight on the input and
    /// output, no scratch.
    direct: bool,
}

/// One GEMM's worth of work: `images` images from `n0`, output pixels `p0 .. p0 + len` of each.
#[derive(Clone, Copy, Debug)]
struct Tile {
    n0: usize,
    images: usize,
    p0: usize,
    len: usize,
}

impl Tile {
    fn cols(&self) -> usize {
        self.images * self.len
    }
}

impl Plan {
    fn new(g: &ConvGeometry, threads: usize) -> Self {
        let (p, k) = (g.out_pixels(), g.col_rows());
        let tasks = task_count(threads, g.batch);
        let within_images = splits_inside_images(threads, g.batch);
        let cap = (COL_TILE_FLOATS / k).max(64);
        // Pointwise needs no im2col: one GEMM per image on the input itself beats batching
        // images through copies, even for small images.
        if p >= MIN_GEMM_COLS || g.batch == 1 || within_images || g.is_pointwise() {
            let direct = g.is_pointwise();
            let pixels_per_tile = if direct { p } else { cap.min(p) };
            return Plan {
                tasks,
                within_images,
                images_per_tile: 1,
                pixels_per_tile,
                direct,
            };
        }
        let per_task = g.batch.div_ceil(tasks);
        let tiles = per_task.div_ceil((SMALL_TILE_FLOATS / k / p).max(1));
        Plan {
            tasks,
            within_images,
            images_per_tile: per_task.div_ceil(tiles),
            pixels_per_tile: p,
            direct: false,
        }
    }

    /// Scratch per task: the column tile, then (several images per tile) an output-side tile.
    fn scratch(&self, g: &ConvGeometry) -> (usize, usize) {
        if self.direct {
            return (0, 0);
        }
        let cols = self.images_per_tile * self.pixels_per_tile;
        let tmp = if self.images_per_tile > 1 {
            g.out_channels_per_group() * cols
        } else {
            0
        };
        (g.col_rows() * cols, tmp)
    }

    /// The tiles covering `images`.
    fn tiles(&self, images: Range<usize>, p: usize) -> impl Iterator<Item = Tile> + '_ {
        let (nb, pt) = (self.images_per_tile, self.pixels_per_tile);
        let end = images.end;
        images.step_by(nb).flat_map(move |n0| {
            let count = nb.min(end - n0);
            (0..p).step_by(pt).map(move |p0| Tile {
                n0,
                images: count,
                p0,
                len: pt.min(p - p0),
            })
        })
    }
}

/// The output-row segments of pixels `[p0, p0 + len)` of an `out_w`-wide image, as
/// `(at, len, oh, ow0)`: the segment's offset from `p0`, its length, its output row and first
/// column. An iterator rather than a callback: a closure's body is compiled without the
/// caller's target features, where the vector kernels below would lose their intrinsics.
#[derive(Clone, Copy)]
struct RowSegments {
    out_w: usize,
    p0: usize,
    p: usize,
    end: usize,
    oh: usize,
    ow0: usize,
}

impl RowSegments {
    /// One division for the first segment; every later one starts a row. (A division per
    /// segment was the hottest spot of im2col's own time on 7 × 7 images: 7-pixel segments.)
    #[inline]
    fn new(out_w: usize, p0: usize, len: usize) -> Self {
        RowSegments {
            out_w,
            p0,
            p: p0,
            end: p0 + len,
            oh: p0 / out_w,
            ow0: p0 % out_w,
        }
    }
}

impl Iterator for RowSegments {
    type Item = (usize, usize, usize, usize);

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.p >= self.end {
            return None;
        }
        let seg = (self.out_w - self.ow0).min(self.end - self.p);
        let item = (self.p - self.p0, seg, self.oh, self.ow0);
        self.p += seg;
        self.oh += 1;
        self.ow0 = 0;
        Some(item)
    }
}

/// One row of an im2col matrix: tap (i, j) of plane `plane`, row `row = (plane·kh + i)·kw + j`.
struct TapRow {
    plane: usize,
    i: usize,
    row: usize,
    /// The output columns whose tap lands inside the input row ([`ConvGeometry::valid_out_cols`]).
    valid: Range<usize>,
    /// The input column of output column `ow` is `ow·stride + shift` (negative in the left
    /// padding).
    shift: isize,
}

impl TapRow {
    /// Columns `lo .. hi` of the segment of `len` columns from `ow0` that read the input row.
    #[inline]
    fn valid_in(&self, ow0: usize, len: usize) -> (usize, usize) {
        let lo = self.valid.start.clamp(ow0, ow0 + len);
        (lo, self.valid.end.clamp(lo, ow0 + len))
    }
}

/// The im2col rows of `planes` input planes, in order.
fn tap_rows(g: &ConvGeometry, planes: usize) -> impl Iterator<Item = TapRow> + '_ {
    let (kh, kw) = (g.kernel_h, g.kernel_w);
    (0..planes * kh * kw).map(move |row| {
        let (plane, tap) = (row / (kh * kw), row % (kh * kw));
        let (i, j) = (tap / kw, tap % kw);
        TapRow {
            plane,
            i,
            row,
            valid: g.valid_out_cols(j),
            shift: (j * g.dilation_w) as isize - g.pad_left as isize,
        }
    })
}

/// Writes the im2col rows for output pixels `[p0, p0 + len)` of the input planes `xg` (a
/// group's, or a run of its channels: `kh·kw` rows per plane, from the first) into `col`
/// (at row stride `ld`). Unit stride across runs vectorized ([`im2col_unit_stride`]).
pub(crate) fn im2col_tile(
    isa: Isa,
    g: &ConvGeometry,
    xg: &[f32],
    p0: usize,
    len: usize,
    col: &mut [f32],
    ld: usize,
) {
    check_tile(g, xg.len(), p0, len, col.len(), ld);
    if g.stride_w == 1 {
        return im2col_unit_stride(isa, g, xg, p0, len, col, ld);
    }
    let hw = g.in_pixels();
    for t in tap_rows(g, xg.len() / hw) {
        let xc = &xg[t.plane * hw..(t.plane + 1) * hw];
        let dst = &mut col[t.row * ld..t.row * ld + len];
        for (at, seg_len, oh, ow0) in RowSegments::new(g.out_w, p0, len) {
            let seg = &mut dst[at..at + seg_len];
            let Some(ih) = g.input_row(oh, t.i) else {
                seg.fill(0.0);
                continue;
            };
            let (lo, hi) = t.valid_in(ow0, seg_len);
            seg[..lo - ow0].fill(0.0);
            seg[hi - ow0..].fill(0.0);
            if lo == hi {
                continue;
            }
            let row = &xc[ih * g.in_w..(ih + 1) * g.in_w];
            let first = (lo * g.stride_w) as isize + t.shift;
            let out = &mut seg[lo - ow0..hi - ow0];
            for (o, &v) in out
                .iter_mut()
                .zip(row[first as usize..].iter().step_by(g.stride_w))
            {
                *o = v;
            }
        }
    }
}

/// Panics unless `xg` holds whole input planes and `col` the `kh·kw` rows per plane of `len`
/// pixels from `p0` at row stride `ld`: what the tiles' unchecked vector accesses rely on.
fn check_tile(g: &ConvGeometry, x_len: usize, p0: usize, len: usize, col_len: usize, ld: usize) {
    let (taps, hw) = (g.kernel_h * g.kernel_w, g.in_pixels());
    assert!(x_len.is_multiple_of(hw), "input not whole planes");
    assert!(p0 + len <= g.out_pixels(), "tile past the output");
    let rows = x_len / hw * taps;
    assert!(
        rows == 0 || len == 0 || (rows - 1) * ld + len <= col_len,
        "column tile too short"
    );
}

crate::simd_dispatch!(fn im2col_unit_stride => im2col_unit_stride_kernel(
    g: &ConvGeometry, xg: &[f32], p0: usize, len: usize, col: &mut [f32], ld: usize
));

/// [`im2col_tile`] at unit stride across: each segment of an output row is a shifted run of
/// an input row with its padding columns zero, written a vector at a time by masked loads
/// (only the lanes over the input row read it) and stores, where a memmove and up to two
/// memset calls per segment did it before. On 7-pixel segments those calls took 14% of the
/// MNIST network's block3 forward (64 × 64 → 128 at 7 × 7, batch 64) besides im2col's own 26%;
/// Intel Xeon VM, two builds alternated, min of 20: 5.44 → 4.92 ms on 1 thread, 2.80–2.84 →
/// 2.46–2.47 on 2; its training step 15.4–15.7 → 15.2–15.4 (1 thread), 16.5 → 15.5 (2).
/// Larger images (long segments, where the calls cost little) were not measured apart.
#[inline(always)]
unsafe fn im2col_unit_stride_kernel<S: SimdF32>(
    g: &ConvGeometry,
    xg: &[f32],
    p0: usize,
    len: usize,
    col: &mut [f32],
    ld: usize,
) {
    let (hw, l) = (g.in_pixels(), S::LANES);
    // Whole output rows no wider than a vector (small images, several to a tile): every
    // segment is a whole row with the same valid columns, one masked load and store each.
    let whole_short_rows = short_rows_tile(g, l, p0, len);
    for t in tap_rows(g, xg.len() / hw) {
        let xc = xg[t.plane * hw..].as_ptr();
        let dst = col[t.row * ld..].as_mut_ptr();
        if whole_short_rows {
            // SAFETY: as below, for segments that are whole rows.
            unsafe { whole_short_rows_of_tap::<S>(g, &t, xc, p0, len, dst) };
            continue;
        }
        for (at, seg_len, oh, ow0) in RowSegments::new(g.out_w, p0, len) {
            // A padding row reads nothing: an empty range of valid columns.
            let (row, (lo, hi)) = match g.input_row(oh, t.i) {
                Some(ih) => (xc.wrapping_add(ih * g.in_w), t.valid_in(ow0, seg_len)),
                None => (xc, (ow0, ow0)),
            };
            let mut q = 0;
            while q < seg_len {
                let (a, n) = (ow0 + q, (seg_len - q).min(l));
                let vlo = lo.saturating_sub(a).min(n);
                let vhi = hi.saturating_sub(a).clamp(vlo, n);
                // SAFETY: lanes vlo .. vhi are input columns a + lane + shift inside the row
                // (valid_out_cols); the masked load touches no others. The store covers
                // columns at + q .. at + q + n of the tile's row (check_tile).
                unsafe {
                    let src = row.wrapping_offset(a as isize + t.shift);
                    S::load_lanes(src, vlo, vhi).store_partial(dst.add(at + q), n);
                }
                q += l;
            }
        }
    }
}

/// Whether pixels `[p0, p0 + len)` are whole output rows of at most `lanes` columns (small
/// images, several to a tile): the tiles that the whole-row paths below take.
#[inline]
fn short_rows_tile(g: &ConvGeometry, lanes: usize, p0: usize, len: usize) -> bool {
    g.out_w <= lanes && p0.is_multiple_of(g.out_w) && len.is_multiple_of(g.out_w)
}

/// [`im2col_unit_stride_kernel`]'s rows of tap `t` for output pixels `[p0, p0 + len)` when
/// those are whole rows of at most a vector: the valid columns' mask is built once, and each
/// row is one masked load from its input row (or zeros in the padding rows) and one store,
/// where the general loop spent ~30 cycles per 7-pixel segment on its bounds and masks. The
/// MNIST network's block3 forward (Intel Xeon VM, two builds alternated, min of 5 × 20): 5.72
/// → 4.72 ms on 1 thread, 2.91 → 2.34 on 2; its training step 8.83 → 8.24 (2 threads).
#[inline(always)]
unsafe fn whole_short_rows_of_tap<S: SimdF32>(
    g: &ConvGeometry,
    t: &TapRow,
    xc: *const f32,
    p0: usize,
    len: usize,
    dst: *mut f32,
) {
    let w = g.out_w;
    let (lo, hi) = t.valid_in(0, w);
    unsafe {
        let (load, store) = (S::lanes(lo, hi), S::lanes(0, w));
        for r in 0..len / w {
            let v = match g.input_row(p0 / w + r, t.i) {
                Some(ih) => {
                    S::load_masked(xc.wrapping_add(ih * g.in_w).wrapping_offset(t.shift), load)
                }
                None => S::zero(),
            };
            v.store_masked(dst.add(r * w), store);
        }
    }
}

/// The adjoint of [`im2col_tile`]: adds the column tile back into the planes `gxg`.
pub(crate) fn col2im_tile(
    isa: Isa,
    g: &ConvGeometry,
    col: &[f32],
    ld: usize,
    p0: usize,
    len: usize,
    gxg: &mut [f32],
) {
    check_tile(g, gxg.len(), p0, len, col.len(), ld);
    if g.stride_w == 1 {
        return col2im_unit_stride(isa, g, col, ld, p0, len, gxg);
    }
    let hw = g.in_pixels();
    for t in tap_rows(g, gxg.len() / hw) {
        let gxc = &mut gxg[t.plane * hw..(t.plane + 1) * hw];
        let src = &col[t.row * ld..t.row * ld + len];
        for (at, seg_len, oh, ow0) in RowSegments::new(g.out_w, p0, len) {
            let Some(ih) = g.input_row(oh, t.i) else {
                continue;
            };
            let (lo, hi) = t.valid_in(ow0, seg_len);
            if lo == hi {
                continue;
            }
            let row = &mut gxc[ih * g.in_w..(ih + 1) * g.in_w];
            let first = (lo * g.stride_w) as isize + t.shift;
            let seg = &src[at + lo - ow0..at + hi - ow0];
            for (o, &v) in row[first as usize..]
                .iter_mut()
                .step_by(g.stride_w)
                .zip(seg)
            {
                *o += v;
            }
        }
    }
}

crate::simd_dispatch!(fn col2im_unit_stride => col2im_unit_stride_kernel(
    g: &ConvGeometry, col: &[f32], ld: usize, p0: usize, len: usize, gxg: &mut [f32]
));

/// [`col2im_tile`] at unit stride across: each segment's columns over the input row are added
/// into it a vector at a time (masked loads and stores of those lanes only).
#[inline(always)]
unsafe fn col2im_unit_stride_kernel<S: SimdF32>(
    g: &ConvGeometry,
    col: &[f32],
    ld: usize,
    p0: usize,
    len: usize,
    gxg: &mut [f32],
) {
    let (hw, l) = (g.in_pixels(), S::LANES);
    if short_rows_tile(g, l, p0, len)
        && g.in_w <= l
        && g.stride_h == 1
        && g.kernel_w <= MAX_SHORT_ROW_TAPS
    {
        // SAFETY: the tile's whole rows, checked by check_tile as below.
        return unsafe { col2im_by_input_rows::<S>(g, col, ld, p0, len, gxg) };
    }
    for t in tap_rows(g, gxg.len() / hw) {
        let gxc = gxg[t.plane * hw..].as_mut_ptr();
        let src = col[t.row * ld..].as_ptr();
        for (at, seg_len, oh, ow0) in RowSegments::new(g.out_w, p0, len) {
            let Some(ih) = g.input_row(oh, t.i) else {
                continue;
            };
            let (lo, hi) = t.valid_in(ow0, seg_len);
            let row = gxc.wrapping_add(ih * g.in_w);
            let mut a = lo;
            while a < hi {
                let n = (hi - a).min(l);
                // SAFETY: columns a .. a + n of the segment are inside the column tile
                // (check_tile) and their input columns a + shift .. inside the row
                // (valid_out_cols).
                unsafe {
                    let from = src.add(at + a - ow0);
                    let to = row.wrapping_offset(a as isize + t.shift);
                    let sum = S::load_partial(to, n).add(S::load_partial(from, n));
                    sum.store_partial(to, n);
                }
                a += l;
            }
        }
    }
}

/// The widest kernel [`col2im_by_input_rows`] takes (its column masks live in an array).
const MAX_SHORT_ROW_TAPS: usize = 16;

/// [`col2im_unit_stride_kernel`] when pixels `[p0, p0 + len)` are whole output rows and the
/// input rows fit a vector too (small images; vertical stride 1): each input row is loaded
/// once, every tap's contribution added in the register (a masked load of the column row,
/// shifted to the input columns it lands on) and stored once. Adding tap by tap instead stores
/// into the same input row once per tap, and each next tap's masked load of it waits for that
/// store (a masked store does not forward): col2im was 13–14% of the MNIST network's block3
/// training step (64 × 64 → 128 at 7 × 7) that way.
#[inline(always)]
unsafe fn col2im_by_input_rows<S: SimdF32>(
    g: &ConvGeometry,
    col: &[f32],
    ld: usize,
    p0: usize,
    len: usize,
    gxg: &mut [f32],
) {
    let (w, hw, kh, kw) = (g.out_w, g.in_pixels(), g.kernel_h, g.kernel_w);
    let (oh0, oh1) = (p0 / w, (p0 + len) / w);
    // Per kernel column (the first kernel row's taps, as im2col's rows give them): the input
    // columns its valid output columns land on, and its shift.
    let mut taps = [(unsafe { S::lanes(0, 0) }, 0isize); MAX_SHORT_ROW_TAPS];
    for (tap, t) in taps.iter_mut().zip(tap_rows(g, 1).take(kw)) {
        let (lo, hi) = if t.valid.is_empty() {
            (0, 0)
        } else {
            let lo = (t.valid.start as isize + t.shift) as usize;
            (lo, lo + t.valid.len())
        };
        *tap = (unsafe { S::lanes(lo, hi) }, t.shift);
    }
    let row = unsafe { S::lanes(0, g.in_w) };
    // The input rows the tile's output rows reach (all of them for a whole image).
    let reach = (kh - 1) * g.dilation_h;
    let rows = oh0.saturating_sub(g.pad_top)..(oh1 + reach).saturating_sub(g.pad_top).min(g.in_h);
    let (col, gx) = (col.as_ptr(), gxg.as_mut_ptr());
    for plane in 0..gxg.len() / hw {
        for ih in rows.clone() {
            // SAFETY: input row ih of the plane, in_w ≤ LANES columns (masked).
            unsafe {
                let to = gx.add(plane * hw + ih * g.in_w);
                let mut sum = S::load_masked(to, row);
                // Kernel row i reaches ih from output row ih + pad_top - i·dilation: fewer
                // as i grows, so the first row before the tile ends the loop.
                for i in 0..kh {
                    let Some(oh) = (ih + g.pad_top).checked_sub(i * g.dilation_h) else {
                        break;
                    };
                    if oh < oh0 {
                        break;
                    }
                    if oh >= oh1 {
                        continue;
                    }
                    let src = col.add((plane * kh + i) * kw * ld + (oh - oh0) * w);
                    for (j, &(lanes, shift)) in taps.iter().enumerate().take(kw) {
                        // Lane iw reads output column iw - shift of the tap's row, which
                        // the mask keeps inside the row's valid columns (check_tile).
                        let from = src.add(j * ld).wrapping_offset(-shift);
                        sum = sum.add(S::load_masked(from, lanes));
                    }
                }
                sum.store_masked(to, row);
            }
        }
    }
}

/// Sizes of one group within an image.
pub(super) struct GroupSlices {
    /// Input channels per group.
    pub(super) cig: usize,
    /// Output channels per group.
    pub(super) cog: usize,
    /// The GEMM's inner dimension: `cig·kh·kw`.
    pub(super) k: usize,
    /// Output pixels per image.
    pub(super) p: usize,
    in_group: usize,
    out_group: usize,
    img_in: usize,
    img_out: usize,
}

impl GroupSlices {
    pub(super) fn new(g: &ConvGeometry) -> Self {
        let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
        GroupSlices {
            cig,
            cog,
            k: g.col_rows(),
            p: g.out_pixels(),
            in_group: cig * g.in_pixels(),
            out_group: cog * g.out_pixels(),
            img_in: g.in_channels * g.in_pixels(),
            img_out: g.out_channels * g.out_pixels(),
        }
    }

    /// Group `grp` of image `n` of an input-shaped buffer starting at image `base`.
    pub(super) fn input<'a>(&self, buf: &'a [f32], base: usize, n: usize, grp: usize) -> &'a [f32] {
        let at = (n - base) * self.img_in + grp * self.in_group;
        &buf[at..at + self.in_group]
    }

    /// Group `grp` of image `n` of an output-shaped buffer starting at image `base`.
    pub(super) fn output<'a>(
        &self,
        buf: &'a [f32],
        base: usize,
        n: usize,
        grp: usize,
    ) -> &'a [f32] {
        let at = (n - base) * self.img_out + grp * self.out_group;
        &buf[at..at + self.out_group]
    }

    fn weight<'a>(&self, w: &'a [f32], grp: usize) -> MatView<'a> {
        MatView::dense(self.weight_slice(w, grp), self.cog, self.k)
    }

    /// Group `grp`'s weights: `cog × k`, row-major.
    pub(super) fn weight_slice<'a>(&self, w: &'a [f32], grp: usize) -> &'a [f32] {
        &w[grp * self.cog * self.k..(grp + 1) * self.cog * self.k]
    }

    /// im2col of every image of `t` (group `grp` of `x`) into `col` (`K × t.cols()`).
    fn im2col(&self, isa: Isa, g: &ConvGeometry, x: &[f32], t: Tile, grp: usize, col: &mut [f32]) {
        for j in 0..t.images {
            im2col_tile(
                isa,
                g,
                self.input(x, 0, t.n0 + j, grp),
                t.p0,
                t.len,
                &mut col[j * t.len..],
                t.cols(),
            );
        }
    }

    /// Copies the output-gradient columns of `t` (group `grp`) into `tmp` (`cog × t.cols()`).
    fn gather_output(&self, gy: &[f32], t: Tile, grp: usize, tmp: &mut [f32]) {
        let cols = t.cols();
        for j in 0..t.images {
            let src = self.output(gy, 0, t.n0 + j, grp);
            for oc in 0..self.cog {
                tmp[oc * cols + j * t.len..oc * cols + (j + 1) * t.len]
                    .copy_from_slice(&src[oc * self.p + t.p0..oc * self.p + t.p0 + t.len]);
            }
        }
    }
}

/// Output pixels per thread from which grad-weight splits each image's pixels over the threads
/// (each task summing its ranges into its own copy of the gradient) where there are too few
/// images for them; below, the threads share each product (faer's). 3 × 3 at batch 1 on 2
/// threads (harness, min of 10, alternated 3×): 32 → 64 at 112 × 112 (6272 pixels per task)
/// 3.8–3.9 → 2.5–2.8 ms, 128 → 128 at 56 × 56 (1568) 5.2–5.4 → 4.9–5.2, 128 → 256 at stride 2
/// (392) 2.9–3.4 → 2.6–2.75, a 3 × 1 32 → 64 at 112 × 112 1.8–2.0 → 0.83–1.26; 512 → 512 at
/// 14 × 14 (98) 5.3 → 6.0–6.3, so small images keep the shared products.
const MIN_GRAD_WEIGHT_PIXELS_PER_TASK: usize = 256;

/// Calls `f(tile, group)` for every tile (one image each) and group of `g`'s batch, in order:
/// the loop of the passes whose steps are split over the threads inside each image.
fn for_each_tile_within_images(
    exec: Exec,
    g: &ConvGeometry,
    plan: &Plan,
    mut f: impl FnMut(Tile, usize),
) {
    debug_assert!(plan.within_images && plan.images_per_tile == 1 && exec.threads() > 1);
    for t in plan.tiles(0..g.batch, g.out_pixels()) {
        for grp in 0..g.groups {
            f(t, grp);
        }
    }
}

/// [`im2col_tile`] of one image's group `xg` for tile `t` into `col` (`K × t.len`), split over
/// the threads by input channels (each channel's `kh·kw` rows are contiguous).
fn im2col_by_channels(exec: Exec, g: &ConvGeometry, xg: &[f32], t: Tile, col: &mut [f32]) {
    let (taps, hw) = (g.kernel_h * g.kernel_w, g.in_pixels());
    let ins = g.in_channels_per_group().div_ceil(exec.threads());
    col.par_chunks_mut(ins * taps * t.len)
        .zip(xg.par_chunks(ins * hw))
        .for_each(|(c, x)| im2col_tile(exec.isa(), g, x, t.p0, t.len, c, t.len));
}

/// One image's tile straight into its output rows `yg` (`p` floats each; columns
/// `t.p0 .. t.p0 + t.len` written): `w_rows · col`, plus `bias` per row.
fn product_into_rows(
    yg: &mut [f32],
    p: usize,
    t: Tile,
    w_rows: MatView<'_>,
    colv: MatView<'_>,
    bias: Option<&[f32]>,
) {
    if let Some(b) = bias {
        for (row, &bv) in yg.chunks_exact_mut(p).zip(b) {
            row[t.p0..t.p0 + t.len].fill(bv);
        }
    }
    gemm(&mut yg[t.p0..], p, w_rows, colv, bias.is_some(), 1);
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
    if pointwise_split::applies(exec, g) {
        pointwise_split::forward(exec, g, x, w, bias, y);
        return Ok(());
    }
    let plan = Plan::new(g, exec.threads());
    let (col_len, tmp_len) = plan.scratch(g);
    let s = GroupSlices::new(g);
    if plan.within_images {
        let col = ws.take(col_len)?;
        for_each_tile_within_images(exec, g, &plan, |t, grp| {
            let cols = t.cols();
            let xg = s.input(x, 0, t.n0, grp);
            im2col_by_channels(exec, g, xg, t, &mut col[..s.k * cols]);
            let colv = MatView::dense(&col[..s.k * cols], s.k, cols);
            let at = t.n0 * s.img_out + grp * s.out_group;
            let outs = s.cog.div_ceil(exec.threads());
            y[at..at + s.out_group]
                .par_chunks_mut(outs * s.p)
                .zip(s.weight_slice(w, grp).par_chunks(outs * s.k))
                .enumerate()
                .for_each(|(i, (yr, wr))| {
                    let o = grp * s.cog + i * outs;
                    let bias_r = bias.map(|b| &b[o..o + yr.len() / s.p]);
                    let wv = MatView::dense(wr, yr.len() / s.p, s.k);
                    product_into_rows(yr, s.p, t, wv, colv, bias_r);
                });
        });
        return Ok(());
    }
    let scratch = ws.take((col_len + tmp_len) * plan.tasks)?;
    for_each_task(
        plan.tasks,
        y,
        s.img_out,
        scratch,
        col_len + tmp_len,
        |images, yc, scratch| {
            let base = images.start;
            let (col, tmp) = scratch.split_at_mut(col_len);
            for t in plan.tiles(images, s.p) {
                for grp in 0..g.groups {
                    let wg = s.weight(w, grp);
                    let bias_g = bias.map(|b| &b[grp * s.cog..(grp + 1) * s.cog]);
                    if plan.direct {
                        let at = (t.n0 - base) * s.img_out + grp * s.out_group;
                        let yg = &mut yc[at..at + s.out_group];
                        let xg = s.input(x, 0, t.n0, grp);
                        let ops = Operands::dense(
                            s.weight_slice(w, grp),
                            s.cog,
                            s.cig,
                            xg,
                            s.p,
                            s.p,
                            bias_g,
                        );
                        small_k_gemm(exec.isa(), ops, yg, s.p, Store::Stream);
                        continue;
                    }
                    let cols = t.cols();
                    s.im2col(exec.isa(), g, x, t, grp, col);
                    let colv = MatView::dense(&col[..s.k * cols], s.k, cols);
                    if t.images == 1 {
                        let at = (t.n0 - base) * s.img_out + grp * s.out_group;
                        product_into_rows(&mut yc[at..at + s.out_group], s.p, t, wg, colv, bias_g);
                    } else {
                        gemm(&mut tmp[..s.cog * cols], cols, wg, colv, false, 1);
                        for j in 0..t.images {
                            let at = (t.n0 + j - base) * s.img_out + grp * s.out_group;
                            for oc in 0..s.cog {
                                let dst = &mut yc[at + oc * s.p..at + (oc + 1) * s.p];
                                let src = &tmp[oc * cols + j * s.p..oc * cols + (j + 1) * s.p];
                                match bias_g {
                                    Some(b) => {
                                        dst.iter_mut().zip(src).for_each(|(d, &v)| *d = v + b[oc])
                                    }
                                    None => dst.copy_from_slice(src),
                                }
                            }
                        }
                    }
                }
            }
        },
    );
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
    if pointwise_split::applies(exec, g) {
        return pointwise_split::grad_input(exec, g, gy, w, gx, ws);
    }
    let plan = Plan::new(g, exec.threads());
    let (col_len, tmp_len) = plan.scratch(g);
    let s = GroupSlices::new(g);
    if plan.within_images {
        let col = ws.take(col_len)?;
        // Zeroed by the threads, as they will share the scatter.
        gx.par_chunks_mut(gx.len().div_ceil(exec.threads()).max(1))
            .for_each(|c| c.fill(0.0));
        let (taps, hw) = (g.kernel_h * g.kernel_w, g.in_pixels());
        let ins = s.cig.div_ceil(exec.threads());
        for_each_tile_within_images(exec, g, &plan, |t, grp| {
            let cols = t.cols();
            let gy_tile =
                MatView::row_major(&s.output(gy, 0, t.n0, grp)[t.p0..], s.cog, t.len, s.p);
            let wg = s.weight_slice(w, grp);
            let at = t.n0 * s.img_in + grp * s.in_group;
            // Each task: its input channels' rows of Wᵀ · gY, then their col2im.
            col[..s.k * cols]
                .par_chunks_mut(ins * taps * cols)
                .zip(gx[at..at + s.in_group].par_chunks_mut(ins * hw))
                .enumerate()
                .for_each(|(i, (cr, gxr))| {
                    let (k0, rows) = (i * ins * taps, cr.len() / cols);
                    let wt = MatView::row_major(&wg[k0..], s.cog, rows, s.k).t();
                    gemm(cr, cols, wt, gy_tile, false, 1);
                    col2im_tile(exec.isa(), g, cr, cols, t.p0, t.len, gxr);
                });
        });
        return Ok(());
    }
    let mut run = |tw: TransposedWeight<'_>, ws: &mut Workspace| -> Result<()> {
        let scratch = ws.take((col_len + tmp_len) * plan.tasks)?;
        for_each_task(
            plan.tasks,
            gx,
            s.img_in,
            scratch,
            col_len + tmp_len,
            |images, gxc, scratch| {
                let base = images.start;
                let (col, tmp) = scratch.split_at_mut(col_len);
                if !plan.direct {
                    gxc.fill(0.0);
                }
                for t in plan.tiles(images, s.p) {
                    for grp in 0..g.groups {
                        let wt = s.weight(w, grp).t();
                        let at = |n: usize| (n - base) * s.img_in + grp * s.in_group;
                        if plan.direct {
                            let gyg = s.output(gy, 0, t.n0, grp);
                            let gxg = &mut gxc[at(t.n0)..at(t.n0) + s.in_group];
                            let ops = transposed_weight_times(tw, &s, grp, gyg);
                            small_k_gemm(exec.isa(), ops, gxg, s.p, Store::Stream);
                            continue;
                        }

                        let cols = t.cols();
                        let gy_tile = if t.images == 1 {
                            MatView::row_major(
                                &s.output(gy, 0, t.n0, grp)[t.p0..],
                                s.cog,
                                t.len,
                                s.p,
                            )
                        } else {
                            s.gather_output(gy, t, grp, tmp);
                            MatView::dense(&tmp[..s.cog * cols], s.cog, cols)
                        };
                        gemm(&mut col[..s.k * cols], cols, wt, gy_tile, false, 1);
                        for j in 0..t.images {
                            let a = at(t.n0 + j);
                            col2im_tile(
                                exec.isa(),
                                g,
                                &col[j * t.len..],
                                cols,
                                t.p0,
                                t.len,
                                &mut gxc[a..a + s.in_group],
                            );
                        }
                    }
                }
            },
        );
        Ok(())
    };
    if plan.direct {
        with_transposed_weight(exec, g, w, ws, run)
    } else {
        run(TransposedWeight::View(w), ws)
    }
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
    if pointwise_split::grad_weight_by_rows_applies(exec, g) {
        pointwise_split::grad_weight_by_rows(exec, g, x, gy, gw);
        return Ok(());
    }
    let plan = Plan::new(g, exec.threads());
    let (col_len, tmp_len) = plan.scratch(g);
    let s = GroupSlices::new(g);
    // Adds tile `t`'s share to `gw` (every group), with `threads` inside each product.
    let add_tile = |t: Tile, gw: &mut [f32], col: &mut [f32], tmp: &mut [f32], threads: usize| {
        for grp in 0..g.groups {
            let gwg = &mut gw[grp * s.cog * s.k..(grp + 1) * s.cog * s.k];
            if plan.direct {
                // The input is the column matrix: its pixels p0 .. p0 + len in place.
                let xt = MatView::row_major(&s.input(x, 0, t.n0, grp)[t.p0..], s.cig, t.len, s.p);
                let gyv =
                    MatView::row_major(&s.output(gy, 0, t.n0, grp)[t.p0..], s.cog, t.len, s.p);
                gemm(gwg, s.k, gyv, xt.t(), true, threads);
                continue;
            }
            let cols = t.cols();
            s.im2col(exec.isa(), g, x, t, grp, col);
            let gy_tile = if t.images == 1 {
                MatView::row_major(&s.output(gy, 0, t.n0, grp)[t.p0..], s.cog, t.len, s.p)
            } else {
                s.gather_output(gy, t, grp, tmp);
                MatView::dense(&tmp[..s.cog * cols], s.cog, cols)
            };
            let colt = MatView::dense(&col[..s.k * cols], s.k, cols).t();
            gemm(gwg, s.k, gy_tile, colt, true, threads);
        }
    };
    let wlen = gw.len();
    let per_task = wlen + col_len + tmp_len;
    let tasks = exec.threads();
    if plan.within_images && s.p >= tasks * MIN_GRAD_WEIGHT_PIXELS_PER_TASK {
        // Each task sums its own pixel ranges of every image, the ranges cut evenly (in whole
        // cache lines where the tiles allow, so no line of a plane is read by two tasks).
        let pieces = tasks * s.p.div_ceil(tasks * plan.pixels_per_tile);
        let len =
            s.p.div_ceil(pieces)
                .next_multiple_of(16)
                .min(plan.pixels_per_tile);
        let scratch = ws.take(per_task * tasks)?;
        scratch
            .par_chunks_mut(per_task)
            .enumerate()
            .for_each(|(task, st)| {
                let (part, rest) = st.split_at_mut(wlen);
                let (col, tmp) = rest.split_at_mut(col_len);
                part.fill(0.0);
                for n0 in 0..g.batch {
                    for p0 in (task * len..s.p).step_by(tasks * len) {
                        let len = len.min(s.p - p0);
                        add_tile(
                            Tile {
                                n0,
                                images: 1,
                                p0,
                                len,
                            },
                            part,
                            col,
                            tmp,
                            1,
                        );
                    }
                }
            });
        sum_weight_copies(exec, scratch, per_task, gw);
        return Ok(());
    }
    if plan.tasks == 1 {
        // One thread, or small images with too few pixels to split: the threads share the
        // products.
        let scratch = ws.take(col_len + tmp_len)?;
        let (col, tmp) = scratch.split_at_mut(col_len);
        gw.fill(0.0);
        for t in plan.tiles(0..g.batch, s.p) {
            add_tile(t, gw, col, tmp, tasks);
        }
        return Ok(());
    }
    let scratch = ws.take(per_task * plan.tasks)?;
    for_each_image_task(g.batch, scratch, per_task, |images, st| {
        let (part, rest) = st.split_at_mut(wlen);
        let (col, tmp) = rest.split_at_mut(col_len);
        part.fill(0.0);
        for t in plan.tiles(images, s.p) {
            add_tile(t, part, col, tmp, 1);
        }
    });
    sum_weight_copies(exec, scratch, per_task, gw);
    Ok(())
}

/// `gw` = the sum of the tasks' private grad-weight copies, each the first `gw.len()` floats of
/// its `per_task` floats of `scratch`; in parallel over the weight, tasks in order.
fn sum_weight_copies(exec: Exec, scratch: &[f32], per_task: usize, gw: &mut [f32]) {
    let tasks = scratch.len() / per_task;
    let chunk = gw.len().div_ceil(exec.threads()).max(1);
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
}

/// Whether [`pointwise_backward`] computes `g`'s gradients: pointwise layers whose per-image
/// products run single-threaded (the images split over the threads, or one thread), the plan
/// under which [`grad_input`] runs the unpacked kernel.
pub fn pointwise_backward_applies(exec: Exec, g: &ConvGeometry) -> bool {
    g.is_pointwise() && !pointwise_split::applies(exec, g)
}

/// Every gradient of a pointwise layer where [`pointwise_backward_applies`], image by image:
/// each image's grad-bias sums, grad-weight product (into its task's private copy) and
/// grad-input product run back to back, so its output gradient comes from memory once, not
/// once per pass. `gb`, like `gw` and `gx`, is overwritten; it equals [`super::conv2d_grad_bias`]
/// bit for bit (the same per-image sums, added across images in the same order).
///
/// The pointwise half of a depthwise-separable training step (2 threads, harness, min of 20,
/// alternated 3×): reference layer B's three gradients 5.20–5.44 → 4.85–4.91 ms (its 25.7 MB
/// output gradient no longer streamed three times; the step 10.63–10.75 → 10.07–10.16), C's
/// 8.27–8.46 → 8.24–8.31; D and E tie (their output gradients stay in cache either way).
/// Cutting each image into pixel chunks that fit L2 (512–4096 pixels) gained nothing more.
#[allow(clippy::too_many_arguments)]
pub fn pointwise_backward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    w: &[f32],
    gx: Option<&mut [f32]>,
    gw: &mut [f32],
    gb: Option<&mut [f32]>,
    ws: &mut Workspace,
) -> Result<()> {
    let images = PointwiseImages::new(exec, g, x, gy, gb.is_some());
    let (tasks, per_task) = (images.runs.tasks, images.per_task());
    let img_in = g.in_channels * g.in_pixels();
    let with_grad_input = gx.is_some();
    let run = |tw: TransposedWeight<'_>, ws: &mut Workspace| -> Result<()> {
        let scratch = ws.take(per_task * tasks)?;
        match gx {
            Some(gx) => for_each_task(tasks, gx, img_in, scratch, per_task, |run, gxc, st| {
                for (n, gxn) in run.zip(gxc.chunks_exact_mut(img_in)) {
                    images.image(st, n, Some((tw, gxn)));
                }
            }),
            None => for_each_image_task(g.batch, scratch, per_task, |run, st| {
                run.for_each(|n| images.image(st, n, None))
            }),
        }
        images.finish(exec, scratch, gw, gb);
        Ok(())
    };
    if with_grad_input {
        with_transposed_weight(exec, g, w, ws, run)
    } else {
        run(TransposedWeight::View(w), ws)
    }
}

/// A pointwise layer's gradients image by image, each image's on one thread in one go
/// ([`pointwise_backward`], and the fused depthwise-separable backward, which follows each
/// image with its depthwise layer's). The batch splits into runs of images ([`Self::runs`]) as
/// [`for_each_task`] splits it; each task's scratch ([`Self::per_task`] floats) holds its
/// grad-weight copy, then its images' grad-bias sums.
pub(super) struct PointwiseImages<'a> {
    g: &'a ConvGeometry,
    s: GroupSlices,
    sums: ImageSums,
    isa: Isa,
    x: &'a [f32],
    gy: &'a [f32],
    /// The runs of images the tasks take.
    pub(super) runs: ImageRuns,
}

impl<'a> PointwiseImages<'a> {
    /// `g`'s gradients from its input `x` and output gradient `gy` (and its grad-bias with
    /// `with_bias`); `g` must satisfy [`pointwise_backward_applies`].
    pub(super) fn new(
        exec: Exec,
        g: &'a ConvGeometry,
        x: &'a [f32],
        gy: &'a [f32],
        with_bias: bool,
    ) -> Self {
        assert!(
            pointwise_backward_applies(exec, g),
            "pointwise_backward called where it does not apply"
        );
        let runs = ImageRuns::new(exec.threads(), g.batch);
        PointwiseImages {
            g,
            s: GroupSlices::new(g),
            sums: ImageSums::new(g, runs.tasks, g.weight_len(), with_bias),
            isa: exec.isa(),
            x,
            gy,
            runs,
        }
    }

    /// Scratch floats per task.
    pub(super) fn per_task(&self) -> usize {
        self.sums.per_task()
    }

    /// Image `n`'s grad-bias sums and grad-weight product into its task's scratch `st`
    /// (cleared at the task's first image), and with `grad_input` = `(Wᵀ, gx)` its input
    /// gradient into `gx` (one image, streamed to memory).
    pub(super) fn image(
        &self,
        st: &mut [f32],
        n: usize,
        mut grad_input: Option<(TransposedWeight<'_>, &mut [f32])>,
    ) {
        let (g, s) = (self.g, &self.s);
        let local = n % self.runs.per_task;
        if local == 0 {
            st[..g.weight_len()].fill(0.0);
        }
        for grp in 0..g.groups {
            let gyg = s.output(self.gy, 0, n, grp);
            self.sums
                .add_planes(self.isa, st, local, grp * s.cog, gyg, s.p);
            let gwg = &mut st[grp * s.cog * s.k..][..s.cog * s.k];
            let xt = MatView::dense(s.input(self.x, 0, n, grp), s.cig, s.p).t();
            let gy_rows = MatView::dense(gyg, s.cog, s.p);
            gemm(gwg, s.k, gy_rows, xt, true, 1);
            if let Some((tw, gx)) = grad_input.as_mut() {
                let ahead = if grp + 1 == g.groups {
                    self.next_image(n)
                } else {
                    Ahead::NONE
                };
                small_k_gemm_ahead(
                    self.isa,
                    transposed_weight_times(*tw, s, grp, gyg),
                    &mut gx[grp * s.in_group..][..s.in_group],
                    s.p,
                    Store::Stream,
                    ahead,
                );
            }
        }
    }

    /// The output gradient and input of the image after `n` in its task's run, which its
    /// grad-bias sums and grad-weight product read first: prefetched during image `n`'s
    /// grad-input product, which runs near the FMA peak and leaves the memory system idle
    /// (nothing after a run's last image). The grad-bias sums were the first to touch an
    /// image's output gradient (3.2 MB on reference layer B), a pass that waited on memory.
    /// `sepconv bench --layers B,C --variants pw,ds --no-peak`, the prefetch switched in one
    /// build, alternated 4×: the depthwise-separable training steps B 8.98–9.34 → 8.73–9.05 ms
    /// and C 13.28–13.61 → 13.17–13.22 (B faster in 3 pairs of 4 and a tie, C in 4 of 4; in
    /// an earlier 6× run each in 5 of 6); the pointwise steps C 11.36–11.64 → 11.37–11.45, B a
    /// tie (6.18–6.42 against 6.09–6.46).
    fn next_image(&self, n: usize) -> Ahead {
        let next = n + 1;
        if !self.runs.run(n / self.runs.per_task).contains(&next) {
            return Ahead::NONE;
        }
        // A pointwise layer's input and output planes have the same pixels.
        let (img_y, img_x) = (
            self.g.out_channels * self.s.p,
            self.g.in_channels * self.s.p,
        );
        Ahead::of(
            &self.gy[next * img_y..][..img_y],
            &self.x[next * img_x..][..img_x],
        )
    }

    /// Rows `rows` of image `n`'s input gradient (an ungrouped layer's input channels) into
    /// `gx_rows`, stored as `store`, prefetching `ahead`.
    pub(super) fn grad_input_rows(
        &self,
        tw: TransposedWeight<'_>,
        n: usize,
        rows: Range<usize>,
        gx_rows: &mut [f32],
        store: Store,
        ahead: Ahead,
    ) {
        assert_eq!(self.g.groups, 1, "grad_input_rows: grouped layer");
        let s = &self.s;
        let ops = transposed_weight_times(tw, s, 0, s.output(self.gy, 0, n, 0)).rows(rows);
        small_k_gemm_ahead(self.isa, ops, gx_rows, s.p, store, ahead);
    }

    /// `gw` (and `gb`) from the tasks' scratch (`scratch`, [`Self::per_task`] floats each).
    pub(super) fn finish(
        &self,
        exec: Exec,
        scratch: &[f32],
        gw: &mut [f32],
        gb: Option<&mut [f32]>,
    ) {
        sum_weight_copies(exec, scratch, self.per_task(), gw);
        if let Some(gb) = gb {
            self.sums.grad_bias(self.g.batch, scratch, gb);
        }
    }
}

/// `Wᵀ`, the C of a pointwise grad-input's unpacked product `Wᵀ · gY`.
#[derive(Clone, Copy)]
pub(super) enum TransposedWeight<'a> {
    /// The weight itself, read column by column: element (m, n) of group g's `Wᵀ` is
    /// `W[g·N·K + n·K + m]`.
    View(&'a [f32]),
    /// A row-major copy (per group `K × N`, [`super::adjoint_weight`] of the 1 × 1 kernel).
    Copy(&'a [f32]),
}

/// Runs `f` with the grad-input's `Wᵀ` in the form `small_k_gemm` reads fastest on `exec`'s
/// instruction set. With 16 vector registers (AVX2, SSE2) its blocks are 6 rows × 2 vectors,
/// so read column-wise a block's C takes a new cache line per k for 12 multiply-adds, and with
/// the block's D rows that overflows L1 at K = 512: a row-major copy, made once per call, pays
/// there. AVX2 on this machine (harness, min of 10, alternated 2×): the pointwise grad-input
/// of reference layer D 6.16–6.48 → 4.81–5.48 ms, C 4.75–4.83 → 4.30, E 2.36 → 2.03–2.10,
/// B a tie; D's three gradients 10.1–10.3 → 9.0. With AVX-512's 8 × 3 blocks the copy pays
/// only from K = 512 (`wants_row_major_c`, where D's packed panels compete in L2), and only on
/// the cores where `small_k_gemm` packs them (`Cores::copies_deep_transposed_weights`): on
/// Zen 4 it measured slower on D (3.99–4.07 → 4.25–4.46 ms) before the packing and still does.
pub(super) fn with_transposed_weight<R>(
    exec: Exec,
    g: &ConvGeometry,
    w: &[f32],
    ws: &mut Workspace,
    f: impl FnOnce(TransposedWeight<'_>, &mut Workspace) -> Result<R>,
) -> Result<R> {
    if !wants_row_major_c(exec.isa(), g.out_channels_per_group()) {
        return f(TransposedWeight::View(w), ws);
    }
    // For a 1 × 1 kernel the adjoint weight is the per-group transpose.
    super::with_adjoint_weight(exec, g, w, ws, |wt, ws| f(TransposedWeight::Copy(wt), ws))
}

/// The unpacked product `Wᵀ · gY` of one image's group `grp` in a pointwise grad-input.
pub(super) fn transposed_weight_times<'a>(
    tw: TransposedWeight<'a>,
    s: &GroupSlices,
    grp: usize,
    gyg: &'a [f32],
) -> Operands<'a> {
    let (c, c_rows, c_col) = match tw {
        TransposedWeight::View(w) => (s.weight_slice(w, grp), Rows::Strided(1), s.k),
        TransposedWeight::Copy(wt) => (
            &wt[grp * s.cig * s.cog..(grp + 1) * s.cig * s.cog],
            Rows::Strided(s.cog),
            1,
        ),
    };
    Operands {
        c,
        c_rows,
        c_col,
        d: gyg,
        n: s.cig,
        k: s.cog,
        p: s.p,
        bias: None,
        d_rows: Rows::Strided(s.p),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::geometry::{Conv2dParams, Padding};
    use crate::rng::Rng;

    /// Every (column-tile index, input index) pair of `planes` planes for pixels `[p0, p0 +
    /// len)` at row stride `ld`, one tap and pixel at a time from the geometry's own input row
    /// and column (taps on padding left out): what im2col gathers and col2im scatters.
    fn naive_taps(
        g: &ConvGeometry,
        planes: usize,
        p0: usize,
        len: usize,
        ld: usize,
    ) -> Vec<(usize, usize)> {
        let (kh, kw, hw) = (g.kernel_h, g.kernel_w, g.in_pixels());
        let mut pairs = Vec::new();
        for row in 0..planes * kh * kw {
            let (plane, i, j) = (row / (kh * kw), row / kw % kh, row % kw);
            for q in 0..len {
                let (oh, ow) = ((p0 + q) / g.out_w, (p0 + q) % g.out_w);
                if let (Some(ih), Some(iw)) = (g.input_row(oh, i), g.input_col(ow, j)) {
                    pairs.push((row * ld + q, plane * hw + ih * g.in_w + iw));
                }
            }
        }
        pairs
    }

    /// Small integers: every sum below is exact in any order, so the tiles must match the
    /// naive loops bit for bit.
    fn integers(rng: &mut Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.below(17) as f32 - 8.0).collect()
    }

    /// Every tile path (im2col's whole short rows, col2im by input rows, the segment loops
    /// where rows are wider than a vector or the tile does not hold whole rows, the scalar
    /// strided loops) on every instruction set, for whole images and for tiles that start and
    /// end inside rows or cover only some of them.
    #[test]
    fn tiles_match_the_naive_gather_and_scatter() {
        let pad = |top, bottom, left, right| Padding::Explicit {
            top,
            bottom,
            left,
            right,
        };
        // (input h × w, kernel, stride, dilation, padding)
        let cases = [
            ((7, 7), (3, 3), (1, 1), (1, 1), Padding::Same),
            ((6, 6), (3, 3), (1, 1), (1, 1), Padding::Valid),
            ((7, 5), (2, 3), (1, 1), (2, 2), pad(2, 0, 1, 3)),
            ((9, 7), (3, 3), (2, 1), (1, 1), Padding::Same),
            ((12, 12), (5, 5), (1, 1), (1, 1), Padding::Same),
            ((4, 16), (1, 17), (1, 1), (1, 1), pad(0, 0, 8, 8)),
            ((5, 20), (3, 3), (1, 1), (1, 1), Padding::Same),
            ((8, 9), (3, 3), (1, 2), (1, 1), Padding::Same),
        ];
        let mut rng = Rng::new(7);
        for ((h, w), (kh, kw), stride, dilation, padding) in cases {
            let params = Conv2dParams {
                stride,
                dilation,
                padding,
                groups: 1,
            };
            let g = ConvGeometry::new([1, 2, h, w], [3, 2, kh, kw], &params).unwrap();
            let (ow, p) = (g.out_w, g.out_pixels());
            let tiles = [(0, p), (ow, 2 * ow), (ow, p - ow), (1, p - 2), (p - 1, 1)];
            let x = integers(&mut rng, g.input_len());
            for (p0, len) in tiles {
                let ld = len + 3;
                let rows = 2 * kh * kw;
                let col = integers(&mut rng, rows * ld);
                let gx0 = integers(&mut rng, g.input_len());
                let (mut want_col, mut want_gx) = (vec![0.0; rows * ld], gx0.clone());
                for (c, i) in naive_taps(&g, 2, p0, len, ld) {
                    want_col[c] = x[i];
                    want_gx[i] += col[c];
                }
                for isa in Isa::available() {
                    let what = format!("{isa:?} {g:?} tile {p0} + {len}");
                    let mut got = vec![f32::NAN; rows * ld];
                    im2col_tile(isa, &g, &x, p0, len, &mut got, ld);
                    for r in 0..rows {
                        let (a, b) = (r * ld, r * ld + len);
                        assert_eq!(got[a..b], want_col[a..b], "im2col row {r}: {what}");
                    }
                    let mut gx = gx0.clone();
                    col2im_tile(isa, &g, &col, ld, p0, len, &mut gx);
                    assert_eq!(gx, want_gx, "col2im: {what}");
                }
            }
        }
    }
}
