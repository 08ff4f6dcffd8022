// cnnserve's dashboard: plain ES modules over the JSON API, no build step, no network beyond
// this server. Views are hash routes; every call carries the API key kept for this tab; live
// parts read the API's Server-Sent Events through fetch (so the key goes with them too).

const KEY = "cnnserve.apiKey";
const STATUSES = ["queued", "running", "succeeded", "failed", "cancelled"];
const FINISHED = new Set(["succeeded", "failed", "cancelled"]);
const main = document.getElementById("view");
const banner = document.getElementById("banner");
const keyInput = document.getElementById("apikey");
const keyState = document.getElementById("keystate");
let apiKey = sessionStorage.getItem(KEY) || "";
// what the server says this tab's key may do (GET /v1/whoami); null until it has answered
let me = null;

// --- talking to the API ------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, detail, body) {
    super(detail);
    this.status = status;
    this.body = body || {};
  }
}

// paths relative to the page, so the dashboard works behind a proxy's path prefix too
const url = (path) => path.replace(/^\//, "");

function authHeaders(extra = {}) {
  return apiKey ? { ...extra, Authorization: `Bearer ${apiKey}` } : extra;
}

async function api(path, { method = "GET", json, form, accept } = {}) {
  const headers = authHeaders(accept ? { Accept: accept } : {});
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  } else if (form) {
    body = form;
  }
  const r = await fetch(url(path), { method, headers, body });
  if (!r.ok) {
    let problem = {};
    try { problem = await r.json(); } catch { /* not JSON */ }
    const err = new ApiError(r.status, problem.detail || problem.error || r.statusText, problem);
    if (r.status === 401 || r.status === 403) askForKey(err);
    throw err;
  }
  return r;
}

const getJSON = async (path) => (await api(path)).json();

async function blobURL(path) {
  const r = await api(path);
  return URL.createObjectURL(await r.blob());
}

async function download(path, filename) {
  const blob = await blobURL(path);
  const a = h("a", { href: blob, download: filename });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(blob), 10_000);
}

// Server-Sent Events over fetch: EventSource cannot send the API key.
async function* events(path, signal) {
  const r = await fetch(url(path), { headers: authHeaders({ Accept: "text/event-stream" }), signal });
  if (!r.ok) {
    let problem = {};
    try { problem = await r.json(); } catch { /* not JSON */ }
    const err = new ApiError(r.status, problem.detail || problem.error || r.statusText, problem);
    if (r.status === 401 || r.status === 403) askForKey(err);
    throw err;
  }
  const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let ev = { event: "message", data: [] };
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n")) >= 0) {
      const line = buffer.slice(0, end).replace(/\r$/, "");
      buffer = buffer.slice(end + 1);
      if (line === "") {
        if (ev.data.length) yield { event: ev.event, id: ev.id, data: JSON.parse(ev.data.join("\n")) };
        ev = { event: "message", data: [] };
      } else if (!line.startsWith(":")) {
        const at = line.indexOf(":");
        const field = at < 0 ? line : line.slice(0, at);
        const text = at < 0 ? "" : line.slice(at + 1).replace(/^ /, "");
        if (field === "data") ev.data.push(text);
        else if (field === "event") ev.event = text;
        else if (field === "id") ev.id = text;
      }
    }
  }
}

async function follow(path, signal, onEvent) {
  try {
    for await (const e of events(path, signal)) onEvent(e);
  } catch (e) {
    if (!signal.aborted && !(e instanceof ApiError)) console.warn("event stream ended", e);
  }
}

// --- the page around the views -----------------------------------------------------------

function h(tag, attrs = {}, ...kids) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "class") el.className = v;
    else if (k === "text") el.textContent = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    el.append(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return el;
}

function showBanner(text, kind = "error") {
  banner.textContent = text;
  banner.className = kind === "error" ? "banner" : "banner info";
  banner.hidden = false;
}

function clearBanner() {
  banner.hidden = true;
  banner.textContent = "";
}

function askForKey(err) {
  const what = err.status === 401 ? "needs an API key" : "needs a key that may do this";
  showBanner(`This server ${what}: ${err.message}. Enter a key in the "API key" field above.`);
  keyInput.setAttribute("aria-invalid", "true");
  keyInput.focus();
}

function showKeyState() {
  keyInput.value = "";
  keyInput.placeholder = apiKey ? "••••••••" : "none set";
  keyInput.removeAttribute("aria-invalid");
  if (!me) {
    keyState.textContent = apiKey ? "key set for this tab" : "";
  } else if (!me.keys_required) {
    keyState.textContent = "open server: no key needed";
  } else if (me.principal) {
    const sees = me.sees === "all" ? "sees every tenant" : "sees its own work";
    keyState.textContent = `${me.principal} · may ${me.scopes.join(", ") || "nothing"} · ${sees}`;
  } else {
    const open = [me.public_read && "read", me.public_predict && "classify"].filter(Boolean);
    keyState.textContent = open.length ? `no key: anyone may ${open.join(" and ")}` : "no key";
  }
}

// Ask the server who this tab's key is; a wrong key shows the key field and why.
async function loadWhoami() {
  try {
    me = await getJSON("/v1/whoami");
  } catch (e) {
    me = null;
    if (!(e instanceof ApiError)) throw e;
  }
  showKeyState();
}

