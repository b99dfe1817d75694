//! Registered LoRA adapters (`/api/admin/adapters`, after seed 003): a name for a GGUF adapter
//! file, so instances attach it by id (`"lora": [{"adapter": "<id>", "scale": 1.0}]`).
//!
//! The list lives in the data dir's `adapters.json`, rewritten atomically on each change. A
//! path is taken relative to the data dir's `adapters/`, and must stay inside that directory,
//! the data dir's `models/` or a configured `model_dirs` entry, after symlinks are resolved.
//! llama.cpp loads adapters as GGUF only, so anything else is refused with the way to convert it.

use std::path::{Component, Path, PathBuf};

use chrono::{DateTime, Utc};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};

use super::download::write_atomically;
use super::gguf::{GgufFile, GgufValue};

#[derive(Debug, Clone, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Adapter {
    pub id: String,
    pub name: String,
    /// The model it was trained for (as given, else the adapter's `general.base_model.0.name`).
    pub base_model: Option<String>,
    /// From the adapter's tensors.
    pub rank: Option<u64>,
    /// `adapter.lora.alpha` in the GGUF, unless given.
    pub alpha: Option<f64>,
    /// Absolute, as resolved at registration.
    #[schema(value_type = String)]
    pub path: PathBuf,
    pub created_at: DateTime<Utc>,
}

/// `POST /api/admin/adapters`.
#[derive(Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewAdapter {
    /// [default: a new UUID]
    pub id: Option<String>,
    /// [default: the id]
    pub name: Option<String>,
    pub base_model: Option<String>,
    pub rank: Option<u64>,
    pub alpha: Option<f64>,
    /// Absolute, or relative to the data dir's `adapters/`.
    pub path: String,
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    #[error("{0}")]
    Invalid(String),
    #[error("adapter '{0}' exists already; delete it first or choose another id")]
    Exists(String),
    #[error("no adapter '{0}'; GET /api/admin/adapters lists them")]
    NotFound(String),
    #[error("{0}")]
    Io(String),
}

pub struct AdapterStore {
    file: PathBuf,
    dir: PathBuf,
    /// Where adapter files may be (canonical when they exist).
    allowed: Vec<PathBuf>,
    list: Mutex<Vec<Adapter>>,
}

