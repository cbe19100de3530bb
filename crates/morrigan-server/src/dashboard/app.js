// Morrigan dashboard: plain JavaScript, no build step, no third-party code.
// The user token lives in sessionStorage (gone with the tab) and travels only in the
// Authorization header: the event stream is read with fetch() streaming, not EventSource,
// so the token never appears in a URL or an access log.
"use strict";

const TOKEN_KEY = "morrigan.token";
const NAME_KEY = "morrigan.name";
const $ = (id) => document.getElementById(id);

const state = {
  token: sessionStorage.getItem(TOKEN_KEY),
  conns: new Map(), // connection id -> record (as the API serves it)
  selected: null,
  stream: null, // AbortController of the event stream
  refreshTimer: null,
};

// ----- API -----

class ApiError extends Error {
  constructor(status, reason, data) { super(reason); this.status = status; this.data = data; }
}

async function api(method, path, body) {
  const headers = {};
  if (state.token) headers.Authorization = "Bearer " + state.token;
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, {
    method, headers, body: body === undefined ? undefined : (typeof body === "string" ? body : JSON.stringify(body)),
  });
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = text; }
  if (res.status === 401 && state.token) { logout("Your session expired: log in again."); }
  if (!res.ok) throw new ApiError(res.status, (data && data.reason) || res.statusText, data);
  return data;
}

// ----- formatting -----

function fmtTime(iso) {
  if (!iso) return "–";
  const d = new Date(iso);
  return isNaN(d) ? iso : d.toLocaleString();
}

function ago(iso) {
  if (!iso) return "";
  const s = Math.round((Date.now() - new Date(iso).getTime()) / 1000);
  if (s < 60) return s + " s ago";
  if (s < 3600) return Math.round(s / 60) + " min ago";
  if (s < 86400) return Math.round(s / 3600) + " h ago";
  return Math.round(s / 86400) + " d ago";
}

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v;
    else if (k.startsWith("data-")) e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(c ?? ""));
  return e;
}

function short(id) { return id ? id.slice(0, 8) : "–"; }

function notice(text) {
  const n = $("notice");
  n.textContent = text || "";
  n.hidden = !text;
}

// ----- session -----

function showApp(on) {
  $("login").hidden = on;
  $("nav").hidden = !on;
  $("session").hidden = !on;
  if (!on) for (const v of ["connections", "nodes", "provision"]) $(v).hidden = true;
}

function logout(message) {
  state.token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  if (state.stream) state.stream.abort();
  state.stream = null;
  clearInterval(state.refreshTimer);
  state.conns.clear();
  showApp(false);
  notice(message || "");
  $("login-password").value = "";
  $("login-password").focus();
}

async function login(ev) {
  ev.preventDefault();
  notice("");
  const name = $("login-name").value.trim();
  try {
    const r = await api("POST", "api/auth", { name, password: $("login-password").value });
    state.token = r.token;
    sessionStorage.setItem(TOKEN_KEY, r.token);
    sessionStorage.setItem(NAME_KEY, name);
    $("login-password").value = "";
    start();
  } catch (e) {
    notice("Login failed: " + e.message);
  }
}

function start() {
  showApp(true);
  $("whoami").textContent = sessionStorage.getItem(NAME_KEY) || "";
  show("connections");
  loadConnections();
  openStream();
  clearInterval(state.refreshTimer);
  // Heartbeat times are not events: refresh them every 15 s.
  state.refreshTimer = setInterval(loadConnections, 15000);
}

function show(view) {
  for (const v of ["connections", "nodes", "provision"]) $(v).hidden = v !== view;
  for (const b of document.querySelectorAll("nav button")) {
    if (b.dataset.view === view) b.setAttribute("aria-current", "page");
    else b.removeAttribute("aria-current");
  }
  if (view === "nodes") loadNodes();
  if (view === "provision") $("provision-id").focus();
}

// ----- connections -----

async function loadConnections() {
  if (!state.token) return;
  const open = $("open-only").checked;
  try {
    const list = await api("GET", "api/core/connection?limit=500" + (open ? "&open=true" : ""));
    const fresh = new Map();
    for (const r of list) {
      // Pending records (token issued, socket not open yet) are not connections.
      if (open && !r.connected) continue;
      const old = state.conns.get(r.id);
      if (old && old.state) r.state = old.state;
      fresh.set(r.id, r);
    }
    state.conns = fresh;
    render();
    if (state.selected && fresh.has(state.selected)) renderDetail();
  } catch (e) {
    if (e.status !== 401) notice("Could not list connections: " + e.message);
  }
}

