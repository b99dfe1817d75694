// The live log viewer: the instance's log as a followed event stream, a level filter, scrolling
// that follows the newest line until the reader scrolls up, copy and download.

import { useEffect, useLayoutEffect, useRef, useState } from 'preact/hooks';
import { api, stream } from './api.js';
import { html, Modal } from './ui.js';

const KEEP = 5000; // lines kept in the page

function lineText(l) {
  return `${l.timestamp} ${l.level.toUpperCase().padEnd(5)} ${l.message}`;
}

export function LogsDialog({ name, onClose }) {
  const [lines, setLines] = useState([]);
  const [level, setLevel] = useState('');
  const [follow, setFollow] = useState(true);
  const [stick, setStick] = useState(true);
  const [error, setError] = useState(null);
  const [note, setNote] = useState('');
  const box = useRef(null);

  useEffect(() => {
    setLines([]);
    setError(null);
    const controller = new AbortController();
    const query = `lines=1000${level ? `&level=${level}` : ''}`;
    const path = `/api/instances/${encodeURIComponent(name)}/logs?${query}`;
    if (!follow) {
      api(path, { signal: controller.signal })
        .then((r) => setLines(r.logs))
        .catch((e) => e.name !== 'AbortError' && setError(e));
      return () => controller.abort();
    }
    // Lines arrive in bursts (a model load logs hundreds); render once per frame.
    let pending = [];
    let frame = 0;
    const flush = () => {
      frame = 0;
      const add = pending;
      pending = [];
      setLines((old) => {
        const next = old.concat(add);
        return next.length > KEEP ? next.slice(next.length - KEEP) : next;
      });
    };
    stream(`${path}&follow=true`, {
      signal: controller.signal,
      onData: (line) => {
        if (typeof line !== 'object') return;
        pending.push(line);
        if (!frame) frame = requestAnimationFrame(flush);
      },
    }).catch((e) => e.name !== 'AbortError' && setError(e));
    return () => {
      controller.abort();
      if (frame) cancelAnimationFrame(frame);
    };
  }, [name, level, follow]);

  useLayoutEffect(() => {
    if (stick && box.current) box.current.scrollTop = box.current.scrollHeight;
  }, [lines, stick]);

  const onScroll = () => {
    const b = box.current;
    setStick(b.scrollHeight - b.scrollTop - b.clientHeight < 24);
  };
  const text = () => lines.map(lineText).join('\n');
  const copy = async () => {
    try {
      await navigator.clipboard.writeText(text());
      setNote('Copied');
    } catch (_) {
      setNote('Copy is not allowed here; use Download');
    }
    setTimeout(() => setNote(''), 2000);
  };
  const download = () => {
    const url = URL.createObjectURL(new Blob([`${text()}\n`], { type: 'text/plain' }));
    const a = document.createElement('a');
    a.href = url;
    a.download = `${name}-${new Date().toISOString().replace(/[:.]/g, '-')}.log`;
    a.click();
    setTimeout(() => URL.revokeObjectURL(url), 1000);
  };

  return html`
    <${Modal} title=${`Logs: ${name}`} onClose=${onClose} wide label="logs">
      <div class="toolbar">
        <label class="inline">Level
          <select value=${level} onChange=${(e) => setLevel(e.currentTarget.value)}>
            <option value="">all</option>
            <option value="debug">debug and above</option>
            <option value="info">info and above</option>
            <option value="warn">warn and above</option>
            <option value="error">error</option>
          </select>
        </label>
        <label class="check"><input type="checkbox" checked=${follow} onChange=${(e) => setFollow(e.currentTarget.checked)} /> Follow</label>
        <span class="spacer"></span>
        <span class="muted" aria-live="polite">${note || `${lines.length} lines`}</span>
        <button type="button" class="secondary small" onClick=${copy}>Copy</button>
        <button type="button" class="secondary small" onClick=${download}>Download</button>
      </div>
      ${error ? html`<div class="form-error" role="alert"><strong>${error.message}</strong>${error.details ? html`<span>${error.details}</span>` : null}</div>` : null}
      <div class="log-view" ref=${box} onScroll=${onScroll} tabindex="0" role="log" aria-label="Log lines">
        ${lines.map((l, i) => html`<div class=${`log-line ${l.level}`} key=${i}><time>${l.timestamp.slice(11, 23)}</time> <b>${l.level}</b> <span>${l.message}</span></div>`)}
      </div>
      ${!stick ? html`<button type="button" class="jump" onClick=${() => setStick(true)}>Jump to latest ↓</button>` : null}
    <//>`;
}