// Whether the key may do `scope` (true while the server has not said: it will answer 401/403).
const may = (scope) => !me || !me.keys_required || me.scopes.includes("admin") || me.scopes.includes(scope);

function scopeNote(scope, doing) {
  const who = me && me.principal ? `The key of ${me.principal} may ${me.scopes.join(", ") || "nothing"}` : "Without a key you may not do this";
  return h("p", { class: "banner info", role: "note", text: `${who}; ${doing} needs a key with the ${scope} scope. Enter one in the "API key" field above.` });
}

document.getElementById("keyform").addEventListener("submit", (e) => {
  e.preventDefault();
  apiKey = keyInput.value.trim();
  if (apiKey) sessionStorage.setItem(KEY, apiKey);
  else sessionStorage.removeItem(KEY);
  me = null;
  showKeyState();
  clearBanner();
  route();
});
document.getElementById("keyclear").addEventListener("click", () => {
  apiKey = "";
  sessionStorage.removeItem(KEY);
  me = null;
  showKeyState();
  route();
});

function showError(err) {
  if (err instanceof ApiError && (err.status === 401 || err.status === 403)) return;
  showBanner(err instanceof ApiError ? `${err.status}: ${err.message}` : String(err));
}

const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)} %`);
const num = (x, d = 4) => (x === null || x === undefined ? "–" : Number(x).toFixed(d));
const when = (iso) => (iso ? new Date(iso).toLocaleString() : "–");

function duration(s) {
  if (s === null || s === undefined) return "–";
  if (s < 60) return `${Math.round(s)} s`;
  const m = Math.floor(s / 60);
  return m < 60 ? `${m} min ${Math.round(s % 60)} s` : `${Math.floor(m / 60)} h ${m % 60} min`;
}

function statusBadge(status) {
  return h("span", { class: `status ${status}`, text: status });
}

function progressCell(job) {
  const p = job.progress || {};
  if (job.status === "queued") {
    const gpu = (job.spec.device || "").startsWith("cuda");
    return h("span", { class: "muted", text: job.waiting || (gpu ? "waiting for a GPU worker" : "waiting for a worker") });
  }
  if (FINISHED.has(job.status)) {
    const done = job.metrics.length;
    return h("span", { class: "muted", text: job.error ? job.error.slice(0, 120) : `${done} epoch${done === 1 ? "" : "s"}` });
  }
  const total = Math.max(1, (p.epochs - (job.epoch_offset || 0)) * Math.max(1, p.batches));
  const done = Math.max(0, (p.epoch - (job.epoch_offset || 0) - 1) * p.batches + p.batch);
  const note = [
    `epoch ${p.epoch}/${p.epochs}`,
    p.batches ? `batch ${p.batch}/${p.batches}` : null,
    p.images_per_s ? `${Math.round(p.images_per_s).toLocaleString()} img/s` : null,
    p.eta_s !== null && p.eta_s !== undefined ? `ETA ${duration(p.eta_s)}` : null,
  ].filter(Boolean).join(" · ");
  return h("div", { class: "progress" },
    h("progress", { max: total, value: Math.min(done, total), "aria-label": `progress of job ${job.id}`, "data-job": job.id }),
    h("div", { class: "note", text: note }));
}

const bestAcc = (job) => (job.metrics.length ? Math.max(...job.metrics.map((m) => m.val_acc)) : null);

// The training workers /readyz sees and the device each trains on. /readyz names them to an
// admin's key (or anyone on a server without keys); other keys see whether any is up.
async function workersLine(el) {
  let body = {};
  try {
    body = await (await fetch(url("/readyz"), { headers: authHeaders() })).json();
  } catch { /* the line says no worker */ }
  const label = (w) => `${w.name} (${[w.device || "device unknown", w.gpu].filter(Boolean).join(", ")})`;
  const workers = body.workers || [];
  let text = "none running; jobs wait until one starts (cnnserve worker)";
  if (workers.length) text = workers.map(label).join(" · ");
  else if (!body.workers && body.status === "ready") text = "up (an admin's key sees which and their devices)";
  el.replaceChildren(h("strong", { text: "Workers: " }), text);
}

// --- views -------------------------------------------------------------------------------

async function jobsView(el, signal) {
  const models = (await getJSON("/v1/models")).models.map((m) => m.name);
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const statusSel = h("select", { id: "f-status" }, h("option", { value: "", text: "any status" }),
    STATUSES.map((s) => h("option", { value: s, text: s, selected: params.get("status") === s })));
  const modelSel = h("select", { id: "f-model" }, h("option", { value: "", text: "any model" }),
    models.map((m) => h("option", { value: m, text: m, selected: params.get("model") === m })));
  const body = h("tbody");
  const more = h("button", { class: "quiet", type: "button", hidden: true, text: "Load more" });
  const rows = new Map();
  let cursor = null;
  let liveCtl = null;

  const workers = h("p", { class: "muted workers", id: "workers", "aria-live": "polite" });
  el.append(
    h("h1", { text: "Jobs" }),
    workers,
    h("div", { class: "card row" },
      h("div", { class: "field" }, h("label", { for: "f-status", text: "Status" }), statusSel),
      h("div", { class: "field" }, h("label", { for: "f-model", text: "Model" }), modelSel),
      h("a", { href: "#/train", class: "button" }, h("button", { type: "button", text: "Train a network", tabindex: -1 }))),
    h("div", { class: "tablewrap card" },
      h("table", { "aria-label": "Training jobs, newest first" },
        h("thead", {}, h("tr", {}, ["Job", "Model", "Status", "Progress", "Best val acc", "Created"].map((t) =>
          h("th", { scope: "col", class: t === "Best val acc" ? "num" : null, text: t })))),
        body),
      h("p", {}, more)));

  const refilter = () => {
    const q = new URLSearchParams();
    if (statusSel.value) q.set("status", statusSel.value);
    if (modelSel.value) q.set("model", modelSel.value);
    location.hash = `#/jobs${q.toString() ? `?${q}` : ""}`;
  };
  statusSel.addEventListener("change", refilter);
  modelSel.addEventListener("change", refilter);

  const render = (job) => {
    const cells = [
      h("td", {}, h("a", { href: `#/jobs/${job.id}`, class: "mono", text: job.id })),
      h("td", { text: job.spec.model }),
      h("td", {}, statusBadge(job.status)),
      h("td", {}, progressCell(job)),
      h("td", { class: "num", text: pct(bestAcc(job)) }),
      h("td", { text: when(job.created_at) }),
    ];
    let tr = rows.get(job.id)?.tr;
    if (tr) tr.replaceChildren(...cells);
    else tr = h("tr", { "data-job": job.id }, cells);
    rows.set(job.id, { tr, job });
    return tr;
  };

  const query = () => {
    const q = new URLSearchParams({ limit: "25" });
    if (statusSel.value) q.set("status", statusSel.value);
    if (modelSel.value) q.set("model", modelSel.value);
    return q;
  };

  const relive = () => {
    if (liveCtl) liveCtl.abort();
    const live = [...rows.values()].filter((r) => !FINISHED.has(r.job.status)).map((r) => r.job.id);
    if (!live.length || signal.aborted) return;
    liveCtl = new AbortController();
    signal.addEventListener("abort", () => liveCtl.abort());
    follow(`/v1/jobs/events?ids=${live.slice(0, 50).join(",")}`, liveCtl.signal, async (e) => {
      const entry = rows.get(e.data.job);
      if (!entry) return;
      if (e.event === "progress") {
        const { job: _id, ...progress } = e.data;
        entry.job.progress = progress;
        if (entry.job.status === "queued") entry.job.status = "running";
        render(entry.job);
      } else {
        render(await getJSON(`/v1/jobs/${e.data.job}`));
      }
    });
  };

  const loadPage = async (first) => {
    const q = query();
    if (!first && cursor) q.set("cursor", cursor);
    const page = await getJSON(`/v1/jobs?${q}`);
    if (first) {
      body.replaceChildren();
      rows.clear();
    }
    for (const job of page.jobs) body.append(render(job));
    if (first && !page.jobs.length) {
      body.append(h("tr", {}, h("td", { colspan: 6, class: "muted" }, "No jobs yet. ", h("a", { href: "#/train", text: "Train a network" }), ".")));
    }
    cursor = page.next_cursor;
    more.hidden = !cursor;
    relive();
  };
  more.addEventListener("click", () => loadPage(false).catch(showError));
  await Promise.all([loadPage(true), workersLine(workers)]);

  // new jobs (from anywhere) appear at the top within a few seconds
  const poll = setInterval(async () => {
    if (signal.aborted) return;
    try {
      const page = await getJSON(`/v1/jobs?${query()}`);
      const fresh = page.jobs.filter((j) => !rows.has(j.id));
      if (fresh.length) {
        for (const job of fresh.reverse()) body.prepend(render(job));
        relive();
      }
      await workersLine(workers);
    } catch { /* shown on the next action */ }
  }, 4000);
  signal.addEventListener("abort", () => clearInterval(poll));
}

