//! Layers with forward, backward, parameters and gradients, built on the engine's kernels, and
//! the sequential [`Network`] that runs them.
//!
//! Activations are NCHW (or `[batch, features]` after Flatten). The network owns one buffer per
//! activation and per activation gradient and reuses them from step to step, so a training step
//! allocates nothing once the first batch has run.

mod conv;
mod elementwise;
mod linear;
mod norm;
mod pool;
pub mod spec;

pub use conv::{Conv2d, SeparableConv2d};
pub use elementwise::{Dropout, Relu};
pub use linear::{Flatten, Linear};
pub use norm::BatchNorm2d;
pub use pool::{GlobalAvgPool, MaxPool2d};
pub use spec::{LayerSpec, ModelSpec};

use crate::error::{Error, Result};
use crate::kernels::{Exec, Workspace};
use crate::memory::grow_zeroed;
use crate::rng::Rng;

/// A trainable tensor and its gradient.
#[derive(Clone, Debug)]
pub struct Param {
    /// Name within its layer (`weight`, `bias`, …).
    pub name: &'static str,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub value: Vec<f32>,
    /// ∂L/∂value of the last backward pass.
    pub grad: Vec<f32>,
}

impl Param {
    /// A parameter of `shape` filled by `init`.
    pub fn new(name: &'static str, shape: &[usize], mut init: impl FnMut() -> f32) -> Self {
        let n = shape.iter().product();
        Param {
            name,
            shape: shape.to_vec(),
            value: (0..n).map(|_| init()).collect(),
            grad: vec![0.0; n],
        }
    }
}

/// A non-trainable tensor a layer keeps (BatchNorm running statistics).
#[derive(Clone, Debug)]
pub struct Buffer {
    /// Name within its layer.
    pub name: &'static str,
    /// Shape.
    pub shape: Vec<usize>,
    /// Values.
    pub value: Vec<f32>,
}

/// What a layer's forward and backward may use.
pub struct Ctx<'a> {
    /// Threads and instruction set.
    pub exec: Exec,
    /// Kernel scratch.
    pub ws: &'a mut Workspace,
    /// Training mode (batch statistics, dropout) or evaluation.
    pub train: bool,
    /// Randomness (dropout masks).
    pub rng: &'a mut Rng,
}

/// Multiply-accumulates of one layer per image (conv and linear; others count 0, as fvcore does).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct LayerMacs {
    /// Forward MACs per image (nominal).
    pub forward: u64,
    /// Grad-input MACs per image (0 when the layer is first and needs no input gradient).
    pub grad_input: u64,
    /// Grad-weight MACs per image.
    pub grad_weight: u64,
}

impl LayerMacs {
    /// MACs of a training step (forward + both backward products).
    pub fn train(&self) -> u64 {
        self.forward + self.grad_input + self.grad_weight
    }
}

/// One layer of a network.
pub trait Module: Send {
    /// The spec type name (`conv2d`, `relu`, …).
    fn kind(&self) -> &'static str;
    /// Per-image output shape.
    fn out_shape(&self) -> &[usize];
    /// `y = layer(x)` for a batch of `batch` images.
    fn forward(&mut self, ctx: &mut Ctx, batch: usize, x: &[f32], y: &mut [f32]) -> Result<()>;
    /// Sets parameter gradients from `gy` and, if `gx` is given, writes ∂L/∂x into it.
    fn backward(
        &mut self,
        ctx: &mut Ctx,
        batch: usize,
        x: &[f32],
        y: &[f32],
        gy: &[f32],
        gx: Option<&mut [f32]>,
    ) -> Result<()>;
    /// Trainable parameters.
    fn params(&mut self) -> Vec<&mut Param> {
        Vec::new()
    }
    /// Non-trainable state saved in checkpoints.
    fn buffers(&mut self) -> Vec<&mut Buffer> {
        Vec::new()
    }
    /// MACs per image.
    fn macs(&self) -> LayerMacs {
        LayerMacs::default()
    }
    /// Takes over a ReLU that follows this layer (returns whether it did; the network then
    /// skips the ReLU layer).
    fn fuse_relu(&mut self) -> bool {
        false
    }
    /// Takes over a 2 × 2 stride-2 max pool that follows the ReLU this layer took over (returns
    /// whether it did; the network then skips the pool, and this layer's output is the pooled
    /// one).
    fn fuse_maxpool2x2(&mut self) -> bool {
        false
    }
    /// Whether this layer is a 2 × 2 stride-2 max pool without padding.
    fn is_maxpool2x2(&self) -> bool {
        false
    }
    /// Whether the output is the input's memory under another shape (Flatten): the network
    /// then gives the layer its input's buffer and runs nothing, forward or backward.
    fn is_view(&self) -> bool {
        false
    }
}

