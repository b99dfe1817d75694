//! Auth, rate limits and the WebSocket, through HTTP: tests that try to get in.

mod common;

use std::sync::OnceLock;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use reqwest::Method;
use serde_json::{json, Value};
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::Message;

use common::{model_path, spawn_server, TestServer};

const ADMIN_PASSWORD: &str = "correct horse battery";
const SECRET: &str = "a-test-secret-that-is-long-enough-to-sign";

/// A server with auth on (an admin from the config), shared by this binary's tests.
fn server() -> &'static TestServer {
    static SERVER: OnceLock<TestServer> = OnceLock::new();
    SERVER.get_or_init(|| {
        spawn_server(|c| {
            c.auth.admin_password = Some(ADMIN_PASSWORD.into());
            c.auth.jwt_secret = Some(SECRET.into());
        })
    })
}

struct Answer {
    status: u16,
    body: Value,
    headers: reqwest::header::HeaderMap,
}

async fn call(s: &TestServer, method: Method, path: &str, credential: Option<&str>, body: Option<Value>) -> Answer {
    let mut request = s.client.request(method, s.url(path));
    if let Some(c) = credential {
        request = request.bearer_auth(c);
    }
    if let Some(b) = body {
        request = request.json(&b);
    }
    let response = request.send().await.unwrap();
    let status = response.status().as_u16();
    let headers = response.headers().clone();
    Answer { status, headers, body: response.json().await.unwrap_or(Value::Null) }
}

async fn login(s: &TestServer, user: &str, password: &str) -> String {
    let a =
        call(s, Method::POST, "/api/auth/login", None, Some(json!({ "username": user, "password": password }))).await;
    assert_eq!(a.status, 200, "login {user}: {}", a.body);
    a.body["token"].as_str().unwrap().to_string()
}

async fn admin(s: &TestServer) -> String {
    login(s, "admin", ADMIN_PASSWORD).await
}

/// A viewer's token (the user is created once).
async fn viewer(s: &TestServer) -> String {
    let token = admin(s).await;
    let body = json!({ "username": "vera", "password": "viewer password", "role": "viewer" });
    let a = call(s, Method::POST, "/api/auth/users", Some(&token), Some(body)).await;
    assert!(a.status == 201 || a.status == 409, "{}", a.body);
    login(s, "vera", "viewer password").await
}

async fn key(s: &TestServer, body: Value) -> String {
    let a = call(s, Method::POST, "/api/auth/keys", Some(&admin(s).await), Some(body)).await;
    assert_eq!(a.status, 201, "{}", a.body);
    a.body["key"].as_str().unwrap().to_string()
}

/// The paddock error format, with the status the test expects.
fn assert_error(a: &Answer, status: u16) {
    assert_eq!(a.status, status, "{}", a.body);
    let message = a.body["error"].as_str().or(a.body["error"]["message"].as_str());
    assert!(message.is_some() && a.body["code"].is_string(), "not the error format: {}", a.body);
}

