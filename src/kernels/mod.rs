//! The compute: convolution kernels over plain slices, and the one place that picks which
//! kernel runs for a given geometry.
//!
//! - [`reference`](mod@reference): plain loops with f64 accumulation; the ground truth every fast kernel is
//!   tested against.
//! - [`conv`]: standard and grouped convolution as im2col + GEMM, tiled over output pixels so
//!   the column buffer stays in cache; a 1×1 stride-1 unpadded kernel (pointwise) skips im2col
//!   and is a plain GEMM on the input.
//! - [`depthwise`]: a direct SIMD kernel for groups = in-channels (any depth multiplier, stride,
//!   dilation): each plane is one flat correlation over its padded phase planes.
//! - [`depthwise_blocked`]: depthwise forward and grad-weight on blocks of 16 channels (one
//!   vector per pixel); stride-1 grad-input runs on it as the adjoint forward, strided as a
//!   gather; both gradients in one pass.
//! - [`depthwise_rows`]: depthwise forward at stride 1 or 2 (and the stride-1 grad-input, its
//!   adjoint), and both gradients at stride 2, reading the NCHW rows in place with masked
//!   loads (AVX-512).
//! - [`fused`]: depthwise then pointwise band by band, the intermediate kept in L2.
//! - [`fused_training`]: a strided depthwise-separable pair's training passes image by image,
//!   the depthwise layer's memory prefetched during the pointwise products.
//! - [`elementwise`]: the memory-bound kernels of the network layers (BatchNorm, ReLU, pooling).
//! - [`winograd`]: F(4×4, 3×3) or F(2×2, 3×3) for stride-1 3×3 convolutions, F(4, 3) for
//!   3 × 1 and 1 × 3 ones with many channels (forward and grad-input).
//! - [`winograd_grad_weight`]: the same layers' grad-weight on the same transforms, the
//!   tiles as the products' inner dimension.
//! - [`implicit`]: implicit-GEMM convolution (no im2col) for every other geometry, batch permitting.
//! - [`tap_grad_weight`]: grad-weight of stride-1 same-width convolutions (kh × 1, 1 × kw,
//!   k × k) as one GEMM per tap of the gradient planes with the shifted input planes, in place.
//! - [`shifted_grad_weight`]: the same as register-tiled dot products, for large images with
//!   few channels.
//! - [`transposed_grad_weight`]: grad-weight with too few images for the threads, each thread
//!   a run of the input channels, transposed to pixel-major.
//! - [`gemm`]: the wrapper over faer's matrix product.
//! - [`pointwise`]: a register-blocked product for pointwise steps with few input channels.
//! - [`simd`]: instruction-set dispatch (AVX-512, AVX2, portable).
//!
//! Every entry point takes an [`Exec`] (threads and instruction set: parallelism is an
//! argument, not global state) and a [`Workspace`] (scratch reused across calls, so hot loops
//! do not allocate).

pub mod channels_last_grad_weight;
pub mod conv;
pub mod cores;
pub mod dense;
pub mod depthwise;
pub mod depthwise_blocked;
pub mod depthwise_rows;
pub mod elementwise;
pub mod fused;
pub mod fused_training;
pub mod gemm;
pub mod implicit;
pub mod pointwise;
pub mod pointwise_split;
pub mod reference;
pub mod shifted_grad_weight;
pub mod simd;
pub mod tap_grad_weight;
pub mod transposed_grad_weight;
pub mod winograd;
pub mod winograd_grad_weight;

use std::ops::Range;

use rayon::prelude::*;

use crate::error::{Error, Result};
use crate::geometry::{Conv2dParams, ConvGeometry, Padding};
use crate::memory::grow_zeroed;
pub use simd::Isa;
use simd::{Portable, SimdF32};

/// How a kernel or a network layer may run: how many threads of the current rayon pool to split
/// work into, and which instruction set. Call them inside a pool of that many threads
/// (`rayon::ThreadPool::install`, as the CLI does): there work for one thread runs on the
/// calling worker, where from outside any pool rayon hands each parallel loop to its global
/// pool (the element-wise layers and `for_each_task`'s kernels run one task inline either way).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Exec {
    threads: usize,
    isa: Isa,
    /// Calls with fewer multiply-accumulates run on the calling thread ([`Exec::for_work`]).
    min_split_macs: u64,
}

impl Exec {
    /// Calls below this many multiply-accumulates run on one thread by default: a few
    /// microseconds of work, less than handing half of it to another thread costs. Measured on
    /// 2 threads, one thread against two, every variant and pass of small layers (15 × 15 to
    /// 28 × 28, batch 1 and 8): under 64 K MACs per call one thread won everywhere (its median
    /// 1.3–5.9× faster: a sleeping worker takes longer to wake than the work takes), up to about
    /// 150 K it tied or won, and from 400 K (a 16 → 32 pointwise layer at 28 × 28: 7.7 → 4.4 µs)
    /// two threads won.
    pub const MIN_SPLIT_MACS: u64 = 128 * 1024;

    /// `threads` threads (at least 1) with the best instruction set of this CPU; calls smaller
    /// than [`Exec::MIN_SPLIT_MACS`] run on one.
    pub fn new(threads: usize) -> Self {
        Exec {
            threads: threads.max(1),
            isa: Isa::detect(),
            min_split_macs: Self::MIN_SPLIT_MACS,
        }
    }

