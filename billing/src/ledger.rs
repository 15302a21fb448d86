//! The usage ledger: one [`LedgerRow`] per authenticated request, on local disk first and in
//! the database soon after, so that the request path never waits on either.
//!
//! A row's way: [`LedgerSender::record`] (non-blocking) -> the [`journal`] thread appends it to
//! a segment file and fsyncs in group commits -> the database writer reads the segments back,
//! inserts them in batches and deletes a segment once the database has all of it. A database
//! outage only grows the journal (bounded by `journal_max_bytes`, then `on_full` decides); a
//! crash loses at most the group commit in progress; a start replays what is left. Rows are
//! keyed by request id and inserted with "on conflict do nothing", so replays and retries never
//! bill twice. A row the database refuses (not a failure to reach it) is retried alone and then
//! moved to the dead letters, so it never holds up the rows behind it.

pub mod journal;

use std::path::PathBuf;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::store::Store;
pub use journal::{JournalOptions, OnFull, Stats};

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

impl LedgerRow {
    /// Makes every text field storable: NUL bytes (which Postgres TEXT refuses) become U+FFFD.
    /// The request path already refuses control characters in what clients send; this is the
    /// last line of defence for anything else.
    pub fn sanitize(&mut self) {
        fn clean(s: &mut String) {
            if s.contains('\0') {
                *s = s.replace('\0', "\u{FFFD}");
            }
        }
        for s in [
            &mut self.request_id,
            &mut self.tenant,
            &mut self.key_id,
            &mut self.endpoint,
            &mut self.model,
            &mut self.outcome,
            &mut self.usage_source,
        ] {
            clean(s);
        }
        for s in [
            &mut self.backend,
            &mut self.upstream_model,
            &mut self.tags,
            &mut self.time_zone,
        ]
        .into_iter()
        .flatten()
        {
            clean(s);
        }
        if let Some(r) = &mut self.routing {
            for s in [
                &mut r.route,
                &mut r.tier,
                &mut r.reason,
                &mut r.routed_model,
            ] {
                clean(s);
            }
        }
    }
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

/// Tuning for the ledger.
#[derive(Debug, Clone)]
pub struct WriterOptions {
    /// The journal; its `max_batch` is also the size of the database writer's batches.
    pub journal: JournalOptions,
    /// A spool file left by an older version: adopted into the journal at start.
    pub legacy_spool: Option<PathBuf>,
}

/// Cheap, cloneable handle used on the request path.
#[derive(Clone)]
pub struct LedgerSender {
    appender: journal::Appender,
    shared: Arc<journal::Shared>,
    /// Held for the life of the process: the journal directory's lock.
    _lock: Arc<std::fs::File>,
}

impl LedgerSender {
    /// Queues a row for the journal; never blocks.
    pub fn record(&self, row: LedgerRow) {
        let queued = &self.shared.stats.queued_rows;
        queued.fetch_add(1, Ordering::Relaxed);
        if let Err(e) = self.appender.tx.send(journal::Message::Row(Box::new(row))) {
            queued.fetch_sub(1, Ordering::Relaxed);
            if let journal::Message::Row(row) = e.0 {
                tracing::error!(request_id = %row.request_id, row = %serde_json::to_string(&row).unwrap_or_default(), "ledger journal stopped; row not journaled");
            }
        }
    }

    /// Whether new requests may be served: false while the journal is full (or unwritable)
    /// under `fail_closed`.
    pub fn accepting(&self) -> bool {
        self.shared.stats.accepting.load(Ordering::Relaxed)
    }

    pub fn stats(&self) -> &Stats {
        &self.shared.stats
    }

    /// Makes every row recorded before this call durable in the journal (one group commit now).
    /// False when some could not be written (the disk refuses) or `timeout` passed.
    pub async fn sync(&self, timeout: Duration) -> bool {
        let (tx, rx) = std::sync::mpsc::channel();
        if self.appender.tx.send(journal::Message::Sync(tx)).is_err() {
            return false;
        }
        tokio::task::spawn_blocking(move || rx.recv_timeout(timeout))
            .await
            .is_ok_and(|answer| answer == Ok(true))
    }

