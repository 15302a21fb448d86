//! The local journal: every ledger row reaches local disk before the database.
//!
//! Rows are appended as JSON lines to numbered segment files (`segment-<seq>.jsonl`) by one
//! thread, which makes them durable in group commits (one `fdatasync` per flush interval or per
//! full batch, whichever comes first). The database writer reads the segments back in order and
//! deletes a segment once every row in it is in the database (or in the dead letters). So a row
//! leaves the disk only when the database has it, a crash loses at most the rows of the group
//! commit in progress, and the database being away costs disk, not memory (the writer holds one
//! batch; the appender holds only the rows of the group commit in progress, or, while the disk
//! refuses writes, those waiting for it).
//!
//! A lock file keeps two processes from sharing one journal directory.

use std::collections::VecDeque;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::LedgerRow;

/// What to do when the journal reaches `max_bytes` (the database has been away for long).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnFull {
    /// Refuse new requests (503 `ledger_unavailable`); rows of requests in flight are still
    /// journaled. Nothing is served unbilled.
    #[default]
    FailClosed,
    /// Keep serving; rows that do not fit are dropped, logged and counted.
    FailOpen,
}

/// Live numbers about the ledger's way to the database, read by `/healthz` and `/metrics`.
#[derive(Debug, Default)]
pub struct Stats {
    /// Rows recorded and not yet on disk: waiting for their group commit (at most one flush
    /// interval), or for a disk that refuses writes.
    pub queued_rows: AtomicU64,
    /// Rows on local disk that the database does not have yet.
    pub journal_rows: AtomicU64,
    /// Bytes of all journal segments on disk.
    pub journal_bytes: AtomicU64,
    /// When the oldest row not yet in the database became durable (epoch ms; 0: none).
    pub oldest_pending_ms: AtomicI64,
    /// Rows the database refused, moved to the dead letters (since start).
    pub dead_letters: AtomicU64,
    /// Rows dropped because the journal was full under `fail_open` (since start).
    pub lost_rows: AtomicU64,
    /// Rows written to the database by this process (replays included).
    pub written_rows: AtomicU64,
    /// Whether the last database write succeeded.
    pub database_up: AtomicBool,
    /// Whether new requests may be served (false: journal full under `fail_closed`, or the
    /// journal cannot be written).
    pub accepting: AtomicBool,
}

/// The [`Stats`] read at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Snapshot {
    pub queued_rows: u64,
    pub journal_rows: u64,
    pub journal_bytes: u64,
    pub write_lag_ms: u64,
    pub dead_letters: u64,
    pub lost_rows: u64,
    pub written_rows: u64,
    pub database_up: bool,
    pub accepting: bool,
}

impl Stats {
    pub fn snapshot(&self) -> Snapshot {
        let get = |counter: &AtomicU64| counter.load(Ordering::Relaxed);
        Snapshot {
            queued_rows: get(&self.queued_rows),
            journal_rows: get(&self.journal_rows),
            journal_bytes: get(&self.journal_bytes),
            write_lag_ms: self.write_lag_ms(),
            dead_letters: get(&self.dead_letters),
            lost_rows: get(&self.lost_rows),
            written_rows: get(&self.written_rows),
            database_up: self.database_up.load(Ordering::Relaxed),
            accepting: self.accepting.load(Ordering::Relaxed),
        }
    }

    /// When the oldest row still waiting for the database became durable (epoch ms).
    pub fn oldest_pending_ms(&self) -> Option<i64> {
        match self.oldest_pending_ms.load(Ordering::Relaxed) {
            0 => None,
            at => Some(at),
        }
    }

    /// Milliseconds since the oldest row still waiting for the database became durable.
    pub fn write_lag_ms(&self) -> u64 {
        self.oldest_pending_ms().map_or(0, |at| {
            (chrono::Utc::now().timestamp_millis() - at).max(0) as u64
        })
    }
}

#[derive(Debug, Clone)]
pub struct JournalOptions {
    pub dir: PathBuf,
    pub max_bytes: u64,
    pub on_full: OnFull,
    /// Longest time a row waits in memory before its group commit.
    pub flush_interval: Duration,
    /// A group commit also happens as soon as this many rows wait.
    pub max_batch: usize,
}

