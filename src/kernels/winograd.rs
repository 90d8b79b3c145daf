//! Winograd convolution for stride-1, undilated 3 × 3, 3 × 1 and 1 × 3 kernels (forward, and
//! grad-input as the adjoint forward convolution, see `kernels::conv2d_grad_input`; grad-weight
//! on the same transforms in `kernels::winograd_grad_weight`).
//!
//! 3 × 3 kernels on narrow outputs (under 20 columns) run F(2×2, 3×3): 16 multiplications per
//! 2×2 output tile and input/output channel pair instead of 36 (2.25× fewer). With `d` a 4×4
//! input patch, `g` a 3×3 kernel and the usual matrices Bᵀ = [1 0 −1 0; 0 1 1 0; 0 −1 1 0;
//! 0 1 0 −1], G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1], Aᵀ = [1 1 1 0; 0 1 −1 −1], a 2×2 output tile
//! is Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A. Wider ones run F(4×4, 3×3): 36 multiplications per 4×4
//! tile instead of 144 (4× fewer), Y = Aᵀ [(G g Gᵀ) ⊙ (Bᵀ d B)] A with the F(4, 3) matrices
//! below; its transformed input and products are 2.25× the image's input and output where
//! F(2×2, 3×3)'s are 4×, so it moves less memory per multiplication too.
//!
//! The halves of a spatially separable layer, 3 × 1 and 1 × 3 kernels, run the one-dimensional
//! F(4, 3) along the kernel's axis: 6 multiplications per 4 outputs instead of 12 (2× fewer),
//! `y = Aᵀ [(G g) ⊙ (Bᵀ d)]` for a 6-element patch `d` with
//! Bᵀ = [4 0 −5 0 1 0; 0 −4 −4 1 1 0; 0 4 −4 −1 1 0; 0 −2 −1 2 1 0; 0 2 −1 −2 1 0; 0 4 0 −5 0 1],
//! G = [¼ 0 0; −⅙ −⅙ −⅙; −⅙ ⅙ −⅙; 1/24 1/12 ⅙; 1/24 −1/12 ⅙; 0 0 1],
//! Aᵀ = [1 1 1 1 1 0; 0 1 −1 2 −2 0; 0 1 1 4 4 0; 0 1 −1 8 −8 1] (interpolation points 0, ±1,
//! ±2 and ∞, as in Lavin and Gray's F(4×4, 3×3)).
//!
//! Over channels the element-wise product becomes one independent matrix product per
//! transformed position ξ (16, 36 or 6), `M[ξ] (N × tiles) = U[ξ] (N × M) · V[ξ] (M × tiles)`,
//! which run on the GEMM kernels.
//!
//! The transforms are vectorized across tiles. For 3 × 3 the padded input is split into its
//! 2×2 phase planes (the depthwise kernel's layout with stride 2), where tap (i, j) of the
//! tiles of one tile row is a contiguous run — 16 vector loads give 16 tiles' patches — and
//! output tiles are re-interleaved into rows with the (de)interleave kernels. For 3 × 1 the
//! tiles of a tile row are the columns of 4 output rows, so the padded plane's rows are the
//! patches and the outputs are rows; for 1 × 3 (and each row of F(4×4, 3×3)'s patches and
//! tiles) they are runs of 4 columns of one row, taken apart and put back together in
//! registers (four contiguous loads deinterleaved by stride 4, and the inverse for the
//! outputs).
//!
//! Work is split over images; each image's transformed input and products live in scratch
//! (4×, 2.25× or 1.5× the image's input and output), so a whole image's GEMMs see wide
//! matrices; small images go several to a block, their tiles side by side. Batches the threads
//! cannot share image by image are split inside each image: by tile rows where every thread gets
//! enough tiles, else by channels.
//! Accuracy: the transforms add f32 roundings. Largest error over the output, relative to its
//! largest value, against the f64 reference (one image, inputs in ±1, weights in ±0.1,
//! forward and grad-input): F(2×2, 3×3) 8e-7–9e-7 (512 → 512 at 14²); F(4, 3) 2e-6–3e-6 (128
//! → 128 at 56²); F(4×4, 3×3) 5e-6–8e-6 (32 → 64 at 112²), 8e-6–1.0e-5 (128 → 128 at 56²),
//! 1.5e-5–1.6e-5 (512 → 512 at 28²). The tests hold all to 1e-4.
//!
//! Not for strided layers, where it was tried and lost. A 3 × 3 kernel at stride 2 is four
//! stride-1 convolutions over the input's stride phase planes, with 2 × 2, 2 × 1, 1 × 2 and
//! 1 × 1 kernels. Two prototypes (outside the crate) ran reference layer E's forward, 8 × 128 →
//! 256 at 56², against the implicit GEMM in one process on the Intel Xeon VM, with relative
//! errors of 6e-6:
//! - F(4×4, 2×2) over all four phases as 4M channels (points 0, ±1, 2, ∞): 1.44× fewer
//!   multiplications, 0.87–1.03× the implicit GEMM's time with blocks of 2–4 images, and
//!   1.3× with one image per block. Its U is 25 × 256 × 512 floats (13 MB, 11× the
//!   weights), read again from L3 for every block of images.
//! - Each phase its own transform (F(4×4, 2×2), F(4, 2) along one axis, or none): 81 products
//!   of K = 128, 1.78× fewer multiplications. It was slower: 35.8 ms against 32.0 on one
//!   thread, at best, with 32 output channels at a time. The transformed products are 81/16 ≈
//!   5× the output and the transformed input 1.27× the phase planes, and the K = 128 products
//!   over about 200 tiles ran at 26–49 GMAC/s where the implicit GEMM ran at 60.

use super::depthwise::{PhaseLayout, fill_phases};
use super::elementwise;
use super::gemm::{MatView, gemm};
use super::pointwise::{ColumnWindow, Operands, Rows, Store, small_k_gemm};
use super::simd::SimdF32;
use super::{Exec, Workspace, for_each_task, splits_inside_images};
use crate::error::Result;
use crate::geometry::{Conv2dParams, ConvGeometry, Padding};
use rayon::prelude::*;
use std::ops::Range;

/// Input channels up to which the products use the unpacked kernel (above, the packed GEMM).
const UNPACKED_MAX_K: usize = 256;

/// Which Winograd algorithm computes a convolution, by its kernel's shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Transform {
    /// F(2×2, 3×3) for 3 × 3 kernels: 4 × 4 patches, 2 × 2 output tiles, 16 products.
    F2x2,
    /// F(4×4, 3×3) for 3 × 3 kernels on outputs at least 20 columns wide: 6 × 6
    /// patches, 4 × 4 tiles, 36 products.
    F4x4,
    /// F(4, 3) down the columns for 3 × 1 kernels: 6 × 1 patches, 4 × 1 tiles, 6 products.
    F4Down,
    /// F(4, 3) along the rows for 1 × 3 kernels: 1 × 6 patches, 1 × 4 tiles, 6 products.
    F4Across,
}

impl Transform {
    /// The transform for `g`'s kernel shape (and for 3 × 3, its output width), if any.
    pub fn of(g: &ConvGeometry) -> Option<Self> {
        match (g.kernel_h, g.kernel_w) {
            (3, 3) if g.out_w >= F4X4_MIN_WIDTH => Some(Transform::F4x4),
            (3, 3) => Some(Transform::F2x2),
            (3, 1) => Some(Transform::F4Down),
            (1, 3) => Some(Transform::F4Across),
            _ => None,
        }
    }

    /// Transformed positions ξ per tile: the number of products.
    pub fn products(self) -> usize {
        match self {
            Transform::F2x2 => 16,
            Transform::F4x4 => 36,
            Transform::F4Down | Transform::F4Across => 6,
        }
    }

    /// Output rows and columns of one tile.
    pub(super) fn tile(self) -> (usize, usize) {
        match self {
            Transform::F2x2 => (2, 2),
            Transform::F4x4 => (4, 4),
            Transform::F4Down => (4, 1),
            Transform::F4Across => (1, 4),
        }
    }

    /// Tile rows and tiles per tile row of `g`'s output (the last ones may reach past it).
    pub(super) fn tiles(self, g: &ConvGeometry) -> (usize, usize) {
        let (th, tw) = self.tile();
        (g.out_h.div_ceil(th), g.out_w.div_ceil(tw))
    }

    /// Stride of the phase planes the input transform reads: 2 × 2 phases for F(2×2, 3×3),
    /// whose patches overlap by half; the padded plane itself for the others (their rows'
    /// tiles are deinterleaved in registers).
    fn phase_stride(self) -> (usize, usize) {
        match self {
            Transform::F2x2 => (2, 2),
            Transform::F4x4 | Transform::F4Down | Transform::F4Across => (1, 1),
        }
    }
}