// The spec fields of the form, in order: [name, label, kind]
const SPEC_FIELDS = [
  ["epochs", "Epochs", "integer"],
  ["batch_size", "Batch size", "integer"],
  ["lr", "Learning rate", "number"],
  ["optimizer", "Optimizer", "enum"],
  ["input_size", "Input size (px)", "integer"],
  ["train_limit", "Training images (empty: all 60,000)", "integer"],
  ["val_limit", "Validation images (empty: all 10,000)", "integer"],
  ["seed", "Seed", "integer"],
  ["precision", "Precision", "enum"],
  ["device", "Device", "text"],
  ["arch", "Arch override", "text"],
  ["init_from", "Start from checkpoint", "text"],
  ["continue_epochs", "Number epochs after it", "boolean"],
];

function bounds(schema) {
  const variants = schema.anyOf || [schema];
  const real = variants.find((v) => v.type && v.type !== "null") || {};
  return { ...real, description: schema.description, default: schema.default, enum: real.enum || schema.enum };
}

async function trainView(el) {
  const [{ models }, openapi] = await Promise.all([getJSON("/v1/models"), getJSON("/openapi.json")]);
  const props = openapi.components.schemas.JobSpec.properties;
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const form = h("form", { class: "card", novalidate: true, "aria-describedby": "form-error" });
  const general = h("div", { id: "form-error", class: "error", role: "alert" });
  const modelSel = h("select", { id: "spec-model", name: "model", required: true },
    models.map((m) => h("option", { value: m.name, text: `${m.name} (D2L ${m.section})`, selected: params.get("model") === m.name })));
  const inputs = {};
  const helps = {};
  const fields = SPEC_FIELDS.map(([name, label, kind]) => {
    const b = bounds(props[name] || {});
    const id = `spec-${name}`;
    const describe = `${id}-help ${id}-error`;
    let input;
    if (kind === "enum") {
      input = h("select", { id, name, "aria-describedby": describe },
        (b.enum || []).map((v) => h("option", { value: v, text: v, selected: v === b.default })));
    } else if (kind === "boolean") {
      input = h("input", { id, name, type: "checkbox", "aria-describedby": describe });
    } else {
      const step = kind === "integer" ? "1" : "any";
      input = h("input", {
        id, name, type: kind === "text" ? "text" : "number", step,
        min: b.minimum ?? (b.exclusiveMinimum !== undefined ? b.exclusiveMinimum : null),
        max: b.maximum ?? null, "aria-describedby": describe,
      });
    }
    inputs[name] = input;
    const range = b.minimum !== undefined || b.maximum !== undefined || b.exclusiveMinimum !== undefined
      ? `${b.exclusiveMinimum !== undefined ? `> ${b.exclusiveMinimum}` : b.minimum ?? ""}${b.maximum !== undefined ? ` … ${b.maximum}` : ""}`
      : "";
    helps[name] = h("small", { id: `${id}-help`, text: [range, b.description].filter(Boolean).join(" · ") });
    return h("div", { class: "field" },
      h("label", { for: id, text: label }), input, helps[name],
      h("div", { id: `${id}-error`, class: "error", "data-error-for": name }));
  });

  const prefill = () => {
    const m = models.find((x) => x.name === modelSel.value);
    const r = m.default_recipe;
    inputs.epochs.value = params.get("epochs") || r.epochs;
    inputs.batch_size.value = r.batch_size;
    inputs.lr.value = r.lr;
    inputs.input_size.value = r.input_size;
    inputs.input_size.min = m.min_input_size;
    // the field's bounds for this network: some need more than 28 px (AlexNet 65, NiN 67)
    helps.input_size.textContent = `${m.min_input_size} … ${inputs.input_size.max} for ${m.name} · ${bounds(props.input_size || {}).description}`;
    inputs.seed.value = 0;
    inputs.train_limit.value = params.get("train_limit") || "";
    inputs.val_limit.value = params.get("val_limit") || "";
    inputs.device.value = "auto";
    inputs.arch.value = "";
    inputs.arch.placeholder = m.default_arch ? `default: ${m.default_arch} (${Object.keys(m.archs).join(", ")} or ${m.arch_form})` : "fixed for this model";
    inputs.arch.disabled = !m.default_arch;
    inputs.init_from.placeholder = `e.g. ${m.name}:best`;
  };
  modelSel.addEventListener("change", prefill);
  prefill();

  const clearErrors = () => {
    general.textContent = "";
    form.querySelectorAll("[data-error-for]").forEach((e) => { e.textContent = ""; });
    form.querySelectorAll("[aria-invalid]").forEach((e) => e.removeAttribute("aria-invalid"));
  };
  const markField = (name, message) => {
    const err = form.querySelector(`[data-error-for="${name}"]`);
    if (!err) return false;
    err.textContent = message;
    inputs[name]?.setAttribute("aria-invalid", "true");
    return true;
  };
  const fieldNamed = (message) => SPEC_FIELDS.map(([n]) => n).find((n) => message.includes(n));

  form.addEventListener("submit", async (e) => {
    e.preventDefault();
    clearErrors();
    const spec = { model: modelSel.value };
    for (const [name, , kind] of SPEC_FIELDS) {
      const input = inputs[name];
      if (input.disabled) continue;
      if (kind === "boolean") { if (input.checked) spec[name] = true; continue; }
      const raw = input.value.trim();
      if (raw === "") continue;
      if (kind === "integer" || kind === "number") spec[name] = Number(raw);
      else if (name === "arch" && (raw.startsWith("[") || raw.startsWith("{"))) {
        const m = models.find((x) => x.name === modelSel.value);
        try { spec[name] = JSON.parse(raw); } catch { markField("arch", `not JSON: write a name or ${m.arch_form}`); return; }
      } else spec[name] = raw;
    }
    const button = form.querySelector("button[type=submit]");
    button.disabled = true;
    try {
      const job = await (await api("/v1/jobs", { method: "POST", json: spec })).json();
      location.hash = `#/jobs/${job.id}`;
    } catch (err) {
      if (!(err instanceof ApiError)) { general.textContent = String(err); return; }
      let placed = false;
      for (const fe of err.body.errors || []) {
        const field = fe.loc && fe.loc.length > 1 ? fe.loc[1] : fieldNamed(fe.msg || "");
        placed = markField(field, (fe.msg || "").replace(/^Value error, /, "")) || placed;
      }
      if (!placed && err.status === 422) placed = markField(fieldNamed(err.message), err.message);
      if (!placed) general.textContent = `${err.status}: ${err.message}`;
      const first = form.querySelector("[aria-invalid=true]");
      if (first) first.focus();
    } finally {
      button.disabled = false;
    }
  });

  form.append(
    h("div", { class: "row" },
      h("div", { class: "field" }, h("label", { for: "spec-model", text: "Model" }), modelSel,
        h("small", { text: "the book's recipe is filled in; change what you like" }))),
    h("div", { class: "row" }, fields),
    h("p", {}, h("button", { type: "submit", text: "Start training", disabled: !may("train") })),
    general);
  // Element.append writes a null as the text "null": leave the note out instead
  el.append(...[h("h1", { text: "Train a network" }), may("train") ? null : scopeNote("train", "training"), form].filter(Boolean));
}

