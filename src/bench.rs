//! The reference layer set of DESIGN.md (layers A–E × variants std, dw, pw, ds, sp), ready to
//! run forward or as a training step, plus the timing harness and the FMA-peak and
//! memory-bandwidth measurements shared by `sepconv bench` and the criterion benches.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rayon::prelude::*;
use serde::Serialize;

use crate::cost::ConvCost;
use crate::error::{Error, Result};
use crate::geometry::{Conv2dParams, ConvGeometry, Padding};
use crate::kernels::simd::SimdF32;
use crate::kernels::{self, Exec, Workspace};
use crate::memory::alloc_zeros;
use crate::separable::{ConvPair, PairGrads};

/// One layer of the reference set.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct ReferenceLayer {
    /// A–E.
    pub id: char,
    /// Batch size.
    pub batch: usize,
    /// Input channels M.
    pub in_channels: usize,
    /// Output channels N.
    pub out_channels: usize,
    /// Input height = width.
    pub size: usize,
    /// Stride of the 3×3 ops.
    pub stride: usize,
    /// Whether padding is `valid` (layer A) rather than `same`.
    pub valid: bool,
}

/// The reference layer set A–E.
pub const REFERENCE_LAYERS: [ReferenceLayer; 5] = [
    ReferenceLayer {
        id: 'A',
        batch: 1,
        in_channels: 3,
        out_channels: 10,
        size: 15,
        stride: 1,
        valid: true,
    },
    ReferenceLayer {
        id: 'B',
        batch: 8,
        in_channels: 32,
        out_channels: 64,
        size: 112,
        stride: 1,
        valid: false,
    },
    ReferenceLayer {
        id: 'C',
        batch: 8,
        in_channels: 128,
        out_channels: 128,
        size: 56,
        stride: 1,
        valid: false,
    },
    ReferenceLayer {
        id: 'D',
        batch: 8,
        in_channels: 512,
        out_channels: 512,
        size: 14,
        stride: 1,
        valid: false,
    },
    ReferenceLayer {
        id: 'E',
        batch: 8,
        in_channels: 128,
        out_channels: 256,
        size: 56,
        stride: 2,
        valid: false,
    },
];

impl ReferenceLayer {
    /// The layer with this id (case-insensitive).
    pub fn by_id(id: &str) -> Result<Self> {
        REFERENCE_LAYERS
            .iter()
            .find(|l| l.id.to_string().eq_ignore_ascii_case(id.trim()))
            .copied()
            .ok_or_else(|| {
                Error::invalid(format!("unknown reference layer '{id}' (A, B, C, D or E)"))
            })
    }

    /// The same layer with `batch` images (the reference batches are 8, and 1 for layer A).
    pub fn with_batch(self, batch: usize) -> Self {
        ReferenceLayer { batch, ..self }
    }

    fn params(&self) -> Conv2dParams {
        let pad = if self.valid {
            Padding::Valid
        } else {
            Padding::Same
        };
        Conv2dParams::with_padding(pad).stride(self.stride, self.stride)
    }

    fn input(&self) -> [usize; 4] {
        [self.batch, self.in_channels, self.size, self.size]
    }
}

/// A variant of a reference layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Variant {
    /// Standard 3×3 conv M → N (with bias).
    Std,
    /// Depthwise 3×3 on M (no bias).
    Dw,
    /// Pointwise 1×1 M → N on the depthwise output size (with bias).
    Pw,
    /// Depthwise then pointwise (bias on the pointwise).
    Ds,
    /// 3×1 M → R then 1×3 R → N, R = min(M, N) (bias on the second).
    Sp,
}

/// All variants, in report order.
pub const VARIANTS: [Variant; 5] = [
    Variant::Std,
    Variant::Dw,
    Variant::Pw,
    Variant::Ds,
    Variant::Sp,
];

impl fmt::Display for Variant {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Variant::Std => "std",
            Variant::Dw => "dw",
            Variant::Pw => "pw",
            Variant::Ds => "ds",
            Variant::Sp => "sp",
        })
    }
}