/// Whether Winograd computes this convolution's forward (and grad-input): [`tiles_pay`], and
/// for 3 × 1 and 1 × 3 kernels enough channels ([`f4_has_channels_for_it`]).
pub fn applies(g: &ConvGeometry) -> bool {
    tiles_pay(g)
        && (!matches!(
            Transform::of(g),
            Some(Transform::F4Down | Transform::F4Across)
        ) || f4_has_channels_for_it(g))
}

/// Whether Winograd can compute this convolution and its tiles pay for the transforms: a
/// 3 × 3, 3 × 1 or 1 × 3 kernel ([`Transform`]), stride 1, no dilation, one group, at least 8
/// input and output channels, and enough tiled pixels. The passes add their own conditions
/// ([`applies`], `winograd_grad_weight::applies`).
pub(super) fn tiles_pay(g: &ConvGeometry) -> bool {
    let Some(tr) = Transform::of(g) else {
        return false;
    };
    let (th, tw) = tr.tile();
    let (tiles_h, tiles_w) = tr.tiles(g);
    g.stride_h == 1
        && g.stride_w == 1
        && g.dilation_h == 1
        && g.dilation_w == 1
        && g.groups == 1
        && g.in_channels >= 8
        && g.out_channels >= 8
        && tiled_pixels_pay(g.batch, tiles_h * th * tiles_w * tw)
        // F(2×2, 3×3)'s output transform stages a tile row's outputs.
        && (tr != Transform::F2x2 || tiles_w <= STAGING - 16)
}

/// Output width from which 3 × 3 layers run F(4×4, 3×3): 5 tiles per tile row, of the vector's
/// 16 lanes the transforms work on. Intel Xeon VM (harness, 2 threads, builds alternated, min
/// of 8–18; forward and grad-input, F(2×2, 3×3) → F(4×4, 3×3)): 32 → 64 at 112², batch 8, 19.9
/// → 14.6 ms and 21.7 → 15.9; 128 → 128 at 56² 28.6 → 19.2 and 28.7 → 15.0; 384 → 384 at 56²
/// 119 → 82 and 118 → 89; 64 → 64 at 56² 5.82 → 3.85; 32 → 32 at 56² 1.80 → 1.29; 256 → 256 at
/// 28² 18.7 → 14.1; 64 → 64 at 28² 1.52 → 1.20; 128 → 128 at 20² 4.86 → 3.83; ties where the
/// products have few columns (one image per block: 512 → 512 at 28², 57.3 against 57.8; 256 →
/// 256 at 20², 11.5 against 11.4). At 14² (4 tiles per row) it lost: reference layer D (512
/// → 512) 20.2 → 38.4, the MNIST network's 64 → 64 at batch 64 3.25 → 4.84, its 32 → 64 a tie.
const F4X4_MIN_WIDTH: usize = 20;

/// Whether a 3 × 1 or 1 × 3 layer has the channels for F(4, 3) to beat the implicit GEMM: the
/// harmonic mean of its input and output channel counts, 2·M·N / (M + N), at least
/// [`F4_MIN_CHANNELS`]. The products' work grows with M·N, the transforms' (the input's and
/// output's traffic through V and the products, 1.5× each) with M + N, and the implicit GEMM
/// they replace runs near the FMA peak. Intel Xeon VM (harness, 2 threads, batch 8, builds
/// alternated, min of 10–12; forward and grad-input): 32 → 32 at 112² 2.30 → 4.40 ms and
/// 2.33 → 4.59 (3 × 1), 32 → 64 5.11 → 6.47 and 5.70 → 7.08 (1 × 3); 64 → 64 at 56² 2.55 →
/// 2.93 (3 × 1), 2.57 → 2.46 (1 × 3); 96 → 96 at 28² 2.11 → 1.62 (1 × 3); 128 → 128 at 56² 9.13
/// → 8.93 and 9.34 → 9.16 (3 × 1), 10.83 → 8.23 and 10.85 → 7.90 (1 × 3); 128 → 128 at 28²
/// 3.14 → 2.03 (3 × 1); 256 → 256 at 28² 9.40 → 6.73 (3 × 1), 11.75 → 6.82 (1 × 3); 512 → 512
/// at 14² 8.97 → 7.09 (3 × 1), 8.97 → 8.44 (1 × 3).
fn f4_has_channels_for_it(g: &ConvGeometry) -> bool {
    harmonic_channels_at_least(g, F4_MIN_CHANNELS)
}

/// Whether 2·M·N / (M + N) ≥ `channels` for `g`'s input and output channel counts M and N.
pub(super) fn harmonic_channels_at_least(g: &ConvGeometry, channels: usize) -> bool {
    let (m, n) = (g.in_channels, g.out_channels);
    2 * m * n >= channels * (m + n)
}

/// See [`f4_has_channels_for_it`].
const F4_MIN_CHANNELS: usize = 96;

/// Output pixels per image, counted in whole tiles, from which Winograd pays on any batch (32
/// tiles of F(2×2, 3×3) or F(4, 3)).
const MIN_TILED_PIXELS: usize = 128;

/// Output pixels per image, counted in whole tiles, from which Winograd pays on a batch of
/// [`MIN_BATCH_TILED_PIXELS`]: a 7 × 7 image's 16 tiles of F(2×2, 3×3). Its tile rows are 4
/// tiles, a quarter of the transforms' vectors, and each call transforms all M·N kernels
/// (16 MB for 512 → 512) for few tiles, so it needs images to share blocks and the kernels'
/// transform. AMD EPYC Zen 4 VM (sweep harness, 2 threads, forward / training step, min,
/// im2col against Winograd alternated 2–3×): 512 → 512 at batch 8 11.0–11.1 → 7.4–7.6 ms and
/// 34–37 → 24; 256 → 256, batch 8, 2.78–2.85 → 2.28–2.36; 128 → 128 at batch 64 5.27–5.35 →
/// 3.95–4.70 and 16.0–16.4 → 11.9–14.2; the MNIST network's 64 → 128 (batch 64) 2.48–2.58 →
/// 2.15–2.36 and 7.6–7.9 → 6.1–6.7, its 64 → 64 1.41–1.43 → 1.30–1.33; 512 → 512 at batch
/// 4 5.42–5.52 → 4.26–4.46 (one run in three slower, 8.6). At batch 2 and 1 it lost (512 →
/// 512 2.72 against 2.74–7.5, batch 1 1.42 against 1.69–1.93). (On the Intel Xeon VM of the
/// older tables, before the images shared blocks and the kernels' transform, the MNIST layer
/// had lost: 3.87 against 2.97 ms.)
const MIN_SMALL_TILED_PIXELS: usize = 64;

/// Tiled output pixels over the batch from which images of [`MIN_SMALL_TILED_PIXELS`] run
/// Winograd: four 7 × 7 images.
const MIN_BATCH_TILED_PIXELS: usize = 256;

/// Whether `tiled` output pixels per image (whole tiles) on a batch of `batch` pay for the
/// transforms.
fn tiled_pixels_pay(batch: usize, tiled: usize) -> bool {
    tiled >= MIN_TILED_PIXELS
        || (tiled >= MIN_SMALL_TILED_PIXELS && batch * tiled >= MIN_BATCH_TILED_PIXELS)
}

/// Width of the output staging rows (tiles per tile row, plus a vector of slack).
const STAGING: usize = 256;

/// Bᵀ v for one 4-vector: [v0 − v2, v1 + v2, v2 − v1, v1 − v3].
#[inline(always)]
unsafe fn bt4<S: SimdF32>(v: [S; 4]) -> [S; 4] {
    unsafe {
        [
            v[0].sub(v[2]),
            v[1].add(v[2]),
            v[2].sub(v[1]),
            v[1].sub(v[3]),
        ]
    }
}

/// Aᵀ v for one 4-vector: [v0 + v1 + v2, v1 − v2 − v3].
#[inline(always)]
unsafe fn at2<S: SimdF32>(v: [S; 4]) -> [S; 2] {
    unsafe { [v[0].add(v[1]).add(v[2]), v[1].sub(v[2]).sub(v[3])] }
}

