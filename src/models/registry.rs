//! The local model registry: every GGUF under the data dir's `models/` and the configured
//! `model_dirs`, read from its header only (milliseconds, even for large models).
//!
//! A split GGUF (`name-00001-of-00003.gguf`, …) is one model whose parts are its shards; the
//! registry says which parts are present. [`ModelStore`] is the handle: it keeps the last scan,
//! and a rescan re-reads only files whose size or modification time changed.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::SystemTime;

use parking_lot::RwLock;
use serde::Serialize;

use super::gguf::{GgufFile, GgufValue};
use super::memory::{footprint, Layout, Shape};

/// A model as the registry lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Model {
    /// The file name without `.gguf` (and without the split suffix); unique in the registry.
    pub id: String,
    /// `general.name`, else the id.
    pub name: String,
    /// The model's file (the first part of a split model).
    #[schema(value_type = String)]
    pub path: PathBuf,
    /// Bytes on disk, of the parts present.
    pub size_bytes: u64,
    pub architecture: Option<String>,
    /// Whether the llama.cpp linked into paddock knows the architecture.
    pub architecture_supported: bool,
    /// Weights in the model (every part's tensors), when every part is present.
    pub parameter_count: Option<u64>,
    /// From `general.file_type` (e.g. `Q4_K_M`).
    pub quantization: Option<String>,
    /// The context the model was trained with.
    pub context_length: Option<u64>,
    /// The model's files: one for a plain GGUF, each part of a split one.
    pub shards: Vec<Shard>,
    /// Every part is present and the headers read.
    pub complete: bool,
    /// Where it came from: a local file, or a download from a repository.
    pub source: Source,
    /// `Local` (found on disk) or `Downloaded` (paddock fetched it; see `source`).
    pub trust_level: &'static str,
    /// Why the header could not be read, for a corrupt or truncated file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(skip)]
    pub(crate) shape: Option<Shape>,
}

#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Shard {
    /// 0-based part number.
    pub index: u32,
    pub filename: String,
    pub present: bool,
    pub size_bytes: u64,
}

/// Where a model came from, as recorded beside it (`<file>.source.json`) by downloads.
#[derive(Debug, Clone, Default, Serialize, serde::Deserialize, utoipa::ToSchema)]
pub struct Source {
    /// `local` or `huggingface`.
    pub kind: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub repo_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub filename: Option<String>,
}

/// Memory a model needs at a context size, one slot (see [`super::memory`]), in bytes.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct MemoryEstimate {
    pub context: u64,
    pub weights_bytes: u64,
    pub kv_bytes: u64,
    pub compute_bytes: u64,
    pub total_bytes: u64,
    pub total_mb: u64,
}

impl Model {
    pub fn estimate(&self, context: u64) -> Option<MemoryEstimate> {
        let shape = self.shape.as_ref()?;
        let f = footprint(shape, Layout { n_ctx: context, n_parallel: 1, n_ubatch: crate::engine::DEFAULT_UBATCH as u64, remote_layers: 0 });
        Some(MemoryEstimate {
            context,
            weights_bytes: f.weights,
            kv_bytes: f.kv,
            compute_bytes: f.compute,
            total_bytes: f.total(),
            total_mb: f.total().div_ceil(1 << 20),
        })
    }

    /// Every file of the model that exists.
    pub fn present_files(&self) -> impl Iterator<Item = PathBuf> + '_ {
        let dir = self.path.parent().map(Path::to_path_buf).unwrap_or_default();
        self.shards.iter().filter(|s| s.present).map(move |s| dir.join(&s.filename))
    }

    /// Whether `path` is one of the model's files.
    pub fn has_file(&self, path: &Path) -> bool {
        let canonical = |p: &Path| std::fs::canonicalize(p).unwrap_or_else(|_| p.to_path_buf());
        let wanted = canonical(path);
        self.present_files().any(|f| canonical(&f) == wanted)
    }
}

