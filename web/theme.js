// Runs before the first paint (a classic script in <head>), so a dark page never flashes light.
// The choice is kept in localStorage; without one, the system's preference applies and follows it.
(function () {
  var KEY = 'paddock.theme';
  function system() {
    return window.matchMedia && window.matchMedia('(prefers-color-scheme: dark)').matches ? 'dark' : 'light';
  }
  function chosen() {
    try { var t = localStorage.getItem(KEY); return t === 'dark' || t === 'light' ? t : null; } catch (e) { return null; }
  }
  function apply() { document.documentElement.dataset.theme = chosen() || system(); }
  apply();
  if (window.matchMedia) window.matchMedia('(prefers-color-scheme: dark)').addEventListener('change', apply);
  window.paddockTheme = {
    current: function () { return document.documentElement.dataset.theme; },
    set: function (t) { try { localStorage.setItem(KEY, t); } catch (e) {} apply(); },
  };
})();
