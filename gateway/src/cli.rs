//! Subcommands. Each one loads the policy file named by `--config`.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate_billing::store::{Store, UsageTotals};

use crate::config::Policy;
use crate::keys;

#[derive(Parser)]
#[command(
    name = "tollgate",
    version,
    about = "An OpenAI-compatible LLM gateway whose budgets hold."
)]
struct Cli {
    /// Policy file.
    #[arg(
        long,
        global = true,
        default_value = "configs/tollgate.yaml",
        env = "TOLLGATE_CONFIG"
    )]
    config: PathBuf,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the gateway.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Policy file tools.
    Config {
        #[command(subcommand)]
        command: ConfigCommand,
    },
    /// Tenant API keys.
    Keys {
        #[command(subcommand)]
        command: KeysCommand,
    },
    /// Complexity routing tools.
    Router {
        #[command(subcommand)]
        command: RouterCommand,
    },
    /// Totals from the usage ledger.
    Usage {
        #[arg(long)]
        tenant: String,
        /// `YYYY-MM-DD` (UTC midnight) or an RFC 3339 time.
        #[arg(long)]
        since: Option<String>,
    },
}

#[derive(Subcommand)]
enum ConfigCommand {
    /// Validate a policy file and report every error with its line and column.
    Check {
        /// Defaults to --config.
        file: Option<PathBuf>,
    },
    /// Print the policy file's JSON Schema (committed as configs/tollgate.schema.json).
    Schema,
    /// What switching from OLD to NEW would change: backends, prices, routes, access, budgets.
    Diff {
        old: PathBuf,
        new: PathBuf,
        /// One JSON object per change instead of text.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum RouterCommand {
    /// Read OpenAI chat requests as JSON Lines on stdin; write one
    /// `{"score", "tier", "reason"}` line per input, in order.
    Score {
        #[arg(long, default_value = "auto")]
        route: String,
        /// Apply this tenant's route threshold.
        #[arg(long)]
        tenant: Option<String>,
    },
    /// Score the shipped router on preference data (JSON Lines with `request`, `cheap_score`,
    /// `premium_score`): APGR, CPT(50%), CPT(80%) and the cost/quality curve, next to the random
    /// and prompt-length baselines.
    Eval {
        #[arg(long)]
        data: PathBuf,
    },
}

#[derive(Subcommand)]
enum KeysCommand {
    /// Create a key; its secret is printed once and stored only as a hash.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: Option<String>,
    },
    /// Revoke a key by id; running gateways stop accepting it within `key_refresh_ms`.
    Revoke { id: String },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        tenant: Option<String>,
    },
}

pub fn run() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Serve => crate::serve::serve(&cli.config),
        Command::Config {
            command: ConfigCommand::Check { file },
        } => check(file.as_deref().unwrap_or(&cli.config)),
        Command::Config {
            command: ConfigCommand::Diff { old, new, json },
        } => diff(&old, &new, json),
        Command::Config {
            command: ConfigCommand::Schema,
        } => serde_json::to_string_pretty(&crate::config::schema::schema())
            .map(|schema| {
                println!("{schema}");
                ExitCode::SUCCESS
            })
            .map_err(Into::into),
        Command::Router {
            command: RouterCommand::Eval { data },
        } => crate::router_eval::eval(&data),
        Command::Router {
            command: RouterCommand::Score { route, tenant },
        } => crate::router_eval::score(&cli.config, &route, tenant.as_deref()),
        command => block_on(other(&cli.config, command)),
    };
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn block_on<F: std::future::Future<Output = anyhow::Result<ExitCode>>>(
    f: F,
) -> anyhow::Result<ExitCode> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// Loads the policy or prints its errors; `None` means the errors were reported.
pub fn load_policy(path: &Path) -> Option<Policy> {
    match Policy::load(path) {
        Ok(policy) => {
            for warning in &policy.warnings {
                eprintln!("warning: {warning}");
            }
            Some(policy)
        }
        Err(errors) => {
            eprint!("{errors}");
            None
        }
    }
}

fn check(path: &Path) -> anyhow::Result<ExitCode> {
    // The schema first (structure, types, allowed values), then the semantic checks.
    let text = std::fs::read_to_string(path)?;
    let errors = crate::config::schema::check(&text);
    if !errors.is_empty() {
        eprint!(
            "{}",
            crate::config::ConfigErrors {
                file: path.to_path_buf(),
                errors
            }
        );
        return Ok(ExitCode::from(2));
    }
    Ok(match load_policy(path) {
        Some(policy) => {
            println!(
                "{}: ok ({} backends, {} models, {} tenants)",
                path.display(),
                policy.backends.len(),
                policy.models.len(),
                policy.tenants.len()
            );
            ExitCode::SUCCESS
        }
        None => ExitCode::from(2),
    })
}

fn diff(old: &Path, new: &Path, json: bool) -> anyhow::Result<ExitCode> {
    let (Some(a), Some(b)) = (load_policy(old), load_policy(new)) else {
        return Ok(ExitCode::from(2));
    };
    let changes = crate::config::diff(&a, &b);
    for change in &changes {
        if json {
            println!("{}", serde_json::to_string(change)?);
        } else {
            println!("{change}");
        }
    }
    if changes.is_empty() && !json {
        println!("no changes");
    }
    Ok(ExitCode::SUCCESS)
}