    /// One thread, best instruction set.
    pub fn sequential() -> Self {
        Self::new(1)
    }

    /// The same with another instruction set; fails if this CPU cannot run it.
    pub fn with_isa(self, isa: Isa) -> Result<Self> {
        if !isa.is_supported() {
            return Err(Error::invalid(format!("this CPU does not support {isa}")));
        }
        Ok(Exec { isa, ..self })
    }

    /// Tests: `threads` threads on `isa` (available on this CPU), splitting every call however
    /// small, so that small shapes cover the split kernels.
    #[cfg(test)]
    pub(crate) fn splitting_every_call(threads: usize, isa: Isa) -> Self {
        Exec::new(threads)
            .with_min_split_macs(0)
            .with_isa(isa)
            .expect("an available instruction set")
    }

    /// The same, splitting only calls of at least `macs` multiply-accumulates over the threads
    /// (0: every call, as the tests do to cover the split kernels on small shapes).
    pub fn with_min_split_macs(self, macs: u64) -> Self {
        Exec {
            min_split_macs: macs,
            ..self
        }
    }

    /// How a call of `macs` multiply-accumulates runs: on one thread when it is smaller than
    /// the split threshold, otherwise as `self`. The entry points ask it once — the
    /// convolutions' ([`conv2d_forward`] and the others), [`crate::ConvPair`]'s and the network's
    /// Linear layer's — and the kernels below them split as their `Exec` says.
    pub fn for_work(self, macs: u64) -> Self {
        if macs < self.min_split_macs {
            Exec { threads: 1, ..self }
        } else {
            self
        }
    }

    /// Threads the kernels split work into.
    pub fn threads(&self) -> usize {
        self.threads
    }

    /// Instruction set of the SIMD kernels.
    pub fn isa(&self) -> Isa {
        self.isa
    }
}

impl Default for Exec {
    /// As many threads as the current rayon pool has.
    fn default() -> Self {
        Self::new(rayon::current_num_threads())
    }
}

/// Scratch memory reused across kernel calls. Grows to the largest request and stays there.
#[derive(Debug, Default)]
pub struct Workspace {
    buf: Vec<f32>,
    /// Transformed weights (the adjoint's flipped kernel, the per-phase kernels of a strided
    /// grad-input) kept apart from `buf`, which the convolution they feed needs for itself.
    weights: Vec<f32>,
}

impl Workspace {
    /// An empty workspace.
    pub fn new() -> Self {
        Self::default()
    }

    /// A scratch slice of at least `len` elements with unspecified contents.
    pub fn take(&mut self, len: usize) -> Result<&mut [f32]> {
        grow_zeroed(&mut self.buf, len, "kernel scratch")?;
        Ok(&mut self.buf[..len])
    }

    /// Runs `f` with a buffer of `len` floats for transformed weights, kept apart from the
    /// scratch that `f` may still take from the workspace; `what` names it in an allocation
    /// error.
    fn with_weights<R>(
        &mut self,
        len: usize,
        what: &str,
        f: impl FnOnce(&mut [f32], &mut Workspace) -> Result<R>,
    ) -> Result<R> {
        let mut wt = std::mem::take(&mut self.weights);
        let r = grow_zeroed(&mut wt, len, what).and_then(|()| f(&mut wt[..len], self));
        self.weights = wt;
        r
    }

    /// Bytes currently held.
    pub fn bytes(&self) -> usize {
        (self.buf.len() + self.weights.len()) * 4
    }
}

/// A batch split into runs of consecutive images, one per task, as [`task_count`] and
/// [`for_each_task`] split it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct ImageRuns {
    /// Tasks (runs).
    pub(crate) tasks: usize,
    /// Images per run (the last may have fewer).
    pub(crate) per_task: usize,
    batch: usize,
}

impl ImageRuns {
    /// The runs of `batch` images on `threads` threads.
    pub(crate) fn new(threads: usize, batch: usize) -> Self {
        Self::of_tasks(task_count(threads, batch), batch)
    }

    /// `batch` images in `tasks` runs (at least one).
    fn of_tasks(tasks: usize, batch: usize) -> Self {
        let tasks = tasks.max(1);
        ImageRuns {
            tasks,
            per_task: batch.div_ceil(tasks),
            batch,
        }
    }

    /// The images of task `t`.
    pub(crate) fn run(&self, t: usize) -> Range<usize> {
        let start = (t * self.per_task).min(self.batch);
        start..(start + self.per_task).min(self.batch)
    }
}

/// `gw` = the sum, in task order, of the tasks' f64 weight-gradient sums (each laid out as
/// `gw`): the depthwise kernels' per-thread partial gradients.
pub(crate) fn sum_task_sums(sums: &[Vec<f64>], gw: &mut [f32]) {
    for (k, out) in gw.iter_mut().enumerate() {
        *out = sums.iter().map(|s| s[k]).sum::<f64>() as f32;
    }
}

/// `items`, `len` of them, collected into a vector allocated once: collecting a flat map (whose
/// size hint is 0) grows the vector by doubling, one allocation per doubling (ten for the
/// implicit GEMM's row table of a 512-channel layer).
pub(crate) fn collect_exact<T>(len: usize, items: impl IntoIterator<Item = T>) -> Vec<T> {
    let mut v = Vec::with_capacity(len);
    v.extend(items);
    debug_assert_eq!(v.len(), len, "collect_exact: wrong length");
    v
}

