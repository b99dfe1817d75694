//! The dashboard: `web/` (the app's own modules) and `vendor/` (pinned libraries) embedded in
//! the binary at compile time and served at `/`, with no build step and no outside request.
//!
//! Any GET that no API route answers lands here: a file of the app or of `vendor/`, or — for a
//! path that names no file and has no extension — the app's page, so a reload of a deep link
//! works. Everything else keeps the API's JSON 404.

use std::borrow::Cow;

use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use rust_embed::{EmbeddedFile, RustEmbed};
use sha2::{Digest, Sha256};

use super::error::ApiError;

#[derive(RustEmbed)]
#[folder = "web/"]
struct App;

#[derive(RustEmbed)]
#[folder = "vendor/"]
struct Vendor;

/// Paths the API owns: a miss there is an API 404, never the page.
const API_PREFIXES: [&str; 3] = ["/api", "/v1", "/llama-cpp"];

pub async fn fallback(method: Method, uri: Uri, headers: HeaderMap) -> Response {
    let path = uri.path();
    let api = API_PREFIXES.iter().any(|p| path == *p || path.starts_with(&format!("{p}/")));
    if api || !matches!(method, Method::GET | Method::HEAD) {
        return ApiError::not_found("Not found").with_details(format!("no route for {path}")).into_response();
    }
    let file = path.trim_start_matches('/');
    let found = lookup(if file.is_empty() { "index.html" } else { file }).or_else(|| {
        // A client-side route (no extension): the page. A missing asset stays a 404.
        let last = file.rsplit('/').next().unwrap_or_default();
        if last.contains('.') {
            None
        } else {
            lookup("index.html")
        }
    });
    match found {
        Some(asset) => respond(asset, &headers),
        None => ApiError::not_found("Not found").with_details(format!("no route for {path}")).into_response(),
    }
}

struct Asset {
    name: String,
    data: Cow<'static, [u8]>,
    sha256: [u8; 32],
}

/// A file of the app (`index.html`, `app.js`…) or of `vendor/` (`vendor/preact-…/…`). With
/// `PADDOCK_WEB_DIR` set to a checkout, read from its `web/` and `vendor/` instead, so the
/// dashboard can be worked on without rebuilding the binary.
fn lookup(file: &str) -> Option<Asset> {
    if file.split('/').any(|segment| segment == ".." || segment.starts_with('.')) {
        return None;
    }
    if let Some(dir) = std::env::var_os("PADDOCK_WEB_DIR") {
        let on_disk = match file.strip_prefix("vendor/") {
            Some(_) => std::path::Path::new(&dir).join(file),
            None => std::path::Path::new(&dir).join("web").join(file),
        };
        let data = std::fs::read(on_disk).ok()?;
        let sha256 = Sha256::digest(&data).into();
        return Some(Asset { name: file.into(), data: Cow::Owned(data), sha256 });
    }
    let embedded: EmbeddedFile = match file.strip_prefix("vendor/") {
        Some(vendored) => Vendor::get(vendored)?,
        None => App::get(file)?,
    };
    Some(Asset { name: file.into(), sha256: embedded.metadata.sha256_hash(), data: embedded.data })
}

fn respond(asset: Asset, request: &HeaderMap) -> Response {
    let etag = format!("\"{}\"", hex(&asset.sha256[..12]));
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type(&asset.name)));
    if let Ok(v) = HeaderValue::from_str(&etag) {
        headers.insert(header::ETAG, v);
    }
    // Revalidate every time: an upgraded binary must never run yesterday's modules.
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    headers.insert("x-content-type-options", HeaderValue::from_static("nosniff"));
    headers.insert("referrer-policy", HeaderValue::from_static("no-referrer"));
    if asset.name.ends_with(".html") {
        if let Ok(v) = HeaderValue::from_str(&content_security_policy(&asset.data)) {
            headers.insert(header::CONTENT_SECURITY_POLICY, v);
        }
        headers.insert("x-frame-options", HeaderValue::from_static("DENY"));
    }
    let fresh = request.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()).is_some_and(|v| v == etag);
    if fresh {
        return (StatusCode::NOT_MODIFIED, headers).into_response();
    }
    (StatusCode::OK, headers, asset.data.into_owned()).into_response()
}

/// Only this origin: the page loads nothing from elsewhere and cannot be framed. The one inline
/// script, the import map, is allowed by its hash.
fn content_security_policy(page: &[u8]) -> String {
    use base64::Engine;
    let page = String::from_utf8_lossy(page);
    let hashes: String = inline_scripts(&page)
        .map(|script| format!(" 'sha256-{}'", base64::engine::general_purpose::STANDARD.encode(Sha256::digest(script))))
        .collect();
    format!(
        "default-src 'self'; script-src 'self'{hashes}; style-src 'self'; img-src 'self' data:; \
         connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
    )
}

/// The bodies of the page's `<script>` elements that have no `src`.
fn inline_scripts(page: &str) -> impl Iterator<Item = &str> {
    page.split("<script").skip(1).filter_map(|rest| {
        let (attributes, body) = rest.split_once('>')?;
        let body = body.split_once("</script>")?.0;
        (!attributes.contains("src=")).then_some(body)
    })
}

fn content_type(name: &str) -> &'static str {
    match name.rsplit('.').next().unwrap_or_default() {
        "html" => "text/html; charset=utf-8",
        "js" | "mjs" => "text/javascript; charset=utf-8",
        "css" => "text/css; charset=utf-8",
        "svg" => "image/svg+xml",
        "png" => "image/png",
        "ico" => "image/x-icon",
        "json" => "application/json",
        _ => "text/plain; charset=utf-8",
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_page_and_its_libraries_are_embedded() {
        let page = App::get("index.html").expect("index.html embedded");
        let page = String::from_utf8_lossy(&page.data).into_owned();
        // Every module the import map names is served from the embedded vendor/ tree.
        for path in page.split('"').filter(|s| s.starts_with("/vendor/")) {
            assert!(Vendor::get(&path["/vendor/".len()..]).is_some(), "{path} is not embedded");
        }
        assert_eq!(inline_scripts(&page).count(), 1, "one inline script, the import map");
        assert!(content_security_policy(page.as_bytes()).contains("'sha256-"));
    }

    #[test]
    fn inline_scripts_skip_external_ones() {
        let page = r#"<script src="/a.js"></script><script type="importmap">{"x":1}</script>"#;
        assert_eq!(inline_scripts(page).collect::<Vec<_>>(), vec![r#"{"x":1}"#]);
    }
}
