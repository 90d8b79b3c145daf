//! Grad-weight of stride-1 convolutions whose output is as wide as the input (the kh × 1 and
//! 1 × kw halves of a spatially separable layer, "same"-padded k × k) as dot products of
//! output-gradient planes with shifted input planes, both read in place.
//!
//! With stride 1 and `out_w = in_w`, output position `p = oh·W + ow` of tap (i, j) reads input
//! position `p + off`, `off = (i·dh − pad_top)·W + (j·dw − pad_left)`: one shift of the flat
//! plane. So `gW[o, c, i, j] = Σ_p gY[o, p] · x[c, p + off]` over the positions where the tap
//! lands inside the image: a dot product of two NCHW planes, read in whole vectors along
//! positions. Nothing is copied, packed or transposed; im2col + GEMM spends about half its time
//! on that for these short products (K = 3·cin on reference layer B). A tap without a column
//! shift covers one contiguous range of positions (its valid rows); one with a shift covers a
//! segment of each valid row (the columns that stay inside the image), so no position ever
//! reads the neighbouring row.
//!
//! Register tile: 4 output channels × 6 input channels of one tap, 24 vector accumulators fed by
//! 4 + 6 loads per step (3 × 4 with 16 vector registers), kept in registers across a tap's row segments. Positions run in chunks
//! of whole rows sized so a chunk of every input channel stays in L2 while all output-channel
//! blocks read it. A tile's accumulators are added to per-lane partial sums (one vector per
//! weight element, mostly in L2), and the lanes are summed once at the end, so no horizontal
//! reduction runs per chunk.
//!
//! The dispatch ([`super::GradWeightKernel`]) takes it only on large images with few channels;
//! [`super::tap_grad_weight`], the same shifts as one packed GEMM per tap, wins elsewhere.
//! Not applicable where it measured slower than im2col + GEMM: pointwise layers, partial sums

//! larger than twice L2, images under 128 pixels, and column-shifted kernels on rows narrower
//! than 64 (the segments are then a few vectors each; 1 × 3 at width 28: 1.8 → 2.1 ms, at 56
//! a tie).
//! Two other ways of skipping the row edges lost on B's 1 × 3 half: a correction GEMM over the
//! wrapped positions (gathers on cold data) and AVX-512 masked loads for their lanes.

use rayon::prelude::*;

use super::simd::SimdF32;
use super::{Exec, ImageSums, Workspace, for_each_image_task};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Output channels per register tile.
const TILE_OUT: usize = 4;
/// Input channels per register tile.
const TILE_IN: usize = 6;
/// The tile (output × input channels) with 16 vector registers (AVX2, SSE2): 12 accumulators,
/// 3 gradient vectors and the input vector. The 4 × 6 tile spilled its accumulators there;
/// AVX2 grad-weight on this machine (harness, min of 5, alternated 2×): reference layer B's
/// 3 × 3 35.2–35.4 → 22.3–22.8 ms (AVX-512: 19–21), its sp halves 6.1–6.2 → 4.3–4.4 and
/// 12.8–13.1 → 8.5–9.4; 2 × 6, 3 × 3 and 2 × 5 tiles 25–27 ms on the 3 × 3.
const NARROW_TILE: (usize, usize) = (3, 4);
/// Floats of input (all channels of a group) per chunk of positions: 512 KiB, half of L2.
/// Smaller chunks (128–256 KiB) were 5–20% slower on reference layer B's 3 × 1 half: more
/// partial-sum traffic per multiplication; 1 MiB a tie on both of B's halves (harness,
/// alternated 4×: 3 × 1 3.26–3.47 against 3.25–3.41 ms, 1 × 3 7.04–7.24 against 7.11–7.24).
const CHUNK_FLOATS: usize = 1 << 17;
/// Largest per-task partial-sum buffer (floats): 2 MiB, twice L2 (a chunk reads and writes each
/// tile's vectors once, so some of them may come from L3). Measured (2 threads, batch 8): 3 × 1
/// kernels with 64 channels at 56 × 56 (768 KiB) 3.46 → 3.11 ms; reference layer B's 3 × 3
/// (1.1 MiB) 21.7–23.4 → 20.6–20.9 ms; but reference layer C's 3 × 1 half (3 MiB, streamed
/// through L3 every chunk) 14.0–15.1 against 14.2–14.5 ms, and its 3 × 3 (9 MiB) a tie.
const MAX_PARTIAL_FLOATS: usize = 1 << 19;
/// Narrowest image for kernels with a column shift (one row segment per tap and row). Measured
/// (2 threads, 1 × 3 and 3 × 3 kernels): width 112 1 × 3 32 → 64 channels 7.7 → 7.2 ms, 1 × 5
/// 7.3–8.8 → 5.6 ms, 3 × 3 16 → 32 channels 6.1 → 4.5–4.7 ms; width 64 3 × 3 4.25 → 3.6 ms;
/// width 56 a tie; width 28 1.8 → 2.1 ms; width 14 1.1 → 1.5 ms.
const MIN_SEGMENT_WIDTH: usize = 64;
/// Fewest output pixels per image: the partial sums are read and written once per image and
/// tile, which small images do not pay for. Measured (batch 64, 3 × 1 kernels, as in the
/// MNIST network's spatially separable blocks): 32 channels at 14 × 14 0.73 → 0.49 ms, but
/// 64 channels at 7 × 7 0.70 → 1.04 ms.
const MIN_PIXELS: usize = 128;

