//! The JSON that pgleader sends to etcd's v3 gateway and the decoding of its answers: pure
//! functions of bytes, no I/O, tested on their own.
//!
//! The gateway speaks protobuf's JSON mapping of etcd's `rpc.proto` (etcd 3.4 `api/v3`): field
//! names as in the `.proto` file (`mod_revision`, but `TTL` and `grantedTTL` for leases), int64 as
//! decimal strings, bytes as standard base64, and fields at their zero value left out (an absent
//! `lease` is 0, absent `kvs` is none). Every decoder accepts a number where a string is expected
//! and bounds what it keeps; nothing here panics on any input.

use std::time::Duration;

use base64::engine::general_purpose::STANDARD as BASE64;
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{json, Value};

use super::{DynamicConfig, LeaderKey, MemberInfo, WatchEvent};

/// At most this many `members/` keys are read (Patroni has one per node).
pub(super) const MEMBERS_LIMIT: u64 = 256;

/// The keys of one Patroni scope, from its normalised prefix (`/service/vietmarket/`).
#[derive(Debug, Clone)]
pub(super) struct ScopeKeys {
    pub leader: String,
    pub config: String,
    pub members: String,
}

impl ScopeKeys {
    pub(super) fn new(prefix: String) -> ScopeKeys {
        ScopeKeys {
            leader: format!("{prefix}leader"),
            config: format!("{prefix}config"),
            members: format!("{prefix}members/"),
        }
    }
}

/// The body of the read: one read-only txn (no compare, so its `success` ops run) whose three
/// ranges see one revision. Not serializable, so etcd serves it linearizably (ReadIndex).
pub(super) fn txn_body(keys: &ScopeKeys) -> Vec<u8> {
    let range = |key: &str| json!({ "request_range": { "key": BASE64.encode(key) } });
    let members = json!({ "request_range": {
        "key": BASE64.encode(&keys.members),
        "range_end": BASE64.encode(prefix_end(keys.members.as_bytes())),
        "limit": MEMBERS_LIMIT.to_string(),
    }});
    json!({ "success": [range(&keys.leader), range(&keys.config), members] }).to_string().into_bytes()
}

/// LeaseTimeToLive of one lease.
pub(super) fn lease_body(lease_id: i64) -> Vec<u8> {
    json!({ "ID": lease_id.to_string() }).to_string().into_bytes()
}

/// Authenticate: user and password (the body is never logged).
pub(super) fn auth_body(user: &str, password: &str) -> Vec<u8> {
    json!({ "name": user, "password": password }).to_string().into_bytes()
}

/// A watch of exactly `key` from `start_revision` on.
pub(super) fn watch_body(key: &str, start_revision: i64) -> Vec<u8> {
    json!({ "create_request": { "key": BASE64.encode(key), "start_revision": start_revision.to_string() } })
        .to_string()
        .into_bytes()
}

/// The first key after every key that starts with `prefix` (etcd's `clientv3.GetPrefixEnd`):
/// the last byte below 0xff incremented, the 0xff bytes after it dropped; `\0` (to the end of
/// the key space) when there is no such byte.
pub(super) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    vec![0]
}

/// An int64 as the gateway writes it (a decimal string), or as a JSON number.
#[derive(Deserialize)]
#[serde(untagged)]
enum Int64 {
    Number(i64),
    Text(String),
}

fn int64<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i64, D::Error> {
    match Int64::deserialize(d)? {
        Int64::Number(n) => Ok(n),
        Int64::Text(s) => s.trim().parse().map_err(|_| serde::de::Error::custom(format!("`{s:.40}` is not an int64"))),
    }
}

#[derive(Deserialize, Default)]
struct Header {
    #[serde(default, deserialize_with = "int64")]
    revision: i64,
}

#[derive(Deserialize)]
struct Kv {
    #[serde(default)]
    key: String,
    #[serde(default)]
    value: String,
    #[serde(default, deserialize_with = "int64")]
    mod_revision: i64,
    #[serde(default, deserialize_with = "int64")]
    lease: i64,
}

#[derive(Deserialize, Default)]
struct RangeResponse {
    #[serde(default)]
    kvs: Vec<Kv>,
}

