//! The process's allocator: the system's, except that large blocks live on transparent huge pages
//! and are kept for reuse.
//!
//! A training step streams through hundreds of activations and gradients of several MiB each (8 MiB
//! for one ResNet-20 layer at batch 128), allocated afresh by every tensor op. On 4 KiB pages that is
//! a TLB miss every 4 KiB, and under a hypervisor each miss walks two page tables. Where the kernel
//! gives huge pages only to memory that asks for them (`madvise` mode, the default of many
//! distributions), nothing else gets them. So blocks of [`LARGE`] bytes and more are mapped here,
//! 2 MiB-aligned and advised, and a freed one waits in a small cache for the next request of its
//! size: the same sizes come back every step, so their pages fault in once, not every step.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks from this size on get huge pages (smaller ones hold no whole 2 MiB page worth it).
pub const LARGE: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Freed large blocks kept for reuse, as (mapped length, address); at most this many, and at most
/// [`CACHE_BYTES`] in all (the rest are unmapped).
const CACHE_SLOTS: usize = 256;
const CACHE_BYTES: usize = 4 << 30;

struct Cache {
    blocks: [(usize, usize); CACHE_SLOTS],
    len: usize,
    bytes: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache { blocks: [(0, 0); CACHE_SLOTS], len: 0, bytes: 0 });

/// The global allocator of the `qat-lab` binary (see the module docs).
pub struct HugePages;

/// The mapped length of a large block: whole huge pages.
fn mapped(layout: Layout) -> Option<usize> {
    (layout.size() >= LARGE && layout.align() <= HUGE_PAGE).then(|| layout.size().next_multiple_of(HUGE_PAGE))
}

impl HugePages {
    /// A block of `len` bytes (whole huge pages): a cached one of that length, else a fresh mapping.
    /// The bool says whether it is fresh (and so already zero).
    fn take(len: usize) -> (*mut u8, bool) {
        if let Ok(mut cache) = CACHE.lock() {
            let n = cache.len;
            if let Some(i) = cache.blocks[..n].iter().position(|&(l, _)| l == len) {
                let (_, addr) = cache.blocks[i];
                cache.blocks[i] = cache.blocks[n - 1];
                cache.len -= 1;
                cache.bytes -= len;
                return (addr as *mut u8, false);
            }
        }
        (map(len), true)
    }

    /// Keeps a freed block for reuse, or unmaps it when the cache is full.
    fn give(addr: *mut u8, len: usize) {
        if let Ok(mut cache) = CACHE.lock() {
            if cache.len < CACHE_SLOTS && cache.bytes + len <= CACHE_BYTES {
                let n = cache.len;
                cache.blocks[n] = (len, addr as usize);
                cache.len += 1;
                cache.bytes += len;
                return;
            }
        }
        // SAFETY: addr..addr + len is a mapping of ours that nothing uses any more.
        unsafe { libc::munmap(addr.cast(), len) };
    }
}

/// A fresh anonymous mapping of `len` bytes, aligned to a huge page and advised to use them; null when
/// the system has no memory left.
fn map(len: usize) -> *mut u8 {
    // Over-map by one huge page, then trim to an aligned start.
    let total = len + HUGE_PAGE;
    // SAFETY: an anonymous private mapping, checked below.
    let raw = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            total,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if raw == libc::MAP_FAILED {
        return std::ptr::null_mut();
    }
    let start = (raw as usize).next_multiple_of(HUGE_PAGE);
    let (head, tail) = (start - raw as usize, raw as usize + total - (start + len));
    // SAFETY: the head and tail lie inside the mapping just made and hold nothing; the advice only
    // changes how the block is paged.
    unsafe {
        if head > 0 {
            libc::munmap(raw, head);
        }
        if tail > 0 {
            libc::munmap((start + len) as *mut libc::c_void, tail);
        }
        libc::madvise(start as *mut libc::c_void, len, libc::MADV_HUGEPAGE);
    }
    start as *mut u8
}

// SAFETY: small blocks go to the system allocator unchanged; a large block is a mapping of its own
// (at least the size asked for, aligned to 2 MiB, so to any alignment up to that) until it is freed.
unsafe impl GlobalAlloc for HugePages {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        match mapped(layout) {
            Some(len) => Self::take(len).0,
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc(layout) },
        }
    }

    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        match mapped(layout) {
            Some(len) => {
                let (ptr, fresh) = Self::take(len);
                if !fresh && !ptr.is_null() {
                    // SAFETY: ptr holds len >= layout.size() writable bytes.
                    unsafe { std::ptr::write_bytes(ptr, 0, layout.size()) };
                }
                ptr
            }
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.alloc_zeroed(layout) },
        }
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        match mapped(layout) {
            Some(len) => Self::give(ptr, len),
            // SAFETY: forwarded with the caller's guarantees.
            None => unsafe { System.dealloc(ptr, layout) },
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let new_layout = Layout::from_size_align(new_size, layout.align()).unwrap_or(layout);
        match (mapped(layout), mapped(new_layout)) {
            // SAFETY: forwarded with the caller's guarantees.
            (None, None) => unsafe { System.realloc(ptr, layout, new_size) },
            (Some(old), Some(new)) if old == new => ptr,
            _ => {
                // SAFETY: a new block, the smaller of the two sizes copied, the old one freed: the
                // caller's guarantees carry over.
                unsafe {
                    let fresh = self.alloc(new_layout);
                    if !fresh.is_null() {
                        std::ptr::copy_nonoverlapping(ptr, fresh, layout.size().min(new_size));
                        self.dealloc(ptr, layout);
                    }
                    fresh
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The tests call the allocator directly (it is the binary's global allocator, not the tests'),
    /// each with sizes of its own, since the cache is shared.
    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 64).unwrap()
    }

    #[test]
    fn large_blocks_are_aligned_zeroed_and_reused() {
        let size = LARGE + 12_345;
        // SAFETY: every block is used within its size and freed once, with the layout it was made with.
        unsafe {
            let a = HugePages.alloc_zeroed(layout(size));
            assert!(!a.is_null() && (a as usize).is_multiple_of(HUGE_PAGE));
            assert!(std::slice::from_raw_parts(a, size).iter().all(|&b| b == 0));
            std::ptr::write_bytes(a, 7, size);
            HugePages.dealloc(a, layout(size));
            // The freed block comes back for the same size, zeroed again when asked.
            let b = HugePages.alloc_zeroed(layout(size));
            assert_eq!(a, b);
            assert!(std::slice::from_raw_parts(b, size).iter().all(|&b| b == 0));
            HugePages.dealloc(b, layout(size));
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_small_and_large() {
        // SAFETY: as above; realloc's result replaces the old block.
        unsafe {
            let small = 1000;
            let p = HugePages.alloc(layout(small));
            for i in 0..small {
                *p.add(i) = (i % 251) as u8;
            }
            let big = 2 * LARGE + 3;
            let q = HugePages.realloc(p, layout(small), big);
            assert!(!q.is_null());
            assert!((0..small).all(|i| *q.add(i) == (i % 251) as u8));
            *q.add(big - 1) = 9;
            // Within the same huge pages the block stays where it is.
            let r = HugePages.realloc(q, layout(big), big - 1);
            assert_eq!(q, r);
            let s = HugePages.realloc(r, layout(big - 1), 10);
            assert!((0..10).all(|i| *s.add(i) == (i % 251) as u8));
            HugePages.dealloc(s, layout(10));
        }
    }
}
