//! How well a router trades cost for quality, as RouteLLM measures it (and `eval.py` in the
//! shared routing data): send the highest-scored share `c` of prompts to premium; PGR(c) is the
//! share of the premium model's quality gain recovered. APGR is the area under PGR(c); CPT(x)
//! the smallest premium share reaching PGR x. Prompts with equal scores form one block.

/// One prompt: the router's score and the quality of each model's answer.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub score: f64,
    pub cheap: f64,
    pub premium: f64,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Summary {
    pub apgr: f64,
    pub cpt50: f64,
    pub cpt80: f64,
}

/// (premium share, PGR) at the boundaries of tie blocks, weighted by `weight[i]` (bootstrap
/// multiplicity; 1 for the plain curve).
pub fn curve(outcomes: &[Outcome], weight: &[f64]) -> Vec<(f64, f64)> {
    let mut order: Vec<usize> = (0..outcomes.len()).collect();
    order.sort_by(|a, b| outcomes[*b].score.total_cmp(&outcomes[*a].score));
    let total_weight: f64 = weight.iter().sum();
    let total_gain: f64 = outcomes
        .iter()
        .zip(weight)
        .map(|(o, w)| (o.premium - o.cheap) * w)
        .sum();
    let mut points = vec![(0.0, 0.0)];
    let (mut cum_w, mut cum_g) = (0.0, 0.0);
    for (k, &i) in order.iter().enumerate() {
        cum_w += weight[i];
        cum_g += (outcomes[i].premium - outcomes[i].cheap) * weight[i];
        let block_ends = order
            .get(k + 1)
            .is_none_or(|&j| outcomes[j].score != outcomes[i].score);
        if block_ends {
            points.push((
                cum_w / total_weight,
                if total_gain > 0.0 {
                    cum_g / total_gain
                } else {
                    f64::NAN
                },
            ));
        }
    }
    points
}

pub fn summarize(points: &[(f64, f64)]) -> Summary {
    let apgr = points
        .windows(2)
        .map(|p| (p[1].0 - p[0].0) * (p[1].1 + p[0].1) / 2.0)
        .sum();
    let cpt = |x: f64| {
        let j = points
            .iter()
            .position(|p| p.1 >= x - 1e-12)
            .unwrap_or(points.len() - 1);
        if j == 0 {
            return 0.0;
        }
        let ((c0, p0), (c1, p1)) = (points[j - 1], points[j]);
        c0 + (x - p0) * (c1 - c0) / (p1 - p0)
    };
    Summary {
        apgr,
        cpt50: cpt(0.5),
        cpt80: cpt(0.8),
    }
}

pub fn evaluate(outcomes: &[Outcome]) -> Summary {
    summarize(&curve(outcomes, &vec![1.0; outcomes.len()]))
}

/// 95% percentile-bootstrap interval of APGR (deterministic: `seed`).
pub fn apgr_interval(outcomes: &[Outcome], resamples: usize, seed: u64) -> (f64, f64) {
    let n = outcomes.len();
    let mut state = seed | 1;
    let mut next = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    let mut values: Vec<f64> = (0..resamples)
        .map(|_| {
            let mut weight = vec![0.0; n];
            for _ in 0..n {
                weight[(next() % n as u64) as usize] += 1.0;
            }
            summarize(&curve(outcomes, &weight)).apgr
        })
        .filter(|v| v.is_finite())
        .collect();
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values[((values.len() - 1) as f64 * q).round() as usize];
    (at(0.025), at(0.975))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outcomes(scores: &[f64], gains: &[(f64, f64)]) -> Vec<Outcome> {
        scores
            .iter()
            .zip(gains)
            .map(|(s, (w, p))| Outcome {
                score: *s,
                cheap: *w,
                premium: *p,
            })
            .collect()
    }

    #[test]
    fn perfect_random_and_inverted_routers() {
        // Two prompts where premium helps, two where it does not.
        let gains = [(0.0, 1.0), (0.0, 1.0), (1.0, 1.0), (1.0, 1.0)];
        let perfect = evaluate(&outcomes(&[0.9, 0.8, 0.2, 0.1], &gains));
        assert!((perfect.apgr - 0.75).abs() < 1e-9, "{perfect:?}");
        assert!((perfect.cpt50 - 0.25).abs() < 1e-9);
        // All scores equal: one block, the diagonal (random routing).
        let flat = evaluate(&outcomes(&[0.5; 4], &gains));
        assert!(
            (flat.apgr - 0.5).abs() < 1e-9 && (flat.cpt80 - 0.8).abs() < 1e-9,
            "{flat:?}"
        );
        let inverted = evaluate(&outcomes(&[0.1, 0.2, 0.8, 0.9], &gains));
        assert!((inverted.apgr - 0.25).abs() < 1e-9, "{inverted:?}");
        let (lo, hi) = apgr_interval(&outcomes(&[0.9, 0.8, 0.2, 0.1], &gains), 200, 7);
        assert!(lo <= hi);
    }
}