/// How `items` independent work items are spread over `threads`: item-parallel when the items
/// divide evenly (or are many), otherwise one task (whose images the kernels then split over
/// the threads: [`splits_inside_images`]).
pub(crate) fn task_count(threads: usize, items: usize) -> usize {
    if threads <= 1 || items <= 1 {
        1
    } else if items.is_multiple_of(threads) || items >= 4 * threads {
        threads.min(items)
    } else {
        1
    }
}

/// Whether `batch` images leave several threads without images of their own ([`task_count`]
/// gives one task): the kernels then split each image over the threads instead of the batch.
pub(crate) fn splits_inside_images(threads: usize, batch: usize) -> bool {
    threads > 1 && task_count(threads, batch) == 1
}

/// Splits `out` into chunks of whole items (`item_len` elements each) over `tasks` tasks, each
/// with its own `scratch_len` slice of `scratch`, and runs `f(items, out_chunk, scratch_chunk)`
/// on the current rayon pool.
pub(crate) fn for_each_task<F>(
    tasks: usize,
    out: &mut [f32],
    item_len: usize,
    scratch: &mut [f32],
    scratch_len: usize,
    f: F,
) where
    F: Fn(Range<usize>, &mut [f32], &mut [f32]) + Sync + Send,
{
    let items = out.len().checked_div(item_len).unwrap_or(0);
    if items == 0 {
        return;
    }
    let per_task = items.div_ceil(tasks.max(1));
    if tasks <= 1 || per_task >= items {
        f(0..items, out, &mut scratch[..scratch_len]);
        return;
    }
    let run = |t: usize, o: &mut [f32], s: &mut [f32]| {
        let start = t * per_task;
        f(start..start + o.len() / item_len, o, s)
    };
    let chunks = out.par_chunks_mut(per_task * item_len).enumerate();
    if scratch_len == 0 {
        // Zipping with zero-length scratch chunks would yield no tasks at all.
        chunks.for_each(|(t, o)| run(t, o, &mut []));
    } else {
        chunks
            .zip(scratch.par_chunks_mut(scratch_len))
            .for_each(|((t, o), s)| run(t, o, s));
    }
}

/// Splits `batch` images evenly over the tasks whose scratch `scratch` holds (`per_task` floats
/// each) and runs `f(images, task_scratch)` for each on the current rayon pool: the split of
/// the grad-weight kernels, where every task accumulates a private copy of the gradient.
pub(crate) fn for_each_image_task<F>(batch: usize, scratch: &mut [f32], per_task: usize, f: F)
where
    F: Fn(Range<usize>, &mut [f32]) + Sync + Send,
{
    let tasks = scratch.len().checked_div(per_task).unwrap_or(0);
    let runs = ImageRuns::of_tasks(tasks, batch);
    scratch
        .par_chunks_mut(per_task.max(1))
        .enumerate()
        .for_each(|(t, s)| f(runs.run(t), s));
}

/// Which algorithm computes a convolution's forward pass (and, through it, the others: see
/// [`conv2d_grad_input`] and [`conv2d_grad_weight`] for the kernels each pass picks).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConvAlgorithm {
    /// Direct SIMD depthwise kernel (groups = in-channels).
    Depthwise,
    /// A plain GEMM on the input (1×1, stride 1, no padding).
    Pointwise,
    /// Winograd: F(4×4, 3×3) or F(2×2, 3×3) for 3×3, F(4, 3) for 3×1 and 1×3 (forward,
    /// grad-input, and grad-weight where [`winograd_grad_weight::applies`]).
    Winograd,
    /// Implicit GEMM on phase planes (forward, and grad-input per input phase when strided).
    Implicit,
    /// im2col (tiled) + GEMM.
    Im2colGemm,
}

impl ConvAlgorithm {
    /// The algorithm used for `g` on `exec`: chosen here and only here.
    pub fn choose(exec: Exec, g: &ConvGeometry) -> Self {
        if g.is_depthwise() {
            ConvAlgorithm::Depthwise
        } else if g.is_pointwise() {
            ConvAlgorithm::Pointwise
        } else if winograd::applies(g) {
            ConvAlgorithm::Winograd
        } else if implicit::applies(exec, g) {
            ConvAlgorithm::Implicit
        } else {
            ConvAlgorithm::Im2colGemm
        }
    }
}

fn check_lengths(g: &ConvGeometry, x: usize, w: usize, y: usize) {
    assert_eq!(x, g.input_len(), "input length does not match the geometry");
    assert_eq!(
        w,
        g.weight_len(),
        "weight length does not match the geometry"
    );
    assert_eq!(
        y,
        g.output_len(),
        "output length does not match the geometry"
    );
}

