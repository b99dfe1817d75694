//! Downloads from the hub into the data dir's `models/`.
//!
//! Nothing half-written ever carries a model's name. Bytes go to `<file>.part`, beside a record
//! of what is expected (`<file>.part.json`: repository, path, size, sha256). A download resumes
//! from the part's length with an HTTP range — after a cancel, a network error (retried with
//! backoff) or a restart of paddock (records found at start resume by themselves). When the
//! size and the hub's sha256 match, the source record is written and the part renamed to the
//! model's name, both atomically; a mismatch discards the part and says so.
//!
//! [`Downloads`] is the handle; each download is a task owning its files, and the shared map
//! holds only progress (one `parking_lot` lock, never held across an await).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures::StreamExt;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use tokio_util::sync::CancellationToken;

use super::hub::{error_chain, memory_available, model_id, recommended, variants, Hub, RemoteFile, RepoFile, RepoId};
use super::registry::{source_file, Source};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum DownloadStatus {
    Queued,
    Downloading,
    Completed,
    Failed,
    Cancelled,
}

impl DownloadStatus {
    pub fn is_active(self) -> bool {
        matches!(self, DownloadStatus::Queued | DownloadStatus::Downloading)
    }
}

/// One file of a download.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct FileProgress {
    /// The path in the repository.
    pub filename: String,
    pub size_bytes: u64,
    pub downloaded_bytes: u64,
    pub sha256: Option<String>,
    /// `pending`, `downloading`, `verifying`, `done`, or `failed`.
    pub status: &'static str,
}

/// A download as `GET /api/admin/downloads` lists it.
#[derive(Debug, Clone, Serialize, utoipa::ToSchema)]
pub struct DownloadView {
    /// The model id the files land as (the file name without `.gguf` and split suffix).
    pub id: String,
    pub repo_id: String,
    /// `huggingface`, with the endpoint the bytes come from.
    pub source: String,
    pub endpoint: String,
    pub status: DownloadStatus,
    pub files: Vec<FileProgress>,
    pub downloaded_bytes: u64,
    pub total_bytes: u64,
    /// 0 to 1.
    pub progress: f64,
    pub speed_bytes_per_sec: u64,
    pub eta_secs: Option<u64>,
    /// Why it failed, or a retry in progress.
    pub error: Option<String>,
    /// Bytes already on disk when this run of the download began (a resume).
    pub resumed_from_bytes: u64,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// What a part file's record says is expected of it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct PartRecord {
    id: String,
    repo_id: String,
    path: String,
    size_bytes: u64,
    sha256: Option<String>,
    endpoint: String,
}

struct Job {
    view: DownloadView,
    cancel: CancellationToken,
    /// Bytes and time of the last speed sample.
    sample: (u64, Instant),
}

struct Inner {
    dir: PathBuf,
    hub: Hub,
    jobs: Mutex<BTreeMap<String, Job>>,
    /// Told when a download starts, progresses (at most every ~½ s) or ends.
    changes: tokio::sync::broadcast::Sender<DownloadView>,
}

/// The handle; cheap to clone.
#[derive(Clone)]
pub struct Downloads {
    inner: Arc<Inner>,
}

/// What a caller asks for: files of one repository, landing as one model.
pub struct DownloadRequest {
    pub id: String,
    pub repo: RepoId,
    pub files: Vec<RemoteFile>,
}

/// Network errors in a row before a download gives up (its part stays, to resume later).
const RETRIES: u32 = 5;

impl Downloads {
    /// Downloads into `dir` (created when the first one starts).
    pub fn new(dir: PathBuf, hub: Hub) -> Downloads {
        let (changes, _) = tokio::sync::broadcast::channel(64);
        Downloads { inner: Arc::new(Inner { dir, hub, jobs: Mutex::new(BTreeMap::new()), changes }) }
    }

    pub fn hub(&self) -> &Hub {
        &self.inner.hub
    }

    pub fn dir(&self) -> &Path {
        &self.inner.dir
    }

    pub fn subscribe(&self) -> tokio::sync::broadcast::Receiver<DownloadView> {
        self.inner.changes.subscribe()
    }

    pub fn list(&self) -> Vec<DownloadView> {
        self.inner.jobs.lock().values().map(|j| j.view.clone()).collect()
    }

    pub fn get(&self, id: &str) -> Option<DownloadView> {
        self.inner.jobs.lock().get(id).map(|j| j.view.clone())
    }

