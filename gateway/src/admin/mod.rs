//! The control plane: the admin API and the chargeback dashboard, on their own port.
//!
//! Every `/admin/*` call needs the admin bearer token (the OpenAPI document excepted) and is
//! written to the `audit_log` table with who made it, what it did and how it ended. Handlers
//! are thin: what each call does lives in [`service`], which the CLI calls too.

mod assets;
pub mod service;
mod throttle;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{ConnectInfo, MatchedPath, Path, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use serde::Deserialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use tollgate_billing::store::{AuditEntry, Store};

use crate::proxy::error::ApiError;
use crate::proxy::AppState;
use service::ReportParams;

pub struct AdminState {
    pub app: Arc<AppState>,
    pub store: Store,
    token_sha256: [u8; 32],
    /// How the audit log names holders of the token: its fingerprint, never the token.
    actor: String,
    /// Failed authentications per source, limited before they are audited.
    failures: throttle::AuthFailures,
}

impl AdminState {
    pub fn new(app: Arc<AppState>, store: Store, token: &str) -> AdminState {
        let token_sha256: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        AdminState {
            app,
            store,
            actor: format!("admin-token:{}", &hex::encode(token_sha256)[..12]),
            token_sha256,
            failures: throttle::AuthFailures::default(),
        }
    }

    fn authorized(&self, headers: &HeaderMap) -> bool {
        let presented = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| <[u8; 32]>::from(Sha256::digest(t.trim().as_bytes())));
        // Comparing digests: the time taken says nothing about the token.
        presented == Some(self.token_sha256)
    }
}

/// The admin token from the environment, or, for an admin API on loopback only, a fresh random
/// one (`true`: made here, to be shown once). Reachable from elsewhere, a token must be chosen:
/// a generated one would differ per replica and end up in whatever collects standard output.
pub fn admin_token(env: &str, address: SocketAddr) -> anyhow::Result<(String, bool)> {
    match std::env::var(env) {
        Ok(token) if !token.trim().is_empty() => Ok((token.trim().to_string(), false)),
        _ if address.ip().is_loopback() => {
            use rand::RngCore;
            let mut random = [0u8; 24];
            rand::rngs::OsRng.fill_bytes(&mut random);
            Ok((format!("tga-{}", hex::encode(random)), true))
        }
        _ => anyhow::bail!(
            "admin API on {address}: set {env} to its bearer token (a token is generated only \
             for a loopback address), or set admin.enabled: false"
        ),
    }
}

impl axum::response::IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let mut response = (
            status,
            [(header::CONTENT_TYPE, "application/json")],
            self.body(),
        )
            .into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
            .headers_mut()
            .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        response
    }
}

/// What the audit log records about a call beyond its route and status.
#[derive(Clone)]
struct AuditDetail(String);

fn json_response(status: StatusCode, body: Value) -> Response {
    (status, axum::Json(body)).into_response()
}

type Answer = Result<Response, ApiError>;

pub fn router(state: Arc<AdminState>) -> Router {
    let app = state.app.clone();
    let api = Router::new()
        .route("/admin/tenants", get(tenants))
        .route("/admin/tenants/{name}", get(tenant))
        .route("/admin/keys", get(list_keys).post(create_key))
        .route("/admin/keys/{id}", get(get_key).delete(revoke_key))
        .route("/admin/keys/{id}/rotate", post(rotate_key))
        .route("/admin/keys/{id}/revoke", post(revoke_key))
        .route("/admin/budgets", get(budgets))
        .route("/admin/usage", get(usage))
        .route("/admin/routing", get(routing))
        .route("/admin/export/chargeback", get(export))
        .route("/admin/audit", get(audit))
        .route("/admin/openapi.json", get(assets::openapi))
        .route_layer(middleware::from_fn_with_state(state.clone(), guard))
        .method_not_allowed_fallback(method_not_allowed)
        .fallback(not_found)
        .with_state(state);
    Router::new()
        .route("/", get(assets::index))
        .route("/dashboard", get(assets::index))
        .route("/assets/{file}", get(assets::asset))
        .route("/metrics", get(metrics).with_state(app))
        .merge(api)
}