/// Bᵀ d for one 6-element patch (F(4, 3)), with multiply-adds where a coefficient is not ±1.
#[inline(always)]
unsafe fn bt6<S: SimdF32>(d: [S; 6]) -> [S; 6] {
    unsafe {
        let (two, four) = (S::splat(2.0), S::splat(4.0));
        let (minus_two, minus_four, minus_five) = (S::splat(-2.0), S::splat(-4.0), S::splat(-5.0));
        let (s12, d12) = (d[1].add(d[2]), d[1].sub(d[2]));
        let (s34, d43) = (d[3].add(d[4]), d[4].sub(d[3]));
        let (d42, d31) = (d[4].sub(d[2]), d[3].sub(d[1]));
        [
            // 4·d0 − 5·d2 + d4
            S::mul_add(four, d[0], S::mul_add(minus_five, d[2], d[4])),
            // (d3 + d4) − 4·(d1 + d2)
            S::mul_add(minus_four, s12, s34),
            // (d4 − d3) + 4·(d1 − d2)
            S::mul_add(four, d12, d43),
            // (d4 − d2) + 2·(d3 − d1)
            S::mul_add(two, d31, d42),
            // (d4 − d2) − 2·(d3 − d1)
            S::mul_add(minus_two, d31, d42),
            // 4·d1 − 5·d3 + d5
            S::mul_add(four, d[1], S::mul_add(minus_five, d[3], d[5])),
        ]
    }
}

/// Aᵀ m for one 6-element product (F(4, 3)): the tile's 4 outputs.
#[inline(always)]
unsafe fn at4<S: SimdF32>(m: [S; 6]) -> [S; 4] {
    unsafe {
        let (two, four, eight) = (S::splat(2.0), S::splat(4.0), S::splat(8.0));
        let (s12, d12) = (m[1].add(m[2]), m[1].sub(m[2]));
        let (s34, d34) = (m[3].add(m[4]), m[3].sub(m[4]));
        [
            m[0].add(s12).add(s34),
            S::mul_add(two, d34, d12),
            S::mul_add(four, s34, s12),
            S::mul_add(eight, d34, d12).add(m[5]),
        ]
    }
}

/// G g for one 3-tap kernel (F(2×2, 3×3)'s G = [1 0 0; ½ ½ ½; ½ −½ ½; 0 0 1]): its 4
/// transformed values.
fn g4(k: &[f32]) -> [f32; 4] {
    let (a, b, c) = (k[0], k[1], k[2]);
    [a, 0.5 * (a + b + c), 0.5 * (a - b + c), c]
}

/// G g for one 3-tap kernel (F(4, 3)): its 6 transformed values.
fn g6(k: &[f32]) -> [f32; 6] {
    let (a, b, c) = (k[0], k[1], k[2]);
    [
        a / 4.0,
        -(a + b + c) / 6.0,
        -(a - b + c) / 6.0,
        a / 24.0 + b / 12.0 + c / 6.0,
        a / 24.0 - b / 12.0 + c / 6.0,
        c,
    ]
}

/// The transform, its tiles and the phase-plane layout of one padded input plane.
pub(super) struct Tiling {
    pub(super) transform: Transform,
    pub(super) tiles_h: usize,
    pub(super) tiles_w: usize,
    /// The padded input as a geometry whose kernel is the patch and whose stride is the
    /// phase stride ([`Transform::phase_stride`]), for [`fill_phases`].
    phases: ConvGeometry,
    pub(super) layout: PhaseLayout,
}

impl Tiling {
    /// Transformed positions per tile ([`Transform::products`]).
    pub(super) fn xis(&self) -> usize {
        self.transform.products()
    }

    pub(super) fn new(g: &ConvGeometry) -> Result<Self> {
        let transform = Transform::of(g).expect("a Winograd kernel shape (applies)");
        let (th, tw) = transform.tile();
        // A tile's patch: the tile plus the kernel's span − 1.
        let (ph, pw) = (th + g.kernel_h - 1, tw + g.kernel_w - 1);
        let (tiles_h, tiles_w) = transform.tiles(g);
        // Pad so the padded plane is exactly tile·tiles + span − 1 on each axis (an output size
        // that is not a multiple of the tile computes extra rows/columns that are dropped).
        let bottom = th * tiles_h + ph - th - g.in_h - g.pad_top;
        let right = tw * tiles_w + pw - tw - g.in_w - g.pad_left;
        let params = Conv2dParams {
            stride: transform.phase_stride(),
            dilation: (1, 1),
            padding: Padding::Explicit {
                top: g.pad_top,
                bottom,
                left: g.pad_left,
                right,
            },
            groups: 1,
        };
        let phases = ConvGeometry::new([1, 1, g.in_h, g.in_w], [1, 1, ph, pw], &params)?;
        Ok(Tiling {
            transform,
            tiles_h,
            tiles_w,
            layout: PhaseLayout::new(&phases),
            phases,
        })
    }
}

/// U[n][ξ][m] = (G g Gᵀ)[ξ] (3 × 3) or (G g)[ξ] (3 × 1, 1 × 3) for the kernel g = w[n, m],
/// in parallel over the output channels n (each one's rows of U are contiguous). Done once
/// per call, and one call may have a single image: on reference layer D (512 × 512 kernels,
/// 16 MiB of U) the transform on one thread was 40% of a one-image forward.
fn transform_filters(exec: Exec, g: &ConvGeometry, t: &Tiling, w: &[f32], u: &mut [f32]) {
    let (m_in, xis, taps) = (g.in_channels, t.xis(), g.kernel_h * g.kernel_w);
    let matrix = FilterMatrix::of(t.transform, taps);
    let per_thread = g.out_channels.div_ceil(exec.threads());
    u.par_chunks_mut(per_thread * xis * m_in)
        .zip(w.par_chunks(per_thread * m_in * taps))
        .for_each(|(un, wn)| {
            for (u_n, w_n) in un
                .chunks_exact_mut(xis * m_in)
                .zip(wn.chunks_exact(m_in * taps))
            {
                channel_filters(exec.isa(), &matrix, w_n, u_n);
            }
        });
}

/// The filter transform as a matrix, U[ξ] = Σ_tap coefficient · g[tap], kept as its non-zero
/// terms ξ by ξ (F(4×4, 3×3) has 196 of its 324). Built from the transformed kernels of unit
/// kernels (the transform is linear): the coefficient of (ξ, tap) is ∂U[ξ]/∂g[tap]. The forward
/// applies it; the grad-weight ([`super::winograd_grad_weight`]) applies its adjoint.
pub(super) struct FilterMatrix {
    pub(super) xis: usize,
    pub(super) taps: usize,
    /// ξ's terms as (tap, coefficient), by tap: `terms[starts[ξ]..starts[ξ + 1]]`.
    terms: [(usize, f32); 324],
    starts: [usize; 37],
}

impl FilterMatrix {
    pub(super) fn of(tr: Transform, taps: usize) -> Self {
        let mut column = [[0f32; 36]; 9];
        for (tap, c) in column.iter_mut().enumerate().take(taps) {
            let mut unit = [0f32; 9];
            unit[tap] = 1.0;
            *c = transform_kernel(tr, &unit[..taps]);
        }
        let xis = tr.products();
        let (mut terms, mut starts, mut len) = ([(0, 0.0); 324], [0; 37], 0);
        for xi in 0..xis {
            for (tap, c) in column.iter().enumerate().take(taps) {
                if c[xi] != 0.0 {
                    terms[len] = (tap, c[xi]);
                    len += 1;
                }
            }
            starts[xi + 1] = len;
        }
        FilterMatrix {
            xis,
            taps,
            terms,
            starts,
        }
    }

    /// ξ's non-zero terms as (tap, coefficient), by tap.
    pub(super) fn terms(&self, xi: usize) -> &[(usize, f32)] {
        &self.terms[self.starts[xi]..self.starts[xi + 1]]
    }

    /// Every coefficient as `[ξ][tap]`, zeros included (rows past `xis` zero): for loops that
    /// want a fixed number of taps unrolled rather than the sparse terms.
    pub(super) fn dense(&self) -> [[f32; 9]; 36] {
        let mut dense = [[0f32; 9]; 36];
        for (xi, row) in dense.iter_mut().enumerate().take(self.xis) {
            for &(tap, c) in self.terms(xi) {
                row[tap] = c;
            }
        }
        dense
    }
}

/// Kernels transformed per step of [`channel_filters`]: their taps, transposed, fill
/// `taps × FILTER_LANES` floats on the stack.
const FILTER_LANES: usize = 64;

crate::simd_dispatch!(fn channel_filters => channel_filters_kernel(
    matrix: &FilterMatrix, w_n: &[f32], u_n: &mut [f32]
));

