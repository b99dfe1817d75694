//! The engine's own ceilings (`--ceilings`): llama.cpp's benchmark tools, from the build of the
//! spawned llama-server, on the same model, threads, context and token counts, with no server,
//! no HTTP and no sampling in the way.
//!
//! - `llama-batched-bench` with as many sequences as the point has streams (at most the
//!   slots): every prompt is processed, then every sequence decodes in lockstep. Its generation
//!   rate (`S_TG`) is the decode ceiling; its output tokens over the whole run (prompts
//!   included) are what a closed loop's aggregate output tok/s compares with.
//! - `llama-bench`'s generation test at the prompt's depth, at one stream: the single-stream
//!   ceiling.
//!
//! Both run after the point's rounds, while the servers sit idle.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde::Serialize;

use super::spawn::ServerSettings;
use super::stats::Summary;
use super::BenchError;

/// What the tools measured for one point.
#[derive(Debug, Clone, Serialize)]
pub struct Ceiling {
    /// Sequences decoded together: the point's streams, at most the servers' slots.
    pub sequences: u32,
    /// `llama-batched-bench`: prompt tokens per second, all sequences.
    pub batched_prompt_tok_s: f64,
    /// Generated tokens per second, all sequences in lockstep (`S_TG`): the decode ceiling.
    pub batched_decode_tok_s: f64,
    /// Output tokens over the time to process the prompts and generate: what aggregate output
    /// tok/s is held against.
    pub batched_output_tok_s: f64,
    /// `llama-bench` generation at the prompt's depth, one sequence (at one stream only).
    pub bench_decode_tok_s: Option<f64>,
    /// The tools' command lines, to rerun them by hand.
    pub commands: Vec<String>,
}

/// One target against the ceiling; each ratio is None when the target lacks the figure.
#[derive(Debug, Clone, Serialize)]
pub struct VsCeiling {
    pub target: String,
    /// Aggregate output tok/s over `batched_output_tok_s`.
    pub output: Option<f64>,
    /// Decode steps of all streams at once, `sequences` / ITL p50, over `batched_decode_tok_s`.
    pub decode: Option<f64>,
    /// A stream's decode rate (p50) over `bench_decode_tok_s`.
    pub stream: Option<f64>,
}

impl VsCeiling {
    pub fn of(target: &str, s: &Summary, c: &Ceiling) -> VsCeiling {
        let over = |a: f64, b: f64| (a > 0.0 && b > 0.0).then(|| a / b);
        VsCeiling {
            target: target.to_string(),
            output: over(s.output_tok_s, c.batched_output_tok_s),
            decode: s.itl_ms.and_then(|d| over(c.sequences as f64 * 1000.0 / d.p50, c.batched_decode_tok_s)),
            stream: s.stream_tok_s.zip(c.bench_decode_tok_s).and_then(|(d, b)| over(d.p50, b)),
        }
    }
}

/// Where the tools are: beside the llama-server binary.
pub fn tools(llama_server: &Path) -> Result<[PathBuf; 2], BenchError> {
    let tools = ["llama-batched-bench", "llama-bench"].map(|t| llama_server.with_file_name(t));
    match tools.iter().find(|t| !t.is_file()) {
        Some(missing) => Err(BenchError::Usage(format!(
            "--ceilings runs llama.cpp's tools from llama-server's build, and there is no {} (scripts/build-llama-tools builds them)",
            missing.display()
        ))),
        None => Ok(tools),
    }
}

/// Runs the tools for a point of `streams` streams; blocking (seconds to a minute).
pub fn measure(
    [batched, bench]: &[PathBuf; 2],
    model: &Path,
    settings: ServerSettings,
    streams: u32,
    prompt_tokens: u32,
    output_tokens: u32,
) -> Result<Ceiling, BenchError> {
    let sequences = streams.min(settings.parallel);
    let model = model.to_string_lossy().into_owned();
    let (threads, ctx) = (settings.threads.to_string(), settings.ctx_size.to_string());
    let (pp, tg) = (prompt_tokens.to_string(), output_tokens.to_string());
    let ubatch = crate::engine::DEFAULT_UBATCH.to_string();
    let npl = sequences.to_string();
    #[rustfmt::skip]
    let batched_args: Vec<&str> = vec![
        "-m", &model, "-t", &threads, "-c", &ctx, "-ub", &ubatch,
        "-npp", &pp, "-ntg", &tg, "-npl", &npl, "--output-format", "jsonl",
    ];
    let mut commands = vec![command_line(batched, &batched_args)];
    let line = run(batched, &batched_args)?;
    let number = |tool: &Path, v: &serde_json::Value, key: &str| {
        v[key].as_f64().ok_or_else(|| tool_error(tool, format!("no '{key}' in its output: {v}")))
    };
    let (t_pp, t_tg) = (number(batched, &line, "t_pp")?, number(batched, &line, "t_tg")?);
    let mut bench_decode_tok_s = None;
    if sequences == 1 {
        // Flash attention as the servers have it (their "auto" turns it on where it runs;
        // llama-bench's default is off).
        #[rustfmt::skip]
        let bench_args: Vec<&str> = vec![
            "-m", &model, "-t", &threads, "-ub", &ubatch, "-p", "0", "-n", &tg, "-d", &pp,
            "-fa", "1", "-r", "3", "-o", "jsonl",
        ];
        commands.push(command_line(bench, &bench_args));
        bench_decode_tok_s = Some(number(bench, &run(bench, &bench_args)?, "avg_ts")?);
    }
    Ok(Ceiling {
        sequences,
        batched_prompt_tok_s: number(batched, &line, "speed_pp")?,
        batched_decode_tok_s: number(batched, &line, "speed_tg")?,
        batched_output_tok_s: (sequences * output_tokens) as f64 / (t_pp + t_tg),
        bench_decode_tok_s,
        commands,
    })
}

/// Runs a tool and returns the last JSON line it printed.
fn run(tool: &Path, args: &[&str]) -> Result<serde_json::Value, BenchError> {
    let out = Command::new(tool).args(args).output().map_err(|e| tool_error(tool, e.to_string()))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let tail: Vec<&str> = stderr.lines().rev().take(3).collect();
        return Err(tool_error(
            tool,
            format!("{}: {}", out.status, tail.into_iter().rev().collect::<Vec<_>>().join(" / ")),
        ));
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    stdout
        .lines()
        .rev()
        .find_map(|l| serde_json::from_str::<serde_json::Value>(l).ok().filter(|v| v.is_object()))
        .ok_or_else(|| tool_error(tool, format!("no JSON line in its output: {stdout}")))
}

fn command_line(tool: &Path, args: &[&str]) -> String {
    std::iter::once(tool.to_string_lossy().into_owned())
        .chain(args.iter().map(|a| a.to_string()))
        .collect::<Vec<_>>()
        .join(" ")
}

fn tool_error(tool: &Path, why: String) -> BenchError {
    BenchError::Spawn { kind: "llama.cpp tool", why: format!("{}: {why}", tool.display()) }
}
