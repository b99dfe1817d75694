//! Configuration: defaults < YAML file < `PADDOCK_*` environment < command-line flags.
//!
//! Loaded once at startup and passed down; no module reads the environment itself.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    #[schema(value_type = String, format = "ip")]
    pub host: IpAddr,
    pub port: u16,
    /// Where paddock keeps its state.
    #[schema(value_type = String)]
    pub data_dir: PathBuf,
    /// Most instances running at once; starting one more stops the least recently used
    /// evictable one (after its requests finish). None = no limit.
    pub max_running_instances: Option<usize>,
    /// Seconds a `/v1` request waits for an instance it started on demand.
    pub on_demand_start_timeout: u64,
    /// Memory instances may hold (weights, KV caches, compute buffers), in bytes (`"12GiB"`) or as
    /// a share of the machine's RAM (`"75%"`). Starting an instance that would exceed it parks or
    /// frees others first. Default: the RAM less 10% (at least 1 GiB) for the system.
    #[schema(value_type = Option<String>, example = "75%")]
    pub memory_budget: Option<MemoryBudget>,
    /// Seconds a `/v1` request for an instance that needs another to give way waits for the
    /// instances that are serving to finish, before its start parks one anyway (drained, never
    /// cut). Requests for models that do not fit together are so served in runs, not a swap each.
    pub swap_max_wait: f64,
    /// Seconds an instance stays up before a waiting request may park it even when idle; 0 (the
    /// default) parks an idle instance at once, which a single user switching models wants. Raise
    /// it when clients send bursts with pauses between them.
    pub swap_min_resident: f64,
    /// Limits per group of instances (an instance's `group`): `{name: {max_running: N}}`.
    pub groups: std::collections::BTreeMap<String, GroupLimits>,
    /// Disk space for the cached prompts saved when instances are parked (LRU beyond it).
    #[schema(value_type = String, example = "4GiB")]
    pub kv_cache_disk_budget: ByteSize,
    pub auth: AuthConfig,
    pub rate_limits: RateLimitConfig,
    /// Origins whose pages may call the API from a browser (CORS); none by default. `"*"` = any.
    pub cors_origins: Vec<String>,
    /// Directories the model registry scans (two levels deep) besides the data dir's `models/`.
    #[schema(value_type = Vec<String>)]
    pub model_dirs: Vec<PathBuf>,
    /// The Hugging Face hub (or a mirror) models are searched and downloaded from (also `HF_ENDPOINT`).
    pub hf_endpoint: String,
    /// A hub token for gated and private repositories (also `HF_TOKEN`); never written back
    /// when paddock saves the config file.
    #[serde(skip_serializing)]
    pub hf_token: Option<String>,
    /// This node's name among `nodes` (llamactl's `local_node`): an instance placed on it
    /// (`"nodes": ["<local_node>"]`) runs here.
    pub local_node: String,
    /// Other paddock (or llamactl) servers instances may be placed on with `"nodes": ["<name>"]`:
    /// `{name: {address, api_key}}`. This server forwards those instances' management calls and
    /// `/v1` requests there. An entry without an address is this node (as in llamactl).
    pub nodes: std::collections::BTreeMap<String, NodeConfig>,
}

/// A remote node: where it listens and the key this server sends it.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct NodeConfig {
    /// Its base URL, e.g. `http://10.0.0.2:8080`; none (or empty) for the local node.
    #[schema(value_type = Option<String>, example = "http://10.0.0.2:8080")]
    #[serde(deserialize_with = "non_empty")]
    pub address: Option<NodeAddress>,
    /// A management API key (or login token) of that node, sent as `Authorization: Bearer`.
    #[serde(deserialize_with = "non_empty")]
    pub api_key: Option<String>,
}

/// A node's base URL: `http://` or `https://`, parsed when the config is read.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeAddress(reqwest::Url);

impl NodeAddress {
    /// The URL of `path` (which starts with `/`) on the node, keeping any base path.
    pub fn join(&self, path: &str) -> String {
        format!("{}{path}", self.0.as_str().trim_end_matches('/'))
    }
}

impl std::fmt::Display for NodeAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.0.as_str().trim_end_matches('/'))
    }
}

