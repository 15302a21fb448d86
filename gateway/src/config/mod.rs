//! The policy: loaded from a YAML file, checked completely, and turned into the runtime form the
//! proxy reads ([`Policy`]). Every problem is reported with its line and column, all at once.

mod diff;
mod file;
pub use diff::diff;
mod positions;
pub mod schema;

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::de::DeserializeOwned;
use tollgate_billing::price::Price;
use tollgate_billing::tokens::Tokenizer;

use file::{BackendKind, BackendSection, BudgetSection, ModelSection, PriceSection, TenantSection};
pub use file::{BudgetMode, OnExhausted, OnRedisDown, PolicyFile};
use positions::PositionIndex;
use tollgate_billing::budget::{Period, Tz};

/// One problem in a policy file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub line: Option<usize>,
    pub col: Option<usize>,
    /// Dotted path of the offending value, e.g. `models[1].targets[0].backend`.
    pub path: String,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if let (Some(line), Some(col)) = (self.line, self.col) {
            write!(f, "{line}:{col}: ")?;
        }
        if !self.path.is_empty() {
            write!(f, "{}: ", self.path)?;
        }
        f.write_str(&self.message)
    }
}

/// All problems found in one file.
#[derive(Debug)]
pub struct ConfigErrors {
    pub file: PathBuf,
    pub errors: Vec<ConfigError>,
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.errors.len();
        writeln!(
            f,
            "{}: {n} error{}",
            self.file.display(),
            if n == 1 { "" } else { "s" }
        )?;
        for error in &self.errors {
            writeln!(f, "{}:{error}", self.file.display())?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}

/// The validated policy the gateway runs with.
#[derive(Debug)]
pub struct Policy {
    pub listen: Vec<SocketAddr>,
    /// HTTPS on every data-plane address (read at start; the certificate itself at each reload).
    pub tls: Option<Arc<crate::tls::TlsCert>>,
    pub database_url: String,
    pub redis_url: Option<String>,
    pub redis_timeout: Duration,
    pub reservation_ttl: Duration,
    pub max_body_bytes: usize,
    /// Request fields passed through besides those the gateway knows.
    pub passthrough_parameters: HashSet<String>,
    pub key_refresh: Duration,
    pub threads: Option<usize>,
    pub ledger_flush_interval: Duration,
    pub ledger_max_batch: usize,
    pub ledger_spool_path: PathBuf,
    pub ledger_journal_dir: PathBuf,
    pub ledger_journal_max_bytes: u64,
    pub ledger_on_journal_full: tollgate_billing::ledger::OnFull,
    pub ledger_retention_months: Option<u32>,
    /// Where the admin API listens (`None`: disabled) and where its token comes from.
    pub admin_listen: Option<SocketAddr>,
    pub admin_token_env: String,
    /// HTTPS for the admin API and dashboard.
    pub admin_tls: Option<Arc<crate::tls::TlsCert>>,
    /// Days of audit log kept (`None`: all); read again after every reload.
    pub admin_audit_retention_days: Option<u32>,
    /// After a shutdown signal: how long in-flight requests get before streams are cut.
    pub drain: Duration,
    pub shutdown_timeout: Duration,
    pub backends: Vec<Arc<Backend>>,
    /// Public model name -> model, in file order for `/v1/models`.
    pub models: Vec<Arc<Model>>,
    pub tenants: HashMap<String, Tenant>,
    /// Complexity routes by public name.
    pub routes: Vec<Arc<Route>>,
    /// Non-fatal findings (e.g. a provider key variable that is not set).
    pub warnings: Vec<String>,
}

/// An OpenAI-compatible upstream. Its `Debug` never shows the key.
pub struct Backend {
    pub name: String,
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// Path prefix of the base URL without a trailing slash, e.g. `/v1`.
    pub base_path: String,
    pub api_key: Option<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    /// A `kind: local` backend: what `serve` starts, and where it listens once started.
    pub local: Option<LocalBackend>,
}

#[derive(Debug)]
pub struct LocalBackend {
    pub options: tollgate_runtime::RuntimeOptions,
    /// Fixed address for the runtime; `None`: a free loopback port.
    pub listen: Option<std::net::SocketAddr>,
    /// The token an operator chose (`token_env`); `None`: `serve` makes a random one.
    pub token: Option<tollgate_runtime::Token>,
    /// Where the running runtime listens and the token it requires, once `serve` started it.
    pub addr: std::sync::OnceLock<std::net::SocketAddr>,
    pub secret: std::sync::OnceLock<tollgate_runtime::Token>,
}

impl Backend {
    /// The port to connect to: a local runtime's is known only once `serve` started it.
    pub fn port(&self) -> u16 {
        match self.local.as_ref().and_then(|l| l.addr.get()) {
            Some(addr) => addr.port(),
            None => self.port,
        }
    }

