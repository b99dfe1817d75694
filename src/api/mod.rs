//! The HTTP surface.
//!
//! # Layout
//! - [`instances`]: instance management (`/api/instances…`, also under `/api/v1`).
//! - [`openai`]: OpenAI-compatible routes (`/v1/…`); [`oai_output`] shapes their responses,
//!   [`params`] checks the generation fields they share with llama-server's, [`tools`] does
//!   tool calling.
//! - [`llama`]: llama-server's routes of one instance (`/api/instances/{name}/proxy/…`,
//!   `/llama-cpp/{name}/…`, and the instance's own port).
//! - [`system`]: server information and health.
//! - [`admin`]: the model registry and node routes of the admin API (`/api/admin/…`).
//! - [`auth`]: login, users and API keys; [`guard`]: the middleware that checks credentials,
//!   rights and [`limits`] on every request.
//! - [`nodes`]: the remote nodes (`/api/nodes`); [`remote`]: the middleware that sends calls
//!   and `/v1` requests for instances placed on a node there.
//! - [`ws`]: the WebSocket of live events.
//! - [`web`]: the dashboard, embedded, served at `/` (the fallback of every GET no API route takes).
//! - [`error`]: the one error → response map, and JSON extractors that use it.
//! - [`doc`]: the OpenAPI document (`/api/openapi.json`): every route module registers its
//!   routes with `utoipa_axum::routes!`, so each route carries its `#[utoipa::path]`.
//!
//! [`app`] builds the router from an [`AppState`]; [`serve`] runs it until a shutdown future
//! resolves. Both are library functions so tests can drive them on a port-0 listener.
//! [`openapi`] is the document of the routes [`app`] serves.

mod admin;
mod auth;
pub mod doc;
pub mod error;
pub mod guard;
mod hub;
pub mod instances;
pub mod limits;
pub mod llama;
mod node;
mod nodes;
pub mod oai_output;
pub mod openai;
mod params;
mod remote;
pub mod system;
mod tools;
mod web;
mod ws;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use axum::http::Uri;
use axum::Router;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use utoipa::OpenApi;
use utoipa_axum::router::OpenApiRouter;

use crate::config::Config;
use crate::instance::Registry;
use error::{ApiError, OpenAiError};

/// The instance database's file name in the data dir.
pub const DATABASE: &str = "paddock.db";

/// Shared by every handler; cheap to clone.
#[derive(Clone)]
pub struct AppState {
    pub registry: Registry,
    /// The effective configuration; `PUT /api/config` replaces it (writers also save the file).
    pub config: Arc<parking_lot::RwLock<Config>>,
    /// Where `PUT /api/config` saves the configuration.
    pub config_path: Arc<PathBuf>,
    pub started: Instant,
    pub system: system::SystemProbe,
    pub auth: crate::auth::Auth,
    pub limits: Arc<limits::RateLimits>,
    /// The local models (`/api/admin/models`), rescanned on each listing.
    pub models: crate::models::ModelStore,
    /// Downloads from the hub into the data dir's `models/`.
    pub downloads: crate::models::Downloads,
    /// Cancelled when the server shuts down: long-lived connections (WebSockets) end on it.
    pub shutdown: CancellationToken,
    /// Cancelled to ask the server to shut down (`POST /api/admin/shutdown`): instances drain
    /// and stop, then [`serve`] returns.
    pub stop: CancellationToken,
    /// Registered LoRA adapters (`/api/admin/adapters`).
    pub adapters: Arc<crate::models::adapters::AdapterStore>,
    /// The remote nodes and the records of the instances placed on them.
    pub nodes: crate::nodes::Nodes,
}

