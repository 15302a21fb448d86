//! Added latency of the gateway: the same requests sent straight to a mock provider and through
//! `tollgate serve` (release build, SQLite ledger), interleaved so both see the same machine
//! noise. Reports p50/p99 per scenario and the gateway's overhead in microseconds.
//!
//! A second table measures what budget enforcement adds (Redis and in-process counters).
//!
//! Run: `cargo bench -p tollgate-gateway --bench latency` (results: bench/RESULTS.md). Needs
//! Redis at `TOLLGATE_TEST_REDIS` (default 127.0.0.1:6379).
//!
//! With `TOLLGATE_BENCH_BASELINE_BIN=/path/to/older/tollgate`, a third table compares this
//! build with that binary (same policy, same mock, interleaved), e.g. before and after a change.

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

/// Starts `tollgate serve` with `policy` (backends, models, tenants) and one key per tenant.
async fn start_gateway(
    dir: &std::path::Path,
    name: &str,
    policy: &str,
    tenants: &[&str],
) -> (String, std::process::Child, Vec<String>) {
    start_gateway_bin(env!("CARGO_BIN_EXE_tollgate"), dir, name, policy, tenants).await
}

/// Like `start_gateway`, with a given binary; each gateway runs in a folder of its own (its
/// ledger journal lives there).
async fn start_gateway_bin(
    bin: &str,
    dir: &std::path::Path,
    name: &str,
    policy: &str,
    tenants: &[&str],
) -> (String, std::process::Child, Vec<String>) {
    let dir = &dir.join(name);
    std::fs::create_dir_all(dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let config = dir.join(format!("{name}.yaml"));
    std::fs::write(
        &config,
        // No admin API: several gateways run side by side (it would want the same port).
        format!("listen: [\"127.0.0.1:{port}\"]\ndatabase_url: sqlite://{}/{name}.db\nthreads: 1\nadmin: {{ enabled: false }}\n{policy}", dir.display()),
    )
    .unwrap();
    let keys = tenants
        .iter()
        .map(|tenant| {
            let out = Command::new(bin)
                .arg("--config")
                .arg(&config)
                .args(["keys", "create", "--tenant", tenant])
                .output()
                .unwrap();
            String::from_utf8(out.stdout).unwrap().trim().to_string()
        })
        .collect();
    let child = Command::new(bin)
        .arg("--config")
        .arg(&config)
        .arg("serve")
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let client = reqwest::Client::new();
    for _ in 0..400 {
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
    (
        format!("http://127.0.0.1:{port}/v1/chat/completions"),
        child,
        keys,
    )
}

fn stop(mut child: std::process::Child) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(child.id().to_string())
        .status();
    let _ = child.wait();
}

/// User + system CPU time of a process so far, in clock ticks (`/proc/<pid>/stat`).
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name (which may hold spaces) start at state; utime and stime
    // are the 14th and 15th fields overall.
    let rest = stat.rsplit_once(") ").map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let field = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<u64>().ok())
            .unwrap_or(0)
    };
    field(11) + field(12)
}