impl FromStr for Variant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        VARIANTS
            .iter()
            .find(|v| v.to_string() == s.trim().to_ascii_lowercase())
            .copied()
            .ok_or_else(|| Error::invalid(format!("unknown variant '{s}' (std, dw, pw, ds or sp)")))
    }
}

/// Forward only, or a training step (forward + grad-input + grad-weight + grad-bias).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Pass {
    /// Inference.
    Forward,
    /// Forward and backward.
    Train,
}

impl fmt::Display for Pass {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Pass::Forward => "forward",
            Pass::Train => "train",
        })
    }
}

impl FromStr for Pass {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        match s.trim().to_ascii_lowercase().as_str() {
            "forward" | "fwd" => Ok(Pass::Forward),
            "train" => Ok(Pass::Train),
            _ => Err(Error::invalid(format!(
                "unknown pass '{s}' (forward or train)"
            ))),
        }
    }
}

/// The ops of one variant: one convolution, or a pair.
#[derive(Clone, Copy, Debug)]
enum Ops {
    Single(ConvGeometry),
    Pair(ConvPair),
}

/// A reference layer variant with its buffers allocated, ready to run repeatedly.
pub struct Workload {
    ops: Ops,
    has_bias: bool,
    x: Vec<f32>,
    w1: Vec<f32>,
    w2: Vec<f32>,
    bias: Vec<f32>,
    mid: Vec<f32>,
    y: Vec<f32>,
    gy: Vec<f32>,
    gx: Vec<f32>,
    gw1: Vec<f32>,
    gw2: Vec<f32>,
    gb: Vec<f32>,
    gmid: Vec<f32>,
    ws: Workspace,
}

fn filled(len: usize, seed: u32) -> Result<Vec<f32>> {
    let mut v = alloc_zeros(len, "benchmark buffer")?;
    // A cheap deterministic pattern in [-1, 1): the values do not affect the timing.
    let mut s = seed.wrapping_mul(2_654_435_761).wrapping_add(1);
    for x in &mut v {
        s ^= s << 13;
        s ^= s >> 17;
        s ^= s << 5;
        *x = (s >> 8) as f32 / (1u32 << 23) as f32 - 1.0;
    }
    Ok(v)
}

impl Workload {
    /// Builds `variant` of `layer` with deterministic pseudo-random data.
    pub fn new(layer: &ReferenceLayer, variant: Variant) -> Result<Self> {
        let p = layer.params();
        let (m, n) = (layer.in_channels, layer.out_channels);
        let input = layer.input();
        let (ops, has_bias) = match variant {
            Variant::Std => (
                Ops::Single(ConvGeometry::new(input, [n, m, 3, 3], &p)?),
                true,
            ),
            Variant::Dw => (
                Ops::Single(ConvGeometry::new(input, [m, 1, 3, 3], &p.groups(m))?),
                false,
            ),
            Variant::Pw => {
                let dw = ConvGeometry::new(input, [m, 1, 3, 3], &p.groups(m))?;
                let pw_in = [layer.batch, m, dw.out_h, dw.out_w];
                (
                    Ops::Single(ConvGeometry::new(
                        pw_in,
                        [n, m, 1, 1],
                        &Conv2dParams::default(),
                    )?),
                    true,
                )
            }
            Variant::Ds => (
                Ops::Pair(ConvPair::depthwise_separable(input, 1, n, (3, 3), &p)?),
                true,
            ),
            Variant::Sp => (
                Ops::Pair(ConvPair::spatially_separable(
                    input,
                    m.min(n),
                    n,
                    (3, 3),
                    &p,
                )?),
                true,
            ),
        };
        let (first, second) = match ops {
            Ops::Single(g) => (g, None),
            Ops::Pair(pair) => (pair.first, Some(pair.second)),
        };
        let last = second.unwrap_or(first);
        let mid_len = second.map_or(0, |_| first.output_len());
        Ok(Workload {
            ops,
            has_bias,
            x: filled(first.input_len(), 1)?,
            w1: filled(first.weight_len(), 2)?,
            w2: filled(second.map_or(0, |g| g.weight_len()), 3)?,
            bias: filled(last.out_channels, 4)?,
            mid: alloc_zeros(mid_len, "benchmark buffer")?,
            y: alloc_zeros(last.output_len(), "benchmark buffer")?,
            gy: filled(last.output_len(), 5)?,
            gx: alloc_zeros(first.input_len(), "benchmark buffer")?,
            gw1: alloc_zeros(first.weight_len(), "benchmark buffer")?,
            gw2: alloc_zeros(second.map_or(0, |g| g.weight_len()), "benchmark buffer")?,
            gb: alloc_zeros(last.out_channels, "benchmark buffer")?,
            gmid: alloc_zeros(mid_len, "benchmark buffer")?,
            ws: Workspace::new(),
        })
    }

