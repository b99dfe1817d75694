// The create / edit dialog. Everything typed lives in one state object that survives a failed
// submit; server errors are shown at the top with their `error` and `details`, and beside the
// field they name.

import { useEffect, useState, useRef } from 'preact/hooks';
import { api } from './api.js';
import { html, Modal } from './ui.js';

// The server's rule (instance names become URL segments and file names).
const NAME = /^[A-Za-z0-9_-][A-Za-z0-9_.-]{0,63}$/;

export function nameProblem(name) {
  if (!name) return 'A name is required.';
  if (name.length > 64) return 'At most 64 characters.';
  if (name.startsWith('.')) return 'A name cannot start with a dot.';
  if (!NAME.test(name)) return 'Use letters, digits, "-", "_" and "." only.';
  return null;
}

// Typed options paddock knows by name; other rows are llama-server flags (`extra`).
const OPTION_NAMES = new Set([
  'context_size', 'threads', 'threads_batch', 'gpu_layers', 'parallel', 'batch_size', 'ubatch_size', 'queue_size',
  'seed', 'flash_attn', 'embeddings', 'lora', 'rpc_servers', 'isolation', 'tensor_split',
]);
const FORM_OPTIONS = { context_size: 'ctx_size', threads: 'threads', gpu_layers: 'gpu_layers', parallel: 'parallel' };

// Which form field a server message is about: option names and their aliases.
const FIELD_OF = {
  name: 'name', model: 'model', model_path: 'model', hf_repo: 'hf_repo', hf_file: 'hf_file',
  context_size: 'ctx_size', ctx_size: 'ctx_size', n_ctx: 'ctx_size', threads: 'threads', n_threads: 'threads',
  gpu_layers: 'gpu_layers', n_gpu_layers: 'gpu_layers', ngl: 'gpu_layers', parallel: 'parallel',
  n_parallel: 'parallel', np: 'parallel', port: 'port', max_restarts: 'max_restarts',
  restart_delay: 'restart_delay', idle_timeout: 'idle_timeout', auto_restart: 'auto_restart',
  on_demand_start: 'on_demand_start',
};