    /// The bearer token sent upstream: the provider key, or the local runtime's secret.
    pub fn bearer(&self) -> Option<&str> {
        match &self.local {
            Some(local) => local.secret.get().map(tollgate_runtime::Token::expose),
            None => self.api_key.as_deref(),
        }
    }
}

/// A public name that sends each request to a cheap or a premium model.
#[derive(Debug)]
pub struct Route {
    pub name: String,
    pub cheap: Arc<Model>,
    pub premium: Arc<Model>,
    pub threshold: RouteThreshold,
    /// (start, power) of the budget-aware threshold curve.
    pub budget_pressure: (f32, f32),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum RouteThreshold {
    Fixed(f32),
    /// Calibrated so that this share of recent requests goes premium.
    PremiumShare(f32),
}

#[derive(Debug)]
pub struct Model {
    pub name: String,
    pub tokenizer: Tokenizer,
    pub context_tokens: Option<u64>,
    pub supports_tools: bool,
    pub price: Price,
    pub priced: bool,
    pub targets: Vec<Target>,
    /// Spends hidden reasoning tokens: streams are capped upstream at their reservation.
    pub reasoning: bool,
    /// The request field that caps output upstream (`max_tokens` or `max_completion_tokens`).
    pub max_tokens_field: &'static str,
    pub images: tollgate_billing::tokens::ImageCost,
    /// Prompt tokens reserved per part only the provider can size; `None`: such parts are
    /// refused for tenants with hard budgets.
    pub unsized_part_tokens: Option<u64>,
    /// Prices by `service_tier` (other than the default).
    pub tier_prices: Vec<(String, Price)>,
}

#[derive(Debug, Clone)]
pub struct Target {
    pub backend: Arc<Backend>,
    pub upstream_model: String,
}

#[derive(Debug)]
pub struct Tenant {
    pub name: String,
    /// `None`: every model.
    pub models: Option<HashSet<String>>,
    pub time_zone: Tz,
    pub budgets: Vec<Budget>,
    pub rpm: Option<i64>,
    pub tpm: Option<i64>,
    /// Key id -> (rpm, tpm).
    pub key_limits: HashMap<String, (Option<i64>, Option<i64>)>,
    pub default_output_tokens: u64,
    pub on_exhausted: OnExhausted,
    pub on_redis_down: OnRedisDown,
    pub allow_unpriced: bool,
    pub allow_tier_header: bool,
    pub route_thresholds: HashMap<String, f32>,
    pub alerts: Option<Arc<Alerts>>,
    /// Tags as the JSON object stored on ledger rows; `None` without tags.
    pub tags_json: Option<Arc<str>>,
}

/// Where and when budget alerts go. Its `Debug` shows neither the signing secret nor the
/// webhook URL (hook URLs often carry a token of their own).
pub struct Alerts {
    pub webhook_url: String,
    /// HMAC-SHA256 key; alerts are not sent without it (they must be verifiable).
    pub secret: Option<Vec<u8>>,
    /// Sorted, distinct percentages.
    pub thresholds: Vec<u32>,
}

/// What a `Debug` print shows instead of a secret that is set.
fn hidden<T>(secret: &Option<T>) -> Option<&'static str> {
    secret.as_ref().map(|_| "[redacted]")
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Backend")
            .field("name", &self.name)
            .field("tls", &self.tls)
            .field("host", &self.host)
            .field("port", &self.port)
            .field("base_path", &self.base_path)
            .field("api_key", &hidden(&self.api_key))
            .field("connect_timeout", &self.connect_timeout)
            .field("read_timeout", &self.read_timeout)
            .field("local", &self.local)
            .finish_non_exhaustive()
    }
}

impl std::fmt::Debug for Alerts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Alerts")
            .field("webhook_url", &"[redacted]")
            .field("secret", &hidden(&self.secret))
            .field("thresholds", &self.thresholds)
            .finish()
    }
}

impl Tenant {
    /// Whether any limit applies to this tenant's requests (and so counters must be consulted).
    pub fn has_limits(&self) -> bool {
        !self.budgets.is_empty()
            || self.rpm.is_some()
            || self.tpm.is_some()
            || !self.key_limits.is_empty()
    }

    /// Whether a request's tokens meet a hard limit (a hard budget, or a TPM limit), which a
    /// request of unknown size could overshoot.
    pub fn has_hard_limits(&self) -> bool {
        self.budgets.iter().any(|b| b.hard)
            || self.tpm.is_some()
            || self.key_limits.values().any(|(_, tpm)| tpm.is_some())
    }
}

/// What a budget measures.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    /// Cost in micro-dollars.
    Usd,
    /// Prompt plus output tokens.
    Tokens,
}