/// PyTorch's default initialization of conv and linear layers: weights
/// kaiming-uniform(a = √5), i.e. U(−1/√fan_in, 1/√fan_in), and the same bound for the bias.
pub(crate) fn default_init(rng: &mut Rng, fan_in: usize) -> impl FnMut() -> f32 + '_ {
    let bound = 1.0 / (fan_in.max(1) as f32).sqrt();
    move || rng.uniform(-bound, bound)
}

/// The per-image shape as [C, H, W], or an error for a flat input.
pub(crate) fn chw(in_shape: &[usize]) -> Result<[usize; 3]> {
    match in_shape {
        [c, h, w] => Ok([*c, *h, *w]),
        _ => Err(Error::geometry(format!(
            "expects a [channels, height, width] input, got {in_shape:?} (is there a flatten before it?)"
        ))),
    }
}

/// Runs `f(plane_index, plane)` over the `len`-element planes of `data`, one run of planes per
/// thread of `exec` ([`plane_runs`]).
pub(crate) fn par_planes(
    exec: Exec,
    data: &mut [f32],
    len: usize,
    f: impl Fn(usize, &mut [f32]) + Sync + Send,
) {
    plane_runs::<u8>(
        exec,
        data,
        len,
        Side::none(),
        Side::none(),
        |first, run, _, _| {
            for (k, p) in run.chunks_exact_mut(len).enumerate() {
                f(first + k, p)
            }
        },
    );
}

/// A buffer split alongside the planes of [`plane_runs`]: `len` elements per plane of `data`
/// (a pool's argmax), or per task (scratch).
pub(crate) struct Side<'a, T> {
    data: &'a mut [T],
    len: usize,
}

impl<'a, T> Side<'a, T> {
    /// `len` elements of `data` per plane or task.
    pub(crate) fn new(data: &'a mut [T], len: usize) -> Self {
        Side { data, len }
    }
}

impl<T> Side<'static, T> {
    /// No buffer.
    pub(crate) fn none() -> Self {
        Side {
            data: &mut [],
            len: 0,
        }
    }
}

/// How the element-wise layers split their work, as `kernels::for_each_task` splits the
/// kernels': `data`'s `len`-element planes in one run of consecutive planes per thread of
/// `exec`, each run with its planes' elements of `side` and its own `scratch` piece;
/// `f(first_plane, planes, side, scratch)`. With one thread, or one plane, the run goes on the
/// calling thread: an `Exec` of one thread never reaches for the pool (from outside one, rayon
/// would start its global pool and wait on it), and one of N threads splits N ways whatever pool
/// it runs in.
pub(crate) fn plane_runs<T: Send>(
    exec: Exec,
    data: &mut [f32],
    len: usize,
    side: Side<'_, T>,
    scratch: Side<'_, f32>,
    f: impl Fn(usize, &mut [f32], &mut [T], &mut [f32]) + Sync + Send,
) {
    let planes = data.len().checked_div(len).unwrap_or(0);
    if planes == 0 {
        return;
    }
    let per_task = planes.div_ceil(exec.threads().clamp(1, planes));
    let tasks = planes.div_ceil(per_task);
    assert!(
        side.data.len() >= planes * side.len,
        "side buffer too short"
    );
    assert!(
        scratch.data.len() >= tasks * scratch.len,
        "scratch too short"
    );
    let runs = Runs {
        per_task,
        len,
        side_len: side.len,
        scratch_len: scratch.len,
        f: &f,
    };
    runs.split(tasks, 0, &mut data[..planes * len], side.data, scratch.data);
}

