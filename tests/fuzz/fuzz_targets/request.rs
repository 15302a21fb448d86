//! `ClientRequest::parse` on arbitrary bodies for the three endpoints (the first byte picks one),
//! then, on what parses, everything the proxy does with it: the upstream body and the counts.

#![no_main]

use libfuzzer_sys::fuzz_target;
use serde_json::Value;
use tollgate_billing::tokens::Tokenizer;
use tollgate_gateway::proxy::request::{ClientRequest, Endpoint, MAX_MODEL_BYTES};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    let endpoint = match selector % 3 {
        0 => Endpoint::ChatCompletions,
        1 => Endpoint::Completions,
        _ => Endpoint::Embeddings,
    };
    let request = match ClientRequest::parse(endpoint, body) {
        Ok(request) => request,
        Err(error) => {
            // Every refusal is a client error in OpenAI's shape.
            assert!((400..500).contains(&error.status), "{error:?}");
            let shaped: Value = serde_json::from_slice(&error.body()).unwrap();
            assert!(shaped["error"]["message"].is_string(), "{shaped}");
            assert!(shaped["error"]["code"].is_string(), "{shaped}");
            return;
        }
    };
    // What is billed is what is served: the ledger's model is a storable name, and the upstream
    // body carries exactly the upstream model, once.
    assert!(!request.model.is_empty() && request.model.len() <= MAX_MODEL_BYTES);
    assert!(!request.model.chars().any(char::is_control));
    let cap = request.max_output_tokens();
    let choices = request.choices();
    assert!((1..=128).contains(&choices), "n = {choices}");
    let inject = (endpoint != Endpoint::Embeddings).then_some(16);
    let upstream = request.upstream_body("upstream-model", inject, "max_tokens");
    let sent: Value = serde_json::from_slice(&upstream).expect("the upstream body is JSON");
    assert_eq!(sent["model"], "upstream-model");
    assert_eq!(sent["stream"].as_bool().unwrap_or(false), request.stream);
    if cap.is_none() && inject.is_some() {
        assert_eq!(sent["max_tokens"], 16);
    }
    if request.stream {
        assert_eq!(sent["stream_options"]["include_usage"], true);
    }
    // The upstream body parses back to the same request (same model billed, same stream flag).
    let again = ClientRequest::parse(endpoint, &upstream).expect("the upstream body is valid");
    assert_eq!(again.model, "upstream-model");
    assert_eq!(again.stream, request.stream);
    for tokenizer in [Tokenizer::O200kBase, Tokenizer::Cl100kBase] {
        request.count_prompt_tokens(tokenizer);
    }
});
