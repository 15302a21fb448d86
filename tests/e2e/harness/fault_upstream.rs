//! A provider that misbehaves at the HTTP level, written on a raw socket so each fault is exact:
//! the upstream model name a request asks for picks the fault.
//!
//! - `hang`: reads the request, never answers.
//! - `reset-early`: reads the request, resets the connection (RST) before any byte.
//! - `reset`: starts a stream, sends 3 content chunks, then resets the connection.
//! - `stall`: starts a stream, sends 2 content chunks, then goes silent.
//! - `bad-sse`: a stream with an event whose data is not JSON between two good ones.
//! - `bad-json`: a 200 whose JSON body is cut off.
//! - `slow`: answers after 600 ms; a stream then sends 4 chunks 500 ms apart.
//! - `trickle`: a stream of 200 chunks, 100 ms apart, stopping as soon as the peer goes away.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{json, Value};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};

pub struct FaultUpstream {
    pub addr: SocketAddr,
    /// Upstream models of the requests received, in order.
    pub requests: Mutex<Vec<String>>,
    /// Connections whose peer (the gateway) went away while this side still had more to send.
    pub disconnects: AtomicUsize,
    /// Content chunks written by `trickle`.
    pub trickled: AtomicUsize,
}

impl FaultUpstream {
    pub async fn start() -> Arc<FaultUpstream> {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let upstream = Arc::new(FaultUpstream {
            addr: listener.local_addr().unwrap(),
            requests: Mutex::default(),
            disconnects: AtomicUsize::new(0),
            trickled: AtomicUsize::new(0),
        });
        let state = upstream.clone();
        tokio::spawn(async move {
            loop {
                let Ok((socket, _)) = listener.accept().await else {
                    continue;
                };
                tokio::spawn(serve(socket, state.clone()));
            }
        });
        upstream
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    pub fn received(&self, model: &str) -> usize {
        self.requests
            .lock()
            .unwrap()
            .iter()
            .filter(|m| *m == model)
            .count()
    }

    /// The content words of this provider's streams.
    pub fn word(i: usize) -> String {
        format!(" fault-word{i}")
    }
}

/// Reads one request (head and `content-length` body); `None` if the peer closed first.
async fn read_request(socket: &mut TcpStream) -> Option<Value> {
    let mut buffer = Vec::new();
    let mut chunk = [0u8; 8192];
    let head_end = loop {
        if let Some(i) = buffer.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buffer[..head_end]).to_ascii_lowercase();
    let length: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    while buffer.len() < head_end + length {
        let n = socket.read(&mut chunk).await.ok()?;
        if n == 0 {
            return None;
        }
        buffer.extend_from_slice(&chunk[..n]);
    }
    serde_json::from_slice(&buffer[head_end..head_end + length]).ok()
}

fn chunk_event(model: &str, content: &str) -> String {
    let chunk = json!({"id": "chatcmpl-fault", "object": "chat.completion.chunk", "model": model,
                       "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": null}]});
    format!("data: {chunk}\n\n")
}

/// Writes `data` as one HTTP/1.1 chunk.
async fn write_chunk(writer: &mut OwnedWriteHalf, data: &str) -> std::io::Result<()> {
    writer
        .write_all(format!("{:x}\r\n{data}\r\n", data.len()).as_bytes())
        .await?;
    writer.flush().await
}

const STREAM_HEAD: &str = "HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\nconnection: close\r\n\r\n";

/// Resets the connection: SO_LINGER 0, then close.
fn reset(socket: TcpStream) {
    // Deprecated because a non-zero linger blocks the thread on drop; zero never blocks.
    #[allow(deprecated)]
    let _ = socket.set_linger(Some(Duration::ZERO));
    drop(socket);
}

