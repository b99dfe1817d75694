//! Per-request measurements and their summaries: percentiles, rates, the accuracy of the
//! synthetic prompts, and ratios against the first target.

use serde::Serialize;

/// What one request measured. Times are milliseconds; `start_s` is seconds from the run's start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct RequestRecord {
    /// Seconds from the start of the run when the request was sent.
    pub start_s: f64,
    /// The round of its sweep point it ran in.
    pub round: usize,
    /// The model asked for, in the swap scenario (where it changes from request to request).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub model: Option<String>,
    /// How long loading the model took by the server's own account (paddock's `load_ms`),
    /// when the request had to load it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub load_ms: Option<f64>,
    /// The spawned server's resident memory right after the request (swap scenario), summed
    /// over its processes: whether unloaded models give their memory back. For the in-process
    /// reference, the benchmark's own, with the model loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rss_kib: Option<u64>,
    /// The prompt size asked for, and what the server counted (`usage.prompt_tokens`).
    pub prompt_tokens_requested: u32,
    pub prompt_tokens: u32,
    pub max_tokens: u32,
    /// Output tokens as the server counted them (`usage.completion_tokens`), else the chunks seen.
    pub output_tokens: u32,
    /// Whether `usage` was missing from the stream, so the counts are chunk counts.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub usage_missing: bool,
    /// Until the first chunk that carries text.
    pub ttft_ms: Option<f64>,
    pub e2e_ms: f64,
    /// Gaps between successive text chunks; several tokens in one network read count as one.
    #[serde(skip)]
    pub gaps_ms: Vec<f64>,
    /// Time per output token after the first: `(e2e - ttft) / (output_tokens - 1)`.
    pub tpot_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Whether the request was sent again because the server closed the kept-alive connection
    /// it went out on before answering (its timings are those of the second attempt).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub resent: bool,
}

impl RequestRecord {
    pub fn ok(&self) -> bool {
        self.error.is_none()
    }

    /// This stream's decode speed as its client sees it.
    fn stream_tok_s(&self) -> Option<f64> {
        self.tpot_ms.filter(|&t| t > 0.0).map(|t| 1e3 / t)
    }
}

/// Percentiles (linear interpolation between ranks, numpy's default) and the mean.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Distribution {
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub mean: f64,
    pub min: f64,
    pub max: f64,
    pub n: usize,
}

impl Distribution {
    pub fn of(values: impl IntoIterator<Item = f64>) -> Option<Distribution> {
        let mut v: Vec<f64> = values.into_iter().filter(|x| x.is_finite()).collect();
        if v.is_empty() {
            return None;
        }
        v.sort_by(f64::total_cmp);
        let at = |q: f64| {
            let rank = q * (v.len() - 1) as f64;
            let (lo, hi) = (rank.floor() as usize, rank.ceil() as usize);
            v[lo] + (v[hi] - v[lo]) * (rank - lo as f64)
        };
        Some(Distribution {
            p50: at(0.5),
            p90: at(0.9),
            p99: at(0.99),
            mean: v.iter().sum::<f64>() / v.len() as f64,
            min: v[0],
            max: v[v.len() - 1],
            n: v.len(),
        })
    }
}

/// One target at one sweep point.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub requests: usize,
    pub errors: usize,
    /// The first few distinct error messages.
    pub error_samples: Vec<String>,
    /// Sum of the wall times of this target's rounds: the time its requests had the server.
    pub wall_s: f64,
    pub prompt_tokens: u64,
    pub output_tokens: u64,
    /// Aggregate output tokens per second of wall time.
    pub output_tok_s: f64,
    pub prompt_tok_s: f64,
    pub requests_per_s: f64,
    pub ttft_ms: Option<Distribution>,
    /// Gaps between text chunks, over all requests.
    pub itl_ms: Option<Distribution>,
    pub tpot_ms: Option<Distribution>,
    pub e2e_ms: Option<Distribution>,
    /// Per-stream output tokens per second after the first token.
    pub stream_tok_s: Option<Distribution>,
    pub prompt_accuracy: PromptAccuracy,
}

/// How close the synthetic prompts came to the requested sizes.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct PromptAccuracy {
    pub requested_mean: f64,
    pub actual_mean: f64,
    /// Mean of |actual − requested| / requested.
    pub mean_abs_error_pct: f64,
}

