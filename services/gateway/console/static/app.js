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
async function followEvents(jobId, onEvent, path = `/v1/jobs/${jobId}/events`) {
  const response = await fetch(path, {
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

// A labelled input; ``name`` is the API's field (where its errors show), ``id`` the input's.
function field(name, label, input, { wide = false, hint = "", id = null } = {}) {
  return `<div class="field${wide ? " wide" : ""}">
    <label for="${id || name}">${label}</label>${input}
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
          <option value="inpaint">inpaint</option><option value="outpaint">outpaint</option></select>`)}
      ${field("width", "Width", `<input id="width" name="width" type="number" step="8">`)}
      ${field("height", "Height", `<input id="height" name="height" type="number" step="8">`)}
      ${field("steps", "Steps", `<input id="steps" name="steps" type="number" min="1">`)}
      ${field("guidance_scale", "Guidance", `<input id="guidance_scale" name="guidance_scale" type="number" step="0.5">`)}
      ${field("scheduler", "Scheduler", `<select id="scheduler" name="scheduler"></select>`)}
      ${field("eta", "Eta (DDIM only)", `<input id="eta" name="eta" type="number" min="0" max="1" step="0.1" placeholder="0">`)}
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
      <div class="field wide" id="outpaint-block" hidden>
        <span class="row">Add pixels (multiples of 8):
          ${["left", "right", "top", "bottom"].map((side) => `<label for="pad-${side}">${side}</label>
            <input id="pad-${side}" type="number" min="0" step="8" value="0" style="width:6rem">`).join("")}</span>
        <span class="error" data-field="outpaint"></span>
      </div>
      <fieldset class="field wide"><legend>ControlNet units</legend>
        <div id="units"></div>
        <button type="button" class="secondary" id="add-unit">Add a unit</button>
      </fieldset>
      <fieldset class="field wide"><legend>LoRAs</legend>
        <div id="lora-rows"></div>
        <button type="button" class="secondary" id="add-lora">Add a LoRA</button>
      </fieldset>
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
    view.querySelector("#outpaint-block").hidden = form.mode.value !== "outpaint";
    initBlock.hidden = form.mode.value === "txt2img";
    maskTools.hidden = form.mode.value !== "inpaint";
    maskCanvas.hidden = form.mode.value !== "inpaint";
  };
  form.mode.addEventListener("change", syncMode);
  syncMode();
  setupCanvas(form);
  if (prefill.initUrl) loadInit(prefill.initUrl);
  const model = () => models.items.find((m) => m.name === form.model.value) || models.items[0];
  view.querySelector("#add-unit").addEventListener("click", () => addUnit(model()));
  const loras = await api("/v1/loras");
  view.querySelector("#add-lora").addEventListener("click", () => addLora(loras.items));
  view.querySelector("#seed-random").addEventListener("click", () => { form.seed.value = ""; });
  view.querySelector("#seed-reuse").addEventListener("click", () => { if (lastSeed !== null) form.seed.value = lastSeed; });
  form.addEventListener("submit", (event) => { event.preventDefault(); submitGeneration(form); });
}


let unitCount = 0;

// A ControlNet unit: its type, image, strength and span; "Preview" shows the control image
// the preprocessor makes (POST /v1/control/preprocess) before anything is generated.
function addUnit(model) {
  const n = unitCount++;
  const index = view.querySelectorAll("[data-unit]").length;
  const row = document.createElement("div");
  row.className = "row card";
  row.dataset.unit = String(n);
  row.innerHTML = `
    <label for="unit-type-${n}">Type</label><select id="unit-type-${n}">${model.controlnets
      .map((c) => `<option>${esc(c)}</option>`).join("") || "<option disabled>none for this model</option>"}</select>
    <label for="unit-image-${n}">Image</label><input id="unit-image-${n}" type="file" accept="image/*">
    <label><input type="checkbox" id="unit-pre-${n}" checked> preprocess</label>
    <label for="unit-scale-${n}">Scale</label><input id="unit-scale-${n}" type="number" step="0.1" value="1" style="width:5rem">
    <label for="unit-start-${n}">Start</label><input id="unit-start-${n}" type="number" step="0.1" value="0" style="width:5rem">
    <label for="unit-end-${n}">End</label><input id="unit-end-${n}" type="number" step="0.1" value="1" style="width:5rem">
    <button type="button" class="secondary" data-preview>Preview</button>
    <button type="button" class="secondary" data-remove>Remove</button>
    <img alt="Control image preview" data-preview-image hidden style="max-width:160px">
    <span class="error" data-field="controls.${index}.image"></span>
    <span class="error" data-field="controls.${index}.type"></span>`;
  row.querySelector("[data-remove]").addEventListener("click", () => row.remove());
  row.querySelector("[data-preview]").addEventListener("click", async () => {
    const image = await fileDataUrl(row.querySelector(`#unit-image-${n}`));
    if (!image) return;
    const response = await fetch("/v1/control/preprocess", { method: "POST",
      headers: { Authorization: `Bearer ${key()}`, "Content-Type": "application/json" },
      body: JSON.stringify({ type: row.querySelector(`#unit-type-${n}`).value, image }) });
    if (!response.ok) { showProblem(await response.json(), row); return; }
    const preview = row.querySelector("[data-preview-image]");
    preview.src = URL.createObjectURL(await response.blob());
    preview.hidden = false;
  });
  view.querySelector("#units").append(row);
}

async function fileDataUrl(input) {
  const file = input.files[0];
  if (!file) return null;
  return await new Promise((ok) => {
    const reader = new FileReader();
    reader.onload = () => ok(reader.result);
    reader.readAsDataURL(file);
  });
}

