//! The data plane: a Pingora service that answers every request itself in `request_filter`.
//!
//! A request's walk: authenticate from the key cache -> read the body (bounded) -> validate and
//! count prompt tokens -> try the model's targets in order until one answers (fallback on
//! connect failure, timeout, 429 or 5xx, never once a byte has reached the client) -> relay the
//! answer (SSE event by event) -> meter -> queue one ledger row. The database is never touched
//! here: keys come from [`KeyCache`], rows go to the background [`LedgerSender`].

pub mod error;
mod meter;
mod redact;
pub mod request;
pub mod sse;
mod upstream;
pub mod usage;

use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bytes::{Bytes, BytesMut};
use pingora::http::ResponseHeader;
use pingora::proxy::{ProxyHttp, Session};
use pingora::upstreams::peer::HttpPeer;
use pingora::ErrorType;
use serde_json::{json, Value};
use tollgate_billing::ledger::LedgerSender;
use tollgate_billing::price::{Price, Usage};
use tollgate_billing::tokens::Tokenizer;

use crate::config::{Model, OnExhausted, Policy, Tenant};
use crate::keys::{KeyCache, KeyInfo};
use crate::limits::{Admission, Extension, Limits};
use crate::routing::{RouteInput, Routing};
use error::ApiError;
use meter::{Meter, RouteNote};
use request::{ClientRequest, Endpoint};
use sse::SseRelay;
use tollgate_router::policy::Tier;
use upstream::{AttemptError, Exchange, Upstreams};

/// Largest non-streamed upstream response accepted (embedding batches can be large).
const MAX_RESPONSE_BYTES: usize = 256 << 20;
/// How much of a too-large request body is read and discarded so the client sees the 413.
const OVERSIZE_DRAIN_BYTES: usize = 64 << 20;

/// What the data plane shares with the rest of the process.
pub struct AppState {
    /// The policy in force. Each request takes a snapshot when it arrives and keeps it to the
    /// end, so a reload never changes the rules under a request in flight.
    pub policy: Arc<arc_swap::ArcSwap<Policy>>,
    pub keys: Arc<KeyCache>,
    pub ledger: LedgerSender,
    pub limits: Arc<Limits>,
    pub routing: Routing,
    /// In-flight requests and the shutdown's phases.
    pub drain: Arc<crate::shutdown::Drain>,
}

pub struct Gateway {
    state: Arc<AppState>,
    upstreams: Upstreams,
}

impl Gateway {
    pub fn new(state: Arc<AppState>) -> Gateway {
        Gateway {
            state,
            upstreams: Upstreams::new(),
        }
    }
}

#[async_trait]
impl ProxyHttp for Gateway {
    type CTX = ();

    fn new_ctx(&self) {}

    async fn upstream_peer(
        &self,
        _session: &mut Session,
        _ctx: &mut (),
    ) -> pingora::Result<Box<HttpPeer>> {
        // Never reached: request_filter answers every request.
        pingora::Error::e_explain(
            ErrorType::InternalError,
            "the gateway owns its upstream exchanges",
        )
    }

    async fn request_filter(&self, session: &mut Session, _ctx: &mut ()) -> pingora::Result<bool> {
        self.handle(session).await;
        Ok(true)
    }
}

/// A response chosen among the attempts, not yet sent to the client.
enum Chosen<'a> {
    Stream {
        exchange: Box<Exchange<'a>>,
        first: Bytes,
    },
    Whole(Whole),
}

/// A complete upstream answer.
struct Whole {
    status: u16,
    content_type: Option<String>,
    retry_after: Option<String>,
    body: Bytes,
    /// A success's body, parsed once (for its usage and generated text).
    message: Option<Value>,
}

