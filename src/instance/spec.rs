//! What an instance is configured to be: its model source, options and supervision policy.
//! This is what the store persists (as JSON) and what PUT changes.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::options::InstanceOptions;

/// Where the model comes from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(untagged)]
pub enum ModelSource {
    Path {
        #[schema(value_type = String)]
        model_path: PathBuf,
    },
    /// Resolved by the model store once it exists; until then such an instance cannot start.
    HuggingFace {
        hf_repo: String,
        #[serde(default, skip_serializing_if = "Option::is_none")]
        hf_file: Option<String>,
    },
}

/// How the supervisor treats the instance. Defaults as llamactl's.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default, deny_unknown_fields)]
pub struct Policy {
    /// Restart an engine that dies or fails to load.
    pub auto_restart: bool,
    pub max_restarts: u32,
    /// Seconds between automatic restarts.
    pub restart_delay: f64,
    /// A `/v1` request for the stopped instance starts it.
    pub on_demand_start: bool,
    /// Minutes without inference traffic before the instance is stopped; 0 = never.
    pub idle_timeout: f64,
    /// Whether it may be parked to make room for another (`max_running_instances`, the memory
    /// budget, a group's `max_running`).
    pub evictable: bool,
    /// The group it counts in (config `groups: {name: {max_running}}`); none by default.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

impl Default for Policy {
    fn default() -> Self {
        Policy {
            auto_restart: true,
            max_restarts: 3,
            restart_delay: 5.0,
            on_demand_start: true,
            idle_timeout: 0.0,
            evictable: true,
            group: None,
        }
    }
}

/// A partial policy, as PUT and both create forms carry it.
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyPatch {
    pub auto_restart: Option<bool>,
    pub max_restarts: Option<u32>,
    pub restart_delay: Option<f64>,
    pub on_demand_start: Option<bool>,
    pub idle_timeout: Option<f64>,
    pub evictable: Option<bool>,
    /// `""` leaves its group.
    pub group: Option<String>,
}

impl Policy {
    pub fn apply(&mut self, p: &PolicyPatch) {
        macro_rules! take {
            ($($f:ident),*) => { $( if let Some(v) = p.$f { self.$f = v; } )* };
        }
        take!(auto_restart, max_restarts, restart_delay, on_demand_start, idle_timeout, evictable);
        if let Some(g) = &p.group {
            self.group = (!g.is_empty()).then(|| g.clone());
        }
    }

    pub fn validate(&self) -> Result<(), String> {
        if !(self.restart_delay.is_finite() && (0.0..=86_400.0).contains(&self.restart_delay)) {
            return Err(format!("restart_delay must be between 0 and 86400 seconds, got {}", self.restart_delay));
        }
        if !(self.idle_timeout.is_finite() && self.idle_timeout >= 0.0) {
            return Err(format!(
                "idle_timeout must be 0 (never) or a positive number of minutes, got {}",
                self.idle_timeout
            ));
        }
        if let Some(g) = &self.group {
            if g.len() > 64 || g.chars().any(char::is_control) {
                return Err(format!("group must be a name of at most 64 characters, got '{g}'"));
            }
        }
        if self.max_restarts > 1000 {
            return Err(format!("max_restarts must be at most 1000, got {}", self.max_restarts));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InstanceSpec {
    pub name: String,
    #[serde(flatten)]
    pub source: ModelSource,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default)]
    pub options: InstanceOptions,
    #[serde(default)]
    pub policy: Policy,
}

impl InstanceSpec {
    pub fn model_path(&self) -> Option<&PathBuf> {
        match &self.source {
            ModelSource::Path { model_path } => Some(model_path),
            ModelSource::HuggingFace { .. } => None,
        }
    }
}

/// A change to an instance (PUT): every field optional.
#[derive(Debug, Clone, Default)]
pub struct SpecPatch {
    pub source: Option<ModelSource>,
    pub port: Option<u16>,
    pub options: InstanceOptions,
    pub policy: PolicyPatch,
}

impl SpecPatch {
    pub fn apply_to(&self, spec: &mut InstanceSpec) {
        if let Some(source) = &self.source {
            spec.source = source.clone();
        }
        if self.port.is_some() {
            spec.port = self.port;
        }
        spec.options.merge(&self.options);
        spec.policy.apply(&self.policy);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_through_json() {
        let spec = InstanceSpec {
            name: "a".into(),
            source: ModelSource::HuggingFace { hf_repo: "org/repo".into(), hf_file: Some("x.gguf".into()) },
            port: Some(9000),
            options: InstanceOptions { threads: Some(2), ..Default::default() },
            policy: Policy { idle_timeout: 1.5, ..Default::default() },
        };
        let json = serde_json::to_value(&spec).unwrap();
        assert_eq!(json["hf_repo"], "org/repo");
        assert_eq!(serde_json::from_value::<InstanceSpec>(json).unwrap(), spec);
        let path = serde_json::json!({ "name": "b", "model_path": "/m.gguf" });
        let spec: InstanceSpec = serde_json::from_value(path).unwrap();
        assert_eq!(spec.model_path().unwrap().to_str(), Some("/m.gguf"));
        assert_eq!(spec.policy, Policy::default());
    }

    #[test]
    fn patches_change_only_what_they_name() {
        let mut spec: InstanceSpec =
            serde_json::from_value(serde_json::json!({ "name": "b", "model_path": "/m.gguf" })).unwrap();
        let patch = SpecPatch {
            options: InstanceOptions { context_size: Some(4096), ..Default::default() },
            policy: PolicyPatch { auto_restart: Some(false), ..Default::default() },
            ..Default::default()
        };
        patch.apply_to(&mut spec);
        assert_eq!(spec.options.context_size, Some(4096));
        assert!(!spec.policy.auto_restart);
        assert_eq!(spec.policy.max_restarts, 3);
        assert_eq!(spec.model_path().unwrap().to_str(), Some("/m.gguf"));
    }

    #[test]
    fn bad_policy_values_are_named() {
        let p = Policy { restart_delay: -1.0, ..Default::default() };
        assert!(p.validate().unwrap_err().contains("restart_delay"));
        let p = Policy { idle_timeout: f64::NAN, ..Default::default() };
        assert!(p.validate().unwrap_err().contains("idle_timeout"));
    }
}