function matches(r, q) {
  if (!q) return true;
  return [r.clientId, r.id, r.serverId, r.clientAddress, r.state]
    .some((v) => v && String(v).toLowerCase().includes(q));
}

function render(freshId) {
  const q = $("filter").value.trim().toLowerCase();
  const rows = [...state.conns.values()]
    .filter((r) => matches(r, q))
    .sort((a, b) => String(b.connected || b.created).localeCompare(String(a.connected || a.created)));
  const body = $("conn-rows");
  body.replaceChildren(...rows.map((r) => row(r, r.id === freshId)));
  $("empty").hidden = rows.length > 0;
  $("count").textContent = "(" + rows.length + ")";
}

function row(r, fresh) {
  const alive = r.open && r.alive;
  const tr = el("tr", { "data-id": r.id, "data-client": r.clientId },
    el("td", {}, el("strong", {}, r.clientId), r.state ? el("span", { class: "state" }, r.state) : ""),
    el("td", { class: "mono", title: r.serverId || "" }, short(r.serverId)),
    el("td", { class: "mono" }, r.clientAddress || "–"),
    el("td", { title: r.connected || "" }, fmtTime(r.connected)),
    el("td", { title: r.lastHeartbeat || "" }, r.lastHeartbeat ? ago(r.lastHeartbeat) : "–"),
    el("td", { class: alive ? "yes" : "no" }, r.open ? (alive ? "yes" : "no") : "closed"),
    el("td", {}, el("button", { type: "button", class: "link", "data-detail": r.id,
      ariaLabel: "Details of " + r.clientId }, "Details")));
  if (r.id === state.selected) tr.classList.add("selected");
  if (!r.open) tr.classList.add("closed");
  if (fresh) tr.classList.add("fresh");
  return tr;
}

// ----- detail -----

async function select(id) {
  state.selected = id;
  $("send-result").textContent = "";
  $("close-result").textContent = "";
  $("detail").hidden = false;
  document.querySelector(".split").classList.add("with-detail");
  if (!state.conns.has(id)) {
    try { state.conns.set(id, await api("GET", "api/core/connection/" + encodeURIComponent(id))); } catch { /* shown below */ }
  }
  render();
  renderDetail();
  loadHistory();
  loadMessages();
  $("detail-title").focus?.();
}

function renderDetail() {
  const r = state.conns.get(state.selected);
  if (!r) return;
  $("detail-title").textContent = "Connection of " + r.clientId;
  const f = [
    ["Connection", r.id], ["Client", r.clientId], ["State", r.state || "–"], ["Node", r.serverId || "–"],
    ["Address", r.clientAddress || "–"], ["Connected", fmtTime(r.connected)],
    ["Last heartbeat", fmtTime(r.lastHeartbeat)], ["Alive", r.alive ? "yes" : "no"],
    ["Open", r.open ? "yes" : "no"],
  ];
  if (!r.open) f.push(["Disconnected", fmtTime(r.disconnected)], ["Close", (r.closeCode ?? "") + " " + (r.closeReason || "")]);
  $("detail-fields").replaceChildren(...f.flatMap(([k, v]) => [el("dt", {}, k), el("dd", { class: k === "Connection" || k === "Node" ? "mono" : "" }, v)]));
  $("send-button").disabled = !r.open;
  $("close-button").disabled = !r.open;
}

async function loadHistory() {
  const r = state.conns.get(state.selected);
  if (!r) return;
  try {
    const list = await api("GET", "api/core/connection?limit=20&clientId=" + encodeURIComponent(r.clientId));
    $("history").replaceChildren(...list.filter((h) => h.connected || !h.open).map((h) => el("tr", { "data-id": h.id },
      el("td", { title: h.id }, fmtTime(h.connected)),
      el("td", {}, h.open ? "open" : fmtTime(h.disconnected)),
      el("td", { class: "mono" }, short(h.serverId)),
      el("td", {}, h.open ? "" : (h.closeCode ?? "") + " " + (h.closeReason || "")))));
  } catch (e) {
    $("history").replaceChildren(el("tr", {}, el("td", { colSpan: 4 }, "Could not load: " + e.message)));
  }
}

