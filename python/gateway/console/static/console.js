// tokengate console: renders the billing and admin APIs for a signed-in tenant or operator.
//
// Contract: every figure comes from an API route, called with the credential the user typed
// (kept in this tab's sessionStorage until sign-out); a tenant's key calls only the billing
// routes of its own tenant, never with a `tenant` parameter; text from the APIs is set as text,
// never parsed as HTML. Charts are Chart.js (vendor/chart.min.js), drawn without animation.
"use strict";

const STORE = "tokengate.console.credential";
const WIDTH_SECONDS = { "1m": 60, "1h": 3600, "1d": 86400 };
// The most buckets the console reads for one chart: about a day of minutes, a month of hours.
const MOST_BUCKETS = 1500;
const FLEET_REFRESH_MS = 5000;
const PALETTE = [
  "#1f4e79", "#e07b39", "#3a9d5d", "#b03a48", "#7a5195", "#2f9ab0", "#c9a227", "#6b6b6b",
  "#8c564b", "#17becf",
];

const state = {
  credential: null,
  me: null,
  charts: [],
  view: null,
  // Aborts the requests of the render (or sign-in) under way: a newer one, or signing out, ends them.
  aborter: new AbortController(),
  fleetTimer: null,
  generation: 0,
  // The server's clock less the browser's, in ms: a view's window is the server's last hour, not
  // that of a browser whose clock is off.
  skewMs: 0,
};

// ---------------------------------------------------------------------------------- the APIs

class ApiFailure extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function call(path, params = {}) {
  if (state.credential === null) throw new DOMException("signed out", "AbortError");
  const url = new URL(path, window.location.origin);
  for (const [name, value] of Object.entries(params)) {
    if (value === null || value === undefined) continue;
    for (const item of Array.isArray(value) ? value : [value]) url.searchParams.append(name, item);
  }
  const response = await fetch(url, {
    headers: { Authorization: `Bearer ${state.credential}` },
    cache: "no-store",
    credentials: "omit",
    signal: state.aborter.signal,
  });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error && body.error.message) message = body.error.message;
    } catch (_) {
      // Not JSON: keep the status line.
    }
    throw new ApiFailure(response.status, message);
  }
  noteServerClock(response);
  return response;
}

// Reads the server's clock from a response's `Date` (whole seconds: the middle of its second is
// taken, so the estimate is within half a second of the server's, plus the response's transit).
function noteServerClock(response) {
  const date = Date.parse(response.headers.get("date") || "");
  if (!Number.isNaN(date)) state.skewMs = date + 500 - Date.now();
}

// Now by the server's clock, in ms.
function serverNow() {
  return Date.now() + state.skewMs;
}

async function json(path, params) {
  return (await call(path, params)).json();
}

// Every bucket of a usage or refusal query, following `next_page`.
async function allBuckets(path, params) {
  const buckets = [];
  let page = null;
  do {
    const body = await json(path, { ...params, page });
    buckets.push(...body.data);
    page = body.next_page;
  } while (page && buckets.length < MOST_BUCKETS);
  return buckets;
}

// ------------------------------------------------------------------------------- formatting

const integer = new Intl.NumberFormat("en-US");

function money(micros) {
  const currency = (state.me && state.me.currency) || "USD";
  const amount = micros / 1e6;
  try {
    return new Intl.NumberFormat("en-US", {
      style: "currency",
      currency,
      minimumFractionDigits: 2,
      maximumFractionDigits: amount !== 0 && Math.abs(amount) < 1 ? 6 : 2,
    }).format(amount);
  } catch (_) {
    return `${amount.toFixed(6)} ${currency}`;
  }
}

function when(seconds, width) {
  const date = new Date(seconds * 1000);
  const iso = date.toISOString();
  if (width === "1d") return iso.slice(0, 10);
  return `${iso.slice(5, 10)} ${iso.slice(11, 16)}`;
}

