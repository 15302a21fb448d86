// Tollgate chargeback dashboard. Vanilla ES2020, no dependencies and no external
// requests, so it works offline and can be embedded into the gateway binary.
'use strict';

const TOKEN_KEY = 'tollgate.adminToken';
const PALETTE = ['#4e79a7', '#f28e2b', '#59a14f', '#e15759', '#76b7b2',
  '#edc948', '#b07aa1', '#ff9da7', '#9c755f', '#bab0ac'];
const SVG_NS = 'http://www.w3.org/2000/svg';
const TOP_N = 10;

const $ = (id) => document.getElementById(id);
// Each load bumps the generation; responses from an older generation are dropped,
// so quickly changing filters can never paint stale numbers.
const state = { gen: 0, stack: 'tenant', keys: new Map() };

class AuthError extends Error {}

// ---------- DOM helpers (textContent only, so names from the API are never parsed as HTML)

function h(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  setAttrs(node, attrs);
  node.append(...children.filter((c) => c != null));
  return node;
}

function s(tag, attrs = {}, ...children) {
  const node = document.createElementNS(SVG_NS, tag);
  setAttrs(node, attrs);
  node.append(...children.filter((c) => c != null));
  return node;
}

function setAttrs(node, attrs) {
  for (const [k, v] of Object.entries(attrs)) {
    if (v == null) continue;
    if (k === 'text') node.textContent = v;
    else if (k === 'style') Object.assign(node.style, v); // CSSOM, allowed under a strict CSP
    else node.setAttribute(k, String(v));
  }
}

// ---------- formatting: the display rounds, data-* attributes keep the exact micros

function usd(micros, digits = 2) {
  const v = Math.abs(micros) / 1e6;
  const txt = v.toLocaleString('en-US', { minimumFractionDigits: digits, maximumFractionDigits: digits });
  return (micros < 0 ? '-$' : '$') + txt;
}
const int = (n) => Number(n || 0).toLocaleString('en-US');
const pct = (x) => `${(x * 100).toFixed(x < 0.1 && x > 0 ? 1 : 0)}%`;
const label = (v) => (v == null || v === '' ? '(none)' : String(v));
const tokens = (r) => (r.prompt_tokens || 0) + (r.completion_tokens || 0);

// Local calendar date as YYYY-MM-DD (toISOString would give the UTC date).
function isoLocal(d) {
  const p = (n) => String(n).padStart(2, '0');
  return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
}

function daysBetween(from, to) {
  const out = [];
  const end = Date.parse(`${to}T00:00:00Z`);
  for (let t = Date.parse(`${from}T00:00:00Z`); t <= end && out.length < 1000; t += 86400000) {
    out.push(new Date(t).toISOString().slice(0, 10));
  }
  return out;
}

// ---------- API

const token = () => sessionStorage.getItem(TOKEN_KEY) || '';

function apiUrl(path, params = {}) {
  const qs = new URLSearchParams();
  for (const [k, v] of Object.entries(params)) if (v != null && v !== '') qs.set(k, v);
  const q = qs.toString();
  return q ? `${path}?${q}` : path;
}

async function api(path, params, as = 'json') {
  const res = await fetch(apiUrl(path, params), {
    headers: { Authorization: `Bearer ${token()}` },
    cache: 'no-store',
  });
  if (res.status === 401) throw new AuthError('The admin token was rejected. Please sign in again.');
  if (!res.ok) {
    let msg = `HTTP ${res.status}`;
    try { msg = (await res.json()).error.message || msg; } catch (_) { /* not JSON */ }
    throw new Error(msg);
  }
  return as === 'blob' ? res.blob() : res.json();
}

// ---------- session

function showLogin(message) {
  state.gen++; // cancel anything in flight
  sessionStorage.removeItem(TOKEN_KEY);
  $('dashboard').hidden = true;
  $('session').hidden = true;
  $('login').hidden = false;
  $('login-error').textContent = message || '';
  $('token').value = '';
  $('token').focus();
  document.body.dataset.state = 'login';
}