async function jobView(el, signal, jobId) {
  let job = await getJSON(`/v1/jobs/${jobId}`);
  const title = h("h1");
  const head = h("div", { class: "card" });
  const curves = h("img", { class: "plot", alt: "Training curves: train loss, validation loss and accuracy by epoch", width: 500, height: 350 });
  const metricsBody = h("tbody");
  const ckptBody = h("tbody");
  const confusion = h("div");
  let curvesURL = null;
  let curvesAsked = 0;

  // Refreshes overlap (an epoch and its checkpoint arrive together): only the newest answer is
  // drawn, and data-epochs says how many epochs the plot on screen shows.
  const refreshCurves = async () => {
    const asked = ++curvesAsked;
    const epochs = job.metrics.length;
    const url = await blobURL(`/v1/jobs/${jobId}/curves.svg`);
    if (asked !== curvesAsked) { URL.revokeObjectURL(url); return; }
    curves.onload = () => { curves.dataset.epochs = String(epochs); };
    curves.src = url;
    if (curvesURL) URL.revokeObjectURL(curvesURL);
    curvesURL = url;
  };

  const cancel = h("button", { type: "button", class: "danger", text: "Cancel job" });
  cancel.addEventListener("click", async () => {
    cancel.disabled = true;
    try {
      job = await (await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" })).json();
      renderHead();
    } catch (e) { showError(e); cancel.disabled = false; }
  });

  const renderHead = () => {
    title.replaceChildren(`Job `, h("span", { class: "mono", text: job.id }), " ", statusBadge(job.status));
    cancel.hidden = FINISHED.has(job.status) || !may("train");
    head.replaceChildren(...[
      h("div", { class: "row" },
        h("div", {}, h("strong", { text: job.spec.model }), ` · ${job.spec.epochs} epoch(s) · batch ${job.spec.batch_size} · lr ${job.spec.lr} · ${job.spec.optimizer}`,
          job.spec.train_limit ? ` · ${job.spec.train_limit.toLocaleString()} images` : "",
          job.parent_checkpoint ? h("span", { class: "pill", text: `from ${job.parent_checkpoint}` }) : null),
        cancel),
      h("div", { style: "margin-top:8px" }, progressCell(job)),
      h("p", { class: "muted" }, `device ${job.device || "–"} · attempt ${job.attempts} · worker ${job.worker || "–"} · created ${when(job.created_at)}`),
      job.error ? h("p", { class: "error", text: job.error }) : null,
    ].filter(Boolean));
  };

  const renderMetrics = () => {
    metricsBody.replaceChildren(...job.metrics.map((m) => h("tr", {},
      h("td", { class: "num", text: m.epoch }), h("td", { class: "num", text: num(m.train_loss) }),
      h("td", { class: "num", text: num(m.val_loss) }), h("td", { class: "num", text: pct(m.val_acc) }),
      h("td", { class: "num", text: num(m.seconds, 2) }))));
    if (!job.metrics.length) metricsBody.append(h("tr", {}, h("td", { colspan: 5, class: "muted", text: "no finished epoch yet" })));
  };

  const renderCheckpoints = async () => {
    const { checkpoints } = await getJSON(`/v1/checkpoints?job_id=${jobId}`);
    ckptBody.replaceChildren(...checkpoints.map((c) => {
      const aliases = [c.id === job.best_checkpoint ? "best" : null, c.id === job.latest_checkpoint ? "latest" : null].filter(Boolean);
      const weights = h("button", { type: "button", class: "quiet", text: "weights" });
      weights.addEventListener("click", () => download(`/v1/checkpoints/${c.id}/weights`, `${c.id}.safetensors`).catch(showError));
      const onnx = h("button", { type: "button", class: "quiet", text: "ONNX" });
      onnx.addEventListener("click", () => download(`/v1/checkpoints/${c.id}/model.onnx`, `${c.id}.onnx`).catch(showError));
      return h("tr", {},
        h("td", {}, h("span", { class: "mono", text: c.id }), aliases.map((a) => h("span", { class: "pill", text: a }))),
        h("td", { class: "num", text: c.epoch }), h("td", { class: "num", text: pct(c.metrics.val_acc) }),
        h("td", {}, weights, " ", onnx, " ", h("a", { href: `#/classify?ref=${c.id}`, text: "classify" })));
    }));
    if (!checkpoints.length) ckptBody.append(h("tr", {}, h("td", { colspan: 4, class: "muted", text: "none yet: one is kept after every epoch" })));
  };

  const renderConfusion = async () => {
    if (!job.best_checkpoint) { confusion.replaceChildren(); return; }
    try {
      const url = await blobURL(`/v1/checkpoints/${job.best_checkpoint}/confusion.svg`);
      confusion.replaceChildren(h("h2", { text: `Confusion matrix of the best checkpoint (${job.best_checkpoint})` }),
        h("img", { class: "plot", src: url, alt: "Confusion matrix: true class down, predicted class across", width: 720, height: 640 }));
    } catch (e) {
      confusion.replaceChildren(h("p", { class: "muted", text: e.status === 404 ? e.message : "" }));
    }
  };

  let jobAsked = 0;
  const refreshAll = async () => {
    const asked = ++jobAsked;
    const fresh = await getJSON(`/v1/jobs/${jobId}`);
    if (asked !== jobAsked) return;
    job = fresh;
    renderHead();
    renderMetrics();
    await Promise.all([refreshCurves(), renderCheckpoints(), renderConfusion()]);
  };

  el.append(title, head,
    h("div", { class: "grid2" },
      h("section", { class: "card", "aria-labelledby": "curves-h" }, h("h2", { id: "curves-h", text: "Curves" }), curves),
      h("section", { class: "card", "aria-labelledby": "metrics-h" }, h("h2", { id: "metrics-h", text: "Epochs" }),
        h("div", { class: "tablewrap" }, h("table", {},
          h("thead", {}, h("tr", {}, ["Epoch", "Train loss", "Val loss", "Val acc", "Seconds"].map((t) => h("th", { scope: "col", class: "num", text: t })))),
          metricsBody)))),
    h("section", { class: "card", "aria-labelledby": "ckpt-h" }, h("h2", { id: "ckpt-h", text: "Checkpoints" }),
      h("div", { class: "tablewrap" }, h("table", {},
        h("thead", {}, h("tr", {}, ["Checkpoint", "Epoch", "Val acc", "Download / use"].map((t) => h("th", { scope: "col", text: t })))),
        ckptBody))),
    h("section", { class: "card" }, confusion),
    h("details", { class: "card" }, h("summary", { text: "Spec" }), h("pre", { text: JSON.stringify(job.spec, null, 2) })));

  await refreshAll();
  if (FINISHED.has(job.status)) return;
  follow(`/v1/jobs/${jobId}/events`, signal, (e) => {
    if (e.event === "progress") {
      job.progress = e.data;
      if (job.status === "queued") job.status = "running";
      renderHead();
    } else {
      refreshAll().catch(showError);
    }
  });
}

async function classifyView(el) {
  const params = new URLSearchParams(location.hash.split("?")[1] || "");
  const { checkpoints } = await getJSON("/v1/checkpoints?limit=100");
  const refSel = h("select", { id: "c-ref" },
    checkpoints.map((c) => h("option", { value: c.id, text: `${c.id} · ${c.model} · val acc ${pct(c.metrics.val_acc)}`, selected: params.get("ref") === c.id })));
  const topk = h("select", { id: "c-topk" }, [1, 3, 5, 10].map((k) => h("option", { value: k, text: k, selected: k === 3 })));
  const files = h("input", { id: "c-files", type: "file", accept: "image/png,image/jpeg,image/webp,image/bmp", multiple: true });
  const drop = h("div", { class: "drop" }, h("label", { for: "c-files", text: "Choose images, or drop them here" }), files);
  const results = h("div", { class: "images", "aria-live": "polite" });
  const canvas = h("canvas", { width: 28, height: 28, "aria-label": "Drawing area, 28 by 28 pixels: draw a garment in white", role: "img" });
  const ctx = canvas.getContext("2d");
  const clear = () => { ctx.fillStyle = "#000"; ctx.fillRect(0, 0, 28, 28); };
  clear();

  if (!checkpoints.length) {
    el.append(h("h1", { text: "Classify" }), h("p", { class: "card" }, "No checkpoint yet: ", h("a", { href: "#/train", text: "train a network" }), " first."));
    return;
  }

  let drawing = false;
  const paint = (e) => {
    const r = canvas.getBoundingClientRect();
    const x = ((e.clientX - r.left) / r.width) * 28;
    const y = ((e.clientY - r.top) / r.height) * 28;
    const g = ctx.createRadialGradient(x, y, 0, x, y, 1.8);
    g.addColorStop(0, "rgba(255,255,255,1)");
    g.addColorStop(1, "rgba(255,255,255,0)");
    ctx.fillStyle = g;
    ctx.fillRect(x - 2, y - 2, 4, 4);
  };
  canvas.addEventListener("pointerdown", (e) => { drawing = true; canvas.setPointerCapture(e.pointerId); paint(e); });
  canvas.addEventListener("pointermove", (e) => { if (drawing) paint(e); });
  canvas.addEventListener("pointerup", () => { drawing = false; });

  const classify = async (blobs) => {
    clearBanner();
    const form = new FormData();
    blobs.forEach((b, i) => form.append("files", b, b.name || `drawing-${i}.png`));
    const ref = refSel.value;
    const r = await api(`/v1/checkpoints/${encodeURIComponent(ref)}/predict?top_k=${topk.value}&return_input=true`, { method: "POST", form });
    const answer = await r.json();
    results.replaceChildren(...answer.predictions.map((p, i) => resultCard(blobs[i], p)));
    results.previousElementSibling.scrollIntoView({ block: "start" });
  };
  files.addEventListener("change", () => { if (files.files.length) classify([...files.files]).catch(showError); });
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    const dropped = [...e.dataTransfer.files].filter((f) => f.type.startsWith("image/"));
    if (dropped.length) classify(dropped).catch(showError);
  });
  const sendDrawing = h("button", { type: "button", text: "Classify the drawing" });
  sendDrawing.addEventListener("click", () => canvas.toBlob((b) => classify([b]).catch(showError), "image/png"));
  const clearButton = h("button", { type: "button", class: "quiet", text: "Clear" });
  clearButton.addEventListener("click", clear);

  if (!may("predict")) [sendDrawing, files].forEach((c) => { c.disabled = true; });
  el.append(
    h("h1", { text: "Classify" }),
    may("predict") ? null : scopeNote("predict", "classifying"),
    h("div", { class: "card row" },
      h("div", { class: "field", style: "max-width:36rem" }, h("label", { for: "c-ref", text: "Checkpoint" }), refSel),
      h("div", { class: "field", style: "max-width:6rem" }, h("label", { for: "c-topk", text: "Top k" }), topk)),
    h("div", { class: "grid2" },
      h("section", { class: "card" }, h("h2", { text: "Images" }), drop,
        h("p", { class: "muted", text: "Photos larger than 28×28 go through Fashion-MNIST's own conversion (trim, subsample, centre, negate)." })),
      h("section", { class: "card draw" }, h("h2", { text: "Draw one" }), canvas, h("p", {}, sendDrawing, " ", clearButton))),
    h("h2", { text: "Predictions" }), results);
}

