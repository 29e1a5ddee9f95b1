//! TCP urgent data through the relay (in line, interactive and while splicing), splice refused
//! by the kernel, and a direction going back to copying when its stream trickles.

use super::*;

/// What an upstream received on one connection, as it arrived: bytes, then whether it ended.
struct Recorder {
    rx: std::sync::mpsc::Receiver<Option<Vec<u8>>>,
    got: Vec<u8>,
    ended: bool,
}

impl Recorder {
    /// An upstream that records the first connection it accepts.
    fn start() -> (Upstream, Recorder) {
        let (tx, rx) = std::sync::mpsc::channel();
        let tx = std::sync::Mutex::new(Some(tx));
        let upstream = Upstream::start(move |mut stream| {
            let Some(tx) = tx.lock().unwrap().take() else {
                return;
            };
            let mut buf = vec![0u8; 64 * 1024];
            loop {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        let _ = tx.send(None);
                        return;
                    }
                    Ok(n) => {
                        let _ = tx.send(Some(buf[..n].to_vec()));
                    }
                }
            }
        });
        (
            upstream,
            Recorder {
                rx,
                got: Vec::new(),
                ended: false,
            },
        )
    }

    /// Collects until `len` bytes arrived (and, with `then_end`, the end of stream), or 3 s.
    fn until(&mut self, len: usize, then_end: bool) {
        let deadline = Instant::now() + Duration::from_secs(3);
        while self.got.len() < len || (then_end && !self.ended) {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.rx.recv_timeout(left) {
                Ok(Some(bytes)) => self.got.extend_from_slice(&bytes),
                Ok(None) => {
                    self.ended = true;
                    if self.got.len() < len {
                        return;
                    }
                }
                Err(_) => return,
            }
        }
    }
}

/// TCP urgent data (MSG_OOB) is relayed in line, in order, without a stall, whether the direction
/// is already splicing or copying (interactive), and whether the sender then stays or
/// closes.
fn urgent_data_is_relayed_in_line(splice: bool, close: bool) {
    urgent_data_case(splice, close, 100);
}

/// `after` bytes follow the urgent byte in one write: more than a copy buffer holds, so the read
/// past the mark must go on until the socket is drained.
fn urgent_data_case(splice: bool, close: bool, after: usize) {
    let (upstream, mut recorder) = Recorder::start();
    let port = free_port();
    let daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_nodelay(true).unwrap();
    let mut want = Vec::new();
    if splice {
        // A bulk read switches the direction to splicing.
        let bulk = vec![b's'; 256 * 1024];
        client.write_all(&bulk).unwrap();
        want.extend_from_slice(&bulk);
        recorder.until(want.len(), false);
        assert_eq!(
            recorder.got.len(),
            want.len(),
            "bulk prefix; log:\n{}",
            daemon.log()
        );
    }
    client.write_all(&[b'a'; 100]).unwrap();
    std::thread::sleep(Duration::from_millis(20));
    socket2::SockRef::from(&client).send_out_of_band(b"!").unwrap();
    std::thread::sleep(Duration::from_millis(20));
    client.write_all(&vec![b'b'; after]).unwrap();
    want.extend_from_slice(&[b'a'; 100]);
    want.push(b'!');
    want.extend_from_slice(&vec![b'b'; after]);
    if close {
        client.shutdown(Shutdown::Write).unwrap();
    }
    recorder.until(want.len(), close);
    assert_eq!(
        recorder.got.len(),
        want.len(),
        "splice={splice} close={close}: the upstream got {} of {} bytes; log:\n{}",
        recorder.got.len(),
        want.len(),
        daemon.log()
    );
    assert!(recorder.got == want, "bytes out of order or altered");
    if close {
        assert!(recorder.ended, "the end of stream was not passed on");
    } else {
        assert!(!recorder.ended, "the connection was closed");
    }
}

#[test]
fn urgent_data_interactive_connection_stays_open() {
    urgent_data_is_relayed_in_line(false, false);
}

#[test]
fn urgent_data_interactive_then_close() {
    urgent_data_is_relayed_in_line(false, true);
}

