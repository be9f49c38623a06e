// The fleet status page: polls /fleet and draws it. Every value goes in as text (textContent),
// never as markup, so a file name or a reason cannot inject anything.
"use strict";
const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);
let failedOffset = 0, actions = false, timer = null;

function el(tag, text, cls) {
  const node = document.createElement(tag);
  if (text !== undefined && text !== null) node.textContent = String(text);
  if (cls) node.className = cls;
  return node;
}
function fill(tbody, rows) { tbody.replaceChildren(...rows); }
function tr(cells) { const row = el("tr"); row.append(...cells); return row; }
function num(text) { return el("td", text, "num"); }
function bytes(n) {
  const units = ["B", "KB", "MB", "GB", "TB"];
  let i = 0; n = Number(n) || 0;
  while (n >= 1000 && i < units.length - 1) { n /= 1000; i++; }
  return (i ? n.toFixed(1) : Math.round(n)) + " " + units[i];
}
function ago(seconds) {
  seconds = Math.max(0, Math.round(seconds));
  if (seconds < 120) return seconds + " s";
  if (seconds < 7200) return Math.round(seconds / 60) + " min";
  return (seconds / 3600).toFixed(1) + " h";
}
function when(unix) { return unix ? new Date(unix * 1000).toLocaleTimeString() : ""; }
function settled(job) { return (job.uploaded || 0) + (job.skipped || 0) + (job.failed || 0); }

function say(message, bad) {
  const banner = $("banner");
  banner.textContent = message; banner.hidden = !message;
  banner.className = bad ? "bad" : "good";
}

async function call(method, url, headers) {
  const reply = await fetch(url, { method, headers: headers || {}, credentials: "same-origin" });
  if (reply.status === 401) { showLogin(); throw new Error("the token is needed"); }
  const body = await reply.json();
  if (!reply.ok) throw new Error(body.message || reply.statusText);
  return body;
}
function showLogin() { $("login").hidden = false; $("fleet").hidden = true; $("logout").hidden = true; }

function actionButton(label, jobId, action) {
  const button = el("button", label);
  button.type = "button";
  button.dataset.action = action; button.dataset.job = jobId;
  button.disabled = !actions;
  button.title = actions ? label + " job " + jobId : "actions need [http].token";
  button.addEventListener("click", async () => {
    if (!window.confirm(label + " job " + jobId + "?")) return;
    try {
      const body = await call("POST", "/jobs/" + encodeURIComponent(jobId) + "/" + action, { "X-Confirm": action });
      say(body.message, false);
    } catch (err) { say(label + " " + jobId + ": " + err.message, true); }
    refresh();
  });
  const cell = el("td"); cell.append(button);
  return cell;
}

function bar(done, total) {
  const outer = el("div", null, "bar"), inner = el("span");
  inner.style.width = (total ? Math.min(100, 100 * done / total) : 0) + "%";
  outer.append(inner);
  const cell = el("td"); cell.append(outer); cell.title = done + " of " + (total || "?");
  return cell;
}

function drawWorkers(workers, now) {
  fill($("workers").tBodies[0], workers.map((w) => tr([
    el("td", w.name), el("td", w.version), num(ago(now - w.started_at)), num(w.active_jobs),
    num(w.slots_in_use + " / " + w.slots), num(w.files_per_s), num(bytes(w.bytes_per_s) + "/s"),
    el("td", w.draining ? "draining" : (w.paused && w.paused.length ? "paused: " + w.paused.join(", ") : "serving")),
  ])));
}

function drawActive(jobs, now) {
  fill($("active").tBodies[0], jobs.map((j) => {
    const age = j.started_at ? now - j.started_at : 0, done = settled(j);
    const waited = j.started_at && j.put_at ? ago(j.started_at - j.put_at) : "";
    return tr([el("td", j.id), el("td", j.tube), bar(done, j.total), num(done + " / " + (j.total ?? "?")),
      num(bytes(j.bytes)), num(age > 0 ? (done / age).toFixed(1) : ""), num(j.started_at ? ago(age) : ""),
      num(waited), el("td", j.worker), actionButton("Cancel", j.id, "cancel")]);
  }));
}