#[tokio::test]
async fn every_documented_route_needs_credentials_and_viewers_cannot_write() {
    let s = server();
    let doc = call(s, Method::GET, "/api/openapi.json", None, None).await;
    assert_eq!(doc.status, 200, "the document is public");
    let viewer = viewer(s).await;
    let public = [("get", "/health"), ("post", "/api/auth/login"), ("get", "/api/openapi.json")];
    let mut checked = 0;
    for (path, item) in doc.body["paths"].as_object().expect("paths") {
        for (method, op) in item.as_object().unwrap() {
            let Ok(m) = Method::from_bytes(method.to_uppercase().as_bytes()) else { continue };
            if !["get", "post", "put", "delete", "patch"].contains(&method.as_str()) {
                continue;
            }
            let concrete = path.replace("{name}", "gemma").replace("{id}", "0").replace("{username}", "nobody");
            let documented_public = op["security"].as_array().is_some_and(|s| s.iter().all(|r| r == &json!({})));
            if public.contains(&(method.as_str(), path.as_str())) {
                assert!(documented_public, "{method} {path} is public but documented as needing credentials");
                let a = call(s, m, &concrete, None, None).await;
                assert_ne!(a.status, 401, "{method} {path} is public");
                continue;
            }
            assert!(!documented_public, "{method} {path} is documented as public but is not");
            let a = call(s, m.clone(), &concrete, None, Some(json!({}))).await;
            assert_error(&a, 401);
            assert!(a.headers.contains_key("www-authenticate"), "{method} {path}: 401 without a challenge");
            let a = call(s, m.clone(), &concrete, Some("not-a-token"), Some(json!({}))).await;
            assert_error(&a, 401);
            let inference = path.starts_with("/v1/") || path.contains("/proxy");
            // Refreshing one's own token changes nothing but the token.
            if m != Method::GET && !inference && path != "/api/auth/refresh" {
                let a = call(s, m, &concrete, Some(&viewer), Some(json!({}))).await;
                assert_error(&a, 403);
            }
            checked += 1;
        }
    }
    assert!(checked > 40, "only {checked} operations in the document");
    // The aliases are guarded by the same rule.
    for path in ["/api/v1/instances", "/llama-cpp/gemma/health", "/api/v1/instances/gemma/proxy/props", "/api/ws"] {
        assert_error(&call(s, Method::GET, path, None, None).await, 401);
    }
}