function stamp(seconds) {
  return new Date(seconds * 1000).toISOString().replace("T", " ").slice(0, 19) + " UTC";
}

function el(tag, attributes = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attributes)) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "text") node.textContent = String(value);
    else if (name === "className") node.className = value;
    else node.setAttribute(name, String(value));
  }
  for (const child of children) {
    if (child === null || child === undefined) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

function panel(title, id, ...children) {
  return el("section", { className: "panel", id }, el("h2", { text: title }), ...children);
}

function table(id, columns, rows, empty) {
  if (!rows.length) return el("p", { className: "empty", id, text: empty });
  const head = el("tr", {}, ...columns.map((c) => el("th", { className: c.num ? "num" : null, text: c.title })));
  const body = rows.map((row) =>
    el(
      "tr",
      {},
      ...columns.map((c) => {
        const value = c.value(row);
        const cell = el("td", { className: c.num ? "num" : c.className ? c.className(row) : null });
        if (value instanceof Node) cell.append(value);
        else cell.textContent = value === null || value === undefined ? "—" : String(value);
        return cell;
      }),
    ),
  );
  return el("div", { className: "table-wrap" }, el("table", { id }, el("thead", {}, head), el("tbody", {}, ...body)));
}

function totalCard(id, label, value, shown) {
  return el(
    "div",
    { className: "total", "data-testid": id, "data-value": value },
    el("div", { className: "label", text: label }),
    el("div", { className: "value", text: shown }),
  );
}

function chartPanel(title, id, note) {
  const canvas = el("canvas", { id, role: "img", "aria-label": title });
  return panel(title, `${id}-panel`, el("div", { className: "chart" }, canvas), note ? el("p", { className: "note", text: note }) : null);
}

// Draws on the canvas `id` of `view` (a render's own tree: a stale render never draws on a newer one's).
function draw(view, id, config) {
  const canvas = view.querySelector(`#${id}`);
  if (!canvas || view !== state.view) return;
  config.options = {
    animation: false,
    responsive: true,
    maintainAspectRatio: false,
    interaction: { mode: "index", intersect: false },
    plugins: { legend: { position: "bottom", labels: { boxWidth: 12 } } },
    ...config.options,
  };
  state.charts.push(new Chart(canvas, config));
}

function color(index) {
  return PALETTE[index % PALETTE.length];
}

// ------------------------------------------------------------------------------ the queries

function selection() {
  const range = Number(document.getElementById("range").value);
  let width = document.getElementById("width").value;
  // Too many buckets for the range: the next coarser width.
  while (range / WIDTH_SECONDS[width] > MOST_BUCKETS && width !== "1d") width = width === "1m" ? "1h" : "1d";
  document.getElementById("width").value = width;
  const now = Math.floor(serverNow() / 1000);
  const step = WIDTH_SECONDS[width];
  // Whole buckets: the first is the one holding `now - range`, the last the one holding `now`.
  // One window for every query of a view, so its cards and charts read the same buckets however
  // long the queries take.
  const start = Math.floor((now - range) / step) * step;
  return { start_time: start, end_time: now + 1, bucket_width: width, width };
}

function usageParams(range, groupBy) {
  return { start_time: range.start_time, end_time: range.end_time, bucket_width: range.bucket_width, group_by: groupBy };
}

function sumResults(buckets) {
  const sums = { requests: 0, prompt: 0, cached: 0, completion: 0, cost: 0, unpriced: 0, failed: 0 };
  for (const bucket of buckets) {
    for (const r of bucket.results) {
      sums.requests += r.num_model_requests;
      sums.prompt += r.input_tokens - r.input_cached_tokens;
      sums.cached += r.input_cached_tokens;
      sums.completion += r.output_tokens;
      sums.cost += r.cost_micros;
      sums.unpriced += r.unpriced_requests;
      sums.failed += r.failed_requests;
    }
  }
  return sums;
}

function refusedTotal(buckets) {
  return buckets.reduce((n, b) => n + b.results.reduce((m, r) => m + r.requests, 0), 0);
}

function groupSums(buckets, key) {
  const groups = new Map();
  for (const bucket of buckets) {
    for (const r of bucket.results) {
      const name = r[key];
      const g = groups.get(name) || { name, requests: 0, tokens: 0, cost: 0, prompt: 0, cached: 0, completion: 0 };
      g.requests += r.num_model_requests;
      g.tokens += r.input_tokens + r.output_tokens;
      g.prompt += r.input_tokens - r.input_cached_tokens;
      g.cached += r.input_cached_tokens;
      g.completion += r.output_tokens;
      g.cost += r.cost_micros;
      groups.set(name, g);
    }
  }
  return [...groups.values()];
}

function totalsRow(sums, refused, id) {
  return el(
    "div",
    { className: "totals", id, "data-start": null },
    totalCard("total-requests", "Requests", sums.requests, integer.format(sums.requests)),
    totalCard("total-prompt", "Prompt tokens", sums.prompt, integer.format(sums.prompt)),
    totalCard("total-cached", "Cached prompt tokens", sums.cached, integer.format(sums.cached)),
    totalCard("total-completion", "Completion tokens", sums.completion, integer.format(sums.completion)),
    totalCard("total-spend", "Spend", sums.cost, money(sums.cost)),
    totalCard("total-failed", "Failed requests", sums.failed, integer.format(sums.failed)),
    totalCard("total-refused", "Refused requests", refused, integer.format(refused)),
  );
}

// Tokens of each model by class, stacked per bucket.
function tokensChart(view, id, buckets, width) {
  const labels = buckets.map((b) => when(b.start_time, width));
  const models = [...new Set(buckets.flatMap((b) => b.results.map((r) => r.model)))].sort();
  const classes = [
    ["prompt", (r) => r.input_tokens - r.input_cached_tokens],
    ["cached", (r) => r.input_cached_tokens],
    ["completion", (r) => r.output_tokens],
  ];
  const datasets = [];
  models.forEach((model, m) => {
    classes.forEach(([name, of], c) => {
      datasets.push({
        label: `${model} · ${name}`,
        stack: name,
        backgroundColor: color(m * 3 + c),
        data: buckets.map((b) => b.results.filter((r) => r.model === model).reduce((n, r) => n + of(r), 0)),
      });
    });
  });
  draw(view, id, {
    type: "bar",
    data: { labels, datasets },
    options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: "tokens" } } } },
  });
}

