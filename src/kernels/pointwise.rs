//! A register-blocked GEMM for the pointwise (1×1) step with few input channels:
//! `Y (N × P) (+)= C (N × K) · D (K × P)`, all row-major, K small (a depthwise-separable
//! layer's M·K, 32 on reference layer B).
//!
//! General GEMMs pack both operands and are tuned for large K; with K = 32 the packing and the
//! short inner loop cost about half the time (faer reaches under half of this machine's peak
//! there). Here C is never packed: each 8 × 3-vector block of Y keeps 24 accumulators in
//! registers while k runs over all of K, reading 3 vectors of a D row and broadcasting 8
//! scalars of C per step (24 FMAs per 11 loads). Column blocks are the outer loop so the
//! K × 48 slice of D they read stays in L1 across all row blocks; on Intel's cores, slices
//! whose rows start on more than 128 cache lines, which do not, are first copied into one
//! aligned panel (see `packs` and `Cores::packs_deep_panels`).
//!
//! Eight rows rather than six (with 4 vectors): channel counts are multiples of 8, so no
//! short remainder block, and the narrower D slice fits L1 at K = 128. Harness, 2 threads,
//! min of 30, alternated 3×: reference layer D's pointwise forward 3.86–4.07 → 3.82–3.91 ms,
//! C's grad-input 3.89–4.08 → 3.73–4.00, D's 3 × 1 forward (implicit GEMM) 11.81–11.91 →
//! 11.54–11.65; 12 × 2 was slower on forwards (B 1.93 → 2.21). Instruction sets with 16
//! vector registers (AVX2, SSE2) use 6 × 2 blocks instead, which fit without spills.

use std::marker::PhantomData;
use std::ops::Range;

use super::cores::Cores;
use super::simd::{Isa, SimdF32};

/// Rows and vectors of Y per register block with 32 vector registers (AVX-512).
const WIDE_BLOCK: (usize, usize) = (8, 3);
/// The same with 16 vector registers (AVX2, SSE2): 6 × 2 accumulators, 2 D vectors and the
/// broadcast fit, where 8 × 3 spilled accumulators to the stack on every step. The AVX2 kernel
/// on this machine (harness, min of 15, alternated 3×): reference layer C's pointwise forward
/// 9.1–11.4 → 7.2–8.9 ms, B's 7.1–8.6 → 6.3–7.3, D's 9.1–11.0 → 7.5–9.4.
const NARROW_BLOCK: (usize, usize) = (6, 2);

/// Whether `small_k_gemm` reads a C of depth `k` faster row-major than column-wise on `isa`:
/// with 16 vector registers, where it runs narrow blocks (see `conv::with_transposed_weight`),
/// and from [`COLUMN_READ_MAX_K`] on, on the cores where that measured faster
/// ([`Cores::copies_deep_transposed_weights`]).
pub fn wants_row_major_c(isa: Isa, k: usize) -> bool {
    isa.registers() < 32
        || (k >= COLUMN_READ_MAX_K && Cores::detect().copies_deep_transposed_weights())
}

/// Depth from which a column-wise C costs more than a row-major copy even with AVX-512's 8 × 3
/// blocks. A row block reads its 8 rows of column k from one line and column k + 1 from the
/// line K floats on: every step a new line, none of which L1 keeps for the next row block
/// (which reads the line's other half). At K = 512 those lines are 2 KiB apart, on 2 of L1's
/// 64 sets and 64 of the L2's 2048, where row-major rows are contiguous; the likely cause of
/// the difference, which no hardware counter on the VM could confirm, is that the deep
/// product's packed panel (K × 48 floats, past L1) competes with them in L2 and the prefetchers
/// do not follow a 2 KiB stride. Reference layer D's pointwise grad-input (K = 512)
/// on the Intel Xeon VM (harness, two builds alternated 4×, min of 10–20): 1 thread 6.09–6.69
/// → 5.04–5.95 ms (its forward, the same shape read row-major, 5.19–5.48), 2 threads
/// 3.46–3.95 → 2.94–3.00; its training step, 2 threads, alternated 5× in a slow phase of the
/// VM, 15.9–17.3 → 14.9–15.9. K = 64, 128 and 256 (B, C, E) tied, so they keep reading the
/// weight in place.
const COLUMN_READ_MAX_K: usize = 512;

/// Floats per cache line.
const LINE_FLOATS: usize = 16;

/// Where the rows of an operand start.
#[derive(Clone, Copy, Debug)]
pub enum Rows<'a> {
    /// Row i at `i·stride`.
    Strided(usize),
    /// Row i at `table[i]`. With the rows being shifted views of the same padded planes, a
    /// product over them is an implicit-GEMM convolution (no im2col matrix is ever written).
    Table(&'a [usize]),
}

impl Rows<'_> {
    /// Where row `i` starts.
    #[inline(always)]
    fn start(&self, i: usize) -> usize {
        match *self {
            Rows::Strided(stride) => i * stride,
            // SAFETY of the unchecked read: small_k_gemm checked the table's length.
            Rows::Table(t) => unsafe { *t.get_unchecked(i) },
        }
    }

    /// Whether `rows` rows of `len` elements each lie inside `data_len` elements.
    fn fit(&self, rows: usize, len: usize, data_len: usize) -> bool {
        match *self {
            _ if rows == 0 || len == 0 => true,
            Rows::Strided(stride) => (rows - 1) * stride + len <= data_len,
            Rows::Table(t) => t.len() >= rows && t[..rows].iter().all(|&r| r + len <= data_len),
        }
    }
}

/// Views of the three matrices.
#[derive(Clone, Copy, Debug)]
pub struct Operands<'a> {
    /// C: N × K, element (n, k) at `c_rows(n) + k·c_col` (a transposed weight has rows at
    /// stride 1 and `c_col` = its row length).
    pub c: &'a [f32],
    /// Where each row of C starts.
    pub c_rows: Rows<'a>,
    /// Column stride of C (1 for row-major).
    pub c_col: usize,
    /// D: K × P, contiguous rows.
    pub d: &'a [f32],
    /// N.
    pub n: usize,
    /// K.
    pub k: usize,
    /// P.
    pub p: usize,
    /// Optional per-row bias added to Y (N values).
    pub bias: Option<&'a [f32]>,
    /// Where each row of D starts.
    pub d_rows: Rows<'a>,
}

impl<'a> Operands<'a> {
    /// A dense row-major C (n × k) times the D whose rows are `d_stride` floats apart in `d`
    /// (p columns): the plain GEMM of a pointwise layer and of Winograd's products.
    pub fn dense(
        c: &'a [f32],
        n: usize,
        k: usize,
        d: &'a [f32],
        d_stride: usize,
        p: usize,
        bias: Option<&'a [f32]>,
    ) -> Self {
        Operands {
            c,
            c_rows: Rows::Strided(k),
            c_col: 1,
            d,
            n,
            k,
            p,
            bias,
            d_rows: Rows::Strided(d_stride),
        }
    }

    /// A dense row-major weight `w` (n × k) times the D whose row kk starts at `rows[kk]` of
    /// `d` (p columns): the product of every implicit-GEMM convolution.
    pub fn weights_times_rows(
        w: &'a [f32],
        n: usize,
        k: usize,
        d: &'a [f32],
        rows: &'a [usize],
        p: usize,
        bias: Option<&'a [f32]>,
    ) -> Self {
        Operands {
            c: w,
            c_rows: Rows::Strided(k),
            c_col: 1,
            d,
            n,
            k,
            p,
            bias,
            d_rows: Rows::Table(rows),
        }
    }
}