    /// Starts a download, or returns the one already running for the same files. Refused while
    /// a download of the same model fetches other files or is still stopping after a cancel,
    /// and when a file of the same name that came from elsewhere is in the way.
    pub fn start(&self, request: DownloadRequest) -> Result<DownloadView, DownloadConflict> {
        for f in &request.files {
            let target = self.inner.dir.join(f.path.rsplit('/').next().unwrap_or(&f.path));
            if target.exists() && !with_suffix(&target, ".part.json").exists() {
                let source = read_source(&target);
                let ours = source.as_ref().is_some_and(|s| {
                    s.repo_id.as_deref() == Some(request.repo.as_str())
                        && s.filename.as_deref() == Some(f.path.as_str())
                });
                if !ours {
                    return Err(DownloadConflict(format!(
                        "{} exists and did not come from {} {}; delete or move it first",
                        target.display(),
                        request.repo.as_str(),
                        f.path
                    )));
                }
            }
        }
        let mut jobs = self.inner.jobs.lock();
        if let Some(j) = jobs.get(&request.id).filter(|j| j.view.status.is_active()) {
            if j.cancel.is_cancelled() {
                return Err(DownloadConflict(format!(
                    "the download of {} is stopping after a cancel; ask again in a moment",
                    request.id
                )));
            }
            let covers = j.view.repo_id == request.repo.as_str()
                && request.files.iter().all(|f| j.view.files.iter().any(|g| g.filename == f.path));
            if !covers {
                return Err(DownloadConflict(format!(
                    "{} is being downloaded from {} with other files; wait for it or cancel it",
                    request.id, j.view.repo_id
                )));
            }
            return Ok(j.view.clone());
        }
        let files: Vec<FileProgress> = request
            .files
            .iter()
            .map(|f| FileProgress {
                filename: f.path.clone(),
                size_bytes: f.size_bytes,
                downloaded_bytes: 0,
                sha256: f.sha256.clone(),
                status: "pending",
            })
            .collect();
        let view = DownloadView {
            id: request.id.clone(),
            repo_id: request.repo.as_str().to_string(),
            source: "huggingface".into(),
            endpoint: self.inner.hub.endpoint().to_string(),
            status: DownloadStatus::Queued,
            total_bytes: files.iter().map(|f| f.size_bytes).sum(),
            files,
            downloaded_bytes: 0,
            progress: 0.0,
            speed_bytes_per_sec: 0,
            eta_secs: None,
            error: None,
            resumed_from_bytes: 0,
            started_at: Utc::now(),
            finished_at: None,
        };
        let cancel = CancellationToken::new();
        jobs.insert(
            request.id.clone(),
            Job { view: view.clone(), cancel: cancel.clone(), sample: (0, Instant::now()) },
        );
        drop(jobs);
        let this = self.clone();
        tokio::spawn(async move { this.run(request, cancel).await });
        Ok(view)
    }

    /// Stops a running download; its part files stay, so starting it again resumes.
    pub fn cancel(&self, id: &str) -> Option<DownloadView> {
        let jobs = self.inner.jobs.lock();
        let job = jobs.get(id)?;
        job.cancel.cancel();
        Some(job.view.clone())
    }