/// One output channel's transformed kernels `u_n` (`[ξ][m]`) from its kernels `w_n`
/// (`[m][tap]`). A vector of kernels at a time where a kernel's taps fit a vector: their taps
/// transposed in registers (each kernel's loaded as a row, under a mask), each ξ's vector a sum
/// of tap vectors times the matrix's non-zero terms, stored once. The rest (the last
/// kernels short of a vector, or 3 × 3 kernels with 8-lane vectors) FILTER_LANES at a time
/// through rows on the stack, with plain loops the compiler vectorizes. Kernel by kernel in
/// scalar code this was 10% of reference layer D's forward; element by element, the
/// compiler's scatters into the rows were 17% of its 3 × 1 halves' (perf).
#[inline(always)]
unsafe fn channel_filters_kernel<S: SimdF32>(matrix: &FilterMatrix, w_n: &[f32], u_n: &mut [f32]) {
    let taps = matrix.taps;
    let m_in = w_n.len() / taps;
    let l = S::LANES;
    let by_vectors = if taps <= l { m_in / l * l } else { 0 };
    for m0 in (0..by_vectors).step_by(l) {
        // SAFETY: kernels m0 .. m0 + l are inside w_n (m0 + l ≤ m_in), each load reads only
        // its kernel's taps, and every store's l floats lie inside ξ's row of u_n.
        unsafe {
            let mut v = [S::zero(); 16];
            for (i, r) in v[..l].iter_mut().enumerate() {
                *r = S::load_partial(w_n.as_ptr().add((m0 + i) * taps), taps);
            }
            S::transpose(&mut v[..l]);
            for xi in 0..matrix.xis {
                let mut acc = S::zero();
                for &(tap, c) in matrix.terms(xi) {
                    acc = S::mul_add(S::splat(c), v[tap], acc);
                }
                acc.store(u_n[xi * m_in + m0..xi * m_in + m0 + l].as_mut_ptr());
            }
        }
    }
    let mut rows = [[0f32; FILTER_LANES]; 9];
    for m0 in (by_vectors..m_in).step_by(FILTER_LANES) {
        let lanes = FILTER_LANES.min(m_in - m0);
        for (i, k) in w_n[m0 * taps..(m0 + lanes) * taps]
            .chunks_exact(taps)
            .enumerate()
        {
            for (row, &v) in rows.iter_mut().zip(k) {
                row[i] = v;
            }
        }
        for xi in 0..matrix.xis {
            let out = &mut u_n[xi * m_in + m0..xi * m_in + m0 + lanes];
            out.fill(0.0);
            for &(tap, c) in matrix.terms(xi) {
                for (o, &v) in out.iter_mut().zip(&rows[tap][..lanes]) {
                    *o += c * v;
                }
            }
        }
    }
}

/// The transformed kernel of one 3 × 3, 3 × 1 or 1 × 3 kernel `k` (row-major), in ξ order
/// (its first [`Transform::products`] values): G k Gᵀ for 3 × 3, G k for the others.
pub(super) fn transform_kernel(tr: Transform, k: &[f32]) -> [f32; 36] {
    let mut u = [0f32; 36];
    match tr {
        Transform::F2x2 => both_sides(k, g4, &mut u),
        Transform::F4x4 => both_sides(k, g6, &mut u),
        // 3 × 1 and 1 × 3 kernels alike: three consecutive taps.
        Transform::F4Down | Transform::F4Across => u[..6].copy_from_slice(&g6(k)),
    }
    u
}

/// G g Gᵀ of a 3 × 3 kernel `k` for the G that `g_of` applies to one 3-vector (P × 3): G g
/// column by column, then (G g) Gᵀ row by row, into `u` row-major (P × P).
fn both_sides<const P: usize>(k: &[f32], g_of: fn(&[f32]) -> [f32; P], u: &mut [f32; 36]) {
    let mut gg = [[0f32; 3]; P];
    for j in 0..3 {
        for (i, v) in g_of(&[k[j], k[3 + j], k[6 + j]]).into_iter().enumerate() {
            gg[i][j] = v;
        }
    }
    for (i, row) in gg.iter().enumerate() {
        u[i * P..(i + 1) * P].copy_from_slice(&g_of(row));
    }
}

/// Floats of transformed input and products per block of tile rows: 512K floats (2 MiB), so
/// a block's matrices stay in L2/L3 next to the image's phase planes.
const BLOCK_FLOATS: usize = 1 << 19;

/// Tiles a block's GEMMs should have at least, to run near full speed.
const MIN_BLOCK_TILES: usize = 256;

/// Tile rows per block for `g`.
pub(super) fn block_rows(g: &ConvGeometry, t: &Tiling) -> usize {
    let per_row = t.xis() * (g.in_channels + g.out_channels) * t.tiles_w;
    let by_cache = BLOCK_FLOATS / per_row.max(1);
    let by_width = MIN_BLOCK_TILES.div_ceil(t.tiles_w);
    by_cache.max(by_width).clamp(1, t.tiles_h)
}

/// Whole images per block where an image has fewer tiles than a block should
/// ([`MIN_BLOCK_TILES`]): as many as fit in that many tiles (at least one, at most the
/// `task_images` a task runs), their tiles side by side in V and the products, so that each
/// product has several images' columns. One image's
/// 49 tiles (14 × 14, F(2×2, 3×3)) made each of the 16 products a 48-column register block and
/// one column left over; six images to a block, the MNIST network's 32 → 64 layer at 14 × 14
/// (batch 64; Intel Xeon VM, alternated, min of 6–10) runs its forward in 4.07–4.24 ms where
/// it took 4.73–4.93 on one image at a time (and 4.45–4.71 on im2col), 2.08 against 2.58 on 2
/// threads; a 64 → 64 layer there 6.60 against 7.93. (Whole images that fit in
/// [`MIN_BLOCK_TILES`] now give it five, 245 tiles, a tie with six in one process: 1 thread
/// 3.40–3.50 ms against 3.40–3.44; 2 threads 3.04 and 1.73 against 3.21 and 1.69, two runs.)
///
/// Layers with fewer channels than [`UNCAPPED_BLOCK_CHANNELS`] also keep a block's V and
/// products within [`BLOCK_FLOATS`]: they move (M + N) / (M·N) floats of them per
/// multiply-add, which from L3 costs more than wider products gain (64 → 64 at 14², batch 64:
/// 2 images 5.6 ms, 8 images 6.6, 16 images 8.5). With more channels the products' weights
/// U[ξ] (N × M) are what a block must amortize: each product reads its U[ξ] once (faer packs
/// it) however few its columns, and one image's block is past L2 anyway (reference layer D:
/// 3.2 MB). Intel Xeon VM, 2 threads, batch 8, harness switching the images per block in one
/// process (min of 8–10; forward, one image → each thread's four, the rule's, in two
/// settings that both give four): D (512 → 512 at 14², 49 tiles) 28.8 → 23.0–24.4 ms,
/// 256 → 256 at 14² 11.0 → 7.4–7.5, 128 → 128 at 14² 2.98 → 2.19–2.20, D's 3 × 1 and 1 × 3
/// halves (F(4, 3), 56 tiles) 6.65 → 5.95–6.12 and 6.60 → 5.93–5.94 (grad-input alike, in a
/// slow phase of the VM). Whole images past [`MIN_BLOCK_TILES`] lose: 256 → 256 at 28², 3 × 1
/// (196 tiles), 5.2–6.0 ms on one image, 5.8–6.5 on two.
pub(super) fn images_per_block(g: &ConvGeometry, t: &Tiling, task_images: usize) -> usize {
    let tiles = (t.tiles_h * t.tiles_w).max(1);
    let wanted = (MIN_BLOCK_TILES / tiles).clamp(1, task_images.max(1));
    if harmonic_channels_at_least(g, UNCAPPED_BLOCK_CHANNELS) {
        return wanted;
    }
    let by_cache = BLOCK_FLOATS / (t.xis() * (g.in_channels + g.out_channels) * tiles);
    wanted.min(by_cache).max(1)
}

/// The harmonic mean of a layer's channel counts from which [`images_per_block`] fills blocks
/// to [`MIN_BLOCK_TILES`] whatever their size.
const UNCAPPED_BLOCK_CHANNELS: usize = 128;

/// Floats of one block's transformed input and products for a task of `task_images` images:
/// a block of tile rows, or of [`images_per_block`] whole images. Sized by the task's images,
/// not the batch's: reference layer D at batch 8 on two threads gives each task four images,
/// where blocks of five were allotted before (3.2 MB more per thread).
pub(super) fn block_len(g: &ConvGeometry, t: &Tiling, task_images: usize) -> usize {
    let tiles = t.tiles_h * t.tiles_w;
    let block_tiles =
        (block_rows(g, t) * t.tiles_w).max(images_per_block(g, t, task_images) * tiles);
    t.xis() * (g.in_channels + g.out_channels) * block_tiles
}

/// Floats of scratch per task of `task_images` images: the image's phase planes, then a
/// block's transforms.
fn per_task_len(g: &ConvGeometry, t: &Tiling, task_images: usize) -> usize {
    g.in_channels * t.layout.len + block_len(g, t, task_images)
}