impl Metric {
    pub fn name(self) -> &'static str {
        match self {
            Metric::Usd => "usd",
            Metric::Tokens => "tokens",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Budget {
    pub metric: Metric,
    /// Micro-dollars or tokens.
    pub limit: i64,
    pub period: Period,
    pub hard: bool,
    pub key: Option<String>,
    pub model: Option<String>,
}

impl Budget {
    /// Identity of the budget's counter: stable when only its limit changes, so raising a limit
    /// mid-period keeps what was spent.
    pub fn ident(&self) -> String {
        format!(
            "{}.{}.k={}.m={}",
            self.metric.name(),
            self.period.name(),
            self.key.as_deref().unwrap_or("*"),
            self.model.as_deref().unwrap_or("*")
        )
    }
}

impl Policy {
    pub fn route(&self, name: &str) -> Option<&Arc<Route>> {
        self.routes.iter().find(|r| r.name == name)
    }

    pub fn model(&self, name: &str) -> Option<&Arc<Model>> {
        self.models.iter().find(|m| m.name == name)
    }

    /// Whether a tenant may send `model`: a model or route it lists (or any, with no list). A
    /// route it does not list is allowed when both of the route's models are.
    pub fn tenant_may_use(&self, tenant: &str, model: &str) -> bool {
        let Some(t) = self.tenants.get(tenant) else {
            return false;
        };
        let Some(allowed) = &t.models else {
            return true;
        };
        allowed.contains(model)
            || self.route(model).is_some_and(|route| {
                allowed.contains(&route.cheap.name) && allowed.contains(&route.premium.name)
            })
    }

    /// Reads, parses and validates a policy file.
    pub fn load(path: &Path) -> Result<Policy, ConfigErrors> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigErrors {
            file: path.to_path_buf(),
            errors: vec![ConfigError {
                line: None,
                col: None,
                path: String::new(),
                message: e.to_string(),
            }],
        })?;
        Policy::from_yaml(&text).map_err(|errors| ConfigErrors {
            file: path.to_path_buf(),
            errors,
        })
    }

    pub fn from_yaml(text: &str) -> Result<Policy, Vec<ConfigError>> {
        let index = PositionIndex::build(text);
        let mut errors = Errors {
            index: &index,
            list: Vec::new(),
        };
        let file = parse(text, &mut errors);
        let policy = file.and_then(|file| validate(file, &mut errors));
        match policy {
            Some(policy) if errors.list.is_empty() => Ok(policy),
            _ => Err(errors.list),
        }
    }
}

struct Errors<'a> {
    index: &'a PositionIndex,
    list: Vec<ConfigError>,
}

impl Errors<'_> {
    fn add(&mut self, path: impl Into<String>, message: impl Into<String>) {
        let path = path.into();
        let position = self.index.find(&path);
        self.list.push(ConfigError {
            line: position.map(|p| p.line),
            col: position.map(|p| p.col),
            path,
            message: message.into(),
        });
    }
}

/// Deserializes the file. Each entry of the list sections is deserialized on its own so that one
/// bad entry does not hide the errors of the others.
fn parse(text: &str, errors: &mut Errors) -> Option<PolicyFile> {
    let mut value: serde_yaml::Value = match serde_yaml::from_str(text) {
        Ok(serde_yaml::Value::Null) => serde_yaml::Value::Mapping(Default::default()),
        Ok(value) => value,
        Err(e) => {
            let location = e.location();
            errors.list.push(ConfigError {
                line: location.as_ref().map(|l| l.line()),
                col: location.as_ref().map(|l| l.column()),
                path: String::new(),
                message: e.to_string(),
            });
            return None;
        }
    };
    let Some(top) = value.as_mapping_mut() else {
        errors.add("", "the policy file must be a YAML mapping");
        return None;
    };
    let before = errors.list.len();
    let backends = take_section::<BackendSection>(top, "backends", errors);
    let models = take_section::<ModelSection>(top, "models", errors);
    let tenants = take_section::<TenantSection>(top, "tenants", errors);
    let mut file: PolicyFile = deserialize_at("", value, errors)?;
    if errors.list.len() > before {
        return None;
    }
    file.backends = backends?;
    file.models = models?;
    file.tenants = tenants?;
    Some(file)
}

fn take_section<T: DeserializeOwned>(
    top: &mut serde_yaml::Mapping,
    name: &str,
    errors: &mut Errors,
) -> Option<Vec<T>> {
    let Some(section) = top.remove(name) else {
        return Some(Vec::new());
    };
    let items = match section {
        serde_yaml::Value::Null => return Some(Vec::new()),
        serde_yaml::Value::Sequence(items) => items,
        _ => {
            errors.add(name, format!("`{name}` must be a list"));
            return None;
        }
    };
    let mut parsed = Vec::new();
    let mut ok = true;
    for (i, item) in items.into_iter().enumerate() {
        match deserialize_at::<T>(&format!("{name}[{i}]"), item, errors) {
            Some(item) => parsed.push(item),
            None => ok = false,
        }
    }
    ok.then_some(parsed)
}

fn deserialize_at<T: DeserializeOwned>(
    prefix: &str,
    value: serde_yaml::Value,
    errors: &mut Errors,
) -> Option<T> {
    match serde_path_to_error::deserialize::<_, T>(value) {
        Ok(v) => Some(v),
        Err(e) => {
            let mut path = prefix.to_string();
            for segment in e.path().iter() {
                match segment {
                    serde_path_to_error::Segment::Seq { index } => {
                        path.push_str(&format!("[{index}]"))
                    }
                    serde_path_to_error::Segment::Map { key } => {
                        if !path.is_empty() {
                            path.push('.');
                        }
                        path.push_str(key);
                    }
                    _ => {}
                }
            }
            let message = e.into_inner().to_string();
            // serde reports an unknown key at its parent; point at the key itself.
            if let Some(key) = message
                .strip_prefix("unknown field `")
                .and_then(|m| m.split('`').next())
            {
                if !path.ends_with(key) {
                    if !path.is_empty() {
                        path.push('.');
                    }
                    path.push_str(key);
                }
            }
            errors.add(path, message);
            None
        }
    }
}

