//! Subcommands. Each one loads the policy file named by `--config`.

mod admin;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tollgate_billing::store::Store;

use crate::config::Policy;
use admin::KeysCommand;

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
    /// The ledger journal of this host's gateway (`ledger.journal_dir`).
    Ledger {
        #[command(subcommand)]
        command: LedgerCommand,
    },
    /// Complexity routing tools.
    Router {
        #[command(subcommand)]
        command: RouterCommand,
    },
    #[command(flatten)]
    Admin(admin::AdminCommand),
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
enum LedgerCommand {
    /// List the rows the database refused (kept in `<journal_dir>/dead-letters.jsonl`), by
    /// error; with `--retry`, offer them to the database again (after fixing the cause).
    DeadLetters {
        #[arg(long)]
        retry: bool,
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
        Command::Keys { command } => admin::keys(&policy, &store, command).await?,
        Command::Ledger {
            command: LedgerCommand::DeadLetters { retry },
        } => dead_letters(&policy, &store, retry).await?,
        Command::Admin(command) => admin::run(&policy, &store, command).await?,
        Command::Serve | Command::Config { .. } | Command::Router { .. } => {
            unreachable!("handled in run()")
        }
    };
    store.close().await;
    Ok(code)
}

async fn dead_letters(policy: &Policy, store: &Store, retry: bool) -> anyhow::Result<ExitCode> {
    let dir = &policy.ledger_journal_dir;
    if retry {
        let done = tollgate_billing::ledger::retry_dead_letters(store, dir).await?;
        println!(
            "{} rows written to the database, {} refused again (kept in {})",
            done.written,
            done.refused,
            dir.join(tollgate_billing::ledger::journal::DEAD_LETTERS)
                .display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let text =
        match std::fs::read_to_string(dir.join(tollgate_billing::ledger::journal::DEAD_LETTERS)) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(e.into()),
        };
    let mut by_error = std::collections::BTreeMap::<String, usize>::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let entry: serde_json::Value = serde_json::from_str(line).unwrap_or_default();
        let error = entry["error"].as_str().unwrap_or("unreadable entry");
        *by_error.entry(error.to_string()).or_default() += 1;
    }
    let total: usize = by_error.values().sum();
    println!("{total} dead-lettered rows in {}", dir.display());
    for (error, n) in by_error {
        println!("{n:>8}  {error}");
    }
    Ok(ExitCode::SUCCESS)
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
    fn redacts_passwords() {
        assert_eq!(
            redact_url("postgres://u:secret@host/db"),
            "postgres://…@host/db"
        );
    }
}
