//! Runtime-dispatched SIMD: one generic kernel source, instantiated per instruction set.
//!
//! A kernel is written once as an `#[inline(always)]` function generic over [`SimdF32`]; the
//! [`simd_dispatch!`](crate::simd_dispatch) macro stamps out one copy per instruction set inside a
//! `#[target_feature]` function and picks the copy for the [`Isa`] it is given. The binary is
//! built for baseline x86-64 (no `-C target-cpu=native` needed) and uses AVX-512 or AVX2 when
//! the CPU it runs on has them. Tests run every available [`Isa`] against the reference.

use std::fmt;

/// An instruction set a kernel variant is compiled for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Isa {
    /// AVX-512F: 16 f32 lanes with FMA and masked loads/stores.
    Avx512,
    /// AVX2 with FMA: 8 f32 lanes.
    Avx2,
    /// The portable fallback: SSE2 (4 lanes) on x86-64, scalar elsewhere.
    Portable,
}

impl Isa {
    /// The best instruction set this CPU supports.
    pub fn detect() -> Isa {
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") {
                return Isa::Avx512;
            }
            if std::arch::is_x86_feature_detected!("avx2")
                && std::arch::is_x86_feature_detected!("fma")
            {
                return Isa::Avx2;
            }
        }
        Isa::Portable
    }

    /// Every instruction set this CPU can run, best first.
    pub fn available() -> Vec<Isa> {
        [Isa::Avx512, Isa::Avx2, Isa::Portable]
            .into_iter()
            .filter(|isa| isa.is_supported())
            .collect()
    }

    /// Whether this CPU can run kernels compiled for `self`.
    pub fn is_supported(self) -> bool {
        match self {
            Isa::Portable => true,
            #[cfg(target_arch = "x86_64")]
            Isa::Avx512 => std::arch::is_x86_feature_detected!("avx512f"),
            #[cfg(target_arch = "x86_64")]
            Isa::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(not(target_arch = "x86_64"))]
            _ => false,
        }
    }

    /// f32 lanes per vector.
    pub fn lanes(self) -> usize {
        match self {
            Isa::Avx512 => 16,
            Isa::Avx2 => 8,
            Isa::Portable => Portable::LANES,
        }
    }

    /// Vector registers of the instruction set (`SimdF32::REGISTERS` of its vector type).
    pub fn registers(self) -> usize {
        match self {
            Isa::Avx512 => 32,
            Isa::Avx2 => 16,
            Isa::Portable => Portable::REGISTERS,
        }
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Isa::Avx512 => "avx512",
            Isa::Avx2 => "avx2",
            Isa::Portable => "portable",
        })
    }
}