/// Whether [`forward_by_tile_rows`] splits an image: every thread gets tile rows of at least
/// [`MIN_BLOCK_TILES`] tiles (else the channel split of [`forward_within_images`]).
fn splits_by_tile_rows(threads: usize, t: &Tiling) -> bool {
    t.tiles_h >= threads && t.tiles_h / threads * t.tiles_w >= MIN_BLOCK_TILES
}

/// Forward pass: `y = conv(x, w) + bias` through the layer's [`Transform`].
pub fn forward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    let t = Tiling::new(g)?;
    let (m_in, n_out) = (g.in_channels, g.out_channels);
    let u_len = t.xis() * n_out * m_in;
    let threads = exec.threads();
    let within_images = splits_inside_images(threads, g.batch);
    let by_tiles = within_images && splits_by_tile_rows(threads, &t);
    let tasks = threads.min(g.batch);
    // Each task's images (for_each_task's split), one where the images are split inside.
    let task_images = if within_images {
        1
    } else {
        g.batch.div_ceil(tasks.max(1))
    };
    let per_task = per_task_len(g, &t, task_images);
    // The transformed weights, then the phase planes and transforms: each task's, or one
    // image's planes and the threads' transforms (split by tile rows), or one image's planes
    // and transforms (split by channels).
    let scratch_len = if by_tiles {
        m_in * t.layout.len + threads * block_len(g, &t, 1)
    } else if within_images {
        per_task
    } else {
        per_task * tasks
    };
    let scratch = ws.take(u_len + scratch_len)?;
    let (u, rest) = scratch.split_at_mut(u_len);
    transform_filters(exec, g, &t, w, u);
    let u = &*u;
    if by_tiles {
        forward_by_tile_rows(exec, g, &t, u, x, bias, y, rest);
        return Ok(());
    }
    if within_images {
        forward_within_images(exec, g, &t, u, x, bias, y, rest);
        return Ok(());
    }
    for_each_task(
        tasks,
        y,
        n_out * g.out_pixels(),
        rest,
        per_task,
        |images, yc, buf| {
            let (phases, rest) = buf.split_at_mut(m_in * t.layout.len);
            let batch = images_per_block(g, &t, task_images);
            if batch > 1 {
                let (img_in, img_out) = (m_in * g.in_pixels(), n_out * g.out_pixels());
                let xs = &x[images.start * img_in..images.end * img_in];
                for (j, (xb, yb)) in xs
                    .chunks(batch * img_in)
                    .zip(yc.chunks_mut(batch * img_out))
                    .enumerate()
                {
                    image_batch(exec.isa(), g, &t, u, xb, bias, phases, j == 0, rest, yb);
                }
                return;
            }
            for (local, n) in images.enumerate() {
                let xn = &x[n * m_in * g.in_pixels()..(n + 1) * m_in * g.in_pixels()];
                fill_all_phases(exec.isa(), g, &t, xn, phases, local == 0);
                let yn =
                    &mut yc[local * n_out * g.out_pixels()..(local + 1) * n_out * g.out_pixels()];
                let mut yn = ColumnWindow::whole(yn, g.out_pixels());
                let all = 0..t.tiles_h;
                tile_rows(exec.isa(), g, &t, u, phases, all, bias, rest, &mut yn);
            }
        },
    );
    Ok(())
}

/// [`forward`] for batches the threads cannot share image by image (one image, or an odd
/// batch on two threads): each image's steps are split over the threads instead — the phase
/// planes and the input transform by input channels, the products and the output transform by
/// output channels (each task's share of V, the products and the output is contiguous in
/// their `[channel][ξ][tile]` and NCHW layouts). Before, one thread ran the transforms while
/// faer's threads shared each product.
#[allow(clippy::too_many_arguments)]
fn forward_within_images(
    exec: Exec,
    g: &ConvGeometry,
    t: &Tiling,
    u: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut [f32],
) {
    let (m_in, n_out, isa) = (g.in_channels, g.out_channels, exec.isa());
    let ohw = g.out_pixels();
    let (phases, rest) = scratch.split_at_mut(m_in * t.layout.len);
    let xis = t.xis();
    let rows = block_rows(g, t);
    let (v_all, prod_all) = rest.split_at_mut(xis * m_in * rows * t.tiles_w);
    let outs = n_out.div_ceil(exec.threads());
    for_each_block_within_images(exec, g, t, x, phases, rows, |n, ty, tb, phases| {
        let v = &mut v_all[..xis * m_in * tb];
        transform_input_by_channels(exec, t, phases, ty.clone(), v, tb);
        let v = &*v;
        let yn = &mut y[n * n_out * ohw..][..n_out * ohw];
        prod_all[..xis * n_out * tb]
            .par_chunks_mut(outs * xis * tb)
            .zip(yn.par_chunks_mut(outs * ohw))
            .enumerate()
            .for_each(|(i, (pc, yc))| {
                let o = i * outs..i * outs + yc.len() / ohw;
                products(isa, g, t, u, o.clone(), v, tb, pc);
                let mut yc = ColumnWindow::whole(yc, ohw);
                let b = bias.map(|b| &b[o]);
                transform_output(isa, g, t, pc, tb, ty.clone(), b, &mut yc);
            });
    });
}

/// For each image `n` of `x` in turn, its phase planes filled by channels
/// ([`fill_phases_by_channels`]), then `f(n, ty, tb, phases)` for each block of `rows` tile
/// rows `ty` (`tb` tiles; the forward's [`block_rows`], or more where the scratch holds them):
/// the walk of the kernels that split each image over the threads.
pub(super) fn for_each_block_within_images(
    exec: Exec,
    g: &ConvGeometry,
    t: &Tiling,
    x: &[f32],
    phases: &mut [f32],
    rows: usize,
    mut f: impl FnMut(usize, Range<usize>, usize, &[f32]),
) {
    for (n, xn) in x.chunks_exact(g.in_channels * g.in_pixels()).enumerate() {
        fill_phases_by_channels(exec, g, t, xn, phases, n == 0);
        for ty0 in (0..t.tiles_h).step_by(rows) {
            let ty = ty0..(ty0 + rows).min(t.tiles_h);
            f(n, ty.clone(), ty.len() * t.tiles_w, phases);
        }
    }
}

/// [`transform_input`] of one image's phase planes, split over the threads by input channels
/// (each thread's rows of V are contiguous).
pub(super) fn transform_input_by_channels(
    exec: Exec,
    t: &Tiling,
    phases: &[f32],
    ty: Range<usize>,
    v: &mut [f32],
    tb: usize,
) {
    let ins = (phases.len() / t.layout.len).div_ceil(exec.threads());
    v.par_chunks_mut(ins * t.xis() * tb)
        .zip(phases.par_chunks(ins * t.layout.len))
        .for_each(|(vc, ph)| transform_input(exec.isa(), t, ph, ty.clone(), vc, tb));
}

/// [`forward`] for batches the threads cannot share image by image, on images with enough
/// tiles ([`splits_by_tile_rows`]): the phase planes are filled by input channels, then each
/// thread transforms, multiplies and writes back a run of the image's tile rows (its own
/// output rows of every channel, [`ColumnWindow`]), in blocks as the image split does. Of the
/// data one thread writes, the other reads only the phase planes; the channel split exchanges
/// the transformed input too (4× the image's input), which the VM's spells with its vCPUs on
/// different dies (`bench::core_to_core_round_trip_ns`) made 1.8× slower. Harness, batch 1,
/// 2 threads, min of 20, channel split against this in pairs run back to back, on quiet
/// minutes (round trip 53–66 ns): a 32 → 64 layer at 112² 1.76 → 1.39–1.41 ms, 128 → 128 at
/// 56² 2.54 → 2.47, its grad-input (the adjoint forward) 2.56 → 2.55; in the spells (round
/// trip 330–366 ns): 4.8–5.0 → 2.03–2.13, 4.57–4.72 → 3.0–3.17, 4.7–4.8 → 3.1–3.26.
#[allow(clippy::too_many_arguments)]
fn forward_by_tile_rows(
    exec: Exec,
    g: &ConvGeometry,
    t: &Tiling,
    u: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    scratch: &mut [f32],
) {
    let (m_in, n_out, isa, threads) = (g.in_channels, g.out_channels, exec.isa(), exec.threads());
    let (hw, ohw) = (g.in_pixels(), g.out_pixels());
    let (phases, blocks) = scratch.split_at_mut(m_in * t.layout.len);
    let share = |i: usize| i * t.tiles_h / threads..(i + 1) * t.tiles_h / threads;
    // Tile row ty writes output rows th·ty .. th·(ty + 1) (the last ones may be dropped).
    let th = t.transform.tile().0;
    let bounds: Vec<usize> = (0..=threads)
        .map(|i| (th * share(i).start * g.out_w).min(ohw))
        .collect();
    for (n, (xn, yn)) in x
        .chunks_exact(m_in * hw)
        .zip(y.chunks_exact_mut(n_out * ohw))
        .enumerate()
    {
        fill_phases_by_channels(exec, g, t, xn, phases, n == 0);
        let phases = &*phases;
        ColumnWindow::split(yn, ohw, &bounds)
            .into_par_iter()
            .zip(blocks.par_chunks_mut(block_len(g, t, 1)))
            .enumerate()
            .for_each(|(i, (mut yw, buf))| {
                tile_rows(isa, g, t, u, phases, share(i), bias, buf, &mut yw)
            });
    }
}

