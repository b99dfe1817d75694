//! The middleware every request passes: who is calling, may they, and have they called too often.
//!
//! Which right a route needs is decided here from its method and path, in one table
//! ([`classify`]), so a new route is guarded by the rule of the prefix it lives under: anything
//! under `/api`, `/v1` or `/llama-cpp` needs credentials unless listed as public. Handlers see
//! the caller as an `Extension<Principal>`; `/v1` handlers also check the instance their body
//! names ([`Principal::may_use`]).

use std::net::SocketAddr;

use axum::extract::{ConnectInfo, Query, Request, State};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};

use super::error::{ApiError, OpenAiError};
use super::limits::Bucket;
use super::openai::Pinned;
use super::AppState;
use crate::auth::{AuthError, Need, Principal};

/// What a route requires and which limit it counts against.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Class<'a> {
    /// None = public.
    pub need: Option<Need<'a>>,
    pub bucket: Bucket,
    /// Errors in OpenAI's shape (inference routes), else paddock's.
    pub openai_errors: bool,
}

pub fn classify<'a>(method: &Method, path: &'a str) -> Class<'a> {
    let public = |bucket| Class { need: None, bucket, openai_errors: false };
    let inference =
        |instance| Class { need: Some(Need::Inference(instance)), bucket: Bucket::Inference, openai_errors: true };
    if path == "/health" {
        return public(Bucket::Unlimited);
    }
    if path == "/v1" || path.starts_with("/v1/") {
        return inference(None);
    }
    if let Some(rest) = path.strip_prefix("/llama-cpp/") {
        return inference(Some(rest.split('/').next().unwrap_or_default()));
    }
    let rest = match path.strip_prefix("/api/v1").filter(|r| r.is_empty() || r.starts_with('/')) {
        Some(rest) => rest,
        None => match path.strip_prefix("/api").filter(|r| r.is_empty() || r.starts_with('/')) {
            Some(rest) => rest,
            // The dashboard's pages and assets, and the 404 for anything else.
            None => return public(Bucket::Unlimited),
        },
    };
    let segments: Vec<&'a str> = rest.trim_start_matches('/').split('/').collect();
    let write = !matches!(*method, Method::GET | Method::HEAD);
    let management = |need, heavy: bool| Class {
        need: Some(need),
        bucket: if heavy { Bucket::Heavy } else { Bucket::Management },
        openai_errors: false,
    };
    match segments.as_slice() {
        ["instances", name, "proxy", ..] => inference(Some(name)),
        ["auth", "login"] => public(Bucket::Heavy),
        ["openapi.json"] => public(Bucket::Management),
        ["auth", "refresh"] => management(Need::LoginToken, false),
        ["auth", ..] => management(Need::Admin, false),
        _ if !write => management(Need::Read, false),
        // The node's settings and its life are the admin's.
        ["admin", "shutdown"] | ["admin", "config", ..] | ["admin", "adapters", ..] => management(Need::Admin, false),
        ["instances"] | ["instances", "start-all"] | ["instances", _, "start" | "restart"] => {
            management(Need::Write, *method == Method::POST)
        }
        // POST /api/instances/{name} creates.
        ["instances", name] if *method == Method::POST && *name != "stop-all" => management(Need::Write, true),
        _ => management(Need::Write, false),
    }
}

/// Guards the main router.
pub async fn authorize(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let class = classify(request.method(), &path);
    guard(&state, class, request, next).await
}

/// Guards an instance's own port: all of it is that instance's inference, but `/health`.
pub async fn authorize_port(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let pinned = request.extensions().get::<Pinned>().map(|Pinned(name)| name.clone()).unwrap_or_default();
    let class = if request.uri().path() == "/health" {
        Class { need: None, bucket: Bucket::Unlimited, openai_errors: true }
    } else {
        Class { need: Some(Need::Inference(Some(&pinned))), bucket: Bucket::Inference, openai_errors: true }
    };
    guard(&state, class, request, next).await
}

async fn guard(state: &AppState, class: Class<'_>, mut request: Request, next: Next) -> Response {
    let refuse = |e: ApiError| {
        if class.openai_errors {
            OpenAiError(e).into_response()
        } else {
            e.into_response()
        }
    };
    let principal = match class.need {
        None => None,
        Some(_) if !state.auth.active() => Some(Principal::Open),
        Some(need) => {
            let checked = credential(&request)
                .ok_or_else(|| {
                    AuthError::Unauthenticated(
                        "credentials required: send Authorization: Bearer <token or API key>".into(),
                    )
                })
                .and_then(|c| state.auth.authenticate(&c))
                .and_then(|p| p.check(need).map(|()| p));
            match checked {
                Ok(p) => Some(p),
                Err(e) => return refuse(ApiError::from(e)),
            }
        }
    };
    let identity = principal.as_ref().and_then(Principal::rate_key).unwrap_or_else(|| client_address(&request));
    let verdict = state.limits.check(class.bucket, &identity);
    if let Some(v) = verdict.as_ref().filter(|v| v.retry_after.is_some()) {
        let mut response = refuse(
            ApiError::new(StatusCode::TOO_MANY_REQUESTS, "RATE_LIMITED", "Too many requests").with_details(format!(
                "at most {} per {} s for this kind of request; retry in {} s",
                v.limit,
                state.limits.window_secs,
                v.retry_after.unwrap_or(1)
            )),
        );
        v.write_headers(response.headers_mut());
        return response;
    }
    if let Some(p) = principal {
        request.extensions_mut().insert(p);
    }
    let mut response = next.run(request).await;
    if let Some(v) = verdict {
        v.write_headers(response.headers_mut());
    }
    response
}

