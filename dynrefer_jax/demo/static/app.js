// DynRefer demo page: load an image (upload or synthetic scene), draw boxes with the mouse,
// POST them to /api/predict and show each region's answer. No framework, no network beyond
// this server. Box coordinates are integers in the image's own pixels.
"use strict";

const COLORS = ["#e6194b", "#3cb44b", "#0082c8", "#f58230", "#911eb4", "#46c8c8", "#f032e6",
  "#8cb400"];
const MAX_VIEW = 720, MAX_VIEW_H = 540;  // on-screen size the image is fitted to
const SHOWN_TAGS = 12;  // the rest behind "+N more" (an untrained model passes them all)

const $ = (id) => document.getElementById(id);
const state = {
  info: null, imageId: null, image: null, width: 0, height: 0, example: null,
  boxes: [], drag: null, scale: 1, results: null, hover: null, busy: false,
};

function el(tag, attrs = {}, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else if (k.includes("-") || k === "title" || k === "style") e.setAttribute(k, v);
    else e[k] = v;
  }
  for (const c of children) if (c != null) e.append(c);
  return e;
}
const color = (i) => COLORS[i % COLORS.length];
const fmt = (x, d = 2) => Number(x).toFixed(d);
// exp(beam score) of a long caption is often far below 0.01: keep its magnitude readable.
const confidence = (x) => (x >= 0.01 || x === 0 ? fmt(x) : Number(x).toExponential(1));

// ---------------------------------------------------------------------------- messages
function showError(message) {
  const e = $("error");
  e.textContent = message;
  e.hidden = false;
}
function clearError() { $("error").hidden = true; $("error").textContent = ""; }
function setStatus(text, busy = false) {
  $("status").textContent = text;
  $("status").classList.toggle("busy", busy);
}

async function api(path, options = {}) {
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    throw new Error("cannot reach the demo server: is it still running?");
  }
  let body = null;
  try { body = await response.json(); } catch (err) { /* not JSON */ }
  if (!response.ok) {
    throw new Error((body && body.error) || `the server answered ${response.status}`);
  }
  return body;
}

