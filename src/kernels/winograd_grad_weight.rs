//! Grad-weight of the layers whose forward runs on Winograd ([`winograd`]), on Winograd too.
//!
//! A tile's output is linear in the kernel: Y = Aᵀ [U ⊙ V] A with U = G g Gᵀ (3 × 3; G g for
//! 3 × 1 and 1 × 3) and V = Bᵀ d B the transformed input patch. So the gradient of the
//! transformed kernel is dU = Σ_tiles (A dY Aᵀ) ⊙ V, and that of the kernel is G's adjoint of
//! it, dg = Gᵀ dU G. Over channels, per transformed position ξ, the sum over tiles is one
//! matrix product, `dU[ξ] (N × M) += Z[ξ] (N × tiles) · V[ξ]ᵀ (tiles × M)` with
//! Z = A dY Aᵀ the transformed output gradient: the forward's products with the tiles as the
//! inner dimension. Per output pixel that is 36 / 16 multiplications per channel pair for
//! F(4×4, 3×3) instead of 9 (4× fewer), 16 / 4 for F(2×2, 3×3) (2.25×), 6 / 4 for F(4, 3)
//! instead of 3 (2×).
//!
//! The input transform and the blocks (tile rows of one image, or several small images side by
//! side) are the forward's; Z's transform is the output transform's adjoint: each tile's
//! output-gradient values read from the planes (zero past the last row and column), `A y` on
//! the columns and rows. Each task sums its images into its own dU; the tasks' sums are added
//! and transformed back by the filter transform's adjoint at the end. With too few images for
//! the threads, each image's transforms are split by channels and its products by ξ; so are
//! blocks of small images with many channels, shared by the threads, whose one dU saves a
//! copy per thread ([`shares_image_blocks`]).

use super::gemm::{MatView, gemm};
use super::simd::SimdF32;
use super::winograd::{
    self, FilterMatrix, Tiling, Transform, block_len, block_rows, column, deinterleave4,
    fill_all_phases, fill_phases_by_channels, for_each_block_within_images, images_per_block,
    store_lanes, transform_input, transform_input_by_channels,
};
use super::{Exec, Isa, Workspace, for_each_image_task, shifted_grad_weight, splits_inside_images};
use crate::error::Result;
use crate::geometry::ConvGeometry;
use rayon::prelude::*;
use std::ops::Range;

/// Whether [`grad_weight`] computes `g`'s grad-weight: Winograd's tiles pay
/// (`winograd::tiles_pay`); 3 × 3 kernels whose forward runs on Winograd, 3 × 1 and 1 × 3
/// kernels with fewer channels than their forward needs (see `F4_MIN_CHANNELS`) on images of
/// at least `MIN_TILES_WITHIN_IMAGES` tiles; where the threads cannot share the batch image by
/// image, each image has at least that many tiles; and the input has at least 16 channels or
/// the shifted kernel, built for few channels, does not apply (see `MIN_INPUT_CHANNELS`).
pub fn applies(exec: Exec, g: &ConvGeometry) -> bool {
    let Some(transform) = Transform::of(g) else {
        return false;
    };
    let (tiles_h, tiles_w) = transform.tiles(g);
    let many_tiles = tiles_h * tiles_w >= MIN_TILES_WITHIN_IMAGES;
    let low_channel_f4 = matches!(transform, Transform::F4Down | Transform::F4Across)
        && many_tiles
        && winograd::tiles_pay(g)
        && winograd::harmonic_channels_at_least(g, F4_MIN_CHANNELS);
    (winograd::applies(g) || low_channel_f4)
        && (!splits_inside_images(exec.threads(), g.batch) || many_tiles)
        && (g.in_channels >= MIN_INPUT_CHANNELS
            || !(shifted_grad_weight::applies(exec, g)
                || shifted_grad_weight::within_images_applies(exec, g)))
}

/// Harmonic mean of the input and output channel counts from which 3 × 1 and 1 × 3 layers on
/// images of at least [`MIN_TILES_WITHIN_IMAGES`] tiles take Winograd's grad-weight, below the
/// forward's 96 (`winograd::F4_MIN_CHANNELS`): its products sum over the tiles, a long inner
/// dimension, where the forward's run over the input channels, a short one. Intel Xeon VM
/// (harness, 2 threads, min of 10, alternated in one process; kernel chosen before →
/// Winograd): batch 8, 32 → 64 at 112² 12.1 → 9.0 and 8.4 → 6.4 ms (1 × 3), 10.2 → 8.8 and 8.0
/// → 7.4 (3 × 1); 48 → 48 at 56² 3.60 → 2.58 (3 × 1); 64 → 64 at 56² 3.68 → 2.60 (3 × 1), 2.49
/// → 2.47 (1 × 3); 64 → 64 at 28² 0.69 → 0.62 (1 × 3); one image, 32 → 64 at 112² 1.62 → 1.49
/// (3 × 1), 64 → 64 at 56² 0.97 → 0.65 and 0.95 → 0.63. Not taken: 32 → 32 at 112² 6.3 → 6.5
/// (3 × 1); 16 → 32 at 112² 2.09 → 2.48; 56-tile images (32 → 64 at 14², batch 64, 1 × 3: 0.83
/// → 0.93).
const F4_MIN_CHANNELS: usize = 40;