    /// Resumes the downloads a previous run of paddock left unfinished (their part records).
    pub fn resume_interrupted(&self) {
        let Ok(entries) = std::fs::read_dir(&self.inner.dir) else { return };
        let mut groups: BTreeMap<String, (RepoId, Vec<RemoteFile>)> = BTreeMap::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if !path.to_string_lossy().ends_with(".part.json") {
                continue;
            }
            let Some(record) = std::fs::read(&path).ok().and_then(|b| serde_json::from_slice::<PartRecord>(&b).ok())
            else {
                tracing::warn!("ignoring unreadable download record {}", path.display());
                continue;
            };
            // A record from another hub cannot be resumed against this one.
            if record.endpoint != self.inner.hub.endpoint() {
                tracing::warn!("not resuming {}: it came from {}", record.path, record.endpoint);
                continue;
            }
            let Ok(repo) = RepoId::parse(&record.repo_id) else { continue };
            let file = RemoteFile { path: record.path, size_bytes: record.size_bytes, sha256: record.sha256 };
            groups.entry(record.id).or_insert_with(|| (repo, Vec::new())).1.push(file);
        }
        for (id, (repo, mut files)) in groups {
            files.sort_by(|a, b| a.path.cmp(&b.path));
            tracing::info!("resuming the download of {id} from {}", repo.as_str());
            if let Err(e) = self.start(DownloadRequest { id, repo, files }) {
                tracing::warn!("not resuming: {}", e.0);
            }
        }
    }

    /// A downloaded model of `repo` already here (by the source records beside the models).
    fn local_from(&self, repo: &RepoId) -> Option<PathBuf> {
        let entries = std::fs::read_dir(&self.inner.dir).ok()?;
        let mut found: Vec<PathBuf> = entries
            .flatten()
            .map(|e| e.path())
            .filter_map(|p| {
                let model = PathBuf::from(p.to_str()?.strip_suffix(".source.json")?);
                let source: Source = serde_json::from_slice(&std::fs::read(&p).ok()?).ok()?;
                (source.repo_id.as_deref() == Some(repo.as_str())).then_some(model)
            })
            .filter_map(|model| whole_model(&model))
            .collect();
        found.sort();
        found.dedup();
        found.into_iter().next()
    }

    /// The local file of a hub model, downloaded first when missing (every part of a split
    /// model); `log` hears the progress. Without `file`, the repository's recommended variant.
    pub async fn fetch_model(
        &self,
        repo: &str,
        file: Option<&str>,
        log: &(dyn Fn(String) + Send + Sync),
    ) -> Result<PathBuf, String> {
        let repo = RepoId::parse(repo).map_err(|e| e.to_string())?;
        let file = file.map(RepoFile::parse).transpose().map_err(|e| e.to_string())?;
        // Already here: no need to reach the hub.
        let local = match &file {
            Some(f) => whole_model(&self.inner.dir.join(f.file_name())),
            None => self.local_from(&repo),
        };
        if let Some(path) = local {
            return Ok(path);
        }
        let files = self.inner.hub.files(&repo).await.map_err(|e| e.to_string())?;
        let all = variants(&files);
        let variant = match &file {
            Some(f) => all
                .into_iter()
                .find(|v| v.parts.iter().any(|p| p.path == f.as_str()))
                .ok_or_else(|| format!("the hub has no file '{}' in '{}'", f.as_str(), repo.as_str()))?,
            None => recommended(&all, memory_available().0)
                .cloned()
                .ok_or_else(|| format!("'{}' has no GGUF model", repo.as_str()))?,
        };
        let first = variant.parts[0].path.rsplit('/').next().unwrap_or(&variant.parts[0].path).to_string();
        let target = self.inner.dir.join(first);
        let id = model_id(&variant.filename);
        let mut changes = self.subscribe();
        self.start(DownloadRequest { id: id.clone(), repo: repo.clone(), files: variant.parts.clone() })
            .map_err(|e| e.0)?;
        log(format!(
            "downloading {} ({} MiB) from {} at {}",
            variant.filename,
            variant.size_bytes.div_ceil(1 << 20),
            repo.as_str(),
            self.inner.hub.endpoint()
        ));
        let mut reported = 0;
        loop {
            let v = self.get(&id).ok_or("the download vanished")?;
            match v.status {
                DownloadStatus::Completed => {
                    // Every part must be here, not only those this download fetched.
                    return match whole_model(&target) {
                        Some(path) => {
                            log(format!("downloaded {}", variant.filename));
                            Ok(path)
                        }
                        None => Err(format!("{} is incomplete after the download; ask again", variant.filename)),
                    };
                }
                DownloadStatus::Failed => return Err(v.error.unwrap_or_else(|| "the download failed".into())),
                DownloadStatus::Cancelled => return Err("the download was cancelled".into()),
                _ => {}
            }
            let tenth = (v.progress * 10.0) as u32;
            if tenth > reported {
                reported = tenth;
                log(format!("downloading {}: {}%", variant.filename, tenth * 10));
            }
            tokio::select! {
                _ = changes.recv() => {}
                _ = tokio::time::sleep(Duration::from_millis(500)) => {}
            }
        }
    }

    fn update(&self, id: &str, f: impl FnOnce(&mut DownloadView)) {
        let view = {
            let mut jobs = self.inner.jobs.lock();
            let Some(job) = jobs.get_mut(id) else { return };
            f(&mut job.view);
            let v = &mut job.view;
            v.downloaded_bytes = v.files.iter().map(|f| f.downloaded_bytes).sum();
            v.progress = if v.total_bytes == 0 { 1.0 } else { v.downloaded_bytes as f64 / v.total_bytes as f64 };
            let (bytes, at) = job.sample;
            let elapsed = at.elapsed();
            if elapsed >= Duration::from_millis(500) || !v.status.is_active() {
                if v.status.is_active() {
                    let rate = v.downloaded_bytes.saturating_sub(bytes) as f64 / elapsed.as_secs_f64();
                    v.speed_bytes_per_sec = rate as u64;
                    v.eta_secs = (rate > 0.0)
                        .then(|| (v.total_bytes.saturating_sub(v.downloaded_bytes) as f64 / rate).ceil() as u64);
                } else {
                    v.speed_bytes_per_sec = 0;
                    v.eta_secs = None;
                }
                job.sample = (v.downloaded_bytes, Instant::now());
                Some(v.clone())
            } else {
                None
            }
        };
        if let Some(v) = view {
            let _ = self.inner.changes.send(v);
        }
    }

    async fn run(self, request: DownloadRequest, cancel: CancellationToken) {
        let id = request.id.clone();
        self.update(&id, |v| v.status = DownloadStatus::Downloading);
        let mut outcome = Ok(());
        for (index, file) in request.files.iter().enumerate() {
            outcome = self.file_with_retries(&request, index, file, &cancel).await;
            if outcome.is_err() {
                break;
            }
        }
        let status = match &outcome {
            Ok(()) => DownloadStatus::Completed,
            Err(Failure::Cancelled) => DownloadStatus::Cancelled,
            Err(Failure::Fatal(_)) => DownloadStatus::Failed,
        };
        match &outcome {
            Ok(()) => tracing::info!("downloaded {id} from {}", request.repo.as_str()),
            Err(Failure::Cancelled) => tracing::info!("download of {id} cancelled; its part files stay to resume"),
            Err(Failure::Fatal(e)) => tracing::warn!("download of {id} failed: {e}"),
        }
        self.update(&id, |v| {
            v.status = status;
            v.error = match outcome {
                Err(Failure::Fatal(e)) => Some(e),
                _ => None,
            };
            v.finished_at = Some(Utc::now());
        });
    }

    async fn file_with_retries(
        &self,
        request: &DownloadRequest,
        index: usize,
        file: &RemoteFile,
        cancel: &CancellationToken,
    ) -> Result<(), Failure> {
        let mut attempt = 0;
        let mut reached = 0;
        loop {
            match self.file(request, index, file, cancel).await {
                Err(Failure::Fatal(e)) if attempt < RETRIES && e.starts_with(RETRYABLE) => {
                    // Errors in a row: an attempt that got further starts the count again.
                    let now = self.get(&request.id).map_or(0, |v| v.files[index].downloaded_bytes);
                    if now > reached {
                        (reached, attempt) = (now, 0);
                    }
                    attempt += 1;
                    let wait = Duration::from_secs(1 << (attempt - 1));
                    tracing::warn!("{e}; retry {attempt}/{RETRIES} in {}s", wait.as_secs());
                    self.update(&request.id, |v| v.error = Some(format!("{e} (retry {attempt}/{RETRIES})")));
                    tokio::select! {
                        _ = cancel.cancelled() => return Err(Failure::Cancelled),
                        _ = tokio::time::sleep(wait) => {}
                    }
                }
                other => return other,
            }
        }
    }

    /// Downloads (or resumes) one file and lands it under its name.
    async fn file(
        &self,
        request: &DownloadRequest,
        index: usize,
        file: &RemoteFile,
        cancel: &CancellationToken,
    ) -> Result<(), Failure> {
        let id = &request.id;
        let name = file.path.rsplit('/').next().unwrap_or(&file.path);
        let target = self.inner.dir.join(name);
        let part = with_suffix(&target, ".part");
        let record_path = with_suffix(&target, ".part.json");
        let set = |status: &'static str, done: u64| {
            self.update(id, |v| {
                v.files[index].status = status;
                v.files[index].downloaded_bytes = done;
            })
        };
        if std::fs::metadata(&target).is_ok_and(|m| m.len() == file.size_bytes) && !record_path.exists() {
            set("done", file.size_bytes);
            return Ok(());
        }
        let record = PartRecord {
            id: id.clone(),
            repo_id: request.repo.as_str().to_string(),
            path: file.path.clone(),
            size_bytes: file.size_bytes,
            sha256: file.sha256.clone(),
            endpoint: self.inner.hub.endpoint().to_string(),
        };
        let (offset, hasher) = {
            let (dir, part_path, record_path, record) =
                (self.inner.dir.clone(), part.clone(), record_path.clone(), record);
            tokio::task::spawn_blocking(move || prepare(&dir, &part_path, &record_path, &record))
                .await
                .map_err(|e| Failure::Fatal(e.to_string()))?
                .map_err(|e| Failure::Fatal(format!("{}: {e}", part.display())))?
        };
        if index == 0 || offset > 0 {
            self.update(id, |v| v.resumed_from_bytes += offset);
        }
        set("downloading", offset);
        let (done, hasher) = self.fetch(request, file, &part, offset, hasher, index, cancel).await?;
        set("verifying", done);
        let digest = hex(&hasher.finalize());
        if done != file.size_bytes || file.sha256.as_ref().is_some_and(|want| *want != digest) {
            let _ = std::fs::remove_file(&part);
            let _ = std::fs::remove_file(&record_path);
            set("failed", 0);
            let what = if done != file.size_bytes {
                format!("{done} bytes instead of {}", file.size_bytes)
            } else {
                format!("sha256 {digest}, the hub says {}", file.sha256.as_deref().unwrap_or_default())
            };
            return Err(Failure::Fatal(format!("checksum mismatch for {}: {what}; the file was discarded", file.path)));
        }
        let source = Source {
            kind: "huggingface".into(),
            repo_id: Some(request.repo.as_str().to_string()),
            filename: Some(file.path.clone()),
        };
        let landed = tokio::task::spawn_blocking({
            let (part, target, record_path) = (part.clone(), target.clone(), record_path.clone());
            move || land(&part, &target, &record_path, &source)
        })
        .await
        .map_err(|e| Failure::Fatal(e.to_string()))?;
        landed.map_err(|e| Failure::Fatal(format!("{}: {e}", target.display())))?;
        set("done", done);
        Ok(())
    }

    /// Appends the file's remaining bytes to `part`, hashing as it goes.
    #[allow(clippy::too_many_arguments)]
    async fn fetch(
        &self,
        request: &DownloadRequest,
        file: &RemoteFile,
        part: &Path,
        mut offset: u64,
        mut hasher: Sha256,
        index: usize,
        cancel: &CancellationToken,
    ) -> Result<(u64, Sha256), Failure> {
        if offset == file.size_bytes {
            return Ok((offset, hasher));
        }
        let url = self.inner.hub.resolve_url(&request.repo, &file.path);
        let mut req = self.inner.hub.get(&url);
        if offset > 0 {
            req = req.header(reqwest::header::RANGE, format!("bytes={offset}-"));
        }
        let resp = tokio::select! {
            _ = cancel.cancelled() => return Err(Failure::Cancelled),
            r = req.send() => r.map_err(|e| retryable(&error_chain(&e)))?,
        };
        let status = resp.status().as_u16();
        let mut out = std::fs::OpenOptions::new()
            .append(true)
            .open(part)
            .map_err(|e| Failure::Fatal(format!("{}: {e}", part.display())))?;
        match status {
            206 => {}
            // The server ignored the range: start over.
            200 if offset > 0 => {
                out.set_len(0).map_err(|e| Failure::Fatal(e.to_string()))?;
                offset = 0;
                hasher = Sha256::new();
            }
            200 => {}
            401 | 403 => {
                return Err(Failure::Fatal(format!(
                    "the hub refused {url}: HTTP {status}; set HF_TOKEN for gated or private repositories"
                )))
            }
            404 => return Err(Failure::Fatal(format!("the hub has no {url}"))),
            s if s >= 500 || s == 429 => return Err(retryable(&format!("the hub answered {url} with HTTP {s}"))),
            s => return Err(Failure::Fatal(format!("the hub answered {url} with HTTP {s}"))),
        }
        let mut body = resp.bytes_stream();
        let mut done = offset;
        let mut last_report = Instant::now();
        loop {
            let chunk = tokio::select! {
                _ = cancel.cancelled() => {
                    let _ = out.sync_data();
                    self.update(&request.id, |v| v.files[index].downloaded_bytes = done);
                    return Err(Failure::Cancelled);
                }
                c = body.next() => c,
            };
            let Some(chunk) = chunk else { break };
            let chunk = chunk.map_err(|e| {
                let _ = out.sync_data();
                retryable(&error_chain(&e))
            })?;
            if done + chunk.len() as u64 > file.size_bytes {
                let _ = std::fs::remove_file(part);
                return Err(Failure::Fatal(format!(
                    "the hub sent more than the {} bytes of {}",
                    file.size_bytes, file.path
                )));
            }
            out.write_all(&chunk).map_err(|e| Failure::Fatal(format!("{}: {e}", part.display())))?;
            hasher.update(&chunk);
            done += chunk.len() as u64;
            if last_report.elapsed() >= Duration::from_millis(200) {
                last_report = Instant::now();
                self.update(&request.id, |v| {
                    v.files[index].downloaded_bytes = done;
                    v.error = None;
                });
            }
        }
        // A multi-GB file's final flush must not stall the runtime's threads.
        tokio::task::spawn_blocking(move || out.sync_all())
            .await
            .map_err(|e| Failure::Fatal(e.to_string()))?
            .map_err(|e| Failure::Fatal(format!("{}: {e}", part.display())))?;
        Ok((done, hasher))
    }
}