function fieldOf(error, source) {
  if (error.code === 'INVALID_NAME' || /EXISTS/.test(error.code || '')) return 'name';
  if (error.code === 'MODEL_NOT_FOUND' || error.code === 'INVALID_MODEL') return source === 'hf' ? 'hf_repo' : 'model';
  const text = `${error.details || ''}`;
  // serde's "threads: invalid value…", the validator's "threads must be between…", "unknown field `x`".
  const m = /^([a-z_]+)(?:[.[][^:]*)?:/.exec(text) || /^([a-z_]+) must/.exec(text) || /`([a-z_-]+)`/.exec(text);
  if (m && FIELD_OF[m[1]]) return FIELD_OF[m[1]];
  if (error.code === 'INVALID_OPTIONS' || /flag|extra/.test(text)) return 'extra';
  return null;
}

function initial(instance) {
  const empty = {
    name: '', source: 'path', model: '', hf_repo: '', hf_file: '',
    auto_restart: true, max_restarts: '3', restart_delay: '5', on_demand_start: true, idle_timeout: '0',
    threads: '', ctx_size: '', gpu_layers: '', parallel: '', port: '', extra: [],
  };
  if (!instance) return empty;
  const options = instance.options || {};
  const extra = Object.entries(options)
    .filter(([k]) => !FORM_OPTIONS[k])
    .map(([key, value]) => ({ key, value: typeof value === 'string' ? value : JSON.stringify(value) }));
  const text = (v) => (v == null ? '' : String(v));
  return {
    ...empty,
    name: instance.name,
    source: instance.hf_repo ? 'hf' : 'path',
    model: text(instance.model_path),
    hf_repo: text(instance.hf_repo),
    hf_file: text(instance.hf_file),
    auto_restart: !!instance.auto_restart,
    max_restarts: text(instance.max_restarts),
    restart_delay: text(instance.restart_delay),
    on_demand_start: !!instance.on_demand_start,
    idle_timeout: text(instance.idle_timeout),
    threads: text(options.threads),
    ctx_size: text(options.context_size),
    gpu_layers: text(options.gpu_layers),
    parallel: text(options.parallel),
    port: text(instance.port),
    extra,
  };
}

/** A value typed in a key/value row: JSON when it reads as JSON (numbers, booleans, arrays), else text. */
function parseValue(v) {
  const t = v.trim();
  if (/^(true|false|null|-?\d+(\.\d+)?([eE][-+]?\d+)?)$/.test(t) || /^[[{"]/.test(t)) {
    try {
      return JSON.parse(t);
    } catch (_) {
      return v;
    }
  }
  return v;
}

function body(f) {
  const backend = {};
  if (f.source === 'path') {
    if (f.model.trim()) backend.model = f.model.trim();
  } else {
    if (f.hf_repo.trim()) backend.hf_repo = f.hf_repo.trim();
    if (f.hf_file.trim()) backend.hf_file = f.hf_file.trim();
  }
  for (const key of ['threads', 'ctx_size', 'gpu_layers', 'parallel', 'port']) {
    if (f[key].trim() !== '') backend[key] = Number(f[key]);
  }
  const extra = {};
  for (const { key, value } of f.extra) {
    const k = key.trim();
    if (!k) continue;
    if (OPTION_NAMES.has(k)) backend[k] = parseValue(value);
    else extra[k] = parseValue(value);
  }
  const out = {
    backend_type: 'llama_cpp',
    backend_options: backend,
    auto_restart: f.auto_restart,
    on_demand_start: f.on_demand_start,
  };
  for (const key of ['max_restarts', 'restart_delay', 'idle_timeout']) {
    if (f[key].trim() !== '') out[key] = Number(f[key]);
  }
  if (Object.keys(extra).length) out.extra = extra;
  return out;
}

function Field({ id, label, error, hint, children }) {
  return html`
    <div class=${error ? 'field invalid' : 'field'}>
      <label for=${id}>${label}</label>
      ${children}
      ${hint && !error ? html`<p class="hint" id=${`${id}-hint`}>${hint}</p>` : null}
      ${error ? html`<p class="field-error" id=${`${id}-error`} role="alert">${error}</p>` : null}
    </div>`;
}

/** `instance` to edit, or none to create; `preset` fills fields of a new one (e.g. from a model). */
export function InstanceForm({ instance, preset, onClose, onSaved }) {
  const editing = !!instance;
  const [f, setF] = useState(() => ({ ...initial(instance), ...(editing ? {} : preset) }));
  const [touched, setTouched] = useState(false);
  const [serverError, setServerError] = useState(null);
  const [saving, setSaving] = useState(false);
  const firstRow = useRef(null);
  // The registry's models, offered as suggestions for the model path.
  const [known, setKnown] = useState([]);
  useEffect(() => {
    api('/api/admin/models')
      .then((r) => setKnown(r.models.filter((m) => !m.error)))
      .catch(() => {});
  }, []);

  const set = (key) => (e) => {
    const t = e.currentTarget;
    setF((old) => ({ ...old, [key]: t.type === 'checkbox' ? t.checked : t.value }));
  };
  const nameError = editing ? null : nameProblem(f.name);
  const errorField = serverError ? fieldOf(serverError, f.source) : null;
  const errorFor = (field) => {
    if (field === 'name' && touched && nameError) return nameError;
    if (serverError && errorField === field) return serverError.details || serverError.message;
    return null;
  };

  const submit = async (e) => {
    e.preventDefault();
    setTouched(true);
    if (nameError) return;
    setSaving(true);
    setServerError(null);
    try {
      const name = encodeURIComponent(f.name);
      if (editing) {
        const answer = await api(`/api/instances/${name}`, { method: 'PUT', body: body(f) });
        const status = answer.instance && answer.instance.status;
        if (['running', 'starting', 'restarting'].includes(status)) {
          await api(`/api/instances/${name}/restart`, { method: 'POST' });
        }
      } else {
        await api(`/api/instances/${name}`, { method: 'POST', body: body(f) });
      }
      onSaved(f.name);
    } catch (err) {
      setServerError(err);
    } finally {
      setSaving(false);
    }
  };

  const input = (key, attrs = {}) => {
    const id = `f-${key}`;
    const err = errorFor(key);
    return html`<input id=${id} name=${key} value=${f[key]} onInput=${set(key)} aria-invalid=${err ? 'true' : 'false'}
      aria-describedby=${err ? `${id}-error` : attrs.hint ? `${id}-hint` : undefined} ...${attrs.input || {}} />`;
  };
  const number = (key, label, attrs = {}) => html`
    <${Field} id=${`f-${key}`} label=${label} error=${errorFor(key)} hint=${attrs.hint}>
      ${input(key, { hint: attrs.hint, input: { type: 'number', inputmode: 'numeric', step: attrs.step || '1', min: attrs.min, placeholder: attrs.placeholder } })}
    <//>`;

  const setRow = (i, key) => (e) => {
    const v = e.currentTarget.value;
    setF((old) => ({ ...old, extra: old.extra.map((r, j) => (j === i ? { ...r, [key]: v } : r)) }));
  };
  const addRow = () => {
    setF((old) => ({ ...old, extra: [...old.extra, { key: '', value: '' }] }));
    setTimeout(() => firstRow.current && firstRow.current.focus(), 0);
  };
  const removeRow = (i) => setF((old) => ({ ...old, extra: old.extra.filter((_, j) => j !== i) }));

  return html`
    <${Modal} title=${editing ? `Edit ${instance.name}` : 'Create instance'} onClose=${onClose} label="instance-form">
      <form class="instance-form" onSubmit=${submit} novalidate>
        ${serverError ? html`
          <div class="form-error" role="alert" data-testid="form-error">
            <strong>${serverError.message}</strong>
            ${serverError.details ? html`<span>${serverError.details}</span>` : null}
          </div>` : null}

        <fieldset>
          <legend>Instance</legend>
          <${Field} id="f-name" label="Name" error=${errorFor('name')} hint=${editing ? 'Instances cannot be renamed.' : 'Letters, digits, "-", "_", "."; clients send it as `model`.'}>
            ${input('name', { hint: true, input: { required: true, autocomplete: 'off', readOnly: editing, autofocus: !editing, onBlur: () => setTouched(true), onInput: (e) => { setTouched(true); set('name')(e); } } })}
          <//>
          <div class="field">
            <span class="label" id="source-label">Model source</span>
            <div class="segmented" role="radiogroup" aria-labelledby="source-label">
              <label><input type="radio" name="source" value="path" checked=${f.source === 'path'} onChange=${set('source')} /> Local file</label>
              <label><input type="radio" name="source" value="hf" checked=${f.source === 'hf'} onChange=${set('source')} /> Hugging Face</label>
            </div>
          </div>
          ${f.source === 'path' ? html`
            <${Field} id="f-model" label="Model path" error=${errorFor('model')} hint="Full path to a .gguf file on the server; models in the data dir's models/ and model_dirs are suggested.">
              ${input('model', { hint: true, input: { placeholder: '/models/model.gguf', autocomplete: 'off', spellcheck: false, list: 'known-models' } })}
              <datalist id="known-models">${known.map((m) => html`<option key=${m.id} value=${m.path}>${m.name}${m.quantization ? ` (${m.quantization})` : ''}</option>`)}</datalist>
            <//>` : html`
            <div class="row">
              <${Field} id="f-hf_repo" label="Hugging Face repo" error=${errorFor('hf_repo')}>
                ${input('hf_repo', { input: { placeholder: 'unsloth/gemma-3-27b-it-GGUF', autocomplete: 'off', spellcheck: false } })}
              <//>
              <${Field} id="f-hf_file" label="Hugging Face file" error=${errorFor('hf_file')} hint="Optional.">
                ${input('hf_file', { hint: true, input: { placeholder: 'model-Q4_K_M.gguf', autocomplete: 'off', spellcheck: false } })}
              <//>
            </div>`}
        </fieldset>

        <fieldset>
          <legend>Lifecycle</legend>
          <div class="row checks">
            <label class="check"><input type="checkbox" id="f-auto_restart" checked=${f.auto_restart} onChange=${set('auto_restart')} /> Auto restart</label>
            <label class="check"><input type="checkbox" id="f-on_demand_start" checked=${f.on_demand_start} onChange=${set('on_demand_start')} /> On-demand start</label>
          </div>
          <div class="row">
            ${number('max_restarts', 'Max restarts', { min: 0 })}
            ${number('restart_delay', 'Restart delay (s)', { min: 0, step: 'any' })}
            ${number('idle_timeout', 'Idle timeout (min)', { min: 0, step: 'any', hint: '0 = never' })}
          </div>
        </fieldset>

        <fieldset>
          <legend>Engine</legend>
          <div class="row">
            ${number('threads', 'Threads', { min: 1, placeholder: 'physical cores' })}
            ${number('ctx_size', 'Context size', { min: 0, placeholder: '4096 per slot' })}
            ${number('gpu_layers', 'GPU layers', { placeholder: 'all' })}
            ${number('parallel', 'Parallel slots', { min: 1, placeholder: '4' })}
            ${number('port', 'Port', { min: 0, placeholder: 'none' })}
          </div>
          <div class=${errorFor('extra') ? 'field invalid' : 'field'}>
            <span class="label" id="extra-label">Additional parameters</span>
            <p class="hint">llama-server flags (e.g. <code>flash-attn</code> = <code>on</code>) or paddock option names.</p>
            ${f.extra.map((row, i) => html`
              <div class="kv" key=${i}>
                <input aria-label=${`Parameter ${i + 1} name`} placeholder="flag" value=${row.key} onInput=${setRow(i, 'key')}
                  ref=${i === f.extra.length - 1 ? firstRow : undefined} autocomplete="off" spellcheck=${false} />
                <input aria-label=${`Parameter ${i + 1} value`} placeholder="value" value=${row.value} onInput=${setRow(i, 'value')}
                  autocomplete="off" spellcheck=${false} />
                <button type="button" class="icon" aria-label=${`Remove parameter ${i + 1}`} onClick=${() => removeRow(i)}>×</button>
              </div>`)}
            <button type="button" class="secondary small" onClick=${addRow}>Add parameter</button>
            ${errorFor('extra') ? html`<p class="field-error" role="alert">${errorFor('extra')}</p>` : null}
          </div>
        </fieldset>

        <footer class="modal-foot">
          <button type="button" class="secondary" onClick=${onClose}>Cancel</button>
          <button type="submit" class="primary" disabled=${saving || (!editing && !!nameError)}>
            ${saving ? 'Saving…' : editing ? 'Update & Restart' : 'Create'}
          </button>
        </footer>
      </form>
    <//>`;
}
