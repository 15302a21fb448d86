//! `tollgate config diff OLD NEW`: what switching from one valid policy to another changes,
//! in the terms an operator reviews: backends, prices, routes, access, budgets and limits.

use super::{Budget, Metric, Model, Policy, Route, RouteThreshold, Tenant};
use serde::Serialize;
use std::collections::BTreeSet;
use std::fmt::Write;

/// One change, e.g. `budgets / acme / usd daily: limit $5.00 -> $10.00`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub section: &'static str,
    pub subject: String,
    pub change: String,
}

impl std::fmt::Display for Change {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:<9} {}: {}", self.section, self.subject, self.change)
    }
}

pub fn diff(old: &Policy, new: &Policy) -> Vec<Change> {
    let mut out = Vec::new();
    let mut add = |section, subject: &str, change: String| {
        out.push(Change {
            section,
            subject: subject.to_string(),
            change,
        })
    };

    let names = |a: Vec<&String>, b: Vec<&String>| -> BTreeSet<String> {
        a.into_iter().chain(b).cloned().collect()
    };

    for name in names(
        old.backends.iter().map(|b| &b.name).collect(),
        new.backends.iter().map(|b| &b.name).collect(),
    ) {
        let describe = |p: &Policy| {
            p.backends
                .iter()
                .find(|b| b.name == name)
                .map(|b| match &b.local {
                    Some(l) => format!(
                        "local {} (speculate {:?}, {} slots, {})",
                        l.options.model.display(),
                        l.options.speculate,
                        l.options.slots,
                        l.options.device
                    ),
                    None => format!(
                        "{}://{}:{}{}",
                        if b.tls { "https" } else { "http" },
                        b.host,
                        b.port,
                        b.base_path
                    ),
                })
        };
        match (describe(old), describe(new)) {
            (None, Some(n)) => add("backends", &name, format!("added: {n}")),
            (Some(o), None) => add("backends", &name, format!("removed (was {o})")),
            (Some(o), Some(n)) if o != n => add("backends", &name, format!("{o} -> {n}")),
            _ => {}
        }
    }

    for name in names(
        old.models.iter().map(|m| &m.name).collect(),
        new.models.iter().map(|m| &m.name).collect(),
    ) {
        let find = |p: &Policy| p.models.iter().find(|m| m.name == name).cloned();
        match (find(old), find(new)) {
            (None, Some(n)) => add(
                "models",
                &name,
                format!("added at {}, targets {}", price(&n), targets(&n)),
            ),
            (Some(_), None) => add("models", &name, "removed".into()),
            (Some(o), Some(n)) => {
                if o.price != n.price {
                    add("prices", &name, format!("{} -> {}", price(&o), price(&n)));
                }
                if targets(&o) != targets(&n) {
                    add(
                        "models",
                        &name,
                        format!("targets {} -> {}", targets(&o), targets(&n)),
                    );
                }
            }
            (None, None) => {}
        }
    }

    for name in names(
        old.routes.iter().map(|r| &r.name).collect(),
        new.routes.iter().map(|r| &r.name).collect(),
    ) {
        let find = |p: &Policy| p.routes.iter().find(|r| r.name == name).map(|r| route(r));
        match (find(old), find(new)) {
            (None, Some(n)) => add("routes", &name, format!("added: {n}")),
            (Some(o), None) => add("routes", &name, format!("removed (was {o})")),
            (Some(o), Some(n)) if o != n => add("routes", &name, format!("{o} -> {n}")),
            _ => {}
        }
    }

    for name in names(old.tenants.keys().collect(), new.tenants.keys().collect()) {
        match (old.tenants.get(&name), new.tenants.get(&name)) {
            (None, Some(n)) => add(
                "tenants",
                &name,
                format!("added with {}", budgets_summary(n)),
            ),
            (Some(_), None) => add("tenants", &name, "removed: its keys stop working".into()),
            (Some(o), Some(n)) => {
                tenant_changes(o, n, &mut |section, change| add(section, &name, change))
            }
            (None, None) => {}
        }
    }

    for (field, o, n) in [
        (
            "listen",
            format!("{:?}", old.listen),
            format!("{:?}", new.listen),
        ),
        (
            "database_url",
            crate::cli::redact_url(&old.database_url),
            crate::cli::redact_url(&new.database_url),
        ),
        (
            "redis_url",
            old.redis_url
                .as_deref()
                .map(crate::cli::redact_url)
                .unwrap_or_default(),
            new.redis_url
                .as_deref()
                .map(crate::cli::redact_url)
                .unwrap_or_default(),
        ),
        (
            "admin.listen",
            format!("{:?}", old.admin_listen),
            format!("{:?}", new.admin_listen),
        ),
        ("tls", tls(&old.tls), tls(&new.tls)),
        ("admin.tls", tls(&old.admin_tls), tls(&new.admin_tls)),
        (
            "admin.audit_retention_days",
            format!("{:?}", old.admin_audit_retention_days),
            format!("{:?}", new.admin_audit_retention_days),
        ),
        (
            "ledger.retention_months",
            format!("{:?}", old.ledger_retention_months),
            format!("{:?}", new.ledger_retention_months),
        ),
        (
            "ledger.journal_dir",
            old.ledger_journal_dir.display().to_string(),
            new.ledger_journal_dir.display().to_string(),
        ),
        (
            "ledger.on_journal_full",
            format!("{:?}", old.ledger_on_journal_full),
            format!("{:?}", new.ledger_on_journal_full),
        ),
        (
            "max_body_bytes",
            old.max_body_bytes.to_string(),
            new.max_body_bytes.to_string(),
        ),
    ] {
        if o != n {
            add("server", field, format!("{o} -> {n}"));
        }
    }
    out
}

