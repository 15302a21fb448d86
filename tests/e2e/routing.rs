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

/// Two mock-backed models, `small` and `large` (prices in USD per 1M tokens), a route `auto`
/// over them with `route_extra` (YAML flow fields), and `tenants`.
fn routed_policy(
    cheap: &MockUpstream,
    premium: &MockUpstream,
    prices: (f64, f64),
    route_extra: &str,
    tenants: &str,
) -> String {
    format!(
        "backends:\n  - {{ name: cheapb, base_url: \"{}\" }}\n  - {{ name: premiumb, base_url: \"{}\" }}\n\
         models:\n  - name: small\n    price: {{ input: {small}, output: {small} }}\n    targets: [{{ backend: cheapb, model: small-up }}]\n\
         \x20 - name: large\n    price: {{ input: {large}, output: {large} }}\n    targets: [{{ backend: premiumb, model: large-up }}]\n\
         routes:\n  - {{ name: auto, cheap: small, premium: large, {route_extra} }}\ntenants:\n{tenants}",
        cheap.base_url(),
        premium.base_url(),
        small = prices.0,
        large = prices.1,
    )
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
    let yaml = routed_policy(
        &cheap,
        &premium,
        (0.6, 10.0),
        &format!("threshold: {threshold}"),
        "  - name: acme\n    allow_tier_header: true\n  - name: other\n    models: [small]\n",
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("acme").await;
    let client = reqwest::Client::new();
    let url = format!("{}/v1/chat/completions", gw.url());

    let r = gw.chat(&key, &chat(EASY)).await;
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
    let r = gw.chat(&key, &chat(HARD)).await;
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

    let models: Value = client
        .get(format!("{}/v1/models", gw.url()))
        .bearer_auth(&key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = models["data"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["id"].as_str().unwrap())
        .collect();
    assert_eq!(
        ids,
        ["small", "large", "auto"],
        "routes are listed with the models"
    );
    // A tenant without access to the route does not get it.
    let other = gw.create_key("other").await;
    let r = gw.chat(&other, &chat(EASY)).await;
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

#[tokio::test]
async fn the_threshold_rises_as_the_tenant_nears_its_budget() {
    let hard_score = Scorer::shipped().score(&chat(HARD));
    let threshold = (hard_score - 0.01).max(0.0);
    let cheap = MockUpstream::start("cheap").await;
    let premium = MockUpstream::start("premium").await;
    // One micro-dollar per token on `small`, nine on `large`; a $0.01 monthly budget.
    let yaml = routed_policy(
        &cheap,
        &premium,
        (1.0, 9.0),
        &format!("threshold: {threshold}, budget_pressure: {{ start: 0.5, power: 1 }}"),
        "  - name: thrifty\n    budgets: [{ limit_usd: 0.01, period: monthly }]\n",
    );
    let gw = Gateway::start(&yaml, None).await;
    let key = gw.create_key("thrifty").await;
    let mut hard = chat(HARD);
    hard["max_tokens"] = json!(5);

    let r = gw.chat(&key, &hard).await;
    assert_eq!(r.status(), 200);
    assert!(
        r.headers()["x-tollgate-route"]
            .to_str()
            .unwrap()
            .starts_with("tier=premium"),
        "budget barely used"
    );
    // Spend most of the budget on the cheap model directly.
    let spend = json!({"model": "small", "max_tokens": 5, "messages": [{"role": "user", "content": " hello".repeat(1000)}]});
    for _ in 0..9 {
        assert_eq!(gw.chat(&key, &spend).await.status(), 200);
    }
    let r = gw.chat(&key, &hard).await;
    assert_eq!(r.status(), 200);
    let route = r.headers()["x-tollgate-route"]
        .to_str()
        .unwrap()
        .to_string();
    assert!(
        route.starts_with("tier=cheap"),
        "near its budget the same prompt goes cheap: {route}"
    );
    let raised: f32 = route.rsplit("threshold ").next().unwrap().parse().unwrap();
    assert!(raised > hard_score && raised > threshold + 0.1, "{route}");
}