impl std::str::FromStr for NodeAddress {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let url = reqwest::Url::parse(text).map_err(|e| format!("'{text}' is not a URL: {e}"))?;
        if !matches!(url.scheme(), "http" | "https") || url.host().is_none() {
            return Err(format!("'{text}' must be an http:// or https:// URL with a host"));
        }
        if url.query().is_some() || url.fragment().is_some() {
            return Err(format!("'{text}' must not have a query or fragment"));
        }
        Ok(NodeAddress(url))
    }
}

impl Serialize for NodeAddress {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for NodeAddress {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        String::deserialize(d)?.parse().map_err(serde::de::Error::custom)
    }
}

/// An empty string is no value (llamactl writes `address: ""` for the local node).
fn non_empty<'de, D, T>(d: D) -> Result<Option<T>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: std::str::FromStr,
    T::Err: std::fmt::Display,
{
    match Option::<String>::deserialize(d)? {
        None => Ok(None),
        Some(s) if s.is_empty() => Ok(None),
        Some(s) => s.parse().map(Some).map_err(serde::de::Error::custom),
    }
}

/// What a group of instances may hold at once.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupLimits {
    /// Most instances of the group running (or starting) at once; starting one more parks
    /// the group's least recently used evictable member.
    pub max_running: usize,
}

/// Credentials. Auth is on whenever a user or API key exists, or paddock listens beyond loopback.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// The admin created at start if no user of this name exists.
    pub admin_username: String,
    /// That admin's password (also `PADDOCK_ADMIN_PASSWORD`); used only to create the user, and
    /// never written back when paddock saves the config file.
    #[serde(skip_serializing)]
    pub admin_password: Option<String>,
    /// Signs login tokens; default: a random secret kept in the data dir's `jwt-secret`.
    pub jwt_secret: Option<String>,
    /// Lifetime of a login token, in seconds.
    pub token_ttl: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { admin_username: "admin".into(), admin_password: None, jwt_secret: None, token_ttl: 86_400 }
    }
}

/// Requests allowed per identity (API key or user, else client address) and window; null or 0
/// turns a limit off.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, utoipa::ToSchema)]
#[serde(deny_unknown_fields, default)]
pub struct RateLimitConfig {
    /// Management routes.
    pub management: Option<u32>,
    /// Routes that load models or spend minutes: create, start, restart, start-all, login.
    pub heavy: Option<u32>,
    /// `/v1` and instance routes.
    pub inference: Option<u32>,
    /// The window the limits count over, in seconds (a request's allowance comes back after
    /// window / limit).
    pub window_secs: u64,
}

impl Default for RateLimitConfig {
    fn default() -> Self {
        RateLimitConfig { management: Some(100), heavy: Some(10), inference: None, window_secs: 60 }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            data_dir: default_data_dir(),
            max_running_instances: None,
            on_demand_start_timeout: 120,
            memory_budget: None,
            swap_max_wait: 30.0,
            swap_min_resident: 0.0,
            groups: Default::default(),
            kv_cache_disk_budget: ByteSize(4 << 30),
            auth: AuthConfig::default(),
            rate_limits: RateLimitConfig::default(),
            cors_origins: Vec::new(),
            model_dirs: Vec::new(),
            hf_endpoint: "https://huggingface.co".into(),
            hf_token: None,
            local_node: "main".into(),
            nodes: Default::default(),
        }
    }
}

impl Config {
    /// The memory budget in bytes on a machine with `total` bytes of RAM.
    pub fn memory_budget_bytes(&self, total: u64) -> u64 {
        match self.memory_budget {
            Some(b) => b.bytes(total),
            None => total.saturating_sub((total / 10).max(1 << 30)),
        }
    }

    /// Where the model registry looks: the data dir's `models/`, then `model_dirs`.
    pub fn model_search_dirs(&self) -> Vec<PathBuf> {
        std::iter::once(self.data_dir.join("models")).chain(self.model_dirs.iter().cloned()).collect()
    }
}

/// The platform's user data dir (e.g. `~/.local/share/paddock`), or `./paddock-data` without one.
pub fn default_data_dir() -> PathBuf {
    dirs::data_dir().map(|d| d.join("paddock")).unwrap_or_else(|| PathBuf::from("paddock-data"))
}

