//! The results: the JSON document (`--json`) and the table printed at the end.

use std::fmt::Write as _;

use serde::Serialize;

use super::ceiling::{Ceiling, VsCeiling};
use super::client::Endpoint;
use super::spawn::SpawnInfo;
use super::stats::{Distribution, Ratios, RequestRecord, Summary};
use super::swap::SwapReport;
use super::workload::{Calibration, Point, Span};

/// Everything one run measured, as `--json` writes it.
#[derive(Debug, Serialize)]
pub struct Report {
    pub paddock_version: &'static str,
    pub started_at: String,
    pub machine: Machine,
    pub config: RunConfig,
    /// How prompt sizes were turned into word counts.
    pub calibration: Calibration,
    /// In the order given; the first is the baseline of every ratio.
    pub targets: Vec<TargetInfo>,
    /// Every round of every target, in the order they ran.
    pub turns: Vec<TurnRecord>,
    /// One entry per sweep point (none in the swap scenario).
    pub results: Vec<PointResult>,
    /// The swap scenario's results (`--swap-models`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap: Option<SwapReport>,
}

#[derive(Debug, Serialize)]
pub struct Machine {
    pub os: &'static str,
    pub arch: &'static str,
    pub cpus: usize,
    pub physical_cpus: usize,
    pub cpu_model: Option<String>,
}

impl Machine {
    pub fn this() -> Machine {
        let cpu_model = std::fs::read_to_string("/proc/cpuinfo").ok().and_then(|info| {
            info.lines().find_map(|l| {
                l.strip_prefix("model name").and_then(|v| v.split_once(':')).map(|(_, v)| v.trim().to_string())
            })
        });
        Machine {
            os: std::env::consts::OS,
            arch: std::env::consts::ARCH,
            cpus: num_cpus::get(),
            physical_cpus: num_cpus::get_physical(),
            cpu_model,
        }
    }
}

#[derive(Debug, Serialize)]
pub struct RunConfig {
    pub endpoint: Endpoint,
    /// `closed_loop` (concurrency sweep), `open_loop` (Poisson arrivals at each rate) or
    /// `swap` (`--swap-models`: no sweep points).
    pub mode: &'static str,
    pub points: Vec<Point>,
    pub prompt_tokens: Span,
    pub max_tokens: Span,
    /// Requests per target per point (None in duration mode).
    pub requests: Option<usize>,
    /// Seconds per target per point (None in request-count mode).
    pub duration_s: Option<f64>,
    pub warmup: usize,
    /// Most rounds a point is cut into to interleave targets.
    pub turns: usize,
    pub seed: u64,
    pub temperature: Option<f32>,
    /// Models each spawned server swaps between, and how many it keeps loaded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub swap_models: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_loaded: Option<u32>,
}

#[derive(Debug, Serialize)]
pub struct TargetInfo {
    pub name: String,
    pub url: String,
    pub model: String,
    /// Set when the benchmark started this server itself.
    pub spawned: Option<SpawnInfo>,
    /// Its resident memory over the first spawned server's (None for that one, or without).
    pub memory_ratio: Option<f64>,
}

#[derive(Debug, Clone, Serialize)]
pub struct TurnRecord {
    pub point: usize,
    pub x: f64,
    pub target: String,
    pub round: usize,
    pub requests: usize,
    /// Seconds from the start of the run.
    pub start_s: f64,
    pub wall_s: f64,
}

#[derive(Debug, Serialize)]
pub struct PointResult {
    pub point: Point,
    pub x: f64,
    pub targets: Vec<TargetResult>,
    /// llama.cpp's tools on the same settings (`--ceilings`), and each target against them.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ceiling: Option<Ceiling>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub vs_ceiling: Vec<VsCeiling>,
}

#[derive(Debug, Serialize)]
pub struct TargetResult {
    pub target: String,
    pub summary: Summary,
    /// Against the first target at this point (None for the first itself).
    pub ratios: Option<Ratios>,
    pub requests: Vec<RequestRecord>,
}

