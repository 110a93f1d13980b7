//! The few pieces of the PostgreSQL wire protocol (3.x) that a TCP proxy needs, sans I/O.
//!
//! Owns: parsing a client's *first* packet (StartupMessage, SSLRequest, GSSENCRequest,
//! CancelRequest), encoding the `ErrorResponse` the proxy sends when it refuses a client, and
//! recognising a backend's 57P03 reply. It must not do I/O or logging: callers feed it bytes.
//!
//! Reference: <https://www.postgresql.org/docs/current/protocol-message-formats.html> and
//! `src/include/libpq/pqcomm.h` in the PostgreSQL tree.

use std::fmt;

/// PostgreSQL refuses startup packets longer than this (`MAX_STARTUP_PACKET_LENGTH`,
/// `src/include/libpq/pqcomm.h`); so do we.
pub const MAX_STARTUP_PACKET_LENGTH: usize = 10_000;
/// Every first packet is at least a length and a code.
const MIN_PACKET_LENGTH: usize = 8;
/// `NEGOTIATE_SSL_CODE` = 1234 << 16 | 5679 (pqcomm.h).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// `NEGOTIATE_GSS_CODE` = 1234 << 16 | 5680 (pqcomm.h).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// `CANCEL_REQUEST_CODE` = 1234 << 16 | 5678 (pqcomm.h).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// The 3.x protocol: major version 3 in the high 16 bits (`PG_PROTOCOL(3, 0)`).
const PROTOCOL_MAJOR_3: u16 = 3;
/// The largest cancel secret protocol 3.2 allows (PostgreSQL 18 docs, BackendKeyData).
const MAX_CANCEL_SECRET: usize = 256;
/// First byte of a TLS record (handshake), sent by a client that speaks TLS without SSLRequest.
const TLS_HANDSHAKE_BYTE: u8 = 0x16;

/// SQLSTATEs the proxy sends, chosen from the standard list (Appendix A of the PostgreSQL docs).
pub mod sqlstate {
    /// `cannot_connect_now`: no leader is routable (the same code Postgres uses while starting up).
    pub const CANNOT_CONNECT_NOW: &str = "57P03";
    /// `too_many_connections`: the proxy's `max_connections` is reached.
    pub const TOO_MANY_CONNECTIONS: &str = "53300";
    /// `invalid_authorization_specification`: the client's address is not allowed.
    pub const INVALID_AUTHORIZATION: &str = "28000";
    /// `protocol_violation`: the first packet is not a PostgreSQL startup packet.
    pub const PROTOCOL_VIOLATION: &str = "08P01";
    /// `feature_not_supported`: a protocol major version other than 3.
    pub const FEATURE_NOT_SUPPORTED: &str = "0A000";
}

/// A client's first packet, parsed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FirstPacket {
    /// Asks for TLS; the backend answers `S` or `N`.
    SslRequest,
    /// Asks for GSSAPI encryption; the proxy answers `N`.
    GssEncRequest,
    /// Cancels a query running on the backend process `pid`; never answered.
    CancelRequest { pid: u32, secret: Vec<u8> },
    /// A StartupMessage of protocol 3.`minor`, with its parameters in order.
    Startup { minor: u16, params: Vec<(String, String)> },
}

impl FirstPacket {
    /// The value of a startup parameter such as `user` or `database`.
    pub fn param(&self, key: &str) -> Option<&str> {
        match self {
            FirstPacket::Startup { params, .. } => params.iter().find(|(k, _)| k == key).map(|(_, v)| v.as_str()),
            _ => None,
        }
    }
}

/// Why a first packet was rejected. Purely syntactic: no I/O errors here.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum StartupError {
    #[error("startup packet length {0} is below the minimum of 8 bytes")]
    TooShort(u32),
    #[error("startup packet length {0} exceeds the limit of 10000 bytes")]
    TooLarge(u32),
    #[error("client sent a TLS handshake without SSLRequest; use sslmode=require (not direct TLS)")]
    DirectTls,
    #[error("unsupported frontend protocol {major}.{minor}: pgleader speaks protocol 3.x")]
    UnsupportedVersion { major: u16, minor: u16 },
    #[error("{what} request has length {len}, which is invalid for it")]
    BadLength { what: &'static str, len: u32 },
    #[error("malformed startup parameters: {0}")]
    BadParams(&'static str),
}

impl StartupError {
    /// The SQLSTATE to answer this error with.
    pub fn sqlstate(&self) -> &'static str {
        match self {
            StartupError::UnsupportedVersion { .. } => sqlstate::FEATURE_NOT_SUPPORTED,
            _ => sqlstate::PROTOCOL_VIOLATION,
        }
    }
}