/// Tile rows `rows` of one image from its phase planes into `y` (its output planes, at least
/// those rows' columns), a block of [`block_rows`] at a time: input transform, products and
/// output transform, with `buf` (at least [`block_len`] floats) for a block's matrices.
#[allow(clippy::too_many_arguments)]
fn tile_rows(
    isa: super::Isa,
    g: &ConvGeometry,
    t: &Tiling,
    u: &[f32],
    phases: &[f32],
    rows: Range<usize>,
    bias: Option<&[f32]>,
    buf: &mut [f32],
    y: &mut ColumnWindow<'_>,
) {
    let (m_in, n_out, block) = (g.in_channels, g.out_channels, block_rows(g, t));
    for ty0 in rows.clone().step_by(block) {
        let ty = ty0..(ty0 + block).min(rows.end);
        let tb = ty.len() * t.tiles_w;
        let (v, rest) = buf.split_at_mut(t.xis() * m_in * tb);
        let prod = &mut rest[..t.xis() * n_out * tb];
        transform_input(isa, t, phases, ty.clone(), v, tb);
        products(isa, g, t, u, 0..n_out, v, tb, prod);
        transform_output(isa, g, t, prod, tb, ty, bias, y);
    }
}

/// The whole images `x` (a run of the batch) into their outputs `y` as one block
/// ([`images_per_block`]): each image's phase planes and input transform, its tiles in
/// columns of V after the previous image's; the products of all the images' tiles at once;
/// each image's output transform from its columns. `clear` as for [`fill_all_phases`] (the
/// first use of `phases`); `buf` holds at least [`block_len`] floats.
#[allow(clippy::too_many_arguments)]
fn image_batch(
    isa: super::Isa,
    g: &ConvGeometry,
    t: &Tiling,
    u: &[f32],
    x: &[f32],
    bias: Option<&[f32]>,
    phases: &mut [f32],
    clear: bool,
    buf: &mut [f32],
    y: &mut [f32],
) {
    let (m_in, n_out, ohw) = (g.in_channels, g.out_channels, g.out_pixels());
    let tiles = t.tiles_h * t.tiles_w;
    let images = x.len() / (m_in * g.in_pixels());
    let tb = images * tiles;
    let (v, rest) = buf.split_at_mut(t.xis() * m_in * tb);
    let prod = &mut rest[..t.xis() * n_out * tb];
    for (j, xn) in x.chunks_exact(m_in * g.in_pixels()).enumerate() {
        fill_all_phases(isa, g, t, xn, phases, clear && j == 0);
        transform_input(isa, t, phases, 0..t.tiles_h, &mut v[j * tiles..], tb);
    }
    products(isa, g, t, u, 0..n_out, v, tb, prod);
    for (j, yn) in y.chunks_exact_mut(n_out * ohw).enumerate() {
        let mut yn = ColumnWindow::whole(yn, ohw);
        transform_output(
            isa,
            g,
            t,
            &prod[j * tiles..],
            tb,
            0..t.tiles_h,
            bias,
            &mut yn,
        );
    }
}

/// The phase planes of one image's input channels, split over the threads by channels.
pub(super) fn fill_phases_by_channels(
    exec: Exec,
    g: &ConvGeometry,
    t: &Tiling,
    xn: &[f32],
    phases: &mut [f32],
    clear: bool,
) {
    let ins = g.in_channels.div_ceil(exec.threads());
    let (hw, plane) = (g.in_pixels(), t.layout.len);
    phases
        .par_chunks_mut(ins * plane)
        .zip(xn.par_chunks(ins * hw))
        .for_each(|(ph, xc)| fill_all_phases(exec.isa(), g, t, xc, ph, clear));
}

/// `prod[o][ξ] = U[ξ] · V[ξ]` for the output channels `outs` (`prod` holds theirs only) and
/// every ξ: V holds `[m][ξ][tile]` and `prod` `[o][ξ][tile]`, `tb` tiles each, so a product's
/// operand and result rows are `ξs·tb` apart (ξs = 16, 36 or 6).
#[allow(clippy::too_many_arguments)]
fn products(
    isa: super::Isa,
    g: &ConvGeometry,
    t: &Tiling,
    u: &[f32],
    outs: Range<usize>,
    v: &[f32],
    tb: usize,
    prod: &mut [f32],
) {
    let (m_in, xis) = (g.in_channels, t.xis());
    for xi in 0..xis {
        // Rows o of U[ξ] are ξs·M apart, from U[outs.start][ξ].
        let uk = &u[(outs.start * xis + xi) * m_in..];
        let (vk, pk) = (&v[xi * tb..], &mut prod[xi * tb..]);
        if m_in <= UNPACKED_MAX_K {
            let ops = Operands {
                c: uk,
                c_rows: Rows::Strided(xis * m_in),
                c_col: 1,
                d: vk,
                n: outs.len(),
                k: m_in,
                p: tb,
                bias: None,
                d_rows: Rows::Strided(xis * tb),
            };
            // Through the caches: the output transform reads the products back at once.
            // Reference layer B's forward (harness, min of 20, alternated 4×): streamed
            // 14.2–14.6 ms, cached 13.2–13.4 (one outlier 15.1); C's a tie (20.5–22.3 against
            // 20.6–21.1).
            small_k_gemm(isa, ops, pk, xis * tb, Store::Cached);
        } else {
            gemm(
                pk,
                xis * tb,
                MatView::row_major(uk, outs.len(), m_in, xis * m_in),
                MatView::row_major(vk, m_in, tb, xis * tb),
                false,
                1,
            );
        }
    }
}

/// Fills the phase planes of every input channel of one image.
pub(super) fn fill_all_phases(
    isa: super::Isa,
    g: &ConvGeometry,
    t: &Tiling,
    xn: &[f32],
    phases: &mut [f32],
    clear: bool,
) {
    fill_dispatch(isa, g, t, xn, phases, clear)
}

crate::simd_dispatch!(fn fill_dispatch => fill_kernel(
    g: &ConvGeometry, t: &Tiling, xn: &[f32], phases: &mut [f32], clear: bool
));

#[inline(always)]
unsafe fn fill_kernel<S: SimdF32>(
    g: &ConvGeometry,
    t: &Tiling,
    xn: &[f32],
    phases: &mut [f32],
    clear: bool,
) {
    let hw = g.in_pixels();
    for (m, buf) in phases.chunks_exact_mut(t.layout.len).enumerate() {
        fill_phases::<S>(&t.phases, &t.layout, &xn[m * hw..(m + 1) * hw], buf, clear);
    }
}

/// V[m][ξ][tile] = (Bᵀ d B)[ξ] (3 × 3) or (Bᵀ d)[ξ] (3 × 1, 1 × 3) for the input channels
/// whose phase planes `phases` holds (m counted from the first) and the tiles of tile rows
/// `ty`, each (m, ξ) row of V `ld` floats after the previous (the block's tiles, or several
/// images' side by side).
pub(super) fn transform_input(
    isa: super::Isa,
    t: &Tiling,
    phases: &[f32],
    ty: Range<usize>,
    v: &mut [f32],
    ld: usize,
) {
    let (channels, tiles) = (phases.len() / t.layout.len, ty.len() * t.tiles_w);
    assert!(ld >= tiles, "V rows overlap");
    assert!(
        channels == 0 || v.len() >= (channels * t.xis() - 1) * ld + tiles,
        "V too short"
    );
    input_dispatch(isa, t, phases, ty, v, ld)
}

crate::simd_dispatch!(fn input_dispatch => input_kernel(
    t: &Tiling, phases: &[f32], ty: Range<usize>, v: &mut [f32], ld: usize
));