async function unitSpecs() {
  const out = [];
  for (const row of view.querySelectorAll("[data-unit]")) {
    const n = row.dataset.unit;
    out.push({ type: row.querySelector(`#unit-type-${n}`).value,
      image: await fileDataUrl(row.querySelector(`#unit-image-${n}`)),
      preprocess: row.querySelector(`#unit-pre-${n}`).checked,
      scale: Number(row.querySelector(`#unit-scale-${n}`).value),
      start: Number(row.querySelector(`#unit-start-${n}`).value),
      end: Number(row.querySelector(`#unit-end-${n}`).value) });
  }
  return out;
}

function addLora(library) {
  const n = unitCount++;
  const index = view.querySelectorAll("[data-lora]").length;
  const row = document.createElement("div");
  row.className = "row";
  row.dataset.lora = String(n);
  row.innerHTML = `<label for="lora-${n}">LoRA</label><select id="lora-${n}">${library.map((l) =>
      `<option value="${esc(l.id)}">${esc(l.name)} (${esc(l.family)})</option>`).join("")}</select>
    <label for="lora-weight-${n}">Weight</label><input id="lora-weight-${n}" type="number" step="0.1" value="1" style="width:5rem">
    <button type="button" class="secondary" data-remove>Remove</button>
    <span class="error" data-field="loras.${index}.id"></span>`;
  row.querySelector("[data-remove]").addEventListener("click", () => row.remove());
  view.querySelector("#lora-rows").append(row);
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
    scheduler: form.scheduler.value || null, eta: numberOrNull(form.eta.value),
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
  if (spec.mode === "outpaint") {
    spec.outpaint = Object.fromEntries(["left", "right", "top", "bottom"].map((side) =>
      [side, Number(view.querySelector(`#pad-${side}`).value) || 0]));
    delete spec.width;  // the canvas is the image plus the added pixels
    delete spec.height;
  }
  spec.controls = await unitSpecs();
  spec.loras = [...view.querySelectorAll("[data-lora]")].map((row) => ({
    id: row.querySelector("select").value, weight: Number(row.querySelector("input").value) }));
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
    <h2>Manifest</h2><pre id="manifest">${job.artifacts.some((a) => a.kind === "manifest") ? "…" : "none"}</pre>
    <h2>Webhook deliveries</h2><ul id="deliveries"></ul>
    <h2>Events</h2><ol>${events.map((e) =>
      `<li>${esc(e.at)} — ${esc(e.type)}${e.data && typeof e.data.progress === "number"
        ? ` (${Math.round(e.data.progress * 100)}%)` : ""}</li>`).join("")}</ol>`;
  const manifest = job.artifacts.find((a) => a.kind === "manifest");
  if (manifest) {
    const response = await fetch(manifest.url);
    view.querySelector("#manifest").textContent = response.ok
      ? JSON.stringify(await response.json(), null, 2) : `could not load it (${response.status})`;
  }
  const deliveries = await api(`/v1/jobs/${jobId}/deliveries`);
  view.querySelector("#deliveries").innerHTML = deliveries.items.map((d) =>
    `<li>${esc(d.event_type)} → ${esc(d.url)}: ${esc(d.status)} (${d.attempts.length} attempt(s))
      <button type="button" class="secondary" data-redeliver="${esc(d.id)}">Redeliver</button></li>`).join("")
    || "<li class='muted'>none</li>";
  for (const button of view.querySelectorAll("[data-redeliver]")) {
    button.addEventListener("click", async () => {
      await api(`/v1/jobs/${jobId}/deliveries/${button.dataset.redeliver}/redeliver`, { method: "POST" });
      jobView(jobId);
    });
  }
  const cancel = view.querySelector("#cancel");
  if (cancel) cancel.addEventListener("click", async () => {
    await api(`/v1/jobs/${jobId}/cancel`, { method: "POST" });
    jobView(jobId);
  });
}


// --- datasets ----------------------------------------------------------------------------

async function datasetsView() {
  signOut.hidden = false;
  const page = await api("/v1/datasets");
  view.innerHTML = `
    <h1>Datasets</h1>
    <form id="dataset-upload" class="grid" novalidate>
      ${field("name", "Name", `<input id="name" name="name" required>`)}
      ${field("min_side", "Training size (min side)", `<input id="min_side" name="min_side" type="number" value="512">`)}
      <div class="field wide">
        <label for="dataset-files">Images, caption files or a zip (kohya layout)</label>
        <div id="drop" class="card" tabindex="0">Drop a folder or a zip here, or pick files:
          <input id="dataset-files" type="file" multiple accept="image/*,.zip,.txt,.caption,.toml,.json">
          <label><input id="as-folder" type="checkbox"> pick a folder</label></div>
        <span class="error" data-field="files"></span><span class="error" data-field="zip"></span>
      </div>
      <div class="field"><button type="submit">Upload</button></div>
    </form>
    <table><thead><tr><th>Dataset</th><th>Images</th><th>Created</th></tr></thead><tbody>
      ${page.items.map((d) => `<tr><td><a href="#/datasets/${esc(d.id)}">${esc(d.name)}</a></td>
        <td>${esc(d.report.totals.images)}</td><td>${esc(d.created_at)}</td></tr>`).join("")}
    </tbody></table>`;
  const form = view.querySelector("form");
  const input = view.querySelector("#dataset-files");
  let dropped = [];
  view.querySelector("#as-folder").addEventListener("change", (e) => {
    input.webkitdirectory = e.target.checked;
  });
  const drop = view.querySelector("#drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); });
  drop.addEventListener("drop", async (e) => {
    e.preventDefault();
    dropped = await droppedFiles(e.dataTransfer);
    drop.firstChild.textContent = `${dropped.length} file(s) ready. `;
  });
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = new FormData();
    body.set("name", form.name.value);
    body.set("min_side", form.min_side.value);
    const files = dropped.length ? dropped : [...input.files].map((f) => [f.webkitRelativePath || f.name, f]);
    for (const [path, file] of files) {
      body.append(path.toLowerCase().endsWith(".zip") ? "zip" : "files", file, path);
    }
    try {
      const dataset = await api("/v1/datasets", { method: "POST", body });
      location.hash = `#/datasets/${dataset.id}`;
    } catch (error) {
      if (error instanceof ApiError) showProblem(error.problem, form); else throw error;
    }
  });
}