impl Summary {
    pub fn of(records: &[RequestRecord], wall_s: f64) -> Summary {
        let ok: Vec<&RequestRecord> = records.iter().filter(|r| r.ok()).collect();
        let mut error_samples: Vec<String> = Vec::new();
        for e in records.iter().filter_map(|r| r.error.as_ref()) {
            if error_samples.len() < 5 && !error_samples.contains(e) {
                error_samples.push(e.clone());
            }
        }
        let prompt_tokens: u64 = ok.iter().map(|r| r.prompt_tokens as u64).sum();
        let output_tokens: u64 = ok.iter().map(|r| r.output_tokens as u64).sum();
        let per_s = |n: f64| if wall_s > 0.0 { n / wall_s } else { 0.0 };
        let requested_mean = mean(ok.iter().map(|r| r.prompt_tokens_requested as f64));
        let actual_mean = mean(ok.iter().map(|r| r.prompt_tokens as f64));
        let mean_abs_error_pct = mean(ok.iter().map(|r| {
            let want = r.prompt_tokens_requested.max(1) as f64;
            (r.prompt_tokens as f64 - want).abs() / want * 100.0
        }));
        Summary {
            requests: records.len(),
            errors: records.len() - ok.len(),
            error_samples,
            wall_s,
            prompt_tokens,
            output_tokens,
            output_tok_s: per_s(output_tokens as f64),
            prompt_tok_s: per_s(prompt_tokens as f64),
            requests_per_s: per_s(ok.len() as f64),
            ttft_ms: Distribution::of(ok.iter().filter_map(|r| r.ttft_ms)),
            itl_ms: Distribution::of(ok.iter().flat_map(|r| r.gaps_ms.iter().copied())),
            tpot_ms: Distribution::of(ok.iter().filter_map(|r| r.tpot_ms)),
            e2e_ms: Distribution::of(ok.iter().map(|r| r.e2e_ms)),
            stream_tok_s: Distribution::of(ok.iter().filter_map(|r| r.stream_tok_s())),
            prompt_accuracy: PromptAccuracy { requested_mean, actual_mean, mean_abs_error_pct },
        }
    }
}

fn mean(values: impl Iterator<Item = f64>) -> f64 {
    let (sum, n) = values.fold((0.0, 0usize), |(s, n), v| (s + v, n + 1));
    if n == 0 {
        0.0
    } else {
        sum / n as f64
    }
}

/// A target's figures divided by the first target's at the same point: above 1 means more
/// throughput, or more latency.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Ratios {
    pub output_tok_s: Option<f64>,
    pub prompt_tok_s: Option<f64>,
    pub requests_per_s: Option<f64>,
    pub ttft_p50: Option<f64>,
    pub ttft_p90: Option<f64>,
    pub itl_p50: Option<f64>,
    pub tpot_p50: Option<f64>,
    pub e2e_p50: Option<f64>,
}

impl Ratios {
    pub fn of(this: &Summary, base: &Summary) -> Ratios {
        let div = |a: f64, b: f64| (b > 0.0 && a.is_finite()).then(|| a / b);
        let dist = |a: Option<Distribution>, b: Option<Distribution>, f: fn(&Distribution) -> f64| match (a, b) {
            (Some(a), Some(b)) => div(f(&a), f(&b)),
            _ => None,
        };
        Ratios {
            output_tok_s: div(this.output_tok_s, base.output_tok_s),
            prompt_tok_s: div(this.prompt_tok_s, base.prompt_tok_s),
            requests_per_s: div(this.requests_per_s, base.requests_per_s),
            ttft_p50: dist(this.ttft_ms, base.ttft_ms, |d| d.p50),
            ttft_p90: dist(this.ttft_ms, base.ttft_ms, |d| d.p90),
            itl_p50: dist(this.itl_ms, base.itl_ms, |d| d.p50),
            tpot_p50: dist(this.tpot_ms, base.tpot_ms, |d| d.p50),
            e2e_p50: dist(this.e2e_ms, base.e2e_ms, |d| d.p50),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_interpolate_like_numpy() {
        let d = Distribution::of((1..=10).map(f64::from)).unwrap();
        assert_eq!((d.p50, d.min, d.max, d.n), (5.5, 1.0, 10.0, 10));
        assert!((d.p90 - 9.1).abs() < 1e-9 && (d.p99 - 9.91).abs() < 1e-9);
        assert_eq!(d.mean, 5.5);
        assert_eq!(Distribution::of([3.0]).unwrap().p99, 3.0);
        assert!(Distribution::of([]).is_none());
        assert!(Distribution::of([f64::NAN]).is_none());
    }

    fn record(prompt: u32, out: u32, ttft: f64, e2e: f64) -> RequestRecord {
        RequestRecord {
            prompt_tokens_requested: 10,
            prompt_tokens: prompt,
            max_tokens: out,
            output_tokens: out,
            ttft_ms: Some(ttft),
            e2e_ms: e2e,
            tpot_ms: Some((e2e - ttft) / (out - 1) as f64),
            gaps_ms: vec![(e2e - ttft) / (out - 1) as f64; out as usize - 1],
            ..Default::default()
        }
    }

    #[test]
    fn summaries_count_tokens_of_successful_requests_over_wall_time() {
        let mut failed = RequestRecord { error: Some("HTTP 503".into()), ..Default::default() };
        failed.output_tokens = 99;
        let records = [record(11, 5, 100.0, 500.0), record(9, 5, 200.0, 600.0), failed.clone(), failed];
        let s = Summary::of(&records, 2.0);
        assert_eq!((s.requests, s.errors, s.error_samples.len()), (4, 2, 1));
        assert_eq!((s.prompt_tokens, s.output_tokens), (20, 10));
        assert_eq!((s.output_tok_s, s.prompt_tok_s, s.requests_per_s), (5.0, 10.0, 1.0));
        assert_eq!(s.ttft_ms.unwrap().p50, 150.0);
        assert_eq!(s.stream_tok_s.unwrap().mean, 10.0);
        assert_eq!(s.prompt_accuracy.mean_abs_error_pct, 10.0);

        let faster = Summary::of(&records, 1.0);
        let r = Ratios::of(&faster, &s);
        assert_eq!((r.output_tok_s, r.ttft_p50), (Some(2.0), Some(1.0)));
    }
}
