//! `paddock bench`: a load generator for OpenAI-compatible servers, to compare them side by side.
//!
//! # Layout
//! - [`workload`]: token counts, synthetic prompts, sweep points, the turn schedule, arrivals.
//! - [`client`]: targets, the timed streaming request, the readiness probe, `/tokenize`.
//! - [`spawn`]: servers the benchmark starts itself (paddock, llama-server) and kills after.
//! - [`stats`]: per-request records, percentiles, summaries, ratios.
//! - [`report`]: the JSON document and the printed table; [`plot`]: the SVG.
//! - [`swap`]: the cold-start scenario (`--swap-models`), against [`bare`], an in-process load.
//! - [`ceiling`]: llama.cpp's own benchmark tools on the same settings (`--ceilings`).
//!
//! A run: start the spawned servers and probe every target; calibrate prompt sizes with the
//! first target's tokenizer; warm each target up; then for each sweep point run rounds of
//! A, B, A, B… (so that a noisy machine's drift hits every target alike), each round a
//! closed loop of N streams or open-loop Poisson arrivals; finally sample the spawned servers'
//! memory, summarise, print, write JSON and SVG. Every spawned server is killed when the run
//! ends, fails or is interrupted, because the guards live in the run's future.
//!
//! With `--swap-models N` the sweep gives way to the swap scenario: the spawned servers serve N
//! copies of the model, at most `--max-loaded` at once, and requests go to each in turn.

pub mod bare;
pub mod ceiling;
pub mod client;
pub mod plot;
pub mod report;
pub mod spawn;
pub mod stats;
pub mod swap;
pub mod workload;

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::future::join_all;
use indicatif::{ProgressBar, ProgressStyle};
use parking_lot::Mutex;

use client::{Endpoint, Target, TargetSpec};
use report::{Machine, PointResult, Report, RunConfig, TargetInfo, TurnRecord};
use spawn::{Kind, Serve, ServerSettings, SpawnInfo, Spawned};
use stats::RequestRecord;
use workload::{Calibration, Point, Span, Workload};

