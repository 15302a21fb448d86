//! Tollgate's bundled local runtime: serves llama-family GGUF models on candle, on CPU or
//! CUDA, with speculative decoding, behind an OpenAI-compatible HTTP API.
//!
//! Map: [`gguf`] reads the file, [`model`] is the transformer (multi-token forward over a
//! rollback-able [`kv::KvCache`]), [`tokenizer`] and [`template`] turn requests into ids,
//! [`speculative`] drafts and verifies, [`engine`] schedules requests on one worker
//! thread, [`server`] is the HTTP API.

mod attention;
pub mod engine;
pub mod gguf;
pub mod kv;
pub mod metrics;
pub mod model;
pub mod qmatmul;
pub mod sampling;
pub mod server;
pub mod speculative;
pub mod template;
pub mod text;
pub mod tokenizer;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use engine::{Engine, EngineConfig};
use gguf::GgufFile;
use model::Model;
use server::AppState;
pub use server::Token;
use speculative::SpeculationMode;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use tokenizer::ModelTokenizer;

/// Everything `tollgate-runtime serve` (or a `kind: local` gateway backend) is told.
#[derive(Debug, Clone)]
pub struct RuntimeOptions {
    pub model: PathBuf,
    pub draft: Option<PathBuf>,
    pub speculate: SpeculationMode,
    /// The name the model answers to; defaults to the file name without `.gguf`.
    pub name: Option<String>,
    /// Requests generated concurrently (round-robin, one step each).
    pub slots: usize,
    pub max_queue: u64,
    /// `cpu`, or `cuda` / `cuda:N` when built with the `cuda` feature.
    pub device: String,
    /// Pins the draft length; `None` adapts it to the measured acceptance and cost.
    pub fixed_draft: Option<usize>,
    /// Sampling for requests that set none (OpenAI's defaults are 1.0 and 1.0; small models
    /// answer better cooler).
    pub default_temperature: f32,
    pub default_top_p: f32,
}

impl RuntimeOptions {
    pub fn new(model: PathBuf) -> Self {
        Self {
            model,
            draft: None,
            speculate: SpeculationMode::Ngram,
            name: None,
            slots: 4,
            max_queue: 64,
            device: "cpu".into(),
            fixed_draft: None,
            default_temperature: 1.0,
            default_top_p: 1.0,
        }
    }

    pub fn model_name(&self) -> String {
        self.name.clone().unwrap_or_else(|| {
            let file = self
                .model
                .file_name()
                .map(|f| f.to_string_lossy().into_owned())
                .unwrap_or_default();
            file.strip_suffix(".gguf").unwrap_or(&file).to_string()
        })
    }
}

pub fn device(spec: &str) -> Result<Device> {
    match spec {
        "cpu" => Ok(Device::Cpu),
        s if s.starts_with("cuda") => {
            let ordinal = s
                .strip_prefix("cuda:")
                .map(|n| n.parse())
                .transpose()
                .context("cuda:N")?
                .unwrap_or(0);
            Ok(Device::new_cuda(ordinal)?)
        }
        other => bail!("unknown device `{other}` (cpu, cuda, cuda:N)"),
    }
}

/// A loaded model with its tokenizer and chat template.
pub struct Loaded {
    pub model: Arc<Model>,
    pub tokenizer: Arc<ModelTokenizer>,
    pub template: template::ChatTemplate,
}

pub fn load_model(path: &std::path::Path, device: &Device) -> Result<Loaded> {
    let mut g = GgufFile::open(path)?;
    let tokenizer = ModelTokenizer::from_gguf(&g)?;
    let token_text = |id: Option<u32>| {
        id.and_then(|i| tokenizer.token_str(i))
            .unwrap_or("")
            .to_string()
    };
    let template = template::ChatTemplate::new(
        g.string("tokenizer.chat_template"),
        token_text(tokenizer.bos),
        token_text(tokenizer.eos),
    )?;
    let model = Model::load(&mut g, device)?;
    Ok(Loaded {
        model: Arc::new(model),
        tokenizer: Arc::new(tokenizer),
        template,
    })
}

