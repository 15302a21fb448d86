//! Settles that Redis never took, kept on local disk until it does:
//! `<journal_dir>/abandoned-settles.jsonl`, one JSON [`Abandoned`] per line.
//!
//! The file is bounded ([`MAX_BYTES`]); an entry that does not fit is dropped, logged and counted
//! (`tollgate_abandoned_settles_dropped_total`). Its I/O runs on blocking threads, never on the
//! async workers. A replay takes the file aside under the lock (renamed to a snapshot), replays
//! it without the lock (a slow or frozen Redis never holds up [`AbandonedSettles::keep`]), stops
//! at the first entry Redis does not take, and appends the ones left back under the lock.

use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use tollgate_billing::budget::{Charge, Facts, Unavailable, SETTLED_MEMORY_MS};

/// The file's name, in the ledger's journal directory.
pub const FILE: &str = "abandoned-settles.jsonl";
/// The file's bound: some 100,000 settles.
pub const MAX_BYTES: u64 = 64 << 20;
/// An abandoned settle older than this is dropped unapplied: Redis remembers settled request
/// ids for [`SETTLED_MEMORY_MS`], past that a replay could count a settle that did land (its
/// reply lost) twice. An hour of margin for the replay itself.
pub const MAX_AGE_MS: i64 = SETTLED_MEMORY_MS - 3_600_000;

/// A settle that never reached Redis: replayed when it answers again (settle is idempotent per
/// request id; the epoch leaves it out if a rebuild's ledger sum has it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Abandoned {
    pub tag: String,
    pub request_id: String,
    pub charges: Vec<Charge>,
    pub ended_ms: i64,
    pub facts: Facts,
}

pub struct AbandonedSettles {
    path: PathBuf,
    /// Where a replay keeps the entries it took aside until it is done with them.
    snapshot: PathBuf,
    max_bytes: u64,
    /// Serialises appends, the snapshot's rename and the survivors' return. Only held for
    /// local file I/O.
    lock: Mutex<()>,
    /// Something may be on disk: set at start and by every append, cleared by a replay that
    /// left nothing. A replay does not read the file when nothing changed.
    pending: AtomicBool,
    dropped: AtomicU64,
}