/// [`plane_runs`]'s split, halving the tasks (and the buffers) until one is left.
struct Runs<'f, F> {
    per_task: usize,
    len: usize,
    side_len: usize,
    scratch_len: usize,
    f: &'f F,
}

impl<F> Runs<'_, F> {
    fn split<T: Send>(
        &self,
        tasks: usize,
        first: usize,
        data: &mut [f32],
        side: &mut [T],
        scratch: &mut [f32],
    ) where
        F: Fn(usize, &mut [f32], &mut [T], &mut [f32]) + Sync + Send,
    {
        let planes = data.len() / self.len;
        if tasks <= 1 {
            let side = &mut side[..planes * self.side_len];
            (self.f)(first, data, side, &mut scratch[..self.scratch_len]);
            return;
        }
        let left = tasks / 2;
        let at = left * self.per_task;
        let (d1, d2) = data.split_at_mut(at * self.len);
        let (s1, s2) = side.split_at_mut(at * self.side_len);
        let (c1, c2) = scratch.split_at_mut(left * self.scratch_len);
        rayon::join(
            || self.split(left, first, d1, s1, c1),
            || self.split(tasks - left, first + at, d2, s2, c2),
        );
    }
}

/// A layer with its name (from the spec, or `layer{i}`).
pub struct NamedLayer {
    /// Unique name, used for checkpoint tensor names and `--layer`.
    pub name: String,
    /// The layer.
    pub module: Box<dyn Module>,
}

/// A sequential network.
pub struct Network {
    spec: ModelSpec,
    layers: Vec<NamedLayer>,
    /// Per-image shapes: `shapes[0]` is the input, `shapes[i + 1]` layer i's output.
    shapes: Vec<Vec<usize>>,
    acts: Vec<Vec<f32>>,
    grads: Vec<Vec<f32>>,
    ws: Workspace,
    param_count: usize,
    /// Seconds spent per layer in forward and backward since the last [`Network::take_timings`].
    timings: Vec<(f64, f64)>,
    /// The layer each layer runs inside: itself, or for a layer fused into an earlier one (a
    /// ReLU after a BatchNorm, a 2 × 2 max pool after that ReLU) the first layer of its group.
    head: Vec<usize>,
    /// Layers that only reshape (Flatten): their output is their input's buffer.
    views: Vec<bool>,
    /// The last layer of the group each layer starts (itself unless layers are fused into it):
    /// the layer writes that layer's output.
    group_end: Vec<usize>,
    /// The activation (and gradient) buffer of each layer boundary: a fused layer's or a
    /// view's output is its input's buffer.
    buffer: Vec<usize>,
}

