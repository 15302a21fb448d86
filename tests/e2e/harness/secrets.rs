//! Every secret the end-to-end tests hand out (admin tokens, provider keys given to mock
//! backends, alert signing secrets, tenant keys the gateway created), in one process-wide
//! registry, and the check that none of them appears where it must never be: a gateway's log
//! (checked when each test's gateway is dropped, so every test of the run is covered), the
//! ledger and the audit log (checked by `security::nothing_secret_reaches_logs_or_tables`).

use std::collections::BTreeSet;
use std::sync::Mutex;

static SECRETS: Mutex<BTreeSet<String>> = Mutex::new(BTreeSet::new());

/// Shortest string treated as a secret (shorter ones would match ordinary text).
const MIN_LEN: usize = 8;

/// Remembers a secret the tests gave out or received.
pub fn register(secret: &str) {
    let secret = secret.trim();
    if secret.len() >= MIN_LEN {
        SECRETS.lock().unwrap().insert(secret.to_string());
    }
}

/// Registers every tenant key secret (`tg-` + 48 hex digits) in a command's output.
pub fn register_keys_in(output: &str) {
    for (i, _) in output.match_indices("tg-") {
        let candidate = &output[i..];
        let hex = candidate[3..]
            .chars()
            .take_while(char::is_ascii_hexdigit)
            .count();
        if hex == 48 {
            register(&candidate[..51]);
        }
    }
}

pub fn registered() -> Vec<String> {
    SECRETS.lock().unwrap().iter().cloned().collect()
}

/// The secrets found in `text`, each shown masked (a failure message must not spread them).
pub fn leaks_in(text: &str, secrets: &[String]) -> Vec<String> {
    secrets
        .iter()
        .filter(|s| text.contains(s.as_str()))
        .map(|s| format!("{}…({} chars)", &s[..4], s.len()))
        .collect()
}

/// Panics naming `what` when `text` holds any registered secret.
pub fn assert_no_secret(what: &str, text: &str) {
    let leaks = leaks_in(text, &registered());
    assert!(leaks.is_empty(), "secrets found in {what}: {leaks:?}");
}

#[test]
fn the_check_catches_a_planted_secret() {
    let planted = "tg-".to_string() + &"ab12".repeat(12);
    let log = format!("2026-01-01 INFO request from key {planted} done\n");
    register_keys_in(&format!("created:\n{planted}\n"));
    assert!(registered().contains(&planted));
    assert_eq!(leaks_in(&log, &registered()).len(), 1);
    let caught = std::panic::catch_unwind(|| assert_no_secret("a planted log", &log));
    let message = *caught.unwrap_err().downcast::<String>().unwrap();
    assert!(message.contains("a planted log"), "{message}");
    assert!(
        !message.contains(&planted),
        "the failure does not repeat the secret"
    );
    assert_no_secret(
        "a clean log",
        "2026-01-01 INFO request from key key_123 done\n",
    );
}
