//! Helpers shared by the integration tests: a seeded generator, comparisons and the list of
//! fast-kernel variants every test runs.
#![allow(dead_code)]

use sepconv::{Exec, Isa};

/// SplitMix64: small, seeded, good enough for test data.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed ^ 0x9E37_79B9_7F4A_7C15)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in [-1, 1).
    pub fn uniform(&mut self) -> f32 {
        (self.next_u64() >> 40) as f32 / (1u64 << 23) as f32 - 1.0
    }
    pub fn vec(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.uniform()).collect()
    }
    /// Uniform integer in lo..=hi.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
}

/// `threads` threads that split every call, however small: the tests' shapes are small, and
/// the split kernels are what they are there to cover (by default calls under
/// [`Exec::MIN_SPLIT_MACS`] run on one thread).
pub fn exec(threads: usize) -> Exec {
    Exec::new(threads).with_min_split_macs(0)
}

/// Every fast-kernel variant this CPU can run: each instruction set, 1 and 2 threads.
pub fn execs() -> Vec<Exec> {
    let mut v = Vec::new();
    for isa in Isa::available() {
        for threads in [1, 2] {
            v.push(exec(threads).with_isa(isa).unwrap());
        }
    }
    v
}

/// Largest |a - b| / (atol_scale + |b|) style error: max |a-b| / max(1, max|b|).
pub fn rel_err(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "lengths differ");
    let scale = b.iter().fold(1.0f64, |m, &v| m.max(v.abs() as f64));
    // NaN anywhere (e.g. an output a kernel never wrote) is an infinite error, not ignored.
    a.iter()
        .zip(b)
        .map(|(&x, &y)| {
            let d = (x as f64 - y as f64).abs();
            if d.is_nan() { f64::INFINITY } else { d }
        })
        .fold(0.0, f64::max)
        / scale
}

/// Asserts `a` ≈ `b` within `tol` relative (to the largest magnitude of `b`, at least 1).
#[track_caller]
pub fn assert_close(a: &[f32], b: &[f32], tol: f64, what: &str) {
    let e = rel_err(a, b);
    assert!(e <= tol, "{what}: relative error {e:.3e} > {tol:.1e}");
}