#[test]
fn urgent_data_while_splicing_connection_stays_open() {
    urgent_data_is_relayed_in_line(true, false);
}

#[test]
fn urgent_data_while_splicing_then_close() {
    urgent_data_is_relayed_in_line(true, true);
}

/// A kernel that refuses splice on every connection: each one falls back to copying without
/// losing a byte, every fallback is counted, and the warning is rate-limited like the other
/// per-event warnings instead of one line per connection.
#[test]
fn splice_refused_everywhere_is_counted_and_logged_rate_limited() {
    const CONNECTIONS: usize = 30;
    let upstream = Upstream::echo();
    let port = free_port();
    let daemon = Daemon::start_with(&config_one_route(port, upstream.addr, "", ""), without_splice);
    for i in 0..CONNECTIONS {
        let mut client = TcpStream::connect(local(port)).unwrap();
        let bulk = vec![i as u8; 64 * 1024];
        let mut writer = client.try_clone().unwrap();
        let sent = bulk.clone();
        let t = std::thread::spawn(move || writer.write_all(&sent));
        let mut back = vec![0u8; bulk.len()];
        client.read_exact(&mut back).unwrap();
        t.join().unwrap().unwrap();
        assert!(back == bulk, "connection {i}: bytes altered");
    }
    // Lines reach stderr through the log's writer thread: wait for the first.
    // If it never comes: no fallback logged.
    daemon.expect_log("kernel refused splice", Duration::from_secs(5));
    let lines = daemon.log_lines("kernel refused splice");
    assert!(
        lines.len() <= 10,
        "{} warning lines for {CONNECTIONS} connections",
        lines.len()
    );
    let status = daemon.health_request("GET /status HTTP/1.0\r\n\r\n").unwrap();
    let doc: serde_json::Value = serde_json::from_str(status.split("\r\n\r\n").nth(1).unwrap()).unwrap();
    assert!(
        doc["relay"]["fallback_refused"].as_u64().unwrap() >= CONNECTIONS as u64,
        "{doc}"
    );
}

#[test]
fn urgent_data_followed_by_a_bulk_write_interactive() {
    urgent_data_case(false, false, 40 * 1024);
}

#[test]
fn urgent_data_followed_by_a_bulk_write_while_splicing() {
    urgent_data_case(true, false, 40 * 1024);
}

/// The copy-or-splice mode follows the traffic: a direction that streamed (a bulk upload) and then
/// trickles (keystrokes) copies the small bursts again, one recv and one send each, instead of
/// three splices.
#[test]
fn a_direction_that_streamed_copies_again_when_it_trickles() {
    let upstream = Upstream::echo();
    let port = free_port();
    let mut daemon = Daemon::start(&config_one_route(port, upstream.addr, "", ""));
    let mut client = TcpStream::connect(local(port)).unwrap();
    client.set_nodelay(true).unwrap();
    // Bulk first: both directions switch to splicing.
    let bulk = vec![0x42u8; 4 * MIB as usize];
    let mut reader = client.try_clone().unwrap();
    let echoed = std::thread::spawn(move || {
        let mut back = vec![0u8; 4 * MIB as usize];
        reader.read_exact(&mut back).map(|()| back)
    });
    client.write_all(&bulk).unwrap();
    assert_eq!(echoed.join().unwrap().unwrap(), bulk);
    // Then 3,000 small exchanges: 300 KB each way, far more than the copies before streaming.
    for i in 0..3000u32 {
        let message = format!("{i:0100}");
        echo_roundtrip(&mut client, message.as_bytes()).unwrap();
    }
    drop(client);
    daemon.expect_log("connection closed", Duration::from_secs(10));
    assert!(daemon.stop().success());
    let summary = daemon.expect_log(" stopped relayed=", Duration::from_secs(1));
    let copied: u64 = field(&summary, "copied_bytes").unwrap().parse().unwrap();
    assert!(
        copied >= 2 * 290_000,
        "the small exchanges after the bulk transfer were spliced: {summary}"
    );
}