/// Why a benchmark could not run (request failures are results, not errors).
#[derive(Debug, thiserror::Error)]
pub enum BenchError {
    #[error("{0}")]
    Usage(String),
    #[error("target '{name}': {why}")]
    InvalidTarget { name: String, why: String },
    #[error("target '{name}' at {url} {why}")]
    Unreachable { name: String, url: String, why: String },
    #[error("spawned {kind}: {why}")]
    Spawn { kind: &'static str, why: String },
    #[error("warm-up request to '{name}' failed: {why}")]
    Warmup { name: String, why: String },
    #[error("cannot write {path}: {why}")]
    Output { path: PathBuf, why: String },
    #[error("cannot make the swap models in {dir}: {why}")]
    Models { dir: PathBuf, why: String },
    #[error("interrupted")]
    Interrupted,
}

/// `paddock bench` flags.
#[derive(Debug, clap::Args)]
#[command(after_help = "Targets run in this order, the first being the baseline of every ratio: a spawned \
llama-server, a spawned paddock, --url, then each --target.\n\nExample, paddock against llama-server on one GGUF:\n  \
paddock bench --spawn-llama-server $(scripts/build-llama-tools | grep llama-server) --spawn-paddock model.gguf \\\n    \
--threads 2 --parallel 8 --ctx-size 4096 --concurrency 1,8 --prompt-tokens 128 --max-tokens 64 --json out.json --plot out.svg")]
pub struct BenchArgs {
    /// A server to measure: NAME=URL[,model=M][,api-key=K]. Repeat it to compare servers; they are
    /// interleaved round by round within each sweep point.
    #[arg(long = "target", value_name = "NAME=URL[,model=M][,api-key=K]")]
    pub targets: Vec<TargetSpec>,
    /// One server to measure (named after its host:port), instead of or besides --target.
    #[arg(long)]
    pub url: Option<String>,
    /// The `model` sent to --url and to --target entries without their own.
    #[arg(long)]
    pub model: Option<String>,
    /// Bearer credential for --url.
    #[arg(long, env = "PADDOCK_BENCH_API_KEY", hide_env_values = true)]
    pub api_key: Option<String>,
    /// Which OpenAI route to load.
    #[arg(long, value_enum, default_value = "completions")]
    pub endpoint: Endpoint,
    /// Prompt tokens per request: N, or A..B drawn uniformly per request.
    #[arg(long, default_value = "128")]
    pub prompt_tokens: Span,
    /// Output tokens per request (sent with ignore_eos, so each request makes exactly this many).
    #[arg(long, default_value = "64")]
    pub max_tokens: Span,
    /// Closed-loop sweep: numbers of concurrent streams, e.g. 1,2,4,8.
    #[arg(long, value_delimiter = ',', default_value = "1")]
    pub concurrency: Vec<u32>,
    /// Open-loop sweep instead: Poisson arrival rates in requests per second, e.g. 0.5,1,2.
    #[arg(long, value_delimiter = ',', conflicts_with = "concurrency")]
    pub rate: Vec<f64>,
    /// Requests per target per sweep point.
    #[arg(long, default_value_t = 32)]
    pub requests: usize,
    /// Seconds per target per sweep point, instead of --requests.
    #[arg(long, conflicts_with = "requests")]
    pub duration: Option<f64>,
    /// Requests per target before measuring (one at a time).
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// With several targets, cut each point into up to this many rounds of A, B, A, B…
    #[arg(long, default_value_t = 4)]
    pub turns: usize,
    /// Seed of the prompts, lengths and arrivals.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Sampling temperature sent with every request [default: the server's].
    #[arg(long)]
    pub temperature: Option<f32>,
    /// Seconds before a request counts as failed.
    #[arg(long, default_value_t = 600)]
    pub request_timeout: u64,
    /// Write every result, per request included, as JSON.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Draw throughput and TTFT p50 against the sweep, one line per target, as SVG.
    #[arg(long, value_name = "FILE.svg")]
    pub plot: Option<PathBuf>,
    /// No progress bar (it is also hidden when stderr is not a terminal).
    #[arg(long, short)]
    pub quiet: bool,
    /// Start this binary as `paddock serve -m MODEL` on a free port and measure it (target `paddock`).
    #[arg(long, value_name = "MODEL.gguf")]
    pub spawn_paddock: Option<PathBuf>,
    /// Start this llama-server binary on the same GGUF and settings (target `llama-server`).
    #[arg(long, value_name = "BIN")]
    pub spawn_llama_server: Option<PathBuf>,
    /// The GGUF for --spawn-llama-server [default: --spawn-paddock's].
    #[arg(long, value_name = "MODEL.gguf")]
    pub spawn_model: Option<PathBuf>,
    /// CPU threads of spawned servers [default: physical cores].
    #[arg(long)]
    pub threads: Option<u32>,
    /// Total context of spawned servers, shared by the slots [default: enough for the workload].
    #[arg(long)]
    pub ctx_size: Option<u32>,
    /// Parallel slots of spawned servers [default: the largest concurrency, or 4].
    #[arg(long)]
    pub parallel: Option<u32>,
    /// Swap scenario instead of the sweep: the spawned servers get N copies of the model under
    /// distinct names (paddock as instances started on demand, llama-server in router mode with
    /// --models-dir), and --requests requests, one at a time, name them in turn A, B, C, A…, so
    /// each one loads its model first. Reports TTFT (including the load) against the first
    /// target and against loading the model in-process with no server ("bare load").
    #[arg(long, value_name = "N", conflicts_with_all = ["rate", "duration", "url", "targets"])]
    pub swap_models: Option<usize>,
    /// With --swap-models: how many models a server keeps loaded (paddock's
    /// max_running_instances, llama-server's --models-max). At N nothing is unloaded, and the
    /// memory sampled at the end is that of N models loaded.
    #[arg(long, value_name = "K", default_value_t = 1, requires = "swap_models")]
    pub max_loaded: u32,
    /// With --swap-models: give paddock a memory_budget that holds only --max-loaded models, so
    /// a model that gives way frees its weights (as the router's unload does) instead of staying
    /// parked in memory, and every swap loads from disk.
    #[arg(long, requires = "swap_models")]
    pub swap_cold: bool,
    /// After each concurrency point, run llama.cpp's llama-batched-bench (and, at 1 stream,
    /// llama-bench) from --spawn-llama-server's build directory on the same model, threads,
    /// context and token counts, and give every target's ratio to these ceilings.
    #[arg(long, requires = "spawn_llama_server", conflicts_with_all = ["rate", "swap_models"])]
    pub ceilings: bool,
}

/// Runs the benchmark; Ctrl-C stops it, and dropping the run kills what it spawned.
pub async fn run(args: BenchArgs) -> Result<(), BenchError> {
    tokio::select! {
        result = run_inner(args) => result,
        _ = tokio::signal::ctrl_c() => Err(BenchError::Interrupted),
    }
}

/// A target and, if we started it, its server.
struct Entry {
    target: Target,
    spawned: Option<Spawned>,
}

fn check(args: &BenchArgs) -> Result<Vec<Point>, BenchError> {
    let usage = |s: &str| Err(BenchError::Usage(s.into()));
    if args.targets.is_empty()
        && args.url.is_none()
        && args.spawn_paddock.is_none()
        && args.spawn_llama_server.is_none()
    {
        return usage("nothing to measure: give --url, --target NAME=URL, --spawn-paddock or --spawn-llama-server");
    }
    if args.spawn_llama_server.is_some() && args.spawn_model.is_none() && args.spawn_paddock.is_none() {
        return usage("--spawn-llama-server needs a model: --spawn-model MODEL.gguf (or --spawn-paddock MODEL.gguf)");
    }
    if args.duration.is_some_and(|d| !(d > 0.0 && d.is_finite())) {
        return usage("--duration must be a positive number of seconds");
    }
    if args.duration.is_none() && args.requests == 0 {
        return usage("--requests must be at least 1");
    }
    if args.turns == 0 {
        return usage("--turns must be at least 1");
    }
    if let Some(n) = args.swap_models {
        if args.spawn_paddock.is_none() && args.spawn_llama_server.is_none() {
            return usage("--swap-models sets up the servers itself: give --spawn-paddock and/or --spawn-llama-server");
        }
        if n < 2 {
            return usage("--swap-models must be at least 2: a swap needs two models");
        }
        if args.max_loaded == 0 || args.max_loaded as usize > n {
            return usage("--max-loaded must be between 1 and --swap-models");
        }
        if args.spawn_model.as_ref().zip(args.spawn_paddock.as_ref()).is_some_and(|(a, b)| a != b) {
            return usage("--swap-models copies one model for both servers: --spawn-model must be --spawn-paddock's");
        }
        return Ok(Vec::new());
    }
    if args.ceilings && (args.prompt_tokens.min != args.prompt_tokens.max || args.max_tokens.min != args.max_tokens.max)
    {
        return usage("--ceilings needs fixed --prompt-tokens and --max-tokens: the tools take one size each");
    }
    let points: Vec<Point> = if args.rate.is_empty() {
        if args.concurrency.contains(&0) {
            return usage("--concurrency values must be at least 1");
        }
        args.concurrency.iter().map(|&c| Point::Concurrency(c)).collect()
    } else {
        if args.rate.iter().any(|r| !(*r > 0.0 && r.is_finite())) {
            return usage("--rate values must be positive requests per second");
        }
        args.rate.iter().map(|&r| Point::Rate(r)).collect()
    };
    Ok(points)
}

/// Settings of spawned servers: the same for both kinds.
fn settings(args: &BenchArgs, points: &[Point]) -> ServerSettings {
    let parallel = args.parallel.unwrap_or_else(|| {
        points.iter().filter_map(|p| if let Point::Concurrency(c) = p { Some(*c) } else { None }).max().unwrap_or(4)
    });
    // Room per slot for the longest prompt (with slack for calibration error), the longest
    // output and a chat template, rounded to 256.
    let per_slot = (args.prompt_tokens.max + args.prompt_tokens.max / 4 + args.max_tokens.max + 64).div_ceil(256) * 256;
    ServerSettings {
        threads: args.threads.unwrap_or_else(|| num_cpus::get_physical().max(1) as u32),
        ctx_size: args.ctx_size.unwrap_or(per_slot * parallel),
        parallel,
    }
}

/// The swap scenario's models, in a directory deleted after the servers are gone.
struct SwapModels {
    models: Vec<swap::SwapModel>,
    _dir: tempfile::TempDir,
}

impl SwapModels {
    /// A memory budget with room for `max_loaded` of the models but not one more, by paddock's
    /// own estimate of what an instance with these settings holds.
    fn cold_budget(&self, max_loaded: u32, settings: ServerSettings) -> Result<u64, BenchError> {
        let model = &self.models[0].path;
        let shape = crate::models::registry::shape_of(model)
            .map_err(|why| BenchError::Models { dir: self._dir.path().to_path_buf(), why })?;
        let one = settings.instance_options().footprint(&shape).total();
        Ok(one * u64::from(max_loaded) + one / 2)
    }
}

/// Starts the spawned servers and builds every target, in baseline-first order.
async fn targets(
    args: &BenchArgs,
    settings: ServerSettings,
    swap: Option<&SwapModels>,
) -> Result<Vec<Entry>, BenchError> {
    let timeout = Duration::from_secs(args.request_timeout);
    let mut entries: Vec<Entry> = Vec::new();
    let mut spawns: Vec<(Kind, PathBuf, PathBuf)> = Vec::new();
    if let Some(bin) = &args.spawn_llama_server {
        let model = args.spawn_model.clone().or_else(|| args.spawn_paddock.clone()).unwrap_or_default();
        spawns.push((Kind::LlamaServer, bin.clone(), model));
    }
    if let Some(model) = &args.spawn_paddock {
        let exe = std::env::current_exe().map_err(|e| BenchError::Spawn { kind: "paddock", why: e.to_string() })?;
        spawns.push((Kind::Paddock, exe, model.clone()));
    }
    // Start all first, then wait for all: the servers load their models at the same time.
    for (kind, program, model) in spawns {
        let serve = match swap {
            Some(s) => Serve::Many {
                dir: s._dir.path(),
                max_loaded: args.max_loaded,
                memory_budget: args.swap_cold.then(|| s.cold_budget(args.max_loaded, settings)).transpose()?,
            },
            None => Serve::One(&model),
        };
        let spawned = Spawned::start(kind, &program, serve, settings)?;
        let spec = TargetSpec { name: kind.name().into(), url: spawned.url.clone(), model: None, api_key: None };
        let default_model = swap.map_or(spawned.model.as_str(), |s| s.models[0].name.as_str());
        let target = Target::new(&spec, default_model, timeout)?;
        entries.push(Entry { target, spawned: Some(spawned) });
    }
    for entry in &mut entries {
        let Some(spawned) = &mut entry.spawned else { continue };
        let Some(swap) = swap else {
            spawned.wait_ready(&entry.target, args.endpoint, Duration::from_secs(300)).await?;
            continue;
        };
        // Nothing is loaded yet, and a completion request would load a model: wait for the
        // listener, then (paddock) create the instances.
        spawned.wait_listening(&entry.target, "/health", Duration::from_secs(60)).await?;
        if spawned.kind == Kind::Paddock {
            swap::create_instances(&entry.target, &swap.models, settings).await?;
        }
    }
    let mut specs: Vec<TargetSpec> = Vec::new();
    if let Some(url) = &args.url {
        let name = reqwest::Url::parse(url)
            .ok()
            .and_then(|u| Some(format!("{}:{}", u.host_str()?, u.port_or_known_default()?)))
            .unwrap_or_else(|| url.clone());
        specs.push(TargetSpec { name, url: url.clone(), model: args.model.clone(), api_key: args.api_key.clone() });
    }
    specs.extend(args.targets.iter().cloned());
    for spec in specs {
        let default_model = args.model.clone().unwrap_or_else(|| "default".into());
        let target = Target::new(&spec, &default_model, timeout)?;
        target.probe(args.endpoint).await.map_err(|e| BenchError::Unreachable {
            name: spec.name.clone(),
            url: spec.url.clone(),
            why: e.to_string(),
        })?;
        entries.push(Entry { target, spawned: None });
    }
    for (i, e) in entries.iter().enumerate() {
        if entries[..i].iter().any(|o| o.target.name == e.target.name) {
            return Err(BenchError::Usage(format!("two targets are named '{}'", e.target.name)));
        }
    }
    Ok(entries)
}

/// Words per token, measured with the first target that has a tokenizer route.
async fn calibrate(targets: &[Target], seed: u64) -> Calibration {
    let [short, long] = workload::calibration_texts(seed);
    for target in targets {
        let (Some(a), Some(b)) = (target.count_tokens(&short.1).await, target.count_tokens(&long.1).await) else {
            continue;
        };
        if let Some(c) = Calibration::measured((short.0, a), (long.0, b)) {
            return c;
        }
    }
    Calibration::ASSUMED
}

/// What every round needs to know.
struct Ctx<'a> {
    args: &'a BenchArgs,
    workload: &'a Workload,
    t0: Instant,
    bar: &'a ProgressBar,
}