/// `Authorization: Bearer …`; for the WebSocket also a `bearer.<credential>` subprotocol (what a
/// browser can send) or a `token` query parameter.
fn credential(request: &Request) -> Option<String> {
    let headers = request.headers();
    if let Some(c) = bearer(headers) {
        return Some(c);
    }
    let path = request.uri().path();
    if !(path == "/api/ws" || path == "/api/v1/ws") {
        return None;
    }
    let from_protocol = headers
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(','))
        .find_map(|p| p.trim().strip_prefix("bearer.").map(str::to_string));
    from_protocol.or_else(|| {
        let Query(mut query) = Query::<std::collections::HashMap<String, String>>::try_from_uri(request.uri()).ok()?;
        query.remove("token")
    })
}

fn bearer(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, rest) = value.split_once(' ')?;
    scheme.eq_ignore_ascii_case("bearer").then(|| rest.trim().to_string()).filter(|c| !c.is_empty())
}

fn client_address(request: &Request) -> String {
    request
        .extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|ConnectInfo(addr)| format!("ip:{}", addr.ip()))
        .unwrap_or_else(|| "ip:unknown".into())
}

impl From<AuthError> for ApiError {
    fn from(e: AuthError) -> Self {
        let (status, code) = match &e {
            AuthError::Unauthenticated(_) => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
            AuthError::Forbidden(_) => (StatusCode::FORBIDDEN, "FORBIDDEN"),
            AuthError::Invalid(_) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
            AuthError::UserNotFound(_) => (StatusCode::NOT_FOUND, "USER_NOT_FOUND"),
            AuthError::KeyNotFound(_) => (StatusCode::NOT_FOUND, "KEY_NOT_FOUND"),
            AuthError::Conflict(_) => (StatusCode::CONFLICT, "CONFLICT"),
            AuthError::Internal(_) => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL_ERROR"),
        };
        let message = match status {
            StatusCode::UNAUTHORIZED => "Unauthorized",
            StatusCode::FORBIDDEN => "Forbidden",
            _ => "Request refused",
        };
        ApiError::new(status, code, message).with_details(e.to_string())
    }
}

/// Adds `WWW-Authenticate` to 401s, as RFC 6750 asks.
pub async fn challenge(request: Request, next: Next) -> Response {
    let mut response = next.run(request).await;
    if response.status() == StatusCode::UNAUTHORIZED {
        response.headers_mut().insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer realm=\"paddock\""));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    fn need(method: Method, path: &str) -> (Option<Need<'_>>, Bucket) {
        let c = classify(&method, path);
        (c.need, c.bucket)
    }

    #[test]
    fn routes_need_what_their_prefix_says() {
        use Need::*;
        assert_eq!(need(Method::GET, "/health"), (None, Bucket::Unlimited));
        assert_eq!(need(Method::POST, "/api/auth/login"), (None, Bucket::Heavy));
        assert_eq!(need(Method::GET, "/api/openapi.json").0, None);
        assert_eq!(need(Method::GET, "/api/instances"), (Some(Read), Bucket::Management));
        assert_eq!(need(Method::GET, "/api/v1/instances/a/logs"), (Some(Read), Bucket::Management));
        assert_eq!(need(Method::POST, "/api/instances"), (Some(Write), Bucket::Heavy));
        assert_eq!(need(Method::POST, "/api/instances/a"), (Some(Write), Bucket::Heavy));
        assert_eq!(need(Method::PUT, "/api/instances/a"), (Some(Write), Bucket::Management));
        assert_eq!(need(Method::POST, "/api/instances/a/start"), (Some(Write), Bucket::Heavy));
        assert_eq!(need(Method::POST, "/api/instances/a/stop"), (Some(Write), Bucket::Management));
        assert_eq!(need(Method::POST, "/api/instances/stop-all"), (Some(Write), Bucket::Management));
        assert_eq!(need(Method::POST, "/api/instances/start-all"), (Some(Write), Bucket::Heavy));
        assert_eq!(need(Method::GET, "/api/auth/users").0, Some(Admin));
        assert_eq!(need(Method::POST, "/api/auth/refresh").0, Some(LoginToken));
        assert_eq!(need(Method::POST, "/v1/chat/completions"), (Some(Inference(None)), Bucket::Inference));
        assert_eq!(need(Method::GET, "/api/instances/a/proxy/health").0, Some(Inference(Some("a"))));
        assert_eq!(need(Method::POST, "/llama-cpp/b/completion").0, Some(Inference(Some("b"))));
        assert_eq!(need(Method::GET, "/api/ws").0, Some(Read));
        assert_eq!(need(Method::GET, "/apiary").0, None, "not under /api");
        assert_eq!(need(Method::GET, "/api").0, Some(Read));
    }
}