/// One group commit: rows up to `end` (a byte offset in its segment), durable at `at_ms`.
#[derive(Debug, Clone, Copy)]
struct Commit {
    end: u64,
    at_ms: i64,
}

#[derive(Debug)]
struct Segment {
    seq: u64,
    path: PathBuf,
    /// Bytes known to be on disk (fsynced), always at a line boundary.
    durable: u64,
    /// No more appends: deleted once read to `durable`.
    sealed: bool,
    commits: VecDeque<Commit>,
}

/// A stretch of durable journal to send to the database.
#[derive(Clone)]
pub(crate) struct Pending {
    pub seq: u64,
    pub path: PathBuf,
    pub from: u64,
    pub to: u64,
}

pub(crate) struct Shared {
    pub stats: Arc<Stats>,
    /// In order; the last one is the segment being appended to.
    segments: Mutex<VecDeque<Segment>>,
    /// Wakes the database writer after a group commit.
    pub committed: tokio::sync::Notify,
    dir: PathBuf,
    max_bytes: u64,
    on_full: OnFull,
    /// The last journal write failed.
    failing: AtomicBool,
}

impl Shared {
    /// The next stretch to read from `seq`/`offset`: deletes fully read sealed segments on the
    /// way. `None` when everything durable has been read.
    pub fn next(&self, cursor: &mut (u64, u64)) -> Option<Pending> {
        loop {
            let written = {
                let mut segments = self.segments.lock().unwrap();
                let segment = segments.front()?;
                debug_assert!(
                    segment.seq >= cursor.0,
                    "segments are removed as they are read"
                );
                if segment.seq > cursor.0 {
                    *cursor = (segment.seq, 0);
                }
                if cursor.1 < segment.durable {
                    return Some(Pending {
                        seq: segment.seq,
                        path: segment.path.clone(),
                        from: cursor.1,
                        to: segment.durable,
                    });
                }
                if !segment.sealed {
                    return None;
                }
                let segment = segments.pop_front().expect("front exists");
                self.stats
                    .journal_bytes
                    .fetch_sub(segment.durable, Ordering::Relaxed);
                *cursor = (segment.seq + 1, 0);
                segment.path
            };
            // Every row of it is in the database (or the dead letters).
            if let Err(e) = std::fs::remove_file(&written) {
                tracing::error!(path = %written.display(), "cannot remove a written journal segment: {e}");
            }
            self.update_accepting();
        }
    }

    /// Records that the database has every row of segment `seq` before byte `offset`.
    pub fn consumed(&self, seq: u64, offset: u64, rows: u64) {
        let mut segments = self.segments.lock().unwrap();
        self.stats.journal_rows.fetch_sub(
            rows.min(self.stats.journal_rows.load(Ordering::Relaxed)),
            Ordering::Relaxed,
        );
        if let Some(segment) = segments.iter_mut().find(|s| s.seq == seq) {
            while segment.commits.front().is_some_and(|c| c.end <= offset) {
                segment.commits.pop_front();
            }
        }
        let oldest = segments
            .iter()
            .find_map(|s| s.commits.front())
            .map_or(0, |c| c.at_ms);
        self.stats
            .oldest_pending_ms
            .store(oldest, Ordering::Relaxed);
    }

    /// New requests are served while the journal has room and can be written (always, under
    /// `fail_open`).
    fn update_accepting(&self) {
        let room = self.stats.journal_bytes.load(Ordering::Relaxed) < self.max_bytes
            && !self.failing.load(Ordering::Relaxed);
        self.stats
            .accepting
            .store(room || self.on_full == OnFull::FailOpen, Ordering::Relaxed);
    }

    /// Appends a refused row (or an unreadable line) to the dead letters, durably. An error
    /// means it is not there: the caller must keep the row.
    pub fn dead_letter(
        &self,
        row: Option<&LedgerRow>,
        line: Option<&str>,
        error: &str,
    ) -> std::io::Result<()> {
        let path = self.dir.join(DEAD_LETTERS);
        if let Err(e) = append_dead_letters(&path, &dead_letter_entry(row, line, error)) {
            tracing::error!(
                request_id = row.map(|r| r.request_id.as_str()).unwrap_or("?"),
                "ledger row refused by the database ({error}) and the dead-letter file cannot be written (the row stays in the journal): {e}"
            );
            return Err(e);
        }
        self.stats.dead_letters.fetch_add(1, Ordering::Relaxed);
        tracing::error!(
            request_id = row.map(|r| r.request_id.as_str()).unwrap_or("?"),
            path = %path.display(),
            "ledger row refused by the database, moved to the dead letters: {error}"
        );
        Ok(())
    }
}