impl Network {
    /// Builds a network from its spec, initializing parameters from `seed`.
    pub fn new(spec: &ModelSpec, seed: u64) -> Result<Self> {
        let mut rng = Rng::new(seed);
        let mut shape = spec.input.clone();
        let mut shapes = vec![shape.clone()];
        let mut layers = Vec::new();
        for (i, entry) in spec.layers.iter().enumerate() {
            let name = entry.name.clone().unwrap_or_else(|| format!("layer{i}"));
            let module = entry.layer.build(&shape, i == 0, &mut rng).map_err(|e| {
                Error::invalid(format!(
                    "{}: layer {i} '{name}' ({}): {e}",
                    spec.origin,
                    entry.layer.kind()
                ))
            })?;
            shape = module.out_shape().to_vec();
            shapes.push(shape.clone());
            layers.push(NamedLayer { name, module });
        }
        let n = layers.len();
        // A ReLU right after a layer that can absorb it (BatchNorm) runs inside that layer;
        // its own activation buffer is then the previous one.
        // And a 2 × 2 max pool right after such a ReLU runs inside the same layer (BatchNorm,
        // ReLU and pool in one pass over each plane). The layer a group starts with writes the
        // group's last output.
        let mut head: Vec<usize> = (0..n).collect();
        let mut group_end: Vec<usize> = (0..n).collect();
        for i in 1..n {
            if head[i - 1] == i - 1
                && layers[i].module.kind() == "relu"
                && layers[i - 1].module.fuse_relu()
            {
                head[i] = i - 1;
                group_end[i - 1] = i;
            } else if i >= 2
                && head[i - 1] == i - 2
                && group_end[i - 2] == i - 1
                && layers[i].module.is_maxpool2x2()
                && layers[i - 2].module.fuse_maxpool2x2()
            {
                head[i] = i - 2;
                group_end[i - 2] = i;
            }
        }
        let fused = |i: usize| head[i] != i;
        // A reshape shares its input's buffer: Flatten's copies, forward and backward, were 2–3%
        // of the MNIST ds network's training step.
        let views: Vec<bool> = layers.iter().map(|l| l.module.is_view()).collect();
        let mut buffer = vec![0; n + 1];
        for i in 0..n {
            buffer[i + 1] = if fused(i) || views[i] {
                buffer[i]
            } else {
                i + 1
            };
        }
        let param_count = layers
            .iter_mut()
            .flat_map(|l| l.module.params())
            .map(|p| p.value.len())
            .sum();
        Ok(Network {
            spec: spec.clone(),
            layers,
            shapes,
            acts: vec![Vec::new(); n + 1],
            grads: vec![Vec::new(); n + 1],
            ws: Workspace::new(),
            param_count,
            timings: vec![(0.0, 0.0); n],
            head,
            views,
            group_end,
            buffer,
        })
    }

    /// The spec the network was built from.
    pub fn spec(&self) -> &ModelSpec {
        &self.spec
    }

    /// The layers.
    pub fn layers(&self) -> &[NamedLayer] {
        &self.layers
    }

    /// The layers, mutable (for loading state).
    pub fn layers_mut(&mut self) -> &mut [NamedLayer] {
        &mut self.layers
    }

    /// Per-image shapes: input, then each layer's output.
    pub fn shapes(&self) -> &[Vec<usize>] {
        &self.shapes
    }

    /// Elements of one input image.
    pub fn input_len(&self) -> usize {
        self.shapes[0].iter().product()
    }

    /// Elements of one output (number of classes for a classifier).
    pub fn output_len(&self) -> usize {
        self.shapes[self.layers.len()].iter().product()
    }

    /// Trainable parameter count.
    pub fn param_count(&self) -> usize {
        self.param_count
    }

    /// MACs per image: forward and training step (forward + grad-input + grad-weight).
    pub fn macs(&self) -> LayerMacs {
        self.layers.iter().fold(LayerMacs::default(), |acc, l| {
            let m = l.module.macs();
            LayerMacs {
                forward: acc.forward + m.forward,
                grad_input: acc.grad_input + m.grad_input,
                grad_weight: acc.grad_weight + m.grad_weight,
            }
        })
    }

    /// Runs the network on `batch` images (`x` holds `batch × input_len` values) and returns
    /// the outputs (`batch × output_len`).
    pub fn forward(
        &mut self,
        exec: Exec,
        x: &[f32],
        batch: usize,
        train: bool,
        rng: &mut Rng,
    ) -> Result<&[f32]> {
        assert_eq!(x.len(), batch * self.input_len(), "input batch length");
        resize(&mut self.acts[0], x.len())?;
        self.acts[0].copy_from_slice(x);
        let mut ctx = Ctx {
            exec,
            ws: &mut self.ws,
            train,
            rng,
        };
        for (i, layer) in self.layers.iter_mut().enumerate() {
            if self.head[i] != i || self.views[i] {
                continue;
            }
            // The output buffer is i + 1 and the input buffer is at most i.
            let (done, rest) = self.acts.split_at_mut(i + 1);
            let out = &mut rest[0];
            let last = self.group_end[i];
            resize(out, batch * self.shapes[last + 1].iter().product::<usize>())?;
            let t = std::time::Instant::now();
            layer
                .module
                .forward(&mut ctx, batch, &done[self.buffer[i]], out)?;
            self.timings[i].0 += t.elapsed().as_secs_f64();
        }
        Ok(&self.acts[self.buffer[self.layers.len()]])
    }