// ---------------------------------------------------------------------------- set-up
async function init() {
  try {
    state.info = await api("/api/info");
  } catch (err) {
    showError(err.message);
    return;
  }
  const info = state.info;
  const step = info.step == null ? "" : ` · step ${info.step}`;
  $("model-info").textContent = `${info.checkpoint}${step} · ${info.num_views} views`;
  for (const [task, ts] of Object.entries(info.task_ts)) {
    $("task").append(el("option", {value: task, text: `${task} (t = ${ts.join(", ")})`}));
  }
  const defaults = [0, 0.3, 0.6, 0.8, 1];
  for (let i = 0; i < info.num_views; i++) {
    $("manual").append(el("input", {type: "number", min: 0, max: 1, step: 0.05,
      value: defaults[i] ?? 1, "data-testid": `t${i}`, title: `t of view ${i + 1}`}));
  }
  if (info.fixed_by_config.length) {
    document.querySelectorAll("input[name=views], #task, #manual input").forEach(
      (x) => { x.disabled = true; });
    $("views").append(el("small", {text: `this model always uses t = ${info.fixed_by_config}`}));
  }
  for (const ex of info.examples) {
    const b = el("button", {type: "button", title: ex.name, "data-testid": "example"},
      el("img", {src: `/api/image/${ex.id}`, alt: ex.name}));
    b.addEventListener("click", () => selectExample(ex, b));
    $("examples").append(b);
  }
  $("file").addEventListener("change", () => {
    if ($("file").files.length) uploadFile($("file").files[0]);
    $("file").value = "";  // picking the same file again fires another change
  });
  const drop = $("drop");
  drop.addEventListener("dragover", (e) => { e.preventDefault(); drop.classList.add("dragover"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("dragover"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("dragover");
    if (e.dataTransfer.files.length) uploadFile(e.dataTransfer.files[0]);
  });
  $("clear").addEventListener("click", () => { state.boxes = []; boxesChanged(); });
  $("scene-boxes").addEventListener("click", () => {
    if (!state.example) return;
    for (const r of state.example.regions) state.boxes.push(r.box.slice());
    boxesChanged();
  });
  $("run").addEventListener("click", run);
  document.querySelectorAll("#manual input, #task").forEach((x) => x.addEventListener(
    "focus", () => { document.querySelector(`input[name=views][value=${
      x.id === "task" ? "task" : "manual"}]`).checked = true; }));
  const canvas = $("stage");
  canvas.addEventListener("pointerdown", pointerDown);
  canvas.addEventListener("pointermove", pointerMove);
  canvas.addEventListener("pointerup", pointerUp);
  canvas.addEventListener("pointercancel", () => { state.drag = null; draw(); });
  window.addEventListener("resize", () => { if (state.image) layout(); });
  canvas.classList.add("empty");
  document.body.dataset.ready = "1";
}

// ---------------------------------------------------------------------------- images
async function uploadFile(file) {
  clearError();
  const limits = state.info.limits;
  if (file.size > limits.max_upload_bytes) {
    showError(`'${file.name}' is too large: ${(file.size / 2 ** 20).toFixed(1)} MB (at most ` +
      `${(limits.max_upload_bytes / 2 ** 20).toFixed(1)} MB)`);
    return;
  }
  setStatus(`uploading ${file.name}…`, true);
  try {
    const res = await api("/api/image", {method: "POST", body: file,
      headers: {"X-Filename": encodeURIComponent(file.name)}});
    await showImage(res.id, res.width, res.height, null);
    setStatus(`${file.name}: ${res.width}×${res.height}`);
  } catch (err) {
    setStatus("");
    showError(err.message);
  }
}

async function selectExample(ex, button) {
  clearError();
  try {
    await showImage(ex.id, ex.width, ex.height, ex);
    document.querySelectorAll(".examples button").forEach((b) => b.classList.remove("active"));
    button.classList.add("active");
    setStatus(`${ex.name}: ${ex.width}×${ex.height}`);
  } catch (err) {
    showError(err.message);
  }
}

function loadImage(src) {
  return new Promise((resolve, reject) => {
    const img = new Image();
    img.onload = () => resolve(img);
    img.onerror = () => reject(new Error("the browser could not display the image"));
    img.src = src;
  });
}

async function showImage(id, width, height, example) {
  const img = await loadImage(`/api/image/${id}`);
  Object.assign(state, {imageId: id, image: img, width, height, example, boxes: [],
    results: null, hover: null});
  $("scene-boxes").hidden = !example;
  if (!example) document.querySelectorAll(".examples button").forEach(
    (b) => b.classList.remove("active"));
  $("placeholder").hidden = true;
  $("stage").classList.remove("empty");
  layout();
  boxesChanged();
  renderResults();
  $("stage").dataset.imageId = id;
}

function layout() {
  const canvas = $("stage");
  const room = Math.min(MAX_VIEW, $("drop").clientWidth - 2 || MAX_VIEW);
  state.scale = Math.min(room / state.width, MAX_VIEW_H / state.height);
  const w = Math.round(state.width * state.scale), h = Math.round(state.height * state.scale);
  const dpr = window.devicePixelRatio || 1;
  canvas.style.width = `${w}px`;
  canvas.style.height = `${h}px`;
  canvas.width = Math.round(w * dpr);
  canvas.height = Math.round(h * dpr);
  draw();
}

// ---------------------------------------------------------------------------- drawing
function toImage(event) {
  const r = $("stage").getBoundingClientRect();
  const x = (event.clientX - r.left) * state.width / r.width;
  const y = (event.clientY - r.top) * state.height / r.height;
  return [Math.min(state.width, Math.max(0, x)), Math.min(state.height, Math.max(0, y))];
}

function pointerDown(event) {
  if (!state.image || event.button !== 0) return;
  $("stage").setPointerCapture(event.pointerId);
  const p = toImage(event);
  state.drag = {start: p, end: p};
}
function pointerMove(event) {
  if (!state.drag) return;
  state.drag.end = toImage(event);
  draw();
}
function pointerUp(event) {
  if (!state.drag) return;
  state.drag.end = toImage(event);
  const [a, b] = [state.drag.start, state.drag.end];
  state.drag = null;
  const box = [Math.floor(Math.min(a[0], b[0])), Math.floor(Math.min(a[1], b[1])),
    Math.ceil(Math.max(a[0], b[0])), Math.ceil(Math.max(a[1], b[1]))];
  // A click (or a sliver under 3 screen pixels) is not a box.
  const screen = Math.min(Math.abs(a[0] - b[0]), Math.abs(a[1] - b[1])) * state.scale;
  if (screen >= 3 && box[2] > box[0] && box[3] > box[1]) {
    state.boxes.push(box);
    boxesChanged();
  } else {
    draw();
  }
}

function strokeBox(ctx, box, c, {dash = null, label = null, width = 2} = {}) {
  const s = state.scale * (window.devicePixelRatio || 1);
  const [x1, y1, x2, y2] = box.map((v) => v * s);
  ctx.save();
  ctx.lineWidth = width * (window.devicePixelRatio || 1);
  ctx.strokeStyle = c;
  if (dash) ctx.setLineDash(dash.map((d) => d * (window.devicePixelRatio || 1)));
  ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
  if (label != null) {
    const fs = 13 * (window.devicePixelRatio || 1);
    ctx.font = `bold ${fs}px system-ui, sans-serif`;
    const tw = ctx.measureText(label).width + fs * 0.6;
    ctx.fillStyle = c;
    ctx.fillRect(x1, Math.max(0, y1 - fs * 1.3), tw, fs * 1.3);
    ctx.fillStyle = "#fff";
    ctx.fillText(label, x1 + fs * 0.3, Math.max(0, y1 - fs * 1.3) + fs);
  }
  ctx.restore();
}

function draw() {
  const canvas = $("stage");
  const ctx = canvas.getContext("2d");
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  if (!state.image) return;
  // Small images are shown enlarged: keep their pixels sharp rather than blurred.
  ctx.imageSmoothingEnabled = state.scale < 2;
  ctx.drawImage(state.image, 0, 0, canvas.width, canvas.height);
  if (state.hover != null && state.results) {
    const r = state.results.regions[state.hover];
    r.view_boxes.forEach((vb, j) => {
      if (j > 0) strokeBox(ctx, vb, color(r.index), {dash: [6, 4], width: 1.5});
    });
  }
  state.boxes.forEach((b, i) => strokeBox(ctx, b, color(i), {label: String(i + 1)}));
  if (state.drag) {
    const [a, b] = [state.drag.start, state.drag.end];
    strokeBox(ctx, [Math.min(a[0], b[0]), Math.min(a[1], b[1]), Math.max(a[0], b[0]),
      Math.max(a[1], b[1])], color(state.boxes.length), {dash: [5, 3]});
  }
}

function boxesChanged() {
  const list = $("boxes");
  list.replaceChildren();
  state.boxes.forEach((b, i) => {
    const remove = el("button", {type: "button", title: "remove this box", text: "×",
      "aria-label": `remove box ${i + 1}`});
    remove.addEventListener("click", () => { state.boxes.splice(i, 1); boxesChanged(); });
    list.append(el("li", {style: `--c: ${color(i)}`, "data-testid": "box",
      "data-box": JSON.stringify(b)}, el("b", {text: `${i + 1}`}), ` ${b.join(", ")}`, remove));
  });
  // Results describe the boxes they were computed for: dim them once the boxes change.
  const same = state.results && JSON.stringify(state.results.boxes) === JSON.stringify(state.boxes);
  $("results").classList.toggle("stale", Boolean(state.results) && !same);
  draw();
}

// ---------------------------------------------------------------------------- predict
function viewsRequest() {
  const mode = document.querySelector("input[name=views]:checked").value;
  if (mode === "task") return {mode, task: $("task").value};
  if (mode === "manual") {
    return {mode, ts: [...document.querySelectorAll("#manual input")].map(
      (x) => (x.value.trim() === "" ? null : Number(x.value)))};
  }
  return {mode: "auto"};
}

async function run() {
  if (state.busy) return;
  clearError();
  if (!state.imageId) { showError("no image: upload one or pick a synthetic scene first"); return; }
  if (!state.boxes.length) { showError("no box: drag on the image to draw at least one box"); return; }
  const boxes = state.boxes.map((b) => b.slice());
  state.busy = true;
  $("run").disabled = true;
  setStatus(`describing ${boxes.length} region${boxes.length > 1 ? "s" : ""}…`, true);
  try {
    const res = await api("/api/predict", {method: "POST",
      headers: {"Content-Type": "application/json"},
      body: JSON.stringify({image_id: state.imageId, boxes, views: viewsRequest()})});
    state.results = {...res, boxes};
    state.hover = null;
    state.runs = (state.runs || 0) + 1;
    const used = res.views_used === "auto" ? "image prior" : `t = ${res.views_used.join(", ")}`;
    setStatus(`${res.regions.length} region${res.regions.length > 1 ? "s" : ""} in ` +
      `${fmt(res.seconds)} s (${used})`);
    renderResults();
    boxesChanged();
    $("results").dataset.runs = String(state.runs);
  } catch (err) {
    setStatus("");
    showError(err.message);
  } finally {
    state.busy = false;
    $("run").disabled = false;
  }
}

function truthFor(box) {
  if (!state.example) return null;
  const hit = state.example.regions.find((r) => r.box.every((v, i) => v === box[i]));
  return hit ? hit.caption : null;
}

function viewThumb(region, j) {
  const [x1, y1, x2, y2] = region.view_boxes[j];
  const c = el("canvas", {width: 184, height: 184});
  const ctx = c.getContext("2d");
  // The model sees each view resized to a square; show it the same way.
  ctx.imageSmoothingEnabled = (x2 - x1) > 60;
  ctx.drawImage(state.image, x1, y1, x2 - x1, y2 - y1, 0, 0, 184, 184);
  return el("div", {class: "view", "data-testid": "view", "data-t": String(region.views[j])},
    c, el("div", {text: `t = ${fmt(region.views[j])}`}));
}

function renderResults() {
  const root = $("results");
  root.replaceChildren();
  root.classList.remove("stale");
  if (!state.results) {
    root.append(el("p", {class: "empty", text: state.image
      ? "Draw one or more boxes, then press “Describe regions”."
      : "Results appear here: a caption with its confidence, the category, tags, attributes " +
        "and the views (t = 0 is the box itself, t = 1 the whole image)."}));
    return;
  }
  for (const r of state.results.regions) {
    const truth = truthFor(r.box);
    const tags = r.tags.length
      ? el("div", {class: "chips"}, ...r.tags.map((t, k) => el("span",
        {class: "chip", "data-testid": "tag", "data-name": t.name, "data-score": String(t.score),
          hidden: k >= SHOWN_TAGS},
        el("span", {class: "name", text: t.name}), el("span", {class: "score", text: fmt(t.score)}))))
      : el("span", {class: "none", text: `none above ${fmt(state.info.tag_threshold)}`});
    if (r.tags.length > SHOWN_TAGS) {
      const more = el("button", {type: "button", class: "more",
        text: `+${r.tags.length - SHOWN_TAGS} more`});
      more.addEventListener("click", () => {
        tags.querySelectorAll(".chip[hidden]").forEach((c) => { c.hidden = false; });
        more.remove();
      });
      tags.append(more);
    }
    const attrs = el("div", {class: "attrs"}, ...r.attributes.map((a) => el("div",
      {class: "attr", "data-testid": "attribute", "data-name": a.name, "data-score": String(a.score)},
      el("span", {class: "name", text: a.name}),
      el("span", {class: "bar"}, el("i", {style: `width: ${Math.round(100 * a.score)}%`})),
      el("span", {class: "score", text: fmt(a.score)}))));
    const card = el("article", {class: "card", style: `--c: ${color(r.index)}`,
      "data-testid": "region", "data-index": String(r.index)},
      el("div", {class: "card-head"},
        el("span", {class: "num", text: `Region ${r.index + 1}`}),
        el("span", {"data-testid": "region-box", text: r.box.map((v) => fmt(v, 0)).join(", ")})),
      el("div", {class: "caption-line"},
        el("span", {class: "caption", "data-testid": "caption", text: r.caption}),
        el("span", {class: "pill", title: "caption confidence: exp(beam score)",
          "data-testid": "caption-score", "data-score": String(r.caption_score),
          text: `confidence ${confidence(r.caption_score)}`})),
      truth ? el("div", {class: "truth", text: `true caption: ${truth}`}) : null,
      el("div", {class: "row"}, el("span", {class: "label", text: "category"}),
        el("span", {},
          el("span", {class: "category", "data-testid": "category", text: r.category.name}),
          el("span", {class: "category-score", "data-testid": "category-score",
            "data-score": String(r.category.score), title: "raw region–text score",
            text: `score ${fmt(r.category.score)}`}))),
      el("div", {class: "row"}, el("span", {class: "label", text: "tags"}), tags),
      el("div", {class: "row"}, el("span", {class: "label", text: "attributes"}), attrs),
      el("div", {class: "row"}, el("span", {class: "label", text: "views"}),
        el("div", {class: "view-strip"}, ...r.views.map((_, j) => viewThumb(r, j)))));
    card.addEventListener("mouseenter", () => { state.hover = r.index; draw(); });
    card.addEventListener("mouseleave", () => { state.hover = null; draw(); });
    root.append(card);
  }
}

init();