/// `y = conv(x, w) + bias` with the fastest kernel for `g`.
///
/// Slices must have the lengths `g` implies (checked; a mismatch is a programming error and
/// panics — user-facing callers validate shapes through [`ConvGeometry::new`] first).
pub fn conv2d_forward(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    bias: Option<&[f32]>,
    y: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    check_lengths(g, x.len(), w.len(), y.len());
    if let Some(b) = bias {
        assert_eq!(b.len(), g.out_channels, "bias length");
    }
    let exec = exec.for_work(g.macs());
    match ConvAlgorithm::choose(exec, g) {
        ConvAlgorithm::Depthwise if depthwise_rows::applies(exec.isa(), g) => {
            depthwise_rows::forward(exec, g, x, w, bias, y)
        }
        ConvAlgorithm::Depthwise if depthwise_blocked::applies(g) => {
            depthwise_blocked::forward(exec, g, x, w, bias, y, ws)
        }
        ConvAlgorithm::Depthwise => depthwise::forward(exec, g, x, w, bias, y, ws),
        ConvAlgorithm::Winograd => winograd::forward(exec, g, x, w, bias, y, ws),
        ConvAlgorithm::Implicit => implicit::forward(exec, g, x, w, bias, y, ws),
        // Too few images for the implicit GEMM's image split, which splits them inside.
        ConvAlgorithm::Im2colGemm if implicit::forward_within_images_applies(exec, g) => {
            implicit::forward(exec, g, x, w, bias, y, ws)
        }
        ConvAlgorithm::Pointwise | ConvAlgorithm::Im2colGemm => {
            conv::forward(exec, g, x, w, bias, y, ws)
        }
    }
}

/// `gx = ∂L/∂x` from `gy = ∂L/∂y` (overwrites `gx`).
pub fn conv2d_grad_input(
    exec: Exec,
    g: &ConvGeometry,
    gy: &[f32],
    w: &[f32],
    gx: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    check_lengths(g, gx.len(), w.len(), gy.len());
    let exec = exec.for_work(g.macs());
    // The adjoint forward convolution pays where it runs on a faster kernel than the direct
    // grad-input: anything but im2col (an implicit GEMM split inside the images included: at
    // batch 1 on 2 threads, B's 1 × 3 half 0.94–0.96 → 0.75 ms, a 5 × 5 1.84–1.85 → 1.59–1.62),
    // and for depthwise layers the row or the channel-blocked kernel.
    let adjoint_pays = |adj: &ConvGeometry| match ConvAlgorithm::choose(exec, adj) {
        ConvAlgorithm::Im2colGemm => implicit::forward_within_images_applies(exec, adj),
        ConvAlgorithm::Depthwise => {
            depthwise_rows::applies(exec.isa(), adj) || depthwise_blocked::applies(adj)
        }
        _ => true,
    };
    match (ConvAlgorithm::choose(exec, g), adjoint_geometry(g)) {
        (ConvAlgorithm::Pointwise, _) => conv::grad_input(exec, g, gy, w, gx, ws),
        (_, Some(adj)) if adjoint_pays(&adj) => with_adjoint_weight(exec, g, w, ws, |wt, ws| {
            conv2d_forward(exec, &adj, gy, wt, None, gx, ws)
        }),
        (ConvAlgorithm::Depthwise, _) if depthwise_rows::backward_applies(exec.isa(), g) => {
            depthwise_rows::backward(exec, g, gy, Some((w, gx)), None)
        }
        (ConvAlgorithm::Depthwise, _) if depthwise_blocked::grad_input_applies(g) => {
            depthwise_blocked::grad_input(exec, g, gy, w, gx, ws)
        }
        (ConvAlgorithm::Depthwise, _) => depthwise::grad_input(exec, g, gy, w, gx, ws),
        // Strided: per input phase, an implicit GEMM (no col2im, no inserted zeros).
        _ if implicit::applies(exec, g) || implicit::grad_input_within_images_applies(exec, g) => {
            implicit::grad_input(exec, g, gy, w, gx, ws)
        }
        _ => conv::grad_input(exec, g, gy, w, gx, ws),
    }
}

/// For a stride-1 convolution whose pads do not exceed the kernel span, grad-input is itself a
/// forward convolution: of the output gradient, padded by `span − 1 − pad` on each side, with
/// the kernel flipped and its in/out channels swapped (per group). This is its geometry.
fn adjoint_geometry(g: &ConvGeometry) -> Option<ConvGeometry> {
    if g.stride_h != 1 || g.stride_w != 1 {
        return None;
    }
    let (sh, sw) = (
        (g.kernel_h - 1) * g.dilation_h,
        (g.kernel_w - 1) * g.dilation_w,
    );
    let padding = Padding::Explicit {
        top: sh.checked_sub(g.pad_top)?,
        bottom: sh.checked_sub(g.pad_bottom)?,
        left: sw.checked_sub(g.pad_left)?,
        right: sw.checked_sub(g.pad_right)?,
    };
    let params = Conv2dParams {
        stride: (1, 1),
        dilation: (g.dilation_h, g.dilation_w),
        padding,
        groups: g.groups,
    };
    let weight = [
        g.in_channels,
        g.out_channels_per_group(),
        g.kernel_h,
        g.kernel_w,
    ];
    ConvGeometry::new(g.output_shape(), weight, &params).ok()
}

/// Runs `f` with `g`'s adjoint weight ([`adjoint_weight`]) in the workspace's weight buffer.
pub(crate) fn with_adjoint_weight<R>(
    exec: Exec,
    g: &ConvGeometry,
    w: &[f32],
    ws: &mut Workspace,
    f: impl FnOnce(&[f32], &mut Workspace) -> Result<R>,
) -> Result<R> {
    ws.with_weights(w.len(), "the adjoint kernel", |wt, ws| {
        adjoint_weight(exec, g, w, wt);
        f(wt, ws)
    })
}

