use super::*;

const VALID: &str = r#"
listen: ["127.0.0.1:9000"]
database_url: sqlite://test.db
backends:
  - name: primary
    base_url: http://127.0.0.1:1234/v1/
    api_key_env: TOLLGATE_TEST_UNSET_VARIABLE
  - name: secondary
    base_url: https://api.example.com
models:
  - name: gpt-4o-mini
    price: { input: 0.15, cached_input: 0.075, output: 0.6 }
    targets:
      - { backend: primary, model: upstream-a }
      - { backend: secondary, model: upstream-b }
tenants:
  - name: acme
    models: [gpt-4o-mini]
  - name: everyone
"#;

#[test]
fn loads_a_valid_file() {
    let policy = Policy::from_yaml(VALID).expect("valid");
    assert_eq!(
        policy.listen,
        vec!["127.0.0.1:9000".parse::<SocketAddr>().unwrap()]
    );
    let primary = &policy.backends[0];
    assert_eq!(
        (
            primary.tls,
            primary.host.as_str(),
            primary.port,
            primary.base_path.as_str()
        ),
        (false, "127.0.0.1", 1234, "/v1")
    );
    let secondary = &policy.backends[1];
    assert_eq!(
        (secondary.tls, secondary.port, secondary.base_path.as_str()),
        (true, 443, "")
    );
    let model = policy.model("gpt-4o-mini").unwrap();
    assert_eq!(
        model.price,
        Price {
            input: 150_000,
            cached_input: 75_000,
            output: 600_000,
            ..Default::default()
        }
    );
    assert_eq!(model.targets.len(), 2);
    assert_eq!(model.targets[1].upstream_model, "upstream-b");
    assert!(policy.tenant_may_use("acme", "gpt-4o-mini"));
    assert!(policy.tenant_may_use("everyone", "gpt-4o-mini"));
    assert!(!policy.tenant_may_use("nobody", "gpt-4o-mini"));
    assert_eq!(policy.warnings.len(), 1, "unset key variable is a warning");
    assert_eq!(policy.max_body_bytes, 16 * 1024 * 1024);
}

#[test]
fn reports_every_error_with_its_position() {
    let text = r#"listen: ["127.0.0.1:9000"]
backends:
  - name: a
    base_url: http://127.0.0.1:1
    timeout: 5
  - name: b
    base_url: "not a url"
models:
  - name: m
    targets:
      - { backend: nowhere, model: x }
tenants:
  - name: t
    models: [m, ghost]
"#;
    let errors = Policy::from_yaml(text).unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert!(
        shown
            .iter()
            .any(|e| e.starts_with("5:5: backends[0].timeout: unknown field `timeout`")),
        "{shown:#?}"
    );
    // Section errors stop validation: the unknown key is reported first; fix it and the rest appear.
    let fixed = text.replace("    timeout: 5\n", "");
    let errors = Policy::from_yaml(&fixed).unwrap_err();
    let shown: Vec<String> = errors.iter().map(ToString::to_string).collect();
    assert_eq!(shown.len(), 3, "{shown:#?}");
    assert!(
        shown[0].starts_with("6:5: backends[1].base_url:"),
        "{shown:#?}"
    );
    assert!(
        shown[1].starts_with("10:11: models[0].targets[0].backend: unknown backend `nowhere`"),
        "{shown:#?}"
    );
    assert!(
        shown[2].starts_with("13:17: tenants[0].models[1]: unknown model or route `ghost`"),
        "{shown:#?}"
    );
}

#[test]
fn reports_errors_in_several_entries_at_once() {
    let text = "backends:\n  - name: a\n    base_url: http://x\n    colour: red\n  - name: b\n    base_url: http://y\n    size: 1\nmodels: []\n";
    let errors = Policy::from_yaml(text).unwrap_err();
    let paths: Vec<&str> = errors.iter().map(|e| e.path.as_str()).collect();
    assert_eq!(
        paths,
        vec!["backends[0].colour", "backends[1].size"],
        "{errors:#?}"
    );
    assert_eq!((errors[0].line, errors[0].col), (Some(4), Some(5)));
}