#[derive(Deserialize)]
struct ResponseOp {
    response_range: Option<RangeResponse>,
}

#[derive(Deserialize)]
struct TxnResponse {
    header: Option<Header>,
    #[serde(default)]
    succeeded: bool,
    #[serde(default)]
    responses: Vec<ResponseOp>,
}

/// What the txn saw, at one revision; the lease's remaining TTL is a second request.
#[derive(Debug, Clone, PartialEq)]
pub(super) struct Snapshot {
    pub revision: i64,
    /// `lease_remaining` is still `None` here.
    pub leader: Option<LeaderKey>,
    pub config: Option<DynamicConfig>,
    pub config_error: Option<String>,
    pub members: Vec<MemberInfo>,
}

/// Decodes the answer to [`txn_body`].
///
/// # Errors
/// Not a txn response, or a leader key that is not one UTF-8 string: the read fails (fail
/// closed). An unparsable `config` or member value does not fail the read; it is reported.
pub(super) fn decode_txn(keys: &ScopeKeys, body: &[u8]) -> Result<Snapshot, String> {
    let txn: TxnResponse =
        serde_json::from_slice(body).map_err(|e| format!("unexpected answer to the read transaction: {e}"))?;
    let revision = txn.header.unwrap_or_default().revision;
    if !txn.succeeded || txn.responses.len() != 3 || revision <= 0 {
        return Err(format!(
            "unexpected answer to the read transaction: succeeded={}, {} responses, revision {revision}",
            txn.succeeded,
            txn.responses.len()
        ));
    }
    let mut ranges = txn.responses.into_iter().map(|op| op.response_range.unwrap_or_default().kvs);
    let (leader_kvs, config_kvs, member_kvs) =
        (ranges.next().unwrap_or_default(), ranges.next().unwrap_or_default(), ranges.next().unwrap_or_default());

    let leader = match leader_kvs.into_iter().find(|kv| key_is(kv, &keys.leader)) {
        None => None,
        Some(kv) => {
            let member = String::from_utf8(bytes(&kv.value)?)
                .map_err(|_| format!("the leader key {} holds a value that is not UTF-8", keys.leader))?;
            Some(LeaderKey { member, mod_revision: kv.mod_revision, lease_id: kv.lease, lease_remaining: None })
        }
    };

    let (config, config_error) = match config_kvs.into_iter().find(|kv| key_is(kv, &keys.config)) {
        None => (None, None),
        Some(kv) => match bytes(&kv.value).and_then(|v| decode_config(&v)) {
            Ok(c) => (Some(c), None),
            Err(e) => (None, Some(format!("{}: {e}", keys.config))),
        },
    };

    let mut members = Vec::new();
    for kv in member_kvs {
        let Ok(key) = bytes(&kv.key) else { continue };
        // A name that is not UTF-8 cannot be any configured member's: leave it out.
        let Some(name) = key.strip_prefix(keys.members.as_bytes()).and_then(|n| String::from_utf8(n.to_vec()).ok())
        else {
            continue;
        };
        if name.is_empty() || name.contains('/') {
            continue;
        }
        members.push(match bytes(&kv.value) {
            Ok(v) => decode_member(name, &v),
            Err(e) => MemberInfo { data_error: Some(e), ..MemberInfo::named(name) },
        });
    }
    Ok(Snapshot { revision, leader, config, config_error, members })
}

fn key_is(kv: &Kv, key: &str) -> bool {
    bytes(&kv.key).is_ok_and(|k| k == key.as_bytes())
}

fn bytes(b64: &str) -> Result<Vec<u8>, String> {
    BASE64.decode(b64).map_err(|e| format!("bad base64 from etcd: {e}"))
}

