//! The PostgreSQL wire protocol as the tests need it, written from the protocol documentation
//! (<https://www.postgresql.org/docs/current/protocol-message-formats.html>) and PostgreSQL's
//! `src/include/libpq/pqcomm.h`, independently of `pgleader::pgwire`: a test that builds its
//! inputs or reads the proxy's answers with the parser under test would agree with that parser
//! whatever it does.

#![allow(dead_code)] // each test binary uses a different part of the harness

/// `NEGOTIATE_SSL_CODE` = 1234 << 16 | 5679 (pqcomm.h).
pub const SSL_REQUEST_CODE: u32 = 80_877_103;
/// `NEGOTIATE_GSS_CODE` = 1234 << 16 | 5680 (pqcomm.h).
pub const GSSENC_REQUEST_CODE: u32 = 80_877_104;
/// `CANCEL_REQUEST_CODE` = 1234 << 16 | 5678 (pqcomm.h).
pub const CANCEL_REQUEST_CODE: u32 = 80_877_102;
/// `PG_PROTOCOL(3, 0)`: major version in the high 16 bits, minor in the low.
pub const PROTOCOL_3_0: u32 = 3 << 16;

/// An 8-byte packet: the length and a code (SSLRequest, GSSENCRequest, a bare header).
pub fn header(len: u32, code: u32) -> Vec<u8> {
    [len.to_be_bytes(), code.to_be_bytes()].concat()
}

/// A StartupMessage: int32 length, int32 protocol version, `name\0value\0` pairs, a final `\0`.
pub fn startup_message(version: u32, params: &[(&str, &str)]) -> Vec<u8> {
    let mut body = version.to_be_bytes().to_vec();
    for (k, v) in params {
        body.extend_from_slice(k.as_bytes());
        body.push(0);
        body.extend_from_slice(v.as_bytes());
        body.push(0);
    }
    body.push(0);
    let len = u32::try_from(body.len() + 4).expect("a test packet fits u32");
    [len.to_be_bytes().to_vec(), body].concat()
}

/// A 3.0 StartupMessage for `user` and `database`.
pub fn startup(user: &str, database: &str) -> Vec<u8> {
    startup_message(PROTOCOL_3_0, &[("user", user), ("database", database)])
}

/// The fields of an ErrorResponse that the tests look at.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ErrorFields {
    /// `S`: ERROR, FATAL, PANIC (localized) or `V` (never localized) when present.
    pub severity: String,
    /// `C`: the SQLSTATE.
    pub code: String,
    /// `M`: the primary message.
    pub message: String,
}

/// Parses one whole ErrorResponse (`E`, int32 length counting itself, then fields: a type byte
/// and a C string each, ended by a 0 byte) that fills `bytes` exactly; `None` for anything else.
pub fn error_response(bytes: &[u8]) -> Option<ErrorFields> {
    let (&tag, rest) = bytes.split_first()?;
    let len = u32::from_be_bytes(rest.get(..4)?.try_into().ok()?) as usize;
    if tag != b'E' || len != rest.len() || len < 5 {
        return None;
    }
    let mut fields = &rest[4..];
    let (mut s, mut v, mut c, mut m) = (None, None, None, None);
    loop {
        let (&kind, after) = fields.split_first()?;
        if kind == 0 {
            if !after.is_empty() {
                return None;
            }
            break;
        }
        let end = after.iter().position(|&b| b == 0)?;
        let text = String::from_utf8(after[..end].to_vec()).ok()?;
        match kind {
            b'S' => s = Some(text),
            b'V' => v = Some(text),
            b'C' => c = Some(text),
            b'M' => m = Some(text),
            _ => {}
        }
        fields = &after[end + 1..];
    }
    Some(ErrorFields { severity: v.or(s)?, code: c?, message: m? })
}
