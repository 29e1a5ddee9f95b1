//! The upstream every contender relays to: one listener, behaviour chosen by the first byte of a
//! connection (`S` sink, `E` echo, `R` request/response, `H` hold open).

use std::net::{SocketAddr, TcpListener};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Starts the upstream on its own thread and runtime; `held` counts the connections it holds open.
pub(crate) fn start_upstream(held: Arc<AtomicUsize>) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind upstream");
    let addr = listener.local_addr().expect("addr");
    std::thread::spawn(move || {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        runtime.block_on(async move {
            listener.set_nonblocking(true).expect("nonblocking");
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            loop {
                let Ok((stream, _)) = listener.accept().await else {
                    continue;
                };
                let held = held.clone();
                tokio::spawn(async move {
                    let _ = serve(stream, held).await;
                });
            }
        });
    });
    addr
}

async fn serve(mut stream: tokio::net::TcpStream, held: Arc<AtomicUsize>) -> std::io::Result<()> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let _ = stream.set_nodelay(true);
    let mut first = [0u8; 1];
    if stream.read(&mut first).await? == 0 {
        return Ok(());
    }
    match first[0] {
        b'S' => {
            let mut buf = vec![0u8; 256 * 1024];
            while stream.read(&mut buf).await? > 0 {}
            stream.write_all(b"done").await?;
        }
        b'E' => {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = stream.read(&mut buf).await?;
                if n == 0 {
                    break;
                }
                stream.write_all(&buf[..n]).await?;
            }
        }
        b'R' => {
            // Each request is a 4-byte length and that many bytes; once all of it is read, the
            // response is as many bytes back: one exchange at a time, like a WinRM envelope.
            let mut buf = vec![0u8; 256 * 1024];
            loop {
                let mut len = [0u8; 4];
                if stream.read_exact(&mut len).await.is_err() {
                    break;
                }
                let len = u32::from_be_bytes(len) as usize;
                let mut left = len;
                while left > 0 {
                    let n = stream.read(&mut buf[..left.min(256 * 1024)]).await?;
                    if n == 0 {
                        return Ok(());
                    }
                    left -= n;
                }
                let mut left = len;
                while left > 0 {
                    let n = left.min(buf.len());
                    stream.write_all(&buf[..n]).await?;
                    left -= n;
                }
            }
        }
        _ => {
            held.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 64];
            while stream.read(&mut buf).await? > 0 {}
            held.fetch_sub(1, Ordering::SeqCst);
        }
    }
    Ok(())
}