/// Tiles per image from which an image's products, split over the threads by transformed
/// position ([`sum_within_images`]), beat the kernels that split the image otherwise: each
/// product adds its N × M result into dU over an inner dimension of one image's tiles. Intel
/// Xeon VM (harness, 2 threads, min of 10, alternated in one process; other kernel →
/// Winograd): one image, 32 → 64 at 112² (784 tiles) 4.85 → 2.70 ms, 128 → 128 at 56² (196)
/// 6.80 → 3.62, its 3 × 1 and 1 × 3 (784) 2.46 → 1.78 and 2.50 → 1.78, 64 → 64 at 28² (196)
/// 0.70 → 0.63; three images of 128 → 128 at 56² 20.9 → 9.1; but 512 → 512 at 14² (49 tiles)
/// 6.71 → 9.24, its 1 × 3 (56) 2.26 → 3.69, three images of 64 → 64 at 14² 0.42 → 0.52.
const MIN_TILES_WITHIN_IMAGES: usize = 128;

/// Input channels from which Winograd's grad-weight beats the shifted kernel on large images:
/// with M = 8 each product's result is a thin N × 8 matrix summed over a long inner
/// dimension. Intel Xeon VM (harness, batch 8, 2 threads, min of 8, 3 × 3 "same" at 112²,
/// shifted → Winograd): 8 → 16 2.10 → 2.62 ms, 8 → 32 3.35 → 3.80, 8 → 64 7.46 → 7.83; 12 → 16
/// 2.56 → 2.54; 16 → 16 4.81 → 4.12, 16 → 32 8.55 → 5.77; 32 → 64 44.4 → 20.1. One image
/// (each split inside): 8 → 16 0.28 → 0.46, 16 → 32 1.09 → 0.95.
const MIN_INPUT_CHANNELS: usize = 16;

/// `gw = ∂L/∂w` from `x` and `gy` (overwritten), on Winograd.
pub fn grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let t = Tiling::new(g)?;
    let (m_in, taps) = (g.in_channels, g.kernel_h * g.kernel_w);
    let du_len = t.xis() * g.out_channels * m_in;
    let within_images = splits_inside_images(exec.threads(), g.batch);
    let shared = shares_image_blocks(exec, g);
    // Tasks with a dU of their own: one where the threads split each image or share blocks of
    // images, else one per thread's run of images (for_each_image_task's split).
    let tasks = if within_images || shared {
        1
    } else {
        exec.threads().min(g.batch)
    };
    // The images a task's blocks are drawn from, and those whose phase planes it holds at once.
    let (task_images, plane_images) = if within_images {
        (1, 1)
    } else if shared {
        (g.batch, images_per_block(g, &t, g.batch))
    } else {
        (g.batch.div_ceil(tasks), 1)
    };
    let planes_len = plane_images * m_in * t.layout.len;
    // Per task: its dU, its phase planes, a block's V and Z; then each thread's rows for the
    // final transform.
    let per_task = du_len + planes_len + block_len(g, &t, task_images);
    let scratch = ws.take(per_task * tasks + exec.threads() * (taps + 1) * m_in)?;
    let (sums, rows) = scratch.split_at_mut(per_task * tasks);
    if within_images || shared {
        let (du, rest) = sums.split_at_mut(du_len);
        let (phases, buf) = rest.split_at_mut(planes_len);
        if shared {
            sum_image_blocks(exec, g, &t, x, gy, phases, buf, du);
        } else {
            sum_within_images(exec, g, &t, x, gy, phases, buf, du);
        }
    } else {
        for_each_image_task(g.batch, sums, per_task, |images, s| {
            let (du, rest) = s.split_at_mut(du_len);
            let (phases, buf) = rest.split_at_mut(planes_len);
            sum_images(exec.isa(), g, &t, x, gy, images, phases, buf, du);
        });
    }
    kernels_from_sums(exec, g, &t, sums, per_task, rows, gw);
    Ok(())
}