impl Gateway {
    async fn handle(&self, session: &mut Session) {
        let request_id = uuid::Uuid::now_v7().to_string();
        let method = session.req_header().method.as_str().to_string();
        let path = session.req_header().uri.path().to_string();
        match (method.as_str(), path.as_str()) {
            ("GET", "/healthz") => {
                let (status, body) = self.health();
                write_whole(session, status, "application/json", body, &request_id, &[]).await;
            }
            ("GET", "/v1/models") => match self.authenticate(session) {
                Ok(key) => {
                    let body = self.models_for(&key.tenant);
                    write_whole(session, 200, "application/json", body, &request_id, &[]).await;
                }
                Err(error) => send_error(session, &error, &request_id).await,
            },
            (_, "/v1/models") => {
                send_error(
                    session,
                    &ApiError::method_not_allowed(&method, &path),
                    &request_id,
                )
                .await
            }
            _ => match Endpoint::from_path(&path) {
                Some(endpoint) if method == "POST" => {
                    self.proxy(session, endpoint, request_id).await
                }
                Some(_) => {
                    send_error(
                        session,
                        &ApiError::method_not_allowed(&method, &path),
                        &request_id,
                    )
                    .await
                }
                None => send_error(session, &ApiError::not_found(&path), &request_id).await,
            },
        }
    }

    /// `/healthz`: 200 while serving (`ok`, or `degraded` while the database is away and rows
    /// wait in the journal), 503 while draining or refusing requests for want of a ledger.
    fn health(&self) -> (u16, Bytes) {
        let ledger = self.state.ledger.stats().snapshot();
        let (status, word) = if self.state.drain.is_draining() {
            (503, "draining")
        } else if !ledger.accepting {
            (503, "ledger_unavailable")
        } else if !ledger.database_up {
            (200, "degraded")
        } else {
            (200, "ok")
        };
        let body = json!({
            "status": word,
            "ledger": {
                "queued_rows": ledger.queued_rows,
                "journal_rows": ledger.journal_rows,
                "journal_bytes": ledger.journal_bytes,
                "write_lag_ms": ledger.write_lag_ms,
                "dead_letters": ledger.dead_letters,
                "lost_rows": ledger.lost_rows,
                "database": if ledger.database_up { "ok" } else { "unreachable" },
                "accepting": ledger.accepting,
            },
            "in_flight": self.state.drain.in_flight.count(),
        });
        (status, Bytes::from(body.to_string()))
    }

    fn authenticate(&self, session: &Session) -> Result<Arc<KeyInfo>, ApiError> {
        let mut headers = session
            .req_header()
            .headers
            .get_all(http::header::AUTHORIZATION)
            .iter();
        let header = headers.next().ok_or_else(ApiError::missing_key)?;
        if headers.next().is_some() {
            // Which one counts would be a guess, and the proxies in front may guess otherwise.
            return Err(ApiError::invalid_key());
        }
        let value = header.to_str().map_err(|_| ApiError::invalid_key())?.trim();
        let token = match value.split_once(' ') {
            Some((scheme, token)) if scheme.eq_ignore_ascii_case("bearer") => token.trim(),
            // `Bearer ` with nothing after it (the header's trailing space is trimmed).
            None if value.eq_ignore_ascii_case("bearer") => "",
            _ => return Err(ApiError::invalid_key()),
        };
        if token.is_empty() {
            return Err(ApiError::missing_key());
        }
        self.state
            .keys
            .authenticate(token)
            .ok_or_else(ApiError::invalid_key)
    }

    fn models_for(&self, tenant: &str) -> Bytes {
        let policy = self.state.policy.load();
        let names = policy
            .models
            .iter()
            .map(|m| &m.name)
            .chain(policy.routes.iter().map(|r| &r.name));
        let data: Vec<Value> = names
            .filter(|name| policy.tenant_may_use(tenant, name))
            .map(
                |name| json!({"id": name, "object": "model", "created": 0, "owned_by": "tollgate"}),
            )
            .collect();
        Bytes::from(json!({"object": "list", "data": data}).to_string())
    }

