//! `tollgate-runtime`: serve one GGUF model over the OpenAI API.

use anyhow::Result;
use clap::{Parser, Subcommand};
use std::net::SocketAddr;
use std::path::PathBuf;
use tollgate_runtime::speculative::SpeculationMode;
use tollgate_runtime::RuntimeOptions;

#[derive(Parser)]
#[command(
    name = "tollgate-runtime",
    version,
    about = "Tollgate's local inference server (GGUF models on candle)"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Serve a model on an OpenAI-compatible API.
    Serve {
        /// The GGUF model file.
        #[arg(long)]
        model: PathBuf,
        /// A smaller GGUF model with the same vocabulary, for `--speculate draft`.
        #[arg(long)]
        draft: Option<PathBuf>,
        /// Speculative decoding: prompt-lookup n-grams, a draft model, or off.
        #[arg(long, default_value = "ngram")]
        speculate: SpeculationMode,
        /// Anything but a loopback address needs a token (see --token-env).
        #[arg(long, default_value = "127.0.0.1:8090")]
        listen: SocketAddr,
        /// Environment variable holding the bearer token every request must carry. When it is
        /// set, requests without it get 401; it must be set to listen off loopback.
        #[arg(long, default_value = "TOLLGATE_RUNTIME_TOKEN")]
        token_env: String,
        /// Name the model answers to (it also answers to `default`). Default: the file name.
        #[arg(long)]
        name: Option<String>,
        /// Requests generated at once; more wait in arrival order.
        #[arg(long, default_value_t = 4)]
        slots: usize,
        /// `cpu`, `cuda` or `cuda:N` (CUDA needs a build with `--features cuda`).
        #[arg(long, default_value = "cpu")]
        device: String,
        /// Always draft this many tokens instead of adapting to acceptance and cost.
        #[arg(long)]
        draft_len: Option<usize>,
        /// Temperature for requests that set none.
        #[arg(long, default_value_t = 1.0)]
        temperature: f32,
        /// top_p for requests that set none.
        #[arg(long, default_value_t = 1.0)]
        top_p: f32,
    },
}

#[tokio::main]
async fn main() -> Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    match Cli::parse().command {
        Command::Serve {
            model,
            draft,
            speculate,
            listen,
            token_env,
            name,
            slots,
            device,
            draft_len,
            temperature,
            top_p,
        } => {
            let opts = RuntimeOptions {
                draft,
                speculate,
                name,
                slots,
                device,
                fixed_draft: draft_len,
                default_temperature: temperature,
                default_top_p: top_p,
                ..RuntimeOptions::new(model)
            };
            let token = tollgate_runtime::Token::from_env(&token_env);
            tollgate_runtime::serve(&opts, listen, token).await
        }
    }
}