/// Patroni's dynamic configuration, read as Patroni does: `ttl`, `loop_wait`, `retry_timeout`
/// with `parse_int` (a number, or a numeric string), `failsafe_mode` and `pause` with
/// `parse_bool` (true for `true`, `1`, and the strings on/true/yes/1 in any case; anything else
/// false), see patroni `global_config.py` `check_mode` and `utils.py` `parse_bool`.
///
/// # Errors
/// The value is not a JSON object.
pub(super) fn decode_config(value: &[u8]) -> Result<DynamicConfig, String> {
    let v: Value = serde_json::from_slice(value).map_err(|e| format!("not JSON: {e}"))?;
    let Value::Object(map) = v else { return Err("not a JSON object".to_owned()) };
    let seconds = |k: &str| map.get(k).and_then(parse_int);
    let mode = |k: &str| map.get(k).is_some_and(parse_bool);
    Ok(DynamicConfig {
        ttl: seconds("ttl"),
        loop_wait: seconds("loop_wait"),
        retry_timeout: seconds("retry_timeout"),
        failsafe_mode: mode("failsafe_mode"),
        pause: mode("pause"),
    })
}

fn parse_int(v: &Value) -> Option<u64> {
    let f = match v {
        Value::Number(n) => n.as_f64()?,
        Value::String(s) => s.trim().parse::<f64>().ok()?,
        _ => return None,
    };
    (f.is_finite() && f >= 0.0 && f <= u64::MAX as f64).then(|| f.round() as u64)
}

fn parse_bool(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::Number(n) => n.as_u64() == Some(1),
        Value::String(s) => ["on", "true", "yes", "1"].contains(&s.to_lowercase().as_str()),
        _ => false,
    }
}

/// A `members/<name>` value: Patroni's JSON (`conn_url`, `role`, `state`, `timeline`, ...),
/// each field taken when it has the expected type.
pub(super) fn decode_member(name: String, value: &[u8]) -> MemberInfo {
    let map = match serde_json::from_slice::<Value>(value) {
        Ok(Value::Object(map)) => map,
        Ok(_) => return MemberInfo { data_error: Some("not a JSON object".to_owned()), ..MemberInfo::named(name) },
        Err(e) => return MemberInfo { data_error: Some(format!("not JSON: {e}")), ..MemberInfo::named(name) },
    };
    let text = |k: &str| map.get(k).and_then(Value::as_str).map(|s| s.chars().take(1024).collect::<String>());
    MemberInfo {
        conn_url: text("conn_url"),
        role: text("role"),
        state: text("state"),
        timeline: map.get("timeline").and_then(parse_int),
        data_error: None,
        name,
    }
}

#[derive(Deserialize)]
struct LeaseResponse {
    #[serde(rename = "TTL", default, deserialize_with = "int64")]
    ttl: i64,
    #[serde(rename = "grantedTTL", default, deserialize_with = "int64")]
    granted_ttl: i64,
}

/// The remaining TTL from a LeaseTimeToLive answer; `None` when the lease is gone (etcd answers
/// `TTL: -1` for an unknown lease) or has run out.
///
/// etcd 3.4 computes it on its leader as `int64(lease.Remaining().Seconds())`, a truncation
/// (`etcdserver/v3_server.go` `LeaseTimeToLive`; `lease/leasehttp/http.go` when a follower
/// forwards it), so it never over-states what is left. It is capped at `grantedTTL`: a lessor
/// that is not (yet) primary has every expiry at "forever".
///
/// # Errors
/// Not a LeaseTimeToLive answer.
pub(super) fn decode_lease(body: &[u8]) -> Result<Option<Duration>, String> {
    let r: LeaseResponse =
        serde_json::from_slice(body).map_err(|e| format!("unexpected answer to LeaseTimeToLive: {e}"))?;
    let secs = if r.granted_ttl > 0 { r.ttl.min(r.granted_ttl) } else { r.ttl };
    Ok((secs > 0).then(|| Duration::from_secs(secs.unsigned_abs())))
}

/// The token from an Authenticate answer.
///
/// # Errors
/// No usable token in it.
pub(super) fn decode_token(body: &[u8]) -> Result<String, String> {
    #[derive(Deserialize)]
    struct Auth {
        #[serde(default)]
        token: String,
    }
    let a: Auth = serde_json::from_slice(body).map_err(|e| format!("unexpected answer to Authenticate: {e}"))?;
    let ok = !a.token.is_empty() && a.token.len() <= 4096 && a.token.bytes().all(|b| b.is_ascii_graphic());
    if ok {
        Ok(a.token)
    } else {
        Err("etcd's answer to Authenticate holds no usable token".to_owned())
    }
}

