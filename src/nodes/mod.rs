//! Remote nodes (llamactl's multi-node mode): other paddock (or llamactl) servers that this one
//! places instances on. An instance created with `"nodes": ["<name>"]` lives on that node; this
//! server keeps a record of it (so it is listed and routed), forwards its management calls
//! there, and proxies the `/v1` requests that name it.
//!
//! # Layout
//! - [`Nodes`]: the handle — the configured nodes, one HTTP client with short timeouts, and the
//!   records of remote instances ([`RemoteInstance`], kept in `remote-instances.json` in the
//!   data dir, written whole and atomically on each change).
//! - [`probe`]: a node's health, latency, version and instance counts.
//!
//! Nothing here waits long on a node: connections give up after [`CONNECT_TIMEOUT`], management
//! calls after [`CALL_TIMEOUT`], probes after [`PROBE_TIMEOUT`]; only streams (generations,
//! followed logs) run as long as the node sends.

mod probe;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::{Config, NodeAddress};

pub use probe::{NodeCounts, NodeHealth, NodeStatus};

/// How long opening a connection to a node may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long a management call (create, start, stop…) may take, answer included.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a health probe may take.
pub const PROBE_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a stream may go without a byte; paddock's own streams send keep-alives well within it
/// (a request that starts its instance on demand waits up to the node's `on_demand_start_timeout`).
const READ_TIMEOUT: Duration = Duration::from_secs(180);
/// The records' file in the data dir.
pub const RECORDS: &str = "remote-instances.json";

/// Errors of the node layer; `api/error.rs` maps them to responses.
#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("no node '{node}' is configured (configured: {known})")]
    Unknown { node: String, known: String },
    #[error("{0}")]
    Placement(String),
    #[error("node '{node}' ({address}) is unreachable: {reason}")]
    Unreachable { node: String, address: String, reason: String },
    #[error("an instance named '{0}' exists")]
    Exists(String),
    #[error("cannot save the remote instances' records: {0}")]
    Store(String),
}

/// One configured remote node.
#[derive(Debug, Clone)]
pub struct Node {
    pub name: String,
    pub address: NodeAddress,
    api_key: Option<String>,
}

/// The local record of an instance that lives on a node.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RemoteInstance {
    pub name: String,
    /// The node it lives on.
    pub node: String,
    pub created_at: DateTime<Utc>,
    /// The body it was created with (updates merged in), `nodes` included.
    pub spec: Value,
}

/// Cheap to clone. The records sit behind one mutex, never held across an `.await`.
#[derive(Clone)]
pub struct Nodes {
    inner: Arc<Inner>,
}

struct Inner {
    local: String,
    nodes: BTreeMap<String, Node>,
    client: reqwest::Client,
    records: parking_lot::Mutex<BTreeMap<String, RemoteInstance>>,
    /// Where the records are saved; None keeps them in memory (tests).
    path: Option<PathBuf>,
}