/// Sums the images `images` into `du` (`[ξ][n][m]`, overwritten), a block at a time: tile
/// rows of one image ([`block_rows`]), or several whole images side by side
/// ([`images_per_block`]). `phases` holds one image's phase planes, `buf` a block's V and Z
/// ([`block_len`]).
#[allow(clippy::too_many_arguments)]
fn sum_images(
    isa: Isa,
    g: &ConvGeometry,
    t: &Tiling,
    x: &[f32],
    gy: &[f32],
    images: Range<usize>,
    phases: &mut [f32],
    buf: &mut [f32],
    du: &mut [f32],
) {
    let (m_in, n_out, xis) = (g.in_channels, g.out_channels, t.xis());
    let (img_in, img_out) = (m_in * g.in_pixels(), n_out * g.out_pixels());
    let tiles = t.tiles_h * t.tiles_w;
    let batch = images_per_block(g, t, images.len());
    let mut first_fill = true;
    // The first block's products replace dU (no pass clearing it first).
    let mut accumulate = false;
    if batch > 1 {
        for first in images.clone().step_by(batch) {
            let block = first..(first + batch).min(images.end);
            let tb = block.len() * tiles;
            let (v, rest) = buf.split_at_mut(xis * m_in * tb);
            let z = &mut rest[..xis * n_out * tb];
            for (k, n) in block.enumerate() {
                fill_all_phases(isa, g, t, &x[n * img_in..][..img_in], phases, first_fill);
                first_fill = false;
                let all = 0..t.tiles_h;
                transform_input(isa, t, phases, all.clone(), &mut v[k * tiles..], tb);
                let gyn = &gy[n * img_out..][..img_out];
                transform_grad_output(isa, g, t, gyn, all, &mut z[k * tiles..], tb);
            }
            add_products(1, g, t, z, v, tb, du, accumulate);
            accumulate = true;
        }
    } else {
        let rows = block_rows(g, t);
        for n in images {
            fill_all_phases(isa, g, t, &x[n * img_in..][..img_in], phases, first_fill);
            first_fill = false;
            let gyn = &gy[n * img_out..][..img_out];
            for ty0 in (0..t.tiles_h).step_by(rows) {
                let ty = ty0..(ty0 + rows).min(t.tiles_h);
                let tb = ty.len() * t.tiles_w;
                let (v, rest) = buf.split_at_mut(xis * m_in * tb);
                let z = &mut rest[..xis * n_out * tb];
                transform_input(isa, t, phases, ty.clone(), v, tb);
                transform_grad_output(isa, g, t, gyn, ty, z, tb);
                add_products(1, g, t, z, v, tb, du, accumulate);
                accumulate = true;
            }
        }
    }
    if !accumulate {
        // A task without images.
        du.fill(0.0);
    }
}

/// [`sum_images`] for batches the threads cannot share image by image (one image, or an odd
/// batch on two threads): each block's input transform split over the threads by input
/// channels and the output gradient's by output channels, then its products by transformed
/// positions (each thread adds into its own ξs' rows of the one dU: nothing to sum after).
#[allow(clippy::too_many_arguments)]
fn sum_within_images(
    exec: Exec,
    g: &ConvGeometry,
    t: &Tiling,
    x: &[f32],
    gy: &[f32],
    phases: &mut [f32],
    buf: &mut [f32],
    du: &mut [f32],
) {
    let (m_in, n_out, xis) = (g.in_channels, g.out_channels, t.xis());
    let ohw = g.out_pixels();
    // The first block's products replace dU (every image has blocks).
    let mut accumulate = false;
    let rows = within_image_block_rows(g, t);
    for_each_block_within_images(exec, g, t, x, phases, rows, |n, ty, tb, phases| {
        let gyn = &gy[n * n_out * ohw..][..n_out * ohw];
        let (v, rest) = buf.split_at_mut(xis * m_in * tb);
        let z = &mut rest[..xis * n_out * tb];
        rayon::join(
            || transform_input_by_channels(exec, t, phases, ty.clone(), v, tb),
            || transform_grad_output_by_channels(exec, g, t, gyn, ty.clone(), z, tb),
        );
        add_products(exec.threads(), g, t, z, v, tb, du, accumulate);
        accumulate = true;
    });
}

