//! A node's status: `GET /health` (timed: the latency), `GET /api/system/info` (the version) and
//! `GET /api/instances` (the counts, with the node's key), sent at once, each bounded by
//! [`PROBE_TIMEOUT`](super::PROBE_TIMEOUT).

use std::time::Instant;

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;
use utoipa::ToSchema;

use super::{unreachable, Node, Nodes, PROBE_TIMEOUT};

/// What a probe found.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum NodeHealth {
    /// It answered its health check and accepted this server's key.
    Healthy,
    /// It answered, but not as expected (an error status, a refused key); `error` says what.
    Unhealthy,
    /// No answer: refused, unresolvable, or timed out.
    Unreachable,
}

/// How many instances a node holds.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeCounts {
    pub total: usize,
    pub running: usize,
}

/// A node as `GET /api/nodes` shows it.
#[derive(Debug, Clone, Serialize, ToSchema)]
pub struct NodeStatus {
    pub name: String,
    /// Its base URL.
    pub address: String,
    pub health: NodeHealth,
    /// Round trip of its health check, in milliseconds.
    pub latency_ms: Option<f64>,
    /// The version it reports.
    pub version: Option<String>,
    /// All its instances (those placed from here and any others), when it let this server list them.
    pub instances: Option<NodeCounts>,
    /// Instances this server placed on it.
    pub placed: usize,
    /// Why it is not healthy.
    pub error: Option<String>,
    pub checked_at: DateTime<Utc>,
}

pub(super) async fn probe(nodes: &Nodes, node: &Node) -> NodeStatus {
    let get = |path: &str| nodes.request(node, reqwest::Method::GET, path, Some(PROBE_TIMEOUT)).send();
    let started = Instant::now();
    let health = async {
        let r = get("/health").await;
        (r, started.elapsed())
    };
    let info = async { json(get("/api/system/info").await).await };
    let list = async { json(get("/api/instances").await).await };
    let ((health, latency), info, list) = tokio::join!(health, info, list);
    let mut status = NodeStatus {
        name: node.name.clone(),
        address: node.address.to_string(),
        health: NodeHealth::Healthy,
        latency_ms: None,
        version: None,
        instances: None,
        placed: nodes.placed_on(&node.name),
        error: None,
        checked_at: Utc::now(),
    };
    match health {
        Err(e) => {
            status.health = NodeHealth::Unreachable;
            status.error = Some(unreachable(node, &e).to_string());
            return status;
        }
        Ok(r) if !r.status().is_success() => {
            status.health = NodeHealth::Unhealthy;
            status.error = Some(format!("its health check answered {}", r.status()));
        }
        Ok(_) => status.latency_ms = Some(latency.as_secs_f64() * 1000.0),
    }
    if let Ok(info) = info {
        status.version = info.get("version").and_then(Value::as_str).map(str::to_owned);
    }
    match list {
        Ok(list) => {
            // paddock answers {"instances": [...]}, llamactl a bare list.
            let items = list.get("instances").unwrap_or(&list).as_array().cloned().unwrap_or_default();
            let running = items.iter().filter(|i| i["status"] == "running").count();
            status.instances = Some(NodeCounts { total: items.len(), running });
        }
        Err(e) => {
            status.health = NodeHealth::Unhealthy;
            status.error.get_or_insert(format!("listing its instances failed: {e}"));
        }
    }
    status
}

/// The JSON of a successful answer, else what went wrong.
async fn json(response: reqwest::Result<reqwest::Response>) -> Result<Value, String> {
    let response = response.map_err(|e| if e.is_timeout() { "timed out".into() } else { e.to_string() })?;
    let code = response.status();
    if code == reqwest::StatusCode::UNAUTHORIZED || code == reqwest::StatusCode::FORBIDDEN {
        return Err(format!("it refused this server's api_key ({code})"));
    }
    if !code.is_success() {
        return Err(format!("it answered {code}"));
    }
    response.json().await.map_err(|e| e.to_string())
}