impl Nodes {
    /// The nodes of `config`, and the records saved in its data dir.
    pub fn open(config: &Config) -> Result<Nodes, String> {
        let path = config.data_dir.join(RECORDS);
        let records = match std::fs::read(&path) {
            Ok(bytes) => serde_json::from_slice::<Vec<RemoteInstance>>(&bytes)
                .map_err(|e| format!("invalid {}: {e}", path.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let nodes = Self::new(config, Some(path))?;
        *nodes.inner.records.lock() = records.into_iter().map(|r| (r.name.clone(), r)).collect();
        Ok(nodes)
    }

    fn new(config: &Config, path: Option<PathBuf>) -> Result<Nodes, String> {
        let nodes = config
            .nodes
            .iter()
            .filter(|(name, _)| **name != config.local_node)
            .filter_map(|(name, n)| {
                let address = n.address.clone()?;
                Some((name.clone(), Node { name: name.clone(), address, api_key: n.api_key.clone() }))
            })
            .collect();
        let client = reqwest::Client::builder()
            .connect_timeout(CONNECT_TIMEOUT)
            .read_timeout(READ_TIMEOUT)
            .build()
            .map_err(|e| format!("cannot build the nodes' HTTP client: {e}"))?;
        let inner = Inner { local: config.local_node.clone(), nodes, client, records: Default::default(), path };
        Ok(Nodes { inner: Arc::new(inner) })
    }

    /// This node's name.
    pub fn local(&self) -> &str {
        &self.inner.local
    }

    /// The configured remote nodes, by name.
    pub fn nodes(&self) -> impl Iterator<Item = &Node> {
        self.inner.nodes.values()
    }

    pub fn node(&self, name: &str) -> Result<&Node, NodeError> {
        self.inner.nodes.get(name).ok_or_else(|| NodeError::Unknown {
            node: name.into(),
            known: std::iter::once(self.inner.local.as_str())
                .chain(self.inner.nodes.keys().map(String::as_str))
                .collect::<Vec<_>>()
                .join(", "),
        })
    }

    /// Where `nodes` (an instance body's field) places an instance: None = here, else the remote
    /// node. One node at most; an unknown name is an error naming the known ones.
    pub fn placement(&self, nodes: &Value) -> Result<Option<&Node>, NodeError> {
        let names: Vec<&str> = match nodes {
            Value::Null => return Ok(None),
            Value::Array(items) => items
                .iter()
                .map(|v| v.as_str().ok_or_else(|| NodeError::Placement("nodes must be a list of node names".into())))
                .collect::<Result<_, _>>()?,
            _ => return Err(NodeError::Placement("nodes must be a list of node names".into())),
        };
        match names.as_slice() {
            [] => Ok(None),
            [name] if *name == self.inner.local => Ok(None),
            [name] => self.node(name).map(Some),
            _ => Err(NodeError::Placement(format!("nodes names {} nodes; an instance lives on one node", names.len()))),
        }
    }

    /// The record of the remote instance `name`, if it is one.
    pub fn record(&self, name: &str) -> Option<RemoteInstance> {
        self.inner.records.lock().get(name).cloned()
    }

    /// Every remote instance's record.
    pub fn records(&self) -> Vec<RemoteInstance> {
        self.inner.records.lock().values().cloned().collect()
    }

    /// How many records place instances on `node`.
    pub fn placed_on(&self, node: &str) -> usize {
        self.inner.records.lock().values().filter(|r| r.node == node).count()
    }

    /// Adds (or replaces) a record and saves them all.
    pub fn put_record(&self, record: RemoteInstance) -> Result<(), NodeError> {
        let mut records = self.inner.records.lock();
        let previous = records.insert(record.name.clone(), record.clone());
        if let Err(e) = self.save(&records) {
            match previous {
                Some(p) => records.insert(p.name.clone(), p),
                None => records.remove(&record.name),
            };
            return Err(e);
        }
        Ok(())
    }

    /// Drops a record and saves the rest.
    pub fn remove_record(&self, name: &str) -> Result<(), NodeError> {
        let mut records = self.inner.records.lock();
        if let Some(previous) = records.remove(name) {
            if let Err(e) = self.save(&records) {
                records.insert(name.into(), previous);
                return Err(e);
            }
        }
        Ok(())
    }

    /// Writes the records whole: a synced temporary file renamed over the old one. The file is
    /// small and changes only on create, update and delete, so this runs under the lock.
    fn save(&self, records: &BTreeMap<String, RemoteInstance>) -> Result<(), NodeError> {
        let Some(path) = &self.inner.path else { return Ok(()) };
        let list: Vec<&RemoteInstance> = records.values().collect();
        let bytes = serde_json::to_vec_pretty(&list).map_err(|e| NodeError::Store(e.to_string()))?;
        write_atomically(path, &bytes).map_err(|e| NodeError::Store(format!("{}: {e}", path.display())))
    }

    /// A request to `path` (with its query) on `node`, carrying the node's key. `timeout` bounds
    /// the whole call; None lets a stream run as long as bytes keep coming.
    pub fn request(
        &self,
        node: &Node,
        method: reqwest::Method,
        path: &str,
        timeout: Option<Duration>,
    ) -> reqwest::RequestBuilder {
        let mut builder = self.inner.client.request(method, node.address.join(path));
        if let Some(key) = &node.api_key {
            builder = builder.bearer_auth(key);
        }
        if let Some(t) = timeout {
            builder = builder.timeout(t);
        }
        builder
    }

    /// Sends `request` to `node`; a node that cannot be reached (or answer within the timeout)
    /// is an [`NodeError::Unreachable`] naming it.
    pub async fn send(&self, node: &Node, request: reqwest::RequestBuilder) -> Result<reqwest::Response, NodeError> {
        request.send().await.map_err(|e| unreachable(node, &e))
    }

    /// Every configured node's status, probed at once.
    pub async fn probe_all(&self) -> Vec<NodeStatus> {
        futures::future::join_all(self.nodes().map(|n| probe::probe(self, n))).await
    }

    /// One node's status.
    pub async fn probe(&self, name: &str) -> Result<NodeStatus, NodeError> {
        let node = self.node(name)?;
        Ok(probe::probe(self, node).await)
    }
}

/// The error for a failed call to `node`, with the cause's chain (reqwest's own message is
/// only "error sending request").
pub fn unreachable(node: &Node, e: &reqwest::Error) -> NodeError {
    let mut reason = if e.is_timeout() { "timed out".to_string() } else { e.to_string() };
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        reason = format!("{reason}: {s}");
        source = s.source();
    }
    NodeError::Unreachable { node: node.name.clone(), address: node.address.to_string(), reason }
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn nodes() -> Nodes {
        let config: Config = serde_yaml::from_str(
            "local_node: here\nnodes:\n  here: {address: ''}\n  w: {address: 'http://127.0.0.1:1/base/', api_key: k}\n",
        )
        .unwrap();
        config.validate().unwrap();
        Nodes::new(&config, None).unwrap()
    }

    #[test]
    fn placement_is_local_remote_or_an_error_naming_the_known_nodes() {
        let n = nodes();
        assert!(n.placement(&Value::Null).unwrap().is_none());
        assert!(n.placement(&json!([])).unwrap().is_none());
        assert!(n.placement(&json!(["here"])).unwrap().is_none());
        assert_eq!(n.placement(&json!(["w"])).unwrap().unwrap().name, "w");
        let e = n.placement(&json!(["x"])).unwrap_err().to_string();
        assert!(e.contains("'x'") && e.contains("here, w"), "{e}");
        assert!(n.placement(&json!(["w", "here"])).is_err());
        assert!(n.placement(&json!("w")).is_err());
        assert_eq!(n.node("w").unwrap().address.join("/api/instances"), "http://127.0.0.1:1/base/api/instances");
    }

    #[test]
    fn addresses_are_parsed_when_the_config_is_read() {
        for bad in ["nodes: {w: {address: 'ftp://x'}}", "nodes: {w: {address: 'not a url'}}"] {
            assert!(serde_yaml::from_str::<Config>(bad).is_err(), "{bad}");
        }
        let missing: Config = serde_yaml::from_str("nodes: {w: {api_key: k}}").unwrap();
        assert!(missing.validate().unwrap_err().contains("nodes.w.address"));
    }

    #[tokio::test]
    async fn a_node_that_is_down_is_reported_unreachable_by_name_and_quickly() {
        let n = nodes();
        let started = std::time::Instant::now();
        let status = n.probe("w").await.unwrap();
        assert_eq!(status.health, NodeHealth::Unreachable);
        assert!(status.error.unwrap().contains("127.0.0.1:1"));
        assert!(started.elapsed() < PROBE_TIMEOUT + Duration::from_secs(1));
    }
}