function spendChart(view, id, buckets, width, budget) {
  const labels = buckets.map((b) => when(b.start_time, width));
  const spend = buckets.map((b) => b.results.reduce((n, r) => n + r.cost_micros, 0) / 1e6);
  let running = 0;
  const cumulative = spend.map((s) => (running += s));
  const datasets = [
    { type: "bar", label: "spend per bucket", data: spend, backgroundColor: color(0), yAxisID: "y" },
    { type: "line", label: "cumulative", data: cumulative, borderColor: color(1), backgroundColor: color(1), pointRadius: 0, yAxisID: "total" },
  ];
  if (budget) {
    datasets.push({
      type: "line",
      label: `money budget (${budget.period})`,
      data: labels.map(() => budget.limit / 1e6),
      borderColor: color(3),
      backgroundColor: color(3),
      borderDash: [6, 4],
      pointRadius: 0,
      yAxisID: "total",
    });
  }
  const currency = (state.me && state.me.currency) || "USD";
  draw(view, id, {
    data: { labels, datasets },
    options: {
      scales: {
        y: { beginAtZero: true, title: { display: true, text: `${currency} per bucket` } },
        total: { position: "right", beginAtZero: true, grid: { drawOnChartArea: false }, title: { display: true, text: `${currency}, cumulative` } },
      },
    },
  });
}