enum Failure {
    Cancelled,
    Fatal(String),
}

/// Errors that start with this are network trouble, worth a retry.
const RETRYABLE: &str = "network error: ";

fn retryable(reason: &str) -> Failure {
    Failure::Fatal(format!("{RETRYABLE}{reason}"))
}

/// A model file that exists and is not being downloaded.
pub fn complete(path: &Path) -> bool {
    path.is_file() && !with_suffix(path, ".part.json").exists()
}

/// The first file of the model `path` belongs to, when every part of it is complete (a plain
/// GGUF is its own single part).
fn whole_model(path: &Path) -> Option<PathBuf> {
    let stem = path.file_stem()?.to_str()?;
    let Some((base, _, total)) = super::registry::split_part(stem) else {
        return complete(path).then(|| path.to_path_buf());
    };
    let dir = path.parent()?;
    let part = |i: u32| dir.join(format!("{base}-{i:05}-of-{total:05}.gguf"));
    (1..=total).all(|i| complete(&part(i))).then(|| part(1))
}

/// Whether `file` of `repo` is in `dir`, complete and recorded as coming from there.
pub fn is_landed(dir: &Path, repo: &RepoId, file: &RemoteFile) -> bool {
    let target = dir.join(file.path.rsplit('/').next().unwrap_or(&file.path));
    complete(&target)
        && std::fs::metadata(&target).is_ok_and(|m| m.len() == file.size_bytes)
        && read_source(&target).is_some_and(|s| {
            s.repo_id.as_deref() == Some(repo.as_str()) && s.filename.as_deref() == Some(file.path.as_str())
        })
}