    /// Back-propagates `grad_out` (∂L/∂output of the last forward) through every layer, setting
    /// all parameter gradients. The input gradient is not computed.
    pub fn backward(
        &mut self,
        exec: Exec,
        grad_out: &[f32],
        batch: usize,
        rng: &mut Rng,
    ) -> Result<()> {
        let n = self.layers.len();
        let last = self.buffer[n];
        resize(&mut self.grads[last], grad_out.len())?;
        self.grads[last].copy_from_slice(grad_out);
        let mut ctx = Ctx {
            exec,
            ws: &mut self.ws,
            train: true,
            rng,
        };
        for i in (0..n).rev() {
            if self.head[i] != i || self.views[i] {
                continue;
            }
            // gy lives in buffer i + 1 (never shared with a lower boundary: the next layer up,
            // if fused, wrote into it), gx goes to the input's buffer.
            let (inb, outb) = (self.buffer[i], self.buffer[i + 1]);
            let (lower, upper) = self.grads.split_at_mut(outb);
            let gx = if i > 0 {
                resize(
                    &mut lower[inb],
                    batch * self.shapes[i].iter().product::<usize>(),
                )?;
                Some(&mut lower[inb][..])
            } else {
                None
            };
            let t = std::time::Instant::now();
            self.layers[i].module.backward(
                &mut ctx,
                batch,
                &self.acts[inb],
                &self.acts[outb],
                &upper[0],
                gx,
            )?;
            self.timings[i].1 += t.elapsed().as_secs_f64();
        }
        Ok(())
    }

    /// Whether layer `i` runs inside an earlier layer (a ReLU fused into a BatchNorm, a 2 × 2
    /// max pool after that ReLU).
    pub fn is_fused(&self, i: usize) -> bool {
        self.head[i] != i
    }

    /// The layer that layer `i` runs inside, if it is fused into one (the first layer of its
    /// group).
    pub fn runs_inside(&self, i: usize) -> Option<usize> {
        self.is_fused(i).then_some(self.head[i])
    }

    /// Whether layer `i` is a view of its input (Flatten): it shares the input's buffer and
    /// runs nothing.
    pub fn is_view(&self, i: usize) -> bool {
        self.views[i]
    }

    /// Seconds spent in each layer's forward and backward since the last call (then reset).
    pub fn take_timings(&mut self) -> Vec<(f64, f64)> {
        let n = self.timings.len();
        std::mem::replace(&mut self.timings, vec![(0.0, 0.0); n])
    }

    /// Every parameter and buffer by checkpoint name (`{layer}.{name}`).
    pub fn state(&mut self) -> Result<std::collections::HashMap<String, crate::tensor::Tensor>> {
        let mut out = std::collections::HashMap::new();
        for layer in &mut self.layers {
            let name = &layer.name;
            for p in layer.module.params() {
                out.insert(
                    format!("{name}.{}", p.name),
                    crate::tensor::Tensor::new(&p.shape, p.value.clone())?,
                );
            }
            for b in layer.module.buffers() {
                out.insert(
                    format!("{name}.{}", b.name),
                    crate::tensor::Tensor::new(&b.shape, b.value.clone())?,
                );
            }
        }
        Ok(out)
    }

    /// Loads every parameter and buffer from named tensors; the error says which tensor is
    /// missing or has the wrong shape.
    pub fn load_state(
        &mut self,
        state: &std::collections::HashMap<String, crate::tensor::Tensor>,
    ) -> std::result::Result<(), String> {
        fn copy(
            state: &std::collections::HashMap<String, crate::tensor::Tensor>,
            key: &str,
            shape: &[usize],
            dst: &mut [f32],
        ) -> std::result::Result<(), String> {
            let t = state
                .get(key)
                .ok_or_else(|| format!("missing tensor '{key}'"))?;
            if t.shape() != shape {
                return Err(format!(
                    "tensor '{key}' has shape {:?}, the model needs {shape:?}",
                    t.shape()
                ));
            }
            dst.copy_from_slice(t.data());
            Ok(())
        }
        for layer in &mut self.layers {
            let name = &layer.name;
            for p in layer.module.params() {
                copy(state, &format!("{name}.{}", p.name), &p.shape, &mut p.value)?;
            }
            for b in layer.module.buffers() {
                copy(state, &format!("{name}.{}", b.name), &b.shape, &mut b.value)?;
            }
        }
        Ok(())
    }