#[tokio::test]
async fn login_refresh_and_bad_tokens() {
    let s = server();
    let a =
        call(s, Method::POST, "/api/auth/login", None, Some(json!({ "username": "admin", "password": "nope!" }))).await;
    assert_error(&a, 401);
    let a =
        call(s, Method::POST, "/api/auth/login", None, Some(json!({ "username": "ghost", "password": "nope!" }))).await;
    assert_error(&a, 401);

    let token = admin(s).await;
    assert_eq!(call(s, Method::GET, "/api/instances", Some(&token), None).await.status, 200);
    let refreshed = call(s, Method::POST, "/api/auth/refresh", Some(&token), None).await;
    assert_eq!(refreshed.status, 200, "{}", refreshed.body);
    let new = refreshed.body["token"].as_str().unwrap();
    assert_ne!(new, token);
    assert!(refreshed.body["expires_at"].is_string());
    assert_eq!(call(s, Method::GET, "/api/instances", Some(new), None).await.status, 200);

    // Tampered payload: same signature, different claims.
    let parts: Vec<&str> = token.split('.').collect();
    let claims: Value = serde_json::from_slice(&b64().decode(parts[1]).unwrap()).unwrap();
    let mut forged = claims.clone();
    forged["sub"] = json!("vera");
    let tampered = format!("{}.{}.{}", parts[0], b64().encode(forged.to_string()), parts[2]);
    assert_error(&call(s, Method::GET, "/api/instances", Some(&tampered), None).await, 401);
    // alg: none, no signature.
    let none_header = b64().encode(r#"{"alg":"none","typ":"JWT"}"#);
    let unsigned = format!("{none_header}.{}.", parts[1]);
    assert_error(&call(s, Method::GET, "/api/instances", Some(&unsigned), None).await, 401);
    // Signed with another secret, and with the right secret but HS512.
    let sign = |alg, secret: &str| {
        jsonwebtoken::encode(
            &jsonwebtoken::Header::new(alg),
            &claims,
            &jsonwebtoken::EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let wrong_secret = sign(jsonwebtoken::Algorithm::HS256, "another-secret-of-enough-length-here");
    assert_error(&call(s, Method::GET, "/api/instances", Some(&wrong_secret), None).await, 401);
    let hs512 = sign(jsonwebtoken::Algorithm::HS512, SECRET);
    assert_error(&call(s, Method::GET, "/api/instances", Some(&hs512), None).await, 401);
    // The right secret and algorithm: the test's forgery check is itself sound.
    let genuine = sign(jsonwebtoken::Algorithm::HS256, SECRET);
    assert_eq!(call(s, Method::GET, "/api/instances", Some(&genuine), None).await.status, 200);

    // A key is not a login token: it cannot be refreshed.
    let k = key(s, json!({ "name": "mgmt", "kind": "management", "role": "admin" })).await;
    assert_error(&call(s, Method::POST, "/api/auth/refresh", Some(&k), None).await, 403);
}

fn b64() -> base64::engine::GeneralPurpose {
    base64::engine::general_purpose::URL_SAFE_NO_PAD
}
use base64::Engine as _;

#[tokio::test]
async fn tokens_expire() {
    let s = spawn_server(|c| {
        c.auth.admin_password = Some(ADMIN_PASSWORD.into());
        c.auth.token_ttl = 1;
    });
    let token = admin(&s).await;
    assert_eq!(call(&s, Method::GET, "/api/instances", Some(&token), None).await.status, 200);
    tokio::time::sleep(Duration::from_millis(2100)).await;
    let a = call(&s, Method::GET, "/api/instances", Some(&token), None).await;
    assert_error(&a, 401);
    assert!(a.body["details"].as_str().unwrap().contains("expired"), "{}", a.body);
    assert_error(&call(&s, Method::POST, "/api/auth/refresh", Some(&token), None).await, 401);
}

#[tokio::test]
async fn users_and_keys_are_managed_by_admins_and_revoked_at_once() {
    let s = server();
    let token = admin(s).await;
    let viewer = viewer(s).await;
    assert_error(&call(s, Method::GET, "/api/auth/users", Some(&viewer), None).await, 403);
    let users = call(s, Method::GET, "/api/auth/users", Some(&token), None).await;
    let names: Vec<&str> = users.body.as_array().unwrap().iter().map(|u| u["username"].as_str().unwrap()).collect();
    assert!(names.contains(&"admin") && names.contains(&"vera"), "{names:?}");
    assert!(users.body.to_string().find("argon2").is_none(), "no hashes in the listing");

    let short = json!({ "username": "x", "password": "short" });
    assert_error(&call(s, Method::POST, "/api/auth/users", Some(&token), Some(short)).await, 400);
    let typo = json!({ "username": "x", "password": "long enough", "rol": "admin" });
    let a = call(s, Method::POST, "/api/auth/users", Some(&token), Some(typo)).await;
    assert_error(&a, 422);
    assert!(a.body["details"].as_str().unwrap().contains("rol"), "{}", a.body);
    assert_error(&call(s, Method::DELETE, "/api/auth/users/admin", Some(&token), None).await, 409);

    // A key is shown once, listed without its secret, and dead the moment it is deleted.
    let created =
        call(s, Method::POST, "/api/auth/keys", Some(&token), Some(json!({ "name": "tmp", "kind": "management" })))
            .await;
    assert_eq!(created.status, 201, "{}", created.body);
    let secret = created.body["key"].as_str().unwrap().to_string();
    let id = created.body["id"].as_str().unwrap().to_string();
    assert_eq!(created.body["role"], "viewer", "management keys default to viewer");
    assert_eq!(call(s, Method::GET, "/api/instances", Some(&secret), None).await.status, 200);
    assert_error(&call(s, Method::POST, "/api/instances/stop-all", Some(&secret), None).await, 403);
    let listed = call(s, Method::GET, "/api/auth/keys", Some(&token), None).await;
    assert!(!listed.body.to_string().contains(&secret), "the key is never shown again");
    assert!(listed.body.as_array().unwrap().iter().any(|k| k["id"] == id.as_str() && k["key"].is_null()));
    // A key with the right id and a wrong secret.
    let guessed = format!("{}x", &secret[..secret.len() - 1]);
    assert_error(&call(s, Method::GET, "/api/instances", Some(&guessed), None).await, 401);
    assert_eq!(call(s, Method::DELETE, &format!("/api/auth/keys/{id}"), Some(&token), None).await.status, 204);
    assert_error(&call(s, Method::GET, "/api/instances", Some(&secret), None).await, 401);

    // A deleted user's token stops working.
    let body = json!({ "username": "temp", "password": "temporary pw", "role": "admin" });
    assert_eq!(call(s, Method::POST, "/api/auth/users", Some(&token), Some(body)).await.status, 201);
    let temp = login(s, "temp", "temporary pw").await;
    assert_eq!(call(s, Method::DELETE, "/api/auth/users/temp", Some(&token), None).await.status, 204);
    assert_error(&call(s, Method::GET, "/api/instances", Some(&temp), None).await, 401);
}

#[tokio::test]
async fn an_inference_key_reaches_only_its_instances() {
    let s = server();
    let token = admin(s).await;
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    for name in ["key-a", "key-b"] {
        let mut body =
            json!({ "name": name, "model_path": model_path(), "options": { "ctx_size": 256, "parallel": 1 } });
        if name == "key-a" {
            body["port"] = json!(port);
        }
        assert_eq!(call(s, Method::POST, "/api/instances", Some(&token), Some(body)).await.status, 201);
    }
    assert_eq!(call(s, Method::POST, "/api/instances/key-a/start", Some(&token), None).await.status, 200);
    let scoped = key(s, json!({ "name": "a-only", "kind": "inference", "instances": ["key-a"] })).await;

    let models = call(s, Method::GET, "/v1/models", Some(&scoped), None).await;
    let ids: Vec<&str> = models.body["data"].as_array().unwrap().iter().map(|m| m["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["key-a"]);
    let completion = |model: &str| json!({ "model": model, "prompt": "Hello", "max_tokens": 2 });
    let a = call(s, Method::POST, "/v1/completions", Some(&scoped), Some(completion("key-b"))).await;
    assert_error(&a, 403);
    assert!(a.body["error"]["message"].as_str().unwrap_or_default().contains("Forbidden"), "{}", a.body);
    for path in ["/api/instances/key-b/proxy/health", "/llama-cpp/key-b/props", "/api/v1/instances/key-b/proxy/slots"] {
        assert_error(&call(s, Method::GET, path, Some(&scoped), None).await, 403);
    }
    for (m, path) in
        [(Method::GET, "/api/instances"), (Method::POST, "/api/instances/key-a/stop"), (Method::GET, "/api/ws")]
    {
        assert_error(&call(s, m, path, Some(&scoped), None).await, 403);
    }
    // On its own instance it works (waiting for the instance to load through the same key).
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let a = call(s, Method::POST, "/v1/completions", Some(&scoped), Some(completion("key-a"))).await;
        if a.status == 200 {
            assert!(a.body["choices"][0]["text"].is_string(), "{}", a.body);
            break;
        }
        assert!(a.status == 503 && std::time::Instant::now() < deadline, "{} {}", a.status, a.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(call(s, Method::GET, "/llama-cpp/key-a/health", Some(&scoped), None).await.status, 200);
    // The instance's own port is guarded as well (but its /health, as llama-server's).
    let own = TestServer { base: format!("http://127.0.0.1:{port}"), client: s.client.clone() };
    assert_eq!(call(&own, Method::GET, "/health", None, None).await.status, 200);
    assert_error(&call(&own, Method::GET, "/props", None, None).await, 401);
    let b_only = key(s, json!({ "name": "b-only", "kind": "inference", "instances": ["key-b"] })).await;
    assert_error(&call(&own, Method::GET, "/props", Some(&b_only), None).await, 403);
    assert_eq!(call(&own, Method::GET, "/props", Some(&scoped), None).await.status, 200);
    call(s, Method::POST, "/api/instances/key-a/stop", Some(&token), None).await;
}

#[tokio::test]
async fn rate_limit_headers_count_down_and_a_burst_gets_429_until_reset() {
    let s = spawn_server(|c| {
        c.rate_limits.management = Some(3);
        c.rate_limits.window_secs = 3;
    });
    let mut remaining = Vec::new();
    for _ in 0..3 {
        let a = call(&s, Method::GET, "/api/instances", None, None).await;
        assert_eq!(a.status, 200);
        assert_eq!(a.headers["x-ratelimit-limit"], "3");
        let reset: u64 = a.headers["x-ratelimit-reset"].to_str().unwrap().parse().unwrap();
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs();
        assert!(reset >= now && reset <= now + 4, "reset {reset} now {now}");
        remaining.push(a.headers["x-ratelimit-remaining"].to_str().unwrap().to_string());
    }
    assert_eq!(remaining, ["2", "1", "0"]);
    let refused = call(&s, Method::GET, "/api/system/info", None, None).await;
    assert_error(&refused, 429);
    let retry: u64 = refused.headers["retry-after"].to_str().unwrap().parse().unwrap();
    assert!((1..=3).contains(&retry), "retry-after {retry}");
    assert_eq!(refused.headers["x-ratelimit-remaining"], "0");
    // Liveness is not limited, and the limit comes back after Retry-After.
    assert_eq!(call(&s, Method::GET, "/health", None, None).await.status, 200);
    tokio::time::sleep(Duration::from_secs(retry)).await;
    assert_eq!(call(&s, Method::GET, "/api/instances", None, None).await.status, 200);
}

async fn ws_connect(
    s: &TestServer,
    credential: &str,
) -> tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>> {
    let url = s.url("/api/ws").replace("http://", "ws://");
    let mut request = url.into_client_request().unwrap();
    request.headers_mut().insert("sec-websocket-protocol", format!("paddock, bearer.{credential}").parse().unwrap());
    let (socket, response) = tokio_tungstenite::connect_async(request).await.unwrap();
    assert_eq!(response.headers()["sec-websocket-protocol"], "paddock");
    socket
}

#[tokio::test]
async fn websocket_sends_status_changes_in_order_and_a_stalled_client_stalls_nothing() {
    let s = server();
    let token = admin(s).await;
    // Refused without credentials; the query parameter works as well as the subprotocol.
    let url = s.url("/api/ws").replace("http://", "ws://");
    let refused = tokio_tungstenite::connect_async(url.as_str()).await.unwrap_err();
    assert!(refused.to_string().contains("401"), "{refused}");
    let (mut by_query, _) = tokio_tungstenite::connect_async(format!("{url}?token={token}")).await.unwrap();
    by_query.close(None).await.unwrap();

    // A client that never reads, with a tiny receive buffer so the server's sends to it block.
    let stalled = {
        let socket = tokio::net::TcpSocket::new_v4().unwrap();
        socket.set_recv_buffer_size(2048).unwrap();
        let addr = s.base.trim_start_matches("http://").parse().unwrap();
        let stream = socket.connect(addr).await.unwrap();
        let mut request = url.as_str().into_client_request().unwrap();
        request.headers_mut().insert("authorization", format!("Bearer {token}").parse().unwrap());
        tokio_tungstenite::client_async(request, stream).await.unwrap().0
    };
    let mut client = ws_connect(s, &token).await;

    let name = "ws-watch";
    let body = json!({ "name": name, "model_path": model_path(), "options": { "ctx_size": 256, "parallel": 1 } });
    assert_eq!(call(s, Method::POST, "/api/instances", Some(&token), Some(body)).await.status, 201);
    assert_eq!(call(s, Method::POST, &format!("/api/instances/{name}/start"), Some(&token), None).await.status, 200);
    s.wait_status_with(name, "running", &token).await;
    assert_eq!(call(s, Method::POST, &format!("/api/instances/{name}/stop"), Some(&token), None).await.status, 200);
    // Many more events than the per-client backlog holds, while one client does not read.
    const UPDATES: usize = 600;
    for i in 0..UPDATES {
        let patch = json!({ "options": { "threads": 1 + i % 2 } });
        let a = call(s, Method::PUT, &format!("/api/instances/{name}"), Some(&token), Some(patch)).await;
        assert_eq!(a.status, 200, "{}", a.body);
    }

    let mut transitions = Vec::new();
    let mut updates = 0;
    let mut stats_seen = false;
    let mut created = false;
    while updates < UPDATES {
        let msg = tokio::time::timeout(Duration::from_secs(30), client.next()).await.expect("events keep coming");
        let Some(Ok(Message::Text(text))) = msg else { panic!("socket ended: {msg:?}") };
        let event: Value = serde_json::from_str(&text).unwrap();
        assert!(event["timestamp"].is_string(), "{event}");
        let data = &event["data"];
        match event["type"].as_str().unwrap() {
            "instance_created" if data["name"] == name => created = true,
            "instance_status_changed" if data["name"] == name => transitions.push(format!(
                "{}>{}",
                data["old_status"].as_str().unwrap(),
                data["new_status"].as_str().unwrap()
            )),
            "instance_updated" if data["name"] == name => updates += 1,
            "instance_stats_updated" if data["name"] == name => {
                stats_seen = true;
                assert!(data["memory_usage"].as_u64().unwrap() > 0, "{data}");
            }
            "lagged" => panic!("a client that keeps up must not lag: {event}"),
            _ => {}
        }
    }
    assert!(created);
    assert_eq!(transitions, ["stopped>starting", "starting>running", "running>stopping", "stopping>stopped"]);
    let _ = stats_seen; // only while running, which may be shorter than the 2 s period

    // The stalled client is still connected and, reading now, gets the events in order, or is
    // told it missed some (how much the kernel buffers absorbed decides which).
    let mut stalled = stalled;
    let mut seen = Vec::new();
    while let Ok(Some(Ok(msg))) = tokio::time::timeout(Duration::from_secs(5), stalled.next()).await {
        if let Message::Text(text) = msg {
            let event: Value = serde_json::from_str(&text).unwrap();
            if event["type"] == "lagged" {
                seen.push("lagged".to_string());
                break;
            }
            if event["type"] == "instance_status_changed" && event["data"]["name"] == name {
                seen.push(event["data"]["new_status"].as_str().unwrap().to_string());
            }
        }
        if seen.last().is_some_and(|s| s == "stopped") {
            break;
        }
    }
    assert!(
        seen == ["starting", "running", "stopping", "stopped"] || seen.last().is_some_and(|s| s == "lagged"),
        "{seen:?}"
    );
    client.send(Message::Close(None)).await.unwrap();
}

#[tokio::test]
async fn an_open_loopback_server_turns_auth_on_with_its_first_credential() {
    let s = spawn_server(|_| {});
    assert_eq!(s.get("/api/instances").await.0, 200, "open on loopback without credentials");
    let (status, body) = s.post("/api/auth/refresh", json!({})).await;
    assert_eq!(status, 401, "no login token to refresh while auth is off: {body}");
    let (status, body) =
        s.post("/api/auth/users", json!({ "username": "v", "password": "viewer pass", "role": "viewer" })).await;
    assert_eq!(status, 409, "the first user must be an admin: {body}");
    let (status, body) = s.post("/api/auth/keys", json!({ "name": "k", "kind": "inference" })).await;
    assert_eq!(status, 409, "the first key must be an admin key: {body}");
    let (status, body) =
        s.post("/api/auth/users", json!({ "username": "root", "password": "admin pass", "role": "admin" })).await;
    assert_eq!(status, 201, "{body}");
    assert_eq!(s.get("/api/instances").await.0, 401, "auth is on from now on");
    let token = login(&s, "root", "admin pass").await;
    assert_eq!(call(&s, Method::GET, "/api/instances", Some(&token), None).await.status, 200);
}

#[tokio::test]
async fn cross_origin_calls_are_allowed_only_from_configured_origins() {
    async fn preflight(s: &TestServer, origin: &str) -> reqwest::Response {
        s.client
            .request(Method::OPTIONS, s.url("/api/instances"))
            .header("origin", origin)
            .header("access-control-request-method", "POST")
            .header("access-control-request-headers", "authorization, content-type")
            .send()
            .await
            .unwrap()
    }
    let closed = spawn_server(|_| {});
    let r = preflight(&closed, "http://ui.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none(), "no origin allowed by default");
    let r = closed.client.get(closed.url("/api/instances")).header("origin", "http://ui.example").send().await.unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());

    let open = spawn_server(|c| c.cors_origins = vec!["http://ui.example".into()]);
    let r = preflight(&open, "http://ui.example").await;
    assert_eq!(r.headers()["access-control-allow-origin"], "http://ui.example");
    let allowed = r.headers()["access-control-allow-headers"].to_str().unwrap().to_lowercase();
    assert!(allowed.contains("authorization"), "{allowed}");
    let r = preflight(&open, "http://evil.example").await;
    assert!(r.headers().get("access-control-allow-origin").is_none(), "only the configured origin");
}
