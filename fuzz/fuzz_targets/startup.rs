//! Fuzz target `startup`: the sans-IO wire code a hostile client or a broken backend can reach.
//!
//! The input is used raw (so the corpus holds real packets) as:
//! - a client's first bytes for `pgwire::parse_first_packet`;
//! - a backend's first reply for `pgwire::classify_backend_reply` and `parse_error_response`;
//! - the source of a SQLSTATE and a message for an `error_response` round trip.
//!
//! Invariants checked (beyond "never panics"):
//! - a parsed packet consumed exactly its declared length, within 8..=10,000 and the input;
//!   every strict prefix of it is "need more bytes"; trailing bytes change nothing;
//! - SSL/GSSENC requests are exactly 8 bytes; a cancel request's pid and secret are its bytes;
//! - a StartupMessage re-encoded with `encode_startup` is byte-identical and parses the same;
//! - an error's SQLSTATE is 08P01, or 0A000 for a protocol major version other than 3;
//! - the backend-reply classification is monotone: "incomplete" until a verdict, which more
//!   bytes never change, and 57P03 only for a complete ErrorResponse carrying it.

#![no_main]

use libfuzzer_sys::fuzz_target;
use pgleader::pgwire::{
    self, BackendReply, FirstPacket, StartupError, CANCEL_REQUEST_CODE, GSSENC_REQUEST_CODE, MAX_STARTUP_PACKET_LENGTH,
    SSL_REQUEST_CODE,
};

fuzz_target!(|data: &[u8]| {
    first_packet(data);
    backend_reply(data);
    error_round_trip(data);
});

fn be32(b: &[u8]) -> u32 {
    u32::from_be_bytes([b[0], b[1], b[2], b[3]])
}

fn first_packet(data: &[u8]) {
    let result = pgwire::parse_first_packet(data);
    match &result {
        Ok(Some((packet, used))) => {
            let used = *used;
            assert!(used <= data.len(), "consumed {used} of {} bytes", data.len());
            assert_eq!(used, be32(data) as usize, "consumed length is the declared length");
            assert!((8..=MAX_STARTUP_PACKET_LENGTH).contains(&used));
            let code = be32(&data[4..]);
            match packet {
                FirstPacket::SslRequest => assert!(code == SSL_REQUEST_CODE && used == 8),
                FirstPacket::GssEncRequest => assert!(code == GSSENC_REQUEST_CODE && used == 8),
                FirstPacket::CancelRequest { pid, secret } => {
                    assert_eq!(code, CANCEL_REQUEST_CODE);
                    assert_eq!(*pid, be32(&data[8..]));
                    assert_eq!(secret.as_slice(), &data[12..used]);
                    assert!((4..=256).contains(&secret.len()), "secret of {} bytes", secret.len());
                }
                FirstPacket::Startup { minor, params } => {
                    assert_eq!(code >> 16, 3, "only protocol 3.x is accepted");
                    assert_eq!(u32::from(*minor), code & 0xffff);
                    let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
                    assert!(refs.iter().all(|(k, _)| !k.is_empty()), "an empty key ends the list");
                    let again = pgwire::encode_startup(*minor, &refs);
                    assert_eq!(again.as_slice(), &data[..used], "re-encoding gives the same bytes");
                    let reparsed = pgwire::parse_first_packet(&again).expect("re-encoded packet parses");
                    assert_eq!(reparsed, Some((packet.clone(), used)));
                    if let Some((k, v)) = params.first() {
                        assert_eq!(packet.param(k), Some(v.as_str()));
                    }
                }
            }
            // The proxy reads more than one packet into its buffer: the suffix must not matter,
            // and a packet cut short anywhere must ask for more bytes, not fail or succeed.
            assert_eq!(pgwire::parse_first_packet(&data[..used]), result);
            for cut in prefix_cuts(used) {
                assert_eq!(pgwire::parse_first_packet(&data[..cut]), Ok(None), "prefix of {cut} bytes");
            }
        }
        Ok(None) => {
            assert_ne!(data.first(), Some(&0x16), "a TLS handshake byte is rejected at once");
            if data.len() >= 4 {
                let len = be32(data) as usize;
                assert!((8..=MAX_STARTUP_PACKET_LENGTH).contains(&len), "length {len} accepted as pending");
                assert!(data.len() < len, "complete packet reported as incomplete");
            }
        }
        Err(e) => {
            let code = e.sqlstate();
            match e {
                StartupError::UnsupportedVersion { major, .. } => {
                    assert_ne!(*major, 3);
                    assert_eq!(code, "0A000");
                }
                StartupError::TooShort(len) => assert!((*len as usize) < 8 && code == "08P01"),
                StartupError::TooLarge(len) => {
                    assert!((*len as usize) > MAX_STARTUP_PACKET_LENGTH && code == "08P01")
                }
                StartupError::DirectTls => assert!(data.first() == Some(&0x16) && code == "08P01"),
                StartupError::BadLength { .. } | StartupError::BadParams(_) => assert_eq!(code, "08P01"),
            }
            // The message goes into an ErrorResponse: it must encode and parse back.
            let text = format!("pgleader: {e}");
            let fields = pgwire::parse_error_response(&pgwire::error_response(code, &text)).expect("an ErrorResponse");
            assert_eq!((fields.code.as_str(), fields.message.as_str()), (code, text.as_str()));
        }
    }
}

