//! The one place that calls the GEMM crate (faer): C = A·B or C += A·B on row-major views.
//!
//! faer's matmul reaches 70–94% of this machine's FMA peak on the reference shapes with AVX-512
//! on stable Rust (DESIGN.md); everything else in the crate multiplies matrices through here.

use faer::{Accum, MatMut, MatRef, Par};

/// A read-only matrix view over a slice: row-major with a row stride, or the transpose of one.
#[derive(Clone, Copy, Debug)]
pub struct MatView<'a> {
    data: &'a [f32],
    rows: usize,
    cols: usize,
    /// Elements between consecutive rows of the *stored* row-major matrix.
    stride: usize,
    transposed: bool,
}

impl<'a> MatView<'a> {
    /// A `rows × cols` row-major matrix whose rows are `stride` elements apart.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize, stride: usize) -> Self {
        debug_assert!(cols <= stride || rows <= 1);
        debug_assert!(rows == 0 || data.len() >= (rows - 1) * stride + cols);
        MatView {
            data,
            rows,
            cols,
            stride,
            transposed: false,
        }
    }

    /// A dense `rows × cols` row-major matrix.
    pub fn dense(data: &'a [f32], rows: usize, cols: usize) -> Self {
        Self::row_major(data, rows, cols, cols)
    }

    /// The transpose (no copy).
    pub fn t(self) -> Self {
        MatView {
            transposed: !self.transposed,
            ..self
        }
    }

    /// Rows of the logical (possibly transposed) matrix.
    pub fn nrows(&self) -> usize {
        if self.transposed {
            self.cols
        } else {
            self.rows
        }
    }

    /// Columns of the logical matrix.
    pub fn ncols(&self) -> usize {
        if self.transposed {
            self.rows
        } else {
            self.cols
        }
    }

    fn as_faer(&self) -> MatRef<'a, f32> {
        let m =
            MatRef::from_row_major_slice_with_stride(self.data, self.rows, self.cols, self.stride);
        if self.transposed { m.transpose() } else { m }
    }
}

/// `c = a·b` (or `c += a·b` when `accumulate`), where `c` is row-major with row stride `ldc`.
/// `threads > 1` lets the GEMM split the work over the current rayon pool.
pub fn gemm(
    c: &mut [f32],
    ldc: usize,
    a: MatView<'_>,
    b: MatView<'_>,
    accumulate: bool,
    threads: usize,
) {
    let (m, k, n) = (a.nrows(), a.ncols(), b.ncols());
    assert_eq!(b.nrows(), k, "gemm inner dimensions");
    if m == 0 || n == 0 {
        return;
    }
    // Built as the transpose of a column-major view: faer 0.24's
    // `MatMut::from_row_major_slice_with_stride_mut` swaps the strides (yields column-major).
    let dst = MatMut::from_column_major_slice_with_stride_mut(c, n, m, ldc).transpose_mut();
    let accum = if accumulate {
        Accum::Add
    } else {
        Accum::Replace
    };
    let par = if threads > 1 {
        Par::rayon(threads)
    } else {
        Par::Seq
    };
    faer::linalg::matmul::matmul(dst, accum, a.as_faer(), b.as_faer(), 1.0f32, par);
    if threads > 1 {
        // The threads of the pool faer split the product over (the current one).
        rayon::broadcast(|_| clear_upper_vector_state());
    } else {
        clear_upper_vector_state();
    }
}

/// `vzeroupper` where the CPU has AVX. faer's AVX microkernels return with the upper halves of
/// the vector registers in use (no `vzeroupper` after them); on Intel cores every legacy-SSE
/// instruction that follows — all the code compiled for the baseline target, such as im2col's
/// copies, gathers and fills — then pays a transition penalty, until one of the crate's own
/// AVX kernels returns (the compiler ends those with `vzeroupper`). AMD's cores have no such
/// penalty, which is why it went unseen on the Zen 4 VM. On an Intel Xeon (Emerald Rapids) VM,
/// 1 thread: the MNIST network's block3 forward (64 images, 64 → 128 channels at 7 × 7: im2col
/// tiles, each followed by a faer product) 46–48 → 6.5 ms; the same build compiled for the
/// native CPU (no legacy-SSE code at all) took 6.2–6.4.
fn clear_upper_vector_state() {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx") {
        #[target_feature(enable = "avx")]
        fn zero_upper() {
            std::arch::x86_64::_mm256_zeroupper();
        }
        // SAFETY: the CPU has AVX (checked above).
        unsafe { zero_upper() };
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_naive_product_with_transposes_and_strides() {
        let (m, k, n) = (5, 7, 3);
        let a: Vec<f32> = (0..m * 9).map(|i| (i as f32 * 0.37).sin()).collect(); // m×k, stride 9
        let bt: Vec<f32> = (0..n * k).map(|i| (i as f32 * 0.11).cos()).collect(); // n×k = bᵀ
        let mut c = vec![1.0f32; m * 4]; // ldc 4, cols 0..3
        gemm(
            &mut c,
            4,
            MatView::row_major(&a, m, k, 9),
            MatView::dense(&bt, n, k).t(),
            true,
            2,
        );
        for i in 0..m {
            for j in 0..n {
                let want: f32 = 1.0 + (0..k).map(|p| a[i * 9 + p] * bt[j * k + p]).sum::<f32>();
                assert!(
                    (c[i * 4 + j] - want).abs() < 1e-5,
                    "{i} {j} {} {want}",
                    c[i * 4 + j]
                );
            }
            assert_eq!(c[i * 4 + 3], 1.0, "padding column untouched");
        }
    }
}
