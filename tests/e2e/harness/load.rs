//! A bounded load generator: a fixed number of workers, each sending one request at a time (with
//! a pause between them) until told to stop, recording what every client saw.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use serde_json::Value;
use tollgate_billing::ledger::LedgerRow;

/// One request to send.
pub struct Req {
    pub key: String,
    /// Groups outcomes in reports (e.g. the tenant).
    pub tag: String,
    pub body: Vec<u8>,
    pub stream: bool,
}

impl Req {
    pub fn json(key: &str, tag: &str, body: Value) -> Req {
        Req {
            key: key.to_string(),
            tag: tag.to_string(),
            stream: body["stream"] == Value::Bool(true),
            body: body.to_string().into_bytes(),
        }
    }

    pub fn raw(key: &str, tag: &str, body: &str) -> Req {
        Req {
            key: key.to_string(),
            tag: tag.to_string(),
            stream: false,
            body: body.as_bytes().to_vec(),
        }
    }
}

/// What one client saw.
#[derive(Debug, Clone)]
pub struct Outcome {
    pub tag: String,
    pub stream: bool,
    /// HTTP status; 0 when no response arrived (connection refused or reset before a header).
    pub status: u16,
    pub request_id: Option<String>,
    /// The body was read to its end (for a stream: `data: [DONE]` arrived).
    pub complete: bool,
    /// `error.code` of an error body, or of an error event in a stream.
    pub error_code: Option<String>,
    /// `error.param` of an error body.
    pub error_param: Option<String>,
    pub started: Instant,
    pub finished: Instant,
}

/// Builds the `seq`-th request of worker `worker`.
pub type MakeReq = Arc<dyn Fn(usize, u64) -> Req + Send + Sync>;

pub struct Load {
    stop: Arc<AtomicBool>,
    workers: Vec<tokio::task::JoinHandle<Vec<Outcome>>>,
    pub served: Arc<AtomicUsize>,
    counts: Counts,
}

type Counts = Arc<std::sync::Mutex<HashMap<(String, u16), usize>>>;

impl Load {
    /// Starts `workers` clients against `base_url` (the gateway's data plane).
    pub fn start(base_url: &str, workers: usize, pause: Duration, make: MakeReq) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let served = Arc::new(AtomicUsize::new(0));
        let counts: Counts = Arc::default();
        let client = reqwest::Client::builder()
            .pool_max_idle_per_host(workers)
            .timeout(Duration::from_secs(30))
            .build()
            .unwrap();
        let url = format!("{base_url}/v1/chat/completions");
        let workers = (0..workers)
            .map(|worker| {
                let (stop, served, make) = (stop.clone(), served.clone(), make.clone());
                let counts = counts.clone();
                let (client, url) = (client.clone(), url.clone());
                tokio::spawn(async move {
                    let mut outcomes = Vec::new();
                    let mut seq = 0u64;
                    while !stop.load(Ordering::SeqCst) {
                        let req = make(worker, seq);
                        seq += 1;
                        let outcome = send(&client, &url, req).await;
                        if outcome.status == 200 {
                            served.fetch_add(1, Ordering::SeqCst);
                        }
                        *counts
                            .lock()
                            .unwrap()
                            .entry((outcome.tag.clone(), outcome.status))
                            .or_default() += 1;
                        let refused = outcome.status == 0;
                        outcomes.push(outcome);
                        // Back off harder while nothing listens (e.g. the gateway was killed).
                        let wait = if refused {
                            pause.max(Duration::from_millis(50))
                        } else {
                            pause
                        };
                        tokio::time::sleep(wait).await;
                    }
                    outcomes
                })
            })
            .collect();
        Load {
            stop,
            workers,
            served,
            counts,
        }
    }

    /// Answers so far with `status` to requests tagged `tag`.
    pub fn count(&self, tag: &str, status: u16) -> usize {
        self.counts
            .lock()
            .unwrap()
            .get(&(tag.to_string(), status))
            .copied()
            .unwrap_or(0)
    }

    /// Tells the workers to stop after their current request; returns every outcome.
    pub async fn stop(self) -> Vec<Outcome> {
        self.stop.store(true, Ordering::SeqCst);
        let mut all = Vec::new();
        for worker in self.workers {
            all.extend(worker.await.unwrap());
        }
        all.sort_by_key(|o| o.started);
        all
    }

    /// A flag that stops the workers (e.g. at the moment a process is killed).
    pub fn stop_flag(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }
}

