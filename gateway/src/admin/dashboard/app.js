// The Portcullis operator dashboard. Every value shown comes from /api/v1 with the
// admin token, and is written with textContent: device ids, reasons and audit lines
// are chosen by peers. The token stays in this tab (sessionStorage), never in a
// cookie, a URL or persistent storage.
"use strict";

const TOKEN_KEY = "portcullis-admin-token";
const POLL_MS = 3000;

let token = null;
let timer = null;
let previous = null; // the last /stats reading, for rates

const $ = (id) => document.getElementById(id);

class Refused extends Error {}

async function api(method, path, body) {
  const init = { method, headers: { Authorization: "Bearer " + token }, cache: "no-store" };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await fetch(path, init);
  if (response.status === 401) throw new Refused("token refused");
  let reply = null;
  try {
    reply = await response.json();
  } catch (_) {
    reply = null;
  }
  if (!response.ok) {
    const why = reply && typeof reply.error === "string" ? reply.error : "HTTP " + response.status;
    throw new Error(method + " " + path + ": " + why);
  }
  return reply;
}

function cell(row, text, className) {
  const td = document.createElement("td");
  td.textContent = text === undefined || text === null ? "" : String(text);
  if (className) td.className = className;
  row.appendChild(td);
  return td;
}

function fill(tableId, rows, build) {
  const body = $(tableId).tBodies[0];
  const fresh = document.createElement("tbody");
  for (const r of rows) {
    const tr = document.createElement("tr");
    build(tr, r);
    fresh.appendChild(tr);
  }
  body.replaceWith(fresh);
}

function when(unix) {
  return unix ? new Date(unix * 1000).toISOString().replace(".000Z", "Z") : "";
}

function status(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

function showLogin(error) {
  stop();
  token = null;
  sessionStorage.removeItem(TOKEN_KEY);
  for (const id of ["rates", "devices", "bans", "events"]) fill(id, [], () => {});
  $("census").textContent = "";
  status("");
  $("dashboard").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = error || "";
  $("token").value = "";
}

function showDashboard() {
  $("login").hidden = true;
  $("login-error").textContent = "";
  $("dashboard").hidden = false;
  $("logout").hidden = false;
}

function stop() {
  if (timer !== null) clearInterval(timer);
  timer = null;
  previous = null;
}

// One button of a device row: asks first, then calls the API and refreshes.
function action(td, label, question, run) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = label;
  b.dataset.action = label.toLowerCase();
  b.addEventListener("click", async () => {
    if (!window.confirm(question)) return;
    try {
      status(await run());
    } catch (e) {
      if (e instanceof Refused) return showLogin("token refused");
      status(e.message, true);
    }
    refresh();
  });
  td.appendChild(b);
}

function reasonGiven() {
  const r = $("reason").value.trim();
  return r === "" ? undefined : r;
}

function renderDevices(devices, states, clients) {
  const byState = new Map(states.map((q) => [q.id, q]));
  const sessions = new Map();
  for (const c of clients) {
    if (c.kind !== "device") continue;
    if (!sessions.has(c.id)) sessions.set(c.id, []);
    sessions.get(c.id).push(c);
  }
  fill("devices", devices, (tr, d) => {
    const q = byState.get(d.id);
    const state = q ? q.state : "normal";
    const live = sessions.get(d.id) || [];
    const path = encodeURIComponent(d.id);
    tr.dataset.device = d.id;
    cell(tr, d.id, "id");
    cell(tr, d.group);
    cell(tr, d.enabled ? "yes" : "no");
    cell(tr, state, "state state-" + state);
    cell(tr, q ? when(q.since_unix) : "", "since");
    cell(tr, q && q.reason ? q.reason : "", "reason");
    cell(tr, live.map((s) => s.protocol + " from " + s.source).join(", "), "connected");
    const td = cell(tr, "", "actions");
    if (state === "quarantined" || state === "probation") {
      action(td, "Release", "Release " + d.id + " from " + state + "?", async () => {
        const r = await api("POST", "/api/v1/quarantine/" + path + "/release");
        return d.id + " is now " + r.state;
      });
    }
    if (state !== "quarantined") {
      action(td, "Quarantine", "Quarantine " + d.id + "? Its messages stop reaching services.", async () => {
        const r = await api("POST", "/api/v1/quarantine/" + path, { reason: reasonGiven() });
        return d.id + " is now " + r.state;
      });
    }
    action(td, "Kick", "Kick " + d.id + "? Its open sessions end; it may connect again.", async () => {
      const r = await api("POST", "/api/v1/devices/" + path + "/kick");
      return d.id + ": " + r.sessions_ended + " session(s) ended";
    });
    action(td, "Ban", "Ban " + d.id + " until the ban is lifted? Its sessions end and it cannot connect.", async () => {
      const r = await api("POST", "/api/v1/bans", { target: "device/" + d.id, reason: reasonGiven() });
      return r.target + " banned; " + r.sessions_ended + " session(s) ended";
    });
  });
}