/// A vector of f32 lanes.
///
/// # Safety
/// Every method is `unsafe` for the same two reasons, stated once here: the caller guarantees
/// that the CPU supports the instruction set of the implementing type, and that every pointer is
/// valid for the lanes it touches (`LANES` for full loads/stores, `n` for partial ones).
#[allow(clippy::missing_safety_doc)]
pub trait SimdF32: Copy {
    /// Lanes per vector.
    const LANES: usize;
    /// Vector registers the instruction set has (register-blocked kernels size their
    /// accumulator blocks by it).
    const REGISTERS: usize;
    /// The instruction set this vector type belongs to (for kernels that call other kernels).
    const ISA: Isa;
    /// All lanes zero.
    unsafe fn zero() -> Self;
    /// All lanes `v`.
    unsafe fn splat(v: f32) -> Self;
    /// Loads `LANES` values (unaligned).
    unsafe fn load(p: *const f32) -> Self;
    /// Stores `LANES` values (unaligned).
    unsafe fn store(self, p: *mut f32);
    /// Loads the first `n ≤ LANES` values, the rest zero.
    unsafe fn load_partial(p: *const f32, n: usize) -> Self;
    /// Stores the first `n ≤ LANES` lanes.
    unsafe fn store_partial(self, p: *mut f32, n: usize);
    /// Lanes `lo .. hi` from `p + lo .. p + hi`, the others zero (`lo ≤ hi ≤ LANES`). Touches
    /// no memory outside those lanes, so `p` itself may point before the buffer (a tap's shifted
    /// row whose first columns fall in the padding).
    #[inline(always)]
    unsafe fn load_lanes(p: *const f32, lo: usize, hi: usize) -> Self {
        unsafe { Self::load_masked(p, Self::lanes(lo, hi)) }
    }
    /// Lanes `lo .. hi` as a mask for [`SimdF32::load_masked`]: computed once, used for loads
    /// at many addresses (a tap's shifted rows), where [`SimdF32::load_lanes`] would build the
    /// mask again at each.
    type Lanes: Copy;
    /// The mask of lanes `lo .. hi` (`lo ≤ hi ≤ LANES`).
    unsafe fn lanes(lo: usize, hi: usize) -> Self::Lanes;
    /// [`SimdF32::load_lanes`] with a mask from [`SimdF32::lanes`].
    unsafe fn load_masked(p: *const f32, lanes: Self::Lanes) -> Self;
    /// Stores the lanes of a mask from [`SimdF32::lanes`] to their addresses from `p`, and
    /// touches no memory outside them (so `p` may point before the buffer).
    unsafe fn store_masked(self, p: *mut f32, lanes: Self::Lanes);
    /// Stores `LANES` values bypassing the cache (non-temporal) when `p` is aligned to the
    /// vector size, else a normal store. Call [`SimdF32::fence`] after a run of these.
    ///
    /// Default methods are `#[inline(always)]`: compiled on their own they would lack the
    /// caller's target features, and every intrinsic they reach would stay a function call.
    #[inline(always)]
    unsafe fn store_stream(self, p: *mut f32) {
        unsafe { self.store(p) }
    }
    /// Orders earlier non-temporal stores before later stores (x86 `sfence`).
    #[inline(always)]
    unsafe fn fence() {}
    /// Hints that the cache line at `p` will be read soon.
    #[inline(always)]
    unsafe fn prefetch(_p: *const f32) {}
    /// Lanes `N .. N + LANES` of the concatenation `lo ‖ hi` (`0 <= N <= LANES`): the vector
    /// one would load `N` elements after `lo`'s address when `hi` follows `lo` in memory.
    /// AVX-512 does this in a register (`valignd`), saving a cache-line-splitting load.
    #[inline(always)]
    unsafe fn shift_lanes<const N: i32>(lo: Self, hi: Self) -> Self {
        let mut buf = [0f32; 64];
        unsafe {
            lo.store(buf.as_mut_ptr());
            hi.store(buf.as_mut_ptr().add(Self::LANES));
            Self::load(buf.as_ptr().add(N as usize))
        }
    }
    /// The even and the odd lanes of the concatenation `lo ‖ hi` (lanes 0, 2, …, 2·LANES − 2
    /// and 1, 3, …, 2·LANES − 1): the vectors one would load at stride 2 from `lo`'s address
    /// and one element after it when `hi` follows `lo` in memory (a stride-2 row read with two
    /// contiguous loads). AVX-512 does each with one permute (`vpermt2ps`).
    #[inline(always)]
    unsafe fn deinterleave(lo: Self, hi: Self) -> (Self, Self) {
        let (mut buf, mut even, mut odd) = ([0f32; 32], [0f32; 16], [0f32; 16]);
        unsafe {
            lo.store(buf.as_mut_ptr());
            hi.store(buf.as_mut_ptr().add(Self::LANES));
            for l in 0..Self::LANES {
                (even[l], odd[l]) = (buf[2 * l], buf[2 * l + 1]);
            }
            (Self::load(even.as_ptr()), Self::load(odd.as_ptr()))
        }
    }
    /// The inverse of [`SimdF32::deinterleave`]: `lo ‖ hi` holds `even`'s and `odd`'s lanes
    /// alternately (`even[0], odd[0], even[1], …`), the two vectors one would store
    /// contiguously to write a stride-2 row's even and odd elements. One permute each on
    /// AVX-512.
    #[inline(always)]
    unsafe fn interleave(even: Self, odd: Self) -> (Self, Self) {
        let (mut e, mut o, mut buf) = ([0f32; 16], [0f32; 16], [0f32; 32]);
        unsafe {
            even.store(e.as_mut_ptr());
            odd.store(o.as_mut_ptr());
            for l in 0..Self::LANES {
                (buf[2 * l], buf[2 * l + 1]) = (e[l], o[l]);
            }
            let hi = buf.as_ptr().add(Self::LANES);
            (Self::load(buf.as_ptr()), Self::load(hi))
        }
    }
    /// `a * b + c`.
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self;
    /// `self + o`.
    unsafe fn add(self, o: Self) -> Self;
    /// `self * o`.
    unsafe fn mul(self, o: Self) -> Self;
    /// `self − o`.
    unsafe fn sub(self, o: Self) -> Self;
    /// `self` in lanes where `m > 0`, zero elsewhere (the ReLU derivative mask; NaN counts as
    /// not positive).
    unsafe fn keep_where_positive(self, m: Self) -> Self;
    /// Sum of all lanes.
    unsafe fn reduce_sum(self) -> f32;
    /// Transposes the `LANES × LANES` matrix whose rows are `rows` (exactly `LANES` vectors)
    /// in place: afterwards `rows[j]` holds lane j of every input row.
    #[inline(always)]
    unsafe fn transpose(rows: &mut [Self]) {
        debug_assert_eq!(rows.len(), Self::LANES);
        let l = Self::LANES;
        let (mut a, mut b) = ([0f32; 256], [0f32; 256]);
        unsafe {
            for (i, r) in rows.iter().enumerate() {
                r.store(a.as_mut_ptr().add(i * l));
            }
            for i in 0..l {
                for j in 0..l {
                    b[j * l + i] = a[i * l + j];
                }
            }
            for (j, r) in rows.iter_mut().enumerate() {
                *r = Self::load(b.as_ptr().add(j * l));
            }
        }
    }
}

