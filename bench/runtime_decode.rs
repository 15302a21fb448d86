//! Local runtime decode speed: plain vs n-gram vs draft-model speculation, next to llama.cpp
//! on the same GGUF file and prompts, in the same run (ratios, not absolute numbers, are the
//! claim: these machines are shared).
//!
//!     RAYON_NUM_THREADS=1 cargo bench -p tollgate-runtime --bench runtime_decode
//!
//! Needs `pip install llama-cpp-python` for the llama.cpp column (skipped, and said so, without).

use std::sync::Arc;
use std::time::Instant;
use tollgate_runtime::engine::{Engine, EngineConfig, Event, Job, Outcome};
use tollgate_runtime::sampling::SamplingParams;
use tollgate_runtime::speculative::SpeculationMode;
use tollgate_runtime::template::ChatMessage;

const MAX_TOKENS: usize = 128;

const PROMPTS: [(&str, &str); 3] = [
    (
        "summarise",
        "Summarise the following text in two sentences, reusing its wording.\n\nThe city council met on Tuesday to discuss the new public library. The library will be built near the central park and will open next spring. The council said the library will have a large children's section, a cafe, and a room for community events. Residents asked the council to keep the library open late on weekdays, and the council agreed to keep the library open until nine in the evening.",
    ),
    (
        "edit_code",
        "Rename the variable `total` to `sum` in this function and show the whole function:\n\ndef average(values):\n    total = 0\n    for v in values:\n        total += v\n    if len(values) == 0:\n        return 0\n    return total / len(values)\n",
    ),
    ("open", "Write a short poem about the sea at night."),
];

fn run(engine: &Engine, ids: Vec<u32>) -> (Outcome, f64) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let start = Instant::now();
    engine
        .submit(Job {
            prompt: ids,
            params: SamplingParams::GREEDY,
            max_tokens: MAX_TOKENS,
            stops: vec![],
            seed: None,
            speculate: true,
            events: tx,
        })
        .unwrap();
    loop {
        match rx.blocking_recv().unwrap() {
            Event::Done(o) => return (o, start.elapsed().as_secs_f64()),
            Event::Delta(_) => {}
            Event::Error(e) => panic!("{e}"),
        }
    }
}

fn main() -> anyhow::Result<()> {
    let root = std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let out = std::process::Command::new(root.join("scripts/fetch-model")).output()?;
    anyhow::ensure!(out.status.success(), "fetch-model failed");
    let model_path = root.join(String::from_utf8(out.stdout)?.trim());
    let threads = rayon::current_num_threads();
    let loaded = tollgate_runtime::load_model(&model_path, &candle_core::Device::Cpu)?;
    println!("model {} ({} threads)\n", model_path.display(), threads);

    let engines: Vec<(&str, Engine)> = [
        ("plain", SpeculationMode::Off, None),
        ("ngram", SpeculationMode::Ngram, None),
        (
            "draft (= target)",
            SpeculationMode::Draft,
            Some(loaded.model.clone()),
        ),
    ]
    .into_iter()
    .map(|(name, mode, draft)| {
        let e = Engine::start(
            loaded.model.clone(),
            Arc::clone(&loaded.tokenizer),
            EngineConfig {
                mode,
                draft,
                slots: 1,
                fixed_draft: None,
            },
        )
        .unwrap();
        (name, e)
    })
    .collect();
    println!(
        "verify cost curve (pass over n tokens / pass over 1): {:?}\n",
        engines[0]
            .1
            .curve
            .relative
            .iter()
            .map(|c| (c * 100.0).round() / 100.0)
            .collect::<Vec<_>>()
    );

    let prompts_file = std::env::temp_dir().join("tollgate-bench-prompts.json");
    let json: Vec<_> = PROMPTS
        .iter()
        .map(|(n, p)| serde_json::json!({"name": n, "prompt": p}))
        .collect();
    std::fs::write(&prompts_file, serde_json::to_string(&json)?)?;
    let llama = std::process::Command::new("python3")
        .arg(root.join("bench/llamacpp_decode.py"))
        .arg(&model_path)
        .arg(&prompts_file)
        .arg(MAX_TOKENS.to_string())
        .arg(threads.to_string())
        .output();
    let llama: Vec<serde_json::Value> = match llama {
        Ok(o) if o.status.success() => String::from_utf8_lossy(&o.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect(),
        Ok(o) => {
            println!(
                "llama.cpp column skipped: {}",
                String::from_utf8_lossy(&o.stderr)
                    .lines()
                    .last()
                    .unwrap_or("")
            );
            vec![]
        }
        Err(e) => {
            println!("llama.cpp column skipped: {e}");
            vec![]
        }
    };

    println!("| prompt | engine | TTFT ms | decode ms/token | tokens | acceptance | tokens/pass | vs plain | vs llama.cpp |");
    println!("|---|---|---|---|---|---|---|---|---|");
    for (name, prompt) in PROMPTS {
        let text = loaded.template.render(&[ChatMessage {
            role: "user".into(),
            content: prompt.into(),
        }])?;
        let ids = loaded.tokenizer.encode(&text, true)?;
        let llama_ms = llama
            .iter()
            .find(|v| v["name"] == name)
            .and_then(|v| v["decode_ms_per_token"].as_f64());
        let mut plain_ms = None;
        for (engine_name, engine) in &engines {
            run(engine, ids.clone()); // warm-up
            let (o, _) = run(engine, ids.clone());
            let per_token = o.decode_ms / (o.completion_tokens.saturating_sub(1).max(1)) as f64;
            let base = *plain_ms.get_or_insert(per_token);
            println!(
                "| {name} | {engine_name} | {:.1} | {:.2} | {} | {:.2} | {:.2} | {:.2}x | {} |",
                o.time_to_first_token_ms,
                per_token,
                o.completion_tokens,
                o.speculation.acceptance_rate,
                o.speculation.tokens_per_pass,
                base / per_token,
                llama_ms.map_or("-".into(), |l| format!("{:.2}x", l / per_token)),
            );
        }
        if let Some(v) = llama.iter().find(|v| v["name"] == name) {
            println!(
                "| {name} | llama.cpp | {:.1} | {:.2} | {} | - | - | {:.2}x | 1.00x |",
                v["ttft_ms"].as_f64().unwrap_or(0.0),
                llama_ms.unwrap_or(0.0),
                v["chunks"],
                plain_ms.unwrap_or(0.0) / llama_ms.unwrap_or(1.0),
            );
        }
    }
    println!("\n\"vs plain\" and \"vs llama.cpp\": speed ratios (above 1 = this row is faster).");
    Ok(())
}
