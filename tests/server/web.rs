//! The embedded dashboard's files as HTTP serves them: the page, its modules and libraries, the
//! page again for client-side routes, and the API's JSON 404 for everything else.

use crate::common::server;

#[tokio::test]
async fn the_page_and_its_modules_are_served_from_the_binary() {
    let s = server();
    let page = s.client.get(s.url("/")).send().await.unwrap();
    assert_eq!(page.status().as_u16(), 200);
    let csp = page.headers()["content-security-policy"].to_str().unwrap().to_string();
    assert!(csp.contains("default-src 'self'") && csp.contains("'sha256-"), "{csp}");
    assert!(page.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let etag = page.headers()["etag"].clone();
    let html = page.text().await.unwrap();
    assert!(html.contains(r#"<script type="module" src="/app.js">"#), "{html}");

    // Every file the page names, and every library its import map names, is served.
    let mut files: Vec<&str> = html.split('"').filter(|s| s.starts_with("/vendor/")).collect();
    files.extend(["/app.js", "/api.js", "/style.css", "/theme.js", "/favicon.svg"]);
    for file in files {
        let resp = s.client.get(s.url(file)).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), 200, "{file}");
        let kind = resp.headers()["content-type"].to_str().unwrap().to_string();
        let want = match file.rsplit('.').next().unwrap() {
            "js" => "text/javascript",
            "css" => "text/css",
            _ => "image/svg+xml",
        };
        assert!(kind.starts_with(want), "{file}: {kind}");
        assert_eq!(resp.headers()["x-content-type-options"], "nosniff");
    }

    // A revalidation of an unchanged page is a 304 without a body.
    let again = s.client.get(s.url("/")).header("if-none-match", etag).send().await.unwrap();
    assert_eq!(again.status().as_u16(), 304);
}

#[tokio::test]
async fn client_routes_get_the_page_and_misses_stay_json_404s() {
    let s = server();
    let deep = s.client.get(s.url("/instances/some-name")).send().await.unwrap();
    assert_eq!(deep.status().as_u16(), 200);
    assert!(deep.text().await.unwrap().contains("/app.js"));

    for path in [
        "/missing.js",
        "/vendor/preact-0.0.0/preact.module.js",
        "/api/nope",
        "/v1/nope",
        "/.env",
        "/vendor/../Cargo.toml",
    ] {
        let (status, body) = s.get(path).await;
        assert_eq!(status, 404, "{path}: {body}");
        assert!(
            body["code"].as_str().is_some_and(|c| c.contains("NOT_FOUND")) || body["error"].is_object(),
            "{path}: {body}"
        );
    }
    let (status, body) = s.post("/", serde_json::json!({})).await;
    assert_eq!((status, body["code"].as_str()), (404, Some("NOT_FOUND")), "{body}");
}
