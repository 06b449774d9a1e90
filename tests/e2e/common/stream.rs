//! Readers of the event streams: Server-Sent Events (an incremental parser over a response
//! body) and a minimal WebSocket client over a raw TCP socket. Open them with
//! [`Client::sse`](super::Client::sse) and [`Client::ws`](super::Client::ws).

use std::time::{Duration, Instant};

use serde_json::Value;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a test waits for one expected event.
pub const EVENT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a stream must stay silent to show that nothing else was delivered.
pub const QUIET: Duration = Duration::from_millis(400);

// ---- SSE client ------------------------------------------------------------------------

/// One Server-Sent Event.
#[derive(Debug, Clone)]
pub struct SseMsg {
    /// `event:` (absent for ordinary events; `lagged` for lag notices).
    pub event: Option<String>,
    /// `id:`.
    pub id: Option<String>,
    pub data: String,
    /// The field names in the order they came.
    pub fields: Vec<String>,
}

impl SseMsg {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("SSE data is not JSON ({e}): {}", self.data))
    }
    pub fn is_lagged(&self) -> bool {
        self.event.as_deref() == Some("lagged")
    }
}

/// A `GET /v1/events` stream with an incremental parser.
pub struct Sse {
    resp: reqwest::Response,
    buf: Vec<u8>,
    /// Start of the unparsed part of `buf`.
    start: usize,
    /// Where the search for the end of the next event resumes.
    scan: usize,
}

impl Sse {
    /// A stream from its response head (asserting 200 and `text/event-stream`). The server
    /// has registered the subscription once the head arrives, so every change made afterwards
    /// is delivered.
    pub fn new(resp: reqwest::Response) -> Sse {
        assert_eq!(resp.status().as_u16(), 200, "GET {}", resp.url());
        let ct = resp
            .headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_owned();
        assert!(
            ct.starts_with("text/event-stream"),
            "content type of {}: {ct}",
            resp.url()
        );
        Sse {
            resp,
            buf: Vec::new(),
            start: 0,
            scan: 0,
        }
    }

    /// The next event (keep-alive comments are skipped); `None` if none arrives by
    /// `deadline`. Panics if the stream ends.
    pub async fn next_until(&mut self, deadline: Instant) -> Option<SseMsg> {
        match self.read_until(deadline).await {
            Ok(m) => m,
            Err(end) => panic!("{end}"),
        }
    }

    /// The next event, or `None` once the stream ends, fails or stays silent for `timeout`
    /// (for a reader that runs until the server goes away).
    pub async fn next_or_end(&mut self, timeout: Duration) -> Option<SseMsg> {
        self.read_until(Instant::now() + timeout)
            .await
            .ok()
            .flatten()
    }

