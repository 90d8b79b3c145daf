//! Grad-weight of stride-1 convolutions whose output is as wide as the input, as one GEMM per
//! tap on the planes in place: `gW[:, :, i, j] = gY · shift(x)ᵀ`, the product over the tap's
//! positions of the output-gradient rows (cout × positions, NCHW) and the input rows shifted by
//! the tap's offset (cin × positions, NCHW).
//!
//! With stride 1 and `out_w = in_w`, output position `p` of tap (i, j) reads input position
//! `p + off` (the shifted kernel's `Tap`), so both operands are plain strided views of the
//! tensors and the GEMM (faer) reads them without im2col. A tap's positions run from its first
//! valid row and column to its last as one contiguous range; for a tap with a column shift
//! that range also holds the positions of the columns that would read across a row boundary
//! (`|dx|` per row), whose products a second, small GEMM over gathered copies of those
//! positions subtracts again.
//!
//! Beside [`super::shifted_grad_weight`], which needs no correction and no packing but keeps
//! per-lane partial sums, this wins wherever those partial sums are large against the work per
//! image: many channels or small images (the shifted kernel stays on large images with few
//! channels; see [`applies`]).

use super::depthwise::{PhaseLayout, fill_phases};
use super::gemm::{MatView, gemm};
use super::shifted_grad_weight::{self, Tap, sum_task_partials};
use super::simd::SimdF32;
use super::{Exec, ImageSums, Workspace, for_each_image_task};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Whether [`grad_weight`] computes `g`'s grad-weight: stride 1, an output as wide as the
/// input, not pointwise, more than one input channel per group (one is the depthwise kernel's
/// job), images for every thread, a kernel one column wide or at most 128 × 128 channels per
/// group, and not a shape the shifted kernel does faster (images of at least 56 × 56 pixels
/// with at most 64 × 64 channels per group; measurements at `prefers_shifted`).
///
/// Kernels with column shifts on many channels stay on im2col + faer, whose one long product
/// (K = cin·kh·kw) beats short per-tap products there, more so as the wrapped positions are
/// computed twice: reference layer D's sizes (8 × 512 → 512 at 14 × 14, 2 threads), 1 × 3
/// 13.0–13.1 against 12.2–12.7 ms, 3 × 3 41.5–42.3 against 40.0–40.2 ms. Without column
/// shifts this kernel wins there too (D's 3 × 1: 12.0 against 12.2 ms).
pub fn applies(exec: Exec, g: &ConvGeometry) -> bool {
    g.stride_h == 1
        && g.stride_w == 1
        && g.out_w == g.in_w
        && !g.is_pointwise()
        && g.in_channels_per_group() > 1
        && g.batch >= exec.threads()
        && (g.kernel_w == 1 || g.in_channels_per_group() * g.out_channels_per_group() <= 128 * 128)
        && !(shifted_grad_weight::applies(exec, g) && prefers_shifted(g))
}

/// Where the shifted kernel measured faster or as fast (2 threads, batch 8, grad-weight): large
/// images with few channels. 3 × 1, 32 → 32 channels at 112 × 112: 3.3–3.4 against 3.5–3.6 ms
/// here, at 56 × 56 0.73 against 0.79; 64 → 64 at 112 × 112 13.0–13.1 against 13.6–13.9;
/// reference layer B's 1 × 3 (32 → 64 at 112 × 112) and 3 × 3 a tie (6.9–7.1 and 19.1 ms both).
/// This kernel won on the others, against the shifted kernel or im2col + faer: 3 × 1 64 → 64 at
/// 56 × 56 2.97 against 3.05; reference layer C (128 → 128 at 56 × 56) 3 × 1 12.1–12.3 against
/// 13.8–14.0, 1 × 3 12.7–13.0 against 14.0–14.3, 3 × 3 36.1–36.3 against 40.2–40.4 ms; 3 × 1
/// 32 → 64 at 28 × 28 0.37 against 0.42; and at batch 64 the MNIST network's blocks, 32 → 64
/// at 14 × 14 (3 × 3 2.47 against 3.24, 1 × 3 0.85 against 1.11 ms) and 64 → 128 at 7 × 7
/// (3 × 3 2.5 against 3.1, 1 × 3 0.91–1.01 against 1.08, 3 × 1 64 → 64 0.39 against 0.71).
fn prefers_shifted(g: &ConvGeometry) -> bool {
    g.out_pixels() >= 56 * 56 && g.in_channels_per_group() * g.out_channels_per_group() <= 64 * 64
}

