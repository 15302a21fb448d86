//! Policy reload under load: a valid new file is swapped in while 2,000 requests are in
//! flight; none is dropped and each is billed under exactly one policy (the one it started
//! with). An invalid file is rejected and the policy in force stays.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::harness::{policy, Gateway, MockUpstream};

const IN_FLIGHT: usize = 2000;

fn rewrite(gw: &Gateway, from: &str, to: &str) {
    let text = std::fs::read_to_string(&gw.config).unwrap();
    assert!(text.contains(from), "{from:?} not in the policy");
    let tmp = gw.config.with_extension("new");
    std::fs::write(&tmp, text.replace(from, to)).unwrap();
    std::fs::rename(&tmp, &gw.config).unwrap(); // atomic: the watcher never sees half a file
}

async fn wait_for_log(gw: &Gateway, needle: &str, times: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while gw.log().matches(needle).count() < times {
        assert!(
            Instant::now() < deadline,
            "no {needle:?} in the log:\n{}",
            gw.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn reload_under_load_drops_nothing_and_bills_each_request_under_one_policy() {
    let mock = MockUpstream::start("alpha").await;
    // Long enough for all 2,000 to be held at the provider when the policy changes.
    mock.behaviour.header_delay_ms.store(6000, Ordering::SeqCst);
    // Generous connect timeout: 2,000 connections opened at once can wait in accept queues on a
    // loaded CI machine, and a timeout there would be a fallback failure, not a reload effect.
    let yaml = policy(&[("alpha", mock.base_url())], "").replace(
        "connect_timeout_ms: 1000, read_timeout_ms: 3000",
        "connect_timeout_ms: 20000, read_timeout_ms: 60000",
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("acme").await;
    let client = reqwest::Client::new();
    let body =
        json!({"model": "gpt-test", "messages": [{"role": "user", "content": "hello there"}]});
    let url = format!("{}/v1/chat/completions", gw.url());
    let send = |client: reqwest::Client| {
        let (url, key, body) = (url.clone(), key.clone(), body.clone());
        tokio::spawn(async move {
            client
                .post(url)
                .bearer_auth(key)
                .json(&body)
                .send()
                .await
                .map(|r| r.status().as_u16())
        })
    };
    // Opened in waves of 200 so that no listen backlog overflows.
    let mut in_flight = Vec::with_capacity(IN_FLIGHT);
    for _ in 0..IN_FLIGHT / 200 {
        in_flight.extend((0..200).map(|_| send(client.clone())));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Every request has reached the provider (and so took its policy snapshot) before the swap.
    let deadline = Instant::now() + Duration::from_secs(30);
    while mock.received().len() < IN_FLIGHT {
        assert!(
            Instant::now() < deadline,
            "only {} requests arrived",
            mock.received().len()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // The new policy doubles the price and renames the team tag (recorded on each ledger row).
    rewrite(
        &gw,
        "price: { input: 2.5, cached_input: 1.25, output: 10 }",
        "price: { input: 5, cached_input: 2.5, output: 20 }",
    );
    rewrite(&gw, "team: platform,", "team: platform-v2,");
    wait_for_log(&gw, "policy reloaded", 1).await;
    // An invalid file is rejected; the last valid policy stays in force.
    rewrite(&gw, "models:\n", "models:\n  - { name: broken }\n");
    wait_for_log(&gw, "policy reload rejected", 1).await;
    mock.behaviour.header_delay_ms.store(0, Ordering::SeqCst);
    let after = send(client.clone()).await.unwrap().unwrap();
    assert_eq!(after, 200, "{}", gw.log());

    let mut statuses = Vec::new();
    for h in in_flight {
        statuses.push(h.await.unwrap().expect("no request dropped"));
    }
    assert!(
        statuses.iter().all(|s| *s == 200),
        "{:?}",
        statuses.iter().filter(|s| **s != 200).collect::<Vec<_>>()
    );

    let rows = gw.ledger("acme", IN_FLIGHT + 1).await;
    assert_eq!(rows.len(), IN_FLIGHT + 1, "one row per request");
    let old: Vec<_> = rows
        .iter()
        .filter(|r| {
            r.tags
                .as_deref()
                .is_some_and(|t| t.contains("\"platform\""))
        })
        .collect();
    let new: Vec<_> = rows
        .iter()
        .filter(|r| {
            r.tags
                .as_deref()
                .is_some_and(|t| t.contains("\"platform-v2\""))
        })
        .collect();
    assert_eq!(
        (old.len(), new.len()),
        (IN_FLIGHT, 1),
        "each request under exactly one policy"
    );
    // Same request, same tokens: every in-flight row at the old price, the new one at double.
    let cost = old[0].cost_micros;
    assert!(old
        .iter()
        .all(|r| r.cost_micros == cost && r.prompt_tokens == old[0].prompt_tokens));
    assert_eq!(new[0].prompt_tokens, old[0].prompt_tokens);
    assert!(
        (new[0].cost_micros - 2 * cost).abs() <= 1,
        "{} vs {}",
        new[0].cost_micros,
        cost
    );
}

#[tokio::test]
async fn sighup_reloads_at_once_and_config_diff_explains_the_change() {
    let mock = MockUpstream::start("alpha").await;
    let gw = Gateway::start(&policy(&[("alpha", mock.base_url())], ""), None).await;
    let before = gw.dir.path().join("before.yaml");
    std::fs::copy(&gw.config, &before).unwrap();
    rewrite(&gw, "  - name: other\n", "  - name: other\n    rpm: 5\n");
    let pid = gw.pid();
    assert!(std::process::Command::new("kill")
        .args(["-HUP", &pid.to_string()])
        .status()
        .unwrap()
        .success());
    wait_for_log(&gw, "policy reloaded", 1).await;
    assert!(
        gw.log().contains("limits    other: rpm unlimited -> 5"),
        "{}",
        gw.log()
    );
    let out = gw.cli(&[
        "config",
        "diff",
        before.to_str().unwrap(),
        gw.config.to_str().unwrap(),
    ]);
    assert!(out.status.success());
    assert_eq!(
        String::from_utf8_lossy(&out.stdout).trim(),
        "limits    other: rpm unlimited -> 5"
    );
}