impl PointResult {
    /// Summaries and ratios of one point from each target's records and wall time, in target order.
    pub fn new(
        point: Point,
        per_target: Vec<(String, Vec<RequestRecord>, f64)>,
        ceiling: Option<Ceiling>,
    ) -> PointResult {
        let mut targets: Vec<TargetResult> = per_target
            .into_iter()
            .map(|(target, requests, wall_s)| TargetResult {
                target,
                summary: Summary::of(&requests, wall_s),
                ratios: None,
                requests,
            })
            .collect();
        if let Some(base) = targets.first().map(|t| t.summary.clone()) {
            for t in targets.iter_mut().skip(1) {
                t.ratios = Some(Ratios::of(&t.summary, &base));
            }
        }
        let vs_ceiling =
            ceiling.iter().flat_map(|c| targets.iter().map(move |t| VsCeiling::of(&t.target, &t.summary, c))).collect();
        PointResult { point, x: point.x(), targets, ceiling, vs_ceiling }
    }
}

fn dist(d: Option<Distribution>, f: impl Fn(&Distribution) -> f64) -> String {
    d.map(|d| format!("{:.1}", f(&d))).unwrap_or_else(|| "-".into())
}

fn ratio(r: Option<f64>) -> String {
    r.map(|r| format!("{r:.2}×")).unwrap_or_else(|| "-".into())
}

/// The table printed at the end: one block per point, one row per target.
pub fn table(report: &Report) -> String {
    let mut out = String::new();
    let base = report.targets.first().map(|t| t.name.as_str()).unwrap_or("");
    let several = report.targets.len() > 1;
    let _ = writeln!(
        out,
        "{} · prompt {} tokens · output {} tokens · calibration: {} ({:.2} tokens/word + {:.1})",
        match report.config.endpoint {
            Endpoint::Completions => "/v1/completions",
            Endpoint::Chat => "/v1/chat/completions",
        },
        report.config.prompt_tokens,
        report.config.max_tokens,
        report.calibration.source,
        report.calibration.per_word,
        report.calibration.fixed,
    );
    let name_width = report.targets.iter().map(|t| t.name.len()).max().unwrap_or(6).max(6);
    for point in &report.results {
        let _ = writeln!(out, "\n{}", point.point.label());
        let _ = write!(
            out,
            "  {:<name_width$} {:>4} {:>4} {:>9} {:>9} {:>9} {:>22} {:>12} {:>9} {:>7}",
            "target",
            "req",
            "err",
            "out t/s",
            "prmt t/s",
            "strm t/s",
            "TTFT ms p50/p90/p99",
            "ITL ms p50",
            "E2E p50",
            "prompt"
        );
        if several {
            let _ = write!(out, "   vs {base}: out t/s, TTFT p50, ITL p50");
        }
        out.push('\n');
        for t in &point.targets {
            let s = &t.summary;
            let ttft =
                s.ttft_ms.map(|d| format!("{:.1}/{:.1}/{:.1}", d.p50, d.p90, d.p99)).unwrap_or_else(|| "-".into());
            let _ = write!(
                out,
                "  {:<name_width$} {:>4} {:>4} {:>9.1} {:>9.1} {:>9} {:>22} {:>12} {:>9} {:>7.1}",
                t.target,
                s.requests,
                s.errors,
                s.output_tok_s,
                s.prompt_tok_s,
                dist(s.stream_tok_s, |d| d.p50),
                ttft,
                dist(s.itl_ms, |d| d.p50),
                dist(s.e2e_ms, |d| d.p50),
                s.prompt_accuracy.actual_mean,
            );
            if let Some(r) = &t.ratios {
                let _ = write!(out, "   {} {} {}", ratio(r.output_tok_s), ratio(r.ttft_p50), ratio(r.itl_p50));
            }
            out.push('\n');
            for e in &s.error_samples {
                let _ = writeln!(out, "    error: {e}");
            }
        }
        if let Some(c) = &point.ceiling {
            ceiling_lines(&mut out, c, &point.vs_ceiling, report.config.max_tokens.max);
        }
    }
    if let Some(swap) = &report.swap {
        swap_table(&mut out, swap, base);
    }
    let spawned: Vec<&TargetInfo> = report.targets.iter().filter(|t| t.spawned.is_some()).collect();
    if !spawned.is_empty() {
        out.push('\n');
    }
    let base_memory = spawned.first().map(|t| t.name.as_str()).unwrap_or("");
    for t in spawned {
        if let Some(SpawnInfo { memory: Some(m), settings, .. }) = &t.spawned {
            let _ = write!(
                out,
                "{}: resident memory {:.1} MiB (peak {:.1} MiB",
                t.name,
                m.rss_kib as f64 / 1024.0,
                m.peak_rss_kib as f64 / 1024.0
            );
            if m.processes > 1 {
                let _ = write!(out, ", summed over {} processes", m.processes);
            }
            let _ = write!(
                out,
                ") · threads {} · context {} · slots {}",
                settings.threads, settings.ctx_size, settings.parallel
            );
            if let Some(r) = t.memory_ratio {
                let _ = write!(out, " · {r:.2}× {base_memory}");
            }
            out.push('\n');
        }
    }
    out
}

