//! API conformance of `tollgate-runtime` with the official `openai` Python SDK as the client:
//! stream chunks, finish_reason, usage, stop sequences across committed speculative blocks.

mod common;

use tollgate_runtime::speculative::SpeculationMode;
use tollgate_runtime::RuntimeOptions;

#[test]
fn openai_python_sdk_conformance() {
    let mut opts = RuntimeOptions::new(common::model_path());
    opts.speculate = SpeculationMode::Ngram;
    opts.fixed_draft = Some(4); // always speculate, so stops land inside accepted blocks
    let token = tollgate_runtime::Token::random();
    let addr =
        tollgate_runtime::spawn_background(opts, None, token.clone()).expect("runtime starts");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/sdk/runtime_client.py"
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = std::process::Command::new(python)
        .arg(script)
        .env("OPENAI_BASE_URL", format!("http://{addr}/v1"))
        .env("OPENAI_API_KEY", token.expose())
        .output()
        .expect("python3 with the openai package");
    assert!(
        out.status.success(),
        "SDK conformance failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}