/// Parses a client's first packet from the start of `buf`.
///
/// Returns `Ok(None)` while more bytes are needed, else the packet and how many bytes it used.
/// The length is checked before anything else is read, so a hostile length costs nothing.
///
/// # Errors
/// Any packet that is not a well-formed 3.x first packet (see [`StartupError`]).
pub fn parse_first_packet(buf: &[u8]) -> Result<Option<(FirstPacket, usize)>, StartupError> {
    if buf.first() == Some(&TLS_HANDSHAKE_BYTE) {
        return Err(StartupError::DirectTls);
    }
    let Some(len_bytes) = buf.get(..4) else { return Ok(None) };
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]);
    let len_usize = len as usize;
    if len_usize < MIN_PACKET_LENGTH {
        return Err(StartupError::TooShort(len));
    }
    if len_usize > MAX_STARTUP_PACKET_LENGTH {
        return Err(StartupError::TooLarge(len));
    }
    let Some(packet) = buf.get(..len_usize) else { return Ok(None) };
    let code = u32::from_be_bytes([packet[4], packet[5], packet[6], packet[7]]);
    let body = &packet[8..];
    let parsed = match code {
        SSL_REQUEST_CODE => exact(FirstPacket::SslRequest, "SSL", len, 8)?,
        GSSENC_REQUEST_CODE => exact(FirstPacket::GssEncRequest, "GSSENC", len, 8)?,
        CANCEL_REQUEST_CODE => {
            // pid (4 bytes) then a secret: 4 bytes in 3.0, up to 256 in 3.2.
            if body.len() < 8 || body.len() > 4 + MAX_CANCEL_SECRET {
                return Err(StartupError::BadLength { what: "cancel", len });
            }
            let pid = u32::from_be_bytes([body[0], body[1], body[2], body[3]]);
            FirstPacket::CancelRequest { pid, secret: body[4..].to_vec() }
        }
        _ => {
            let (major, minor) = ((code >> 16) as u16, (code & 0xffff) as u16);
            if major != PROTOCOL_MAJOR_3 {
                return Err(StartupError::UnsupportedVersion { major, minor });
            }
            FirstPacket::Startup { minor, params: parse_params(body)? }
        }
    };
    Ok(Some((parsed, len_usize)))
}

fn exact(packet: FirstPacket, what: &'static str, len: u32, want: u32) -> Result<FirstPacket, StartupError> {
    if len == want {
        Ok(packet)
    } else {
        Err(StartupError::BadLength { what, len })
    }
}

/// Key/value C-strings ending in an empty key (a lone NUL). Non-UTF-8 is rejected, never lossy.
fn parse_params(mut body: &[u8]) -> Result<Vec<(String, String)>, StartupError> {
    let mut params = Vec::new();
    loop {
        let key = take_cstr(&mut body)?;
        if key.is_empty() {
            return if body.is_empty() {
                Ok(params)
            } else {
                Err(StartupError::BadParams("bytes after the terminating NUL"))
            };
        }
        let value = take_cstr(&mut body)?;
        params.push((key, value));
    }
}

fn take_cstr(body: &mut &[u8]) -> Result<String, StartupError> {
    let nul = body.iter().position(|&b| b == 0).ok_or(StartupError::BadParams("missing NUL terminator"))?;
    let s = std::str::from_utf8(&body[..nul]).map_err(|_| StartupError::BadParams("parameter is not valid UTF-8"))?;
    *body = &body[nul + 1..];
    Ok(s.to_owned())
}

/// Encodes a StartupMessage (used by tests, benches and the fuzz round trip).
pub fn encode_startup(minor: u16, params: &[(&str, &str)]) -> Vec<u8> {
    let mut out = vec![0; 4];
    out.extend_from_slice(&((u32::from(PROTOCOL_MAJOR_3) << 16) | u32::from(minor)).to_be_bytes());
    for (k, v) in params {
        out.extend_from_slice(k.as_bytes());
        out.push(0);
        out.extend_from_slice(v.as_bytes());
        out.push(0);
    }
    out.push(0);
    let len = u32::try_from(out.len()).unwrap_or(u32::MAX);
    out[..4].copy_from_slice(&len.to_be_bytes());
    out
}

/// Encodes a FATAL `ErrorResponse` (`E`, length, `S`/`V`/`C`/`M` fields, NUL).
pub fn error_response(code: &str, message: &str) -> Vec<u8> {
    let mut out = Vec::with_capacity(32 + message.len());
    out.push(b'E');
    out.extend_from_slice(&[0; 4]);
    for (field, value) in [(b'S', "FATAL"), (b'V', "FATAL"), (b'C', code), (b'M', message)] {
        out.push(field);
        // A NUL inside a field would end it early; our messages never contain one.
        out.extend(value.bytes().filter(|&b| b != 0));
        out.push(0);
    }
    out.push(0);
    let len = u32::try_from(out.len() - 1).unwrap_or(u32::MAX);
    out[1..5].copy_from_slice(&len.to_be_bytes());
    out
}

