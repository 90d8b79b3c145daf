//! Grad-weight with each image split over the threads by input channels, as products of the
//! output gradient (used in place) with a pixel-major copy of each thread's input channels.
//!
//! Thread t owns input channels `c0 .. c1` (of every group), so it owns columns
//! `c0·taps .. c1·taps` of every row of `gw` (OIHW): it reads no other thread's results and
//! adds up no partial sums. Per image it transposes its channels into padded pixel rows
//! (`xᵀ`, zero borders, so every tap of every output position reads a row of it, whatever the
//! stride, dilation or padding), then for a chunk of output positions gathers, position by
//! position and tap by tap, the tap's pixel row (its channels, contiguous) into `colᵀ`
//! (positions × (tap, channel)), and multiplies:
//! `G (cout × (tap, channel)) (+)= gY[:, chunk] · colᵀ`, with [`small_k_gemm`] reading gY's rows
//! by broadcasts where they lie. A last pass interleaves G's columns into `gw`'s (channel, tap)
//! order, streamed into `gw` where it is large.
//!
//! It replaces, where too few images leave threads without images of their own, im2col + faer
//! split by pixel ranges (each thread a whole copy of the gradient, summed at the end, and
//! faer's packing around short products: 81% of a core's peak on reference layer D's 3 × 1
//! half at batch 1) and, on odd batches, the per-tap GEMMs' image split (2 + 1 images on 2
//! threads). A first version transposed the output gradient instead (each thread all of it):
//! slower on stride-1 layers, where that gradient is as large as the input.
//!
//! Harness, batch 1 unless said, 2 threads, min of 30–50, back to back: reference layer C's
//! std 4.95–5.15 → 4.42–4.46 ms, E's std 2.54–2.65 → 2.45–2.48, C's 1 × 3 half 1.64 → 1.56,
//! D's 3 × 1 and 1 × 3 halves 1.65–1.76 → 1.54–1.60, 3 × 3 stride 2 32 → 64 at 112² 0.88–0.92
//! → 0.69–0.79, 64 → 128 at 56² 0.85–0.95 → 0.69–0.71; on 3 images C's 3 × 1 half 6.2 → 4.85,
//! E's std 7.4–8.0 → 7.2–7.4. A tie on C's 3 × 1; slower on E's 3 × 1 stride (2, 1) half
//! (0.78 → 0.80, kept: no exchange between the threads, which the VM's slow spells punish).
//! Left to others: 1 × 1 kernels (a stride-2 one 0.34 → 0.43), more than `MAX_COLUMNS`
//! columns (reference layer D's std, 5.2 → 5.5), large images with few channels (the
//! shifted kernel: B's halves 0.37 and 0.75 against 0.63 and 1.06).

use rayon::prelude::*;

use super::implicit::{PixelRows, transpose_planes, transposed_stride};
use super::pointwise::{ColumnWindow, Operands, Rows, Store, small_k_gemm};
use super::simd::{SimdF32, copy_streaming};
use super::{Exec, Workspace, splits_inside_images};
use crate::error::Result;
use crate::geometry::ConvGeometry;

/// Whether [`grad_weight`] computes `g`'s grad-weight: too few images for the threads, more
/// than one tap, at least 16 input channels per group for each thread and at most 1024
/// columns of `colᵀ` (taps × channels per thread; see the module doc).
pub fn applies(exec: Exec, g: &ConvGeometry) -> bool {
    let per_thread = g.in_channels_per_group().div_ceil(exec.threads());
    splits_inside_images(exec.threads(), g.batch)
        && g.kernel_h * g.kernel_w > 1
        && per_thread >= MIN_CHANNELS_PER_THREAD
        && per_thread * g.kernel_h * g.kernel_w <= MAX_COLUMNS
}

/// Fewest input channels per group for each thread: fewer make the rows of `colᵀ` too short
/// for the product's column blocks.
const MIN_CHANNELS_PER_THREAD: usize = 16;

/// Most columns of `colᵀ` (taps × channels per thread): a chunk of it and a block of G's rows
/// stay in L2.
const MAX_COLUMNS: usize = 1024;

/// Output positions per chunk of `colᵀ` (the product's K).
const CHUNK: usize = 256;

/// Output channels per product call: the block of G it accumulates stays in L2 across a
/// chunk's columns.
const ROW_BLOCK: usize = 64;

