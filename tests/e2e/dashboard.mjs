// The dashboard end to end in Debian's chromium, driven by playwright-core, against a real
// paddock (started by tests/dashboard.rs) serving the real test model, with a local test hub
// for the Models view (models.mjs).
//
// Env: PADDOCK_URL, PADDOCK_ADMIN_PASSWORD, PADDOCK_TEST_MODEL, OUT_DIR (screenshots), CHROMIUM,
// and PADDOCK_HUB_URL, PADDOCK_HUB_REPO, PADDOCK_HUB_FILE (see models.mjs).

import { mkdirSync } from 'node:fs';
import { join } from 'node:path';
import { chromium } from 'playwright-core';
import { modelsSteps, unlabelledControls } from './models.mjs';

const base = process.env.PADDOCK_URL;
const password = process.env.PADDOCK_ADMIN_PASSWORD;
const model = process.env.PADDOCK_TEST_MODEL;
const out = process.env.OUT_DIR;
for (const [k, v] of Object.entries({ PADDOCK_URL: base, PADDOCK_ADMIN_PASSWORD: password, PADDOCK_TEST_MODEL: model, OUT_DIR: out })) {
  if (!v) throw new Error(`${k} is not set`);
}
mkdirSync(out, { recursive: true });

const NAME = 'e2e-gemma';
const LONG = 90_000; // a model load on a busy 2-core machine

let step = '';
function begin(name) {
  step = name;
  console.log(`dashboard: ${name}`);
}
function check(ok, message) {
  if (!ok) throw new Error(`${step}: ${message}`);
}
async function shot(page, name) {
  await page.screenshot({ path: join(out, `${name}.png`), fullPage: true });
}

