//! The OpenAPI document (`/api/openapi.json`) against the routes actually served: every
//! documented operation is routed (under its aliases too), every known route is documented,
//! operation ids are unique and every `$ref` resolves. And no route module registers a route
//! outside `utoipa_axum::routes!`, which is what keeps the document complete.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::common::{server, spawn_server, TestServer};

/// Every route paddock serves, at its canonical path. Removing a route's `#[utoipa::path]`
/// removes it from the document, and this list then fails the test; a new route belongs here.
const ROUTES: &[(&str, &str)] = &[
    ("GET", "/health"),
    ("GET", "/api/openapi.json"),
    ("GET", "/api/config"),
    ("PUT", "/api/config"),
    ("GET", "/api/system/info"),
    ("GET", "/api/system/status"),
    ("GET", "/api/system/alerts"),
    ("GET", "/api/admin/models"),
    ("GET", "/api/admin/models/{id}"),
    ("DELETE", "/api/admin/models/{id}"),
    ("GET", "/api/admin/models/{id}/metadata"),
    ("POST", "/api/admin/models/{id}/unload"),
    ("POST", "/api/admin/rescan-shards"),
    ("GET", "/api/admin/shard-storage"),
    ("GET", "/api/admin/stats"),
    ("GET", "/api/admin/version"),
    ("GET", "/api/admin/hf/search"),
    ("GET", "/api/admin/hf/probe"),
    ("POST", "/api/admin/hf/download-shards"),
    ("GET", "/api/admin/hf/source/{id}"),
    ("GET", "/api/admin/downloads"),
    ("POST", "/api/admin/downloads/{id}/cancel"),
    ("GET", "/api/admin/adapters"),
    ("POST", "/api/admin/adapters"),
    ("DELETE", "/api/admin/adapters/{id}"),
    ("GET", "/api/admin/config"),
    ("PUT", "/api/admin/config"),
    ("POST", "/api/admin/config/reload"),
    ("POST", "/api/admin/shutdown"),
    ("GET", "/api/admin/ws"),
    ("GET", "/api/instances"),
    ("POST", "/api/instances"),
    ("POST", "/api/instances/start-all"),
    ("POST", "/api/instances/stop-all"),
    ("GET", "/api/instances/{name}"),
    ("POST", "/api/instances/{name}"),
    ("PUT", "/api/instances/{name}"),
    ("DELETE", "/api/instances/{name}"),
    ("POST", "/api/instances/{name}/start"),
    ("POST", "/api/instances/{name}/stop"),
    ("POST", "/api/instances/{name}/restart"),
    ("GET", "/api/instances/{name}/logs"),
    ("GET", "/api/instances/{name}/health"),
    ("GET", "/api/nodes"),
    ("GET", "/api/nodes/{name}"),
    ("GET", "/v1/models"),
    ("POST", "/v1/chat/completions"),
    ("POST", "/v1/completions"),
    ("POST", "/v1/embeddings"),
    ("GET", "/api/instances/{name}/proxy/health"),
    ("GET", "/api/instances/{name}/proxy/props"),
    ("GET", "/api/instances/{name}/proxy/slots"),
    ("POST", "/api/instances/{name}/proxy/slots/{id}"),
    ("GET", "/api/instances/{name}/proxy/metrics"),
    ("POST", "/api/instances/{name}/proxy/completion"),
    ("POST", "/api/instances/{name}/proxy/completions"),
    ("POST", "/api/instances/{name}/proxy/infill"),
    ("POST", "/api/instances/{name}/proxy/tokenize"),
    ("POST", "/api/instances/{name}/proxy/detokenize"),
    ("POST", "/api/instances/{name}/proxy/embedding"),
    ("POST", "/api/instances/{name}/proxy/embeddings"),
    ("POST", "/api/instances/{name}/proxy/apply-template"),
    ("GET", "/api/instances/{name}/proxy/lora-adapters"),
    ("POST", "/api/instances/{name}/proxy/lora-adapters"),
    ("GET", "/api/instances/{name}/proxy/v1/models"),
    ("POST", "/api/instances/{name}/proxy/v1/chat/completions"),
    ("POST", "/api/instances/{name}/proxy/v1/completions"),
    ("POST", "/api/instances/{name}/proxy/v1/embeddings"),
];

const METHODS: [&str; 8] = ["get", "put", "post", "delete", "options", "head", "patch", "trace"];

async fn document(s: &TestServer) -> Value {
    let (status, doc) = s.get("/api/openapi.json").await;
    assert_eq!(status, 200, "{doc}");
    doc
}