#[test]
fn syntax_and_type_errors_have_positions() {
    let errors = Policy::from_yaml("listen: [\n").unwrap_err();
    assert!(errors[0].line.is_some(), "{errors:?}");
    let errors = Policy::from_yaml("max_body_bytes: lots\nbackends: []\n").unwrap_err();
    assert_eq!(errors[0].path, "max_body_bytes");
    assert_eq!(errors[0].line, Some(1));
    let errors = Policy::from_yaml("surprise: 1\n").unwrap_err();
    assert_eq!(errors[0].path, "surprise");
}

#[test]
fn local_backends_are_validated_and_carry_runtime_options() {
    let local = |fields: &str| {
        format!(
            "database_url: sqlite://t.db\nbackends:\n  - {{ name: local, kind: local{fields} }}\n\
             models:\n  - {{ name: smol, targets: [{{ backend: local, model: default }}] }}\ntenants:\n  - name: acme\n"
        )
    };
    let policy = Policy::from_yaml(&local(
        ", model_path: m.gguf, speculate: off, slots: 3, default_temperature: 0.2, listen: \"127.0.0.1:8090\"",
    ))
    .expect("valid");
    let backend = &policy.backends[0];
    let spec = backend.local.as_ref().expect("local");
    assert_eq!(spec.options.model, std::path::PathBuf::from("m.gguf"));
    assert_eq!(spec.options.slots, 3);
    assert_eq!(spec.options.default_temperature, 0.2);
    assert_eq!(spec.listen, Some("127.0.0.1:8090".parse().unwrap()));
    assert_eq!(
        (
            backend.host.as_str(),
            backend.tls,
            backend.base_path.as_str()
        ),
        ("127.0.0.1", false, "/v1")
    );
    // Until serve starts the runtime there is no port; after, the backend reports the runtime's.
    assert_eq!(backend.port(), 0);
    spec.addr.set("127.0.0.1:4242".parse().unwrap()).unwrap();
    assert_eq!(backend.port(), 4242);

    for (fields, path, message) in [
        ("", "backends[0].model_path", "required"),
        (
            ", model_path: m.gguf, base_url: \"http://x\"",
            "backends[0].base_url",
            "remove base_url",
        ),
        (
            ", model_path: m.gguf, speculate: draft",
            "backends[0].draft_path",
            "required with `speculate: draft`",
        ),
        (
            ", model_path: m.gguf, speculate: medusa",
            "backends[0].speculate",
            "unknown speculation mode",
        ),
        (
            ", model_path: m.gguf, slots: 0",
            "backends[0].slots",
            "between 1 and 256",
        ),
        (
            ", model_path: m.gguf, device: tpu",
            "backends[0].device",
            "cpu",
        ),
    ] {
        let errors = Policy::from_yaml(&local(fields)).expect_err(fields);
        assert!(
            errors
                .iter()
                .any(|e| e.path == path && e.message.contains(message)),
            "{fields}: {errors:?}"
        );
    }
    // And runtime fields on an HTTP backend are mistakes, not ignored.
    let errors = Policy::from_yaml(&VALID.replace(
        "api_key_env: TOLLGATE_TEST_UNSET_VARIABLE",
        "api_key_env: TOLLGATE_TEST_UNSET_VARIABLE\n    model_path: m.gguf",
    ))
    .expect_err("model_path on an openai backend");
    assert!(
        errors.iter().any(|e| e.path == "backends[0].model_path"),
        "{errors:?}"
    );
}

#[test]
fn every_shipped_policy_file_is_valid() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs");
    let mut files = vec![root.join("tollgate.yaml")];
    for entry in std::fs::read_dir(root.join("examples")).unwrap() {
        files.push(entry.unwrap().path());
    }
    assert!(files.len() >= 4, "{files:?}");
    for file in files {
        if let Err(e) = Policy::load(&file) {
            panic!("{e}");
        }
    }
}