/// What the start of a backend's reply to a StartupMessage says about routing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BackendReply {
    /// Not enough bytes yet to tell.
    Incomplete,
    /// An ErrorResponse with SQLSTATE 57P03: the server is starting up or shutting down.
    CannotConnectNow,
    /// Anything else: pass it to the client and splice.
    Proceed,
}

/// Classifies the first bytes a backend sent after a StartupMessage.
///
/// Only a complete `ErrorResponse` carrying `C57P03` counts as [`BackendReply::CannotConnectNow`];
/// messages longer than [`MAX_STARTUP_PACKET_LENGTH`] are passed on without being buffered.
pub fn classify_backend_reply(buf: &[u8]) -> BackendReply {
    let Some(&tag) = buf.first() else { return BackendReply::Incomplete };
    if tag != b'E' {
        return BackendReply::Proceed;
    }
    let Some(len_bytes) = buf.get(1..5) else { return BackendReply::Incomplete };
    let len = u32::from_be_bytes([len_bytes[0], len_bytes[1], len_bytes[2], len_bytes[3]]) as usize;
    if !(4..=MAX_STARTUP_PACKET_LENGTH).contains(&len) {
        return BackendReply::Proceed;
    }
    let Some(body) = buf.get(5..1 + len) else { return BackendReply::Incomplete };
    let is_57p03 = body
        .split(|&b| b == 0)
        .any(|field| field.first() == Some(&b'C') && &field[1..] == sqlstate::CANNOT_CONNECT_NOW.as_bytes());
    if is_57p03 {
        BackendReply::CannotConnectNow
    } else {
        BackendReply::Proceed
    }
}

/// Fields of an ErrorResponse, for tests and diagnostics.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    pub severity: String,
    pub code: String,
    pub message: String,
}

impl fmt::Display for ErrorFields {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}: {}", self.severity, self.code, self.message)
    }
}

