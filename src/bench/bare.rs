//! The floor of a cold start: load a GGUF with paddock's own engine inside the benchmark's
//! process and take the first token, with no HTTP, no instance bookkeeping and nothing to
//! unload first. A server's swap can only add to this; the swap scenario reports by how much.

use std::path::Path;
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::engine::{EngineThread, GenerateRequest, Prompt, SamplingParams, StreamEvent};
use crate::logs::LogBuffer;

use super::spawn::ServerSettings;
use super::stats::RequestRecord;
use super::workload::Job;

/// Loads `model` with `settings`, as an instance would, and streams `job` from it. The clock
/// runs from the load's start to the first token with text (`ttft_ms`) and to the end
/// (`e2e_ms`); `load_ms` is the engine's own account of the model load alone. Failures are in
/// the record, as for a server's request. The engine is shut down afterwards, off the clock.
pub async fn first_token(name: &str, model: &Path, settings: ServerSettings, job: &Job, t0: Instant) -> RequestRecord {
    let start = Instant::now();
    let mut record = RequestRecord {
        start_s: start.duration_since(t0).as_secs_f64(),
        prompt_tokens_requested: job.prompt_tokens,
        max_tokens: job.max_tokens,
        model: Some(name.to_string()),
        ..Default::default()
    };
    let options = settings.instance_options();
    let config = options.engine_config(
        &format!("bench-{name}"),
        model.to_path_buf(),
        Arc::new(LogBuffer::default()),
        Arc::new(AtomicBool::new(false)),
    );
    let thread = match EngineThread::start(config).await {
        Ok((thread, _exited)) => thread,
        Err(e) => {
            record.error = Some(format!("load: {e}"));
            record.e2e_ms = ms(start.elapsed());
            return record;
        }
    };
    record.load_ms = Some(thread.engine().info().load_ms as f64);
    // What the servers' completions route builds from the same request: the prompt as text,
    // default sampling, exactly max_tokens.
    let mut request = GenerateRequest::new(
        Prompt::Text(job.prompt.clone()),
        SamplingParams::default(),
        Vec::new(),
        Some(job.max_tokens),
    );
    request.ignore_eos = true;
    if let Err(e) = stream(&thread, request, start, &mut record).await {
        record.error = Some(e);
    }
    record.e2e_ms = ms(start.elapsed());
    if let (None, Some(ttft)) = (&record.error, record.ttft_ms) {
        if record.output_tokens > 1 {
            record.tpot_ms = Some((record.e2e_ms - ttft) / (record.output_tokens - 1) as f64);
        }
    }
    // With the model still loaded, as a server's sample after its request: if this grows from
    // load to load, the engine itself leaves memory behind, whatever a server adds.
    record.rss_kib = own_rss_kib();
    // Joining the engine thread blocks; the next measurement must start with it gone.
    let _ = tokio::task::spawn_blocking(move || thread.shutdown(Duration::from_secs(30), false)).await;
    record
}

async fn stream(
    thread: &EngineThread,
    request: GenerateRequest,
    start: Instant,
    record: &mut RequestRecord,
) -> Result<(), String> {
    let mut generation = thread.engine().generate(request).await.map_err(|e| e.to_string())?;
    let mut last: Option<Instant> = None;
    while let Some(event) = generation.next().await {
        match event.map_err(|e| e.to_string())? {
            StreamEvent::Token { text, .. } if !text.is_empty() => {
                let now = Instant::now();
                match last {
                    None => record.ttft_ms = Some(ms(now - start)),
                    Some(prev) => record.gaps_ms.push(ms(now - prev)),
                }
                last = Some(now);
            }
            StreamEvent::Done { usage, .. } => {
                record.prompt_tokens = usage.prompt_tokens;
                record.output_tokens = usage.completion_tokens;
                return if record.output_tokens == 0 { Err("no output tokens".into()) } else { Ok(()) };
            }
            _ => {}
        }
    }
    Err("the generation ended without Done".into())
}

/// This process's resident memory (None where /proc is not there).
fn own_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find_map(|l| l.strip_prefix("VmRSS:"))?;
    line.trim().trim_end_matches("kB").trim().parse().ok()
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}