    /// Every parameter, in a fixed order (layer order, then each layer's own order).
    pub fn params_mut(&mut self) -> Vec<(&str, &mut Param)> {
        self.layers
            .iter_mut()
            .flat_map(|l| {
                let name = l.name.as_str();
                l.module.params().into_iter().map(move |p| (name, p))
            })
            .collect()
    }
}

/// Resizes an activation buffer, reporting allocation failure as an error.
fn resize(v: &mut Vec<f32>, len: usize) -> Result<()> {
    v.truncate(len);
    grow_zeroed(v, len, "an activation buffer")
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Each run of `plane_runs` as (first plane, planes, side elements, scratch floats, whether
    /// it ran on the calling thread, the rayon worker it ran on).
    type Run = (usize, usize, usize, usize, bool, Option<usize>);

    fn runs_of(exec: Exec, planes: usize, len: usize) -> Vec<Run> {
        let mut data = vec![0.0f32; planes * len];
        let mut side = vec![0u8; planes * 2];
        let mut scratch = vec![0.0f32; exec.threads() * 3];
        let caller = std::thread::current().id();
        let seen = Mutex::new(Vec::new());
        let (side, scratch) = (Side::new(&mut side[..], 2), Side::new(&mut scratch[..], 3));
        plane_runs(
            exec,
            &mut data,
            len,
            side,
            scratch,
            |first, run, side, buf| {
                // Every plane written by exactly one run: its index, checked below.
                for (k, p) in run.chunks_exact_mut(len).enumerate() {
                    p.fill((first + k) as f32);
                }
                side.fill(1);
                let here = std::thread::current().id() == caller;
                let worker = rayon::current_thread_index();
                let planes = run.len() / len;
                seen.lock()
                    .unwrap()
                    .push((first, planes, side.len(), buf.len(), here, worker));
            },
        );
        for (i, p) in data.chunks_exact(len).enumerate() {
            assert!(
                p.iter().all(|&v| v == i as f32),
                "plane {i} not written once"
            );
        }
        let mut seen = seen.into_inner().unwrap();
        seen.sort();
        seen
    }

    /// One run per thread of the `Exec`, of consecutive planes with their side elements and a
    /// scratch piece each; with one thread the run stays on the calling thread, outside a pool
    /// (rayon's global pool is not started) and inside a pool of two (the other worker gets
    /// nothing): the network's element-wise layers split as the `Exec` says.
    #[test]
    fn plane_runs_split_over_the_exec_threads() {
        assert_eq!(runs_of(Exec::new(1), 5, 4), [(0, 5, 10, 3, true, None)]);
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(2)
            .build()
            .unwrap();
        pool.install(|| {
            let worker = rayon::current_thread_index();
            assert_eq!(runs_of(Exec::new(1), 5, 4), [(0, 5, 10, 3, true, worker)]);
            let two = runs_of(Exec::new(2), 5, 4);
            let shapes: Vec<_> = two.iter().map(|r| (r.0, r.1, r.2, r.3)).collect();
            assert_eq!(shapes, [(0, 3, 6, 3), (3, 2, 4, 3)]);
            let three = runs_of(Exec::new(3), 7, 1);
            let shapes: Vec<_> = three.iter().map(|r| (r.0, r.1)).collect();
            assert_eq!(shapes, [(0, 3), (3, 3), (6, 1)]);
            assert_eq!(
                runs_of(Exec::new(4), 2, 4).len(),
                2,
                "no more runs than planes"
            );
        });
    }
}