/// Parses a complete ErrorResponse message (tag included); `None` if it is not one.
pub fn parse_error_response(msg: &[u8]) -> Option<ErrorFields> {
    if msg.first() != Some(&b'E') || msg.len() < 5 {
        return None;
    }
    let mut fields = ErrorFields::default();
    for field in msg[5..].split(|&b| b == 0) {
        let Some((&tag, value)) = field.split_first() else { continue };
        let value = String::from_utf8_lossy(value).into_owned();
        match tag {
            b'S' => fields.severity = value,
            b'C' => fields.code = value,
            b'M' => fields.message = value,
            _ => {}
        }
    }
    Some(fields)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn request(code: u32) -> Vec<u8> {
        let mut v = 8u32.to_be_bytes().to_vec();
        v.extend_from_slice(&code.to_be_bytes());
        v
    }

    #[test]
    fn parses_startup_and_reports_consumed_length() {
        let mut pkt = encode_startup(0, &[("user", "app"), ("database", "db")]);
        let len = pkt.len();
        pkt.extend_from_slice(b"trailing");
        let (parsed, used) = parse_first_packet(&pkt).unwrap().unwrap();
        assert_eq!(used, len);
        assert_eq!(parsed.param("user"), Some("app"));
        assert_eq!(parsed.param("database"), Some("db"));
    }

    #[test]
    fn needs_more_bytes_until_complete() {
        let pkt = encode_startup(0, &[("user", "app")]);
        for cut in 0..pkt.len() {
            assert_eq!(parse_first_packet(&pkt[..cut]), Ok(None), "cut at {cut}");
        }
    }

    #[test]
    fn accepts_any_3x_minor_and_rejects_other_majors() {
        let pkt = encode_startup(2, &[("user", "u")]);
        assert!(matches!(parse_first_packet(&pkt), Ok(Some((FirstPacket::Startup { minor: 2, .. }, _)))));
        let mut v2 = pkt.clone();
        v2[4..8].copy_from_slice(&(2u32 << 16).to_be_bytes());
        let err = parse_first_packet(&v2).unwrap_err();
        assert_eq!(err, StartupError::UnsupportedVersion { major: 2, minor: 0 });
        assert_eq!(err.sqlstate(), "0A000");
    }

    #[test]
    fn special_requests() {
        assert_eq!(parse_first_packet(&request(SSL_REQUEST_CODE)).unwrap().unwrap().0, FirstPacket::SslRequest);
        assert_eq!(parse_first_packet(&request(GSSENC_REQUEST_CODE)).unwrap().unwrap().0, FirstPacket::GssEncRequest);
        let mut ssl_long = 12u32.to_be_bytes().to_vec();
        ssl_long.extend_from_slice(&SSL_REQUEST_CODE.to_be_bytes());
        ssl_long.extend_from_slice(&[0; 4]);
        assert!(matches!(parse_first_packet(&ssl_long), Err(StartupError::BadLength { .. })));
    }

    #[test]
    fn cancel_request_with_30_and_32_secrets() {
        for secret_len in [4usize, 32, 256] {
            let mut v = ((12 + secret_len) as u32).to_be_bytes().to_vec();
            v.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
            v.extend_from_slice(&42u32.to_be_bytes());
            v.extend(std::iter::repeat_n(7, secret_len));
            let (p, used) = parse_first_packet(&v).unwrap().unwrap();
            assert_eq!(used, v.len());
            assert_eq!(p, FirstPacket::CancelRequest { pid: 42, secret: vec![7; secret_len] });
        }
        let mut too_long = (12 + 257u32).to_be_bytes().to_vec();
        too_long.extend_from_slice(&CANCEL_REQUEST_CODE.to_be_bytes());
        too_long.extend(std::iter::repeat_n(0, 261));
        assert!(parse_first_packet(&too_long).is_err());
    }

    #[test]
    fn rejects_bad_lengths_and_garbage() {
        assert_eq!(parse_first_packet(&[0, 0, 0, 4, 0, 0]), Err(StartupError::TooShort(4)));
        assert_eq!(parse_first_packet(&10_001u32.to_be_bytes()), Err(StartupError::TooLarge(10_001)));
        // An HTTP request reads as an enormous length.
        assert!(matches!(parse_first_packet(b"GET / HTTP/1.1\r\n"), Err(StartupError::TooLarge(_))));
        assert_eq!(parse_first_packet(&[0x16, 3, 1, 0, 0xc8]), Err(StartupError::DirectTls));
        let mut no_nul = encode_startup(0, &[("user", "app")]);
        let n = no_nul.len();
        no_nul[n - 1] = b'x';
        no_nul[n - 2] = b'x';
        assert!(matches!(parse_first_packet(&no_nul), Err(StartupError::BadParams(_))));
        let bad_utf8 = encode_startup(0, &[("user", "\u{e9}")]);
        let mut bad_utf8 = bad_utf8.clone();
        let pos = bad_utf8.iter().position(|&b| b == 0xc3).unwrap();
        bad_utf8[pos] = 0xff;
        assert_eq!(parse_first_packet(&bad_utf8), Err(StartupError::BadParams("parameter is not valid UTF-8")));
    }

    #[test]
    fn error_response_round_trips() {
        let msg = error_response("57P03", "no leader");
        let len = u32::from_be_bytes([msg[1], msg[2], msg[3], msg[4]]) as usize;
        assert_eq!(len + 1, msg.len());
        let fields = parse_error_response(&msg).unwrap();
        assert_eq!(
            (fields.severity.as_str(), fields.code.as_str(), fields.message.as_str()),
            ("FATAL", "57P03", "no leader")
        );
        assert_eq!(classify_backend_reply(&msg), BackendReply::CannotConnectNow);
        assert_eq!(classify_backend_reply(&msg[..msg.len() - 1]), BackendReply::Incomplete);
        assert_eq!(classify_backend_reply(&error_response("28P01", "auth")), BackendReply::Proceed);
        assert_eq!(classify_backend_reply(b"R\0\0\0\x08\0\0\0\0"), BackendReply::Proceed);
        assert_eq!(classify_backend_reply(b""), BackendReply::Incomplete);
    }

    proptest! {
        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
            let _ = parse_first_packet(&bytes);
            let _ = classify_backend_reply(&bytes);
            let _ = parse_error_response(&bytes);
        }

        #[test]
        fn encode_then_parse_round_trips(
            minor in 0u16..4,
            params in proptest::collection::vec(("[a-z_]{1,12}", "[^\u{0}]{0,20}"), 0..8),
        ) {
            let refs: Vec<(&str, &str)> = params.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
            let pkt = encode_startup(minor, &refs);
            prop_assume!(pkt.len() <= MAX_STARTUP_PACKET_LENGTH);
            let (parsed, used) = parse_first_packet(&pkt).unwrap().unwrap();
            prop_assert_eq!(used, pkt.len());
            prop_assert_eq!(parsed, FirstPacket::Startup { minor, params });
        }
    }
}