/// One dead-letter line: when, why, and the row (or the raw line when it was unreadable).
pub(crate) fn dead_letter_entry(
    row: Option<&LedgerRow>,
    line: Option<&str>,
    error: &str,
) -> Vec<u8> {
    let mut entry = serde_json::json!({
        "at_ms": chrono::Utc::now().timestamp_millis(),
        "error": error,
        "row": row,
        "line": line,
    })
    .to_string()
    .into_bytes();
    entry.push(b'\n');
    entry
}

/// Appends whole lines to the dead-letter file: one write under an exclusive lock, then fsync.
/// The lock and the inode check make it safe against `retry_dead_letters` renaming the file
/// away (the append then goes to the new file, never to the one being retried).
pub(crate) fn append_dead_letters(path: &Path, lines: &[u8]) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    loop {
        let mut file = OpenOptions::new().create(true).append(true).open(path)?;
        file.lock()?;
        let same = std::fs::metadata(path)
            .is_ok_and(|m| m.ino() == file.metadata().map_or(0, |f| f.ino()));
        if !same {
            continue; // renamed between open and lock: open the new one
        }
        file.write_all(lines)?;
        return file.sync_data();
    }
}

pub const DEAD_LETTERS: &str = "dead-letters.jsonl";
/// An active segment this large whose rows are all in the database is replaced by a new one.
const ROTATE_WHEN_READ_BYTES: u64 = 64 << 10;
const LOCK: &str = "LOCK";
const PREFIX: &str = "segment-";
const SUFFIX: &str = ".jsonl";

fn segment_path(dir: &Path, seq: u64) -> PathBuf {
    dir.join(format!("{PREFIX}{seq:020}{SUFFIX}"))
}

pub(crate) enum Message {
    Row(Box<LedgerRow>),
    /// Commit what waits now and acknowledge: true when nothing is left in memory.
    Sync(std::sync::mpsc::Sender<bool>),
    /// Last resort at exit while the journal cannot be written: log every row still in memory
    /// (so an operator can recover it from the log) and acknowledge.
    Abandon(std::sync::mpsc::Sender<()>),
}

/// The appender's handle, cloned onto the request path.
#[derive(Clone)]
pub(crate) struct Appender {
    pub tx: mpsc::Sender<Message>,
}