// A dropped folder's files with their paths inside it (kohya folder names carry meaning).
async function droppedFiles(transfer) {
  const out = [];
  const walk = async (entry, prefix) => {
    if (entry.isFile) {
      const file = await new Promise((ok, bad) => entry.file(ok, bad));
      out.push([prefix + file.name, file]);
    } else if (entry.isDirectory) {
      const reader = entry.createReader();
      for (;;) {
        const batch = await new Promise((ok, bad) => reader.readEntries(ok, bad));
        if (!batch.length) break;
        for (const child of batch) await walk(child, `${prefix}${entry.name}/`);
      }
    }
  };
  const entries = [...transfer.items].map((item) => item.webkitGetAsEntry && item.webkitGetAsEntry());
  if (entries.every(Boolean)) for (const entry of entries) await walk(entry, "");
  else for (const file of transfer.files) out.push([file.name, file]);
  return out;
}

async function datasetView(datasetId) {
  signOut.hidden = false;
  const dataset = await api(`/v1/datasets/${datasetId}`);
  const items = await api(`/v1/datasets/${datasetId}/items?limit=200`);
  const report = dataset.report;
  const top = Math.max(1, ...report.tags.map((t) => t.count));
  view.innerHTML = `
    <h1>Dataset ${esc(dataset.name)}</h1>
    <p>${report.totals.images} images (${report.totals.train_images} training,
      ${report.totals.reg_images} regularisation); captions ${report.captions.present} of
      ${report.totals.images}; ${report.flagged} flagged.
      <button type="button" class="secondary" id="export">Export (kohya zip)</button></p>
    <h2>Subsets</h2><pre>${esc(JSON.stringify(report.subsets, null, 1))}</pre>
    <h2>Sizes</h2><p>${report.size ? `width ${report.size.width.min}–${report.size.width.max}
      (median ${report.size.width.median}), height ${report.size.height.min}–${report.size.height.max}
      (median ${report.size.height.median})` : "none"}</p>
    <h2>Aspect ratios</h2><p>${Object.entries(report.aspect_ratios).filter(([, n]) => n)
      .map(([r, n]) => `${esc(r)}: ${n}`).join(" · ")}</p>
    <h2>Tag frequency</h2>
    <div aria-label="Tag frequency chart" id="tag-chart">${report.tags.map((t) =>
      `<div class="row"><span style="width:10rem">${esc(t.tag)}</span>
       <span style="background:var(--accent);height:.8rem;width:${Math.round(200 * t.count / top)}px"></span>
       <span>${t.count}</span></div>`).join("") || "<p class='muted'>No tags yet.</p>"}</div>
    <h2>Tag or caption the images</h2>
    <form id="tagging" class="row">
      <label><input type="checkbox" id="tag-caption" checked> captions</label>
      <label for="num-beams">beams</label><input id="num-beams" type="number" min="1" value="1" style="width:4rem">
      <label for="max-length">max length</label><input id="max-length" type="number" min="5" value="40" style="width:5rem">
      <label><input type="checkbox" id="tag-tags" checked> tags</label>
      <label for="threshold">threshold</label><input id="threshold" type="number" step="0.05" value="0.35" style="width:5rem">
      <label><input type="checkbox" id="prefix-trigger" checked> trigger first</label>
      <label><input type="checkbox" id="caption-files"> write caption files</label>
      <button type="submit">Start a tagging job</button><span id="tagging-status" class="muted"></span>
      <span class="error" data-field="caption.num_beams"></span><span class="error" data-field="tags.general_threshold"></span>
    </form>
    <h2>Images</h2>
    <section class="results">${items.items.map((item) => `
      <article class="card" data-item="${esc(item.id)}">
        <img src="${esc(item.thumbnail_url)}" alt="${esc(item.path)}">
        <p class="muted">${esc(item.path)} · ${item.width}×${item.height} ${esc(item.flags.join(" "))}</p>
        <label for="caption-${esc(item.id)}">Caption</label>
        <input id="caption-${esc(item.id)}" data-edit="caption" value="${esc(item.caption || "")}">
        <label for="tags-${esc(item.id)}">Tags</label>
        <input id="tags-${esc(item.id)}" data-edit="tags" value="${esc(item.tags.join(", "))}">
        <span class="error" data-field="caption"></span><span class="error" data-field="tags"></span>
      </article>`).join("")}</section>`;
  for (const card of view.querySelectorAll("[data-item]")) {
    for (const input of card.querySelectorAll("[data-edit]")) {
      input.addEventListener("change", async () => {
        const patch = input.dataset.edit === "caption" ? { caption: input.value }
          : { tags: input.value.split(",").map((t) => t.trim()).filter(Boolean) };
        try {
          await api(`/v1/datasets/${datasetId}/items/${card.dataset.item}`, { method: "PATCH", json: patch });
          input.dataset.saved = "yes";
        } catch (error) {
          if (error instanceof ApiError) showProblem(error.problem, card); else throw error;
        }
      });
    }
  }
  view.querySelector("#tagging").addEventListener("submit", async (event) => {
    event.preventDefault();
    const status = view.querySelector("#tagging-status");
    const value = (id) => Number(view.querySelector(`#${id}`).value);
    let job;
    try {
      job = await api("/v1/taggings", { method: "POST", json: {
        dataset_id: datasetId,
        caption: view.querySelector("#tag-caption").checked
          ? { num_beams: value("num-beams"), max_length: value("max-length") } : null,
        tags: view.querySelector("#tag-tags").checked ? { general_threshold: value("threshold") } : null,
        prefix_trigger: view.querySelector("#prefix-trigger").checked,
        write_caption_files: view.querySelector("#caption-files").checked } });
    } catch (error) {
      if (error instanceof ApiError) { showProblem(error.problem, view.querySelector("#tagging")); return; }
      throw error;
    }
    status.textContent = `job ${job.id} queued`;
    await followEvents(job.id, (e) => { status.textContent = `job ${job.id}: ${e.status}`; });
    datasetView(datasetId);
  });
  view.querySelector("#export").addEventListener("click", async () => {
    const response = await fetch(`/v1/datasets/${datasetId}/export`, { headers: { Authorization: `Bearer ${key()}` } });
    const link = document.createElement("a");
    link.href = URL.createObjectURL(await response.blob());
    link.download = `${dataset.name}.zip`;
    link.click();
  });
}