#[test]
fn diff_reports_prices_budgets_routes_access_and_backends() {
    let old = Policy::from_yaml(VALID).unwrap();
    let new = Policy::from_yaml(
        &VALID
            .replace("input: 0.15,", "input: 0.30,")
            .replace(
                "    models: [gpt-4o-mini]\n",
                "    budgets:\n      - { limit_usd: 5, period: daily }\n    rpm: 60\n",
            )
            .replace(
                "base_url: https://api.example.com",
                "base_url: https://api.example.org",
            ),
    )
    .unwrap();
    let changes: Vec<String> = diff(&old, &new).iter().map(|c| c.to_string()).collect();
    let has = |s: &str| changes.iter().any(|c| c.contains(s));
    assert!(
        has(
            "prices    gpt-4o-mini: $0.15 in / $0.075 cached / $0.60 out per 1M tokens -> $0.30 in"
        ),
        "{changes:#?}"
    );
    assert!(
        has("budgets   acme: added $5.00 daily (hard)"),
        "{changes:#?}"
    );
    assert!(has("limits    acme: rpm unlimited -> 60"), "{changes:#?}");
    assert!(
        has("access    acme: models gpt-4o-mini -> every model"),
        "{changes:#?}"
    );
    assert!(
        has("backends  secondary: https://api.example.com:443 -> https://api.example.org:443"),
        "{changes:#?}"
    );
    assert_eq!(changes.len(), 5, "{changes:#?}");
    assert!(diff(&old, &Policy::from_yaml(VALID).unwrap()).is_empty());
}

#[test]
fn admin_and_retention_settings_are_checked() {
    let policy = Policy::from_yaml(VALID).expect("valid");
    assert_eq!(policy.admin_listen, Some("127.0.0.1:9090".parse().unwrap()));
    let on_data_plane = format!("{VALID}admin: {{ listen: \"127.0.0.1:9000\" }}\n");
    let errors = Policy::from_yaml(&on_data_plane).unwrap_err();
    assert!(
        errors.iter().any(|e| e.path == "admin.listen"),
        "{errors:?}"
    );
    let off = format!("{VALID}admin: {{ enabled: false }}\n");
    assert_eq!(Policy::from_yaml(&off).unwrap().admin_listen, None);

    let lifetime = VALID.replace(
        "  - name: everyone\n",
        "  - name: everyone\n    budgets: [{ limit_usd: 10, period: total }]\n",
    );
    let with_retention = format!("{lifetime}ledger: {{ retention_months: 12 }}\n");
    let errors = Policy::from_yaml(&with_retention).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.path == "ledger.retention_months" && e.message.contains("everyone")),
        "{errors:?}"
    );
    assert!(Policy::from_yaml(&format!("{lifetime}ledger: {{ retention_months: 0 }}\n")).is_err());
    assert!(Policy::from_yaml(&format!("{VALID}ledger: {{ retention_months: 12 }}\n")).is_ok());
}