/// Opens (creating) the journal directory, takes its lock, adopts the segments a previous run
/// left (and a legacy spool file), and starts the appender thread.
pub(crate) fn open(
    options: &JournalOptions,
    legacy_spool: Option<&Path>,
) -> anyhow::Result<(Appender, Arc<Shared>, File)> {
    use anyhow::Context;
    let dir = &options.dir;
    std::fs::create_dir_all(dir).with_context(|| {
        format!(
            "cannot create the ledger journal directory {}",
            dir.display()
        )
    })?;
    let lock = OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK))
        .with_context(|| format!("cannot open {}", dir.join(LOCK).display()))?;
    match lock.try_lock() {
        Ok(()) => {}
        Err(std::fs::TryLockError::WouldBlock) => anyhow::bail!(
            "the ledger journal {} is in use by another tollgate process (each replica needs its own `ledger.journal_dir`)",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => {
            return Err(e).with_context(|| format!("cannot lock {}", dir.display()))
        }
    }

    let mut found: Vec<(u64, PathBuf)> = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if let Some(seq) = name
            .strip_prefix(PREFIX)
            .and_then(|s| s.strip_suffix(SUFFIX))
            .and_then(|s| s.parse::<u64>().ok())
        {
            found.push((seq, entry.path()));
        }
    }
    found.sort();
    let mut next_seq = found.last().map_or(1, |(seq, _)| seq + 1);
    if let Some(spool) = legacy_spool.filter(|p| p.is_file()) {
        // A spool from an older version: adopt it as a segment (rename, so it is never lost).
        let path = segment_path(dir, next_seq);
        std::fs::rename(spool, &path)
            .or_else(|_| std::fs::copy(spool, &path).and_then(|_| std::fs::remove_file(spool)))
            .with_context(|| {
                format!(
                    "cannot move the ledger spool {} into the journal",
                    spool.display()
                )
            })?;
        tracing::info!(spool = %spool.display(), "adopted a ledger spool file into the journal");
        found.push((next_seq, path));
        next_seq += 1;
    }

    let stats = Arc::new(Stats::default());
    let mut segments = VecDeque::new();
    let now_ms = chrono::Utc::now().timestamp_millis();
    let (mut bytes, mut rows) = (0u64, 0u64);
    for (seq, path) in found {
        let durable = adopt_segment(&path)?;
        let count = count_lines(&path)?;
        bytes += durable;
        rows += count;
        let mut commits = VecDeque::new();
        if durable > 0 {
            commits.push_back(Commit {
                end: durable,
                at_ms: now_ms,
            });
        }
        segments.push_back(Segment {
            seq,
            path,
            durable,
            sealed: true,
            commits,
        });
    }
    if rows > 0 {
        tracing::info!(
            rows,
            bytes,
            "ledger journal holds rows from an earlier run; replaying them"
        );
    }
    stats.journal_bytes.store(bytes, Ordering::Relaxed);
    stats.journal_rows.store(rows, Ordering::Relaxed);
    if rows > 0 {
        stats.oldest_pending_ms.store(now_ms, Ordering::Relaxed);
    }
    stats.database_up.store(true, Ordering::Relaxed);

    let active_path = segment_path(dir, next_seq);
    let file = create_segment(dir, &active_path)?;
    segments.push_back(Segment {
        seq: next_seq,
        path: active_path,
        durable: 0,
        sealed: false,
        commits: VecDeque::new(),
    });
    let shared = Arc::new(Shared {
        stats,
        segments: Mutex::new(segments),
        committed: tokio::sync::Notify::new(),
        dir: dir.clone(),
        max_bytes: options.max_bytes,
        on_full: options.on_full,
        failing: AtomicBool::new(false),
    });
    // A journal left fuller than the bound refuses requests (fail_closed) until it drains.
    shared.update_accepting();
    let (tx, rx) = mpsc::channel();
    let thread = AppendThread {
        rx,
        shared: shared.clone(),
        options: options.clone(),
        segment_bytes: (options.max_bytes / 8).clamp(64 << 10, 16 << 20),
        file,
        seq: next_seq,
        size: 0,
        buffer: Vec::new(),
        first_at: None,
        last_loss_log: None,
    };
    std::thread::Builder::new()
        .name("tollgate-journal".into())
        .spawn(move || thread.run())?;
    Ok((Appender { tx }, shared, lock))
}

/// Makes an existing segment end at a line boundary: a torn last line (a write the crash cut
/// before its fsync) was never durable and is cut off. Returns the segment's length.
fn adopt_segment(path: &Path) -> anyhow::Result<u64> {
    let mut file = OpenOptions::new().read(true).write(true).open(path)?;
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(0);
    }
    // Find the last newline, scanning back in blocks.
    let mut end = len;
    let mut block = vec![0u8; 64 << 10];
    let mut last_newline = None;
    while end > 0 && last_newline.is_none() {
        let start = end.saturating_sub(block.len() as u64);
        let n = (end - start) as usize;
        file.seek(SeekFrom::Start(start))?;
        file.read_exact(&mut block[..n])?;
        last_newline = block[..n]
            .iter()
            .rposition(|&b| b == b'\n')
            .map(|i| start + i as u64 + 1);
        end = start;
    }
    let keep = last_newline.unwrap_or(0);
    if keep < len {
        tracing::warn!(path = %path.display(), dropped_bytes = len - keep, "journal segment ends in a torn write (never acknowledged); cutting it off");
        file.set_len(keep)?;
        file.sync_all()?;
    }
    Ok(keep)
}

fn count_lines(path: &Path) -> std::io::Result<u64> {
    let mut file = File::open(path)?;
    let mut buf = vec![0u8; 256 << 10];
    let mut count = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(count);
        }
        count += buf[..n].iter().filter(|&&b| b == b'\n').count() as u64;
    }
}