impl AbandonedSettles {
    pub fn new(path: PathBuf, max_bytes: u64) -> AbandonedSettles {
        AbandonedSettles {
            snapshot: path.with_extension("replaying.jsonl"),
            path,
            max_bytes,
            lock: Mutex::new(()),
            pending: AtomicBool::new(true),
            dropped: AtomicU64::new(0),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Whether entries may be waiting (something was kept since the last pass that left none).
    pub fn is_pending(&self) -> bool {
        self.pending.load(Ordering::SeqCst)
    }

    /// Entries dropped because the file was full.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Appends `entry` (fsynced). `Ok(false)`: dropped, the file is full.
    pub async fn keep(self: &Arc<Self>, entry: &Abandoned) -> std::io::Result<bool> {
        let mut line = serde_json::to_vec(entry).expect("serializable");
        line.push(b'\n');
        let this = self.clone();
        let kept = tokio::task::spawn_blocking(move || {
            let _guard = this.lock.lock().unwrap_or_else(|e| e.into_inner());
            this.append(&line, Some(this.max_bytes))
        })
        .await
        .map_err(std::io::Error::other)??;
        if kept {
            self.pending.store(true, Ordering::SeqCst);
        } else {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        Ok(kept)
    }

    /// Appends whole lines, after a newline if a torn write left the file without one. With a
    /// bound, nothing is written (`false`) when the lines do not fit.
    fn append(&self, lines: &[u8], bound: Option<u64>) -> std::io::Result<bool> {
        if let Some(dir) = self.path.parent() {
            std::fs::create_dir_all(dir)?;
        }
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)?;
        let len = file.metadata()?.len();
        if bound.is_some_and(|max| len + lines.len() as u64 > max) {
            return Ok(false);
        }
        let mut last = [b'\n'];
        if len > 0 {
            file.seek(SeekFrom::End(-1))?;
            file.read_exact(&mut last)?;
        }
        let mut out = Vec::with_capacity(lines.len() + 1);
        if last[0] != b'\n' {
            out.push(b'\n');
        }
        out.extend_from_slice(lines);
        file.write_all(&out)?;
        file.sync_data()?;
        Ok(true)
    }

    /// One pass: takes the entries aside, hands them to `apply` in order until one answers
    /// unavailable, and puts that one and the rest back. Entries that cannot be read or are
    /// older than [`MAX_AGE_MS`] are dropped (logged). Returns how many were applied.
    pub async fn replay<F, Fut>(self: &Arc<Self>, now_ms: i64, apply: F) -> std::io::Result<usize>
    where
        F: Fn(Abandoned) -> Fut,
        Fut: std::future::Future<Output = Result<(), Unavailable>>,
    {
        if !self.pending.swap(false, Ordering::SeqCst) {
            return Ok(0);
        }
        let this = self.clone();
        let text = tokio::task::spawn_blocking(move || this.take_aside())
            .await
            .map_err(std::io::Error::other)?;
        let text = match text {
            Ok(text) => text,
            Err(e) => {
                self.pending.store(true, Ordering::SeqCst);
                return Err(e);
            }
        };
        let mut lines = text.lines().filter(|l| !l.trim().is_empty());
        let mut applied = 0;
        let mut left = String::new();
        for line in lines.by_ref() {
            let entry: Abandoned = match serde_json::from_str(line) {
                Ok(entry) => entry,
                Err(e) => {
                    tracing::error!("dropping an unreadable abandoned settle ({e}): {line}");
                    continue;
                }
            };
            if now_ms - entry.ended_ms > MAX_AGE_MS {
                tracing::error!(request_id = %entry.request_id, "dropping an abandoned settle older than Redis remembers settles; the counter misses it until its next rebuild");
                continue;
            }
            match apply(entry).await {
                Ok(()) => applied += 1,
                Err(e) => {
                    tracing::debug!("replay of abandoned settles paused: {e}");
                    left.push_str(line);
                    left.push('\n');
                    break;
                }
            }
        }
        for line in lines {
            left.push_str(line);
            left.push('\n');
        }
        if !left.is_empty() {
            self.pending.store(true, Ordering::SeqCst);
        }
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let _guard = this.lock.lock().unwrap_or_else(|e| e.into_inner());
            if !left.is_empty() {
                this.append(left.as_bytes(), None)?;
            }
            std::fs::remove_file(&this.snapshot)
        })
        .await
        .map_err(std::io::Error::other)??;
        Ok(applied)
    }