/// The adjoint's weight: `wt[grp·cig + ci][co][i][j] = w[grp·cog + co][ci][kh−1−i][kw−1−j]`.
///
/// Written in blocks of [`ADJOINT_ROWS`] rows (grp, ci) of `wt`, output channel by output
/// channel: each step reads one contiguous run of `w` and appends to each row of the block.
/// Row by row (a read stride of cig·taps floats for every element) took 3.4% of reference
/// layer D's 3 × 1 grad-input, on one thread.
fn adjoint_weight(exec: Exec, g: &ConvGeometry, w: &[f32], wt: &mut [f32]) {
    let (cig, cog, taps) = (
        g.in_channels_per_group(),
        g.out_channels_per_group(),
        g.kernel_h * g.kernel_w,
    );
    let row = cog * taps;
    let block = |(b, rows): (usize, &mut [f32])| {
        // Where row r0 + r's weights start in w (output channel 0).
        let mut starts = [0; ADJOINT_ROWS];
        for (r, s) in starts.iter_mut().enumerate().take(rows.len() / row) {
            let (grp, ci) = ((b * ADJOINT_ROWS + r) / cig, (b * ADJOINT_ROWS + r) % cig);
            *s = (grp * cog * cig + ci) * taps;
        }
        let step = cig * taps;
        match taps {
            1 => flip_block::<1>(w, rows, row, &starts, step, cog, taps),
            3 => flip_block::<3>(w, rows, row, &starts, step, cog, taps),
            9 => flip_block::<9>(w, rows, row, &starts, step, cog, taps),
            _ => flip_block::<0>(w, rows, row, &starts, step, cog, taps),
        }
    };
    if exec.threads > 1 && wt.len() >= 1 << 16 {
        wt.par_chunks_mut(ADJOINT_ROWS * row)
            .enumerate()
            .for_each(block);
    } else {
        wt.chunks_mut(ADJOINT_ROWS * row)
            .enumerate()
            .for_each(block);
    }
}

/// Rows of the adjoint weight written together by [`adjoint_weight`].
const ADJOINT_ROWS: usize = 16;

/// One block of [`adjoint_weight`]: row r's kernel of output channel co is the reversed run
/// of `taps` floats at `starts[r] + co·step` in `w`. `T` is the tap count known at compile time
/// (the copy then has no loop overhead: a 3 × 3 layer's weight took 2.2× as long with a run-time
/// count), or 0 to use `taps`.
fn flip_block<const T: usize>(
    w: &[f32],
    rows: &mut [f32],
    row: usize,
    starts: &[usize],
    step: usize,
    cog: usize,
    taps: usize,
) {
    let n = if T == 0 { taps } else { T };
    // Row by row where each run is 3 × 3 taps long: reference layer D's 3 × 3 grad-input at
    // batch 1 (harness, 2 threads, min of 20, alternated 3×) 4.89–5.67 → 4.63–5.22 ms. With
    // runs of 3 the output-channel-major order below was faster (D's 3 × 1 1.53 against
    // 1.59): its 16 rows' runs share the cache lines it reads.
    // One output channel's run of taps, reversed.
    let flip = |s: usize, co: usize, out: &mut [f32]| {
        let src = &w[s + co * step..][..n];
        for t in 0..n {
            out[t] = src[n - 1 - t];
        }
    };
    if T == 9 {
        for (dst, &s) in rows.chunks_exact_mut(row).zip(starts) {
            for (co, out) in dst[..cog * n].chunks_exact_mut(n).enumerate() {
                flip(s, co, out);
            }
        }
        return;
    }
    // Successive output channels' runs lie `step` floats apart (6 KiB and more on a 512-channel
    // layer), each on pages of their own, which the hardware prefetcher does not follow; and
    // in a training step `w` has usually left the caches since the forward pass. So the runs
    // of the output channel PREFETCH_AHEAD on are prefetched (the block's rows read
    // neighbouring runs: one group's rows are contiguous in `w`). Reference layer D's 3 × 1
    // half in its batch-1 training step (2 threads, the copy timed inside the step, 60–100
    // steps, alternated 4×): 0.34–0.41 → 0.21–0.25 ms (with the vCPUs on different dies
    // 0.44–0.49 → 0.26–0.31); the whole step (min of 150, alternated 6×) 9.39–9.80 →
    // 9.36–9.69 ms, on a day this VM drifted by 0.4 ms. Not in the row-by-row order above,
    // where a prefetch per run of 9 made D's 3 × 3 copy slower (0.54–0.75 → 0.70–0.91 ms).
    let span = rows.len() / row * n;
    for co in 0..cog {
        if co + PREFETCH_AHEAD < cog {
            let at = starts[0] + (co + PREFETCH_AHEAD) * step;
            for line in (at..(at + span).min(w.len())).step_by(16) {
                // SAFETY: a hint about an address inside `w`; SSE2 (the portable ISA on
                // x86-64) is in every x86-64 CPU, and elsewhere the hint is a no-op.
                unsafe { Portable::prefetch(w.as_ptr().add(line)) };
            }
        }
        for (dst, &s) in rows.chunks_exact_mut(row).zip(starts) {
            flip(s, co, &mut dst[co * n..][..n]);
        }
    }
}

/// How many output channels ahead [`flip_block`] prefetches its reads: a distance of 8, 16 and
/// 32 measured alike.
const PREFETCH_AHEAD: usize = 8;