/// Values given on the command line or in the environment (clap merges those two).
#[derive(Debug, Clone, Default)]
pub struct Overrides {
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    pub data_dir: Option<PathBuf>,
    pub admin_password: Option<String>,
    pub hf_endpoint: Option<String>,
    pub hf_token: Option<String>,
    pub local_node: Option<String>,
}

/// A change to the configuration (`PUT /api/config`): only the keys given change; `null`
/// clears `max_running_instances`.
#[derive(Debug, Default, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ConfigPatch {
    #[schema(value_type = Option<String>, format = "ip")]
    pub host: Option<IpAddr>,
    pub port: Option<u16>,
    #[schema(value_type = Option<String>)]
    pub data_dir: Option<PathBuf>,
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<usize>)]
    pub max_running_instances: Option<Option<usize>>,
    pub on_demand_start_timeout: Option<u64>,
    #[serde(default, deserialize_with = "some")]
    #[schema(value_type = Option<String>)]
    pub memory_budget: Option<Option<MemoryBudget>>,
    pub swap_max_wait: Option<f64>,
    pub swap_min_resident: Option<f64>,
}

fn some<'de, D: serde::Deserializer<'de>, T: Deserialize<'de>>(d: D) -> Result<Option<T>, D::Error> {
    T::deserialize(d).map(Some)
}

/// Which keys of a change took effect at once and which wait for a restart of paddock.
#[derive(Debug, Default, Serialize, PartialEq)]
pub struct ChangeReport {
    pub applied: Vec<&'static str>,
    pub restart_required: Vec<&'static str>,
}

impl Config {
    /// The configuration with `patch` applied, and which changes apply live.
    pub fn patched(&self, patch: &ConfigPatch) -> Result<(Config, ChangeReport), String> {
        let mut next = self.clone();
        let mut report = ChangeReport::default();
        macro_rules! set {
            ($field:ident, $live:expr) => {
                if let Some(v) = &patch.$field {
                    if *v != next.$field {
                        next.$field = v.clone();
                        if $live {
                            report.applied.push(stringify!($field))
                        } else {
                            report.restart_required.push(stringify!($field))
                        }
                    }
                }
            };
        }
        set!(host, false);
        set!(port, false);
        set!(data_dir, false);
        set!(max_running_instances, true);
        set!(on_demand_start_timeout, true);
        set!(memory_budget, true);
        set!(swap_max_wait, true);
        set!(swap_min_resident, true);
        next.validate()?;
        Ok((next, report))
    }

    /// The configuration after re-reading the config file's `text`: the operational keys the
    /// file sets (`max_running_instances`, `on_demand_start_timeout`, `model_dirs`) apply now;
    /// other keys it sets to a new value are reported as waiting for a restart and keep their
    /// current value. Keys the file leaves out keep theirs (flags and environment stay in force).
    pub fn reloaded(&self, text: &str) -> Result<(Config, ChangeReport), String> {
        let keys: serde_yaml::Mapping = if text.trim().is_empty() {
            serde_yaml::Mapping::new()
        } else {
            serde_yaml::from_str(text).map_err(|e| e.to_string())?
        };
        let file: Config =
            if keys.is_empty() { Config::default() } else { serde_yaml::from_str(text).map_err(|e| e.to_string())? };
        file.validate()?;
        let given = |k: &str| keys.contains_key(k);
        let mut next = self.clone();
        let mut report = ChangeReport::default();
        macro_rules! live {
            ($field:ident) => {
                if given(stringify!($field)) && file.$field != self.$field {
                    next.$field = file.$field.clone();
                    report.applied.push(stringify!($field));
                }
            };
        }
        macro_rules! later {
            ($field:ident) => {
                if given(stringify!($field)) && file.$field != self.$field {
                    report.restart_required.push(stringify!($field));
                }
            };
        }
        live!(max_running_instances);
        live!(on_demand_start_timeout);
        live!(model_dirs);
        live!(memory_budget);
        live!(swap_max_wait);
        live!(swap_min_resident);
        live!(groups);
        live!(kv_cache_disk_budget);
        later!(host);
        later!(port);
        later!(data_dir);
        later!(rate_limits);
        later!(cors_origins);
        later!(hf_endpoint);
        later!(local_node);
        later!(nodes);
        // Secrets are not serialized, so compare what can be compared of auth.
        if given("auth")
            && (file.auth.admin_username != self.auth.admin_username
                || file.auth.token_ttl != self.auth.token_ttl
                || file.auth.jwt_secret != self.auth.jwt_secret)
        {
            report.restart_required.push("auth");
        }
        next.validate()?;
        Ok((next, report))
    }