    /// The workload's cost.
    pub fn cost(&self) -> ConvCost {
        match self.ops {
            Ops::Single(g) => ConvCost::of(&g, self.has_bias),
            Ops::Pair(p) => p.cost(self.has_bias),
        }
    }

    /// Runs one pass.
    pub fn run(&mut self, exec: Exec, pass: Pass) -> Result<()> {
        let bias = self.has_bias.then_some(&self.bias[..]);
        match self.ops {
            Ops::Single(g) => {
                kernels::conv2d_forward(
                    exec,
                    &g,
                    &self.x,
                    &self.w1,
                    bias,
                    &mut self.y,
                    &mut self.ws,
                )?;
                if pass == Pass::Train {
                    kernels::conv2d_backward(
                        exec,
                        &g,
                        &self.x,
                        &self.gy,
                        &self.w1,
                        Some(&mut self.gx),
                        &mut self.gw1,
                        self.has_bias.then_some(&mut self.gb[..]),
                        &mut self.ws,
                    )?;
                }
            }
            Ops::Pair(pair) if pass == Pass::Forward => {
                pair.forward_inference(
                    exec,
                    &self.x,
                    &self.w1,
                    &self.w2,
                    bias,
                    &mut self.y,
                    &mut self.mid,
                    &mut self.ws,
                )?;
            }
            Ops::Pair(pair) => {
                pair.forward(
                    exec,
                    &self.x,
                    &self.w1,
                    &self.w2,
                    bias,
                    &mut self.mid,
                    &mut self.y,
                    &mut self.ws,
                )?;
                {
                    let grads = PairGrads {
                        input: Some(&mut self.gx),
                        first_weight: &mut self.gw1,
                        second_weight: &mut self.gw2,
                        bias: self.has_bias.then_some(&mut self.gb[..]),
                    };
                    pair.backward(
                        exec,
                        &self.x,
                        &self.w1,
                        &self.w2,
                        &self.mid,
                        &self.gy,
                        grads,
                        &mut self.gmid,
                        &mut self.ws,
                    )?;
                }
            }
        }
        Ok(())
    }

    /// Whether [`Workload::run`] runs fused kernels for `pass` ([`ConvPair::runs_fused`]): a
    /// pair's two convolutions in one pass. A single convolution never does.
    pub fn runs_fused(&self, exec: Exec, pass: Pass) -> bool {
        match self.ops {
            Ops::Single(_) => false,
            Ops::Pair(pair) => pair.runs_fused(exec, pass == Pass::Train),
        }
    }

    /// Runs one pass with a pair's convolutions as two layers, each on its own kernels, the
    /// intermediate written to memory and read back: the work [`Workload::run`] does, without
    /// the fusion, whose gain `sepconv bench` reports. A single convolution runs as in
    /// [`Workload::run`].
    pub fn run_unfused(&mut self, exec: Exec, pass: Pass) -> Result<()> {
        let Ops::Pair(pair) = self.ops else {
            return self.run(exec, pass);
        };
        let bias = self.has_bias.then_some(&self.bias[..]);
        let (x, w1, w2) = (&self.x, &self.w1, &self.w2);
        pair.forward_as_two_layers(
            exec,
            x,
            w1,
            w2,
            bias,
            &mut self.mid,
            &mut self.y,
            &mut self.ws,
        )?;
        if pass == Pass::Train {
            let grads = PairGrads {
                input: Some(&mut self.gx),
                first_weight: &mut self.gw1,
                second_weight: &mut self.gw2,
                bias: self.has_bias.then_some(&mut self.gb[..]),
            };
            let (mid, gy) = (&self.mid, &self.gy);
            pair.backward_as_two_layers(
                exec,
                x,
                w1,
                w2,
                mid,
                gy,
                grads,
                &mut self.gmid,
                &mut self.ws,
            )?;
        }
        Ok(())
    }
}

