//! Trains the shipped scorer on the public preference data and reports cross-validated metrics.
//!
//! ```sh
//! cargo run --release -p tollgate-router --example train -- \
//!     ../shared/routing/mmlu.jsonl ../shared/routing/gsm8k.jsonl --out router/model/scorer.bin
//! ```
//!
//! Label: 1 when the premium model's answer scored higher than the cheap one's. Model: logistic
//! regression (AdaGrad, L2) over `features::extract`. Metrics are computed on out-of-fold scores
//! of a 5-fold cross-validation grouped by prompt text (copies of a prompt share a fold), so no
//! prompt is scored by a model that saw it. Deterministic: same data, same weights.
//! `--oof FILE` writes the out-of-fold scores (by id) for the shared `eval.py` to check.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};

use serde_json::Value;
use tollgate_router::features::{extract, request_text, Features, DENSE};
use tollgate_router::metrics::{apgr_interval, evaluate, Outcome};
use tollgate_router::Scorer;

const FOLDS: u64 = 5;
const EPOCHS: usize = 3;
const LEARNING_RATE: f32 = 0.1;
const L2: f32 = 0.001;

struct Example {
    id: String,
    source: String,
    features: Features,
    chars: usize,
    label: f32,
    cheap: f64,
    premium: f64,
    fold: u64,
}

fn train(examples: &[&Example]) -> Scorer {
    let mut scorer = Scorer::default();
    let mut g_bias = 1e-8f32;
    let mut g_dense = [1e-8f32; DENSE];
    let mut g_hashed = vec![1e-8f32; scorer.hashed.len()];
    let mut order: Vec<usize> = (0..examples.len()).collect();
    let mut state = 0x2545F4914F6CDD1Du64;
    for _ in 0..EPOCHS {
        for i in (1..order.len()).rev() {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            order.swap(i, (state % (i as u64 + 1)) as usize);
        }
        for &i in &order {
            let e = examples[i];
            let p = 1.0 / (1.0 + (-scorer.logit(&e.features)).exp());
            let err = p - e.label;
            g_bias += err * err;
            scorer.bias -= LEARNING_RATE * err / g_bias.sqrt();
            for (k, x) in e.features.dense.iter().enumerate() {
                let g = err * x + L2 * scorer.dense[k];
                g_dense[k] += g * g;
                scorer.dense[k] -= LEARNING_RATE * g / g_dense[k].sqrt();
            }
            for (b, x) in &e.features.hashed {
                let b = *b as usize;
                let g = err * x + L2 * scorer.hashed[b];
                g_hashed[b] += g * g;
                scorer.hashed[b] -= LEARNING_RATE * g / g_hashed[b].sqrt();
            }
        }
    }
    scorer
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let option = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .map(|i| args[i + 1].clone())
    };
    let (out, oof_out) = (option("--out"), option("--oof"));
    let files: Vec<&String> = args
        .iter()
        .enumerate()
        .filter(|(i, a)| !a.starts_with("--") && (*i == 0 || !args[i - 1].starts_with("--")))
        .map(|(_, a)| a)
        .collect();
    let mut examples = Vec::new();
    for file in &files {
        for line in std::fs::read_to_string(file)
            .expect("read data")
            .lines()
            .filter(|l| !l.trim().is_empty())
        {
            let row: Value = serde_json::from_str(line).expect("JSON line");
            let request = &row["request"];
            let text = request_text(request);
            let mut hasher = DefaultHasher::new();
            text.split_whitespace()
                .collect::<Vec<_>>()
                .join(" ")
                .to_lowercase()
                .hash(&mut hasher);
            let (cheap, premium) = (
                row["cheap_score"].as_f64().unwrap(),
                row["premium_score"].as_f64().unwrap(),
            );
            examples.push(Example {
                id: row["id"].as_str().unwrap_or_default().to_string(),
                source: row["source"].as_str().unwrap_or("?").to_string(),
                features: extract(request),
                chars: text.chars().count(),
                label: if premium > cheap { 1.0 } else { 0.0 },
                cheap,
                premium,
                fold: hasher.finish() % FOLDS,
            });
        }
    }
    let mut oof = vec![0.0f64; examples.len()];
    for fold in 0..FOLDS {
        let training: Vec<&Example> = examples.iter().filter(|e| e.fold != fold).collect();
        let scorer = train(&training);
        for (i, e) in examples.iter().enumerate().filter(|(_, e)| e.fold == fold) {
            oof[i] = f64::from(scorer.logit(&e.features));
        }
        eprintln!("fold {fold} done");
    }
    println!("| data | prompts | router APGR (95% CI) | CPT(50%) | CPT(80%) | length APGR | length CPT(50%) | length CPT(80%) |");
    println!("|---|---|---|---|---|---|---|---|");
    let mut sources: Vec<String> = examples.iter().map(|e| e.source.clone()).collect();
    sources.sort();
    sources.dedup();
    sources.push("all".into());
    for source in &sources {
        let pick: Vec<usize> = (0..examples.len())
            .filter(|i| source == "all" || &examples[*i].source == source)
            .collect();
        let router: Vec<Outcome> = pick
            .iter()
            .map(|&i| Outcome {
                score: oof[i],
                cheap: examples[i].cheap,
                premium: examples[i].premium,
            })
            .collect();
        let length: Vec<Outcome> = pick
            .iter()
            .map(|&i| Outcome {
                score: examples[i].chars as f64,
                cheap: examples[i].cheap,
                premium: examples[i].premium,
            })
            .collect();
        let (r, l) = (evaluate(&router), evaluate(&length));
        let (lo, hi) = apgr_interval(&router, 1000, 0);
        println!(
            "| {source} | {} | {:.3} ({lo:.3}–{hi:.3}) | {:.1}% | {:.1}% | {:.3} | {:.1}% | {:.1}% |",
            pick.len(), r.apgr, r.cpt50 * 100.0, r.cpt80 * 100.0, l.apgr, l.cpt50 * 100.0, l.cpt80 * 100.0
        );
    }
    if let Some(path) = oof_out {
        // Out-of-fold scores by id, for the shared `eval.py`.
        let lines: Vec<String> = examples
            .iter()
            .zip(&oof)
            .map(|(e, z)| format!("{{\"id\": \"{}\", \"score\": {z}}}", e.id))
            .collect();
        std::fs::write(&path, lines.join("\n") + "\n").expect("write scores");
    }
    if let Some(out) = out {
        let all: Vec<&Example> = examples.iter().collect();
        std::fs::write(&out, train(&all).to_bytes()).expect("write weights");
        eprintln!("wrote {out}");
    }
}