impl AppState {
    /// State whose instances live in `config.data_dir`'s database, restored from it;
    /// configuration changes are saved to `config_path`.
    pub fn open(config: Config, config_path: PathBuf) -> Result<Self, String> {
        config.prepare().map_err(|e| e.to_string())?;
        let database = config.data_dir.join(DATABASE);
        let registry = Registry::open(&database).map_err(|e| e.to_string())?;
        apply_limits(&registry, &config);
        registry.set_bind_host(config.host);
        let auth = crate::auth::Auth::open(&config.auth, &database, &config.data_dir, config.host.is_loopback())?;
        let downloads = crate::models::Downloads::new(
            config.data_dir.join("models"),
            crate::models::Hub::new(&config.hf_endpoint, config.hf_token.clone()),
        );
        registry.set_fetcher({
            let downloads = downloads.clone();
            Arc::new(move |repo, file, log| {
                let downloads = downloads.clone();
                Box::pin(async move { downloads.fetch_model(&repo, file.as_deref(), &*log).await })
            })
        });
        let adapters = crate::models::adapters::AdapterStore::open(&config.data_dir, config.model_search_dirs())?;
        let nodes = crate::nodes::Nodes::open(&config)?;
        Ok(AppState {
            nodes,
            downloads,
            adapters: Arc::new(adapters),
            stop: CancellationToken::new(),
            registry,
            auth,
            limits: Arc::new(limits::RateLimits::new(&config.rate_limits)),
            models: Default::default(),
            shutdown: CancellationToken::new(),
            config: Arc::new(parking_lot::RwLock::new(config)),
            config_path: Arc::new(config_path),
            started: Instant::now(),
            system: Default::default(),
        })
    }
}

/// The operational limits of `config` that apply live: instances running at once, the memory
/// budget, and the saved prompts' place and disk budget.
pub(crate) fn apply_limits(registry: &Registry, config: &Config) {
    registry.set_max_running(config.max_running_instances);
    registry.set_group_limits(config.groups.iter().map(|(name, g)| (name.clone(), g.max_running)).collect());
    let ram = sysinfo::System::new_with_specifics(
        sysinfo::RefreshKind::nothing().with_memory(sysinfo::MemoryRefreshKind::nothing().with_ram()),
    )
    .total_memory();
    registry.set_memory_budget(config.memory_budget_bytes(ram));
    registry.set_kv_store(config.data_dir.join("kv"), config.kv_cache_disk_budget.0);
    registry.set_swap_policy(crate::instance::SwapPolicy {
        max_wait: std::time::Duration::from_secs_f64(config.swap_max_wait),
        min_resident: std::time::Duration::from_secs_f64(config.swap_min_resident),
    });
}

pub fn app(state: AppState) -> Router {
    let cors = cors(&state.config.read().cors_origins);
    let (router, document) = documented().split_for_parts();
    DOCUMENT.get_or_init(|| doc::finish(document));
    router
        // llamactl's own prefix, so its clients work unchanged.
        .nest("/api/v1", management().into())
        .nest("/api/v1/instances/{name}/proxy", proxied().into())
        .nest("/llama-cpp/{name}", proxied().into())
        .fallback(web::fallback)
        // Inside the guard: calls for instances on remote nodes go there once the caller is checked.
        .layer(axum::middleware::from_fn_with_state(state.clone(), remote::forward))
        .layer(axum::middleware::from_fn_with_state(state.clone(), guard::authorize))
        .layer(axum::middleware::from_fn(guard::challenge))
        .layer(cors)
        .with_state(state)
}

/// Cross-origin access for the configured origins only (none by default: browsers then keep
/// other sites' pages from calling the API).
fn cors(origins: &[String]) -> tower_http::cors::CorsLayer {
    use axum::http::{header, HeaderName, HeaderValue, Method};
    use tower_http::cors::{AllowOrigin, CorsLayer};
    let allow = if origins.iter().any(|o| o == "*") {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins.iter().filter_map(|o| HeaderValue::from_str(o).ok()))
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([header::AUTHORIZATION, header::CONTENT_TYPE])
        .expose_headers([
            HeaderName::from_static("x-ratelimit-limit"),
            HeaderName::from_static("x-ratelimit-remaining"),
            HeaderName::from_static("x-ratelimit-reset"),
            header::RETRY_AFTER,
        ])
}