// --- training ----------------------------------------------------------------------------

async function trainingView() {
  signOut.hidden = false;
  const [datasets, loomisModels] = [await api("/v1/datasets"), models || await api("/v1/models")];
  models = loomisModels;
  view.innerHTML = `
    <h1>Train a LoRA</h1>
    <form id="training" class="grid" novalidate>
      ${field("name", "LoRA name", `<input id="name" name="name" value="my-lora">`, { hint: "kohya: --output_name" })}
      ${field("dataset_id", "Dataset", `<select id="dataset_id" name="dataset_id">${datasets.items.map((d) =>
        `<option value="${esc(d.id)}">${esc(d.name)}</option>`).join("")}</select>`, { hint: "kohya: --train_data_dir" })}
      ${field("base_model", "Base model", `<select id="base_model" name="base_model">${models.items
        .filter((m) => m.family === "sd15").map((m) => `<option>${esc(m.name)}</option>`).join("")}</select>`,
        { hint: "kohya: --pretrained_model_name_or_path" })}
      ${field("data.resolution", "Resolution", `<input id="resolution" type="number" value="512">`, { hint: "kohya: --resolution" , id: "resolution" })}
      ${field("data.min_bucket_reso", "Min bucket", `<input id="min_bucket_reso" type="number" value="256">`, { hint: "kohya: --min_bucket_reso" , id: "min_bucket_reso" })}
      ${field("network.rank", "Rank", `<input id="rank" type="number" value="16">`, { hint: "kohya: --network_dim" , id: "rank" })}
      ${field("network.alpha", "Alpha", `<input id="alpha" type="number" value="8">`, { hint: "kohya: --network_alpha" , id: "alpha" })}
      ${field("optim.learning_rate", "Learning rate", `<input id="learning_rate" type="number" step="any" value="0.0001">`, { hint: "kohya: --learning_rate" , id: "learning_rate" })}
      ${field("optim.max_train_steps", "Steps", `<input id="max_train_steps" type="number" value="1600">`, { hint: "kohya: --max_train_steps" , id: "max_train_steps" })}
      ${field("samples.prompts", "Sample prompt", `<input id="sample_prompt" value="a photo of sks dog --w 64 --h 64 --s 2">`, { hint: "kohya: --sample_prompts" , id: "sample_prompt" })}
      ${field("samples.every_n_steps", "Sample every", `<input id="sample_every" type="number" value="2">`, { hint: "kohya: --sample_every_n_steps" , id: "sample_every" })}
      ${field("save.every_n_steps", "Checkpoint every", `<input id="save_every" type="number" value="2">`, { hint: "kohya: --save_every_n_steps" , id: "save_every" })}
      <div class="field"><button type="submit">Train</button></div>
    </form>`;
  const form = view.querySelector("form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const n = (id) => Number(view.querySelector(`#${id}`).value);
    const spec = {
      name: form.name.value, dataset_id: form.dataset_id.value, base_model: form.base_model.value,
      data: { resolution: n("resolution"), min_bucket_reso: n("min_bucket_reso"), batch_size: 1 },
      network: { rank: n("rank"), alpha: n("alpha") },
      optim: { learning_rate: n("learning_rate"), max_train_steps: n("max_train_steps") },
      samples: { prompts: view.querySelector("#sample_prompt").value, every_n_steps: n("sample_every") },
      save: { every_n_steps: n("save_every") },
    };
    try {
      const job = await api("/v1/trainings", { method: "POST", json: spec });
      location.hash = `#/trainings/${job.id}`;
    } catch (error) {
      if (error instanceof ApiError) showProblem(error.problem, form); else throw error;
    }
  });
}

// Loss and learning rate per step, drawn as two SVG polylines.
function chart(steps) {
  const width = 480, height = 160;
  const line = (values, colour, label) => {
    const finite = values.filter((v) => v !== null && Number.isFinite(v));
    if (!finite.length) return "";
    const lo = Math.min(...finite), hi = Math.max(...finite);
    const points = steps.map((s, i) => {
      const v = values[i];
      if (v === null || !Number.isFinite(v)) return null;
      const x = steps.length > 1 ? (i / (steps.length - 1)) * (width - 20) + 10 : width / 2;
      const y = height - 10 - (hi > lo ? (v - lo) / (hi - lo) : 0.5) * (height - 20);
      return `${x.toFixed(1)},${y.toFixed(1)}`;
    }).filter(Boolean).join(" ");
    return `<polyline fill="none" stroke="${colour}" stroke-width="2" points="${points}" data-series="${label}"/>`;
  };
  return `<svg id="chart" role="img" aria-label="Loss (blue) and learning rate (orange) per step"
      viewBox="0 0 ${width} ${height}" width="100%" style="max-width:${width}px;background:#fff;border:1px solid var(--line)"
      data-points="${steps.length}">
      ${line(steps.map((s) => s.loss ?? s.avr_loss), "#2952cc", "loss")}
      ${line(steps.map((s) => s.lr), "#d9822b", "lr")}</svg>`;
}