/// The name llama.cpp gives a `general.file_type` (`enum llama_ftype`).
pub fn quantization_name(file_type: u64) -> Option<&'static str> {
    Some(match file_type {
        0 => "F32",
        1 => "F16",
        2 => "Q4_0",
        3 => "Q4_1",
        7 => "Q8_0",
        8 => "Q5_0",
        9 => "Q5_1",
        10 => "Q2_K",
        11 => "Q3_K_S",
        12 => "Q3_K_M",
        13 => "Q3_K_L",
        14 => "Q4_K_S",
        15 => "Q4_K_M",
        16 => "Q5_K_S",
        17 => "Q5_K_M",
        18 => "Q6_K",
        19 => "IQ2_XXS",
        20 => "IQ2_XS",
        21 => "Q2_K_S",
        22 => "IQ3_XS",
        23 => "IQ3_XXS",
        24 => "IQ1_S",
        25 => "IQ4_NL",
        26 => "IQ3_S",
        27 => "IQ3_M",
        28 => "IQ2_S",
        29 => "IQ2_M",
        30 => "IQ4_XS",
        31 => "IQ1_M",
        32 => "BF16",
        36 => "TQ1_0",
        37 => "TQ2_0",
        38 => "MXFP4_MOE",
        _ => return None,
    })
}

/// The quantization a file name says (`model-Q4_K_M.gguf` → `Q4_K_M`), for files not yet
/// downloaded: the longest known name found as a `-`, `.` or `_` separated suffix of the stem.
pub fn quantization_from_name(stem: &str) -> Option<&'static str> {
    let upper = stem.to_ascii_uppercase();
    (0..64u64)
        .filter_map(quantization_name)
        .filter(|q| {
            upper.match_indices(q).any(|(i, _)| {
                let before = upper[..i].chars().last();
                let after = upper[i + q.len()..].chars().next();
                matches!(before, Some('-' | '.' | '_')) && matches!(after, None | Some('-' | '.'))
            })
        })
        .max_by_key(|q| q.len())
}

/// The memory arithmetic's inputs for the model whose (first) file is `path`; a split model's
/// tensors are counted over all its parts. Reads headers only; blocking.
pub fn shape_of(path: &Path) -> Result<Shape, String> {
    let read = |p: &Path| GgufFile::read(p).map_err(|e| format!("{}: {e}", p.display()));
    let file = read(path)?;
    let header = Header::of(&file);
    let (mut tensor_bytes, mut input_bytes) = (header.tensor_bytes, header.input_bytes);
    let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
    if let (Some((base, 0, total)), Some(dir)) = (split_part(&stem), path.parent()) {
        for index in 1..total {
            let part = dir.join(format!("{base}-{:05}-of-{total:05}.gguf", index + 1));
            let part = Header::of(&read(&part)?);
            tensor_bytes += part.tensor_bytes;
            input_bytes += part.input_bytes;
        }
    }
    header.shape(tensor_bytes, input_bytes).ok_or_else(|| {
        format!("{} lacks the layer, head or vocabulary sizes needed to estimate its memory", path.display())
    })
}

/// `name-00001-of-00003` → (`name`, 0, 3).
pub fn split_part(stem: &str) -> Option<(&str, u32, u32)> {
    let (rest, total) = stem.rsplit_once("-of-")?;
    let (base, index) = rest.rsplit_once('-')?;
    let digits = |s: &str| s.len() == 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits(index) || !digits(total) {
        return None;
    }
    let (index, total): (u32, u32) = (index.parse().ok()?, total.parse().ok()?);
    (index >= 1 && index <= total && !base.is_empty()).then_some((base, index - 1, total))
}

/// One file's header, kept while the file's size and modification time stay the same.
#[derive(Clone)]
struct Parsed {
    size: u64,
    modified: Option<SystemTime>,
    header: Result<Header, String>,
}