/// Timing summary of repeated runs.
#[derive(Clone, Copy, Debug, Serialize)]
pub struct Timing {
    /// Median in milliseconds.
    pub median_ms: f64,
    /// Minimum in milliseconds (the headline on a shared machine: least disturbed).
    pub min_ms: f64,
    /// Timed repetitions.
    pub reps: usize,
}

/// Times `f`: `warmup` untimed runs, then at least `min_reps` timed runs, more for fast cases
/// so each case gets about `target` of samples (at most 200 runs). Returns the run times in
/// ms, in the order they were taken ([`Timing::of`] sums them up).
pub fn time_samples(
    warmup: usize,
    min_reps: usize,
    target: Duration,
    mut f: impl FnMut() -> Result<()>,
) -> Result<Vec<f64>> {
    for _ in 0..warmup {
        f()?;
    }
    let t0 = Instant::now();
    f()?;
    let probe = t0.elapsed().as_secs_f64().max(1e-9);
    let reps = min_reps.max(((target.as_secs_f64() / probe).ceil() as usize).min(200));
    let mut samples = Vec::with_capacity(reps);
    for _ in 0..reps {
        let t = Instant::now();
        f()?;
        samples.push(t.elapsed().as_secs_f64() * 1e3);
    }
    Ok(samples)
}

impl Timing {
    /// The median and minimum of run times in ms (at least one).
    pub fn of(mut samples: Vec<f64>) -> Timing {
        assert!(!samples.is_empty(), "no run times");
        samples.sort_by(f64::total_cmp);
        let reps = samples.len();
        let median = if reps % 2 == 1 {
            samples[reps / 2]
        } else {
            0.5 * (samples[reps / 2 - 1] + samples[reps / 2])
        };
        Timing {
            median_ms: median,
            min_ms: samples[0],
            reps,
        }
    }
}

/// Measures this machine's FMA throughput in GMAC/s on `exec.threads()` threads of the current
/// rayon pool: independent vector FMA chains, enough to cover the FMA latency.
pub fn fma_peak_gmacs(exec: Exec) -> f64 {
    const ITERS: usize = 20_000_000;
    let run = || {
        let mut sink = 0.0f32;
        fma_loop(exec.isa(), ITERS / exec.isa().lanes() * 4, &mut sink);
        std::hint::black_box(sink);
    };
    // Warm up (clock ramp), then take the best of three.
    let threads = exec.threads();
    let once = || {
        let t = Instant::now();
        rayon::scope(|s| {
            for _ in 0..threads {
                s.spawn(|_| run());
            }
        });
        t.elapsed().as_secs_f64()
    };
    once();
    let best = (0..3).map(|_| once()).fold(f64::INFINITY, f64::min);
    let macs_per_thread = (ITERS / exec.isa().lanes() * 4) * CHAINS * exec.isa().lanes();
    (threads * macs_per_thread) as f64 / best / 1e9
}

/// What a core-to-core round trip of `ns` nanoseconds ([`core_to_core_round_trip_ns`]) says
/// about where the threads run, when that makes timings incomparable with a usual run: under
/// 40 ns the two CPUs are hyperthreads of one core (they share its FMA units: the measured peak
/// halves, and the bench's floors with it), over 200 ns they share no cache (different dies or
/// sockets: kernels that split an image over the threads slow down) or another process holds
/// one of the CPUs (a build running beside the bench read 516–788 ns). On this project's VM the
/// usual state reads 53–90 ns, the shared core 29, the split dies 315–370. `None` in between.
pub fn round_trip_note(ns: f64) -> Option<&'static str> {
    if ns < 40.0 {
        Some(
            "the threads run on hyperthreads of one core: peak and floors are halved, times not comparable with other runs",
        )
    } else if ns > 200.0 {
        Some(
            "the threads share no cache (different dies or sockets), or another process holds a CPU: kernels that split images over the threads are slower than usual",
        )
    } else {
        None
    }
}

