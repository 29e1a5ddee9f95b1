//! Classifying a connection's first bytes ("auto"): header, no header, or not enough yet.

use super::*;

#[test]
fn first_bytes_are_told_apart_as_soon_as_they_can_be() {
    assert_eq!(classify(&SIGNATURE), Some(First::Header));
    assert_eq!(classify(&SIGNATURE[..5]), None);
    assert_eq!(classify(b""), None);
    assert_eq!(classify(b"SSH-2.0-OpenSSH_9.6\r\n"), Some(First::Other));
    assert_eq!(classify(&[0x16, 0x03, 0x01]), Some(First::Other));
    assert_eq!(classify(b"GET / HTTP/1.1\r\n"), Some(First::Other));
    assert_eq!(classify(b"PROXY TCP4 1.2.3.4"), Some(First::Version1));
    assert_eq!(classify(b"PROX"), None);
    assert_eq!(classify(b"PROXZ"), Some(First::Other));
    assert_eq!(classify(b"\r\n\r\nX"), Some(First::Other));
    let mut almost = SIGNATURE;
    almost[11] = b'?';
    assert_eq!(classify(&almost), Some(First::Other));
}