async function start() {
  document.body.dataset.state = 'loading';
  $('login').hidden = true;
  $('dashboard').hidden = false;
  $('session').hidden = false;
  let problem = '';
  try {
    fillTenants((await api('/admin/tenants')).data);
  } catch (e) {
    if (e instanceof AuthError) return showLogin(e.message);
    problem = `Could not list tenants: ${e.message}`;
  }
  if (!token()) return; // logged out meanwhile
  await load();
  if (problem) $('filter-error').textContent = problem; // after load(), which clears old messages
}

function fillTenants(tenants) {
  const sel = $('tenant');
  const keep = sel.value;
  sel.replaceChildren(h('option', { value: '', text: 'All tenants' }),
    ...tenants.map((t) => h('option', { value: t.name, text: t.name })));
  if (tenants.some((t) => t.name === keep)) sel.value = keep;
}

// ---------- loading

function filters() {
  return { from: $('from').value, to: $('to').value, tenant: $('tenant').value, stack: state.stack };
}

async function load() {
  const gen = ++state.gen;
  const f = filters();
  const body = document.body;
  body.dataset.state = 'loading';
  body.dataset.filters = [f.from, f.to, f.tenant, f.stack].join('|');
  $('filter-error').textContent = '';
  if (!f.from || !f.to || f.from > f.to) {
    $('filter-error').textContent = 'Choose a valid date range (from must not be after to).';
    body.dataset.state = 'error';
    return;
  }
  const range = { from: f.from, to: f.to, tenant: f.tenant };
  // Keys are re-listed on every load (new or renamed keys show up); budgets and top keys share the list.
  // A failed key list only costs the names (ids are shown instead), except for a 401.
  const keys = api('/admin/keys', { tenant: f.tenant }).then((k) => {
    if (gen === state.gen) state.keys = new Map(k.data.map((x) => [x.id, x]));
  }, (e) => { if (e instanceof AuthError) throw e; });
  const results = await Promise.all([
    panel('spend', gen, () => api('/admin/usage', { ...range, group_by: `day,${f.stack}` }),
      (u) => { renderTotals(u); renderSpend(u, f); }),
    panel('budgets', gen, async () => (await Promise.all([api('/admin/budgets', { tenant: f.tenant }), keys]))[0],
      renderBudgets),
    panel('routing', gen, () => api('/admin/routing', range), renderRouting),
    panel('keys', gen, async () => (await Promise.all([api('/admin/usage', { ...range, group_by: 'key' }), keys]))[0],
      (u) => renderTop('top-keys', u.data, (r) => keyName(r.key))),
    panel('models', gen, () => api('/admin/usage', { ...range, group_by: 'model' }),
      (u) => renderTop('top-models', u.data, (r) => label(r.model))),
  ]);
  if (gen !== state.gen) return;
  body.dataset.state = results.every(Boolean) ? 'ready' : 'error';
  $('updated').textContent = `Updated ${new Date().toLocaleTimeString()}`;
}

// Runs one panel's fetch and render, with its own loading and error state.
async function panel(name, gen, fetcher, render) {
  const box = document.querySelector(`[data-panel="${name}"]`);
  const status = box.querySelector('.panel-status');
  box.classList.add('is-loading');
  box.classList.remove('is-error');
  status.textContent = 'Loading…';
  try {
    const data = await fetcher();
    if (gen !== state.gen) return false;
    render(data);
    status.textContent = '';
    return true;
  } catch (e) {
    if (gen !== state.gen) return false;
    if (e instanceof AuthError) { showLogin(e.message); return false; }
    box.classList.add('is-error');
    status.textContent = `Error: ${e.message}`;
    console.error(name, e);
    return false;
  } finally {
    if (gen === state.gen) box.classList.remove('is-loading');
  }
}

// ---------- totals strip

function renderTotals(u) {
  const t = u.totals || {};
  const spend = $('total-spend');
  spend.textContent = usd(t.cost_micros || 0);
  spend.dataset.costMicros = t.cost_micros || 0;
  $('total-requests').textContent = int(t.requests);
  $('total-requests').dataset.requests = t.requests || 0;
  $('total-tokens').textContent = int(tokens(t));
  $('avg-cost').textContent = t.requests ? usd(t.cost_micros / t.requests, 4) : '–';
}

// ---------- spend over time: stacked bars, one series per tenant or model

function niceStep(max, count) {
  const raw = max / count;
  const p = 10 ** Math.floor(Math.log10(raw));
  const f = raw / p;
  return (f <= 1 ? 1 : f <= 2 ? 2 : f <= 5 ? 5 : 10) * p;
}