async function trainingJobView(jobId) {
  signOut.hidden = false;
  view.innerHTML = `<h1>Training ${esc(jobId.slice(0, 8))}</h1>
    <p><strong id="job-status">…</strong> <span id="step" class="muted"></span></p>
    <div class="row"><button type="button" id="cancel" hidden>Cancel</button>
      <button type="button" class="secondary" id="resume" hidden>Resume</button></div>
    <h2>Loss and learning rate</h2><div id="chart-box"></div>
    <h2>Samples</h2><section class="results" id="samples"></section>
    <h2>Checkpoints</h2><ul id="checkpoints"></ul>`;
  const refresh = async () => {
    const [job, metrics, made] = [await api(`/v1/jobs/${jobId}`),
      await api(`/v1/trainings/${jobId}/metrics`), await api(`/v1/trainings/${jobId}/files`)];
    view.querySelector("#job-status").textContent = job.status;
    view.querySelector("#step").textContent = `step ${metrics.steps.length} of ${metrics.total_steps ?? "?"}`;
    view.querySelector("#chart-box").innerHTML = chart(metrics.steps);
    view.querySelector("#samples").innerHTML = made.samples.map((f) => `<article class="card">
      <img src="${esc(f.url)}" alt="Sample ${f.index} at step ${f.step}"><p class="muted">step ${f.step}</p></article>`).join("");
    view.querySelector("#checkpoints").innerHTML = made.checkpoints.map((f) =>
      `<li><a href="${esc(f.url)}" download>step ${f.step}</a></li>`).join("");
    view.querySelector("#cancel").hidden = !["queued", "running"].includes(job.status);
    view.querySelector("#resume").hidden = job.status !== "canceled" && job.status !== "failed";
    return job;
  };
  view.querySelector("#cancel").addEventListener("click", () => api(`/v1/jobs/${jobId}/cancel`, { method: "POST" }));
  view.querySelector("#resume").addEventListener("click", async () => {
    const job = await api(`/v1/jobs/${jobId}`);
    const spec = { ...job.spec, resume_from: jobId };
    for (const extra of ["images", "lora_id"]) delete spec[extra];
    const resumed = await api("/v1/trainings", { method: "POST", json: spec });
    location.hash = `#/trainings/${resumed.id}`;
  });
  for (;;) {
    const job = await refresh();
    if (!["queued", "running"].includes(job.status) || !location.hash.endsWith(jobId)) break;
    await new Promise((ok) => setTimeout(ok, 1000));
  }
}

// --- scenes ------------------------------------------------------------------------------