/// Whether [`grad_weight`] computes `g`'s grad-weight: stride 1, an output as wide as the
/// input, not pointwise, a kernel one column wide or rows at least 64 wide, at least 128
/// output pixels, images for every thread, more than one input channel per group (one is the
/// depthwise kernel's job), and per-lane partial sums of at most 2 MiB.
pub fn applies(exec: Exec, g: &ConvGeometry) -> bool {
    g.stride_h == 1
        && g.stride_w == 1
        && g.out_w == g.in_w
        && !g.is_pointwise()
        && (g.kernel_w == 1 || g.in_w >= MIN_SEGMENT_WIDTH)
        && g.out_pixels() >= MIN_PIXELS
        && g.batch >= exec.threads()
        && g.in_channels_per_group() > 1
        && g.weight_len() * exec.isa().lanes() <= MAX_PARTIAL_FLOATS
}

/// One tap's shift and the output positions it covers.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Tap {
    /// Input position minus output position (flat).
    pub(crate) off: isize,
    /// Output rows whose shifted row is inside the image.
    pub(crate) rows: (usize, usize),
    /// Columns `cols.0 .. cols.1` of each such row whose shifted column is inside the image.
    pub(crate) cols: (usize, usize),
}

impl Tap {
    /// Tap (i, j) of `g`, or `None` if it never lands inside the input.
    pub(crate) fn new(g: &ConvGeometry, i: usize, j: usize) -> Option<Tap> {
        let w = g.in_w as isize;
        let dy = (i * g.dilation_h) as isize - g.pad_top as isize;
        let dx = (j * g.dilation_w) as isize - g.pad_left as isize;
        let r0 = (-dy).max(0);
        let r1 = (g.out_h as isize).min(g.in_h as isize - dy);
        let (c0, c1) = ((-dx).max(0), w.min(w - dx));
        (r1 > r0 && c1 > c0).then(|| Tap {
            off: dy * w + dx,
            rows: (r0 as usize, r1 as usize),
            cols: (c0 as usize, c1 as usize),
        })
    }

    /// Whether every column lands (no column shift): then the valid positions are one
    /// contiguous range, else one segment per row.
    pub(crate) fn whole_rows(&self, width: usize) -> bool {
        self.cols == (0, width)
    }
}