/// What the registry keeps of a header (not the vocabulary: a parse is cheap to repeat).
#[derive(Clone)]
struct Header {
    name: Option<String>,
    architecture: Option<String>,
    file_type: Option<u64>,
    context_length: Option<u64>,
    parameters: u64,
    tensor_bytes: u64,
    /// The input layer's share of `tensor_bytes` (see [`Shape::input_bytes`]).
    input_bytes: u64,
    n_layer: Option<u64>,
    n_head_kv: Vec<u64>,
    key_length: Option<u64>,
    value_length: Option<u64>,
    n_vocab: Option<u64>,
    n_embd: Option<u64>,
    n_ff: Option<u64>,
    n_head: Option<u64>,
}

impl Header {
    /// The memory arithmetic's inputs, with the tensor bytes of every part.
    fn shape(&self, tensor_bytes: u64, input_bytes: u64) -> Option<Shape> {
        Some(Shape {
            tensor_bytes,
            input_bytes,
            n_layer: self.n_layer?,
            n_head_kv: self.n_head_kv.clone(),
            key_length: self.key_length?,
            value_length: self.value_length?,
            n_vocab: self.n_vocab?,
            n_embd: self.n_embd?,
            n_ff: self.n_ff.unwrap_or(0),
            n_head: self.n_head.unwrap_or(0),
            context_length: self.context_length,
        })
        .filter(|_| self.n_layer.is_some_and(|n| n > 0))
    }

    fn of(file: &GgufFile) -> Header {
        let arch = file.architecture().map(str::to_owned);
        let key = |suffix: &str| arch.as_ref().and_then(|a| file.get(&format!("{a}.{suffix}")));
        let num = |suffix: &str| key(suffix).and_then(GgufValue::as_u64);
        let n_layer = num("block_count");
        let n_embd = num("embedding_length");
        let n_head = num("attention.head_count");
        let n_head_kv = match key("attention.head_count_kv") {
            Some(GgufValue::Array(per_layer)) => per_layer.iter().filter_map(GgufValue::as_u64).collect(),
            Some(v) => v.as_u64().map(|h| vec![h; n_layer.unwrap_or(0) as usize]).unwrap_or_default(),
            None => n_head.map(|h| vec![h; n_layer.unwrap_or(0) as usize]).unwrap_or_default(),
        };
        let head_dim = match (n_embd, n_head) {
            (Some(e), Some(h)) if h > 0 => Some(e / h),
            _ => None,
        };
        let n_vocab = num("vocab_size")
            .or_else(|| file.get("tokenizer.ggml.tokens").and_then(GgufValue::as_array).map(|a| a.len() as u64));
        Header {
            name: file.get_str("general.name").map(str::to_owned),
            file_type: file.get_u64("general.file_type"),
            context_length: num("context_length"),
            parameters: file.tensors.iter().map(|t| t.dims.iter().product::<u64>()).sum(),
            tensor_bytes: file.tensors.iter().filter_map(|t| t.n_bytes().ok()).sum(),
            input_bytes: (file.tensors.iter().filter(|t| t.name.starts_with("token_embd.")))
                .filter_map(|t| t.n_bytes().ok())
                .sum(),
            n_layer,
            n_head_kv,
            key_length: num("attention.key_length").or(head_dim),
            value_length: num("attention.value_length").or(head_dim),
            n_vocab,
            n_embd,
            // Per layer in some GGUFs: the largest layer is what a micro-batch needs.
            n_ff: match key("feed_forward_length") {
                Some(GgufValue::Array(per_layer)) => per_layer.iter().filter_map(GgufValue::as_u64).max(),
                Some(v) => v.as_u64(),
                None => None,
            },
            n_head,
            architecture: arch,
        }
    }
}

/// The registry handle: cheap to clone.
#[derive(Clone, Default)]
pub struct ModelStore {
    inner: Arc<RwLock<Catalog>>,
}

#[derive(Default)]
struct Catalog {
    models: Vec<Model>,
    parsed: HashMap<PathBuf, Parsed>,
}

/// What a rescan changed.
#[derive(Debug, Default, Serialize)]
pub struct Rescan {
    /// Models added, removed or changed, by id.
    pub models_updated: Vec<String>,
    pub count: usize,
}