async function scenesView() {
  signOut.hidden = false;
  const [places, actions, loras] = [await api("/v1/places"), await api("/v1/actions"), await api("/v1/loras")];
  view.innerHTML = `
    <h1>Scenes</h1>
    <h2>Catalog</h2>
    <section class="results" id="places">${places.items.map((p) => `<article class="card" data-place="${esc(p.id)}">
      <strong>${esc(p.name)}</strong><p class="muted">${esc(p.description)}</p><div class="row" data-thumbs></div></article>`).join("")
      || "<p class='muted'>No places yet (loomis scenes demo-catalog).</p>"}</section>
    <h3>Actions, with each shot's pose and masks</h3>
    <section class="results">${actions.items.map((a) => `<article class="card"><strong>${esc(a.name)}</strong>
      <p class="muted">${esc(a.description)}</p>${Object.entries(a.shots).map(([shot, s]) => `<div>
        <span class="muted">${esc(shot)}</span><div class="row">
        ${s.pose_image_url ? `<img src="${esc(s.pose_image_url)}" alt="${esc(a.name)} ${esc(shot)} pose" style="width:64px">`
          : `<canvas width="64" height="64" data-keypoints="${esc(JSON.stringify(s.keypoints || {}))}"
              data-canvas="${esc(JSON.stringify(s.canvas))}" role="img" aria-label="${esc(a.name)} ${esc(shot)} pose"></canvas>`}
        ${s.body_mask_url ? `<img src="${esc(s.body_mask_url)}" alt="${esc(a.name)} ${esc(shot)} body mask" style="width:64px">` : ""}
        ${s.face_mask_url ? `<img src="${esc(s.face_mask_url)}" alt="${esc(a.name)} ${esc(shot)} face mask" style="width:64px">` : ""}
        </div></div>`).join("")}</article>`).join("")}</section>
    <h2>Compose</h2>
    <form id="scene" class="grid" novalidate>
      ${field("place", "Place", `<select id="place">${places.items.map((p) => `<option value="${esc(p.id)}">${esc(p.name)}</option>`).join("")}</select>`)}
      ${field("image", "Background", `<select id="image"></select>`)}
      ${field("action", "Action", `<select id="action"><option value="">describe it instead</option>${actions.items.map((a) =>
        `<option value="${esc(a.id)}">${esc(a.name)}</option>`).join("")}</select>`)}
      ${field("action_text", "Describe the action", `<div class="row"><input id="action_text" placeholder="greeting a friend">
        <button type="button" class="secondary" id="rank">Rank actions</button></div>`)}
      <ol id="ranking" class="field wide" aria-label="Actions by meaning"></ol>
      ${field("shot", "Shot", `<select id="shot"><option>close</option><option selected>medium</option><option>far</option></select>`)}
      ${field("subject.gender", "Gender", `<select id="gender"><option>woman</option><option>man</option></select>`, { id: "gender" })}
      ${field("subject.details", "Details", `<input id="details" placeholder="a red coat">`, { id: "details" })}
      ${field("lora.id", "Face LoRA", `<select id="lora"><option value="">none</option>${loras.items.map((l) =>
        `<option value="${esc(l.id)}">${esc(l.name)}</option>`).join("")}</select>`, { id: "lora" })}
      ${field("model", "Model", `<input id="scene-model" value="tiny-sd15">`, { id: "scene-model" })}
      ${field("steps", "Steps", `<input id="scene-steps" type="number" value="4">`, { id: "scene-steps" })}
      <div class="field wide"><button type="submit">Compose</button>
        <progress id="progress" max="1" value="0" aria-label="Progress"></progress>
        <span id="status" class="muted" aria-live="polite"></span></div>
    </form>
    <section class="results" id="results" aria-label="Results"></section>`;
  for (const card of view.querySelectorAll("[data-place]")) {
    const images = await api(`/v1/places/${card.dataset.place}/images`);
    card.querySelector("[data-thumbs]").innerHTML = images.items.map((i) =>
      `<img src="${esc(i.thumbnail_url)}" alt="${esc(i.name)}: ${esc(i.description)}" style="width:64px">`).join("");
  }
  for (const canvas of view.querySelectorAll("canvas[data-keypoints]")) drawPose(canvas);
  const form = view.querySelector("form");
  const fillImages = async () => {
    if (!form.place.value) return;
    const images = await api(`/v1/places/${form.place.value}/images`);
    form.image.innerHTML = images.items.map((i) => `<option value="${esc(i.id)}">${esc(i.name)}</option>`).join("");
  };
  view.querySelector("#rank").addEventListener("click", async () => {
    try {
      const match = await api("/v1/actions/match", { method: "POST", json: {
        text: form.action_text.value, shot: form.shot.value } });
      view.querySelector("#ranking").innerHTML = match.scores.map((a) =>
        `<li>${esc(a.name)}: ${a.score.toFixed(3)}</li>`).join("");
    } catch (error) {
      if (error instanceof ApiError) showProblem(error.problem, form); else throw error;
    }
  });
  form.place.addEventListener("change", fillImages);
  await fillImages();
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showBanner("");
    form.querySelectorAll(".error").forEach((el) => { el.textContent = ""; });
    const spec = { place: form.place.value, image: form.image.value, shot: form.shot.value,
      subject: { gender: form.gender.value, details: form.details.value },
      model: view.querySelector("#scene-model").value, steps: Number(view.querySelector("#scene-steps").value) };
    if (form.action.value) spec.action = form.action.value; else spec.action_text = form.action_text.value;
    if (form.lora.value) spec.lora = { id: form.lora.value };
    let job;
    try { job = await api("/v1/scenes", { method: "POST", json: spec }); } catch (error) {
      if (error instanceof ApiError) { showProblem(error.problem, form); return; }
      throw error;
    }
    const progress = view.querySelector("#progress");
    await followEvents(job.id, (e) => {
      if (e.data && typeof e.data.progress === "number") progress.value = e.data.progress;
      view.querySelector("#status").textContent = `job ${job.id}: ${e.status}`;
    });
    const done = await api(`/v1/jobs/${job.id}`);
    if (done.status !== "succeeded") { showBanner(`job ${done.id} ${done.status}`); return; }
    view.querySelector("#results").innerHTML = done.artifacts.filter((a) => a.kind === "image")
      .map((a) => `<article class="card"><img src="${esc(a.url)}" alt="Scene ${a.index}">
        <p class="muted">${esc(done.result.prompt || "")}</p></article>`).join("");
  });
}

// OpenPose keypoints (COCO 18, x y confidence) as dots and limbs, scaled to the canvas.
function drawPose(canvas) {
  const people = (JSON.parse(canvas.dataset.keypoints).people || []);
  const [width, height] = JSON.parse(canvas.dataset.canvas || "[512, 512]");
  const ctx = canvas.getContext("2d");
  ctx.fillStyle = "#222";
  ctx.fillRect(0, 0, canvas.width, canvas.height);
  const limbs = [[1, 2], [1, 5], [2, 3], [3, 4], [5, 6], [6, 7], [1, 8], [8, 9], [9, 10], [1, 11],
    [11, 12], [12, 13], [1, 0], [0, 14], [14, 16], [0, 15], [15, 17]];
  for (const person of people) {
    const k = person.pose_keypoints_2d || [];
    const at = (i) => (k[i * 3 + 2] > 0 ? [k[i * 3] * canvas.width / width, k[i * 3 + 1] * canvas.height / height] : null);
    ctx.strokeStyle = "#3af";
    for (const [a, b] of limbs) {
      const p = at(a), q = at(b);
      if (p && q) { ctx.beginPath(); ctx.moveTo(...p); ctx.lineTo(...q); ctx.stroke(); }
    }
  }
}

// --- LoRAs and subjects ------------------------------------------------------------------

