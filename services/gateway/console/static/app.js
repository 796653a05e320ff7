// The Loomis console: a client of the public API only (/v1/...), with the key in localStorage.
const KEY = "loomis.key";
const view = document.getElementById("view");
const banner = document.getElementById("banner");
const signOut = document.getElementById("sign-out");

const key = () => localStorage.getItem(KEY);
const esc = (text) => String(text ?? "").replace(/[&<>"']/g, (c) =>
  ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);

function showBanner(text) {
  banner.textContent = text || "";
  banner.hidden = !text;
}

// A problem+json answer: each errors[].field is shown next to the input that names it
// (data-field), the rest in the banner.
function showProblem(problem, form) {
  if (form) form.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
  const unplaced = [];
  for (const error of problem.errors || []) {
    const slot = form && form.querySelector(`.error[data-field="${CSS.escape(error.field)}"]`);
    if (slot) slot.textContent = error.message;
    else unplaced.push(`${error.field}: ${error.message}`);
  }
  if (!problem.errors || unplaced.length) {
    showBanner([problem.detail || problem.title || "Request failed", ...unplaced].join(" — "));
  }
}

class ApiError extends Error {
  constructor(problem) { super(problem.detail || "request failed"); this.problem = problem; }
}

async function api(path, options = {}) {
  const headers = { ...(options.headers || {}), Authorization: `Bearer ${key()}` };
  if (options.json !== undefined) {
    headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(options.json);
  }
  const response = await fetch(path, { ...options, headers });
  if (response.status === 401) {
    localStorage.removeItem(KEY);
    location.hash = "#/sign-in";
  }
  const type = response.headers.get("content-type") || "";
  const body = type.includes("json") ? await response.json() : await response.text();
  if (!response.ok) throw new ApiError(typeof body === "object" ? body : { detail: body });
  return body;
}

// Server-Sent Events with the Bearer header (EventSource cannot send one): fetch + a reader.
async function followEvents(jobId, onEvent) {
  const response = await fetch(`/v1/jobs/${jobId}/events`, {
    headers: { Authorization: `Bearer ${key()}`, Accept: "text/event-stream" } });
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    // sse-starlette ends lines with CRLF; a CR left at a chunk's end meets its LF next time
    buffer = (buffer + decoder.decode(value, { stream: true })).replace(/\r\n/g, "\n");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const message = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = message.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (data) onEvent(JSON.parse(data));
    }
  }
}

// --- sign in -----------------------------------------------------------------------------

function signInView() {
  signOut.hidden = true;
  view.innerHTML = `
    <h1>Sign in</h1>
    <form id="sign-in" class="grid" novalidate>
      <div class="field wide">
        <label for="key">API key</label>
        <input id="key" name="key" type="password" autocomplete="current-password"
               placeholder="lmk_…" required>
        <span class="error" data-field="key"></span>
        <span class="muted">From <code>loomis keys create --tenant NAME</code>, or
          <code>.loomis/dev-api-key</code> after <code>loomis up</code>. Kept in this browser.</span>
      </div>
      <div class="field"><button type="submit">Sign in</button></div>
    </form>`;
  const form = view.querySelector("form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const value = form.key.value.trim();
    const response = await fetch("/v1/models", { headers: { Authorization: `Bearer ${value}` } });
    if (!response.ok) {
      const problem = await response.json();
      showProblem({ ...problem, errors: [{ field: "key", message: problem.detail }] }, form);
      return;
    }
    localStorage.setItem(KEY, value);
    showBanner("");
    location.hash = "#/generate";
  });
}

// --- generate ----------------------------------------------------------------------------

let models = null;
let lastSeed = null;

function field(name, label, input, { wide = false, hint = "" } = {}) {
  return `<div class="field${wide ? " wide" : ""}">
    <label for="${name}">${label}</label>${input}
    ${hint ? `<span class="muted">${hint}</span>` : ""}
    <span class="error" data-field="${name}"></span></div>`;
}