async fn serve(mut socket: TcpStream, state: Arc<FaultUpstream>) {
    let Some(request) = read_request(&mut socket).await else {
        return;
    };
    let model = request["model"].as_str().unwrap_or_default().to_string();
    let stream = request["stream"] == json!(true);
    state.requests.lock().unwrap().push(model.clone());
    match model.as_str() {
        "hang" => {
            // Hold the connection until the gateway gives up on it (or 30 s pass).
            let mut sink = [0u8; 1024];
            let _ = tokio::time::timeout(Duration::from_secs(30), async {
                while matches!(socket.read(&mut sink).await, Ok(n) if n > 0) {}
            })
            .await;
        }
        "reset-early" => reset(socket),
        "reset" | "stall" => {
            let chunks = if model == "reset" { 3 } else { 2 };
            if socket.write_all(STREAM_HEAD.as_bytes()).await.is_err() {
                return;
            }
            let (mut reader, mut writer) = socket.into_split();
            for i in 0..chunks {
                if write_chunk(&mut writer, &chunk_event(&model, &FaultUpstream::word(i)))
                    .await
                    .is_err()
                {
                    return;
                }
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
            if model == "reset" {
                tokio::time::sleep(Duration::from_millis(100)).await;
                reset(reader.reunite(writer).unwrap());
            } else {
                let mut sink = [0u8; 1024];
                let _ = tokio::time::timeout(Duration::from_secs(30), async {
                    while matches!(reader.read(&mut sink).await, Ok(n) if n > 0) {}
                })
                .await;
            }
        }
        "bad-sse" => {
            let events = [
                chunk_event(&model, &FaultUpstream::word(0)),
                "data: {\"choices\": [{\"delta\": {\"content\": \"broken\n\n".to_string(),
                chunk_event(&model, &FaultUpstream::word(2)),
                "data: [DONE]\n\n".to_string(),
            ];
            if socket.write_all(STREAM_HEAD.as_bytes()).await.is_err() {
                return;
            }
            let (_reader, mut writer) = socket.into_split();
            for event in events {
                if write_chunk(&mut writer, &event).await.is_err() {
                    return;
                }
            }
            let _ = writer.write_all(b"0\r\n\r\n").await;
        }
        "endless-event" => {
            // One content event, then an event that never ends (17 MiB and counting).
            if socket.write_all(STREAM_HEAD.as_bytes()).await.is_err() {
                return;
            }
            let (_reader, mut writer) = socket.into_split();
            if write_chunk(&mut writer, &chunk_event(&model, &FaultUpstream::word(0)))
                .await
                .is_err()
            {
                return;
            }
            let _ = write_chunk(
                &mut writer,
                "data: {\"choices\": [{\"delta\": {\"content\": \"",
            )
            .await;
            let block = "a".repeat(1 << 20);
            for _ in 0..17 {
                if write_chunk(&mut writer, &block).await.is_err() {
                    return;
                }
            }
            // Hold the connection: only the gateway's bound ends this stream.
            tokio::time::sleep(Duration::from_secs(30)).await;
        }
        "short-body" => {
            // Promises more body than it sends, then closes: the read fails.
            let body = "{\"id\": \"chatcmpl-fault\", \"object\": \"chat.completion\"";
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len() + 500
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        }
        "bad-json" => {
            let body = "{\"id\": \"chatcmpl-fault\", \"object\": \"chat.completion\", \"choices\": [{\"index\": 0, \"message\": {\"role\": \"assistant\", \"content\": \"cut off her";
            let head = format!(
                "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        }
        "slow" => {
            tokio::time::sleep(Duration::from_millis(600)).await;
            if stream {
                if socket.write_all(STREAM_HEAD.as_bytes()).await.is_err() {
                    return;
                }
                let (_reader, mut writer) = socket.into_split();
                for i in 0..4 {
                    if i > 0 {
                        tokio::time::sleep(Duration::from_millis(500)).await;
                    }
                    if write_chunk(&mut writer, &chunk_event(&model, &FaultUpstream::word(i)))
                        .await
                        .is_err()
                    {
                        return;
                    }
                }
                let _ = write_chunk(&mut writer, "data: [DONE]\n\n").await;
                let _ = writer.write_all(b"0\r\n\r\n").await;
            } else {
                let text: String = (0..4).map(FaultUpstream::word).collect();
                let body = json!({"id": "chatcmpl-fault", "object": "chat.completion", "created": 0, "model": model,
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}]})
                .to_string();
                let head = format!(
                    "HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                    body.len()
                );
                let _ = socket.write_all(head.as_bytes()).await;
                let _ = socket.write_all(body.as_bytes()).await;
            }
        }
        "trickle" => {
            if socket.write_all(STREAM_HEAD.as_bytes()).await.is_err() {
                return;
            }
            let (mut reader, mut writer) = socket.into_split();
            let mut sink = [0u8; 1024];
            for i in 0..200 {
                let event = chunk_event(&model, &FaultUpstream::word(i));
                tokio::select! {
                    read = reader.read(&mut sink) => {
                        if matches!(read, Ok(0) | Err(_)) {
                            state.disconnects.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                    }
                    written = async {
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        write_chunk(&mut writer, &event).await
                    } => {
                        if written.is_err() {
                            state.disconnects.fetch_add(1, Ordering::SeqCst);
                            return;
                        }
                        state.trickled.fetch_add(1, Ordering::SeqCst);
                    }
                }
            }
            let _ = write_chunk(&mut writer, "data: [DONE]\n\n").await;
            let _ = writer.write_all(b"0\r\n\r\n").await;
        }
        other => {
            let body = json!({"error": {"message": format!("unknown fault {other}"), "type": "invalid_request_error", "param": "model", "code": null}}).to_string();
            let head = format!(
                "HTTP/1.1 400 Bad Request\r\ncontent-type: application/json\r\ncontent-length: {}\r\nconnection: close\r\n\r\n",
                body.len()
            );
            let _ = socket.write_all(head.as_bytes()).await;
            let _ = socket.write_all(body.as_bytes()).await;
        }
    }
}