/// Prometheus text exposition of the ledger's health (no token: no tenant data in it).
async fn metrics(axum::extract::State(app): axum::extract::State<Arc<AppState>>) -> Response {
    let ledger = app.ledger.stats().snapshot();
    let flag = |on: bool| if on { 1.0 } else { 0.0 };
    let lines = [
        (
            "tollgate_ledger_queued_rows",
            "gauge",
            "Ledger rows recorded, waiting for their group commit to the journal.",
            ledger.queued_rows as f64,
        ),
        (
            "tollgate_ledger_journal_rows",
            "gauge",
            "Ledger rows on local disk not yet in the database.",
            ledger.journal_rows as f64,
        ),
        (
            "tollgate_ledger_journal_bytes",
            "gauge",
            "Bytes of ledger journal segments on disk.",
            ledger.journal_bytes as f64,
        ),
        (
            "tollgate_ledger_write_lag_seconds",
            "gauge",
            "Age of the oldest journaled row not yet in the database.",
            ledger.write_lag_ms as f64 / 1000.0,
        ),
        (
            "tollgate_ledger_dead_letters_total",
            "counter",
            "Ledger rows the database refused, moved to the dead letters.",
            ledger.dead_letters as f64,
        ),
        (
            "tollgate_ledger_rows_lost_total",
            "counter",
            "Ledger rows dropped because the journal was full (fail_open).",
            ledger.lost_rows as f64,
        ),
        (
            "tollgate_ledger_rows_written_total",
            "counter",
            "Ledger rows written to the database.",
            ledger.written_rows as f64,
        ),
        (
            "tollgate_ledger_database_up",
            "gauge",
            "1 when the last ledger write reached the database.",
            flag(ledger.database_up),
        ),
        (
            "tollgate_ledger_accepting",
            "gauge",
            "1 while new requests are served (0: journal full under fail_closed).",
            flag(ledger.accepting),
        ),
        (
            "tollgate_abandoned_settles_dropped_total",
            "counter",
            "Settles Redis never took that were not kept on disk: the file of abandoned settles was full.",
            app.limits.abandoned_settles_dropped() as f64,
        ),
        (
            "tollgate_requests_in_flight",
            "gauge",
            "Proxied requests in flight.",
            app.drain.in_flight.count() as f64,
        ),
    ];
    let mut body = String::new();
    for (name, kind, help, value) in lines {
        body.push_str(&format!(
            "# HELP {name} {help}\n# TYPE {name} {kind}\n{name} {value}\n"
        ));
    }
    (
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; version=0.0.4",
        )],
        body,
    )
        .into_response()
}

/// Serves the admin API until the process exits.
/// Serves the admin API on `listener`, over TLS when `tls` is set.
pub async fn serve(
    listener: tokio::net::TcpListener,
    tls: Option<Arc<pingora::tls::ServerConfig>>,
    state: Arc<AdminState>,
) {
    use axum::serve::ListenerExt;
    let app = router(state).into_make_service_with_connect_info::<SocketAddr>();
    let served = match tls {
        None => axum::serve(listener, app).await,
        Some(config) => match crate::tls::TlsListener::new(listener, config) {
            // `tap_io` gives the listener axum's `ConnectInfo<SocketAddr>` (the guard's source).
            Ok(tls) => axum::serve(tls.tap_io(|_| {}), app).await,
            Err(e) => Err(e),
        },
    };
    if let Err(e) = served {
        tracing::error!("admin API stopped: {e}");
    }
}

async fn not_found(request: Request) -> ApiError {
    ApiError::not_found(request.uri().path())
}

async fn method_not_allowed(request: Request) -> ApiError {
    ApiError::method_not_allowed(request.method().as_str(), request.uri().path())
}

