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
//! Register tile: 4 output channels × 6 input channels of one tap, 24 vector accumulators fed
//! by 4 + 6 loads per step (3 × 4 with 16 vector registers), kept in registers across a tap's
//! row segments. With 32 registers up to three consecutive taps share a tile (4 output × 2
//! input channels × 3 taps) over the rows where all of them land: each input row's three
//! shifted loads share cache lines, so a step brings 6 new lines into L1 for its 24 FMAs
//! instead of 10. Reference layer B (harness, 2 threads, alternated 4×): its 1 × 3 grad-weight
//! 6.87–6.96 → 6.73–6.89 ms, its 3 × 3 18.95–19.11 → 18.50–18.66, its 3 × 1 (shifts a row
//! apart) a tie. A tap's columns outside the image are masked lanes of the steps that reach
//! them (the first and last of a row segment). Positions run in chunks of whole rows, about
//! L2's size over all input channels, which every output-channel block reads in turn. A tile's
//! accumulators are added to per-lane partial sums (one vector per weight element, mostly in
//! L2), and the lanes are summed once at the end, so no horizontal reduction runs per chunk.
//!
//! The dispatch ([`super::GradWeightKernel`]) takes it only on large images with few channels;
//! [`super::tap_grad_weight`], the same shifts as one packed GEMM per tap, wins elsewhere.
//! Not applicable where it measured slower than im2col + GEMM: pointwise layers, partial sums
//! larger than twice L2, images under 128 pixels, and column-shifted kernels on rows narrower
//! than 64 (the segments are then a few vectors each; 1 × 3 at width 28: 1.8 → 2.1 ms, at 56
//! a tie).
//! Two other ways of skipping the row edges lost on B's 1 × 3 half with one tap per tile: a
//! correction GEMM over the wrapped positions (gathers on cold data) and AVX-512 masked loads
//! for their lanes. Prefetching the next output-channel block's gradient rows into L2 (8 images
//! of B come from memory, and the kernel runs 5–10% faster per image with 2 in L3) lost too:
//! 3 × 1 3.35–3.47 against 3.48–3.50 ms, 1 × 3 7.19–7.29 against 7.08–7.11, 3 × 3 19.62–19.65
//! against 19.27–19.33.

use rayon::prelude::*;

use super::simd::SimdF32;
use super::{Exec, ImageSums, Workspace, for_each_image_task, splits_inside_images};
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
/// Floats of input (all channels of a group) per chunk of positions: 1 MiB, as large as L2, so
/// the output-channel blocks re-read it from L2 and L3; each chunk reads and writes every
/// partial sum once, and larger chunks mean fewer such passes.
/// With one tap per tile 512 KiB was best: 128–256 KiB 5–20% slower on reference layer B's
/// 3 × 1 half, 1 MiB a tie (3 × 1 3.26–3.47 against 3.25–3.41 ms, 1 × 3 7.04–7.24 against
/// 7.11–7.24). With three taps per tile (harness, alternated 4×), 512 KiB → 1 MiB: B's 3 × 1
/// 3.34–3.55 → 3.22–3.30 ms, 1 × 3 6.85–6.95 → 6.73–6.90, 3 × 3 18.63–18.82 → 18.47–18.52;
/// 2 MiB 3.21–3.33, 6.83–6.99 and 18.12–18.65; the MNIST network's 3 × 1 (batch 64, 28 × 28)
/// a tie.
const CHUNK_FLOATS: usize = 1 << 18;
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
    g.batch >= exec.threads() && shape_applies(exec, g)
}

/// [`applies`] but for the batch.
fn shape_applies(exec: Exec, g: &ConvGeometry) -> bool {
    g.stride_h == 1
        && g.stride_w == 1
        && g.out_w == g.in_w
        && !g.is_pointwise()
        && (g.kernel_w == 1 || g.in_w >= MIN_SEGMENT_WIDTH)
        && g.out_pixels() >= MIN_PIXELS
        && g.in_channels_per_group() > 1
        && g.weight_len() * exec.isa().lanes() <= MAX_PARTIAL_FLOATS
}