/// Cut points to test: all of them for small packets, a spread (ends included) for large ones.
fn prefix_cuts(len: usize) -> Vec<usize> {
    if len <= 300 {
        (0..len).collect()
    } else {
        (0..len).step_by(len / 97 + 1).chain([len - 1]).collect()
    }
}

fn backend_reply(data: &[u8]) {
    let verdict = pgwire::classify_backend_reply(data);
    match verdict {
        BackendReply::Incomplete => {
            assert!(data.first().is_none_or(|&t| t == b'E'));
            if data.len() >= 5 {
                let len = be32(&data[1..]) as usize;
                assert!((4..=MAX_STARTUP_PACKET_LENGTH).contains(&len) && data.len() < 1 + len);
            }
        }
        BackendReply::CannotConnectNow => {
            let len = be32(&data[1..]) as usize;
            let msg = &data[..1 + len];
            assert!(msg[5..].split(|&b| b == 0).any(|field| field == b"C57P03"), "57P03 without its field");
            // (`parse_error_response` keeps the last `C` field, so it may show another code.)
            assert!(pgwire::parse_error_response(msg).is_some(), "a 57P03 reply is an ErrorResponse");
        }
        BackendReply::Proceed => {}
    }
    // Monotone: every prefix is incomplete or already the final verdict.
    let mut decided = false;
    for cut in prefix_cuts(data.len()) {
        let v = pgwire::classify_backend_reply(&data[..cut]);
        if decided {
            assert_eq!(v, verdict, "verdict changed after {cut} bytes");
        } else if v != BackendReply::Incomplete {
            assert_eq!(v, verdict, "an early verdict at {cut} bytes differs from the final one");
            decided = true;
        }
    }
    if let Some(fields) = pgwire::parse_error_response(data) {
        assert_eq!(data.first(), Some(&b'E'));
        let _ = fields.to_string();
    }
}

fn error_round_trip(data: &[u8]) {
    let Some((&split, rest)) = data.split_first() else { return };
    let at = usize::from(split).min(rest.len());
    let code = String::from_utf8_lossy(&rest[..at]);
    let message = String::from_utf8_lossy(&rest[at..]);
    let msg = pgwire::error_response(&code, &message);
    assert_eq!(be32(&msg[1..]) as usize + 1, msg.len(), "length field covers the message");
    assert_eq!(msg.last(), Some(&0));
    let clean = |s: &str| s.replace('\0', "");
    let fields = pgwire::parse_error_response(&msg).expect("our own ErrorResponse parses");
    assert_eq!(fields.severity, "FATAL");
    assert_eq!(fields.code, clean(&code));
    assert_eq!(fields.message, clean(&message));
    let expect = if msg.len() - 1 > MAX_STARTUP_PACKET_LENGTH {
        BackendReply::Proceed
    } else if fields.code == "57P03" {
        BackendReply::CannotConnectNow
    } else {
        BackendReply::Proceed
    };
    assert_eq!(pgwire::classify_backend_reply(&msg), expect, "code {:?}", fields.code);
}