impl ModelStore {
    /// The models of the last scan.
    pub fn list(&self) -> Vec<Model> {
        self.inner.read().models.clone()
    }

    pub fn get(&self, id: &str) -> Option<Model> {
        self.inner.read().models.iter().find(|m| m.id == id).cloned()
    }

    /// Scans `dirs` (missing ones are skipped) and replaces the catalog. Blocking: file I/O.
    pub fn rescan(&self, dirs: &[PathBuf]) -> Rescan {
        let mut files = Vec::new();
        for dir in dirs {
            collect_ggufs(dir, 0, &mut files);
        }
        files.sort();
        files.dedup();
        let old_parsed = std::mem::take(&mut self.inner.write().parsed);
        let mut parsed = HashMap::new();
        for path in files {
            let meta = match std::fs::metadata(&path) {
                Ok(m) => m,
                Err(_) => continue,
            };
            let (size, modified) = (meta.len(), meta.modified().ok());
            let entry = match old_parsed.get(&path) {
                Some(p) if p.size == size && p.modified == modified => p.clone(),
                _ => Parsed {
                    size,
                    modified,
                    header: GgufFile::read(&path).map(|f| Header::of(&f)).map_err(|e| e.to_string()),
                },
            };
            parsed.insert(path, entry);
        }
        let models = assemble(&parsed);
        let mut catalog = self.inner.write();
        let before: BTreeMap<&str, String> = catalog.models.iter().map(|m| (m.id.as_str(), format!("{m:?}"))).collect();
        let after: BTreeMap<&str, String> = models.iter().map(|m| (m.id.as_str(), format!("{m:?}"))).collect();
        let mut updated: Vec<String> = after
            .iter()
            .filter(|(id, m)| before.get(*id) != Some(*m))
            .map(|(id, _)| id.to_string())
            .chain(before.keys().filter(|id| !after.contains_key(*id)).map(|id| id.to_string()))
            .collect();
        updated.sort();
        let count = updated.len();
        catalog.models = models;
        catalog.parsed = parsed;
        Rescan { models_updated: updated, count }
    }
}

/// GGUF files under `dir`, two levels deep (a folder per model is common).
fn collect_ggufs(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else { return };
    for entry in entries.flatten() {
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        match entry.file_type() {
            Ok(t) if t.is_dir() && depth < 2 && !hidden => collect_ggufs(&path, depth + 1, out),
            Ok(_) if !hidden && path.extension().is_some_and(|e| e.eq_ignore_ascii_case("gguf")) && path.is_file() => {
                out.push(path)
            }
            _ => {}
        }
    }
}

/// Groups files into models (split parts by base name and part count) and describes each.
fn assemble(parsed: &HashMap<PathBuf, Parsed>) -> Vec<Model> {
    // (dir, base, total) → present parts by index.
    let mut groups: BTreeMap<(PathBuf, String, u32), BTreeMap<u32, &PathBuf>> = BTreeMap::new();
    for path in parsed.keys() {
        let stem = path.file_stem().map(|s| s.to_string_lossy().into_owned()).unwrap_or_default();
        let dir = path.parent().map(Path::to_path_buf).unwrap_or_default();
        let (base, index, total) = match split_part(&stem) {
            Some((base, index, total)) => (base.to_string(), index, total),
            None => (stem.clone(), 0, 1),
        };
        groups.entry((dir, base, total)).or_default().insert(index, path);
    }
    let mut models: Vec<Model> = Vec::new();
    let mut taken: HashMap<String, u32> = HashMap::new();
    for ((dir, base, total), parts) in groups {
        let n = taken.entry(base.clone()).or_insert(0);
        *n += 1;
        let id = if *n == 1 { base.clone() } else { format!("{base}-{n}") };
        models.push(describe(id, &dir, &base, total, &parts, parsed));
    }
    models.sort_by(|a, b| a.id.cmp(&b.id));
    models
}

