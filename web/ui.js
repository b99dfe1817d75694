// Small shared pieces: the html tag, a modal built on <dialog> (focus trap and Escape for free),
// and formatting.

import { h } from 'preact';
import { useEffect, useRef } from 'preact/hooks';
import htm from 'htm';

export const html = htm.bind(h);

let ids = 0;
/** A page-unique id for label/aria wiring. */
export function uid(prefix) {
  ids += 1;
  return `${prefix}-${ids}`;
}

export function Modal({ title, onClose, children, wide, label }) {
  const ref = useRef(null);
  const titleId = useRef(uid('dialog-title')).current;
  useEffect(() => {
    const dialog = ref.current;
    if (!dialog.open) dialog.showModal();
    return () => dialog.open && dialog.close();
  }, []);
  const cancel = (e) => {
    // Escape: let the owner decide (it unmounts the dialog), so state stays in one place.
    e.preventDefault();
    onClose();
  };
  return html`
    <dialog ref=${ref} class=${wide ? 'modal wide' : 'modal'} aria-labelledby=${titleId} data-dialog=${label || ''}
      onCancel=${cancel}>
      <header class="modal-head">
        <h2 id=${titleId}>${title}</h2>
        <button type="button" class="icon" aria-label="Close" onClick=${onClose}>×</button>
      </header>
      ${children}
    </dialog>`;
}

export function formatBytes(n) {
  if (n == null || Number.isNaN(n)) return '–';
  const units = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${units[i]}`;
}

export function formatDuration(seconds) {
  if (seconds == null) return '–';
  const s = Math.floor(seconds);
  const d = Math.floor(s / 86400);
  const hh = Math.floor((s % 86400) / 3600);
  const mm = Math.floor((s % 3600) / 60);
  if (d > 0) return `${d}d ${hh}h`;
  if (hh > 0) return `${hh}h ${mm}m`;
  if (mm > 0) return `${mm}m ${s % 60}s`;
  return `${s}s`;
}

export function baseName(path) {
  if (!path) return '';
  const parts = String(path).split(/[\\/]/);
  return parts[parts.length - 1];
}