async function generateView(prefill = {}) {
  signOut.hidden = false;
  models = models || await api("/v1/models");
  const options = models.items.map((m) => `<option value="${esc(m.name)}">${esc(m.name)} (${esc(m.family)})</option>`).join("");
  view.innerHTML = `
    <h1>Generate</h1>
    <form id="generate" class="grid" novalidate>
      ${field("prompt", "Prompt", `<textarea id="prompt" name="prompt" rows="3" required></textarea>`, { wide: true })}
      ${field("negative_prompt", "Negative prompt", `<textarea id="negative_prompt" name="negative_prompt" rows="2"></textarea>`, { wide: true })}
      ${field("model", "Model", `<select id="model" name="model">${options}</select>`)}
      ${field("mode", "Mode", `<select id="mode" name="mode">
          <option value="txt2img">txt2img</option><option value="img2img">img2img</option>
          <option value="inpaint">inpaint</option></select>`)}
      ${field("width", "Width", `<input id="width" name="width" type="number" step="8">`)}
      ${field("height", "Height", `<input id="height" name="height" type="number" step="8">`)}
      ${field("steps", "Steps", `<input id="steps" name="steps" type="number" min="1">`)}
      ${field("guidance_scale", "Guidance", `<input id="guidance_scale" name="guidance_scale" type="number" step="0.5">`)}
      ${field("scheduler", "Scheduler", `<select id="scheduler" name="scheduler"></select>`)}
      ${field("num_images", "Images", `<input id="num_images" name="num_images" type="number" min="1" max="8" value="1">`)}
      ${field("seed", "Seed", `<div class="row"><input id="seed" name="seed" type="number" min="0" placeholder="random">
          <button type="button" class="secondary" id="seed-random">Random</button>
          <button type="button" class="secondary" id="seed-reuse">Reuse last</button></div>`)}
      <div class="field wide" id="init-block" hidden>
        <label for="init-file">Init image</label>
        <input id="init-file" type="file" accept="image/*">
        <span class="error" data-field="init_image"></span>
        <div class="canvas-wrap" id="canvas-wrap">
          <canvas id="init-canvas" width="64" height="64" aria-label="Init image preview"></canvas>
          <canvas id="mask-canvas" width="64" height="64" aria-label="Mask: draw where to repaint"></canvas>
        </div>
        <div class="row" id="mask-tools">
          <label for="brush">Brush</label><input id="brush" type="range" min="1" max="64" value="8">
          <label><input id="erase" type="checkbox"> Erase</label>
          <label for="feather">Feather</label><input id="feather" type="number" min="0" max="64" value="0">
          <button type="button" class="secondary" id="mask-clear">Clear mask</button>
        </div>
        <span class="error" data-field="mask"></span>
      </div>
      <div class="field wide"><button type="submit" id="submit">Generate</button>
        <progress id="progress" max="1" value="0" aria-label="Progress"></progress>
        <span id="status" class="muted" aria-live="polite"></span></div>
    </form>
    <section class="results" id="results" aria-label="Results"></section>`;
  const form = view.querySelector("form");
  const setModel = () => {
    const model = models.items.find((m) => m.name === form.model.value) || models.items[0];
    form.width.value ||= model.default_width;
    form.height.value ||= model.default_height;
    form.steps.placeholder = model.default_steps;
    form.guidance_scale.placeholder = model.default_guidance;
    form.scheduler.innerHTML = `<option value="">model default</option>` +
      model.schedulers.map((s) => `<option>${esc(s)}</option>`).join("");
  };
  form.model.value = prefill.model || models.default_model;
  setModel();
  form.model.addEventListener("change", () => { form.width.value = ""; form.height.value = ""; setModel(); });
  for (const [name, value] of Object.entries(prefill)) {
    if (form[name] && value !== null && value !== undefined && name !== "model") form[name].value = value;
  }
  form.scheduler.value = prefill.scheduler || "";
  const initBlock = view.querySelector("#init-block");
  const maskTools = view.querySelector("#mask-tools");
  const maskCanvas = view.querySelector("#mask-canvas");
  const syncMode = () => {
    initBlock.hidden = form.mode.value === "txt2img";
    maskTools.hidden = form.mode.value !== "inpaint";
    maskCanvas.hidden = form.mode.value !== "inpaint";
  };
  form.mode.addEventListener("change", syncMode);
  syncMode();
  setupCanvas(form);
  if (prefill.initUrl) loadInit(prefill.initUrl);
  view.querySelector("#seed-random").addEventListener("click", () => { form.seed.value = ""; });
  view.querySelector("#seed-reuse").addEventListener("click", () => { if (lastSeed !== null) form.seed.value = lastSeed; });
  form.addEventListener("submit", (event) => { event.preventDefault(); submitGeneration(form); });
}

let hasInit = false;

function setupCanvas(form) {
  const init = view.querySelector("#init-canvas");
  const mask = view.querySelector("#mask-canvas");
  const ctx = mask.getContext("2d");
  let drawing = false;
  const paint = (event) => {
    const box = mask.getBoundingClientRect();
    const x = (event.clientX - box.left) * (mask.width / box.width);
    const y = (event.clientY - box.top) * (mask.height / box.height);
    const radius = Number(view.querySelector("#brush").value) / 2;
    ctx.globalCompositeOperation = view.querySelector("#erase").checked ? "destination-out" : "source-over";
    ctx.fillStyle = "#fff";
    ctx.beginPath();
    ctx.arc(x, y, radius, 0, Math.PI * 2);
    ctx.fill();
  };
  mask.addEventListener("pointerdown", (e) => { drawing = true; mask.setPointerCapture(e.pointerId); paint(e); });
  mask.addEventListener("pointermove", (e) => { if (drawing) paint(e); });
  mask.addEventListener("pointerup", () => { drawing = false; });
  view.querySelector("#mask-clear").addEventListener("click", () => ctx.clearRect(0, 0, mask.width, mask.height));
  view.querySelector("#init-file").addEventListener("change", (event) => {
    const file = event.target.files[0];
    if (file) loadInit(URL.createObjectURL(file));
  });
  hasInit = false;
  void init;
  void form;
}