fn tenant_changes(o: &Tenant, n: &Tenant, add: &mut impl FnMut(&'static str, String)) {
    let models = |t: &Tenant| match &t.models {
        None => "every model".to_string(),
        Some(m) => {
            let mut v: Vec<_> = m.iter().cloned().collect();
            v.sort();
            v.join(", ")
        }
    };
    if models(o) != models(n) {
        add("access", format!("models {} -> {}", models(o), models(n)));
    }
    for (what, a, b) in [("rpm", o.rpm, n.rpm), ("tpm", o.tpm, n.tpm)] {
        if a != b {
            add("limits", format!("{what} {} -> {}", limit(a), limit(b)));
        }
    }
    let idents: BTreeSet<String> = o
        .budgets
        .iter()
        .chain(&n.budgets)
        .map(Budget::ident)
        .collect();
    for ident in idents {
        let find = |t: &Tenant| t.budgets.iter().find(|b| b.ident() == ident).cloned();
        match (find(o), find(n)) {
            (None, Some(b)) => add("budgets", format!("added {}", budget(&b))),
            (Some(b), None) => add("budgets", format!("removed {}", budget(&b))),
            (Some(a), Some(b)) if a != b => {
                add("budgets", format!("{} -> {}", budget(&a), budget(&b)))
            }
            _ => {}
        }
    }
    if o.time_zone != n.time_zone {
        add(
            "budgets",
            format!(
                "time zone {} -> {} (period boundaries move)",
                o.time_zone, n.time_zone
            ),
        );
    }
    if o.tags_json != n.tags_json {
        add(
            "tags",
            format!(
                "{} -> {}",
                o.tags_json.as_deref().unwrap_or("{}"),
                n.tags_json.as_deref().unwrap_or("{}")
            ),
        );
    }
}

/// `off`, or the certificate's file and fingerprint (a renewed one shows as a change).
fn tls(t: &Option<std::sync::Arc<crate::tls::TlsCert>>) -> String {
    t.as_ref().map_or("off".into(), |t| t.describe())
}

fn limit(v: Option<i64>) -> String {
    v.map_or("unlimited".into(), |v| v.to_string())
}

/// `$5.00`, `$0.075`: cents always, more digits only when the amount has them.
fn usd(micros: u64) -> String {
    let s = format!("{:.6}", micros as f64 / 1e6);
    let (whole, frac) = s.split_once('.').unwrap_or((&s, ""));
    let frac = frac.trim_end_matches('0');
    format!("${whole}.{frac:0<2}")
}

fn price(m: &Model) -> String {
    let p = &m.price;
    format!(
        "{} in / {} cached / {} out per 1M tokens",
        usd(p.input),
        usd(p.cached_input),
        usd(p.output)
    )
}

fn targets(m: &Model) -> String {
    m.targets
        .iter()
        .map(|t| format!("{}:{}", t.backend.name, t.upstream_model))
        .collect::<Vec<_>>()
        .join(", ")
}

fn route(r: &Route) -> String {
    let threshold = match r.threshold {
        RouteThreshold::Fixed(t) => format!("threshold {t}"),
        RouteThreshold::PremiumShare(s) => format!("premium share {s}"),
    };
    format!(
        "cheap {} / premium {}, {threshold}",
        r.cheap.name, r.premium.name
    )
}

fn budget(b: &Budget) -> String {
    let period = b.period.name();
    let mut s = match b.metric {
        Metric::Usd => format!("{} {period}", usd(b.limit.max(0) as u64)),
        Metric::Tokens => format!("{} tokens {period}", b.limit),
    };
    if let Some(k) = &b.key {
        let _ = write!(s, " for key {k}");
    }
    if let Some(m) = &b.model {
        let _ = write!(s, " on {m}");
    }
    s.push_str(if b.hard { " (hard)" } else { " (soft)" });
    s
}

fn budgets_summary(t: &Tenant) -> String {
    if t.budgets.is_empty() {
        return "no budgets".into();
    }
    t.budgets.iter().map(budget).collect::<Vec<_>>().join("; ")
}
