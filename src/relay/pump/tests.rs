//! One direction in-process, on real loopback sockets: a writer thread on the far end of `src`,
//! a reader thread on the far end of `dst`, and the pump between them, with every count checked
//! against what arrived.

use std::io::{Read, Write};
use std::net::{Shutdown as Half, TcpListener};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use super::*;
use crate::connections::{Activity, Direction, DirectionState};
use crate::relay::buffers::BufferPool;
use crate::shutdown::Drain;
use crate::state::RelayStats;

/// What a pump needs around it, owned by the test.
struct Rig {
    pool: Option<PipePool>,
    buffers: BufferPool,
    stats: RelayStats,
    direction: Direction,
    total: AtomicU64,
    activity: Activity,
}

impl Rig {
    fn new(splice: bool) -> Rig {
        Rig {
            pool: splice.then(|| PipePool::new(4)),
            buffers: BufferPool::default(),
            stats: RelayStats::default(),
            direction: Direction::new(0, 0, DirectionState::Running),
            total: AtomicU64::new(0),
            activity: Activity::since(Duration::ZERO, Duration::ZERO),
        }
    }

    fn flow(&self) -> Flow<'_> {
        Flow {
            pipes: self.pool.as_ref(),
            buffers: &self.buffers,
            stats: &self.stats,
            direction: &self.direction,
            total: &self.total,
            activity: &self.activity,
        }
    }

    /// Every count agrees with `delivered` bytes having gone through, none in flight.
    fn check_counts(&self, delivered: u64) {
        assert_eq!(self.direction.bytes_read(), delivered, "read");
        assert_eq!(self.direction.bytes_written(), delivered, "written");
        assert_eq!(self.total.load(Ordering::Relaxed), delivered, "route total");
        let engine = self.stats.spliced_bytes.load(Ordering::Relaxed)
            + self.stats.copied_bytes.load(Ordering::Relaxed);
        assert_eq!(engine, delivered, "engine: spliced + copied");
        assert!(!self.activity.bytes_in_flight(), "bytes still in flight");
    }
}

/// A connected pair: the far end (blocking std) and the near end (tokio), with SO_OOBINLINE on
/// the near end as the route sets it.
fn pair() -> (std::net::TcpStream, tokio::net::TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let far = std::net::TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (near, _) = listener.accept().unwrap();
    socket2::SockRef::from(&near)
        .set_out_of_band_inline(true)
        .unwrap();
    near.set_nonblocking(true).unwrap();
    (far, tokio::net::TcpStream::from_std(near).unwrap())
}

/// A byte pattern that shows a lost, doubled or reordered chunk.
fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// A reader of everything the far end of `dst` receives, until EOF.
fn reader(mut far: std::net::TcpStream, wait: Duration) -> std::thread::JoinHandle<Vec<u8>> {
    std::thread::spawn(move || {
        std::thread::sleep(wait);
        let mut got = Vec::new();
        far.read_to_end(&mut got).unwrap();
        got
    })
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap()
}

/// Runs one direction from a fresh start until it returns.
async fn run(
    rig: &Rig,
    src: &mut tokio::net::TcpStream,
    dst: &mut tokio::net::TcpStream,
    park: &ParkRequest,
    from: OpenSide,
) -> Result<SideEnd, PumpError> {
    let (mut src_r, _src_w) = src.split();
    let (_dst_r, mut dst_w) = dst.split();
    // A byte left behind shows as a direction that never ends.
    let direction = pump(&mut src_r, &mut dst_w, rig.flow(), park, from);
    match tokio::time::timeout(Duration::from_secs(20), direction).await {
        Ok(end) => end,
        Err(_) => panic!("the direction did not end in 20 s: bytes left behind?"),
    }
}

