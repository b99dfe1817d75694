// The Models view: the local registry (metadata, create an instance, delete), Hugging Face
// search with its quantization variants, and the downloads, kept live by /api/ws through the
// Dashboard (it owns the socket; this view gets the downloads and a models version to refetch on).

import { useEffect, useState } from 'preact/hooks';
import { api } from './api.js';
import { baseName, formatBytes, formatDuration, html, Modal } from './ui.js';

const ACTIVE = ['queued', 'downloading'];

/** The model id a hub file lands as: the file name without `.gguf` and a split suffix. */
export function modelIdOf(filename) {
  return baseName(filename)
    .replace(/\.gguf$/i, '')
    .replace(/-\d{5}-of-\d{5}$/, '');
}

/**
 * Which of two reports of a download to keep: a later run's, else the one further along. The
 * POST's answer, the list fetched on (re)connect and the socket's events may arrive in any order.
 */
export function newerDownload(old, next) {
  if (!old) return next;
  const [a, b] = [Date.parse(old.started_at), Date.parse(next.started_at)];
  if (a !== b) return b > a ? next : old;
  const ended = (d) => !ACTIVE.includes(d.status);
  if (ended(old) !== ended(next)) return ended(old) ? old : next;
  return next.downloaded_bytes >= old.downloaded_bytes ? next : old;
}

/** An instance name for a model id, unlike any in `taken`. */
export function instanceNameFor(id, taken) {
  const base =
    id
      .toLowerCase()
      .replace(/[^a-z0-9_.-]+/g, '-')
      .replace(/^[.-]+/, '')
      .slice(0, 58) || 'model';
  let name = base;
  for (let n = 2; taken.has(name); n += 1) name = `${base}-${n}`;
  return name;
}

/** 268098176 → "268 M". */
export function formatCount(n) {
  if (n == null) return '–';
  const units = [[1e12, 'T'], [1e9, 'B'], [1e6, 'M'], [1e3, 'K']];
  for (const [size, unit] of units) {
    if (n >= size) {
      const v = n / size;
      return `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${unit}`;
    }
  }
  return String(n);
}

function ErrorBox({ error, testid }) {
  if (!error) return null;
  return html`<div class="form-error" role="alert" data-testid=${testid}><strong>${error.message}</strong>${error.details ? html`<span>${error.details}</span>` : null}</div>`;
}

// ---- local models --------------------------------------------------------------------------

function Fact({ label, children }) {
  return html`<div><dt>${label}</dt><dd>${children}</dd></div>`;
}

function ModelCard({ model, onOpen }) {
  const present = model.shards.filter((s) => s.present).length;
  const total = model.shards.length;
  const est = model.memory_estimate;
  const fromHub = model.source && model.source.kind === 'huggingface';
  const titleId = `model-${model.id}`;
  return html`
    <article class="item model-card" data-model=${model.id} aria-labelledby=${titleId}>
      <header>
        <h3 id=${titleId}>${model.id}</h3>
        ${model.loaded ? html`<span class="badge ready" title="An instance has it loaded">loaded</span>` : null}
        ${!model.complete ? html`<span class="badge error" title="Parts are missing or unreadable">incomplete</span>` : null}
      </header>
      ${model.name && model.name !== model.id ? html`<p class="muted">${model.name}</p>` : null}
      <p class="model" title=${model.path}>${model.path}</p>
      <dl class="facts">
        <${Fact} label="Architecture">${model.architecture || '–'}${model.architecture && !model.architecture_supported ? ' (unsupported)' : ''}<//>
        <${Fact} label="Quantization">${model.quantization || '–'}<//>
        <${Fact} label="Size">${formatBytes(model.size_bytes)}<//>
        <${Fact} label="Parameters">${formatCount(model.parameter_count)}<//>
        <${Fact} label="Context">${model.context_length != null ? model.context_length.toLocaleString('en') : '–'}<//>
        <${Fact} label="Shards"><span data-testid="shards">${present} / ${total}</span><//>
        <${Fact} label="Memory">${est ? html`<span title=${`weights ${formatBytes(est.weights_bytes)}, KV cache ${formatBytes(est.kv_bytes)}, compute ${formatBytes(est.compute_bytes)}`}>≈ ${formatBytes(est.total_bytes)} at ${est.context.toLocaleString('en')} ctx</span>` : '–'}<//>
        <${Fact} label="Source">${fromHub ? html`<span title=${model.source.filename || ''}>${model.source.repo_id}</span>` : 'local file'}<//>
        <${Fact} label="Used by"><span data-testid="used-by">${model.used_by.length ? model.used_by.join(', ') : '–'}</span><//>
      </dl>
      ${model.error ? html`<p class="card-error">${model.error}</p>` : null}
      <div class="actions">
        <button type="button" class="primary small" disabled=${!model.complete || !!model.error} onClick=${() => onOpen('create', model)}
          aria-label=${`Create instance from ${model.id}`}>Create instance</button>
        <button type="button" class="secondary small" onClick=${() => onOpen('metadata', model)}
          aria-label=${`Metadata of ${model.id}`}>Metadata</button>
        <button type="button" class="danger small" onClick=${() => onOpen('delete', model)}
          aria-label=${`Delete ${model.id}`}>Delete</button>
      </div>
    </article>`;
}