function stackedChart(view, id, buckets, width, key, value, unit) {
  const labels = buckets.map((b) => when(b.start_time, width));
  const names = [...new Set(buckets.flatMap((b) => b.results.map((r) => r[key])))].sort();
  const datasets = names.map((name, i) => ({
    label: name,
    backgroundColor: color(i),
    data: buckets.map((b) => b.results.filter((r) => r[key] === name).reduce((n, r) => n + value(r), 0)),
  }));
  draw(view, id, {
    type: "bar",
    data: { labels, datasets },
    options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true, title: { display: true, text: unit } } } },
  });
}

// ------------------------------------------------------------------------------ the tenant

function lastMonths(count) {
  const now = new Date(serverNow());
  const months = [];
  for (let i = 0; i < count; i += 1) {
    const d = new Date(Date.UTC(now.getUTCFullYear(), now.getUTCMonth() - i, 1));
    months.push(d.toISOString().slice(0, 7));
  }
  return months;
}

async function downloadInvoice(period) {
  const response = await call("/v1/billing/invoices", { period, format: "csv" });
  const blob = await response.blob();
  const url = URL.createObjectURL(blob);
  const link = el("a", { href: url, download: `invoice-${state.me.tenant_name}-${period}.csv` });
  document.body.append(link);
  link.click();
  link.remove();
  setTimeout(() => URL.revokeObjectURL(url), 1000);
}

function budgetMeter(budget) {
  const share = budget.limit > 0 ? Math.min(budget.spent / budget.limit, 1) : 1;
  const bar = el("span");
  bar.style.width = `${(share * 100).toFixed(1)}%`;
  return el("div", { className: budget.spent >= budget.limit ? "meter over" : "meter", title: `${(share * 100).toFixed(1)}%` }, bar);
}

function quotaPanel(quota) {
  if (!quota.data.length) {
    return panel("Quota and budgets", "quota", el("p", { className: "empty", text: "No quota policy: usage is not limited." }));
  }
  const limits = [
    ["requests_per_minute", "Requests per minute"],
    ["tokens_per_minute", "Tokens per minute"],
    ["max_concurrent", "Concurrent requests"],
    ["max_sequences", "Sequences per request"],
    ["token_budget", "Token budget"],
    ["money_budget_micros", "Money budget"],
    ["budget_period", "Budget period"],
    ["models", "Models"],
    ["priority", "Priority"],
  ];
  const parts = [];
  for (const subject of quota.data) {
    const title = subject.scope === "tenant" ? `Tenant ${subject.name}` : `Key ${subject.name || subject.id}`;
    const rows = limits
      .filter(([name]) => subject.policy[name] !== null && subject.policy[name] !== undefined)
      .filter(([name]) => name !== "budget_period" || subject.budgets.length > 0)
      .map(([name, label]) => {
        const value = subject.policy[name];
        const shown = name === "money_budget_micros" ? money(value) : Array.isArray(value) ? value.join(", ") : typeof value === "number" ? integer.format(value) : value;
        return { label, shown };
      });
    parts.push(el("h3", { text: title }));
    parts.push(table(`policy-${subject.id}`, [{ title: "Limit", value: (r) => r.label }, { title: "Value", value: (r) => r.shown }], rows, "No limit."));
    const budgets = subject.budgets.map((b) => ({
      ...b,
      show: (v) => (b.kind === "money" ? money(v) : integer.format(v)),
    }));
    parts.push(
      table(
        `budgets-${subject.id}`,
        [
          { title: "Budget", value: (b) => `${b.kind} per ${b.period}` },
          { title: "Period", value: (b) => `${stamp(b.period_start).slice(0, 10)} – ${stamp(b.period_end - 1).slice(0, 10)}` },
          { title: "Spent", num: true, value: (b) => b.show(b.spent) },
          { title: "Limit", num: true, value: (b) => b.show(b.limit) },
          { title: "Remaining", num: true, value: (b) => b.show(b.remaining) },
          { title: "Used", value: (b) => budgetMeter(b) },
        ],
        budgets,
        "No budget.",
      ),
    );
  }
  return panel("Quota and budgets", "quota", ...parts, el("p", { className: "note", text: "Spent: the requests that ended, as the ledger holds them now." }));
}

