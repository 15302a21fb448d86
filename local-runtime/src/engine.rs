//! The generation engine: one worker thread owns the model(s) and serves every active
//! request in turn, one decode (or verify) step each, so a long generation never starves
//! a short one. Requests beyond `slots` wait in arrival order.

use crate::kv::KvCache;
use crate::metrics::Metrics;
use crate::model::Model;
use crate::sampling::{distribution, sample, SamplingParams};
use crate::speculative::{
    verify, CostCurve, Draft, DraftLength, DraftModelProposer, NgramProposer, Proposer, SpecStats,
    SpeculationMode,
};
use crate::text::TextStream;
use crate::tokenizer::ModelTokenizer;
use anyhow::Result;
use rand::{rngs::StdRng, SeedableRng};
use serde::Serialize;
use std::sync::{mpsc, Arc};
use std::time::Instant;
use tokio::sync::mpsc::UnboundedSender;

/// Prompt tokens run per step: long prompts are prefilled in slices between other requests' steps.
const PREFILL_CHUNK: usize = 256;
/// Longest draft block considered.
pub const MAX_DRAFT: usize = 8;

pub struct Job {
    pub prompt: Vec<u32>,
    pub params: SamplingParams,
    pub max_tokens: usize,
    pub stops: Vec<String>,
    pub seed: Option<u64>,
    /// Per-request override: `false` decodes plainly whatever the server's mode.
    pub speculate: bool,
    pub events: UnboundedSender<Event>,
}

