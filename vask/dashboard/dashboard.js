// Vask dashboard. Plain JavaScript, no build step, no third-party code.
//
// Data: REST calls to /admin/api/... with the admin token as a bearer token, and one
// WebSocket to /admin/ws that authenticates with its first message and then receives
// overview samples (once a second) and, while the console view is open, the debug
// console's records. Everything from the server is put on the page as text
// (textContent), never as HTML.
"use strict";

const HISTORY = 300;          // samples kept (the server sends one a second)
const CONSOLE_ROWS = 500;     // console lines kept on the page
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem("vask-admin-token") || "",
  apps: [],
  app: "",
  view: "overview",
  samples: [],
  ws: null,
  retry: 500,
  paused: false,
  records: [],
};

// --- helpers ------------------------------------------------------------------------

async function api(path, options = {}) {
  const headers = Object.assign({ Authorization: "Bearer " + state.token }, options.headers || {});
  const response = await fetch("/admin/api" + path, Object.assign({}, options, { headers }));
  if (response.status === 401) {
    logout("The admin token was refused.");
    throw new Error("unauthorized");
  }
  return response;
}

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function fmt(n, digits = 0) {
  if (n === null || n === undefined || Number.isNaN(n)) return "–";
  return Number(n).toLocaleString("en-US", { maximumFractionDigits: digits, minimumFractionDigits: digits });
}

function bytes(n) {
  if (!n) return "–";
  const units = ["B", "KiB", "MiB", "GiB"];
  let i = 0;
  while (n >= 1024 && i < units.length - 1) { n /= 1024; i += 1; }
  return n.toFixed(i ? 1 : 0) + " " + units[i];
}

// --- login --------------------------------------------------------------------------

async function login(token) {
  state.token = token;
  let response;
  try {
    response = await fetch("/admin/api/apps", { headers: { Authorization: "Bearer " + token } });
  } catch (err) {
    showLoginError("The server did not answer: " + err);
    return;
  }
  if (response.status !== 200) {
    showLoginError(response.status === 401 ? "Wrong admin token." : "Error " + response.status);
    state.token = "";
    sessionStorage.removeItem("vask-admin-token");
    return;
  }
  sessionStorage.setItem("vask-admin-token", token);
  state.apps = (await response.json()).apps;
  const select = $("app-select");
  select.replaceChildren(...state.apps.map((a) => { const o = el("option", a.id); o.value = a.id; return o; }));
  state.app = state.apps.length ? state.apps[0].id : "";
  $("login").hidden = true;
  $("tabs").hidden = false;
  $("app-picker").hidden = false;
  show("overview");
  connectFeed();
}

function showLoginError(text) {
  const p = $("login-error");
  p.textContent = text;
  p.hidden = false;
}

function logout(reason) {
  state.token = "";
  sessionStorage.removeItem("vask-admin-token");
  if (state.ws) { state.ws.onclose = null; state.ws.close(); state.ws = null; }
  $("login").hidden = false;
  $("tabs").hidden = true;
  $("app-picker").hidden = true;
  document.querySelectorAll(".view").forEach((v) => { v.hidden = true; });
  if (reason) showLoginError(reason);
}

// --- views --------------------------------------------------------------------------

function show(view) {
  state.view = view;
  document.querySelectorAll(".view").forEach((v) => { v.hidden = v.id !== "view-" + view; });
  document.querySelectorAll("#tabs button").forEach((b) => b.classList.toggle("active", b.dataset.view === view));
  if (view === "channels") searchChannels();
  if (view === "overview") renderOverview();
  watch();
}

function watch() {
  const ws = state.ws;
  if (ws && ws.readyState === WebSocket.OPEN && ws.authed) {
    ws.send(JSON.stringify({ type: "watch", app: state.app, console: state.view === "console" }));
  }
}

// --- the live feed ------------------------------------------------------------------

