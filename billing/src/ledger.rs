//! The usage ledger: one [`LedgerRow`] per authenticated request, written in batches by a
//! background task so that the request path never waits on the database.
//!
//! Nothing is dropped: a batch that fails to write is retried with backoff while new rows keep
//! queueing; at shutdown, rows that still cannot be written are appended to a spool file, which
//! the next start replays. Rows are keyed by request id and inserted with "on conflict do
//! nothing", so a replay or a retry after a partial failure never bills twice.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use crate::store::Store;

/// What one request used and cost. Token fields are "billed" values; the `counted_*` and
/// `provider_*` fields keep both sources so that disagreements can be audited.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LedgerRow {
    pub request_id: String,
    /// Unix epoch milliseconds when the request arrived.
    pub created_ms: i64,
    pub tenant: String,
    pub key_id: String,
    /// `chat.completions`, `completions` or `embeddings`.
    pub endpoint: String,
    /// The public model name the client asked for.
    pub model: String,
    pub backend: Option<String>,
    pub upstream_model: Option<String>,
    pub stream: bool,
    /// HTTP status the client received.
    pub status: i32,
    /// `ok`, `upstream_error`, `client_closed`, `upstream_closed`, `rejected`.
    pub outcome: String,
    /// Backends tried, the one that answered included.
    pub attempts: i32,
    pub prompt_tokens: i64,
    pub cached_tokens: i64,
    pub completion_tokens: i64,
    pub counted_prompt_tokens: i64,
    pub counted_completion_tokens: i64,
    pub provider_prompt_tokens: Option<i64>,
    pub provider_cached_tokens: Option<i64>,
    pub provider_completion_tokens: Option<i64>,
    /// `provider` when the billed tokens are the provider's report, `gateway` when counted here,
    /// `none` when nothing was served.
    pub usage_source: String,
    pub cost_micros: i64,
    pub latency_ms: i64,
    /// Time to the first body byte sent to the client, for streams.
    pub ttft_ms: Option<i64>,
    /// The tenant's tags (a JSON object) when the request was made.
    #[serde(default)]
    pub tags: Option<String>,
    /// For requests to a complexity route: its name, the tier and model chosen, the score and
    /// the reason, and the cost the request would have had on the premium model.
    #[serde(default)]
    pub routing: Option<Routing>,
    /// Speculative decoding as the local runtime reported it.
    #[serde(default)]
    pub speculation: Option<Speculation>,
    /// The tenant's IANA time zone when the request was made: its day in the daily rollups.
    #[serde(default)]
    pub time_zone: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Speculation {
    /// Accepted over drafted tokens.
    pub acceptance_rate: f64,
    /// Tokens produced per target forward pass (1.0 without speculation).
    pub tokens_per_pass: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Routing {
    pub route: String,
    pub tier: String,
    pub score: f64,
    pub reason: String,
    pub routed_model: String,
    pub premium_equivalent_micros: i64,
}

/// Tuning for the background writer.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    pub max_batch: usize,
    pub flush_interval: Duration,
    /// Where rows go when the database is still unreachable at shutdown.
    pub spool_path: PathBuf,
    /// How long shutdown keeps retrying the database before spooling.
    pub shutdown_deadline: Duration,
}

enum Message {
    Row(Box<LedgerRow>),
    Flush(oneshot::Sender<()>),
}

/// Cheap, cloneable handle used on the request path.
#[derive(Clone)]
pub struct LedgerSender {
    tx: mpsc::UnboundedSender<Message>,
}

impl LedgerSender {
    /// Queues a row; never blocks. Rows sent after the writer has stopped are logged, not lost
    /// silently.
    pub fn record(&self, row: LedgerRow) {
        if let Err(e) = self.tx.send(Message::Row(Box::new(row))) {
            if let Message::Row(row) = e.0 {
                tracing::error!(request_id = %row.request_id, "ledger writer stopped; row not queued");
            }
        }
    }

    /// Waits until every row queued before this call is durable (database or spool file).
    pub async fn flush(&self) {
        let (tx, rx) = oneshot::channel();
        if self.tx.send(Message::Flush(tx)).is_ok() {
            let _ = rx.await;
        }
    }
}