fn describe(
    id: String,
    dir: &Path,
    base: &str,
    total: u32,
    parts: &BTreeMap<u32, &PathBuf>,
    parsed: &HashMap<PathBuf, Parsed>,
) -> Model {
    let filename = |index: u32| {
        if total == 1 {
            format!("{base}.gguf")
        } else {
            format!("{base}-{:05}-of-{total:05}.gguf", index + 1)
        }
    };
    let shards: Vec<Shard> = (0..total)
        .map(|index| match parts.get(&index) {
            Some(path) => Shard {
                index,
                filename: path.file_name().map(|f| f.to_string_lossy().into_owned()).unwrap_or_else(|| filename(index)),
                present: true,
                size_bytes: parsed[*path].size,
            },
            None => Shard { index, filename: filename(index), present: false, size_bytes: 0 },
        })
        .collect();
    let first = parts.values().next().copied().cloned().unwrap_or_else(|| dir.join(filename(0)));
    let headers: Vec<Result<&Header, &String>> = parts.values().map(|p| parsed[*p].header.as_ref()).collect();
    let error = headers.iter().find_map(|h| h.err().cloned());
    let ok: Vec<&Header> = headers.iter().filter_map(|h| h.ok()).collect();
    let main = ok.first();
    let all_present = shards.iter().all(|s| s.present);
    let complete = all_present && error.is_none();
    let architecture = main.and_then(|h| h.architecture.clone());
    let shape =
        main.and_then(|h| h.shape(ok.iter().map(|h| h.tensor_bytes).sum(), ok.iter().map(|h| h.input_bytes).sum()));
    let source = read_source(&first).unwrap_or_else(|| Source { kind: "local".into(), ..Source::default() });
    Model {
        name: main.and_then(|h| h.name.clone()).unwrap_or_else(|| id.clone()),
        id,
        size_bytes: shards.iter().map(|s| s.size_bytes).sum(),
        architecture_supported: architecture.as_deref().is_some_and(super::arch::supported),
        architecture,
        parameter_count: complete.then(|| ok.iter().map(|h| h.parameters).sum()),
        quantization: main.and_then(|h| h.file_type).and_then(quantization_name).map(str::to_owned),
        context_length: main.and_then(|h| h.context_length),
        trust_level: if source.kind == "local" { "Local" } else { "Downloaded" },
        source,
        shards,
        complete,
        error,
        shape,
        path: first,
    }
}

/// The sidecar a download leaves beside the model's first file.
pub fn source_file(model_file: &Path) -> PathBuf {
    let mut name = model_file.file_name().unwrap_or_default().to_os_string();
    name.push(".source.json");
    model_file.with_file_name(name)
}

fn read_source(model_file: &Path) -> Option<Source> {
    serde_json::from_slice(&std::fs::read(source_file(model_file)).ok()?).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_names_parse_and_others_do_not() {
        assert_eq!(split_part("llama-7b-q4-00001-of-00003"), Some(("llama-7b-q4", 0, 3)));
        assert_eq!(split_part("m-00003-of-00003"), Some(("m", 2, 3)));
        for stem in ["m-00004-of-00003", "m-00000-of-00003", "m-1-of-3", "-00001-of-00002", "plain", "m-0001a-of-00002"]
        {
            assert_eq!(split_part(stem), None, "{stem}");
        }
    }

    #[test]
    fn file_types_name_their_quantization() {
        assert_eq!(quantization_name(15), Some("Q4_K_M"));
        assert_eq!(quantization_name(7), Some("Q8_0"));
        assert_eq!(quantization_name(4), None, "removed from llama.cpp");
        assert_eq!(quantization_from_name("gemma-3-270m-it-Q4_K_M"), Some("Q4_K_M"));
        assert_eq!(quantization_from_name("m.q8_0-00001-of-00002"), Some("Q8_0"));
        assert_eq!(quantization_from_name("Qwen2.5-7B-Instruct-IQ4_XS"), Some("IQ4_XS"));
        assert_eq!(quantization_from_name("model"), None);
    }
}
