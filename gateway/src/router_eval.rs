//! `tollgate router eval`: the shipped scorer against preference data.

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