async function lorasView() {
  signOut.hidden = false;
  const loras = await api("/v1/loras");
  models = models || await api("/v1/models");
  view.innerHTML = `<h1>LoRAs</h1>
    <form id="lora-upload" class="grid" novalidate>
      ${field("file", "LoRA file (.safetensors)", `<input id="file" name="file" type="file" accept=".safetensors">`)}
      ${field("name", "Name", `<input id="name" name="name" placeholder="from the file name">`)}
      ${field("base_model", "Base model", `<select id="base_model" name="base_model">${models.items.map((m) =>
        `<option>${esc(m.name)}</option>`).join("")}</select>`)}
      <div class="field"><button type="submit">Upload</button></div>
    </form>
    <table><thead><tr><th>Name</th><th>Family</th><th>Rank</th><th>Source</th><th></th></tr></thead><tbody>
    ${loras.items.map((l) => `<tr><td>${esc(l.name)}</td><td>${esc(l.family)}</td><td>${l.rank}</td>
      <td>${esc(l.source)}</td><td><button type="button" class="secondary" data-delete="${esc(l.id)}">Delete</button></td></tr>`).join("")}
    </tbody></table>`;
  const upload = view.querySelector("#lora-upload");
  upload.base_model.value = models.default_model;
  upload.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = new FormData();
    if (upload.file.files[0]) body.set("file", upload.file.files[0], upload.file.files[0].name);
    if (upload.name.value) body.set("name", upload.name.value);
    body.set("base_model", upload.base_model.value);
    try { await api("/v1/loras", { method: "POST", body }); lorasView(); } catch (error) {
      if (error instanceof ApiError) showProblem(error.problem, upload); else throw error;
    }
  });
  for (const button of view.querySelectorAll("[data-delete]")) {
    button.addEventListener("click", async () => {
      if (!confirm("Delete this LoRA? Workers drop it from their caches.")) return;
      try { await api(`/v1/loras/${button.dataset.delete}`, { method: "DELETE" }); } catch (error) {
        if (error instanceof ApiError) showBanner(error.problem.detail); else throw error;
      }
      lorasView();
    });
  }
}

async function subjectsView() {
  signOut.hidden = false;
  const subjects = await api("/v1/subjects");
  view.innerHTML = `<h1>Subjects</h1>
    <form id="subject" class="grid" novalidate>
      ${field("name", "Name", `<input id="name" name="name">`)}
      ${field("class_word", "Class word", `<input id="class_word" name="class_word" value="person">`)}
      ${field("preset", "Preset", `<select id="preset" name="preset"><option>standard</option><option>quick</option></select>`)}
      ${field("consent", "Consent", `<input id="consent" name="consent" placeholder="who consented, for what">`, { wide: true })}
      ${field("photos", "Photos (3 to 50)", `<input id="photos" name="photos" type="file" multiple accept="image/*">`, { wide: true })}
      <div class="field"><label><input type="checkbox" id="caption"> caption first</label>
        <label><input type="checkbox" id="retain_photos"> keep the photos</label></div>
      <div class="field"><button type="submit">Create</button></div>
    </form>
    <table><thead><tr><th>Subject</th><th>Status</th><th>Trigger</th><th></th></tr></thead><tbody>
    ${subjects.items.map((s) => `<tr><td><a href="#/subjects/${esc(s.id)}">${esc(s.name)}</a></td><td>${esc(s.status)}
      ${s.stage ? `<progress max="1" value="${s.progress}" aria-label="${esc(s.stage.name)}"></progress>` : ""}</td>
      <td>${esc(s.trigger_words.join(", "))}</td>
      <td><button type="button" class="secondary" data-delete="${esc(s.id)}">Delete</button></td></tr>`).join("")}
    </tbody></table>`;
  const form = view.querySelector("form");
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    const body = new FormData();
    for (const name of ["name", "class_word", "preset", "consent"]) body.set(name, form[name].value);
    body.set("caption", String(view.querySelector("#caption").checked));
    body.set("retain_photos", String(view.querySelector("#retain_photos").checked));
    for (const file of form.photos.files) body.append("photos", file, file.name);
    try {
      const made = await api("/v1/subjects", { method: "POST", body });
      location.hash = `#/subjects/${made.id}`;
    } catch (error) {
      if (error instanceof ApiError) showProblem(error.problem, form); else throw error;
    }
  });
  for (const button of view.querySelectorAll("[data-delete]")) {
    button.addEventListener("click", async () => {
      if (await forgetSubject(button.dataset.delete)) subjectsView();
    });
  }
}

// Delete after a confirmation that lists what goes (from the subject's lineage).
async function forgetSubject(subjectId) {
  const subject = await api(`/v1/subjects/${subjectId}`);
  const lineage = subject.lineage;
  const what = [`its photos and dataset`, `${lineage.jobs.length} tagging/training job(s)`,
    `${lineage.loras.length} LoRA version(s)`, `${lineage.outputs_total} output(s) made with it`];
  if (!confirm(`Delete ${subject.name}? This removes ${what.join(", ")}, everywhere.`)) return false;
  await api(`/v1/subjects/${subject.id}?outputs=true`, { method: "DELETE" });
  return true;
}

// One subject, following its stages live (GET /v1/subjects/{id}/events).
async function subjectView(subjectId) {
  signOut.hidden = false;
  const subject = await api(`/v1/subjects/${subjectId}`);
  view.innerHTML = `<h1>Subject ${esc(subject.name)}</h1>
    <p>Trigger: <code>${esc(subject.trigger_words.join(", "))}</code> · consent: ${esc(subject.consent)}</p>
    <p><strong id="subject-status">${esc(subject.status)}</strong>
      <progress id="progress" max="1" value="${subject.progress}" aria-label="Stage progress"></progress></p>
    <ol id="stages" aria-label="Stages"></ol>
    <div class="row"><button type="button" class="secondary" id="cancel">Cancel</button>
      <button type="button" id="delete">Delete everything</button></div>`;
  view.querySelector("#cancel").addEventListener("click", () =>
    api(`/v1/subjects/${subjectId}/cancel`, { method: "POST" }).catch((e) => showBanner(e.message)));
  view.querySelector("#delete").addEventListener("click", async () => {
    if (await forgetSubject(subjectId)) location.hash = "#/subjects";
  });
  const stages = view.querySelector("#stages");
  await followEvents(subjectId, (event) => {
    if (!location.hash.endsWith(subjectId)) return;
    if (event.type === "progress") {
      view.querySelector("#progress").value = event.data.progress;
      return;
    }
    const item = document.createElement("li");
    item.textContent = `${event.at} — ${event.type}`;
    stages.append(item);
    if (event.type !== "photos_deleted") view.querySelector("#subject-status").textContent = event.type;
  }, `/v1/subjects/${subjectId}/events`).catch(() => {});
}