impl Operands<'_> {
    /// Panics unless C, D and the bias hold the rows and columns the product reads.
    fn check(&self) {
        let c_row_len = if self.k == 0 {
            0
        } else {
            (self.k - 1) * self.c_col + 1
        };
        assert!(
            self.c_rows.fit(self.n, c_row_len, self.c.len()),
            "C out of range"
        );
        assert!(
            self.d_rows.fit(self.k, self.p, self.d.len()),
            "D out of range"
        );
        assert!(
            self.bias.is_none_or(|b| b.len() >= self.n),
            "bias too short"
        );
    }

    /// Rows `rows` of the product only (of C and the bias, so of Y): one task's share.
    pub fn rows(self, rows: Range<usize>) -> Self {
        assert!(rows.end <= self.n, "rows past the product's");
        let (c, c_rows) = match self.c_rows {
            Rows::Strided(stride) => (
                self.c.get(rows.start * stride..).unwrap_or(&[]),
                self.c_rows,
            ),
            Rows::Table(t) => (self.c, Rows::Table(&t[rows.start..])),
        };
        Operands {
            c,
            c_rows,
            n: rows.len(),
            bias: self.bias.map(|b| &b[rows]),
            ..self
        }
    }
}

/// How [`small_k_gemm`] writes Y.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Store {
    /// Overwrite Y, with non-temporal stores where aligned: the output of a layer is large and
    /// not read again soon, and streaming it saves the read-for-ownership of every output line
    /// (a third of a pointwise layer's memory traffic).
    Stream,
    /// Overwrite Y through the caches: scratch that is read back at once, which streamed
    /// stores would have sent to memory first.
    Cached,
    /// Add the product to Y.
    Accumulate,
}

/// Memory the caller touches right after a product, prefetched while the product computes:
/// up to two spans of floats (such as the next pass's input and output). A product near the
/// FMA peak leaves the memory system idle, and the pass after it, if memory-bound, waits on
/// its misses; one line of each span per few steps of the register blocks spreads them over
/// the product instead. Only addresses are kept: a prefetch reads nothing the program sees.
#[derive(Clone, Copy, Debug)]
pub struct Ahead {
    spans: [(*const f32, *const f32); 2],
}

impl Ahead {
    /// Nothing to prefetch.
    pub const NONE: Ahead = Ahead {
        spans: [(std::ptr::null(), std::ptr::null()); 2],
    };

    /// The lines of `first` and of `second`.
    pub fn of(first: &[f32], second: &[f32]) -> Self {
        let span = |s: &[f32]| (s.as_ptr(), s.as_ptr().wrapping_add(s.len()));
        Ahead {
            spans: [span(first), span(second)],
        }
    }

    /// Cache lines of the longer span.
    fn lines(&self) -> usize {
        self.spans
            .iter()
            .map(|&(start, end)| (end as usize - start as usize).div_ceil(LINE_FLOATS * 4))
            .max()
            .unwrap_or(0)
    }
}

/// An [`Ahead`]'s progress through a product: the next line of each span, prefetched every
/// `every` steps along K of the full register blocks.
#[derive(Clone, Copy)]
struct Prefetcher {
    next: [*const f32; 2],
    end: [*const f32; 2],
    every: usize,
    countdown: usize,
}

impl Prefetcher {
    /// Spreads `ahead`'s lines evenly over `steps` steps.
    fn new(ahead: Ahead, steps: usize) -> Self {
        Prefetcher {
            next: ahead.spans.map(|s| s.0),
            end: ahead.spans.map(|s| s.1),
            every: (steps / ahead.lines().max(1)).max(1),
            countdown: 0,
        }
    }

    /// One step: a line of each unfinished span when the countdown runs out.
    #[inline(always)]
    unsafe fn step<S: SimdF32>(&mut self) {
        if self.countdown == 0 {
            self.countdown = self.every;
            for (next, &end) in self.next.iter_mut().zip(&self.end) {
                if *next < end {
                    // SAFETY: a prefetch is a hint; it reads nothing and cannot fault.
                    unsafe { S::prefetch(*next) };
                    *next = next.wrapping_add(LINE_FLOATS);
                }
            }
        }
        self.countdown -= 1;
    }
}

/// `y (+)= C · D` with `y` row-major N × P at row stride `ldy`, written as `store` says.
pub fn small_k_gemm(isa: Isa, ops: Operands<'_>, y: &mut [f32], ldy: usize, store: Store) {
    small_k_gemm_ahead(isa, ops, y, ldy, store, Ahead::NONE)
}

/// [`small_k_gemm`], prefetching `ahead`'s lines as it computes.
pub fn small_k_gemm_ahead(
    isa: Isa,
    ops: Operands<'_>,
    y: &mut [f32],
    ldy: usize,
    store: Store,
    ahead: Ahead,
) {
    ops.check();
    assert!(
        ops.n == 0 || y.len() >= (ops.n - 1) * ldy + ops.p,
        "Y too short"
    );
    let out = Out {
        ptr: y.as_mut_ptr(),
        ld: ldy,
        _y: PhantomData,
    };
    let pack_panels = Cores::detect().packs_deep_panels();
    gemm_in_depth_slices(isa, ops, out, store, ahead, pack_panels)
}

/// Where [`small_k_gemm`]'s kernels write Y: its first element and row stride, for the N × P
/// extent of the operands. Built only where that extent was checked to lie inside memory the
/// caller holds exclusively (a `&mut` slice or a [`ColumnWindow`]).
#[derive(Clone, Copy)]
struct Out<'a> {
    ptr: *mut f32,
    ld: usize,
    _y: PhantomData<&'a mut [f32]>,
}

/// Columns `cols` of every row of a row-major matrix, owned by one task. [`ColumnWindow::split`]
/// cuts a matrix into windows that tasks fill in parallel where `&mut` slices would overlap:
/// the fused depthwise-separable kernel's bands of pixels, each of every channel of an NCHW
/// image.
pub struct ColumnWindow<'a> {
    ptr: *mut f32,
    rows: usize,
    ld: usize,
    cols: Range<usize>,
    _y: PhantomData<&'a mut [f32]>,
}

// SAFETY: a window writes only its own columns, and `split` gives no column to two windows.
unsafe impl Send for ColumnWindow<'_> {}

impl<'a> ColumnWindow<'a> {
    /// The windows of `y` (rows of `ld` floats, `y.len()` a multiple of `ld`) between
    /// consecutive `bounds`, which rise from 0 to at most `ld`.
    pub fn split(y: &'a mut [f32], ld: usize, bounds: &[usize]) -> Vec<Self> {
        assert!(ld > 0 && y.len().is_multiple_of(ld), "Y not whole rows");
        assert!(
            bounds.first() == Some(&0)
                && bounds.windows(2).all(|b| b[0] <= b[1])
                && bounds.last().is_some_and(|&b| b <= ld),
            "column bounds not rising within a row"
        );
        let (ptr, rows) = (y.as_mut_ptr(), y.len() / ld);
        bounds
            .windows(2)
            .map(|b| ColumnWindow {
                ptr,
                rows,
                ld,
                cols: b[0]..b[1],
                _y: PhantomData,
            })
            .collect()
    }

    /// All of `y` (rows of `ld` floats) as one window. Built directly, not through `split`'s
    /// vector: the implicit GEMM and Winograd take one per image and group.
    pub fn whole(y: &'a mut [f32], ld: usize) -> Self {
        assert!(ld > 0 && y.len().is_multiple_of(ld), "Y not whole rows");
        ColumnWindow {
            ptr: y.as_mut_ptr(),
            rows: y.len() / ld,
            ld,
            cols: 0..ld,
            _y: PhantomData,
        }
    }

