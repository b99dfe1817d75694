//! The one map from errors to HTTP responses.
//!
//! Management routes answer `{"error","code","details"}` (llamactl's format); `/v1` routes answer
//! OpenAI's `{"error":{"message","type","param","code"}}`, which its clients parse. Both come
//! from the same [`ApiError`], so a status code is decided in one place.

use axum::extract::rejection::{JsonRejection, PathRejection, QueryRejection, RawPathParamsRejection};
use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::engine::EngineError;
use crate::instance::InstanceError;

#[derive(Debug, Clone)]
pub struct ApiError {
    pub status: StatusCode,
    /// Stable machine-readable code, e.g. `INSTANCE_NOT_FOUND`.
    pub code: &'static str,
    pub message: String,
    pub details: String,
    /// The request field at fault, when there is one (OpenAI's `param`).
    pub param: Option<&'static str>,
}

impl ApiError {
    pub fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        ApiError { status, code, message: message.into(), details: String::new(), param: None }
    }

    pub fn bad_request(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "INVALID_REQUEST", message)
    }

    pub fn with_details(mut self, details: impl Into<String>) -> Self {
        self.details = details.into();
        self
    }

    pub fn with_param(mut self, param: &'static str) -> Self {
        self.param = Some(param);
        self
    }

    pub fn not_found(what: impl Into<String>) -> Self {
        Self::new(StatusCode::NOT_FOUND, "NOT_FOUND", what)
    }

    fn log_if_internal(&self) {
        if self.status == StatusCode::INTERNAL_SERVER_ERROR {
            tracing::error!(code = self.code, details = %self.details, "{}", self.message);
        }
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.log_if_internal();
        let details = if self.status == StatusCode::INTERNAL_SERVER_ERROR { String::new() } else { self.details };
        let body = json!({ "error": self.message, "code": self.code, "details": details });
        (self.status, axum::Json(body)).into_response()
    }
}

/// The same error, in OpenAI's shape.
#[derive(Debug)]
pub struct OpenAiError(pub ApiError);

impl From<ApiError> for OpenAiError {
    fn from(e: ApiError) -> Self {
        OpenAiError(e)
    }
}

impl OpenAiError {
    pub fn body(&self) -> serde_json::Value {
        let e = &self.0;
        let kind = match e.status {
            StatusCode::UNAUTHORIZED => "authentication_error",
            StatusCode::FORBIDDEN => "permission_error",
            StatusCode::NOT_FOUND => "invalid_request_error",
            StatusCode::TOO_MANY_REQUESTS => "rate_limit_error",
            s if s.is_server_error() => "server_error",
            _ => "invalid_request_error",
        };
        let mut message = e.message.clone();
        if !e.details.is_empty() && !e.status.is_server_error() {
            message = format!("{message}: {}", e.details);
        }
        // OpenAI's shape, plus paddock's `code` and `details` at the top level, so every error
        // has the fields the rest of the API promises.
        let details = if e.status.is_server_error() { "" } else { e.details.as_str() };
        json!({
            "error": { "message": message, "type": kind, "param": e.param, "code": e.code.to_ascii_lowercase() },
            "code": e.code,
            "details": details,
        })
    }
}

impl IntoResponse for OpenAiError {
    fn into_response(self) -> Response {
        self.0.log_if_internal();
        (self.0.status, axum::Json(self.body())).into_response()
    }
}

