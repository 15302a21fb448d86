//! The policy file as written by users: serde types, one per YAML section.
//! Unknown keys are errors everywhere (`deny_unknown_fields`), so a typo never passes silently.

use serde::Deserialize;
use tollgate_billing::budget::Period;
use tollgate_billing::tokens::Tokenizer;

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PolicyFile {
    /// Data-plane listen addresses.
    #[serde(default = "default_listen")]
    pub listen: Vec<String>,
    /// Serve the data plane over HTTPS (TLS 1.2 and 1.3) on every `listen` address.
    #[serde(default)]
    pub tls: Option<TlsSection>,
    /// `sqlite://FILE` (embedded default) or `postgres://...`.
    #[serde(default = "default_database_url")]
    pub database_url: String,
    /// Shared counters for budgets and rate limits across replicas (used by budgets).
    #[serde(default)]
    pub redis_url: Option<String>,
    /// Request fields passed to providers besides those the gateway knows. A field that may
    /// change what a request costs must not be listed; unknown fields are refused otherwise.
    #[serde(default)]
    pub passthrough_parameters: Vec<String>,
    /// Largest request body accepted and proxied intact, in bytes.
    #[serde(default = "default_max_body_bytes")]
    pub max_body_bytes: u64,
    /// How often the key cache picks up keys created or revoked elsewhere.
    #[serde(default = "default_key_refresh_ms")]
    pub key_refresh_ms: u64,
    /// How long a budget reservation lives without being settled (a gateway that died).
    #[serde(default = "default_reservation_ttl_secs")]
    pub reservation_ttl_secs: u64,
    /// Longest wait for Redis before the tenant's `on_redis_down` policy applies.
    #[serde(default = "default_redis_timeout_ms")]
    pub redis_timeout_ms: u64,
    /// Worker threads for the data plane (default: one per core).
    #[serde(default)]
    pub threads: Option<usize>,
    #[serde(default)]
    pub ledger: LedgerSection,
    #[serde(default)]
    pub shutdown: ShutdownSection,
    /// The admin API and dashboard, on their own port (never the data plane's).
    #[serde(default)]
    pub admin: AdminSection,
    #[serde(default)]
    pub backends: Vec<BackendSection>,
    #[serde(default)]
    pub models: Vec<ModelSection>,
    #[serde(default)]
    pub tenants: Vec<TenantSection>,
    /// Public names that pick a cheap or premium model per request by complexity.
    #[serde(default)]
    pub routes: Vec<RouteSection>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RouteSection {
    /// Public name clients send as `model`, e.g. `auto`.
    pub name: String,
    /// Model names from `models`.
    pub cheap: String,
    pub premium: String,
    /// Score at or above which a request goes premium.
    #[serde(default)]
    pub threshold: Option<f32>,
    /// Instead of a threshold: the share of recent requests to send premium; the threshold is
    /// calibrated continuously from the recent score distribution.
    #[serde(default)]
    pub target_premium_share: Option<f32>,
    /// As a tenant's tightest USD budget passes `start` (a fraction used), the threshold rises
    /// towards 1 (everything cheap) along `(used - start) / (1 - start)` to the power `power`.
    #[serde(default)]
    pub budget_pressure: BudgetPressureSection,
}

#[derive(Debug, Clone, Copy, Deserialize, serde::Serialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetPressureSection {
    #[serde(default = "default_pressure_start")]
    pub start: f32,
    #[serde(default = "default_pressure_power")]
    pub power: f32,
}

