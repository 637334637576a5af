// The demo page: draw on #pad (mouse, pen or touch), send it as a PNG to POST /api/predict, show every model's
// answer. No framework, no build step.
"use strict";

const pad = document.getElementById("pad");
const ctx = pad.getContext("2d");
const statusLine = document.getElementById("status");
const panels = document.getElementById("models");
const LINE_WIDTH = 26; // ~2.5 px strokes once a 200 px digit is scaled into MNIST's 20 px box
const DEBOUNCE_MS = 250;
let models = [];
let drawing = false;
let inked = false;
let timer = null;
let inFlight = 0;

function clearPad() {
  ctx.fillStyle = "#000";
  ctx.fillRect(0, 0, pad.width, pad.height);
  inked = false;
}

function point(event) {
  const r = pad.getBoundingClientRect();
  return [(event.clientX - r.left) * (pad.width / r.width), (event.clientY - r.top) * (pad.height / r.height)];
}

function setStatus(text, isError = false) {
  statusLine.textContent = text;
  statusLine.classList.toggle("error", isError);
}

function fmtCount(n) {
  if (n >= 1e9) return (n / 1e9).toFixed(2) + " G";
  if (n >= 1e6) return (n / 1e6).toFixed(2) + " M";
  if (n >= 1e3) return (n / 1e3).toFixed(1) + " k";
  return String(n);
}

function buildPanels() {
  panels.textContent = "";
  for (const m of models) {
    const panel = document.createElement("article");
    panel.className = "model-panel";
    panel.dataset.model = m.id;
    panel.innerHTML =
      `<h2></h2><p class="meta"></p><canvas class="seen" width="${m.input.width}" height="${m.input.height}"></canvas>` +
      `<div class="bars"></div><p class="latency"></p>`;
    panel.querySelector("h2").textContent = m.name;
    panel.querySelector(".meta").textContent =
      `${fmtCount(m.params)} parameters, ${fmtCount(m.flops)}FLOPs/image` + (m.bn_folded ? ", BN folded" : "");
    panel.title = m.source + (m.note ? "\n" + m.note : "");
    panels.appendChild(panel);
  }
}

function drawSeen(canvas, input, attention, overlay) {
  const c = canvas.getContext("2d");
  const h = input.length;
  const w = input[0].length;
  const img = c.createImageData(w, h);
  let peak = 0;
  if (attention) for (const row of attention) for (const v of row) peak = Math.max(peak, v);
  for (let y = 0; y < h; y++) {
    for (let x = 0; x < w; x++) {
      const px = input[y][x];
      const v = Array.isArray(px) ? px : [px, px, px];
      let heat = 0;
      if (overlay && attention && peak > 0) {
        const gy = Math.floor((y * attention.length) / h);
        const gx = Math.floor((x * attention[0].length) / w);
        heat = attention[gy][gx] / peak;
      }
      const i = 4 * (y * w + x);
      img.data[i] = Math.min(255, v[0] * (1 - 0.5 * heat) + 255 * 0.5 * heat);
      img.data[i + 1] = v[1] * (1 - 0.5 * heat) + 120 * 0.5 * heat;
      img.data[i + 2] = v[2] * (1 - 0.5 * heat);
      img.data[i + 3] = 255;
    }
  }
  c.putImageData(img, 0, 0);
}

let lastResults = null;

function showResults(results) {
  lastResults = results;
  const overlay = document.getElementById("overlay").checked;
  for (const r of results) {
    const panel = panels.querySelector(`.model-panel[data-model="${r.model}"]`);
    if (!panel) continue;
    const bars = panel.querySelector(".bars");
    bars.textContent = "";
    for (const t of r.top) {
      const row = document.createElement("div");
      row.className = "row";
      row.innerHTML = `<span class="label"></span><div class="track"><div class="bar"></div></div><span class="prob"></span>`;
      row.querySelector(".label").textContent = t.class;
      row.querySelector(".bar").style.width = `${(100 * t.prob).toFixed(1)}%`;
      row.querySelector(".prob").textContent = `${(100 * t.prob).toFixed(1)}%`;
      row.dataset.class = t.class;
      row.dataset.prob = t.prob;
      bars.appendChild(row);
    }
    panel.dataset.top1 = r.top[0].class;
    panel.dataset.probSum = r.probs.reduce((a, b) => a + b, 0);
    panel.querySelector(".latency").textContent = `forward pass ${r.latency_ms.toFixed(1)} ms`;
    drawSeen(panel.querySelector(".seen"), r.input, r.attention, overlay);
  }
}

async function send(body, type) {
  inFlight += 1;
  setStatus("Predicting\u2026");
  try {
    const response = await fetch("/api/predict?top_k=3", { method: "POST", headers: { "Content-Type": type }, body });
    const answer = await response.json();
    if (!response.ok) {
      setStatus(answer.error || `HTTP ${response.status}`, true);
      return;
    }
    showResults(answer.predictions);
    document.body.dataset.answers = Number(document.body.dataset.answers || 0) + 1;
    setStatus("");
  } catch (err) {
    setStatus(`request failed: ${err}`, true);
  } finally {
    inFlight -= 1;
    document.body.dataset.busy = inFlight > 0 ? "1" : "0";
  }
}

function predictPad() {
  clearTimeout(timer);
  if (!inked) {
    setStatus("Draw a digit first.");
    return;
  }
  document.body.dataset.busy = "1";
  pad.toBlob((blob) => send(blob, "image/png"), "image/png");
}

function schedule() {
  if (!document.getElementById("live").checked) return;
  clearTimeout(timer);
  timer = setTimeout(predictPad, DEBOUNCE_MS);
}

pad.addEventListener("pointerdown", (event) => {
  drawing = true;
  pad.setPointerCapture(event.pointerId);
  const [x, y] = point(event);
  ctx.strokeStyle = "#fff";
  ctx.fillStyle = "#fff";
  ctx.lineWidth = LINE_WIDTH;
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.beginPath();
  ctx.arc(x, y, LINE_WIDTH / 2, 0, 2 * Math.PI);
  ctx.fill();
  ctx.beginPath();
  ctx.moveTo(x, y);
  inked = true;
});
pad.addEventListener("pointermove", (event) => {
  if (!drawing) return;
  const [x, y] = point(event);
  ctx.lineTo(x, y);
  ctx.stroke();
  schedule();
});
for (const type of ["pointerup", "pointercancel"]) {
  pad.addEventListener(type, () => {
    if (!drawing) return;
    drawing = false;
    schedule();
  });
}

document.getElementById("clear").addEventListener("click", () => {
  clearPad();
  setStatus("");
});
document.getElementById("predict").addEventListener("click", predictPad);
document.getElementById("overlay").addEventListener("change", () => lastResults && showResults(lastResults));
document.getElementById("upload").addEventListener("change", (event) => {
  const file = event.target.files[0];
  if (file) send(file, file.type || "application/octet-stream");
});

async function start() {
  clearPad();
  try {
    const response = await fetch("/api/models");
    models = (await response.json()).models;
    buildPanels();
    setStatus(`${models.length} model(s) loaded. Draw a digit.`);
    document.body.dataset.ready = "1";
  } catch (err) {
    setStatus(`cannot list the models: ${err}`, true);
  }
}

start();
