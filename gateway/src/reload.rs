//! Policy reload: `serve` watches its policy file (and takes SIGHUP as "reload now"). A valid
//! new file is swapped in atomically: requests already in flight finish under the policy they
//! started with, new ones get the new one. An invalid file is rejected with its errors logged,
//! and the policy in force stays.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use tollgate_billing::store::Store;

use crate::config::{diff, Backend, Policy};
use crate::limits::Limits;
use crate::proxy::AppState;

/// How often the file is looked at. Reading a policy file is cheap; no inotify needed.
const POLL: Duration = Duration::from_millis(500);

pub async fn watch(path: PathBuf, state: Arc<AppState>, store: Store, limits: Arc<Limits>) {
    use tokio::signal::unix::{signal, SignalKind};
    // Registering replaces SIGHUP's default action (terminate) for the whole process.
    let mut hangup = signal(SignalKind::hangup()).ok();
    let mut seen = std::fs::read(&path).ok();
    let mut tick = tokio::time::interval(POLL);
    loop {
        let forced = tokio::select! {
            _ = tick.tick() => false,
            Some(()) = async {
                match hangup.as_mut() {
                    Some(h) => h.recv().await,
                    None => std::future::pending().await,
                }
            } => true,
        };
        let now = std::fs::read(&path).ok();
        if now.is_none() || (!forced && now == seen) {
            continue; // a file being replaced can be briefly missing: wait for it
        }
        seen = now;
        reload(&path, &state, &store, &limits).await;
    }
}

/// Loads, validates and swaps in the file at `path`. Returns whether it is now in force.
pub async fn reload(path: &Path, state: &AppState, store: &Store, limits: &Limits) -> bool {
    let mut new = match Policy::load(path) {
        Ok(p) => p,
        Err(errors) => {
            for line in errors.to_string().lines() {
                tracing::error!("{line}");
            }
            tracing::error!(file = %path.display(), "policy reload rejected; the policy in force is unchanged");
            return false;
        }
    };
    let old = state.policy.load_full();
    keep_restart_only_settings(&old, &mut new);
    if let Err(e) = carry_local_backends(&old, &new).await {
        tracing::error!(file = %path.display(), "policy reload rejected: {e:#}");
        return false;
    }
    let changes = diff(&old, &new);
    // Counters the new policy adds to limited tenants start from the ledger's spend in their
    // window: their cut-offs are fixed before the swap (reservations on them are refused until
    // they are seeded), the seeds come from the background (`serve::rebuild_counters`).
    // Requests still running under the old policy are counted in them at their settle.
    limits.begin_added(&new).await;
    let new = Arc::new(new);
    state.policy.store(new.clone());
    tracing::info!(file = %path.display(), changes = changes.len(), "policy reloaded");
    for change in &changes {
        tracing::info!("policy change: {change}");
    }
    // New tenants' counters start from the ledger, as at a start.
    limits.rebuild(&new, store, Duration::ZERO, true).await;
    true
}

/// Settings read once at start cannot change under a running server: keep them, and say so.
fn keep_restart_only_settings(old: &Policy, new: &mut Policy) {
    macro_rules! keep {
        ($($field:ident),*) => {$(
            if old.$field != new.$field {
                tracing::warn!(setting = stringify!($field), "changing this setting needs a restart; the running value stays");
                new.$field = old.$field.clone();
            }
        )*};
    }
    keep!(
        listen,
        database_url,
        redis_url,
        redis_timeout,
        reservation_ttl,
        key_refresh,
        threads,
        ledger_flush_interval,
        ledger_max_batch,
        ledger_spool_path,
        ledger_journal_dir,
        ledger_journal_max_bytes,
        ledger_on_journal_full,
        ledger_retention_months,
        admin_listen,
        admin_token_env,
        drain,
        shutdown_timeout
    );
    // The listeners are TLS or not from the start; a reload may only renew the certificate.
    for (setting, old, new) in [
        ("tls", &old.tls, &mut new.tls),
        ("admin.tls", &old.admin_tls, &mut new.admin_tls),
    ] {
        if old.is_some() != new.is_some() {
            tracing::warn!(
                setting,
                "turning TLS on or off needs a restart; the listener keeps serving as it was"
            );
            new.clone_from(old);
        }
    }
}

/// A local backend whose model and options did not change keeps its running runtime; a new
/// or changed one is started before the swap, so no request meets a backend still loading.
async fn carry_local_backends(old: &Policy, new: &Policy) -> anyhow::Result<()> {
    for backend in new.backends.iter().filter(|b| b.local.is_some()) {
        let local = backend.local.as_ref().expect("filtered");
        let same = old.backends.iter().find(|o| same_runtime(o, backend));
        let running = same.and_then(|o| o.local.as_ref());
        if let Some((addr, secret)) = running.and_then(|l| Some((l.addr.get()?, l.secret.get()?))) {
            let _ = local.addr.set(*addr);
            let _ = local.secret.set(secret.clone());
            continue;
        }
        if !local.options.model.is_file() {
            anyhow::bail!(
                "backend `{}`: model file {} not found",
                backend.name,
                local.options.model.display()
            );
        }
        let starting = backend.clone();
        let addr =
            tokio::task::spawn_blocking(move || crate::serve::start_local(&starting)).await??;
        tracing::info!(backend = %backend.name, %addr, "local backend started for the new policy");
    }
    Ok(())
}

fn same_runtime(a: &Backend, b: &Backend) -> bool {
    match (&a.local, &b.local) {
        (Some(x), Some(y)) => {
            format!("{:?}", x.options) == format!("{:?}", y.options)
                && x.listen == y.listen
                && x.token.as_ref().map(tollgate_runtime::Token::expose)
                    == y.token.as_ref().map(tollgate_runtime::Token::expose)
        }
        _ => false,
    }
}
