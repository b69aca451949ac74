//! The process's memory allocator: mimalloc, entered the way Rust's own
//! `System` allocator enters the C library's `malloc`.
//!
//! Why not the `mimalloc` crate's `MiMalloc`: it passes every allocation to
//! `mi_malloc_aligned`, whatever its alignment. For 16-byte-aligned values
//! (futures, and anything holding a `u128`) whose size is not a power of
//! two, mimalloc's aligned path only takes a free block when one happens to
//! sit at the head of the size class's free list; when that list runs dry
//! it over-allocates from a larger size class instead of refilling it, and
//! keeps doing so. Measured on the proxy path: 36 allocations per request,
//! 9 of them through that slow path, at 86 instructions per allocation on
//! average.
//!
//! mimalloc's blocks of 16 bytes or more are 16-byte aligned on every
//! target (its size classes are multiples of 16 bytes, as C's `malloc`
//! must be for `max_align_t`; mimalloc asserts this on every allocation in
//! its debug builds), and smaller blocks are word aligned. (Its guarded
//! mode, compiled in only with `libmimalloc-sys`'s `debug` feature, which
//! this build does not enable, can place a block flush against a guard page
//! and keeps no such alignment.) So a request of alignment at most 16 and
//! no larger than its size is served by plain `mi_malloc`; only larger
//! alignments (a runtime's cache-padded task cells) take the aligned entry
//! points.

use libmimalloc_sys as mi;
use std::alloc::{GlobalAlloc, Layout};
use std::ffi::c_void;

/// The alignment every mimalloc block of at least this size has.
const MIN_ALIGN: usize = 16;

/// mimalloc as the global allocator (see the module documentation).
pub struct Mimalloc;

/// Whether plain `malloc`-style entry points give `size` bytes `align`ed.
fn plain(align: usize, size: usize) -> bool {
    align <= MIN_ALIGN && align <= size
}

type Plain = unsafe extern "C" fn(usize) -> *mut c_void;
type Aligned = unsafe extern "C" fn(usize, usize) -> *mut c_void;

/// A block for `layout` from the `plain` entry point when it gives the
/// alignment, else from the `aligned` one.
///
/// # Safety
///
/// `layout` has a non-zero size.
#[inline]
unsafe fn allocate(layout: Layout, plain_entry: Plain, aligned_entry: Aligned) -> *mut u8 {
    // SAFETY: mimalloc's entry points take any non-zero size, and any
    // power-of-two alignment (a layout's always is one).
    unsafe {
        if plain(layout.align(), layout.size()) {
            plain_entry(layout.size()).cast()
        } else {
            aligned_entry(layout.size(), layout.align()).cast()
        }
    }
}

// SAFETY: every entry point hands mimalloc's own blocks out and back, with
// the alignment the layout asks for (see `plain` and the module
// documentation); `mi_free` takes blocks from the aligned entry points too.
unsafe impl GlobalAlloc for Mimalloc {
    #[inline]
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        // SAFETY: `GlobalAlloc` callers pass a layout of non-zero size.
        unsafe { allocate(layout, mi::mi_malloc, mi::mi_malloc_aligned) }
    }

    #[inline]
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        // SAFETY: as for `alloc`.
        unsafe { allocate(layout, mi::mi_zalloc, mi::mi_zalloc_aligned) }
    }

    #[inline]
    unsafe fn dealloc(&self, ptr: *mut u8, _layout: Layout) {
        // SAFETY: `ptr` came from this allocator, so from mimalloc.
        unsafe { mi::mi_free(ptr.cast::<c_void>()) }
    }

    #[inline]
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        // SAFETY: `ptr` came from this allocator with `layout`; the new
        // block keeps the layout's alignment.
        unsafe {
            if plain(layout.align(), new_size) {
                mi::mi_realloc(ptr.cast::<c_void>(), new_size).cast()
            } else {
                mi::mi_realloc_aligned(ptr.cast::<c_void>(), new_size, layout.align()).cast()
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Sizes around every power of two up to 64 KiB and a few large ones,
    /// at every alignment up to 4 KiB, several blocks each (so that size
    /// classes' free lists run dry and refill): each block has its
    /// alignment, holds what was written, keeps it through growing and
    /// shrinking, and zeroed blocks are zero.
    #[test]
    fn blocks_have_their_layouts_alignment_and_keep_their_contents() {
        let a = Mimalloc;
        let mut sizes: Vec<usize> = (1..=256).collect();
        for shift in 9..=16 {
            sizes.extend([
                (1 << shift) - 16,
                (1 << shift) - 1,
                1 << shift,
                (1 << shift) + 8,
            ]);
        }
        sizes.extend([1 << 20, (4 << 20) + 3]);
        let largest = 2 * sizes.iter().max().unwrap() + 1;
        let filled: Vec<Vec<u8>> = (0..4u8).map(|round| vec![round; largest]).collect();
        let zeros = vec![0u8; largest];
        for &size in &sizes {
            for align in (0..=12).map(|s| 1usize << s) {
                let layout = Layout::from_size_align(size, align).unwrap();
                let mut held = Vec::new();
                for (round, pattern) in filled.iter().enumerate() {
                    let aligned = |p: *mut u8, what: &str| {
                        assert!(!p.is_null(), "{what}, size {size} align {align}");
                        assert_eq!(p as usize % align, 0, "{what}, size {size} align {align}");
                    };
                    // SAFETY: non-zero sizes; every block is read within
                    // its size and freed once, with the layout it has then.
                    unsafe {
                        let p = a.alloc(layout);
                        aligned(p, "alloc");
                        p.write_bytes(round as u8, size);
                        let z = a.alloc_zeroed(layout);
                        aligned(z, "alloc_zeroed");
                        assert!(std::slice::from_raw_parts(z, size) == &zeros[..size]);
                        a.dealloc(z, layout);
                        let grown = size * 2 + 1;
                        let p = a.realloc(p, layout, grown);
                        aligned(p, "grown");
                        assert!(std::slice::from_raw_parts(p, size) == &pattern[..size]);
                        let shrunk = size.div_ceil(2);
                        let grown_layout = Layout::from_size_align(grown, align).unwrap();
                        let p = a.realloc(p, grown_layout, shrunk);
                        aligned(p, "shrunk");
                        assert!(std::slice::from_raw_parts(p, shrunk) == &pattern[..shrunk]);
                        held.push((p, Layout::from_size_align(shrunk, align).unwrap()));
                    }
                }
                for (p, layout) in held {
                    // SAFETY: allocated above with this layout.
                    unsafe { a.dealloc(p, layout) }
                }
            }
        }
    }
}
