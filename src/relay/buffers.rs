//! Copy buffers, lent for one burst at a time like pipes, so the copy path allocates nothing per
//! burst, an idle connection holds no buffer, and the memory they take is bounded.

use std::sync::Mutex;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::pump::STREAMING_READ;

/// One pooled buffer: the streaming threshold. A read that fills it is bulk data, which moves to
/// a pipe when one is free; smaller reads are the interactive traffic the copy path is for.
pub const BUFFER_SIZE: usize = STREAMING_READ;

/// The most pooled buffers lent at once: 16 MiB. A buffer is held across a write the peer is
/// slow to take, so without a cap a thousand slow readers would each pin 16 KiB.
pub const MAX_BUFFERS: usize = 1024;

/// What a direction copies through when every pooled buffer is lent: a small buffer of its own
/// for the burst. Waiting for a pooled one instead could deadlock (a direction holding a buffer
/// while its peer's other direction waits for one) and would stall keystrokes behind slow
/// readers; a small buffer keeps every direction moving, and the memory bound stays:
/// [`MAX_BUFFERS`] × 16 KiB plus 4 KiB per direction over the cap, itself bounded by
/// max_connections.
pub const OVERFLOW_BUFFER_SIZE: usize = 4 * 1024;

/// Empty buffers kept for reuse. Their pages stay resident once touched, so keep few: eight
/// cover the parallel bursts of a build while costing at most 128 KiB of RSS.
const IDLE_BUFFERS_KEPT: usize = 8;

/// Buffers shared by every connection.
#[derive(Debug)]
pub struct BufferPool {
    idle: Mutex<Vec<Box<[u8]>>>,
    lendable: Semaphore,
    limit: usize,
}

impl Default for BufferPool {
    fn default() -> Self {
        Self::with_limit(MAX_BUFFERS)
    }
}

impl BufferPool {
    /// A pool that lends at most `limit` full-size buffers at once.
    pub fn with_limit(limit: usize) -> Self {
        BufferPool {
            idle: Mutex::new(Vec::new()),
            lendable: Semaphore::new(limit),
            limit,
        }
    }

    /// Lends a pooled buffer, reusing an idle one when there is one; past the limit, a small
    /// buffer of the burst's own. Never waits.
    pub fn take(&self) -> Buffer<'_> {
        let Ok(permit) = self.lendable.try_acquire() else {
            return Buffer {
                pool: self,
                bytes: Some(vec![0u8; OVERFLOW_BUFFER_SIZE].into_boxed_slice()),
                permit: None,
            };
        };
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        Buffer {
            pool: self,
            bytes: Some(reused.unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice())),
            permit: Some(permit),
        }
    }

    /// Pooled buffers lent now.
    pub fn lent(&self) -> usize {
        self.limit.saturating_sub(self.lendable.available_permits())
    }
}

/// A buffer lent for one burst; a pooled one goes back to the pool when dropped.
#[derive(Debug)]
pub struct Buffer<'a> {
    pool: &'a BufferPool,
    bytes: Option<Box<[u8]>>,
    permit: Option<SemaphorePermit<'a>>,
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
        if self.permit.is_none() {
            return;
        }
        if let Some(bytes) = self.bytes.take() {
            let mut idle = self.pool.idle.lock().unwrap_or_else(|p| p.into_inner());
            if idle.len() < IDLE_BUFFERS_KEPT {
                idle.push(bytes);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn past_the_limit_a_small_buffer_is_lent_at_once() {
        let pool = BufferPool::with_limit(2);
        let a = pool.take();
        let _b = pool.take();
        assert_eq!(a.len(), BUFFER_SIZE);
        assert_eq!(pool.lent(), 2);
        let third = pool.take();
        assert_eq!(
            third.len(),
            OVERFLOW_BUFFER_SIZE,
            "past the limit: a small buffer"
        );
        assert_eq!(pool.lent(), 2, "the small one is not pooled");
        drop(third);
        drop(a);
        assert_eq!(pool.lent(), 1);
        assert_eq!(pool.take().len(), BUFFER_SIZE, "a returned buffer is lent again");
    }
}
