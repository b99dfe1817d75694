//! The remote nodes (`/api/nodes`): each configured node with its health, latency, version and
//! instance counts, probed at once with short timeouts. Forwarding to nodes is [`super::remote`].

use axum::extract::State;
use axum::response::IntoResponse;
use serde::Serialize;
use utoipa::ToSchema;
use utoipa_axum::router::OpenApiRouter;
use utoipa_axum::routes;

use super::doc::ErrorBody;
use super::error::{ApiError, Path};
use super::AppState;
use crate::nodes::NodeStatus;

pub fn routes() -> OpenApiRouter<AppState> {
    OpenApiRouter::new().routes(routes!(list_nodes)).routes(routes!(get_node))
}

#[derive(Serialize, ToSchema)]
pub struct NodeList {
    /// This node's name (config `local_node`); instances placed on it run here.
    local_node: String,
    /// The remote nodes, by name.
    nodes: Vec<NodeStatus>,
}

/// The remote nodes, each probed now (all at once; a node that does not answer within a few
/// seconds is `unreachable`).
#[utoipa::path(get, path = "/nodes", operation_id = "list_nodes", tag = "nodes",
    responses(
        (status = 200, description = "The nodes and their status", body = NodeList),
        (status = 401, description = "No or invalid credentials", body = ErrorBody),
    ))]
async fn list_nodes(State(state): State<AppState>) -> impl IntoResponse {
    let nodes = state.nodes.probe_all().await;
    axum::Json(NodeList { local_node: state.nodes.local().to_owned(), nodes })
}

/// One remote node, probed now.
#[utoipa::path(get, path = "/nodes/{name}", operation_id = "get_node", tag = "nodes",
    params(("name" = String, Path, description = "The node's name in the config's `nodes`")),
    responses(
        (status = 200, description = "The node's status", body = NodeStatus),
        (status = 400, description = "No such node is configured (`UNKNOWN_NODE`)", body = ErrorBody),
        (status = 401, description = "No or invalid credentials", body = ErrorBody),
    ))]
async fn get_node(State(state): State<AppState>, Path(name): Path<String>) -> Result<impl IntoResponse, ApiError> {
    Ok(axum::Json(state.nodes.probe(&name).await?))
}
