//! A local server that speaks the Hugging Face hub's HTTP API (search, tree, resolve with a
//! redirect and byte ranges) over the real test model and a split copy of it, for the download
//! tests (`tests/hub.rs`) and the dashboard's (`tests/dashboard.rs`). Started once per test
//! binary, on a thread and runtime of its own, so it outlives each test's runtime.

use std::collections::HashMap;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::body::Body;
use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{header, HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use parking_lot::Mutex;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

pub struct HubFile {
    pub path: String,
    pub source: PathBuf,
    pub size: u64,
    pub sha256: String,
}

pub struct Repo {
    pub files: Vec<HubFile>,
    /// Bytes per second the files are served at; 0 = as fast as possible.
    pub throttle: u64,
    /// Flip one byte in the middle of what is served (the tree keeps the true sha256).
    pub corrupt: bool,
    pub downloads: u64,
}

pub struct Hub {
    pub repos: HashMap<String, Repo>,
    /// Every file request: (path in repo, first byte asked for).
    pub requests: Mutex<Vec<(String, u64)>>,
}

/// A plain GGUF (Q4_K_M), served as fast as possible; the most downloaded.
pub const FAST: &str = "paddock-test/gemma-3-270m-GGUF";
/// The same model split in two parts.
pub const SPLIT: &str = "paddock-test/gemma-3-270m-split-GGUF";
/// A plain GGUF served at 40 MiB/s, to catch a download midway.
pub const SLOW: &str = "paddock-test/gemma-3-270m-slow-GGUF";
/// Served slowly too, for the test that stops an instance mid-download (its own repository, so
/// the resume test's record of range requests is its own).
pub const SLOW_STOP: &str = "paddock-test/stop-midway-GGUF";
/// A plain GGUF with one byte flipped in what is served.
pub const CORRUPT: &str = "paddock-test/gemma-3-270m-corrupt-GGUF";

pub fn sha256_file(path: &Path) -> String {
    use std::io::Read;
    let mut hasher = Sha256::new();
    let mut f = std::fs::File::open(path).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    hasher.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

fn hub_file(path: &str, source: &Path, sha: &str) -> HubFile {
    HubFile {
        path: path.into(),
        source: source.into(),
        size: std::fs::metadata(source).unwrap().len(),
        sha256: sha.into(),
    }
}

/// The hub's base URL and state; started once per test binary on a thread of its own, so it
/// outlives each test's runtime. Splitting the model needs `PADDOCK_TEST_PYTHON`.
pub fn hub() -> &'static (String, Arc<Hub>) {
    static HUB: OnceLock<(String, Arc<Hub>)> = OnceLock::new();
    HUB.get_or_init(|| {
        let model = super::model_path();
        let model_sha = sha256_file(&model);
        let split_dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("hub-split");
        let parts: Vec<PathBuf> =
            (1..=2).map(|i| split_dir.join(format!("gemma-3-270m-q4_k_m-{i:05}-of-00002.gguf"))).collect();
        if !parts.iter().all(|p| p.is_file()) {
            std::fs::create_dir_all(&split_dir).unwrap();
            let python =
                std::env::var_os("PADDOCK_TEST_PYTHON").expect("PADDOCK_TEST_PYTHON: run through scripts/test");
            let out = Command::new(python)
                .arg(concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/gguf_variants.py"))
                .args(["split", model.to_str().unwrap(), split_dir.to_str().unwrap(), "--parts", "2"])
                .output()
                .unwrap();
            assert!(out.status.success(), "split failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let repo = |files, throttle, corrupt, downloads| Repo { files, throttle, corrupt, downloads };
        let mut repos = HashMap::new();
        repos.insert(
            FAST.to_string(),
            repo(vec![hub_file("gemma-3-270m-Q4_K_M.gguf", &model, &model_sha)], 0, false, 900),
        );
        repos.insert(
            SPLIT.to_string(),
            repo(
                parts
                    .iter()
                    .enumerate()
                    .map(|(i, p)| {
                        hub_file(&format!("gemma-3-270m-split-Q4_K_M-{:05}-of-00002.gguf", i + 1), p, &sha256_file(p))
                    })
                    .collect(),
                0,
                false,
                800,
            ),
        );
        repos.insert(
            SLOW.to_string(),
            repo(vec![hub_file("gemma-3-270m-slow-Q4_K_M.gguf", &model, &model_sha)], 40 << 20, false, 10),
        );
        repos.insert(
            SLOW_STOP.to_string(),
            repo(vec![hub_file("stop-midway-Q4_K_M.gguf", &model, &model_sha)], 40 << 20, false, 1),
        );
        repos.insert(
            CORRUPT.to_string(),
            repo(vec![hub_file("gemma-3-270m-corrupt-Q4_K_M.gguf", &model, &model_sha)], 0, true, 5),
        );
        let hub = Arc::new(Hub { repos, requests: Mutex::new(Vec::new()) });
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let state = hub.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async move {
                let app = Router::new()
                    .route("/api/models", get(search))
                    .route("/api/models/{owner}/{name}/tree/main", get(tree))
                    .route("/{owner}/{name}/resolve/main/{*path}", get(resolve))
                    .route("/cdn/{owner}/{name}/{*path}", get(serve_file))
                    .with_state(state);
                let listener = tokio::net::TcpListener::from_std(listener).unwrap();
                axum::serve(listener, app).await.unwrap();
            })
        });
        (url, hub)
    })
}

async fn search(State(hub): State<Arc<Hub>>, Query(q): Query<HashMap<String, String>>) -> Response {
    assert_eq!(q.get("filter").map(String::as_str), Some("gguf"), "paddock asks for GGUF repositories");
    let words: Vec<String> =
        q.get("search").map(|s| s.to_lowercase()).unwrap_or_default().split_whitespace().map(String::from).collect();
    let limit: usize = q.get("limit").and_then(|l| l.parse().ok()).unwrap_or(20);
    let mut hits: Vec<(&String, &Repo)> =
        hub.repos.iter().filter(|(id, _)| words.iter().all(|w| id.to_lowercase().contains(w))).collect();
    hits.sort_by_key(|(_, r)| std::cmp::Reverse(r.downloads));
    let body: Vec<Value> = hits
        .into_iter()
        .take(limit)
        .map(|(id, r)| json!({ "_id": "x", "id": id, "modelId": id, "downloads": r.downloads, "likes": 3, "tags": ["gguf"] }))
        .collect();
    axum::Json(body).into_response()
}

async fn tree(State(hub): State<Arc<Hub>>, UrlPath((owner, name)): UrlPath<(String, String)>) -> Response {
    let Some(repo) = hub.repos.get(&format!("{owner}/{name}")) else {
        return (StatusCode::NOT_FOUND, axum::Json(json!({ "error": "Repository not found" }))).into_response();
    };
    let mut entries = vec![
        json!({ "type": "file", "oid": "0123456789abcdef0123456789abcdef01234567", "size": 42, "path": "README.md" }),
    ];
    for f in &repo.files {
        entries.push(json!({
            "type": "file",
            "oid": "89abcdef0123456789abcdef0123456789abcdef",
            "size": f.size,
            "path": f.path,
            "lfs": { "oid": f.sha256, "size": f.size, "pointerSize": 134 },
        }));
    }
    axum::Json(entries).into_response()
}

/// The hub answers a file request with a redirect to its CDN.
async fn resolve(UrlPath((owner, name, path)): UrlPath<(String, String, String)>) -> Response {
    (StatusCode::FOUND, [(header::LOCATION, format!("/cdn/{owner}/{name}/{path}"))]).into_response()
}

async fn serve_file(
    State(hub): State<Arc<Hub>>,
    UrlPath((owner, name, path)): UrlPath<(String, String, String)>,
    headers: HeaderMap,
) -> Response {
    let Some(repo) = hub.repos.get(&format!("{owner}/{name}")) else { return StatusCode::NOT_FOUND.into_response() };
    let Some(file) = repo.files.iter().find(|f| f.path == path) else { return StatusCode::NOT_FOUND.into_response() };
    let start: u64 = headers
        .get(header::RANGE)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    hub.requests.lock().push((path.clone(), start));
    if start >= file.size {
        return (StatusCode::RANGE_NOT_SATISFIABLE, [(header::CONTENT_RANGE, format!("bytes */{}", file.size))])
            .into_response();
    }
    let (source, size, throttle, corrupt_at) =
        (file.source.clone(), file.size, repo.throttle, repo.corrupt.then_some(file.size / 2));
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(4);
    tokio::task::spawn_blocking(move || {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(source).unwrap();
        f.seek(SeekFrom::Start(start)).unwrap();
        let mut pos = start;
        let chunk = 256 << 10;
        loop {
            let mut buf = vec![0u8; chunk];
            let n = f.read(&mut buf).unwrap();
            if n == 0 {
                break;
            }
            buf.truncate(n);
            if let Some(at) = corrupt_at.filter(|at| (pos..pos + n as u64).contains(at)) {
                buf[(at - pos) as usize] ^= 0x20;
            }
            pos += n as u64;
            if throttle > 0 {
                std::thread::sleep(Duration::from_secs_f64(n as f64 / throttle as f64));
            }
            if tx.blocking_send(Ok(buf)).is_err() {
                break;
            }
        }
    });
    let stream = tokio_stream::wrappers::ReceiverStream::new(rx);
    let mut resp = Response::new(Body::from_stream(stream));
    resp.headers_mut().insert(header::CONTENT_LENGTH, (size - start).into());
    resp.headers_mut().insert(header::ACCEPT_RANGES, "bytes".parse().unwrap());
    if start > 0 {
        *resp.status_mut() = StatusCode::PARTIAL_CONTENT;
        resp.headers_mut().insert(header::CONTENT_RANGE, format!("bytes {start}-{}/{size}", size - 1).parse().unwrap());
    }
    resp
}

/// The first byte of every request for `path`, in order.
pub fn requests_for(path: &str) -> Vec<u64> {
    hub().1.requests.lock().iter().filter(|(p, _)| p == path).map(|(_, s)| *s).collect()
}
