//! HTTP/1.1 to etcd's v3 JSON gateway (the `/v3/...` paths on every member's client port) over
//! hyper's client: endpoints, connections (TCP, optional TLS with a client certificate), and one
//! POST with a bounded answer, or a streaming POST for a watch.
//!
//! Every request carries `Grpc-Metadata-Hasleader: true`. grpc-gateway turns `Grpc-Metadata-*`
//! headers into gRPC metadata, so etcd sees `hasleader=true`, its require-leader key
//! (`rpctypes.MetadataRequireLeaderKey`): a member without a raft leader answers unary calls with
//! "etcdserver: no leader" at once instead of waiting for its request timeout, and cancels such a
//! watch once it has had no leader for three election timeouts (`v3rpc/interceptor.go`
//! `monitorLeader`). Measured on etcd 3.4.23 with `--election-timeout=1000`: a watch through the
//! gateway with the header ended 3.2 s and 4.4 s after the other two members were stopped; the
//! same watch without it was still open 30 s later.

use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper::header::{HeaderValue, AUTHORIZATION, CONTENT_TYPE, HOST};
use hyper::{Method, Request, StatusCode, Uri};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;

use super::decode::decode_error;
use super::EtcdSettings;

/// Answers of unary calls are read up to this size (a scope's keys are a few KiB).
pub(super) const ANSWER_LIMIT: usize = 4 << 20;
/// One line of a watch stream is read up to this size.
const WATCH_LINE_LIMIT: usize = 1 << 20;
/// The require-leader header (see the module doc).
const REQUIRE_LEADER: &str = "grpc-metadata-hasleader";

/// One etcd client URL, checked.
#[derive(Debug, Clone)]
pub(super) struct Endpoint {
    /// As configured, for messages.
    pub url: String,
    https: bool,
    /// Without the brackets of an IPv6 literal.
    host: String,
    port: u16,
    /// `host:port` as in the URL, for the Host header.
    authority: String,
}

impl Endpoint {
    /// `http://host:port` or `https://host:port`, nothing else (no path, user or query).
    ///
    /// # Errors
    /// Anything else, with the reason.
    pub(super) fn parse(url: &str) -> Result<Endpoint, String> {
        let shown = redact(url.trim());
        let bad =
            |why: &str| format!("etcd endpoint `{shown}`: {why}; write it as http://host:port or https://host:port");
        let uri: Uri = url.trim().parse().map_err(|e| bad(&format!("not a URL ({e})")))?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => return Err(bad("the scheme must be http or https")),
        };
        let authority = uri.authority().ok_or_else(|| bad("no host"))?;
        if authority.as_str().contains('@') {
            return Err(bad("no user or password in the URL (use username and password in [etcd])"));
        }
        let port = authority.port_u16().ok_or_else(|| bad("no port (etcd's client port is usually 2379)"))?;
        let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
        if host.is_empty() {
            return Err(bad("no host"));
        }
        if !matches!(uri.path(), "" | "/") || uri.query().is_some() {
            return Err(bad("no path or query"));
        }
        Ok(Endpoint { url: url.trim().to_owned(), https, host, port, authority: authority.as_str().to_owned() })
    }
}

/// `url` with anything between `://` and `@` masked: a password typed into a URL stays out of
/// messages.
fn redact(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(s), Some(at)) if at > s => format!("{}://***{}", &url[..s], &url[at..]),
        _ => url.to_owned(),
    }
}

/// How connections are made: plain TCP, or TLS for https endpoints.
pub(super) struct Transport {
    tls: Option<tokio_native_tls::TlsConnector>,
}