/// Why a download cannot start now (409).
#[derive(Debug)]
pub struct DownloadConflict(pub String);

fn read_source(model: &Path) -> Option<Source> {
    serde_json::from_slice(&std::fs::read(source_file(model)).ok()?).ok()
}

fn with_suffix(path: &Path, suffix: &str) -> PathBuf {
    let mut s = path.as_os_str().to_owned();
    s.push(suffix);
    PathBuf::from(s)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Makes the part file and its record ready; returns the bytes already there, hashed.
fn prepare(dir: &Path, part: &Path, record_path: &Path, record: &PartRecord) -> std::io::Result<(u64, Sha256)> {
    std::fs::create_dir_all(dir)?;
    let old: Option<PartRecord> = std::fs::read(record_path).ok().and_then(|b| serde_json::from_slice(&b).ok());
    // A part of another revision or another file of the same name is not ours to resume.
    if old.as_ref() != Some(record) {
        let _ = std::fs::remove_file(part);
        write_atomically(record_path, &serde_json::to_vec_pretty(record).map_err(std::io::Error::other)?)?;
    }
    let mut file = std::fs::OpenOptions::new().create(true).read(true).append(true).open(part)?;
    let len = file.metadata()?.len();
    if len > record.size_bytes {
        file.set_len(0)?;
        return Ok((0, Sha256::new()));
    }
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        hasher.update(&buf[..n]);
    }
    Ok((len, hasher))
}

/// The source record first, then the model under its name: a crash between them leaves a
/// record without a model (ignored), never a model without its source.
fn land(part: &Path, target: &Path, record_path: &Path, source: &Source) -> std::io::Result<()> {
    write_atomically(&source_file(target), &serde_json::to_vec_pretty(source).map_err(std::io::Error::other)?)?;
    std::fs::rename(part, target)?;
    if let Some(dir) = target.parent() {
        std::fs::File::open(dir)?.sync_all()?;
    }
    std::fs::remove_file(record_path)?;
    Ok(())
}

/// Writes `bytes` to `path` through a temporary file and a rename, so readers see the old
/// content or the new, never a part.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    tmp.write_all(bytes)?;
    tmp.as_file().sync_all()?;
    tmp.persist(path).map_err(|e| e.error)?;
    Ok(())
}