const browser = await chromium.launch({
  executablePath: process.env.CHROMIUM || '/usr/bin/chromium',
  // As the machine's probe runs it: no sandbox as root, and nothing that phones home.
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run', '--disable-background-networking',
    '--disable-component-update', '--disable-sync', '--disable-dev-shm-usage'],
});
const failures = [];
try {
  const context = await browser.newContext({ viewport: { width: 1280, height: 860 }, colorScheme: 'light' });
  const page = await context.newPage();
  page.setDefaultTimeout(20_000);
  const outside = [];
  const problems = [];
  page.on('request', (r) => {
    const url = r.url();
    if (!url.startsWith(base) && !url.startsWith('data:') && !url.startsWith('blob:')) outside.push(url);
  });
  page.on('pageerror', (e) => problems.push(`page error: ${e.message}`));
  page.on('console', (m) => {
    // 401s and 404s the page expects show as "Failed to load resource"; anything else is a bug.
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) problems.push(m.text());
  });
  // Every /api/ws connection passes through, so the test can cut one as a network drop would.
  const sockets = [];
  await page.routeWebSocket(/\/api\/ws$/, (ws) => {
    ws.connectToServer();
    sockets.push(ws);
  });
  const card = () => page.locator(`article[data-instance="${NAME}"]`);
  const badge = () => card().getByTestId('health');
  const statusOf = () => card().getByTestId('status');
  const waitText = (locator, text, timeout = LONG) =>
    locator.filter({ hasText: new RegExp(`^\\s*${text}\\s*$`) }).waitFor({ timeout });
  const apiGet = (path) =>
    page.evaluate(async (p) => {
      const r = await fetch(p, { headers: { Authorization: `Bearer ${sessionStorage.getItem('paddock.token')}` } });
      return { status: r.status, body: await r.json() };
    }, path);

  begin('sign in');
  await page.goto(base);
  await page.locator('#password').waitFor();
  await shot(page, '01-sign-in');
  await page.getByLabel('Username').fill('admin');
  await page.getByLabel('Password').fill('not the password');
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.locator('.signin [role=alert]').waitFor();
  check(/username or password|credentials/i.test(await page.locator('.signin [role=alert]').textContent()),
    'a wrong password says so');
  await page.getByLabel('Password').fill(password);
  await page.getByRole('button', { name: 'Sign in' }).click();
  await page.getByRole('heading', { name: 'Instances' }).waitFor();
  check(!!(await page.evaluate(() => sessionStorage.getItem('paddock.token'))), 'the token is kept in sessionStorage');
  await page.getByTestId('connection').filter({ hasText: 'live' }).waitFor();

  begin('the live socket reconnects after a drop');
  const before = sockets.length;
  await sockets[sockets.length - 1].close({ code: 1012, reason: 'dropped by the test' });
  await page.getByTestId('connection').filter({ hasText: 'reconnecting' }).waitFor();
  await page.getByTestId('connection').filter({ hasText: 'live' }).waitFor();
  check(sockets.length === before + 1, 'a new socket was opened');
  // Everything below that changes without a reload arrives over the new socket.

  // Set once; still there at the end means the page never reloaded.
  await page.evaluate(() => { window.__noReload = true; });

  begin('create: validation as you type');
  await page.getByRole('button', { name: 'Create instance' }).click();
  const form = page.locator('dialog[data-dialog="instance-form"]');
  await form.waitFor();
  await form.getByLabel('Name', { exact: true }).fill('bad name');
  await form.locator('#f-name-error').waitFor();
  check(await form.getByRole('button', { name: 'Create' }).isDisabled(), 'Create is disabled while the name is invalid');
  await form.getByLabel('Name', { exact: true }).fill(NAME);
  await form.locator('#f-name-error').waitFor({ state: 'detached' });

  begin('create: the server\'s errors, next to their fields, nothing lost');
  await form.getByLabel('Model path').fill('/nonexistent/model.gguf');
  await form.getByLabel('Threads').fill('2');
  await form.getByLabel('Context size').fill('2048');
  await form.getByLabel('Parallel slots').fill('2');
  await form.getByLabel('Idle timeout (min)').fill('0');
  await form.getByRole('button', { name: 'Add parameter' }).click();
  await form.getByLabel('Parameter 1 name').fill('flash-attn');
  await form.getByLabel('Parameter 1 value').fill('auto');
  await form.getByRole('button', { name: 'Create' }).click();
  await form.locator('#f-model-error').waitFor();
  check(/not found|no such|nonexistent/i.test(await form.locator('#f-model-error').textContent()), 'the model path error is beside the field');
  check(await form.getByTestId('form-error').isVisible(), 'the error and details are shown above the form');
  check((await form.getByLabel('Threads').inputValue()) === '2', 'threads kept');
  check((await form.getByLabel('Name', { exact: true }).inputValue()) === NAME, 'name kept');
  check((await form.getByLabel('Parameter 1 value').inputValue()) === 'auto', 'extra rows kept');
  await shot(page, '02-create-model-error');

  await form.getByLabel('Model path').fill(model);
  await form.getByLabel('Threads').fill('-2');
  await form.getByRole('button', { name: 'Create' }).click();
  await form.locator('#f-threads-error').waitFor();
  check(/threads/i.test(await form.getByTestId('form-error').textContent()), 'the options error names threads');
  check(!(await form.locator('#f-model-error').count()), 'the fixed model path no longer shows an error');
  await shot(page, '03-create-threads-error');

  begin('create');
  await form.getByLabel('Threads').fill('2');
  await form.getByRole('button', { name: 'Create' }).click();
  await form.waitFor({ state: 'detached' });
  await card().waitFor();
  check(['stopped', 'running', 'starting'].includes((await statusOf().textContent()).trim()), 'the new card shows a status');
  const created = await apiGet(`/api/instances/${NAME}`);
  check(created.body.options.threads === 2 && created.body.options.context_size === 2048, `options saved: ${JSON.stringify(created.body.options)}`);
  check(created.body.options.flash_attn === 'auto', 'the additional parameter was sent');

  begin('start: the badge turns ready without a reload');
  if ((await statusOf().textContent()).trim() === 'stopped') {
    await card().getByRole('button', { name: 'Start' }).click();
  }
  await waitText(badge(), 'ready');
  check((await statusOf().textContent()).trim() === 'running', 'status running');
  check(await page.evaluate(() => window.__noReload === true), 'no reload happened');
  check(await card().getByRole('button', { name: 'Delete' }).isDisabled(), 'Delete is disabled while running');
  check(await card().getByRole('button', { name: 'Start' }).isDisabled(), 'Start is disabled while running');
  await card().locator('.stats').waitFor();
  await page.getByTestId('instance-counts').filter({ hasText: '1 running / 1' }).waitFor();
  await shot(page, '04-dashboard-running');

  begin('chat: streamed text');
  await card().getByRole('button', { name: 'Chat' }).click();
  const chat = page.locator('dialog[data-dialog="chat"]');
  await chat.waitFor();
  await chat.getByLabel('Max tokens').fill('12');
  await chat.getByLabel('Temperature').fill('0');
  await chat.getByLabel('Message').fill('Write one sentence about the sea.');
  // Count the answer's updates while it streams: more than one means it arrived in pieces.
  await page.evaluate(() => {
    window.__chatUpdates = 0;
    const log = document.querySelector('dialog[data-dialog="chat"] .chat-log');
    new MutationObserver(() => { window.__chatUpdates += 1; }).observe(log, { subtree: true, characterData: true, childList: true });
  });
  await chat.getByLabel('Message').press('Enter');
  await chat.getByTestId('chat-speed').filter({ hasText: 'tokens' }).waitFor({ timeout: LONG });
  const answer = (await chat.locator('.msg[data-role="assistant"] .text').textContent()).trim();
  check(answer.length > 0, 'the assistant answered');
  check(await page.evaluate(() => window.__chatUpdates > 2), 'the answer streamed in pieces');
  check(/tok\/s/.test(await chat.getByTestId('chat-speed').textContent()), 'tokens per second are shown');
  await shot(page, '05-chat');
  await page.keyboard.press('Escape');
  await chat.waitFor({ state: 'detached' });

  begin('logs: model-load lines, level filter, follow');
  await card().getByRole('button', { name: 'Logs' }).click();
  const logs = page.locator('dialog[data-dialog="logs"]');
  await logs.locator('.log-line', { hasText: 'model loaded' }).first().waitFor({ timeout: LONG });
  check((await logs.locator('.log-line').count()) > 10, 'the load logged many lines');
  await shot(page, '06-logs');
  await logs.getByLabel('Level').selectOption('warn');
  await page.waitForFunction(() => {
    const lines = [...document.querySelectorAll('dialog[data-dialog="logs"] .log-line')];
    return lines.every((l) => l.classList.contains('warn') || l.classList.contains('error'));
  });
  await logs.getByLabel('Level').selectOption('');
  await logs.locator('.log-line', { hasText: 'model loaded' }).first().waitFor();
  await logs.locator('.log-view').evaluate((el) => { el.scrollTop = 0; el.dispatchEvent(new Event('scroll')); });
  await logs.getByRole('button', { name: /Jump to latest/ }).waitFor();
  const download = page.waitForEvent('download');
  await logs.getByRole('button', { name: 'Download' }).click();
  check((await download).suggestedFilename().startsWith(NAME), 'the download is named after the instance');
  await logs.getByRole('button', { name: 'Close' }).click();
  await logs.waitFor({ state: 'detached' });

  begin('edit threads, Update & Restart');
  await card().getByRole('button', { name: 'Edit' }).click();
  await form.waitFor();
  check((await form.getByLabel('Threads').inputValue()) === '2', 'the form is filled in');
  check((await form.getByLabel('Model path').inputValue()) === model, 'the model path is filled in');
  await form.getByLabel('Threads').fill('1');
  await form.getByRole('button', { name: 'Update & Restart' }).click();
  await form.waitFor({ state: 'detached' });
  await page.waitForFunction(async (name) => {
    const r = await fetch(`/api/instances/${name}/logs?lines=2000`, { headers: { Authorization: `Bearer ${sessionStorage.getItem('paddock.token')}` } });
    const { logs: lines } = await r.json();
    return lines.filter((l) => l.message.startsWith('model loaded')).length >= 2;
  }, NAME, { timeout: LONG, polling: 500 });
  await waitText(badge(), 'ready');
  const edited = await apiGet(`/api/instances/${NAME}`);
  check(edited.body.options.threads === 1 && edited.body.status === 'running', `threads 1 and running: ${JSON.stringify(edited.body.options)}`);

  begin('stop');
  await card().getByRole('button', { name: 'Stop' }).click();
  await waitText(statusOf(), 'stopped');
  await waitText(badge(), 'unknown');
  check(await card().getByRole('button', { name: 'Delete' }).isEnabled(), 'Delete is enabled once stopped');

  begin('delete through the confirm dialog');
  await card().getByRole('button', { name: 'Delete' }).click();
  const confirm = page.locator('dialog[data-dialog="confirm-delete"]');
  await confirm.waitFor();
  await shot(page, '07-confirm-delete');
  await confirm.getByRole('button', { name: 'Cancel' }).click();
  await confirm.waitFor({ state: 'detached' });
  check(await card().isVisible(), 'Cancel keeps the instance');
  await card().getByRole('button', { name: 'Delete' }).click();
  await confirm.getByRole('button', { name: 'Delete' }).click();
  await card().waitFor({ state: 'detached' });
  check((await apiGet(`/api/instances/${NAME}`)).status === 404, 'the instance is gone');
  check(await page.evaluate(() => window.__noReload === true), 'still no reload');

  begin('labels and keyboard');
  await page.getByRole('button', { name: 'Create instance' }).focus();
  await page.keyboard.press('Enter');
  await form.waitFor();
  const unlabelled = await unlabelledControls(page);
  check(unlabelled.length === 0, `every control has a label: ${unlabelled.join(', ')}`);
  check(await page.evaluate(() => document.activeElement && document.activeElement.id === 'f-name'), 'focus starts on the name');
  await page.keyboard.press('Escape');
  await form.waitFor({ state: 'detached' });

  begin('theme survives a reload; the token is renewed before it expires');
  check((await page.evaluate(() => document.documentElement.dataset.theme)) === 'light', 'the system preference (light) applies first');
  await page.getByRole('button', { name: 'Switch to dark theme' }).click();
  check((await page.evaluate(() => document.documentElement.dataset.theme)) === 'dark', 'dark after the toggle');
  // Pretend the login token is about to expire: after the reload the page renews it.
  const oldToken = await page.evaluate(() => {
    sessionStorage.setItem('paddock.token_expires_at', new Date(Date.now() + 61_000).toISOString());
    return sessionStorage.getItem('paddock.token');
  });
  await page.reload();
  await page.getByRole('heading', { name: 'Instances' }).waitFor();
  check((await page.evaluate(() => document.documentElement.dataset.theme)) === 'dark', 'dark after a reload');
  await page.getByRole('button', { name: 'Switch to light theme' }).waitFor();
  await shot(page, '08-dark');
  await page.waitForFunction((old) => sessionStorage.getItem('paddock.token') !== old, oldToken, { timeout: 20_000 });
  check((await apiGet('/api/instances')).status === 200, 'the renewed token works');

  begin('narrow screen (390 px)');
  await page.setViewportSize({ width: 390, height: 844 });
  await page.getByRole('button', { name: 'Create instance' }).waitFor();
  const overflow = await page.evaluate(() => document.documentElement.scrollWidth);
  check(overflow <= 390, `no horizontal scrolling at 390 px (page is ${overflow} px wide)`);
  await shot(page, '09-narrow');
  await page.setViewportSize({ width: 1280, height: 860 });

  // The Models view: hub search, a download with its progress bar, an instance from it, a chat.
  await modelsSteps({ page, begin, check, shot });

  begin('a 401 returns to the sign-in form');
  await page.evaluate(() => sessionStorage.setItem('paddock.token', 'expired.or.forged'));
  await page.reload();
  await page.locator('#password').waitFor();
  check(/session ended/i.test(await page.locator('.signin').textContent()), 'the sign-in form says the session ended');

  begin('the page stays on its origin and breaks no policy');
  check(outside.length === 0, `requests to other hosts: ${outside.join(', ')}`);
  check(problems.length === 0, `console errors: ${problems.join(' | ')}`);
} catch (e) {
  failures.push(e);
  try {
    const pages = browser.contexts().flatMap((c) => c.pages());
    if (pages[0]) await pages[0].screenshot({ path: join(out, 'failure.png'), fullPage: true });
  } catch (_) {
    /* the failure itself is what matters */
  }
} finally {
  await browser.close();
}
if (failures.length) {
  console.error(`dashboard: FAILED at "${step}": ${failures[0].stack || failures[0]}`);
  process.exit(1);
}
console.log(`dashboard: all steps passed; screenshots in ${out}`);