function resultCard(blob, p) {
  const original = h("img", { src: URL.createObjectURL(blob), alt: "the image sent" });
  const input = h("canvas", { width: 28, height: 28, role: "img", "aria-label": "the 28×28 input the network saw" });
  if (p.input) {
    const ctx = input.getContext("2d");
    const img = ctx.createImageData(28, 28);
    p.input.flat().forEach((v, i) => { img.data.set([v, v, v, 255], 4 * i); });
    ctx.putImageData(img, 0, 0);
  }
  const bars = p.top_k.map((s, i) => h("div", { class: i === 0 ? "bar top" : "bar" },
    h("span", { text: s.label }),
    h("span", { class: "track", role: "meter", "aria-valuemin": 0, "aria-valuemax": 1, "aria-valuenow": s.probability.toFixed(3), "aria-label": s.label },
      h("span", { class: "fill", style: `display:block;width:${(100 * s.probability).toFixed(1)}%` })),
    h("span", { class: "num", text: pct(s.probability) })));
  return h("div", { class: "result", "data-label": p.label },
    h("figure", {}, original, h("figcaption", { text: "sent" })),
    h("figure", {}, input, h("figcaption", { text: "network input" })),
    h("div", { class: "bars" }, h("strong", { class: "predicted", text: p.label }), bars));
}