    /// Rows of the matrix.
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns `cols` of row `row` of the matrix, inside this window.
    pub fn row_columns(&mut self, row: usize, cols: Range<usize>) -> &mut [f32] {
        assert!(row < self.rows, "row past the window's");
        assert!(
            self.cols.start <= cols.start && cols.start <= cols.end && cols.end <= self.cols.end,
            "columns past the window's"
        );
        // SAFETY: inside the matrix (row < rows, cols.end <= ld), in this window's columns,
        // which no other window has; `&mut self` keeps this the window's only live slice.
        unsafe {
            std::slice::from_raw_parts_mut(self.ptr.add(row * self.ld + cols.start), cols.len())
        }
    }

    /// `y (+)= C · D` into rows `row0 ..` and columns `col0 ..` of the matrix (N × P of
    /// `ops`), inside this window, as [`small_k_gemm`] writes.
    pub fn product(&mut self, isa: Isa, ops: Operands<'_>, row0: usize, col0: usize, store: Store) {
        assert!(row0 + ops.n <= self.rows, "rows past the window's");
        assert!(
            self.cols.start <= col0 && col0 + ops.p <= self.cols.end,
            "columns past the window's"
        );
        ops.check();
        let out = Out {
            // SAFETY: (row0, col0) is inside the matrix (a zero-row product writes nothing).
            ptr: unsafe {
                self.ptr
                    .add((row0 * self.ld + col0).min(self.rows * self.ld))
            },
            ld: self.ld,
            _y: PhantomData,
        };
        let pack_panels = Cores::detect().packs_deep_panels();
        gemm_in_depth_slices(isa, ops, out, store, Ahead::NONE, pack_panels)
    }
}

/// Depth (K) above which a product runs as consecutive slices of K, each adding into Y.
const SLICE_ABOVE: usize = 512;
/// The depth a slice aims at: K is cut into `⌈K / SLICE_DEPTH⌉` near-equal slices.
const SLICE_DEPTH: usize = 192;

/// `y (+)= C · D` as [`gemm_dispatch`] computes it, but for deep products in slices of K, each
/// a whole product over its slice (the first overwrites Y, the others add into it). A deep
/// product's weight rows (N × K) and the K rows of D a column block reads outgrow the core's
/// L2, so every column block re-reads them from L3; a slice's (N × 192 and 192 rows) stay in
/// L2 across the column blocks, at the cost of reading and writing Y once per slice (a few
/// loads per thousand multiply-adds, from L2). Deep products are the strided and dilated
/// convolutions' implicit GEMMs (reference layer E's 3 × 3 stride 2: K = 1152) and the k × 1
/// kernels on many channels (D's 3 × 1: 1536). Measured on an Intel Xeon (Emerald Rapids; 2 MB
/// L2, 1 thread, harness alternating the two builds per run, min of 16–20, 3 runs): E's
/// forward 32.8–34.4 → 29.2–30.9 ms, D's 3 × 1 forward 18.2–19.0 → 17.3–18.1; training steps
/// (`sepconv bench`, 3 pairs) E's 96.2–100.6 → 92.5–95.9, D's spatially separable
/// 120.6–124.8 → 117.3–119.7. Slices of 96–256 all gained on E; 192 was best on D. Shallower
/// products lost or tied: C's 3 × 1 (K = 384) 20.7 → 21.2–22.4, D's pointwise and Winograd
/// products (K = 512) unchanged, hence the threshold. Slicing drops streamed stores (a slice
/// reads back what the one before wrote), which the gains above include.
fn gemm_in_depth_slices(
    isa: Isa,
    ops: Operands<'_>,
    out: Out<'_>,
    store: Store,
    ahead: Ahead,
    pack_panels: bool,
) {
    if ops.k <= SLICE_ABOVE {
        return gemm_dispatch(isa, ops, out, store, ahead, pack_panels);
    }
    let slices = ops.k.div_ceil(SLICE_DEPTH);
    let mut k0 = 0;
    for i in 0..slices {
        let k1 = (i + 1) * ops.k / slices;
        let first = i == 0;
        // Rows k0 .. k1 of D: strided rows by moving its start, table rows by the table's.
        let (d, d_rows) = match ops.d_rows {
            Rows::Strided(stride) => (&ops.d[k0 * stride..], ops.d_rows),
            Rows::Table(table) => (ops.d, Rows::Table(&table[k0..])),
        };
        let slice = Operands {
            c: &ops.c[k0 * ops.c_col..],
            d,
            d_rows,
            k: k1 - k0,
            bias: if first { ops.bias } else { None },
            ..ops
        };
        let store = if first && store != Store::Accumulate {
            Store::Cached
        } else {
            Store::Accumulate
        };
        // The prefetches of what follows the product go with its last slice.
        let ahead = if k1 == ops.k { ahead } else { Ahead::NONE };
        gemm_dispatch(isa, slice, out, store, ahead, pack_panels);
        k0 = k1;
    }
}

crate::simd_dispatch!(fn gemm_dispatch => gemm_kernel(
    ops: Operands<'_>, y: Out<'_>, store: Store, ahead: Ahead, pack_panels: bool
));

#[inline(always)]
unsafe fn gemm_kernel<S: SimdF32>(
    ops: Operands<'_>,
    y: Out<'_>,
    store: Store,
    ahead: Ahead,
    pack_panels: bool,
) {
    let (y, ldy) = (y.ptr, y.ld);
    const W: (usize, usize) = WIDE_BLOCK;
    const N: (usize, usize) = NARROW_BLOCK;
    // SAFETY: the caller's (this CPU's ISA).
    debug_assert_eq!(S::REGISTERS, S::ISA.registers());
    // The prefetching blocks are a copy of their own: the countdown costs the plain ones
    // nothing.
    let prefetch = ahead.lines() > 0;
    unsafe {
        match (S::REGISTERS >= 32, prefetch) {
            (true, false) => {
                blocks::<S, { W.0 }, { W.1 }, false>(ops, y, ldy, store, ahead, pack_panels)
            }
            (true, true) => {
                blocks::<S, { W.0 }, { W.1 }, true>(ops, y, ldy, store, ahead, pack_panels)
            }
            (false, false) => {
                blocks::<S, { N.0 }, { N.1 }, false>(ops, y, ldy, store, ahead, pack_panels)
            }
            (false, true) => {
                blocks::<S, { N.0 }, { N.1 }, true>(ops, y, ldy, store, ahead, pack_panels)
            }
        }
    }
}