function seriesColors(names) {
  // Fixed palette first, then evenly spread hues for long series lists.
  return new Map(names.map((n, i) => [n, PALETTE[i] || `hsl(${(i * 137.5) % 360} 55% 55%)`]));
}

function renderSpend(u, f) {
  const days = daysBetween(f.from, f.to);
  const byDay = new Map(days.map((d) => [d, []]));
  const totals = new Map();
  for (const r of u.data) {
    const name = label(r[f.stack]);
    totals.set(name, (totals.get(name) || 0) + r.cost_micros);
    if (!byDay.has(r.day)) byDay.set(r.day, []); // a tenant's day can fall outside the browser's range
    byDay.get(r.day).push({ ...r, name });
  }
  const allDays = [...byDay.keys()].sort();
  // Largest series at the bottom of each stack and first in the legend.
  const names = [...totals.keys()].sort((a, b) => totals.get(b) - totals.get(a) || a.localeCompare(b));
  const colors = seriesColors(names);
  const order = new Map(names.map((n, i) => [n, i]));

  const W = 960, H = 300, M = { l: 64, r: 12, t: 12, b: 28 };
  const pw = W - M.l - M.r, ph = H - M.t - M.b;
  const dayMax = Math.max(0, ...[...byDay.values()].map((rs) => rs.reduce((a, r) => a + r.cost_micros, 0)));
  const step = dayMax > 0 ? niceStep(dayMax, 5) : 1e6;
  const yMax = Math.max(step, Math.ceil(dayMax / step) * step);
  const y = (m) => M.t + ph - (m / yMax) * ph;
  const digits = step >= 1e6 ? 0 : Math.min(6, Math.max(2, Math.ceil(-Math.log10(step / 1e6))));

  const svg = s('svg', { id: 'spend-chart', viewBox: `0 0 ${W} ${H}`, role: 'img', 'aria-label': 'Daily spend in USD' });
  for (let m = 0; m <= yMax + step / 2; m += step) {
    svg.append(s('line', { class: 'grid-line', x1: M.l, x2: W - M.r, y1: y(m), y2: y(m) }),
      s('text', { class: 'axis', x: M.l - 8, y: y(m) + 4, 'text-anchor': 'end', text: usd(m, digits) }));
  }
  const slot = pw / allDays.length;
  const bw = Math.max(1, Math.min(48, slot * 0.72));
  const every = Math.ceil(allDays.length / 12); // at most ~12 x labels
  allDays.forEach((day, i) => {
    const x = M.l + i * slot + (slot - bw) / 2;
    let acc = 0;
    const rows = byDay.get(day).sort((a, b) => order.get(a.name) - order.get(b.name));
    for (const r of rows) {
      const top = y(acc + r.cost_micros);
      svg.append(s('rect', {
        x: x.toFixed(2), y: top.toFixed(2), width: bw.toFixed(2), height: Math.max(0, y(acc) - top).toFixed(2),
        fill: colors.get(r.name), 'data-day': day, 'data-series': r.name, 'data-cost-micros': r.cost_micros,
      }, s('title', { text: `${day} · ${r.name}: ${usd(r.cost_micros)} (${int(r.requests)} requests)` })));
      acc += r.cost_micros;
    }
    if (i % every === 0) {
      svg.append(s('text', { class: 'axis', x: x + bw / 2, y: H - 8, 'text-anchor': 'middle', text: day.slice(5) }));
    }
  });
  svg.append(s('line', { class: 'axis-line', x1: M.l, x2: W - M.r, y1: y(0), y2: y(0) }));
  if (!u.data.length) {
    svg.append(s('text', { class: 'empty', x: M.l + pw / 2, y: M.t + ph / 2, 'text-anchor': 'middle', text: 'No spend in this range' }));
  }
  $('spend-wrap').replaceChildren(svg);
  $('spend-legend').replaceChildren(...names.map((n) => h('li', {},
    h('span', { class: 'swatch', style: { background: colors.get(n) } }),
    h('span', { text: n }), h('span', { class: 'muted', text: usd(totals.get(n)) }))));
}

// ---------- budgets

