// Headless check of the OHIF viewer served by `pacs serve`, driven by tests/interop/test_ohif.py.
//
//   BASE_URL=http://127.0.0.1:8080 STUDIES='[{"name":"ct","uid":"1.2...","text":"ACC1"}]' \
//   OUT=artifacts/ohif PLAYWRIGHT_CORE=vendor/node/node_modules/playwright-core/index.mjs \
//   node tests/interop/ohif_check.mjs
//
// 1. the study list must show each study's text (its accession number);
// 2. for each study, /viewer?StudyInstanceUIDs=<uid> must draw a non-blank image on the
//    cornerstone canvas, with no error text on the page.
// Writes OUT/results.json (per study: canvas statistics, error texts, thumbnails), the
// screenshots, OUT/network.json and OUT/dicomweb-requests.tsv. Exit code 0 = all passed.
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { pathToFileURL } from 'node:url';

// playwright-core lives in vendor/node (scripts/fetch-ohif.sh), not beside this file:
// ES modules ignore NODE_PATH, so it is imported by path.
const PW = process.env.PLAYWRIGHT_CORE;
const { chromium } = await import(PW ? pathToFileURL(path.resolve(PW)).href : 'playwright-core');

const BASE_URL = process.env.BASE_URL || 'http://127.0.0.1:8080';
const STUDIES = JSON.parse(process.env.STUDIES || '[]');
const OUT = process.env.OUT || 'artifacts/ohif';
const TIMEOUT = Number(process.env.TIMEOUT_MS || 60000);
const CHROMIUM = process.env.CHROMIUM || '/usr/bin/chromium';
// A browser on another host: the node asks it for HTTP Basic credentials (compose setup).
const HTTP_USER = process.env.HTTP_USER;
const HTTP_PASSWORD = process.env.HTTP_PASSWORD;
// The viewer's own host when it is not loopback (BASE_URL's host is always allowed).
const BASE_HOST = new URL(BASE_URL).hostname;
// Texts of OHIF v3's error boundary, toasts and data-source dialog.
const ERROR_TEXTS = ['Something went wrong', 'Data Source Connection Error', 'Error:', 'Unable to',
  'failed to load', 'No matching', 'Request failed'];
fs.mkdirSync(OUT, { recursive: true });

const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'ohif-chrome-'));
const context = await chromium.launchPersistentContext(userDataDir, {
  executablePath: CHROMIUM,
  headless: true,
  viewport: { width: 1400, height: 900 },
  ...(HTTP_USER ? { httpCredentials: { username: HTTP_USER, password: HTTP_PASSWORD || '' } } : {}),
  // A node with a private CA's certificate (checked by the test with that CA).
  ...(process.env.ACCEPT_CERTIFICATE ? { ignoreHTTPSErrors: true } : {}),
  args: [
    '--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync',
  ],
});

// Loopback (and the viewer's host) only: anything else is aborted (and reported), so the
// check never depends on the internet and proves the app-config names no remote server.
const isLocal = u => {
  try { const h = new URL(u).hostname; return h === '127.0.0.1' || h === 'localhost' || h === '[::1]' || h === BASE_HOST; }
  catch { return u.startsWith('data:') || u.startsWith('blob:'); }
};
await context.route('**/*', route => (isLocal(route.request().url()) ? route.continue() : route.abort('blockedbyclient')));

const net = [];
const consoleLines = [];
let phase = 'init';
context.on('request', async req => {
  const rec = { phase, method: req.method(), url: req.url(), status: null };
  net.push(rec);
  try { rec.accept = (await req.allHeaders()).accept ?? null; } catch {}
  rec._req = req;
});
context.on('requestfinished', async req => {
  const rec = net.find(r => r._req === req); if (!rec) return;
  try { const resp = await req.response(); rec.status = resp?.status() ?? null; rec.contentType = resp ? (await resp.allHeaders())['content-type'] : null; } catch {}
});
context.on('requestfailed', req => { const rec = net.find(r => r._req === req); if (rec) rec.failure = req.failure()?.errorText; });
context.on('console', msg => consoleLines.push(`[${phase}] ${msg.type()}: ${msg.text()}`));
context.on('weberror', err => consoleLines.push(`[${phase}] pageerror: ${err.error()?.message}`));
// OHIF's onboarding tour would cover the viewport: mark it as shown.
await context.addInitScript(() => { try { localStorage.setItem('shownTours', JSON.stringify(['basicViewerTour'])); } catch {} });

const page = context.pages()[0] || (await context.newPage());
const results = { studyList: null, studies: {} };
let ok = true;

async function errorTexts() {
  const body = await page.locator('body').innerText().catch(() => '');
  return ERROR_TEXTS.filter(s => body.includes(s));
}

async function canvasStats() {
  return page.locator('canvas.cornerstone-canvas').first().evaluate(c => {
    const ctx = c.getContext('2d');
    if (!ctx) return { error: 'no 2d context', w: c.width, h: c.height };
    const { data } = ctx.getImageData(0, 0, c.width, c.height);
    let nonBlack = 0; const distinct = new Set();
    for (let i = 0; i < data.length; i += 4) {
      if (data[i] + data[i + 1] + data[i + 2] > 30) nonBlack++;
      if (i % 64 === 0) distinct.add(data[i]);
    }
    return { w: c.width, h: c.height, nonBlack, total: data.length / 4, distinctRed: distinct.size };
  });
}