    async fn proxy(&self, session: &mut Session, endpoint: Endpoint, request_id: String) {
        let _in_flight = self.state.drain.in_flight.track();
        if self.state.drain.is_draining() {
            // Shutting down: the listener is closed; a request on a kept-alive connection is
            // told to go elsewhere, before anything is read, reserved or billed.
            session.set_keepalive(None);
            return send_error(session, &ApiError::shutting_down(), &request_id).await;
        }
        let key = match self.authenticate(session) {
            Ok(key) => key,
            Err(error) => return send_error(session, &error, &request_id).await,
        };
        if !self.state.ledger.accepting() {
            // The journal has no room for its row: refused before anything is read, reserved
            // or served, and not recorded.
            return send_error(session, &ApiError::ledger_unavailable(), &request_id).await;
        }
        let policy = self.state.policy.load_full();
        let tenant = policy.tenants.get(&key.tenant);
        let mut meter = Meter {
            request_id,
            started: Instant::now(),
            created_ms: chrono::Utc::now().timestamp_millis(),
            tenant: key.tenant.clone(),
            key_id: key.id.clone(),
            endpoint: endpoint.name(),
            model: String::new(),
            stream: false,
            tokenizer: Tokenizer::O200kBase,
            price: Price::default(),
            backend: None,
            upstream_model: None,
            attempts: 0,
            counted_prompt: 0,
            counted_completion: 0,
            provider: None,
            first_byte: None,
            status: 0,
            outcome: "rejected",
            served: false,
            ended: None,
            routing: None,
            tags: tenant.and_then(|t| t.tags_json.clone()),
            time_zone: tenant.map(|t| t.time_zone),
            web_searches: 0,
            unread_output: None,
        };
        let mut admission = None;
        if let Err(error) = self
            .proxy_metered(session, endpoint, policy, &mut meter, &mut admission)
            .await
        {
            meter.status = error.status;
            if error.status >= 500 && error.status != 503 {
                meter.outcome = "upstream_error";
            }
            send_error(session, &error, &meter.request_id).await;
        }
        if let Some(admission) = admission {
            let ended_ms = meter.end();
            let usage = meter.billed_usage();
            self.state
                .limits
                .settle(admission, meter.request_id.clone(), usage, ended_ms);
        }
        self.state.ledger.record(meter.into_row());
    }

