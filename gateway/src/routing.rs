//! Complexity routing on the request path: a request for a route's public name (e.g. `auto`)
//! is scored and sent to the route's cheap or premium model. Hard rules come first (the
//! client's tier header where its tenant allows it, context length, features), then the
//! threshold: the tenant's, the route's, or one calibrated to a premium share.

use std::collections::HashMap;
use std::sync::Mutex;

use tollgate_router::policy::{budget_aware_threshold, decide, Calibrator, Decision, Rules, Tier};
use tollgate_router::Scorer;

use crate::config::{Route, RouteThreshold, Tenant};
use crate::proxy::error::ApiError;

/// Scores kept per route to calibrate a premium-share threshold.
const CALIBRATION_WINDOW: usize = 2000;

pub struct Routing {
    scorer: Scorer,
    calibrators: Mutex<HashMap<String, Calibrator>>,
}

/// What the proxy knows about a request when it routes it.
pub struct RouteInput<'a> {
    pub field: &'a dyn Fn(&str) -> Option<&'a serde_json::Value>,
    /// `x-tollgate-tier`, if sent.
    pub tier_header: Option<&'a str>,
    /// Prompt tokens (cheap model's tokenizer) plus the output cap.
    pub needed_context: u64,
    /// Share of the tenant's tightest USD budget already used (raises the threshold).
    pub budget_used: Option<f32>,
}

impl Routing {
    pub fn new() -> Routing {
        Routing {
            scorer: Scorer::shipped(),
            calibrators: Mutex::new(HashMap::new()),
        }
    }

    pub fn route(
        &self,
        route: &Route,
        tenant: Option<&Tenant>,
        input: &RouteInput<'_>,
    ) -> Result<Decision, ApiError> {
        let requested = match input.tier_header {
            Some(value) if tenant.is_some_and(|t| t.allow_tier_header) => {
                Some(Tier::parse(value).ok_or_else(|| {
                    ApiError::bad_request("`x-tollgate-tier` must be `cheap` or `premium`.")
                })?)
            }
            _ => None,
        };
        let uses_tools = (input.field)("tools").is_some_and(|t| !t.is_null());
        let rules = Rules {
            requested,
            exceeds_cheap_context: route
                .cheap
                .context_tokens
                .is_some_and(|window| input.needed_context > window),
            unsupported_by_cheap: (uses_tools && !route.cheap.supports_tools).then_some("tools"),
        };
        let score = self.scorer.score_fields(input.field);
        let mut threshold = self.threshold(route, tenant, score);
        if let Some(used) = input.budget_used {
            let (start, power) = route.budget_pressure;
            threshold = budget_aware_threshold(threshold, used, start, power);
        }
        Ok(decide(score, threshold, &rules))
    }

    /// The tenant's threshold for this route, else the route's (calibrated ones learn `score`).
    fn threshold(&self, route: &Route, tenant: Option<&Tenant>, score: f32) -> f32 {
        let calibrated = match route.threshold {
            RouteThreshold::Fixed(t) => t,
            RouteThreshold::PremiumShare(share) => {
                let mut calibrators = self.calibrators.lock().unwrap_or_else(|e| e.into_inner());
                let calibrator = calibrators
                    .entry(route.name.clone())
                    .or_insert_with(|| Calibrator::new(share, CALIBRATION_WINDOW, 0.5));
                let threshold = calibrator.threshold();
                calibrator.observe(score);
                threshold
            }
        };
        tenant
            .and_then(|t| t.route_thresholds.get(&route.name).copied())
            .unwrap_or(calibrated)
    }
}
