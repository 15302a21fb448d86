//! Correctness on the real default model: tokenizer ids against llama.cpp, KV rollback,
//! batch invariance, and speculative greedy decoding equal to plain greedy decoding.

mod common;

use candle_core::Device;
use std::sync::{Arc, OnceLock};
use tollgate_runtime::engine::{Engine, EngineConfig, Event, Job, Outcome};
use tollgate_runtime::sampling::SamplingParams;
use tollgate_runtime::speculative::SpeculationMode;
use tollgate_runtime::template::ChatMessage;
use tollgate_runtime::{load_model, Loaded};

fn loaded() -> &'static Loaded {
    static L: OnceLock<Loaded> = OnceLock::new();
    L.get_or_init(|| load_model(&common::model_path(), &Device::Cpu).expect("model loads"))
}

#[test]
fn tokenizer_matches_llama_cpp_golden_ids() {
    let golden: serde_json::Value =
        serde_json::from_str(include_str!("fixtures/smollm2_token_ids.json")).unwrap();
    let tk = &loaded().tokenizer;
    for case in golden["cases"].as_array().unwrap() {
        let text = case["text"].as_str().unwrap();
        let want: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        assert_eq!(tk.encode(text, false).unwrap(), want, "ids of {text:?}");
        // And the bytes of those tokens spell the text again.
        let bytes: Vec<u8> = want.iter().flat_map(|&t| tk.token_bytes(t)).collect();
        assert_eq!(String::from_utf8(bytes).unwrap(), text);
    }
}

fn prompt_ids(text: &str) -> Vec<u32> {
    let l = loaded();
    let p = l
        .template
        .render(&[ChatMessage {
            role: "user".into(),
            content: text.into(),
        }])
        .unwrap();
    l.tokenizer.encode(&p, true).unwrap()
}

#[test]
fn kv_rollback_equals_a_fresh_run_and_batches_equal_steps() {
    let m = &loaded().model;
    let prompt = prompt_ids("Name three rivers.");
    // Run a wrong continuation, roll it back, run the right one.
    let mut rolled = m.new_cache().unwrap();
    m.forward(&prompt, &mut rolled).unwrap();
    let base = rolled.len();
    m.forward(&[100, 200, 300, 400], &mut rolled).unwrap();
    rolled.truncate(base);
    assert_eq!(rolled.len(), base);
    let after_rollback = m.forward(&[504, 1017, 28], &mut rolled).unwrap();
    let mut fresh = m.new_cache().unwrap();
    m.forward(&prompt, &mut fresh).unwrap();
    let fresh_logits = m.forward(&[504, 1017, 28], &mut fresh).unwrap();
    assert_eq!(after_rollback, fresh_logits, "rollback must leave no trace");
    // One token at a time gives the same bits as the batch (what makes greedy speculation exact).
    let mut stepwise = m.new_cache().unwrap();
    m.forward(&prompt, &mut stepwise).unwrap();
    for (i, t) in [504u32, 1017, 28].iter().enumerate() {
        assert_eq!(
            m.forward(&[*t], &mut stepwise).unwrap()[0],
            fresh_logits[i],
            "position {i}"
        );
    }
}

/// Greedy generation through the engine; returns the text, the outcome and the emitted deltas.
fn generate(
    engine: &Engine,
    prompt: &str,
    max_tokens: usize,
    stops: Vec<String>,
    params: SamplingParams,
    seed: Option<u64>,
) -> (String, Outcome) {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    engine
        .submit(Job {
            prompt: prompt_ids(prompt),
            params,
            max_tokens,
            stops,
            seed,
            speculate: true,
            events: tx,
        })
        .unwrap();
    let mut text = String::new();
    loop {
        match rx.blocking_recv().expect("engine answers") {
            Event::Delta(d) => text.push_str(&d),
            Event::Done(o) => return (text, o),
            Event::Error(e) => panic!("generation failed: {e}"),
        }
    }
}

fn engine(mode: SpeculationMode, fixed_draft: Option<usize>) -> Engine {
    let l = loaded();
    let draft = (mode == SpeculationMode::Draft).then(|| l.model.clone());
    Engine::start(
        l.model.clone(),
        Arc::clone(&l.tokenizer),
        EngineConfig {
            mode,
            draft,
            slots: 2,
            fixed_draft,
        },
    )
    .unwrap()
}

const GROUNDED: &str = "Repeat this sentence exactly, then say it again: The quick brown fox jumps over the lazy dog near the river bank.";
const CODE: &str = "Fix the bug in this Python function and show the whole function:\n\ndef add(a, b):\n    result = a - b\n    return result\n";