#[test]
fn tls_files_are_read_at_load_and_their_changes_reported() {
    let dir = tempfile::tempdir().unwrap();
    let pair = |name: &str| {
        let rcgen::CertifiedKey { cert, signing_key } =
            rcgen::generate_simple_self_signed(vec!["127.0.0.1".into()]).unwrap();
        let (c, k) = (
            dir.path().join(format!("{name}.crt")),
            dir.path().join(format!("{name}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, signing_key.serialize_pem()).unwrap();
        (c.display().to_string(), k.display().to_string())
    };
    let (cert, key) = pair("a");
    let with = |data: (&str, &str), admin: (&str, &str)| {
        format!(
            "{VALID}tls: {{ cert: \"{}\", key: \"{}\" }}\nadmin: {{ tls: {{ cert: \"{}\", key: \"{}\" }} }}\n",
            data.0, data.1, admin.0, admin.1
        )
    };
    let policy = Policy::from_yaml(&with((&cert, &key), (&cert, &key))).expect("valid");
    assert_eq!(
        policy.tls.as_ref().unwrap().cert.display().to_string(),
        cert
    );
    assert!(policy.admin_tls.is_some());
    assert!(Policy::from_yaml(VALID).unwrap().tls.is_none());

    let errors = Policy::from_yaml(&with(
        (&cert, "/nonexistent.key"),
        ("/nonexistent.crt", &key),
    ))
    .unwrap_err();
    let at = |path: &str| errors.iter().find(|e| e.path == path);
    let tls_line = VALID.lines().count() + 1;
    assert!(
        at("tls.key").is_some_and(|e| e.line == Some(tls_line)),
        "{errors:?}"
    );
    assert!(at("admin.tls.cert").is_some(), "{errors:?}");

    // A renewed certificate is a change `config diff` (and a reload's log) shows.
    let (renewed, renewed_key) = pair("b");
    let old = Policy::from_yaml(&with((&cert, &key), (&cert, &key))).unwrap();
    let new = Policy::from_yaml(&with((&renewed, &renewed_key), (&cert, &key))).unwrap();
    let changes: Vec<String> = diff(&old, &new).iter().map(|c| c.to_string()).collect();
    assert_eq!(changes.len(), 1, "{changes:?}");
    assert!(
        changes[0].starts_with("server    tls: ") && changes[0].contains(&renewed),
        "{changes:?}"
    );
    let off = diff(&old, &Policy::from_yaml(VALID).unwrap());
    assert!(off
        .iter()
        .any(|c| c.subject == "admin.tls" && c.change.ends_with("-> off")));
}

#[test]
fn a_local_runtime_listens_off_loopback_only_with_a_token() {
    let local = |fields: &str| {
        format!(
            "database_url: sqlite://t.db\nbackends:\n  - {{ name: local, kind: local, model_path: m.gguf{fields} }}\n\
             models:\n  - {{ name: smol, targets: [{{ backend: local, model: default }}] }}\ntenants:\n  - name: acme\n"
        )
    };
    let errors = Policy::from_yaml(&local(", listen: \"0.0.0.0:8090\"")).unwrap_err();
    assert!(
        errors
            .iter()
            .any(|e| e.path == "backends[0].listen" && e.message.contains("token_env")),
        "{errors:?}"
    );
    // With a token variable: valid; unset, a warning (serve then refuses to start it).
    let policy = Policy::from_yaml(&local(
        ", listen: \"0.0.0.0:8090\", token_env: TOLLGATE_TEST_UNSET_VARIABLE",
    ))
    .expect("valid");
    let backend = &policy.backends[0];
    assert!(backend.local.as_ref().unwrap().token.is_none());
    assert!(
        policy
            .warnings
            .iter()
            .any(|w| w.contains("TOLLGATE_TEST_UNSET_VARIABLE")),
        "{:?}",
        policy.warnings
    );
    // Loopback needs nothing; the bearer sent upstream is the secret of the running runtime.
    let policy = Policy::from_yaml(&local(", listen: \"127.0.0.1:8090\"")).expect("valid");
    let backend = &policy.backends[0];
    assert_eq!(backend.bearer(), None, "no runtime started yet");
    let secret = tollgate_runtime::Token::random();
    backend
        .local
        .as_ref()
        .unwrap()
        .secret
        .set(secret.clone())
        .unwrap();
    assert_eq!(backend.bearer(), Some(secret.expose()));
    // `token_env` belongs to local backends only.
    let errors = Policy::from_yaml(&VALID.replace(
        "api_key_env: TOLLGATE_TEST_UNSET_VARIABLE",
        "api_key_env: TOLLGATE_TEST_UNSET_VARIABLE\n    token_env: X",
    ))
    .unwrap_err();
    assert!(
        errors.iter().any(|e| e.path == "backends[0].token_env"),
        "{errors:?}"
    );
}

#[test]
fn debug_prints_never_show_provider_keys_or_alert_secrets() {
    let key = "sk-debug-print-provider-key-0123";
    let secret = "whsec-debug-print-alert-secret";
    std::env::set_var("TOLLGATE_TEST_DEBUG_PRINT_KEY", key);
    std::env::set_var("TOLLGATE_TEST_DEBUG_PRINT_SECRET", secret);
    let text = format!(
        "{VALID}    alerts: {{ webhook_url: \"https://hooks.example.com/T0/B0/hooktoken\", secret_env: TOLLGATE_TEST_DEBUG_PRINT_SECRET }}\n"
    )
    .replace(
        "api_key_env: TOLLGATE_TEST_UNSET_VARIABLE",
        "api_key_env: TOLLGATE_TEST_DEBUG_PRINT_KEY",
    );
    let policy = Policy::from_yaml(&text).expect("valid");
    assert_eq!(policy.backends[0].api_key.as_deref(), Some(key));
    let printed = format!("{policy:?}");
    assert!(
        printed.contains("primary") && printed.contains("[redacted]"),
        "{printed}"
    );
    for hidden in [key, secret, "hooktoken"] {
        assert!(!printed.contains(hidden), "{hidden} in {printed}");
    }
}
