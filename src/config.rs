//! Configuration: defaults < YAML file < `PADDOCK_*` environment < command-line flags.
//!
//! Loaded once at startup and passed down; no module reads the environment itself.

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub host: IpAddr,
    pub port: u16,
    /// Where paddock keeps its state.
    pub data_dir: PathBuf,
    /// Most instances running at once; starting one more stops the least recently used
    /// evictable one (after its requests finish). None = no limit.
    pub max_running_instances: Option<usize>,
    /// Seconds a `/v1` request waits for an instance it started on demand.
    pub on_demand_start_timeout: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            host: IpAddr::from([127, 0, 0, 1]),
            port: 8080,
            data_dir: default_data_dir(),
            max_running_instances: None,
            on_demand_start_timeout: 120,
        }
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
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config file {path}: {source}")]
    Parse { path: PathBuf, source: serde_yaml::Error },
    #[error("cannot create data dir {path}: {source}")]
    DataDir { path: PathBuf, source: std::io::Error },
}

impl Config {
    pub fn load(file: Option<&Path>, overrides: Overrides) -> Result<Config, ConfigError> {
        let mut config = match file {
            None => Config::default(),
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
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
        Ok(config)
    }

    /// Creates the data dir if needed.
    pub fn prepare(&self) -> Result<(), ConfigError> {
        std::fs::create_dir_all(&self.data_dir).map_err(|source| ConfigError::DataDir { path: self.data_dir.clone(), source })
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
        let c = Config::load(Some(&file), Overrides { port: Some(9100), ..Default::default() }).unwrap();
        assert_eq!(c.port, 9100);
        assert_eq!(c.host.to_string(), "0.0.0.0");
        assert_eq!(c.data_dir, default_data_dir());
    }

    #[test]
    fn unknown_keys_in_the_file_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("paddock.yaml");
        std::fs::write(&file, "prot: 9000\n").unwrap();
        let err = Config::load(Some(&file), Overrides::default()).unwrap_err().to_string();
        assert!(err.contains("unknown field `prot`"), "{err}");
    }
}
