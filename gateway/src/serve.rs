//! `tollgate serve`: opens the store, starts the background tasks (ledger writer, key refresh)
//! on a small Tokio runtime of their own, runs the Pingora data plane until a shutdown signal,
//! then flushes the ledger.

use std::path::Path;
use std::process::ExitCode;
use std::sync::Arc;

use pingora::server::configuration::ServerConf;
use pingora::server::{RunArgs, Server};
use tollgate_billing::ledger::{self, JournalOptions, WriterOptions};
use tollgate_billing::store::Store;

use crate::cli::{load_policy, redact_url};
use crate::config::Policy;
use crate::keys::{self, KeyCache};
use crate::limits::Limits;
use crate::proxy::{AppState, Gateway};
use crate::shutdown::{Drain, Finish, TerminateOnSignal};

/// Every this many key refreshes, reload all keys instead of only the changes.
const FULL_KEY_RELOAD_EVERY: u32 = 60;
/// Tenant that receives the demo key on a fresh database.
const DEMO_TENANT: &str = "demo";

pub fn serve(config: &Path) -> anyhow::Result<ExitCode> {
    let Some(policy) = load_policy(config) else {
        return Ok(ExitCode::from(2));
    };
    let policy = Arc::new(policy);
    start_local_backends(&policy)?;
    let current = Arc::new(arc_swap::ArcSwap::new(policy.clone()));
    let background = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .thread_name("tollgate-bg")
        .enable_all()
        .build()?;
    let (store, keys, ledger, limits) =
        background.block_on(start_background(&policy, current.clone()))?;

    // Pingora closes the listeners at the signal and then waits out its grace period; our
    // drain (shutdown.rs) exits the process as soon as everything is billed, well within it.
    let backstop = policy.drain + policy.shutdown_timeout * 3 + std::time::Duration::from_secs(5);
    let conf = ServerConf {
        threads: policy
            .threads
            .unwrap_or_else(|| std::thread::available_parallelism().map_or(2, |n| n.get())),
        grace_period_seconds: Some(backstop.as_secs()),
        graceful_shutdown_timeout_seconds: Some(1),
        ..Default::default()
    };
    let mut server = Server::new_with_opt_and_conf(None, conf);
    server.bootstrap();
    let drain = Arc::new(Drain::default());
    let state = Arc::new(AppState {
        policy: current,
        keys,
        ledger: ledger.clone(),
        limits: limits.clone(),
        routing: crate::routing::Routing::new(),
        drain: drain.clone(),
    });
    background.spawn(
        Finish {
            drain: drain.clone(),
            drain_for: policy.drain,
            timeout: policy.shutdown_timeout,
            ledger: ledger.clone(),
            limits: limits.clone(),
            store: store.clone(),
        }
        .run(),
    );
    background.spawn(crate::reload::watch(
        config.to_path_buf(),
        state.clone(),
        store.clone(),
        limits.clone(),
    ));
    if let Some(address) = policy.admin_listen {
        start_admin(
            &background,
            address,
            &policy.admin_token_env,
            state.clone(),
            store.clone(),
        )?;
    }
    background.spawn(maintain_partitions(
        store.clone(),
        policy.ledger_retention_months,
    ));
    background.spawn(maintain_audit_log(store.clone(), state.policy.clone()));
    let current = state.policy.clone();
    let mut service =
        pingora::proxy::http_proxy_service(&server.configuration, Gateway::new(state));
    for address in &policy.listen {
        if policy.tls.is_some() {
            let settings = crate::tls::data_plane_settings(current.clone())
                .map_err(|e| anyhow::anyhow!("TLS on {address}: {e}"))?;
            service.add_tls_with_settings(&address.to_string(), None, settings);
        } else {
            service.add_tcp(&address.to_string());
        }
    }
    server.add_service(service);
    let scheme = if policy.tls.is_some() {
        "https"
    } else {
        "http"
    };
    let addresses: Vec<String> = policy
        .listen
        .iter()
        .map(|a| format!("{scheme}://{a}/v1"))
        .collect();
    println!(
        "tollgate serving on {} (database {})",
        addresses.join(", "),
        redact_url(&policy.database_url)
    );

    server.run(RunArgs {
        shutdown_signal: Box::new(TerminateOnSignal(drain)),
    });

    // Reached only if the drain above did not exit first (it always should).
    background.block_on(async {
        limits.settled(policy.shutdown_timeout).await;
        ledger.flush(policy.shutdown_timeout).await;
        store.close().await;
    });
    tracing::info!("ledger flushed; bye");
    Ok(ExitCode::SUCCESS)
}