#[test]
fn short_reads_arrive_whole_and_in_order() {
    for splice in [false, true] {
        let rt = runtime();
        let _guard = rt.enter();
        let rig = Rig::new(splice);
        let (mut src_far, mut src) = pair();
        let (dst_far, mut dst) = pair();
        let sent = pattern(300_000, 7);
        let chunks = sent.clone();
        let writer = std::thread::spawn(move || {
            // Sizes prime to every buffer size, some with a pause so reads come back short.
            for (i, chunk) in chunks.chunks(1_237).enumerate() {
                src_far.write_all(chunk).unwrap();
                if i % 17 == 0 {
                    std::thread::sleep(Duration::from_millis(1));
                }
            }
            src_far.shutdown(Half::Write).unwrap();
        });
        let got = reader(dst_far, Duration::ZERO);
        let drain = Drain::new();
        let park = drain.handle().park_request();
        let end = rt.block_on(run(&rig, &mut src, &mut dst, &park, OpenSide::default()));
        assert!(matches!(end, Ok(SideEnd::Ended)), "splice={splice}: {end:?}");
        drop(dst);
        writer.join().unwrap();
        assert!(got.join().unwrap() == sent, "splice={splice}: bytes differ");
        rig.check_counts(sent.len() as u64);
    }
}

/// Bulk data splices; keystrokes after it copy.
#[test]
fn bulk_splices_and_a_trickle_after_it_copies() {
    let rt = runtime();
    let _guard = rt.enter();
    let rig = Rig::new(true);
    let (mut src_far, mut src) = pair();
    let (dst_far, mut dst) = pair();
    let bulk = pattern(4 << 20, 3);
    let mut sent = bulk.clone();
    sent.extend_from_slice(b"keystrokes");
    let writer = std::thread::spawn(move || {
        src_far.write_all(&bulk).unwrap();
        std::thread::sleep(Duration::from_millis(100));
        for key in b"keystrokes" {
            src_far.write_all(&[*key]).unwrap();
            std::thread::sleep(Duration::from_millis(2));
        }
        src_far.shutdown(Half::Write).unwrap();
    });
    let got = reader(dst_far, Duration::ZERO);
    let park = Drain::new().handle().park_request();
    let end = rt.block_on(run(&rig, &mut src, &mut dst, &park, OpenSide::default()));
    assert!(matches!(end, Ok(SideEnd::Ended)), "{end:?}");
    drop(dst);
    writer.join().unwrap();
    assert!(got.join().unwrap() == sent, "bytes differ");
    rig.check_counts(sent.len() as u64);
    assert!(rig.stats.spliced_bytes.load(Ordering::Relaxed) >= 1 << 20);
    assert!(rig.stats.copied_bytes.load(Ordering::Relaxed) >= 10);
}

/// TCP urgent data in the middle of the stream, in copy mode and in splice mode: a short read
/// and splice both stop at the urgent mark with bytes still queued; nothing may be left behind.
/// Everything is queued before the direction starts, so the mark is met mid-burst.
#[test]
fn the_urgent_mark_is_read_past_in_line() {
    for splice in [false, true] {
        let rt = runtime();
        let _guard = rt.enter();
        let rig = Rig::new(splice);
        let (mut src_far, mut src) = pair();
        let (dst_far, mut dst) = pair();
        let before = pattern(3_000, 1);
        let after = pattern(5_000, 2);
        let mut sent = before.clone();
        sent.push(b'!');
        sent.extend_from_slice(&after);
        src_far.write_all(&before).unwrap();
        socket2::SockRef::from(&src_far).send_out_of_band(b"!").unwrap();
        src_far.write_all(&after).unwrap();
        // The FIN only once everything arrived: a socket that has read its FIN is always ready
        // again, which would hide bytes left behind at the mark.
        let expected = sent.len();
        let got = std::thread::spawn(move || {
            let mut far = dst_far;
            far.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let mut got = vec![0; expected];
            let read = far.read_exact(&mut got);
            src_far.shutdown(Half::Write).unwrap();
            read.map(|()| got)
        });
        let park = Drain::new().handle().park_request();
        let from = OpenSide { splice, carry: None };
        let end = rt.block_on(run(&rig, &mut src, &mut dst, &park, from));
        assert!(matches!(end, Ok(SideEnd::Ended)), "splice={splice}: {end:?}");
        let got = got.join().unwrap();
        assert!(
            got.is_ok_and(|got| got == sent),
            "splice={splice}: bytes differ or missing"
        );
        rig.check_counts(sent.len() as u64);
        if splice {
            // Spliced up to the mark, copied past it.
            assert!(rig.stats.spliced_bytes.load(Ordering::Relaxed) >= before.len() as u64);
            assert!(rig.stats.copied_bytes.load(Ordering::Relaxed) > 0);
        }
    }
}

