// The dashboard: sign-in, two views (the instance cards, and the models with Hugging Face
// search and downloads) kept current by /api/ws, the system panel, and the dialogs
// (create/edit, logs, chat, delete).

import { render } from 'preact';
import { useCallback, useEffect, useRef, useState } from 'preact/hooks';
import { api, keepSignedIn, live, onUnauthorized, session } from './api.js';
import { ChatDialog } from './chat.js';
import { InstanceForm } from './form.js';
import { LogsDialog } from './logs.js';
import { instanceNameFor, ModelsView, newerDownload } from './models.js';
import { baseName, formatBytes, formatDuration, html, Modal } from './ui.js';

// ---- sign-in -------------------------------------------------------------------------------

function SignIn({ onSignedIn, expired }) {
  const [username, setUsername] = useState('admin');
  const [password, setPassword] = useState('');
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const submit = async (e) => {
    e.preventDefault();
    setBusy(true);
    setError(null);
    try {
      const issued = await api('/api/auth/login', { method: 'POST', body: { username, password } });
      session.keep(issued);
      onSignedIn();
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  return html`
    <main class="signin">
      <form class="card" onSubmit=${submit} aria-labelledby="signin-title">
        <h1 id="signin-title"><img src="/favicon.svg" alt="" width="28" height="28" /> paddock</h1>
        <p class="muted">${expired ? 'Your session ended. Sign in again.' : 'Sign in to manage this server.'}</p>
        ${error ? html`<div class="form-error" role="alert"><strong>${error.message}</strong>${error.details ? html`<span>${error.details}</span>` : null}</div>` : null}
        <div class="field"><label for="username">Username</label>
          <input id="username" autocomplete="username" value=${username} onInput=${(e) => setUsername(e.currentTarget.value)} required /></div>
        <div class="field"><label for="password">Password</label>
          <input id="password" type="password" autocomplete="current-password" value=${password} onInput=${(e) => setPassword(e.currentTarget.value)} required autofocus /></div>
        <button type="submit" class="primary" disabled=${busy || !username || !password}>${busy ? 'Signing in…' : 'Sign in'}</button>
      </form>
    </main>`;
}

// ---- header: system panel, live state, theme ----------------------------------------------

function ThemeToggle() {
  const [theme, setTheme] = useState(() => window.paddockTheme.current());
  const next = theme === 'dark' ? 'light' : 'dark';
  const toggle = () => {
    window.paddockTheme.set(next);
    setTheme(next);
  };
  return html`<button type="button" class="icon theme" onClick=${toggle} aria-label=${`Switch to ${next} theme`} title=${`Switch to ${next} theme`}>
    ${theme === 'dark' ? '☀' : '☾'}</button>`;
}

function SystemPanel({ status, info, connection, instances }) {
  const r = (status && status.resources) || {};
  // Counted from the live list, so they change with the cards, not at the next poll.
  const count = (s) => (instances || []).filter((i) => i.status === s).length;
  const label = { live: 'live', connecting: 'connecting…', offline: 'reconnecting…' }[connection];
  return html`
    <section class="system" aria-label="System">
      <span class=${`conn ${connection}`} data-testid="connection" title="Live updates over /api/ws">${label}</span>
      <dl>
        <div><dt>Version</dt><dd>${(info && info.version) || '–'}</dd></div>
        <div><dt>Uptime</dt><dd>${status ? formatDuration(status.uptime) : '–'}</dd></div>
        <div><dt>Instances</dt><dd data-testid="instance-counts">${instances ? `${count('running')} running / ${instances.length}` : '–'}${count('failed') ? `, ${count('failed')} failed` : ''}</dd></div>
        <div><dt>CPU</dt><dd>${r.cpu_usage != null ? `${r.cpu_usage.toFixed(0)}%` : '–'}</dd></div>
        <div><dt>Memory</dt><dd>${r.memory_total ? `${formatBytes(r.memory_usage)} / ${formatBytes(r.memory_total)}` : '–'}</dd></div>
        <div><dt>paddock</dt><dd>${r.process_memory != null ? formatBytes(r.process_memory) : '–'}</dd></div>
      </dl>
    </section>`;
}

// ---- instance cards ------------------------------------------------------------------------

const RUNNING_LIKE = ['running', 'starting', 'restarting', 'parked'];
/** Statuses an instance can be started (and deleted) from. */
const STARTABLE = ['stopped', 'failed', 'parked'];

/** The health badge: from the status, and the instance's own health check when it runs. */
export function badgeOf(instance, health) {
  if (instance.status === 'failed') return 'failed';
  if (instance.status !== 'running') return 'unknown';
  if (health === undefined) return 'unknown';
  return health === 'healthy' ? 'ready' : 'error';
}

function modelOf(instance) {
  if (instance.hf_repo) return `${instance.hf_repo}${instance.hf_file ? ` / ${instance.hf_file}` : ''}`;
  return baseName(instance.model_path);
}

function InstanceCard({ instance, stats, health, onAction, onOpen }) {
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const s = instance.status;
  const badge = badgeOf(instance, health);
  const act = async (what) => {
    setBusy(true);
    setError(null);
    try {
      await onAction(instance.name, what);
    } catch (err) {
      setError(err);
    } finally {
      setBusy(false);
    }
  };
  const st = stats || instance.stats;
  const slots = instance.model && instance.model.n_parallel;
  return html`
    <article class="instance" data-instance=${instance.name} aria-labelledby=${`title-${instance.name}`}>
      <header>
        <h3 id=${`title-${instance.name}`}>${instance.name}</h3>
        <span class=${`badge ${badge}`} data-testid="health" title="Health">${badge}</span>
      </header>
      <p class="status-line"><span class=${`status ${s}`} data-testid="status">${s}</span>
        ${instance.node ? html` · <span class="node" data-testid="node" title="The node it runs on">on ${instance.node}</span>` : null}
        ${instance.port ? html` · port ${instance.port}` : null}
        ${instance.restarts ? html` · ${instance.restarts} restarts` : null}</p>
      <p class="model" title=${instance.model_path || instance.hf_repo || ''}>${modelOf(instance) || '–'}</p>
      ${instance.memory ? html`<p class="status-line" data-testid="memory"
          title=${`weights ${formatBytes(instance.memory.weights)}, KV cache ${formatBytes(instance.memory.kv)}, compute ${formatBytes(instance.memory.compute)}`}>
        ≈ ${formatBytes(instance.memory.total)}${instance.memory.weights_shared_with.length
          ? ` · weights shared with ${instance.memory.weights_shared_with.join(', ')}` : ''}</p>` : null}
      ${s === 'running' && st ? html`
        <dl class="stats">
          <div><dt>Memory</dt><dd>${formatBytes(st.memory_usage)}</dd></div>
          <div><dt>tok/s</dt><dd data-testid="tps">${(st.tokens_per_second || 0).toFixed(1)}</dd></div>
          <div><dt>Slots</dt><dd>${st.slots_busy || 0}${slots ? ` / ${slots}` : ''}${st.queued ? ` (+${st.queued})` : ''}</dd></div>
        </dl>` : null}
      ${instance.error && s === 'failed' ? html`<p class="card-error">${instance.error}</p>` : null}
      ${error ? html`<p class="card-error" role="alert">${error.message}${error.details ? `: ${error.details}` : ''}</p>` : null}
      <div class="actions">
        <button type="button" class="primary small" disabled=${busy || !STARTABLE.includes(s)} onClick=${() => act('start')}>Start</button>
        <button type="button" class="secondary small" disabled=${busy || !RUNNING_LIKE.includes(s)} onClick=${() => act('stop')}>Stop</button>
        <button type="button" class="secondary small" disabled=${busy || s !== 'running'} onClick=${() => onOpen('chat', instance)}>Chat</button>
        <button type="button" class="secondary small" disabled=${busy || s === 'stopping'} onClick=${() => onOpen('edit', instance)}>Edit</button>
        <button type="button" class="secondary small" onClick=${() => onOpen('logs', instance)}>Logs</button>
        <button type="button" class="danger small" disabled=${busy || !STARTABLE.includes(s)} onClick=${() => onOpen('delete', instance)}
          title=${STARTABLE.includes(s) ? 'Delete' : 'Stop the instance to delete it'}>Delete</button>
      </div>
    </article>`;
}

function ConfirmDelete({ name, onClose, onDeleted }) {
  const [error, setError] = useState(null);
  const [busy, setBusy] = useState(false);
  const confirm = async () => {
    setBusy(true);
    try {
      await api(`/api/instances/${encodeURIComponent(name)}`, { method: 'DELETE' });
      onDeleted(name);
    } catch (err) {
      setError(err);
      setBusy(false);
    }
  };
  return html`
    <${Modal} title="Delete instance" onClose=${onClose} label="confirm-delete">
      <p>Delete <strong>${name}</strong>? Its configuration and logs are removed; the model file stays.</p>
      ${error ? html`<div class="form-error" role="alert"><strong>${error.message}</strong>${error.details ? html`<span>${error.details}</span>` : null}</div>` : null}
      <footer class="modal-foot">
        <button type="button" class="secondary" onClick=${onClose} autofocus>Cancel</button>
        <button type="button" class="danger" disabled=${busy} onClick=${confirm}>Delete</button>
      </footer>
    <//>`;
}

// ---- views ---------------------------------------------------------------------------------

const VIEWS = [
  { id: 'instances', label: 'Instances' },
  { id: 'models', label: 'Models' },
];

function viewOfHash() {
  return location.hash === '#models' ? 'models' : 'instances';
}

/** The view switcher: ARIA tabs, arrow keys / Home / End move between them. */
function Tabs({ view, onChange, activeDownloads }) {
  const onKey = (e) => {
    const i = VIEWS.findIndex((v) => v.id === view);
    const to = { ArrowRight: i + 1, ArrowLeft: i - 1, Home: 0, End: VIEWS.length - 1 }[e.key];
    if (to === undefined) return;
    e.preventDefault();
    const next = VIEWS[(to + VIEWS.length) % VIEWS.length].id;
    onChange(next);
    document.getElementById(`tab-${next}`).focus();
  };
  return html`
    <nav class="tabs" role="tablist" aria-label="Views" onKeyDown=${onKey}>
      ${VIEWS.map((v) => html`
        <button type="button" role="tab" id=${`tab-${v.id}`} key=${v.id} aria-selected=${view === v.id ? 'true' : 'false'}
          aria-controls=${`panel-${v.id}`} tabindex=${view === v.id ? 0 : -1} onClick=${() => onChange(v.id)}>
          ${v.label}${v.id === 'models' && activeDownloads ? html` <span class="count" title="Downloads in progress">${activeDownloads}</span>` : null}
        </button>`)}
    </nav>`;
}

// ---- the page ------------------------------------------------------------------------------

function Dashboard({ onSignOut }) {
  const [instances, setInstances] = useState(null);
  const [stats, setStats] = useState({});
  const [health, setHealth] = useState({});
  const [status, setStatus] = useState(null);
  const [info, setInfo] = useState(null);
  const [connection, setConnection] = useState('connecting');
  const [dialog, setDialog] = useState(null); // {kind, instance}
  const [alerts, setAlerts] = useState([]);
  const [loadError, setLoadError] = useState(null);
  const [view, setView] = useState(viewOfHash);
  const [modelsSeen, setModelsSeen] = useState(view === 'models');
  const [downloads, setDownloads] = useState({});
  // Bumped when the local models may have changed: a download landed, instances changed.
  const [modelsVersion, setModelsVersion] = useState(0);
  const checking = useRef(new Set());

  const upsert = (instance) =>
    setInstances((old) => {
      const list = old || [];
      const i = list.findIndex((x) => x.name === instance.name);
      if (i < 0) return [...list, instance].sort((a, b) => a.name.localeCompare(b.name));
      const next = list.slice();
      next[i] = instance;
      return next;
    });
  const remove = (name) => setInstances((old) => (old || []).filter((x) => x.name !== name));

  const loadAll = useCallback(async () => {
    try {
      const r = await api('/api/instances');
      setInstances(r.instances.slice().sort((a, b) => a.name.localeCompare(b.name)));
      setLoadError(null);
    } catch (err) {
      if (err.status !== 401) setLoadError(err);
    }
  }, []);
  const loadDownloads = useCallback(async () => {
    try {
      const r = await api('/api/admin/downloads');
      setDownloads((old) => {
        const next = { ...old };
        for (const d of r.downloads) next[d.id] = newerDownload(old[d.id], d);
        return next;
      });
    } catch (_) {
      /* shown when the view's own calls fail */
    }
  }, []);
  const loadOne = useCallback(async (name) => {
    try {
      upsert(await api(`/api/instances/${encodeURIComponent(name)}`));
    } catch (err) {
      if (err.status === 404) remove(name);
    }
  }, []);
  const checkHealth = useCallback(async (name) => {
    if (checking.current.has(name)) return;
    checking.current.add(name);
    try {
      const h = await api(`/api/instances/${encodeURIComponent(name)}/health`);
      setHealth((old) => ({ ...old, [name]: h.status }));
    } catch (_) {
      setHealth((old) => ({ ...old, [name]: 'error' }));
    } finally {
      checking.current.delete(name);
    }
  }, []);

  // Live events; every (re)connect refetches, so nothing missed while offline stays stale.
  useEffect(() => {
    const socket = live({
      onState: setConnection,
      onOpen: () => {
        loadAll();
        loadDownloads();
        setModelsVersion((v) => v + 1);
      },
      onEvent: (e) => {
        const d = e.data || {};
        switch (e.type) {
          case 'instance_status_changed':
            setInstances((old) => (old || []).map((x) => (x.name === d.name ? { ...x, status: d.new_status } : x)));
            setHealth((old) => ({ ...old, [d.name]: undefined }));
            loadOne(d.name);
            break;
          case 'instance_created':
          case 'instance_updated':
            loadOne(d.name);
            setModelsVersion((v) => v + 1);
            break;
          case 'instance_deleted':
            remove(d.name);
            setModelsVersion((v) => v + 1);
            break;
          case 'download_progress':
            setDownloads((old) => ({ ...old, [d.id]: newerDownload(old[d.id], d) }));
            break;
          case 'models_changed':
            setModelsVersion((v) => v + 1);
            break;
          case 'activity_event':
            setAlerts((old) => [{ level: d.toast_level, message: d.message, at: e.timestamp }, ...old].slice(0, 5));
            break;
          case 'instance_stats_updated':
            setStats((old) => ({ ...old, [d.name]: d }));
            break;
          case 'system_alert':
            setAlerts((old) => [{ ...d, at: e.timestamp }, ...old].slice(0, 5));
            break;
          case 'lagged':
            loadAll();
            loadDownloads();
            setModelsVersion((v) => v + 1);
            break;
          default:
        }
      },
    });
    return () => socket.close();
  }, []);

  useEffect(() => keepSignedIn(), []);

  // The system panel's figures are not events: poll them.
  useEffect(() => {
    api('/api/system/info').then(setInfo).catch(() => {});
    let stop = false;
    const tick = () =>
      api('/api/system/status')
        .then((s) => !stop && setStatus(s))
        .catch(() => {});
    tick();
    const t = setInterval(tick, 5000);
    return () => {
      stop = true;
      clearInterval(t);
    };
  }, []);

  // A running instance without a known health gets one check.
  useEffect(() => {
    for (const i of instances || []) {
      if (i.status === 'running' && health[i.name] === undefined) checkHealth(i.name);
    }
  }, [instances, health]);

  const onAction = async (name, what) => {
    await api(`/api/instances/${encodeURIComponent(name)}/${what}`, { method: 'POST' });
    loadOne(name);
  };
  const open = (kind, instance) => setDialog({ kind, instance });
  const close = () => setDialog(null);
  const signedIn = !!session.token;

  useEffect(() => {
    const follow = () => setView(viewOfHash());
    window.addEventListener('hashchange', follow);
    return () => window.removeEventListener('hashchange', follow);
  }, []);
  useEffect(() => {
    if (view === 'models') setModelsSeen(true);
  }, [view]);
  const switchTo = (next) => {
    setView(next);
    history.replaceState(null, '', next === 'models' ? '#models' : location.pathname + location.search);
  };
  // "Create instance" on a model: the instance form, filled in with its path and a free name.
  const createFrom = (model) => {
    const taken = new Set((instances || []).map((i) => i.name));
    setDialog({ kind: 'create', preset: { name: instanceNameFor(model.id, taken), source: 'path', model: model.path } });
  };
  const activeDownloads = Object.values(downloads).filter((d) => ['queued', 'downloading'].includes(d.status)).length;

  return html`
    <header class="top">
      <div class="brand"><img src="/favicon.svg" alt="" width="24" height="24" /><span>paddock</span></div>
      <${SystemPanel} status=${status} info=${info} connection=${connection} instances=${instances} />
      <div class="top-actions">
        <${ThemeToggle} />
        ${signedIn ? html`<button type="button" class="secondary small" onClick=${onSignOut}>Sign out</button>` : null}
      </div>
    </header>
    <${Tabs} view=${view} onChange=${switchTo} activeDownloads=${activeDownloads} />
    <main class="content">
      ${alerts.length ? html`<ul class="alerts" aria-label="Alerts">${alerts.map((a, i) => html`
        <li class=${`alert ${a.level}`} key=${`${a.at}-${i}`}>${a.instance ? html`<strong>${a.instance}</strong>: ` : null}${a.message}
          <button type="button" class="icon" aria-label="Dismiss alert" onClick=${() => setAlerts((old) => old.filter((_, j) => j !== i))}>×</button></li>`)}</ul>` : null}
      <div id="panel-models" role="tabpanel" aria-labelledby="tab-models" hidden=${view !== 'models'}>
        ${modelsSeen ? html`<${ModelsView} downloads=${downloads} version=${modelsVersion} onCreate=${createFrom}
          onDownloadStarted=${(d) => setDownloads((old) => ({ ...old, [d.id]: newerDownload(old[d.id], d) }))} />` : null}
      </div>
      <div id="panel-instances" role="tabpanel" aria-labelledby="tab-instances" hidden=${view !== 'instances'}>
      <div class="content-head">
        <h1>Instances</h1>
        <button type="button" class="primary" onClick=${() => open('create', null)}>Create instance</button>
      </div>
      ${loadError ? html`<div class="form-error" role="alert"><strong>${loadError.message}</strong>${loadError.details ? html`<span>${loadError.details}</span>` : null}</div>` : null}
      ${instances === null ? html`<p class="muted">Loading…</p>` : instances.length === 0 ? html`
        <div class="empty"><p>No instances yet.</p><p class="muted">Create one from a GGUF file, or start paddock with <code>paddock serve -m model.gguf</code>.</p></div>` : html`
        <div class="grid">${instances.map((i) => html`<${InstanceCard} key=${i.name} instance=${i} stats=${stats[i.name]}
          health=${health[i.name]} onAction=${onAction} onOpen=${open} />`)}</div>`}
      </div>
    </main>
    ${dialog && (dialog.kind === 'create' || dialog.kind === 'edit') ? html`<${InstanceForm} instance=${dialog.instance}
      preset=${dialog.preset} onClose=${close} onSaved=${(name) => { close(); loadOne(name); switchTo('instances'); }} />` : null}
    ${dialog && dialog.kind === 'logs' ? html`<${LogsDialog} name=${dialog.instance.name} onClose=${close} />` : null}
    ${dialog && dialog.kind === 'chat' ? html`<${ChatDialog} name=${dialog.instance.name} onClose=${close} />` : null}
    ${dialog && dialog.kind === 'delete' ? html`<${ConfirmDelete} name=${dialog.instance.name} onClose=${close}
      onDeleted=${(name) => { close(); remove(name); }} />` : null}`;
}

function App() {
  // 'checking' until the first call says whether credentials are needed.
  const [state, setState] = useState('checking');
  const [expired, setExpired] = useState(false);
  useEffect(() => {
    onUnauthorized(() => {
      setExpired(!!session.token);
      session.token = null;
      setState('signin');
    });
    api('/api/system/info')
      .then(() => setState('in'))
      .catch((err) => setState(err.status === 401 ? 'signin' : 'in'));
  }, []);
  if (state === 'checking') return html`<p class="boot">Loading paddock…</p>`;
  if (state === 'signin') return html`<${SignIn} expired=${expired} onSignedIn=${() => { setExpired(false); setState('in'); }} />`;
  return html`<${Dashboard} onSignOut=${() => { session.token = null; setState('signin'); }} />`;
}

render(html`<${App} />`, document.getElementById('app'));