/// The product in `ROWS × VECS`-vector register blocks: column blocks outside, row blocks
/// inside, the last rows in a shorter block. With `AHEAD`, the full blocks prefetch `ahead`.
/// With `pack_panels` ([`Cores::packs_deep_panels`]), the column blocks that [`packs`] picks
/// are copied into an aligned panel first.
#[inline(always)]
unsafe fn blocks<S: SimdF32, const ROWS: usize, const VECS: usize, const AHEAD: bool>(
    ops: Operands<'_>,
    y: *mut f32,
    ldy: usize,
    store: Store,
    ahead: Ahead,
    pack_panels: bool,
) {
    let accumulate = store == Store::Accumulate;
    let l = S::LANES;
    let block = VECS * l;
    // Start with a narrow block up to the first cache-line-aligned column (the same for every
    // row when the row stride is a multiple of the line), so full blocks stream whole lines.
    // Aligning to the vector only left AVX2's blocks (two vectors, one line) straddling two
    // lines, each streamed half by one block and half by the next. AVX2 on this machine
    // (harness, min of 10, alternated 2–3×): reference layer B's pointwise forward 4.2–4.5 →
    // 2.3–2.5 ms and grad-input 3.5 → 2.4, C's 5.2–5.3 → 4.3–4.5 and 5.7–5.9 → 4.9–5.1, B's
    // Winograd 3 × 3 forward 25.8–26.1 → 16.0–16.7 (AVX-512, unchanged: 1.9–2.0, 3.6–3.9 and
    // 14.0–14.3 ms). A row stride that is a multiple of the vector only keeps that alignment.
    let align = if ldy.is_multiple_of(LINE_FLOATS) {
        LINE_FLOATS
    } else {
        l
    };
    let misaligned = (y as usize / 4) % align;
    let lead = if misaligned == 0 || !ldy.is_multiple_of(l) {
        0
    } else {
        (align - misaligned).min(ops.p)
    };
    // The last columns short of a vector go by rows where C's columns are contiguous and
    // there are rows for a whole vector (tail_by_rows), else by dot products along k where its
    // rows are and there are 32 registers for the 4 × 4 dot tiles (tail_by_dots).
    let row_tail = if matches!(ops.c_rows, Rows::Strided(1)) && ops.n >= l {
        (ops.p - lead) % l
    } else {
        0
    };
    let dot_tail = if row_tail == 0 && ops.c_col == 1 && ops.k >= l && S::REGISTERS >= 32 {
        ops.p % l
    } else {
        0
    };
    let lead = lead.min(ops.p - dot_tail);
    let p_end = ops.p - row_tail - dot_tail;
    let full_blocks = (p_end - lead) / block * (ops.n / ROWS);
    let mut prefetcher = Prefetcher::new(ahead, full_blocks * ops.k);
    let pack = pack_panels && S::REGISTERS >= 32 && packs(ops, block);
    let mut panel = std::mem::MaybeUninit::<Panel>::uninit();
    let panel_ptr = panel.as_mut_ptr().cast::<f32>();
    let prefetching = prefetching_row_blocks(ops.k, ops.n / ROWS);
    let mut p0 = 0;
    while p0 < p_end {
        let width = if p0 == 0 && lead > 0 {
            lead
        } else {
            block.min(p_end - p0)
        };
        // The block's operands, Y and first D column: the panel's when packed.
        let packed = pack && width == block;
        let (block_ops, block_y, block_p0) = if packed {
            // SAFETY: k·block ≤ PANEL_FLOATS (packs), and columns p0 .. p0 + block of every
            // D row are inside D (checked lengths in small_k_gemm); once written, the panel's
            // k·block floats are initialized.
            unsafe {
                pack_panel::<S, VECS>(ops, p0, panel_ptr);
                let panel = std::slice::from_raw_parts(panel_ptr, ops.k * block);
                let packed = Operands {
                    d: panel,
                    d_rows: Rows::Strided(block),
                    ..ops
                };
                (packed, y.add(p0), 0)
            }
        } else {
            (ops, y, p0)
        };
        let mut n0 = 0;
        while n0 + ROWS <= ops.n {
            // SAFETY: rows n0 .. n0 + ROWS and columns p0 .. p0 + width are inside all three
            // matrices (checked lengths in small_k_gemm), or the panel's columns.
            unsafe {
                tile::<S, ROWS, VECS, AHEAD>(
                    block_ops,
                    block_y,
                    ldy,
                    n0,
                    block_p0,
                    width,
                    store,
                    // Unpacked, the first row blocks share the prefetches of the next column
                    // block of D's rows; packing prefetches it itself.
                    (!packed && n0 / ROWS < prefetching).then_some((n0 / ROWS, prefetching)),
                    &mut prefetcher,
                )
            };
            n0 += ROWS;
        }
        // SAFETY: as above, for the remaining rows.
        let pf = &mut prefetcher;
        let (o, y, c0) = (block_ops, block_y, block_p0);
        unsafe {
            match ops.n - n0 {
                0 => {}
                1 => tile::<S, 1, VECS, false>(o, y, ldy, n0, c0, width, store, None, pf),
                2 => tile::<S, 2, VECS, false>(o, y, ldy, n0, c0, width, store, None, pf),
                3 => tile::<S, 3, VECS, false>(o, y, ldy, n0, c0, width, store, None, pf),
                4 => tile::<S, 4, VECS, false>(o, y, ldy, n0, c0, width, store, None, pf),
                5 => tile::<S, 5, VECS, false>(o, y, ldy, n0, c0, width, store, None, pf),
                6 => tile::<S, 6, VECS, false>(o, y, ldy, n0, c0, width, store, None, pf),
                _ => tile::<S, 7, VECS, false>(o, y, ldy, n0, c0, width, store, None, pf),
            }
        }
        p0 += width;
    }
    if row_tail > 0 {
        // SAFETY: columns p_end .. p of every row (checked lengths in small_k_gemm).
        unsafe { tail_by_rows::<S>(ops, y, ldy, p_end, accumulate) };
    }
    if dot_tail > 0 {
        // SAFETY: as above.
        unsafe { tail_by_dots::<S>(ops, y, ldy, p_end, accumulate) };
    }
    // SAFETY: orders the streaming stores before whatever reads Y next.
    unsafe { S::fence() };
}

/// Floats of the packed D panel: K ≤ 512 (deeper products run in slices) times 48 columns.
const PANEL_FLOATS: usize = SLICE_ABOVE * 48;

/// The packed panel's storage, aligned to a cache line so that no vector load splits lines.
#[repr(C, align(64))]
struct Panel([f32; PANEL_FLOATS]);

/// Distinct cache lines at which D's rows start, above which [`blocks`] packs its column
/// blocks: each row's 48 columns span up to four lines, and 4 × 128 lines (32 KiB) is what
/// stays in L1 across the row blocks as it is.
const PACK_ABOVE_LINES: usize = 128;
/// Rows of Y from which [`blocks`] packs: eight register blocks share each packed panel.
const PACK_FROM_ROWS: usize = 64;

/// Whether [`blocks`] copies each column block of D (K × `block`) into a contiguous, aligned
/// panel before its row blocks run over it. Unpacked, each step of a block reads its 48
/// columns of one D row: a row whose start is not a multiple of 16 floats straddles four
/// cache lines instead of three, every vector load splitting two, and rows starting on more
/// than [`PACK_ABOVE_LINES`] distinct lines fall out of L1 before the next row block reads
/// them again. Packed, every row block streams one aligned panel. An implicit GEMM's rows are
/// shifted views of a few planes (a 5 × 5 kernel's 25 taps of a channel start on 6 or 7
/// lines), so what counts is the lines, not K.
/// Measured on the Intel Xeon VM (harness, packing on and off alternated run by run, min of
/// 10–12, 1 thread): 512 × 512 × 196 products (reference layer D's pointwise) 5.94 → 5.61 ms, 256 ×
/// 192 × 812 6.40 → 5.08, 64 × 576 × 196 6.57 → 5.08; 256 × 256 × 784 (aligned rows) tied;
/// depths of 32–128 lost 2–7% (the panel fits L1 anyway, and the copy is not free), and so
/// did 64 rows at K = 32 (9.1 → 13.5 ms: eight row blocks do not pay for the copy). Layers,
/// two builds alternated: C's 3 × 1 forward 19.8 → 18.1 (1 thread), 16.5 → 14.0 (2); D's
/// pointwise 5.64 → 5.31; E's 3 × 3 stride 2 and D's 3 × 1 2–3% faster; 5 × 5 kernels on 32
/// and 64 channels, packed by depth alone, 3–7% slower (a slice's rows start on about 40 lines).
/// AMD's Zen 4 cores gained nothing from it, and lost 2–6% on E's products
/// ([`Cores::packs_deep_panels`]).
fn packs(ops: Operands<'_>, block: usize) -> bool {
    ops.n >= PACK_FROM_ROWS
        && ops.k * block <= PANEL_FLOATS
        && row_start_lines(ops.d_rows, ops.k) > PACK_ABOVE_LINES
}