/// Authenticates and audits every admin call.
async fn guard(
    State(state): State<Arc<AdminState>>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let method = request.method().to_string();
    let path = request
        .uri()
        .path_and_query()
        .map_or_else(|| request.uri().path().to_string(), |p| p.to_string());
    let route = request.extensions().get::<MatchedPath>().map_or_else(
        || request.uri().path().to_string(),
        |m| m.as_str().to_string(),
    );
    let target = path_target(&route, request.uri().path());
    let public = route == "/admin/openapi.json";
    let authorized = state.authorized(request.headers());
    if !authorized && !public {
        if let throttle::Verdict::Refuse { retry_after } = state.failures.fail(remote.ip()) {
            // Refused before the audit log: a flood of guesses must not fill it.
            let mut error = ApiError::new(
                429,
                "rate_limit_exceeded",
                "too_many_failed_authentications",
                "Too many calls with a missing or wrong admin token from this address; retry later.",
            );
            error.retry_after = Some(i64::try_from(retry_after).unwrap_or(i64::MAX));
            return error.into_response();
        }
    }
    let mut response = if authorized || public {
        next.run(request).await
    } else {
        ApiError::new(
            401,
            "authentication_error",
            "invalid_admin_token",
            "Missing or wrong admin token. Send it as `Authorization: Bearer ...`.",
        )
        .into_response()
    };
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    let entry = AuditEntry {
        id: 0,
        at_ms: chrono::Utc::now().timestamp_millis(),
        actor: if authorized {
            state.actor.clone()
        } else {
            "anonymous".into()
        },
        remote: Some(remote.ip().to_string()),
        action: format!("{method} {route}"),
        method,
        path,
        target,
        status: i32::from(response.status().as_u16()),
        detail: response
            .extensions()
            .get::<AuditDetail>()
            .map(|d| d.0.clone()),
    };
    if let Err(e) = state.store.audit(&entry).await {
        tracing::error!(action = %entry.action, status = entry.status, "audit log write failed: {e:#}");
    }
    response
}

/// The value of a route's single path parameter (`/admin/keys/{id}` -> the id).
fn path_target(route: &str, path: &str) -> Option<String> {
    route
        .split('/')
        .zip(path.split('/'))
        .find(|(r, _)| r.starts_with('{'))
        .map(|(_, p)| p.to_string())
}

fn policy(state: &AdminState) -> Arc<crate::config::Policy> {
    state.app.policy.load_full()
}

/// Picks changed keys up at once on this replica (others within `key_refresh_ms`).
async fn refresh_keys(state: &AdminState) {
    if let Err(e) = state.app.keys.refresh(&state.store, false).await {
        tracing::warn!("key cache refresh after an admin change failed: {e:#}");
    }
}

fn parse_body<T: for<'de> Deserialize<'de> + Default>(body: &Bytes) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(body).map_err(ApiError::invalid_json)
}

async fn tenants(State(state): State<Arc<AdminState>>) -> Answer {
    Ok(json_response(
        StatusCode::OK,
        service::tenants(&policy(&state), None)?,
    ))
}

async fn tenant(State(state): State<Arc<AdminState>>, Path(name): Path<String>) -> Answer {
    Ok(json_response(
        StatusCode::OK,
        service::tenants(&policy(&state), Some(&name))?,
    ))
}

async fn list_keys(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    let tenant = query.get("tenant").map(String::as_str);
    Ok(json_response(
        StatusCode::OK,
        service::list_keys(&state.store, tenant).await?,
    ))
}