/// Which kernel computes a convolution's grad-weight ([`conv2d_grad_weight`]).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GradWeightKernel {
    /// Stride-2 depthwise layers the row kernel covers ([`depthwise_rows`]).
    DepthwiseRows,
    /// Depthwise layers the channel-blocked kernel covers ([`depthwise_blocked`]).
    DepthwiseBlocked,
    /// Other depthwise layers ([`depthwise`]).
    Depthwise,
    /// Layers whose forward runs on Winograd, with enough tiles per image where the threads
    /// split the images ([`winograd_grad_weight`]).
    Winograd,
    /// Many channels on small images, one unpacked product per tap on a channels-last copy of
    /// the input ([`channels_last_grad_weight`]).
    ChannelsLast,
    /// Stride-1 same-width layers, one GEMM per tap on the planes in place
    /// ([`tap_grad_weight`]).
    TapGemm,
    /// Too few images for the threads: each thread a run of the input channels, transposed
    /// ([`transposed_grad_weight`]).
    TransposedInput,
    /// Strided layers, one GEMM per tap over the input's phase planes
    /// ([`tap_grad_weight::grad_weight_on_phases`]).
    TapGemmPhases,
    /// Stride-1 same-width layers on large images with few channels, as register-tiled dot
    /// products of shifted planes ([`shifted_grad_weight`]).
    Shifted,
    /// Long products of stride-1 layers whose output is narrower than the input, on the
    /// implicit GEMM ([`implicit`]).
    Implicit,
    /// im2col + GEMM ([`conv`]; pointwise layers without the im2col).
    Im2colGemm,
}

impl GradWeightKernel {
    /// The kernel [`conv2d_grad_weight`] runs for `g`, in order of preference.
    pub fn choose(exec: Exec, g: &ConvGeometry) -> Self {
        match ConvAlgorithm::choose(exec, g) {
            ConvAlgorithm::Depthwise if depthwise_rows::grad_weight_applies(exec.isa(), g) => {
                Self::DepthwiseRows
            }
            ConvAlgorithm::Depthwise if depthwise_blocked::grad_weight_applies(g) => {
                Self::DepthwiseBlocked
            }
            ConvAlgorithm::Depthwise => Self::Depthwise,
            _ if winograd_grad_weight::applies(exec, g) => Self::Winograd,
            _ if channels_last_grad_weight::applies(exec, g) => Self::ChannelsLast,
            // Too few images for the threads: large images with few channels split by rows,
            // the others by input channels.
            _ if shifted_grad_weight::within_images_applies(exec, g) => Self::Shifted,
            _ if transposed_grad_weight::applies(exec, g) => Self::TransposedInput,
            _ if tap_grad_weight::applies(exec, g) => Self::TapGemm,
            _ if shifted_grad_weight::applies(exec, g) => Self::Shifted,
            _ if tap_grad_weight::applies_on_phases(exec, g) => Self::TapGemmPhases,
            ConvAlgorithm::Winograd | ConvAlgorithm::Implicit
                if implicit::grad_weight_applies(exec, g) =>
            {
                Self::Implicit
            }
            _ => Self::Im2colGemm,
        }
    }
}

/// `gw = ∂L/∂w` from `x` and `gy` (overwrites `gw`), on the kernel [`GradWeightKernel::choose`]
/// picks.
pub fn conv2d_grad_weight(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    ws: &mut Workspace,
) -> Result<()> {
    check_lengths(g, x.len(), gw.len(), gy.len());
    grad_weight_and_bias(exec.for_work(g.macs()), g, x, gy, gw, None, ws)
}

/// The gradients of one convolution, all overwritten: `gw`, and `gx` and `gb` when given.
/// [`conv2d_grad_weight`], [`conv2d_grad_input`] and [`conv2d_grad_bias`], except where one
/// pass computes several: depthwise layers on the channel-blocked kernel, whose weight and
/// input gradients come from one pass over the output gradient ([`depthwise_blocked::backward`]
/// at stride 1, [`depthwise_blocked::strided_backward`] strided, or at stride 2 on the row
/// kernel [`depthwise_rows::backward`]; a stride-1 3 × 3 whose grad-weight the row
/// kernel takes runs two passes there, see [`depthwise_rows::grad_weight_applies`]),
/// pointwise layers split by
/// images, whose three gradients are computed image by image ([`conv::pointwise_backward`]),
/// and layers whose grad-weight runs on the shifted kernel or the per-tap GEMMs, which sum
/// grad-bias image by image as they go ([`shifted_grad_weight::grad_weight`],
/// [`tap_grad_weight::grad_weight`], [`tap_grad_weight::grad_weight_on_phases`]). Results are
/// the same either way (grad-bias bit for bit).
#[allow(clippy::too_many_arguments)]
pub fn conv2d_backward(
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
    check_lengths(g, x.len(), w.len(), gy.len());
    assert_eq!(gw.len(), g.weight_len(), "grad-weight length");
    if let Some(gx) = &gx {
        assert_eq!(gx.len(), g.input_len(), "grad-input length");
    }
    if let Some(gb) = &gb {
        assert_eq!(gb.len(), g.out_channels, "grad-bias length");
    }
    let exec = exec.for_work(g.macs() * if gx.is_some() { 2 } else { 1 });
    if conv::pointwise_backward_applies(exec, g) {
        return conv::pointwise_backward(exec, g, x, gy, w, gx, gw, gb, ws);
    }
    let Some(gx) = gx else {
        return grad_weight_and_bias(exec, g, x, gy, gw, gb, ws);
    };
    let Some(one_pass) = one_pass_backward(exec.isa(), g) else {
        grad_weight_and_bias(exec, g, x, gy, gw, gb, ws)?;
        return conv2d_grad_input(exec, g, gy, w, gx, ws);
    };
    if let Some(gb) = gb {
        conv2d_grad_bias(exec, g, gy, gb);
    }
    match one_pass {
        FusedBackward::Adjoint(adj) => with_adjoint_weight(exec, g, w, ws, |wt, ws| {
            depthwise_blocked::backward(exec, g, &adj, x, gy, wt, gx, gw, ws)
        }),
        FusedBackward::Strided => {
            depthwise_blocked::strided_backward(exec, g, x, gy, w, gx, gw, ws)
        }
        FusedBackward::Rows => depthwise_rows::backward(exec, g, gy, Some((w, gx)), Some((x, gw))),
    }
}