/// How many cache lines the first `k` rows of D start on, counting a line once for a run of
/// consecutive rows on it: an implicit GEMM's table lists each channel's taps together, so
/// the taps of one kernel row (shifts of a few floats) share their line. One pass, no sort:
/// it runs for every product.
fn row_start_lines(rows: Rows<'_>, k: usize) -> usize {
    match rows {
        Rows::Strided(stride) if stride >= LINE_FLOATS => k,
        Rows::Strided(stride) => (k * stride).div_ceil(LINE_FLOATS),
        Rows::Table(table) => {
            let table = &table[..k.min(table.len())];
            let changes = table
                .windows(2)
                .filter(|w| w[0] / LINE_FLOATS != w[1] / LINE_FLOATS)
                .count();
            usize::from(!table.is_empty()) + changes
        }
    }
}

/// Copies columns `p0 .. p0 + VECS·LANES` of every D row into `panel`, row after row, and
/// prefetches the next column block of each row.
#[inline(always)]
unsafe fn pack_panel<S: SimdF32, const VECS: usize>(ops: Operands<'_>, p0: usize, panel: *mut f32) {
    let l = S::LANES;
    let dp = ops.d.as_ptr();
    unsafe {
        for kk in 0..ops.k {
            let src = dp.add(ops.d_rows.start(kk) + p0);
            let dst = panel.add(kk * VECS * l);
            for v in 0..VECS {
                S::load(src.add(v * l)).store(dst.add(v * l));
            }
            for v in 0..VECS {
                S::prefetch(src.add((VECS + v) * l));
            }
        }
    }
}

/// The most D rows whose next column block one row block prefetches alone.
const PREFETCH_ROWS_PER_BLOCK: usize = 32;

/// How many of a column block's `row_blocks` full row blocks share the prefetches of the next
/// column block of the K rows of D: the first alone where K ≤ [`PREFETCH_ROWS_PER_BLOCK`]
/// (at most 96 lines, issued early in the column block), every row block on deeper products.
/// Every row block sharing them is the Intel VM's choice (C's K = 128 2–9% faster than the
/// first block issuing all 384 at once, B's grad-input at K = 64 7–8%), but at K = 32 it
/// leaves the last rows' lines to arrive just as the next column block reads them: on the
/// Zen 4 VM reference layer B's fused depthwise-separable forward (K = 32, the band's
/// intermediate 0.8 MB against a 1 MB L2) took 2.80–2.82 ms against 2.63–2.68 with the first
/// row block issuing them (harness, the two ways switched in one process, min of 12 × 5,
/// twice), B's unfused pointwise forward a tie (1.92–1.95 against 1.91–1.94). On the Zen 4
/// VM too, C's K = 128 spread over only four of its 16 row blocks lost 1.5–3%.
fn prefetching_row_blocks(k: usize, row_blocks: usize) -> usize {
    if k <= PREFETCH_ROWS_PER_BLOCK {
        1
    } else {
        row_blocks.max(1)
    }
}

/// One block: R rows of Y, `width` ≤ VECS·LANES columns (partial vectors masked).
/// `prefetch_next` = `Some((b, blocks))` (row block b of the first `blocks` row blocks of the
/// column block, [`prefetching_row_blocks`]) prefetches the next column block of the D rows k ≡ b
/// (mod blocks): D's K rows are K separate streams, more than the hardware prefetcher follows.
/// Reference layer B's pointwise layer (K = 32 forward, 64 grad-input; harness, min of 40–60,
/// alternated 3×), with the first row block prefetching every row: forward 2.20–2.59 → 2.00–2.27
/// ms, grad-input 2.77–3.02 → 2.41–2.58; C's (K = 128) and D's (K = 512) unchanged within noise.
/// Shared out over the row blocks (likely: the first block's 3·K prefetches at once had queued
/// behind each other), Intel Xeon VM, the two ways switched in one process (min of 15–30): C's
/// pointwise forward 6.19–6.34 → 5.61–5.67 ms on 1 thread, 2.73–2.77 → 2.68–2.72 on 2; B's
/// grad-input 4.12–4.22 → 3.79–3.83 and 2.10–2.11 → 1.95–1.97; E's (K = 256) and a 64 → 128 layer
/// at 14 × 14 (batch 64) 1–3%; but not at K ≤ 32 ([`prefetching_row_blocks`]). With `AHEAD`, a full
/// block also takes its steps of `prefetcher`.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn tile<S: SimdF32, const R: usize, const VECS: usize, const AHEAD: bool>(
    ops: Operands<'_>,
    y: *mut f32,
    ldy: usize,
    n0: usize,
    p0: usize,
    width: usize,
    store: Store,
    prefetch_next: Option<(usize, usize)>,
    prefetcher: &mut Prefetcher,
) {
    let accumulate = store == Store::Accumulate;
    let l = S::LANES;
    let full = width / l;
    let rest = width % l;
    let (cp, dp, yp) = (ops.c.as_ptr(), ops.d.as_ptr(), y);
    unsafe {
        // No closures or array::from_fn here: their bodies are compiled outside this
        // function's target features and the intrinsics in them stop being inlined.
        let mut c_row = [0usize; R];
        for (r, c) in c_row.iter_mut().enumerate() {
            *c = ops.c_rows.start(n0 + r);
        }
        let mut init = [S::zero(); R];
        if let Some(b) = ops.bias {
            for (r, v) in init.iter_mut().enumerate() {
                *v = S::splat(b[n0 + r]);
            }
        }
        if full == VECS && rest == 0 {
            let mut acc = [[S::zero(); VECS]; R];
            for (row, &v) in acc.iter_mut().zip(&init) {
                *row = [v; VECS];
            }
            // In registers for the loop, not behind the reference.
            let mut pf = *prefetcher;
            let mut countdown = prefetch_next.map_or(0, |(phase, _)| phase);
            for kk in 0..ops.k {
                if AHEAD {
                    pf.step::<S>();
                }
                let drow = dp.add(ops.d_rows.start(kk) + p0);
                let mut dv = [S::zero(); VECS];
                for (v, d) in dv.iter_mut().enumerate() {
                    *d = S::load(drow.add(v * l));
                }
                if let Some((_, every)) = prefetch_next {
                    if countdown == 0 {
                        for v in 0..VECS {
                            S::prefetch(drow.add((VECS + v) * l));
                        }
                        countdown = every;
                    }
                    countdown -= 1;
                }
                for (r, row) in acc.iter_mut().enumerate() {
                    let cv = S::splat(*cp.add(c_row[r] + kk * ops.c_col));
                    for v in 0..VECS {
                        row[v] = S::mul_add(cv, dv[v], row[v]);
                    }
                }
            }
            *prefetcher = pf;
            for (r, row) in acc.iter().enumerate() {
                let out = yp.add((n0 + r) * ldy + p0);
                // Streaming part of a cache line leaves the memory system to merge the rest
                // (AVX2's two vectors at a 32-byte offset); such rows take ordinary stores.
                let whole_lines =
                    store == Store::Stream && (out as usize).is_multiple_of(LINE_FLOATS * 4);
                for (v, a) in row.iter().enumerate() {
                    if accumulate {
                        a.add(S::load(out.add(v * l))).store(out.add(v * l));
                    } else if whole_lines {
                        a.store_stream(out.add(v * l));
                    } else {
                        a.store(out.add(v * l));
                    }
                }
            }
            return;
        }
        // A narrow block at the right edge: one vector at a time, the last one partial.
        let vecs = full + usize::from(rest > 0);
        for v in 0..vecs {
            let n = if v < full { l } else { rest };
            let mut acc = init;
            for kk in 0..ops.k {
                let at = dp.add(ops.d_rows.start(kk) + p0 + v * l);
                let dv = if n == l {
                    S::load(at)
                } else {
                    S::load_partial(at, n)
                };
                for (r, a) in acc.iter_mut().enumerate() {
                    *a = S::mul_add(S::splat(*cp.add(c_row[r] + kk * ops.c_col)), dv, *a);
                }
            }
            for (r, a) in acc.iter().enumerate() {
                let out = yp.add((n0 + r) * ldy + p0 + v * l);
                if n == l {
                    let a = if accumulate { a.add(S::load(out)) } else { *a };
                    a.store(out);
                } else {
                    let a = if accumulate {
                        a.add(S::load_partial(out, n))
                    } else {
                        *a
                    };
                    a.store_partial(out, n);
                }
            }
        }
    }
}