/// Tile rows per block of [`sum_within_images`]: the forward's ([`block_rows`]: its V and Z
/// within 2 MiB), except for F(4, 3) (3 × 1 and 1 × 3 kernels), whose blocks take the whole
/// image. A block costs three parallel regions (the two transforms, then the products), and
/// F(4, 3) has only 6 transformed positions to share out per block, each an N × M product over
/// the block's tiles, so four blocks' waits cost more than a whole image's V and Z from L3;
/// the workspace already holds an image's (`block_len`). Zen 4 VM (harness, 2 threads, min of
/// 20 per round, 4 rounds, the two ways switched in one process): one image, reference layer
/// B's 1 × 3 half (32 → 64 at 112², 4 blocks) 0.83–0.99 → 0.62–0.70 ms, C's 3 × 1 and 1 × 3
/// (128 → 128 at 56²) 1.00–1.02 → 0.89–0.94 and 1.00–1.03 → 0.90–0.98; three images (odd, so
/// split too) 3.01–3.08 → 2.26–2.38, 3.60–3.84 → 2.90–3.29, 3.50–3.73 → 2.99–3.17. The 3 × 3
/// layers (36 positions) tied (C 1.43–1.53 against 1.42–1.46 ms; B 1.19–1.47 against
/// 1.36–1.58, and at three images 3.87–4.29 against 3.69–3.95) and keep the forward's blocks.
/// Where each thread sums its own images ([`sum_images`]) whole-image blocks lost (B's 1 × 3 at
/// two images 1.16–1.26 → 1.38–1.51 ms, at eight 5.65–5.72 → 5.84–5.98).
fn within_image_block_rows(g: &ConvGeometry, t: &Tiling) -> usize {
    match t.transform {
        Transform::F4Down | Transform::F4Across => t.tiles_h,
        _ => block_rows(g, t),
    }
}

/// Whether [`grad_weight`] has the threads share blocks of whole images
/// ([`sum_image_blocks`]) instead of each summing its own images into its own dU: 3 × 3
/// kernels on images small enough for several to a block, with at least
/// [`SHARED_BLOCK_CHANNELS`] channels (harmonic mean), where each task's dU (N·M per ξ) is
/// large against the images' transforms; and a batch the threads can share image by image
/// (else each image is split over them).
pub fn shares_image_blocks(exec: Exec, g: &ConvGeometry) -> bool {
    exec.threads() > 1
        && !splits_inside_images(exec.threads(), g.batch)
        && matches!(Transform::of(g), Some(Transform::F2x2 | Transform::F4x4))
        && winograd::harmonic_channels_at_least(g, SHARED_BLOCK_CHANNELS)
        && Tiling::new(g).is_ok_and(|t| images_per_block(g, &t, g.batch) > 1)
}

/// Channels (harmonic mean of input and output) from which [`shares_image_blocks`]: one dU
/// instead of one per thread, written by the products and read back by the filter
/// transform's adjoint once. Intel Xeon VM (harness, batch 8, 2 threads, min of 18, each way
/// switched in one process, two runs in a slow phase): reference layer D (512 → 512 at 14²)
/// 25.1 → 23.2 and 24.3 → 23.7 ms, its workspace 60.7 → 36.4 MB; 256 → 256 at 14² a tie
/// (6.65 → 6.50, 6.80 → 6.83; 22.0 → 14.0 MB). Not taken: 128 → 128 at 14² (1.97 → 2.16),
/// the MNIST network's 32 → 64 at 14², batch 64 (2.70 → 4.19: many small blocks, three waits
/// each), D's 1 × 3 half (9.48 → 9.73, 9.46 → 9.89; its 3 × 1 a tie).
const SHARED_BLOCK_CHANNELS: usize = 256;

/// [`sum_images`] over the whole batch with the threads sharing each block of whole images
/// ([`images_per_block`] of them): the block's phase planes (`planes`, one image's each) filled
/// and its transforms computed by channels, then its products split by ξ, each thread adding
/// into its own ξs' rows of the one `du` (nothing to sum after). `buf` holds a block's V and Z.
#[allow(clippy::too_many_arguments)]
fn sum_image_blocks(
    exec: Exec,
    g: &ConvGeometry,
    t: &Tiling,
    x: &[f32],
    gy: &[f32],
    planes: &mut [f32],
    buf: &mut [f32],
    du: &mut [f32],
) {
    let (m_in, n_out, xis) = (g.in_channels, g.out_channels, t.xis());
    let (img_in, img_out) = (m_in * g.in_pixels(), n_out * g.out_pixels());
    let tiles = t.tiles_h * t.tiles_w;
    let per_block = images_per_block(g, t, g.batch);
    let plane_len = m_in * t.layout.len;
    let mut accumulate = false;
    for (b, first) in (0..g.batch).step_by(per_block).enumerate() {
        let block = first..(first + per_block).min(g.batch);
        let tb = block.len() * tiles;
        for (k, n) in block.clone().enumerate() {
            let ph = &mut planes[k * plane_len..(k + 1) * plane_len];
            fill_phases_by_channels(exec, g, t, &x[n * img_in..][..img_in], ph, b == 0);
        }
        let planes = &*planes;
        let (v, rest) = buf.split_at_mut(xis * m_in * tb);
        let z = &mut rest[..xis * n_out * tb];
        rayon::join(
            || {
                // Image k's tiles are columns k·tiles .. of every row of V.
                for k in 0..block.len() {
                    let ph = &planes[k * plane_len..(k + 1) * plane_len];
                    let vk = &mut v[k * tiles..];
                    transform_input_by_channels(exec, t, ph, 0..t.tiles_h, vk, tb);
                }
            },
            || {
                // Likewise image k's tiles in Z.
                for (k, n) in block.clone().enumerate() {
                    let gyn = &gy[n * img_out..][..img_out];
                    let zk = &mut z[k * tiles..];
                    transform_grad_output_by_channels(exec, g, t, gyn, 0..t.tiles_h, zk, tb);
                }
            },
        );
        add_products(exec.threads(), g, t, z, v, tb, du, accumulate);
        accumulate = true;
    }
}