function connectFeed() {
  const scheme = location.protocol === "https:" ? "wss://" : "ws://";
  const ws = new WebSocket(scheme + location.host + "/admin/ws");
  state.ws = ws;
  ws.onopen = () => ws.send(JSON.stringify({ type: "auth", token: state.token }));
  ws.onmessage = (message) => {
    const data = JSON.parse(message.data);
    if (data.type === "hello") {
      ws.authed = true;
      state.retry = 500;
      $("feed-state").textContent = "live";
      $("feed-state").classList.add("live");
      state.samples = data.history.slice(-HISTORY);
      watch();
      renderOverview();
    } else if (data.type === "sample") {
      state.samples.push(data.sample);
      if (state.samples.length > HISTORY) state.samples.shift();
      if (state.view === "overview") renderOverview();
    } else if (data.type === "console") {
      addRecords(data.records);
    } else if (data.type === "lagging") {
      addRecords([{ type: "sampled", time_ms: Date.now(), note: "this page fell behind; lines were skipped" }]);
    }
  };
  ws.onclose = (event) => {
    $("feed-state").textContent = "offline";
    $("feed-state").classList.remove("live");
    if (event.code === 4401) { logout("The admin token was refused."); return; }
    if (state.ws === ws && state.token) {
      setTimeout(connectFeed, state.retry);
      state.retry = Math.min(state.retry * 2, 10000);
    }
  };
}

// --- overview -----------------------------------------------------------------------

function appFigures(sample) {
  return sample && sample.apps ? sample.apps[state.app] : undefined;
}

// Per-second rate of a cumulative counter between consecutive samples.
function rates(field) {
  const out = [];
  for (let i = 1; i < state.samples.length; i++) {
    const a = appFigures(state.samples[i - 1]);
    const b = appFigures(state.samples[i]);
    const dt = (state.samples[i].time_ms - state.samples[i - 1].time_ms) / 1000;
    out.push(a && b && dt > 0 ? Math.max(0, (b[field] - a[field]) / dt) : 0);
  }
  return out;
}

function gauge(field) {
  return state.samples.map((s) => { const f = appFigures(s); return f ? f[field] : 0; });
}

function last(list) { return list.length ? list[list.length - 1] : null; }

function renderOverview() {
  if (state.view !== "overview") return;
  const latest = last(state.samples);
  const figures = appFigures(latest);
  $("stat-connections").textContent = figures ? fmt(figures.connections) : "–";
  $("stat-channels").textContent = figures ? fmt(figures.channels) : "–";
  $("stat-members").textContent = figures ? fmt(figures.members) : "–";
  const inRate = rates("vask_ws_messages_received");
  const outRate = rates("vask_ws_messages_sent");
  const apiRate = rates("vask_http_calls_received");
  const clientRate = rates("vask_client_events");
  $("stat-in").textContent = fmt(last(inRate), 1);
  $("stat-out").textContent = fmt(last(outRate), 1);
  $("stat-api").textContent = fmt(last(apiRate), 1);
  $("stat-client").textContent = fmt(last(clientRate), 1);
  const hooks = latest ? latest.webhooks : null;
  $("stat-webhooks").textContent = hooks ? `${fmt(hooks.sent)} / ${fmt(hooks.failed)} / ${fmt(hooks.queued)}` : "none configured";
  chart("chart-connections", [gauge("connections")]);
  chart("chart-messages", [inRate, outRate]);
  chart("chart-api", [apiRate, clientRate]);
  renderProcesses(latest, state.samples.length > 1 ? state.samples[state.samples.length - 2] : null);
}

// A small line chart: one polyline per series, on a shared scale starting at 0. The
// x axis spans the history there is, at least a minute and at most HISTORY seconds.
function chart(id, series) {
  const svg = $(id);
  const W = 300, H = 80;
  const n = Math.min(HISTORY, Math.max(60, ...series.map((s) => s.length)));
  const top = Math.max(1, ...series.flat());
  const ns = "http://www.w3.org/2000/svg";
  const nodes = [];
  series.forEach((values, k) => {
    const line = document.createElementNS(ns, "polyline");
    const start = n - values.length;
    line.setAttribute("points", values.map((v, i) => `${((start + i) / (n - 1)) * W},${H - (v / top) * (H - 12)}`).join(" "));
    line.setAttribute("class", "s" + k);
    nodes.push(line);
  });
  const label = document.createElementNS(ns, "text");
  label.setAttribute("x", "2");
  label.setAttribute("y", "9");
  label.textContent = `last ${n} s · max ${fmt(top, top < 10 ? 1 : 0)}`;
  nodes.push(label);
  svg.replaceChildren(...nodes);
}