impl Transport {
    /// Reads the TLS files once. TLS is set up when any endpoint is https: against `ca_file`
    /// only when it is given (else the system roots), with `cert_file`/`key_file` as the client
    /// certificate.
    ///
    /// # Errors
    /// A file cannot be read or holds no usable PEM; TLS files given but no https endpoint; a
    /// certificate without its key or the other way round. The message names the file.
    pub(super) fn new(settings: &EtcdSettings, endpoints: &[Endpoint]) -> Result<Transport, String> {
        let any_https = endpoints.iter().any(|e| e.https);
        let files = [&settings.ca_file, &settings.cert_file, &settings.key_file];
        if !any_https {
            if files.iter().any(|f| f.is_some()) {
                return Err("etcd ca_file, cert_file or key_file is set but no endpoint is https://; \
                            use https:// endpoints or drop the TLS files"
                    .to_owned());
            }
            return Ok(Transport { tls: None });
        }
        let mut builder = native_tls::TlsConnector::builder();
        if let Some(ca) = &settings.ca_file {
            let pem = read_file("ca_file", ca)?;
            let certs = native_tls::Certificate::stack_from_pem(&pem)
                .map_err(|e| format!("etcd ca_file {}: not a PEM certificate ({e})", ca.display()))?;
            if certs.is_empty() {
                return Err(format!("etcd ca_file {} holds no PEM certificate", ca.display()));
            }
            for cert in certs {
                builder.add_root_certificate(cert);
            }
            builder.disable_built_in_roots(true);
        }
        match (&settings.cert_file, &settings.key_file) {
            (Some(cert), Some(key)) => {
                let (cert_pem, key_pem) = (read_file("cert_file", cert)?, read_file("key_file", key)?);
                let identity = native_tls::Identity::from_pkcs8(&cert_pem, &key_pem).map_err(|e| {
                    format!(
                        "etcd cert_file {} / key_file {}: {e}; the key must be PKCS#8 PEM (BEGIN PRIVATE KEY), \
                         e.g. `openssl pkcs8 -topk8 -nocrypt -in key.pem -out key.pk8.pem`",
                        cert.display(),
                        key.display()
                    )
                })?;
                builder.identity(identity);
            }
            (None, None) => {}
            _ => return Err("etcd cert_file and key_file go together: set both or neither".to_owned()),
        }
        let tls = builder.build().map_err(|e| format!("cannot set up TLS for etcd: {e}"))?;
        Ok(Transport { tls: Some(tls.into()) })
    }

    /// A new HTTP/1.1 connection to `ep`. Cancel safe (nothing is left behind).
    ///
    /// # Errors
    /// DNS, connect, TLS or HTTP handshake failure, as a sentence.
    pub(super) async fn connect(&self, ep: &Endpoint) -> Result<Conn, String> {
        let tcp = TcpStream::connect((ep.host.as_str(), ep.port)).await.map_err(|e| format!("cannot connect: {e}"))?;
        let _ = tcp.set_nodelay(true);
        keepalive(&tcp);
        if !ep.https {
            return handshake(tcp).await;
        }
        let Some(tls) = &self.tls else { return Err("TLS is not set up".to_owned()) };
        let stream = tls.connect(&ep.host, tcp).await.map_err(|e| format!("TLS handshake failed: {e}"))?;
        handshake(stream).await
    }
}

fn read_file(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("etcd {what}: cannot read {}: {e}", path.display()))
}

/// A peer that vanishes (power loss, a partition that drops packets) would leave a quiet watch
/// open forever: keepalive probes after 2 s idle, every 1 s, and a 5 s limit on unacknowledged
/// data end it within seconds.
fn keepalive(tcp: &TcpStream) {
    let sock = socket2::SockRef::from(tcp);
    let ka = socket2::TcpKeepalive::new()
        .with_time(Duration::from_secs(2))
        .with_interval(Duration::from_secs(1))
        .with_retries(3);
    let _ = sock.set_tcp_keepalive(&ka);
    let _ = sock.set_tcp_user_timeout(Some(Duration::from_secs(5)));
}

async fn handshake<T: AsyncRead + AsyncWrite + Unpin + Send + 'static>(io: T) -> Result<Conn, String> {
    let ended = Arc::new(Mutex::new(None));
    let io = Witness { io, ended: Arc::clone(&ended) };
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| format!("HTTP handshake failed: {}", chain(&e)))?;
    let slot = Arc::clone(&ended);
    let driver = tokio::spawn(async move {
        if let Err(e) = conn.await {
            record(&slot, || chain(&e));
        }
    });
    Ok(Conn { sender, driver, ended })
}

/// Keeps the first of several errors: the first is the cause, the rest its consequences.
fn record(slot: &Mutex<Option<String>>, why: impl FnOnce() -> String) {
    if let Ok(mut s) = slot.lock() {
        if s.is_none() {
            *s = Some(why());
        }
    }
}

/// A connection's I/O, noting its first error. hyper reports the last: when a read fails on a
/// connection it then closes (etcd's TLS alert, which TLS 1.3 sends after the client's side of
/// the handshake is done) and the close fails as well (OpenSSL's "shutdown while in init"), the
/// driver ends with the close's error and the alert is lost.
struct Witness<T> {
    io: T,
    ended: Arc<Mutex<Option<String>>>,
}

impl<T> Witness<T> {
    fn note<R>(&self, poll: Poll<std::io::Result<R>>) -> Poll<std::io::Result<R>> {
        if let Poll::Ready(Err(e)) = &poll {
            record(&self.ended, || chain(e));
        }
        poll
    }
}

