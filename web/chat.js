// The chat playground: streams /v1/chat/completions from one instance, with a stop button,
// temperature and max tokens, and the speed of each answer.

import { useEffect, useRef, useState } from 'preact/hooks';
import { stream } from './api.js';
import { html, Modal } from './ui.js';

export function ChatDialog({ name, onClose }) {
  const [messages, setMessages] = useState([]);
  const [input, setInput] = useState('');
  const [temperature, setTemperature] = useState('0.7');
  const [maxTokens, setMaxTokens] = useState('256');
  const [busy, setBusy] = useState(false);
  const [error, setError] = useState(null);
  const [speed, setSpeed] = useState(null);
  const controller = useRef(null);
  const box = useRef(null);

  useEffect(() => () => controller.current && controller.current.abort(), []);
  useEffect(() => {
    if (box.current) box.current.scrollTop = box.current.scrollHeight;
  }, [messages]);

  const send = async (e) => {
    if (e) e.preventDefault();
    const text = input.trim();
    if (!text || busy) return;
    const history = [...messages, { role: 'user', content: text }];
    setMessages([...history, { role: 'assistant', content: '', pending: true }]);
    setInput('');
    setError(null);
    setSpeed(null);
    setBusy(true);
    const abort = new AbortController();
    controller.current = abort;
    const started = performance.now();
    let first = null;
    let pieces = 0;
    let usage = null;
    let answer = '';
    const update = (extra) =>
      setMessages([...history, { role: 'assistant', content: answer, pending: true, ...extra }]);
    const body = {
      model: name,
      messages: history.map(({ role, content }) => ({ role, content })),
      stream: true,
      stream_options: { include_usage: true },
    };
    if (temperature.trim() !== '') body.temperature = Number(temperature);
    if (maxTokens.trim() !== '') body.max_tokens = Number(maxTokens);
    let stopped = false;
    try {
      await stream('/v1/chat/completions', {
        method: 'POST',
        body,
        signal: abort.signal,
        onData: (chunk) => {
          if (typeof chunk !== 'object' || !chunk) return;
          if (chunk.usage) usage = chunk.usage;
          const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
          if (delta && delta.content) {
            if (first === null) first = performance.now();
            pieces += 1;
            answer += delta.content;
            update();
          }
        },
      });
    } catch (err) {
      if (err.name === 'AbortError') stopped = true;
      else setError(err);
    }
    const ended = performance.now();
    const tokens = usage ? usage.completion_tokens : pieces;
    const generating = first === null ? 0 : (ended - first) / 1000;
    setSpeed({
      tokens,
      ttft: first === null ? null : (first - started) / 1000,
      tps: tokens > 1 && generating > 0 ? (tokens - 1) / generating : null,
      stopped,
    });
    setMessages([...history, { role: 'assistant', content: answer, stopped }]);
    controller.current = null;
    setBusy(false);
  };

  const stop = () => controller.current && controller.current.abort();
  const onKey = (e) => {
    if (e.key === 'Enter' && !e.shiftKey && !e.isComposing) send(e);
  };

  return html`
    <${Modal} title=${`Chat: ${name}`} onClose=${onClose} wide label="chat">
      <div class="toolbar">
        <label class="inline">Temperature
          <input type="number" min="0" max="2" step="0.1" value=${temperature} onInput=${(e) => setTemperature(e.currentTarget.value)} />
        </label>
        <label class="inline">Max tokens
          <input type="number" min="1" step="1" value=${maxTokens} onInput=${(e) => setMaxTokens(e.currentTarget.value)} />
        </label>
        <span class="spacer"></span>
        <span class="muted" aria-live="polite" data-testid="chat-speed">
          ${speed ? `${speed.tokens} tokens${speed.ttft != null ? ` · first token ${speed.ttft.toFixed(2)} s` : ''}${speed.tps ? ` · ${speed.tps.toFixed(1)} tok/s` : ''}${speed.stopped ? ' · stopped' : ''}` : ''}
        </span>
        <button type="button" class="secondary small" disabled=${busy || !messages.length} onClick=${() => { setMessages([]); setSpeed(null); }}>Clear</button>
      </div>
      <div class="chat-log" ref=${box} role="log" aria-label="Conversation" tabindex="0">
        ${messages.length === 0 ? html`<p class="muted">Messages go to <code>/v1/chat/completions</code> with <code>model: "${name}"</code>.</p>` : null}
        ${messages.map((m, i) => html`
          <div class=${`msg ${m.role}`} key=${i} data-role=${m.role}>
            <span class="who">${m.role === 'user' ? 'You' : name}</span>
            <div class="text">${m.content}${m.pending ? html`<span class="cursor" aria-hidden="true">▍</span>` : null}${m.stopped ? html` <em class="muted">(stopped)</em>` : null}</div>
          </div>`)}
      </div>
      ${error ? html`<div class="form-error" role="alert"><strong>${error.message}</strong>${error.details ? html`<span>${error.details}</span>` : null}</div>` : null}
      <form class="chat-input" onSubmit=${send}>
        <label for="chat-message" class="sr-only">Message</label>
        <textarea id="chat-message" rows="2" placeholder="Message (Enter sends, Shift+Enter for a new line)" value=${input}
          onInput=${(e) => setInput(e.currentTarget.value)} onKeyDown=${onKey} autofocus></textarea>
        ${busy
          ? html`<button type="button" class="danger" onClick=${stop}>Stop</button>`
          : html`<button type="submit" class="primary" disabled=${!input.trim()}>Send</button>`}
      </form>
    <//>`;
}
