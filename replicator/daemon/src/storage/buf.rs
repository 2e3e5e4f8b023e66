//! Page-aligned I/O buffers, usable with `O_DIRECT` and io_uring.

use std::alloc::{alloc_zeroed, dealloc, Layout};
use std::ops::{Deref, DerefMut};
use std::ptr::NonNull;

use bytes::Bytes;

/// Alignment of every [`IoBuf`]: a page, enough for any direct-I/O device.
pub const IOBUF_ALIGN: usize = 4096;

/// A heap buffer aligned to [`IOBUF_ALIGN`], zero-filled on allocation.
///
/// The allocation is rounded up to a multiple of the alignment so that direct
/// I/O on the full buffer is always legal; `len()` is what callers asked for.
///
/// A buffer made by [`IoBuf::from_bytes`] instead lends out the memory of a
/// page-aligned, read-only [`Bytes`] (a write's payload, also being sent to
/// the peers): it can be the source of a write, never the target of a read.
/// Mutable access to it panics, and the memory is released by the `Bytes`.
pub struct IoBuf {
    ptr: NonNull<u8>,
    len: usize,
    cap: usize,
    shared: Option<Bytes>,
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
        IoBuf {
            ptr,
            len,
            cap,
            shared: None,
        }
    }

    /// Lends `data` to the engine as the source of a write without copying
    /// it, when it starts on an [`IOBUF_ALIGN`] boundary and is not empty
    /// (a payload read by the NBD server into a pooled buffer); otherwise
    /// gives it back so the caller copies it into an aligned buffer.
    pub fn from_bytes(data: Bytes) -> Result<IoBuf, Bytes> {
        if data.is_empty() || data.as_ptr() as usize % IOBUF_ALIGN != 0 {
            return Err(data);
        }
        let Some(ptr) = NonNull::new(data.as_ptr().cast_mut()) else {
            return Err(data);
        };
        Ok(IoBuf {
            ptr,
            len: data.len(),
            cap: data.len(),
            shared: Some(data),
        })
    }

    /// Whether the memory is a lent, read-only [`Bytes`] ([`IoBuf::from_bytes`]).
    pub fn is_shared(&self) -> bool {
        self.shared.is_some()
    }

    /// `Ok` when the buffer may be the target of a read: not a lent,
    /// read-only [`Bytes`].
    pub fn check_readable(&self) -> std::io::Result<()> {
        if self.shared.is_some() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "read into a read-only (shared) buffer",
            ));
        }
        Ok(())
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

    /// Raw mutable pointer for the kernel. For a shared buffer
    /// ([`IoBuf::is_shared`]) the kernel may only read through it (a write's
    /// source); engines refuse to read into one.
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
        assert!(
            self.shared.is_none(),
            "IoBuf: a shared (read-only) buffer cannot be written"
        );
        // SAFETY: as in deref, and we hold &mut self; the memory is our own
        // allocation (not a lent `Bytes`), checked above.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for IoBuf {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Drop for IoBuf {
    fn drop(&mut self) {
        if self.shared.is_some() {
            // The `Bytes` owns the memory and is dropped with this field.
            return;
        }
        // SAFETY: allocated in `zeroed` with this exact layout.
        unsafe { dealloc(self.ptr.as_ptr(), Self::layout(self.cap)) }
    }
}

/// Smallest and largest pooled capacities (powers of two).
const POOL_MIN_SHIFT: u32 = 12;
const POOL_MAX_SHIFT: u32 = 25;
const POOL_CLASSES: usize = (POOL_MAX_SHIFT - POOL_MIN_SHIFT + 1) as usize;
/// Bytes each size class may keep for reuse.
const POOL_CLASS_BYTES: usize = 32 << 20;

/// Free lists of buffers by power-of-two capacity, so the data path does not
/// allocate (and page-fault, and zero) a fresh buffer for every request.
static POOL: [std::sync::Mutex<Vec<IoBuf>>; POOL_CLASSES] =
    [const { std::sync::Mutex::new(Vec::new()) }; POOL_CLASSES];

fn pool_class(cap: usize) -> Option<usize> {
    let shift = cap.trailing_zeros();
    (cap.is_power_of_two() && (POOL_MIN_SHIFT..=POOL_MAX_SHIFT).contains(&shift))
        .then(|| (shift - POOL_MIN_SHIFT) as usize)
}