    async fn proxy_metered(
        &self,
        session: &mut Session,
        endpoint: Endpoint,
        policy: Arc<Policy>,
        meter: &mut Meter,
        admission: &mut Option<Admission>,
    ) -> Result<(), ApiError> {
        let body = tokio::select! {
            body = read_body(session, policy.max_body_bytes) => body?,
            () = self.state.drain.cut_now() => {
                meter.outcome = "shutdown";
                return Err(ApiError::shutting_down());
            }
        };
        let request = ClientRequest::parse(endpoint, &body)?;
        drop(body);
        meter.model = request.model.clone();
        meter.stream = request.stream;
        let tenant = policy
            .tenants
            .get(&meter.tenant)
            .ok_or_else(ApiError::invalid_key)?;
        if !policy.tenant_may_use(&meter.tenant, &request.model) {
            return Err(ApiError::model_not_found(&request.model));
        }
        if let Some(field) = request.unpriceable_field(&policy.passthrough_parameters) {
            return Err(ApiError::unknown_parameter(&field));
        }
        let output_cap = match endpoint {
            Endpoint::Embeddings => 0,
            _ => request
                .max_output_tokens()
                .unwrap_or(tenant.default_output_tokens),
        };
        // Prompt tokens already counted (while routing), to count them only once per tokenizer.
        let mut counted = None;
        let (model, routed) = match policy.route(&request.model) {
            Some(route) => {
                if endpoint != Endpoint::ChatCompletions {
                    return Err(ApiError::bad_request(format!(
                        "`{}` is a complexity route; routes serve chat completions only.",
                        route.name
                    ))
                    .with_param("model"));
                }
                let tier_header = session
                    .req_header()
                    .headers
                    .get("x-tollgate-tier")
                    .map(|v| String::from_utf8_lossy(v.as_bytes()).into_owned());
                let field = |name: &str| request.field(name);
                let budget_used = self
                    .state
                    .limits
                    .budget_utilization(tenant, &meter.key_id)
                    .await;
                let cheap_prompt = request.count_prompt_tokens(route.cheap.tokenizer) as u64;
                counted = Some((route.cheap.tokenizer, cheap_prompt));
                let input = RouteInput {
                    budget_used,
                    field: &field,
                    tier_header: tier_header.as_deref(),
                    needed_context: cheap_prompt.saturating_add(output_cap),
                };
                let decision = self.state.routing.route(route, Some(tenant), &input)?;
                let model = match decision.tier {
                    Tier::Cheap => route.cheap.clone(),
                    Tier::Premium => route.premium.clone(),
                };
                meter.routing = Some(RouteNote {
                    route: route.name.clone(),
                    tier: decision.tier.as_str(),
                    score: decision.score,
                    reason: decision.reason.clone(),
                    routed_model: model.name.clone(),
                    premium_price: route.premium.price,
                });
                (model, Some(decision))
            }
            None => {
                let model = policy
                    .model(&request.model)
                    .ok_or_else(|| ApiError::model_not_found(&request.model))?;
                (model.clone(), None)
            }
        };
        meter.tokenizer = model.tokenizer;
        let media = request.media(&model.images);
        let text_prompt = match counted {
            Some((tokenizer, tokens)) if tokenizer == model.tokenizer => tokens,
            _ => request.count_prompt_tokens(model.tokenizer) as u64,
        };
        meter.counted_prompt = text_prompt.saturating_add(media.image_tokens);
        if !model.priced && !tenant.allow_unpriced {
            return Err(ApiError::unpriced_model(&model.name));
        }
        let worst = worst_case(
            &request,
            &model,
            tenant,
            &media,
            meter.counted_prompt,
            output_cap,
        )?;
        meter.price = worst.price;
        meter.web_searches = worst.usage.web_searches;
        let granted = self
            .state
            .limits
            .admit(
                tenant,
                &meter.key_id,
                &model.name,
                &meter.request_id,
                worst.usage,
                worst.price,
            )
            .await?;
        // A non-streamed answer cannot be cut, nor can the hidden reasoning of a stream (its
        // visible text is not what it costs): bound them upstream so the reservation holds.
        let inject_cap = (granted.is_limited()
            && endpoint != Endpoint::Embeddings
            && (!request.stream || model.reasoning))
            .then_some(output_cap);
        let mut headers = granted.headers();
        if let Some(decision) = &routed {
            let route = format!(
                "tier={}; model={}; reason={}",
                decision.tier.as_str(),
                model.name,
                decision.reason
            );
            headers.push(("x-tollgate-route", route));
            headers.push(("x-tollgate-score", format!("{:.4}", decision.score)));
        }
        let admission = admission.insert(granted);
        // What a provider that did the work but whose answer is lost may bill for output.
        let unread_output = output_cap.saturating_mul(request.choices());

        let chosen = tokio::select! {
            chosen = self.choose(&request, &model, meter, inject_cap, unread_output) => Some(chosen?),
            () = client_gone(session) => None,
            () = self.state.drain.cut_now() => {
                // Nothing reached the client: it is told to retry and billed nothing.
                meter.outcome = "shutdown";
                return Err(ApiError::shutting_down());
            }
        };
        match chosen {
            None => {
                meter.status = 499;
                meter.outcome = "client_closed";
            }
            Some(Chosen::Whole(mut whole)) => {
                let mut extra = headers;
                extra.extend(whole.retry_after.take().map(|v| ("retry-after", v)));
                self.send_whole(session, whole, meter, &extra).await
            }
            Some(Chosen::Stream { exchange, first }) => {
                let flight = Flight {
                    admission,
                    tenant,
                    headers: &headers,
                    wants_usage: request.wants_usage,
                };
                self.relay_stream(session, exchange, first, flight, meter)
                    .await
            }
        }
        Ok(())
    }