    /// Under the lock: renames the file to the snapshot (unless a pass that died left one) and
    /// reads the snapshot.
    fn take_aside(&self) -> std::io::Result<String> {
        let _guard = self.lock.lock().unwrap_or_else(|e| e.into_inner());
        if !self.snapshot.exists() {
            match std::fs::rename(&self.path, &self.snapshot) {
                Ok(()) => {}
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(String::new()),
                Err(e) => return Err(e),
            }
        } else {
            // The entries of a pass that died: replayed (settles are idempotent), and the file
            // waits for the next pass.
            self.pending.store(true, Ordering::SeqCst);
        }
        std::fs::read_to_string(&self.snapshot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(id: &str, ended_ms: i64) -> Abandoned {
        Abandoned {
            tag: "t".into(),
            request_id: id.into(),
            charges: Vec::new(),
            ended_ms,
            facts: Facts::default(),
        }
    }

    fn ids(text: &str) -> Vec<String> {
        text.lines()
            .filter(|l| !l.is_empty())
            .map(|l| serde_json::from_str::<Abandoned>(l).unwrap().request_id)
            .collect()
    }

    #[tokio::test]
    async fn a_torn_append_does_not_swallow_the_next_entry() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(AbandonedSettles::new(dir.path().join(FILE), MAX_BYTES));
        assert!(file.keep(&entry("a", 0)).await.unwrap());
        // A crash mid-write: half a line, no newline.
        let mut raw = std::fs::OpenOptions::new()
            .append(true)
            .open(file.path())
            .unwrap();
        raw.write_all(br#"{"tag":"t","request_id":"torn"#).unwrap();
        assert!(file.keep(&entry("b", 0)).await.unwrap());
        let seen = Mutex::new(Vec::new());
        let applied = file
            .replay(0, |e| {
                seen.lock().unwrap().push(e.request_id);
                async { Ok(()) }
            })
            .await
            .unwrap();
        assert_eq!(applied, 2);
        assert_eq!(*seen.lock().unwrap(), ["a", "b"]);
        assert!(!file.path().exists());
    }

    #[tokio::test]
    async fn the_file_is_bounded_and_counts_what_it_drops() {
        let dir = tempfile::tempdir().unwrap();
        let one = serde_json::to_vec(&entry("a", 0)).unwrap().len() as u64 + 1;
        let file = Arc::new(AbandonedSettles::new(dir.path().join(FILE), 2 * one));
        assert!(file.keep(&entry("a", 0)).await.unwrap());
        assert!(file.keep(&entry("b", 0)).await.unwrap());
        assert!(!file.keep(&entry("c", 0)).await.unwrap());
        assert_eq!(file.dropped(), 1);
        assert_eq!(
            ids(&std::fs::read_to_string(file.path()).unwrap()),
            ["a", "b"]
        );
    }

    #[tokio::test]
    async fn a_replay_stops_at_the_first_refusal_and_never_blocks_an_append() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(AbandonedSettles::new(dir.path().join(FILE), MAX_BYTES));
        for id in ["a", "b", "c"] {
            assert!(file.keep(&entry(id, 0)).await.unwrap());
        }
        let tried = Mutex::new(Vec::new());
        let applied = file
            .replay(0, |e| {
                let id = e.request_id.clone();
                tried.lock().unwrap().push(id.clone());
                let file = file.clone();
                async move {
                    if id == "a" {
                        return Ok(());
                    }
                    // Redis is slow to answer: an abandon meanwhile goes straight to disk.
                    tokio::time::timeout(
                        std::time::Duration::from_secs(5),
                        file.keep(&entry("d", 0)),
                    )
                    .await
                    .expect("an append waited for the replay")
                    .unwrap();
                    Err(Unavailable("frozen".into()))
                }
            })
            .await
            .unwrap();
        assert_eq!(applied, 1);
        assert_eq!(*tried.lock().unwrap(), ["a", "b"], "stopped at the refusal");
        assert_eq!(
            ids(&std::fs::read_to_string(file.path()).unwrap()),
            ["d", "b", "c"]
        );
        // Redis answers: everything left lands; then nothing is pending and no pass reads the
        // file.
        let applied = file.replay(0, |_| async { Ok(()) }).await.unwrap();
        assert_eq!(applied, 3);
        let applied = file
            .replay(0, |_| async { panic!("nothing was pending") })
            .await
            .unwrap();
        assert_eq!(applied, 0);
    }

    #[tokio::test]
    async fn entries_older_than_redis_remembers_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let file = Arc::new(AbandonedSettles::new(dir.path().join(FILE), MAX_BYTES));
        assert!(file.keep(&entry("old", 0)).await.unwrap());
        assert!(file.keep(&entry("new", MAX_AGE_MS)).await.unwrap());
        let seen = Mutex::new(Vec::new());
        file.replay(MAX_AGE_MS + 1, |e| {
            seen.lock().unwrap().push(e.request_id);
            async { Ok(()) }
        })
        .await
        .unwrap();
        assert_eq!(*seen.lock().unwrap(), ["new"]);
    }
}