/// (METHOD, path, operation) of every documented operation.
fn operations(doc: &Value) -> Vec<(String, String, Value)> {
    let mut out = Vec::new();
    for (path, item) in doc["paths"].as_object().expect("paths") {
        for method in METHODS {
            if let Some(op) = item.get(method) {
                out.push((method.to_uppercase(), path.clone(), op.clone()));
            }
        }
    }
    out
}

fn refs<'a>(value: &'a Value, out: &mut Vec<&'a str>) {
    match value {
        Value::Object(map) => {
            out.extend(map.get("$ref").and_then(Value::as_str));
            map.values().for_each(|v| refs(v, out));
        }
        Value::Array(items) => items.iter().for_each(|v| refs(v, out)),
        _ => {}
    }
}

#[tokio::test]
async fn the_document_is_complete_and_consistent() {
    let s = server();
    let doc = document(s).await;
    assert!(doc["openapi"].as_str().unwrap().starts_with("3."), "{}", doc["openapi"]);
    assert_eq!(doc["info"]["title"], "paddock");
    assert_eq!(doc["info"]["version"], env!("CARGO_PKG_VERSION"));
    let description = doc["info"]["description"].as_str().unwrap();
    for alias in ["/api/v1/", "/llama-cpp/{name}/"] {
        assert!(description.contains(alias), "the description names the alias {alias}");
    }
    let (_, alias) = s.get("/api/v1/openapi.json").await;
    assert_eq!(alias, doc, "the llamactl prefix serves the same document");

    let ops = operations(&doc);
    let documented: BTreeSet<(String, String)> = ops.iter().map(|(m, p, _)| (m.clone(), p.clone())).collect();
    for (method, path) in ROUTES {
        assert!(documented.contains(&(method.to_string(), path.to_string())), "{method} {path} is not documented");
    }
    for (_, path, _) in &ops {
        assert!(
            !path.starts_with("/api/v1/") && !path.starts_with("/llama-cpp/"),
            "aliases are not separate operations: {path}"
        );
    }

    let mut ids = BTreeSet::new();
    for (method, path, op) in &ops {
        let id = op["operationId"].as_str().unwrap_or_else(|| panic!("{method} {path} has no operationId"));
        assert!(ids.insert(id.to_string()), "operationId {id} is used twice");
        assert!(op["responses"].as_object().is_some_and(|r| !r.is_empty()), "{method} {path} has no responses");
        assert!(op["tags"].as_array().is_some_and(|t| !t.is_empty()), "{method} {path} has no tag");
        // Every path parameter is declared.
        let declared: BTreeSet<&str> = op["parameters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|p| p["in"] == "path")
            .map(|p| p["name"].as_str().unwrap())
            .collect();
        let in_path: BTreeSet<&str> =
            path.split('/').filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}'))).collect();
        assert_eq!(declared, in_path, "{method} {path} declares its path parameters");
        // Routes that take a body say how it can be refused.
        let has_error = op["responses"].as_object().unwrap().keys().any(|s| s.starts_with('4') || s.starts_with('5'));
        assert!(op.get("requestBody").is_none() || has_error, "{method} {path} documents no error response");
    }

    let mut found = Vec::new();
    refs(&doc, &mut found);
    for r in found {
        let name = r.strip_prefix("#/components/schemas/").unwrap_or_else(|| panic!("{r} is not a local schema"));
        assert!(doc["components"]["schemas"].get(name).is_some(), "{r} does not resolve");
    }

    assert_eq!(doc["components"]["securitySchemes"]["bearer"]["scheme"], "bearer");
    assert_eq!(doc["security"], json!([{ "bearer": [] }]));
    for path in ["/health", "/api/openapi.json"] {
        assert_eq!(doc["paths"][path]["get"]["security"], json!([{}]), "{path} needs no credentials");
    }
}

/// Whether the router, not a handler, answered: an unrouted method is 405, an unknown path the
/// fallback's 404 with code `NOT_FOUND` (handlers' 404s carry `INSTANCE_NOT_FOUND` or
/// `MODEL_NOT_FOUND`).
fn unrouted(status: u16, body: &Value) -> bool {
    status == 405 || (status == 404 && body["code"] == "NOT_FOUND")
}

async fn send(s: &TestServer, method: &str, path: &str) -> (u16, Value) {
    let method = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
    let mut request = s.client.request(method.clone(), s.url(path));
    if method == reqwest::Method::POST || method == reqwest::Method::PUT {
        request = request.json(&json!({}));
    }
    let resp = request.send().await.unwrap();
    let status = resp.status().as_u16();
    (status, resp.json().await.unwrap_or(Value::Null))
}