// --- sweeps ------------------------------------------------------------------------------

async function sweepsView() {
  signOut.hidden = false;
  models = models || await api("/v1/models");
  const params = ["guidance_scale", "steps", "seed", "scheduler", "eta", "strength", "prompt", "negative_prompt"];
  const axis = (n) => `
    ${field(`axes.${n}.param`, `Axis ${n + 1}`, `<select id="axis-${n}">${n ? "<option value=''>none</option>" : ""}${params
      .map((p) => `<option>${p}</option>`).join("")}</select>`, { id: `axis-${n}` })}
    ${field(`axes.${n}.values`, `Axis ${n + 1} values (comma-separated)`, `<input id="values-${n}">`, { id: `values-${n}` })}`;
  view.innerHTML = `
    <h1>Sweep</h1>
    <form id="sweep" class="grid" novalidate>
      ${field("base.prompt", "Prompt", `<textarea id="sweep-prompt" rows="2"></textarea>`, { wide: true, id: "sweep-prompt" })}
      ${field("base.model", "Model", `<select id="sweep-model">${models.items.map((m) =>
        `<option>${esc(m.name)}</option>`).join("")}</select>`, { id: "sweep-model" })}
      ${field("base.steps", "Steps", `<input id="sweep-steps" type="number" value="4">`, { id: "sweep-steps" })}
      ${field("base.seed", "Seed", `<input id="sweep-seed" type="number" value="1">`, { id: "sweep-seed" })}
      ${axis(0)}${axis(1)}
      <div class="field wide"><button type="submit">Sweep</button>
        <progress id="progress" max="1" value="0" aria-label="Progress"></progress></div>
    </form>
    <section id="sheet"></section>`;
  const form = view.querySelector("form");
  form["sweep-model"].value = models.default_model;
  const parse = (param, text) => text.split(",").map((v) => v.trim()).filter(Boolean)
    .map((v) => ["scheduler", "prompt", "negative_prompt"].includes(param) ? v : Number(v));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    showBanner("");
    const axes = [0, 1].map((n) => ({ param: view.querySelector(`#axis-${n}`).value,
      values: parse(view.querySelector(`#axis-${n}`).value, view.querySelector(`#values-${n}`).value) }))
      .filter((a) => a.param);
    const spec = { base: { prompt: view.querySelector("#sweep-prompt").value,
      model: view.querySelector("#sweep-model").value, steps: Number(view.querySelector("#sweep-steps").value),
      seed: Number(view.querySelector("#sweep-seed").value) }, axes };
    let job;
    try { job = await api("/v1/sweeps", { method: "POST", json: spec }); } catch (error) {
      if (error instanceof ApiError) { showProblem(error.problem, form); return; }
      throw error;
    }
    await followEvents(job.id, (e) => {
      if (e.data && typeof e.data.progress === "number") view.querySelector("#progress").value = e.data.progress;
    });
    const done = await api(`/v1/jobs/${job.id}`);
    if (done.status !== "succeeded") { showBanner(`job ${done.id} ${done.status}`); return; }
    const sheet = done.artifacts.find((a) => a.kind === "contact_sheet");
    const cells = new Map(done.artifacts.filter((a) => a.kind === "image").map((a) => [a.index, a]));
    // the contact sheet as a grid of its cells, each one clickable (index = row x columns + column)
    const [cols, rows] = [done.spec.axes[0], done.spec.axes[1]];
    const rowValues = rows ? rows.values : [""];
    view.querySelector("#sheet").innerHTML = `
      <h2>Contact sheet</h2>
      <table aria-label="Contact sheet"><thead><tr><th>${rows ? esc(rows.param) : ""} \ ${esc(cols.param)}</th>
        ${cols.values.map((v) => `<th>${esc(v)}</th>`).join("")}</tr></thead><tbody>
        ${rowValues.map((rv, r) => `<tr><th>${esc(rv)}</th>${cols.values.map((_, c) => {
          const cell = cells.get(r * cols.values.length + c);
          return `<td>${cell ? `<a href="${esc(cell.url)}" target="_blank" rel="noopener" data-cell="${cell.index}">
            <img src="${esc(cell.url)}" alt="Cell ${cell.index}" style="width:96px;image-rendering:pixelated"></a>`
            : "withheld"}</td>`; }).join("")}</tr>`).join("")}
      </tbody></table>
      ${sheet ? `<p><a href="${esc(sheet.url)}" download>The contact sheet as one PNG</a></p>` : ""}`;
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
    else if (hash === "#/datasets") await datasetsView();
    else if (hash.startsWith("#/datasets/")) await datasetView(hash.slice("#/datasets/".length));
    else if (hash === "#/training") await trainingView();
    else if (hash.startsWith("#/trainings/")) await trainingJobView(hash.slice("#/trainings/".length));
    else if (hash === "#/scenes") await scenesView();
    else if (hash === "#/sweeps") await sweepsView();
    else if (hash === "#/loras") await lorasView();
    else if (hash === "#/subjects") await subjectsView();
    else if (hash.startsWith("#/subjects/")) await subjectView(hash.slice("#/subjects/".length));
    else await generateView();
  } catch (error) {
    showBanner(error instanceof ApiError ? (error.problem.detail || "request failed") : String(error));
  }
  view.focus();
}

window.addEventListener("hashchange", route);
route();