/// Whether [`grad_weight`] computes `g`'s grad-weight with each image split over the threads
/// (each a run of its output rows, into its own partial sums): where the batch does not give
/// every thread images of its own, on the shapes [`applies`] takes with more images, with at
/// least `MIN_POSITIONS_PER_THREAD` output positions per thread. These ran im2col + faer
/// split by pixel ranges.
pub fn within_images_applies(exec: Exec, g: &ConvGeometry) -> bool {
    splits_inside_images(exec.threads(), g.batch)
        && shape_applies(exec, g)
        && g.out_pixels() >= MIN_POSITIONS_PER_THREAD * exec.threads()
}

/// Fewest output positions per thread for [`within_images_applies`]: each thread's partial
/// sums are read and written once per image, which half a small image does not pay for.
/// Harness, batch 1, 2 threads, min of 20, im2col + faer against this, back to back: at 112 ×
/// 112 (6272 positions per thread) 3 × 1 32 → 32 0.49 → 0.37–0.41 ms, 64 → 64 1.65–1.71 →
/// 1.53, 3 × 3 16 → 32 0.73 → 0.56, 32 → 64 2.50–2.55 → 2.27–2.50, 1 × 3 32 → 64 0.83 →
/// 0.76–0.83 (3 images 3.0–3.2 → 2.2–2.3); at 56 × 56 (1568 per thread) 3 × 1 32 → 32 0.127 →
/// 0.215, 64 → 64 0.44 → 0.48–0.83, 1 × 3 32 → 64 a tie.
const MIN_POSITIONS_PER_THREAD: usize = 56 * 56;

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
    let per_group = if exec.isa().registers() >= 32 {
        MAX_GROUP
    } else {
        1
    };
    let groups = tap_groups(&taps, per_group, g.out_w);
    let lanes = exec.isa().lanes();
    let partial_len = gw.len() * lanes;
    if splits_inside_images(exec.threads(), g.batch) {
        let threads = exec.threads();
        let scratch = ws.take(partial_len * threads)?;
        scratch
            .par_chunks_mut(partial_len)
            .enumerate()
            .for_each(|(t, partial)| {
                partial.fill(0.0);
                let rows = t * g.out_h / threads..(t + 1) * g.out_h / threads;
                for n in 0..g.batch {
                    let rows = rows.clone();
                    accumulate_image(exec.isa(), g, taps.len(), &groups, x, gy, n, rows, partial);
                }
            });
        sum_task_partials(g, scratch, partial_len, lanes, gw);
        if let Some(gb) = gb {
            super::conv2d_grad_bias(exec, g, gy, gb);
        }
        return Ok(());
    }
    let tasks = exec.threads().min(g.batch);
    // Per task: its partial sums, then the grad-bias sums of its images.
    let sums = ImageSums::new(g, tasks, partial_len, gb.is_some());
    let per_task = sums.per_task();
    let scratch = ws.take(per_task * tasks)?;
    for_each_image_task(g.batch, scratch, per_task, |images, st| {
        st[..partial_len].fill(0.0);
        for n in images.clone() {
            accumulate_image(
                exec.isa(),
                g,
                taps.len(),
                &groups,
                x,
                gy,
                n,
                0..g.out_h,
                &mut st[..partial_len],
            );
            sums.add_image(exec.isa(), st, n - images.start, g, gy, n);
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

/// Most taps one register tile computes together (on 32 vector registers).
const MAX_GROUP: usize = 3;

/// Taps whose products one register tile computes together, over the output rows where every
/// one of them lands: each x vector it loads feeds `len` taps' accumulators, and the shifted
/// loads of one input row share cache lines, so a step brings `TILE_OUT` + `TILE_IN / len` new
/// lines into L1 instead of `TILE_OUT + TILE_IN` (the tap-by-tap tile streamed all ten from L2
/// for its 24 FMAs).
#[derive(Clone, Copy, Debug)]
struct TapGroup {
    /// The taps (index, shift); only the first `len` are used.
    taps: [(usize, Tap); MAX_GROUP],
    len: usize,
    /// Output rows `rows.0 .. rows.1`, inside every member's.
    rows: (usize, usize),
    /// The columns of each row where any member lands, or `None` when no member shifts
    /// columns: then the rows are one contiguous range of positions.
    span: Option<(usize, usize)>,
    /// With a `span`, the columns where each member lands and where all of them do, relative
    /// to its start.
    cols: [(usize, usize); MAX_GROUP],
    clean: (usize, usize),
}

/// The positions a group's tile runs over in some of its rows: `count` segments of `len` from
/// `first`, a row apart, and where in each segment each member (`cols`) and every member
/// (`clean`) lands.
struct Segments {
    first: usize,
    len: usize,
    count: usize,
    cols: [(usize, usize); MAX_GROUP],
    clean: (usize, usize),
}

impl TapGroup {
    /// The group of `members` (1 ..= MAX_GROUP) over output `rows` of rows `width` wide.
    fn new(members: &[(usize, Tap)], rows: (usize, usize), width: usize) -> Self {
        let mut taps = [members[0]; MAX_GROUP];
        taps[..members.len()].copy_from_slice(members);
        let whole = members.iter().all(|(_, tap)| tap.whole_rows(width));
        let u0 = members.iter().map(|(_, tap)| tap.cols.0).min().unwrap_or(0);
        let u1 = members.iter().map(|(_, tap)| tap.cols.1).max().unwrap_or(0);
        let mut cols = [(0, u1 - u0); MAX_GROUP];
        for (c, (_, tap)) in cols.iter_mut().zip(members) {
            *c = (tap.cols.0 - u0, tap.cols.1 - u0);
        }
        let clean = cols[..members.len()]
            .iter()
            .fold((0, u1 - u0), |(a, b), &(c0, c1)| (a.max(c0), b.min(c1)));
        TapGroup {
            taps,
            len: members.len(),
            rows,
            span: (!whole).then_some((u0, u1)),
            cols,
            clean,
        }
    }

    /// The positions of output rows `r0 .. r1` (inside `rows`).
    fn segments(&self, r0: usize, r1: usize, width: usize) -> Segments {
        match self.span {
            None => {
                let len = (r1 - r0) * width;
                Segments {
                    first: r0 * width,
                    len,
                    count: 1,
                    cols: [(0, len); MAX_GROUP],
                    clean: (0, len),
                }
            }
            Some((u0, u1)) => Segments {
                first: r0 * width + u0,
                len: u1 - u0,
                count: r1 - r0,
                cols: self.cols,
                clean: self.clean,
            },
        }
    }
}

/// The kernel's taps in groups of up to `per_group` consecutive ones, over the rows where all
/// members land; each member's remaining rows (a kh × 1 kernel's first and last) as groups of
/// one. Rows are `width` wide.
fn tap_groups(taps: &[Option<Tap>], per_group: usize, width: usize) -> Vec<TapGroup> {
    let present: Vec<(usize, Tap)> = taps
        .iter()
        .enumerate()
        .filter_map(|(t, tap)| tap.map(|tap| (t, tap)))
        .collect();
    let mut groups = Vec::new();
    let single = |member: (usize, Tap), rows: (usize, usize), groups: &mut Vec<TapGroup>| {
        if rows.0 < rows.1 {
            groups.push(TapGroup::new(&[member], rows, width));
        }
    };
    for members in present.chunks(per_group.clamp(1, MAX_GROUP)) {
        let rows = members.iter().fold((0, usize::MAX), |(r0, r1), (_, tap)| {
            (r0.max(tap.rows.0), r1.min(tap.rows.1))
        });
        if members.len() == 1 || rows.0 >= rows.1 {
            for &m in members {
                single(m, m.1.rows, &mut groups);
            }
            continue;
        }
        groups.push(TapGroup::new(members, rows, width));
        for &m in members {
            single(m, (m.1.rows.0, rows.0), &mut groups);
            single(m, (rows.1, m.1.rows.1), &mut groups);
        }
    }
    groups
}

crate::simd_dispatch!(fn accumulate_image => accumulate_image_kernel(
    g: &ConvGeometry, t_count: usize, groups: &[TapGroup], x: &[f32], gy: &[f32], n: usize,
    out_rows: std::ops::Range<usize>, partial: &mut [f32]
));

/// Adds image `n`'s dot products over each tap's positions in output rows `out_rows` to the
/// per-lane partial sums (`t_count` taps, in `groups`).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn accumulate_image_kernel<S: SimdF32>(
    g: &ConvGeometry,
    t_count: usize,
    groups: &[TapGroup],
    x: &[f32],
    gy: &[f32],
    n: usize,
    out_rows: std::ops::Range<usize>,
    partial: &mut [f32],
) {
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let (hw, ohw, l) = (g.in_pixels(), g.out_pixels(), S::LANES);
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
        let (p0, p1) = (out_rows.start * width, out_rows.end.min(g.out_h) * width);
        for q0 in (p0..p1).step_by(chunk) {
            let q1 = (q0 + chunk).min(p1);
            for o0 in (0..cog).step_by(tile_out) {
                for group in groups {
                    let (r0, r1) = (group.rows.0.max(q0 / width), group.rows.1.min(q1 / width));
                    if r0 >= r1 {
                        continue;
                    }
                    let members = &group.taps[..group.len];
                    let seg = group.segments(r0, r1, width);
                    let tile_in = if group.len == 1 {
                        tile_in
                    } else {
                        TILE_IN / group.len
                    };
                    for c0 in (0..cig).step_by(tile_in) {
                        let (mut xs, mut partials) = ([0isize; MAX_GROUP], [0; MAX_GROUP]);
                        for (k, &(t, tap)) in members.iter().enumerate() {
                            xs[k] = (xg + c0 * hw + seg.first) as isize + tap.off;
                            partials[k] = (((grp * t_count + t) * cog + o0) * cig + c0) * l;
                        }
                        let block = Block {
                            gy: gyg + o0 * ohw + seg.first,
                            gy_rows: ohw,
                            x: xs,
                            x_rows: hw,
                            cols: seg.cols,
                            clean: seg.clean,
                            first: seg.first,
                            len: seg.len,
                            count: seg.count,
                            pitch: width,
                            partial: partials,
                            partial_rows: cig * l,
                        };
                        let (ro, rc) = (tile_out.min(cog - o0), tile_in.min(cig - c0));
                        // SAFETY: rows o0 .. o0 + ro of gY and c0 .. c0 + rc of x lie in this
                        // group's planes; each member's x is read only at the columns where it
                        // lands (Tap::new), which stay in its shifted row; the partial blocks
                        // lie in `partial` (asserted above).
                        unsafe { block.run::<S>(gy, x, partial, ro, rc, group.len) };
                    }
                }
            }
        }
    }
}

/// One register tile's operands: element offsets of its first gY row, of each tap's first x row
/// (at the first position; before the plane where the tap's first columns fall in the padding)
/// and of each tap's first partial-sum vector, with the strides between rows, and the
/// positions: `count` segments of `len` from `first`, `pitch` apart (one segment when no tap
/// shifts columns). Tap k lands on columns `cols[k]` of each segment (relative to its start),
/// every tap on `clean`.
#[derive(Clone, Copy)]
struct Block {
    first: usize,
    count: usize,
    pitch: usize,
    len: usize,
    gy: usize,
    gy_rows: usize,
    x: [isize; MAX_GROUP],
    x_rows: usize,
    cols: [(usize, usize); MAX_GROUP],
    clean: (usize, usize),
    partial: [usize; MAX_GROUP],
    partial_rows: usize,
}

impl Block {
    /// Runs the `ro × rc` tile of `taps` taps (`ro ≤ TILE_OUT`, `rc · taps ≤ TILE_IN`).
    ///
    /// # Safety
    /// The CPU runs `S`'s instruction set; rows `..ro` of gY (every segment's positions), `..rc`
    /// of x (each tap's columns of every segment) and of the partial blocks (`rc` vectors each)
    /// are inside the slices.
    #[inline(always)]
    unsafe fn run<S: SimdF32>(
        self,
        gy: &[f32],
        x: &[f32],
        partial: &mut [f32],
        ro: usize,
        rc: usize,
        taps: usize,
    ) {
        unsafe {
            match ro {
                4 => self.run_rows::<S, 4>(gy, x, partial, rc, taps),
                3 => self.run_rows::<S, 3>(gy, x, partial, rc, taps),
                2 => self.run_rows::<S, 2>(gy, x, partial, rc, taps),
                _ => self.run_rows::<S, 1>(gy, x, partial, rc, taps),
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
        taps: usize,
    ) {
        unsafe {
            match (taps, rc) {
                (3, 2) => self.tile::<S, RO, 2, 3>(gy, x, partial),
                (3, _) => self.tile::<S, RO, 1, 3>(gy, x, partial),
                (2, 3) => self.tile::<S, RO, 3, 2>(gy, x, partial),
                (2, 2) => self.tile::<S, RO, 2, 2>(gy, x, partial),
                (2, _) => self.tile::<S, RO, 1, 2>(gy, x, partial),
                (_, 6) => self.tile::<S, RO, 6, 1>(gy, x, partial),
                (_, 5) => self.tile::<S, RO, 5, 1>(gy, x, partial),
                (_, 4) => self.tile::<S, RO, 4, 1>(gy, x, partial),
                (_, 3) => self.tile::<S, RO, 3, 1>(gy, x, partial),
                (_, 2) => self.tile::<S, RO, 2, 1>(gy, x, partial),
                _ => self.tile::<S, RO, 1, 1>(gy, x, partial),
            }
        }
    }

    /// `partial[k][i][j] += Σ_p gY[i][p] · x_k[j][p]` lane by lane, for `RO` gradient rows,
    /// `RC` input rows and `T` taps (x_k: the input shifted by tap k).
    ///
    /// # Safety
    /// As [`Block::run`].
    #[inline(always)]
    unsafe fn tile<S: SimdF32, const RO: usize, const RC: usize, const T: usize>(
        self,
        gy: &[f32],
        x: &[f32],
        partial: &mut [f32],
    ) {
        let l = S::LANES;
        let extent = (self.count - 1) * self.pitch + self.len;
        debug_assert!(self.gy + (RO - 1) * self.gy_rows + extent <= gy.len());
        for k in 0..T {
            let (c0, c1) = self.cols[k];
            debug_assert!(self.x[k] + c0 as isize >= 0);
            debug_assert!(
                self.x[k] + ((RC - 1) * self.x_rows + extent - self.len + c1) as isize
                    <= x.len() as isize
            );
            debug_assert!(self.partial[k] + (RO - 1) * self.partial_rows + RC * l <= partial.len());
        }
        let (gp, xp) = (gy.as_ptr(), x.as_ptr());
        let pp = partial.as_mut_ptr();
        let clean = self.clean;
        // SAFETY: the caller's contract (rows and lengths inside the slices).
        unsafe {
            let mut acc = [[[S::zero(); RC]; T]; RO];
            for (i, taps) in acc.iter_mut().enumerate() {
                for (k, row) in taps.iter_mut().enumerate() {
                    for (j, a) in row.iter_mut().enumerate() {
                        let at = self.partial[k] + i * self.partial_rows + j * l;
                        *a = S::load(pp.add(at));
                    }
                }
            }
            // A partial first vector up to the next multiple of LANES positions: the body's
            // gradient loads are then aligned wherever the planes are, and which lane sums
            // which position depends on the position alone, so results are bit-identical from
            // run to run whatever the buffers' addresses (training resumes exactly). Steps
            // that reach a column where some tap does not land (the first and last of a row
            // segment) load only its lanes that do.
            for s in 0..self.count {
                let base = s * self.pitch;
                let head = ((l - (self.first + base) % l) % l).min(self.len);
                let mut at = 0;
                while at < self.len {
                    let n = if at == 0 && head > 0 {
                        head
                    } else {
                        l.min(self.len - at)
                    };
                    if at < clean.0 || at + n > clean.1 {
                        self.step_masked(&mut acc, gp, xp, base, at, n);
                    } else if n == l {
                        self.step(&mut acc, gp, xp, base + at, l);
                    } else {
                        self.step(&mut acc, gp, xp, base + at, n);
                    }
                    at += n;
                }
            }
            for (i, taps) in acc.iter().enumerate() {
                for (k, row) in taps.iter().enumerate() {
                    for (j, a) in row.iter().enumerate() {
                        a.store(pp.add(self.partial[k] + i * self.partial_rows + j * l));
                    }
                }
            }
        }
    }

    /// The `RO` gradient vectors of positions `p .. p + n` (`n ≤ LANES`).
    ///
    /// # Safety
    /// As [`Block::tile`], for positions `p .. p + n`.
    #[inline(always)]
    unsafe fn gradients<S: SimdF32, const RO: usize>(
        &self,
        gp: *const f32,
        p: usize,
        n: usize,
    ) -> [S; RO] {
        let mut gv = [unsafe { S::zero() }; RO];
        for (i, v) in gv.iter_mut().enumerate() {
            // SAFETY: the caller's contract.
            unsafe {
                let at = gp.add(self.gy + i * self.gy_rows + p);
                *v = if n == S::LANES {
                    S::load(at)
                } else {
                    S::load_partial(at, n)
                };
            }
        }
        gv
    }

    /// Adds the products of `n ≤ LANES` positions from `p`, where every tap lands, to the
    /// accumulators: every x vector is loaded once and used `RO` times.
    ///
    /// # Safety
    /// As [`Block::tile`], for positions `p .. p + n`.
    #[inline(always)]
    unsafe fn step<S: SimdF32, const RO: usize, const RC: usize, const T: usize>(
        &self,
        acc: &mut [[[S; RC]; T]; RO],
        gp: *const f32,
        xp: *const f32,
        p: usize,
        n: usize,
    ) {
        // SAFETY: the caller's contract.
        unsafe {
            let gv = self.gradients::<S, RO>(gp, p, n);
            for j in 0..RC {
                for k in 0..T {
                    let at = xp.wrapping_offset(self.x[k] + (j * self.x_rows + p) as isize);
                    let xv = if n == S::LANES {
                        S::load(at)
                    } else {
                        S::load_partial(at, n)
                    };
                    for (taps, &g) in acc.iter_mut().zip(&gv) {
                        taps[k][j] = S::mul_add(g, xv, taps[k][j]);
                    }
                }
            }
        }
    }

    /// As [`Block::step`] for the `n` positions from column `at` of the segment at `base`,
    /// where some tap does not land on every one: each tap's x is loaded in the lanes where it
    /// does, zero elsewhere.
    ///
    /// # Safety
    /// As [`Block::tile`], for the positions where each tap lands.
    #[inline(always)]
    unsafe fn step_masked<S: SimdF32, const RO: usize, const RC: usize, const T: usize>(
        &self,
        acc: &mut [[[S; RC]; T]; RO],
        gp: *const f32,
        xp: *const f32,
        base: usize,
        at: usize,
        n: usize,
    ) {
        let p = base + at;
        // SAFETY: the caller's contract; each tap's loads touch only its lanes lo .. hi.
        unsafe {
            let gv = self.gradients::<S, RO>(gp, p, n);
            for k in 0..T {
                let (c0, c1) = self.cols[k];
                let (lo, hi) = (c0.saturating_sub(at).min(n), c1.saturating_sub(at).min(n));
                if lo >= hi {
                    continue;
                }
                for j in 0..RC {
                    let ptr = xp.wrapping_offset(self.x[k] + (j * self.x_rows + p) as isize);
                    let xv = S::load_lanes(ptr, lo, hi);
                    for (taps, &g) in acc.iter_mut().zip(&gv) {
                        taps[k][j] = S::mul_add(g, xv, taps[k][j]);
                    }
                }
            }
        }
    }
}
