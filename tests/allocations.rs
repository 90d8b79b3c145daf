//! Kernel calls allocate no memory per image: whatever small tables a call builds (tap offsets,
//! phase layouts) it builds once, so a pass over six images allocates exactly what a pass over
//! two does. Counted by a global allocator over every variant and pass of small layers (on two
//! threads splitting every call, after a warm-up that sizes the workspaces). Alone in its test
//! binary, so that no other test allocates while it counts.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicUsize, Ordering::Relaxed};

use sepconv::bench::{Pass, ReferenceLayer, Variant, Workload};

mod common;

struct Counting;

static ALLOCATIONS: AtomicUsize = AtomicUsize::new(0);

// SAFETY: forwards to the system allocator, counting the calls that obtain memory.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCATIONS.fetch_add(1, Relaxed);
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static COUNTING: Counting = Counting;

/// Allocations of one `pass` of `variant` on `layer` at `batch` images, after two warm-up runs:
/// the fewest of five runs, because the thread pool itself allocates now and then (a work
/// queue grows when a worker is slow to steal), which a kernel's own allocations do every run.
fn allocations(layer: ReferenceLayer, batch: usize, variant: Variant, pass: Pass) -> usize {
    let exec = common::exec(2);
    let mut w = Workload::new(&layer.with_batch(batch), variant).unwrap();
    for _ in 0..2 {
        w.run(exec, pass).unwrap();
    }
    (0..5)
        .map(|_| {
            let before = ALLOCATIONS.load(Relaxed);
            w.run(exec, pass).unwrap();
            ALLOCATIONS.load(Relaxed) - before
        })
        .min()
        .unwrap()
}

#[test]
fn passes_allocate_nothing_per_image() {
    let pool = rayon::ThreadPoolBuilder::new()
        .num_threads(2)
        .build()
        .unwrap();
    // Stride 1 (Winograd, the blocked depthwise kernel, the per-tap grad-weight) and stride 2
    // (implicit GEMM per phase, the row depthwise kernel, the fused training passes).
    let layers = [(16, 32, 28, 1), (16, 32, 28, 2), (8, 8, 15, 1)].map(|(m, n, size, stride)| {
        ReferenceLayer {
            id: 'X',
            batch: 1,
            in_channels: m,
            out_channels: n,
            size,
            stride,
            valid: false,
        }
    });
    pool.install(|| {
        for layer in layers {
            for variant in [
                Variant::Std,
                Variant::Dw,
                Variant::Pw,
                Variant::Ds,
                Variant::Sp,
            ] {
                for pass in [Pass::Forward, Pass::Train] {
                    let (two, six) = (
                        allocations(layer, 2, variant, pass),
                        allocations(layer, 6, variant, pass),
                    );
                    assert_eq!(
                        six, two,
                        "{layer:?} {variant:?} {pass:?}: allocations grow with the batch"
                    );
                }
            }
        }
    });
}
