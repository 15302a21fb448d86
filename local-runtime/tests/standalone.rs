//! `tollgate-runtime serve` on its own: loopback without a token, anything else only with one,
//! and with a token every request must carry it.

mod common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const BIN: &str = env!("CARGO_BIN_EXE_tollgate-runtime");

/// The status code of `GET path`, or `None` when nothing answers.
fn status(port: u16, path: &str, bearer: Option<&str>) -> Option<u16> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    let auth = bearer.map_or(String::new(), |b| format!("Authorization: Bearer {b}\r\n"));
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n{auth}Connection: close\r\n\r\n"
    )
    .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).ok()?;
    response.split(' ').nth(1)?.parse().ok()
}

#[test]
fn off_loopback_without_a_token_is_refused_before_anything_loads() {
    let out = Command::new(BIN)
        .args([
            "serve",
            "--model",
            "/nonexistent/m.gguf",
            "--listen",
            "0.0.0.0:0",
        ])
        .env_remove("TOLLGATE_RUNTIME_TOKEN")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("without a token"), "{err}");
}

#[test]
fn with_a_token_every_request_must_carry_it() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let mut child = Command::new(BIN)
        .args(["serve", "--model"])
        .arg(common::model_path())
        .args(["--listen", &format!("127.0.0.1:{port}")])
        .args(["--token-env", "TEST_RUNTIME_TOKEN"])
        .env("TEST_RUNTIME_TOKEN", "runtime-test-token")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let up = loop {
        if let Some(code) = status(port, "/health", Some("runtime-test-token")) {
            break code;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break 0;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    let refused: Vec<_> = [None, Some("wrong")]
        .into_iter()
        .flat_map(|b| ["/health", "/v1/models", "/metrics"].map(|p| status(port, p, b)))
        .collect();
    let models = status(port, "/v1/models", Some("runtime-test-token"));
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(up, 200, "the runtime did not come up");
    assert!(refused.iter().all(|s| *s == Some(401)), "{refused:?}");
    assert_eq!(models, Some(200));
}
