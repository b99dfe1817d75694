// The Models view end to end: find a model on the local test hub, download it with a progress
// bar, create an instance from it, start it and chat with it. Called by dashboard.mjs with a
// signed-in page; the paddock under test points at the hub (`--hf-endpoint`).
//
// Env: PADDOCK_HUB_URL (the hub, for the log), PADDOCK_HUB_REPO (a repo with a fast
// `PADDOCK_HUB_FILE`, a Q4_K_M GGUF of the test model).

const LONG = 90_000;

/** Controls on the page that no label, aria-label or text names. */
export function unlabelledControls(page) {
  return page.evaluate(() =>
    [...document.querySelectorAll('input, select, textarea, button')]
      .filter((el) => el.offsetParent !== null)
      .filter((el) => {
        if (el.tagName === 'BUTTON') return !(el.textContent.trim() || el.getAttribute('aria-label'));
        return !(el.labels && el.labels.length) && !el.getAttribute('aria-label') && !el.getAttribute('aria-labelledby');
      })
      .map((el) => el.outerHTML.slice(0, 120)),
  );
}

export async function modelsSteps({ page, begin, check, shot }) {
  const repo = process.env.PADDOCK_HUB_REPO;
  const file = process.env.PADDOCK_HUB_FILE;
  check(repo && file, 'PADDOCK_HUB_REPO and PADDOCK_HUB_FILE are set');
  console.log(`dashboard: hub at ${process.env.PADDOCK_HUB_URL}, repo ${repo}`);
  const id = file.replace(/\.gguf$/, '');
  const name = id.toLowerCase();
  const tab = (label) => page.getByRole('tab', { name: label });
  const panel = page.locator('#panel-models');

  begin('models: the tabs switch views, by mouse and by keyboard');
  await tab('Models').click();
  await panel.getByRole('heading', { name: 'Models', exact: true }).waitFor();
  check((await tab('Models').getAttribute('aria-selected')) === 'true', 'Models is the selected tab');
  check(await page.locator('#panel-instances').isHidden(), 'the instances are hidden');
  await tab('Models').press('ArrowLeft');
  await page.getByRole('heading', { name: 'Instances' }).waitFor();
  check(await page.evaluate(() => document.activeElement.id === 'tab-instances'), 'focus follows the arrow key');
  await tab('Instances').press('ArrowRight');
  await panel.getByRole('heading', { name: 'Local models' }).waitFor();
  await panel.getByText('No models yet.').waitFor();

  begin('models: a hub error is shown beside the search');
  await page.route(/\/api\/admin\/hf\/search\?/, (route) =>
    route.fulfill({
      status: 502,
      contentType: 'application/json',
      body: JSON.stringify({ error: 'The hub failed', code: 'HUB_UNREACHABLE', details: 'the hub at http://10.0.0.1 cannot be reached' }),
    }), { times: 1 });
  await page.getByLabel('Search the hub').fill('gemma 270m');
  await page.getByLabel('Search the hub').press('Enter');
  const searchError = panel.getByTestId('search-error');
  await searchError.waitFor();
  check(/hub failed/.test(await searchError.textContent()) && /cannot be reached/.test(await searchError.textContent()),
    'the error and its details are shown');

  begin('models: search the hub');
  await panel.getByRole('button', { name: 'Search', exact: true }).click();
  const card = panel.locator(`article[data-repo="${repo}"]`);
  await card.waitFor();
  check(!(await searchError.count()), 'the error is gone');
  const variant = card.locator(`li[data-variant="${file}"]`);
  check(/Q4_K_M/.test(await variant.textContent()), 'the variant shows its quantization');
  check(/MiB/.test(await variant.locator('.size').textContent()), 'and its size');
  check(await variant.getByTestId('recommended').isVisible(), 'Q4_K_M is the recommended variant');
  check((await card.getByTestId('fits').textContent()).includes('fits in memory'), 'the fits-memory badge');
  check(/↓ 900/.test(await card.textContent()), 'downloads are shown');
  const unlabelled = await unlabelledControls(page);
  check(unlabelled.length === 0, `every control has a label: ${unlabelled.join(', ')}`);
  await shot(page, '10-models');

  begin('models: download with a progress bar');
  // Every status the row shows, in order: the bar is live, not just the end state.
  await page.evaluate(() => {
    window.__downloadStates = [];
    new MutationObserver(() => {
      for (const s of document.querySelectorAll('[data-download] [data-testid="download-status"]')) {
        const last = window.__downloadStates[window.__downloadStates.length - 1];
        if (last !== s.textContent) window.__downloadStates.push(s.textContent);
      }
    }).observe(document.getElementById('panel-models'), { subtree: true, childList: true, characterData: true });
  });
  await variant.getByRole('button', { name: /^Download/ }).click();
  const row = panel.locator(`li[data-download="${id}"]`);
  await row.waitFor();
  await row.getByTestId('download-status').filter({ hasText: 'completed' }).waitFor({ timeout: LONG });
  check((await row.getByTestId('download-percent').textContent()) === '100%', 'the bar says 100%');
  check((await row.locator('progress').evaluate((p) => p.value / p.max)) === 1, 'the bar is full');
  check(!(await row.getByRole('button', { name: /Cancel/ }).count()), 'no Cancel once completed');
  const states = await page.evaluate(() => window.__downloadStates);
  check(states.some((s) => s === 'downloading' || s === 'queued') && states[states.length - 1] === 'completed',
    `the status went from active to completed: ${states.join(' → ')}`);

  begin('models: the downloaded model is listed');
  const model = panel.locator(`article[data-model="${id}"]`);
  await model.waitFor();
  check((await model.getByTestId('shards').textContent()).trim() === '1 / 1', 'one shard of one');
  check((await model.textContent()).includes(repo), 'its source is the repo');
  check(/gemma3/.test(await model.textContent()), 'its architecture is read from the header');
  await variant.getByRole('button', { name: /^Download/ }).filter({ hasText: 'Downloaded' }).waitFor();
  await shot(page, '11-download');

  begin('models: metadata');
  await model.getByRole('button', { name: `Metadata of ${id}` }).click();
  const meta = page.locator('dialog[data-dialog="metadata"]');
  await meta.getByRole('region', { name: 'General' }).waitFor();
  check(/gemma3/.test(await meta.getByRole('region', { name: 'General' }).textContent()), 'the general section');
  check(/context length/.test(await meta.getByRole('region', { name: 'Model' }).textContent()), 'the model section');
  check(/eos token id/.test(await meta.getByRole('region', { name: 'Tokenizer' }).textContent()), 'the tokenizer section');
  await page.keyboard.press('Escape');
  await meta.waitFor({ state: 'detached' });

  begin('models: at 390 px');
  await page.setViewportSize({ width: 390, height: 844 });
  await model.waitFor();
  const width = await page.evaluate(() => document.documentElement.scrollWidth);
  check(width <= 390, `no horizontal scrolling at 390 px (page is ${width} px wide)`);
  await shot(page, '13-models-narrow');
  await page.setViewportSize({ width: 1280, height: 860 });

  begin('models: create an instance from the model');
  await model.getByRole('button', { name: `Create instance from ${id}` }).click();
  const form = page.locator('dialog[data-dialog="instance-form"]');
  await form.waitFor();
  check((await form.getByLabel('Name', { exact: true }).inputValue()) === name, 'the name comes from the model id');
  check((await form.getByLabel('Model path').inputValue()).endsWith(`/models/${file}`), 'the model path is filled in');
  await form.getByLabel('Threads').fill('2');
  await form.getByLabel('Context size').fill('1024');
  await form.getByLabel('Parallel slots').fill('1');
  await form.getByRole('button', { name: 'Create' }).click();
  await form.waitFor({ state: 'detached' });
  check((await tab('Instances').getAttribute('aria-selected')) === 'true', 'back on the instances');
  const instance = page.locator(`article[data-instance="${name}"]`);
  await instance.waitFor();

  begin('models: a model in use is not deleted, and the dialog says why');
  await tab('Models').click();
  await model.getByTestId('used-by').filter({ hasText: name }).waitFor();
  await model.getByRole('button', { name: `Delete ${id}` }).click();
  const confirm = page.locator('dialog[data-dialog="confirm-delete-model"]');
  await confirm.getByRole('button', { name: 'Delete' }).click();
  const refused = confirm.getByTestId('delete-model-error');
  await refused.waitFor();
  check(/in use/.test(await refused.textContent()) && (await refused.textContent()).includes(name), 'the 409 and its details');
  await confirm.getByRole('button', { name: 'Cancel' }).click();
  await confirm.waitFor({ state: 'detached' });
  await tab('Instances').click();

  begin('models: start the new instance and chat with it');
  if ((await instance.getByTestId('status').textContent()).trim() === 'stopped') {
    await instance.getByRole('button', { name: 'Start' }).click();
  }
  await instance.getByTestId('health').filter({ hasText: /^\s*ready\s*$/ }).waitFor({ timeout: LONG });
  await instance.getByRole('button', { name: 'Chat' }).click();
  const chat = page.locator('dialog[data-dialog="chat"]');
  await chat.getByLabel('Max tokens').fill('8');
  await chat.getByLabel('Temperature').fill('0');
  await chat.getByLabel('Message').fill('The capital of France is');
  await chat.getByLabel('Message').press('Enter');
  await chat.getByTestId('chat-speed').filter({ hasText: 'tokens' }).waitFor({ timeout: LONG });
  const answer = (await chat.locator('.msg[data-role="assistant"] .text').textContent()).trim();
  check(answer.length > 0, 'the downloaded model answered');
  await shot(page, '12-model-chat');
  await page.keyboard.press('Escape');
  await chat.waitFor({ state: 'detached' });
}