/// Grad-weight, and grad-bias when `gb` is given: the shifted and the per-tap grad-weights sum
/// each image's output gradient for it while that is in cache; with the other kernels it is a
/// pass of its own over the output gradient. Training steps with bias (forward and backward;
/// harness, 2 threads, alternated 4×), on the phase planes: reference layer E's 3 × 3 stride 2
/// 56.8–57.2 → 55.8–56.8 ms, its spatially separable halves 19.8–20.0 → 19.2–19.9 (1 × 3) and
/// 19.3–19.7 → 19.1–19.5 (3 × 1), where the separate pass reads a 6.4 MB output gradient in
/// 0.22 ms; in place: reference layer C's 3 × 3 76.0–76.4 → 75.7–76.0, its 1 × 3 36.5–36.7 →
/// 36.2–36.5 (12.8 MB).
fn grad_weight_and_bias(
    exec: Exec,
    g: &ConvGeometry,
    x: &[f32],
    gy: &[f32],
    gw: &mut [f32],
    gb: Option<&mut [f32]>,
    ws: &mut Workspace,
) -> Result<()> {
    let kernel = GradWeightKernel::choose(exec, g);
    // The kernels that sum grad-bias as they go take `gb`; the others leave it to its own pass.
    let gb = match kernel {
        GradWeightKernel::Shifted | GradWeightKernel::TapGemm | GradWeightKernel::TapGemmPhases => {
            gb
        }
        _ => {
            if let Some(gb) = gb {
                conv2d_grad_bias(exec, g, gy, gb);
            }
            None
        }
    };
    match kernel {
        GradWeightKernel::DepthwiseRows => {
            depthwise_rows::backward(exec, g, gy, None, Some((x, gw)))
        }
        GradWeightKernel::DepthwiseBlocked => {
            depthwise_blocked::grad_weight(exec, g, x, gy, gw, ws)
        }
        GradWeightKernel::Depthwise => depthwise::grad_weight(exec, g, x, gy, gw, ws),
        GradWeightKernel::Winograd => winograd_grad_weight::grad_weight(exec, g, x, gy, gw, ws),
        GradWeightKernel::ChannelsLast => {
            channels_last_grad_weight::grad_weight(exec, g, x, gy, gw, ws)
        }
        GradWeightKernel::TapGemm => tap_grad_weight::grad_weight(exec, g, x, gy, gw, gb, ws),
        GradWeightKernel::Shifted => shifted_grad_weight::grad_weight(exec, g, x, gy, gw, gb, ws),
        GradWeightKernel::TapGemmPhases => {
            tap_grad_weight::grad_weight_on_phases(exec, g, x, gy, gw, gb, ws)
        }
        GradWeightKernel::Implicit => implicit::grad_weight(exec, g, x, gy, gw, ws),
        GradWeightKernel::TransposedInput => {
            transposed_grad_weight::grad_weight(exec, g, x, gy, gw, ws)
        }
        GradWeightKernel::Im2colGemm => conv::grad_weight(exec, g, x, gy, gw, ws),
    }
}

/// Whether the channel-blocked kernel computes a depthwise layer's weight and input gradients
/// in one pass over the output gradient (pointwise layers: [`conv::pointwise_backward_applies`]):
/// at stride 1 with the adjoint forward, strided with the gather per residue class. With
/// AVX-512, [`conv2d_backward`] takes the row kernel first where it applies (see
/// `one_pass_backward`).
pub fn backward_is_fused(g: &ConvGeometry) -> bool {
    fused_backward(g).is_some()
}

/// How [`conv2d_backward`] computes both gradients of the depthwise layer `g` with `isa` in
/// one pass, if it does: on the row kernel at stride 2; not at all where the row kernel takes
/// a stride-1 grad-weight (its grad-input, the adjoint forward, runs there too, a second pass:
/// see [`depthwise_rows::grad_weight_applies`]); else on the channel-blocked kernel.
fn one_pass_backward(isa: Isa, g: &ConvGeometry) -> Option<FusedBackward> {
    if depthwise_rows::backward_applies(isa, g) {
        Some(FusedBackward::Rows)
    } else if depthwise_rows::grad_weight_applies(isa, g) {
        None
    } else {
        fused_backward(g)
    }
}

/// How [`conv2d_backward`] computes both gradients of a depthwise layer in one pass.
enum FusedBackward {
    /// Stride 1: the grad-input is the forward of this adjoint geometry.
    Adjoint(ConvGeometry),
    /// Strided: the grad-input gathers per residue class.
    Strided,
    /// Stride 2 on the row kernel ([`depthwise_rows::backward`]), chosen before the
    /// other two where it applies to the instruction set.
    Rows,
}