fn create_segment(dir: &Path, path: &Path) -> std::io::Result<File> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)?;
    // The new name must survive a crash too.
    File::open(dir)?.sync_all()?;
    Ok(file)
}

struct AppendThread {
    rx: mpsc::Receiver<Message>,
    shared: Arc<Shared>,
    options: JournalOptions,
    segment_bytes: u64,
    file: File,
    seq: u64,
    size: u64,
    buffer: Vec<LedgerRow>,
    first_at: Option<Instant>,
    last_loss_log: Option<Instant>,
}

impl AppendThread {
    fn run(mut self) {
        loop {
            let message = match self.first_at {
                Some(first) => {
                    let due = first + self.options.flush_interval;
                    match self
                        .rx
                        .recv_timeout(due.saturating_duration_since(Instant::now()))
                    {
                        Ok(message) => Some(message),
                        Err(mpsc::RecvTimeoutError::Timeout) => None,
                        Err(mpsc::RecvTimeoutError::Disconnected) => {
                            self.commit();
                            return;
                        }
                    }
                }
                None => match self.rx.recv() {
                    Ok(message) => Some(message),
                    Err(_) => return,
                },
            };
            match message {
                Some(Message::Row(mut row)) => {
                    row.sanitize();
                    self.buffer.push(*row);
                    let first = *self.first_at.get_or_insert_with(Instant::now);
                    // Due by time even while rows keep coming (the timeout only fires in a
                    // pause), or by size unless the disk is refusing (then once per interval).
                    let due = first.elapsed() >= self.options.flush_interval;
                    if due || (self.buffer.len() >= self.options.max_batch && !self.failing()) {
                        self.commit();
                    }
                }
                Some(Message::Sync(ack)) => {
                    self.commit();
                    let _ = ack.send(self.buffer.is_empty());
                }
                Some(Message::Abandon(ack)) => {
                    self.shared
                        .stats
                        .queued_rows
                        .fetch_sub(self.buffer.len() as u64, Ordering::Relaxed);
                    for row in self.buffer.drain(..) {
                        tracing::error!(
                            request_id = %row.request_id,
                            row = %serde_json::to_string(&row).unwrap_or_default(),
                            "LEDGER ROW NOT JOURNALED at exit (the journal cannot be written); recover it from this line"
                        );
                    }
                    let _ = ack.send(());
                }
                None => self.commit(),
            }
        }
    }

