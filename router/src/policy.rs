//! Turning a score into a tier: hard rules first, then the threshold, which is either fixed or
//! calibrated so that a target share of recent requests goes premium, and which rises as a
//! tenant nears its budget.

use std::collections::VecDeque;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Cheap,
    Premium,
}

impl Tier {
    pub fn as_str(self) -> &'static str {
        match self {
            Tier::Cheap => "cheap",
            Tier::Premium => "premium",
        }
    }

    pub fn parse(text: &str) -> Option<Tier> {
        match text.trim().to_ascii_lowercase().as_str() {
            "cheap" => Some(Tier::Cheap),
            "premium" => Some(Tier::Premium),
            _ => None,
        }
    }
}

/// A routing decision and why it was made.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub tier: Tier,
    pub score: f32,
    pub reason: String,
}

/// Facts about a request that force a tier before any score.
#[derive(Debug, Clone, Default)]
pub struct Rules {
    /// The client's `x-tollgate-tier`, when its tenant may use it.
    pub requested: Option<Tier>,
    /// Prompt plus output cap exceeds the cheap model's context window.
    pub exceeds_cheap_context: bool,
    /// The request uses a feature the cheap model lacks (e.g. tools).
    pub unsupported_by_cheap: Option<&'static str>,
}

pub fn decide(score: f32, threshold: f32, rules: &Rules) -> Decision {
    let decision = |tier, reason: String| Decision {
        tier,
        score,
        reason,
    };
    if let Some(tier) = rules.requested {
        return decision(tier, format!("header x-tollgate-tier: {}", tier.as_str()));
    }
    if rules.exceeds_cheap_context {
        return decision(
            Tier::Premium,
            "context longer than the cheap model's window".into(),
        );
    }
    if let Some(feature) = rules.unsupported_by_cheap {
        return decision(
            Tier::Premium,
            format!("{feature} not supported by the cheap model"),
        );
    }
    if score >= threshold {
        decision(
            Tier::Premium,
            format!("score {score:.3} >= threshold {threshold:.3}"),
        )
    } else {
        decision(
            Tier::Cheap,
            format!("score {score:.3} < threshold {threshold:.3}"),
        )
    }
}

/// Raises `threshold` as budget `utilization` (0..1) passes `start`: linearly up to 1.0 (all
/// cheap) at full utilization, shaped by `power` (>1: gentle at first).
pub fn budget_aware_threshold(threshold: f32, utilization: f32, start: f32, power: f32) -> f32 {
    if utilization <= start || start >= 1.0 {
        return threshold;
    }
    let pressure = ((utilization - start) / (1.0 - start))
        .clamp(0.0, 1.0)
        .powf(power);
    threshold + (1.0 - threshold) * pressure
}

/// Keeps the recent score distribution and derives the threshold that sends `target_share` of
/// requests premium (the (1 - share) quantile of recent scores).
#[derive(Debug)]
pub struct Calibrator {
    window: usize,
    target_share: f32,
    recent: VecDeque<f32>,
    /// Used until enough scores are seen.
    initial: f32,
}

impl Calibrator {
    pub fn new(target_share: f32, window: usize, initial: f32) -> Calibrator {
        Calibrator {
            window: window.max(10),
            target_share: target_share.clamp(0.0, 1.0),
            recent: VecDeque::new(),
            initial,
        }
    }

    pub fn observe(&mut self, score: f32) {
        if self.recent.len() == self.window {
            self.recent.pop_front();
        }
        self.recent.push_back(score);
    }

    pub fn threshold(&self) -> f32 {
        if self.recent.len() < 10 {
            return self.initial;
        }
        let mut sorted: Vec<f32> = self.recent.iter().copied().collect();
        sorted.sort_by(f32::total_cmp);
        let cheap = ((1.0 - self.target_share) * sorted.len() as f32).round() as usize;
        if cheap >= sorted.len() {
            return f32::INFINITY;
        }
        sorted[cheap]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rules_come_before_the_score() {
        let rules = Rules {
            requested: Some(Tier::Cheap),
            exceeds_cheap_context: true,
            ..Default::default()
        };
        assert_eq!(decide(0.99, 0.5, &rules).tier, Tier::Cheap);
        let rules = Rules {
            exceeds_cheap_context: true,
            ..Default::default()
        };
        assert_eq!(decide(0.01, 0.5, &rules).tier, Tier::Premium);
        let rules = Rules {
            unsupported_by_cheap: Some("tools"),
            ..Default::default()
        };
        assert_eq!(
            decide(0.01, 0.5, &rules).reason,
            "tools not supported by the cheap model"
        );
        assert_eq!(decide(0.6, 0.5, &Rules::default()).tier, Tier::Premium);
        assert_eq!(decide(0.4, 0.5, &Rules::default()).tier, Tier::Cheap);
    }

    #[test]
    fn calibration_converges_to_the_target_share() {
        let mut calibrator = Calibrator::new(0.3, 1000, 0.5);
        let mut state = 12345u64;
        let mut premium = 0;
        for i in 0..5000 {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            let score = (state % 10_000) as f32 / 10_000.0;
            if i >= 2000 && score >= calibrator.threshold() {
                premium += 1;
            }
            calibrator.observe(score);
        }
        let share = premium as f32 / 3000.0;
        assert!((share - 0.3).abs() < 0.03, "share {share}");
    }

    #[test]
    fn the_threshold_rises_as_the_budget_runs_out() {
        assert_eq!(budget_aware_threshold(0.5, 0.5, 0.7, 1.0), 0.5);
        let near = budget_aware_threshold(0.5, 0.85, 0.7, 1.0);
        assert!((near - 0.75).abs() < 1e-6);
        assert_eq!(budget_aware_threshold(0.5, 1.0, 0.7, 1.0), 1.0);
        assert!(
            budget_aware_threshold(0.5, 0.85, 0.7, 2.0) < near,
            "power > 1 is gentler at first"
        );
    }
}