/// Grad-weight `gw` (overwritten) of a convolution where [`applies`]. Images are split over
/// tasks; each accumulates its own copy of the gradient, laid out tap by tap, and the copies
/// are summed into `gw` at the end.
///
/// With `gb`, also grad-bias (overwritten), bit for bit [`super::conv2d_grad_bias`], from each
/// image's output gradient right after its products, while it is in the caches.
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    gb: Option<&mut [f32]>,
    ws: &mut Workspace,
) -> Result<()> {
    let (kh, kw) = (g.kernel_h, g.kernel_w);
    let t_count = kh * kw;
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let spans: Vec<(usize, TapSpan)> = (0..t_count)
        .filter_map(|t| Tap::new(g, t / kw, t % kw).map(|tap| (t, TapSpan::new(g, tap))))
        .collect();
    let wlen = gw.len();
    let work = wlen + (cig + cog) * max_wrapped(g);
    let tasks = exec.threads().min(g.batch);
    // Per task: its products and gathered operands, then its images' sums.
    let sums = ImageSums::new(g, tasks, work, gb.is_some());
    let per_task = sums.per_task();
    let scratch = ws.take(per_task * tasks)?;
    for_each_image_task(g.batch, scratch, per_task, |images, s| {
        s[..wlen].fill(0.0);
        for n in images.clone() {
            let (part, gathered) = s[..work].split_at_mut(wlen);
            for grp in 0..g.groups {
                let xg = &x[(n * g.in_channels + grp * cig) * hw..][..cig * hw];
                let gyg = &gy[(n * g.out_channels + grp * cog) * ohw..][..cog * ohw];
                for (t, span) in &spans {
                    let out = &mut part[(grp * t_count + t) * cog * cig..][..cog * cig];
                    tap_product(g, span, xg, gyg, out, gathered);
                }
            }
            sums.add_image(exec.isa(), s, n - images.start, g, gy, n);
        }
    });
    // The copies' first wlen floats are laid out [group][tap][out][in], one lane.
    sum_task_partials(g, scratch, per_task, 1, gw);
    if let Some(gb) = gb {
        sums.grad_bias(g.batch, scratch, gb);
    }
    Ok(())
}

/// Most positions of one tap that read across a row boundary: `|dx|` columns of every output
/// row, `|dx| ≤ max(pad_left, pad_right)` for an output as wide as the input.
fn max_wrapped(g: &ConvGeometry) -> usize {
    g.out_h * g.pad_left.max(g.pad_right)
}

/// The positions one tap's products run over, the same for every image.
struct TapSpan {
    /// Input position minus output position.
    off: isize,
    /// From the first valid position to the last: every valid position, and between them the
    /// wrapped ones of a column-shifted tap. Input position p + off of each lies in the plane
    /// (Tap::new: the first and last are valid).
    first: usize,
    end: usize,
    /// The wrapped positions between first and end: the columns outside the tap's valid ones
    /// (a left shift's in the rows after the first, a right shift's before the last).
    wrapped: Vec<usize>,
}