    /// For the end of the process: makes every row recorded so far durable (retrying a disk
    /// that refuses until `deadline`; rows it never took are written to the log as a last
    /// resort), then waits for the database to have them. True when it does; otherwise they
    /// stay in the journal for the next start.
    pub async fn flush(&self, deadline: Duration) -> bool {
        let until = Instant::now() + deadline;
        while !self
            .sync(until.saturating_duration_since(Instant::now()))
            .await
        {
            if Instant::now() >= until {
                let (tx, rx) = std::sync::mpsc::channel();
                if self.appender.tx.send(journal::Message::Abandon(tx)).is_ok() {
                    let _ = tokio::task::spawn_blocking(move || {
                        rx.recv_timeout(Duration::from_secs(5))
                    })
                    .await;
                }
                return false;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        self.wait_written(until.saturating_duration_since(Instant::now()))
            .await
    }

    /// Waits until the database has every row recorded or journaled so far, or `timeout`
    /// passes.
    pub async fn wait_written(&self, timeout: Duration) -> bool {
        let until = Instant::now() + timeout;
        let stats = &self.shared.stats;
        loop {
            if stats.queued_rows.load(Ordering::Relaxed) == 0
                && stats.journal_rows.load(Ordering::Relaxed) == 0
            {
                return true;
            }
            if Instant::now() >= until {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}

/// Opens the journal (adopting what an earlier run left) and starts the database writer on
/// the current Tokio runtime.
pub fn spawn_writer(store: Store, options: WriterOptions) -> anyhow::Result<LedgerSender> {
    let (appender, shared, lock) =
        journal::open(&options.journal, options.legacy_spool.as_deref())?;
    tokio::spawn(
        Writer {
            store,
            shared: shared.clone(),
            max_batch: options.journal.max_batch.max(1),
            refused_in_a_row: 0,
        }
        .run(),
    );
    Ok(LedgerSender {
        appender,
        shared,
        _lock: Arc::new(lock),
    })
}

/// After this many rows refused one after the other, the writer checks whether the database
/// refuses everything before dead-lettering more.
const REFUSALS_BEFORE_PROBING: usize = 20;

/// Reads journal segments back and puts their rows in the database.
struct Writer {
    store: Store,
    shared: Arc<journal::Shared>,
    max_batch: usize,
    /// Rows refused one after the other (across attempts), none accepted since.
    refused_in_a_row: usize,
}

/// Lines read back from the journal: the rows, and what each line held and where it ends.
#[derive(Default)]
struct Read {
    rows: Vec<LedgerRow>,
    lines: Vec<(Line, u64)>,
}

enum Line {
    /// `rows[i]`.
    Row(usize),
    /// Not a ledger row: the text and why, for the dead letters.
    Unreadable(String, String),
    Blank,
}

impl Writer {
    async fn run(mut self) {
        let mut cursor = (0u64, 0u64);
        let mut failures = 0u32;
        loop {
            let Some(pending) = self.shared.next(&mut cursor) else {
                // Wait for the next group commit (the timeout covers a missed wake-up).
                let _ =
                    tokio::time::timeout(Duration::from_secs(1), self.shared.committed.notified())
                        .await;
                continue;
            };
            let (stretch, max) = (pending.clone(), self.max_batch);
            let read = tokio::task::spawn_blocking(move || read_lines(&stretch, max)).await;
            let read = match read.unwrap_or_else(|e| Err(std::io::Error::other(e))) {
                Ok(read) => read,
                Err(e) => {
                    tracing::error!(path = %pending.path.display(), "cannot read the ledger journal (retrying): {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            };
            match self.write(&pending, &read, &mut cursor).await {
                Ok(()) => {
                    if failures > 0 {
                        tracing::info!("database reachable again; ledger rows are being written");
                    }
                    failures = 0;
                    self.shared.stats.database_up.store(true, Ordering::Relaxed);
                }
                Err(e) => {
                    failures += 1;
                    self.shared
                        .stats
                        .database_up
                        .store(false, Ordering::Relaxed);
                    if failures == 1 || failures.is_multiple_of(20) {
                        tracing::warn!(
                            journal_rows = self.shared.stats.journal_rows.load(Ordering::Relaxed),
                            "ledger write failed; rows wait in the journal: {e:#}"
                        );
                    }
                    // Retry soon: rows must reach the database as soon as it is back.
                    let pause = Duration::from_millis(50 * 2u64.pow(failures.min(4)));
                    tokio::time::sleep(pause).await;
                }
            }
        }
    }

    /// Writes `lines` (read from `pending`), advancing the cursor past what the database has
    /// or the dead letters hold. An error means the database could not be reached: the rest
    /// is retried later.
    async fn write(
        &mut self,
        pending: &journal::Pending,
        read: &Read,
        cursor: &mut (u64, u64),
    ) -> anyhow::Result<()> {
        let Some(&(_, last)) = read.lines.last() else {
            // Durable bytes that read as no line: the segment was damaged under us. Never
            // skip it silently; say so and retry (slowly).
            anyhow::bail!(
                "journal segment {} has {} durable bytes that cannot be read back",
                pending.path.display(),
                pending.to - pending.from
            );
        };
        let rows = &read.rows;
        let batch_written = match self.store.insert_ledger_rows(rows).await {
            Ok(()) => {
                self.written(rows.len());
                if rows.len() == read.lines.len() {
                    self.advance(pending, cursor, last, rows.len() as u64);
                    return Ok(());
                }
                true
            }
            Err(e) if !crate::store::is_refusal(&e) => return Err(e),
            Err(_) => false,
        };
        // Something in the batch was refused (or unreadable): row by row, dead-lettering the
        // rows the database refuses on their own. After many refusals in a row, rows further
        // on are tried first: if the database takes one, the refused rows are poison; if it
        // refuses them all, it refuses everything (a schema or permission problem, a read-only
        // database): an outage, retried, never a reason to empty the journal.
        for (line, end) in &read.lines {
            match line {
                Line::Blank => {}
                Line::Unreadable(text, why) => {
                    self.shared.dead_letter(
                        None,
                        Some(text),
                        &format!("unreadable journal line: {why}"),
                    )?;
                }
                Line::Row(_) if batch_written => {}
                Line::Row(i) => {
                    let row = &rows[*i];
                    match self.insert_one(row).await? {
                        None => self.written(1),
                        Some(e) => {
                            self.refused_in_a_row += 1;
                            if self.refused_in_a_row >= REFUSALS_BEFORE_PROBING
                                && !self.accepts_any(&rows[*i + 1..]).await?
                            {
                                return Err(e.context(format!(
                                    "the database refused {} rows in a row and every row tried after them; treating it as an outage, not as poison",
                                    self.refused_in_a_row
                                )));
                            }
                            self.shared
                                .dead_letter(Some(row), None, &format!("{e:#}"))?;
                        }
                    }
                }
            }
            self.advance(pending, cursor, *end, 1);
        }
        Ok(())
    }

    /// Tries a few of `rest` (inserting a row early is harmless: inserts are idempotent).
    /// True as soon as the database takes one.
    async fn accepts_any(&mut self, rest: &[LedgerRow]) -> anyhow::Result<bool> {
        let step = (rest.len() / 3).max(1);
        for row in rest.iter().rev().step_by(step).take(3) {
            if self.insert_one(row).await?.is_none() {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Inserts one row alone: `Ok(None)` when the database has it, `Ok(Some(refusal))` when it
    /// refuses this row, `Err` when it cannot be reached.
    async fn insert_one(&mut self, row: &LedgerRow) -> anyhow::Result<Option<anyhow::Error>> {
        match self
            .store
            .insert_ledger_rows(std::slice::from_ref(row))
            .await
        {
            Ok(()) => {
                self.refused_in_a_row = 0;
                Ok(None)
            }
            Err(e) if crate::store::is_refusal(&e) => Ok(Some(e)),
            Err(e) => Err(e),
        }
    }

    /// Moves the cursor past lines the database has or the dead letters hold.
    fn advance(&self, pending: &journal::Pending, cursor: &mut (u64, u64), end: u64, lines: u64) {
        *cursor = (pending.seq, end);
        self.shared.consumed(pending.seq, end, lines);
    }

    fn written(&self, rows: usize) {
        self.shared
            .stats
            .written_rows
            .fetch_add(rows as u64, Ordering::Relaxed);
    }
}

/// What `retry_dead_letters` did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Retried {
    /// Rows the database now has (inserted, or there already).
    pub written: usize,
    /// Rows refused again, or unreadable: back in the dead letters with the new error.
    pub refused: usize,
}

/// Offers every dead-lettered row of the journal in `dir` to the database again (after the
/// cause was fixed). Safe while `serve` runs: the file is renamed first, so rows the gateway
/// dead-letters meanwhile go to a new file and are never lost or retried twice.
pub async fn retry_dead_letters(store: &Store, dir: &std::path::Path) -> anyhow::Result<Retried> {
    let path = dir.join(journal::DEAD_LETTERS);
    let taken = dir.join(format!(
        "dead-letters.retrying-{}.jsonl",
        chrono::Utc::now().timestamp_millis()
    ));
    match std::fs::rename(&path, &taken) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Retried::default()),
        Err(e) => return Err(e.into()),
    }
    // A gateway that opened the file just before the rename finishes its append first.
    let file = std::fs::File::open(&taken)?;
    file.lock()?;
    let text = std::fs::read_to_string(&taken)?;
    let mut outcome = Retried::default();
    let mut again = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let row = entry
            .get("row")
            .cloned()
            .and_then(|row| serde_json::from_value::<LedgerRow>(row).ok());
        let Some(mut row) = row else {
            outcome.refused += 1;
            again.extend_from_slice(line.as_bytes());
            again.push(b'\n');
            continue;
        };
        row.sanitize();
        match store.insert_ledger_rows(std::slice::from_ref(&row)).await {
            Ok(()) => outcome.written += 1,
            Err(e) if crate::store::is_refusal(&e) => {
                outcome.refused += 1;
                again.extend(journal::dead_letter_entry(
                    Some(&row),
                    None,
                    &format!("{e:#}"),
                ));
            }
            Err(e) => {
                // The database is not there: put everything back untouched.
                journal::append_dead_letters(&path, text.as_bytes())?;
                std::fs::remove_file(&taken)?;
                return Err(
                    e.context("the database is unreachable; dead letters left as they were")
                );
            }
        }
    }
    if !again.is_empty() {
        journal::append_dead_letters(&path, &again)?;
    }
    std::fs::remove_file(&taken)?;
    Ok(outcome)
}

/// Reads up to `max` complete lines from a durable stretch of a segment.
fn read_lines(pending: &journal::Pending, max: usize) -> std::io::Result<Read> {
    use std::io::{BufRead, BufReader, Seek, SeekFrom};
    let mut file = std::fs::File::open(&pending.path)?;
    file.seek(SeekFrom::Start(pending.from))?;
    let mut reader = BufReader::with_capacity(256 << 10, file);
    let mut read = Read::default();
    let mut offset = pending.from;
    let mut buf = Vec::new();
    while read.lines.len() < max && offset < pending.to {
        buf.clear();
        let n = reader.read_until(b'\n', &mut buf)?;
        if n == 0 || offset + n as u64 > pending.to {
            break;
        }
        offset += n as u64;
        let line = if buf.trim_ascii().is_empty() {
            Line::Blank
        } else {
            match serde_json::from_slice::<LedgerRow>(&buf) {
                Ok(mut row) => {
                    // Journals and spools written before NULs were refused may hold them.
                    row.sanitize();
                    read.rows.push(row);
                    Line::Row(read.rows.len() - 1)
                }
                Err(e) => Line::Unreadable(
                    String::from_utf8_lossy(buf.trim_ascii_end()).into_owned(),
                    e.to_string(),
                ),
            }
        };
        read.lines.push((line, offset));
    }
    Ok(read)
}

/// A plausible row for tests.
#[cfg(test)]
pub(crate) fn test_row(id: &str, created_ms: i64, tz: Option<&str>, cost: i64) -> LedgerRow {
    LedgerRow {
        request_id: id.into(),
        created_ms,
        tenant: "acme".into(),
        key_id: "k".into(),
        endpoint: "chat.completions".into(),
        model: "m".into(),
        backend: Some("b".into()),
        upstream_model: None,
        stream: false,
        status: 200,
        outcome: "ok".into(),
        attempts: 1,
        prompt_tokens: 10,
        cached_tokens: 0,
        completion_tokens: 5,
        counted_prompt_tokens: 10,
        counted_completion_tokens: 5,
        provider_prompt_tokens: None,
        provider_cached_tokens: None,
        provider_completion_tokens: None,
        usage_source: "gateway".into(),
        cost_micros: cost,
        latency_ms: 1,
        ttft_ms: None,
        tags: None,
        routing: None,
        speculation: None,
        time_zone: tz.map(str::to_string),
    }
}

#[cfg(test)]
mod tests;