/// `dU[ξ] += Z[ξ] · V[ξ]ᵀ` (`=` unless `accumulate`) for every ξ: Z holds `[n][ξ][tile]` and
/// V `[m][ξ][tile]`, `tb` tiles each, and dU `[ξ][n][m]`. The ξs are split into `splits` runs
/// that run in parallel, each adding into its own ξs' rows of dU (one run inside a task).
#[allow(clippy::too_many_arguments)]
fn add_products(
    splits: usize,
    g: &ConvGeometry,
    t: &Tiling,
    z: &[f32],
    v: &[f32],
    tb: usize,
    du: &mut [f32],
    accumulate: bool,
) {
    let per_xi = g.out_channels * g.in_channels;
    let xis_per_run = t.xis().div_ceil(splits.max(1));
    du.par_chunks_mut(xis_per_run * per_xi)
        .enumerate()
        .for_each(|(i, dc)| {
            for (k, d) in dc.chunks_exact_mut(per_xi).enumerate() {
                add_product(g, t, i * xis_per_run + k, z, v, tb, d, accumulate);
            }
        });
}

/// `du_xi (N × M) += Z[ξ] · V[ξ]ᵀ` for the one ξ `xi` ([`add_products`]).
#[allow(clippy::too_many_arguments)]
fn add_product(
    g: &ConvGeometry,
    t: &Tiling,
    xi: usize,
    z: &[f32],
    v: &[f32],
    tb: usize,
    du_xi: &mut [f32],
    accumulate: bool,
) {
    let (m_in, n_out, xis) = (g.in_channels, g.out_channels, t.xis());
    gemm(
        du_xi,
        m_in,
        MatView::row_major(&z[xi * tb..], n_out, tb, xis * tb),
        MatView::row_major(&v[xi * tb..], m_in, tb, xis * tb).t(),
        accumulate,
        1,
    );
}

/// `gw[n][m]` = the filter transform's adjoint of the tasks' summed `dU[·][n][m]` (each task's
/// dU first in its `per_task` floats of `sums`), in parallel over the output channels, each
/// thread with `(taps + 1)·M` floats of `rows`.
fn kernels_from_sums(
    exec: Exec,
    g: &ConvGeometry,
    t: &Tiling,
    sums: &[f32],
    per_task: usize,
    rows: &mut [f32],
    gw: &mut [f32],
) {
    let (m_in, taps) = (g.in_channels, g.kernel_h * g.kernel_w);
    let matrix = FilterMatrix::of(t.transform, taps);
    // Once per call, not per output channel.
    let dense = matrix.dense();
    let sums = KernelSums {
        sums,
        per_task,
        n_out: g.out_channels,
        m_in,
        matrix,
        dense,
    };
    let per_thread = g.out_channels.div_ceil(exec.threads());
    gw.par_chunks_mut(per_thread * m_in * taps)
        .zip(rows.par_chunks_mut((taps + 1) * m_in))
        .enumerate()
        .for_each(|(i, (gwc, buf))| {
            for (j, gwn) in gwc.chunks_exact_mut(m_in * taps).enumerate() {
                channel_kernels(exec.isa(), &sums, i * per_thread + j, buf, gwn);
            }
        });
}

/// The tasks' dU sums and the filter transform's adjoint, for [`channel_kernels`].
struct KernelSums<'a> {
    /// Each task's dU (`[ξ][n][m]`) first in its `per_task` floats.
    sums: &'a [f32],
    per_task: usize,
    n_out: usize,
    m_in: usize,
    /// The filter transform, whose adjoint takes dU to the kernels' gradients.
    matrix: FilterMatrix,
    /// `matrix.dense()`: its coefficients ∂U[ξ]/∂g[tap], zeros included, for the vector path.
    dense: [[f32; 9]; 36],
}

crate::simd_dispatch!(fn channel_kernels => channel_kernels_kernel(
    d: &KernelSums<'_>, n: usize, buf: &mut [f32], gwn: &mut [f32]
));