function loadInit(url) {
  const image = new Image();
  image.crossOrigin = "anonymous";
  image.onload = () => {
    for (const id of ["init-canvas", "mask-canvas"]) {
      const canvas = view.querySelector(`#${id}`);
      canvas.width = image.naturalWidth;
      canvas.height = image.naturalHeight;
    }
    view.querySelector("#init-canvas").getContext("2d").drawImage(image, 0, 0);
    hasInit = true;
    const form = view.querySelector("form");
    form.width.value = image.naturalWidth;
    form.height.value = image.naturalHeight;
  };
  image.src = url;
}

// The mask as Loomis reads it: white repaints, black keeps (the strokes on black).
function maskDataUrl() {
  const strokes = view.querySelector("#mask-canvas");
  const out = document.createElement("canvas");
  out.width = strokes.width;
  out.height = strokes.height;
  const ctx = out.getContext("2d");
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, out.width, out.height);
  ctx.drawImage(strokes, 0, 0);
  return out.toDataURL("image/png");
}

function numberOrNull(value) { return value === "" ? null : Number(value); }

async function submitGeneration(form) {
  showBanner("");
  form.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
  const spec = {
    prompt: form.prompt.value, negative_prompt: form.negative_prompt.value,
    model: form.model.value, mode: form.mode.value,
    width: numberOrNull(form.width.value), height: numberOrNull(form.height.value),
    steps: numberOrNull(form.steps.value), guidance_scale: numberOrNull(form.guidance_scale.value),
    seed: numberOrNull(form.seed.value), num_images: numberOrNull(form.num_images.value) || 1,
    scheduler: form.scheduler.value || null,
  };
  if (spec.mode !== "txt2img") {
    if (!hasInit) {
      showProblem({ errors: [{ field: "init_image", message: "pick an image first" }] }, form);
      return;
    }
    spec.init_image = view.querySelector("#init-canvas").toDataURL("image/png");
  }
  if (spec.mode === "inpaint") {
    spec.mask = { image: maskDataUrl(), feather: Number(view.querySelector("#feather").value) || 0 };
  }
  for (const name of Object.keys(spec)) if (spec[name] === null) delete spec[name];
  const progress = view.querySelector("#progress");
  const status = view.querySelector("#status");
  progress.value = 0;
  let job;
  try {
    job = await api("/v1/generations", { method: "POST", json: spec });
  } catch (error) {
    if (error instanceof ApiError) { showProblem(error.problem, form); return; }
    throw error;
  }
  status.textContent = `job ${job.id}: queued`;
  let updates = 0;
  await followEvents(job.id, (event) => {
    if (event.data && typeof event.data.progress === "number") {
      progress.value = event.data.progress;
      progress.dataset.updates = String(++updates);  // how many times it moved (tests read it)
    }
    status.textContent = `job ${job.id}: ${event.status}`;
  });
  const done = await api(`/v1/jobs/${job.id}`);
  progress.value = done.status === "succeeded" ? 1 : progress.value;
  if (done.status !== "succeeded") {
    showBanner(`job ${done.id} ${done.status}: ${done.error ? done.error.message : ""}`);
    return;
  }
  lastSeed = done.spec.seed;
  showResults(done);
}

function showResults(job) {
  const results = view.querySelector("#results");
  results.innerHTML = "";
  for (const artifact of job.artifacts.filter((a) => a.kind === "image")) {
    const card = document.createElement("article");
    card.className = "card";
    card.innerHTML = `<img src="${esc(artifact.url)}" alt="Result ${artifact.index}: ${esc(job.spec.prompt)}"
        width="${artifact.width}" height="${artifact.height}" data-index="${artifact.index}">
      <p class="muted">seed ${artifact.seed} · ${artifact.width}×${artifact.height}</p>
      <details><summary>Parameters</summary><pre>${esc(JSON.stringify(job.spec, null, 2))}</pre></details>
      <div class="row"><button type="button" class="secondary" data-action="again">Use again</button>
      <button type="button" class="secondary" data-action="init">Use as init image</button></div>`;
    card.querySelector('[data-action="again"]').addEventListener("click", () =>
      generateView({ ...job.spec, seed: artifact.seed, num_images: 1 }));
    card.querySelector('[data-action="init"]').addEventListener("click", () =>
      generateView({ ...job.spec, mode: "img2img", initUrl: artifact.url }));
    results.append(card);
  }
}