/// One cache line's round trip between two threads on two different CPUs, in nanoseconds: the
/// best of 5 trials of 20 000 round trips (one thread writes a counter, the other answers).
/// It is what a kernel pays when one thread reads what another just wrote, as the kernels that
/// split an image over the threads do between their steps. On this VM it reads 57–81 ns while
/// the two vCPUs share an L3 and 330–340 ns in spells where they do not; a batch-1 Winograd
/// forward took 2.50 ms in the first case and 4.6 ms in the second, while kernels whose threads
/// keep to their own images hardly changed. `None` with fewer than two CPUs to run on (Linux:
/// the process's affinity mask; the threads are pinned to its first two CPUs).
pub fn core_to_core_round_trip_ns() -> Option<f64> {
    const TRIPS: u32 = 20_000;
    let cpus = allowed_cpus();
    if cpus.len() < 2 {
        return None;
    }
    #[repr(align(64))]
    struct Line(AtomicU32);
    let line = Line(AtomicU32::new(0));
    // Waits for `value`, yielding now and then so that two threads on one CPU still progress.
    let wait_for = |value: u32| {
        let mut spins = 0u32;
        while line.0.load(Ordering::Acquire) != value {
            spins += 1;
            if spins.is_multiple_of(1 << 14) {
                std::thread::yield_now();
            } else {
                std::hint::spin_loop();
            }
        }
    };
    let trial = || {
        line.0.store(0, Ordering::Release);
        std::thread::scope(|s| {
            s.spawn(|| {
                pin_to_cpu(cpus[1]);
                for i in 0..TRIPS {
                    wait_for(2 * i + 1);
                    line.0.store(2 * i + 2, Ordering::Release);
                }
            });
            s.spawn(|| {
                pin_to_cpu(cpus[0]);
                let t = Instant::now();
                for i in 0..TRIPS {
                    line.0.store(2 * i + 1, Ordering::Release);
                    wait_for(2 * i + 2);
                }
                t.elapsed().as_secs_f64() * 1e9 / f64::from(TRIPS)
            })
            .join()
            .ok()
        })
    };
    (0..5).filter_map(|_| trial()).reduce(f64::min)
}

/// The CPUs this process may run on (Linux), or as many as it has threads otherwise, unpinned.
fn allowed_cpus() -> Vec<usize> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is a valid empty set, filled in by the call.
        let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::cpu_set_t>();
        // SAFETY: `set` is a live cpu_set_t of `size` bytes.
        if unsafe { libc::sched_getaffinity(0, size, &mut set) } == 0 {
            return (0..libc::CPU_SETSIZE as usize)
                // SAFETY: cpu < CPU_SETSIZE, inside `set`.
                .filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) })
                .collect();
        }
    }
    (0..std::thread::available_parallelism().map_or(1, |n| n.get())).collect()
}

