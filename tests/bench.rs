//! `paddock bench` run as a user runs it, against paddock servers of the real test model:
//! one it spawns itself, and one in this process.

mod common;

use std::path::Path;
use std::process::{Command, Output};

use serde_json::{json, Value};

fn bench(args: &[&str]) -> (Output, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_paddock")).arg("bench").args(args).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out, text)
}

fn read_json(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// Checks one target's results at one point: every request succeeded with the tokens asked for.
fn assert_sane(result: &Value, requests: u64, max_tokens: u64) {
    let s = &result["summary"];
    assert_eq!(s["requests"], requests, "{s}");
    assert_eq!(s["errors"], 0, "{s}");
    // ignore_eos: every request generates exactly max_tokens.
    assert_eq!(s["output_tokens"], requests * max_tokens, "{s}");
    assert!(s["prompt_tokens"].as_u64().unwrap() > 0, "{s}");
    assert!(s["output_tok_s"].as_f64().unwrap() > 0.0, "{s}");
    assert!(s["ttft_ms"]["p50"].as_f64().unwrap() < s["e2e_ms"]["p50"].as_f64().unwrap(), "{s}");
    assert!(s["ttft_ms"]["p99"].as_f64().unwrap() <= s["ttft_ms"]["max"].as_f64().unwrap(), "{s}");
    for r in result["requests"].as_array().unwrap() {
        assert!(r["error"].is_null(), "{r}");
        assert_eq!(r["output_tokens"], max_tokens, "{r}");
        assert!(r["usage_missing"].is_null(), "the server sent usage: {r}");
        let (ttft, e2e) = (r["ttft_ms"].as_f64().unwrap(), r["e2e_ms"].as_f64().unwrap());
        assert!(0.0 < ttft && ttft < e2e, "{r}");
    }
}

#[test]
fn a_spawned_paddock_is_swept_and_the_json_and_svg_say_so() {
    let model = common::model_path();
    let dir = tempfile::tempdir().unwrap();
    let (json_path, svg_path) = (dir.path().join("out.json"), dir.path().join("out.svg"));
    let (out, text) = bench(&[
        "--spawn-paddock",
        model.to_str().unwrap(),
        "--threads=2",
        "--concurrency=1,2",
        "--requests=4",
        "--max-tokens=4",
        "--prompt-tokens=24",
        "--warmup=1",
        "--json",
        json_path.to_str().unwrap(),
        "--plot",
        svg_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("concurrency 1") && stdout.contains("concurrency 2") && stdout.contains("paddock"),
        "{stdout}"
    );
    assert!(stdout.contains("resident memory"), "{stdout}");

    let report = read_json(&json_path);
    assert_eq!(report["config"]["mode"], "closed_loop");
    assert_eq!(report["config"]["points"], json!([{ "concurrency": 1 }, { "concurrency": 2 }]));
    let target = &report["targets"][0];
    assert_eq!(target["name"], "paddock");
    let spawned = &target["spawned"];
    assert_eq!(spawned["kind"], "paddock");
    // Defaults fill what was not given: slots for the largest concurrency.
    assert_eq!(spawned["settings"], json!({ "threads": 2, "ctx_size": 512, "parallel": 2 }));
    assert!(spawned["memory"]["rss_kib"].as_u64().unwrap() > 50_000, "the model is resident: {spawned}");
    // paddock's per-instance /tokenize calibrated the prompts to within a few tokens.
    assert_eq!(report["calibration"]["source"], "tokenize", "{}", report["calibration"]);
    let results = report["results"].as_array().unwrap();
    assert_eq!(results.len(), 2);
    for point in results {
        assert_eq!(point["targets"].as_array().unwrap().len(), 1);
        assert_sane(&point["targets"][0], 4, 4);
        assert!(point["targets"][0]["ratios"].is_null());
        let accuracy = &point["targets"][0]["summary"]["prompt_accuracy"];
        assert!(accuracy["mean_abs_error_pct"].as_f64().unwrap() < 20.0, "{accuracy}");
    }
    // The spawned server is gone.
    let pid = spawned["pid"].as_u64().unwrap();
    assert!(!Path::new(&format!("/proc/{pid}")).exists(), "paddock {pid} still runs");

    let svg = std::fs::read_to_string(&svg_path).unwrap();
    let doc = roxmltree::Document::parse(&svg).expect("the plot is well-formed XML");
    assert_eq!(doc.root_element().tag_name().name(), "svg");
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).map(str::trim).collect();
    assert!(texts.contains(&"paddock"), "no legend entry for the target in {texts:?}");
    assert!(texts.iter().any(|t| t.contains("first token")), "{texts:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_targets_run_in_alternating_rounds_and_the_second_gets_ratios() {
    let server = common::server();
    let name = server.shared().await;
    let model = common::model_path();
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");
    let args: Vec<String> = [
        "--spawn-paddock",
        model.to_str().unwrap(),
        "--threads=2",
        "--parallel=2",
        "--target",
        &format!("other={},model={name}", server.base),
        "--concurrency=1,2",
        "--requests=2",
        "--max-tokens=3",
        "--prompt-tokens=8..16",
        "--warmup=0",
        "--json",
        json_path.to_str().unwrap(),
    ]
    .map(String::from)
    .to_vec();
    // The server lives in this process: block a pool thread, not its runtime's.
    let (out, text) = tokio::task::spawn_blocking(move || {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        bench(&args)
    })
    .await
    .unwrap();
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("vs paddock"), "{stdout}");

    let report = read_json(&json_path);
    let names: Vec<&str> = report["targets"].as_array().unwrap().iter().map(|t| t["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["paddock", "other"]);
    assert!(report["targets"][1]["spawned"].is_null());
    // Concurrency 1: two rounds of one request each; concurrency 2: one round of two (a
    // round never holds fewer requests than the concurrency).
    let turns: Vec<(u64, &str, u64)> = report["turns"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| (t["point"].as_u64().unwrap(), t["target"].as_str().unwrap(), t["requests"].as_u64().unwrap()))
        .collect();
    let mut want = Vec::new();
    for _ in 0..2 {
        want.extend([(0, "paddock", 1), (0, "other", 1)]);
    }
    want.extend([(1, "paddock", 2), (1, "other", 2)]);
    assert_eq!(turns, want);
    let starts: Vec<f64> = report["turns"].as_array().unwrap().iter().map(|t| t["start_s"].as_f64().unwrap()).collect();
    assert!(starts.windows(2).all(|w| w[0] <= w[1]), "rounds ran in the order listed: {starts:?}");

    for point in report["results"].as_array().unwrap() {
        let targets = point["targets"].as_array().unwrap();
        assert_eq!(targets[0]["target"], "paddock");
        assert_eq!(targets[1]["target"], "other");
        for t in targets {
            assert_sane(t, 2, 3);
            for r in t["requests"].as_array().unwrap() {
                let want = r["prompt_tokens_requested"].as_u64().unwrap();
                assert!((8..=16).contains(&want), "{r}");
            }
        }
        assert!(targets[0]["ratios"].is_null());
        let ratios = &targets[1]["ratios"];
        for key in ["output_tok_s", "prompt_tok_s", "ttft_p50", "e2e_p50"] {
            assert!(ratios[key].as_f64().unwrap() > 0.0, "{key}: {ratios}");
        }
        // The same prompts went to both: the servers counted the same prompt tokens.
        assert_eq!(targets[0]["summary"]["prompt_tokens"], targets[1]["summary"]["prompt_tokens"]);
    }
}

#[test]
fn a_bad_target_is_a_clear_error_and_a_failure_not_a_panic() {
    let cases: [(&[&str], &[&str]); 4] = [
        // Nothing listens on port 1.
        (&["--target", "nowhere=http://127.0.0.1:1"], &["target 'nowhere' at http://127.0.0.1:1 cannot connect"]),
        (&["--target", "typo=htp:/127.0.0.1"], &["target 'typo'", "only http://"]),
        (&["--target", "no-url"], &["NAME=URL"]),
        (&[], &["nothing to measure"]),
    ];
    for (args, wants) in cases {
        let (out, text) = bench(&[args, &["--requests=1", "--quiet"]].concat());
        assert!(!out.status.success(), "{args:?}: {text}");
        for want in wants {
            assert!(text.contains(want), "{args:?}: {want:?} missing from {text}");
        }
        assert!(!text.contains("panicked"), "{text}");
    }
}

/// llama-server to compare with, where it was built (`scripts/build-llama-tools`, or
/// `PADDOCK_TEST_LLAMA_SERVER`); the swap tests check paddock alone without it.
fn llama_server() -> Option<std::path::PathBuf> {
    let path = std::env::var_os("PADDOCK_TEST_LLAMA_SERVER")
        .map(std::path::PathBuf::from)
        .or_else(|| dirs::home_dir().map(|h| h.join(".cache/paddock/llama-tools/build/bin/llama-server")))?;
    if path.is_file() {
        Some(path)
    } else {
        eprintln!("no llama-server at {}: the swap tests measure paddock alone", path.display());
        None
    }
}

/// `paddock bench --swap-models 2` with `extra` flags, against a spawned paddock and, where
/// there is one, llama-server's router; returns the JSON report and the SVG.
fn swap_run(extra: &[&str]) -> (Value, String, bool) {
    let model = common::model_path();
    let dir = tempfile::tempdir().unwrap();
    let (json_path, svg_path) = (dir.path().join("swap.json"), dir.path().join("swap.svg"));
    let llama = llama_server();
    let mut args: Vec<String> = Vec::new();
    if let Some(bin) = &llama {
        args.extend(["--spawn-llama-server".into(), bin.to_string_lossy().into_owned()]);
    }
    args.extend(
        [
            "--spawn-paddock",
            model.to_str().unwrap(),
            "--swap-models=2",
            "--threads=2",
            "--ctx-size=512",
            "--parallel=1",
            "--prompt-tokens=16",
            "--max-tokens=3",
            "--quiet",
            "--json",
            json_path.to_str().unwrap(),
            "--plot",
            svg_path.to_str().unwrap(),
        ]
        .map(String::from),
    );
    args.extend(extra.iter().map(|s| s.to_string()));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let (out, text) = bench(&args);
    assert!(out.status.success(), "{text}");
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("swap: 2 models"), "{stdout}");
    (read_json(&json_path), std::fs::read_to_string(&svg_path).unwrap(), llama.is_some())
}

/// The servers' names in report order, then the in-process reference's.
fn swap_names(with_llama: bool) -> Vec<&'static str> {
    let mut names = if with_llama { vec!["llama-server"] } else { vec![] };
    names.extend(["paddock", "bare load"]);
    names
}

#[test]
fn a_swap_run_times_every_cold_request_against_the_bare_load() {
    let (report, svg, with_llama) = swap_run(&["--requests=4", "--swap-cold"]);
    assert_eq!(report["config"]["mode"], "swap");
    assert_eq!(report["config"]["swap_models"], 2);
    assert_eq!(report["config"]["max_loaded"], 1);
    assert!(report["results"].as_array().unwrap().is_empty(), "no sweep in the swap scenario");
    let swap = &report["swap"];
    let models: Vec<&str> = swap["models"].as_array().unwrap().iter().map(|m| m.as_str().unwrap()).collect();
    assert_eq!(models.len(), 2);
    assert_ne!(models[0], models[1]);
    assert_eq!(swap["max_loaded"], 1);
    assert_eq!(swap["cold"], true);
    assert_eq!(swap["paddock_cold"], true);
    let targets = swap["targets"].as_array().unwrap();
    let names: Vec<&str> = targets.iter().map(|t| t["target"].as_str().unwrap()).collect();
    assert_eq!(names, swap_names(with_llama));
    for (i, t) in targets.iter().enumerate() {
        let s = &t["summary"];
        assert_eq!((s["requests"].as_u64(), s["errors"].as_u64()), (Some(4), Some(0)), "{s}");
        assert!(s["ttft_ms"]["p50"].as_f64().unwrap() > 0.0, "{s}");
        let requests = t["requests"].as_array().unwrap();
        for (k, r) in requests.iter().enumerate() {
            assert!(r["error"].is_null(), "{r}");
            // A, B, A, B: each request names the model the last one did not.
            assert_eq!(r["model"], models[k % 2], "{r}");
            assert_eq!(r["output_tokens"], 3, "{r}");
            // Every server's memory after each request, and the benchmark's with the model loaded.
            assert!(r["rss_kib"].as_u64().unwrap() > 50_000, "{r}");
            let (ttft, e2e) = (r["ttft_ms"].as_f64().unwrap(), r["e2e_ms"].as_f64().unwrap());
            assert!(0.0 < ttft && ttft < e2e, "{r}");
        }
        // Paddock and the engine say how long each load took, and it is part of the TTFT. With
        // `--swap-cold` paddock's memory budget holds one model, so the one that gives way frees
        // its weights and every switch loads from disk (without it, they stay parked: 0 ms).
        if matches!(names[i], "paddock" | "bare load") {
            for r in requests {
                let load = r["load_ms"].as_f64().unwrap_or_else(|| panic!("no load_ms: {r}"));
                assert!(load > 0.0 && load < r["ttft_ms"].as_f64().unwrap(), "{r}");
            }
        }
        match names[i] {
            "bare load" => assert!(t["ratios"].is_null() && t["over_bare"].is_null(), "{t}"),
            _ => assert!(t["over_bare"]["ttft_p50_ratio"].as_f64().unwrap() > 0.0, "{t}"),
        }
        // Ratios against the first server, for the others.
        assert_eq!(t["ratios"].is_null(), i == 0 || names[i] == "bare load", "{t}");
    }
    // Memory of every spawned server, summed over its processes: the router's include the
    // child serving the loaded model.
    for t in report["targets"].as_array().unwrap() {
        let memory = &t["spawned"]["memory"];
        assert!(memory["rss_kib"].as_u64().unwrap() > 50_000, "the model is resident: {t}");
        let processes = memory["processes"].as_u64().unwrap();
        assert_eq!(processes, if t["name"] == "llama-server" { 2 } else { 1 }, "{t}");
        let pid = t["spawned"]["pid"].as_u64().unwrap();
        assert!(!Path::new(&format!("/proc/{pid}")).exists(), "{} {pid} still runs", t["name"]);
    }
    let doc = roxmltree::Document::parse(&svg).expect("the plot is well-formed XML");
    let texts: Vec<&str> = doc.descendants().filter_map(|n| n.text()).map(str::trim).collect();
    assert!(texts.contains(&"bare load") && texts.contains(&"paddock"), "{texts:?}");
    assert!(texts.iter().any(|t| t.contains("Swap: time to first token")), "{texts:?}");
}

#[test]
fn with_every_model_loaded_nothing_swaps_and_memory_covers_all() {
    let (report, _, with_llama) = swap_run(&["--requests=2", "--max-loaded=2"]);
    let swap = &report["swap"];
    assert_eq!(swap["cold"], false);
    for t in swap["targets"].as_array().unwrap() {
        assert_eq!(t["summary"]["errors"], 0, "{t}");
        assert!(t["over_bare"].is_null(), "loaded models are not held against a load: {t}");
    }
    let targets = report["targets"].as_array().unwrap();
    for t in targets {
        let memory = &t["spawned"]["memory"];
        // The router and one server per model, all still loaded.
        assert_eq!(memory["processes"], if t["name"] == "llama-server" { 3 } else { 1 }, "{t}");
        assert!(memory["rss_kib"].as_u64().unwrap() > 100_000, "{t}");
    }
    if with_llama {
        assert!(targets[0]["memory_ratio"].is_null());
        assert!(targets[1]["memory_ratio"].as_f64().unwrap() > 0.0, "{}", targets[1]);
    }
}

#[test]
fn swap_flags_that_cannot_work_are_refused() {
    let model = common::model_path();
    let model = model.to_str().unwrap();
    let server = "/nonexistent/llama-server";
    let cases: [(&[&str], &str); 8] = [
        (&["--spawn-paddock", model, "--swap-models=1"], "at least 2"),
        (&["--spawn-paddock", model, "--swap-models=2", "--max-loaded=3"], "--max-loaded must be between 1 and"),
        (&["--target", "a=http://127.0.0.1:1", "--swap-models=2"], "cannot be used with"),
        (&["--spawn-paddock", model, "--max-loaded=2"], "--swap-models"),
        (&["--spawn-paddock", model, "--swap-models=2", "--rate=1"], "cannot be used with"),
        (&["--spawn-paddock", model, "--ceilings"], "--spawn-llama-server"),
        (&["--spawn-llama-server", server, "--spawn-paddock", model, "--ceilings", "--prompt-tokens=8..16"], "fixed"),
        (&["--spawn-llama-server", server, "--spawn-paddock", model, "--ceilings"], "scripts/build-llama-tools"),
    ];
    for (args, want) in cases {
        let (out, text) = bench(&[args, &["--quiet"]].concat());
        assert!(!out.status.success(), "{args:?}: {text}");
        assert!(text.contains(want), "{args:?}: {want:?} missing from {text}");
    }
}

/// `--ceilings`: llama.cpp's llama-batched-bench and llama-bench, from llama-server's build, run
/// after each point on the same settings, and every target's share of their figures.
#[test]
fn ceilings_come_from_llama_cpps_tools_on_the_same_settings() {
    let Some(server) = llama_server() else { return };
    let model = common::model_path();
    let dir = tempfile::tempdir().unwrap();
    let json_path = dir.path().join("out.json");
    let (out, text) = bench(&[
        "--spawn-llama-server",
        server.to_str().unwrap(),
        "--spawn-paddock",
        model.to_str().unwrap(),
        "--threads=2",
        "--parallel=2",
        "--ctx-size=512",
        "--concurrency=1,4",
        "--requests=4",
        "--max-tokens=4",
        "--prompt-tokens=16",
        "--warmup=1",
        "--ceilings",
        "--quiet",
        "--json",
        json_path.to_str().unwrap(),
    ]);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("ceiling: llama-batched-bench, 1 sequence:"), "{text}");
    assert!(text.contains("vs ceiling: llama-server"), "{text}");
    let report = read_json(&json_path);
    for (point, sequences) in report["results"].as_array().unwrap().iter().zip([1, 2]) {
        let c = &point["ceiling"];
        // 4 streams on 2 slots: the engine decodes 2 sequences at a time.
        assert_eq!(c["sequences"], sequences, "{c}");
        let figure = |key: &str| c[key].as_f64().unwrap_or_else(|| panic!("no {key}: {c}"));
        // Output over prompts and decode together is below the decode rate alone.
        assert!(
            0.0 < figure("batched_output_tok_s") && figure("batched_output_tok_s") < figure("batched_decode_tok_s"),
            "{c}"
        );
        assert!(figure("batched_prompt_tok_s") > 0.0, "{c}");
        assert_eq!(c["bench_decode_tok_s"].is_number(), sequences == 1, "{c}");
        let commands = c["commands"].as_array().unwrap();
        assert!(commands[0].as_str().unwrap().contains(&format!("-npl {sequences}")), "{c}");
        let vs = point["vs_ceiling"].as_array().unwrap();
        assert_eq!(vs.len(), 2, "{point}");
        // The shares are of this point's own figures (their size is the machine's business:
        // tiny requests on a busy machine swing them tenfold).
        for (v, t) in vs.iter().zip(point["targets"].as_array().unwrap()) {
            assert_eq!(v["target"], t["target"], "{point}");
            let s = &t["summary"];
            let share = |key: &str| v[key].as_f64().unwrap_or_else(|| panic!("no {key}: {v}"));
            let close = |a: f64, b: f64| (a - b).abs() <= 1e-9 * b.abs();
            let output = s["output_tok_s"].as_f64().unwrap() / figure("batched_output_tok_s");
            assert!(share("output") > 0.0 && close(share("output"), output), "{v} vs {s}");
            let decode =
                sequences as f64 * 1000.0 / s["itl_ms"]["p50"].as_f64().unwrap() / figure("batched_decode_tok_s");
            assert!(close(share("decode"), decode), "{v} vs {s}");
            assert_eq!(v["stream"].is_number(), sequences == 1, "{v}");
        }
    }
}
