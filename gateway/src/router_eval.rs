//! `tollgate router eval` (the shipped scorer against preference data) and `tollgate router
//! score` (routing decisions for requests on stdin).

use std::path::Path;
use std::process::ExitCode;

use serde_json::Value;
use tollgate_router::features::request_text;
use tollgate_router::metrics::{apgr_interval, curve, evaluate, Outcome, Summary};
use tollgate_router::Scorer;

pub fn eval(data: &Path) -> anyhow::Result<ExitCode> {
    let text = std::fs::read_to_string(data)?;
    let scorer = Scorer::shipped();
    let (mut router, mut length) = (Vec::new(), Vec::new());
    for (n, line) in text
        .lines()
        .enumerate()
        .filter(|(_, l)| !l.trim().is_empty())
    {
        let row: Value = serde_json::from_str(line)
            .map_err(|e| anyhow::anyhow!("{}:{}: {e}", data.display(), n + 1))?;
        let (Some(cheap), Some(premium)) =
            (row["cheap_score"].as_f64(), row["premium_score"].as_f64())
        else {
            anyhow::bail!(
                "{}:{}: cheap_score and premium_score must be numbers",
                data.display(),
                n + 1
            );
        };
        let request = &row["request"];
        router.push(Outcome {
            score: f64::from(scorer.score(request)),
            cheap,
            premium,
        });
        length.push(Outcome {
            score: request_text(request).chars().count() as f64,
            cheap,
            premium,
        });
    }
    anyhow::ensure!(!router.is_empty(), "{}: no data", data.display());
    let row = |name: &str, s: Summary, ci: Option<(f64, f64)>| {
        let ci = ci.map_or("-".to_string(), |(lo, hi)| format!("[{lo:.4}, {hi:.4}]"));
        println!(
            "{name:<22} {:>7.4} {ci:>18} {:>8.2}% {:>8.2}%",
            s.apgr,
            s.cpt50 * 100.0,
            s.cpt80 * 100.0
        );
    };
    println!("{} prompts; note: the shipped model was trained on the public routing data (see bench/ROUTING.md for cross-validated numbers).", router.len());
    println!(
        "{:<22} {:>7} {:>18} {:>9} {:>9}",
        "router", "APGR", "APGR 95% CI", "CPT(50%)", "CPT(80%)"
    );
    row(
        "tollgate (shipped)",
        evaluate(&router),
        Some(apgr_interval(&router, 1000, 0)),
    );
    row(
        "random (expected)",
        Summary {
            apgr: 0.5,
            cpt50: 0.5,
            cpt80: 0.8,
        },
        None,
    );
    row(
        "prompt length",
        evaluate(&length),
        Some(apgr_interval(&length, 1000, 0)),
    );
    println!("\ncost/quality curve of the shipped router (premium share -> share of the premium gain recovered):");
    let points = curve(&router, &vec![1.0; router.len()]);
    for share in [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0] {
        let pgr = points
            .iter()
            .find(|p| p.0 >= share - 1e-9)
            .map_or(1.0, |p| p.1);
        println!("  {:>3.0}% premium -> PGR {pgr:.3}", share * 100.0);
    }
    let s = evaluate(&router);
    println!(
        "APGR={:.4} CPT50={:.2}% CPT80={:.2}%",
        s.apgr,
        s.cpt50 * 100.0,
        s.cpt80 * 100.0
    );
    Ok(ExitCode::SUCCESS)
}

pub fn score(config: &Path, route_name: &str, tenant: Option<&str>) -> anyhow::Result<ExitCode> {
    use std::io::{BufRead, Write};

    let Some(policy) = crate::cli::load_policy(config) else {
        return Ok(ExitCode::from(2));
    };
    let Some(route) = policy.route(route_name) else {
        anyhow::bail!("no route `{route_name}` in {}", config.display());
    };
    let tenant = match tenant {
        Some(name) => Some(
            policy
                .tenants
                .get(name)
                .ok_or_else(|| anyhow::anyhow!("no tenant `{name}`"))?,
        ),
        None => None,
    };
    let routing = crate::routing::Routing::new();
    let stdout = std::io::stdout();
    let mut out = std::io::BufWriter::new(stdout.lock());
    for line in std::io::stdin().lock().lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        let reply = match serde_json::from_str::<Value>(&line) {
            Ok(request) if request.is_object() => {
                let tokenizer = route.cheap.tokenizer;
                let messages = request
                    .get("messages")
                    .and_then(Value::as_array)
                    .map(Vec::as_slice)
                    .unwrap_or_default();
                let prompt = tokenizer.count_chat(messages, request.get("tools")) as u64;
                let cap = request
                    .get("max_tokens")
                    .and_then(Value::as_u64)
                    .unwrap_or(4096);
                let field = |name: &str| request.get(name);
                let input = crate::routing::RouteInput {
                    field: &field,
                    tier_header: None,
                    needed_context: prompt + cap,
                    budget_used: None,
                };
                match routing.route(route, tenant, &input) {
                    Ok(d) => {
                        serde_json::json!({"score": d.score, "tier": d.tier.as_str(), "reason": d.reason})
                    }
                    Err(e) => serde_json::json!({"error": e.message}),
                }
            }
            Ok(_) => serde_json::json!({"error": "not a JSON object"}),
            Err(e) => serde_json::json!({"error": format!("not JSON: {e}")}),
        };
        writeln!(out, "{reply}")?;
    }
    out.flush()?;
    Ok(ExitCode::SUCCESS)
}
