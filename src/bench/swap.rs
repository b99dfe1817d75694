//! `--swap-models N`: cold starts. Each spawned server gets N models (copies of one GGUF under
//! distinct names) of which at most `--max-loaded K` stay in memory, and one client asks for
//! them in turn, A, B, C, A, B, C…, so that with K < N every request must load its model (and
//! unload another) before its first token. Targets take turns cycle by cycle, as the sweep's
//! rounds do, and an in-process load of the same model ([`bare`](super::bare)) runs in the same
//! turns as the floor every server is held against.
//!
//! With K ≥ N nothing is unloaded: every model is loaded once by the warm-up and the spawned
//! servers' memory, sampled at the end, is that of N models resident.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde::Serialize;
use serde_json::json;

use super::client::Target;
use super::report::{Machine, Report};
use super::spawn::{Kind, ServerSettings};
use super::stats::{Distribution, Ratios, RequestRecord, Summary};
use super::workload::Calibration;
use super::workload::{self, Workload};
use super::{
    bare, calibrate, progress, run_config, target_infos, write_report, BenchArgs, BenchError, Entry, SwapModels,
};

/// The name of the in-process reference in the report.
pub const BARE: &str = "bare load";

/// One of the models the servers swap between.
#[derive(Debug, Clone)]
pub struct SwapModel {
    /// What requests send as `model`: the file's stem, which is also how llama-server's
    /// router names the models of its `--models-dir`.
    pub name: String,
    pub path: PathBuf,
}

/// Copies `source` into `dir` `n` times under distinct names. Real copies, not links: a
/// server must not be able to tell that they are one file (and share its pages or its load).
pub fn copy_models(source: &Path, dir: &Path, n: usize) -> Result<Vec<SwapModel>, BenchError> {
    let fail = |why: String| BenchError::Models { dir: dir.to_path_buf(), why };
    if !source.is_file() {
        return Err(fail(format!("model file {} does not exist", source.display())));
    }
    let stem = source.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    // A name both servers accept: paddock's instance names allow [A-Za-z0-9._-], at most 64.
    let mut base: String =
        stem.chars().map(|c| if c.is_ascii_alphanumeric() || matches!(c, '-' | '_') { c } else { '-' }).collect();
    base.truncate(48);
    if base.is_empty() {
        base = "model".into();
    }
    std::fs::create_dir_all(dir).map_err(|e| fail(e.to_string()))?;
    (1..=n)
        .map(|i| {
            let name = format!("{base}-swap{i}");
            let path = dir.join(format!("{name}.gguf"));
            std::fs::copy(source, &path).map_err(|e| fail(format!("cannot copy {}: {e}", source.display())))?;
            Ok(SwapModel { name, path })
        })
        .collect()
}

/// Creates one paddock instance per model: started on demand by the first request that names
/// it, with the settings llama-server's router passes to each of its model servers.
pub async fn create_instances(
    target: &Target,
    models: &[SwapModel],
    settings: ServerSettings,
) -> Result<(), BenchError> {
    for m in models {
        let body = json!({
            "backend_type": "llama_cpp",
            "backend_options": {
                "model": m.path,
                "threads": settings.threads,
                "ctx_size": settings.ctx_size,
                "parallel": settings.parallel,
            },
            "on_demand_start": true,
        });
        target.post_json(&format!("/api/instances/{}", m.name), &body).await.map_err(|e| BenchError::Spawn {
            kind: Kind::Paddock.name(),
            why: format!("cannot create instance '{}': {e}", m.name),
        })?;
    }
    Ok(())
}

/// The swap scenario's results, as `--json` writes them under `swap`.
#[derive(Debug, Serialize)]
pub struct SwapReport {
    pub models: Vec<String>,
    pub max_loaded: u32,
    /// Whether every measured request named a model that was not loaded (max_loaded < models).
    pub cold: bool,
    /// Whether paddock's memory budget held only max_loaded models (`--swap-cold`), so its
    /// swaps loaded from disk too; else it kept the weights of what gave way (parked).
    pub paddock_cold: bool,
    /// The servers, baseline first, then the in-process reference (named [`BARE`]).
    pub targets: Vec<SwapTarget>,
}