/// Starts the writer on the current Tokio runtime.
pub fn spawn_writer(store: Store, options: WriterOptions) -> LedgerSender {
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(
        Writer {
            store,
            options,
            pending: Vec::new(),
        }
        .run(rx),
    );
    LedgerSender { tx }
}

/// Replays rows spooled by an earlier shutdown, then removes the spool file.
pub async fn replay_spool(store: &Store, path: &std::path::Path) -> anyhow::Result<usize> {
    let text = match tokio::fs::read_to_string(path).await {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e.into()),
    };
    let mut rows = Vec::new();
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        match serde_json::from_str::<LedgerRow>(line) {
            Ok(row) => rows.push(row),
            Err(e) => tracing::error!("ledger spool line {} unreadable: {e}", n + 1),
        }
    }
    for chunk in rows.chunks(500) {
        store.insert_ledger_rows(chunk).await?;
    }
    tokio::fs::remove_file(path).await?;
    Ok(rows.len())
}

struct Writer {
    store: Store,
    options: WriterOptions,
    pending: Vec<LedgerRow>,
}

impl Writer {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Message>) {
        let interval = self.options.flush_interval;
        let mut next_write: Option<Instant> = None;
        let mut failures = 0u32;
        loop {
            let message = match next_write {
                Some(at) => match tokio::time::timeout_at(at, rx.recv()).await {
                    Ok(message) => message,
                    Err(_elapsed) => {
                        next_write = self.write_and_schedule(&mut failures).await;
                        continue;
                    }
                },
                None => rx.recv().await,
            };
            match message {
                Some(Message::Row(row)) => {
                    self.pending.push(*row);
                    next_write.get_or_insert_with(|| Instant::now() + interval);
                    if self.pending.len() >= self.options.max_batch && failures == 0 {
                        next_write = self.write_and_schedule(&mut failures).await;
                    }
                }
                Some(Message::Flush(ack)) => {
                    self.flush_for_shutdown().await;
                    next_write = None;
                    let _ = ack.send(());
                }
                None => {
                    self.flush_for_shutdown().await;
                    return;
                }
            }
        }
    }

    /// Writes what is pending and says when to try next: after the flush interval while rows
    /// keep coming, after an exponential backoff while the database is failing.
    async fn write_and_schedule(&mut self, failures: &mut u32) -> Option<Instant> {
        match self.write_pending().await {
            Ok(()) => {
                *failures = 0;
                None
            }
            Err(()) => {
                *failures += 1;
                let backoff = self.options.flush_interval * 2u32.saturating_pow((*failures).min(6));
                Some(Instant::now() + backoff.min(Duration::from_secs(5)))
            }
        }
    }

    /// Writes everything pending in batches; keeps the rows on failure.
    async fn write_pending(&mut self) -> Result<(), ()> {
        while !self.pending.is_empty() {
            let n = self.pending.len().min(self.options.max_batch);
            match self.store.insert_ledger_rows(&self.pending[..n]).await {
                Ok(()) => {
                    self.pending.drain(..n);
                }
                Err(e) => {
                    tracing::warn!(
                        pending = self.pending.len(),
                        "ledger write failed, will retry: {e:#}"
                    );
                    return Err(());
                }
            }
        }
        Ok(())
    }

    async fn flush_for_shutdown(&mut self) {
        let deadline = Instant::now() + self.options.shutdown_deadline;
        let mut pause = Duration::from_millis(50);
        while self.write_pending().await.is_err() {
            if Instant::now() + pause > deadline {
                self.spool();
                return;
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_secs(2));
        }
    }

    fn spool(&mut self) {
        use std::io::Write;
        let path = &self.options.spool_path;
        let result = (|| -> std::io::Result<()> {
            let mut file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)?;
            for row in &self.pending {
                let line = serde_json::to_string(row).map_err(std::io::Error::other)?;
                writeln!(file, "{line}")?;
            }
            file.sync_all()
        })();
        match result {
            Ok(()) => {
                tracing::warn!(rows = self.pending.len(), path = %path.display(), "database unreachable; ledger rows spooled");
                self.pending.clear();
            }
            Err(e) => tracing::error!(
                rows = self.pending.len(),
                "could not spool ledger rows: {e}"
            ),
        }
    }
}