/// Grad-weight `gw` (overwritten) of a convolution where [`applies`]. Images are split over
/// tasks; each accumulates per-lane partial sums, and the tasks' lanes are summed into `gw` at
/// the end.
///
/// With `gb`, also grad-bias (overwritten), bit for bit [`super::conv2d_grad_bias`]: each
/// image's output-gradient planes are summed right after its products, from the caches, instead
/// of in a pass of their own over the whole output gradient from memory. Reference layer B's
/// 1 × 3 half of its spatially separable layer (a 25.7 MB output gradient; harness, 2 threads,
/// min of 20, alternated 3×): its three gradients 13.6–14.3 → 13.3–13.5 ms.
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    gb: Option<&mut [f32]>,
    ws: &mut Workspace,
) -> Result<()> {
    let kw = g.kernel_w;
    let taps: Vec<Option<Tap>> = (0..g.kernel_h * kw)
        .map(|t| Tap::new(g, t / kw, t % kw))
        .collect();
    let lanes = exec.isa().lanes();
    let partial_len = gw.len() * lanes;
    let tasks = exec.threads().min(g.batch);
    // Per task: its partial sums, then the grad-bias sums of its images.
    let sums = ImageSums::new(g, tasks, partial_len, gb.is_some());
    let per_task = sums.per_task();
    let scratch = ws.take(per_task * tasks)?;
    let image_len = g.out_channels * g.out_pixels();
    for_each_image_task(g.batch, scratch, per_task, |images, st| {
        st[..partial_len].fill(0.0);
        for n in images.clone() {
            accumulate_image(exec.isa(), g, &taps, x, gy, n, &mut st[..partial_len]);
            // The image's output gradient has just gone through the caches: its sums read it
            // from there instead of from memory in a pass of their own.
            let planes = &gy[n * image_len..(n + 1) * image_len];
            sums.add_planes(exec.isa(), st, n - images.start, 0, planes, g.out_pixels());
        }
    });
    sum_task_partials(g, scratch, per_task, lanes, gw);
    if let Some(gb) = gb {
        sums.grad_bias(g.batch, scratch, gb);
    }
    Ok(())
}

/// Sums the tasks' partial sums into the OIHW `gw` (overwritten): each task's `per_task` floats
/// of `scratch` are laid out tap-major, [group][tap][out][in][lane] (`lanes` per weight).
pub(crate) fn sum_task_partials(
    g: &ConvGeometry,
    scratch: &[f32],
    per_task: usize,
    lanes: usize,
    gw: &mut [f32],
) {
    let (cig, cog, taps) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        g.kernel_h * g.kernel_w,
    );
    let tasks = scratch.len() / per_task;
    // gw[(group·cog + o)·K + c·taps + tap].
    gw.par_chunks_mut(cig * taps)
        .enumerate()
        .for_each(|(row, out)| {
            let (grp, o) = (row / cog, row % cog);
            for (kk, v) in out.iter_mut().enumerate() {
                let (c, t) = (kk / taps, kk % taps);
                let at = (((grp * taps + t) * cog + o) * cig + c) * lanes;
                *v = (0..tasks)
                    .map(|task| scratch[task * per_task + at..][..lanes].iter().sum::<f32>())
                    .sum();
            }
        });
}

crate::simd_dispatch!(fn accumulate_image => accumulate_image_kernel(
    g: &ConvGeometry, taps: &[Option<Tap>], x: &[f32], gy: &[f32], n: usize,
    partial: &mut [f32]
));