fn validate(file: PolicyFile, errors: &mut Errors) -> Option<Policy> {
    let mut warnings = Vec::new();
    let mut listen = Vec::new();
    for (i, address) in file.listen.iter().enumerate() {
        match address.parse::<SocketAddr>() {
            Ok(a) => listen.push(a),
            Err(_) => errors.add(
                format!("listen[{i}]"),
                format!("`{address}` is not an IP:port address"),
            ),
        }
    }
    if listen.is_empty() {
        errors.add("listen", "at least one listen address is required");
    }
    let tls = file.tls.as_ref().and_then(|t| load_tls(t, "tls", errors));
    let mut admin_listen = None;
    let mut admin_tls = None;
    if file.admin.enabled {
        admin_tls = file
            .admin
            .tls
            .as_ref()
            .and_then(|t| load_tls(t, "admin.tls", errors));
        match file.admin.listen.parse::<SocketAddr>() {
            Ok(a) if listen.contains(&a) => errors.add(
                "admin.listen",
                "the admin API needs its own address, not a data-plane one",
            ),
            Ok(a) => admin_listen = Some(a),
            Err(_) => errors.add(
                "admin.listen",
                format!("`{}` is not an IP:port address", file.admin.listen),
            ),
        }
    }
    if file.admin.audit_retention_days == Some(0) {
        errors.add(
            "admin.audit_retention_days",
            "must be at least 1 (leave it unset to keep the whole audit log)",
        );
    }
    if file.ledger.retention_months == Some(0) {
        errors.add(
            "ledger.retention_months",
            "must be at least 1 (the current month is always kept)",
        );
    }
    if !(file.database_url.starts_with("sqlite:")
        || file.database_url.starts_with("postgres://")
        || file.database_url.starts_with("postgresql://"))
    {
        errors.add(
            "database_url",
            "must start with sqlite:, postgres:// or postgresql://",
        );
    }
    if let Some(url) = &file.redis_url {
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            errors.add("redis_url", "must start with redis:// or rediss://");
        }
    }
    if file.max_body_bytes == 0 || file.max_body_bytes > 1 << 30 {
        errors.add("max_body_bytes", "must be between 1 and 1073741824");
    }
    if file.ledger.journal_max_bytes < 1 << 20 {
        errors.add(
            "ledger.journal_max_bytes",
            "must be at least 1 MiB (1048576)",
        );
    }
    if file.ledger.journal_dir.trim().is_empty() {
        errors.add("ledger.journal_dir", "must not be empty");
    }
    if file.shutdown.drain_secs.is_some() && file.shutdown.grace_period_secs.is_some() {
        errors.add(
            "shutdown.grace_period_secs",
            "is the old name of `drain_secs`; set only `drain_secs`",
        );
    }
    if file.ledger.max_batch == 0 {
        errors.add("ledger.max_batch", "must be at least 1");
    }

    let mut backends: Vec<Arc<Backend>> = Vec::new();
    for (i, b) in file.backends.iter().enumerate() {
        let at = format!("backends[{i}]");
        if backends.iter().any(|o| o.name == b.name) {
            errors.add(
                format!("{at}.name"),
                format!("duplicate backend name `{}`", b.name),
            );
        }
        if b.connect_timeout_ms == 0 || b.read_timeout_ms == 0 {
            errors.add(at.clone(), "timeouts must be positive");
        }
        let connect_timeout = Duration::from_millis(b.connect_timeout_ms);
        let read_timeout = Duration::from_millis(b.read_timeout_ms);
        if b.kind == BackendKind::Local {
            if let Some(local) = local_backend(b, &at, errors, &mut warnings) {
                backends.push(Arc::new(Backend {
                    name: b.name.clone(),
                    tls: false,
                    host: "127.0.0.1".into(),
                    port: 0,
                    base_path: "/v1".into(),
                    api_key: None,
                    connect_timeout,
                    read_timeout,
                    local: Some(local),
                }));
            }
            continue;
        }
        for (field, set) in [
            ("token_env", b.token_env.is_some()),
            ("model_path", b.model_path.is_some()),
            ("draft_path", b.draft_path.is_some()),
            ("speculate", b.speculate.is_some()),
            ("slots", b.slots.is_some()),
            ("device", b.device.is_some()),
            ("default_temperature", b.default_temperature.is_some()),
            ("default_top_p", b.default_top_p.is_some()),
            ("listen", b.listen.is_some()),
        ] {
            if set {
                errors.add(format!("{at}.{field}"), "only for `kind: local` backends");
            }
        }
        let Some(base_url) = &b.base_url else {
            errors.add(
                format!("{at}.base_url"),
                "required for `kind: openai` backends",
            );
            continue;
        };
        let Some((tls, host, port, base_path)) = parse_base_url(base_url) else {
            errors.add(
                format!("{at}.base_url"),
                format!("`{base_url}` is not an http:// or https:// URL with a host"),
            );
            continue;
        };
        let api_key = match &b.api_key_env {
            Some(var) => match std::env::var(var) {
                Ok(key) if !key.is_empty() => Some(key),
                _ => {
                    warnings.push(format!(
                        "backend `{}`: environment variable {var} is not set",
                        b.name
                    ));
                    None
                }
            },
            None => None,
        };
        backends.push(Arc::new(Backend {
            name: b.name.clone(),
            tls,
            host,
            port,
            base_path,
            api_key,
            connect_timeout,
            read_timeout,
            local: None,
        }));
    }
    if file.backends.is_empty() {
        errors.add("backends", "at least one backend is required");
    }

    let mut models: Vec<Arc<Model>> = Vec::new();
    for (i, m) in file.models.iter().enumerate() {
        let at = format!("models[{i}]");
        if m.name.is_empty() {
            errors.add(format!("{at}.name"), "must not be empty");
        }
        if models.iter().any(|o| o.name == m.name) {
            errors.add(
                format!("{at}.name"),
                format!("duplicate model name `{}`", m.name),
            );
        }
        if m.targets.is_empty() {
            errors.add(format!("{at}.targets"), "at least one target is required");
        }
        let mut targets = Vec::new();
        for (j, t) in m.targets.iter().enumerate() {
            match backends.iter().find(|b| b.name == t.backend) {
                Some(backend) => targets.push(Target {
                    backend: backend.clone(),
                    upstream_model: t.model.clone(),
                }),
                None if file.backends.iter().any(|b| b.name == t.backend) => {} // backend already reported
                None => errors.add(
                    format!("{at}.targets[{j}].backend"),
                    format!("unknown backend `{}`", t.backend),
                ),
            }
        }
        let price = m
            .price
            .as_ref()
            .map(|p| convert_price(p, &format!("{at}.price"), errors));
        let mut tier_prices = Vec::new();
        for (tier, p) in &m.service_tiers {
            let path = format!("{at}.service_tiers.{tier}");
            if matches!(tier.as_str(), "auto" | "default") {
                errors.add(path.clone(), "the default tier's price is `price`");
            }
            tier_prices.push((tier.clone(), convert_price(p, &path, errors)));
        }
        let images = convert_images(m.images.as_ref(), &format!("{at}.images"), errors);
        let completion_field = match (m.max_tokens_field, m.reasoning) {
            (Some(file::MaxTokensField::MaxCompletionTokens), _) | (None, true) => {
                "max_completion_tokens"
            }
            _ => "max_tokens",
        };
        models.push(Arc::new(Model {
            name: m.name.clone(),
            tokenizer: m.tokenizer,
            price: price.unwrap_or_default(),
            priced: price.is_some(),
            context_tokens: m.context_tokens,
            supports_tools: m.supports_tools,
            reasoning: m.reasoning,
            max_tokens_field: completion_field,
            images,
            unsized_part_tokens: m.unsized_part_tokens,
            tier_prices,
            targets,
        }));
    }

    let mut tenants = HashMap::new();
    for (i, t) in file.tenants.iter().enumerate() {
        let at = format!("tenants[{i}]");
        if t.name.is_empty() {
            errors.add(format!("{at}.name"), "must not be empty");
        }
        if tenants.contains_key(&t.name) {
            errors.add(
                format!("{at}.name"),
                format!("duplicate tenant name `{}`", t.name),
            );
        }
        if let Some(allowed) = &t.models {
            for (j, model) in allowed.iter().enumerate() {
                if !file.models.iter().any(|m| &m.name == model)
                    && !file.routes.iter().any(|r| &r.name == model)
                {
                    errors.add(
                        format!("{at}.models[{j}]"),
                        format!("unknown model or route `{model}`"),
                    );
                }
            }
        }
        let models = t.models.as_ref().map(|list| list.iter().cloned().collect());
        let time_zone = t.time_zone.parse::<Tz>().unwrap_or_else(|_| {
            errors.add(
                format!("{at}.time_zone"),
                format!(
                    "unknown time zone `{}` (use an IANA name such as Europe/Paris)",
                    t.time_zone
                ),
            );
            Tz::UTC
        });
        let budgets = t
            .budgets
            .iter()
            .enumerate()
            .filter_map(|(j, b)| {
                convert_budget(b, &format!("{at}.budgets[{j}]"), &file.models, errors)
            })
            .collect();
        let positive = |value: Option<u64>, path: String, errors: &mut Errors| match value {
            Some(0) => {
                errors.add(path, "must be at least 1 (omit it for no limit)");
                None
            }
            other => other.map(|v| v.min(i64::MAX as u64) as i64),
        };
        let rpm = positive(t.rpm, format!("{at}.rpm"), errors);
        let tpm = positive(t.tpm, format!("{at}.tpm"), errors);
        let mut key_limits = HashMap::new();
        for (j, k) in t.key_limits.iter().enumerate() {
            let limits = (
                positive(k.rpm, format!("{at}.key_limits[{j}].rpm"), errors),
                positive(k.tpm, format!("{at}.key_limits[{j}].tpm"), errors),
            );
            if key_limits.insert(k.key.clone(), limits).is_some() {
                errors.add(
                    format!("{at}.key_limits[{j}].key"),
                    format!("duplicate key `{}`", k.key),
                );
            }
        }
        if t.default_output_tokens == 0 {
            errors.add(format!("{at}.default_output_tokens"), "must be at least 1");
        }
        let alerts = t.alerts.as_ref().map(|a| {
            if !(a.webhook_url.starts_with("http://") || a.webhook_url.starts_with("https://")) {
                errors.add(
                    format!("{at}.alerts.webhook_url"),
                    "must be an http:// or https:// URL",
                );
            }
            let mut thresholds = a.thresholds.clone();
            thresholds.sort_unstable();
            thresholds.dedup();
            if thresholds.is_empty() || thresholds.iter().any(|t| !(1..=1000).contains(t)) {
                errors.add(
                    format!("{at}.alerts.thresholds"),
                    "must be percentages between 1 and 1000",
                );
            }
            let secret = std::env::var(&a.secret_env)
                .ok()
                .filter(|s| !s.is_empty())
                .map(String::into_bytes);
            if secret.is_none() {
                warnings.push(format!(
                    "tenant `{}`: {} is not set; budget alerts will not be sent",
                    t.name, a.secret_env
                ));
            }
            Arc::new(Alerts {
                webhook_url: a.webhook_url.clone(),
                secret,
                thresholds,
            })
        });
        let tags_json = (!t.tags.is_empty())
            .then(|| Arc::from(serde_json::to_string(&t.tags).unwrap_or_default()));
        for (route, threshold) in &t.route_thresholds {
            if !file.routes.iter().any(|r| &r.name == route) {
                errors.add(
                    format!("{at}.route_thresholds.{route}"),
                    format!("unknown route `{route}`"),
                );
            }
            if !(0.0..=1.0).contains(threshold) {
                errors.add(
                    format!("{at}.route_thresholds.{route}"),
                    "must be between 0 and 1",
                );
            }
        }
        let tenant = Tenant {
            allow_tier_header: t.allow_tier_header,
            route_thresholds: t
                .route_thresholds
                .iter()
                .map(|(k, v)| (k.clone(), *v))
                .collect(),
            tags_json,
            alerts,
            name: t.name.clone(),
            models,
            time_zone,
            budgets,
            rpm,
            tpm,
            key_limits,
            default_output_tokens: t.default_output_tokens,
            on_exhausted: t.on_exhausted,
            on_redis_down: t.on_redis_down,
            allow_unpriced: t.allow_unpriced,
        };
        tenants.insert(t.name.clone(), tenant);
    }

    let mut routes: Vec<Arc<Route>> = Vec::new();
    for (i, r) in file.routes.iter().enumerate() {
        let at = format!("routes[{i}]");
        if models.iter().any(|m| m.name == r.name) || routes.iter().any(|o| o.name == r.name) {
            errors.add(
                format!("{at}.name"),
                format!("`{}` is already a model or route name", r.name),
            );
        }
        let find = |name: &str, field: &str, errors: &mut Errors| {
            let found = models.iter().find(|m| m.name == name).cloned();
            if found.is_none() {
                errors.add(format!("{at}.{field}"), format!("unknown model `{name}`"));
            }
            found
        };
        let cheap = find(&r.cheap, "cheap", errors);
        let premium = find(&r.premium, "premium", errors);
        let threshold = match (r.threshold, r.target_premium_share) {
            (Some(t), None) if (0.0..=1.0).contains(&t) => RouteThreshold::Fixed(t),
            (None, Some(s)) if (0.0..=1.0).contains(&s) => RouteThreshold::PremiumShare(s),
            _ => {
                errors.add(
                    at.clone(),
                    "set exactly one of `threshold` and `target_premium_share`, between 0 and 1",
                );
                continue;
            }
        };
        let pressure = r.budget_pressure;
        let pressure_ok =
            (0.0..=1.0).contains(&pressure.start) && pressure.power > 0.0 && pressure.power <= 10.0;
        if !pressure_ok {
            errors.add(
                format!("{at}.budget_pressure"),
                "start must be in [0, 1] and power in (0, 10]",
            );
        }
        if let (Some(cheap), Some(premium)) = (cheap, premium) {
            let budget_pressure = (pressure.start, pressure.power);
            routes.push(Arc::new(Route {
                name: r.name.clone(),
                cheap,
                premium,
                threshold,
                budget_pressure,
            }));
        }
    }

    if file.ledger.retention_months.is_some() {
        // Counters are rebuilt from the ledger; a lifetime budget would forget dropped months.
        for tenant in tenants.values() {
            if tenant.budgets.iter().any(|b| b.period == Period::Total) {
                errors.add(
                    "ledger.retention_months",
                    format!(
                        "tenant `{}` has a `total` budget, which is rebuilt from the whole ledger; \
                         retention would forget what it spent",
                        tenant.name
                    ),
                );
            }
        }
    }

    Some(Policy {
        routes,
        listen,
        tls,
        database_url: file.database_url,
        redis_url: file.redis_url,
        redis_timeout: Duration::from_millis(file.redis_timeout_ms.max(1)),
        reservation_ttl: Duration::from_secs(file.reservation_ttl_secs.max(1)),
        max_body_bytes: file.max_body_bytes as usize,
        passthrough_parameters: file.passthrough_parameters.iter().cloned().collect(),
        key_refresh: Duration::from_millis(file.key_refresh_ms.max(50)),
        threads: file.threads,
        ledger_flush_interval: Duration::from_millis(file.ledger.flush_interval_ms.max(1)),
        ledger_max_batch: file.ledger.max_batch,
        ledger_spool_path: PathBuf::from(file.ledger.spool_path),
        ledger_journal_dir: PathBuf::from(file.ledger.journal_dir),
        ledger_journal_max_bytes: file.ledger.journal_max_bytes,
        ledger_on_journal_full: match file.ledger.on_journal_full {
            file::OnJournalFull::FailClosed => tollgate_billing::ledger::OnFull::FailClosed,
            file::OnJournalFull::FailOpen => tollgate_billing::ledger::OnFull::FailOpen,
        },
        ledger_retention_months: file.ledger.retention_months,
        admin_listen,
        admin_token_env: file.admin.token_env,
        admin_tls,
        admin_audit_retention_days: file.admin.audit_retention_days,
        drain: Duration::from_secs(
            file.shutdown
                .drain_secs
                .or(file.shutdown.grace_period_secs)
                .unwrap_or_else(file::default_drain_secs),
        ),
        shutdown_timeout: Duration::from_secs(file.shutdown.timeout_secs),
        backends,
        models,
        tenants,
        warnings,
    })
}