    /// Tries the model's targets in order and returns the first usable response. Nothing has
    /// been sent to the client yet, so any failure here may still fall back.
    async fn choose<'a>(
        &'a self,
        request: &ClientRequest,
        model: &Model,
        meter: &mut Meter,
        inject_cap: Option<u64>,
        unread_output: u64,
    ) -> Result<Chosen<'a>, ApiError> {
        let mut last_error = None;
        for (i, target) in model.targets.iter().enumerate() {
            let has_next = i + 1 < model.targets.len();
            meter.attempts += 1;
            meter.backend = Some(target.backend.name.clone());
            meter.upstream_model = Some(target.upstream_model.clone());
            let body =
                request.upstream_body(&target.upstream_model, inject_cap, model.max_tokens_field);
            let suffix = request.endpoint.upstream_suffix();
            let mut exchange = match self
                .upstreams
                .send(
                    &target.backend,
                    suffix,
                    body,
                    request.stream,
                    &meter.request_id,
                )
                .await
            {
                Ok(exchange) => exchange,
                Err(error) => {
                    tracing::warn!(request_id = %meter.request_id, "upstream attempt failed: {error:?}");
                    last_error = Some(error);
                    continue;
                }
            };
            let status = exchange.status();
            let retryable = status == 429 || status >= 500;
            if retryable && has_next {
                tracing::warn!(request_id = %meter.request_id, backend = exchange.backend_name(), status, "falling back");
                exchange.finish().await;
                continue;
            }
            if request.stream && (200..300).contains(&status) {
                // Wait for the first bytes before committing: a backend that dies now can still be replaced.
                match exchange.read().await {
                    Ok(first) => {
                        return Ok(Chosen::Stream {
                            exchange: Box::new(exchange),
                            first: first.unwrap_or_default(),
                        })
                    }
                    Err(error) => {
                        // The provider took the request and may have started on it: no retry
                        // elsewhere (that pays twice); billed like an unreadable success.
                        tracing::warn!(request_id = %meter.request_id, backend = exchange.backend_name(), "stream broke before its first bytes: {error:?}");
                        exchange.finish().await;
                        meter.unread_output = Some(unread_output);
                        last_error = Some(error);
                        break;
                    }
                }
            }
            let content_type = exchange.header("content-type");
            let retry_after = exchange.header("retry-after");
            let success = (200..300).contains(&status);
            let read = exchange.read_to_end(MAX_RESPONSE_BYTES).await;
            let message = match &read {
                Ok(body) if success => serde_json::from_slice::<Value>(body).ok(),
                _ => None,
            };
            if success && message.is_none() {
                // A success whose body is cut, garbled or unreadable serves the client nothing,
                // but the provider has done the work and bills it: a clear 502, billed at the
                // counted prompt and the most output it may have made. Never retried elsewhere,
                // which would pay for it twice.
                let why = match &read {
                    Ok(_) => "a body that is not valid JSON".to_string(),
                    Err(error) => format!("a body that could not be read ({error:?})"),
                };
                tracing::warn!(request_id = %meter.request_id, backend = exchange.backend_name(), status, "backend answered with {why}");
                let detail = format!(
                    "backend `{}` answered {status} with {why}",
                    exchange.backend_name()
                );
                exchange.finish().await;
                meter.unread_output = Some(unread_output);
                last_error = Some(AttemptError::new(
                    upstream::Failure::Malformed,
                    &target.backend,
                    detail,
                ));
                break;
            }
            match read {
                Ok(body) => {
                    exchange.finish().await;
                    // A provider's error may echo its key (often masked): never passed on.
                    let body = if success {
                        body
                    } else {
                        redact::error_body(body, target.backend.bearer())
                    };
                    return Ok(Chosen::Whole(Whole {
                        status,
                        content_type,
                        retry_after,
                        body,
                        message,
                    }));
                }
                Err(error) => {
                    exchange.finish().await;
                    last_error = Some(error);
                }
            }
        }
        // The tenant hears which backend failed and how, never where it is or what broke.
        Err(match last_error {
            Some(error) => {
                tracing::warn!(request_id = %meter.request_id, "no backend could serve the request: {error}");
                error.to_api_error()
            }
            None => ApiError::bad_gateway("No backend could serve the request."),
        })
    }

    async fn send_whole(
        &self,
        session: &mut Session,
        whole: Whole,
        meter: &mut Meter,
        extra: &[(&str, String)],
    ) {
        let status = whole.status;
        meter.status = status;
        if (200..300).contains(&status) {
            meter.served = true;
            meter.outcome = "ok";
            if let Some(message) = &whole.message {
                meter.provider = usage::provider_usage(message);
                let mut text = String::new();
                usage::append_generated_text(message, &mut text);
                meter.count_completion(&text);
            }
        } else {
            meter.outcome = "upstream_error";
        }
        let content_type = whole
            .content_type
            .unwrap_or_else(|| "application/json".into());
        let request_id = meter.request_id.clone();
        let write = write_whole(
            session,
            status,
            &content_type,
            whole.body,
            &request_id,
            extra,
        );
        tokio::select! {
            biased;
            written = write => if !written {
                meter.outcome = "client_closed";
            },
            // The answer was produced and is billed; a client too slow to take it cannot hold
            // the shutdown.
            () = self.state.drain.cut_now() => meter.outcome = "shutdown",
        }
    }

    /// Relays a stream event by event. Output beyond the reservation is reserved as it comes;
    /// when the budget has no room for it, the stream is cut (or finished, per policy) and the
    /// tenant billed exactly what was delivered.
    async fn relay_stream(
        &self,
        session: &mut Session,
        mut exchange: Box<Exchange<'_>>,
        first: Bytes,
        mut flight: Flight<'_>,
        meter: &mut Meter,
    ) {
        meter.status = 200;
        meter.served = true;
        meter.outcome = "ok";
        let content_type = exchange
            .header("content-type")
            .unwrap_or_else(|| "text/event-stream".into());
        let chunked = session.req_header().version == http::Version::HTTP_11;
        let mut header = response_header(200, &content_type, &meter.request_id);
        let _ = header.insert_header("cache-control", "no-cache");
        if chunked {
            let _ = header.insert_header("transfer-encoding", "chunked");
        }
        for (name, value) in flight.headers {
            let _ = header.insert_header(name.to_string(), value.as_str());
        }
        if session
            .write_response_header(Box::new(header), false)
            .await
            .is_err()
        {
            meter.outcome = "client_closed";
            exchange.finish().await;
            return;
        }
        let mut cut = self.state.drain.cut_signal();
        let mut relay = SseRelay::new(!flight.wants_usage);
        // Generated text up to here reached the client; its tokens as counted chunk by chunk.
        let mut delivered_end = 0;
        let mut delivered_tokens = 0u64;
        let mut chunk = first;
        loop {
            let out = relay.push(&chunk);
            let fresh = &relay.generated_text[delivered_end..];
            if !fresh.is_empty() && flight.admission.is_limited() {
                let tokens = meter.tokenizer.count(fresh) as u64;
                let covered = self
                    .cover_output(&mut flight, meter, delivered_tokens.saturating_add(tokens))
                    .await;
                if covered != Extension::Granted {
                    let (outcome, error) = if covered == Extension::Unavailable {
                        ("limits_cut", limits_cut_event())
                    } else {
                        ("budget_cut", budget_cut_event())
                    };
                    meter.outcome = outcome;
                    end_with_error(session, error, true).await;
                    break;
                }
                delivered_tokens = delivered_tokens.saturating_add(tokens);
            }
            if !out.is_empty() {
                let written = tokio::select! {
                    // The write first: only a write that cannot proceed is cut.
                    biased;
                    written = session.write_response_body(Some(out), false) => written.is_ok(),
                    // A client that stops reading cannot hold the shutdown: billed for what
                    // it had taken before this event.
                    () = cut.wait() => {
                        meter.outcome = "shutdown";
                        break;
                    }
                };
                if !written {
                    meter.outcome = "client_closed";
                    break;
                }
                meter
                    .first_byte
                    .get_or_insert_with(|| meter.started.elapsed());
            }
            delivered_end = relay.generated_text.len();
            let next = tokio::select! {
                next = exchange.read() => next,
                () = cut.wait() => {
                    meter.outcome = "shutdown";
                    end_with_error(session, shutdown_cut_event(), true).await;
                    break;
                }
            };
            match next {
                Ok(Some(_)) if relay.overflowed() => {
                    // An event that never ends would grow without bound: the stream ends here,
                    // billed for what was delivered (the provider stopped making sense).
                    tracing::warn!(request_id = %meter.request_id, "upstream sent an event longer than {} bytes; stream cut", sse::MAX_EVENT_BYTES);
                    meter.outcome = "upstream_closed";
                    let error = stream_error(
                        "upstream_error",
                        "upstream_event_too_large",
                        "The upstream sent an event too large to relay; the response was cut here.",
                    );
                    end_with_error(session, error, false).await;
                    break;
                }
                Ok(Some(next)) => chunk = next,
                Ok(None) => {
                    let tail = relay.finish();
                    let tail = (!tail.is_empty()).then_some(tail);
                    if session.write_response_body(tail, true).await.is_err() {
                        meter.outcome = "client_closed";
                    }
                    delivered_end = relay.generated_text.len();
                    break;
                }
                Err(error) => {
                    tracing::warn!(request_id = %meter.request_id, "upstream stream broke: {error:?}");
                    meter.outcome = "upstream_closed";
                    let error = stream_error(
                        "upstream_error",
                        "upstream_closed",
                        "The upstream connection was lost mid-stream.",
                    );
                    end_with_error(session, error, false).await;
                    break;
                }
            }
        }
        // The provider's usage, whenever it arrived (also for a client gone at the very end):
        // what the provider bills. A stream cut or abandoned before it is billed on what was
        // delivered.
        meter.provider = relay.usage;
        meter.count_completion(&relay.generated_text[..delivered_end]);
        exchange.finish().await;
    }

    /// Makes sure the reservation covers `needed` output tokens, extending it if it must.
    /// `Exhausted` when the budget has no room and the tenant's policy is to cut;
    /// `Unavailable` when the counters are unreachable and the tenant fails closed.
    async fn cover_output(&self, flight: &mut Flight<'_>, meter: &Meter, needed: u64) -> Extension {
        let admission = &mut *flight.admission;
        if needed <= admission.reserved_output {
            return Extension::Granted;
        }
        let missing = needed - admission.reserved_output;
        // Reserve ahead in generous steps, falling back to just what is missing.
        let step = missing.max(admission.reserved_output / 2).max(256);
        for amount in [step, missing] {
            match self
                .state
                .limits
                .extend(admission, &meter.request_id, amount)
                .await
            {
                Extension::Exhausted => continue,
                granted_or_unavailable => return granted_or_unavailable,
            }
        }
        match flight.tenant.on_exhausted {
            OnExhausted::Cut => Extension::Exhausted,
            OnExhausted::Finish => {
                admission.reserved_output = u64::MAX;
                Extension::Granted
            }
        }
    }
}