/// Adds image `n`'s dot products over each tap's position range to the per-lane partial sums.
#[inline(always)]
unsafe fn accumulate_image_kernel<S: SimdF32>(
    g: &ConvGeometry,
    taps: &[Option<Tap>],
    x: &[f32],
    gy: &[f32],
    n: usize,
    partial: &mut [f32],
) {
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let (hw, ohw, l) = (g.in_pixels(), g.out_pixels(), S::LANES);
    let t_count = taps.len();
    assert!(partial.len() >= g.groups * t_count * cog * cig * l);
    assert!(x.len() >= g.batch * g.in_channels * hw && gy.len() >= g.batch * g.out_channels * ohw);
    // Whole rows per chunk, so a row's segment never straddles two chunks.
    let width = g.out_w;
    let chunk = (CHUNK_FLOATS / cig / width).max(1) * width;
    let (tile_out, tile_in) = if S::REGISTERS >= 32 {
        (TILE_OUT, TILE_IN)
    } else {
        NARROW_TILE
    };

    for grp in 0..g.groups {
        let xg = (n * g.in_channels + grp * cig) * hw;
        let gyg = (n * g.out_channels + grp * cog) * ohw;
        for q0 in (0..ohw).step_by(chunk) {
            let q1 = (q0 + chunk).min(ohw);
            for o0 in (0..cog).step_by(tile_out) {
                for (t, tap) in taps.iter().enumerate() {
                    let Some(tap) = tap else { continue };
                    // Positions first + s·pitch .. + len for s < count.
                    let (r0, r1) = (tap.rows.0.max(q0 / width), tap.rows.1.min(q1 / width));
                    if r0 >= r1 {
                        continue;
                    }
                    let (first, len, count) = if tap.whole_rows(width) {
                        (r0 * width, (r1 - r0) * width, 1)
                    } else {
                        (r0 * width + tap.cols.0, tap.cols.1 - tap.cols.0, r1 - r0)
                    };
                    for c0 in (0..cig).step_by(tile_in) {
                        let block = Block {
                            gy: gyg + o0 * ohw + first,
                            gy_rows: ohw,
                            // Every segment shifted by off stays in its row of the plane:
                            // valid rows and columns only (Tap::new).
                            x: (xg + c0 * hw + first).wrapping_add_signed(tap.off),
                            x_rows: hw,
                            first,
                            len,
                            count,
                            pitch: width,
                            partial: (((grp * t_count + t) * cog + o0) * cig + c0) * l,
                            partial_rows: cig * l,
                        };
                        let (ro, rc) = (tile_out.min(cog - o0), tile_in.min(cig - c0));
                        // SAFETY: rows o0 .. o0 + ro of gY and c0 .. c0 + rc of x, every
                        // segment (shifted by off for x) lie in this group's planes, and
                        // the partial block lies in `partial` (asserted above).
                        unsafe { block.run::<S>(gy, x, partial, ro, rc) };
                    }
                }
            }
        }
    }
}

/// One register tile's operands: element offsets of its first gY row, first x row and first
/// partial-sum vector, with the strides between rows, and the positions: `count` segments of
/// `len` from `first`, `pitch` apart (one segment for a tap without a column shift).
#[derive(Clone, Copy)]
struct Block {
    first: usize,
    count: usize,
    pitch: usize,
    gy: usize,
    gy_rows: usize,
    x: usize,
    x_rows: usize,
    len: usize,
    partial: usize,
    partial_rows: usize,
}

impl Block {
    /// Runs the `ro × rc` tile (`ro ≤ TILE_OUT`, `rc ≤ TILE_IN`).
    ///
    /// # Safety
    /// The CPU runs `S`'s instruction set; rows `..ro` of gY, `..rc` of x (every segment's
    /// positions) and of the partial block (`rc` vectors each) are inside the slices.
    #[inline(always)]
    unsafe fn run<S: SimdF32>(
        self,
        gy: &[f32],
        x: &[f32],
        partial: &mut [f32],
        ro: usize,
        rc: usize,
    ) {
        unsafe {
            match ro {
                4 => self.run_rows::<S, 4>(gy, x, partial, rc),
                3 => self.run_rows::<S, 3>(gy, x, partial, rc),
                2 => self.run_rows::<S, 2>(gy, x, partial, rc),
                _ => self.run_rows::<S, 1>(gy, x, partial, rc),
            }
        }
    }

