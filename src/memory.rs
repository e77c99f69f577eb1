//! The process's allocator: the system's, except that large blocks live on transparent huge pages
//! and are kept for reuse.
//!
//! A training step streams through hundreds of activations and gradients of several MiB each (8 MiB
//! for one ResNet-20 layer at batch 128), allocated afresh by every tensor op. On 4 KiB pages that is
//! a TLB miss every 4 KiB, and under a hypervisor each miss walks two page tables. Where the kernel
//! gives huge pages only to memory that asks for them (`madvise` mode, the default of many
//! distributions), nothing else gets them. So blocks of [`LARGE`] bytes and more are mapped here,
//! 2 MiB-aligned and advised, and a freed one waits in a small cache for the next request it fits
//! (the smallest that wastes at most half the request): the same sizes come back every step, so their
//! pages fault in once, not every step, and the odd sizes (a last partial batch, an eval batch) reuse
//! blocks instead of adding their own.

use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::Mutex;

/// Blocks from this size on get huge pages (smaller ones hold no whole 2 MiB page worth it).
pub const LARGE: usize = 4 << 20;
const HUGE_PAGE: usize = 2 << 20;

/// Freed large blocks kept for reuse: at most this many, at most [`CACHE_BYTES`] in all, and none over
/// [`CACHE_MAX_BLOCK`] (the rest are unmapped). Blocks over 32 MiB are rare one-off copies (a whole
/// dataset as a tensor), which glibc too returns to the system at once.
const CACHE_SLOTS: usize = 256;
const CACHE_BYTES: usize = 4 << 30;
const CACHE_MAX_BLOCK: usize = 32 << 20;

/// In-use blocks whose mapping is longer than their layout says (a cached block reused for a smaller
/// request): at most this many at once.
const LONGER_SLOTS: usize = 256;

struct Cache {
    /// Freed blocks, as (mapped length, address).
    free: [(usize, usize); CACHE_SLOTS],
    free_count: usize,
    free_bytes: usize,
    /// Blocks in use that are longer than their layout's [`mapped`] length, as (address, length).
    longer: [(usize, usize); LONGER_SLOTS],
    longer_count: usize,
}

static CACHE: Mutex<Cache> = Mutex::new(Cache {
    free: [(0, 0); CACHE_SLOTS],
    free_count: 0,
    free_bytes: 0,
    longer: [(0, 0); LONGER_SLOTS],
    longer_count: 0,
});

/// The global allocator of the `qat-lab` binary (see the module docs).
pub struct HugePages;

/// The mapped length of a large block: whole huge pages.
fn mapped(layout: Layout) -> Option<usize> {
    (layout.size() >= LARGE && layout.align() <= HUGE_PAGE).then(|| layout.size().next_multiple_of(HUGE_PAGE))
}

impl Cache {
    /// The smallest freed block of at least `len` bytes that wastes at most half of `len`, taken out
    /// of the cache.
    fn take(&mut self, len: usize) -> Option<usize> {
        let room = self.longer_count < LONGER_SLOTS;
        let fits = |l: usize| l == len || (room && l > len && l <= len + len / 2);
        let (i, (l, addr)) = self.free[..self.free_count]
            .iter()
            .copied()
            .enumerate()
            .filter(|&(_, (l, _))| fits(l))
            .min_by_key(|&(_, (l, _))| l)?;
        self.free_count -= 1;
        self.free[i] = self.free[self.free_count];
        self.free_bytes -= l;
        if l > len {
            self.longer[self.longer_count] = (addr, l);
            self.longer_count += 1;
        }
        Some(addr)
    }

    /// The mapped length of the block at `addr`, freed with a layout of mapped length `len`.
    fn length(&mut self, addr: usize, len: usize) -> usize {
        match self.longer[..self.longer_count].iter().position(|&(a, _)| a == addr) {
            Some(i) => {
                let (_, l) = self.longer[i];
                self.longer_count -= 1;
                self.longer[i] = self.longer[self.longer_count];
                l
            }
            None => len,
        }
    }

    /// Keeps a freed block for reuse; false when the cache is full.
    fn keep(&mut self, addr: usize, len: usize) -> bool {
        let room = self.free_count < CACHE_SLOTS && self.free_bytes + len <= CACHE_BYTES && len <= CACHE_MAX_BLOCK;
        if room {
            self.free[self.free_count] = (len, addr);
            self.free_count += 1;
            self.free_bytes += len;
        }
        room
    }
}

impl HugePages {
    /// A block of at least `len` bytes (whole huge pages): a cached one (see [`Cache::take`]), else a
    /// fresh mapping. The bool says whether it is fresh (and so already zero).
    fn take(len: usize) -> (*mut u8, bool) {
        match CACHE.lock().ok().and_then(|mut cache| cache.take(len)) {
            Some(addr) => (addr as *mut u8, false),
            None => (map(len), true),
        }
    }

    /// Keeps a freed block (its layout's mapped length `len`) for reuse, or unmaps it when the cache is
    /// full.
    fn give(addr: *mut u8, len: usize) {
        let mut len = len;
        if let Ok(mut cache) = CACHE.lock() {
            len = cache.length(addr as usize, len);
            if cache.keep(addr as usize, len) {
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
    /// One test at a time: they would take each other's freed blocks.
    static SERIAL: Mutex<()> = Mutex::new(());

    fn layout(size: usize) -> Layout {
        Layout::from_size_align(size, 64).unwrap()
    }

    #[test]
    fn large_blocks_are_aligned_zeroed_and_reused() {
        let _serial = SERIAL.lock();
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
    fn a_smaller_request_reuses_a_longer_block_and_gives_all_of_it_back() {
        let _serial = SERIAL.lock();
        let (big, smaller) = (3 * LARGE, 2 * LARGE + 7);
        // SAFETY: as above.
        unsafe {
            let a = HugePages.alloc(layout(big));
            *a.add(big - 1) = 1;
            HugePages.dealloc(a, layout(big));
            // 2·LARGE + 7 bytes fit the freed 3·LARGE block (it wastes less than half of them).
            let b = HugePages.alloc(layout(smaller));
            assert_eq!(a, b);
            HugePages.dealloc(b, layout(smaller));
            // The whole block went back: the larger request gets it again, all of it usable.
            let c = HugePages.alloc(layout(big));
            assert_eq!(a, c);
            *c.add(big - 1) = 2;
            HugePages.dealloc(c, layout(big));
        }
    }

    #[test]
    fn realloc_keeps_the_contents_across_small_and_large() {
        let _serial = SERIAL.lock();
        // SAFETY: as above; realloc's result replaces the old block.
        unsafe {
            let small = 1000;
            let p = HugePages.alloc(layout(small));
            for i in 0..small {
                *p.add(i) = (i % 251) as u8;
            }
            // A size no other test's freed block fits, nor this one theirs (the cache is shared).
            let big = 5 * LARGE + 3;
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