impl From<InstanceError> for ApiError {
    fn from(e: InstanceError) -> Self {
        use InstanceError::*;
        let (status, code) = match &e {
            NotFound(_) => (StatusCode::NOT_FOUND, "INSTANCE_NOT_FOUND"),
            AlreadyExists(_) => (StatusCode::CONFLICT, "INSTANCE_EXISTS"),
            InvalidName(_) => (StatusCode::BAD_REQUEST, "INVALID_NAME"),
            InvalidOptions(_) => (StatusCode::BAD_REQUEST, "INVALID_OPTIONS"),
            ModelNotFound(_) => (StatusCode::BAD_REQUEST, "MODEL_NOT_FOUND"),
            Transition { .. } => (StatusCode::CONFLICT, "INVALID_STATE"),
            NotRunning { .. } => (StatusCode::SERVICE_UNAVAILABLE, "INSTANCE_NOT_RUNNING"),
            Busy { .. } => (StatusCode::CONFLICT, "INSTANCE_RUNNING"),
            ModelNotAvailable { .. } => (StatusCode::CONFLICT, "MODEL_NOT_AVAILABLE"),
            StartFailed { .. } => (StatusCode::SERVICE_UNAVAILABLE, "MODEL_LOAD_FAILED"),
            StartTimeout { .. } => (StatusCode::SERVICE_UNAVAILABLE, "START_TIMEOUT"),
            NoCapacity(_) => (StatusCode::CONFLICT, "NO_CAPACITY"),
            InsufficientMemory { .. } => (StatusCode::CONFLICT, "INSUFFICIENT_MEMORY"),
            Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "STORE_ERROR"),
            InvalidModel { .. } => (StatusCode::BAD_REQUEST, "INVALID_MODEL"),
            PortInUse { .. } => (StatusCode::CONFLICT, "PORT_IN_USE"),
        };
        let message = match &e {
            NotFound(_) => "Instance not found",
            AlreadyExists(_) => "Instance already exists",
            InvalidName(_) => "Invalid instance name",
            InvalidOptions(_) => "Invalid instance options",
            ModelNotFound(_) => "Model file not found",
            Transition { .. } => "Operation not allowed in the instance's current state",
            NotRunning { .. } => "Instance is not running",
            Busy { .. } => "Instance is running",
            ModelNotAvailable { .. } => "Model not available",
            StartFailed { .. } => "Model failed to load",
            StartTimeout { .. } => "Instance did not become ready in time",
            NoCapacity(_) => "No room to start the instance",
            InsufficientMemory { .. } => "Not enough memory within memory_budget to start the instance",
            Store(_) => "Could not persist the change",
            InvalidModel { .. } => "The model file is not a valid GGUF",
            PortInUse { .. } => "The instance's port is in use",
        };
        let details = match e {
            // The arithmetic: what it needs, the budget, and what holds it.
            InsufficientMemory { details, .. } => details,
            e => e.to_string(),
        };
        ApiError::new(status, code, message).with_details(details)
    }
}

impl From<crate::nodes::NodeError> for ApiError {
    fn from(e: crate::nodes::NodeError) -> Self {
        use crate::nodes::NodeError::*;
        let (status, code, message) = match &e {
            Unknown { .. } => (StatusCode::BAD_REQUEST, "UNKNOWN_NODE", "Unknown node".to_string()),
            Placement(_) => (StatusCode::BAD_REQUEST, "INVALID_NODES", "Invalid nodes".to_string()),
            Unreachable { node, .. } => {
                (StatusCode::BAD_GATEWAY, "NODE_UNAVAILABLE", format!("Node '{node}' is unavailable"))
            }
            Exists(_) => (StatusCode::CONFLICT, "INSTANCE_EXISTS", "Instance already exists".to_string()),
            Store(_) => (StatusCode::INTERNAL_SERVER_ERROR, "STORE_ERROR", "Could not persist the change".to_string()),
        };
        ApiError::new(status, code, message).with_details(e.to_string())
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> Self {
        use EngineError::*;
        let (status, code, message) = match &e {
            PromptTooLong { .. } => {
                (StatusCode::BAD_REQUEST, "CONTEXT_LENGTH_EXCEEDED", "The prompt does not fit the context")
            }
            EmptyPrompt => (StatusCode::BAD_REQUEST, "EMPTY_PROMPT", "The prompt is empty"),
            InvalidToken { .. } => (StatusCode::BAD_REQUEST, "INVALID_TOKEN", "Invalid token id in the prompt"),
            Overloaded { .. } => (StatusCode::SERVICE_UNAVAILABLE, "OVERLOADED", "The instance is overloaded"),
            Stopped => (StatusCode::SERVICE_UNAVAILABLE, "INSTANCE_NOT_RUNNING", "Instance is not running"),
            Load { .. } | LoraLoad { .. } | LoadCancelled | Config(_) | Rpc(_) => {
                (StatusCode::INTERNAL_SERVER_ERROR, "ENGINE_ERROR", "Engine error")
            }
            Crashed(_) => (StatusCode::SERVICE_UNAVAILABLE, "ENGINE_CRASHED", "The instance's engine died"),
            Decode(_) | IncompleteGeneration => {
                (StatusCode::INTERNAL_SERVER_ERROR, "GENERATION_FAILED", "Generation failed")
            }
            InvalidGrammar(_) => (StatusCode::BAD_REQUEST, "INVALID_GRAMMAR", "The grammar is invalid"),
            InvalidLora(_) => (StatusCode::BAD_REQUEST, "INVALID_LORA", "Invalid LoRA adapter scales"),
            NoSuchSlot { .. } => (StatusCode::BAD_REQUEST, "INVALID_SLOT", "No such slot"),
            SlotBusy(_) => (StatusCode::CONFLICT, "SLOT_BUSY", "The slot is processing a request"),
            SlotFile(_) => (StatusCode::BAD_REQUEST, "SLOT_FILE", "The slot state could not be saved or restored"),
            EmbeddingsDisabled => (StatusCode::BAD_REQUEST, "EMBEDDINGS_DISABLED", "Embeddings are not enabled"),
            EmbeddingInputTooLong { .. } => {
                (StatusCode::BAD_REQUEST, "INPUT_TOO_LONG", "An embedding input is too long")
            }
        };
        ApiError::new(status, code, message).with_details(e.to_string())
    }
}

fn json_rejection(rejection: JsonRejection) -> ApiError {
    ApiError::new(rejection.status(), "INVALID_JSON", "Invalid request body").with_details(rejection.body_text())
}

/// `axum::Json`, but a bad body becomes an [`ApiError`] in our format.
pub struct Json<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for Json<T> {
    type Rejection = ApiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        axum::Json::<T>::from_request(req, state).await.map(|axum::Json(v)| Json(v)).map_err(json_rejection)
    }
}