async function tenantView(view, range) {
  const [usage, byKey, refusals, keys, quota] = await Promise.all([
    allBuckets("/v1/billing/usage", usageParams(range, ["model"])),
    allBuckets("/v1/billing/usage", usageParams(range, ["api_key_id"])),
    allBuckets("/v1/billing/refusals", { ...usageParams(range, ["reason"]) }),
    json("/v1/billing/keys"),
    json("/v1/billing/quota"),
  ]);
  const months = lastMonths(3);
  const invoices = await Promise.all(months.map((period) => json("/v1/billing/invoices", { period })));

  const sums = sumResults(usage);
  view.append(totalsRow(sums, refusedTotal(refusals), "totals"));
  view.append(
    el(
      "div",
      { className: "grid" },
      chartPanel("Tokens by model", "chart-tokens", "Prompt tokens (uncached), cached prompt tokens and completion tokens per bucket, by model."),
      chartPanel("Spend", "chart-spend", "Per bucket and cumulative over the range; the dashed line is the money budget of its period."),
      chartPanel("Refused requests", "chart-refusals", "Requests refused by a quota (429) or another check, by reason."),
      quotaPanel(quota),
    ),
  );
  const moneyBudget = quota.data.flatMap((s) => s.budgets).find((b) => b.kind === "money");
  tokensChart(view, "chart-tokens", usage, range.width);
  spendChart(view, "chart-spend", usage, range.width, moneyBudget);
  stackedChart(view, "chart-refusals", refusals, range.width, "reason", (r) => r.requests, "requests");

  const usageByKey = new Map(groupSums(byKey, "api_key_id").map((g) => [g.name, g]));
  const keyRows = keys.data.map((k) => ({ ...k, usage: usageByKey.get(k.id) || { requests: 0, tokens: 0, cost: 0 } }));
  const invoiceRows = invoices.map((inv) => inv);
  view.append(
    el(
      "div",
      { className: "grid" },
      panel(
        "API keys",
        "keys",
        table(
          "keys-table",
          [
            { title: "Key", value: (k) => k.id },
            { title: "Name", value: (k) => k.name },
            { title: "Prefix", value: (k) => k.prefix },
            { title: "Created", value: (k) => stamp(k.created_at) },
            { title: "Status", value: (k) => (k.revoked_at ? `revoked ${stamp(k.revoked_at)}` : "active"), className: (k) => (k.revoked_at ? "bad" : "ok") },
            { title: "Requests", num: true, value: (k) => integer.format(k.usage.requests) },
            { title: "Tokens", num: true, value: (k) => integer.format(k.usage.tokens) },
            { title: "Spend", num: true, value: (k) => money(k.usage.cost) },
          ],
          keyRows,
          "No keys.",
        ),
        el("p", { className: "note", text: "Requests, tokens and spend over the selected range." }),
      ),
      panel(
        "Invoices",
        "invoices",
        table(
          "invoices-table",
          [
            { title: "Month", value: (i) => i.period },
            { title: "Requests", num: true, value: (i) => integer.format(i.requests) },
            { title: "Total", num: true, value: (i) => money(i.total_micros) },
            { title: "Unpriced requests", num: true, value: (i) => integer.format(i.unpriced_requests) },
            {
              title: "CSV",
              value: (i) => {
                const button = el("button", { type: "button", className: "link", "data-period": i.period, text: "Download" });
                button.addEventListener("click", () => downloadInvoice(i.period).catch(showFailure));
                return button;
              },
            },
          ],
          invoiceRows,
          "No invoices.",
        ),
      ),
    ),
  );
}

// ---------------------------------------------------------------------------- the operator