#[inline(always)]
unsafe fn input_kernel<S: SimdF32>(
    t: &Tiling,
    phases: &[f32],
    ty: Range<usize>,
    v: &mut [f32],
    ld: usize,
) {
    let l = S::LANES;
    let (wq, plane) = (t.layout.wq, t.layout.wq * t.layout.hq);
    let vp = v.as_mut_ptr();
    for (m, phase) in phases.chunks_exact(t.layout.len).enumerate() {
        let pp = phase.as_ptr();
        for (r, row) in ty.clone().enumerate() {
            let mut tx = 0;
            while tx < t.tiles_w {
                let n = (t.tiles_w - tx).min(l);
                // SAFETY: reads inside the phase planes (each has tiles + 1 rows and columns
                // (3 × 3), or the patches' rows and columns (F(4, 3)); then the layout's spare
                // row and margin cover a vector past the last tile, and the 1 × 3 patches'
                // 4·LANES + 2 floats); writes n <= LANES values inside V's rows for (m, ξ).
                unsafe {
                    let at = vp.add(m * t.xis() * ld + r * t.tiles_w + tx);
                    match t.transform {
                        Transform::F2x2 => {
                            let d = pp.add((row * wq) + tx);
                            input_tiles_2x2::<S>(d, plane, wq, at, ld, n)
                        }
                        Transform::F4x4 => {
                            input_tiles_4x4::<S>(pp.add(4 * row * wq + 4 * tx), wq, at, ld, n)
                        }
                        Transform::F4Down => {
                            input_tiles_down::<S>(pp.add(4 * row * wq + tx), wq, at, ld, n)
                        }
                        Transform::F4Across => {
                            input_tiles_across::<S>(pp.add(row * wq + 4 * tx), at, ld, n)
                        }
                    }
                }
                tx += l;
            }
        }
    }
}

/// Column `j` of a small matrix of vectors.
#[inline(always)]
pub(super) fn column<S: Copy, const R: usize, const C: usize>(m: &[[S; C]; R], j: usize) -> [S; R] {
    let mut c = [m[0][j]; R];
    for (v, row) in c.iter_mut().zip(m) {
        *v = row[j];
    }
    c
}

/// Stores `n ≤ LANES` lanes of `o` at `at` (a whole vector where n = LANES).
#[inline(always)]
pub(super) unsafe fn store_lanes<S: SimdF32>(o: S, at: *mut f32, n: usize) {
    // SAFETY: the caller's: `at .. at + n` is writable.
    unsafe {
        if n == S::LANES {
            o.store(at)
        } else {
            o.store_partial(at, n)
        }
    }
}

/// F(2×2, 3×3)'s input transform of `n` tiles of one tile row: `d` is their first tile's
/// top-left tap in phase plane (0, 0) (the other phases `plane` floats apart, rows `wq`);
/// (Bᵀ d B)[ξ] goes to `at + ξ·ld`.
#[inline(always)]
unsafe fn input_tiles_2x2<S: SimdF32>(
    d: *const f32,
    plane: usize,
    wq: usize,
    at: *mut f32,
    ld: usize,
    n: usize,
) {
    // SAFETY: the caller's (see input_kernel).
    unsafe {
        // d[i][j] for the tiles. (Plain loops and #[inline(always)] helpers only: closures
        // and array::from_fn would be compiled outside this function's target features.)
        let mut dv = [[S::zero(); 4]; 4];
        for (i, di) in dv.iter_mut().enumerate() {
            for (j, dij) in di.iter_mut().enumerate() {
                let ph = (i % 2) * 2 + j % 2;
                *dij = S::load(d.add(ph * plane + (i / 2) * wq + j / 2));
            }
        }
        // Bᵀ d (on each column), then (Bᵀ d) B (on each row of that).
        let mut cols = [[S::zero(); 4]; 4];
        for (j, c) in cols.iter_mut().enumerate() {
            *c = bt4([dv[0][j], dv[1][j], dv[2][j], dv[3][j]]);
        }
        let mut tv = [[S::zero(); 4]; 4];
        for (i, row) in tv.iter_mut().enumerate() {
            *row = bt4([cols[0][i], cols[1][i], cols[2][i], cols[3][i]]);
        }
        for (i, out) in tv.iter().enumerate() {
            for (j, o) in out.iter().enumerate() {
                store_lanes(*o, at.add((i * 4 + j) * ld), n);
            }
        }
    }
}

/// F(4, 3)'s input transform down the columns (3 × 1) of `n` tiles of one tile row: `d` is the
/// first tile's top tap in the padded plane (rows `wq` apart; a tile is a column, so the tiles'
/// taps k are one row's contiguous run); (Bᵀ d)[ξ] goes to `at + ξ·ld`.
#[inline(always)]
unsafe fn input_tiles_down<S: SimdF32>(
    d: *const f32,
    wq: usize,
    at: *mut f32,
    ld: usize,
    n: usize,
) {
    // SAFETY: the caller's (see input_kernel).
    unsafe {
        let mut dv = [S::zero(); 6];
        for (k, dk) in dv.iter_mut().enumerate() {
            *dk = S::load(d.add(k * wq));
        }
        for (xi, o) in bt6(dv).into_iter().enumerate() {
            store_lanes(o, at.add(xi * ld), n);
        }
    }
}

/// Taps 0–5 of `LANES` consecutive tiles along a row, tile t's taps at `d + 4t .. d + 4t + 6`:
/// four contiguous vectors deinterleaved twice give taps 0–3 (residues 0–3 mod 4); taps 4 and
/// 5 are taps 0 and 1 of the next tile, one lane over.
#[inline(always)]
unsafe fn taps_across<S: SimdF32>(d: *const f32) -> [S; 6] {
    let l = S::LANES;
    // SAFETY: the caller's: 4·LANES + 2 floats from `d` are readable.
    unsafe {
        let [r0, r1, r2, r3] = deinterleave4([
            S::load(d),
            S::load(d.add(l)),
            S::load(d.add(2 * l)),
            S::load(d.add(3 * l)),
        ]);
        let r4 = S::shift_lanes::<1>(r0, S::splat(*d.add(4 * l)));
        let r5 = S::shift_lanes::<1>(r1, S::splat(*d.add(4 * l + 1)));
        [r0, r1, r2, r3, r4, r5]
    }
}

/// Four consecutive vectors (4·LANES values) split by residue mod 4: lane t of result k is
/// value 4t + k, deinterleaved twice by 2 (the inverse of [`store_tiles_across`]'s
/// interleave).
#[inline(always)]
pub(super) unsafe fn deinterleave4<S: SimdF32>(v: [S; 4]) -> [S; 4] {
    // SAFETY: register operations.
    unsafe {
        let (e0, o0) = S::deinterleave(v[0], v[1]);
        let (e1, o1) = S::deinterleave(v[2], v[3]);
        let (r0, r2) = S::deinterleave(e0, e1);
        let (r1, r3) = S::deinterleave(o0, o1);
        [r0, r1, r2, r3]
    }
}

/// F(4, 3)'s input transform along a row (1 × 3) of `n` tiles ([`taps_across`] from `d`, the
/// first tile's first tap in the padded row); (Bᵀ d)[ξ] goes to `at + ξ·ld`.
#[inline(always)]
unsafe fn input_tiles_across<S: SimdF32>(d: *const f32, at: *mut f32, ld: usize, n: usize) {
    // SAFETY: the caller's (see input_kernel).
    unsafe {
        for (xi, o) in bt6(taps_across::<S>(d)).into_iter().enumerate() {
            store_lanes(o, at.add(xi * ld), n);
        }
    }
}

/// F(4×4, 3×3)'s input transform of `n` tiles of one tile row: `d` is the first tile's
/// top-left tap in the padded plane (rows `wq` apart), each of the patches' 6 rows taken
/// apart as [`taps_across`] does; (Bᵀ d B)[ξ] goes to `at + ξ·ld`.
#[inline(always)]
unsafe fn input_tiles_4x4<S: SimdF32>(d: *const f32, wq: usize, at: *mut f32, ld: usize, n: usize) {
    // SAFETY: the caller's (see input_kernel).
    unsafe {
        // d B for each patch row, then Bᵀ (d B) down each column.
        let mut rows = [[S::zero(); 6]; 6];
        for (i, r) in rows.iter_mut().enumerate() {
            *r = bt6(taps_across::<S>(d.add(i * wq)));
        }
        for j in 0..6 {
            for (i, o) in bt6(column(&rows, j)).into_iter().enumerate() {
                store_lanes(o, at.add((i * 6 + j) * ld), n);
            }
        }
    }
}

/// The planes of `y` (a window of whole output planes, one per row) = Aᵀ M A (3 × 3) or Aᵀ M
/// (3 × 1, 1 × 3), plus bias, for the tiles of tile rows `ty`, written back as output rows:
/// one plane per output channel whose products (`[o][ξ][tile]`, o counted from the first, rows
/// `ld` floats apart as in [`transform_input`]) `prod` holds, and `bias` from that channel.
#[allow(clippy::too_many_arguments)]
fn transform_output(
    isa: super::Isa,
    g: &ConvGeometry,
    t: &Tiling,
    prod: &[f32],
    ld: usize,
    ty: Range<usize>,
    bias: Option<&[f32]>,
    y: &mut ColumnWindow<'_>,
) {
    let (channels, tiles) = (y.rows(), ty.len() * t.tiles_w);
    assert!(ld >= tiles, "product rows overlap");
    assert!(
        channels == 0 || prod.len() >= (channels * t.xis() - 1) * ld + tiles,
        "products too short"
    );
    assert!(bias.is_none_or(|b| b.len() >= channels), "bias too short");
    output_dispatch(isa, g, t, prod, ld, ty, bias, y)
}