    /// The configuration with its secrets masked, for showing.
    pub fn redacted(&self) -> Config {
        let mut c = self.clone();
        let mask = |s: &mut Option<String>| {
            if s.is_some() {
                *s = Some("********".into())
            }
        };
        mask(&mut c.auth.admin_password);
        mask(&mut c.auth.jwt_secret);
        mask(&mut c.hf_token);
        for node in c.nodes.values_mut() {
            mask(&mut node.api_key);
        }
        c
    }

    pub fn validate(&self) -> Result<(), String> {
        if self.auth.token_ttl == 0 {
            return Err("auth.token_ttl must be at least 1 second".into());
        }
        if self.auth.jwt_secret.as_ref().is_some_and(|s| s.len() < 32) {
            return Err("auth.jwt_secret must be at least 32 characters".into());
        }
        if self.rate_limits.window_secs == 0 {
            return Err("rate_limits.window_secs must be at least 1".into());
        }
        if !(self.hf_endpoint.starts_with("http://") || self.hf_endpoint.starts_with("https://")) {
            return Err(format!("hf_endpoint must be an http:// or https:// URL, got '{}'", self.hf_endpoint));
        }
        for (key, value) in [("swap_max_wait", self.swap_max_wait), ("swap_min_resident", self.swap_min_resident)] {
            if !(value.is_finite() && (0.0..=86_400.0).contains(&value)) {
                return Err(format!("{key} must be between 0 and 86400 seconds, got {value}"));
            }
        }
        if let Some((name, _)) = self.groups.iter().find(|(_, g)| g.max_running == 0) {
            return Err(format!("groups.{name}.max_running must be at least 1"));
        }
        if self.local_node.trim().is_empty() {
            return Err("local_node must not be empty".into());
        }
        if let Some((name, _)) =
            self.nodes.iter().find(|(name, node)| node.address.is_none() && **name != self.local_node)
        {
            return Err(format!(
                "nodes.{name}.address is missing (only the local node, local_node = '{}', has none)",
                self.local_node
            ));
        }
        if self.max_running_instances == Some(0) {
            return Err("max_running_instances must be at least 1 (or null for no limit)".into());
        }
        if self.on_demand_start_timeout == 0 || self.on_demand_start_timeout > 86_400 {
            return Err(format!(
                "on_demand_start_timeout must be between 1 and 86400 seconds, got {}",
                self.on_demand_start_timeout
            ));
        }
        Ok(())
    }

    /// Writes the configuration to `path` atomically: a temporary file in the same directory,
    /// synced, then renamed over the old one, so a crash leaves either the old or the new file.
    pub fn save(&self, path: &Path) -> std::io::Result<()> {
        use std::io::Write;
        let yaml = serde_yaml::to_string(self).map_err(std::io::Error::other)?;
        let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir)?;
        let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
        tmp.write_all(yaml.as_bytes())?;
        tmp.as_file().sync_all()?;
        tmp.persist(path).map_err(|e| e.error)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    }
}

/// The config file paddock uses when none is given: `paddock.yaml` in the data dir.
pub const DEFAULT_FILE: &str = "paddock.yaml";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("invalid configuration in {path}: {reason}")]
    Invalid { path: PathBuf, reason: String },
    #[error("cannot create data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
}

impl Config {
    /// Loads `file`, or else `paddock.yaml` in the data dir if it exists; returns the config and
    /// the file that `PUT /api/config` writes to.
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<(Config, PathBuf), ConfigError> {
        let data_dir = overrides.data_dir.clone().unwrap_or_else(default_data_dir);
        let default_file = data_dir.join(DEFAULT_FILE);
        let file = file.map(Path::to_path_buf).or_else(|| default_file.is_file().then(|| default_file.clone()));
        let config = Self::load_file(file.as_deref(), overrides)?;
        config.validate().map_err(|reason| ConfigError::Invalid { path: file.clone().unwrap_or_default(), reason })?;
        let path = file.unwrap_or_else(|| config.data_dir.join(DEFAULT_FILE));
        Ok((config, path))
    }