/// One round: `target` runs requests of point `p` from index `first`, `count` of them or until
/// `until`. Returns the records and the round's wall time.
async fn run_round(
    ctx: &Ctx<'_>,
    target: &Target,
    (p, point): (usize, Point),
    round: usize,
    first: usize,
    count: Option<usize>,
    until: Option<Instant>,
) -> (Vec<RequestRecord>, f64) {
    let start = Instant::now();
    let records = Mutex::new(Vec::new());
    let collected = &records;
    // Everything the request futures share is borrowed from this frame; join_all polls them
    // on this task, which is enough for network-bound work and keeps the borrows simple.
    let one = move |i: usize| async move {
        let job = ctx.workload.job(p, first + i);
        let mut record = target.run(ctx.args.endpoint, &job, ctx.args.temperature, ctx.t0).await;
        record.round = round;
        collected.lock().push((i, record));
        ctx.bar.inc(1);
    };
    match point {
        Point::Concurrency(c) => {
            let next = &AtomicUsize::new(0);
            let worker = || async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    let over = count.is_some_and(|n| i >= n) || until.is_some_and(|t| Instant::now() >= t);
                    if over {
                        break;
                    }
                    one(i).await;
                }
            };
            join_all((0..c).map(|_| worker())).await;
        }
        Point::Rate(rate) => {
            let n = count.unwrap_or_else(|| {
                let secs = until.map_or(0.0, |t| t.saturating_duration_since(start).as_secs_f64());
                (rate * secs).ceil() as usize + 1
            });
            let arrivals = workload::arrivals(rate, n, ctx.args.seed, p, round);
            let sends = arrivals.into_iter().enumerate().map(|(i, at)| async move {
                let when = start + Duration::from_secs_f64(at);
                if until.is_some_and(|t| when >= t) {
                    return;
                }
                tokio::time::sleep_until(when.into()).await;
                one(i).await;
            });
            join_all(sends).await;
        }
    }
    let mut records = records.into_inner();
    records.sort_by_key(|(i, _)| *i);
    (records.into_iter().map(|(_, r)| r).collect(), start.elapsed().as_secs_f64())
}