fn convert_budget(
    b: &BudgetSection,
    at: &str,
    models: &[ModelSection],
    errors: &mut Errors,
) -> Option<Budget> {
    let (metric, limit) = match (b.limit_usd, b.limit_tokens) {
        (Some(usd), None) => match Price::usd_per_million_to_micros(usd) {
            // The conversion helper scales by 1e6: USD -> micro-dollars.
            Some(micros) => (Metric::Usd, micros.min(i64::MAX as u64) as i64),
            None => {
                errors.add(
                    format!("{at}.limit_usd"),
                    "must be a non-negative amount of USD",
                );
                return None;
            }
        },
        (None, Some(tokens)) => (Metric::Tokens, tokens.min(i64::MAX as u64) as i64),
        _ => {
            errors.add(at, "set exactly one of `limit_usd` and `limit_tokens`");
            return None;
        }
    };
    if b.period == Period::Minute {
        errors.add(
            format!("{at}.period"),
            "budgets are daily, weekly, monthly or total; use `rpm`/`tpm` for per-minute limits",
        );
        return None;
    }
    if let Some(model) = &b.model {
        if !models.iter().any(|m| &m.name == model) {
            errors.add(format!("{at}.model"), format!("unknown model `{model}`"));
        }
    }
    Some(Budget {
        metric,
        limit,
        period: b.period,
        hard: b.mode == BudgetMode::Hard,
        key: b.key.clone(),
        model: b.model.clone(),
    })
}

