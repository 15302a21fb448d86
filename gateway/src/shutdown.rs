//! Graceful shutdown that bills everything.
//!
//! On SIGTERM or SIGINT, Pingora closes the listeners at once. In-flight requests then get
//! `shutdown.drain_secs` to finish; streams still running after that are cut ([`CutSignal`]:
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

/// Counts work in progress (requests in flight, settles running) so that shutdown can wait
/// for it; each unit is a [`Tracked`] guard that counts until it is dropped.
#[derive(Clone, Default)]
pub struct Tracker(Arc<AtomicUsize>);

/// One unit of tracked work; owned, so it can move into a spawned task.
pub struct Tracked(Arc<AtomicUsize>);

impl Drop for Tracked {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

impl Tracker {
    pub fn track(&self) -> Tracked {
        self.0.fetch_add(1, Ordering::SeqCst);
        Tracked(self.0.clone())
    }

    pub fn count(&self) -> usize {
        self.0.load(Ordering::SeqCst)
    }

    /// Waits until nothing is tracked or `timeout` passes; true when nothing is left.
    pub async fn idle(&self, timeout: Duration) -> bool {
        wait_until(timeout, || self.count() == 0).await
    }
}

/// Polls `done` every 10 ms until it holds (true) or `timeout` passes (false). For the few
/// waits of a shutdown or a rebuild, where a notification would cost every request a wake-up.
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

/// In-flight requests and the shutdown's phases, shared by the data plane and `serve`.
pub struct Drain {
    draining: AtomicBool,
    pub in_flight: Tracker,
    /// Becomes true when the remaining requests must end now.
    cut: watch::Sender<bool>,
    /// Told when the first shutdown signal arrives.
    started: Notify,
}

impl Default for Drain {
    fn default() -> Self {
        Drain {
            draining: AtomicBool::new(false),
            in_flight: Tracker::default(),
            cut: watch::channel(false).0,
            started: Notify::new(),
        }
    }
}

/// Resolves, each time it is awaited, once in-flight requests must end; one per request, so
/// that a stream's loop does not subscribe again for every chunk.
pub struct CutSignal(watch::Receiver<bool>);

impl CutSignal {
    pub async fn wait(&mut self) {
        let _ = self.0.wait_for(|cut| *cut).await;
    }
}

impl Drain {
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// For a loop that waits on the cut again and again (a stream's relay).
    pub fn cut_signal(&self) -> CutSignal {
        CutSignal(self.cut.subscribe())
    }

    /// Resolves when in-flight requests must end now.
    pub async fn cut_now(&self) {
        self.cut_signal().wait().await
    }

    fn begin(&self) {
        if self.draining.swap(true, Ordering::SeqCst) {
            tracing::warn!("second shutdown signal: ending in-flight requests now");
            self.cut.send_replace(true);
        } else {
            self.started.notify_one();
        }
    }
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
        let in_flight = &self.drain.in_flight;
        tracing::info!(
            in_flight = in_flight.count(),
            drain_secs = self.drain_for.as_secs_f64(),
            "shutting down: listener closed, letting in-flight requests finish"
        );
        tokio::select! {
            _ = in_flight.idle(self.drain_for) => {}
            _ = self.drain.cut_now() => {}
        }
        if in_flight.count() > 0 {
            tracing::warn!(
                in_flight = in_flight.count(),
                "drain time over: ending the remaining requests (billed for what they delivered)"
            );
            self.drain.cut.send_replace(true);
            if !in_flight.idle(self.timeout).await {
                tracing::error!(
                    in_flight = in_flight.count(),
                    "requests still in flight after the cut; exiting anyway"
                );
            }
        }
        let settled = self.limits.settled(self.timeout).await;
        if !settled {
            tracing::warn!("budget settles still pending at exit; their holds expire on their own");
        }
        let written = self.ledger.flush(self.timeout).await;
        if written {
            tracing::info!("ledger flushed to the database; bye");
        } else {
            tracing::warn!(
                journal_rows = self.ledger.stats().snapshot().journal_rows,
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
