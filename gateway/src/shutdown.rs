//! Graceful shutdown that bills everything.
//!
//! On SIGTERM or SIGINT, Pingora closes the listeners at once. In-flight requests then get
//! `shutdown.drain_secs` to finish; streams still running after that are cut ([`Drain::cut`]:
//! an error event and `[DONE]`, billed for what the client received). When no request is left
//! in flight (or `shutdown.timeout_secs` after the cut), every settle is awaited, the journal
//! is synced, the database given what it can take in the time left, and the process exits.
//! A second signal cuts at once.

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use pingora::server::{ShutdownSignal, ShutdownSignalWatch};
use tokio::sync::{watch, Notify};

/// In-flight requests and the shutdown's phases, shared by the data plane and `serve`.
pub struct Drain {
    draining: AtomicBool,
    in_flight: AtomicUsize,
    /// Becomes true when the remaining requests must end now.
    cut: watch::Sender<bool>,
    /// Told when the first shutdown signal arrives.
    started: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: AtomicBool::new(false),
            in_flight: AtomicUsize::new(0),
            cut: watch::channel(false).0,
            started: Notify::new(),
        }
    }
}

/// Counts one request in flight for as long as it lives.
pub struct InFlight<'a>(&'a Drain);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Drain {
    pub fn enter(&self) -> InFlight<'_> {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        InFlight(self)
    }

    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Resolves when in-flight requests must end now.
    pub async fn cut_now(&self) {
        let mut rx = self.cut.subscribe();
        let _ = rx.wait_for(|cut| *cut).await;
    }

    fn begin(&self) {
        if self.draining.swap(true, Ordering::SeqCst) {
            tracing::warn!("second shutdown signal: ending in-flight requests now");
            self.cut.send_replace(true);
        } else {
            self.started.notify_one();
        }
    }

    /// Waits until no request is in flight or `timeout` passes; true when none is left.
    async fn idle(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.in_flight() == 0).await
    }
}

/// Polls `done` every 10 ms until it holds (true) or `timeout` passes (false). For the few
/// waits of a shutdown, where a notification would cost every request a wake-up.
pub async fn wait_until(timeout: Duration, done: impl Fn() -> bool) -> bool {
    let until = tokio::time::Instant::now() + timeout;
    while !done() {
        if tokio::time::Instant::now() >= until {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    true
}

/// What `serve` must finish before the process may exit.
pub struct Finish {
    pub drain: Arc<Drain>,
    pub drain_for: Duration,
    pub timeout: Duration,
    pub ledger: tollgate_billing::ledger::LedgerSender,
    pub limits: Arc<crate::limits::Limits>,
    pub store: tollgate_billing::store::Store,
}

impl Finish {
    /// Waits for the first shutdown signal, drains, bills, flushes, then exits the process
    /// (Pingora's own grace period is only a backstop, set longer than all of this).
    pub async fn run(self) {
        self.drain.started.notified().await;
        let in_flight = self.drain.in_flight();
        tracing::info!(
            in_flight,
            drain_secs = self.drain_for.as_secs_f64(),
            "shutting down: listener closed, letting in-flight requests finish"
        );
        tokio::select! {
            _ = self.drain.idle(self.drain_for) => {}
            _ = self.drain.cut_now() => {}
        }
        if self.drain.in_flight() > 0 {
            tracing::warn!(
                in_flight = self.drain.in_flight(),
                "drain time over: ending the remaining requests (billed for what they delivered)"
            );
            self.drain.cut.send_replace(true);
            if !self.drain.idle(self.timeout).await {
                tracing::error!(
                    in_flight = self.drain.in_flight(),
                    "requests still in flight after the cut; exiting anyway"
                );
            }
        }
        let settled = self.limits.settled(self.timeout).await;
        if !settled {
            tracing::warn!("budget settles still pending at exit; their holds expire on their own");
        }
        let written = self.ledger.flush(self.timeout).await;
        let stats = self.ledger.stats();
        if written {
            tracing::info!("ledger flushed to the database; bye");
        } else {
            tracing::warn!(
                journal_rows = stats.journal_rows.load(Ordering::Relaxed),
                "the database did not take every row in time; they are safe in the journal and replayed at the next start"
            );
        }
        if tokio::time::timeout(self.timeout, self.store.close())
            .await
            .is_err()
        {
            tracing::warn!("the database connections did not close in time");
        }
        std::process::exit(0);
    }
}

/// SIGTERM and SIGINT both drain in-flight requests, so Ctrl-C never loses a ledger row.
pub struct TerminateOnSignal(pub Arc<Drain>);

#[async_trait]
impl ShutdownSignalWatch for TerminateOnSignal {
    async fn recv(&self) -> ShutdownSignal {
        use tokio::signal::unix::{signal, SignalKind};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return std::future::pending().await;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        self.0.begin();
        // Later signals cut what is still running.
        let drain = self.0.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = term.recv() => {}
                    _ = int.recv() => {}
                }
                drain.begin();
            }
        });
        ShutdownSignal::GracefulTerminate
    }
}