fn convert_price(p: &PriceSection, at: &str, errors: &mut Errors) -> Price {
    let mut field = |name: &str, usd: f64| {
        Price::usd_per_million_to_micros(usd).unwrap_or_else(|| {
            errors.add(
                format!("{at}.{name}"),
                "must be a non-negative number of USD per 1M tokens",
            );
            0
        })
    };
    let input = field("input", p.input);
    let cached_input = p
        .cached_input
        .map(|c| field("cached_input", c))
        .unwrap_or(input);
    let output = field("output", p.output);
    let audio_input = p.audio_input.map(|a| field("audio_input", a));
    let audio_output = p.audio_output.map(|a| field("audio_output", a));
    // USD per 1,000 calls is micro-dollars per call times 1,000: the same conversion, scaled.
    let web_search_call = p.web_search_calls.map(|usd| {
        Price::usd_per_million_to_micros(usd / 1000.0).unwrap_or_else(|| {
            errors.add(
                format!("{at}.web_search_calls"),
                "must be a non-negative number of USD per 1,000 calls",
            );
            0
        })
    });
    Price {
        input,
        cached_input,
        output,
        audio_input,
        audio_output,
        web_search_call,
    }
}

/// How a model's images cost prompt tokens, from its `images:` section.
fn convert_images(
    section: Option<&file::ImageSection>,
    at: &str,
    errors: &mut Errors,
) -> tollgate_billing::tokens::ImageCost {
    use tollgate_billing::tokens::ImageCost;
    let Some(s) = section else {
        return ImageCost::default();
    };
    match (s.base_tokens, s.tile_tokens, s.patch_multiplier) {
        (Some(base), Some(tile), None) if s.max_patches.is_none() => {
            ImageCost::Tiles { base, tile }
        }
        (None, None, Some(multiplier)) if multiplier.is_finite() && multiplier > 0.0 => {
            ImageCost::Patches {
                max_patches: s.max_patches.unwrap_or(1536).max(1),
                multiplier,
            }
        }
        _ => {
            errors.add(
                at,
                "set `base_tokens` and `tile_tokens`, or `patch_multiplier` (and optionally `max_patches`)",
            );
            ImageCost::default()
        }
    }
}