/// `src` ends (FIN) while the pipe still holds bytes `dst` has no room for: the direction ends
/// only once every one of them is out.
#[test]
fn an_end_of_stream_waits_for_the_bytes_in_the_pipe() {
    let rt = runtime();
    let _guard = rt.enter();
    let rig = Rig::new(true);
    let (mut src_far, mut src) = pair();
    let (dst_far, mut dst) = pair();
    let sent = pattern(8 << 20, 5);
    let bytes = sent.clone();
    let writer = std::thread::spawn(move || {
        src_far.write_all(&bytes).unwrap();
        src_far.shutdown(Half::Write).unwrap();
    });
    // The reader starts late: `dst` and the pipe fill, and the FIN is read before they drain.
    let got = reader(dst_far, Duration::from_millis(300));
    let park = Drain::new().handle().park_request();
    let end = rt.block_on(run(&rig, &mut src, &mut dst, &park, OpenSide::default()));
    assert!(matches!(end, Ok(SideEnd::Ended)), "{end:?}");
    assert_eq!(rig.direction.bytes_written(), sent.len() as u64);
    drop(dst);
    writer.join().unwrap();
    assert!(got.join().unwrap() == sent, "bytes differ");
    rig.check_counts(sent.len() as u64);
}

/// A park while `dst` is full: the direction returns what it read and did not write as its
/// carry (the pipe when splicing, bytes when copying), exactly the difference of its counts;
/// resumed from there, every byte arrives in order.
#[test]
fn a_park_with_dst_full_carries_the_rest_and_resumes_from_it() {
    for splice in [false, true] {
        let rt = runtime();
        let _guard = rt.enter();
        let mut rig = Rig::new(splice);
        let (mut src_far, mut src) = pair();
        let (dst_far, mut dst) = pair();
        let sent = pattern(16 << 20, 9);
        let bytes = sent.clone();
        let writer = std::thread::spawn(move || {
            src_far.write_all(&bytes).unwrap();
            src_far.shutdown(Half::Write).unwrap();
        });
        let drain = Drain::new();
        let handle = drain.handle();
        let park = handle.park_request();
        let parked = rt.block_on(async {
            let (mut src_r, _) = src.split();
            let (_, mut dst_w) = dst.split();
            let direction = pump(&mut src_r, &mut dst_w, rig.flow(), &park, OpenSide::default());
            tokio::pin!(direction);
            // Nobody reads `dst`: the direction stalls with bytes read and not written.
            let stalled = tokio::time::timeout(Duration::from_millis(300), &mut direction).await;
            assert!(stalled.is_err(), "splice={splice}: ended with nobody reading");
            tokio::spawn(drain.park(Duration::from_secs(5)));
            tokio::time::timeout(Duration::from_secs(5), direction).await
        });
        let Ok(Ok(SideEnd::Parked(open))) = parked else {
            panic!("splice={splice}: did not park: {parked:?}");
        };
        drop(handle);
        let held = rig.direction.bytes_read() - rig.direction.bytes_written();
        let carried = open.carry.as_ref().map_or(0, |c| c.len() as u64);
        assert_eq!(held, carried, "splice={splice}: held vs carried");
        assert!(carried > 0, "splice={splice}: nothing carried");
        match open.carry.as_deref() {
            Some(Carry::Pipe { .. }) => assert!(splice, "a pipe carried while copying"),
            Some(Carry::Bytes(_)) => assert!(!splice, "bytes carried while splicing"),
            None => unreachable!(),
        }
        assert_eq!(open.splice, splice);

        // Resumed, as the next program image would (with clocks of its own): the carry goes out
        // first.
        rig.activity = Activity::since(Duration::ZERO, Duration::ZERO);
        let got = reader(dst_far, Duration::ZERO);
        let park = Drain::new().handle().park_request();
        let end = rt.block_on(run(&rig, &mut src, &mut dst, &park, open));
        assert!(matches!(end, Ok(SideEnd::Ended)), "splice={splice}: {end:?}");
        drop(dst);
        writer.join().unwrap();
        assert!(
            got.join().unwrap() == sent,
            "splice={splice}: bytes differ after the park"
        );
        rig.check_counts(sent.len() as u64);
    }
}