/// Where each thread's scratch puts what, and the padded pixel grid of `xᵀ`.
#[derive(Clone, Copy, Debug)]
struct Layout {
    /// Input channels per thread (the last may have fewer).
    per_thread: usize,
    /// Width and height of the padded input.
    wp: usize,
    hp: usize,
    /// Row stride of `xᵀ` (floats).
    ld: usize,
    /// Positions per chunk.
    chunk: usize,
    /// Floats of G, `xᵀ` and `colᵀ` per thread.
    g_len: usize,
    xt_len: usize,
    col_len: usize,
}

impl Layout {
    fn new(g: &ConvGeometry, tasks: usize) -> Self {
        let per_thread = g.in_channels_per_group().div_ceil(tasks);
        let taps = g.kernel_h * g.kernel_w;
        let (wp, hp) = (
            g.in_w + g.pad_left + g.pad_right,
            g.in_h + g.pad_top + g.pad_bottom,
        );
        let ld = transposed_stride(per_thread);
        let chunk = CHUNK.min(g.out_pixels());
        Layout {
            per_thread,
            wp,
            hp,
            ld,
            chunk,
            g_len: g.groups * g.out_channels_per_group() * taps * per_thread,
            xt_len: hp * wp * ld,
            col_len: chunk * taps * per_thread,
        }
    }

    fn per_task(&self) -> usize {
        self.g_len + self.xt_len + self.col_len
    }
}

/// Grad-weight `gw` (overwritten) of a convolution where [`applies`] (see the module doc).
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let (cig, taps) = (g.in_channels_per_group(), g.kernel_h * g.kernel_w);
    let tasks = exec.threads().min(cig).max(1);
    let l = Layout::new(g, tasks);
    let scratch = ws.take(l.per_task() * tasks)?;
    let bounds: Vec<usize> = (0..=tasks)
        .map(|t| (t * l.per_thread).min(cig) * taps)
        .collect();
    ColumnWindow::split(gw, cig * taps, &bounds)
        .into_par_iter()
        .zip(scratch.par_chunks_mut(l.per_task()))
        .enumerate()
        .for_each(|(t, (window, s))| {
            let channels = (t * l.per_thread).min(cig)..((t + 1) * l.per_thread).min(cig);
            thread_columns(exec.isa(), g, &l, x, gy, channels, window, s)
        });
    Ok(())
}

crate::simd_dispatch!(fn thread_columns => thread_columns_kernel(
    g: &ConvGeometry, l: &Layout, x: &[f32], gy: &[f32],
    channels: std::ops::Range<usize>, gw: ColumnWindow<'_>, s: &mut [f32]
));