impl<T: AsyncRead + Unpin> AsyncRead for Witness<T> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_read(cx, buf);
        self.note(poll)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Witness<T> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.io).poll_write(cx, buf);
        self.note(poll)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_flush(cx);
        self.note(poll)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        let poll = Pin::new(&mut self.io).poll_shutdown(cx);
        self.note(poll)
    }
}

/// One HTTP/1.1 connection; dropping it closes it.
pub(super) struct Conn {
    sender: SendRequest<Full<Bytes>>,
    /// Drives the connection; aborted on drop.
    driver: JoinHandle<()>,
    /// Why the connection ended, when it ended with an error (e.g. a TLS alert from etcd).
    ended: Arc<Mutex<Option<String>>>,
}

impl Drop for Conn {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// What went wrong with one call.
#[derive(Debug)]
pub(super) enum CallError {
    /// etcd answered with an error (the gRPC status of the call).
    Etcd { message: String },
    /// The connection, HTTP, or an answer that is not etcd's.
    Transport(String),
}

impl CallError {
    /// The token is missing, expired, or from an older auth revision: authenticate again.
    pub(super) fn wants_new_token(&self) -> bool {
        matches!(self, CallError::Etcd { message, .. }
            if ["invalid auth token", "user name is empty", "revision of auth store is old"]
                .iter().any(|m| message.contains(m)))
    }

    pub(super) fn text(&self) -> String {
        match self {
            CallError::Etcd { message, .. } if message.contains("user name is empty") => {
                format!("{message} (etcd has authentication on: set username and password in [etcd])")
            }
            CallError::Etcd { message, .. } | CallError::Transport(message) => message.clone(),
        }
    }
}

impl Conn {
    /// Still usable for another request.
    pub(super) fn is_open(&self) -> bool {
        !self.sender.is_closed()
    }

    async fn send(
        &mut self,
        ep: &Endpoint,
        path: &str,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> Result<hyper::Response<Incoming>, CallError> {
        let mut req = Request::builder()
            .method(Method::POST)
            .uri(path)
            .header(HOST, ep.authority.as_str())
            .header(CONTENT_TYPE, "application/json")
            .header(REQUIRE_LEADER, "true");
        if let Some(t) = token {
            let value = HeaderValue::from_str(t).map_err(|_| CallError::Transport("unusable auth token".to_owned()))?;
            req = req.header(AUTHORIZATION, value);
        }
        let req = req.body(Full::new(Bytes::from(body))).map_err(|e| CallError::Transport(e.to_string()))?;
        if let Err(e) = self.sender.ready().await {
            return Err(CallError::Transport(format!("connection closed: {}", self.why_ended(&e).await)));
        }
        match self.sender.send_request(req).await {
            Ok(resp) => Ok(resp),
            Err(e) => Err(CallError::Transport(format!("request failed: {}", self.why_ended(&e).await))),
        }
    }

    /// The driver's error when it has one (it is what went wrong), else `e`'s.
    async fn why_ended(&self, e: &hyper::Error) -> String {
        // The driver records its error as it finishes, just after the request side sees the end.
        for _ in 0..10 {
            if let Some(why) = self.ended.lock().ok().and_then(|s| s.clone()) {
                return why;
            }
            if self.driver.is_finished() {
                break;
            }
            tokio::task::yield_now().await;
        }
        chain(e)
    }

    /// POST `body` to `path`; the answer's body when etcd says 200. Not cancel safe as to the
    /// connection: drop it when the call is abandoned.
    ///
    /// # Errors
    /// [`CallError::Etcd`] with etcd's message, or [`CallError::Transport`].
    pub(super) async fn call(
        &mut self,
        ep: &Endpoint,
        path: &str,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> Result<Bytes, CallError> {
        let resp = self.send(ep, path, body, token).await?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), ANSWER_LIMIT)
            .collect()
            .await
            .map_err(|e| CallError::Transport(format!("reading the answer failed: {}", chain(&*e))))?
            .to_bytes();
        if status == StatusCode::OK {
            return Ok(bytes);
        }
        Err(refusal(status, &bytes))
    }

