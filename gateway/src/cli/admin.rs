//! `tollgate tenants|keys|budgets|usage|export|audit`: the admin API for scripts. Each command
//! calls the same function as its admin API endpoint and prints its answer as a table, or as
//! the endpoint's JSON with `--json`.

use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Args, Subcommand};
use serde_json::Value;
use tollgate_billing::report::usd;
use tollgate_billing::store::Store;

use crate::admin::service::{self, ReportParams};
use crate::config::Policy;
use crate::limits::Limits;
use crate::proxy::error::ApiError;

#[derive(Subcommand)]
pub enum KeysCommand {
    /// Create a key; its secret is printed once and stored only as a hash.
    Create {
        #[arg(long)]
        tenant: String,
        #[arg(long)]
        name: Option<String>,
        /// A retry with the same value returns the key made the first time (without its secret).
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id; running gateways stop accepting it within `key_refresh_ms`.
    Revoke {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// Give a key a new secret (same id); the old one works for the grace period.
    Rotate {
        id: String,
        /// Seconds the old secret keeps working (default 3600).
        #[arg(long)]
        grace_seconds: Option<u64>,
        #[arg(long)]
        idempotency_key: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
}

/// The report flags shared by `usage` and `export`.
#[derive(Args)]
pub struct ReportArgs {
    /// First day, YYYY-MM-DD, in each tenant's time zone (default: 29 days before --to).
    #[arg(long)]
    from: Option<String>,
    /// Last day, inclusive (default: today).
    #[arg(long)]
    to: Option<String>,
    #[arg(long)]
    tenant: Option<String>,
}

impl ReportArgs {
    fn params(&self) -> ReportParams {
        ReportParams {
            from: self.from.clone(),
            to: self.to.clone(),
            tenant: self.tenant.clone(),
            ..ReportParams::default()
        }
    }
}

#[derive(Subcommand)]
pub enum AdminCommand {
    /// Tenants in the policy file, with their tags, limits and budgets.
    Tenants {
        name: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Budgets and their live state: limit, used, reserved, remaining, period end.
    Budgets {
        #[arg(long)]
        tenant: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Usage from the rollups, grouped by any of tenant, key, model, backend, tier, day, hour,
    /// tag:NAME.
    Usage {
        #[command(flatten)]
        range: ReportArgs,
        #[arg(long, default_value = "model")]
        group_by: String,
        #[arg(long)]
        key: Option<String>,
        #[arg(long)]
        model: Option<String>,
        /// Where days begin for hourly reports over several tenants (IANA zone).
        #[arg(long)]
        tz: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Requests and cost per routing tier, and savings against premium-equivalent cost.
    Routing {
        #[command(flatten)]
        range: ReportArgs,
        #[arg(long)]
        json: bool,
    },
    /// Chargeback CSV (one line per tenant x model x day), or FOCUS-style columns.
    Export {
        #[command(flatten)]
        range: ReportArgs,
        #[arg(long, value_parser = ["csv", "focus"], default_value = "csv")]
        format: String,
        /// Write here instead of standard output.
        #[arg(long, short)]
        output: Option<PathBuf>,
    },
    /// The admin API's audit log, newest first.
    Audit {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        #[arg(long)]
        json: bool,
    },
}

/// Runs an admin mirror; errors print like the API's messages.
pub async fn run(
    policy: &Policy,
    store: &Store,
    command: AdminCommand,
) -> anyhow::Result<ExitCode> {
    let answer: Result<(Value, bool), ApiError> = match command {
        AdminCommand::Tenants { name, json } => {
            service::tenants(policy, name.as_deref()).map(|v| (v, json))
        }
        AdminCommand::Budgets { tenant, json } => {
            let limits = Limits::new(policy)?;
            if policy.redis_url.is_none() {
                // Counters live in each gateway's memory; rebuild what the ledger knows.
                limits
                    .rebuild(policy, store, std::time::Duration::ZERO, true)
                    .await;
            }
            service::budgets(policy, &limits, tenant.as_deref())
                .await
                .map(|v| (v, json))
        }
        AdminCommand::Usage {
            range,
            group_by,
            key,
            model,
            tz,
            json,
        } => {
            let params = ReportParams {
                key,
                model,
                tz,
                group_by: Some(group_by),
                ..range.params()
            };
            service::usage(policy, store, &params)
                .await
                .map(|v| (v, json))
        }
        AdminCommand::Routing { range, json } => service::routing(policy, store, &range.params())
            .await
            .map(|v| (v, json)),
        AdminCommand::Export {
            range,
            format,
            output,
        } => {
            return match service::chargeback(policy, store, &range.params(), format == "focus")
                .await
            {
                Ok((_, csv)) => {
                    match output {
                        Some(path) => std::fs::write(path, csv)?,
                        None => print!("{csv}"),
                    }
                    Ok(ExitCode::SUCCESS)
                }
                Err(e) => Ok(fail(&e)),
            };
        }
        AdminCommand::Audit { limit, json } => store
            .audit_log(limit.clamp(1, 10_000), None)
            .await
            .map(|entries| (serde_json::json!({ "data": entries }), json))
            .map_err(|e| ApiError::bad_request(format!("{e:#}"))),
    };
    Ok(match answer {
        Ok((value, true)) => {
            println!("{}", serde_json::to_string_pretty(&value)?);
            ExitCode::SUCCESS
        }
        Ok((value, false)) => {
            print_table(&value);
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    })
}

pub async fn keys(
    policy: &Policy,
    store: &Store,
    command: KeysCommand,
) -> anyhow::Result<ExitCode> {
    let action = match &command {
        KeysCommand::Create { tenant, .. } => Some(("keys create", tenant.clone())),
        KeysCommand::Rotate { id, .. } => Some(("keys rotate", id.clone())),
        KeysCommand::Revoke { id, .. } => Some(("keys revoke", id.clone())),
        KeysCommand::List { .. } => None,
    };
    let answer = match command {
        KeysCommand::Create {
            tenant,
            name,
            idempotency_key,
            json,
        } => service::create_key(policy, store, &tenant, name.as_deref(), idempotency_key.as_deref())
            .await
            .map(|(created, v)| {
                if !json {
                    let id = v["key"]["id"].as_str().unwrap_or_default();
                    match v["secret"].as_str() {
                        Some(secret) if created => {
                            eprintln!("created key {id} for tenant `{tenant}`; the secret below is shown only once:");
                            println!("{secret}");
                        }
                        _ => eprintln!("key {id} was already created with this idempotency key; its secret is not shown again"),
                    }
                }
                (v, json)
            }),
        KeysCommand::Rotate {
            id,
            grace_seconds,
            idempotency_key,
            json,
        } => service::rotate_key(store, &id, grace_seconds, idempotency_key.as_deref())
            .await
            .map(|v| {
                if !json {
                    match v["secret"].as_str() {
                        Some(secret) => {
                            eprintln!(
                                "rotated {id}; the old secret works until {}; the new secret is shown only once:",
                                v["key"]["previous_expires_at"].as_str().unwrap_or("now")
                            );
                            println!("{secret}");
                        }
                        None => eprintln!("{id} was already rotated with this idempotency key"),
                    }
                }
                (v, json)
            }),
        KeysCommand::Revoke { id, json } => service::revoke_key(store, &id).await.map(|v| {
            if !json {
                println!("revoked {id}");
            }
            (v, json)
        }),
        KeysCommand::List { tenant, json } => {
            service::list_keys(store, tenant.as_deref()).await.map(|v| {
                if !json {
                    print_table(&v);
                }
                (v, json)
            })
        }
    };
    if let Some((action, target)) = action {
        audit(store, action, &target, &answer).await;
    }
    Ok(match answer {
        Ok((value, json)) => {
            if json {
                println!("{}", serde_json::to_string_pretty(&value)?);
            }
            ExitCode::SUCCESS
        }
        Err(e) => fail(&e),
    })
}

/// Key changes made from the command line are audited like the admin API's (the key id, never
/// the secret).
async fn audit(
    store: &Store,
    action: &str,
    target: &str,
    answer: &Result<(Value, bool), ApiError>,
) {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let (status, detail) = match answer {
        Ok((value, _)) => {
            let id = value["key"]["id"].as_str().or(value["id"].as_str());
            (200, id.map(|id| format!("key={id}")))
        }
        Err(e) => (i32::from(e.status), Some(e.message.clone())),
    };
    let entry = tollgate_billing::store::AuditEntry {
        id: 0,
        at_ms: chrono::Utc::now().timestamp_millis(),
        actor: format!("cli:{user}"),
        remote: None,
        method: "CLI".into(),
        path: format!("tollgate {action} {target}"),
        action: action.into(),
        target: Some(target.into()),
        status,
        detail,
    };
    if let Err(e) = store.audit(&entry).await {
        eprintln!("warning: the audit log could not be written: {e:#}");
    }
}

fn fail(e: &ApiError) -> ExitCode {
    eprintln!("error: {}", e.message);
    ExitCode::from(if e.status < 500 { 2 } else { 1 })
}

/// Prints `data` (or the object itself) as aligned columns; micro-dollar fields as USD, and
/// the report's `totals` as a last `TOTAL` line.
fn print_table(value: &Value) {
    let rows: Vec<&serde_json::Map<String, Value>> = match value.get("data") {
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_object).collect(),
        _ => value.as_object().into_iter().collect(),
    };
    let mut columns: Vec<String> = rows
        .first()
        .map_or_else(Vec::new, |r| r.keys().cloned().collect());
    if columns.is_empty() {
        if let Some(Value::Object(totals)) = value.get("totals") {
            columns = totals.keys().cloned().collect();
        }
    }
    let cell = |row: &serde_json::Map<String, Value>, column: &str| match row.get(column) {
        None | Some(Value::Null) => "-".to_string(),
        Some(Value::String(s)) => s.clone(),
        Some(Value::Number(n)) if column.ends_with("_micros") => {
            usd(n.as_i64().unwrap_or_default())
        }
        Some(other) => other.to_string(),
    };
    let mut lines: Vec<Vec<String>> = vec![columns
        .iter()
        .map(|c| {
            c.strip_suffix("_micros")
                .map_or(c.clone(), |c| format!("{c}_usd"))
        })
        .collect()];
    for row in &rows {
        lines.push(columns.iter().map(|c| cell(row, c)).collect());
    }
    if let Some(Value::Object(totals)) = value.get("totals") {
        lines.push(
            columns
                .iter()
                .enumerate()
                .map(|(i, c)| match totals.get(c) {
                    Some(_) => cell(totals, c),
                    None if i == 0 => "TOTAL".into(),
                    None => String::new(),
                })
                .collect(),
        );
    }
    let widths: Vec<usize> = (0..columns.len())
        .map(|i| {
            lines
                .iter()
                .map(|l| l[i].chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    for line in lines {
        let padded: Vec<String> = line
            .iter()
            .zip(&widths)
            .map(|(text, width)| format!("{text:<width$}"))
            .collect();
        println!("{}", padded.join("  ").trim_end());
    }
}