function drawFailed(failed) {
  $("failed-total").textContent = "(" + failed.total + ")";
  fill($("failed").tBodies[0], failed.jobs.map((j) => {
    const reasons = el("td");
    for (const [path, reason] of j.reasons || []) reasons.append(el("div", path + ": " + reason, "reason"));
    return tr([el("td", j.id), el("td", j.tube), num(j.failed + " / " + j.total), el("td", when(j.finished_at)),
      reasons, actionButton("Retry", j.id, "retry")]);
  }));
  $("failed-newer").disabled = failed.offset === 0;
  $("failed-older").disabled = failed.offset + failed.jobs.length >= failed.total;
}

function drawFinished(jobs) {
  fill($("finished").tBodies[0], jobs.map((j) => tr([
    el("td", j.id), el("td", j.state, "state-" + j.state), el("td", j.tube), num(settled(j) + " / " + j.total),
    num(bytes(j.bytes)), num(j.finished_at && j.started_at ? ago(j.finished_at - j.started_at) : ""),
    el("td", when(j.finished_at)),
  ])));
}

function chart(values, label, format) {
  const svgNs = "http://www.w3.org/2000/svg", width = 600, height = 100;
  const peak = Math.max(0, ...values), top = peak || 1;
  const figure = el("figure"), svg = document.createElementNS(svgNs, "svg"), step = width / values.length;
  svg.setAttribute("viewBox", "0 0 " + width + " " + height);
  svg.setAttribute("preserveAspectRatio", "none");
  values.forEach((value, i) => {
    const rect = document.createElementNS(svgNs, "rect"), h = height * value / top;
    rect.setAttribute("x", i * step); rect.setAttribute("width", Math.max(1, step - 1));
    rect.setAttribute("y", height - h); rect.setAttribute("height", h);
    const tip = document.createElementNS(svgNs, "title");
    tip.textContent = (values.length - 1 - i) + " min ago: " + format(value);
    rect.append(tip); svg.append(rect);
  });
  figure.append(svg, el("figcaption", label + ": now " + format(values[values.length - 1]) + ", peak " + format(peak)));
  return figure;
}

function drawChart(buckets) {
  const files = buckets.map((b) => b.files / b.seconds), sent = buckets.map((b) => b.bytes / b.seconds);
  $("chart").replaceChildren(chart(files, "files/s", (v) => v.toFixed(1) + " files/s"),
    chart(sent, "bytes/s", (v) => bytes(v) + "/s"));
}

function render(data) {
  actions = data.actions;
  $("login").hidden = true; $("fleet").hidden = false; $("logout").hidden = !data.login;
  const files = data.workers.reduce((sum, w) => sum + w.files_per_s, 0);
  $("summary").textContent = data.workers.length + " workers, " + data.active.length + " running jobs, " +
    files.toFixed(1) + " files/s" + (data.actions ? "" : " (actions need [http].token)");
  drawWorkers(data.workers, data.now); drawActive(data.active, data.now);
  drawFailed(data.failed); drawFinished(data.finished); drawChart(data.throughput);
}

async function refresh() {
  clearTimeout(timer);
  try {
    render(await call("GET", "/fleet?failed=" + failedOffset));
    if ($("banner").className === "bad") say("", false);
  } catch (err) {
    if (!$("login").hidden) return;  // waits for the token; polling resumes after login
    say("cannot read the fleet: " + err.message, true);
  }
  timer = setTimeout(refresh, POLL_MS);
}

async function find(event) {
  event.preventDefault();
  const jobId = $("search-id").value.trim();
  if (!jobId) return;
  const section = $("found"), fields = $("found-fields"), failures = $("found-failures");
  $("found-id").textContent = jobId; section.hidden = false;
  fields.replaceChildren(); failures.replaceChildren();
  try {
    const job = await call("GET", "/jobs/" + encodeURIComponent(jobId));
    for (const [name, value] of Object.entries(job)) {
      if (name === "failures" || name === "id") continue;
      fields.append(el("dt", name), el("dd", name.endsWith("_at") ? when(value) + " (" + value + ")" : value));
    }
    for (const [path, reason] of Object.entries(job.failures)) failures.append(el("li", path + ": " + reason, "reason"));
  } catch (err) { fields.append(el("dd", err.message)); }
}

document.addEventListener("DOMContentLoaded", () => {
  $("search").addEventListener("submit", find);
  $("found-close").addEventListener("click", () => { $("found").hidden = true; });
  $("failed-newer").addEventListener("click", () => { failedOffset = Math.max(0, failedOffset - 20); refresh(); });
  $("failed-older").addEventListener("click", () => { failedOffset += 20; refresh(); });
  if (location.hash === "#wrong-token") say("wrong token", true);
  refresh();
});
