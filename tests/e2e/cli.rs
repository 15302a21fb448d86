//! The command line: `config check`, `serve` refusing a bad file, `migrate`.

use std::process::Command;

use crate::harness::gateway::{tollgate, BIN};

#[test]
fn config_check_reports_every_error_with_line_and_column() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.yaml");
    std::fs::write(
        &bad,
        "listen: [\"127.0.0.1:1\"]\nbackends:\n  - name: a\n    base_url: ftp://x\nmodels:\n  - name: m\n    targets:\n      - { backend: b, model: x }\ntenants:\n  - name: t\n    models: [zz]\n",
    )
    .unwrap();
    let out = Command::new(BIN)
        .args(["config", "check"])
        .arg(&bad)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let report = String::from_utf8(out.stderr).unwrap();
    assert!(report.contains("3 errors"), "{report}");
    assert!(
        report.contains("bad.yaml:4:5: backends[0].base_url"),
        "{report}"
    );
    assert!(
        report.contains("bad.yaml:8:11: models[0].targets[0].backend: unknown backend `b`"),
        "{report}"
    );
    assert!(
        report.contains("bad.yaml:11:14: tenants[0].models[0]: unknown model or route `zz`"),
        "{report}"
    );

    // serve refuses the same file with the same message.
    let serve = Command::new(BIN)
        .arg("--config")
        .arg(&bad)
        .arg("serve")
        .output()
        .unwrap();
    assert_eq!(serve.status.code(), Some(2));
    assert!(String::from_utf8(serve.stderr)
        .unwrap()
        .contains("bad.yaml:8:11: models[0].targets[0].backend"));
}

#[test]
fn the_shipped_policy_is_valid_and_migrate_works() {
    let shipped = concat!(env!("CARGO_MANIFEST_DIR"), "/../configs/tollgate.yaml");
    let out = Command::new(BIN)
        .args(["config", "check", shipped])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("t.yaml");
    let db = dir.path().join("x.db");
    let text = std::fs::read_to_string(shipped).unwrap().replace(
        "sqlite://tollgate.db",
        &format!("sqlite://{}", db.display()),
    );
    std::fs::write(&config, text).unwrap();
    let out = tollgate(&config, &["migrate"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(db.exists());
    let out = tollgate(&config, &["keys", "create", "--tenant", "nobody"]);
    assert_eq!(out.status.code(), Some(2), "unknown tenants are refused");
}

#[test]
fn router_eval_reports_apgr_cpt_and_baselines() {
    let sample = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/routing-sample.jsonl"
    );
    let out = Command::new(BIN)
        .args(["router", "eval", "--data", sample])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report = String::from_utf8(out.stdout).unwrap();
    assert!(report.starts_with("200 prompts"), "{report}");
    for line in [
        "tollgate (shipped)",
        "random (expected)       0.5000",
        "prompt length",
        "100% premium -> PGR 1.000",
    ] {
        assert!(report.contains(line), "missing {line:?} in\n{report}");
    }
    let last = report.lines().last().unwrap();
    let apgr: f64 = last
        .strip_prefix("APGR=")
        .unwrap()
        .split_whitespace()
        .next()
        .unwrap()
        .parse()
        .unwrap();
    assert!((0.0..=1.5).contains(&apgr));

    let bad = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(bad.path(), "{\"request\": {}}\n").unwrap();
    let out = Command::new(BIN)
        .args(["router", "eval", "--data"])
        .arg(bad.path())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains(":1: cheap_score and premium_score must be numbers"));
}

#[test]
fn router_score_writes_one_decision_per_input_line() {
    use std::io::Write;

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("r.yaml");
    std::fs::write(
        &config,
        "backends: [{ name: b, base_url: \"http://127.0.0.1:9\" }]\nmodels:\n  - { name: small, price: { input: 1, output: 1 }, targets: [{ backend: b, model: s }], context_tokens: 50 }\n  - { name: large, price: { input: 9, output: 9 }, targets: [{ backend: b, model: l }] }\nroutes:\n  - { name: auto, cheap: small, premium: large, threshold: 0.99 }\ntenants:\n  - name: t\n",
    )
    .unwrap();
    let mut child = Command::new(BIN)
        .arg("--config")
        .arg(&config)
        .args(["router", "score", "--route", "auto"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let long = "word ".repeat(100);
    let input = format!(
        "{{\"messages\": [{{\"role\": \"user\", \"content\": \"hi\"}}], \"max_tokens\": 5}}\nnot json\n{{\"messages\": [{{\"role\": \"user\", \"content\": \"{long}\"}}], \"max_tokens\": 5}}\n"
    );
    child
        .stdin
        .take()
        .unwrap()
        .write_all(input.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success());
    let lines: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.len(), 3);
    assert_eq!(lines[0]["tier"], "cheap");
    assert!(lines[0]["score"].as_f64().unwrap() < 0.99);
    assert!(lines[1]["error"].as_str().unwrap().starts_with("not JSON"));
    assert_eq!(lines[2]["tier"], "premium");
    assert_eq!(
        lines[2]["reason"],
        "context longer than the cheap model's window"
    );
}