function renderProcesses(latest, previous) {
  const body = $("processes").querySelector("tbody");
  if (!latest) { body.replaceChildren(); return; }
  const dt = previous ? (latest.time_ms - previous.time_ms) : 0;
  const cpu = (now, before) => (before && dt > 0 ? fmt(((now - before) / dt) * 100, 1) + " %" : "–");
  const rows = [];
  const b = latest.broker;
  const pb = previous ? previous.broker : null;
  rows.push(["broker", "", "", cpu(b.cpu_ms, pb && pb.cpu_ms), bytes(b.rss), fmt(b.queue_depth), fmt(b.restarts)]);
  const before = {};
  if (previous) previous.workers.forEach((w) => { before[w.name] = w; });
  latest.workers.forEach((w) => {
    const p = before[w.name];
    rows.push(["worker " + w.slot, w.pid, fmt(w.connections), cpu(w.cpu_ms, p && p.cpu_ms), bytes(w.rss), fmt(w.queue_depth), fmt(w.restarts)]);
  });
  body.replaceChildren(...rows.map((cells) => {
    const tr = el("tr");
    cells.forEach((c) => tr.appendChild(el("td", c)));
    return tr;
  }));
}

// --- channels -----------------------------------------------------------------------

let searches = 0;

async function searchChannels() {
  if (!state.app) return;
  const mine = ++searches;  // an older search answering late must not overwrite this one
  const prefix = $("channel-prefix").value;
  const response = await api(`/apps/${encodeURIComponent(state.app)}/channels?limit=200&prefix=${encodeURIComponent(prefix)}`);
  if (mine !== searches) return;
  if (!response.ok) { $("channel-count").textContent = "error " + response.status; return; }
  const data = await response.json();
  if (mine !== searches) return;
  $("channel-count").textContent = `${fmt(data.matched)} channel(s)` + (data.matched > data.channels.length ? `, first ${data.channels.length} shown` : "");
  const body = $("channels-table").querySelector("tbody");
  body.replaceChildren(...data.channels.map((c) => {
    const tr = el("tr");
    tr.dataset.channel = c.name;
    tr.appendChild(el("td", c.name));
    tr.appendChild(el("td", fmt(c.subscriptions)));
    tr.appendChild(el("td", c.users === undefined ? "" : fmt(c.users)));
    tr.addEventListener("click", () => {
      body.querySelectorAll("tr").forEach((r) => r.classList.toggle("picked", r === tr));
      showChannel(c.name);
    });
    return tr;
  }));
}

async function showChannel(name) {
  const response = await api(`/apps/${encodeURIComponent(state.app)}/channel?name=${encodeURIComponent(name)}`);
  const box = $("channel-detail");
  if (!response.ok) { box.replaceChildren(el("p", "error " + response.status, "error")); return; }
  const c = await response.json();
  const nodes = [el("h3", c.name)];
  if (!c.occupied) { nodes.push(el("p", "Not occupied any more.", "muted")); box.replaceChildren(...nodes); return; }
  nodes.push(el("p", `${fmt(c.subscriptions)} subscription(s)`));
  const per = el("ul");
  Object.entries(c.per_worker).forEach(([w, n]) => per.appendChild(el("li", `${w}: ${n}`)));
  nodes.push(el("h4", "Per worker"), per);
  if (c.members) {
    nodes.push(el("h4", `Presence roster (${fmt(c.users)} user(s)` + (c.users > c.members.length ? `, first ${c.members.length} shown)` : ")")));
    const table = el("table");
    table.id = "roster";
    const head = el("tr");
    ["User id", "User info", "Connections"].forEach((h) => head.appendChild(el("th", h)));
    table.appendChild(head);
    c.members.forEach((m) => {
      const tr = el("tr");
      tr.appendChild(el("td", m.id));
      tr.appendChild(el("td", JSON.stringify(m.info)));
      tr.appendChild(el("td", m.connections));
      table.appendChild(tr);
    });
    nodes.push(table);
  }
  box.replaceChildren(...nodes);
}

