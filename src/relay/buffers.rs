//! Copy buffers, lent for one burst at a time like pipes, so the copy path allocates nothing per
//! burst and an idle connection holds no buffer.

use std::sync::Mutex;

/// One buffer: a pipe's worth, so a copy burst moves as much per syscall as a splice.
pub const BUFFER_SIZE: usize = 64 * 1024;

/// Empty buffers kept for reuse. Their pages stay resident once touched, so keep few: eight
/// cover the parallel bursts of a build while costing at most 512 KiB of RSS.
const IDLE_BUFFERS_KEPT: usize = 8;

/// Buffers shared by every connection.
#[derive(Debug, Default)]
pub struct BufferPool {
    idle: Mutex<Vec<Box<[u8]>>>,
}

impl BufferPool {
    /// Lends a buffer, reusing an idle one when there is one.
    pub fn take(&self) -> Buffer<'_> {
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        Buffer {
            pool: self,
            bytes: Some(reused.unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice())),
        }
    }
}

/// A buffer lent for one burst; it goes back to the pool when dropped.
#[derive(Debug)]
pub struct Buffer<'a> {
    pool: &'a BufferPool,
    bytes: Option<Box<[u8]>>,
}

impl std::ops::Deref for Buffer<'_> {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.bytes.as_deref().unwrap_or_default()
    }
}

impl std::ops::DerefMut for Buffer<'_> {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.bytes.as_deref_mut().unwrap_or_default()
    }
}

impl Drop for Buffer<'_> {
    fn drop(&mut self) {
        if let Some(bytes) = self.bytes.take() {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_BUFFERS_KEPT {
                idle.push(bytes);
            }
        }
    }
}