impl TapSpan {
    fn new(g: &ConvGeometry, tap: Tap) -> Self {
        let width = g.in_w;
        let ((r0, r1), (c0, c1)) = (tap.rows, tap.cols);
        let (first, end) = (r0 * width + c0, (r1 - 1) * width + c1);
        let wrapped = if tap.whole_rows(width) {
            Vec::new()
        } else {
            // Allocated once for every candidate (collected, the filtered flat map grew the
            // vector by doubling).
            let mut wrapped = Vec::with_capacity((r1 - r0) * (width - (c1 - c0)));
            wrapped.extend(
                (r0..r1)
                    .flat_map(|r| (0..c0).chain(c1..width).map(move |u| r * width + u))
                    .filter(|p| (first..end).contains(p)),
            );
            wrapped
        };
        TapSpan {
            off: tap.off,
            first,
            end,
            wrapped,
        }
    }
}

/// `out (cog × cig) += gY[:, P] · x[:, P + off]ᵀ` over one tap's valid positions P of one
/// image and group (`xg`, `gyg`: its channels' planes): the product over the span, then the
/// wrapped positions' products subtracted (`gathered` holds their operands).
fn tap_product(
    g: &ConvGeometry,
    span: &TapSpan,
    xg: &[f32],
    gyg: &[f32],
    out: &mut [f32],
    gathered: &mut [f32],
) {
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let len = span.end - span.first;
    let x_first = span.first.wrapping_add_signed(span.off);
    let gy_rows = MatView::row_major(&gyg[span.first..], cog, len, ohw);
    let x_rows = MatView::row_major(&xg[x_first..], cig, len, hw);
    gemm(out, cig, gy_rows, x_rows.t(), true, 1);
    let k = span.wrapped.len();
    if k == 0 {
        return;
    }
    let (gy_part, x_part) = gathered.split_at_mut(cog * k);
    for (o, row) in gy_part.chunks_exact_mut(k).enumerate() {
        for (v, &p) in row.iter_mut().zip(&span.wrapped) {
            // Negated: this product subtracts what the main one added.
            *v = -gyg[o * ohw + p];
        }
    }
    for (c, row) in x_part[..cig * k].chunks_exact_mut(k).enumerate() {
        for (v, &p) in row.iter_mut().zip(&span.wrapped) {
            *v = xg[c * hw + p.wrapping_add_signed(span.off)];
        }
    }
    gemm(
        out,
        cig,
        MatView::dense(gy_part, cog, k),
        MatView::dense(&x_part[..cig * k], cig, k).t(),
        true,
        1,
    );
}

/// Whether [`grad_weight_on_phases`] computes `g`'s grad-weight: strided layers (more than one
/// input channel per group, images for every thread), unless short products (under 256 flat
/// positions per image) meet many channels (over 128 × 128 per group).
///
/// Measured against the implicit GEMM or im2col + faer (2 threads, batch 8, min of 10–15,
/// alternated): reference layer E's std (3 × 3 stride 2, 128 → 256 at 56 × 56) 20.0–20.1 →
/// 19.1–19.3 ms; its spatially separable halves, 3 × 1 at stride (2, 1) 6.56–6.69 → 6.40–6.44
/// and 1 × 3 at stride (1, 2) 6.69–7.14 → 6.45–6.54; 3 × 3 stride 2 32 → 64 at 112 × 112
/// 7.7–9.7 → 5.5, 16 → 16 at 64 × 64 0.82 → 0.34–0.56; 1 × 1 stride 2 64 → 128 at 56 × 56 a
/// tie (0.65–0.73 against 0.64–0.65). Slower with 256 → 512 channels at 28 × 28 (14 × 15
/// positions): 22.4–22.6 against 21.1–21.7 ms.
pub fn applies_on_phases(exec: Exec, g: &ConvGeometry) -> bool {
    let wq = PhaseLayout::phase_width(g);
    (g.stride_h > 1 || g.stride_w > 1)
        && !g.is_pointwise()
        && g.in_channels_per_group() > 1
        && g.batch >= exec.threads()
        && (g.out_h * wq >= 256
            || g.in_channels_per_group() * g.out_channels_per_group() <= 128 * 128)
}

