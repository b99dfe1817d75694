//! `/infill` on a model whose vocabulary has fill-in-the-middle tokens. The test model has none,
//! so tests/fixtures/gguf_variants.py (llama.cpp's gguf-py) derives a copy that names three of
//! its unused control tokens as FIM prefix/suffix/middle; tensors stay byte-identical.

use serde_json::json;

mod common;

#[tokio::test(flavor = "multi_thread")]
async fn infill_lays_out_prefix_suffix_and_middle_with_the_models_fim_tokens() {
    let dir = tempfile::tempdir().unwrap();
    let fim_model = dir.path().join("fim.gguf");
    let summary = common::gguf_variant("fim", &fim_model);
    let (pre, suf, mid) = (&summary["pre_text"], &summary["suf_text"], &summary["mid_text"]);

    let server = common::spawn_server(|_| {});
    let (status, body) = server
        .post(
            "/api/instances",
            json!({ "name": "fim", "model_path": fim_model, "options": { "context_size": 512, "parallel": 1, "threads": 2 } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let request =
        json!({ "input_prefix": "def f(", "input_suffix": "):\n    return x", "n_predict": 3, "temperature": 0 });
    // On-demand start: the first request loads the instance.
    let (status, body) = server.post("/llama-cpp/fim/infill", request.clone()).await;
    assert_eq!(status, 200, "{body}");
    let prompt = body["prompt"].as_str().unwrap();
    let expected =
        format!("{}def f({}):\n    return x{}", pre.as_str().unwrap(), suf.as_str().unwrap(), mid.as_str().unwrap());
    assert!(prompt.ends_with(&expected), "prompt {prompt:?} should end with {expected:?}");
    assert!(body["tokens_predicted"].as_u64().unwrap() >= 1, "{body}");

    // The same request against the original model is refused: it has no FIM tokens.
    let (status, body) = server
        .post(
            "/api/instances",
            json!({ "name": "plain", "model_path": common::model_path(), "options": { "context_size": 512, "parallel": 1, "threads": 2 } }),
        )
        .await;
    assert_eq!(status, 201, "{body}");
    let (status, body) = server.post("/llama-cpp/plain/infill", request).await;
    assert_eq!(status, 400, "{body}");
    assert!(body["error"]["message"].as_str().unwrap().contains("fill-in-the-middle"), "{body}");
}