    /// One group commit: every waiting row to disk, one fdatasync, then wake the writer.
    fn commit(&mut self) {
        if self.buffer.is_empty() {
            self.first_at = None;
            return;
        }
        if self.size >= ROTATE_WHEN_READ_BYTES && self.fully_read() {
            // Everything in the active segment is in the database: start a fresh one so a
            // restart replays (idempotently) little more than what is really pending.
            self.rotate();
        }
        let stats = self.shared.stats.clone();
        let on_disk = stats.journal_bytes.load(Ordering::Relaxed);
        let mut lines = Vec::with_capacity(self.buffer.len() * 700);
        for row in &self.buffer {
            // A row always serialises (plain strings and numbers); be safe anyway.
            if serde_json::to_writer(&mut lines, row).is_ok() {
                lines.push(b'\n');
            }
        }
        let full = on_disk + lines.len() as u64 > self.options.max_bytes;
        if full && self.options.on_full == OnFull::FailOpen {
            let lost = self.lose_buffer();
            if self
                .last_loss_log
                .is_none_or(|at| at.elapsed() > Duration::from_secs(10))
            {
                self.last_loss_log = Some(Instant::now());
                tracing::error!(
                    lost_now = lost,
                    lost_since_start = stats.lost_rows.load(Ordering::Relaxed),
                    journal_bytes = on_disk,
                    "LEDGER ROWS LOST: the journal is full (ledger.journal_max_bytes) and ledger.on_journal_full is fail_open; these requests were served and will not be billed"
                );
            }
            return;
        }
        match self.append(&lines) {
            Ok(()) => {
                let rows = self.buffer.len() as u64;
                let at_ms = chrono::Utc::now().timestamp_millis();
                {
                    let mut segments = self.shared.segments.lock().unwrap();
                    let active = segments.back_mut().expect("the active segment");
                    active.durable = self.size;
                    active.commits.push_back(Commit {
                        end: self.size,
                        at_ms,
                    });
                    stats.journal_rows.fetch_add(rows, Ordering::Relaxed);
                    stats.queued_rows.fetch_sub(rows, Ordering::Relaxed);
                    stats
                        .journal_bytes
                        .fetch_add(lines.len() as u64, Ordering::Relaxed);
                    let _ = stats.oldest_pending_ms.compare_exchange(
                        0,
                        at_ms,
                        Ordering::Relaxed,
                        Ordering::Relaxed,
                    );
                    if self.shared.failing.swap(false, Ordering::Relaxed) {
                        tracing::info!("the ledger journal is writable again");
                    }
                    self.shared.update_accepting();
                    let bytes = stats.journal_bytes.load(Ordering::Relaxed);
                    if bytes >= self.options.max_bytes && on_disk < self.options.max_bytes {
                        tracing::error!(
                            journal_bytes = bytes,
                            "the ledger journal is full (ledger.journal_max_bytes): new requests are refused (on_journal_full: fail_closed) until the database takes the rows"
                        );
                    }
                }
                self.buffer.clear();
                self.first_at = None;
                self.shared.committed.notify_one();
                if self.size >= self.segment_bytes {
                    self.rotate();
                }
            }
            Err(e) => {
                // Keep the rows and retry at the next interval; refuse new requests meanwhile
                // (fail_closed) since their rows could not be made durable.
                if !self.shared.failing.swap(true, Ordering::Relaxed) {
                    tracing::error!(
                        rows = self.buffer.len(),
                        "cannot write the ledger journal (retrying): {e}"
                    );
                }
                self.shared.update_accepting();
                self.first_at = Some(Instant::now());
                // Fail-open: memory stays bounded.
                if self.options.on_full == OnFull::FailOpen && self.buffer.len() > 100_000 {
                    let lost = self.lose_buffer();
                    tracing::error!(lost, "LEDGER ROWS LOST: the journal cannot be written");
                }
            }
        }
    }

    fn failing(&self) -> bool {
        self.shared.failing.load(Ordering::Relaxed)
    }

    /// Drops the rows waiting in memory (`fail_open` only), counted as lost.
    fn lose_buffer(&mut self) -> u64 {
        let lost = self.buffer.len() as u64;
        let stats = &self.shared.stats;
        stats.lost_rows.fetch_add(lost, Ordering::Relaxed);
        stats.queued_rows.fetch_sub(lost, Ordering::Relaxed);
        self.buffer.clear();
        self.first_at = None;
        lost
    }

    fn append(&mut self, lines: &[u8]) -> std::io::Result<()> {
        if let Err(e) = self
            .file
            .write_all(lines)
            .and_then(|()| self.file.sync_data())
        {
            // Undo a partial append so the segment still ends at a line boundary.
            let _ = self.file.set_len(self.size);
            let _ = self.file.seek(SeekFrom::Start(self.size));
            return Err(e);
        }
        self.size += lines.len() as u64;
        Ok(())
    }

    /// Whether the database writer has read the whole active segment.
    fn fully_read(&self) -> bool {
        let segments = self.shared.segments.lock().unwrap();
        segments
            .back()
            .is_some_and(|active| active.commits.is_empty())
    }

    /// Seals the active segment and starts the next one.
    fn rotate(&mut self) {
        let seq = self.seq + 1;
        let path = segment_path(&self.options.dir, seq);
        match create_segment(&self.options.dir, &path) {
            Ok(file) => {
                let mut segments = self.shared.segments.lock().unwrap();
                if let Some(active) = segments.back_mut() {
                    active.sealed = true;
                }
                segments.push_back(Segment {
                    seq,
                    path,
                    durable: 0,
                    sealed: false,
                    commits: VecDeque::new(),
                });
                self.file = file;
                self.seq = seq;
                self.size = 0;
                drop(segments);
                // The writer may be waiting at the end of the sealed one.
                self.shared.committed.notify_one();
            }
            Err(e) => {
                tracing::warn!("cannot start a new journal segment (keeping the current one): {e}")
            }
        }
    }
}