// --- debug console ------------------------------------------------------------------

function describe(r) {
  switch (r.type) {
    case "api_message": case "client_event":
      return `${r.event || ""} ${r.data || ""}`;
    case "webhook":
      return `${r.outcome}${r.reason ? " (" + r.reason + ")" : ""} → ${r.url} · ${r.events} event(s) · attempt ${r.attempts}`;
    case "error":
      return `${r.code === null || r.code === undefined ? "" : r.code} ${r.message || ""}`;
    case "subscribe": case "signin":
      return r.user_id ? "user " + r.user_id : "";
    case "sampled":
      return r.note || `${fmt(r.left_out)} record(s) left out (sampling)`;
    default:
      return "";
  }
}

function channelOf(r) {
  if (r.channel) return r.channel;
  if (r.channels) return r.channels.join(", ");
  return "";
}

function matches(r) {
  const type = $("filter-type").value;
  const channel = $("filter-channel").value.trim();
  const event = $("filter-event").value.trim();
  if (type && r.type !== type) return false;
  if (channel && !channelOf(r).includes(channel)) return false;
  if (event && !(r.event || "").includes(event)) return false;
  return true;
}

function row(r) {
  const tr = el("tr", null, "t-" + r.type + (r.type === "webhook" && r.outcome !== "sent" ? " bad" : ""));
  const time = new Date(r.time_ms || Date.now());
  tr.appendChild(el("td", time.toLocaleTimeString("en-GB") + "." + String(time.getMilliseconds()).padStart(3, "0")));
  tr.appendChild(el("td", r.type));
  tr.appendChild(el("td", r.worker === undefined ? "" : r.worker));
  tr.appendChild(el("td", r.socket_id || ""));
  tr.appendChild(el("td", channelOf(r)));
  tr.appendChild(el("td", describe(r), "details"));
  return tr;
}

function addRecords(records) {
  state.records.push(...records);
  if (state.records.length > CONSOLE_ROWS) state.records.splice(0, state.records.length - CONSOLE_ROWS);
  if (!state.paused) renderConsole();
}

function renderConsole() {
  const body = $("console-log").querySelector("tbody");
  const shown = state.records.filter(matches).slice(-CONSOLE_ROWS).reverse();
  body.replaceChildren(...shown.map(row));
}

async function sendEvent(event) {
  event.preventDefault();
  const result = $("ec-result");
  result.textContent = "sending…";
  const body = { channel: $("ec-channel").value.trim(), event: $("ec-event").value.trim(), data: $("ec-data").value };
  const response = await api(`/apps/${encodeURIComponent(state.app)}/events`, {
    method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify(body),
  });
  const answer = await response.json();
  result.textContent = response.ok ? "sent (HTTP API answered " + answer.status + ")" : "failed: " + (answer.error || answer.answer);
  result.className = response.ok ? "" : "error";
}

// --- wiring -------------------------------------------------------------------------

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (e) => { e.preventDefault(); login($("token").value.trim()); });
  $("logout").addEventListener("click", () => logout(""));
  document.querySelectorAll("#tabs button").forEach((b) => b.addEventListener("click", () => show(b.dataset.view)));
  $("app-select").addEventListener("change", (e) => {
    state.app = e.target.value;
    state.records = [];
    renderConsole();
    show(state.view);
  });
  $("channel-form").addEventListener("submit", (e) => { e.preventDefault(); searchChannels(); });
  ["filter-type", "filter-channel", "filter-event"].forEach((id) => {
    $(id).addEventListener("input", renderConsole);
    $(id).addEventListener("change", renderConsole);
  });
  $("console-pause").addEventListener("click", () => {
    state.paused = !state.paused;
    $("console-pause").textContent = state.paused ? "Resume" : "Pause";
    if (!state.paused) renderConsole();
  });
  $("console-clear").addEventListener("click", () => { state.records = []; renderConsole(); });
  $("creator").addEventListener("submit", sendEvent);
  if (state.token) login(state.token);
});