/// Grad-weight `gw` (overwritten) of a strided convolution as one GEMM per tap over the input's
/// phase planes: with the input split into stride phases (the implicit GEMM's layout), tap t of
/// output position p reads position `p + off_t` of one phase plane, so
/// `gW[:, :, t] = gY_wide · phases[:, off_t ..]ᵀ`, where `gY_wide` is the output gradient with
/// the phase planes' row width (zero columns past the output's, which cancel the extra
/// positions; used in place when the widths agree).
///
/// With `gb`, also grad-bias (overwritten), bit for bit [`super::conv2d_grad_bias`], from each
/// image's output gradient right after its products, while it is in the caches.
pub fn grad_weight_on_phases(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    gb: Option<&mut [f32]>,
    ws: &mut Workspace,
) -> Result<()> {
    let l = PhaseLayout::new(g);
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let wide = l.wq != g.out_w;
    let wlen = gw.len();
    let work = wlen + cig * l.len + if wide { cog * l.positions } else { 0 };
    let tasks = exec.threads().min(g.batch);
    // Per task: its products, phase planes and widened gradient, then its images' sums.
    let sums = ImageSums::new(g, tasks, work, gb.is_some());
    let per_task = sums.per_task();
    let scratch = ws.take(per_task * tasks)?;
    for_each_image_task(g.batch, scratch, per_task, |images, s| {
        phase_products(exec.isa(), g, &l, x, gy, images, wlen, &sums, s)
    });
    sum_task_partials(g, scratch, per_task, 1, gw);
    if let Some(gb) = gb {
        sums.grad_bias(g.batch, scratch, gb);
    }
    Ok(())
}

crate::simd_dispatch!(fn phase_products => phase_products_kernel(
    g: &ConvGeometry, l: &PhaseLayout, x: &[f32], gy: &[f32],
    images: std::ops::Range<usize>, wlen: usize, sums: &ImageSums, s: &mut [f32]
));

/// One task of [`grad_weight_on_phases`]: its images' products into the first `wlen` floats
/// of `s` ([group][tap][out][in]), then the phase planes, the widened gradient and `sums`' rows.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn phase_products_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &PhaseLayout,
    x: &[f32],
    gy: &[f32],
    images: std::ops::Range<usize>,
    wlen: usize,
    sums: &ImageSums,
    s: &mut [f32],
) {
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let (hw, ohw, ow) = (g.in_pixels(), g.out_pixels(), g.out_w);
    let t_count = g.kernel_h * g.kernel_w;
    let work = sums.offset();
    s[..wlen].fill(0.0);
    // Columns past the output's stay zero.
    s[wlen + cig * l.len..work].fill(0.0);
    for (local, n) in images.enumerate() {
        let (part, rest) = s[..work].split_at_mut(wlen);
        let (planes, gy_wide) = rest.split_at_mut(cig * l.len);
        for grp in 0..g.groups {
            for (c, buf) in planes.chunks_exact_mut(l.len).enumerate() {
                let plane = (n * g.in_channels + grp * cig + c) * hw;
                fill_phases::<S>(g, l, &x[plane..plane + hw], buf, local == 0 && grp == 0);
            }
            let gyg = &gy[(n * g.out_channels + grp * cog) * ohw..][..cog * ohw];
            let gy_rows = if gy_wide.is_empty() {
                MatView::row_major(gyg, cog, l.positions, ohw)
            } else {
                for (src, dst) in gyg
                    .chunks_exact(ohw)
                    .zip(gy_wide.chunks_exact_mut(l.positions))
                {
                    for (s_row, d_row) in src.chunks_exact(ow).zip(dst.chunks_exact_mut(l.wq)) {
                        d_row[..ow].copy_from_slice(s_row);
                    }
                }
                MatView::dense(gy_wide, cog, l.positions)
            };
            for (t, &off) in l.offsets.iter().enumerate() {
                let x_rows = MatView::row_major(&planes[off..], cig, l.positions, l.len);
                let out = &mut part[(grp * t_count + t) * cog * cig..][..cog * cig];
                gemm(out, cig, gy_rows, x_rows.t(), true, 1);
            }
        }
        sums.add_image(S::ISA, s, local, g, gy, n);
    }
}