async function modelsView(el) {
  const { models } = await getJSON("/v1/models");
  const modelSel = h("select", { id: "m-model" }, models.map((m) => h("option", { value: m.name, text: m.name })));
  const arch = h("input", { id: "m-arch", type: "text" });
  const shape = h("input", { id: "m-shape", type: "text" });
  const depth = h("select", { id: "m-depth" }, [1, 2, 3, 4].map((d) => h("option", { value: d, text: d })));
  const out = h("div");
  const info = h("p", { class: "muted" });
  const fill = () => {
    const m = models.find((x) => x.name === modelSel.value);
    const size = m.default_recipe.input_size;
    shape.value = m.name === "vgg" ? "1,1,224,224" : `1,1,${size},${size}`;
    arch.value = m.default_arch === "small" ? "vgg11" : "";
    arch.disabled = !m.default_arch;
    arch.placeholder = m.default_arch ? `${Object.keys(m.archs).join(", ")} or ${m.arch_form}` : "fixed";
    info.textContent = `${m.description} ${m.parameters.toLocaleString()} parameters at its default size.`;
  };
  const show = async () => {
    const q = new URLSearchParams({ input_shape: shape.value.replace(/\s/g, ""), depth: depth.value });
    if (arch.value.trim() && !arch.disabled) q.set("arch", arch.value.trim());
    try {
      const s = await getJSON(`/v1/models/${modelSel.value}/summary?${q}`);
      out.replaceChildren(
        h("div", { class: "tablewrap card" }, h("table", { "aria-label": `Layers of ${s.model}` },
          h("thead", {}, h("tr", {}, ["Layer", "Type", "Output shape", "Parameters", "Multiply-adds"].map((t, i) => h("th", { scope: "col", class: i > 2 ? "num" : null, text: t })))),
          h("tbody", {}, s.layers.map((l) => h("tr", {},
            h("td", { class: "mono", text: l.name }), h("td", { text: l.type }), h("td", { class: "mono", text: `[${l.output_shape.join(", ")}]` }),
            h("td", { class: "num", text: l.params.toLocaleString() }), h("td", { class: "num", text: l.macs.toLocaleString() })))),
          h("tfoot", {}, h("tr", {}, h("th", { colspan: 3, text: "Total" }), h("th", { class: "num", text: s.total_params.toLocaleString() }), h("th", { class: "num", text: s.total_macs.toLocaleString() }))))),
        h("section", { class: "card" }, h("h2", { text: "As the book prints it" }), h("pre", { text: s.text })));
    } catch (e) {
      out.replaceChildren(h("p", { class: "error", role: "alert", text: e.message }));
    }
  };
  modelSel.addEventListener("change", () => { fill(); show(); });
  const form = h("form", { class: "card row" },
    h("div", { class: "field" }, h("label", { for: "m-model", text: "Model" }), modelSel),
    h("div", { class: "field" }, h("label", { for: "m-shape", text: "Input shape (N, C, H, W)" }), shape),
    h("div", { class: "field" }, h("label", { for: "m-arch", text: "Arch" }), arch),
    h("div", { class: "field", style: "max-width:6rem" }, h("label", { for: "m-depth", text: "Depth" }), depth),
    h("button", { type: "submit", text: "Show layers" }));
  form.addEventListener("submit", (e) => { e.preventDefault(); show(); });
  fill();
  el.append(h("h1", { text: "Models" }), info, form, out);
  await show();
}