function budgetLevel(utilPct, thresholds) {
  if (utilPct >= 100) return 'over';
  // The colour follows the highest threshold (below 100%) that utilisation has passed.
  const passed = (thresholds || []).filter((t) => t < 100 && utilPct >= t).length;
  return ['ok', 'warn'][passed] || 'high';
}

function amount(b, v) {
  return b.unit === 'usd_micros' ? usd(v) : `${int(v)} tokens`;
}

function budgetScope(b) {
  const key = b.key ? `key ${keyName(b.key, false)}` : 'all keys';
  return `${b.period} ${b.metric === 'usd' ? 'spend' : 'tokens'} · ${key} · ${b.model ? `model ${b.model}` : 'all models'}`;
}

function renderBudgets(res) {
  const list = [...res.data].sort((a, b) => b.utilization - a.utilization);
  const box = $('budgets');
  if (!list.length) return box.replaceChildren(h('p', { class: 'muted', text: 'No budgets configured.' }));
  box.replaceChildren(...list.map((b) => {
    const util = b.limit > 0 ? (b.used + b.reserved) / b.limit : 0;
    const utilPct = (b.utilization ?? util) * 100;
    const clamp = (x) => `${Math.min(100, Math.max(0, x))}%`;
    const usedPct = b.limit > 0 ? (b.used / b.limit) * 100 : 0;
    const meter = h('div', { class: 'meter', title: `${utilPct.toFixed(1)}% of limit used or reserved` },
      h('div', { class: 'meter-used', style: { width: clamp(usedPct) } }),
      h('div', { class: 'meter-reserved', style: { left: clamp(usedPct), width: clamp(utilPct - usedPct) } }),
      ...(b.thresholds || []).filter((t) => t > 0 && t <= 100).map((t) =>
        h('span', { class: 'tick', title: `${t}% alert`, style: { left: `${t}%` } })));
    const end = b.period_end ? `period ends ${new Date(b.period_end).toLocaleString(undefined, { dateStyle: 'medium', timeStyle: 'short' })}` : 'no reset';
    return h('div', {
      class: `budget level-${budgetLevel(utilPct, b.thresholds)}`, 'data-budget-id': b.id,
      'data-tenant': b.tenant, 'data-used': b.used, 'data-limit': b.limit, 'data-reserved': b.reserved,
    },
    h('div', { class: 'budget-head' }, h('strong', { text: b.tenant }),
      h('span', { class: 'muted', text: budgetScope(b) }), b.hard ? h('span', { class: 'badge', text: 'hard' }) : null),
    meter,
    h('div', { class: 'budget-foot' },
      h('span', { text: `${amount(b, b.used)} / ${amount(b, b.limit)} (${Math.floor(utilPct)}%)` +
        (b.reserved ? ` · ${amount(b, b.reserved)} reserved` : '') }),
      h('span', { class: 'muted', text: end })),
    h('div', { class: 'budget-id mono muted', text: b.id }));
  }));
}

// ---------- routing

function renderRouting(r) {
  const tiers = r.tiers || [];
  const reqs = tiers.reduce((a, t) => a + t.requests, 0);
  const split = h('div', { class: 'split' }, ...tiers.map((t) => h('div', {
    class: `split-part tier-${t.tier}`, title: `${t.tier}: ${int(t.requests)} requests`,
    style: { width: `${reqs ? (t.requests / reqs) * 100 : 0}%` },
  })));
  const table = h('table', { class: 'table' },
    h('thead', {}, h('tr', {}, ...['Tier', 'Requests', 'Share', 'Cost', 'Premium-equiv.'].map((c, i) =>
      h('th', { class: i ? 'num' : null, text: c })))),
    h('tbody', {}, ...tiers.map((t) => h('tr', { 'data-tier': t.tier },
      h('td', {}, h('span', { class: `swatch tier-${t.tier}` }), t.tier),
      h('td', { class: 'num', text: int(t.requests) }),
      h('td', { class: 'num', text: reqs ? pct(t.requests / reqs) : '–' }),
      h('td', { class: 'num', 'data-cost-micros': t.cost_micros, text: usd(t.cost_micros) }),
      h('td', { class: 'num', text: usd(t.premium_equivalent_micros) })))));
  const savings = h('div', { id: 'savings', class: 'savings', 'data-savings-micros': r.savings_micros },
    h('span', { class: 'stat-label', text: 'Savings vs. all-premium' }),
    h('span', { class: 'stat-value', text: `${usd(r.savings_micros)} (${pct(r.savings_share || 0)})` }),
    h('span', { class: 'muted', text: `${usd(r.cost_micros)} actual vs ${usd(r.premium_equivalent_micros)} premium-equivalent · ${int(r.routed_requests)} routed requests` }));
  $('routing').replaceChildren(savings, split, table);
}