    /// POST a streaming request (a watch) and hand back its line reader once etcd answered 200.
    ///
    /// # Errors
    /// As [`Conn::call`].
    pub(super) async fn stream(
        mut self,
        ep: &Endpoint,
        path: &str,
        body: Vec<u8>,
        token: Option<&str>,
    ) -> Result<Lines, CallError> {
        let resp = self.send(ep, path, body, token).await?;
        let status = resp.status();
        if status != StatusCode::OK {
            let bytes = Limited::new(resp.into_body(), ANSWER_LIMIT).collect().await.map(|c| c.to_bytes());
            return Err(refusal(status, &bytes.unwrap_or_default()));
        }
        Ok(Lines { body: resp.into_body(), buf: BytesMut::new(), _conn: self })
    }
}

/// An error and its causes, `: `-separated (hyper's own text stops at "connection error"; the
/// cause, such as a TLS alert from etcd, is what the operator needs).
fn chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut text = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        let more = s.to_string();
        if !text.ends_with(&more) {
            text.push_str(": ");
            text.push_str(&more);
        }
        source = s.source();
    }
    text
}

/// A non-200 answer: etcd's error when the body is one, else the status and the body's start.
fn refusal(status: StatusCode, body: &[u8]) -> CallError {
    match decode_error(body) {
        Some((_, message)) => CallError::Etcd { message },
        None => CallError::Transport(format!("HTTP {status} from the gateway: {:.200}", String::from_utf8_lossy(body))),
    }
}

/// The newline-delimited JSON messages of a streaming answer.
pub(super) struct Lines {
    body: Incoming,
    buf: BytesMut,
    /// Keeps the connection driven; dropping the reader closes it.
    _conn: Conn,
}

impl Lines {
    /// The next non-empty line; `Ok(None)` when etcd ended the stream. Cancel safe (a partial
    /// line stays buffered).
    ///
    /// # Errors
    /// The connection failed, or a line is over the limit.
    pub(super) async fn next(&mut self) -> Result<Option<Bytes>, String> {
        loop {
            if let Some(pos) = self.buf.iter().position(|&b| b == b'\n') {
                let line = self.buf.split_to(pos + 1).freeze();
                let line = line.slice(..pos);
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                return Ok(Some(line));
            }
            if self.buf.len() > WATCH_LINE_LIMIT {
                return Err(format!("a watch message is over {WATCH_LINE_LIMIT} bytes"));
            }
            match self.body.frame().await {
                None if self.buf.iter().all(u8::is_ascii_whitespace) => return Ok(None),
                // The last message may come without its newline.
                None => return Ok(Some(std::mem::take(&mut self.buf).freeze())),
                Some(Err(e)) => return Err(format!("the watch stream failed: {}", chain(&e))),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints() {
        let e = Endpoint::parse("http://100.83.150.39:2379").unwrap();
        assert_eq!(
            (e.https, e.host.as_str(), e.port, e.authority.as_str()),
            (false, "100.83.150.39", 2379, "100.83.150.39:2379")
        );
        let e = Endpoint::parse(" https://[::1]:2379/ ").unwrap();
        assert_eq!((e.https, e.host.as_str(), e.port, e.url.as_str()), (true, "::1", 2379, "https://[::1]:2379/"));
        assert!(Endpoint::parse("https://etcd.example:2379").is_ok());
        for (bad, why) in [
            ("100.83.150.39:2379", "scheme"),
            ("ftp://h:1", "scheme"),
            ("http://h", "no port"),
            ("http://u:p@h:1", "no user"),
            ("http://h:1/v3", "no path"),
            ("http://h:1?x=1", "no path"),
            ("", "not a URL"),
            ("http://:1", "no host"),
        ] {
            let e = Endpoint::parse(bad).unwrap_err();
            assert!(e.contains(why) && e.contains("http://host:port"), "{bad}: {e}");
        }
        let e = Endpoint::parse("http://u:secret@h:1").unwrap_err();
        assert!(!e.contains("secret") && e.contains("http://***@h:1"), "{e}");
    }

    /// A peer that answers every connection with `reply` (then keeps the connection open for a
    /// moment): a hostile or broken "etcd".
    async fn peer(reply: Vec<u8>) -> Endpoint {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                let reply = reply.clone();
                tokio::spawn(async move {
                    let mut buf = [0u8; 4096];
                    let _ = s.read(&mut buf).await;
                    let _ = s.write_all(&reply).await;
                    tokio::time::sleep(Duration::from_secs(2)).await;
                });
            }
        });
        Endpoint::parse(&format!("http://{addr}")).unwrap()
    }

    fn plain() -> Transport {
        Transport { tls: None }
    }

    fn ok_head(extra: &str) -> Vec<u8> {
        format!("HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n{extra}\r\n").into_bytes()
    }