function show(v) {
  if (v === null || v === undefined || v === '') return '–';
  if (typeof v === 'boolean') return v ? 'yes' : 'no';
  if (typeof v === 'number') return Number.isInteger(v) ? v.toLocaleString('en') : String(v);
  if (typeof v === 'object') return JSON.stringify(v);
  return String(v);
}

function Section({ title, fields }) {
  if (!fields) return null;
  return html`
    <section class="meta-section" aria-label=${title}>
      <h3>${title}</h3>
      <dl class="meta">${Object.entries(fields).map(([k, v]) => html`<div key=${k}><dt>${k.replace(/_/g, ' ')}</dt><dd>${show(v)}</dd></div>`)}</dl>
    </section>`;
}

function MetadataDialog({ model, onClose }) {
  const [meta, setMeta] = useState(null);
  const [error, setError] = useState(null);
  useEffect(() => {
    api(`/api/admin/models/${encodeURIComponent(model.id)}/metadata`).then(setMeta).catch(setError);
  }, [model.id]);
  return html`
    <${Modal} title=${`Metadata: ${model.id}`} onClose=${onClose} label="metadata">
      <div class="modal-body">
        <${ErrorBox} error=${error} />
        ${!meta && !error ? html`<p class="muted">Reading the GGUF header…</p>` : null}
        ${meta ? html`
          <${Section} title="General" fields=${meta.general} />
          <${Section} title="Model" fields=${meta.model} />
          <${Section} title="Tokenizer" fields=${meta.tokenizer} />
          <${Section} title="Tensors" fields=${{ ...meta.tensors, gguf_version: meta.gguf_version }} />
          <details class="raw">
            <summary>All ${meta.raw.length} key/value pairs${meta.omitted && meta.omitted.length ? ` (${meta.omitted.length} long arrays left out)` : ''}</summary>
            <dl class="meta">${meta.raw.map((r) => html`<div key=${r.key}><dt>${r.key}</dt><dd>${show(r.value)}</dd></div>`)}</dl>
          </details>` : null}
      </div>
      <footer class="modal-foot"><button type="button" class="secondary" onClick=${onClose} autofocus>Close</button></footer>
    <//>`;
}

function ConfirmDeleteModel({ model, onClose, onDeleted }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const confirm = async () => {
    setBusy(true);
    setError(null);
    try {
      await api(`/api/admin/models/${encodeURIComponent(model.id)}`, { method: 'DELETE' });
      onDeleted(model.id);
    } catch (err) {
      setError(err);
      setBusy(false);
    }
  };
  const files = model.shards.filter((s) => s.present).length;
  return html`
    <${Modal} title="Delete model" onClose=${onClose} label="confirm-delete-model">
      <p>Delete <strong>${model.id}</strong>? Its ${files === 1 ? 'file is' : `${files} files are`} removed from disk (${formatBytes(model.size_bytes)}).</p>
      <${ErrorBox} error=${error} testid="delete-model-error" />
      <footer class="modal-foot">
        <button type="button" class="secondary" onClick=${onClose} autofocus>Cancel</button>
        <button type="button" class="danger" disabled=${busy} onClick=${confirm}>Delete</button>
      </footer>
    <//>`;
}

// ---- Hugging Face --------------------------------------------------------------------------

