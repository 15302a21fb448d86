//! Runs the real `tollgate` binary against a generated policy file, in a temporary directory.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use tollgate_billing::ledger::LedgerRow;
use tollgate_billing::store::Store;

use super::secrets;

pub const BIN: &str = env!("CARGO_BIN_EXE_tollgate");
/// The admin token every test gateway runs with.
pub const ADMIN_TOKEN: &str = "test-admin-token";
/// The provider key mock backends get (`api_key_env: TOLLGATE_TEST_PROVIDER_KEY`).
pub const PROVIDER_KEY: &str = "sk-provider-secret";
/// A webhook signing secret (`secret_env: TOLLGATE_TEST_ALERT_SECRET`).
pub const ALERT_SECRET: &str = "whsec-test-alert-secret";

/// The secrets every test gateway is given, in the leak registry.
fn register_fixed_secrets() {
    for secret in [ADMIN_TOKEN, PROVIDER_KEY, ALERT_SECRET] {
        secrets::register(secret);
    }
}

/// A free loopback port (bound then released; the gateway binds it right after).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub struct Gateway {
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
    pub port: u16,
    pub admin_port: u16,
    pub database_url: String,
    /// With TLS on both listeners: the certificate (PEM) every harness request trusts.
    pub cert_pem: Option<String>,
    /// Extra environment of the gateway process (set before a restart).
    pub env: Vec<(String, String)>,
    child: Option<Child>,
}