fn progress(args: &BenchArgs, total: Option<u64>) -> ProgressBar {
    if args.quiet {
        return ProgressBar::hidden();
    }
    // indicatif draws to stderr only when it is a terminal.
    match total {
        Some(n) => {
            let bar = ProgressBar::new(n);
            let style = ProgressStyle::with_template("{bar:30} {pos}/{len} requests · {elapsed} · eta {eta} · {msg}");
            bar.set_style(style.unwrap_or_else(|_| ProgressStyle::default_bar()));
            bar
        }
        None => {
            let bar = ProgressBar::new_spinner();
            let style = ProgressStyle::with_template("{spinner} {pos} requests · {elapsed} · {msg}");
            bar.set_style(style.unwrap_or_else(|_| ProgressStyle::default_spinner()));
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        }
    }
}

async fn run_inner(args: BenchArgs) -> Result<(), BenchError> {
    let points = check(&args)?;
    // Before anything starts: a missing tool is a usage error, not a failure after the sweep.
    let tools = match (&args.spawn_llama_server, args.ceilings) {
        (Some(server), true) => Some(ceiling::tools(server)?),
        _ => None,
    };
    let settings = settings(&args, &points);
    let started_at = chrono::Utc::now().to_rfc3339();
    let swap_models = match args.swap_models {
        Some(n) => {
            let source = args.spawn_paddock.clone().or_else(|| args.spawn_model.clone()).unwrap_or_default();
            let dir = tempfile::Builder::new().prefix("paddock-bench-models-").tempdir().map_err(|e| {
                BenchError::Models { dir: std::env::temp_dir(), why: format!("cannot create a directory: {e}") }
            })?;
            Some(SwapModels { models: swap::copy_models(&source, dir.path(), n)?, _dir: dir })
        }
        None => None,
    };
    let entries = targets(&args, settings, swap_models.as_ref()).await?;
    if let Some(swap) = &swap_models {
        return swap::run_report(&args, entries, swap, settings, started_at).await;
    }
    let calibration = calibrate(&entries.iter().map(|e| e.target.clone()).collect::<Vec<_>>(), args.seed).await;
    let workload =
        Workload { prompt_tokens: args.prompt_tokens, max_tokens: args.max_tokens, seed: args.seed, calibration };

    for e in &entries {
        for i in 0..args.warmup {
            let job = workload.job(workload::WARMUP, i);
            let record = e.target.run(args.endpoint, &job, args.temperature, Instant::now()).await;
            if let Some(why) = record.error {
                return Err(BenchError::Warmup { name: e.target.name.clone(), why });
            }
        }
    }

    let n = entries.len();
    let total = args.duration.is_none().then(|| (points.len() * n * args.requests) as u64);
    let bar = progress(&args, total);
    let t0 = Instant::now();
    let ctx = Ctx { args: &args, workload: &workload, t0, bar: &bar };
    // Per point, per target: records and summed wall time.
    let mut collected: Vec<Vec<(Vec<RequestRecord>, f64)>> = vec![vec![(Vec::new(), 0.0); n]; points.len()];
    let mut turns: Vec<TurnRecord> = Vec::new();
    let mut ceilings: Vec<Option<ceiling::Ceiling>> = vec![None; points.len()];
    let ceiling_model = args.spawn_model.clone().or_else(|| args.spawn_paddock.clone()).unwrap_or_default();
    for (p, &point) in points.iter().enumerate() {
        let rounds = match args.duration {
            Some(_) if n > 1 => args.turns,
            Some(_) => 1,
            None => workload::rounds(n, args.turns, args.requests, point),
        };
        let mut next = vec![0usize; n];
        for r in 0..rounds {
            for (t, e) in entries.iter().enumerate() {
                bar.set_message(format!("{} · {} · round {}/{rounds}", point.label(), e.target.name, r + 1));
                let start_s = t0.elapsed().as_secs_f64();
                let (count, until) = match args.duration {
                    Some(d) => (None, Some(Instant::now() + Duration::from_secs_f64(d / rounds as f64))),
                    None => (Some(args.requests * (r + 1) / rounds - args.requests * r / rounds), None),
                };
                let (records, wall) = run_round(&ctx, &e.target, (p, point), r, next[t], count, until).await;
                next[t] += records.len();
                turns.push(TurnRecord {
                    point: p,
                    x: point.x(),
                    target: e.target.name.clone(),
                    round: r,
                    requests: records.len(),
                    start_s,
                    wall_s: wall,
                });
                let slot = &mut collected[p][t];
                slot.0.extend(records);
                slot.1 += wall;
            }
        }
        if let (Some(tools), Point::Concurrency(streams)) = (&tools, point) {
            bar.set_message(format!("{} · llama-batched-bench", point.label()));
            let (tools, model) = (tools.clone(), ceiling_model.clone());
            let (pp, tg) = (args.prompt_tokens.max, args.max_tokens.max);
            let measured =
                tokio::task::spawn_blocking(move || ceiling::measure(&tools, &model, settings, streams, pp, tg)).await;
            // The servers' figures stand without it: a tool that fails (a context too small
            // for its sequences, say) is reported, not a reason to lose the run.
            match measured.map_err(|e| e.to_string()).and_then(|r| r.map_err(|e| e.to_string())) {
                Ok(c) => ceilings[p] = Some(c),
                Err(e) => eprintln!("paddock bench: no ceiling at {}: {e}", point.label()),
            }
        }
    }
    bar.finish_and_clear();

    let infos = target_infos(&entries, settings);
    // The servers are not needed any more: stop them before writing files.
    drop(entries);

    let results = points
        .iter()
        .zip(collected)
        .zip(ceilings)
        .map(|((&point, per_target), ceiling)| {
            let per_target =
                infos.iter().zip(per_target).map(|(i, (recs, wall))| (i.name.clone(), recs, wall)).collect();
            PointResult::new(point, per_target, ceiling)
        })
        .collect();
    let mode = if args.rate.is_empty() { "closed_loop" } else { "open_loop" };
    let report = Report {
        paddock_version: crate::build::VERSION,
        started_at,
        machine: Machine::this(),
        config: run_config(&args, mode, points),
        calibration,
        targets: infos,
        turns,
        results,
        swap: None,
    };
    write_report(&args, &report)
}