impl Default for BudgetPressureSection {
    fn default() -> Self {
        BudgetPressureSection {
            start: default_pressure_start(),
            power: default_pressure_power(),
        }
    }
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct LedgerSection {
    #[serde(default = "default_flush_interval_ms")]
    pub flush_interval_ms: u64,
    #[serde(default = "default_max_batch")]
    pub max_batch: usize,
    /// Deprecated: the spool file of versions before the journal. If it exists at start, its
    /// rows are adopted into the journal and replayed.
    #[serde(default = "default_spool_path")]
    pub spool_path: String,
    /// Directory of the local ledger journal: every row is appended and fsynced here (group
    /// commits, at most `flush_interval_ms` after the response ends) before it goes to the
    /// database, and removed once the database has it. One directory per running process.
    #[serde(default = "default_journal_dir")]
    pub journal_dir: String,
    /// Most bytes the journal may hold while the database is away (default 256 MiB).
    #[serde(default = "default_journal_max_bytes")]
    pub journal_max_bytes: u64,
    /// When the journal is full: `fail_closed` (default; new requests get 503
    /// `ledger_unavailable`, nothing is served unbilled) or `fail_open` (serve; rows that do
    /// not fit are dropped, logged and counted).
    #[serde(default)]
    pub on_journal_full: OnJournalFull,
    /// Postgres: keep this many whole months of raw ledger rows before the current one; older
    /// monthly partitions are dropped (rollups are kept). Unset: keep everything.
    #[serde(default)]
    pub retention_months: Option<u32>,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnJournalFull {
    #[default]
    FailClosed,
    FailOpen,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdminSection {
    /// Serve the admin API and dashboard.
    #[serde(default = "default_true")]
    pub enabled: bool,
    #[serde(default = "default_admin_listen")]
    pub listen: String,
    /// Environment variable holding the admin bearer token. When it is unset, `serve` makes a
    /// random token and prints it once.
    #[serde(default = "default_admin_token_env")]
    pub token_env: String,
    /// Days the audit log keeps its entries; older ones are deleted in the background (hourly).
    /// Unset: keep everything.
    #[serde(default)]
    pub audit_retention_days: Option<u32>,
    /// Serve the admin API and dashboard over HTTPS.
    #[serde(default)]
    pub tls: Option<TlsSection>,
}

impl Default for AdminSection {
    fn default() -> Self {
        AdminSection {
            enabled: true,
            listen: default_admin_listen(),
            token_env: default_admin_token_env(),
            audit_retention_days: None,
            tls: None,
        }
    }
}

/// A certificate and its private key, PEM files (relative paths from the working directory).
/// Read when the policy is loaded; a reload (file change or SIGHUP) reads them again, so a
/// renewed certificate is served without a restart.
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TlsSection {
    /// The certificate chain, leaf first.
    pub cert: std::path::PathBuf,
    /// The private key (PKCS#8, PKCS#1 or SEC1).
    pub key: std::path::PathBuf,
}

fn default_admin_listen() -> String {
    "127.0.0.1:9090".into()
}
fn default_admin_token_env() -> String {
    "TOLLGATE_ADMIN_TOKEN".into()
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ShutdownSection {
    /// After SIGTERM/SIGINT (the listener closes at once): seconds in-flight requests get to
    /// finish. Streams still running then are ended with an error event and `[DONE]` and
    /// billed for what the client received.
    #[serde(default)]
    pub drain_secs: Option<u64>,
    /// Deprecated name of `drain_secs`.
    #[serde(default)]
    pub grace_period_secs: Option<u64>,
    /// Then: seconds the cut requests get to end and the ledger to reach the database (rows
    /// it cannot write in time stay in the journal for the next start).
    #[serde(default = "default_shutdown_timeout_secs")]
    pub timeout_secs: u64,
}

#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    #[default]
    Openai,
    Local,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BackendSection {
    pub name: String,
    /// `openai`: an OpenAI-compatible HTTP API (the default). `local`: Tollgate's bundled
    /// runtime serving a GGUF file, started by `tollgate serve` on a loopback port.
    #[serde(default)]
    pub kind: BackendKind,
    /// OpenAI-compatible base URL, e.g. `https://api.openai.com/v1` (not for `local`).
    #[serde(default)]
    pub base_url: Option<String>,
    /// `local`: the GGUF model file (relative paths from the working directory).
    #[serde(default)]
    pub model_path: Option<std::path::PathBuf>,
    /// `local`: a smaller GGUF model with the same vocabulary, for `speculate: draft`.
    #[serde(default)]
    pub draft_path: Option<std::path::PathBuf>,
    /// `local`: `ngram` (default), `draft` or `off`.
    #[serde(default)]
    pub speculate: Option<String>,
    /// `local`: requests generated at once (default 4); more wait in arrival order.
    #[serde(default)]
    pub slots: Option<usize>,
    /// `local`: `cpu` (default) or `cuda` / `cuda:N` (a build with the runtime's `cuda` feature).
    #[serde(default)]
    pub device: Option<String>,
    /// `local`: where the runtime listens (default: a free loopback port), e.g. to scrape its
    /// `/metrics`. An address other than loopback needs `token_env`.
    #[serde(default)]
    pub listen: Option<std::net::SocketAddr>,
    /// `local`: environment variable holding the bearer token the runtime requires of every
    /// request (e.g. for a metrics scraper). Unset: a random secret made at each start, known
    /// only to this gateway, so nothing else can use the runtime unmetered.
    #[serde(default)]
    pub token_env: Option<String>,
    /// `local`: sampling for requests that set none (default: OpenAI's 1.0 and 1.0).
    #[serde(default)]
    pub default_temperature: Option<f32>,
    #[serde(default)]
    pub default_top_p: Option<f32>,
    /// Name of the environment variable that holds the provider key (none for open backends).
    #[serde(default)]
    pub api_key_env: Option<String>,
    #[serde(default = "default_connect_timeout_ms")]
    pub connect_timeout_ms: u64,
    /// Longest wait for the response header and between two body reads.
    #[serde(default = "default_read_timeout_ms")]
    pub read_timeout_ms: u64,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ModelSection {
    /// Public name clients send as `model`.
    pub name: String,
    /// Counts prompt tokens before the request is sent (budget holds); billing uses the
    /// provider's usage report when there is one.
    #[serde(default = "default_tokenizer")]
    #[schemars(with = "TokenizerName")]
    pub tokenizer: Tokenizer,
    /// USD per 1M tokens.
    #[serde(default)]
    pub price: Option<PriceSection>,
    /// Tried in order: the first is primary, the rest are fallbacks.
    pub targets: Vec<TargetSection>,
    /// Context window in tokens; a routed request that does not fit goes to the premium model.
    #[serde(default)]
    pub context_tokens: Option<u64>,
    /// Whether the model takes `tools`; routed requests with tools skip models that do not.
    #[serde(default = "default_true")]
    pub supports_tools: bool,
    /// The model spends hidden reasoning tokens (billed as output, never streamed as text): its
    /// streams are capped upstream at their reservation, since their visible text does not bound
    /// what they cost. Implies `max_tokens_field: max_completion_tokens` unless that is set.
    #[serde(default)]
    pub reasoning: bool,
    /// The request field that caps output on this model. o-series and GPT-5-style models refuse
    /// `max_tokens`: for them the gateway sends (and renames a client's `max_tokens` to)
    /// `max_completion_tokens`.
    #[serde(default)]
    pub max_tokens_field: Option<MaxTokensField>,
    /// How an image costs prompt tokens (default: GPT-4o's tiles, 85 + 170 per tile).
    #[serde(default)]
    pub images: Option<ImageSection>,
    /// Prompt tokens reserved for each content part whose size is known only to the provider
    /// (audio, files, part types the gateway does not know). Unset: such parts are refused for
    /// tenants with hard budgets.
    #[serde(default)]
    pub unsized_part_tokens: Option<u64>,
    /// Prices under a `service_tier` other than `auto`/`default` (e.g. `flex`, `priority`). A
    /// request asking for a tier not listed here is refused.
    #[serde(default)]
    pub service_tiers: std::collections::BTreeMap<String, PriceSection>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum MaxTokensField {
    MaxTokens,
    MaxCompletionTokens,
}

/// An image's prompt tokens: `base_tokens` + `tile_tokens` per 512-px tile, or
/// `patch_multiplier` x 32-px patches (at most `max_patches`).
#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    #[serde(default)]
    pub base_tokens: Option<u64>,
    #[serde(default)]
    pub tile_tokens: Option<u64>,
    #[serde(default)]
    pub patch_multiplier: Option<f64>,
    #[serde(default)]
    pub max_patches: Option<u64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PriceSection {
    pub input: f64,
    /// Defaults to `input` when the provider has no prompt-cache discount.
    #[serde(default)]
    pub cached_input: Option<f64>,
    pub output: f64,
    /// USD per 1M audio prompt tokens; requests with audio input are refused without it.
    #[serde(default)]
    pub audio_input: Option<f64>,
    /// USD per 1M audio output tokens; requests for audio output are refused without it.
    #[serde(default)]
    pub audio_output: Option<f64>,
    /// USD per 1,000 web search calls; requests with `web_search_options` are refused without it.
    #[serde(default)]
    pub web_search_calls: Option<f64>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TargetSection {
    pub backend: String,
    /// Model name sent upstream.
    pub model: String,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TenantSection {
    pub name: String,
    /// Models this tenant may use; all models when absent.
    #[serde(default)]
    pub models: Option<Vec<String>>,
    /// IANA time zone in which daily, weekly and monthly budgets reset.
    #[serde(default = "default_time_zone")]
    pub time_zone: String,
    #[serde(default)]
    pub budgets: Vec<BudgetSection>,
    /// Requests per minute for the whole tenant.
    #[serde(default)]
    pub rpm: Option<u64>,
    /// Tokens (prompt + output) per minute for the whole tenant.
    #[serde(default)]
    pub tpm: Option<u64>,
    /// Per-key rate limits, by key id.
    #[serde(default)]
    pub key_limits: Vec<KeyLimitSection>,
    /// Output tokens reserved when a request sets no `max_tokens`; non-streamed requests are
    /// sent upstream with this cap so that the reservation bounds them.
    #[serde(default = "default_output_tokens")]
    pub default_output_tokens: u64,
    /// A stream that outgrows its reservation when the budget has no room left: `cut` ends it
    /// with an error event, `finish` lets it complete (the budget may overshoot by that stream).
    #[serde(default)]
    pub on_exhausted: OnExhausted,
    /// When Redis is unreachable: `fail_closed` refuses requests that have limits (503);
    /// `fail_open` enforces them with this replica's own counters.
    #[serde(default)]
    pub on_redis_down: OnRedisDown,
    /// Serve models without a price (billed at zero). Refused by default.
    #[serde(default)]
    pub allow_unpriced: bool,
    /// Free-form labels for chargeback (team, project, cost_center, ...), recorded on every
    /// ledger row.
    #[serde(default)]
    pub tags: std::collections::BTreeMap<String, String>,
    /// Whether this tenant's clients may force a tier with `x-tollgate-tier: cheap|premium`.
    #[serde(default)]
    pub allow_tier_header: bool,
    /// Per-route thresholds for this tenant (route name -> threshold).
    #[serde(default)]
    pub route_thresholds: std::collections::BTreeMap<String, f32>,
    /// Budget threshold alerts, delivered to a webhook.
    #[serde(default)]
    pub alerts: Option<AlertsSection>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AlertsSection {
    pub webhook_url: String,
    /// Environment variable holding the HMAC-SHA256 key that signs each alert body.
    pub secret_env: String,
    /// Percentages of each budget; each is alerted once per budget period.
    #[serde(default = "default_thresholds")]
    pub thresholds: Vec<u32>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct BudgetSection {
    #[serde(default)]
    pub limit_usd: Option<f64>,
    #[serde(default)]
    pub limit_tokens: Option<u64>,
    #[schemars(with = "PeriodName")]
    pub period: Period,
    #[serde(default)]
    pub mode: BudgetMode,
    /// Only requests made with this key id.
    #[serde(default)]
    pub key: Option<String>,
    /// Only requests for this model.
    #[serde(default)]
    pub model: Option<String>,
}

#[derive(Debug, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct KeyLimitSection {
    pub key: String,
    #[serde(default)]
    pub rpm: Option<u64>,
    #[serde(default)]
    pub tpm: Option<u64>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum BudgetMode {
    #[default]
    Hard,
    Soft,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnExhausted {
    #[default]
    Cut,
    Finish,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum OnRedisDown {
    #[default]
    FailClosed,
    FailOpen,
}

impl Default for LedgerSection {
    fn default() -> Self {
        LedgerSection {
            flush_interval_ms: default_flush_interval_ms(),
            max_batch: default_max_batch(),
            spool_path: default_spool_path(),
            journal_dir: default_journal_dir(),
            journal_max_bytes: default_journal_max_bytes(),
            on_journal_full: Default::default(),
            retention_months: None,
        }
    }
}

impl Default for ShutdownSection {
    fn default() -> Self {
        ShutdownSection {
            drain_secs: None,
            grace_period_secs: None,
            timeout_secs: default_shutdown_timeout_secs(),
        }
    }
}

fn default_listen() -> Vec<String> {
    vec!["127.0.0.1:8080".into()]
}
fn default_database_url() -> String {
    "sqlite://tollgate.db".into()
}
fn default_max_body_bytes() -> u64 {
    16 * 1024 * 1024
}
fn default_key_refresh_ms() -> u64 {
    1000
}
fn default_flush_interval_ms() -> u64 {
    200
}
fn default_max_batch() -> usize {
    500
}
fn default_spool_path() -> String {
    "tollgate-ledger-spool.jsonl".into()
}
fn default_journal_dir() -> String {
    "tollgate-journal".into()
}
fn default_journal_max_bytes() -> u64 {
    256 << 20
}
pub fn default_drain_secs() -> u64 {
    30
}
fn default_shutdown_timeout_secs() -> u64 {
    5
}
fn default_connect_timeout_ms() -> u64 {
    5_000
}
fn default_read_timeout_ms() -> u64 {
    120_000
}
fn default_tokenizer() -> Tokenizer {
    Tokenizer::O200kBase
}
fn default_reservation_ttl_secs() -> u64 {
    900
}
fn default_redis_timeout_ms() -> u64 {
    250
}
fn default_time_zone() -> String {
    "UTC".into()
}
fn default_output_tokens() -> u64 {
    4096
}
fn default_thresholds() -> Vec<u32> {
    vec![50, 80, 100]
}
fn default_true() -> bool {
    true
}
fn default_pressure_start() -> f32 {
    0.8
}
fn default_pressure_power() -> f32 {
    1.0
}

/// Schema stand-in for `tollgate_billing::tokens::Tokenizer` (same serde names).
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum TokenizerName {
    O200kBase,
    Cl100kBase,
}

/// Schema stand-in for `tollgate_billing::budget::window::Period` (same serde names).
#[derive(schemars::JsonSchema)]
#[serde(rename_all = "snake_case")]
#[allow(dead_code)]
enum PeriodName {
    Minute,
    Daily,
    Weekly,
    Monthly,
    Total,
}