#[test]
fn speculative_greedy_output_equals_plain_greedy() {
    let plain = engine(SpeculationMode::Off, None);
    let ngram = engine(SpeculationMode::Ngram, Some(4));
    let draft = engine(SpeculationMode::Draft, Some(3));
    for prompt in [GROUNDED, CODE, "Write a haiku about autumn."] {
        let (want, o) = generate(&plain, prompt, 48, vec![], SamplingParams::GREEDY, None);
        assert_eq!(o.speculation.drafted_tokens, 0);
        for (name, e) in [("ngram", &ngram), ("draft", &draft)] {
            let (got, s) = generate(e, prompt, 48, vec![], SamplingParams::GREEDY, None);
            assert_eq!(got, want, "{name} on {prompt:?}");
            assert_eq!(s.completion_tokens, o.completion_tokens, "{name}");
            assert_eq!(s.finish_reason, o.finish_reason, "{name}");
            assert!(
                s.speculation.target_passes <= o.speculation.target_passes,
                "{name} never costs passes"
            );
        }
    }
    // Draft = target accepts everything; n-gram must have accepted something on grounded text.
    let (_, s) = generate(&draft, GROUNDED, 32, vec![], SamplingParams::GREEDY, None);
    assert!(
        s.speculation.drafted_tokens > 0 && s.speculation.acceptance_rate == 1.0,
        "{:?}",
        s.speculation
    );
    assert!(s.speculation.tokens_per_pass > 2.5, "{:?}", s.speculation);
    let (_, s) = generate(&ngram, GROUNDED, 48, vec![], SamplingParams::GREEDY, None);
    assert!(s.speculation.accepted_tokens > 0, "{:?}", s.speculation);
}

#[test]
fn stops_and_max_tokens_inside_an_accepted_block() {
    let plain = engine(SpeculationMode::Off, None);
    let draft = engine(SpeculationMode::Draft, Some(6));
    let (full, _) = generate(&plain, GROUNDED, 40, vec![], SamplingParams::GREEDY, None);
    // A stop sequence from the middle of the output, and a max_tokens that falls mid-block.
    let words: Vec<&str> = full.split(' ').collect();
    assert!(words.len() > 6, "{full:?}");
    let stop = format!(" {}", words[4]);
    let cut = full.find(&stop).unwrap();
    for e in [&plain, &draft] {
        let (text, o) = generate(
            e,
            GROUNDED,
            40,
            vec![stop.clone()],
            SamplingParams::GREEDY,
            None,
        );
        assert_eq!(
            text,
            full[..cut],
            "text ends right before the stop sequence"
        );
        assert_eq!(
            o.finish_reason,
            tollgate_runtime::engine::FinishReason::Stop
        );
        let (_, o) = generate(e, GROUNDED, 7, vec![], SamplingParams::GREEDY, None);
        assert_eq!(
            (o.completion_tokens, o.finish_reason),
            (7, tollgate_runtime::engine::FinishReason::Length)
        );
    }
}

#[test]
fn seeded_sampling_is_reproducible_with_and_without_speculation_enabled() {
    let draft = engine(SpeculationMode::Draft, Some(3));
    let params = SamplingParams {
        temperature: 0.8,
        top_p: 0.95,
    };
    let (a, oa) = generate(
        &draft,
        "Tell me a story about a robot.",
        40,
        vec![],
        params,
        Some(42),
    );
    let (b, _) = generate(
        &draft,
        "Tell me a story about a robot.",
        40,
        vec![],
        params,
        Some(42),
    );
    assert_eq!(a, b, "same seed, same text");
    // Draft = target: p == q, so every drafted token is accepted (min(1, p/q) = 1).
    assert_eq!(
        oa.speculation.accepted_tokens,
        oa.speculation.drafted_tokens
    );
}

#[test]
fn concurrent_requests_get_their_own_answers_and_short_ones_do_not_wait_for_long_ones() {
    // No speculation: one token per step makes the race below a matter of step counts.
    let e = engine(SpeculationMode::Off, None); // 2 slots: a third request queues
    let prompts = [
        "Write a long story about a dragon who learns to fly.",
        CODE,
        "Name three rivers.",
    ];
    let max = [96, 24, 3];
    let solo: Vec<(String, Outcome)> = prompts
        .iter()
        .zip(max)
        .map(|(p, m)| generate(&e, p, m, vec![], SamplingParams::GREEDY, None))
        .collect();
    assert!(
        solo[0].1.completion_tokens >= 60,
        "the long request is long: {:?}",
        solo[0].1
    );
    let solo: Vec<String> = solo.into_iter().map(|(t, _)| t).collect();
    let start = std::time::Instant::now();
    let handles: Vec<_> = prompts
        .iter()
        .zip(max)
        .map(|(p, m)| {
            let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
            e.submit(Job {
                prompt: prompt_ids(p),
                params: SamplingParams::GREEDY,
                max_tokens: m,
                stops: vec![],
                seed: None,
                speculate: true,
                events: tx,
            })
            .unwrap();
            std::thread::spawn(move || {
                let mut text = String::new();
                loop {
                    match rx.blocking_recv().unwrap() {
                        Event::Delta(d) => text.push_str(&d),
                        Event::Done(_) => return (text, start.elapsed()),
                        Event::Error(e) => panic!("{e}"),
                    }
                }
            })
        })
        .collect();
    let results: Vec<(String, std::time::Duration)> =
        handles.into_iter().map(|h| h.join().unwrap()).collect();
    for (i, (text, _)) in results.iter().enumerate() {
        assert_eq!(text, &solo[i], "request {i} answered as if alone");
    }
    // The 3-token request queued behind two long ones; round-robin steps let it finish first
    // as soon as a slot frees, instead of after both long generations.
    assert!(
        results[2].1 < results[0].1.max(results[1].1),
        "{:?}",
        results.iter().map(|r| r.1).collect::<Vec<_>>()
    );
}