    /// Whether the stream ends within `timeout` (what is still in flight is skipped).
    pub async fn ended_within(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            match self.read_until(deadline).await {
                Ok(Some(_)) => continue,
                Ok(None) => return false,
                Err(_) => return true,
            }
        }
    }

    /// The next event; `Ok(None)` at `deadline`, `Err` when the stream ends or fails.
    async fn read_until(&mut self, deadline: Instant) -> Result<Option<SseMsg>, String> {
        loop {
            if let Some(m) = self.parse_one() {
                return Ok(Some(m));
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(None);
            }
            match tokio::time::timeout(left, self.resp.chunk()).await {
                Err(_) => return Ok(None),
                Ok(Ok(Some(c))) => {
                    if self.start > 0 && self.start * 2 > self.buf.len() {
                        self.buf.drain(..self.start);
                        self.scan -= self.start;
                        self.start = 0;
                    }
                    self.buf.extend_from_slice(&c);
                }
                Ok(Ok(None)) => return Err("the SSE stream ended".into()),
                Ok(Err(e)) => return Err(format!("reading the SSE stream: {e}")),
            }
        }
    }

    pub async fn next(&mut self, timeout: Duration) -> Option<SseMsg> {
        self.next_until(Instant::now() + timeout).await
    }

    /// The next event, which must come within [`EVENT_TIMEOUT`].
    pub async fn expect_next(&mut self, what: &str) -> SseMsg {
        self.next(EVENT_TIMEOUT)
            .await
            .unwrap_or_else(|| panic!("no SSE event within {EVENT_TIMEOUT:?} ({what})"))
    }

    /// `n` events, as JSON, checking that each `id:` is the envelope's `seq`.
    pub async fn take(&mut self, n: usize, what: &str) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let m = self.expect_next(&format!("{what}: event {i} of {n}")).await;
            assert!(!m.is_lagged(), "{what}: unexpected lag notice {}", m.data);
            let v = m.json();
            assert_eq!(
                m.id.as_deref(),
                Some(v["seq"].to_string().as_str()),
                "{what}: SSE id is the seq: {m:?}"
            );
            out.push(v);
        }
        out
    }

    /// Assert that nothing more is delivered for [`QUIET`].
    pub async fn expect_quiet(&mut self, what: &str) {
        if let Some(m) = self.next(QUIET).await {
            panic!("{what}: unexpected extra event {m:?}");
        }
    }

    /// Parse one complete event from the buffer, skipping comment-only blocks.
    fn parse_one(&mut self) -> Option<SseMsg> {
        loop {
            let rel = self.buf[self.scan..].windows(2).position(|w| w == b"\n\n");
            let Some(rel) = rel else {
                self.scan = self.buf.len().saturating_sub(1).max(self.start);
                return None;
            };
            let end = self.scan + rel;
            let block = std::str::from_utf8(&self.buf[self.start..end])
                .expect("SSE is UTF-8")
                .to_owned();
            self.start = end + 2;
            self.scan = self.start;
            let mut m = SseMsg {
                event: None,
                id: None,
                data: String::new(),
                fields: Vec::new(),
            };
            let mut any = false;
            for line in block.split('\n') {
                if line.is_empty() || line.starts_with(':') {
                    continue;
                }
                let (k, v) = line.split_once(':').unwrap_or((line, ""));
                let v = v.strip_prefix(' ').unwrap_or(v);
                any = true;
                m.fields.push(k.to_owned());
                match k {
                    "event" => m.event = Some(v.to_owned()),
                    "id" => m.id = Some(v.to_owned()),
                    "data" => {
                        if !m.data.is_empty() {
                            m.data.push('\n');
                        }
                        m.data.push_str(v);
                    }
                    _ => {}
                }
            }
            if any {
                return Some(m);
            }
        }
    }
}

// ---- WebSocket client ------------------------------------------------------------------

/// A minimal WebSocket client: the HTTP/1.1 upgrade, then unmasked server frames.
pub struct Ws {
    tcp: TcpStream,
    buf: Vec<u8>,
}

/// What a WebSocket upgrade request got.
pub enum WsOpen {
    Open(Ws),
    /// Not upgraded: status and body.
    Refused(u16, String),
}