async function fleetPanel(panelNode) {
  const fleet = await json("/admin/v1/fleet");
  const workers = table(
    "fleet-table",
    [
      { title: "Worker", value: (w) => w.url },
      { title: "Health", value: (w) => (w.healthy ? "up" : "down"), className: (w) => (w.healthy ? "ok" : "bad") },
      { title: "Breaker", value: (w) => (w.ejected ? "ejected" : "closed"), className: (w) => (w.ejected ? "bad" : null) },
      { title: "Ejections", num: true, value: (w) => integer.format(w.ejections) },
      { title: "In flight", num: true, value: (w) => (w.capacity === null ? `${w.outstanding}` : `${w.outstanding} / ${w.capacity}`) },
      { title: "Running", num: true, value: (w) => (w.load ? integer.format(w.load.running) : "—") },
      { title: "Waiting", num: true, value: (w) => (w.load ? integer.format(w.load.waiting) : "—") },
      { title: "KV cache", num: true, value: (w) => (w.load ? `${(w.load.kv_cache_usage * 100).toFixed(1)}%` : "—") },
      { title: "Models", value: (w) => w.models.join(", ") },
    ],
    fleet.workers,
    "No workers.",
  );
  const queued = fleet.queues.reduce((n, q) => n + q.count, 0);
  const queues = table(
    "queues-table",
    [
      { title: "Model", value: (q) => q.model },
      { title: "Tenant", value: (q) => q.tenant_id },
      { title: "Class", value: (q) => q.class },
      { title: "Waiting", num: true, value: (q) => integer.format(q.count) },
    ],
    fleet.queues,
    "No request is waiting in the gateway's queues.",
  );
  panelNode.replaceChildren(
    el("h2", { text: "Fleet" }),
    workers,
    el("h3", { text: `Queues (${integer.format(queued)} waiting)` }),
    queues,
    el("p", { className: "note", text: `As of ${stamp(Math.floor(serverNow() / 1000))}; refreshed every ${FLEET_REFRESH_MS / 1000} s.` }),
  );
}