/// Sends one request and reads its answer to the end.
pub async fn send(client: &reqwest::Client, url: &str, req: Req) -> Outcome {
    let started = Instant::now();
    let mut outcome = Outcome {
        tag: req.tag,
        stream: req.stream,
        status: 0,
        request_id: None,
        complete: false,
        error_code: None,
        error_param: None,
        started,
        finished: started,
    };
    let response = client
        .post(url)
        .bearer_auth(&req.key)
        .header("content-type", "application/json")
        .body(req.body)
        .send()
        .await;
    let Ok(response) = response else {
        outcome.finished = Instant::now();
        return outcome;
    };
    outcome.status = response.status().as_u16();
    outcome.request_id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let is_sse = response
        .headers()
        .get("content-type")
        .is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    let mut body = Vec::new();
    let mut stream = response.bytes_stream();
    let mut broken = false;
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(bytes) => body.extend_from_slice(&bytes),
            Err(_) => {
                broken = true;
                break;
            }
        }
    }
    outcome.finished = Instant::now();
    if is_sse {
        let events = sse_events(&String::from_utf8_lossy(&body));
        outcome.complete = !broken && events.last().is_some_and(|e| e == "[DONE]");
        outcome.error_code = events
            .iter()
            .filter_map(|e| serde_json::from_str::<Value>(e).ok())
            .find_map(|v| v["error"]["code"].as_str().map(str::to_string));
    } else {
        outcome.complete = !broken;
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            outcome.error_code = v["error"]["code"].as_str().map(str::to_string);
            outcome.error_param = v["error"]["param"].as_str().map(str::to_string);
        }
    }
    outcome
}

/// The `data:` payloads of an SSE body, in order.
pub fn sse_events(text: &str) -> Vec<String> {
    text.split("\n\n")
        .filter_map(|event| {
            let data: Vec<&str> = event
                .lines()
                .filter_map(|l| l.strip_prefix("data:"))
                .map(|d| d.strip_prefix(' ').unwrap_or(d))
                .collect();
            (!data.is_empty()).then(|| data.join("\n"))
        })
        .collect()
}

/// The generated text of chat stream events (`choices[0].delta.content`), error events excluded.
pub fn delivered_text(events: &[String]) -> String {
    events
        .iter()
        .filter_map(|e| serde_json::from_str::<Value>(e).ok())
        .filter_map(|v| {
            v["choices"][0]["delta"]["content"]
                .as_str()
                .map(str::to_string)
        })
        .collect()
}

/// Tokens of `text` as o200k counts them (tiktoken-rs, the independent oracle).
pub fn o200k(text: &str) -> i64 {
    tiktoken_rs::o200k_base_singleton()
        .encode_ordinary(text)
        .len() as i64
}

/// Requests by outcome.
#[derive(Debug, Clone, Default)]
pub struct Tally {
    pub sent: usize,
    pub served: usize,
    /// Non-200 answers by status ("0" for no answer at all).
    pub failed: BTreeMap<String, usize>,
}

impl Tally {
    pub fn of<'a>(outcomes: impl IntoIterator<Item = &'a Outcome>) -> Tally {
        let mut tally = Tally::default();
        for o in outcomes {
            tally.sent += 1;
            if o.status == 200 {
                tally.served += 1;
            } else {
                *tally.failed.entry(o.status.to_string()).or_default() += 1;
            }
        }
        tally
    }
}

/// The ledger against what the clients saw.
#[derive(Debug, Clone, Default)]
pub struct Reconciled {
    pub rows: usize,
    /// Rows beyond the first for a request id.
    pub duplicates: usize,
    /// Requests answered 200 (with a request id) that have no row.
    pub missing: Vec<String>,
    /// Rows whose request id no client saw answered (e.g. in flight when the process died).
    pub unseen: Vec<String>,
}

impl Reconciled {
    /// `answered`: the request ids the clients were given, 200 or not; `served`: those that were
    /// answered 200 (each must have a row).
    pub fn of(rows: &[LedgerRow], answered: &[&str], served: &[&str]) -> Reconciled {
        let mut by_id: HashMap<&str, usize> = HashMap::new();
        for row in rows {
            *by_id.entry(row.request_id.as_str()).or_default() += 1;
        }
        let answered: std::collections::HashSet<&str> = answered.iter().copied().collect();
        Reconciled {
            rows: rows.len(),
            duplicates: by_id.values().map(|n| n - 1).sum(),
            missing: served
                .iter()
                .filter(|id| !by_id.contains_key(*id))
                .map(|id| id.to_string())
                .collect(),
            unseen: by_id
                .keys()
                .filter(|id| !answered.contains(*id))
                .map(|id| id.to_string())
                .collect(),
        }
    }
}

/// Request ids of the outcomes that got one, and of those answered 200.
pub fn ids(outcomes: &[Outcome]) -> (Vec<&str>, Vec<&str>) {
    let answered = outcomes
        .iter()
        .filter_map(|o| o.request_id.as_deref())
        .collect();
    let served = outcomes
        .iter()
        .filter(|o| o.status == 200)
        .filter_map(|o| o.request_id.as_deref())
        .collect();
    (answered, served)
}