/// A request's worst case and the price it is billed at.
struct WorstCase {
    usage: Usage,
    price: Price,
}

/// The most a request can cost on `model`: its prompt (text, images, and a ceiling for each
/// part only the provider can size), every completion it makes (`n`/`best_of`) up to the output
/// cap plus a predicted output, audio at audio prices, a web search fee. Features the model's
/// price does not cover are refused, since nothing could bound or bill them.
fn worst_case(
    request: &ClientRequest,
    model: &Model,
    tenant: &Tenant,
    media: &tollgate_billing::tokens::Media,
    prompt: u64,
    output_cap: u64,
) -> Result<WorstCase, ApiError> {
    let priced = model.priced;
    let price = match request.service_tier() {
        Some(tier) if priced => model
            .tier_prices
            .iter()
            .find(|(name, _)| name == tier)
            .map(|(_, price)| *price)
            .ok_or_else(|| {
                let tier: String = tier.chars().take(64).collect();
                ApiError::unpriced_feature(
                    &format!("the `{tier}` service tier"),
                    &model.name,
                    "service_tier",
                )
            })?,
        _ => model.price,
    };
    if priced && media.audio_parts > 0 && price.audio_input.is_none() {
        return Err(ApiError::unpriced_feature(
            "audio input",
            &model.name,
            "messages",
        ));
    }
    let audio_out = request.wants_audio_output();
    if priced && audio_out && price.audio_output.is_none() {
        return Err(ApiError::unpriced_feature(
            "audio output",
            &model.name,
            "modalities",
        ));
    }
    let web_search = request.web_search();
    if priced && web_search && price.web_search_call.is_none() {
        return Err(ApiError::unpriced_feature(
            "web search",
            &model.name,
            "web_search_options",
        ));
    }
    let unsized_parts = media.unsized_parts();
    let per_part = match model.unsized_part_tokens {
        Some(tokens) => tokens,
        None if unsized_parts > 0 && tenant.has_hard_limits() => {
            return Err(ApiError::unsized_content(&model.name))
        }
        None => 0,
    };
    let audio_prompt = media.audio_parts.saturating_mul(per_part);
    let completion = output_cap
        .saturating_add(request.predicted_tokens(model.tokenizer))
        .saturating_mul(request.choices());
    let usage = Usage {
        prompt: prompt.saturating_add(unsized_parts.saturating_mul(per_part)),
        cached: 0,
        completion,
        // Counted at the dearer of the text and audio prices: either may be what is produced.
        audio_prompt: if price.audio_input > Some(price.input) {
            audio_prompt
        } else {
            0
        },
        audio_completion: if audio_out && price.audio_output > Some(price.output) {
            completion
        } else {
            0
        },
        web_searches: u64::from(web_search),
    };
    Ok(WorstCase { usage, price })
}