async function operatorView(view, range) {
  const admin = state.me.role === "admin";
  const [byTenantModel, refusals, tenants, changes] = await Promise.all([
    allBuckets("/v1/billing/usage", usageParams(range, ["tenant_id", "model"])),
    allBuckets("/v1/billing/refusals", usageParams(range, ["tenant_id", "reason"])),
    admin ? json("/admin/v1/tenants") : Promise.resolve({ data: [] }),
    admin ? json("/admin/v1/changes", { limit: 25 }) : Promise.resolve({ data: [] }),
  ]);
  const names = new Map(tenants.data.map((t) => [t.id, t.name]));
  const tenantName = (id) => names.get(id) || id;
  const sums = sumResults(byTenantModel);
  view.append(totalsRow(sums, refusedTotal(refusals), "totals"));

  const grid = el(
    "div",
    { className: "grid" },
    chartPanel("Requests and errors", "chart-requests", "Requests per bucket: answered, failed (the worker's error, or a stream cut short) and refused (a quota or another check); the line is the share of errors (%)."),
    chartPanel("Spend by tenant", "chart-tenant-spend", null),
    chartPanel("Tokens by model", "chart-tokens", "Prompt tokens (uncached), cached prompt tokens and completion tokens, every tenant."),
    chartPanel("Refused requests by reason", "chart-refusals", null),
  );
  view.append(grid);

  const labels = byTenantModel.map((b) => when(b.start_time, range.width));
  const failed = byTenantModel.map((b) => b.results.reduce((n, r) => n + r.failed_requests, 0));
  const answered = byTenantModel.map((b, i) => b.results.reduce((n, r) => n + r.num_model_requests, 0) - failed[i]);
  const refused = refusals.map((b) => b.results.reduce((n, r) => n + r.requests, 0));
  const share = answered.map((a, i) => {
    const errors = failed[i] + (refused[i] || 0);
    return a + errors > 0 ? (100 * errors) / (a + errors) : 0;
  });
  draw(view, "chart-requests", {
    data: {
      labels,
      datasets: [
        { type: "bar", label: "answered", data: answered, backgroundColor: color(0), stack: "r", yAxisID: "y" },
        { type: "bar", label: "failed", data: failed, backgroundColor: color(6), stack: "r", yAxisID: "y" },
        { type: "bar", label: "refused", data: refused, backgroundColor: color(3), stack: "r", yAxisID: "y" },
        { type: "line", label: "errors %", data: share, borderColor: color(1), backgroundColor: color(1), pointRadius: 0, yAxisID: "rate" },
      ],
    },
    options: {
      scales: {
        x: { stacked: true },
        y: { stacked: true, beginAtZero: true, title: { display: true, text: "requests" } },
        rate: { position: "right", beginAtZero: true, suggestedMax: 10, grid: { drawOnChartArea: false }, title: { display: true, text: "% errors" } },
      },
    },
  });
  const renamed = byTenantModel.map((b) => ({ ...b, results: b.results.map((r) => ({ ...r, tenant: tenantName(r.tenant_id) })) }));
  stackedChart(view, "chart-tenant-spend", renamed, range.width, "tenant", (r) => r.cost_micros / 1e6, (state.me && state.me.currency) || "USD");
  tokensChart(view, "chart-tokens", byTenantModel, range.width);
  stackedChart(view, "chart-refusals", refusals, range.width, "reason", (r) => r.requests, "requests");

  const byTenant = groupSums(byTenantModel, "tenant_id").sort((a, b) => b.cost - a.cost || b.tokens - a.tokens);
  const refusedByTenant = new Map();
  for (const b of refusals) for (const r of b.results) refusedByTenant.set(r.tenant_id, (refusedByTenant.get(r.tenant_id) || 0) + r.requests);
  const byModel = groupSums(byTenantModel, "model").sort((a, b) => b.tokens - a.tokens);
  view.append(
    el(
      "div",
      { className: "grid" },
      panel(
        "Tenants",
        "tenants",
        table(
          "tenants-table",
          [
            { title: "Tenant", value: (t) => tenantName(t.name) },
            { title: "Requests", num: true, value: (t) => integer.format(t.requests) },
            { title: "Tokens", num: true, value: (t) => integer.format(t.tokens) },
            { title: "Spend", num: true, value: (t) => money(t.cost) },
            { title: "Refused", num: true, value: (t) => integer.format(refusedByTenant.get(t.name) || 0) },
          ],
          byTenant,
          "No usage in this range.",
        ),
        el("p", { className: "note", text: "Every tenant with usage in the range, the top spenders first." }),
      ),
      panel(
        "Models",
        "models",
        table(
          "models-table",
          [
            { title: "Model", value: (m) => m.name },
            { title: "Requests", num: true, value: (m) => integer.format(m.requests) },
            { title: "Prompt", num: true, value: (m) => integer.format(m.prompt) },
            { title: "Cached", num: true, value: (m) => integer.format(m.cached) },
            { title: "Completion", num: true, value: (m) => integer.format(m.completion) },
            { title: "Spend", num: true, value: (m) => money(m.cost) },
          ],
          byModel,
          "No usage in this range.",
        ),
      ),
    ),
  );
  if (!admin) return;
  const fleet = el("section", { className: "panel wide", id: "fleet" }, el("h2", { text: "Fleet" }));
  view.append(
    el(
      "div",
      { className: "grid" },
      fleet,
      panel(
        "Recent changes",
        "changes",
        table(
          "changes-table",
          [
            { title: "When", value: (c) => stamp(Math.floor(c.at_ms / 1000)) },
            { title: "Change", value: (c) => c.action },
            { title: "Tenant", value: (c) => (c.tenant_id ? tenantName(c.tenant_id) : null) },
            { title: "Subject", value: (c) => c.subject_id },
          ],
          changes.data,
          "No change yet.",
        ),
      ),
    ),
  );
  await fleetPanel(fleet);
  const generation = state.generation;
  state.fleetTimer = setInterval(() => {
    if (generation !== state.generation) return;
    fleetPanel(fleet).catch(showFailure);
  }, FLEET_REFRESH_MS);
}

