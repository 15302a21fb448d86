//! Added latency of the gateway: the same requests sent straight to a mock provider and through
//! `tollgate serve` (release build, SQLite ledger), interleaved so both see the same machine
//! noise. Reports p50/p99 per scenario and the gateway's overhead in microseconds.
//!
//! Run: `cargo bench -p tollgate-gateway --bench latency` (results: bench/RESULTS.md).

#[path = "../tests/e2e/harness/mock_upstream.rs"]
#[allow(dead_code)]
mod mock_upstream;

use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::{json, Value};

const ROUNDS: usize = 2000;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

async fn time_request(
    client: &reqwest::Client,
    url: &str,
    key: &str,
    body: &Value,
    stream: bool,
) -> Duration {
    let started = Instant::now();
    let response = client
        .post(url)
        .bearer_auth(key)
        .json(body)
        .send()
        .await
        .unwrap();
    assert_eq!(response.status(), 200);
    if stream {
        // Time to the first event.
        let mut events = response.bytes_stream();
        events.next().await.unwrap().unwrap();
        let elapsed = started.elapsed();
        while events.next().await.is_some() {}
        elapsed
    } else {
        response.bytes().await.unwrap();
        started.elapsed()
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mock = mock_upstream::MockUpstream::start("bench").await;
    let dir = tempfile::tempdir().unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.path().join("bench.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: [\"127.0.0.1:{port}\"]\ndatabase_url: sqlite://{}/bench.db\nthreads: 1\n\
             backends:\n  - {{ name: mock, base_url: \"{}\" }}\n\
             models:\n  - name: m\n    price: {{ input: 1, output: 2 }}\n    targets: [{{ backend: mock, model: m }}]\n\
             tenants:\n  - name: bench\n",
            dir.path().display(),
            mock.base_url()
        ),
    )
    .unwrap();
    let bin = env!("CARGO_BIN_EXE_tollgate");
    let out = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .args(["keys", "create", "--tenant", "bench"])
        .output()
        .unwrap();
    let key = String::from_utf8(out.stdout).unwrap().trim().to_string();
    let mut gateway = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
    let gateway_url = format!("http://127.0.0.1:{port}/v1/chat/completions");
    for _ in 0..200 {
        if client
            .get(format!("http://127.0.0.1:{port}/healthz"))
            .send()
            .await
            .is_ok()
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let direct_url = format!("{}/chat/completions", mock.base_url());

    let prompt_300 = "The gateway must add almost nothing to latency. ".repeat(30);
    let prompt_64k = "Long context line with some numbers 12345 and words. ".repeat(1200);
    let scenarios: Vec<(&str, Value, bool)> = vec![
        (
            "chat, ~300-token prompt, non-stream",
            json!({"model": "m", "messages": [{"role": "user", "content": prompt_300}]}),
            false,
        ),
        (
            "chat, ~300-token prompt, stream (time to first event)",
            json!({"model": "m", "stream": true, "messages": [{"role": "user", "content": prompt_300}]}),
            true,
        ),
        (
            "chat, 64 KiB prompt, non-stream",
            json!({"model": "m", "messages": [{"role": "user", "content": prompt_64k}]}),
            false,
        ),
    ];
    println!("| scenario | direct p50 | via gateway p50 | added p50 | direct p99 | via gateway p99 | added p99 | p50 ratio |");
    println!("|---|---|---|---|---|---|---|---|");
    for (name, body, stream) in &scenarios {
        let rounds = if name.contains("64 KiB") {
            ROUNDS / 4
        } else {
            ROUNDS
        };
        let (mut direct, mut via) = (Vec::new(), Vec::new());
        for i in 0..rounds + 50 {
            // Interleave so both paths share the machine's noise; the first 50 rounds warm up.
            let d = time_request(&client, &direct_url, "unused", body, *stream).await;
            let g = time_request(&client, &gateway_url, &key, body, *stream).await;
            if i >= 50 {
                direct.push(d);
                via.push(g);
            }
        }
        direct.sort();
        via.sort();
        let us = |d: Duration| d.as_secs_f64() * 1e6;
        let (d50, g50, d99, g99) = (
            percentile(&direct, 0.5),
            percentile(&via, 0.5),
            percentile(&direct, 0.99),
            percentile(&via, 0.99),
        );
        println!(
            "| {name} | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.0} µs | {:.2} |",
            us(d50),
            us(g50),
            us(g50) - us(d50),
            us(d99),
            us(g99),
            us(g99) - us(d99),
            us(g50) / us(d50)
        );
    }
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(gateway.id().to_string())
        .status();
    let _ = gateway.wait();
}