async fn get_key(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Answer {
    Ok(json_response(
        StatusCode::OK,
        service::get_key(&state.store, &id).await?,
    ))
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    tenant: String,
    name: Option<String>,
    idempotency_key: Option<String>,
}

/// The body's idempotency key, or the `Idempotency-Key` header's.
fn idempotency(body: Option<String>, headers: &HeaderMap) -> Option<String> {
    body.or_else(|| {
        headers
            .get("idempotency-key")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    })
}

async fn create_key(
    State(state): State<Arc<AdminState>>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let request: CreateKey = parse_body(&body)?;
    if request.tenant.is_empty() {
        return Err(ApiError::bad_request("`tenant` is required").with_param("tenant"));
    }
    let idempotency_key = idempotency(request.idempotency_key, &headers);
    let (created, body) = service::create_key(
        &policy(&state),
        &state.store,
        &request.tenant,
        request.name.as_deref(),
        idempotency_key.as_deref(),
    )
    .await?;
    refresh_keys(&state).await;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    // The new key's id, never its secret.
    let detail = format!(
        "tenant={} key={}{}",
        request.tenant,
        body["key"]["id"].as_str().unwrap_or_default(),
        if created { "" } else { " replayed" }
    );
    let mut response = json_response(status, body);
    response.extensions_mut().insert(AuditDetail(detail));
    Ok(response)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RotateKey {
    grace_seconds: Option<u64>,
    idempotency_key: Option<String>,
}

async fn rotate_key(
    State(state): State<Arc<AdminState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Answer {
    let request: RotateKey = parse_body(&body)?;
    let rotation_key = idempotency(request.idempotency_key, &headers);
    let body = service::rotate_key(
        &state.store,
        &id,
        request.grace_seconds,
        rotation_key.as_deref(),
    )
    .await?;
    refresh_keys(&state).await;
    let replayed = body.get("replayed").is_some();
    let mut response = json_response(StatusCode::OK, body);
    response.extensions_mut().insert(AuditDetail(format!(
        "grace_seconds={}{}",
        request
            .grace_seconds
            .map_or("default".into(), |g| g.to_string()),
        if replayed { " replayed" } else { "" }
    )));
    Ok(response)
}

async fn revoke_key(State(state): State<Arc<AdminState>>, Path(id): Path<String>) -> Answer {
    let body = service::revoke_key(&state.store, &id).await?;
    refresh_keys(&state).await;
    Ok(json_response(StatusCode::OK, body))
}

async fn budgets(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    let tenant = query
        .get("tenant")
        .filter(|t| !t.is_empty())
        .map(String::as_str);
    let body = service::budgets(&policy(&state), &state.app.limits, tenant).await?;
    Ok(json_response(StatusCode::OK, body))
}

async fn usage(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    let params = ReportParams::from_query(&query, &[])?;
    Ok(json_response(
        StatusCode::OK,
        service::usage(&policy(&state), &state.store, &params).await?,
    ))
}

async fn routing(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    let params = ReportParams::from_query(&query, &[])?;
    Ok(json_response(
        StatusCode::OK,
        service::routing(&policy(&state), &state.store, &params).await?,
    ))
}

async fn export(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    let focus = match query.get("format").map(String::as_str) {
        None | Some("") | Some("csv") => false,
        Some("focus") => true,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "unknown format `{other}`: use csv or focus"
            ))
            .with_param("format"))
        }
    };
    let params = ReportParams::from_query(&query, &["format"])?;
    let (name, csv) = service::chargeback(&policy(&state), &state.store, &params, focus).await?;
    Ok(Response::builder()
        .header(header::CONTENT_TYPE, "text/csv; charset=utf-8")
        .header(
            header::CONTENT_DISPOSITION,
            format!("attachment; filename=\"{name}\""),
        )
        .body(Body::from(csv))
        .expect("valid response"))
}

async fn audit(
    State(state): State<Arc<AdminState>>,
    Query(query): Query<HashMap<String, String>>,
) -> Answer {
    let number = |name: &'static str| -> Result<Option<i64>, ApiError> {
        query
            .get(name)
            .map(|v| {
                v.parse::<i64>().map_err(|_| {
                    ApiError::bad_request(format!("`{name}` must be an integer")).with_param(name)
                })
            })
            .transpose()
    };
    let limit = number("limit")?.unwrap_or(100).clamp(1, 1000);
    let entries = state
        .store
        .audit_log(limit, number("before")?)
        .await
        .map_err(|e| {
            tracing::error!("reading the audit log failed: {e:#}");
            ApiError::new(
                500,
                "server_error",
                "internal_error",
                "Reading the audit log failed.",
            )
        })?;
    Ok(json_response(
        StatusCode::OK,
        serde_json::json!({ "data": entries }),
    ))
}
