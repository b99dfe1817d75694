// The one way the page talks to paddock: JSON calls with the session's token, server-sent
// event streams read through fetch (EventSource cannot send a token), and the live WebSocket.

const TOKEN_KEY = 'paddock.token';
const EXPIRES_KEY = 'paddock.token_expires_at';

export const session = {
  get token() {
    return sessionStorage.getItem(TOKEN_KEY);
  },
  set token(value) {
    if (value) sessionStorage.setItem(TOKEN_KEY, value);
    else {
      sessionStorage.removeItem(TOKEN_KEY);
      sessionStorage.removeItem(EXPIRES_KEY);
    }
  },
  /** Keeps a login answer (`{token, expires_at}`). */
  keep(issued) {
    this.token = issued.token;
    sessionStorage.setItem(EXPIRES_KEY, issued.expires_at);
  },
  /** Milliseconds until the login token expires, or null when unknown. */
  remaining() {
    const at = Date.parse(sessionStorage.getItem(EXPIRES_KEY) || '');
    return Number.isNaN(at) ? null : at - Date.now();
  },
};

/**
 * Renews the login token before it expires, for as long as the tab stays open; an API key (no
 * expiry) or a failed refresh leaves it alone, and the next 401 returns to the sign-in form.
 */
export function keepSignedIn() {
  let timer = null;
  const plan = () => {
    const left = session.remaining();
    if (left === null) return;
    timer = setTimeout(async () => {
      try {
        session.keep(await api('/api/auth/refresh', { method: 'POST' }));
        plan();
      } catch (_) {
        /* the next call's 401 signs out */
      }
    }, Math.max(5000, left - 60000));
  };
  plan();
  return () => clearTimeout(timer);
}

let unauthorized = () => {};
/** Called with no arguments whenever paddock answers 401: the token is gone or never was. */
export function onUnauthorized(handler) {
  unauthorized = handler;
}

/** An error answer: paddock's `{error, code, details}`, or OpenAI's `{error: {message, type, code}}`. */
export class ApiError extends Error {
  constructor(status, body, text) {
    const e = body && body.error;
    const message = typeof e === 'string' ? e : (e && e.message) || text || `HTTP ${status}`;
    super(message);
    this.status = status;
    this.code = (body && body.code) || (e && (e.code || e.type)) || null;
    this.details = (body && body.details) || null;
  }
}

function headers(json) {
  const h = {};
  if (session.token) h.Authorization = `Bearer ${session.token}`;
  if (json) h['Content-Type'] = 'application/json';
  return h;
}

async function send(path, { method = 'GET', body, signal } = {}) {
  let response;
  try {
    response = await fetch(path, {
      method,
      headers: headers(body !== undefined),
      body: body === undefined ? undefined : JSON.stringify(body),
      signal,
    });
  } catch (e) {
    if (e.name === 'AbortError') throw e;
    throw new ApiError(0, null, `paddock cannot be reached (${e.message})`);
  }
  if (response.status === 401 && path !== '/api/auth/login') unauthorized();
  return response;
}

async function failure(response) {
  const text = await response.text();
  let body = null;
  try {
    body = JSON.parse(text);
  } catch (_) {
    /* not JSON: the text is the message */
  }
  return new ApiError(response.status, body, text);
}

/** A JSON call; resolves to the parsed answer, rejects with an ApiError. */
export async function api(path, options = {}) {
  const response = await send(path, options);
  if (!response.ok) throw await failure(response);
  const text = await response.text();
  return text ? JSON.parse(text) : null;
}

/**
 * A call answered with server-sent events; `onData` gets each event's `data` (parsed as JSON
 * when it is JSON). Resolves when the stream ends; abort with `signal`.
 */
export async function stream(path, { method = 'GET', body, signal, onData }) {
  const response = await send(path, { method, body, signal });
  if (!response.ok) throw await failure(response);
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = '';
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, '');
      const data = event
        .split(/\r?\n/)
        .filter((line) => line.startsWith('data:'))
        .map((line) => line.slice(5).replace(/^ /, ''))
        .join('\n');
      if (!data) continue;
      let parsed = data;
      try {
        parsed = JSON.parse(data);
      } catch (_) {
        /* e.g. [DONE] */
      }
      onData(parsed);
    }
  }
}

/**
 * The live events of `/api/ws`. Reconnects with exponential backoff (0.5 s doubling to 15 s,
 * with jitter) until `close()`. `onState` gets 'connecting' | 'live' | 'offline'; after each
 * (re)connect `onOpen` runs so the caller refetches what it may have missed.
 */
export function live({ onEvent, onState, onOpen }) {
  let socket = null;
  let closed = false;
  let delay = 500;
  let timer = null;

  function connect() {
    if (closed) return;
    onState('connecting');
    const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
    // A browser cannot set headers on a WebSocket: the token rides in a subprotocol.
    const protocols = session.token ? ['paddock', `bearer.${session.token}`] : ['paddock'];
    try {
      socket = new WebSocket(`${scheme}://${location.host}/api/ws`, protocols);
    } catch (_) {
      return retry();
    }
    socket.onopen = () => {
      delay = 500;
      onState('live');
      onOpen();
    };
    socket.onmessage = (m) => {
      try {
        onEvent(JSON.parse(m.data));
      } catch (_) {
        /* not an event */
      }
    };
    socket.onclose = () => {
      socket = null;
      retry();
    };
  }

  function retry() {
    if (closed) return;
    onState('offline');
    const wait = delay * (0.75 + Math.random() * 0.5);
    delay = Math.min(delay * 2, 15000);
    timer = setTimeout(connect, wait);
  }

  connect();
  return {
    close() {
      closed = true;
      clearTimeout(timer);
      if (socket) socket.close();
    },
  };
}