fn us(d: Duration) -> f64 {
    d.as_secs_f64() * 1e6
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let mock = mock_upstream::MockUpstream::start("bench").await;
    let dir = tempfile::tempdir().unwrap();
    let backends = format!(
        "backends:\n  - {{ name: mock, base_url: \"{}\" }}\nmodels:\n  - name: m\n    price: {{ input: 1, output: 2 }}\n    targets: [{{ backend: mock, model: m }}]\n",
        mock.base_url()
    );
    let limited = "    budgets: [{ limit_usd: 1000000, period: monthly }]\n    rpm: 100000000\n    tpm: 1000000000\n";
    let run = chrono::Utc::now().timestamp_millis();
    let redis =
        std::env::var("TOLLGATE_TEST_REDIS").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let shared_policy = format!("redis_url: {redis}\n{backends}tenants:\n  - name: free\n  - name: limited-{run}\n{limited}");
    let limited_name = format!("limited-{run}");
    let (gateway_url, gateway, keys) = start_gateway(
        dir.path(),
        "shared",
        &shared_policy,
        &["free", &limited_name],
    )
    .await;
    let (key, redis_key) = (keys[0].clone(), keys[1].clone());
    let local_policy = format!("{backends}tenants:\n  - name: limited\n{limited}");
    let (local_url, local_gateway, local_keys) =
        start_gateway(dir.path(), "local", &local_policy, &["limited"]).await;
    let client = reqwest::Client::builder()
        .tcp_nodelay(true)
        .build()
        .unwrap();
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

    // Cost of budget enforcement: the same small request through the same gateway for a tenant
    // with no limits, for one with a budget + RPM + TPM on Redis (one Lua call to reserve, one to
    // settle), and through a Redis-less gateway enforcing them in-process.
    let body = json!({"model": "m", "max_tokens": 16, "messages": [{"role": "user", "content": prompt_300}]});
    let paths = [
        ("no limits (baseline)", &gateway_url, &key),
        ("budget + RPM + TPM, Redis", &gateway_url, &redis_key),
        ("budget + RPM + TPM, in-process", &local_url, &local_keys[0]),
    ];
    let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
    for i in 0..ROUNDS + 50 {
        for (j, (_, url, key)) in paths.iter().enumerate() {
            let t = time_request(&client, url, key, &body, false).await;
            if i >= 50 {
                samples[j].push(t);
            }
        }
    }
    println!();
    println!("| limits | p50 | p99 | added p50 vs no limits | added p99 vs no limits |");
    println!("|---|---|---|---|---|");
    for s in &mut samples {
        s.sort();
    }
    let (base50, base99) = (percentile(&samples[0], 0.5), percentile(&samples[0], 0.99));
    for ((name, _, _), s) in paths.iter().zip(&samples) {
        let (p50, p99) = (percentile(s, 0.5), percentile(s, 0.99));
        println!(
            "| {name} | {:.0} µs | {:.0} µs | {:+.0} µs | {:+.0} µs |",
            us(p50),
            us(p99),
            us(p50) - us(base50),
            us(p99) - us(base99)
        );
    }
    if let Ok(baseline_bin) = std::env::var("TOLLGATE_BENCH_BASELINE_BIN") {
        // Before/after: the same unlimited tenant on this build and on the baseline binary.
        let plain = format!("{backends}tenants:\n  - name: free\n");
        let (after_url, after, after_keys) =
            start_gateway(dir.path(), "after", &plain, &["free"]).await;
        let (before_url, before, before_keys) =
            start_gateway_bin(&baseline_bin, dir.path(), "before", &plain, &["free"]).await;
        let body = json!({"model": "m", "messages": [{"role": "user", "content": prompt_300}]});
        let paths = [
            ("direct to the mock", &direct_url, &key),
            ("baseline binary", &before_url, &before_keys[0]),
            ("this build", &after_url, &after_keys[0]),
        ];
        let pids = [None, Some(before.id()), Some(after.id())];
        let mut samples: Vec<Vec<Duration>> = vec![Vec::new(); paths.len()];
        let mut cpu_start = [0u64; 3];
        for i in 0..ROUNDS * 2 + 50 {
            if i == 50 {
                for (j, pid) in pids.iter().enumerate() {
                    cpu_start[j] = pid.map_or(0, cpu_ticks);
                }
            }
            for (j, (_, url, key)) in paths.iter().enumerate() {
                let t = time_request(&client, url, key, &body, false).await;
                if i >= 50 {
                    samples[j].push(t);
                }
            }
        }
        let ticks_per_sec = 100.0; // USER_HZ on Linux
        let cpu_us: Vec<Option<f64>> = pids
            .iter()
            .enumerate()
            .map(|(j, pid)| {
                pid.map(|pid| {
                    (cpu_ticks(pid) - cpu_start[j]) as f64 / ticks_per_sec * 1e6
                        / (ROUNDS * 2) as f64
                })
            })
            .collect();
        println!();
        println!("| build (concurrency 1, ~300-token chat) | p50 | p99 | added p50 vs direct | added p99 vs direct | gateway CPU per request |");
        println!("|---|---|---|---|---|---|");
        for s in &mut samples {
            s.sort();
        }
        let (base50, base99) = (percentile(&samples[0], 0.5), percentile(&samples[0], 0.99));
        for (((name, _, _), s), cpu) in paths.iter().zip(&samples).zip(&cpu_us) {
            let (p50, p99) = (percentile(s, 0.5), percentile(s, 0.99));
            println!(
                "| {name} | {:.0} µs | {:.0} µs | {:+.0} µs | {:+.0} µs | {} |",
                us(p50),
                us(p99),
                us(p50) - us(base50),
                us(p99) - us(base99),
                cpu.map_or("-".to_string(), |c| format!("{c:.0} µs"))
            );
        }
        stop(after);
        stop(before);
    }
    stop(gateway);
    stop(local_gateway);
}