async function sweepsView(el) {
  const { sweeps } = await getJSON("/v1/sweeps");
  const rows = sweeps.map((s) => h("tr", {},
    h("td", {}, h("a", { href: `#/sweeps/${s.id}`, class: "mono", text: s.id })),
    h("td", { text: s.name || s.varies.join(", ") }), h("td", {}, statusBadge(s.status)),
    h("td", { class: "num", text: Object.values(s.counts).reduce((a, b) => a + b, 0) }),
    h("td", { class: "num", text: s.jobs[0] ? pct(s.jobs[0].best_val_acc) : "–" }),
    h("td", { text: when(s.created_at) })));
  el.append(h("h1", { text: "Sweeps" }),
    h("p", { class: "muted" }, "Start one with ", h("code", { text: "cnnserve sweep" }), " or POST /v1/sweeps."),
    h("div", { class: "tablewrap card" }, h("table", {},
      h("thead", {}, h("tr", {}, ["Sweep", "Varies", "Status", "Jobs", "Best val acc", "Created"].map((t) => h("th", { scope: "col", text: t })))),
      h("tbody", {}, rows.length ? rows : h("tr", {}, h("td", { colspan: 6, class: "muted", text: "no sweep yet" }))))));
}

async function sweepView(el, signal, sweepId) {
  const board = h("tbody");
  const title = h("h1");
  const plot = h("img", { class: "plot", alt: "Validation accuracy of the sweep's jobs by epoch", width: 640, height: 400 });
  const render = async (s) => {
    title.replaceChildren("Sweep ", h("span", { class: "mono", text: s.id }), " ", statusBadge(s.status));
    board.replaceChildren(...s.jobs.map((j, i) => h("tr", {},
      h("td", { class: "num", text: i + 1 }), h("td", {}, h("a", { href: `#/jobs/${j.id}`, class: "mono", text: j.id })),
      h("td", {}, statusBadge(j.status)), h("td", { class: "mono", text: Object.entries(j.point).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(" ") }),
      h("td", { class: "num", text: pct(j.best_val_acc) }), h("td", { class: "num", text: `${j.epochs_done}/${j.spec.epochs}` }),
      h("td", { class: "num", text: num(j.seconds_per_epoch, 2) }))));
    plot.src = await blobURL(`/v1/jobs/compare.png?sweep=${sweepId}&metric=val_acc`);
  };
  el.append(title, h("div", { class: "tablewrap card" }, h("table", { "aria-label": "Leaderboard, best first" },
    h("thead", {}, h("tr", {}, ["#", "Job", "Status", "Point", "Best val acc", "Epochs", "s/epoch"].map((t) => h("th", { scope: "col", text: t })))),
    board)), h("section", { class: "card" }, plot));
  await render(await getJSON(`/v1/sweeps/${sweepId}`));
  follow(`/v1/sweeps/${sweepId}/events`, signal, (e) => { if (e.event === "sweep") render(e.data).catch(showError); });
}