// Thumbnails of the study browser (drawn from /frames with thumbnailRendering 'wadors'):
// each <img> must have loaded with a non-zero size.
async function thumbnails() {
  return page.evaluate(() => [...document.querySelectorAll('[data-cy="study-browser-thumbnail"] img, .study-browser img, img[alt*="humbnail"]')]
    .map(img => ({ complete: img.complete, w: img.naturalWidth, h: img.naturalHeight })));
}

const drawn = s => s && s.nonBlack > 500 && s.distinctRed > 10;

try {
  phase = 'studylist';
  await page.goto(BASE_URL + '/', { waitUntil: 'load', timeout: TIMEOUT });
  const listed = {};
  for (const s of STUDIES) {
    try { await page.getByText(s.text).first().waitFor({ timeout: TIMEOUT }); listed[s.name] = true; }
    catch { listed[s.name] = false; ok = false; console.log(`FAIL: study list lacks ${s.text}`); }
  }
  await page.waitForLoadState('networkidle', { timeout: TIMEOUT }).catch(() => {});
  await page.screenshot({ path: path.join(OUT, 'study-list.png') });
  results.studyList = { listed, errors: await errorTexts() };
  if (results.studyList.errors.length) { ok = false; console.log('FAIL: study list errors', results.studyList.errors); }

  for (const s of STUDIES) {
    phase = `viewer-${s.name}`;
    const rec = { canvas: null, errors: [], thumbnails: [] };
    results.studies[s.name] = rec;
    try {
      await page.goto(`${BASE_URL}/viewer?StudyInstanceUIDs=${s.uid}`, { waitUntil: 'load', timeout: TIMEOUT });
      await page.locator('canvas.cornerstone-canvas').first().waitFor({ state: 'visible', timeout: TIMEOUT });
      const deadline = Date.now() + TIMEOUT;
      while (Date.now() < deadline) {
        rec.canvas = await canvasStats();
        if (drawn(rec.canvas)) break;
        await page.waitForTimeout(500);
      }
      await page.waitForLoadState('networkidle', { timeout: TIMEOUT }).catch(() => {});
      await page.waitForTimeout(1500);
      rec.canvas = await canvasStats();
      rec.thumbnails = await thumbnails();
      rec.errors = await errorTexts();
    } catch (e) {
      rec.exception = e.message;
    }
    await page.screenshot({ path: path.join(OUT, `viewer-${s.name}.png`) }).catch(() => {});
    rec.passed = !rec.exception && drawn(rec.canvas) && rec.errors.length === 0;
    if (!rec.passed) ok = false;
    console.log(`${s.name}: ${rec.passed ? 'OK' : 'FAIL'} canvas=${JSON.stringify(rec.canvas)} errors=${JSON.stringify(rec.errors)}${rec.exception ? ' exception=' + rec.exception : ''}`);
  }
} catch (e) {
  ok = false;
  results.exception = e.message;
  console.log('FAIL:', e.message);
  await page.screenshot({ path: path.join(OUT, `failure-${phase}.png`) }).catch(() => {});
} finally {
  const clean = net.map(({ _req, ...r }) => r);
  const dw = clean.filter(r => /\/dicom-web\//.test(r.url));
  const summary = r => ({ phase: r.phase, status: r.status, failure: r.failure ?? null, path: r.url.replace(BASE_URL, ''), accept: r.accept });
  // net::ERR_ABORTED is the page cancelling a request it no longer needs (cornerstone
  // drops the image loads of a viewport its hanging protocol lays out again); a server
  // that breaks a response off shows as another error (ERR_EMPTY_RESPONSE,
  // ERR_INCOMPLETE_CHUNKED_ENCODING, ERR_CONTENT_LENGTH_MISMATCH ...).
  const cancelled = r => r.failure === 'net::ERR_ABORTED';
  results.failedRequests = dw.filter(r => (r.failure && !cancelled(r)) || (r.status !== null && r.status >= 400)).map(summary);
  results.cancelledRequests = dw.filter(cancelled).map(summary);
  results.blocked = [...new Set(clean.filter(r => r.failure && !isLocal(r.url)).map(r => r.url))];
  fs.writeFileSync(path.join(OUT, 'network.json'), JSON.stringify(clean, null, 1));
  fs.writeFileSync(path.join(OUT, 'console.log'), consoleLines.join('\n') + '\n');
  fs.writeFileSync(path.join(OUT, 'dicomweb-requests.tsv'),
    dw.map(r => `${r.phase}\t${r.method}\t${r.status}\t${r.url.replace(BASE_URL, '')}\tAccept: ${r.accept}`).join('\n') + '\n');
  fs.writeFileSync(path.join(OUT, 'results.json'), JSON.stringify(results, null, 1));
  await context.close();
  fs.rmSync(userDataDir, { recursive: true, force: true });
  console.log(ok ? 'PASS' : 'FAIL');
  process.exit(ok ? 0 : 1);
}