impl IoBuf {
    /// A buffer of `len` bytes from the pool (or newly allocated). Its
    /// contents are unspecified — zeroes or bytes of an earlier request — so
    /// callers must overwrite all of it (a full read or a full payload)
    /// before exposing it. Give it back with [`IoBuf::recycle`].
    pub fn pooled(len: usize) -> IoBuf {
        let cap = len.max(1 << POOL_MIN_SHIFT).next_power_of_two();
        if let Some(class) = pool_class(cap) {
            let reused = POOL[class].lock().unwrap_or_else(|e| e.into_inner()).pop();
            if let Some(mut b) = reused {
                b.set_len(len);
                return b;
            }
            let mut b = IoBuf::zeroed(cap);
            b.set_len(len);
            return b;
        }
        IoBuf::zeroed(len)
    }

    /// Returns a buffer to the pool (or frees it when its class is full).
    /// A shared buffer just lets go of its `Bytes`.
    pub fn recycle(self) {
        if self.shared.is_some() {
            return;
        }
        if let Some(class) = pool_class(self.cap) {
            let keep = (POOL_CLASS_BYTES / self.cap).clamp(2, 256);
            let mut list = POOL[class].lock().unwrap_or_else(|e| e.into_inner());
            if list.len() < keep {
                list.push(self);
            }
        }
    }
}

impl std::fmt::Debug for IoBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shared = if self.shared.is_some() {
            ", shared"
        } else {
            ""
        };
        write!(f, "IoBuf(len={}, cap={}{shared})", self.len, self.cap)
    }
}

/// A pooled [`IoBuf`] as the owner of a [`Bytes`]
/// (`Bytes::from_owner(PooledBytes::new(buf))`): when the last handle to
/// the bytes is dropped — the local write done and every peer's copy sent —
/// the buffer goes back to the pool instead of being freed.
pub struct PooledBytes(Option<IoBuf>);

impl PooledBytes {
    /// Wraps `buf` (its current length is what the `Bytes` shows).
    pub fn new(buf: IoBuf) -> PooledBytes {
        PooledBytes(Some(buf))
    }
}

impl AsRef<[u8]> for PooledBytes {
    fn as_ref(&self) -> &[u8] {
        self.0.as_deref().unwrap_or(&[])
    }
}

impl Drop for PooledBytes {
    fn drop(&mut self) {
        if let Some(b) = self.0.take() {
            b.recycle();
        }
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

    #[test]
    fn aligned_bytes_are_lent_without_a_copy() {
        let mut b = IoBuf::pooled(8192);
        b.fill(7);
        let ptr = b.as_ptr();
        let bytes = Bytes::from_owner(PooledBytes::new(b));
        let lent = IoBuf::from_bytes(bytes.clone()).expect("aligned");
        assert!(lent.is_shared());
        assert_eq!(lent.as_ptr(), ptr);
        assert_eq!((lent.len(), &lent[..4]), (8192, &[7u8; 4][..]));
        // Recycling a lent buffer must not put memory it does not own in the pool.
        lent.recycle();
        assert_eq!(&bytes[..2], &[7, 7]);
        // Unaligned or empty bytes are handed back for copying.
        assert!(IoBuf::from_bytes(bytes.slice(1..)).is_err());
        assert!(IoBuf::from_bytes(Bytes::new()).is_err());
    }

    #[test]
    #[should_panic(expected = "cannot be written")]
    fn a_lent_buffer_cannot_be_written() {
        let bytes = Bytes::from_owner(PooledBytes::new(IoBuf::pooled(4096)));
        let mut lent = IoBuf::from_bytes(bytes).expect("aligned");
        lent[0] = 1;
    }

    #[test]
    fn pool_reuses_by_class() {
        let mut b = IoBuf::pooled(5000);
        assert_eq!((b.len(), b.capacity()), (5000, 8192));
        b[0] = 42;
        let ptr = b.as_ptr();
        b.recycle();
        let again = IoBuf::pooled(8000);
        assert_eq!(again.len(), 8000);
        assert_eq!(again.as_ptr() as usize % IOBUF_ALIGN, 0);
        // Another test may have taken it meanwhile; when reused, it is the same allocation.
        if again.as_ptr() == ptr {
            assert_eq!(again.capacity(), 8192);
        }
        let big = IoBuf::pooled(64 << 20);
        assert_eq!(big.len(), 64 << 20);
        big.recycle();
    }
}