fn run_config(args: &BenchArgs, mode: &'static str, points: Vec<Point>) -> RunConfig {
    RunConfig {
        endpoint: args.endpoint,
        mode,
        points,
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
        requests: args.duration.is_none().then_some(args.requests),
        duration_s: args.duration,
        warmup: args.warmup,
        turns: args.turns,
        seed: args.seed,
        temperature: args.temperature,
        swap_models: args.swap_models,
        max_loaded: args.swap_models.map(|_| args.max_loaded),
    }
}

/// Each target as the report shows it, with the spawned servers' memory sampled now and its
/// ratio to the first spawned server's.
fn target_infos(entries: &[Entry], settings: ServerSettings) -> Vec<TargetInfo> {
    let mut infos: Vec<TargetInfo> = entries
        .iter()
        .map(|e| TargetInfo {
            name: e.target.name.clone(),
            url: e.target.base.clone(),
            model: e.target.model.clone(),
            spawned: e.spawned.as_ref().map(|s| SpawnInfo {
                kind: s.kind,
                pid: s.pid(),
                command: s.command.clone(),
                settings,
                memory: s.memory(),
            }),
            memory_ratio: None,
        })
        .collect();
    let rss = |i: &TargetInfo| i.spawned.as_ref().and_then(|s| s.memory).map(|m| m.rss_kib as f64);
    if let Some(base) = infos.iter().find_map(rss) {
        for info in infos.iter_mut().skip_while(|i| rss(i).is_none()).skip(1) {
            info.memory_ratio = rss(info).map(|r| r / base);
        }
    }
    infos
}

/// Prints the table and writes the JSON and the plot.
fn write_report(args: &BenchArgs, report: &Report) -> Result<(), BenchError> {
    print!("{}", report::table(report));
    let swap_targets = report.swap.iter().flat_map(|s| &s.targets).map(|t| &t.summary);
    let errors: usize =
        report.results.iter().flat_map(|p| &p.targets).map(|t| &t.summary).chain(swap_targets).map(|s| s.errors).sum();
    if errors > 0 {
        eprintln!("paddock bench: {errors} requests failed (see the table and the JSON)");
    }
    if let Some(path) = &args.json {
        let text = serde_json::to_string_pretty(report).map_err(|e| output_error(path, e))?;
        std::fs::write(path, text + "\n").map_err(|e| output_error(path, e))?;
    }
    if let Some(path) = &args.plot {
        plot::write(report, path).map_err(|e| output_error(path, e))?;
    }
    Ok(())
}

fn output_error(path: &std::path::Path, e: impl std::fmt::Display) -> BenchError {
    BenchError::Output { path: path.to_path_buf(), why: e.to_string() }
}