impl AdapterStore {
    /// Reads the data dir's `adapters.json`; `allowed` are the directories besides `adapters/`
    /// adapter files may live in.
    pub fn open(data_dir: &Path, allowed: Vec<PathBuf>) -> Result<AdapterStore, String> {
        let file = data_dir.join("adapters.json");
        let list = match std::fs::read(&file) {
            Ok(bytes) => serde_json::from_slice(&bytes).map_err(|e| format!("{}: {e}", file.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
            Err(e) => return Err(format!("{}: {e}", file.display())),
        };
        let dir = data_dir.join("adapters");
        let allowed = std::iter::once(dir.clone()).chain(allowed).collect();
        Ok(AdapterStore { file, dir, allowed, list: Mutex::new(list) })
    }

    pub fn list(&self) -> Vec<Adapter> {
        self.list.lock().clone()
    }

    pub fn get(&self, id: &str) -> Option<Adapter> {
        self.list.lock().iter().find(|a| a.id == id).cloned()
    }

    /// Checks the file (blocking: it reads the GGUF header) and adds the adapter.
    pub fn register(&self, new: NewAdapter) -> Result<Adapter, AdapterError> {
        let id = new.id.unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
        if id.is_empty() || id.len() > 128 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
            return Err(AdapterError::Invalid(format!("id '{id}' must be 1 to 128 letters, digits, '-', '_' or '.'")));
        }
        let path = self.resolve(&new.path)?;
        let header = read_lora(&path)?;
        let adapter = Adapter {
            name: new.name.unwrap_or_else(|| id.clone()),
            base_model: new.base_model.or(header.base_model),
            rank: new.rank.or(header.rank),
            alpha: new.alpha.or(header.alpha),
            id,
            path,
            created_at: Utc::now(),
        };
        let mut list = self.list.lock();
        if list.iter().any(|a| a.id == adapter.id) {
            return Err(AdapterError::Exists(adapter.id));
        }
        let mut next = list.clone();
        next.push(adapter.clone());
        self.save(&next)?;
        *list = next;
        Ok(adapter)
    }

    /// Forgets the adapter; its file stays.
    pub fn remove(&self, id: &str) -> Result<Adapter, AdapterError> {
        let mut list = self.list.lock();
        let i = list.iter().position(|a| a.id == id).ok_or_else(|| AdapterError::NotFound(id.to_string()))?;
        let mut next = list.clone();
        let removed = next.remove(i);
        self.save(&next)?;
        *list = next;
        Ok(removed)
    }

    fn save(&self, list: &[Adapter]) -> Result<(), AdapterError> {
        let bytes = serde_json::to_vec_pretty(list).map_err(|e| AdapterError::Io(e.to_string()))?;
        write_atomically(&self.file, &bytes).map_err(|e| AdapterError::Io(format!("{}: {e}", self.file.display())))
    }

    /// The canonical path of an adapter file, if it is inside an allowed directory.
    fn resolve(&self, given: &str) -> Result<PathBuf, AdapterError> {
        let p = Path::new(given);
        if given.is_empty() || p.components().any(|c| matches!(c, Component::ParentDir)) {
            return Err(AdapterError::Invalid(format!("path '{given}' must not contain '..'")));
        }
        let full = if p.is_absolute() { p.to_path_buf() } else { self.dir.join(p) };
        let canonical = std::fs::canonicalize(&full)
            .map_err(|e| AdapterError::Invalid(format!("path '{}': {e}", full.display())))?;
        let inside =
            self.allowed.iter().filter_map(|d| std::fs::canonicalize(d).ok()).any(|d| canonical.starts_with(&d));
        if !inside {
            let dirs: Vec<String> = self.allowed.iter().map(|d| d.display().to_string()).collect();
            return Err(AdapterError::Invalid(format!(
                "path '{}' is outside the directories adapters may be in ({})",
                canonical.display(),
                dirs.join(", ")
            )));
        }
        if !canonical.is_file() {
            return Err(AdapterError::Invalid(format!("path '{}' is not a file", canonical.display())));
        }
        Ok(canonical)
    }
}

struct LoraHeader {
    base_model: Option<String>,
    rank: Option<u64>,
    alpha: Option<f64>,
}

/// Reads a LoRA adapter's GGUF header; says how to convert anything else.
fn read_lora(path: &Path) -> Result<LoraHeader, AdapterError> {
    let file = GgufFile::read(path).map_err(|e| {
        let mut magic = [0u8; 9];
        let safetensors = std::fs::File::open(path)
            .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic))
            .is_ok_and(|()| magic[8] == b'{');
        let what = if safetensors { "a safetensors file" } else { "not a GGUF file" };
        AdapterError::Invalid(format!(
            "{} is {what} ({e}); llama.cpp loads LoRA adapters as GGUF: convert it with llama.cpp's \
             convert_lora_to_gguf.py --base <base model dir> <adapter dir>",
            path.display()
        ))
    })?;
    let general_type = file.get_str("general.type");
    let adapter_type = file.get_str("adapter.type");
    if general_type != Some("adapter") || adapter_type != Some("lora") {
        return Err(AdapterError::Invalid(format!(
            "{} is a GGUF but not a LoRA adapter (general.type = {}, adapter.type = {})",
            path.display(),
            general_type.unwrap_or("none"),
            adapter_type.unwrap_or("none")
        )));
    }
    let alpha = match file.get("adapter.lora.alpha") {
        Some(GgufValue::F32(a)) => Some(*a as f64),
        Some(GgufValue::F64(a)) => Some(*a),
        _ => None,
    };
    // lora_a has ggml shape [n_in, rank].
    let rank = file.tensors.iter().find(|t| t.name.ends_with(".lora_a")).and_then(|t| t.dims.get(1).copied());
    let base_model = file.get_str("general.base_model.0.name").map(str::to_string);
    Ok(LoraHeader { base_model, rank, alpha })
}