/// Output channel `n`'s kernels `gwn` (`[m][tap]`): Σ_ξ ∂U[ξ]/∂g[tap] · Σ_tasks dU[ξ][n][m].
/// A vector of kernels at a time where a kernel's taps fit a vector (the forward's filter
/// transform run backwards): each ξ's tasks' sums added in registers, times each tap's
/// coefficient (the dense matrix, zeros included) into one vector per tap, the taps
/// transposed in registers into each kernel's row and stored under a mask. The rest (the last
/// kernels short of a vector, or 3 × 3 kernels with 8-lane vectors) a row of M at a time in
/// `buf` (`(taps + 1)·M` floats), with plain loops the compiler vectorizes. Through `buf` for
/// every kernel, its final transposition element by element, this pass was 13% of reference
/// layer D's grad-weight (perf; on the baseline target, before the plain loops, 17%).
#[inline(always)]
unsafe fn channel_kernels_kernel<S: SimdF32>(
    d: &KernelSums<'_>,
    n: usize,
    buf: &mut [f32],
    gwn: &mut [f32],
) {
    let (m, taps, l) = (d.m_in, d.matrix.taps, S::LANES);
    let by_vectors = if taps <= l { m / l * l } else { 0 };
    // SAFETY: kernels_by_vectors' (kernels 0 .. by_vectors, a whole number of vectors).
    unsafe {
        match taps {
            3 => kernels_by_vectors::<S, 3>(d, n, by_vectors, gwn),
            9 => kernels_by_vectors::<S, 9>(d, n, by_vectors, gwn),
            _ => unreachable!("Winograd kernels have 3 or 9 taps"),
        }
    }
    if by_vectors == m {
        return;
    }
    let rest = m - by_vectors;
    let (sum, acc) = buf.split_at_mut(rest);
    let acc = &mut acc[..taps * rest];
    acc.fill(0.0);
    for xi in 0..d.matrix.xis {
        let at = (xi * d.n_out + n) * m + by_vectors;
        sum.copy_from_slice(&d.sums[at..at + rest]);
        for task in d.sums.chunks_exact(d.per_task).skip(1) {
            for (s, &v) in sum.iter_mut().zip(&task[at..at + rest]) {
                *s += v;
            }
        }
        for &(tap, c) in d.matrix.terms(xi) {
            for (a, &s) in acc[tap * rest..(tap + 1) * rest].iter_mut().zip(&*sum) {
                *a += c * s;
            }
        }
    }
    for (mm, k) in gwn[by_vectors * taps..].chunks_exact_mut(taps).enumerate() {
        for (tap, v) in k.iter_mut().enumerate() {
            *v = acc[tap * rest + mm];
        }
    }
}

/// Kernels `0 .. kernels` (a multiple of the vector, each of `T` ≤ LANES taps) of
/// [`channel_kernels_kernel`]'s vector path, the tap vectors in registers: a const number of
/// taps and the dense coefficients let the compiler unroll the taps, where the sparse terms
/// indexed the vectors at run time and kept them on the stack.
#[inline(always)]
unsafe fn kernels_by_vectors<S: SimdF32, const T: usize>(
    d: &KernelSums<'_>,
    n: usize,
    kernels: usize,
    gwn: &mut [f32],
) {
    let (m, l) = (d.m_in, S::LANES);
    for m0 in (0..kernels).step_by(l) {
        // SAFETY: kernels m0 .. m0 + l are inside every task's dU row (m0 + l ≤ kernels ≤ m)
        // and inside gwn, each store writing only a kernel's T taps.
        unsafe {
            let mut v = [S::zero(); T];
            for (xi, coefficients) in d.dense.iter().enumerate().take(d.matrix.xis) {
                let at = (xi * d.n_out + n) * m + m0;
                let mut tasks = d.sums.chunks_exact(d.per_task);
                let mut sum = S::zero();
                if let Some(first) = tasks.next() {
                    sum = S::load(first[at..at + l].as_ptr());
                }
                for task in tasks {
                    sum = sum.add(S::load(task[at..at + l].as_ptr()));
                }
                for (vt, &c) in v.iter_mut().zip(coefficients) {
                    *vt = S::mul_add(S::splat(c), sum, *vt);
                }
            }
            let mut rows = [S::zero(); 16];
            rows[..T].copy_from_slice(&v);
            S::transpose(&mut rows[..l]);
            for (i, row) in rows[..l].iter().enumerate() {
                let k = &mut gwn[(m0 + i) * T..(m0 + i + 1) * T];
                row.store_partial(k.as_mut_ptr(), T);
            }
        }
    }
}

/// [`transform_grad_output`] of one image's output-gradient planes `gyn` split over the threads
/// by output channels, each thread writing its channels' rows of Z (`ld` floats apart).
fn transform_grad_output_by_channels(
    exec: Exec,
    g: &ConvGeometry,
    t: &Tiling,
    gyn: &[f32],
    ty: Range<usize>,
    z: &mut [f32],
    ld: usize,
) {
    let (outs, ohw) = (g.out_channels.div_ceil(exec.threads()), g.out_pixels());
    z.par_chunks_mut(outs * t.xis() * ld)
        .zip(gyn.par_chunks(outs * ohw))
        .for_each(|(zc, gc)| transform_grad_output(exec.isa(), g, t, gc, ty.clone(), zc, ld));
}