function RepoCard({ hit, downloads, local, onDownload }) {
  const [busy, setBusy] = useState(null);
  const [error, setError] = useState(null);
  const [note, setNote] = useState(null);
  const download = async (variant) => {
    setBusy(variant.filename);
    setError(null);
    setNote(null);
    try {
      const r = await onDownload(hit.repo_id, variant.filename);
      if (r && r.status === 'already_local') setNote(`${variant.filename} is here already.`);
    } catch (err) {
      setError(err);
    } finally {
      setBusy(null);
    }
  };
  const titleId = `repo-${hit.repo_id.replace(/[^A-Za-z0-9_-]/g, '-')}`;
  return html`
    <article class="item repo" data-repo=${hit.repo_id} aria-labelledby=${titleId}>
      <header>
        <h3 id=${titleId}>${hit.repo_id}</h3>
        <span class=${`badge ${hit.fits_memory ? 'ready' : 'error'}`} data-testid="fits"
          title=${hit.recommended_variant ? `The recommended variant (${hit.recommended_variant}) with room for its KV cache` : ''}>
          ${hit.fits_memory ? 'fits in memory' : 'too large for memory'}${hit.fits_vram ? ' · fits VRAM' : ''}</span>
      </header>
      <p class="status-line">
        <span title="Downloads">↓ ${hit.downloads.toLocaleString('en')}</span>${' · '}<span title="Likes">♥ ${hit.likes.toLocaleString('en')}</span>${' · '}${hit.variants.length} ${hit.variants.length === 1 ? 'variant' : 'variants'}
      </p>
      <ul class="variants">
        ${hit.variants.map((v) => {
          const id = modelIdOf(v.filename);
          const d = downloads[id];
          const active = d && ACTIVE.includes(d.status);
          const here = local.has(id);
          const recommended = v.filename === hit.recommended_filename;
          return html`
            <li key=${v.filename} class=${recommended ? 'variant recommended' : 'variant'} data-variant=${v.filename}>
              <span class="quant">${v.quant || '?'}</span>
              ${recommended ? html`<span class="badge ready" data-testid="recommended">recommended</span>` : null}
              <span class="file" title=${v.filename}>${v.filename}</span>
              <span class="size">${formatBytes(v.size_bytes)}${v.parts.length > 1 ? ` · ${v.parts.length} parts` : ''}</span>
              <button type="button" class=${recommended ? 'primary small' : 'secondary small'} disabled=${!!busy || active}
                aria-label=${`Download ${v.quant || v.filename} from ${hit.repo_id}`} onClick=${() => download(v)}>
                ${active ? 'Downloading…' : busy === v.filename ? 'Starting…' : here ? 'Downloaded ✓' : 'Download'}</button>
            </li>`;
        })}
      </ul>
      ${note ? html`<p class="muted" role="status">${note}</p>` : null}
      ${error ? html`<p class="card-error" role="alert">${error.message}${error.details ? `: ${error.details}` : ''}</p>` : null}
    </article>`;
}

function HubSearch({ downloads, local, onDownload }) {
  const [query, setQuery] = useState('');
  const [hits, setHits] = useState(null);
  const [searched, setSearched] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const search = async (e) => {
    e.preventDefault();
    const q = query.trim();
    if (!q) return;
    setBusy(true);
    setError(null);
    try {
      setHits(await api(`/api/admin/hf/search?query=${encodeURIComponent(q)}&limit=20`));
      setSearched(q);
    } catch (err) {
      setError(err);
      setHits(null);
    } finally {
      setBusy(false);
    }
  };
  return html`
    <section class="panel" aria-labelledby="hub-title">
      <h2 id="hub-title">Hugging Face</h2>
      <form class="search" role="search" onSubmit=${search}>
        <label for="hub-query" class="sr-only">Search the hub</label>
        <input id="hub-query" type="search" placeholder="Search GGUF repositories, e.g. gemma 270m" value=${query}
          onInput=${(e) => setQuery(e.currentTarget.value)} autocomplete="off" spellcheck=${false} />
        <button type="submit" class="primary" disabled=${busy || !query.trim()}>${busy ? 'Searching…' : 'Search'}</button>
      </form>
      <${ErrorBox} error=${error} testid="search-error" />
      ${hits && hits.length === 0 ? html`<p class="muted" role="status">No GGUF repositories match “${searched}”.</p>` : null}
      ${hits && hits.length ? html`
        <div class="grid wide-cards" aria-live="polite">${hits.map((h) => html`<${RepoCard} key=${h.repo_id} hit=${h}
          downloads=${downloads} local=${local} onDownload=${onDownload} />`)}</div>` : null}
    </section>`;
}

// ---- downloads -----------------------------------------------------------------------------