/// Columns `p0 ..` (fewer than a vector) of every row of Y, vectorized along the rows: C's
/// column k holds rows `m .. m + LANES` contiguously (C is `Rows::Strided(1)`, a transposed
/// weight), so each step is one C vector times one broadcast D element per column, every lane
/// useful; along the columns only `p − p0` lanes of each vector would be, at one broadcast per
/// multiply-add. A 14 × 14 image (196 = 12 · 16 + 4 columns) spent 7–8% of its product on its
/// last 4 columns that way. Harness, 2 threads, min of 20, alternated 3×: reference layer D's
/// pointwise grad-input 4.06–4.17 → 3.72–3.96 ms; 4-pixel images 2.64–2.79 → 1.07–1.09.
#[inline(always)]
unsafe fn tail_by_rows<S: SimdF32>(
    ops: Operands<'_>,
    y: *mut f32,
    ldy: usize,
    p0: usize,
    accumulate: bool,
) {
    let mut c = p0;
    while c < ops.p {
        let nc = (ops.p - c).min(4);
        // SAFETY: the caller's.
        unsafe {
            match nc {
                4 => tail_columns::<S, 4>(ops, y, ldy, c, accumulate),
                3 => tail_columns::<S, 3>(ops, y, ldy, c, accumulate),
                2 => tail_columns::<S, 2>(ops, y, ldy, c, accumulate),
                _ => tail_columns::<S, 1>(ops, y, ldy, c, accumulate),
            }
        }
        c += nc;
    }
}

/// `NC` columns from `p0` of every row of Y, `LANES` rows at a time.
#[inline(always)]
unsafe fn tail_columns<S: SimdF32, const NC: usize>(
    ops: Operands<'_>,
    y: *mut f32,
    ldy: usize,
    p0: usize,
    accumulate: bool,
) {
    let l = S::LANES;
    let (cp, dp, yp) = (ops.c.as_ptr(), ops.d.as_ptr(), y);
    let mut m0 = 0;
    while m0 < ops.n {
        let rows = l.min(ops.n - m0);
        // SAFETY: rows m0 .. m0 + rows of C (contiguous per column), columns p0 .. p0 + NC of
        // D and Y (the caller's).
        unsafe {
            let init = match ops.bias {
                Some(b) if rows == l => S::load(b.as_ptr().add(m0)),
                Some(b) => S::load_partial(b.as_ptr().add(m0), rows),
                None => S::zero(),
            };
            let mut acc = [init; NC];
            for kk in 0..ops.k {
                let at = cp.add(m0 + kk * ops.c_col);
                let cv = if rows == l {
                    S::load(at)
                } else {
                    S::load_partial(at, rows)
                };
                let drow = dp.add(ops.d_rows.start(kk) + p0);
                for (j, a) in acc.iter_mut().enumerate() {
                    *a = S::mul_add(cv, S::splat(*drow.add(j)), *a);
                }
            }
            let mut lanes = [0f32; 16];
            for (j, a) in acc.iter().enumerate() {
                if rows == l {
                    a.store(lanes.as_mut_ptr());
                } else {
                    a.store_partial(lanes.as_mut_ptr(), rows);
                }
                for (i, &v) in lanes[..rows].iter().enumerate() {
                    let out = yp.add((m0 + i) * ldy + p0 + j);
                    *out = if accumulate { *out + v } else { v };
                }
            }
        }
        m0 += l;
    }
}

/// Depth of the transposed slices of D that [`tail_by_dots`] gathers (a 16 KiB stack buffer).
const DOT_DEPTH: usize = 256;

/// Columns `p0 ..` (fewer than a vector) of every row of Y as dot products along k: C's rows are
/// contiguous in k (`c_col` = 1), and the columns of D are gathered into contiguous runs of
/// [`DOT_DEPTH`], so each step multiplies whole vectors of k, every lane useful (the column-wise
/// tail used `p − p0` lanes at one broadcast per multiply-add). Y gets each run's sums added
/// (the bias with the first), in the same order wherever Y lies: which columns run here depends
/// only on `p`. Harness, 2 threads, min of 30, alternated 3×: reference layer D's pointwise
/// forward (196 = 12·16 + 4 columns) 3.85–3.94 → 3.72–3.76 ms; 4-pixel images 2.29 → 0.90–0.94.
#[inline(always)]
unsafe fn tail_by_dots<S: SimdF32>(
    ops: Operands<'_>,
    y: *mut f32,
    ldy: usize,
    p0: usize,
    accumulate: bool,
) {
    let nt = ops.p - p0;
    debug_assert!(nt <= 16);
    let mut dt = [0f32; 16 * DOT_DEPTH];
    let dp = ops.d.as_ptr();
    for k0 in (0..ops.k).step_by(DOT_DEPTH) {
        let kc = DOT_DEPTH.min(ops.k - k0);
        for kk in 0..kc {
            // SAFETY: columns p0 .. p of D's row k0 + kk (checked lengths in small_k_gemm).
            let row = unsafe { dp.add(ops.d_rows.start(k0 + kk) + p0) };
            for j in 0..nt {
                dt[j * DOT_DEPTH + kk] = unsafe { *row.add(j) };
            }
        }
        let first = k0 == 0;
        let mut m0 = 0;
        while m0 < ops.n {
            let rows = 4.min(ops.n - m0);
            let mut j0 = 0;
            while j0 < nt {
                let cols = 4.min(nt - j0);
                // SAFETY: rows m0 .. m0 + rows of C and Y, columns p0 + j0 .. of Y, and
                // columns j0 .. j0 + cols of dt (the caller's and the gather above).
                unsafe {
                    match (rows, cols) {
                        (4, 4) => {
                            dots::<S, 4, 4>(ops, &dt, kc, k0, m0, j0, y, ldy, p0, first, accumulate)
                        }
                        (4, 3) => {
                            dots::<S, 4, 3>(ops, &dt, kc, k0, m0, j0, y, ldy, p0, first, accumulate)
                        }
                        (4, 2) => {
                            dots::<S, 4, 2>(ops, &dt, kc, k0, m0, j0, y, ldy, p0, first, accumulate)
                        }
                        (4, _) => {
                            dots::<S, 4, 1>(ops, &dt, kc, k0, m0, j0, y, ldy, p0, first, accumulate)
                        }
                        (_, 4) => {
                            dots::<S, 1, 4>(ops, &dt, kc, k0, m0, j0, y, ldy, p0, first, accumulate)
                        }
                        (_, 3) => {
                            dots::<S, 1, 3>(ops, &dt, kc, k0, m0, j0, y, ldy, p0, first, accumulate)
                        }
                        (_, 2) => {
                            dots::<S, 1, 2>(ops, &dt, kc, k0, m0, j0, y, ldy, p0, first, accumulate)
                        }
                        _ => {
                            dots::<S, 1, 1>(ops, &dt, kc, k0, m0, j0, y, ldy, p0, first, accumulate)
                        }
                    }
                }
                j0 += cols;
            }
            m0 += if rows == 4 { 4 } else { 1 };
        }
    }
}

