//! Pointwise (1×1) layers whose images do not split evenly over the threads — a batch of one,
//! or an odd batch on two threads — split inside the images instead.
//!
//! Elsewhere a pointwise layer's tasks take whole images and each runs the unpacked
//! register-blocked product ([`super::pointwise`]) alone. With too few images for that, the
//! layer used to be one GEMM per image with faer's threads inside it, whose packed kernel is
//! slow at a pointwise layer's short inner dimension (K = 32 on reference layer B) and whose
//! threads meet at a barrier for every block of the product.
//!
//! Here forward and grad-input give each task a run of output rows (image, channel) of the
//! unpacked product; grad-weight gives each task a run of the gradient's rows on small images,
//! and on larger ones a range of pixels of every image summed into a private copy of the
//! gradient, in `conv::grad_weight` (the same split as for any layer with too few images).

use std::ops::Range;

use super::conv::{GroupSlices, transposed_weight_times, with_transposed_weight};
use super::gemm::{MatView, gemm};
use super::pointwise::{Operands, Store, small_k_gemm};
use super::{Exec, Workspace, for_each_task, splits_inside_images};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Whether `g` runs here: a pointwise layer on several threads whose images cannot each go to
/// a thread of their own: one image, or a count the threads do not divide (below four per
/// thread).
pub fn applies(exec: Exec, g: &ConvGeometry) -> bool {
    g.is_pointwise() && splits_inside_images(exec.threads(), g.batch)
}

/// Calls `f(n, grp, channels)` for each run of one image's group within the rows `rows` of a
/// `[batch, channels_total]` stack of planes (row r: image `r / channels_total`, channel
/// `r % channels_total`); `channels` counts from the group's first channel.
fn for_each_group_run(
    rows: Range<usize>,
    channels_total: usize,
    per_group: usize,
    mut f: impl FnMut(usize, usize, Range<usize>),
) {
    let mut r = rows.start;
    while r < rows.end {
        let (n, c) = (r / channels_total, r % channels_total);
        let (grp, c0) = (c / per_group, c % per_group);
        let len = (per_group - c0).min(rows.end - r);
        f(n, grp, c0..c0 + len);
        r += len;
    }
}

/// `y = w · x + bias` per image and group; each task computes a run of output rows.
pub fn forward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
) {
    let s = GroupSlices::new(g);
    let p = s.p;
    product_rows(exec, y, g.out_channels, s.cog, p, |n, grp| {
        let bias_g = bias.map(|b| &b[grp * s.cog..(grp + 1) * s.cog]);
        let xg = s.input(x, 0, n, grp);
        Operands::dense(s.weight_slice(w, grp), s.cog, s.cig, xg, p, p, bias_g)
    });
}

/// The rows of `out` (`[batch, channels]` planes of `p` pixels, `per_group` channels per group)
/// split over the threads in runs: each run is rows `run` of the unpacked product
/// `ops(image, group)`, whose rows are that image's group's planes.
fn product_rows<'a>(
    exec: Exec,
    out: &mut [f32],
    channels: usize,
    per_group: usize,
    p: usize,
    ops: impl Fn(usize, usize) -> Operands<'a> + Sync,
) {
    for_each_task(exec.threads(), out, p, &mut [], 0, |rows, oc, _| {
        let base = rows.start;
        for_each_group_run(rows, channels, per_group, |n, grp, run| {
            let first = n * channels + grp * per_group + run.start - base;
            let dst = &mut oc[first * p..(first + run.len()) * p];
            small_k_gemm(exec.isa(), ops(n, grp).rows(run), dst, p, Store::Stream);
        });
    });
}

/// `gx = wᵀ · gy` per image and group (overwritten); each task computes a run of grad-input
/// rows.
pub fn grad_input(
    exec: Exec,
    g: &ConvGeometry,
    gy: &[f32],
    w: &[f32],
    gx: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let s = GroupSlices::new(g);
    let p = s.p;
    with_transposed_weight(exec, g, w, ws, |tw, _| {
        product_rows(exec, gx, g.in_channels, s.cig, p, |n, grp| {
            transposed_weight_times(tw, &s, grp, s.output(gy, 0, n, grp))
        });
        Ok(())
    })
}

/// Pixels per task from which grad-weight splits the pixels rather than the rows: below it the
/// per-task products got too short (pixel ranges: `conv::grad_weight`). Reference-like layers at batch 1 (2 threads, harness, min
/// of 30): 32 → 64 at 112 × 112 0.255 ms by pixels against 0.274 by rows, 144 → 24 at 56 × 56
/// 0.133 against 0.299, 64 → 128 at 56 × 56 a tie (0.25); 128 → 256 at 28 × 28 0.41 against
/// 0.24, 512 → 512 at 14 × 14 0.69 against 0.47, 960 → 160 at 7 × 7 0.23 against 0.08.
const MIN_PIXELS_PER_TASK: usize = 1024;

/// Whether [`grad_weight_by_rows`] computes `g`'s grad-weight: where [`applies`], on images too
/// small for pixel ranges (under 1024 pixels per thread). On larger images each task sums a range
/// of pixels of every image into its own copy, as `conv::grad_weight` does for any layer with
/// too few images.
pub fn grad_weight_by_rows_applies(exec: Exec, g: &ConvGeometry) -> bool {
    applies(exec, g) && g.out_pixels().div_ceil(exec.threads()) < MIN_PIXELS_PER_TASK
}

/// `gw = Σ gy · xᵀ` over images and pixels (overwritten), each task a run of the gradient's
/// rows (output channels, `K` weights each) over every pixel.
pub fn grad_weight_by_rows(exec: Exec, g: &ConvGeometry, x: &[f32], gy: &[f32], gw: &mut [f32]) {
    let s = GroupSlices::new(g);
    let p = s.p;
    for_each_task(exec.threads(), gw, s.k, &mut [], 0, |rows, gwc, _| {
        gwc.fill(0.0);
        let base = rows.start;
        for n in 0..g.batch {
            for_each_group_run(rows.clone(), g.out_channels, s.cog, |_, grp, run| {
                let first = grp * s.cog + run.start - base;
                let gyg = &s.output(gy, 0, n, grp)[run.start * p..run.end * p];
                let gyv = MatView::dense(gyg, run.len(), p);
                let xt = MatView::dense(s.input(x, 0, n, grp), s.cig, p).t();
                let out = &mut gwc[first * s.k..(first + run.len()) * s.k];
                gemm(out, s.k, gyv, xt, true, 1);
            });
        }
    });
}
