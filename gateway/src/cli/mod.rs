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
        Command::Admin(command) => admin::run(&policy, &store, command).await?,
        Command::Serve | Command::Config { .. } | Command::Router { .. } => {
            unreachable!("handled in run()")
        }
    };
    store.close().await;
    Ok(code)
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