// ------------------------------------------------------------------------------- the page

function setStatus(text, bad = false) {
  const status = document.getElementById("status");
  status.textContent = text;
  status.className = bad ? "status bad" : "status";
}

function showFailure(error) {
  if (error.name === "AbortError") return;
  if (error instanceof ApiFailure && error.status === 401) {
    signOut("The credential was refused: sign in again.");
    return;
  }
  setStatus(`Could not load: ${error.message}`, true);
}

function clearView() {
  state.generation += 1;
  state.aborter.abort();
  state.aborter = new AbortController();
  if (state.fleetTimer !== null) clearInterval(state.fleetTimer);
  state.fleetTimer = null;
  for (const chart of state.charts) chart.destroy();
  state.charts = [];
  document.getElementById("view").replaceChildren();
}

async function render() {
  clearView();
  const generation = state.generation;
  const range = selection();
  const view = el("div", { id: "content", "data-start-time": range.start_time, "data-end-time": range.end_time, "data-bucket-width": range.bucket_width, "data-role": state.me.role });
  state.view = view;
  document.getElementById("view").replaceChildren(view);
  setStatus("Loading…");
  try {
    if (state.me.role === "tenant") await tenantView(view, range);
    else await operatorView(view, range);
  } catch (error) {
    if (generation === state.generation) showFailure(error);
    return;
  }
  if (generation !== state.generation) return;
  setStatus(`Updated ${stamp(Math.floor(serverNow() / 1000))}`);
  document.body.dataset.loaded = String(generation);
}

function showSignedIn() {
  const who = document.getElementById("who");
  const me = state.me;
  who.textContent = me.role === "tenant" ? `Tenant ${me.tenant_name}` : me.role === "admin" ? "Operator" : "Billing";
  who.hidden = false;
  document.getElementById("sign-out").hidden = false;
  document.getElementById("sign-in").hidden = true;
  document.getElementById("console").hidden = false;
}

function signOut(message) {
  clearView();
  state.credential = null;
  state.me = null;
  sessionStorage.removeItem(STORE);
  document.getElementById("credential").value = "";
  document.getElementById("who").textContent = "";
  document.getElementById("who").hidden = true;
  document.getElementById("sign-out").hidden = true;
  document.getElementById("console").hidden = true;
  document.getElementById("sign-in").hidden = false;
  const error = document.getElementById("sign-in-error");
  error.textContent = message || "";
  error.hidden = !message;
  delete document.body.dataset.loaded;
}

async function signIn(credential) {
  clearView();
  state.credential = credential;
  try {
    state.me = await json("/v1/billing/me");
  } catch (error) {
    if (error.name === "AbortError") return;
    state.credential = null;
    signOut(error instanceof ApiFailure && error.status === 401 ? "That key or token is not valid." : `Could not sign in: ${error.message}`);
    return;
  }
  sessionStorage.setItem(STORE, credential);
  showSignedIn();
  await render();
}

document.addEventListener("DOMContentLoaded", () => {
  document.getElementById("sign-in-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const input = document.getElementById("credential");
    const credential = input.value.trim();
    input.value = "";
    if (credential) signIn(credential);
  });
  document.getElementById("sign-out").addEventListener("click", () => signOut());
  document.getElementById("controls").addEventListener("submit", (event) => {
    event.preventDefault();
    render();
  });
  for (const id of ["range", "width"]) document.getElementById(id).addEventListener("change", () => render());
  const kept = sessionStorage.getItem(STORE);
  if (kept) signIn(kept);
  else signOut();
});
