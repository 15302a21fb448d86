//! Complexity routing: `auto` sends easy and hard prompts to different backends; the ledger
//! records the decision and the premium-equivalent cost.

use serde_json::{json, Value};
use tollgate_router::Scorer;

use crate::harness::{Gateway, MockUpstream};

const EASY: &str = "Hi there! What's the capital of France?";
const HARD: &str = "Janet has 3 times as many marbles as Tom. Tom gives away 40% of his marbles and then buys 12 more. \
    If Janet now has 5 times as many marbles as Tom and together they have 144, how many marbles did Tom have at first? \
    Calculate the answer step by step, and explain each step.";

fn chat(content: &str) -> Value {
    json!({"model": "auto", "messages": [{"role": "user", "content": content}]})
}

#[tokio::test]
async fn auto_routes_easy_and_hard_prompts_to_different_backends() {
    let scorer = Scorer::shipped();
    let (easy, hard) = (scorer.score(&chat(EASY)), scorer.score(&chat(HARD)));
    assert!(
        hard > easy,
        "the shipped scorer ranks the multi-step problem above the greeting ({hard} vs {easy})"
    );
    let threshold = (easy + hard) / 2.0;

    let cheap = MockUpstream::start("cheap").await;
    let premium = MockUpstream::start("premium").await;
    let yaml = format!(
        "backends:\n  - {{ name: cheapb, base_url: \"{}\" }}\n  - {{ name: premiumb, base_url: \"{}\" }}\n\
         models:\n  - name: small\n    price: {{ input: 0.15, output: 0.6 }}\n    targets: [{{ backend: cheapb, model: small-up }}]\n\
         \x20 - name: large\n    price: {{ input: 2.5, output: 10 }}\n    targets: [{{ backend: premiumb, model: large-up }}]\n\
         routes:\n  - {{ name: auto, cheap: small, premium: large, threshold: {threshold} }}\n\
         tenants:\n  - name: acme\n    allow_tier_header: true\n  - name: other\n    models: [small]\n",
        cheap.base_url(),
        premium.base_url()
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("acme").await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url());

    let r = client
        .post(&url)
        .bearer_auth(&key)
        .json(&chat(EASY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 200);
    let route = r.headers()["x-tollgate-route"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        route.starts_with("tier=cheap; model=small; reason=score "),
        "{route}"
    );
    let score: f32 = r.headers()["x-tollgate-score"]
        .to_str()
        .unwrap()
        .parse()
        .unwrap();
    assert!((score - easy).abs() < 1e-3);
    let r = client
        .post(&url)
        .bearer_auth(&key)
        .json(&chat(HARD))
        .send()
        .await
        .unwrap();
    assert!(r.headers()["x-tollgate-route"]
        .to_str()
        .unwrap()
        .starts_with("tier=premium; model=large"));
    // The tenant may force a tier.
    let r = client
        .post(&url)
        .bearer_auth(&key)
        .header("x-tollgate-tier", "premium")
        .json(&chat(EASY))
        .send()
        .await
        .unwrap();
    assert_eq!(
        r.headers()["x-tollgate-route"].to_str().unwrap(),
        "tier=premium; model=large; reason=header x-tollgate-tier: premium"
    );
    assert_eq!(cheap.received().len(), 1);
    assert_eq!(premium.received().len(), 2);
    assert_eq!(cheap.received()[0].json()["model"], "small-up");

    // A tenant without access to the route does not get it.
    let other = gw.create_key("other").await;
    let r = client
        .post(&url)
        .bearer_auth(&other)
        .json(&chat(EASY))
        .send()
        .await
        .unwrap();
    assert_eq!(r.status(), 404);

    let rows = gw.ledger("acme", 3).await;
    for row in &rows {
        let routing = row
            .routing
            .as_ref()
            .expect("routed requests carry their decision");
        assert_eq!(row.model, "auto");
        assert_eq!(routing.route, "auto");
        assert!(routing.premium_equivalent_micros >= row.cost_micros);
        if routing.tier == "cheap" {
            assert_eq!(routing.routed_model, "small");
            assert_eq!(row.backend.as_deref(), Some("cheapb"));
            assert!(
                routing.premium_equivalent_micros > row.cost_micros,
                "savings are visible: {row:?}"
            );
        } else {
            assert_eq!(routing.premium_equivalent_micros, row.cost_micros);
        }
    }
    assert_eq!(
        rows.iter()
            .filter(|r| r.routing.as_ref().unwrap().tier == "cheap")
            .count(),
        1
    );
}
