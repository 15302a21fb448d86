//! Shared by the real-model tests: the default model, fetched the way users fetch it.

use std::path::PathBuf;
use std::sync::OnceLock;

/// Path of SmolLM2-135M-Instruct, fetched (and checksum-verified) by `scripts/fetch-model`.
pub fn model_path() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = std::process::Command::new(root.join("scripts/fetch-model"))
            .output()
            .expect("running scripts/fetch-model");
        assert!(
            out.status.success(),
            "fetch-model failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        root.join(String::from_utf8(out.stdout).unwrap().trim())
    })
    .clone()
}