#[derive(Debug, Serialize)]
pub struct SwapTarget {
    pub target: String,
    pub summary: Summary,
    /// The model load as the server itself timed it (paddock's `load_ms`, the engine's for the
    /// reference), over the requests that had it.
    pub load_ms: Option<Distribution>,
    /// Against the first server (None for it and for the reference).
    pub ratios: Option<Ratios>,
    /// How much later than the in-process reference the first token came (None for it, and
    /// when nothing swaps).
    pub over_bare: Option<OverBare>,
    pub requests: Vec<RequestRecord>,
}

/// A server's TTFT against the in-process load + first token of the same models.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct OverBare {
    /// This TTFT p50 minus the reference's, in milliseconds.
    pub ttft_p50_ms: f64,
    pub ttft_p90_ms: f64,
    /// This TTFT p50 divided by the reference's.
    pub ttft_p50_ratio: f64,
}

/// Runs the scenario on the spawned servers in `entries` (already up, with `models`).
pub(super) async fn run(
    args: &BenchArgs,
    entries: &[Entry],
    models: &[SwapModel],
    settings: ServerSettings,
    workload: &Workload,
    bar: &indicatif::ProgressBar,
) -> Result<SwapReport, BenchError> {
    let max_loaded = args.max_loaded;
    // Every model once, in order: each server has read each file and loaded each model once
    // before the clock runs, and (max_loaded < N) the last ones are loaded, the first not.
    for e in entries {
        for (i, m) in models.iter().enumerate() {
            let record = e
                .target
                .with_model(&m.name)
                .run(args.endpoint, &workload.job(workload::WARMUP, i), args.temperature, Instant::now())
                .await;
            if let Some(why) = record.error {
                return Err(BenchError::Warmup { name: format!("{} (model {})", e.target.name, m.name), why });
            }
        }
    }
    // The first engine of a process initialises llama.cpp's backend, which no server pays again.
    let first = &models[0];
    let record =
        bare::first_token(&first.name, &first.path, settings, &workload.job(workload::WARMUP, 0), Instant::now()).await;
    if let Some(why) = record.error {
        return Err(BenchError::Warmup { name: BARE.into(), why });
    }

    let t0 = Instant::now();
    let n = models.len();
    let mut records: Vec<Vec<RequestRecord>> = vec![Vec::new(); entries.len() + 1];
    for cycle in 0..args.requests.div_ceil(n) {
        let ks: Vec<usize> = (cycle * n..((cycle + 1) * n).min(args.requests)).collect();
        for (t, e) in entries.iter().enumerate() {
            bar.set_message(format!("swap · {} · cycle {}", e.target.name, cycle + 1));
            for &k in &ks {
                let m = &models[k % n];
                let mut record =
                    e.target.with_model(&m.name).run(args.endpoint, &workload.job(0, k), args.temperature, t0).await;
                record.round = cycle;
                record.model = Some(m.name.clone());
                if let Some(spawned) = &e.spawned {
                    record.rss_kib = spawned.memory().map(|m| m.rss_kib);
                    if spawned.kind == Kind::Paddock {
                        record.load_ms = paddock_load_ms(&e.target, &m.name).await;
                    }
                }
                records[t].push(record);
                bar.inc(1);
            }
        }
        bar.set_message(format!("swap · {BARE} · cycle {}", cycle + 1));
        for &k in &ks {
            let m = &models[k % n];
            let mut record = bare::first_token(&m.name, &m.path, settings, &workload.job(0, k), t0).await;
            record.round = cycle;
            records[entries.len()].push(record);
            bar.inc(1);
        }
    }

    let names = entries.iter().map(|e| e.target.name.clone()).chain([BARE.to_string()]);
    let mut targets: Vec<SwapTarget> = names
        .zip(records)
        .map(|(target, requests)| {
            // One request at a time: the time the server was busy is the sum of the requests'.
            let wall_s = requests.iter().map(|r| r.e2e_ms).sum::<f64>() / 1e3;
            SwapTarget {
                target,
                summary: Summary::of(&requests, wall_s),
                load_ms: Distribution::of(requests.iter().filter(|r| r.ok()).filter_map(|r| r.load_ms)),
                ratios: None,
                over_bare: None,
                requests,
            }
        })
        .collect();
    let base = targets.first().map(|t| t.summary.clone());
    let bare_ttft = targets.last().and_then(|t| t.summary.ttft_ms);
    let servers = targets.len() - 1;
    for (i, t) in targets.iter_mut().enumerate().take(servers) {
        if let (Some(base), true) = (&base, i > 0) {
            t.ratios = Some(Ratios::of(&t.summary, base));
        }
        // Without swaps a server's first tokens come from loaded models: no load to compare.
        let cold = (max_loaded as usize) < n;
        if let (Some(b), Some(d), true) = (bare_ttft, t.summary.ttft_ms, cold) {
            t.over_bare = Some(OverBare {
                ttft_p50_ms: d.p50 - b.p50,
                ttft_p90_ms: d.p90 - b.p90,
                ttft_p50_ratio: d.p50 / b.p50,
            });
        }
    }
    Ok(SwapReport {
        models: models.iter().map(|m| m.name.clone()).collect(),
        max_loaded,
        cold: (max_loaded as usize) < n,
        paddock_cold: args.swap_cold,
        targets,
    })
}