/// Pins the calling thread to `cpu` (Linux; elsewhere, and if the call fails, nothing).
fn pin_to_cpu(cpu: usize) {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: a zeroed cpu_set_t is a valid empty set; cpu < CPU_SETSIZE (from
        // allowed_cpus); the call reads `size` bytes of it.
        unsafe {
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = cpu;
}

/// This machine's streaming memory bandwidth, measured: what a pass that must move its
/// tensors through memory can take at best (a layer whose multiplications take less time than
/// that is memory-bound, and its GMAC/s say little).
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct MemoryBandwidth {
    /// GB/s read (vector loads summed into registers).
    pub read_gbs: f64,
    /// GB/s written (vector stores; each line is also read for ownership, not counted).
    pub write_gbs: f64,
}

/// Bytes of the buffer [`memory_bandwidth`] streams: 8× this machine's 32 MiB L3, so nearly
/// every access goes to memory.
const BANDWIDTH_BYTES: usize = 256 << 20;

/// Measures [`MemoryBandwidth`] on `exec.threads()` threads of the current rayon pool, each
/// streaming its own part of a 256 MiB buffer: the best of three reads and of three writes
/// after one of each to warm up. Fails only when the buffer cannot be allocated.
pub fn memory_bandwidth(exec: Exec) -> Result<MemoryBandwidth> {
    let mut buf = alloc_zeros(BANDWIDTH_BYTES / 4, "memory-bandwidth buffer")?;
    let part = buf.len().div_ceil(exec.threads().max(1));
    let best_gbs = |f: &mut dyn FnMut()| {
        f();
        let best = (0..3)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed().as_secs_f64()
            })
            .fold(f64::INFINITY, f64::min);
        BANDWIDTH_BYTES as f64 / best / 1e9
    };
    let read_gbs = best_gbs(&mut || {
        let total: f32 = buf
            .par_chunks(part)
            .map(|c| {
                let mut sum = 0.0;
                sum_vectors(exec.isa(), c, &mut sum);
                sum
            })
            .sum();
        std::hint::black_box(total);
    });
    let write_gbs = best_gbs(&mut || {
        buf.par_chunks_mut(part)
            .for_each(|c| fill_vectors(exec.isa(), c, 1.0));
        std::hint::black_box(&mut buf);
    });
    Ok(MemoryBandwidth {
        read_gbs,
        write_gbs,
    })
}

crate::simd_dispatch!(fn sum_vectors => sum_vectors_kernel(x: &[f32], sum: &mut f32));

/// `sum` = the sum of `x`'s whole blocks of 8 vectors (a shorter tail is left out: the
/// measurement reads whole blocks), with an accumulator per vector of the block, so loads, not
/// the adds' latency, set the pace.
#[inline(always)]
unsafe fn sum_vectors_kernel<S: SimdF32>(x: &[f32], sum: &mut f32) {
    const ACC: usize = 8;
    let step = ACC * S::LANES;
    unsafe {
        let mut acc = [S::zero(); ACC];
        for block in x.chunks_exact(step) {
            for (k, a) in acc.iter_mut().enumerate() {
                *a = a.add(S::load(block.as_ptr().add(k * S::LANES)));
            }
        }
        *sum = acc.iter().fold(S::zero(), |t, &a| t.add(a)).reduce_sum();
    }
}

crate::simd_dispatch!(fn fill_vectors => fill_vectors_kernel(x: &mut [f32], v: f32));

/// Stores `v` in every whole vector of `x`.
#[inline(always)]
unsafe fn fill_vectors_kernel<S: SimdF32>(x: &mut [f32], v: f32) {
    unsafe {
        let splat = S::splat(v);
        for chunk in x.chunks_exact_mut(S::LANES) {
            splat.store(chunk.as_mut_ptr());
        }
    }
}

/// Independent accumulators in the FMA loop: latency 4 × 2 pipes needs at least 8 in flight.
const CHAINS: usize = 12;

crate::simd_dispatch!(fn fma_loop => fma_loop_kernel(iters: usize, sink: &mut f32));