crate::simd_dispatch!(fn output_dispatch => output_kernel(
    g: &ConvGeometry, t: &Tiling, prod: &[f32], ld: usize, ty: Range<usize>,
    bias: Option<&[f32]>, y: &mut ColumnWindow<'_>
));

#[inline(always)]
unsafe fn output_kernel<S: SimdF32>(
    g: &ConvGeometry,
    t: &Tiling,
    prod: &[f32],
    ld: usize,
    ty: Range<usize>,
    bias: Option<&[f32]>,
    y: &mut ColumnWindow<'_>,
) {
    // SAFETY: forwarded from this function's contract (transform_output checked the extents).
    unsafe {
        match t.transform {
            Transform::F2x2 => output_2x2::<S>(g, t, prod, ld, ty, bias, y),
            _ => output_f4::<S>(g, t, prod, ld, ty, bias, y),
        }
    }
}

/// The `X` products of `n ≤ LANES` tiles from `at` (rows `ld` apart), the lanes past `n` zero.
#[inline(always)]
unsafe fn load_products<S: SimdF32, const X: usize>(at: *const f32, ld: usize, n: usize) -> [S; X] {
    // SAFETY: the caller's: n floats of each of the X rows are readable.
    unsafe {
        let mut m = [S::zero(); X];
        for (xi, v) in m.iter_mut().enumerate() {
            *v = if n == S::LANES {
                S::load(at.add(xi * ld))
            } else {
                S::load_partial(at.add(xi * ld), n)
            };
        }
        m
    }
}

/// [`output_kernel`] for F(2×2, 3×3): each tile row's two output rows staged as their even and
/// odd columns, then interleaved.
#[inline(always)]
unsafe fn output_2x2<S: SimdF32>(
    g: &ConvGeometry,
    t: &Tiling,
    prod: &[f32],
    ld: usize,
    ty_range: Range<usize>,
    bias: Option<&[f32]>,
    y: &mut ColumnWindow<'_>,
) {
    let (l, ow) = (S::LANES, g.out_w);
    let pp = prod.as_ptr();
    // Two output rows of one tile row: the even and odd columns of each, before interleaving.
    let mut lanes = [[0f32; STAGING]; 4];
    let tw = t.tiles_w;
    for c in 0..y.rows() {
        let b = bias.map_or(0.0, |b| b[c]);
        for (r, ty) in ty_range.clone().enumerate() {
            let mut tx = 0;
            while tx < tw {
                let n = (tw - tx).min(l);
                // SAFETY: loads of n <= LANES products of this channel's tile row (partial at
                // the end); stores into the staging rows (applies() bounds tiles_w).
                unsafe {
                    let m: [S; 16] = load_products(pp.add(c * 16 * ld + r * tw + tx), ld, n);
                    // Aᵀ m: 2 rows of 4.
                    let mut rr = [[S::zero(); 4]; 2];
                    for j in 0..4 {
                        let [a0, a1] = at2([m[j], m[4 + j], m[8 + j], m[12 + j]]);
                        rr[0][j] = a0;
                        rr[1][j] = a1;
                    }
                    let bv = S::splat(b);
                    for (k, row) in rr.iter().enumerate() {
                        let [y0, y1] = at2(*row);
                        let (y0, y1) = (y0.add(bv), y1.add(bv));
                        y0.store(lanes[2 * k].as_mut_ptr().add(tx));
                        y1.store(lanes[2 * k + 1].as_mut_ptr().add(tx));
                    }
                }
                tx += l;
            }
            for k in 0..2 {
                let oh = 2 * ty + k;
                if oh < g.out_h {
                    let row = y.row_columns(c, oh * ow..(oh + 1) * ow);
                    elementwise::interleave2(
                        S::ISA,
                        &lanes[2 * k][..tw],
                        &lanes[2 * k + 1][..tw],
                        row,
                    );
                }
            }
        }
    }
}

/// [`output_kernel`] for F(4, 3) and F(4×4, 3×3). Down the columns (3 × 1), a tile row's tiles
/// are the columns of its 4 output rows, so each output is a contiguous run of one row; along
/// the rows (1 × 3, and each of a 4 × 4 tile's rows), a tile's 4 outputs are consecutive
/// columns of one row, written by [`store_tiles_across`].
#[inline(always)]
unsafe fn output_f4<S: SimdF32>(
    g: &ConvGeometry,
    t: &Tiling,
    prod: &[f32],
    ld: usize,
    ty_range: Range<usize>,
    bias: Option<&[f32]>,
    y: &mut ColumnWindow<'_>,
) {
    let (l, ow, tw, xis) = (S::LANES, g.out_w, t.tiles_w, t.xis());
    let pp = prod.as_ptr();
    for c in 0..y.rows() {
        // SAFETY: a register operation.
        let bv = unsafe { S::splat(bias.map_or(0.0, |b| b[c])) };
        for (r, ty) in ty_range.clone().enumerate() {
            // The output rows of the tile row: 4 where tiles are 4 high (fewer at the bottom
            // of the image), else its own row.
            let (first, rows) = match t.transform {
                Transform::F4Across => (ty, 1),
                _ => (4 * ty, (g.out_h - 4 * ty).min(4)),
            };
            let mut out = [std::ptr::null_mut::<f32>(); 4];
            for (k, o) in out.iter_mut().enumerate().take(rows) {
                let oh = first + k;
                *o = y.row_columns(c, oh * ow..(oh + 1) * ow).as_mut_ptr();
            }
            let mut tx = 0;
            while tx < tw {
                let n = (tw - tx).min(l);
                // SAFETY: loads of n <= LANES products of this channel's tile row; stores of
                // n lanes at columns tx .. tx + n <= out_w of the rows inside the window
                // (3 × 1), or of columns 4·tx .. out_w at most of its rows (the others).
                unsafe {
                    let at = pp.add(c * xis * ld + r * tw + tx);
                    match t.transform {
                        Transform::F4Down => {
                            let m: [S; 6] = load_products(at, ld, n);
                            for (k, v) in at4(m).into_iter().enumerate().take(rows) {
                                store_lanes(v.add(bv), out[k].add(tx), n);
                            }
                        }
                        Transform::F4Across => {
                            let m: [S; 6] = load_products(at, ld, n);
                            store_tiles_across(at4(m), bv, out[0], 4 * tx, ow);
                        }
                        _ => {
                            // Aᵀ m down each of the 6 columns (column j's products are
                            // 6 rows apart from row j), then each output row's Aᵀ.
                            let mut by_column = [[S::zero(); 4]; 6];
                            for (j, c) in by_column.iter_mut().enumerate() {
                                *c = at4(load_products(at.add(j * ld), 6 * ld, n));
                            }
                            for (k, &o) in out.iter().enumerate().take(rows) {
                                store_tiles_across(at4(column(&by_column, k)), bv, o, 4 * tx, ow);
                            }
                        }
                    }
                }
                tx += l;
            }
        }
    }
}

/// Writes `LANES` tiles' 4 outputs `v` (each a vector over the tiles), plus `bias`, as the
/// consecutive columns `col0 ..` of the output row `row` (up to `ow`): the 4 vectors are
/// interleaved by 4 in registers (twice by 2) and stored as 4·LANES contiguous columns.
#[inline(always)]
unsafe fn store_tiles_across<S: SimdF32>(
    v: [S; 4],
    bias: S,
    row: *mut f32,
    col0: usize,
    ow: usize,
) {
    let l = S::LANES;
    // SAFETY: the caller's: columns col0 .. ow of `row` are writable.
    unsafe {
        let v = [
            v[0].add(bias),
            v[1].add(bias),
            v[2].add(bias),
            v[3].add(bias),
        ];
        let (a_lo, a_hi) = S::interleave(v[0], v[2]);
        let (b_lo, b_hi) = S::interleave(v[1], v[3]);
        let (v0, v1) = S::interleave(a_lo, b_lo);
        let (v2, v3) = S::interleave(a_hi, b_hi);
        for (q, v) in [v0, v1, v2, v3].into_iter().enumerate() {
            let col = col0 + q * l;
            let count = ow.saturating_sub(col).min(l);
            if count > 0 {
                store_lanes(v, row.add(col), count);
            }
        }
    }
}
