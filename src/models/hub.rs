//! A client of the Hugging Face Hub's HTTP API: model search, a repository's files (sizes and
//! the sha256 of LFS files), and the URL a file downloads from.
//!
//! The endpoint is configurable (`hf_endpoint`, `HF_ENDPOINT`), so mirrors and the tests' local
//! hub work alike; the token (`hf_token`, `HF_TOKEN`) is sent as a bearer to the endpoint only
//! (reqwest drops it when a download redirects to another host, such as the hub's CDN).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::registry::{quantization_from_name, split_part};

/// A repository id, `owner/name`, checked before it goes into a URL.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RepoId(String);

impl RepoId {
    pub fn parse(s: &str) -> Result<RepoId, HubError> {
        let ok_part = |p: &str| {
            !p.is_empty()
                && p != "."
                && p != ".."
                && p.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        };
        match s.split_once('/') {
            Some((owner, name)) if ok_part(owner) && ok_part(name) => Ok(RepoId(s.to_string())),
            _ => Err(HubError::Invalid(format!("repo_id '{s}' is not of the form owner/name"))),
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// A GGUF file's path inside a repository: relative, no `..`, ending in `.gguf`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
#[serde(transparent)]
pub struct RepoFile(String);

impl RepoFile {
    pub fn parse(s: &str) -> Result<RepoFile, HubError> {
        let bad = s.is_empty()
            || s.starts_with('/')
            || s.contains('\\')
            || s.split('/').any(|c| c.is_empty() || c == "." || c == "..")
            || !s.to_ascii_lowercase().ends_with(".gguf");
        if bad {
            return Err(HubError::Invalid(format!(
                "filename '{s}' must be a relative path inside the repository ending in .gguf"
            )));
        }
        Ok(RepoFile(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The last path component: the name the file gets on disk.
    pub fn file_name(&self) -> &str {
        self.0.rsplit('/').next().unwrap_or(&self.0)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HubError {
    #[error("{0}")]
    Invalid(String),
    #[error("the hub at {endpoint} cannot be reached: {reason}")]
    Unreachable { endpoint: String, reason: String },
    #[error("the hub has no {0}")]
    NotFound(String),
    #[error("the hub refused {url}: HTTP {status}; set HF_TOKEN for gated or private repositories")]
    Denied { url: String, status: u16 },
    #[error("the hub answered {url} with HTTP {status}")]
    Status { url: String, status: u16 },
    #[error("the hub's answer to {url} is not what paddock expects: {reason}")]
    Malformed { url: String, reason: String },
}

/// A file of a repository, from its tree.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct RemoteFile {
    pub path: String,
    pub size_bytes: u64,
    /// The LFS object id: the sha256 of the content (absent for small files kept in git).
    pub sha256: Option<String>,
}

/// A search hit (the hub sends the repository as `id` and, in older answers, `modelId`).
#[derive(Debug, Clone, Deserialize)]
#[serde(from = "RawHit")]
pub struct RepoHit {
    pub id: String,
    pub downloads: u64,
    pub likes: u64,
}

#[derive(Deserialize)]
struct RawHit {
    id: Option<String>,
    #[serde(rename = "modelId")]
    model_id: Option<String>,
    #[serde(default)]
    downloads: u64,
    #[serde(default)]
    likes: u64,
}

impl From<RawHit> for RepoHit {
    fn from(r: RawHit) -> Self {
        RepoHit { id: r.id.or(r.model_id).unwrap_or_default(), downloads: r.downloads, likes: r.likes }
    }
}

#[derive(Deserialize)]
struct TreeEntry {
    #[serde(rename = "type")]
    kind: String,
    path: String,
    #[serde(default)]
    size: u64,
    lfs: Option<Lfs>,
}

#[derive(Deserialize)]
struct Lfs {
    oid: String,
    size: u64,
}

/// The handle; cheap to clone.
#[derive(Clone)]
pub struct Hub {
    http: reqwest::Client,
    endpoint: String,
    token: Option<String>,
}

impl Hub {
    pub fn new(endpoint: &str, token: Option<String>) -> Hub {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(15))
            // Between bytes, not for a whole (possibly hour-long) download.
            .read_timeout(Duration::from_secs(60))
            .user_agent(concat!("paddock/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("a TLS backend is compiled in");
        Hub { http, endpoint: endpoint.trim_end_matches('/').to_string(), token: token.filter(|t| !t.is_empty()) }
    }

    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// A GET of the endpoint, with the token.
    pub fn get(&self, url: &str) -> reqwest::RequestBuilder {
        let req = self.http.get(url);
        match &self.token {
            Some(t) => req.bearer_auth(t),
            None => req,
        }
    }

    fn unreachable(&self, e: reqwest::Error) -> HubError {
        HubError::Unreachable { endpoint: self.endpoint.clone(), reason: error_chain(&e) }
    }

    async fn json<T: for<'de> Deserialize<'de>>(&self, url: String, what: String) -> Result<T, HubError> {
        let resp = self.get(&url).send().await.map_err(|e| self.unreachable(e))?;
        let status = resp.status().as_u16();
        match status {
            200..=299 => {}
            404 => return Err(HubError::NotFound(what)),
            401 | 403 => return Err(HubError::Denied { url, status }),
            _ => return Err(HubError::Status { url, status }),
        }
        let bytes = resp.bytes().await.map_err(|e| self.unreachable(e))?;
        serde_json::from_slice(&bytes).map_err(|e| HubError::Malformed { url, reason: e.to_string() })
    }

    /// Repositories with GGUF files matching `query`, most downloaded first.
    pub async fn search(&self, query: &str, limit: usize) -> Result<Vec<RepoHit>, HubError> {
        let mut url = reqwest::Url::parse(&format!("{}/api/models", self.endpoint))
            .map_err(|e| HubError::Invalid(format!("hf_endpoint '{}': {e}", self.endpoint)))?;
        url.query_pairs_mut()
            .append_pair("search", query)
            .append_pair("filter", "gguf")
            .append_pair("sort", "downloads")
            .append_pair("direction", "-1")
            .append_pair("limit", &limit.to_string());
        self.json(url.to_string(), format!("search for '{query}'")).await
    }

    /// Every file of the repository's main revision.
    pub async fn files(&self, repo: &RepoId) -> Result<Vec<RemoteFile>, HubError> {
        let url = format!("{}/api/models/{}/tree/main?recursive=true", self.endpoint, repo.as_str());
        let entries: Vec<TreeEntry> = self.json(url, format!("repository '{}'", repo.as_str())).await?;
        Ok(entries
            .into_iter()
            .filter(|e| e.kind == "file")
            .map(|e| {
                let size_bytes = e.lfs.as_ref().map_or(e.size, |l| l.size);
                RemoteFile { path: e.path, size_bytes, sha256: e.lfs.map(|l| l.oid) }
            })
            .collect())
    }

    /// Where a file's bytes come from (the hub answers with the file or a redirect to it).
    pub fn resolve_url(&self, repo: &RepoId, file: &str) -> String {
        format!("{}/{}/resolve/main/{}", self.endpoint, repo.as_str(), file)
    }
}

/// A reqwest error with its causes, which hold the useful part ("connection refused").
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut out = e.to_string();
    let mut source = e.source();
    while let Some(s) = source {
        out.push_str(": ");
        out.push_str(&s.to_string());
        source = s.source();
    }
    out
}

/// One downloadable model of a repository: a single GGUF or every part of a split one.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct Variant {
    /// The file (the first part, for a split model).
    pub filename: String,
    /// Of all parts.
    pub size_bytes: u64,
    /// From the file name (`Q4_K_M`…), when it says.
    pub quant: Option<String>,
    /// The parts, in order; one entry for a plain GGUF.
    pub parts: Vec<RemoteFile>,
}

/// Groups a repository's GGUF files into variants: split parts join their first part.
pub fn variants(files: &[RemoteFile]) -> Vec<Variant> {
    let mut out: Vec<Variant> = Vec::new();
    let mut ggufs: Vec<&RemoteFile> = files.iter().filter(|f| f.path.to_ascii_lowercase().ends_with(".gguf")).collect();
    ggufs.sort_by(|a, b| a.path.cmp(&b.path));
    for f in ggufs {
        let stem = &f.path[..f.path.len() - 5];
        let (base, index) = match split_part(stem) {
            Some((base, index, _)) => (base.to_string(), index),
            None => (stem.to_string(), 0),
        };
        let name = base.rsplit('/').next().unwrap_or(&base);
        // Projectors and imatrix files are not models one can chat with alone.
        if name.starts_with("mmproj") || name.contains("imatrix") {
            continue;
        }
        match out.iter_mut().find(|v| v.filename.starts_with(&base) && index > 0 && v.parts.len() == index as usize) {
            Some(v) => {
                v.size_bytes += f.size_bytes;
                v.parts.push(f.clone());
            }
            None => out.push(Variant {
                filename: f.path.clone(),
                size_bytes: f.size_bytes,
                quant: quantization_from_name(name).map(str::to_string),
                parts: vec![f.clone()],
            }),
        }
    }
    out
}

/// The id a variant lands as: its file name without `.gguf` and without the split suffix.
pub fn model_id(filename: &str) -> String {
    let name = filename.rsplit('/').next().unwrap_or(filename);
    let stem = name.strip_suffix(".gguf").or_else(|| name.strip_suffix(".GGUF")).unwrap_or(name);
    split_part(stem).map_or(stem, |(base, _, _)| base).to_string()
}

/// Bytes of RAM available now, and of free GPU memory llama.cpp reports (0 without a GPU).
pub fn memory_available() -> (u64, u64) {
    let mut sys = sysinfo::System::new();
    sys.refresh_memory();
    let gpu: u64 = crate::engine::rpc::local_devices()
        .into_iter()
        .filter(|d| !matches!(d.device_type, llama_cpp_2::LlamaBackendDeviceType::Cpu))
        .map(|d| d.memory_free as u64)
        .sum();
    (sys.available_memory(), gpu)
}

/// The variant a person without other constraints should take: Q4_K_M (llama.cpp's default
/// for `-hf`), else the largest that fits `memory` bytes, else the smallest.
pub fn recommended(variants: &[Variant], memory: u64) -> Option<&Variant> {
    if let Some(v) = variants.iter().find(|v| v.quant.as_deref() == Some("Q4_K_M") && v.size_bytes < memory) {
        return Some(v);
    }
    variants
        .iter()
        .filter(|v| v.size_bytes < memory)
        .max_by_key(|v| v.size_bytes)
        .or_else(|| variants.iter().min_by_key(|v| v.size_bytes))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(path: &str, size: u64) -> RemoteFile {
        RemoteFile { path: path.into(), size_bytes: size, sha256: None }
    }

    #[test]
    fn repo_ids_and_files_are_checked_before_they_reach_a_url() {
        assert!(RepoId::parse("org/model-GGUF").is_ok());
        for bad in ["org", "org/", "/x", "a/b/c", "../x", "a/..", "a b/c", "a/b?x=1"] {
            assert!(RepoId::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(RepoFile::parse("sub/m-Q4_K_M.gguf").unwrap().file_name(), "m-Q4_K_M.gguf");
        for bad in ["", "/etc/x.gguf", "../x.gguf", "a//b.gguf", "x.bin", "a\\b.gguf", "./x.gguf"] {
            assert!(RepoFile::parse(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn split_parts_join_their_first_part_and_q4_k_m_is_recommended() {
        let files = vec![
            file("README.md", 10),
            file("m-Q8_0.gguf", 800),
            file("m-Q4_K_M-00002-of-00002.gguf", 200),
            file("m-Q4_K_M-00001-of-00002.gguf", 300),
            file("mmproj-f16.gguf", 50),
        ];
        let v = variants(&files);
        assert_eq!(v.len(), 2, "{v:?}");
        let q4 = v.iter().find(|v| v.quant.as_deref() == Some("Q4_K_M")).unwrap();
        assert_eq!(q4.filename, "m-Q4_K_M-00001-of-00002.gguf");
        assert_eq!(q4.size_bytes, 500);
        assert_eq!(q4.parts.len(), 2);
        assert_eq!(recommended(&v, 10_000).unwrap().filename, q4.filename);
        // Q4_K_M does not fit: the largest that does; nothing fits: the smallest.
        let mut with_small = files.clone();
        with_small.push(file("m-Q2_K.gguf", 100));
        let v = variants(&with_small);
        assert_eq!(recommended(&v, 450).unwrap().filename, "m-Q2_K.gguf");
        assert_eq!(recommended(&v, 50).unwrap().filename, "m-Q2_K.gguf");
        assert_eq!(recommended(&v, 850).unwrap().filename, q4.filename);
        assert_eq!(model_id("sub/m-Q4_K_M-00001-of-00002.gguf"), "m-Q4_K_M");
        assert_eq!(model_id("m-Q8_0.gguf"), "m-Q8_0");
    }
}