#[inline(always)]
unsafe fn fma_loop_kernel<S: SimdF32>(iters: usize, sink: &mut f32) {
    unsafe {
        let mut acc = [S::splat(0.5); CHAINS];
        let a = S::splat(std::hint::black_box(0.999_999));
        let b = S::splat(std::hint::black_box(1e-7));
        for _ in 0..iters {
            for x in acc.iter_mut() {
                *x = S::mul_add(*x, a, b);
            }
        }
        let mut total = S::zero();
        for x in acc {
            total = total.add(x);
        }
        *sink = total.reduce_sum();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::simd::Isa;

    /// The unfused pair computes what the fused passes do (so `sepconv bench` compares the same
    /// work): the output, and after a training step every gradient, of the depthwise-separable
    /// variant of layer A on four images, two threads splitting every call, on each instruction
    /// set, where the fused kernels run (inference always, training on AVX-512's row kernel).
    #[test]
    fn unfused_runs_compute_what_the_fused_ones_do() {
        let layer = ReferenceLayer::by_id("A").unwrap().with_batch(4);
        for isa in Isa::available() {
            let exec = Exec::splitting_every_call(2, isa);
            for pass in [Pass::Forward, Pass::Train] {
                let mut w = Workload::new(&layer, Variant::Ds).unwrap();
                let fused = pass == Pass::Forward || isa == Isa::Avx512;
                assert_eq!(w.runs_fused(exec, pass), fused, "{isa} {pass}");
                w.run(exec, pass).unwrap();
                let outputs =
                    |w: &Workload| [&w.y, &w.gx, &w.gw1, &w.gw2, &w.gb].map(|v| v.to_vec());
                let want = outputs(&w);
                for v in [&mut w.y, &mut w.gx, &mut w.gw1, &mut w.gw2, &mut w.gb] {
                    v.fill(f32::NAN);
                }
                w.run_unfused(exec, pass).unwrap();
                let got = outputs(&w);
                let names = ["y", "gx", "gw1", "gw2", "gb"];
                let checked = if pass == Pass::Train { 5 } else { 1 };
                for ((name, got), want) in names.iter().zip(&got).zip(&want).take(checked) {
                    let scale = want.iter().fold(1f32, |m, v| m.max(v.abs()));
                    for (i, (a, b)) in got.iter().zip(want).enumerate() {
                        assert!(
                            (a - b).abs() <= 1e-4 * scale,
                            "{isa} {pass} {name}[{i}] = {a}, fused {b}"
                        );
                    }
                }
            }
        }
        let sp = Workload::new(&layer, Variant::Sp).unwrap();
        assert!(!sp.runs_fused(Exec::new(2), Pass::Forward));
    }

    /// The median of an odd and an even count of runs, and the minimum, whatever their order.
    #[test]
    fn timing_of_runs() {
        let t = Timing::of(vec![3.0, 1.0, 2.0]);
        assert_eq!((t.min_ms, t.median_ms, t.reps), (1.0, 2.0, 3));
        let t = Timing::of(vec![4.0, 1.0, 3.0, 2.0]);
        assert_eq!((t.min_ms, t.median_ms, t.reps), (1.0, 2.5, 4));
    }

    #[test]
    fn round_trip_notes_flag_a_shared_core_and_split_dies() {
        assert!(round_trip_note(29.0).unwrap().contains("one core"));
        assert_eq!(round_trip_note(63.0), None);
        assert!(round_trip_note(326.0).unwrap().contains("no cache"));
    }

    #[test]
    fn bandwidth_kernels_cover_the_whole_vectors() {
        for isa in Isa::available() {
            let lanes = isa.lanes();
            // Eight accumulators' worth of vectors twice, then one vector and a partial one
            // that the 8-vector blocks leave out: small integers, summed exactly in f32.
            let len = 16 * lanes + lanes + 3;
            let x: Vec<f32> = (0..len).map(|i| (i % 7) as f32).collect();
            let mut sum = 0.0;
            sum_vectors(isa, &x, &mut sum);
            let blocks = len / (8 * lanes) * 8 * lanes;
            assert_eq!(sum, x[..blocks].iter().sum::<f32>(), "{isa}");

            let mut y = vec![0.0f32; len];
            fill_vectors(isa, &mut y, 2.5);
            let whole = len / lanes * lanes;
            assert!(y[..whole].iter().all(|&v| v == 2.5), "{isa}");
            assert!(y[whole..].iter().all(|&v| v == 0.0), "{isa}");
        }
    }

    #[test]
    fn memory_bandwidth_is_a_rate() {
        let b = memory_bandwidth(Exec::new(2)).unwrap();
        for gbs in [b.read_gbs, b.write_gbs] {
            // Between a floppy disk and anything a CPU socket has reached.
            assert!(gbs.is_finite() && gbs > 0.1 && gbs < 10_000.0, "{b:?}");
        }
    }

    #[test]
    fn core_to_core_round_trip_is_a_latency() {
        let cpus = allowed_cpus();
        assert!(!cpus.is_empty());
        match core_to_core_round_trip_ns() {
            // Above a few cycles (the other thread must answer), below a scheduler time slice
            // per trip (each trip waits on the other thread).
            Some(ns) => assert!(cpus.len() >= 2 && ns > 5.0 && ns < 100_000.0, "{ns} ns"),
            None => assert!(cpus.len() < 2),
        }
    }
}
