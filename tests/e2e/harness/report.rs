//! Results of the fault tests: each test saves its row as `target/reliability/<fault>.json`, then
//! every present row is rendered, sorted by fault, into `bench/RELIABILITY.md` (under a lock
//! directory, so tests running in parallel never lose each other's rows). The file ends with the
//! hostile-input section (`tests/e2e/abuse.rs`, from [`ABUSE_MARKER`] on): each suite rewrites
//! only its own part.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use crate::harness::load::{Reconciled, Tally};

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct FaultRow {
    pub fault: String,
    /// `pass`, or `FAIL` with the checks that failed in `failures`.
    pub result: String,
    pub failures: Vec<String>,
    pub sent: usize,
    pub served: usize,
    pub failed: BTreeMap<String, usize>,
    pub ledger_rows: usize,
    pub duplicates: usize,
    pub missing: usize,
    /// Hard-budget overshoot in micro-dollars (tests with budgets only).
    pub overshoot_micros: Option<i64>,
    pub peak_rss_mib: Option<f64>,
    pub wall_secs: f64,
    pub notes: String,
    /// UTC time the test ended.
    pub at: String,
}

/// Collects a test's numbers and checks; `finish` saves the row, renders the report, and panics
/// if any check failed (after saving, so a failing fault is still reported).
pub struct Run {
    pub row: FaultRow,
    started: Instant,
    notes: Vec<String>,
    finished: bool,
}

impl Run {
    /// Starts a test's row; until `finish`, the report says it did not finish (so a test that
    /// panics in its setup never leaves an earlier run's result standing).
    pub fn new(fault: &str) -> Run {
        let run = Run {
            row: FaultRow {
                fault: fault.to_string(),
                result: "did not finish".into(),
                at: now(),
                ..Default::default()
            },
            started: Instant::now(),
            notes: Vec::new(),
            finished: false,
        };
        save(&run.row);
        run
    }

    pub fn tally(&mut self, tally: &Tally) {
        self.row.sent += tally.sent;
        self.row.served += tally.served;
        for (status, n) in &tally.failed {
            *self.row.failed.entry(status.clone()).or_default() += n;
        }
    }

    pub fn ledger(&mut self, reconciled: &Reconciled) {
        self.row.ledger_rows += reconciled.rows;
        self.row.duplicates += reconciled.duplicates;
        self.row.missing += reconciled.missing.len();
    }

    pub fn note(&mut self, note: impl Into<String>) {
        let note = note.into();
        eprintln!("[{}] {note}", self.row.fault);
        self.notes.push(note);
    }

    /// Records a check; a false one fails the test at `finish`.
    pub fn check(&mut self, ok: bool, what: impl Into<String>) -> bool {
        if !ok {
            let what = what.into();
            eprintln!("[{}] CHECK FAILED: {what}", self.row.fault);
            self.row.failures.push(what);
        }
        ok
    }

    fn seal(&mut self) {
        self.finished = true;
        self.row.wall_secs = self.started.elapsed().as_secs_f64();
        self.row.notes = self.notes.join("; ");
        self.row.result = if self.row.failures.is_empty() {
            "pass".into()
        } else {
            "FAIL".into()
        };
        self.row.at = now();
        save(&self.row);
    }

    pub fn finish(mut self) {
        self.seal();
        assert!(
            self.row.failures.is_empty(),
            "{}: {} check(s) failed:\n  {}",
            self.row.fault,
            self.row.failures.len(),
            self.row.failures.join("\n  ")
        );
    }
}

impl Drop for Run {
    fn drop(&mut self) {
        if !self.finished {
            self.row
                .failures
                .push("the test panicked before all its checks ran (see its output)".into());
            self.seal();
        }
    }
}

fn now() -> String {
    chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string()
}

fn workspace() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

fn results_dir() -> PathBuf {
    workspace().join("target").join("reliability")
}

/// Saves `row` and re-renders `bench/RELIABILITY.md` from every saved row. Never panics (it
/// also runs while a failed test unwinds): a report that cannot be written is only logged.
pub fn save(row: &FaultRow) {
    if let Err(e) = try_save(row) {
        eprintln!("[{}] cannot write the reliability report: {e}", row.fault);
    }
}