#[derive(Debug)]
pub enum Event {
    Delta(String),
    Done(Outcome),
    Error(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum FinishReason {
    Stop,
    Length,
}

#[derive(Debug, Clone, Serialize)]
pub struct Outcome {
    pub finish_reason: FinishReason,
    pub prompt_tokens: usize,
    pub completion_tokens: usize,
    pub speculation: SpecReport,
    pub time_to_first_token_ms: f64,
    pub decode_ms: f64,
}

/// Speculation as reported in the response's `usage.speculative`.
#[derive(Debug, Clone, Serialize)]
pub struct SpecReport {
    pub mode: SpeculationMode,
    pub drafted_tokens: u64,
    pub accepted_tokens: u64,
    pub acceptance_rate: f64,
    pub target_passes: u64,
    pub tokens_per_pass: f64,
}

/// What the worker needs besides the target model.
pub struct EngineConfig {
    pub mode: SpeculationMode,
    pub draft: Option<Arc<Model>>,
    pub slots: usize,
    /// Pins the draft length instead of adapting it (benchmarks and tests).
    pub fixed_draft: Option<usize>,
}

#[derive(Clone)]
pub struct Engine {
    tx: mpsc::Sender<Job>,
    pub metrics: Arc<Metrics>,
    pub curve: Arc<CostCurve>,
}

impl Engine {
    /// Measures the verify-cost curve, then starts the worker thread.
    pub fn start(
        model: Arc<Model>,
        tokenizer: Arc<ModelTokenizer>,
        config: EngineConfig,
    ) -> Result<Self> {
        let curve = Arc::new(measure_cost_curve(&model, MAX_DRAFT + 1)?);
        let draft_cost = match &config.draft {
            Some(d) => one_token_cost(d)? / one_token_cost(&model)?,
            None => 0.0,
        };
        tracing::info!(curve = ?curve.relative, draft_cost, "verify cost relative to a one-token pass");
        let metrics = Arc::new(Metrics::default());
        let (tx, rx) = mpsc::channel();
        let worker = Worker {
            model,
            tokenizer,
            config,
            curve: curve.clone(),
            draft_cost,
            metrics: metrics.clone(),
        };
        std::thread::Builder::new()
            .name("tollgate-runtime-engine".into())
            .spawn(move || worker.run(rx))?;
        Ok(Self { tx, metrics, curve })
    }

    pub fn submit(&self, job: Job) -> Result<()> {
        self.metrics
            .queued
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.tx
            .send(job)
            .map_err(|_| anyhow::anyhow!("the engine has stopped"))
    }
}

struct Worker {
    model: Arc<Model>,
    tokenizer: Arc<ModelTokenizer>,
    config: EngineConfig,
    curve: Arc<CostCurve>,
    draft_cost: f64,
    metrics: Arc<Metrics>,
}

struct Active {
    job: Job,
    tokens: Vec<u32>,
    cache: KvCache,
    prefilled: usize,
    text: TextStream,
    completion: usize,
    stats: SpecStats,
    proposer: Option<Box<dyn Proposer>>,
    length: DraftLength,
    rng: StdRng,
    started: Instant,
    first_token: Option<Instant>,
}

enum Step {
    Continue,
    Finished(FinishReason),
    /// The client went away.
    Abandoned,
}

impl Worker {
    fn run(self, rx: mpsc::Receiver<Job>) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut active: Vec<Active> = Vec::new();
        loop {
            while active.len() < self.config.slots {
                let job = if active.is_empty() {
                    rx.recv().ok()
                } else {
                    rx.try_recv().ok()
                };
                let Some(job) = job else {
                    if active.is_empty() {
                        return; // every sender is gone: the server has shut down
                    }
                    break;
                };
                self.metrics.queued.fetch_sub(1, Relaxed);
                match self.admit(job) {
                    Ok(a) => active.push(a),
                    Err((job, e)) => {
                        let _ = job.events.send(Event::Error(e.to_string()));
                    }
                }
            }
            let mut i = 0;
            while i < active.len() {
                let outcome = self.step(&mut active[i]);
                match outcome {
                    Ok(Step::Continue) => i += 1,
                    Ok(Step::Finished(reason)) => {
                        let a = active.swap_remove(i);
                        self.finish(a, reason);
                    }
                    Ok(Step::Abandoned) => {
                        active.swap_remove(i);
                    }
                    Err(e) => {
                        let a = active.swap_remove(i);
                        tracing::error!(error = %e, "generation failed");
                        let _ = a.job.events.send(Event::Error(e.to_string()));
                    }
                }
            }
            self.metrics.active.store(active.len() as u64, Relaxed);
        }
    }

    fn admit(&self, job: Job) -> Result<Active, (Job, anyhow::Error)> {
        let cache = match self.model.new_cache() {
            Ok(c) => c,
            Err(e) => return Err((job, e)),
        };
        let proposer: Option<Box<dyn Proposer>> = match (self.config.mode, job.speculate) {
            (SpeculationMode::Ngram, true) => Some(Box::new(NgramProposer::default())),
            (SpeculationMode::Draft, true) => match &self.config.draft {
                Some(d) => match DraftModelProposer::new(d.clone(), self.draft_cost) {
                    Ok(p) => Some(Box::new(p)),
                    Err(e) => return Err((job, e)),
                },
                None => None,
            },
            _ => None,
        };
        let rng = match job.seed {
            Some(s) => StdRng::seed_from_u64(s),
            None => StdRng::from_entropy(),
        };
        Ok(Active {
            tokens: job.prompt.clone(),
            text: TextStream::new(job.stops.clone()),
            job,
            cache,
            prefilled: 0,
            completion: 0,
            stats: SpecStats::default(),
            proposer,
            length: DraftLength::new(MAX_DRAFT),
            rng,
            started: Instant::now(),
            first_token: None,
        })
    }

    fn step(&self, a: &mut Active) -> Result<Step> {
        if a.job.events.is_closed() {
            return Ok(Step::Abandoned);
        }
        let prompt_len = a.job.prompt.len();
        if a.prefilled < prompt_len {
            let end = (a.prefilled + PREFILL_CHUNK).min(prompt_len);
            let logits = self
                .model
                .forward(&a.job.prompt[a.prefilled..end], &mut a.cache)?;
            a.prefilled = end;
            if end < prompt_len {
                return Ok(Step::Continue);
            }
            let first = sample(
                &distribution(logits.last().expect("non-empty chunk"), a.job.params),
                &mut a.rng,
            );
            a.first_token = Some(Instant::now());
            return Ok(self.emit(a, &[first]));
        }
        // Invariant: the cache holds every token but the last, which this pass runs first.
        let pending = *a.tokens.last().expect("a token was emitted after prefill");
        let base = a.cache.len();
        let room =
            (self.model.config.context_length - base - 1).min(a.job.max_tokens - a.completion - 1);
        let draft = match a.proposer.as_mut() {
            Some(p) if room > 0 => {
                let k = match self.config.fixed_draft {
                    Some(k) => k,
                    None => a.length.choose(&self.curve, |k| p.relative_cost(k)),
                }
                .min(room);
                if k > 0 {
                    p.propose(&a.tokens, k, a.job.params, &mut a.rng)?
                } else {
                    Draft::default()
                }
            }
            _ => Draft::default(),
        };
        let mut input = Vec::with_capacity(draft.tokens.len() + 1);
        input.push(pending);
        input.extend_from_slice(&draft.tokens);
        let logits = self.model.forward(&input, &mut a.cache)?;
        let verdict = verify(&logits, &draft, a.job.params, &mut a.rng);
        a.cache.truncate(base + 1 + verdict.accepted);
        a.stats.target_passes += 1;
        a.stats.drafted += draft.tokens.len() as u64;
        a.stats.accepted += verdict.accepted as u64;
        a.length.observe(draft.tokens.len(), verdict.accepted);
        let mut block = draft.tokens[..verdict.accepted].to_vec();
        block.push(verdict.next);
        Ok(self.emit(a, &block))
    }

    /// Emits a block of tokens in order; a stop token, stop sequence, `max_tokens` or the
    /// context limit inside the block ends the request there and drops the rest.
    fn emit(&self, a: &mut Active, block: &[u32]) -> Step {
        for &t in block {
            a.tokens.push(t);
            if self.tokenizer.is_stop(t) {
                return Step::Finished(FinishReason::Stop);
            }
            a.completion += 1;
            let released = a.text.push(&self.tokenizer.token_bytes(t));
            if !released.text.is_empty() && a.job.events.send(Event::Delta(released.text)).is_err()
            {
                return Step::Abandoned;
            }
            if released.stopped {
                return Step::Finished(FinishReason::Stop);
            }
            if a.completion >= a.job.max_tokens
                || a.tokens.len() >= self.model.config.context_length
            {
                return Step::Finished(FinishReason::Length);
            }
        }
        Step::Continue
    }

    fn finish(&self, mut a: Active, reason: FinishReason) {
        let rest = a.text.finish();
        if !rest.is_empty() {
            let _ = a.job.events.send(Event::Delta(rest));
        }
        let now = Instant::now();
        let first = a.first_token.unwrap_or(now);
        let passes = a.stats.target_passes.max(1);
        let outcome = Outcome {
            finish_reason: reason,
            prompt_tokens: a.job.prompt.len(),
            completion_tokens: a.completion,
            speculation: SpecReport {
                mode: if a.proposer.is_some() {
                    self.config.mode
                } else {
                    SpeculationMode::Off
                },
                drafted_tokens: a.stats.drafted,
                accepted_tokens: a.stats.accepted,
                acceptance_rate: a.stats.acceptance_rate(),
                target_passes: a.stats.target_passes,
                // Each decode pass yields its accepted drafts plus one token of its own.
                tokens_per_pass: (a.stats.accepted + a.stats.target_passes) as f64 / passes as f64,
            },
            time_to_first_token_ms: (first - a.started).as_secs_f64() * 1e3,
            decode_ms: (now - first).as_secs_f64() * 1e3,
        };
        self.metrics.record(&outcome);
        let _ = a.job.events.send(Event::Done(outcome));
    }
}

/// Seconds for one forward pass of `n` tokens after a short context, best of five (the
/// minimum is the least disturbed by whatever else the machine runs).
fn time_forward(model: &Model, cache: &mut KvCache, n: usize) -> Result<f64> {
    let base = cache.len();
    let tokens: Vec<u32> = (0..n as u32).map(|i| 100 + i).collect();
    let mut best = f64::INFINITY;
    for _ in 0..5 {
        let t = Instant::now();
        model.forward(&tokens, cache)?;
        best = best.min(t.elapsed().as_secs_f64());
        cache.truncate(base);
    }
    Ok(best)
}

fn warm_cache(model: &Model) -> Result<KvCache> {
    let mut cache = model.new_cache()?;
    let context: Vec<u32> = (0..64).map(|i| 200 + i).collect();
    model.forward(&context, &mut cache)?;
    Ok(cache)
}

fn one_token_cost(model: &Model) -> Result<f64> {
    let mut cache = warm_cache(model)?;
    time_forward(model, &mut cache, 1)
}

/// The cost of a pass over n = 1..=max tokens relative to one token, on this machine.
pub fn measure_cost_curve(model: &Model, max: usize) -> Result<CostCurve> {
    let mut cache = warm_cache(model)?;
    let one = time_forward(model, &mut cache, 1)?;
    let mut relative = vec![1.0];
    for n in 2..=max {
        relative.push(time_forward(model, &mut cache, n)? / one);
    }
    // Measurement noise must not make a longer pass look cheaper than a shorter one.
    for i in 1..relative.len() {
        relative[i] = relative[i].max(relative[i - 1]);
    }
    Ok(CostCurve { relative })
}