/// The message and gRPC code of a gateway error. Unary calls answer a non-200 status with
/// `{"error": msg, "message": msg, "code": n}`; a stream sends `{"error": {"grpc_code": n,
/// "message": msg, ...}}` as one of its lines.
pub(super) fn decode_error(body: &[u8]) -> Option<(Option<i64>, String)> {
    let v: Value = serde_json::from_slice(body).ok()?;
    let err = v.get("error")?;
    let (code, message) = match err {
        Value::Object(e) => (e.get("grpc_code").and_then(Value::as_i64), e.get("message").and_then(Value::as_str)),
        Value::String(s) => {
            (v.get("code").and_then(Value::as_i64), v.get("message").and_then(Value::as_str).or(Some(s)))
        }
        _ => return None,
    };
    Some((code, message.unwrap_or("no message").chars().take(512).collect()))
}

/// One line of a watch stream.
#[derive(Debug, Clone, PartialEq)]
pub(super) enum WatchMessage {
    /// The watch exists (the first message).
    Created,
    /// Changes of the watched key, in revision order.
    Events(Vec<WatchEvent>),
    /// etcd cancelled the watch; the reason for the operator.
    Canceled(String),
    /// Anything else (progress notifications): ignored.
    Other,
}

#[derive(Deserialize)]
struct WatchResult {
    #[serde(default)]
    created: bool,
    #[serde(default)]
    canceled: bool,
    #[serde(default, deserialize_with = "int64")]
    compact_revision: i64,
    #[serde(default)]
    cancel_reason: String,
    #[serde(default)]
    events: Vec<WatchEventJson>,
}

#[derive(Deserialize)]
struct WatchEventJson {
    #[serde(rename = "type", default)]
    kind: String,
    kv: Option<Kv>,
}