fn try_save(row: &FaultRow) -> std::io::Result<()> {
    let dir = results_dir();
    std::fs::create_dir_all(&dir)?;
    let _lock = Lock::take(dir.join(".lock"));
    let path = dir.join(format!("{}.json", row.fault));
    let tmp = dir.join(format!(".{}.json.tmp", row.fault));
    std::fs::write(&tmp, serde_json::to_string_pretty(row)?)?;
    std::fs::rename(&tmp, &path)?;
    let mut rows: Vec<FaultRow> = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .filter_map(|e| serde_json::from_slice(&std::fs::read(e.path()).ok()?).ok())
        .collect();
    rows.sort_by(|a, b| a.fault.cmp(&b.fault));
    let out = workspace().join("bench").join("RELIABILITY.md");
    let old = std::fs::read_to_string(&out).unwrap_or_default();
    let abuse = old.find(ABUSE_MARKER).map_or("", |at| &old[at..]);
    let tmp = out.with_extension("md.tmp");
    std::fs::write(
        &tmp,
        format!("{}\n{abuse}", render(&rows)).trim_end().to_string() + "\n",
    )?;
    std::fs::rename(&tmp, &out)
}

/// Where the hostile-input section of `bench/RELIABILITY.md` starts (it runs to the end).
pub const ABUSE_MARKER: &str = "<!-- hostile input: written by tests/e2e/abuse.rs -->";

/// Replaces the hostile-input section of `bench/RELIABILITY.md` with `section`, keeping the
/// fault suite's part. Never panics: a report that cannot be written is only logged.
pub fn save_abuse_section(section: &str) {
    let write = || -> std::io::Result<()> {
        let dir = results_dir();
        std::fs::create_dir_all(&dir)?;
        let _lock = Lock::take(dir.join(".lock"));
        let out = workspace().join("bench").join("RELIABILITY.md");
        let old = std::fs::read_to_string(&out).unwrap_or_default();
        let faults = old.find(ABUSE_MARKER).map_or(old.as_str(), |at| &old[..at]);
        let tmp = out.with_extension("md.tmp");
        std::fs::write(
            &tmp,
            format!(
                "{}\n\n{ABUSE_MARKER}\n{}\n",
                faults.trim_end(),
                section.trim_end()
            ),
        )?;
        std::fs::rename(&tmp, &out)
    };
    if let Err(e) = write() {
        eprintln!("[abuse] cannot write the reliability report: {e}");
    }
}

fn render(rows: &[FaultRow]) -> String {
    let mut md = String::from(
        "# Reliability under faults\n\n\
         Written by the fault suite (`tests/e2e/faults.rs`): the real `tollgate` binary, a mock \
         provider, dedicated Postgres and Redis instances it stops, kills and restarts, and a \
         bounded load generator, all on 127.0.0.1. Reproduce with\n\n\
         ```\ncargo test -p tollgate-gateway --test e2e faults -- --nocapture\n```\n\n\
         Each row is the latest run of one test (its time is in the last column). *Served*: \
         answered 200; *failed*: other answers by status (`0`: no answer, e.g. the process was \
         killed); *ledger rows*: rows for the test's requests; *duplicates*: rows beyond one per \
         request id; *missing*: requests answered 200 without a row; *overshoot*: hard-budget \
         spend beyond the limit, micro-dollars.\n\n\
         | Fault | Result | Sent | Served | Failed (status: n) | Ledger rows | Duplicates | Missing | Overshoot | Peak RSS | Time | Run at |\n\
         |---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for r in rows {
        let failed = if r.failed.is_empty() {
            "-".to_string()
        } else {
            r.failed
                .iter()
                .map(|(s, n)| format!("{s}: {n}"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        md.push_str(&format!(
            "| `{}` | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.0} s | {} |\n",
            r.fault,
            r.result,
            r.sent,
            r.served,
            failed,
            r.ledger_rows,
            r.duplicates,
            r.missing,
            r.overshoot_micros
                .map_or("-".to_string(), |o| o.to_string()),
            r.peak_rss_mib
                .map_or("-".to_string(), |m| format!("{m:.0} MiB")),
            r.wall_secs,
            r.at
        ));
    }
    md.push_str("\n## Notes\n\n");
    for r in rows {
        md.push_str(&format!(
            "- `{}`: {}\n",
            r.fault,
            r.notes.replace('\n', " ")
        ));
        for failure in &r.failures {
            md.push_str(&format!("  - failed: {}\n", failure.replace('\n', " ")));
        }
    }
    md
}

/// A cross-process lock: a directory only one holder can create. A lock older than 30 s is
/// taken to be left over by a killed run.
struct Lock(PathBuf);

impl Lock {
    fn take(path: PathBuf) -> Lock {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            match std::fs::create_dir(&path) {
                Ok(()) => return Lock(path),
                Err(_) => {
                    let stale = std::fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|t| t.elapsed().ok())
                        .is_some_and(|age| age > Duration::from_secs(30));
                    if stale {
                        let _ = std::fs::remove_dir(&path);
                    }
                    if Instant::now() > deadline {
                        eprintln!("report lock {path:?} stuck; writing without it");
                        return Lock(path);
                    }
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
        }
    }
}

impl Drop for Lock {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir(&self.0);
    }
}
