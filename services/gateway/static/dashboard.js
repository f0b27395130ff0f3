// Reef dashboard: fetches /admin/dashboard/data with the admin key and renders it.
// Plain JS, no dependencies. Every value from the server is set with textContent (never
// as HTML): turn previews are user text.
"use strict";

const DATA_URL = "/admin/dashboard/data";
const KEY_STORE = "reef.adminKey";
// Seconds between refreshes: 5, or ?refresh=N in the page's address (at least 1).
const REFRESH_MS = Math.max(1, Number(new URLSearchParams(location.search).get("refresh")) || 5) * 1000;
const MEAN_WINDOW = 20;
const SVG_NS = "http://www.w3.org/2000/svg";

let timer = null;
let latest = 0;  // only the newest request's answer is drawn

const $ = (id) => document.getElementById(id);

function el(tag, text, className) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (className) node.className = className;
  return node;
}

function fmtReward(value) {
  if (typeof value !== "number") return "unscored";
  return (value >= 0 ? "+" : "") + value.toFixed(3);
}

function fmtTime(seconds) {
  if (typeof seconds !== "number" || !seconds) return "";
  return new Date(seconds * 1000).toLocaleTimeString();
}

function rewardCell(value, missing) {
  if (typeof value !== "number") return el("td", missing || "–", "num");
  return el("td", fmtReward(value), value >= 0 ? "num pos" : "num neg");
}

function fillRows(tableId, rows, build, emptyText) {
  const body = $(tableId).tBodies[0];
  body.replaceChildren();
  if (!rows.length) {
    const tr = el("tr");
    const td = el("td", emptyText, "empty");
    td.colSpan = $(tableId).tHead.rows[0].cells.length;
    tr.append(td);
    body.append(tr);
    return;
  }
  for (const row of rows) {
    const tr = el("tr");
    tr.append(...build(row, tr));
    body.append(tr);
  }
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG_NS, tag);
  for (const [name, value] of Object.entries(attrs)) node.setAttribute(name, String(value));
  return node;
}

function movingMean(values, window) {
  const out = [];
  let sum = 0;
  values.forEach((v, i) => {
    sum += v;
    if (i >= window) sum -= values[i - window];
    out.push(sum / Math.min(i + 1, window));
  });
  return out;
}

function drawReward(points) {
  const chart = $("reward-chart");
  chart.replaceChildren();
  // Drawn in the chart's own pixels, so dots stay round and labels unstretched.
  const W = Math.max(300, chart.clientWidth || 800), H = 220, PAD = 28;
  chart.setAttribute("viewBox", `0 0 ${W} ${H}`);
  const rewards = points.map((p) => p[1]);
  let lo = Math.min(-1, ...rewards), hi = Math.max(1, ...rewards);
  const y = (v) => PAD + (hi - v) / (hi - lo) * (H - 2 * PAD);
  const x = (i) => PAD + (points.length > 1 ? i / (points.length - 1) : 0.5) * (W - 2 * PAD);
  for (const v of [hi, 0, lo]) {
    chart.append(svg("line", {x1: PAD, x2: W - PAD, y1: y(v), y2: y(v), class: "axis"}));
    const label = svg("text", {x: 2, y: y(v) + 4});
    label.textContent = v.toFixed(1);
    chart.append(label);
  }
  if (!points.length) {
    const empty = svg("text", {x: W / 2 - 60, y: H / 2});
    empty.textContent = "no scored turns yet";
    chart.append(empty);
    return;
  }
  rewards.forEach((v, i) => chart.append(svg("circle", {cx: x(i), cy: y(v), r: 3, class: "dot"})));
  const mean = movingMean(rewards, MEAN_WINDOW);
  const path = mean.map((v, i) => (i ? "L" : "M") + x(i).toFixed(1) + "," + y(v).toFixed(1));
  chart.append(svg("path", {d: path.join(" "), class: "mean"}));
}

function renderReward(data) {
  const reward = data.reward;
  $("reward-count").textContent = reward.count;
  $("reward-window").textContent = data.scored_window;
  $("reward-mean").textContent = reward.mean === null ? "–" : fmtReward(reward.mean);
  const recent = reward.points.slice(-20).map((p) => p[1]);
  $("reward-recent").textContent = recent.length
    ? fmtReward(recent.reduce((a, b) => a + b, 0) / recent.length) : "–";
  drawReward(reward.points);
}

function renderPolicy(weights) {
  $("live-headline").textContent = weights.live.length
    ? weights.live.map((v) => `v${v.version} (${v.adapter}${v.tenant === "*" ? "" : ", " + v.tenant})`).join(", ")
    : "the base model";
  fillRows("live-versions", weights.live, (v) => [
    el("td", v.tenant === "*" ? "* (all tenants)" : v.tenant),
    el("td", "v" + v.version, "num version"), el("td", v.adapter),
    el("td", v.step, "num"), el("td", fmtTime(v.since)),
  ], "the base model (no adapter published yet)");
  fillRows("swaps", weights.events, (e) => {
    const flags = el("td");
    if (e.live) flags.append(el("span", "live", "badge live"));
    if (e.rollback) flags.append(el("span", "rollback", "badge rollback"));
    const loss = typeof e.loss === "number" ? e.loss.toFixed(4) : "–";
    return [el("td", fmtTime(e.created_at)), el("td", e.tenant), el("td", "v" + e.version, "num"),
            el("td", e.adapter), el("td", e.step, "num"), rewardCell(e.batch_reward),
            el("td", loss, "num"), flags];
  }, "no weights events");
}

