//! Allocation of the library's large buffers (tensors, activations, kernel scratch): fallible,
//! zero-filled, and backed by transparent huge pages where the system allows them.
//!
//! A training step walks tens of megabytes of activations and gradients, and the kernels read
//! many planes at once (a pointwise GEMM's K rows, the 16 planes a depthwise block packs), each
//! plane a few 4 KiB pages apart: with 4 KiB pages many of those reads also miss the TLB. Where
//! `transparent_hugepage` is `madvise` (this machine's setting, and a common default), Linux
//! backs anonymous memory with 2 MiB pages only where asked, so every buffer large enough is
//! asked for them before it is first written. `sepconv --threads 2 bench`, four runs of each
//! build alternated (min ms): training steps of reference layer B ds 10.58–10.78 → 9.60–9.95, B
//! pw 7.29–7.48 → 6.62–6.95, B sp 29.2–29.8 → 28.2–28.3, C ds 15.28–15.72 → 14.86–15.04, E ds
//! 7.86–8.22 → 7.47–7.80, E sp 38.2–39.5 → 37.2–38.2; forward B pw 1.98–2.10 → 1.92–1.93, E ds
//! 2.22–2.27 → 2.18–2.24; layer D (3.2 MB buffers, at most one whole huge page each) a tie.

use crate::error::{Error, Result};

/// The huge-page size asked for: x86-64's (and 4 KiB-page aarch64's) transparent huge page.
const HUGE_PAGE: usize = 2 << 20;

/// Allocates a zero-filled `Vec<f32>` of `len` elements, or returns [`Error::TooLarge`]
/// instead of aborting when the memory is not there.
pub fn alloc_zeros(len: usize, what: &str) -> Result<Vec<f32>> {
    let mut v = Vec::new();
    grow_zeroed(&mut v, len, what)?;
    Ok(v)
}

/// Grows `v` to at least `len` elements (the new ones zero; a longer `v` is left as it is), or
/// returns [`Error::TooLarge`] for `what` instead of aborting when the memory is not there.
pub fn grow_zeroed(v: &mut Vec<f32>, len: usize, what: &str) -> Result<()> {
    if v.len() < len {
        v.try_reserve_exact(len - v.len())
            .map_err(|_| Error::TooLarge {
                what: what.to_string(),
                bytes: len as u128 * 4,
            })?;
        // Before the zeros are written: pages are backed when first touched.
        advise_huge_pages(v.as_ptr() as usize, v.capacity() * 4);
        v.resize(len, 0.0);
    }
    Ok(())
}

/// The whole huge pages inside the `bytes` bytes at address `start`, if any.
fn huge_page_span(start: usize, bytes: usize) -> Option<(usize, usize)> {
    let first = start.checked_next_multiple_of(HUGE_PAGE)?;
    let end = (start.checked_add(bytes)? / HUGE_PAGE) * HUGE_PAGE;
    (end > first).then(|| (first, end - first))
}

/// Asks the kernel to back the whole huge pages of the allocation at `start` with huge pages.
/// Only advice: where transparent huge pages are off, or the call fails, nothing changes.
fn advise_huge_pages(start: usize, bytes: usize) {
    #[cfg(target_os = "linux")]
    if let Some((first, len)) = huge_page_span(start, bytes) {
        // SAFETY: the span lies inside the live allocation at `start` and is page-aligned;
        // MADV_HUGEPAGE changes how it is backed, never its contents.
        unsafe {
            libc::madvise(first as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (start, bytes);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn huge_page_span_is_the_aligned_interior() {
        let mb = 1 << 20;
        // 5 MiB from 1 MiB: the pages at 2 and 4 MiB.
        assert_eq!(huge_page_span(mb, 5 * mb), Some((2 * mb, 4 * mb)));
        // An aligned start and a whole number of pages.
        assert_eq!(huge_page_span(4 * mb, 4 * mb), Some((4 * mb, 4 * mb)));
        // Smaller than a page, or a page's worth that straddles two: nothing to ask for.
        assert_eq!(huge_page_span(mb, mb), None);
        // Ending before the first boundary (a debug build once overflowed here).
        assert_eq!(huge_page_span(mb, mb / 2), None);
        assert_eq!(huge_page_span(mb, 2 * mb), None);
        assert_eq!(huge_page_span(usize::MAX - mb, 2 * mb), None);
    }

    #[test]
    fn grown_buffers_are_zero_and_keep_their_contents() {
        let mut v = alloc_zeros(3, "test").unwrap();
        v.copy_from_slice(&[1.0, 2.0, 3.0]);
        grow_zeroed(&mut v, 3 << 20, "test").unwrap();
        assert_eq!(&v[..3], &[1.0, 2.0, 3.0]);
        assert!(v[3..].iter().all(|&x| x == 0.0));
        grow_zeroed(&mut v, 5, "test").unwrap();
        assert_eq!(v.len(), 3 << 20);
    }
}