/// Reads a `tls:` section's certificate and key; problems are reported at `{at}.cert` or
/// `{at}.key`.
fn load_tls(
    section: &file::TlsSection,
    at: &str,
    errors: &mut Errors,
) -> Option<Arc<crate::tls::TlsCert>> {
    match crate::tls::load(&section.cert, &section.key) {
        Ok(cert) => Some(Arc::new(cert)),
        Err(e) => {
            errors.add(format!("{at}.{}", e.field), e.message);
            None
        }
    }
}

/// Splits `https://host:port/prefix` into its parts.
fn parse_base_url(url: &str) -> Option<(bool, String, u16, String)> {
    let uri: http::Uri = url.parse().ok()?;
    let tls = match uri.scheme_str()? {
        "https" => true,
        "http" => false,
        _ => return None,
    };
    let host = uri
        .host()?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    if host.is_empty() {
        return None;
    }
    let port = uri.port_u16().unwrap_or(if tls { 443 } else { 80 });
    let base_path = uri.path().trim_end_matches('/').to_string();
    Some((tls, host, port, base_path))
}

#[cfg(test)]
mod tests;

/// Validates a `kind: local` backend into what the runtime needs.
fn local_backend(
    b: &BackendSection,
    at: &str,
    errors: &mut Errors,
    warnings: &mut Vec<String>,
) -> Option<LocalBackend> {
    if b.base_url.is_some() {
        errors.add(
            format!("{at}.base_url"),
            "a `kind: local` backend listens where `serve` starts it; remove base_url",
        );
    }
    if b.api_key_env.is_some() {
        errors.add(
            format!("{at}.api_key_env"),
            "a `kind: local` backend takes no key",
        );
    }
    let Some(model) = &b.model_path else {
        errors.add(
            format!("{at}.model_path"),
            "required for `kind: local` backends",
        );
        return None;
    };
    let mut options = tollgate_runtime::RuntimeOptions::new(model.clone());
    options.draft = b.draft_path.clone();
    if let Some(mode) = &b.speculate {
        match mode.parse() {
            Ok(m) => options.speculate = m,
            Err(e) => errors.add(format!("{at}.speculate"), e),
        }
    }
    if options.speculate == tollgate_runtime::speculative::SpeculationMode::Draft
        && options.draft.is_none()
    {
        errors.add(
            format!("{at}.draft_path"),
            "required with `speculate: draft`",
        );
    }
    if let Some(slots) = b.slots {
        if slots == 0 || slots > 256 {
            errors.add(format!("{at}.slots"), "must be between 1 and 256");
        }
        options.slots = slots;
    }
    if let Some(device) = &b.device {
        if !(device == "cpu"
            || device == "cuda"
            || device
                .strip_prefix("cuda:")
                .is_some_and(|n| n.parse::<usize>().is_ok()))
        {
            errors.add(format!("{at}.device"), "must be `cpu`, `cuda` or `cuda:N`");
        }
        options.device = device.clone();
    }
    if let Some(t) = b.default_temperature {
        if !(0.0..=2.0).contains(&t) {
            errors.add(
                format!("{at}.default_temperature"),
                "must be between 0 and 2",
            );
        }
        options.default_temperature = t;
    }
    if let Some(p) = b.default_top_p {
        if !(p > 0.0 && p <= 1.0) {
            errors.add(format!("{at}.default_top_p"), "must be in (0, 1]");
        }
        options.default_top_p = p;
    }
    options.name = Some("default".into());
    // Off loopback, anyone who can reach the port could use the runtime unmetered: only with
    // a token the operator chose (a generated one would lock out whatever it is opened for).
    if let Some(listen) = b.listen {
        if b.token_env.is_none() && tollgate_runtime::check_listen(listen, None).is_err() {
            errors.add(
                format!("{at}.listen"),
                format!(
                    "{listen} is not a loopback address: set `token_env` to the variable holding \
                     the bearer token the runtime will require, or listen on 127.0.0.1"
                ),
            );
        }
    }
    let token = b.token_env.as_ref().and_then(|var| {
        let token = tollgate_runtime::Token::from_env(var);
        if token.is_none() {
            warnings.push(format!(
                "backend `{}`: environment variable {var} is not set (its runtime gets a \
                 random token, or refuses to start off loopback)",
                b.name
            ));
        }
        token
    });
    Some(LocalBackend {
        options,
        listen: b.listen,
        token,
        addr: std::sync::OnceLock::new(),
        secret: std::sync::OnceLock::new(),
    })
}