/// The one-pass backward of `g`, where the channel-blocked kernel computes both gradients.
fn fused_backward(g: &ConvGeometry) -> Option<FusedBackward> {
    match adjoint_geometry(g) {
        Some(adj) if depthwise_blocked::backward_applies(g, &adj) => {
            Some(FusedBackward::Adjoint(adj))
        }
        _ if depthwise_blocked::grad_input_applies(g) => Some(FusedBackward::Strided),
        _ => None,
    }
}

/// One channel's grad-bias from its per-image sums (each [`elementwise::sum`] in f32 lanes),
/// added across images in f64, in image order: fast and accurate enough for millions of terms.
/// The one definition of that order, so every kernel that computes grad-bias agrees bit for bit.
pub(crate) fn sum_over_images(batch: usize, image_sum: impl Fn(usize) -> f32) -> f32 {
    (0..batch).map(|n| image_sum(n) as f64).sum::<f64>() as f32
}

/// Grad-bias sums per image in per-task scratch, for kernels that read each image's output
/// gradient anyway: each task's slice holds, after its first `offset` floats, one row of
/// `channels` sums per image of the task (tasks take `images_per_task` consecutive images, as
/// [`for_each_image_task`] and [`for_each_task`] split a batch). [`ImageSums::grad_bias`] adds
/// them in [`sum_over_images`]'s order: bit for bit [`conv2d_grad_bias`].
#[derive(Clone, Copy)]
pub(crate) struct ImageSums {
    offset: usize,
    images_per_task: usize,
    channels: usize,
}

impl ImageSums {
    /// The rows of `g`'s batch split into `tasks` tasks, after `offset` floats of each task's
    /// slice; none (zero floats) without `wanted`.
    pub(crate) fn new(g: &ConvGeometry, tasks: usize, offset: usize, wanted: bool) -> Self {
        ImageSums {
            offset,
            images_per_task: g.batch.div_ceil(tasks.max(1)),
            channels: if wanted { g.out_channels } else { 0 },
        }
    }

    /// Floats each task's slice needs: `offset` and the rows.
    pub(crate) fn per_task(&self) -> usize {
        self.offset + self.images_per_task * self.channels
    }

    /// Floats of each task's slice before its rows.
    pub(crate) fn offset(&self) -> usize {
        self.offset
    }

    /// Sums `planes` (channels `c0 ..`, `plane` floats each) of the task's `local`-th image
    /// into its row in the task's slice `st`; nothing when no sums are wanted.
    pub(crate) fn add_planes(
        &self,
        isa: Isa,
        st: &mut [f32],
        local: usize,
        c0: usize,
        planes: &[f32],
        plane: usize,
    ) {
        if self.channels == 0 {
            return;
        }
        let row = &mut st[self.offset + local * self.channels..][..self.channels];
        for (v, p) in row[c0..].iter_mut().zip(planes.chunks_exact(plane)) {
            *v = elementwise::sum(isa, p);
        }
    }

    /// Sums image `n`'s output-gradient planes (all of `g`'s output channels, in `gy`) into the
    /// row of the task's `local`-th image, for a kernel that has just read that image: the
    /// planes come from the caches instead of from memory in a pass of their own.
    pub(crate) fn add_image(
        &self,
        isa: Isa,
        st: &mut [f32],
        local: usize,
        g: &ConvGeometry,
        gy: &[f32],
        n: usize,
    ) {
        let image = g.out_channels * g.out_pixels();
        self.add_planes(isa, st, local, 0, &gy[n * image..][..image], g.out_pixels());
    }

    /// Grad-bias of the batch (`batch` images; `scratch` the tasks' slices, [`Self::per_task`]
    /// floats each).
    pub(crate) fn grad_bias(&self, batch: usize, scratch: &[f32], gb: &mut [f32]) {
        let per_task = self.per_task();
        for (c, v) in gb.iter_mut().enumerate() {
            *v = sum_over_images(batch, |n| {
                let (t, j) = (n / self.images_per_task, n % self.images_per_task);
                scratch[t * per_task + self.offset + j * self.channels + c]
            });
        }
    }
}

/// `gb[c] = Σ gy[·, c, ·, ·]` (overwrites `gb`).
pub fn conv2d_grad_bias(exec: Exec, g: &ConvGeometry, gy: &[f32], gb: &mut [f32]) {
    assert_eq!(gy.len(), g.output_len(), "grad-output length");
    assert_eq!(gb.len(), g.out_channels, "grad-bias length");
    // One add per output element, weighed like a multiply-accumulate.
    let exec = exec.for_work(gy.len() as u64);
    let plane = g.out_pixels();
    let channels = g.out_channels;
    let sum_channel = |c: usize| -> f32 {
        sum_over_images(g.batch, |n| {
            let base = (n * channels + c) * plane;
            elementwise::sum(exec.isa, &gy[base..base + plane])
        })
    };
    if exec.threads > 1 && channels >= 2 * exec.threads {
        gb.par_iter_mut()
            .enumerate()
            .for_each(|(c, o)| *o = sum_channel(c));
    } else {
        for (c, o) in gb.iter_mut().enumerate() {
            *o = sum_channel(c);
        }
    }
}