/// The swap scenario on servers that are up with `swap`'s models: warm-up, cycles, report.
pub(super) async fn run_report(
    args: &BenchArgs,
    entries: Vec<Entry>,
    swap: &SwapModels,
    settings: ServerSettings,
    started_at: String,
) -> Result<(), BenchError> {
    // Prompts are sized with a tokenizer of a running model, so after a first request to it.
    let first = &swap.models[0].name;
    let assumed = Workload {
        prompt_tokens: args.prompt_tokens,
        max_tokens: args.max_tokens,
        seed: args.seed,
        calibration: Calibration::ASSUMED,
    };
    let mut loaded = Vec::new();
    for e in &entries {
        let target = e.target.with_model(first);
        let record =
            target.run(args.endpoint, &assumed.job(workload::WARMUP, 0), args.temperature, Instant::now()).await;
        if let Some(why) = record.error {
            return Err(BenchError::Warmup { name: format!("{} (model {first})", e.target.name), why });
        }
        loaded.push(target);
    }
    let calibration = calibrate(&loaded, args.seed).await;
    let workload = Workload { calibration, ..assumed };
    let total = args.requests as u64 * (entries.len() as u64 + 1);
    let bar = progress(args, Some(total));
    let result = run(args, &entries, &swap.models, settings, &workload, &bar).await;
    bar.finish_and_clear();
    let swap_report = result?;
    let infos = target_infos(&entries, settings);
    drop(entries);
    let report = Report {
        paddock_version: crate::build::VERSION,
        started_at,
        machine: Machine::this(),
        config: run_config(args, "swap", Vec::new()),
        calibration,
        targets: infos,
        turns: Vec::new(),
        results: Vec::new(),
        swap: Some(swap_report),
    };
    write_report(args, &report)
}

/// Paddock's own timing of the model load that `model`'s instance did last (None if it is not
/// running, or the server does not say).
async fn paddock_load_ms(target: &Target, model: &str) -> Option<f64> {
    let v = target.get_json(&format!("/api/instances/{model}")).await.ok()?;
    v.pointer("/model/load_ms").and_then(serde_json::Value::as_f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn models_are_distinct_real_copies_with_names_both_servers_accept() {
        let dir = tempfile::tempdir().unwrap();
        let source = dir.path().join("My Model (v2).Q4.gguf");
        std::fs::write(&source, b"GGUF weights").unwrap();
        let models = copy_models(&source, &dir.path().join("swap"), 3).unwrap();
        let names: Vec<&str> = models.iter().map(|m| m.name.as_str()).collect();
        assert_eq!(names, ["My-Model--v2--Q4-swap1", "My-Model--v2--Q4-swap2", "My-Model--v2--Q4-swap3"]);
        for m in &models {
            crate::instance::validate_name(&m.name).unwrap();
            // A file of its own, not a link: no server can see that the models are one.
            let meta = std::fs::symlink_metadata(&m.path).unwrap();
            assert!(meta.file_type().is_file());
            assert_eq!(std::fs::read(&m.path).unwrap(), b"GGUF weights");
            assert_eq!(m.path.file_stem().unwrap().to_str(), Some(m.name.as_str()), "llama-server's router id");
        }
        use std::os::unix::fs::MetadataExt;
        let mut inodes: Vec<u64> = models.iter().map(|m| std::fs::metadata(&m.path).unwrap().ino()).collect();
        inodes.push(std::fs::metadata(&source).unwrap().ino());
        inodes.sort();
        inodes.dedup();
        assert_eq!(inodes.len(), 4, "no hard links either");
        let e = copy_models(&dir.path().join("missing.gguf"), dir.path(), 2).err().unwrap().to_string();
        assert!(e.contains("missing.gguf does not exist"), "{e}");
    }
}