/// Z[n][ξ][tile] = (A dY Aᵀ)[ξ] (3 × 3) or (A dY)[ξ] (3 × 1, 1 × 3) for the output-gradient
/// planes `gy` (one image's, or a run of its channels; n counted from the first) and the tiles
/// of tile rows `ty`, each (n, ξ) row of Z `ld` floats after the previous: the adjoint of the
/// forward's output transform, the tiles' values past the last output row and column zero.
fn transform_grad_output(
    isa: Isa,
    g: &ConvGeometry,
    t: &Tiling,
    gy: &[f32],
    ty: Range<usize>,
    z: &mut [f32],
    ld: usize,
) {
    let (channels, tiles) = (gy.len() / g.out_pixels(), ty.len() * t.tiles_w);
    assert_eq!(gy.len(), channels * g.out_pixels(), "whole output planes");
    assert!(ty.end <= t.tiles_h, "tile rows inside the image");
    assert!(ld >= tiles, "Z rows overlap");
    assert!(
        channels == 0 || z.len() >= (channels * t.xis() - 1) * ld + tiles,
        "Z too short"
    );
    grad_output_dispatch(isa, g, t, gy, ty, z, ld)
}

crate::simd_dispatch!(fn grad_output_dispatch => grad_output_kernel(
    g: &ConvGeometry, t: &Tiling, gy: &[f32], ty: Range<usize>, z: &mut [f32], ld: usize
));

#[inline(always)]
unsafe fn grad_output_kernel<S: SimdF32>(
    g: &ConvGeometry,
    t: &Tiling,
    gy: &[f32],
    ty: Range<usize>,
    z: &mut [f32],
    ld: usize,
) {
    let (l, ow, tw, xis) = (S::LANES, g.out_w, t.tiles_w, t.xis());
    let th = t.transform.tile().0;
    let zp = z.as_mut_ptr();
    for (c, plane) in gy.chunks_exact(g.out_pixels()).enumerate() {
        for (r, tile_row) in ty.clone().enumerate() {
            // The tile row's output rows inside the image (ty < tiles_h: at least one).
            let first = th * tile_row;
            let rows = (g.out_h - first).min(th);
            let mut src = GradRows {
                row: [plane.as_ptr(); 4],
                rows,
                ow,
            };
            for (k, p) in src.row.iter_mut().enumerate().take(rows) {
                *p = plane[(first + k) * ow..].as_ptr();
            }
            let mut tx = 0;
            while tx < tw {
                let dst = ZTiles {
                    // SAFETY: inside Z (transform_grad_output checked its extent).
                    at: unsafe { zp.add(c * xis * ld + r * tw + tx) },
                    ld,
                    n: (tw - tx).min(l),
                };
                // SAFETY: reads of columns below `ow` of the rows inside the plane
                // (GradRows::columns); writes of n lanes inside Z's rows for (c, ξ), checked by
                // transform_grad_output.
                unsafe {
                    match t.transform {
                        Transform::F2x2 => grad_tiles_2x2::<S>(&src, 2 * tx, &dst),
                        Transform::F4x4 => grad_tiles_4x4::<S>(&src, 4 * tx, &dst),
                        Transform::F4Down => {
                            // A tile is one column of the 4 rows. (A plain loop: a closure
                            // would be compiled without this function's target features.)
                            let mut y = [S::zero(); 4];
                            for (k, v) in y.iter_mut().enumerate() {
                                *v = src.columns(k, tx);
                            }
                            dst.store(at4_adjoint(y));
                        }
                        Transform::F4Across => {
                            dst.store(at4_adjoint(src.tiles_across::<S>(0, 4 * tx)))
                        }
                    }
                }
                tx += l;
            }
        }
    }
}

/// A y for one 2-vector (F(2×2, 3×3)'s Aᵀ = [1 1 1 0; 0 1 −1 −1]): [y0, y0 + y1, y0 − y1, −y1].
#[inline(always)]
unsafe fn at2_adjoint<S: SimdF32>(y: [S; 2]) -> [S; 4] {
    // SAFETY: register operations.
    unsafe { [y[0], y[0].add(y[1]), y[0].sub(y[1]), S::zero().sub(y[1])] }
}

