//! Copy buffers, lent for one burst at a time like pipes, so the copy path allocates nothing per
//! burst, an idle connection holds no buffer, and the memory they take is bounded.

use std::sync::Mutex;

use tokio::sync::{Semaphore, SemaphorePermit};

use super::pump::STREAMING_READ;

/// One buffer: the streaming threshold. A read that fills it is bulk data, which moves to a pipe
/// when one is free; smaller reads are the interactive traffic the copy path is for.
pub const BUFFER_SIZE: usize = STREAMING_READ;

/// The most buffers lent at once: 16 MiB. A buffer is held across a write the peer is slow to
/// take, so without a cap a thousand slow readers would each pin one; past the cap a direction
/// waits for a buffer (its idle timer still runs) instead of allocating. 1,024 covers every
/// direction of a route at its default max_connections with bulk data on the copy path.
pub const MAX_BUFFERS: usize = 1024;

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
    /// A pool that lends at most `limit` buffers at once.
    pub fn with_limit(limit: usize) -> Self {
        BufferPool {
            idle: Mutex::new(Vec::new()),
            lendable: Semaphore::new(limit),
            limit,
        }
    }

    /// Lends a buffer, reusing an idle one when there is one; waits while `limit` are lent.
    pub async fn take(&self) -> Buffer<'_> {
        // The semaphore is never closed, so acquiring cannot fail; if it ever did, lending
        // without a permit is still correct, only unbounded.
        let permit = self.lendable.acquire().await.ok();
        let reused = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
        Buffer {
            pool: self,
            bytes: Some(reused.unwrap_or_else(|| vec![0u8; BUFFER_SIZE].into_boxed_slice())),
            _permit: permit,
        }
    }

    /// Buffers lent now.
    pub fn lent(&self) -> usize {
        self.limit.saturating_sub(self.lendable.available_permits())
    }
}

/// A buffer lent for one burst; it goes back to the pool when dropped.
#[derive(Debug)]
pub struct Buffer<'a> {
    pool: &'a BufferPool,
    bytes: Option<Box<[u8]>>,
    _permit: Option<SemaphorePermit<'a>>,
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

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test]
    async fn lending_past_the_limit_waits_for_a_buffer_to_come_back() {
        let pool = BufferPool::with_limit(2);
        let a = pool.take().await;
        let _b = pool.take().await;
        assert_eq!(a.len(), BUFFER_SIZE);
        assert_eq!(pool.lent(), 2);
        let third = tokio::time::timeout(Duration::from_millis(50), pool.take()).await;
        assert!(third.is_err(), "a third buffer was lent past a limit of two");
        drop(a);
        let third = tokio::time::timeout(Duration::from_secs(1), pool.take()).await;
        assert!(third.is_ok(), "the returned buffer was not lent again");
    }
}
