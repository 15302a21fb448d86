//! What fault tests need from a gateway process beyond `Gateway`'s own API: signals, its exit
//! status without reaping it, its memory, `/healthz`, config rewrites, and a second process
//! started on the same directory and policy after a crash.

use std::process::{Child, Command};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::harness::Gateway;

/// Sends `signal` (`TERM`, `KILL`, ...) to `pid`.
pub fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill")
        .arg(format!("-{signal}"))
        .arg(pid.to_string())
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} {pid}");
}

/// How a process ended, read from `/proc/<pid>/stat` while it is a zombie (not yet reaped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    Code(i32),
    Signal(i32),
}

/// `Some` once `pid` has exited (a zombie its parent has not reaped yet).
pub fn exited(pid: u32) -> Option<Exit> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after_name = stat.rsplit_once(')')?.1;
    let state = after_name.split_whitespace().next()?;
    if state != "Z" && state != "X" {
        return None;
    }
    // Field 52, `exit_code`, in waitpid(2)'s encoding.
    let raw: i32 = after_name.split_whitespace().last()?.parse().ok()?;
    Some(if raw & 0x7f == 0 {
        Exit::Code((raw >> 8) & 0xff)
    } else {
        Exit::Signal(raw & 0x7f)
    })
}

/// Waits up to `timeout` for `pid` to exit; returns how and after how long.
pub async fn wait_exit(pid: u32, timeout: Duration) -> Option<(Exit, Duration)> {
    let started = Instant::now();
    while started.elapsed() < timeout {
        if let Some(exit) = exited(pid) {
            return Some((exit, started.elapsed()));
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    None
}

/// Resident memory of `pid` in KiB (`VmRSS`).
pub fn rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Samples a process's RSS every 250 ms in the background.
pub struct RssSampler {
    samples: Arc<Mutex<Vec<(Instant, u64)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl RssSampler {
    pub fn start(pid: u32) -> RssSampler {
        let samples: Arc<Mutex<Vec<(Instant, u64)>>> = Arc::default();
        let sink = samples.clone();
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(250));
            loop {
                tick.tick().await;
                if let Some(kib) = rss_kib(pid) {
                    sink.lock().unwrap().push((Instant::now(), kib));
                }
            }
        });
        RssSampler { samples, task }
    }

    /// Highest sample (KiB) taken in `[from, to)`.
    pub fn peak_between(&self, from: Instant, to: Instant) -> u64 {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|(at, _)| *at >= from && *at < to)
            .map(|(_, kib)| *kib)
            .max()
            .unwrap_or(0)
    }
}

impl Drop for RssSampler {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// `GET /healthz` on a data-plane URL: status and JSON body; `None` when nothing answers.
pub async fn health(url: &str) -> Option<(u16, Value)> {
    let client = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .unwrap();
    let r = client.get(format!("{url}/healthz")).send().await.ok()?;
    let status = r.status().as_u16();
    Some((status, r.json().await.unwrap_or(Value::Null)))
}

/// `GET /metrics` on the admin port (no token): the Prometheus text, if it answers 200.
pub async fn metrics(gw: &Gateway) -> Option<String> {
    let r = reqwest::get(format!("{}/metrics", gw.admin_url()))
        .await
        .ok()?;
    if r.status() != 200 {
        return None;
    }
    r.text().await.ok()
}

/// The value of an unlabelled sample `name` in Prometheus text.
pub fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The `ledger` section of `/healthz`, as numbers and flags.
#[derive(Debug, Clone, Default)]
pub struct LedgerHealth {
    pub status: String,
    /// Recorded, not yet journaled (the group commit in progress).
    pub queued_rows: i64,
    pub journal_rows: i64,
    pub journal_bytes: i64,
    pub dead_letters: i64,
    pub lost_rows: i64,
    pub database: String,
    pub accepting: bool,
}

impl LedgerHealth {
    /// Every row recorded so far is in the database.
    pub fn drained(&self) -> bool {
        self.queued_rows == 0 && self.journal_rows == 0
    }

    pub fn of(body: &Value) -> LedgerHealth {
        let ledger = &body["ledger"];
        LedgerHealth {
            status: body["status"].as_str().unwrap_or_default().to_string(),
            queued_rows: ledger["queued_rows"].as_i64().unwrap_or(-1),
            journal_rows: ledger["journal_rows"].as_i64().unwrap_or(-1),
            journal_bytes: ledger["journal_bytes"].as_i64().unwrap_or(-1),
            dead_letters: ledger["dead_letters"].as_i64().unwrap_or(-1),
            lost_rows: ledger["lost_rows"].as_i64().unwrap_or(-1),
            database: ledger["database"].as_str().unwrap_or_default().to_string(),
            accepting: ledger["accepting"].as_bool().unwrap_or(false),
        }
    }
}

/// Polls `/healthz` until `done` holds; returns the last ledger health, or `Err` with it (and
/// the raw body) on timeout.
pub async fn wait_health(
    url: &str,
    timeout: Duration,
    done: impl Fn(&LedgerHealth) -> bool,
) -> Result<LedgerHealth, String> {
    let deadline = Instant::now() + timeout;
    let mut last = String::from("no answer");
    loop {
        if let Some((status, body)) = health(url).await {
            if body.get("ledger").is_none() {
                return Err(format!("/healthz has no ledger section: {status} {body}"));
            }
            let ledger = LedgerHealth::of(&body);
            if done(&ledger) {
                return Ok(ledger);
            }
            last = format!("{status} {body}");
        }
        if Instant::now() > deadline {
            return Err(last);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Replaces the policy line that starts with `prefix` (e.g. `"shutdown:"`) by `line`, or
/// appends `line` when there is none. The gateway picks it up on its next start.
pub fn set_config_line(gw: &Gateway, prefix: &str, line: &str) {
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let mut found = false;
    let mut lines: Vec<String> = text
        .lines()
        .map(|l| {
            if l.starts_with(prefix) {
                found = true;
                line.to_string()
            } else {
                l.to_string()
            }
        })
        .collect();
    if !found {
        lines.insert(0, line.to_string());
    }
    std::fs::write(&gw.config, lines.join("\n") + "\n").unwrap();
}

/// The ledger's `flush_interval_ms` in the gateway's policy file (the harness's 50 by default).
pub fn flush_interval(gw: &Gateway) -> Duration {
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let ms = text
        .split("flush_interval_ms:")
        .nth(1)
        .and_then(|rest| {
            rest.trim_start()
                .split(|c: char| !c.is_ascii_digit())
                .next()?
                .parse()
                .ok()
        })
        .unwrap_or(200);
    Duration::from_millis(ms)
}

/// A gateway process started on an existing `Gateway`'s directory and policy (e.g. after that
/// one was SIGKILLed: `Gateway::restart` expects a clean exit). Killed when dropped.
pub struct Respawned {
    child: Child,
}

impl Respawned {
    /// Starts `tollgate serve` like the harness does (same cwd, environment and log file) and
    /// waits until `/healthz` answers 200.
    pub async fn start(gw: &Gateway) -> Respawned {
        let child = gw.serve_process();
        let mut respawned = Respawned { child };
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some((200, _)) = health(&gw.url()).await {
                return respawned;
            }
            if let Some(status) = respawned.child.try_wait().unwrap() {
                panic!("restarted gateway exited with {status}:\n{}", gw.log());
            }
            assert!(
                Instant::now() < deadline,
                "restarted gateway did not start:\n{}",
                gw.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Respawned {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