    fn load_file(file: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let mut config = match file {
            None => Config::default(),
            Some(path) => {
                let text =
                    std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
                if text.trim().is_empty() {
                    Config::default()
                } else {
                    serde_yaml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })?
                }
            }
        };
        if let Some(h) = overrides.host {
            config.host = h;
        }
        if let Some(p) = overrides.port {
            config.port = p;
        }
        if let Some(d) = overrides.data_dir {
            config.data_dir = d;
        }
        if let Some(p) = overrides.admin_password {
            config.auth.admin_password = Some(p);
        }
        if let Some(e) = overrides.hf_endpoint {
            config.hf_endpoint = e;
        }
        if let Some(t) = overrides.hf_token {
            config.hf_token = Some(t);
        }
        if let Some(n) = overrides.local_node {
            config.local_node = n;
        }
        Ok(config)
    }

    /// Creates the data dir if needed.
    pub fn prepare(&self) -> Result<(), ConfigError> {
        std::fs::create_dir_all(&self.data_dir)
            .map_err(|source| ConfigError::DataDir { path: self.data_dir.clone(), source })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("paddock.yaml");
        std::fs::write(&file, "port: 9000\nhost: 0.0.0.0\n").unwrap();
        let (c, path) = Config::load(Some(&file), Overrides { port: Some(9100), ..Default::default() }).unwrap();
        assert_eq!(path, file);
        assert_eq!(c.port, 9100);
        assert_eq!(c.host.to_string(), "0.0.0.0");
        assert_eq!(c.data_dir, default_data_dir());
    }

    #[test]
    fn a_reload_applies_operational_keys_and_reports_the_rest() {
        let current = Config { port: 9000, ..Default::default() };
        let (next, report) = current
            .reloaded("max_running_instances: 2\nport: 9100\nmodel_dirs: [/models]\non_demand_start_timeout: 120\n")
            .unwrap();
        assert_eq!(next.max_running_instances, Some(2));
        assert_eq!(next.model_dirs, vec![PathBuf::from("/models")]);
        assert_eq!(next.port, 9000, "a port change waits for a restart");
        assert_eq!(report.applied, vec!["max_running_instances", "model_dirs"], "unchanged keys are not reported");
        assert_eq!(report.restart_required, vec!["port"]);
        // Keys the file leaves out keep their values; a bad file changes nothing.
        let (same, report) = next.reloaded("").unwrap();
        assert_eq!((same, report), (next.clone(), ChangeReport::default()));
        assert!(next.reloaded("max_running_instances: 0").unwrap_err().contains("at least 1"));
        assert!(next.reloaded("nope: 1").is_err());
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("paddock.yaml");
        std::fs::write(&file, "prot: 9000\n").unwrap();
        let err = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("unknown field `prot`"), "{err}");
    }

    #[test]
    fn patches_report_live_and_restart_changes_and_save_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let base = Config { data_dir: dir.path().into(), ..Default::default() };
        let patch: ConfigPatch = serde_json::from_str(r#"{"port": 9001, "max_running_instances": 2}"#).unwrap();
        let (next, report) = base.patched(&patch).unwrap();
        assert_eq!(report, ChangeReport { applied: vec!["max_running_instances"], restart_required: vec!["port"] });
        let clear: ConfigPatch = serde_json::from_str(r#"{"max_running_instances": null}"#).unwrap();
        assert_eq!(next.patched(&clear).unwrap().0.max_running_instances, None);
        let zero: ConfigPatch = serde_json::from_str(r#"{"max_running_instances": 0}"#).unwrap();
        assert!(next.patched(&zero).unwrap_err().contains("at least 1"));
        let path = dir.path().join(DEFAULT_FILE);
        next.save(&path).unwrap();
        // Without --config, the data dir's paddock.yaml is read.
        let (loaded, used) =
            Config::load(None, Overrides { data_dir: Some(dir.path().into()), ..Default::default() }).unwrap();
        assert_eq!(used, path);
        assert_eq!(loaded, next);
    }
}

/// A number of bytes: a plain number, or a string with a unit (`512MiB`, `4GiB`, `1.5GB`, `800k`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl std::str::FromStr for ByteSize {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(t.len());
        let (number, unit) = t.split_at(split);
        let value: f64 = number.parse().map_err(|_| format!("'{text}' is not a size such as 512MiB or 4GiB"))?;
        let scale: f64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1.0,
            "k" | "kb" => 1e3,
            "m" | "mb" => 1e6,
            "g" | "gb" => 1e9,
            "t" | "tb" => 1e12,
            "ki" | "kib" => 1024.0,
            "mi" | "mib" => 1024.0 * 1024.0,
            "gi" | "gib" => 1024.0 * 1024.0 * 1024.0,
            "ti" | "tib" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
            other => return Err(format!("unknown size unit '{other}' in '{text}'; use B, KiB, MiB, GiB, KB, MB, GB")),
        };
        let bytes = value * scale;
        if !bytes.is_finite() || bytes > u64::MAX as f64 {
            return Err(format!("'{text}' is too large"));
        }
        Ok(ByteSize(bytes as u64))
    }
}