/// Decodes one line of the watch stream of `key`.
///
/// # Errors
/// The line is an error from etcd (`{"error": ...}`, e.g. "etcdserver: no leader"), or no watch
/// response at all.
pub(super) fn decode_watch_line(key: &str, line: &[u8]) -> Result<WatchMessage, String> {
    if let Some((_, message)) = decode_error(line) {
        return Err(message);
    }
    #[derive(Deserialize)]
    struct Line {
        result: Option<WatchResult>,
    }
    let parsed: Line = serde_json::from_slice(line).map_err(|e| format!("unexpected watch message: {e}"))?;
    let Some(r) = parsed.result else { return Err("unexpected watch message without a result".to_owned()) };
    if r.canceled {
        let reason = if r.compact_revision > 0 {
            format!("the start revision is compacted (etcd keeps revisions from {} on)", r.compact_revision)
        } else if r.cancel_reason.is_empty() {
            "etcd cancelled the watch".to_owned()
        } else {
            format!("etcd cancelled the watch: {:.200}", r.cancel_reason)
        };
        return Ok(WatchMessage::Canceled(reason));
    }
    if r.created {
        return Ok(WatchMessage::Created);
    }
    if r.events.is_empty() {
        return Ok(WatchMessage::Other);
    }
    let mut events = Vec::new();
    for e in r.events {
        let Some(kv) = e.kv else { continue };
        if !key_is(&kv, key) {
            continue;
        }
        events.push(match e.kind.as_str() {
            "DELETE" => WatchEvent::Delete { revision: kv.mod_revision },
            // PUT is the zero value, so the gateway leaves `type` out. A value that is not UTF-8
            // names no member; a watch event can only revoke, so a lossy name is safe here.
            _ => WatchEvent::Put {
                revision: kv.mod_revision,
                member: String::from_utf8_lossy(&bytes(&kv.value)?).chars().take(1024).collect(),
            },
        });
    }
    Ok(WatchMessage::Events(events))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys() -> ScopeKeys {
        ScopeKeys::new("/service/vm/".to_owned())
    }

    fn b(s: &str) -> String {
        BASE64.encode(s)
    }

    /// A txn answer as etcd 3.4's gateway writes it (captured from a real etcd, values swapped).
    fn txn_answer(leader: Option<(&str, &str)>, config: Option<&str>, members: &[(&str, &str)]) -> String {
        let range = |kvs: Vec<Value>| {
            if kvs.is_empty() {
                json!({"response_range": {"header": {"revision": "7"}}})
            } else {
                json!({"response_range": {"header": {"revision": "7"}, "count": kvs.len().to_string(), "kvs": kvs}})
            }
        };
        let leader = leader.map(|(v, lease)| {
            json!({"key": b("/service/vm/leader"), "create_revision": "5", "mod_revision": "6", "version": "1",
                   "value": b(v), "lease": lease})
        });
        let config = config.map(|v| json!({"key": b("/service/vm/config"), "mod_revision": "2", "value": b(v)}));
        let members = members
            .iter()
            .map(|(n, v)| json!({"key": b(&format!("/service/vm/members/{n}")), "mod_revision": "4", "value": b(v)}))
            .collect();
        json!({"header": {"cluster_id": "1", "member_id": "2", "revision": "7", "raft_term": "2"}, "succeeded": true,
               "responses": [range(leader.into_iter().collect()), range(config.into_iter().collect()), range(members)]})
        .to_string()
    }

    #[test]
    fn a_full_scope_decodes_at_one_revision() {
        let body = txn_answer(
            Some(("node0", "7587869420935716868")),
            Some(r#"{"ttl":30,"loop_wait":10,"retry_timeout":10,"failsafe_mode":true,"postgresql":{}}"#),
            &[
                (
                    "node0",
                    r#"{"conn_url":"postgres://127.0.0.1:5432/postgres","role":"primary","state":"running","timeline":3}"#,
                ),
                ("node1", r#"{"conn_url":"postgres://127.0.0.1:5433/postgres","role":"replica","state":"streaming"}"#),
            ],
        );
        let s = decode_txn(&keys(), body.as_bytes()).unwrap();
        assert_eq!(s.revision, 7);
        assert_eq!(
            s.leader,
            Some(LeaderKey {
                member: "node0".into(),
                mod_revision: 6,
                lease_id: 7587869420935716868,
                lease_remaining: None
            })
        );
        assert_eq!(
            s.config,
            Some(DynamicConfig {
                ttl: Some(30),
                loop_wait: Some(10),
                retry_timeout: Some(10),
                failsafe_mode: true,
                pause: false
            })
        );
        assert_eq!(s.config_error, None);
        assert_eq!(s.members.len(), 2);
        assert_eq!(s.members[0].name, "node0");
        assert_eq!(s.members[0].conn_url.as_deref(), Some("postgres://127.0.0.1:5432/postgres"));
        assert_eq!(s.members[0].role.as_deref(), Some("primary"));
        assert_eq!(s.members[0].timeline, Some(3));
        assert_eq!(s.members[1].timeline, None);
        assert_eq!(s.members[1].state.as_deref(), Some("streaming"));
    }

    #[test]
    fn absent_keys_are_none_not_errors() {
        let s = decode_txn(&keys(), txn_answer(None, None, &[]).as_bytes()).unwrap();
        assert_eq!((s.revision, s.leader, s.config, s.config_error, s.members.len()), (7, None, None, None, 0));
    }

    #[test]
    fn a_leader_key_without_lease_has_lease_zero() {
        let body = txn_answer(Some(("node0", "0")), None, &[]).replace(r#","lease":"0""#, "");
        let s = decode_txn(&keys(), body.as_bytes()).unwrap();
        assert_eq!(s.leader.unwrap().lease_id, 0);
    }

    #[test]
    fn a_bad_config_is_reported_and_the_read_stands() {
        let s = decode_txn(&keys(), txn_answer(Some(("n", "1")), Some("{not json"), &[]).as_bytes()).unwrap();
        assert!(s.config.is_none());
        assert!(s.config_error.as_deref().unwrap().starts_with("/service/vm/config: not JSON"), "{:?}", s.config_error);
        let s = decode_txn(&keys(), txn_answer(None, Some("[1,2]"), &[]).as_bytes()).unwrap();
        assert_eq!(s.config_error.as_deref(), Some("/service/vm/config: not a JSON object"));
    }

    #[test]
    fn bad_member_values_are_listed_with_their_error() {
        let body =
            txn_answer(None, None, &[("a", "garbage"), ("b", "42"), ("c", r#"{"conn_url": 5, "timeline": "4"}"#)]);
        let s = decode_txn(&keys(), body.as_bytes()).unwrap();
        let names: Vec<_> = s.members.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["a", "b", "c"]);
        assert!(s.members[0].data_error.as_deref().unwrap().starts_with("not JSON"));
        assert_eq!(s.members[1].data_error.as_deref(), Some("not a JSON object"));
        assert_eq!(
            (s.members[2].conn_url.as_deref(), s.members[2].timeline, &s.members[2].data_error),
            (None, Some(4), &None)
        );
    }

    #[test]
    fn nested_and_non_utf8_member_keys_are_skipped() {
        let mut v: Value = serde_json::from_str(&txn_answer(None, None, &[("ok", "{}"), ("x/y", "{}")])).unwrap();
        let kvs = v["responses"][2]["response_range"]["kvs"].as_array_mut().unwrap();
        let mut bad = b"/service/vm/members/".to_vec();
        bad.push(0xff);
        kvs.push(json!({"key": BASE64.encode(&bad), "value": b("{}")}));
        let s = decode_txn(&keys(), v.to_string().as_bytes()).unwrap();
        assert_eq!(s.members.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["ok"]);
    }

    #[test]
    fn a_non_utf8_leader_value_fails_the_read() {
        let body = txn_answer(Some(("x", "1")), None, &[]).replace(&b("x"), &BASE64.encode([0xff, 0xfe]));
        let e = decode_txn(&keys(), body.as_bytes()).unwrap_err();
        assert_eq!(e, "the leader key /service/vm/leader holds a value that is not UTF-8");
    }

    #[test]
    fn garbage_and_truncated_answers_are_errors_not_panics() {
        let full = txn_answer(Some(("node0", "1")), Some("{}"), &[("node0", "{}")]);
        for cut in 0..full.len() {
            let _ = decode_txn(&keys(), &full.as_bytes()[..cut]);
        }
        for bad in ["", "null", "[]", "{}", r#"{"succeeded":true}"#, r#"{"header":{"revision":"x"}}"#] {
            assert!(decode_txn(&keys(), bad.as_bytes()).is_err(), "{bad}");
        }
        let bad_b64 = full.replace(&b("node0"), "!!!");
        assert!(decode_txn(&keys(), bad_b64.as_bytes()).unwrap_err().contains("bad base64"));
    }

    #[test]
    fn config_reads_like_patroni() {
        let c = decode_config(br#"{"ttl":"20","loop_wait":1.4,"retry_timeout":-3,"failsafe_mode":"ON","pause":1}"#)
            .unwrap();
        assert_eq!(
            (c.ttl, c.loop_wait, c.retry_timeout, c.failsafe_mode, c.pause),
            (Some(20), Some(1), None, true, true)
        );
        for off in [r#""false""#, r#""off""#, "0", "null", r#""maybe""#, r#"" true""#, "2", "{}"] {
            let c = decode_config(format!(r#"{{"failsafe_mode":{off},"pause":{off}}}"#).as_bytes()).unwrap();
            assert!(!c.failsafe_mode && !c.pause, "{off}");
        }
        let c = decode_config(b"{}").unwrap();
        assert_eq!(
            c,
            DynamicConfig { ttl: None, loop_wait: None, retry_timeout: None, failsafe_mode: false, pause: false }
        );
    }

    #[test]
    fn lease_ttl_is_none_when_gone_and_capped_at_the_grant() {
        assert_eq!(
            decode_lease(br#"{"header":{},"ID":"5","TTL":"17","grantedTTL":"20"}"#),
            Ok(Some(Duration::from_secs(17)))
        );
        assert_eq!(decode_lease(br#"{"header":{},"ID":"5","TTL":"-1"}"#), Ok(None));
        assert_eq!(decode_lease(br#"{"ID":"5","TTL":"0","grantedTTL":"20"}"#), Ok(None));
        assert_eq!(
            decode_lease(br#"{"ID":"5","TTL":"9223372036","grantedTTL":"20"}"#),
            Ok(Some(Duration::from_secs(20)))
        );
        assert!(decode_lease(b"<html>").is_err());
        assert!(decode_lease(br#"{"TTL":"ten"}"#).is_err());
    }

    #[test]
    fn gateway_errors_of_both_shapes() {
        let unary =
            br#"{"error":"etcdserver: invalid auth token","message":"etcdserver: invalid auth token","code":16}"#;
        assert_eq!(decode_error(unary), Some((Some(16), "etcdserver: invalid auth token".to_owned())));
        let stream = br#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader","http_status":"Service Unavailable"}}"#;
        assert_eq!(decode_error(stream), Some((Some(14), "etcdserver: no leader".to_owned())));
        assert_eq!(decode_error(b"{}"), None);
        assert_eq!(decode_error(b"not json"), None);
    }

    #[test]
    fn tokens() {
        assert_eq!(
            decode_token(br#"{"header":{},"token":"kJLguAXnsMvaNBKJ.22"}"#),
            Ok("kJLguAXnsMvaNBKJ.22".to_owned())
        );
        assert!(decode_token(br#"{"token":""}"#).is_err());
        assert!(decode_token(br#"{"token":"a\nb"}"#).is_err());
        assert!(decode_token(b"[]").is_err());
    }

    #[test]
    fn watch_lines() {
        let key = "/service/vm/leader";
        let created = br#"{"result":{"header":{"revision":"2"},"created":true}}"#;
        assert_eq!(decode_watch_line(key, created), Ok(WatchMessage::Created));
        let events = json!({"result": {"header": {"revision": "9"}, "events": [
            {"kv": {"key": b(key), "mod_revision": "8", "value": b("node1"), "lease": "3"}},
            {"type": "DELETE", "kv": {"key": b(key), "mod_revision": "9"}},
            {"kv": {"key": b("/other"), "mod_revision": "9", "value": b("x")}},
        ]}});
        assert_eq!(
            decode_watch_line(key, events.to_string().as_bytes()),
            Ok(WatchMessage::Events(vec![
                WatchEvent::Put { revision: 8, member: "node1".into() },
                WatchEvent::Delete { revision: 9 }
            ]))
        );
        let compacted = br#"{"result":{"header":{"revision":"20"},"compact_revision":"15","canceled":true}}"#;
        assert_eq!(
            decode_watch_line(key, compacted),
            Ok(WatchMessage::Canceled("the start revision is compacted (etcd keeps revisions from 15 on)".into()))
        );
        let no_leader = br#"{"error":{"grpc_code":14,"http_code":503,"message":"etcdserver: no leader"}}"#;
        assert_eq!(decode_watch_line(key, no_leader), Err("etcdserver: no leader".into()));
        assert_eq!(decode_watch_line(key, br#"{"result":{"header":{}}}"#), Ok(WatchMessage::Other));
        assert!(decode_watch_line(key, b"{").is_err());
        assert!(decode_watch_line(key, b"{}").is_err());
    }

    #[test]
    fn request_bodies() {
        let k = keys();
        let txn: Value = serde_json::from_slice(&txn_body(&k)).unwrap();
        assert_eq!(txn["success"][0]["request_range"]["key"], b("/service/vm/leader"));
        assert_eq!(txn["success"][1]["request_range"]["key"], b("/service/vm/config"));
        assert_eq!(txn["success"][2]["request_range"]["range_end"], b("/service/vm/members0"));
        assert!(txn.get("compare").is_none() && txn["success"][0]["request_range"].get("serializable").is_none());
        let w: Value = serde_json::from_slice(&watch_body(&k.leader, 8)).unwrap();
        assert_eq!(w["create_request"]["start_revision"], "8");
        assert_eq!(serde_json::from_slice::<Value>(&lease_body(-5)).unwrap()["ID"], "-5");
    }

    #[test]
    fn prefix_ends() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(&[b'a', 0xff, 0xff]), b"b");
        assert_eq!(prefix_end(&[0xff]), [0]);
        assert_eq!(prefix_end(b""), [0]);
    }
}