/// JSON body for `/v1` and llama-server routes: a bad body becomes an OpenAI error. Like
/// llama-server, it does not insist on a JSON `Content-Type` (`curl -d` sends a form type).
pub struct OaiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for OaiJson<T> {
    type Rejection = OpenAiError;
    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let invalid = |status: StatusCode, details: String| {
            OpenAiError(ApiError::new(status, "INVALID_JSON", "Invalid request body").with_details(details))
        };
        let bytes =
            axum::body::Bytes::from_request(req, state).await.map_err(|e| invalid(e.status(), e.body_text()))?;
        let mut de = serde_json::Deserializer::from_slice(&bytes);
        let value = serde_path_to_error::deserialize(&mut de).map_err(|e| {
            let status = if e.inner().is_syntax() || e.inner().is_eof() {
                StatusCode::BAD_REQUEST
            } else {
                StatusCode::UNPROCESSABLE_ENTITY
            };
            let path = e.path().to_string();
            let details = if path == "." { e.inner().to_string() } else { format!("{path}: {}", e.inner()) };
            invalid(status, details)
        })?;
        de.end().map_err(|e| invalid(StatusCode::BAD_REQUEST, e.to_string()))?;
        Ok(OaiJson(value))
    }
}

fn query_rejection(rejection: QueryRejection) -> ApiError {
    ApiError::new(rejection.status(), "INVALID_QUERY", "Invalid query string").with_details(rejection.body_text())
}

/// `axum::extract::Query`, but a bad query string becomes an [`ApiError`] in our format.
pub struct Query<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for Query<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state).await.map(|q| Query(q.0)).map_err(query_rejection)
    }
}

/// [`Query`] for `/v1` and llama-server routes: a bad query string becomes an OpenAI error.
pub struct OaiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for OaiQuery<T> {
    type Rejection = OpenAiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let query = axum::extract::Query::<T>::from_request_parts(parts, state).await;
        query.map(|q| OaiQuery(q.0)).map_err(|e| OpenAiError(query_rejection(e)))
    }
}

/// `axum::extract::Path`, but a path segment that does not decode (e.g. invalid UTF-8) becomes
/// an [`ApiError`] in our format.
pub struct Path<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for Path<T> {
    type Rejection = ApiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state).await.map(|p| Path(p.0)).map_err(
            |e: PathRejection| ApiError::new(e.status(), "INVALID_PATH", "Invalid path").with_details(e.body_text()),
        )
    }
}

/// `axum::extract::RawPathParams` for llama-server routes: a bad path is an OpenAI error.
pub struct OaiRawPathParams(pub axum::extract::RawPathParams);

impl<S: Send + Sync> FromRequestParts<S> for OaiRawPathParams {
    type Rejection = OpenAiError;
    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        let params = axum::extract::RawPathParams::from_request_parts(parts, state).await;
        params.map(OaiRawPathParams).map_err(|e: RawPathParamsRejection| {
            OpenAiError(ApiError::new(e.status(), "INVALID_PATH", "Invalid path").with_details(e.body_text()))
        })
    }
}
