//! Page-aligned I/O buffers, usable with `O_DIRECT` and io_uring.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

/// Alignment of every [`IoBuf`]: a page, enough for any direct-I/O device.
pub const IOBUF_ALIGN: usize = 4096;

/// A heap buffer aligned to [`IOBUF_ALIGN`], zero-filled on allocation.
///
/// The allocation is rounded up to a multiple of the alignment so that direct
/// I/O on the full buffer is always legal; `len()` is what callers asked for.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
}

// SAFETY: IoBuf owns its allocation exclusively (like Vec<u8>); it has no
// interior mutability and no thread affinity.
unsafe impl Send for IoBuf {}
// SAFETY: shared references only allow reading the bytes.
unsafe impl Sync for IoBuf {}

impl IoBuf {
    /// Allocates `len` zero bytes (at least one page is reserved).
    pub fn zeroed(len: usize) -> Self {
        let cap = len.max(1).div_ceil(IOBUF_ALIGN) * IOBUF_ALIGN;
        let layout = Self::layout(cap);
        // SAFETY: layout has non-zero size.
        let raw = unsafe { alloc_zeroed(layout) };
        let Some(ptr) = NonNull::new(raw) else {
            std::alloc::handle_alloc_error(layout)
        };
        IoBuf { ptr, len, cap }
    }

    /// Copies `data` into a new aligned buffer.
    pub fn from_slice(data: &[u8]) -> Self {
        let mut b = Self::zeroed(data.len());
        b.copy_from_slice(data);
        b
    }

    fn layout(cap: usize) -> Layout {
        // IOBUF_ALIGN is a power of two and cap a multiple of it, far below isize::MAX
        // for any request the daemon accepts (max payload is 32 MiB).
        Layout::from_size_align(cap, IOBUF_ALIGN).expect("valid IoBuf layout")
    }

    /// Bytes in use.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the buffer holds no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Allocated bytes (a multiple of [`IOBUF_ALIGN`]).
    pub fn capacity(&self) -> usize {
        self.cap
    }

    /// Changes the length within the capacity; new bytes are whatever the
    /// buffer held (zero for a fresh buffer). Panics beyond the capacity.
    pub fn set_len(&mut self, len: usize) {
        assert!(len <= self.cap, "IoBuf::set_len beyond capacity");
        self.len = len;
    }

    /// Raw pointer for the kernel.
    pub fn as_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    /// Raw mutable pointer for the kernel.
    pub fn as_mut_ptr(&mut self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl Deref for IoBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: ptr is valid for cap >= len initialized (zeroed) bytes.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl DerefMut for IoBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        // SAFETY: as in deref, and we hold &mut self.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IoBuf(len={}, cap={})", self.len, self.cap)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_zeroed_and_sized() {
        for len in [0, 1, 512, 4096, 5000, 1 << 20] {
            let b = IoBuf::zeroed(len);
            assert_eq!(b.as_ptr() as usize % IOBUF_ALIGN, 0);
            assert_eq!(b.len(), len);
            assert!(b.capacity() >= len && b.capacity() % IOBUF_ALIGN == 0);
            assert!(b.iter().all(|&x| x == 0));
        }
        let b = IoBuf::from_slice(b"abc");
        assert_eq!(&b[..], b"abc");
    }
}