#[tokio::test]
async fn every_documented_operation_is_routed_under_every_prefix() {
    // A server of its own, without instances: start-all, stop-all and PUT /api/config act on
    // nothing another test uses, and names that do not exist make handlers answer at once.
    let s = spawn_server(|_| {});
    let doc = document(&s).await;
    let (status, body) = send(&s, "GET", "/api/no-such-route").await;
    assert!(unrouted(status, &body), "the fallback is recognised: {status} {body}");
    let (status, body) = send(&s, "GET", "/api/instances/ghost/proxy/no-such-route").await;
    assert!(unrouted(status, &body), "the proxied fallback is recognised: {status} {body}");
    let (status, body) = send(&s, "PATCH", "/api/instances").await;
    assert!(unrouted(status, &body), "an unrouted method is recognised: {status} {body}");

    let proxy = "/api/instances/{name}/proxy";
    let mut checked = 0;
    for (method, path, _) in operations(&doc) {
        // It would end this server before the loop does (tests/server/node.rs covers it).
        if path == "/api/admin/shutdown" {
            continue;
        }
        let mut paths = vec![path.clone()];
        if let Some(rest) = path.strip_prefix(proxy) {
            paths.push(format!("/api/v1/instances/{{name}}/proxy{rest}"));
            paths.push(format!("/llama-cpp/{{name}}{rest}"));
        } else if let Some(rest) = path.strip_prefix("/api/") {
            paths.push(format!("/api/v1/{rest}"));
        }
        for path in paths {
            let concrete = path.replace("{name}", "openapi-ghost").replace("{id}", "0");
            let (status, body) = send(&s, &method, &concrete).await;
            assert!(!unrouted(status, &body), "{method} {concrete} is documented but not routed: {status} {body}");
            assert!(status < 500, "{method} {concrete}: {status} {body}");
            checked += 1;
        }
    }
    assert!(checked > 2 * ROUTES.len(), "{checked} requests");
}

/// `src/api/*.rs` register routes only through `utoipa_axum::routes!` (each handler brings its
/// `#[utoipa::path]`), so a route cannot be served without being documented. The only plain
/// routers are the aliases `app()` nests, and an instance's own port, which serve handlers
/// that are documented at their canonical paths.
#[test]
fn routes_are_registered_only_with_their_documentation() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("src/api");
    let forbidden = [".route(", ".route_service(", ".nest_service(", "routing::", "Router::new()", "MethodRouter"];
    let mut files = 0;
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "rs") {
            continue;
        }
        files += 1;
        let text = std::fs::read_to_string(&path).unwrap();
        for (n, line) in text.lines().enumerate() {
            let code = line.split("//").next().unwrap().replace("OpenApiRouter", "");
            for f in forbidden {
                assert!(
                    !code.contains(f),
                    "{}:{}: `{f}` registers a route outside routes!: {line}",
                    path.display(),
                    n + 1
                );
            }
            // Plain routers nested by app() are the aliases of documented ones.
            if code.contains(".nest(") && code.contains(".into()") {
                let aliases = [
                    "\"/api/v1\", management()",
                    "\"/api/v1/instances/{name}/proxy\", proxied()",
                    "\"/llama-cpp/{name}\", proxied()",
                ];
                assert!(
                    aliases.iter().any(|a| code.contains(a)),
                    "{}:{}: an undocumented nest: {line}",
                    path.display(),
                    n + 1
                );
            }
        }
    }
    assert!(files >= 8, "read {files} files of {}", dir.display());
}

/// Requests the extractors refuse before a handler runs still get the documented JSON errors.
#[tokio::test]
async fn extractor_rejections_answer_in_the_documented_shapes() {
    let s = server();
    for (path, code) in [
        ("/api/instances/%FF", "INVALID_PATH"),
        ("/api/v1/instances/%FF/logs", "INVALID_PATH"),
        ("/api/instances/ghost/logs?lines=many", "INVALID_QUERY"),
    ] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], code, "{path}: {body}");
        assert!(body["error"].is_string() && body["details"].is_string(), "{path}: {body}");
    }
    for path in ["/api/instances/%FF/proxy/slots/0?action=erase", "/llama-cpp/ghost/slots/%FF?action=erase"] {
        let (status, body) = s.post(path, json!({})).await;
        assert_eq!(status, 400, "{path}: {body}");
        assert_eq!(body["code"], "INVALID_PATH", "{path}: {body}");
        assert_eq!(body["error"]["type"], "invalid_request_error", "{path}: {body}");
    }
    // The optional bodies the document declares nullable take `null` as the defaults.
    let (status, body) = s.post("/api/instances/ghost/stop", Value::Null).await;
    assert_eq!((status, &body["code"]), (404, &json!("INSTANCE_NOT_FOUND")), "a null stop body: {body}");
    let (status, body) = s.post("/api/instances/ghost/proxy/slots/0", json!({})).await;
    assert_eq!((status, &body["code"]), (400, &json!("INVALID_QUERY")), "no action: {body}");
    assert!(body["error"]["message"].is_string(), "{body}");
}