/// One thread of [`grad_weight`]: the columns of `gw` of input channels `channels` (of every
/// group), from every image.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn thread_columns_kernel<S: SimdF32>(
    g: &ConvGeometry,
    l: &Layout,
    x: &[f32],
    gy: &[f32],
    channels: std::ops::Range<usize>,
    mut gw: ColumnWindow<'_>,
    s: &mut [f32],
) {
    let nc = channels.len();
    if nc == 0 {
        return;
    }
    let (cig, cog) = (g.in_channels_per_group(), g.out_channels_per_group());
    let (kw, taps) = (g.kernel_w, g.kernel_h * g.kernel_w);
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let p = taps * nc;
    let (grad, rest) = s.split_at_mut(l.g_len);
    let (xt, col) = rest.split_at_mut(l.xt_len);
    clear_borders(g, l, xt);
    // Tap (i, j) of the output position at pixel row `base` of xᵀ reads row base + tap_rows[t].
    let tap_rows: Vec<usize> = (0..taps)
        .map(|t| (t / kw) * g.dilation_h * l.wp + (t % kw) * g.dilation_w)
        .collect();
    for n in 0..g.batch {
        for grp in 0..g.groups {
            let planes = &x[(n * g.in_channels + grp * cig + channels.start) * hw..][..nc * hw];
            let at = PixelRows {
                top: g.pad_top,
                left: g.pad_left,
                row_width: l.wp,
                ld: l.ld,
            };
            // SAFETY: the ISA is this CPU's (the caller's contract); transpose_planes checks
            // the lengths.
            unsafe { transpose_planes::<S>(planes, nc, g.in_h, g.in_w, at, xt) };
            let gy_group = &gy[(n * g.out_channels + grp * cog) * ohw..][..cog * ohw];
            let grad_group = &mut grad[grp * cog * p..][..cog * p];
            for p0 in (0..ohw).step_by(l.chunk) {
                let pc = l.chunk.min(ohw - p0);
                for (q, row) in col[..pc * p].chunks_exact_mut(p).enumerate() {
                    let (oy, ox) = ((p0 + q) / g.out_w, (p0 + q) % g.out_w);
                    let base = oy * g.stride_h * l.wp + ox * g.stride_w;
                    for (dst, &off) in row.chunks_exact_mut(nc).zip(&tap_rows) {
                        dst.copy_from_slice(&xt[(base + off) * l.ld..][..nc]);
                    }
                }
                let ops = Operands::dense(&gy_group[p0..], cog, pc, &col[..pc * p], p, p, None);
                let ops = Operands {
                    c_rows: Rows::Strided(ohw),
                    ..ops
                };
                // The first product overwrites (saves zeroing G).
                let store = if n == 0 && p0 == 0 {
                    Store::Cached
                } else {
                    Store::Accumulate
                };
                for r0 in (0..cog).step_by(ROW_BLOCK) {
                    let rows = r0..cog.min(r0 + ROW_BLOCK);
                    let out = &mut grad_group[r0 * p..rows.end * p];
                    small_k_gemm(S::ISA, ops.rows(rows), out, p, store);
                }
            }
        }
    }
    // gw[grp·cog + co][c·taps + t] = G[grp][co][t·nc + c − c0].
    // Row by row, each interleaved in L1 (`colᵀ`'s first row, free now) and copied into gw,
    // streamed where gw is large (see STREAM_MIN_FLOATS).
    let cols = channels.start * taps..channels.end * taps;
    let stream = g.weight_len() >= STREAM_MIN_FLOATS;
    let tmp = &mut col[..p];
    for grp in 0..g.groups {
        for (co, src) in grad[grp * cog * p..][..cog * p].chunks_exact(p).enumerate() {
            match taps {
                3 => interleave_taps::<3>(src, nc, tmp),
                9 => interleave_taps::<9>(src, nc, tmp),
                _ => {
                    for (t, src_tap) in src.chunks_exact(nc).enumerate() {
                        for (v, &s) in tmp[t..].iter_mut().step_by(taps).zip(src_tap) {
                            *v = s;
                        }
                    }
                }
            }
            let row = gw.row_columns(grp * cog + co, cols.clone());
            if stream {
                // SAFETY: the ISA is this CPU's (the caller's contract).
                unsafe { copy_streaming::<S>(tmp, row) };
            } else {
                row.copy_from_slice(tmp);
            }
        }
    }
    if stream {
        // SAFETY: as above; orders the streaming stores before whatever reads gw next.
        unsafe { S::fence() };
    }
}

/// Fewest floats of grad-weight that [`grad_weight`] streams into memory (non-temporal
/// stores): gw is written once and read by nothing until the optimizer, and a large one has
/// left the caches since the last step, so ordinary stores read each of its lines in first.
/// Reference layer D's 3 × 1 and 1 × 3 halves at batch 1 (786 432 floats of gw each),
/// grad-weight inside the training step (harness, min of 40, alternated 3×): 2.04–2.11 →
/// 1.87–1.93 ms with the vCPUs on different dies; the step (min of 60–150, alternated 8×)
/// 9.43–9.62 → 9.23–9.50 ms; E's standard layer (294 912 floats) a tie (6.95–7.05 →
/// 6.96–6.97). Smaller ones stay in the caches between steps: C's halves (49 152 floats)
/// measured 9.11–9.29 → 9.21–9.34 ms streamed (9.03–9.05 → 9.02–9.05 not).
const STREAM_MIN_FLOATS: usize = 1 << 18;

/// `out[c·T + t] = src[t·nc + c]`: one row of G in gw's (channel, tap) order, with the tap
/// count known to the compiler (a runtime count left a loop of index arithmetic per element).
fn interleave_taps<const T: usize>(src: &[f32], nc: usize, out: &mut [f32]) {
    let src: [&[f32]; T] = std::array::from_fn(|t| &src[t * nc..][..nc]);
    for (c, dst) in out[..T * nc].chunks_exact_mut(T).enumerate() {
        for t in 0..T {
            dst[t] = src[t][c];
        }
    }
}

/// Zeroes the rows of `xᵀ` that lie in the padding (the transpose writes only the image's).
fn clear_borders(g: &ConvGeometry, l: &Layout, xt: &mut [f32]) {
    let row = l.wp * l.ld;
    let (top, bottom) = (g.pad_top * row, (g.pad_top + g.in_h) * row);
    xt[..top].fill(0.0);
    xt[bottom..l.hp * row].fill(0.0);
    if g.pad_left + g.pad_right > 0 {
        for r in xt[top..bottom].chunks_exact_mut(row) {
            r[..g.pad_left * l.ld].fill(0.0);
            r[(g.pad_left + g.in_w) * l.ld..].fill(0.0);
        }
    }
}