/// A y for one 4-vector (F(4, 3)'s Aᵀ, see [`winograd`]): [y0, y0 + y1 + y2 + y3,
/// y0 − y1 + y2 − y3, y0 + 2y1 + 4y2 + 8y3, y0 − 2y1 + 4y2 − 8y3, y3].
#[inline(always)]
unsafe fn at4_adjoint<S: SimdF32>(y: [S; 4]) -> [S; 6] {
    // SAFETY: register operations.
    unsafe {
        let (s02, s13) = (y[0].add(y[2]), y[1].add(y[3]));
        // y0 + 4y2 and y1 + 4y3.
        let four = S::splat(4.0);
        let (p, q) = (S::mul_add(four, y[2], y[0]), S::mul_add(four, y[3], y[1]));
        [
            y[0],
            s02.add(s13),
            s02.sub(s13),
            S::mul_add(S::splat(2.0), q, p),
            S::mul_add(S::splat(-2.0), q, p),
            y[3],
        ]
    }
}

/// The output-gradient rows of one tile row: `rows` (1–4) rows of one plane, `ow` columns each.
struct GradRows {
    row: [*const f32; 4],
    rows: usize,
    ow: usize,
}

impl GradRows {
    /// Columns `col .. col + LANES` of row `k`, zero from column `ow` on and for rows past
    /// `rows` (the tiles' part below the image).
    #[inline(always)]
    unsafe fn columns<S: SimdF32>(&self, k: usize, col: usize) -> S {
        // SAFETY: the constructor's: columns below `ow` of the first `rows` rows are readable.
        unsafe {
            match self.ow.saturating_sub(col).min(S::LANES) {
                _ if k >= self.rows => S::zero(),
                0 => S::zero(),
                n if n == S::LANES => S::load(self.row[k].add(col)),
                n => S::load_partial(self.row[k].add(col), n),
            }
        }
    }

    /// The 4 values of `LANES` consecutive 1 × 4 tiles of row `k` from column `col0`: value j
    /// of each tile in vector j (the adjoint of the forward's `store_tiles_across`).
    #[inline(always)]
    unsafe fn tiles_across<S: SimdF32>(&self, k: usize, col0: usize) -> [S; 4] {
        let l = S::LANES;
        // SAFETY: as for `columns`.
        unsafe {
            deinterleave4([
                self.columns(k, col0),
                self.columns(k, col0 + l),
                self.columns(k, col0 + 2 * l),
                self.columns(k, col0 + 3 * l),
            ])
        }
    }
}

/// Where `n ≤ LANES` tiles' transformed values go: value ξ to `at + ξ·ld`.
struct ZTiles {
    at: *mut f32,
    ld: usize,
    n: usize,
}

impl ZTiles {
    /// Stores the tiles' values (vector ξ: value ξ of each tile).
    #[inline(always)]
    unsafe fn store<S: SimdF32, const X: usize>(&self, z: [S; X]) {
        // SAFETY: the constructor's: n floats at each of the X rows are writable.
        unsafe {
            for (xi, v) in z.into_iter().enumerate() {
                store_lanes(v, self.at.add(xi * self.ld), self.n);
            }
        }
    }
}

/// F(2×2, 3×3)'s Z (A dY Aᵀ, value (i, j) as ξ = 4i + j) for the tiles of `dst`, from column
/// `col0` of the tile row's two output rows.
#[inline(always)]
unsafe fn grad_tiles_2x2<S: SimdF32>(src: &GradRows, col0: usize, dst: &ZTiles) {
    // SAFETY: the caller's (see grad_output_kernel).
    unsafe {
        let mut y = [[S::zero(); 2]; 2];
        for (k, yk) in y.iter_mut().enumerate() {
            let (even, odd) =
                S::deinterleave(src.columns(k, col0), src.columns(k, col0 + S::LANES));
            *yk = [even, odd];
        }
        // A dY down each column, then Aᵀ along each row of that.
        let by_column = [at2_adjoint(column(&y, 0)), at2_adjoint(column(&y, 1))];
        let mut z = [S::zero(); 16];
        for i in 0..4 {
            z[4 * i..4 * i + 4].copy_from_slice(&at2_adjoint(column(&by_column, i)));
        }
        dst.store(z);
    }
}

/// F(4×4, 3×3)'s Z (A dY Aᵀ, value (i, j) as ξ = 6i + j) for the tiles of `dst`, from column
/// `col0` of the tile row's four output rows.
#[inline(always)]
unsafe fn grad_tiles_4x4<S: SimdF32>(src: &GradRows, col0: usize, dst: &ZTiles) {
    // SAFETY: the caller's (see grad_output_kernel).
    unsafe {
        // dY Aᵀ along each output row, then A (dY Aᵀ) down each of the 6 columns.
        let mut by_row = [[S::zero(); 6]; 4];
        for (k, r) in by_row.iter_mut().enumerate() {
            *r = at4_adjoint(src.tiles_across::<S>(k, col0));
        }
        for j in 0..6 {
            for (i, v) in at4_adjoint(column(&by_row, j)).into_iter().enumerate() {
                store_lanes(v, dst.at.add((i * 6 + j) * dst.ld), dst.n);
            }
        }
    }
}