/// Masks as the lane range itself, for instruction sets without masked loads: the lanes go
/// through a stack buffer.
macro_rules! lanes_as_range {
    () => {
        type Lanes = (usize, usize);
        #[inline(always)]
        unsafe fn lanes(lo: usize, hi: usize) -> (usize, usize) {
            (lo, hi)
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, (lo, hi): (usize, usize)) -> Self {
            let mut buf = [0f32; 16];
            unsafe {
                let (src, dst) = (p.wrapping_add(lo), buf.as_mut_ptr().add(lo));
                std::ptr::copy_nonoverlapping(src, dst, hi - lo);
                Self::load(buf.as_ptr())
            }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, (lo, hi): (usize, usize)) {
            let mut buf = [0f32; 16];
            unsafe {
                self.store(buf.as_mut_ptr());
                let (src, dst) = (buf.as_ptr().add(lo), p.wrapping_add(lo));
                std::ptr::copy_nonoverlapping(src, dst, hi - lo);
            }
        }
    };
}

/// Generic fallbacks for partial loads/stores through a stack buffer.
macro_rules! partial_via_buffer {
    () => {
        #[inline(always)]
        unsafe fn load_partial(p: *const f32, n: usize) -> Self {
            let mut buf = [0f32; Self::LANES];
            unsafe {
                std::ptr::copy_nonoverlapping(p, buf.as_mut_ptr(), n);
                Self::load(buf.as_ptr())
            }
        }
        #[inline(always)]
        unsafe fn store_partial(self, p: *mut f32, n: usize) {
            let mut buf = [0f32; Self::LANES];
            unsafe {
                self.store(buf.as_mut_ptr());
                std::ptr::copy_nonoverlapping(buf.as_ptr(), p, n);
            }
        }
    };
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use super::{Isa, SimdF32};
    use std::arch::x86_64::*;

    /// AVX-512F vector.
    #[derive(Clone, Copy)]
    pub struct Avx512(pub __m512);

    impl SimdF32 for Avx512 {
        const LANES: usize = 16;
        const REGISTERS: usize = 32;
        const ISA: Isa = Isa::Avx512;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Avx512(_mm512_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { Avx512(_mm512_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Avx512(_mm512_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm512_storeu_ps(p, self.0) }
        }
        #[inline(always)]
        unsafe fn store_stream(self, p: *mut f32) {
            unsafe {
                if (p as usize).is_multiple_of(64) {
                    _mm512_stream_ps(p, self.0)
                } else {
                    _mm512_storeu_ps(p, self.0)
                }
            }
        }
        #[inline(always)]
        unsafe fn fence() {
            unsafe { _mm_sfence() }
        }
        #[inline(always)]
        unsafe fn shift_lanes<const N: i32>(lo: Self, hi: Self) -> Self {
            unsafe {
                Avx512(_mm512_castsi512_ps(_mm512_alignr_epi32::<N>(
                    _mm512_castps_si512(hi.0),
                    _mm512_castps_si512(lo.0),
                )))
            }
        }

        #[inline(always)]
        unsafe fn deinterleave(lo: Self, hi: Self) -> (Self, Self) {
            unsafe {
                let even =
                    _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
                let odd =
                    _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
                (
                    Avx512(_mm512_permutex2var_ps(lo.0, even, hi.0)),
                    Avx512(_mm512_permutex2var_ps(lo.0, odd, hi.0)),
                )
            }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        #[inline(always)]
        unsafe fn load_partial(p: *const f32, n: usize) -> Self {
            unsafe { Avx512(_mm512_maskz_loadu_ps(((1u32 << n) - 1) as u16, p)) }
        }
        #[inline(always)]
        unsafe fn store_partial(self, p: *mut f32, n: usize) {
            unsafe { _mm512_mask_storeu_ps(p, ((1u32 << n) - 1) as u16, self.0) }
        }
        type Lanes = __mmask16;
        #[inline(always)]
        unsafe fn lanes(lo: usize, hi: usize) -> __mmask16 {
            (((1u32 << hi) - 1) & !((1u32 << lo) - 1)) as __mmask16
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, lanes: __mmask16) -> Self {
            unsafe { Avx512(_mm512_maskz_loadu_ps(lanes, p)) }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, lanes: __mmask16) {
            unsafe { _mm512_mask_storeu_ps(p, lanes, self.0) }
        }
        #[inline(always)]
        unsafe fn interleave(even: Self, odd: Self) -> (Self, Self) {
            unsafe {
                let lo = _mm512_setr_epi32(0, 16, 1, 17, 2, 18, 3, 19, 4, 20, 5, 21, 6, 22, 7, 23);
                let hi =
                    _mm512_setr_epi32(8, 24, 9, 25, 10, 26, 11, 27, 12, 28, 13, 29, 14, 30, 15, 31);
                (
                    Avx512(_mm512_permutex2var_ps(even.0, lo, odd.0)),
                    Avx512(_mm512_permutex2var_ps(even.0, hi, odd.0)),
                )
            }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            unsafe { Avx512(_mm512_fmadd_ps(a.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            unsafe { Avx512(_mm512_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn keep_where_positive(self, m: Self) -> Self {
            unsafe {
                let k = _mm512_cmp_ps_mask::<_CMP_GT_OQ>(m.0, _mm512_setzero_ps());
                Avx512(_mm512_maskz_mov_ps(k, self.0))
            }
        }
        #[inline(always)]
        unsafe fn reduce_sum(self) -> f32 {
            unsafe { _mm512_reduce_add_ps(self.0) }
        }
        /// In registers: 2×2 blocks of pairs (unpack), then of quads (shuffle), then of
        /// 128-bit lanes twice (`shuffle_f32x4`): 64 shuffles for 256 elements.
        #[inline(always)]
        unsafe fn transpose(rows: &mut [Self]) {
            // A fixed-size view: the compiler keeps all 16 rows in registers (through a slice
            // of unknown length it copied them to and from the stack with memcpy calls).
            let rows: &mut [Self; 16] = rows.try_into().expect("16 rows");
            unsafe {
                // Element by element, not `array::map`: the closure is not always inlined,
                // and an out-of-line call passes the block through memory.
                let mut r = [_mm512_setzero_ps(); 16];
                for (d, v) in r.iter_mut().zip(rows.iter()) {
                    *d = v.0;
                }
                let mut t = [_mm512_setzero_ps(); 16];
                for k in 0..8 {
                    t[2 * k] = _mm512_unpacklo_ps(r[2 * k], r[2 * k + 1]);
                    t[2 * k + 1] = _mm512_unpackhi_ps(r[2 * k], r[2 * k + 1]);
                }
                let mut u = [_mm512_setzero_ps(); 16];
                for k in 0..4 {
                    let (a, b) = (4 * k, 4 * k + 2);
                    u[4 * k] = _mm512_shuffle_ps::<0x44>(t[a], t[b]);
                    u[4 * k + 1] = _mm512_shuffle_ps::<0xEE>(t[a], t[b]);
                    u[4 * k + 2] = _mm512_shuffle_ps::<0x44>(t[a + 1], t[b + 1]);
                    u[4 * k + 3] = _mm512_shuffle_ps::<0xEE>(t[a + 1], t[b + 1]);
                }
                for h in 0..2 {
                    for i in 0..4 {
                        let (a, b) = (8 * h + i, 8 * h + i + 4);
                        t[8 * h + i] = _mm512_shuffle_f32x4::<0x88>(u[a], u[b]);
                        t[8 * h + i + 4] = _mm512_shuffle_f32x4::<0xDD>(u[a], u[b]);
                    }
                }
                for i in 0..8 {
                    rows[i] = Avx512(_mm512_shuffle_f32x4::<0x88>(t[i], t[i + 8]));
                    rows[i + 8] = Avx512(_mm512_shuffle_f32x4::<0xDD>(t[i], t[i + 8]));
                }
            }
        }
    }

    /// AVX2 + FMA vector.
    #[derive(Clone, Copy)]
    pub struct Avx2(pub __m256);

    /// All ones in lanes `0 .. n`, zeros above (`n ≤ 8`): the mask of AVX2's masked moves,
    /// which touch no memory in the lanes it leaves out.
    #[inline(always)]
    unsafe fn lane_mask(n: usize) -> __m256i {
        unsafe {
            _mm256_cmpgt_epi32(
                _mm256_set1_epi32(n as i32),
                _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7),
            )
        }
    }

    impl SimdF32 for Avx2 {
        const LANES: usize = 8;
        const REGISTERS: usize = 16;
        const ISA: Isa = Isa::Avx2;
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Avx2(_mm256_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { Avx2(_mm256_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Avx2(_mm256_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm256_storeu_ps(p, self.0) }
        }
        /// Masked in registers (`vmaskmovps`): through a stack buffer, each partial load
        /// was a memcpy call (the AVX2 depthwise kernels' row tails, half their time on
        /// reference layer D's 14-pixel rows).
        #[inline(always)]
        unsafe fn load_partial(p: *const f32, n: usize) -> Self {
            unsafe { Avx2(_mm256_maskload_ps(p, lane_mask(n))) }
        }
        #[inline(always)]
        unsafe fn store_partial(self, p: *mut f32, n: usize) {
            unsafe { _mm256_maskstore_ps(p, lane_mask(n), self.0) }
        }
        type Lanes = __m256i;
        #[inline(always)]
        unsafe fn lanes(lo: usize, hi: usize) -> __m256i {
            unsafe { _mm256_andnot_si256(lane_mask(lo), lane_mask(hi)) }
        }
        #[inline(always)]
        unsafe fn load_masked(p: *const f32, lanes: __m256i) -> Self {
            unsafe { Avx2(_mm256_maskload_ps(p, lanes)) }
        }
        #[inline(always)]
        unsafe fn store_masked(self, p: *mut f32, lanes: __m256i) {
            unsafe { _mm256_maskstore_ps(p, lanes, self.0) }
        }
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            unsafe { Avx2(_mm256_fmadd_ps(a.0, b.0, c.0)) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            unsafe { Avx2(_mm256_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn keep_where_positive(self, m: Self) -> Self {
            unsafe {
                let k = _mm256_cmp_ps::<_CMP_GT_OQ>(m.0, _mm256_setzero_ps());
                Avx2(_mm256_and_ps(self.0, k))
            }
        }
        #[inline(always)]
        unsafe fn reduce_sum(self) -> f32 {
            let mut buf = [0f32; 8];
            unsafe { self.store(buf.as_mut_ptr()) };
            buf.iter().sum()
        }
        #[inline(always)]
        unsafe fn store_stream(self, p: *mut f32) {
            unsafe {
                if (p as usize).is_multiple_of(32) {
                    _mm256_stream_ps(p, self.0)
                } else {
                    _mm256_storeu_ps(p, self.0)
                }
            }
        }
        #[inline(always)]
        unsafe fn fence() {
            unsafe { _mm_sfence() }
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        /// In registers: pairs (unpack), quads (shuffle), then 128-bit halves (`permute2f128`):
        /// 24 shuffles for 64 elements (through memory, the block cost the depthwise kernels
        /// five times their arithmetic).
        #[inline(always)]
        unsafe fn transpose(rows: &mut [Self]) {
            let rows: &mut [Self; 8] = rows.try_into().expect("8 rows");
            unsafe {
                let r = [
                    rows[0].0, rows[1].0, rows[2].0, rows[3].0, rows[4].0, rows[5].0, rows[6].0,
                    rows[7].0,
                ];
                let t = [
                    _mm256_unpacklo_ps(r[0], r[1]),
                    _mm256_unpackhi_ps(r[0], r[1]),
                    _mm256_unpacklo_ps(r[2], r[3]),
                    _mm256_unpackhi_ps(r[2], r[3]),
                    _mm256_unpacklo_ps(r[4], r[5]),
                    _mm256_unpackhi_ps(r[4], r[5]),
                    _mm256_unpacklo_ps(r[6], r[7]),
                    _mm256_unpackhi_ps(r[6], r[7]),
                ];
                let u = [
                    _mm256_shuffle_ps::<0x44>(t[0], t[2]),
                    _mm256_shuffle_ps::<0xEE>(t[0], t[2]),
                    _mm256_shuffle_ps::<0x44>(t[1], t[3]),
                    _mm256_shuffle_ps::<0xEE>(t[1], t[3]),
                    _mm256_shuffle_ps::<0x44>(t[4], t[6]),
                    _mm256_shuffle_ps::<0xEE>(t[4], t[6]),
                    _mm256_shuffle_ps::<0x44>(t[5], t[7]),
                    _mm256_shuffle_ps::<0xEE>(t[5], t[7]),
                ];
                for k in 0..4 {
                    rows[k] = Avx2(_mm256_permute2f128_ps::<0x20>(u[k], u[k + 4]));
                    rows[k + 4] = Avx2(_mm256_permute2f128_ps::<0x31>(u[k], u[k + 4]));
                }
            }
        }
    }

    /// SSE2 vector: baseline x86-64, no FMA.
    #[derive(Clone, Copy)]
    pub struct Sse2(pub __m128);

    impl SimdF32 for Sse2 {
        const LANES: usize = 4;
        const REGISTERS: usize = 16;
        const ISA: Isa = Isa::Portable;
        lanes_as_range!();
        #[inline(always)]
        unsafe fn zero() -> Self {
            unsafe { Sse2(_mm_setzero_ps()) }
        }
        #[inline(always)]
        unsafe fn splat(v: f32) -> Self {
            unsafe { Sse2(_mm_set1_ps(v)) }
        }
        #[inline(always)]
        unsafe fn load(p: *const f32) -> Self {
            unsafe { Sse2(_mm_loadu_ps(p)) }
        }
        #[inline(always)]
        unsafe fn store(self, p: *mut f32) {
            unsafe { _mm_storeu_ps(p, self.0) }
        }
        partial_via_buffer!();
        #[inline(always)]
        unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
            unsafe { Sse2(_mm_add_ps(_mm_mul_ps(a.0, b.0), c.0)) }
        }
        #[inline(always)]
        unsafe fn add(self, o: Self) -> Self {
            unsafe { Sse2(_mm_add_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn mul(self, o: Self) -> Self {
            unsafe { Sse2(_mm_mul_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn sub(self, o: Self) -> Self {
            unsafe { Sse2(_mm_sub_ps(self.0, o.0)) }
        }
        #[inline(always)]
        unsafe fn keep_where_positive(self, m: Self) -> Self {
            unsafe { Sse2(_mm_and_ps(self.0, _mm_cmpgt_ps(m.0, _mm_setzero_ps()))) }
        }
        #[inline(always)]
        unsafe fn reduce_sum(self) -> f32 {
            let mut buf = [0f32; 4];
            unsafe { self.store(buf.as_mut_ptr()) };
            buf.iter().sum()
        }
        #[inline(always)]
        unsafe fn prefetch(p: *const f32) {
            unsafe { _mm_prefetch::<_MM_HINT_T0>(p as *const i8) }
        }
        /// In registers (`_MM_TRANSPOSE4_PS`): pairs (unpack), then halves (`movelh`/`movehl`).
        #[inline(always)]
        unsafe fn transpose(rows: &mut [Self]) {
            let rows: &mut [Self; 4] = rows.try_into().expect("4 rows");
            unsafe {
                let t0 = _mm_unpacklo_ps(rows[0].0, rows[1].0);
                let t1 = _mm_unpacklo_ps(rows[2].0, rows[3].0);
                let t2 = _mm_unpackhi_ps(rows[0].0, rows[1].0);
                let t3 = _mm_unpackhi_ps(rows[2].0, rows[3].0);
                rows[0] = Sse2(_mm_movelh_ps(t0, t1));
                rows[1] = Sse2(_mm_movehl_ps(t1, t0));
                rows[2] = Sse2(_mm_movelh_ps(t2, t3));
                rows[3] = Sse2(_mm_movehl_ps(t3, t2));
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub use x86::{Avx2, Avx512, Sse2};

/// One f32 lane: the fallback on targets without a SIMD implementation here.
#[derive(Clone, Copy)]
pub struct Scalar(pub f32);

impl SimdF32 for Scalar {
    const LANES: usize = 1;
    const REGISTERS: usize = 16;
    const ISA: Isa = Isa::Portable;
    lanes_as_range!();
    /// A 1 × 1 block is its own transpose.
    #[inline(always)]
    unsafe fn transpose(_rows: &mut [Self]) {}
    #[inline(always)]
    unsafe fn zero() -> Self {
        Scalar(0.0)
    }
    #[inline(always)]
    unsafe fn splat(v: f32) -> Self {
        Scalar(v)
    }
    #[inline(always)]
    unsafe fn load(p: *const f32) -> Self {
        unsafe { Scalar(*p) }
    }
    #[inline(always)]
    unsafe fn store(self, p: *mut f32) {
        unsafe { *p = self.0 }
    }
    #[inline(always)]
    unsafe fn load_partial(p: *const f32, n: usize) -> Self {
        if n == 0 {
            Scalar(0.0)
        } else {
            unsafe { Self::load(p) }
        }
    }
    #[inline(always)]
    unsafe fn store_partial(self, p: *mut f32, n: usize) {
        if n > 0 {
            unsafe { self.store(p) }
        }
    }
    #[inline(always)]
    unsafe fn mul_add(a: Self, b: Self, c: Self) -> Self {
        Scalar(a.0 * b.0 + c.0)
    }
    #[inline(always)]
    unsafe fn add(self, o: Self) -> Self {
        Scalar(self.0 + o.0)
    }
    #[inline(always)]
    unsafe fn mul(self, o: Self) -> Self {
        Scalar(self.0 * o.0)
    }
    #[inline(always)]
    unsafe fn sub(self, o: Self) -> Self {
        Scalar(self.0 - o.0)
    }
    #[inline(always)]
    unsafe fn keep_where_positive(self, m: Self) -> Self {
        Scalar(if m.0 > 0.0 { self.0 } else { 0.0 })
    }
    #[inline(always)]
    unsafe fn reduce_sum(self) -> f32 {
        self.0
    }
}

/// Copies `src` into `dst` (equal lengths) with non-temporal stores from `dst`'s first 64-byte
/// boundary on (ordinary ones before it and for the last floats short of a vector), for
/// outputs written once and not read again soon: no read for ownership of their lines, and
/// they do not push what will be read out of the caches. The caller orders the stores with
/// [`SimdF32::fence`] before anything reads `dst`.
///
/// # Safety
/// `S` must be supported by this CPU.
#[inline(always)]
pub(crate) unsafe fn copy_streaming<S: SimdF32>(src: &[f32], dst: &mut [f32]) {
    assert_eq!(src.len(), dst.len(), "copy lengths");
    let (len, l) = (src.len(), S::LANES);
    let head = ((64 - dst.as_ptr() as usize % 64) % 64 / 4).min(len);
    dst[..head].copy_from_slice(&src[..head]);
    let end = head + (len - head) / l * l;
    for i in (head..end).step_by(l) {
        // SAFETY: floats i .. i + LANES of both (i + LANES <= end <= len); the ISA is the
        // caller's.
        unsafe { S::load(src.as_ptr().add(i)).store_stream(dst.as_mut_ptr().add(i)) };
    }
    dst[end..].copy_from_slice(&src[end..]);
}

/// The vector type of the portable fallback on this target.
#[cfg(target_arch = "x86_64")]
pub type Portable = Sse2;
/// The vector type of the portable fallback on this target.
#[cfg(not(target_arch = "x86_64"))]
pub type Portable = Scalar;

/// Defines `$name(isa, args...)` that runs the generic `$kernel::<S>(args...)` compiled for the
/// instruction set `isa`. `$kernel` must be `#[inline(always)] unsafe fn` generic over
/// [`SimdF32`] as its only type parameter.
///
/// The caller of `$name` must pass an `isa` the CPU supports ([`Isa::is_supported`]); `Exec`
/// guarantees this for the public entry points.
#[macro_export]
#[doc(hidden)]
macro_rules! simd_dispatch {
    ($(#[$m:meta])* $vis:vis fn $name:ident => $kernel:ident ( $($arg:ident : $ty:ty),* $(,)? )) => {
        $(#[$m])*
        $vis fn $name(isa: $crate::kernels::simd::Isa, $($arg: $ty),*) {
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f")]
                unsafe fn avx512($($arg: $ty),*) {
                    unsafe { $kernel::<$crate::kernels::simd::Avx512>($($arg),*) }
                }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn avx2($($arg: $ty),*) {
                    unsafe { $kernel::<$crate::kernels::simd::Avx2>($($arg),*) }
                }
                match isa {
                    // SAFETY: `isa` was checked to be supported by this CPU (see `Exec`).
                    $crate::kernels::simd::Isa::Avx512 => unsafe { avx512($($arg),*) },
                    $crate::kernels::simd::Isa::Avx2 => unsafe { avx2($($arg),*) },
                    $crate::kernels::simd::Isa::Portable => unsafe {
                        $kernel::<$crate::kernels::simd::Portable>($($arg),*)
                    },
                }
            }
            #[cfg(not(target_arch = "x86_64"))]
            {
                let _ = isa;
                unsafe { $kernel::<$crate::kernels::simd::Portable>($($arg),*) }
            }
        }
    };
}

#[cfg(test)]
mod tests {
    use super::*;

    crate::simd_dispatch!(fn shifted => shifted_kernel(src: &[f32], out: &mut Vec<f32>));

    /// Lanes of `shift_lanes::<0, 1, 2>` of the first two vectors of `src`, one after another.
    #[inline(always)]
    unsafe fn shifted_kernel<S: SimdF32>(src: &[f32], out: &mut Vec<f32>) {
        let l = S::LANES;
        let mut buf = [0f32; 16];
        out.clear();
        unsafe {
            let (lo, hi) = (S::load(src.as_ptr()), S::load(src.as_ptr().add(l)));
            let shifts = [
                S::shift_lanes::<0>(lo, hi),
                S::shift_lanes::<1>(lo, hi),
                S::shift_lanes::<2>(lo, hi),
            ];
            for v in shifts {
                v.store(buf.as_mut_ptr());
                out.extend_from_slice(&buf[..l]);
            }
        }
    }

    #[test]
    fn shift_lanes_reads_across_the_two_vectors() {
        let src: Vec<f32> = (0..32).map(|i| i as f32).collect();
        for isa in Isa::available() {
            let mut out = Vec::new();
            shifted(isa, &src, &mut out);
            let l = out.len() / 3;
            if l < 2 {
                continue; // one lane: a shift by 2 is outside the documented range
            }
            for (n, got) in out.chunks_exact(l).enumerate() {
                assert_eq!(got, &src[n..n + l], "{isa} shift {n}");
            }
        }
    }

    crate::simd_dispatch!(fn deinterleaved => deinterleaved_kernel(src: &[f32], out: &mut Vec<f32>));

    #[inline(always)]
    unsafe fn deinterleaved_kernel<S: SimdF32>(src: &[f32], out: &mut Vec<f32>) {
        let mut buf = [0f32; 16];
        out.clear();
        unsafe {
            let l = S::LANES;
            let (even, odd) = S::deinterleave(S::load(src.as_ptr()), S::load(src.as_ptr().add(l)));
            let (lo, hi) = S::interleave(even, odd);
            for v in [even, odd, lo, hi] {
                v.store(buf.as_mut_ptr());
                out.extend_from_slice(&buf[..l]);
            }
        }
    }

    /// And `interleave` puts them back.
    #[test]
    fn deinterleave_splits_both_vectors_into_even_and_odd_lanes() {
        let src: Vec<f32> = (0..32).map(|i| i as f32 + 0.25).collect();
        for isa in Isa::available() {
            let mut out = Vec::new();
            deinterleaved(isa, &src, &mut out);
            let l = out.len() / 4;
            let even: Vec<f32> = src.iter().step_by(2).take(l).copied().collect();
            let odd: Vec<f32> = src.iter().skip(1).step_by(2).take(l).copied().collect();
            assert_eq!(out[..l], even, "{isa} even");
            assert_eq!(out[l..2 * l], odd, "{isa} odd");
            assert_eq!(out[2 * l..], src[..2 * l], "{isa} interleaved");
        }
    }

    crate::simd_dispatch!(fn streamed => streamed_kernel(src: &[f32], dst: &mut [f32]));

    #[inline(always)]
    unsafe fn streamed_kernel<S: SimdF32>(src: &[f32], dst: &mut [f32]) {
        unsafe {
            copy_streaming::<S>(src, dst);
            S::fence();
        }
    }

    /// Every float lands, whatever the destination's offset from a cache line (the head before
    /// it, the streamed vectors, the tail short of a vector) and nothing around it is written.
    #[test]
    fn copy_streaming_writes_exactly_its_destination() {
        let src: Vec<f32> = (0..100).map(|i| i as f32 + 0.5).collect();
        for isa in Isa::available() {
            for offset in 0..17 {
                for len in [0, 1, 3, 15, 16, 17, 33, 48, 70, 83] {
                    // `offset` floats past a line boundary.
                    let mut buf = vec![-1f32; 200];
                    let start = (64 - buf.as_ptr() as usize % 64) % 64 / 4 + offset;
                    streamed(isa, &src[..len], &mut buf[start..start + len]);
                    let (before, rest) = buf.split_at(start);
                    let (copy, after) = rest.split_at(len);
                    let case = format!("{isa}, {offset} past a line, {len} floats");
                    assert_eq!(copy, &src[..len], "{case}");
                    assert!(before.iter().chain(after).all(|&v| v == -1.0), "{case}");
                }
            }
        }
    }

    crate::simd_dispatch!(fn lanes_loaded => lanes_loaded_kernel(src: &[f32], out: &mut Vec<f32>));

    /// `load_lanes(p, lo, hi)` for every `lo ≤ hi ≤ LANES`, `p` one vector into `src`, one
    /// after another.
    #[inline(always)]
    unsafe fn lanes_loaded_kernel<S: SimdF32>(src: &[f32], out: &mut Vec<f32>) {
        let l = S::LANES;
        let mut buf = [0f32; 16];
        out.clear();
        for lo in 0..=l {
            for hi in lo..=l {
                unsafe {
                    S::load_lanes(src.as_ptr().add(l), lo, hi).store(buf.as_mut_ptr());
                }
                out.extend_from_slice(&buf[..l]);
            }
        }
    }

    #[test]
    fn load_lanes_zeroes_the_lanes_outside_its_range() {
        // NaN around the vector: a lane loaded from outside lo .. hi would show.
        let src: Vec<f32> = (0..48)
            .map(|i| {
                if (16..32).contains(&i) {
                    i as f32
                } else {
                    f32::NAN
                }
            })
            .collect();
        for isa in Isa::available() {
            let mut out = Vec::new();
            lanes_loaded(isa, &src[16 - isa.lanes()..], &mut out);
            let l = isa.lanes();
            let mut got = out.chunks_exact(l);
            for lo in 0..=l {
                for hi in lo..=l {
                    let want: Vec<f32> = (0..l)
                        .map(|k| {
                            if (lo..hi).contains(&k) {
                                (16 + k) as f32
                            } else {
                                0.0
                            }
                        })
                        .collect();
                    assert_eq!(got.next(), Some(&want[..]), "{isa} lanes {lo}..{hi}");
                }
            }
        }
    }

    crate::simd_dispatch!(fn lanes_stored => lanes_stored_kernel(out: &mut Vec<f32>));

    /// `store_masked` of the vector 1, 2, …, LANES under the mask of every `lo ≤ hi ≤ LANES`,
    /// each into a fresh NaN-filled window of three vectors at the middle one.
    #[inline(always)]
    unsafe fn lanes_stored_kernel<S: SimdF32>(out: &mut Vec<f32>) {
        let l = S::LANES;
        let values: Vec<f32> = (1..=l).map(|k| k as f32).collect();
        out.clear();
        for lo in 0..=l {
            for hi in lo..=l {
                let mut window = vec![f32::NAN; 3 * l];
                unsafe {
                    let v = S::load(values.as_ptr());
                    v.store_masked(window.as_mut_ptr().add(l), S::lanes(lo, hi));
                }
                out.extend_from_slice(&window);
            }
        }
    }

    #[test]
    fn store_masked_writes_only_the_lanes_of_its_mask() {
        for isa in Isa::available() {
            let mut out = Vec::new();
            lanes_stored(isa, &mut out);
            let l = isa.lanes();
            let mut got = out.chunks_exact(3 * l);
            for lo in 0..=l {
                for hi in lo..=l {
                    let window = got.next().unwrap();
                    for (k, v) in window.iter().enumerate() {
                        let lane = k.wrapping_sub(l);
                        if (lo..hi).contains(&lane) {
                            assert_eq!(*v, (lane + 1) as f32, "{isa} lanes {lo}..{hi} at {k}");
                        } else {
                            assert!(v.is_nan(), "{isa} lanes {lo}..{hi} wrote {k}");
                        }
                    }
                }
            }
        }
    }

    crate::simd_dispatch!(fn transposed => transposed_kernel(src: &[f32], out: &mut Vec<f32>));

    /// The `LANES × LANES` matrix at the start of `src` (row-major), transposed.
    #[inline(always)]
    unsafe fn transposed_kernel<S: SimdF32>(src: &[f32], out: &mut Vec<f32>) {
        let l = S::LANES;
        out.clear();
        out.resize(l * l, 0.0);
        unsafe {
            let mut rows = [S::zero(); 16];
            for (i, r) in rows[..l].iter_mut().enumerate() {
                *r = S::load(src.as_ptr().add(i * l));
            }
            S::transpose(&mut rows[..l]);
            for (j, r) in rows[..l].iter().enumerate() {
                r.store(out.as_mut_ptr().add(j * l));
            }
        }
    }

    #[test]
    fn transpose_swaps_rows_and_columns() {
        let src: Vec<f32> = (0..256).map(|i| i as f32).collect();
        for isa in Isa::available() {
            let mut out = Vec::new();
            transposed(isa, &src, &mut out);
            let l = isa.lanes();
            for i in 0..l {
                for j in 0..l {
                    assert_eq!(out[j * l + i], src[i * l + j], "{isa} ({i}, {j})");
                }
            }
        }
    }
}
