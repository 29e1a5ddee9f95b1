//! Client-side helpers: loopback addresses, connecting from a chosen source, echo round trips,
//! HTTP requests to the health endpoint and the expectation of a reset.

use std::io::{self, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::time::Duration;

/// Sends `request` to 127.0.0.1:`port` from source `from` and returns the whole response, or the
/// error (a reset shows as ConnectionReset).
pub fn http_from(from: Ipv4Addr, port: u16, request: &str) -> io::Result<String> {
    let mut stream = connect_from(from, local(port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    stream.write_all(request.as_bytes())?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    Ok(String::from_utf8_lossy(&response).into_owned())
}

pub fn local(port: u16) -> SocketAddr {
    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::LOCALHOST, port))
}

/// Connects to `to` from source address `from` (any 127.x address works on loopback).
pub fn connect_from(from: Ipv4Addr, to: SocketAddr) -> io::Result<TcpStream> {
    let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
    socket.bind(&SocketAddr::V4(SocketAddrV4::new(from, 0)).into())?;
    socket.connect(&to.into())?;
    Ok(socket.into())
}

/// Writes one message and reads the same number of bytes back (through an echo upstream).
pub fn echo_roundtrip(stream: &mut TcpStream, message: &[u8]) -> io::Result<()> {
    stream.write_all(message)?;
    let mut back = vec![0u8; message.len()];
    stream.read_exact(&mut back)?;
    if back != message {
        return Err(io::Error::other("echo returned different bytes"));
    }
    Ok(())
}

/// Connects from `from` to `to` and expects ferryd to reset the connection. The reset can arrive
/// while connect() is still confirming the handshake, or on the first read.
pub fn expect_reset(from: Ipv4Addr, to: SocketAddr) {
    match connect_from(from, to) {
        Err(e) => assert_eq!(
            e.kind(),
            io::ErrorKind::ConnectionReset,
            "connect from {from}: {e}"
        ),
        Ok(mut stream) => {
            stream.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
            let result = stream.read(&mut [0u8; 16]);
            assert_eq!(
                result.map_err(|e| e.kind()),
                Err(io::ErrorKind::ConnectionReset),
                "connection from {from} was not reset"
            );
        }
    }
}