function renderBans(bans) {
  fill("bans", bans, (tr, b) => {
    tr.dataset.target = b.target;
    cell(tr, b.target);
    cell(tr, b.reason, "reason");
    cell(tr, when(b.created_unix));
    cell(tr, b.expires_unix ? when(b.expires_unix) : "lifted by hand");
    // `device ID` / `service ID` / `source CIDR`, removed as `device/ID`, the CIDR.
    const [kind, ...rest] = b.target.split(" ");
    const target = kind === "source" ? rest.join(" ") : kind + "/" + rest.join(" ");
    const td = cell(tr, "");
    action(td, "Lift", "Lift the ban on " + b.target + "?", async () => {
      await api("DELETE", "/api/v1/bans/" + encodeURIComponent(target));
      return "ban on " + b.target + " lifted";
    });
  });
}

function renderEvents(events) {
  fill("events", events.slice().reverse(), (tr, e) => {
    cell(tr, new Date(e.time_ms).toISOString());
    cell(tr, e.event);
    cell(tr, e.decision);
    cell(tr, e.principal);
    cell(tr, e.source);
    cell(tr, e.repeated ? (e.reason || e.of || "") + " (×" + e.repeated + ")" : e.reason, "reason");
  });
}

function renderStats(now) {
  const rows = [
    ["messages in", now.messages_in, previous && previous.messages_in],
    ["messages out", now.messages_out, previous && previous.messages_out],
    ["refusals", now.refusals, previous && previous.refusals],
  ];
  for (const [stage, n] of Object.entries(now.refusals_by_stage)) {
    rows.push(["refusals at " + stage, n, previous && previous.refusals_by_stage[stage]]);
  }
  const seconds = previous ? (now.time_ms - previous.time_ms) / 1000 : 0;
  fill("rates", rows, (tr, [what, total, before]) => {
    tr.dataset.what = what;
    cell(tr, what);
    const rate = seconds > 0 && before !== null && before !== undefined ? ((total - before) / seconds).toFixed(1) : "…";
    cell(tr, rate, "rate");
    cell(tr, total, "total");
  });
  const d = now.devices;
  $("census").textContent =
    "Devices: " + d.normal + " normal, " + d.probation + " on probation, " +
    d.quarantined + " quarantined, " + d.released + " released and watched; " +
    now.connections_active + " connections open.";
  previous = now;
}

async function refresh() {
  if (token === null) return;
  try {
    const [stats, devices, states, clients, bans, events] = await Promise.all([
      api("GET", "/api/v1/stats"),
      api("GET", "/api/v1/devices"),
      api("GET", "/api/v1/quarantine?all=true"),
      api("GET", "/api/v1/clients"),
      api("GET", "/api/v1/bans"),
      api("GET", "/api/v1/events?limit=50"),
    ]);
    if (token === null) return;
    renderStats(stats);
    renderDevices(devices, states, clients);
    renderBans(bans);
    renderEvents(events);
    document.body.dataset.refreshed = String(stats.time_ms);
  } catch (e) {
    if (e instanceof Refused) return showLogin("token refused");
    status(e.message, true);
  }
}

// One call checks the token; only then is anything else asked or shown.
async function login(candidate) {
  token = candidate;
  try {
    await api("GET", "/api/v1/stats");
  } catch (e) {
    return showLogin(e instanceof Refused ? "token refused" : e.message);
  }
  sessionStorage.setItem(TOKEN_KEY, candidate);
  showDashboard();
  stop();
  await refresh();
  timer = setInterval(refresh, POLL_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login-form").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const candidate = $("token").value.trim();
    $("token").value = "";
    if (candidate !== "") login(candidate);
  });
  $("logout").addEventListener("click", () => showLogin(""));
  const kept = sessionStorage.getItem(TOKEN_KEY);
  if (kept) login(kept);
});
