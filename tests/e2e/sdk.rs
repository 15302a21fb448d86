//! The official `openai` Python SDK as a real client (installed by `.ci/run`).

use std::process::Command;

use crate::harness::{policy, Gateway, MockUpstream};

#[tokio::test]
async fn openai_python_sdk_works_against_the_gateway() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let key = gw.create_key("acme").await;
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/sdk/openai_client.py");
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
    let out = tokio::task::spawn_blocking({
        let url = format!("{}/v1", gw.url());
        let expected = mock.words(5).concat();
        move || {
            Command::new(python)
                .arg(script)
                .env("OPENAI_BASE_URL", url)
                .env("OPENAI_API_KEY", key)
                .env("EXPECTED_TEXT", expected)
                .output()
                .expect("python3 with the openai package (pip install openai)")
        }
    })
    .await
    .unwrap();
    assert!(
        out.status.success(),
        "SDK script failed:\n{}\n{}\ngateway log:\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        gw.log()
    );
    // 4 proxied calls plus the authenticated 404; listing models is not metered.
    let rows = gw.ledger("acme", 5).await;
    assert_eq!(rows.iter().filter(|r| r.outcome == "ok").count(), 4);
}