/// What a streamed request carries besides its meter.
struct Flight<'a> {
    admission: &'a mut Admission,
    tenant: &'a Tenant,
    headers: &'a [(&'static str, String)],
    wants_usage: bool,
}

/// An OpenAI-shaped error for the data of an SSE event that ends a stream.
fn stream_error(kind: &str, code: &str, message: &str) -> Value {
    json!({"error": {"message": message, "type": kind, "param": null, "code": code}})
}

/// Ends a stream with an error event (and `[DONE]` when `done`).
async fn end_with_error(session: &mut Session, error: Value, done: bool) {
    let done = if done { "data: [DONE]\n\n" } else { "" };
    let event = format!("data: {error}\n\n{done}");
    let _ = session
        .write_response_body(Some(Bytes::from(event)), true)
        .await;
}

fn shutdown_cut_event() -> Value {
    stream_error(
        "server_error",
        "shutting_down",
        "The gateway is shutting down; the response was cut here and billed up to this point.",
    )
}

fn limits_cut_event() -> Value {
    stream_error(
        "service_unavailable",
        "limits_unavailable",
        "Budget counters cannot cover more output now (unreachable, or being seeded from the ledger); the response was cut here and billed up to this point.",
    )
}

fn budget_cut_event() -> Value {
    stream_error(
        "budget_exceeded",
        "budget_exceeded",
        "The budget has no room for more output; the response was cut here and billed up to this point.",
    )
}