async fn other(config: &Path, command: Command) -> anyhow::Result<ExitCode> {
    let Some(policy) = load_policy(config) else {
        return Ok(ExitCode::from(2));
    };
    let store = Store::open(&policy.database_url).await?;
    let code = match command {
        Command::Migrate => {
            println!("migrations applied to {}", redact_url(&policy.database_url));
            ExitCode::SUCCESS
        }
        Command::Keys {
            command: KeysCommand::Create { tenant, name },
        } => {
            if !policy.tenants.contains_key(&tenant) {
                eprintln!("error: tenant `{tenant}` is not in {}", config.display());
                return Ok(ExitCode::from(2));
            }
            let (record, secret) = keys::create_key(&store, &tenant, name.as_deref()).await?;
            eprintln!(
                "created key {} for tenant `{tenant}`; the secret below is shown only once:",
                record.id
            );
            println!("{secret}");
            ExitCode::SUCCESS
        }
        Command::Keys {
            command: KeysCommand::Revoke { id },
        } => {
            if store.revoke_key(&id).await? {
                println!("revoked {id}");
                ExitCode::SUCCESS
            } else {
                eprintln!("error: no active key with id {id}");
                ExitCode::FAILURE
            }
        }
        Command::Keys {
            command: KeysCommand::List { tenant },
        } => {
            println!(
                "{:<22} {:<16} {:<16} {:<12} {:<20} status",
                "id", "tenant", "name", "prefix", "created (UTC)"
            );
            for key in store.keys_changed_since(0).await? {
                if tenant.as_ref().is_some_and(|t| t != &key.tenant) {
                    continue;
                }
                let created = chrono::DateTime::from_timestamp_millis(key.created_ms)
                    .map(|t| t.format("%Y-%m-%d %H:%M:%S").to_string())
                    .unwrap_or_default();
                let status = if key.revoked_ms.is_some() {
                    "revoked"
                } else {
                    "active"
                };
                let name = key.name.as_deref().unwrap_or("-");
                println!(
                    "{:<22} {:<16} {:<16} {:<12} {created:<20} {status}",
                    key.id,
                    key.tenant,
                    name,
                    format!("{}…", key.prefix)
                );
            }
            ExitCode::SUCCESS
        }
        Command::Usage { tenant, since } => {
            let since_ms = match since.as_deref().map(parse_since).transpose() {
                Ok(since) => since.unwrap_or(0),
                Err(message) => {
                    eprintln!("error: --since: {message}");
                    return Ok(ExitCode::from(2));
                }
            };
            print_usage(&store, &tenant, since_ms).await?;
            ExitCode::SUCCESS
        }
        Command::Serve | Command::Config { .. } | Command::Router { .. } => {
            unreachable!("handled in run()")
        }
    };
    store.close().await;
    Ok(code)
}

async fn print_usage(store: &Store, tenant: &str, since_ms: i64) -> anyhow::Result<()> {
    let rows = store.usage_by_model(tenant, since_ms).await?;
    println!(
        "{:<28} {:>9} {:>14} {:>12} {:>14} {:>14}",
        "model", "requests", "prompt_tokens", "cached", "completion", "cost_usd"
    );
    let print = |row: &UsageTotals| {
        println!(
            "{:<28} {:>9} {:>14} {:>12} {:>14} {:>14}",
            if row.model.is_empty() {
                "(rejected before model)"
            } else {
                &row.model
            },
            row.requests,
            row.prompt_tokens,
            row.cached_tokens,
            row.completion_tokens,
            format_usd(row.cost_micros)
        )
    };
    let mut total = UsageTotals {
        model: "TOTAL".into(),
        ..Default::default()
    };
    for row in &rows {
        print(row);
        total.requests += row.requests;
        total.prompt_tokens += row.prompt_tokens;
        total.cached_tokens += row.cached_tokens;
        total.completion_tokens += row.completion_tokens;
        total.cost_micros += row.cost_micros;
    }
    print(&total);
    Ok(())
}

fn format_usd(micros: i64) -> String {
    format!(
        "{}{}.{:06}",
        if micros < 0 { "-" } else { "" },
        micros.abs() / 1_000_000,
        micros.abs() % 1_000_000
    )
}

fn parse_since(text: &str) -> Result<i64, String> {
    if let Ok(date) = chrono::NaiveDate::parse_from_str(text, "%Y-%m-%d") {
        return Ok(date
            .and_hms_opt(0, 0, 0)
            .expect("midnight exists")
            .and_utc()
            .timestamp_millis());
    }
    chrono::DateTime::parse_from_rfc3339(text)
        .map(|t| t.timestamp_millis())
        .map_err(|_| format!("`{text}` is neither YYYY-MM-DD nor an RFC 3339 time"))
}

/// A database URL without its password, for messages.
pub fn redact_url(url: &str) -> String {
    match (url.find("://"), url.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            format!("{}://…@{}", &url[..scheme], &url[at + 1..])
        }
        _ => url.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        assert_eq!(format_usd(1_234_567), "1.234567");
        assert_eq!(format_usd(5), "0.000005");
        assert_eq!(parse_since("2026-01-02"), Ok(1_767_312_000_000));
        assert!(parse_since("yesterday").is_err());
        assert_eq!(
            redact_url("postgres://u:secret@host/db"),
            "postgres://…@host/db"
        );
    }
}
