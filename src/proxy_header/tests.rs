//! The PROXY v2 header's parser and encoder on real and hostile bytes.

use super::*;

fn v4(a: &str) -> SocketAddr {
    a.parse().unwrap()
}

#[test]
fn ipv4_proxy_with_azure_link_id_between_other_tlvs() {
    let header = Header {
        command: Command::Proxy,
        addresses: Some((v4("203.0.113.7:50123"), v4("10.0.0.5:60001"))),
        tlvs: vec![
            (0x04, vec![]),
            azure_link_tlv(587_202_560),
            (0x30, b"unknown".to_vec()),
        ],
        link_id: Some(587_202_560),
    };
    let bytes = encode(&header);
    assert_eq!(&bytes[..12], &SIGNATURE);
    assert_eq!(bytes[12], 0x21);
    assert_eq!(bytes[13], 0x11);
    assert_eq!(parse(&bytes).unwrap(), header);
    assert_eq!(header_len(bytes[..16].try_into().unwrap()).unwrap(), bytes.len());
}

#[test]
fn ipv6_unspec_and_local() {
    let six = Header {
        command: Command::Proxy,
        addresses: Some((
            "[2001:db8::7]:443".parse().unwrap(),
            "[2001:db8::5]:60001".parse().unwrap(),
        )),
        tlvs: vec![],
        link_id: None,
    };
    assert_eq!(parse(&encode(&six)).unwrap(), six);
    let local = Header {
        command: Command::Local,
        addresses: None,
        tlvs: vec![],
        link_id: None,
    };
    let bytes = encode(&local);
    assert_eq!(bytes.len(), 16);
    assert_eq!(bytes[12], 0x20);
    assert_eq!(parse(&bytes).unwrap(), local);
}

#[test]
fn an_azure_tlv_of_the_wrong_shape_gives_no_link_id() {
    let mut header = Header {
        command: Command::Proxy,
        addresses: None,
        tlvs: vec![(AZURE_TLV, vec![0x01, 1, 2, 3])],
        link_id: None,
    };
    assert_eq!(parse(&encode(&header)).unwrap().link_id, None);
    header.tlvs = vec![(AZURE_TLV, vec![0x02, 1, 2, 3, 4])];
    assert_eq!(parse(&encode(&header)).unwrap().link_id, None);
}

#[test]
fn refusals() {
    let mut bytes = encode(&Header {
        command: Command::Proxy,
        addresses: Some((v4("1.2.3.4:5"), v4("6.7.8.9:10"))),
        tlvs: vec![],
        link_id: None,
    });
    // Version 1, a bad command, a bad family.
    bytes[12] = 0x11;
    assert!(matches!(parse(&bytes), Err(Refusal::Malformed(_))));
    bytes[12] = 0x2F;
    assert!(matches!(parse(&bytes), Err(Refusal::Malformed(_))));
    bytes[12] = 0x21;
    bytes[13] = 0x31;
    assert!(matches!(parse(&bytes), Err(Refusal::Malformed(_))));
    // Addresses cut short by the length.
    let mut short = encode(&Header {
        command: Command::Proxy,
        addresses: None,
        tlvs: vec![],
        link_id: None,
    });
    short[13] = 0x11;
    short[15] = 4;
    short.extend_from_slice(&[1, 2, 3, 4]);
    assert!(matches!(parse(&short), Err(Refusal::Malformed(_))));
    // A TLV that runs past the end.
    let mut tlv = encode(&Header {
        command: Command::Proxy,
        addresses: None,
        tlvs: vec![(0x05, vec![1, 2, 3])],
        link_id: None,
    });
    tlv[17] = 9;
    assert!(matches!(parse(&tlv), Err(Refusal::Malformed(_))));
    // Oversized, v1 text, and plain garbage.
    let mut big = [0u8; 16];
    big[..12].copy_from_slice(&SIGNATURE);
    big[14] = 0xFF;
    assert!(matches!(header_len(&big), Err(Refusal::Oversized(_))));
    assert_eq!(could_be_header(b"PROXY TCP4 1.2.3.4"), Err(Refusal::Version1));
    assert_eq!(could_be_header(b"PRO"), Ok(()));
    assert_eq!(could_be_header(b"SSH-2.0-"), Err(Refusal::Missing));
    assert_eq!(could_be_header(&SIGNATURE[..5]), Ok(()));
}