// ---------- top keys / models

function keyName(id, withTenant = true) {
  const k = state.keys.get(id);
  if (!k) return label(id);
  const name = k.name ? `${k.name} (${k.prefix})` : k.prefix;
  return (withTenant ? `${k.tenant} / ${name}` : name) + (k.status === 'revoked' ? ' [revoked]' : '');
}

function renderTop(id, rows, name) {
  const sorted = [...rows].sort((a, b) => b.cost_micros - a.cost_micros);
  const top = sorted.slice(0, TOP_N);
  const rest = sorted.slice(TOP_N);
  const body = top.map((r) => h('tr', {},
    h('td', { text: name(r) }),
    h('td', { class: 'num', text: int(r.requests) }),
    h('td', { class: 'num', text: int(tokens(r)) }),
    h('td', { class: 'num', 'data-cost-micros': r.cost_micros, text: usd(r.cost_micros) })));
  if (!top.length) body.push(h('tr', {}, h('td', { colspan: 4, class: 'muted', text: 'No usage in this range.' })));
  const foot = rest.length ? h('tfoot', {}, h('tr', {}, h('td', { colspan: 3, class: 'muted', text: `${rest.length} more` }),
    h('td', { class: 'num muted', text: usd(rest.reduce((a, r) => a + r.cost_micros, 0)) }))) : null;
  $(id).replaceChildren(
    h('thead', {}, h('tr', {}, ...['Name', 'Requests', 'Tokens', 'Cost'].map((c, i) => h('th', { class: i ? 'num' : null, text: c })))),
    h('tbody', {}, ...body), ...(foot ? [foot] : []));
}

// ---------- CSV / FOCUS download: fetched with the bearer header, saved through a Blob

async function download(format, button) {
  const f = filters();
  const name = `tollgate-${format === 'focus' ? 'focus' : 'chargeback'}-${f.from}-${f.to}.csv`;
  button.disabled = true;
  try {
    const blob = await api('/admin/export/chargeback',
      { from: f.from, to: f.to, tenant: f.tenant, format: format === 'focus' ? 'focus' : null }, 'blob');
    const url = URL.createObjectURL(blob);
    const a = h('a', { href: url, download: name, hidden: '' });
    document.body.append(a);
    a.click();
    a.remove();
    setTimeout(() => URL.revokeObjectURL(url), 10000); // give the browser time to start the download
  } catch (e) {
    if (e instanceof AuthError) return showLogin(e.message);
    $('filter-error').textContent = `Download failed: ${e.message}`;
  } finally {
    button.disabled = false;
  }
}

// ---------- wiring

function init() {
  const today = new Date();
  const from = new Date(today.getFullYear(), today.getMonth(), today.getDate() - 29);
  $('from').value = isoLocal(from);
  $('to').value = isoLocal(today);

  $('login-form').addEventListener('submit', (e) => {
    e.preventDefault();
    const t = $('token').value.trim();
    if (!t) return;
    sessionStorage.setItem(TOKEN_KEY, t);
    $('login-error').textContent = '';
    start();
  });
  $('logout').addEventListener('click', () => showLogin(''));
  $('refresh').addEventListener('click', () => load());
  for (const id of ['from', 'to', 'tenant']) $(id).addEventListener('change', () => load());
  for (const b of document.querySelectorAll('[data-stack]')) {
    b.addEventListener('click', () => {
      if (state.stack === b.dataset.stack) return;
      state.stack = b.dataset.stack;
      for (const o of document.querySelectorAll('[data-stack]')) o.setAttribute('aria-pressed', String(o === b));
      load();
    });
  }
  $('download-csv').addEventListener('click', (e) => download('csv', e.currentTarget));
  $('download-focus').addEventListener('click', (e) => download('focus', e.currentTarget));

  if (token()) start();
  else showLogin('');
}

init();