async function loadMessages() {
  const r = state.conns.get(state.selected);
  if (!r) return;
  try {
    const list = await api("GET", "api/core/client/" + encodeURIComponent(r.clientId) + "/messages?limit=20");
    $("messages").replaceChildren(...list.messages.map((m) => el("tr", { "data-message": m.id },
      el("td", { title: m.id }, fmtTime(m.created)),
      el("td", {}, m.direction === "in" ? "from device" : "to device"),
      el("td", { class: "mono" }, m.type),
      el("td", {}, m.state),
      el("td", { class: "mono" }, m.reply !== null && m.reply !== undefined ? JSON.stringify(m.reply) : (m.reason || "")))));
  } catch (e) {
    $("messages").replaceChildren(el("tr", {}, el("td", { colSpan: 5 }, "Could not load: " + e.message)));
  }
}

// Message events may come fast (telemetry): the table reloads at most once a second.
let messagesTimer = null;
function messagesChanged() {
  if (messagesTimer) return;
  messagesTimer = setTimeout(() => { messagesTimer = null; loadMessages(); }, 1000);
}

async function send(ev) {
  ev.preventDefault();
  const out = $("send-result");
  out.className = "";
  const text = $("send-body").value;
  try { JSON.parse(text); } catch (e) { out.className = "bad"; out.textContent = "Not JSON: " + e.message; return; }
  const track = $("send-track").value;
  const query = track === "none" ? "" : "?track=" + track + "&timeout=10";
  out.textContent = track === "none" ? "sending…" : "sending, waiting for the device's " + track + "…";
  try {
    const res = await api("POST", "api/core/connection/" + encodeURIComponent(state.selected) + "/send" + query, text);
    out.className = "ok";
    if (track === "none") out.textContent = "Delivered to the socket at " + new Date().toLocaleTimeString() + ".";
    else if (res.state === "replied") out.textContent = "Replied: " + JSON.stringify(res.reply);
    else out.textContent = "Acknowledged by the device (" + res.state + ").";
  } catch (e) {
    out.className = "bad";
    const d = e.data || {};
    if (d.state === "timeout") out.textContent = "No answer within 10 s; the message is still tracked (" + d.messageId + ").";
    else if (d.state === "rejected") out.textContent = "Refused by the device: " + e.message;
    else out.textContent = "Not delivered (" + e.status + "): " + e.message;
  }
  loadMessages();
}

async function closeConn(ev) {
  ev.preventDefault();
  const out = $("close-result");
  out.className = "";
  out.textContent = "closing…";
  const reason = $("close-reason").value;
  try {
    await api("DELETE", "api/core/connection/" + encodeURIComponent(state.selected) + "?reason=" + encodeURIComponent(reason));
    out.className = "ok";
    out.textContent = "Closed.";
  } catch (e) {
    out.className = "bad";
    out.textContent = "Could not close (" + e.status + "): " + e.message;
  }
}

// ----- event stream -----