function DownloadRow({ d }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const active = ACTIVE.includes(d.status);
  const pct = d.status === 'completed' ? 100 : Math.floor((d.progress || 0) * 100);
  const act = async (path, body) => {
    setBusy(true);
    setError(null);
    try {
      await api(path, { method: 'POST', body });
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  const cancel = () => act(`/api/admin/downloads/${encodeURIComponent(d.id)}/cancel`, {});
  const resume = () =>
    act('/api/admin/hf/download-shards', { repo_id: d.repo_id, filename: d.files[0].filename });
  const labelId = `dl-${d.id}`;
  return html`
    <li class=${`item download ${d.status}`} data-download=${d.id}>
      <div class="download-head">
        <strong id=${labelId}>${d.id}</strong>
        <span class="muted">${d.repo_id}</span>
        <span class=${`status ${d.status}`} data-testid="download-status">${d.status}</span>
      </div>
      <progress max="100" value=${pct} aria-labelledby=${labelId}></progress>
      <p class="download-meta">
        <span data-testid="download-percent">${pct}%</span>
        <span>${formatBytes(d.downloaded_bytes)} / ${formatBytes(d.total_bytes)}</span>
        ${active ? html`<span>${formatBytes(d.speed_bytes_per_sec)}/s</span><span>ETA ${d.eta_secs != null ? formatDuration(d.eta_secs) : '–'}</span>` : null}
        ${d.resumed_from_bytes ? html`<span>resumed at ${formatBytes(d.resumed_from_bytes)}</span>` : null}
        ${d.files.length > 1 ? html`<span>${d.files.filter((f) => f.status === 'done').length} / ${d.files.length} files</span>` : null}
      </p>
      ${d.error ? html`<p class=${d.status === 'failed' ? 'card-error' : 'muted'} data-testid="download-error">${d.error}</p>` : null}
      ${error ? html`<p class="card-error" role="alert">${error.message}${error.details ? `: ${error.details}` : ''}</p>` : null}
      <div class="actions">
        ${active ? html`<button type="button" class="secondary small" disabled=${busy} onClick=${cancel}
          aria-label=${`Cancel download of ${d.id}`}>Cancel</button>` : null}
        ${['cancelled', 'failed'].includes(d.status) && d.files.length ? html`<button type="button" class="secondary small" disabled=${busy}
          onClick=${resume} aria-label=${`Resume download of ${d.id}`}>Resume</button>` : null}
      </div>
    </li>`;
}

function Downloads({ downloads }) {
  const list = Object.values(downloads).sort((a, b) => `${b.started_at}`.localeCompare(`${a.started_at}`));
  if (!list.length) return null;
  return html`
    <section class="panel" aria-labelledby="downloads-title">
      <h2 id="downloads-title">Downloads</h2>
      <ul class="downloads">${list.map((d) => html`<${DownloadRow} key=${d.id} d=${d} />`)}</ul>
    </section>`;
}

// ---- the view ------------------------------------------------------------------------------

/**
 * `downloads`: id → the download as `/api/admin/downloads` lists it, kept live by the Dashboard;
 * `version` changes when a model lands (`models_changed`) or instances change; `onCreate(model)`
 * opens the instance form for the model; `onDownloadStarted(view)` records a new download.
 */
export function ModelsView({ downloads, version, onCreate, onDownloadStarted }) {
  const [models, setModels] = useState(null);
  const [error, setError] = useState(null);
  const [dialog, setDialog] = useState(null);
  const [rescanning, setRescanning] = useState(false);

  const load = async () => {
    try {
      const r = await api('/api/admin/models');
      setModels(r.models);
      setError(null);
    } catch (err) {
      if (err.status !== 401) setError(err);
    }
  };
  useEffect(() => {
    load();
  }, [version]);

  const rescan = async () => {
    setRescanning(true);
    try {
      await api('/api/admin/rescan-shards', { method: 'POST' });
      await load();
    } catch (err) {
      setError(err);
    } finally {
      setRescanning(false);
    }
  };
  const startDownload = async (repo_id, filename) => {
    const r = await api('/api/admin/hf/download-shards', { method: 'POST', body: { repo_id, filename } });
    if (r && r.download) onDownloadStarted(r.download);
    return r;
  };
  const open = (kind, model) => (kind === 'create' ? onCreate(model) : setDialog({ kind, model }));
  const close = () => setDialog(null);
  const local = new Set((models || []).filter((m) => m.complete).map((m) => m.id));

  return html`
    <div class="content-head">
      <h1>Models</h1>
      <button type="button" class="secondary" disabled=${rescanning} onClick=${rescan}>${rescanning ? 'Rescanning…' : 'Rescan'}</button>
    </div>
    <section class="panel" aria-labelledby="local-title">
      <h2 id="local-title">Local models</h2>
      <${ErrorBox} error=${error} />
      ${models === null ? html`<p class="muted">Loading…</p>` : models.length === 0 ? html`
        <div class="empty"><p>No models yet.</p><p class="muted">Download one from Hugging Face below, or copy GGUF files into the data dir's <code>models/</code> and rescan.</p></div>` : html`
        <div class="grid">${models.map((m) => html`<${ModelCard} key=${m.id} model=${m} onOpen=${open} />`)}</div>`}
    </section>
    <${Downloads} downloads=${downloads} />
    <${HubSearch} downloads=${downloads} local=${local} onDownload=${startDownload} />
    ${dialog && dialog.kind === 'metadata' ? html`<${MetadataDialog} model=${dialog.model} onClose=${close} />` : null}
    ${dialog && dialog.kind === 'delete' ? html`<${ConfirmDeleteModel} model=${dialog.model} onClose=${close}
      onDeleted=${() => { close(); load(); }} />` : null}`;
}