/// `R × NC` dot products of C's rows `m0 ..` (k from `k0`, `kc` of them) with the gathered
/// columns `j0 ..` of `dt`, added to Y's columns `p0 + j0 ..` (first run: to the bias, or to
/// Y itself when accumulating, or to zero).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn dots<S: SimdF32, const R: usize, const NC: usize>(
    ops: Operands<'_>,
    dt: &[f32],
    kc: usize,
    k0: usize,
    m0: usize,
    j0: usize,
    y: *mut f32,
    ldy: usize,
    p0: usize,
    first: bool,
    accumulate: bool,
) {
    let l = S::LANES;
    let (cp, dtp, yp) = (ops.c.as_ptr(), dt.as_ptr(), y);
    unsafe {
        let mut c_row = [0usize; R];
        for (r, c) in c_row.iter_mut().enumerate() {
            *c = ops.c_rows.start(m0 + r) + k0;
        }
        let mut acc = [[S::zero(); NC]; R];
        let mut kk = 0;
        while kk < kc {
            let n = l.min(kc - kk);
            let mut dv = [S::zero(); NC];
            for (j, v) in dv.iter_mut().enumerate() {
                let at = dtp.add((j0 + j) * DOT_DEPTH + kk);
                *v = if n == l {
                    S::load(at)
                } else {
                    S::load_partial(at, n)
                };
            }
            for (r, row) in acc.iter_mut().enumerate() {
                let at = cp.add(c_row[r] + kk);
                let cv = if n == l {
                    S::load(at)
                } else {
                    S::load_partial(at, n)
                };
                for (a, &d) in row.iter_mut().zip(&dv) {
                    *a = S::mul_add(cv, d, *a);
                }
            }
            kk += n;
        }
        for (r, row) in acc.iter().enumerate() {
            for (j, a) in row.iter().enumerate() {
                let out = yp.add((m0 + r) * ldy + p0 + j0 + j);
                let base = match (first, ops.bias) {
                    (false, _) => *out,
                    (true, bias) => {
                        bias.map_or(0.0, |b| b[m0 + r]) + if accumulate { *out } else { 0.0 }
                    }
                };
                *out = base + a.reduce_sum();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A product's prefetcher reaches the end of both spans within the product's steps when
    /// they have at most as many lines as there are steps (one line of each span per `every`
    /// steps), and never moves past a span's last line; with more lines than steps it
    /// prefetches one line per step.
    #[test]
    fn prefetcher_covers_its_spans_within_the_steps() {
        let buf = vec![0.0f32; 64 * 1024];
        let lines = |n: usize| n.div_ceil(LINE_FLOATS);
        for (a, b, steps) in [
            (1000, 0, 10_000),
            (5000, 3000, 2_000),
            (16, 17, 2),
            (64 * 1024 - 5000, 5000, 4_096),
            (40_000, 16, 1_000),
        ] {
            let (first, second) = buf.split_at(a);
            let second = &second[..b];
            let mut p = Prefetcher::new(Ahead::of(first, second), steps);
            for _ in 0..steps {
                // SAFETY: prefetches are hints.
                unsafe { p.step::<crate::kernels::simd::Portable>() };
            }
            for (k, (span, len)) in [(first, a), (second, b)].into_iter().enumerate() {
                let issued = (p.next[k] as usize - span.as_ptr() as usize) / (LINE_FLOATS * 4);
                assert_eq!(
                    issued,
                    lines(len).min(steps),
                    "span {k} of {a}, {b} over {steps}"
                );
            }
        }
    }

    /// C given as a transposed matrix (rows at stride 1): the layout whose last columns short
    /// of a vector run along the rows (`tail_by_rows`). Shapes with and without such columns,
    /// fewer rows than a vector and not a multiple of it, bias, accumulation, and Y offset from
    /// a line (a lead block before the full ones).
    #[test]
    fn reads_a_transposed_c() {
        for isa in Isa::available() {
            for (n, k, p, ldy, offset) in [
                (9, 5, 33, 33, 0),
                (40, 7, 37, 37, 0),
                (16, 3, 20, 48, 5),
                (33, 4, 1, 16, 0),
                (24, 6, 196, 208, 3),
            ] {
                let ct: Vec<f32> = (0..k * n).map(|i| (i % 13) as f32 * 0.5 - 3.0).collect();
                let d: Vec<f32> = (0..k * p).map(|i| (i % 7) as f32).collect();
                let bias: Vec<f32> = (0..n).map(|i| i as f32 * 0.25).collect();
                for (with_bias, store) in [
                    (false, Store::Stream),
                    (true, Store::Stream),
                    (true, Store::Cached),
                    (false, Store::Accumulate),
                ] {
                    let accumulate = store == Store::Accumulate;
                    let mut buf = vec![1.5f32; offset + n * ldy];
                    let y = &mut buf[offset..];
                    small_k_gemm(
                        isa,
                        Operands {
                            c: &ct,
                            c_rows: Rows::Strided(1),
                            c_col: n,
                            d: &d,
                            n,
                            k,
                            p,
                            bias: with_bias.then_some(&bias[..]),
                            d_rows: Rows::Strided(p),
                        },
                        y,
                        ldy,
                        store,
                    );
                    for i in 0..n {
                        for j in 0..ldy {
                            let product: f32 = (0..k)
                                .map(|kk| ct[kk * n + i] * d[kk * p + j.min(p - 1)])
                                .sum();
                            let want = match (j < p, with_bias, accumulate) {
                                (false, _, _) => 1.5,
                                (true, true, _) => product + bias[i],
                                (true, false, true) => product + 1.5,
                                (true, false, false) => product,
                            };
                            assert_eq!(y[i * ldy + j], want, "{isa} {n}x{k}x{p} [{i},{j}]");
                        }
                    }
                }
            }
        }
    }

    /// Windows of one matrix filled in parallel, each its own columns (an empty window among
    /// them), with products at row and column offsets inside them: every element written once,
    /// by its own window's product.
    #[test]
    fn column_windows_write_only_their_columns() {
        use rayon::prelude::*;
        let (rows, ld, k) = (6, 40, 5);
        let bounds = [0, 7, 7, 23, 40];
        let c: Vec<f32> = (0..3 * k).map(|i| (i % 5) as f32 - 2.0).collect();
        let d: Vec<f32> = (0..k * ld).map(|i| ((i * 3) % 11) as f32 * 0.5).collect();
        for isa in Isa::available() {
            let mut y = vec![-1.0f32; rows * ld];
            ColumnWindow::split(&mut y, ld, &bounds)
                .into_par_iter()
                .enumerate()
                .for_each(|(w, mut window)| {
                    let (c0, c1) = (bounds[w], bounds[w + 1]);
                    // Rows 0..3 and 3..6 as two products of 3 rows each.
                    for row0 in [0, 3] {
                        let ops = Operands::dense(&c, 3, k, &d[c0..], ld, c1 - c0, None);
                        window.product(isa, ops, row0, c0, Store::Stream);
                    }
                });
            for i in 0..rows {
                for j in 0..ld {
                    let want: f32 = (0..k).map(|kk| c[(i % 3) * k + kk] * d[kk * ld + j]).sum();
                    assert_eq!(y[i * ld + j], want, "{isa} [{i},{j}]");
                }
            }
        }
    }

    #[test]
    #[should_panic(expected = "columns past the window's")]
    fn column_window_refuses_columns_of_another() {
        let mut y = vec![0.0f32; 2 * 8];
        let mut windows = ColumnWindow::split(&mut y, 8, &[0, 4, 8]);
        let (c, d) = ([1.0f32; 2], [1.0f32; 8]);
        let ops = Operands::dense(&c, 2, 1, &d, 8, 2, None);
        windows[0].product(Isa::Portable, ops, 0, 3, Store::Cached);
    }

    #[test]
    fn any_alignment_of_y() {
        for isa in Isa::available() {
            let (n, k, p, ldy) = (9, 5, 70, 80);
            let c: Vec<f32> = (0..n * k).map(|i| ((i * 7) % 5) as f32 - 2.0).collect();
            let d: Vec<f32> = (0..k * p).map(|i| ((i * 3) % 11) as f32 * 0.5).collect();
            let mut buf = vec![0.0f32; n * ldy + 16];
            for offset in 0..16 {
                buf.fill(-1.0);
                let y = &mut buf[offset..offset + (n - 1) * ldy + p];
                small_k_gemm(
                    isa,
                    Operands::dense(&c, n, k, &d, p, p, None),
                    y,
                    ldy,
                    Store::Stream,
                );
                for i in 0..n {
                    for j in 0..p {
                        let want: f32 = (0..k).map(|kk| c[i * k + kk] * d[kk * p + j]).sum();
                        assert_eq!(y[i * ldy + j], want, "{isa} offset {offset} [{i},{j}]");
                    }
                }
            }
        }
    }

    #[test]
    fn adds_bias_per_row() {
        for isa in Isa::available() {
            let (n, k, p) = (7, 20, 40);
            let c = vec![1.0f32; n * k];
            let d = vec![2.0f32; k * p];
            let bias: Vec<f32> = (0..n).map(|i| i as f32).collect();
            let mut y = vec![0.0f32; n * p];
            small_k_gemm(
                isa,
                Operands::dense(&c, n, k, &d, p, p, Some(&bias)),
                &mut y,
                p,
                Store::Stream,
            );
            for i in 0..n {
                assert!(
                    y[i * p..(i + 1) * p].iter().all(|&v| v == 40.0 + i as f32),
                    "{isa} row {i}"
                );
            }
        }
    }

    /// Products deeper than `SLICE_ABOVE`, which run in slices of K: D's rows strided and
    /// from a table (out of order, as an implicit GEMM's taps are), C row-major and transposed,
    /// with bias (added once) and every store; the sums are exact in f32, so any slicing that
    /// skips, repeats or misplaces a row of K, or adds the bias twice, fails.
    #[test]
    fn deep_products_in_slices_match_the_naive_product() {
        assert_exact_against_naive_product(11, 2 * SLICE_ABOVE + 37, 53, 60);
    }

    #[test]
    fn row_start_lines_counts_shared_lines_once() {
        assert_eq!(row_start_lines(Rows::Strided(LINE_FLOATS + 1), 300), 300);
        assert_eq!(row_start_lines(Rows::Strided(4), 300), 75);
        // Five taps of each of 3 planes, shifted by 0..5 floats: one line per plane.
        let table: Vec<usize> = (0..15).map(|r| (r / 5) * 1024 + r % 5).collect();
        assert_eq!(row_start_lines(Rows::Table(&table), 15), 3);
        assert_eq!(row_start_lines(Rows::Table(&table), 0), 0);
    }

    #[test]
    fn packed_panels_match_the_naive_product() {
        // Rows for eight full register blocks and a short one, a depth that packs, and columns
        // for several full column blocks, a lead and a tail.
        let (n, k, p, ldd) = (PACK_FROM_ROWS + 3, PACK_ABOVE_LINES + 45, 157, 171);
        let (c, d) = (vec![0.0; n * k], vec![0.0; k * ldd]);
        assert!(packs(
            Operands::dense(&c, n, k, &d, ldd, p, None),
            WIDE_BLOCK.1 * 16
        ));
        assert_exact_against_naive_product(n, k, p, ldd);
    }

    /// Every ISA, store, C layout (row-major, transposed) and D layout (strided, a permuting
    /// table) of an `n × k × p` product with D rows `ldd` apart, with and without packed
    /// panels (whichever cores run the test), against the naive sums. The values are small
    /// multiples of 1/4, so every sum is exact in any order.
    fn assert_exact_against_naive_product(n: usize, k: usize, p: usize, ldd: usize) {
        let c: Vec<f32> = (0..n * k).map(|i| ((i * 37) % 11) as f32 - 5.0).collect();
        let ct: Vec<f32> = (0..k * n).map(|i| c[(i % n) * k + i / n]).collect();
        let d: Vec<f32> = (0..k * ldd)
            .map(|i| ((i * 17) % 13) as f32 * 0.25)
            .collect();
        let table: Vec<usize> = (0..k).map(|kk| ((kk * 389) % k) * ldd).collect();
        let bias: Vec<f32> = (0..n).map(|i| i as f32 - 4.0).collect();
        for isa in Isa::available() {
            for (transposed_c, from_table) in [(false, false), (true, false), (false, true)] {
                for store in [Store::Stream, Store::Cached, Store::Accumulate] {
                    let ops = Operands {
                        c: if transposed_c { &ct } else { &c },
                        c_rows: Rows::Strided(if transposed_c { 1 } else { k }),
                        c_col: if transposed_c { n } else { 1 },
                        d: &d,
                        n,
                        k,
                        p,
                        bias: Some(&bias),
                        d_rows: if from_table {
                            Rows::Table(&table)
                        } else {
                            Rows::Strided(ldd)
                        },
                    };
                    for pack_panels in [false, true] {
                        let mut y = vec![2.0f32; n * p];
                        let out = Out {
                            ptr: y.as_mut_ptr(),
                            ld: p,
                            _y: PhantomData,
                        };
                        ops.check();
                        gemm_in_depth_slices(isa, ops, out, store, Ahead::NONE, pack_panels);
                        for i in 0..n {
                            for j in 0..p {
                                let row = |kk: usize| if from_table { table[kk] } else { kk * ldd };
                                let product: f32 =
                                    (0..k).map(|kk| c[i * k + kk] * d[row(kk) + j]).sum();
                                let before = if store == Store::Accumulate { 2.0 } else { 0.0 };
                                assert_eq!(
                                    y[i * p + j],
                                    before + product + bias[i],
                                    "{isa} {store:?} transposed C {transposed_c}, table {from_table}, \
                                 panels {pack_panels} [{i},{j}]"
                                );
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn matches_naive_product_on_every_isa_and_edge() {
        for isa in Isa::available() {
            for (n, k, p) in [
                (1, 1, 1),
                (6, 32, 64),
                (13, 7, 70),
                (64, 32, 200),
                (5, 3, 17),
                (7, 40, 16),
                (13, 40, 70),
                (9, 300, 37),
            ] {
                let c: Vec<f32> = (0..n * k + 3)
                    .map(|i| ((i * 37) % 11) as f32 - 5.0)
                    .collect();
                let d: Vec<f32> = (0..k * (p + 5))
                    .map(|i| ((i * 17) % 13) as f32 * 0.25)
                    .collect();
                for store in [Store::Stream, Store::Cached, Store::Accumulate] {
                    let accumulate = store == Store::Accumulate;
                    let ldy = p + 2;
                    let mut y = vec![1.0f32; n * ldy];
                    small_k_gemm(
                        isa,
                        Operands::dense(&c, n, k, &d, p + 5, p, None),
                        &mut y,
                        ldy,
                        store,
                    );
                    for i in 0..n {
                        for j in 0..ldy {
                            let want = if j < p {
                                (0..k)
                                    .map(|kk| c[i * k + kk] * d[kk * (p + 5) + j])
                                    .sum::<f32>()
                                    + if accumulate { 1.0 } else { 0.0 }
                            } else {
                                1.0 // untouched stride padding
                            };
                            assert!(
                                (y[i * ldy + j] - want).abs() < 1e-3,
                                "{isa} {n}x{k}x{p} [{i},{j}]"
                            );
                        }
                    }
                }
            }
        }
    }
}
