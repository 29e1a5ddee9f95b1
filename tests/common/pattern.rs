//! A deterministic byte stream for end-to-end integrity checks: a lost, doubled or reordered
//! chunk shows up as a mismatch.

use std::io::{self, Read, Write};

/// A deterministic byte stream: a pseudo-random block of a length prime to every buffer size,
/// repeated, so that a lost, doubled or reordered chunk shows up as a mismatch.
pub struct Pattern {
    block: Vec<u8>,
}

impl Pattern {
    pub fn new(seed: u64) -> Pattern {
        const LEN: usize = (1 << 20) + 7;
        let mut x = seed | 1;
        let block = (0..LEN)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 24) as u8
            })
            .collect();
        Pattern { block }
    }

    /// Writes `total` bytes of the pattern.
    pub fn send(&self, stream: &mut impl Write, total: u64) -> io::Result<()> {
        let mut sent = 0u64;
        let len = self.block.len() as u64;
        while sent < total {
            let at = (sent % len) as usize;
            let n = (self.block.len() - at)
                .min((total - sent) as usize)
                .min(256 * 1024);
            stream.write_all(&self.block[at..at + n])?;
            sent += n as u64;
        }
        Ok(())
    }

    /// Writes bytes `from..from + n` of the pattern's stream (a slice of what [`Pattern::send`]
    /// writes), so a test can send it in paced steps.
    pub fn send_range(&self, stream: &mut impl Write, from: u64, n: u64) -> io::Result<()> {
        self.send(
            &mut SkipWriter {
                inner: stream,
                skip: from,
            },
            from + n,
        )
    }

    /// Reads until EOF and checks every byte against the pattern; returns how many matched.
    pub fn verify(&self, stream: &mut impl Read) -> io::Result<u64> {
        let mut buf = vec![0u8; 256 * 1024];
        let mut got = 0u64;
        let len = self.block.len() as u64;
        loop {
            let n = stream.read(&mut buf)?;
            if n == 0 {
                return Ok(got);
            }
            let mut checked = 0;
            while checked < n {
                let at = ((got + checked as u64) % len) as usize;
                let m = (n - checked).min(self.block.len() - at);
                if buf[checked..checked + m] != self.block[at..at + m] {
                    return Err(io::Error::other(format!(
                        "mismatch within bytes {}..{}",
                        got,
                        got + n as u64
                    )));
                }
                checked += m;
            }
            got += n as u64;
        }
    }
}

/// Writes to `inner` while dropping the first `skip` bytes it is given.
struct SkipWriter<'a, W: Write> {
    inner: &'a mut W,
    skip: u64,
}

impl<W: Write> Write for SkipWriter<'_, W> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        if self.skip >= buf.len() as u64 {
            self.skip -= buf.len() as u64;
            return Ok(buf.len());
        }
        let from = self.skip as usize;
        self.skip = 0;
        self.inner.write_all(&buf[from..])?;
        Ok(buf.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        self.inner.flush()
    }
}