    #[inline(always)]
    unsafe fn run_rows<S: SimdF32, const RO: usize>(
        self,
        gy: &[f32],
        x: &[f32],
        partial: &mut [f32],
        rc: usize,
    ) {
        unsafe {
            match rc {
                6 => self.tile::<S, RO, 6>(gy, x, partial),
                5 => self.tile::<S, RO, 5>(gy, x, partial),
                4 => self.tile::<S, RO, 4>(gy, x, partial),
                3 => self.tile::<S, RO, 3>(gy, x, partial),
                2 => self.tile::<S, RO, 2>(gy, x, partial),
                _ => self.tile::<S, RO, 1>(gy, x, partial),
            }
        }
    }

    /// `partial[i][j] += Σ_p gY[i][p] · x[j][p]` lane by lane, for `RO` gradient rows and
    /// `RC` input rows.
    ///
    /// # Safety
    /// As [`Block::run`].
    #[inline(always)]
    unsafe fn tile<S: SimdF32, const RO: usize, const RC: usize>(
        self,
        gy: &[f32],
        x: &[f32],
        partial: &mut [f32],
    ) {
        let l = S::LANES;
        let extent = (self.count - 1) * self.pitch + self.len;
        debug_assert!(self.gy + (RO - 1) * self.gy_rows + extent <= gy.len());
        debug_assert!(self.x + (RC - 1) * self.x_rows + extent <= x.len());
        debug_assert!(self.partial + (RO - 1) * self.partial_rows + RC * l <= partial.len());
        let (gp, xp) = (gy.as_ptr(), x.as_ptr());
        let pp = partial.as_mut_ptr();
        // SAFETY: the caller's contract (rows and lengths inside the slices).
        unsafe {
            let mut acc = [[S::zero(); RC]; RO];
            for (i, row) in acc.iter_mut().enumerate() {
                for (j, a) in row.iter_mut().enumerate() {
                    *a = S::load(pp.add(self.partial + i * self.partial_rows + j * l));
                }
            }
            // A partial first vector up to the next multiple of LANES positions: the body's
            // gradient loads are then aligned wherever the planes are, and which lane sums
            // which position depends on the position alone, so results are bit-identical from
            // run to run whatever the buffers' addresses (training resumes exactly).
            for s in 0..self.count {
                let base = s * self.pitch;
                let head = ((l - (self.first + base) % l) % l).min(self.len);
                if head > 0 {
                    self.step(&mut acc, gp, xp, base, head);
                }
                let full = head + (self.len - head) / l * l;
                let mut p = head;
                while p < full {
                    self.step(&mut acc, gp, xp, base + p, l);
                    p += l;
                }
                if full < self.len {
                    self.step(&mut acc, gp, xp, base + full, self.len - full);
                }
            }
            for (i, row) in acc.iter().enumerate() {
                for (j, a) in row.iter().enumerate() {
                    a.store(pp.add(self.partial + i * self.partial_rows + j * l));
                }
            }
        }
    }

    /// Adds the products of `n ≤ LANES` positions from `p` to the accumulators: every x vector
    /// is loaded once and used `RO` times.
    ///
    /// # Safety
    /// As [`Block::tile`], for positions `p .. p + n`.
    #[inline(always)]
    unsafe fn step<S: SimdF32, const RO: usize, const RC: usize>(
        &self,
        acc: &mut [[S; RC]; RO],
        gp: *const f32,
        xp: *const f32,
        p: usize,
        n: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let mut gv = [S::zero(); RO];
            for (i, v) in gv.iter_mut().enumerate() {
                let at = gp.add(self.gy + i * self.gy_rows + p);
                *v = if n == S::LANES {
                    S::load(at)
                } else {
                    S::load_partial(at, n)
                };
            }
            for j in 0..RC {
                let at = xp.add(self.x + j * self.x_rows + p);
                let xv = if n == S::LANES {
                    S::load(at)
                } else {
                    S::load_partial(at, n)
                };
                for (row, &g) in acc.iter_mut().zip(&gv) {
                    row[j] = S::mul_add(g, xv, row[j]);
                }
            }
        }
    }
}