impl std::fmt::Display for ByteSize {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        const UNITS: [(&str, u64); 3] = [("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)];
        for (unit, size) in UNITS {
            if self.0 >= size && self.0.is_multiple_of(size) {
                return write!(f, "{}{unit}", self.0 / size);
            }
        }
        write!(f, "{}", self.0)
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => Ok(ByteSize(n)),
            NumberOrText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[derive(Deserialize)]
#[serde(untagged)]
enum NumberOrText {
    Number(u64),
    Text(String),
}

/// Bytes, or a share of the machine's RAM.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MemoryBudget {
    Bytes(ByteSize),
    /// A fraction in (0, 1].
    Share(f64),
}

impl MemoryBudget {
    pub fn bytes(self, total: u64) -> u64 {
        match self {
            MemoryBudget::Bytes(b) => b.0,
            MemoryBudget::Share(f) => (total as f64 * f) as u64,
        }
    }
}

impl std::str::FromStr for MemoryBudget {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        match text.trim().strip_suffix('%') {
            Some(p) => match p.trim().parse::<f64>() {
                Ok(p) if p > 0.0 && p <= 100.0 => Ok(MemoryBudget::Share(p / 100.0)),
                _ => Err(format!("memory_budget '{text}': a share must be between 0% and 100%")),
            },
            None => text.parse().map(MemoryBudget::Bytes),
        }
    }
}

impl Serialize for MemoryBudget {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MemoryBudget::Bytes(b) => b.serialize(s),
            MemoryBudget::Share(f) => s.serialize_str(&format!("{}%", f * 100.0)),
        }
    }
}

impl<'de> Deserialize<'de> for MemoryBudget {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        match NumberOrText::deserialize(d)? {
            NumberOrText::Number(n) => Ok(MemoryBudget::Bytes(ByteSize(n))),
            NumberOrText::Text(t) => t.parse().map_err(serde::de::Error::custom),
        }
    }
}

#[cfg(test)]
mod size_tests {
    use super::*;

    #[test]
    fn sizes_and_shares_parse_and_print_back() {
        assert_eq!("4GiB".parse::<ByteSize>().unwrap(), ByteSize(4 << 30));
        assert_eq!("1.5 GB".parse::<ByteSize>().unwrap(), ByteSize(1_500_000_000));
        assert_eq!("512".parse::<ByteSize>().unwrap(), ByteSize(512));
        assert!("4 parsecs".parse::<ByteSize>().unwrap_err().contains("unit"));
        assert!("GiB".parse::<ByteSize>().is_err());
        assert_eq!(ByteSize(4 << 30).to_string(), "4GiB");
        assert_eq!("75%".parse::<MemoryBudget>().unwrap().bytes(1000), 750);
        assert!("150%".parse::<MemoryBudget>().is_err());
        let yaml: Config = serde_yaml::from_str("memory_budget: 2GiB\nkv_cache_disk_budget: 100000").unwrap();
        assert_eq!(yaml.memory_budget, Some(MemoryBudget::Bytes(ByteSize(2 << 30))));
        assert_eq!(yaml.kv_cache_disk_budget, ByteSize(100_000));
        let back: Config = serde_yaml::from_str(&serde_yaml::to_string(&yaml).unwrap()).unwrap();
        assert_eq!(back, yaml);
        let c = Config::default();
        assert_eq!(c.memory_budget_bytes(24 << 30), (24u64 << 30) - (24u64 << 30) / 10);
        assert_eq!(c.memory_budget_bytes(4 << 30), 3 << 30);
    }
}