impl Ws {
    pub async fn connect(port: u16, token: &str, query: &str) -> WsOpen {
        let mut tcp = tokio::time::timeout(
            Duration::from_secs(5),
            TcpStream::connect(("127.0.0.1", port)),
        )
        .await
        .expect("connect within 5 s")
        .expect("connecting to the server");
        let req = format!(
            "GET /v1/events/ws?{query} HTTP/1.1\r\nHost: 127.0.0.1:{}\r\nAuthorization: Bearer {}\r\n\
             Upgrade: websocket\r\nConnection: Upgrade\r\n\
             Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
            port, token
        );
        tcp.write_all(req.as_bytes())
            .await
            .expect("sending the upgrade");
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            let mut chunk = vec![0u8; 4096];
            let n = tokio::time::timeout_at(deadline.into(), tcp.read(&mut chunk))
                .await
                .expect("the upgrade response within 10 s")
                .expect("reading the upgrade response");
            assert!(
                n > 0,
                "connection closed during the upgrade: {:?}",
                String::from_utf8_lossy(&buf)
            );
            buf.extend_from_slice(&chunk[..n]);
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).into_owned();
        let status: u16 = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line: {head}"));
        let rest = buf[head_end..].to_vec();
        if status != 101 {
            // Read the (small) body until Content-Length or EOF.
            let len = head
                .lines()
                .find_map(|l| {
                    let (k, v) = l.split_once(':')?;
                    k.eq_ignore_ascii_case("content-length")
                        .then(|| v.trim().parse::<usize>().ok())?
                })
                .unwrap_or(usize::MAX);
            let mut body = rest;
            while body.len() < len {
                let mut chunk = vec![0u8; 4096];
                match tokio::time::timeout_at(deadline.into(), tcp.read(&mut chunk)).await {
                    Ok(Ok(n)) if n > 0 => body.extend_from_slice(&chunk[..n]),
                    _ => break,
                }
            }
            return WsOpen::Refused(status, String::from_utf8_lossy(&body).into_owned());
        }
        let lower = head.to_ascii_lowercase();
        assert!(
            lower.contains("upgrade: websocket"),
            "101 without Upgrade: websocket: {head}"
        );
        // RFC 6455's sample key and its accept value.
        assert!(
            head.contains("s3pPLMBiTxaQ9kYGzzhZRbK+xOo="),
            "wrong Sec-WebSocket-Accept: {head}"
        );
        WsOpen::Open(Ws { tcp, buf: rest })
    }

    /// Parse one complete frame: (fin, opcode, payload).
    fn parse_frame(&mut self) -> Option<(bool, u8, Vec<u8>)> {
        let b = &self.buf;
        if b.len() < 2 {
            return None;
        }
        let fin = b[0] & 0x80 != 0;
        let opcode = b[0] & 0x0f;
        assert_eq!(b[1] & 0x80, 0, "server frames must not be masked");
        let (len, mut off) = match b[1] & 0x7f {
            126 => {
                if b.len() < 4 {
                    return None;
                }
                (u16::from_be_bytes([b[2], b[3]]) as usize, 4)
            }
            127 => {
                if b.len() < 10 {
                    return None;
                }
                (
                    u64::from_be_bytes(b[2..10].try_into().unwrap()) as usize,
                    10,
                )
            }
            n => (n as usize, 2),
        };
        if b.len() < off + len {
            return None;
        }
        let payload = b[off..off + len].to_vec();
        off += len;
        self.buf.drain(..off);
        Some((fin, opcode, payload))
    }

    /// Skip messages until a close frame; its payload (status code and reason), or `None`
    /// if none arrives within `timeout`.
    pub async fn close_frame(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        loop {
            while let Some((_, opcode, payload)) = self.parse_frame() {
                if opcode == 0x8 {
                    return Some(payload);
                }
            }
            let mut chunk = vec![0u8; 65536];
            match tokio::time::timeout_at(deadline.into(), self.tcp.read(&mut chunk)).await {
                Ok(Ok(n)) if n > 0 => self.buf.extend_from_slice(&chunk[..n]),
                _ => return None,
            }
        }
    }

    /// The next text message; `None` if none arrives within `timeout`. Panics on close.
    pub async fn next(&mut self, timeout: Duration) -> Option<String> {
        let deadline = Instant::now() + timeout;
        let mut message: Vec<u8> = Vec::new();
        loop {
            while let Some((fin, opcode, payload)) = self.parse_frame() {
                match opcode {
                    0x1 | 0x0 => {
                        message.extend_from_slice(&payload);
                        if fin {
                            return Some(
                                String::from_utf8(message).expect("text frames are UTF-8"),
                            );
                        }
                    }
                    0x8 => panic!("the server closed the WebSocket: {payload:?}"),
                    0x9 | 0xA => {} // ping / pong: nothing to do for the test
                    op => panic!("unexpected WebSocket opcode {op:#x}"),
                }
            }
            let mut chunk = vec![0u8; 65536];
            match tokio::time::timeout_at(deadline.into(), self.tcp.read(&mut chunk)).await {
                Err(_) => return None,
                Ok(Ok(0)) => panic!("the WebSocket connection closed"),
                Ok(Ok(n)) => self.buf.extend_from_slice(&chunk[..n]),
                Ok(Err(e)) => panic!("reading the WebSocket: {e}"),
            }
        }
    }

    pub async fn take(&mut self, n: usize, what: &str) -> Vec<Value> {
        let mut out = Vec::with_capacity(n);
        for i in 0..n {
            let t = self.next(EVENT_TIMEOUT).await.unwrap_or_else(|| {
                panic!("{what}: no WebSocket message {i} of {n} within {EVENT_TIMEOUT:?}")
            });
            let v: Value =
                serde_json::from_str(&t).unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {t}"));
            assert_ne!(v["type"], "lagged", "{what}: unexpected lag notice {v}");
            out.push(v);
        }
        out
    }

    pub async fn expect_quiet(&mut self, what: &str) {
        if let Some(m) = self.next(QUIET).await {
            panic!("{what}: unexpected extra WebSocket message {m}");
        }
    }
}