/// The swap scenario's block: one row per server, then the in-process reference.
fn swap_table(out: &mut String, swap: &SwapReport, base: &str) {
    let _ = writeln!(
        out,
        "\nswap: {} models, at most {} loaded: {}",
        swap.models.len(),
        swap.max_loaded,
        match (swap.cold, swap.paddock_cold) {
            (false, _) => "all stay loaded (no swaps)",
            (true, true) => "every request loads its model (paddock's memory budget holds only those)",
            (true, false) => "every request swaps (paddock parks the model that gives way, weights kept)",
        }
    );
    let width = swap.targets.iter().map(|t| t.target.len()).max().unwrap_or(6).max(6);
    let _ = writeln!(
        out,
        "  {:<width$} {:>4} {:>4} {:>22} {:>9} {:>11} {:>15}   vs {base}: TTFT p50, p90   vs {}: TTFT p50",
        "target",
        "req",
        "err",
        "TTFT ms p50/p90/max",
        "E2E p50",
        "load ms p50",
        "RSS MiB 1st→nth",
        super::swap::BARE
    );
    for t in &swap.targets {
        let s = &t.summary;
        let ttft = s.ttft_ms.map(|d| format!("{:.1}/{:.1}/{:.1}", d.p50, d.p90, d.max)).unwrap_or_else(|| "-".into());
        // Memory after the first and the last request: growth means unloads leave memory behind.
        let rss: Vec<f64> = t.requests.iter().filter_map(|r| r.rss_kib).map(|k| k as f64 / 1024.0).collect();
        let rss = match (rss.first(), rss.last()) {
            (Some(a), Some(b)) => format!("{a:.0}→{b:.0}"),
            _ => "-".into(),
        };
        let _ = write!(
            out,
            "  {:<width$} {:>4} {:>4} {:>22} {:>9} {:>11} {:>15}",
            t.target,
            s.requests,
            s.errors,
            ttft,
            dist(s.e2e_ms, |d| d.p50),
            dist(t.load_ms, |d| d.p50),
            rss
        );
        if let Some(r) = &t.ratios {
            let _ = write!(out, "   {} {}", ratio(r.ttft_p50), ratio(r.ttft_p90));
        } else if t.over_bare.is_some() {
            let _ = write!(out, "   {:>5} {:>5}", "-", "-");
        }
        if let Some(b) = &t.over_bare {
            let _ = write!(out, "   {:+.1} ms ({:.2}×)", b.ttft_p50_ms, b.ttft_p50_ratio);
        }
        out.push('\n');
        for e in &s.error_samples {
            let _ = writeln!(out, "    error: {e}");
        }
    }
}

/// Under a point's rows: llama.cpp's own figures, and each target's share of them.
fn ceiling_lines(out: &mut String, c: &Ceiling, vs: &[VsCeiling], output_tokens: u32) {
    let _ = write!(
        out,
        "  ceiling: llama-batched-bench, {} sequence{}: output {:.1} t/s (prompts {:.1} t/s, decode {:.1} t/s)",
        c.sequences,
        if c.sequences == 1 { "" } else { "s" },
        c.batched_output_tok_s,
        c.batched_prompt_tok_s,
        c.batched_decode_tok_s
    );
    if let Some(tg) = c.bench_decode_tok_s {
        let _ = write!(out, " · llama-bench tg{output_tokens}: {tg:.1} t/s");
    }
    out.push('\n');
    let shares: Vec<String> = vs
        .iter()
        .map(|v| {
            let mut s = format!("{} {} output, {} decode", v.target, ratio(v.output), ratio(v.decode));
            if c.bench_decode_tok_s.is_some() {
                let _ = write!(s, ", {} stream", ratio(v.stream));
            }
            s
        })
        .collect();
    let _ = writeln!(out, "  vs ceiling: {}", shares.join(" · "));
}