/// The canonical paths, documented. [`app`] adds the aliases, which serve the same handlers
/// undocumented (the document's description names them).
fn documented() -> OpenApiRouter<AppState> {
    OpenApiRouter::with_openapi(doc::ApiDoc::openapi())
        .nest("/api", management())
        .nest(doc::PROXY_PREFIX, proxied())
        .nest("/v1", openai::routes().fallback(openai_not_found))
        .merge(system::root_routes())
}

fn management() -> OpenApiRouter<AppState> {
    instances::routes()
        .merge(system::routes())
        .merge(doc::routes())
        .merge(auth::routes())
        .merge(ws::routes())
        .merge(admin::routes())
        .merge(hub::routes())
        .merge(node::routes())
        .merge(nodes::routes())
}

/// llama-server's routes of one instance, where llamactl proxies them.
fn proxied() -> OpenApiRouter<AppState> {
    llama::routes().fallback(openai_not_found).layer(axum::middleware::from_fn(llama::pin_from_path))
}

static DOCUMENT: OnceLock<serde_json::Value> = OnceLock::new();

/// The OpenAPI document of the routes [`app`] serves, made once.
pub fn openapi() -> &'static serde_json::Value {
    DOCUMENT.get_or_init(|| doc::finish(documented().into_openapi()))
}

async fn openai_not_found(uri: Uri) -> OpenAiError {
    OpenAiError(ApiError::not_found(format!("Unknown endpoint {}", uri.path())))
}

/// Serves `app(state)` on `listener` until `shutdown` resolves, then waits for open
/// connections (streams end when their instances stop).
pub async fn serve(
    listener: TcpListener,
    state: AppState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    state.registry.spawn_supervisor();
    tokio::spawn(serve_instance_ports(state.clone()));
    let registry = state.registry.clone();
    tokio::spawn(async move { registry.resume().await });
    state.downloads.resume_interrupted();
    let token = state.shutdown.clone();
    let (stop, registry) = (state.stop.clone(), state.registry.clone());
    let shutdown = async move {
        tokio::select! {
            _ = shutdown => {}
            _ = stop.cancelled() => {
                registry.stop_all(crate::instance::StopMode::default()).await;
            }
        }
        token.cancel();
    };
    let app = app(state).into_make_service_with_connect_info::<SocketAddr>();
    axum::serve(listener, app).with_graceful_shutdown(shutdown).await
}

/// Serves each running instance's own `port` (when it has one) with the routes a llama-server
/// would answer there, pinned to that instance, until the instance leaves `running`; the port
/// is then closed. The registry binds the port at start, so a port in use fails the start.
async fn serve_instance_ports(state: AppState) {
    let mut events = state.registry.subscribe();
    loop {
        let change = match events.recv().await {
            Ok(crate::instance::RegistryEvent::Status(change)) => change,
            Ok(_) | Err(tokio::sync::broadcast::error::RecvError::Lagged(_)) => continue,
            Err(tokio::sync::broadcast::error::RecvError::Closed) => return,
        };
        if change.status != crate::instance::Status::Running {
            continue;
        }
        let Some((listener, mut status)) = state.registry.take_port(&change.name) else { continue };
        let router = Router::from(llama::routes())
            .fallback(openai_not_found)
            .layer(axum::middleware::from_fn_with_state(state.clone(), guard::authorize_port))
            .layer(axum::middleware::from_fn(guard::challenge))
            // Outermost, so the guard sees which instance the port belongs to.
            .layer(axum::Extension(openai::Pinned(change.name.as_str().into())))
            .with_state(state.clone())
            .into_make_service_with_connect_info::<SocketAddr>();
        tokio::spawn(async move {
            let listener = match listener.set_nonblocking(true).and_then(|()| TcpListener::from_std(listener)) {
                Ok(l) => l,
                Err(e) => return tracing::error!(instance = %change.name, "cannot serve the instance's port: {e}"),
            };
            let stopped = async move {
                let _ = status.wait_for(|s| *s != crate::instance::Status::Running).await;
            };
            if let Err(e) = axum::serve(listener, router).with_graceful_shutdown(stopped).await {
                tracing::error!(instance = %change.name, "instance port failed: {e}");
            }
        });
    }
}
