//! TLS on the data plane and the admin API: HTTPS with a certificate made here, streams over it,
//! plain HTTP refused on both ports, and a renewed certificate picked up by a reload (SIGHUP)
//! without a restart.

use std::process::Command;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::harness::{policy, Gateway, MockUpstream};

/// A self-signed certificate for 127.0.0.1 and its key, PEM.
fn self_signed() -> (String, String) {
    let rcgen::CertifiedKey { cert, signing_key } =
        rcgen::generate_simple_self_signed(vec!["127.0.0.1".into(), "localhost".into()]).unwrap();
    (cert.pem(), signing_key.serialize_pem())
}

fn trusting(cert_pem: &str) -> reqwest::Client {
    reqwest::Client::builder()
        .tls_built_in_root_certs(false)
        .add_root_certificate(reqwest::Certificate::from_pem(cert_pem.as_bytes()).unwrap())
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap()
}

#[tokio::test]
async fn both_listeners_serve_https_only() {
    let mock = MockUpstream::start("alpha").await;
    let (cert, key) = self_signed();
    let gw = Gateway::start_tls(&policy(&[("alpha", mock.base_url())], ""), &cert, &key).await;
    assert!(gw.url().starts_with("https://"));
    let key_secret = gw.create_key("acme").await;
    let https = trusting(&cert);
    let body =
        json!({"model": "gpt-test", "messages": [{"role": "user", "content": "Say hello."}]});

    let r = https
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(&key_secret)
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200, "{}", gw.log());
    let v: Value = r.json().await.unwrap();
    assert_eq!(
        v["choices"][0]["message"]["content"],
        mock.words(5).concat()
    );

    // A stream over TLS: every event, then [DONE].
    let mut streamed = body.clone();
    streamed["stream"] = json!(true);
    let r = https
        .post(format!("{}/v1/chat/completions", gw.url()))
        .bearer_auth(&key_secret)
        .json(&streamed)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    assert_eq!(r.headers()["content-type"], "text/event-stream");
    let sse = r.text().await.unwrap();
    let data: Vec<&str> = sse
        .lines()
        .filter_map(|l| l.strip_prefix("data: "))
        .collect();
    assert_eq!(data.last(), Some(&"[DONE]"), "{sse}");
    let text: String = data
        .iter()
        .filter_map(|d| serde_json::from_str::<Value>(d).ok())
        .filter_map(|c| {
            c["choices"][0]["delta"]["content"]
                .as_str()
                .map(String::from)
        })
        .collect();
    assert_eq!(text, mock.words(5).concat());

    // Both requests are metered like any other.
    let rows = gw.ledger("acme", 2).await;
    assert!(rows.iter().all(|r| r.status == 200), "{rows:?}");

    // The admin API over HTTPS, token and all.
    let (status, tenants) = gw.admin_get("/admin/tenants").await;
    assert_eq!(status, 200, "{tenants}");
    assert!(tenants.to_string().contains("acme"), "{tenants}");

    // Plain HTTP on either TLS port gets no answer, and a client that does not trust the
    // certificate gets no connection.
    for port in [gw.port, gw.admin_port] {
        let plain = reqwest::Client::new()
            .get(format!("http://127.0.0.1:{port}/v1/models"))
            .bearer_auth(&key_secret)
            .timeout(Duration::from_secs(10))
            .send()
            .await;
        assert!(plain.is_err(), "plain HTTP answered on {port}: {plain:?}");
        let untrusted = reqwest::Client::builder()
            .tls_built_in_root_certs(false)
            .build()
            .unwrap()
            .get(format!("https://127.0.0.1:{port}/"))
            .send()
            .await;
        assert!(untrusted.is_err(), "{untrusted:?}");
    }
}

#[tokio::test]
async fn a_reload_serves_a_renewed_certificate_without_a_restart() {
    let mock = MockUpstream::start("alpha").await;
    let (old_cert, old_key) = self_signed();
    let gw = Gateway::start_tls(
        &policy(&[("alpha", mock.base_url())], ""),
        &old_cert,
        &old_key,
    )
    .await;
    let health = |client: reqwest::Client, port: u16| async move {
        client
            .get(format!("https://127.0.0.1:{port}/healthz"))
            .send()
            .await
    };
    assert!(health(trusting(&old_cert), gw.port).await.is_ok());

    // Renew in place (same paths, so the policy file does not change) and ask for a reload.
    let (new_cert, new_key) = self_signed();
    std::fs::write(gw.dir.path().join("cert.pem"), &new_cert).unwrap();
    std::fs::write(gw.dir.path().join("key.pem"), &new_key).unwrap();
    let hup = Command::new("kill")
        .arg("-HUP")
        .arg(gw.pid().to_string())
        .status()
        .unwrap();
    assert!(hup.success());
    let deadline = Instant::now() + Duration::from_secs(10);
    while health(trusting(&new_cert), gw.port).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the renewed certificate was never served:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both listeners now present the new certificate, and only it.
    for port in [gw.port, gw.admin_port] {
        assert!(health(trusting(&new_cert), port).await.is_ok(), "{port}");
        assert!(health(trusting(&old_cert), port).await.is_err(), "{port}");
    }

    // Turning TLS off needs a restart: the reload keeps the listeners as they are, and says so.
    let text = std::fs::read_to_string(&gw.config).unwrap();
    let without_tls: String = text
        .lines()
        .filter(|l| !l.starts_with("tls:"))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_ne!(text, without_tls);
    std::fs::write(&gw.config, without_tls).unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !gw.log().contains("turning TLS on or off needs a restart") {
        assert!(Instant::now() < deadline, "{}", gw.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(health(trusting(&new_cert), gw.port).await.is_ok());
}

#[tokio::test]
async fn a_bad_certificate_stops_serve_with_the_field_in_error() {
    let (cert, _) = self_signed();
    let (_, other_key) = self_signed();
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("cert.pem"), &cert).unwrap();
    std::fs::write(dir.path().join("key.pem"), &other_key).unwrap();
    let config = dir.path().join("p.yaml");
    std::fs::write(
        &config,
        format!(
            "listen: [\"127.0.0.1:1\"]\ndatabase_url: sqlite://{}/x.db\n\
             tls: {{ cert: {0}/cert.pem, key: {0}/key.pem }}\n\
             admin: {{ listen: \"127.0.0.1:2\", tls: {{ cert: {0}/missing.pem, key: {0}/key.pem }} }}\n\
             backends:\n  - {{ name: a, base_url: \"http://127.0.0.1:3/v1\" }}\n\
             models:\n  - {{ name: m, targets: [{{ backend: a, model: m }}] }}\ntenants:\n  - name: acme\n",
            dir.path().display()
        ),
    )
    .unwrap();
    let out = crate::harness::gateway::tollgate(&config, &["serve"]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tls.key:"), "{err}");
    assert!(
        err.contains("admin.tls.cert:") && err.contains("missing.pem"),
        "{err}"
    );
    // The key's contents never appear in an error.
    let key_body = other_key.lines().nth(1).unwrap();
    assert!(!err.contains(key_body), "{err}");
}