/// Runs a `tollgate` subcommand with `--config`.
pub fn tollgate(config: &Path, args: &[&str]) -> Output {
    register_fixed_secrets();
    let output = Command::new(BIN)
        .arg("--config")
        .arg(config)
        .args(args)
        .env("TOLLGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
        .env("TOLLGATE_TEST_ALERT_SECRET", ALERT_SECRET)
        .output()
        .expect("run tollgate");
    // Key secrets the command printed (`keys create`, `keys rotate`).
    secrets::register_keys_in(&String::from_utf8_lossy(&output.stdout));
    output
}

impl Gateway {
    /// Writes `policy` (a YAML body without `listen` and `database_url`) and starts the gateway.
    /// `database_url`: `None` for a fresh SQLite file.
    pub async fn start(policy: &str, database_url: Option<String>) -> Gateway {
        Gateway::start_with(policy, database_url, None).await
    }

    /// Like [`Gateway::start`], with HTTPS on the data plane and the admin API: the certificate
    /// and key (PEM) are written beside the policy, and every request the harness makes trusts
    /// the certificate.
    pub async fn start_tls(policy: &str, cert_pem: &str, key_pem: &str) -> Gateway {
        Gateway::start_with(policy, None, Some((cert_pem, key_pem))).await
    }

    async fn start_with(
        policy: &str,
        database_url: Option<String>,
        tls: Option<(&str, &str)>,
    ) -> Gateway {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let admin_port = free_port();
        let database_url = database_url
            .unwrap_or_else(|| format!("sqlite://{}", dir.path().join("ledger.db").display()));
        let config = dir.path().join("tollgate.yaml");
        let tls_yaml = match tls {
            Some((cert, key)) => {
                let (cert_path, key_path) =
                    (dir.path().join("cert.pem"), dir.path().join("key.pem"));
                std::fs::write(&cert_path, cert).unwrap();
                std::fs::write(&key_path, key).unwrap();
                format!(
                    "tls: {{ cert: \"{}\", key: \"{}\" }}",
                    cert_path.display(),
                    key_path.display()
                )
            }
            None => String::new(),
        };
        let admin_tls = if tls.is_some() {
            format!(", {tls_yaml}")
        } else {
            String::new()
        };
        let text = format!(
            "listen: [\"127.0.0.1:{port}\"]\ndatabase_url: {database_url}\nkey_refresh_ms: 100\nthreads: 2\n\
             shutdown: {{ drain_secs: 0, timeout_secs: 2 }}\n\
             ledger: {{ flush_interval_ms: 50, spool_path: {} }}\n\
             admin: {{ listen: \"127.0.0.1:{admin_port}\"{admin_tls} }}\n{tls_yaml}\n{policy}",
            dir.path().join("spool.jsonl").display()
        );
        std::fs::write(&config, text).unwrap();
        let mut gateway = Gateway {
            dir,
            config,
            port,
            admin_port,
            database_url,
            cert_pem: tls.map(|(cert, _)| cert.to_string()),
            env: Vec::new(),
            child: None,
        };
        gateway.spawn().await;
        gateway
    }

    /// Starts `tollgate serve` on this gateway's directory and policy, appending to its log.
    pub fn serve_process(&self) -> Child {
        let log = std::fs::OpenOptions::new()
            .append(true)
            .create(true)
            .open(self.dir.path().join("gateway.log"))
            .unwrap();
        Command::new(BIN)
            .arg("--config")
            .arg(&self.config)
            .arg("serve")
            .current_dir(self.dir.path())
            .env("TOLLGATE_TEST_PROVIDER_KEY", PROVIDER_KEY)
            .env("TOLLGATE_TEST_ALERT_SECRET", ALERT_SECRET)
            .env("TOLLGATE_ADMIN_TOKEN", ADMIN_TOKEN)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .stdout(Stdio::from(log.try_clone().unwrap()))
            .stderr(Stdio::from(log))
            .spawn()
            .expect("start tollgate")
    }

    async fn spawn(&mut self) {
        register_fixed_secrets();
        self.child = Some(self.serve_process());
        let deadline = Instant::now() + Duration::from_secs(30);
        let client = self.client();
        loop {
            if let Ok(r) = client.get(format!("{}/healthz", self.url())).send().await {
                if r.status() == 200 {
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("gateway exited with {status}:\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "gateway did not start:\n{}",
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn scheme(&self) -> &'static str {
        if self.cert_pem.is_some() {
            "https"
        } else {
            "http"
        }
    }

    pub fn url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.port)
    }

    pub fn admin_url(&self) -> String {
        format!("{}://127.0.0.1:{}", self.scheme(), self.admin_port)
    }

    /// A client for this gateway's listeners: with TLS, it trusts this gateway's certificate
    /// and nothing else.
    pub fn client(&self) -> reqwest::Client {
        let mut builder = reqwest::Client::builder();
        if let Some(pem) = &self.cert_pem {
            builder = builder
                .tls_built_in_root_certs(false)
                .add_root_certificate(reqwest::Certificate::from_pem(pem.as_bytes()).unwrap());
        }
        builder.build().unwrap()
    }

    /// GETs an admin API path with the admin token; returns status and JSON body.
    pub async fn admin_get(&self, path: &str) -> (u16, serde_json::Value) {
        let r = self
            .client()
            .get(format!("{}{path}", self.admin_url()))
            .bearer_auth(ADMIN_TOKEN)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        (status, r.json().await.unwrap_or(serde_json::Value::Null))
    }

    /// POSTs JSON to an admin API path with the admin token.
    pub async fn admin_post(
        &self,
        path: &str,
        body: serde_json::Value,
    ) -> (u16, serde_json::Value) {
        let r = self
            .client()
            .post(format!("{}{path}", self.admin_url()))
            .bearer_auth(ADMIN_TOKEN)
            .json(&body)
            .send()
            .await
            .unwrap();
        let status = r.status().as_u16();
        let body = r.json().await.unwrap_or(serde_json::Value::Null);
        if let Some(secret) = body["secret"].as_str() {
            secrets::register(secret);
        }
        (status, body)
    }

    /// POSTs a chat completion request authenticated with `key`.
    pub async fn chat(&self, key: &str, body: &serde_json::Value) -> reqwest::Response {
        self.client()
            .post(format!("{}/v1/chat/completions", self.url()))
            .bearer_auth(key)
            .json(body)
            .send()
            .await
            .unwrap()
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("gateway.log")).unwrap_or_default()
    }

    pub fn cli(&self, args: &[&str]) -> Output {
        tollgate(&self.config, args)
    }

    /// Creates a key through the CLI and waits until the running gateway accepts it.
    pub async fn create_key(&self, tenant: &str) -> String {
        let out = self.cli(&["keys", "create", "--tenant", tenant]);
        assert!(
            out.status.success(),
            "keys create: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let secret = String::from_utf8(out.stdout).unwrap().trim().to_string();
        assert!(secret.starts_with("tg-"));
        let deadline = Instant::now() + Duration::from_secs(10);
        let client = self.client();
        while Instant::now() < deadline {
            let r = client
                .get(format!("{}/v1/models", self.url()))
                .bearer_auth(&secret)
                .send()
                .await
                .unwrap();
            if r.status() == 200 {
                return secret;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("key never became valid");
    }

    /// The gateway process's id (for signals).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("running").id()
    }

    /// SIGTERM, then waits for a clean exit.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        Command::new("kill")
            .arg("-TERM")
            .arg(child.id().to_string())
            .status()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                assert!(status.success(), "gateway exit {status}:\n{}", self.log());
                return;
            }
            assert!(Instant::now() < deadline, "gateway did not stop");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub async fn restart(&mut self) {
        self.stop();
        self.spawn().await;
    }

    pub async fn store(&self) -> Store {
        Store::open(&self.database_url).await.unwrap()
    }

    /// Waits until the ledger holds `n` rows for `tenant` and returns them.
    pub async fn ledger(&self, tenant: &str, n: usize) -> Vec<LedgerRow> {
        let store = self.store().await;
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            let rows = store.ledger_rows(tenant).await.unwrap();
            if rows.len() >= n {
                store.close().await;
                assert_eq!(rows.len(), n, "more ledger rows than requests: {rows:#?}");
                return rows;
            }
            assert!(
                Instant::now() < deadline,
                "ledger has {} of {n} rows:\n{}",
                rows.len(),
                self.log()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Every test's gateway log is searched for every secret the tests gave out so far.
        if !std::thread::panicking() {
            secrets::assert_no_secret("the gateway log", &self.log());
        }
    }
}

/// A policy with one model whose targets are `backends` in order (name, base_url).
pub fn policy(backends: &[(&str, String)], extra_backend_yaml: &str) -> String {
    let mut yaml = String::from("backends:\n");
    for (name, url) in backends {
        yaml.push_str(&format!(
            "  - {{ name: {name}, base_url: \"{url}\", api_key_env: TOLLGATE_TEST_PROVIDER_KEY, connect_timeout_ms: 1000, read_timeout_ms: 3000 {extra_backend_yaml} }}\n"
        ));
    }
    yaml.push_str("models:\n  - name: gpt-test\n    tokenizer: o200k_base\n    price: { input: 2.5, cached_input: 1.25, output: 10 }\n    targets:\n");
    for (name, _) in backends {
        yaml.push_str(&format!(
            "      - {{ backend: {name}, model: upstream-{name} }}\n"
        ));
    }
    yaml.push_str("  - name: embed-test\n    tokenizer: o200k_base\n    price: { input: 0.02, output: 0 }\n    targets:\n");
    yaml.push_str(&format!(
        "      - {{ backend: {}, model: upstream-embed }}\n",
        backends[0].0
    ));
    yaml.push_str("tenants:\n  - name: acme\n    tags: { team: platform, cost_center: \"cc-42\" }\n  - name: other\n    models: [embed-test]\n");
    yaml
}

/// A fresh Postgres database for one test, dropped by the caller when done.
pub async fn fresh_postgres() -> (String, String) {
    let admin = std::env::var("TOLLGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let name = format!("tollgate_test_{}", uuid_like());
    let pool = sqlx::PgPool::connect(&admin)
        .await
        .expect("Postgres must be running for these tests");
    sqlx::query(&format!("CREATE DATABASE {name}"))
        .execute(&pool)
        .await
        .unwrap();
    pool.close().await;
    let base = admin.rsplit_once('/').unwrap().0;
    (format!("{base}/{name}"), name)
}

pub async fn drop_postgres(name: &str) {
    let admin = std::env::var("TOLLGATE_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into());
    let pool = sqlx::PgPool::connect(&admin).await.unwrap();
    let _ = sqlx::query(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
        .execute(&pool)
        .await;
    pool.close().await;
}

fn uuid_like() -> String {
    use std::time::{SystemTime, UNIX_EPOCH};
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_nanos();
    format!("{:x}_{}", nanos, std::process::id())
}