// --- routing -----------------------------------------------------------------------------

const ROUTES = [
  [/^#\/jobs\/([0-9a-f]{16})$/, jobView, "jobs"],
  [/^#\/jobs(?:\?.*)?$/, jobsView, "jobs"],
  [/^#\/train(?:\?.*)?$/, trainView, "train"],
  [/^#\/sweeps\/([0-9a-f]{16})$/, sweepView, "sweeps"],
  [/^#\/sweeps$/, sweepsView, "sweeps"],
  [/^#\/classify(?:\?.*)?$/, classifyView, "classify"],
  [/^#\/models$/, modelsView, "models"],
];
let stop = null;

async function route() {
  if (stop) stop();
  const hash = location.hash || "#/jobs";
  for (const [re, view, nav] of ROUTES) {
    const m = hash.match(re);
    if (!m) continue;
    document.querySelectorAll("nav a[data-nav]").forEach((a) => {
      if (a.dataset.nav === nav) a.setAttribute("aria-current", "page");
      else a.removeAttribute("aria-current");
    });
    const ctl = new AbortController();
    stop = () => ctl.abort();
    // each visit renders into its own box: a view still loading when the person moves on
    // fills a box that is no longer on the page
    const box = h("div");
    main.replaceChildren(box);
    if (!banner.textContent.startsWith("This server needs")) clearBanner();
    try {
      if (!me) await loadWhoami();
      await view(box, ctl.signal, ...m.slice(1));
      if (!ctl.signal.aborted) document.title = `${box.querySelector("h1")?.textContent || "cnnserve"} · cnnserve`;
    } catch (e) {
      if (!ctl.signal.aborted) {
        showError(e);
        if (!box.childElementCount) box.append(h("p", { class: "muted", text: "This page could not be shown." }));
      }
    }
    return;
  }
  location.hash = "#/jobs";
}

window.addEventListener("hashchange", route);
showKeyState();
route();
