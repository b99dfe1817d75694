//! `/api/auth/…`: login and refresh, users and API keys. Who may call each is decided by
//! [`super::guard`]; these handlers only do the work.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Extension;
use serde::Deserialize;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::error::{ApiError, Json};
use super::AppState;
use crate::auth::{IssuedToken, KeyView, NewKey, NewUser, Principal, UserView};

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new()
        .routes(routes!(login))
        .routes(routes!(refresh))
        .routes(routes!(list_users, create_user))
        .routes(routes!(delete_user))
        .routes(routes!(list_keys, create_key))
        .routes(routes!(delete_key))
}

#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LoginRequest {
    pub username: String,
    pub password: String,
}

/// Exchanges a username and password for a login token.
#[utoipa::path(post, path = "/auth/login", tag = "auth", security(()), request_body = LoginRequest,
    responses((status = 413, description = "The body is too large", body = super::doc::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::doc::ErrorBody),
        (status = 422, description = "A field is missing, unknown or of the wrong type (`INVALID_JSON`)", body = super::doc::ErrorBody),
        (status = 200, body = IssuedToken), (status = 400, body = super::doc::ErrorBody),
        (status = 401, description = "Wrong username or password", body = super::doc::ErrorBody),
        (status = 429, description = "Too many attempts", body = super::doc::ErrorBody)))]
async fn login(
    State(state): State<AppState>,
    Json(body): Json<LoginRequest>,
) -> Result<axum::Json<IssuedToken>, ApiError> {
    Ok(axum::Json(state.auth.login(&body.username, &body.password).await?))
}

/// A new token for the holder of a valid login token.
#[utoipa::path(post, path = "/auth/refresh", tag = "auth",
    responses((status = 200, body = IssuedToken),
        (status = 401, body = super::doc::ErrorBody),
        (status = 403, description = "Not a login token (API keys do not expire)", body = super::doc::ErrorBody)))]
async fn refresh(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
) -> Result<axum::Json<IssuedToken>, ApiError> {
    Ok(axum::Json(state.auth.refresh(&principal)?))
}

/// Lists users (admins only).
#[utoipa::path(get, path = "/auth/users", tag = "auth",
    responses((status = 200, body = [UserView]), (status = 401, body = super::doc::ErrorBody),
        (status = 403, body = super::doc::ErrorBody)))]
async fn list_users(State(state): State<AppState>) -> axum::Json<Vec<UserView>> {
    axum::Json(state.auth.users())
}

/// Creates a user (admins only; on an open loopback server the first user must be an admin,
/// and creating it turns auth on).
#[utoipa::path(post, path = "/auth/users", tag = "auth", request_body = NewUser,
    responses((status = 413, description = "The body is too large", body = super::doc::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::doc::ErrorBody),
        (status = 422, description = "A field is missing, unknown or of the wrong type (`INVALID_JSON`)", body = super::doc::ErrorBody),
        (status = 201, body = UserView), (status = 400, body = super::doc::ErrorBody),
        (status = 401, body = super::doc::ErrorBody), (status = 403, body = super::doc::ErrorBody),
        (status = 409, description = "The name is taken, or the first user is not an admin", body = super::doc::ErrorBody)))]
async fn create_user(State(state): State<AppState>, Json(body): Json<NewUser>) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, axum::Json(state.auth.create_user(body).await?)))
}

/// Deletes a user; refused for the last admin.
#[utoipa::path(delete, path = "/auth/users/{username}", tag = "auth",
    params(("username" = String, Path, description = "The user's name")),
    responses((status = 204), (status = 401, body = super::doc::ErrorBody),
        (status = 403, body = super::doc::ErrorBody), (status = 404, body = super::doc::ErrorBody),
        (status = 409, description = "The last admin", body = super::doc::ErrorBody)))]
async fn delete_user(State(state): State<AppState>, Path(username): Path<String>) -> Result<StatusCode, ApiError> {
    state.auth.delete_user(&username).await?;
    Ok(StatusCode::NO_CONTENT)
}

/// Lists API keys (never the keys themselves).
#[utoipa::path(get, path = "/auth/keys", tag = "auth",
    responses((status = 200, body = [KeyView]), (status = 401, body = super::doc::ErrorBody),
        (status = 403, body = super::doc::ErrorBody)))]
async fn list_keys(State(state): State<AppState>) -> axum::Json<Vec<KeyView>> {
    axum::Json(state.auth.keys())
}

/// Creates an API key; the answer's `key` is the only time it is shown.
#[utoipa::path(post, path = "/auth/keys", tag = "auth", request_body = NewKey,
    responses((status = 413, description = "The body is too large", body = super::doc::ErrorBody),
        (status = 415, description = "The body is not `application/json`", body = super::doc::ErrorBody),
        (status = 422, description = "A field is missing, unknown or of the wrong type (`INVALID_JSON`)", body = super::doc::ErrorBody),
        (status = 201, body = KeyView), (status = 400, body = super::doc::ErrorBody),
        (status = 401, body = super::doc::ErrorBody), (status = 403, body = super::doc::ErrorBody),
        (status = 409, description = "The first credential is not an admin key", body = super::doc::ErrorBody)))]
async fn create_key(
    State(state): State<AppState>,
    Extension(principal): Extension<Principal>,
    Json(body): Json<NewKey>,
) -> Result<impl IntoResponse, ApiError> {
    Ok((StatusCode::CREATED, axum::Json(state.auth.create_key(body, &principal).await?)))
}

/// Revokes an API key at once.
#[utoipa::path(delete, path = "/auth/keys/{id}", tag = "auth",
    params(("id" = String, Path, description = "The key's id")),
    responses((status = 204), (status = 401, body = super::doc::ErrorBody),
        (status = 403, body = super::doc::ErrorBody), (status = 404, body = super::doc::ErrorBody)))]
async fn delete_key(State(state): State<AppState>, Path(id): Path<String>) -> Result<StatusCode, ApiError> {
    state.auth.delete_key(&id).await?;
    Ok(StatusCode::NO_CONTENT)
}