/// Loads the model(s), measures the verify-cost curve and starts the engine.
pub fn build_state(opts: &RuntimeOptions) -> Result<Arc<AppState>> {
    let device = device(&opts.device)?;
    let target = load_model(&opts.model, &device)?;
    let draft = match (&opts.draft, opts.speculate) {
        (Some(path), _) => {
            let d = load_model(path, &device)?;
            if d.tokenizer.vocab() != target.tokenizer.vocab() {
                bail!(
                    "the draft model {} does not share the target's vocabulary",
                    path.display()
                );
            }
            Some(d.model)
        }
        (None, SpeculationMode::Draft) => bail!("--speculate draft needs --draft FILE"),
        (None, _) => None,
    };
    let context_length = target.model.config.context_length;
    let engine = Engine::start(
        target.model.clone(),
        target.tokenizer.clone(),
        EngineConfig {
            mode: opts.speculate,
            draft,
            slots: opts.slots.max(1),
            fixed_draft: opts.fixed_draft,
        },
    )?;
    Ok(Arc::new(AppState {
        engine,
        tokenizer: target.tokenizer,
        template: target.template,
        model_name: opts.model_name(),
        context_length,
        max_queue: opts.max_queue,
        default_temperature: opts.default_temperature,
        default_top_p: opts.default_top_p,
    }))
}

/// Where a runtime may listen: on a loopback address, or anywhere else only with a token (an
/// open runtime reachable from other machines would serve anyone, unmetered).
pub fn check_listen(listen: SocketAddr, token: Option<&Token>) -> Result<()> {
    if token.is_none() && !listen.ip().is_loopback() {
        bail!(
            "refusing to serve on {listen} without a token: a runtime off loopback must require \
             one (set a bearer token), or listen on 127.0.0.1"
        );
    }
    Ok(())
}

/// Serves until the process ends. With `token`, every request must carry it as a bearer token;
/// without one, only a loopback `listen` is accepted ([`check_listen`]).
pub async fn serve(opts: &RuntimeOptions, listen: SocketAddr, token: Option<Token>) -> Result<()> {
    check_listen(listen, token.as_ref())?;
    let state = build_state(opts)?;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("binding {listen}"))?;
    tracing::info!(addr = %listener.local_addr()?, model = %state.model_name, token = token.is_some(), "tollgate-runtime serving");
    axum::serve(listener, server::router(state, token)).await?;
    Ok(())
}

/// Loads the model and serves it from a thread of its own on `listen` (default: a free
/// loopback port); returns the address once it accepts connections. This is how `tollgate
/// serve` runs a `kind: local` backend: inference never shares the proxy's threads, and every
/// request must carry `token` (the gateway's secret), so only the gateway, which meters and
/// bills, can use it.
pub fn spawn_background(
    opts: RuntimeOptions,
    listen: Option<SocketAddr>,
    token: Token,
) -> Result<SocketAddr> {
    let state = build_state(&opts)?;
    let listen = listen.unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let listener =
        std::net::TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    listener.set_nonblocking(true)?;
    let addr = listener.local_addr()?;
    std::thread::Builder::new()
        .name(format!("runtime-{}", state.model_name))
        .spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("tokio runtime");
            rt.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
                if let Err(e) = axum::serve(listener, server::router(state, Some(token))).await {
                    tracing::error!(error = %e, "local runtime server stopped");
                }
            });
        })?;
    Ok(addr)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_loopback_listens_without_a_token() {
        let token = Token::new("t").unwrap();
        for ok in ["127.0.0.1:8090", "[::1]:8090"] {
            assert!(check_listen(ok.parse().unwrap(), None).is_ok(), "{ok}");
        }
        for open in ["0.0.0.0:8090", "10.1.2.3:8090", "[::]:8090"] {
            let err = check_listen(open.parse().unwrap(), None).unwrap_err();
            assert!(err.to_string().contains("token"), "{err}");
            assert!(check_listen(open.parse().unwrap(), Some(&token)).is_ok());
        }
    }
}