/// Reads the request body, refusing it past `limit`. An oversized body is still read (up to a
/// bound) and discarded, so that the client is reading when the 413 arrives.
async fn read_body(session: &mut Session, limit: usize) -> Result<Bytes, ApiError> {
    let declared = session
        .req_header()
        .headers
        .get(http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let mut too_large = declared.is_some_and(|len| len > limit as u64);
    let mut body = BytesMut::new();
    let mut seen = 0usize;
    loop {
        match session.read_request_body().await {
            Ok(Some(chunk)) => {
                seen += chunk.len();
                if too_large || seen > limit {
                    too_large = true;
                    body.clear();
                    if seen > limit + OVERSIZE_DRAIN_BYTES {
                        break;
                    }
                } else {
                    body.extend_from_slice(&chunk);
                }
            }
            Ok(None) => break,
            // A body already known to be too large is refused as such, however it ends.
            Err(_) if too_large => break,
            Err(_) => return Err(ApiError::bad_request("The request body could not be read.")),
        }
    }
    if too_large {
        session.set_keepalive(None);
        return Err(ApiError::too_large(limit));
    }
    Ok(body.freeze())
}

/// Resolves when the client closes its connection; pending otherwise.
async fn client_gone(session: &mut Session) {
    let downstream = session.as_downstream_mut();
    downstream.set_abort_on_close(true);
    match downstream.read_body_or_idle(true).await {
        Err(_) => {}
        Ok(_) => std::future::pending::<()>().await,
    }
}

fn response_header(status: u16, content_type: &str, request_id: &str) -> ResponseHeader {
    let mut header = ResponseHeader::build(status, Some(6))
        .unwrap_or_else(|_| ResponseHeader::build(502, None).expect("502 is valid"));
    let _ = header.insert_header("content-type", content_type);
    let _ = header.insert_header("x-request-id", request_id);
    header
}

/// Writes a complete response; false when the client is gone.
async fn write_whole(
    session: &mut Session,
    status: u16,
    content_type: &str,
    body: Bytes,
    request_id: &str,
    extra: &[(&str, String)],
) -> bool {
    let mut header = response_header(status, content_type, request_id);
    let _ = header.insert_header("content-length", body.len().to_string());
    for (name, value) in extra {
        let _ = header.insert_header(name.to_string(), value.as_str());
    }
    session
        .write_response_header(Box::new(header), false)
        .await
        .is_ok()
        && session.write_response_body(Some(body), true).await.is_ok()
}

async fn send_error(session: &mut Session, error: &ApiError, request_id: &str) {
    let extra: Vec<(&str, String)> = error
        .retry_after
        .map(|s| ("retry-after", s.to_string()))
        .into_iter()
        .collect();
    write_whole(
        session,
        error.status,
        "application/json",
        error.body(),
        request_id,
        &extra,
    )
    .await;
}