/// Binds the admin port (a failure stops `serve`: an admin API that silently is not there would
/// be found out at the worst time) and serves the admin API on the background runtime.
fn start_admin(
    background: &tokio::runtime::Runtime,
    address: std::net::SocketAddr,
    token_env: &str,
    state: Arc<AppState>,
    store: Store,
) -> anyhow::Result<()> {
    let listener = background
        .block_on(tokio::net::TcpListener::bind(address))
        .map_err(|e| anyhow::anyhow!("admin API: cannot listen on {address}: {e}"))?;
    let (token, generated) = crate::admin::admin_token(token_env, address)?;
    if generated {
        println!("Admin token for this run (set {token_env} to choose your own); shown only here:");
        println!("  {token}");
    }
    let tls = state
        .policy
        .load()
        .admin_tls
        .is_some()
        .then(|| crate::tls::admin_config(state.policy.clone()));
    let scheme = if tls.is_some() { "https" } else { "http" };
    println!("admin API and dashboard on {scheme}://{address}/");
    let admin = Arc::new(crate::admin::AdminState::new(state, store, &token));
    background.spawn(crate::admin::serve(listener, tls, admin));
    Ok(())
}

/// Keeps the ledger's monthly partitions ahead of time and drops those past retention
/// (Postgres; nothing to do on SQLite). Hourly, so a month boundary is never missed.
async fn maintain_partitions(store: Store, retention_months: Option<u32>) {
    loop {
        match store.maintain_partitions(retention_months).await {
            Ok(dropped) if !dropped.is_empty() => {
                tracing::info!(?dropped, "ledger partitions past retention dropped")
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!("ledger partition maintenance failed (retrying in an hour): {e:#}")
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}

/// Deletes audit entries older than `admin.audit_retention_days` (the policy in force, so a
/// reload changes it), at start and then hourly.
async fn maintain_audit_log(store: Store, policy: Arc<arc_swap::ArcSwap<Policy>>) {
    loop {
        if let Some(days) = policy.load().admin_audit_retention_days {
            let cutoff = chrono::Utc::now().timestamp_millis() - i64::from(days) * 86_400_000;
            match store.prune_audit_log(cutoff).await {
                Ok(0) => {}
                Ok(deleted) => {
                    tracing::info!(deleted, days, "audit log entries past retention deleted")
                }
                Err(e) => {
                    tracing::warn!("audit log retention failed (retrying in an hour): {e:#}")
                }
            }
        }
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
    }
}

/// Loads each `kind: local` backend's model and serves it on a loopback port of its own.
fn start_local_backends(policy: &Policy) -> anyhow::Result<()> {
    for backend in &policy.backends {
        let Some(local) = &backend.local else {
            continue;
        };
        let path = &local.options.model;
        if !path.is_file() {
            anyhow::bail!(
                "backend `{}`: model file {} not found (scripts/fetch-model fetches the default one)",
                backend.name,
                path.display()
            );
        }
        let started = std::time::Instant::now();
        let addr = start_local(backend)?;
        println!(
            "local backend `{}`: {} on {addr} (speculation: {:?}, ready in {:.1}s)",
            backend.name,
            path.display(),
            local.options.speculate,
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}

/// Starts a local backend's runtime and records where it listens and the token it requires:
/// the operator's (`token_env`) or a random one that only this process knows, so nothing but
/// this gateway (which meters and bills) can use it.
pub(crate) fn start_local(
    backend: &crate::config::Backend,
) -> anyhow::Result<std::net::SocketAddr> {
    let local = backend.local.as_ref().expect("a local backend");
    let token = match &local.token {
        Some(token) => token.clone(),
        None => {
            if let Some(listen) = local.listen {
                tollgate_runtime::check_listen(listen, None)
                    .map_err(|e| anyhow::anyhow!("backend `{}`: {e:#}", backend.name))?;
            }
            tollgate_runtime::Token::random()
        }
    };
    let addr =
        tollgate_runtime::spawn_background(local.options.clone(), local.listen, token.clone())
            .map_err(|e| anyhow::anyhow!("backend `{}`: {e:#}", backend.name))?;
    let _ = local.secret.set(token);
    let _ = local.addr.set(addr);
    Ok(addr)
}

async fn start_background(
    policy: &Arc<Policy>,
    current: Arc<arc_swap::ArcSwap<Policy>>,
) -> anyhow::Result<(Store, Arc<KeyCache>, ledger::LedgerSender, Arc<Limits>)> {
    let store = Store::open(&policy.database_url).await?;
    // The journal first: rows an earlier run left (a crash, an outage at shutdown) reach the
    // database before the counters are rebuilt from it.
    let ledger = ledger::spawn_writer(
        store.clone(),
        WriterOptions {
            journal: JournalOptions {
                dir: policy.ledger_journal_dir.clone(),
                max_bytes: policy.ledger_journal_max_bytes,
                on_full: policy.ledger_on_journal_full,
                flush_interval: policy.ledger_flush_interval,
                max_batch: policy.ledger_max_batch,
            },
            legacy_spool: Some(policy.ledger_spool_path.clone()),
        },
    )?;
    let left = ledger.stats().snapshot().journal_rows;
    if left > 0
        && !ledger
            .wait_written(std::time::Duration::from_secs(60))
            .await
    {
        tracing::warn!(
            rows = ledger.stats().snapshot().journal_rows,
            "ledger journal not fully replayed yet; it continues in the background"
        );
    } else if left > 0 {
        tracing::info!(rows = left, "replayed the ledger journal");
    }
    if store.keys_changed_since(0).await?.is_empty() && policy.tenants.contains_key(DEMO_TENANT) {
        let keys::Created::New(record, secret) =
            keys::create_key(&store, DEMO_TENANT, Some("demo"), None).await?
        else {
            anyhow::bail!("the demo key was not created");
        };
        println!(
            "Created a demo API key for tenant `{DEMO_TENANT}` ({}). It is shown only once:",
            record.id
        );
        println!("  {secret}");
    }
    let keys = Arc::new(KeyCache::default());
    keys.refresh(&store, true).await?;
    tokio::spawn(refresh_keys(
        store.clone(),
        keys.clone(),
        policy.key_refresh,
    ));
    // Budget counters: this replica's own from the ledger now (nothing of ours is in flight);
    // shared ones whenever Redis turns out cold (first start, flush, restart).
    let limits = Arc::new(Limits::new(policy)?);
    limits.watch_ledger(ledger.clone());
    limits
        .rebuild(policy, &store, std::time::Duration::ZERO, true)
        .await;
    let lag = policy.ledger_flush_interval * 2 + std::time::Duration::from_secs(1);
    if policy.redis_url.is_some() {
        limits.rebuild(policy, &store, lag, false).await;
        // Settles Redis did not take (this run's, or left on disk by an earlier one).
        tokio::spawn(
            limits
                .clone()
                .replay_abandoned(std::time::Duration::from_secs(2)),
        );
    }
    // Counters new to their window (a budget this policy has and the running replicas' did
    // not) start from the ledger, before this replica serves.
    limits.seed_counters(policy, &store, lag).await;
    tokio::spawn(rebuild_counters(
        current,
        store.clone(),
        limits.clone(),
        lag,
    ));
    Ok((store, keys, ledger, limits))
}

/// Off the request path, every 500 ms: rebuilds a cold Redis' counters from the ledger, and
/// seeds every counter that needs a seed of its own (added by a reload here or by a newer
/// policy elsewhere, or whose seeder failed or died) until it has one.
async fn rebuild_counters(
    policy: Arc<arc_swap::ArcSwap<Policy>>,
    store: Store,
    limits: Arc<Limits>,
    lag: std::time::Duration,
) {
    loop {
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let policy = policy.load_full();
        if policy.redis_url.is_some() {
            limits.rebuild(&policy, &store, lag, false).await;
        }
        limits.seed_counters(&policy, &store, lag).await;
    }
}

/// Keeps the key cache in step with the database (keys created or revoked by other processes).
async fn refresh_keys(store: Store, keys: Arc<KeyCache>, every: std::time::Duration) {
    let mut ticks = 0u32;
    loop {
        tokio::time::sleep(every).await;
        ticks = ticks.wrapping_add(1);
        if let Err(e) = keys
            .refresh(&store, ticks.is_multiple_of(FULL_KEY_RELOAD_EVERY))
            .await
        {
            tracing::warn!("key refresh failed (serving with the cached keys): {e:#}");
        }
    }
}