function renderTurns(turns) {
  fillRows("turns", turns, (t) => [
    el("td", fmtTime(t.created_at)), el("td", t.tenant), el("td", t.session_id, "text"),
    el("td", t.turn_index, "num"), rewardCell(t.reward, "unscored"), el("td", t.reason),
    el("td", t.policy_version || "base"), el("td", t.user, "text"), el("td", t.answer, "text"),
  ], "no scored turns yet");
}

function mean(value) {
  return typeof value === "number" ? fmtReward(value) : "–";
}

function renderSkills(skills) {
  fillRows("skills", skills, (s) => {
    const name = el("td", s.name, "skill-name");
    name.title = s.description;
    const status = el("td");
    status.append(el("span", s.status, "badge " + s.status));
    return [name, el("td", s.tenant), status, el("td", s.category),
            el("td", s.version, "num"), el("td", s.with_count, "num"),
            el("td", mean(s.with_mean), "num"), el("td", s.without_count, "num"),
            el("td", mean(s.without_mean), "num")];
  }, "no skills");
}

function renderQueues(queues) {
  fillRows("queues", queues, (q, tr) => {
    tr.dataset.stream = q.stream;
    const groups = el("td");
    if (!q.groups.length) groups.textContent = "no consumer group yet";
    for (const g of q.groups) {
      const lag = g.lag === null || g.lag === undefined ? "?" : g.lag;
      groups.append(el("div", `${g.name}: ${g.pending} pending / ${lag} lag / ${g.consumers} consumers`,
                       g.pending > 0 || (typeof g.lag === "number" && g.lag > 0) ? "group busy" : "group"));
    }
    const row = [el("td", q.stream), el("td", q.length, "num length"),
                 el("td", q.dead_letters, q.dead_letters > 0 ? "num dead warn" : "num dead"), groups];
    row[0].title = q.key;
    return row;
  }, "");
}

function renderTenants(tenants) {
  const select = $("tenant");
  const chosen = select.value;  // the reader's choice, even if this answer was for another
  const known = Array.from(select.options).map((o) => o.value);
  const wanted = [""].concat(tenants);
  if (known.join("\n") !== wanted.join("\n")) {
    select.replaceChildren(el("option", "all tenants"));
    select.options[0].value = "";
    for (const t of tenants) {
      const option = el("option", t);
      option.value = t;
      select.append(option);
    }
  }
  select.value = chosen;
  $("tenant-label").hidden = false;
}

function render(data) {
  renderTenants(data.tenants);
  renderReward(data);
  renderPolicy(data.weights);
  renderTurns(data.turns);
  renderSkills(data.skills);
  renderQueues(data.queues);
  $("status").textContent = `namespace ${data.namespace} · updated ${new Date().toLocaleTimeString()}`;
  $("status").className = "";
}

function showLogin(message) {
  sessionStorage.removeItem(KEY_STORE);
  clearTimeout(timer);
  $("panels").hidden = true;
  $("logout").hidden = true;
  $("login").hidden = false;
  $("login-error").textContent = message || "";
}

async function refresh() {
  clearTimeout(timer);
  const key = sessionStorage.getItem(KEY_STORE);
  if (!key) return showLogin("");
  const tenant = $("tenant").value;
  const url = DATA_URL + (tenant ? "?tenant=" + encodeURIComponent(tenant) : "");
  const request = ++latest;
  try {
    const resp = await fetch(url, {headers: {Authorization: "Bearer " + key}, cache: "no-store"});
    const body = await resp.json().catch(() => ({}));
    if (request !== latest) return;  // a newer refresh (another tenant) is under way
    if (resp.status === 401 || resp.status === 403) {
      return showLogin((body.error && body.error.message) || "The key was refused.");
    }
    if (!resp.ok) throw new Error((body.error && body.error.message) || "HTTP " + resp.status);
    $("login").hidden = true;
    $("panels").hidden = false;
    $("logout").hidden = false;
    render(body);
  } catch (err) {
    if (request !== latest) return;
    $("status").textContent = "refresh failed: " + err.message + " (retrying)";
    $("status").className = "error";
  }
  timer = setTimeout(refresh, REFRESH_MS);
}

document.addEventListener("DOMContentLoaded", () => {
  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("key").value.trim();
    $("key").value = "";
    if (!key) return;
    sessionStorage.setItem(KEY_STORE, key);
    $("login-error").textContent = "";
    refresh();
  });
  $("logout").addEventListener("click", () => showLogin(""));
  $("tenant").addEventListener("change", refresh);
  if (sessionStorage.getItem(KEY_STORE)) refresh(); else showLogin("");
});