    #[tokio::test]
    async fn an_answer_over_the_limit_is_refused() {
        let mut reply = ok_head(&format!("Content-Length: {}\r\n", ANSWER_LIMIT + 1));
        reply.resize(reply.len() + ANSWER_LIMIT + 1, b'x');
        let ep = peer(reply).await;
        let mut conn = plain().connect(&ep).await.unwrap();
        match conn.call(&ep, "/v3/kv/txn", b"{}".to_vec(), None).await {
            Err(CallError::Transport(e)) => assert!(e.contains("length limit exceeded"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn non_http_and_non_etcd_answers_are_errors() {
        let ep = peer(b"SSH-2.0-OpenSSH_9.2\r\n".to_vec()).await;
        let mut conn = plain().connect(&ep).await.unwrap();
        assert!(matches!(conn.call(&ep, "/v3/kv/txn", b"{}".to_vec(), None).await, Err(CallError::Transport(_))));

        let ep = peer(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 5\r\n\r\noops!".to_vec()).await;
        let mut conn = plain().connect(&ep).await.unwrap();
        match conn.call(&ep, "/v3/kv/txn", b"{}".to_vec(), None).await {
            Err(CallError::Transport(e)) => assert_eq!(e, "HTTP 502 Bad Gateway from the gateway: oops!"),
            other => panic!("{other:?}"),
        }
    }

    #[tokio::test]
    async fn a_watch_line_over_the_limit_ends_the_stream() {
        let mut reply = ok_head("Transfer-Encoding: chunked\r\n");
        let mut chunk = |data: &[u8]| {
            reply.extend_from_slice(format!("{:x}\r\n", data.len()).as_bytes());
            reply.extend_from_slice(data);
            reply.extend_from_slice(b"\r\n");
        };
        let created = b"{\"result\":{\"created\":true}}";
        chunk(&[&created[..], b"\n"].concat());
        // Then a line without end.
        for _ in 0..=WATCH_LINE_LIMIT / 65536 + 1 {
            chunk(&[b'x'; 65536]);
        }
        let ep = peer(reply).await;
        let conn = plain().connect(&ep).await.unwrap();
        let mut lines = conn.stream(&ep, "/v3/watch", b"{}".to_vec(), None).await.unwrap();
        assert_eq!(lines.next().await.unwrap().as_deref(), Some(&created[..]));
        let e = lines.next().await.unwrap_err();
        assert!(e.contains("over 1048576 bytes"), "{e}");
    }

    /// A stream whose reads wait until the request is written and then fail, as a TLS stream's do
    /// when etcd's alert arrives (TLS 1.3 checks the client certificate after the client's side of
    /// the handshake is done), and whose shutdown fails too, as OpenSSL's does after the alert.
    #[derive(Default)]
    struct Alerted {
        written: bool,
        reader: Option<std::task::Waker>,
    }

    impl AsyncRead for Alerted {
        fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, _: &mut ReadBuf<'_>) -> Poll<std::io::Result<()>> {
            if !self.written {
                self.reader = Some(cx.waker().clone());
                return Poll::Pending;
            }
            Poll::Ready(Err(std::io::Error::other("tlsv13 alert certificate required")))
        }
    }

    impl AsyncWrite for Alerted {
        fn poll_write(mut self: Pin<&mut Self>, _: &mut Context<'_>, buf: &[u8]) -> Poll<std::io::Result<usize>> {
            self.written = true;
            if let Some(w) = self.reader.take() {
                w.wake();
            }
            Poll::Ready(Ok(buf.len()))
        }
        fn poll_flush(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Ok(()))
        }
        fn poll_shutdown(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<std::io::Result<()>> {
            Poll::Ready(Err(std::io::Error::other("shutdown while in init")))
        }
    }

    /// hyper reads a connection once the request is written; when that read fails it closes the
    /// connection, and when the shutdown fails as well it reports only the shutdown's error: the
    /// alert, the one thing the operator needs, was lost (CI saw "error shutting down
    /// connection: ... shutdown while in init").
    #[tokio::test]
    async fn the_first_io_error_is_the_one_reported() {
        let ep = Endpoint::parse("https://127.0.0.1:2379").unwrap();
        let mut conn = handshake(Alerted::default()).await.unwrap();
        match conn.call(&ep, "/v3/kv/txn", b"{}".to_vec(), None).await {
            Err(CallError::Transport(e)) => assert!(e.contains("certificate required"), "{e}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn token_errors_are_recognised() {
        let etcd = |m: &str| CallError::Etcd { message: m.to_owned() };
        assert!(etcd("etcdserver: invalid auth token").wants_new_token());
        assert!(etcd("etcdserver: revision of auth store is old").wants_new_token());
        assert!(!etcd("etcdserver: permission denied").wants_new_token());
        assert!(!CallError::Transport("invalid auth token".into()).wants_new_token());
        assert!(etcd("etcdserver: user name is empty").text().contains("set username and password"));
    }
}