// --- jobs --------------------------------------------------------------------------------

async function jobsView() {
  signOut.hidden = false;
  view.innerHTML = `
    <h1>Jobs</h1>
    <form id="filters" class="row" aria-label="Filters">
      <label for="kind">Kind</label><select id="kind"><option value="">any</option>
        ${["generation", "sweep", "tagging", "training", "scene"].map((k) => `<option>${k}</option>`).join("")}</select>
      <label for="status-filter">Status</label><select id="status-filter"><option value="">any</option>
        ${["queued", "running", "succeeded", "failed", "canceled"].map((s) => `<option>${s}</option>`).join("")}</select>
    </form>
    <table><thead><tr><th>Job</th><th>Kind</th><th>Status</th><th>Created</th></tr></thead>
      <tbody id="job-rows"></tbody></table>
    <p id="more" class="muted">…</p>`;
  let cursor = null;
  let loading = false;
  const rows = view.querySelector("#job-rows");
  const more = view.querySelector("#more");
  const load = async (reset) => {
    if (loading) return;
    loading = true;
    if (reset) { rows.innerHTML = ""; cursor = null; }
    const params = new URLSearchParams({ limit: "20" });
    const kind = view.querySelector("#kind").value;
    const status = view.querySelector("#status-filter").value;
    if (kind) params.set("kind", kind);
    if (status) params.set("status", status);
    if (cursor) params.set("cursor", cursor);
    const page = await api(`/v1/jobs?${params}`);
    for (const job of page.items) {
      const row = document.createElement("tr");
      row.innerHTML = `<td><a href="#/jobs/${esc(job.id)}">${esc(job.id.slice(0, 8))}</a></td>
        <td>${esc(job.kind)}</td><td>${esc(job.status)}</td><td>${esc(job.created_at)}</td>`;
      rows.append(row);
    }
    cursor = page.next_cursor;
    more.textContent = cursor ? "Scroll for more" : "That is all";
    loading = false;
  };
  view.querySelector("#kind").addEventListener("change", () => load(true));
  view.querySelector("#status-filter").addEventListener("change", () => load(true));
  new IntersectionObserver((entries) => {
    if (entries.some((e) => e.isIntersecting) && cursor) load(false);
  }).observe(more);
  await load(true);
}

async function jobView(jobId) {
  signOut.hidden = false;
  const job = await api(`/v1/jobs/${jobId}`);
  const events = [];
  await followEvents(jobId, (event) => events.push(event)).catch(() => {});
  view.innerHTML = `
    <h1>Job ${esc(job.id)}</h1>
    <p>${esc(job.kind)} · <strong id="job-status">${esc(job.status)}</strong>
      ${job.error ? `· ${esc(job.error.code)}: ${esc(job.error.message)}` : ""}</p>
    <div class="row">${["queued", "running"].includes(job.status)
      ? `<button type="button" id="cancel">Cancel</button>` : ""}</div>
    <section class="results">${job.artifacts.filter((a) => a.kind === "image").map((a) =>
      `<article class="card"><img src="${esc(a.url)}" alt="Image ${a.index}"></article>`).join("")}</section>
    <h2>Spec</h2><pre>${esc(JSON.stringify(job.spec, null, 2))}</pre>
    <h2>Events</h2><ol>${events.map((e) =>
      `<li>${esc(e.at)} — ${esc(e.type)}${e.data && typeof e.data.progress === "number"
        ? ` (${Math.round(e.data.progress * 100)}%)` : ""}</li>`).join("")}</ol>`;
  const cancel = view.querySelector("#cancel");
  if (cancel) cancel.addEventListener("click", async () => {
    await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" });
    jobView(jobId);
  });
}

// --- routing -----------------------------------------------------------------------------

signOut.addEventListener("click", () => {
  localStorage.removeItem(KEY);
  location.hash = "#/sign-in";
});

async function route() {
  showBanner("");
  const hash = location.hash || "#/generate";
  if (!key() && hash !== "#/sign-in") { location.hash = "#/sign-in"; return; }
  try {
    if (hash === "#/sign-in") signInView();
    else if (hash === "#/jobs") await jobsView();
    else if (hash.startsWith("#/jobs/")) await jobView(hash.slice("#/jobs/".length));
    else await generateView();
  } catch (error) {
    showBanner(error instanceof ApiError ? (error.problem.detail || "request failed") : String(error));
  }
  view.focus();
}

window.addEventListener("hashchange", route);
route();