async function openStream() {
  if (state.stream) state.stream.abort();
  const ctl = new AbortController();
  state.stream = ctl;
  let delay = 1000;
  while (!ctl.signal.aborted && state.token) {
    try {
      const res = await fetch("api/core/connection/events", {
        headers: { Authorization: "Bearer " + state.token, Accept: "text/event-stream" },
        signal: ctl.signal,
      });
      if (res.status === 401) { logout("Your session expired: log in again."); return; }
      if (!res.ok) throw new Error("HTTP " + res.status);
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value.replace(/\r\n/g, "\n");
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          onBlock(block);
          delay = 1000;
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    setLive(false);
    await new Promise((r) => setTimeout(r, delay));
    delay = Math.min(delay * 2, 15000);
  }
}

function setLive(on) {
  const l = $("live");
  l.textContent = on ? "live" : "reconnecting…";
  l.classList.toggle("on", on);
}

function onBlock(block) {
  let kind = "message";
  let data = "";
  for (const line of block.split("\n")) {
    if (line.startsWith("event:")) kind = line.slice(6).trim();
    else if (line.startsWith("data:")) data += line.slice(5).trimStart();
  }
  if (!data) return; // keep-alive comment
  let ev;
  try { ev = JSON.parse(data); } catch { return; }
  onEvent(kind, ev);
}

function onEvent(kind, ev) {
  if (kind === "ready") { setLive(true); loadConnections(); return; }
  if (kind === "lagged") { logEvent(kind, { connectionId: "", clientId: "", reason: ev.missed + " events missed" }); loadConnections(); return; }
  logEvent(kind, ev);
  const r = state.conns.get(ev.connectionId);
  if (kind === "connected") {
    state.conns.set(ev.connectionId, {
      id: ev.connectionId, clientId: ev.clientId, serverId: ev.node, clientAddress: ev.address,
      connected: ev.at, lastHeartbeat: null, alive: true, open: true, created: ev.at,
    });
    render(ev.connectionId);
  } else if (kind === "disconnected" && r) {
    if ($("open-only").checked && state.selected !== ev.connectionId) state.conns.delete(ev.connectionId);
    else Object.assign(r, { open: false, alive: false, disconnected: ev.at, closeCode: ev.code, closeReason: ev.reason });
    render();
  } else if (kind === "heartbeat-missed" && r) {
    r.alive = false;
    render();
  } else if (kind === "client-state" && r) {
    r.state = ev.state;
    render();
  }
  if (kind === "message") {
    if (state.selected && state.conns.get(state.selected)?.clientId === ev.clientId) messagesChanged();
    return;
  }
  if (ev.connectionId && ev.connectionId === state.selected) { renderDetail(); loadHistory(); }
  else if (state.selected && state.conns.get(state.selected)?.clientId === ev.clientId) loadHistory();
}

function logEvent(kind, ev) {
  const list = $("events");
  let what = ev.clientId ? ev.clientId + " " + short(ev.connectionId) : "";
  if (ev.code) what += " — " + ev.code + " " + (ev.reason || "");
  else if (ev.state) what += " — " + ev.state;
  else if (ev.address) what += " from " + ev.address;
  else if (ev.reason) what += ev.reason;
  list.prepend(el("li", { "data-kind": kind }, el("span", { class: "kind" }, kind),
    el("time", { dateTime: ev.at || "" }, new Date(ev.at || Date.now()).toLocaleTimeString()), " ", what));
  while (list.children.length > 100) list.lastChild.remove();
}

// ----- nodes -----

async function loadNodes() {
  try {
    const nodes = await api("GET", "api/core/node");
    $("node-rows").replaceChildren(...nodes.map((n) => el("tr", {},
      el("td", { class: "mono" }, n.id), el("td", { class: n.state === "running" ? "yes" : "no" }, n.state),
      el("td", {}, n.publicUrl || n.public_url || ""), el("td", {}, n.version),
      el("td", {}, fmtTime(n.started)), el("td", {}, fmtTime(n.leaseExpires || n.lease_expires)))));
  } catch (e) {
    notice("Could not list nodes: " + e.message);
  }
}

// ----- provisioning -----

async function provision(ev) {
  ev.preventDefault();
  const id = $("provision-id").value.trim();
  try {
    const token = await api("POST", "api/core/client/provision", { id });
    $("provision-client").textContent = id;
    $("provision-token").value = token;
    $("provision-result").hidden = false;
    $("provision-token").select();
  } catch (e) {
    notice("Could not provision: " + e.message);
  }
}

function hideToken() {
  $("provision-token").value = "";
  $("provision-result").hidden = true;
  $("provision-id").value = "";
}

// ----- wiring -----

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", login);
  $("logout").addEventListener("click", () => logout(""));
  for (const b of document.querySelectorAll("nav button")) b.addEventListener("click", () => show(b.dataset.view));
  $("filter").addEventListener("input", () => render());
  $("open-only").addEventListener("change", loadConnections);
  $("refresh").addEventListener("click", loadConnections);
  $("nodes-refresh").addEventListener("click", loadNodes);
  $("conn-rows").addEventListener("click", (e) => {
    const b = e.target.closest("[data-detail]");
    if (b) select(b.getAttribute("data-detail"));
  });
  $("send-form").addEventListener("submit", send);
  $("close-form").addEventListener("submit", closeConn);
  $("provision-form").addEventListener("submit", provision);
  $("provision-copy").addEventListener("click", () => navigator.clipboard?.writeText($("provision-token").value));
  $("provision-hide").addEventListener("click", hideToken);
  if (state.token) start();
  else { showApp(false); $("login-password").focus(); }
});
