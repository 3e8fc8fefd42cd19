// The explanation viewer: calls only the public endpoints (/metadata, /explain, /prototypes/{id})
// and renders "this looks like that". No framework and no network beyond this server.

const $ = (id) => document.getElementById(id);
const SVG = "http://www.w3.org/2000/svg";
// Distinct box colours, one per listed prototype (ranked by contribution).
const PALETTE = ["#e6194b", "#3cb44b", "#4363d8", "#f58231", "#911eb4", "#42d4f4", "#f032e6", "#bfef45",
                 "#fabed4", "#469990", "#dcbeff", "#9a6324", "#fffac8", "#800000", "#aaffc3", "#808000"];

// explained counts requests: an answer that a newer request has overtaken is dropped, not drawn over it
const state = { metadata: null, file: null, imageUrl: null, response: null, heatmapOf: null, explained: 0 };

// ------------------------------------------------------------------------------------------ helpers

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs)) {
    if (key === "class") node.className = value;
    else if (key === "text") node.textContent = value;
    else node.setAttribute(key, value);
  }
  node.append(...children);
  return node;
}

function fmt(x, digits = 3) {
  return Number(x).toFixed(digits);
}

function signed(x) {
  return (x >= 0 ? "+" : "\u2212") + fmt(Math.abs(x));
}

async function readError(response) {
  // The service answers every mistake with {"error", "detail"}; anything else is shown as it came.
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    if (body && body.error) return `${body.error}: ${body.detail}`;
  } catch (_) { /* not JSON */ }
  return `the server answered ${response.status} ${response.statusText}${text ? ": " + text.slice(0, 300) : ""}`;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function setStatus(message) {
  $("status").textContent = message;
}

// ------------------------------------------------------------------------------------------ tabs

function selectTab(tab) {
  for (const t of document.querySelectorAll('[role="tab"]')) {
    const selected = t === tab;
    t.setAttribute("aria-selected", String(selected));
    t.tabIndex = selected ? 0 : -1;
    $(t.getAttribute("aria-controls")).hidden = !selected;
  }
  if (tab.id === "tab-bank") renderBank();
}

function setUpTabs() {
  const tabs = [...document.querySelectorAll('[role="tab"]')];
  for (const tab of tabs) {
    tab.addEventListener("click", () => selectTab(tab));
    tab.addEventListener("keydown", (event) => {
      const step = { ArrowRight: 1, ArrowLeft: -1 }[event.key];
      if (!step) return;
      const next = tabs[(tabs.indexOf(tab) + step + tabs.length) % tabs.length];
      next.focus();
      selectTab(next);
      event.preventDefault();
    });
  }
}

// ------------------------------------------------------------------------------------------ metadata

async function loadMetadata() {
  const response = await fetch("/metadata");
  if (!response.ok) throw new Error(await readError(response));
  const m = await response.json();
  state.metadata = m;
  $("model-name").textContent = m.name;
  const test = (m.metrics && m.metrics.test) || {};
  const accuracy = test.prototype_acc != null
    ? `, test accuracy ${(100 * test.prototype_acc).toFixed(1)} % on ${test.n} images` : "";
  $("model-info").textContent = `${m.classes.length} classes, ${m.prototypes.length} prototypes, ` +
    `input ${m.input.width}\u00d7${m.input.height} ${m.input.color_mode}${accuracy}`;
  for (const select of [$("target"), $("bank-class")]) {
    m.classes.forEach((label, index) => select.append(el("option", { value: String(index), text: label })));
  }
}

// ------------------------------------------------------------------------------------------ explain

async function explain() {
  if (!state.file) return;
  const request = ++state.explained;
  const current = () => request === state.explained;
  showError("");
  setStatus(`Explaining ${state.file.name || "the image"}\u2026`);
  const params = new URLSearchParams({ top_k: String(Math.min(5, state.metadata ? state.metadata.classes.length : 5)),
                                       top_prototypes: String(clampPrototypes()), heatmap: "true",
                                       regions: $("regions").value });
  if ($("target").value !== "") params.set("class", $("target").value);
  const form = new FormData();
  form.append("image", state.file, state.file.name || "image");
  let response;
  try {
    response = await fetch(`/explain?${params}`, { method: "POST", body: form });
  } catch (error) {
    if (!current()) return;
    setStatus("");
    showError(`The server did not answer: ${error.message}`);
    return;
  }
  if (!response.ok) {
    const message = await readError(response);
    if (!current()) return;
    setStatus("");
    $("result").hidden = true;
    showError(message);
    return;
  }
  const answer = await response.json();
  if (!current()) return;
  state.response = answer;
  state.heatmapOf = null;
  await showImage();
  if (!current()) return;
  render(state.response);
  setStatus(`Explained ${state.file.name || "the image"}.`);
}

function clampPrototypes() {
  const input = $("n-prototypes");
  const n = Math.max(1, Math.min(50, Math.round(Number(input.value) || 5)));
  input.value = String(n);
  return n;
}

function showImage() {
  const img = $("input-image");
  if (img.dataset.file === state.imageUrl) return Promise.resolve();
  return new Promise((resolve) => {
    img.onload = img.onerror = () => resolve();
    img.dataset.file = state.imageUrl;
    img.src = state.imageUrl;
  });
}

// what a box shows, by the region rule the answer was drawn with (its meta.regions)
const REGION_CAPTIONS = {
  evidence: "Boxes: the input each prototype's similarity depends on (hiding it lowers the similarity most)",
  activation: "Boxes: where each prototype's similarity map peaks (ProtoPNet's box of the best match)",
};

function render(answer) {
  const data = answer.explanations[0].data;
  $("result").hidden = false;
  const meta = answer.explanations[0].meta;
  // a bundle whose run predates evidence boxes on training images boxes them where the map peaks: say so
  const mixed = data.top_prototypes.some((e) => e.source.regions !== meta.regions);
  $("regions-caption").textContent = (REGION_CAPTIONS[meta.regions] || "Boxes") +
    (mixed ? "; the training images' boxes show where each similarity map peaks (this model has no other)" : "");
  const warning = $("input-warning");
  warning.hidden = !(answer.warnings && answer.warnings.length);
  warning.textContent = warning.hidden ? "" : `Warning: ${answer.warnings.join(" ")}`;
  renderPredictions(answer.predictions, data.target_class_id);
  renderSum(data);
  renderBoxes(answer.image, data.top_prototypes);
  renderEvidence(data);
  drawHeatmap();
}

function renderPredictions(predictions, target) {
  const list = $("predictions");
  const shown = [...list.children].map((li) => li.dataset.class);
  // The same classes in the same order keep their elements: an answer that lands between the press and the
  // release of a click on one of them would otherwise replace the button and the click would be lost.
  if (shown.join() !== predictions.map((p) => String(p.class_id)).join()) {
    list.replaceChildren(...predictions.map(predictionItem));
  }
  predictions.forEach((p, i) => {
    const button = list.children[i].querySelector("button");
    button.setAttribute("aria-current", String(p.class_id === target));
    button.querySelector(".bar > span").style.width = `${(100 * p.score).toFixed(1)}%`;
    button.querySelector(".score").textContent = `${(100 * p.score).toFixed(1)} %`;
    button.setAttribute("aria-label", `${p.label}: probability ${(100 * p.score).toFixed(1)} percent, ` +
                                      `logit ${fmt(p.logit)}. Explain this class.`);
  });
}

function predictionItem(p) {
  const button = el("button", { type: "button", title: `Explain class ${p.label}` },
    el("span", { class: "label", text: p.label }),
    el("span", { class: "bar", "aria-hidden": "true" }, el("span")),
    el("span", { class: "score" }));
  button.addEventListener("click", () => {
    $("target").value = String(p.class_id);
    explain();
  });
  return el("li", { "data-class": String(p.class_id) }, button);
}

function renderSum(data) {
  const listed = data.top_prototypes.reduce((total, e) => total + e.contribution, 0);
  const m = state.metadata ? state.metadata.prototypes.length : null;
  const rest = data.evidence_sum - listed;
  const sum = $("evidence-sum");
  sum.replaceChildren(
    "Score of ", el("strong", { text: data.label }), ": logit ", el("strong", { class: "logit", text: fmt(data.logit) }),
    ` = the sum of the contributions of ${m == null ? "all" : "all " + m} prototypes `,
    el("strong", { class: "evidence-total", text: `(${fmt(data.evidence_sum)})` }),
    `. The ${data.top_prototypes.length} shown add ${fmt(listed)}; the others ${signed(rest)}.`,
    data.own_class_share == null ? "" :
      ` ${Math.round(100 * data.own_class_share)}% of the absolute evidence comes from ${data.label}'s own prototypes.`);
}

function boxColour(rank) {
  return PALETTE[rank % PALETTE.length];
}

function renderBoxes(size, evidence) {
  const svg = $("boxes");
  svg.setAttribute("viewBox", `0 0 ${size.width} ${size.height}`);
  svg.replaceChildren();
  // Larger boxes first, so a box inside another stays reachable with the mouse; among equal sizes the
  // strongest match ends on top.
  const area = (e) => (e.box_xyxy[2] - e.box_xyxy[0]) * (e.box_xyxy[3] - e.box_xyxy[1]);
  const order = evidence.map((e, rank) => ({ e, rank })).sort((a, b) => area(b.e) - area(a.e) || b.rank - a.rank);
  order.forEach(({ e, rank }) => {
    const [x0, y0, x1, y1] = e.box_xyxy;
    const rect = document.createElementNS(SVG, "rect");
    for (const [k, v] of Object.entries({ x: x0, y: y0, width: x1 - x0, height: y1 - y0 })) rect.setAttribute(k, v);
    rect.setAttribute("stroke", boxColour(rank));
    rect.setAttribute("vector-effect", "non-scaling-stroke");
    rect.setAttribute("tabindex", "0");
    rect.setAttribute("role", "img");
    rect.setAttribute("aria-label", `Evidence region of prototype ${e.prototype_id} (class ${e.label}), ` +
                                    `pixels ${x0},${y0} to ${x1},${y1}`);
    rect.dataset.prototype = String(e.prototype_id);
    const title = document.createElementNS(SVG, "title");
    title.textContent = `prototype ${e.prototype_id}: contribution ${fmt(e.contribution)}`;
    rect.append(title);
    pairHighlight(rect, e.prototype_id);
    svg.append(rect);
  });
}

function renderEvidence(data) {
  const list = $("evidence");
  list.replaceChildren();
  $("evidence-title").textContent = `Evidence for ${data.label}: the ${data.top_prototypes.length} ` +
                                    `largest contributions`;
  data.top_prototypes.forEach((e, rank) => {
    const colour = boxColour(rank);
    const heat = el("button", { type: "button", class: "heat", "aria-pressed": "false",
                                text: "Show heatmap" });
    heat.setAttribute("aria-label", `Show the similarity heatmap of prototype ${e.prototype_id} on the image`);
    heat.addEventListener("click", () => {
      state.heatmapOf = state.heatmapOf === e.prototype_id ? null : e.prototype_id;
      drawHeatmap();
    });
    const card = el("li", { class: "card", tabindex: "0", "data-prototype": String(e.prototype_id),
                            style: `border-left-color:${colour}` },
      el("div", { class: "imgs" },
        el("figure", {},
          el("img", { src: e.source.patch_url, alt: `Prototype ${e.prototype_id}: its patch of training image ` +
                                                    `${e.source.sample}`, loading: "lazy" }),
          el("figcaption", { text: "prototype" })),
        el("figure", {},
          el("img", { src: e.source.context_url, alt: `Training image ${e.source.sample} with the prototype's ` +
                                                      `patch boxed`, loading: "lazy" }),
          el("figcaption", { text: `training image ${e.source.sample}` }))),
      definitions([
        ["Prototype", `#${e.prototype_id}${e.duplicates && e.duplicates.length ? ` (identical: ` +
          e.duplicates.map((d) => `#${d}`).join(", ") + ")" : ""}, class ${e.label}`],
        ["Similarity", fmt(e.similarity)],
        ["Weight", fmt(e.weight)],
        ["Contribution", signed(e.contribution), e.contribution >= 0 ? "positive" : "negative"],
      ]),
      heat);
    card.setAttribute("aria-label", `Prototype ${e.prototype_id}, class ${e.label}: similarity ${fmt(e.similarity)} ` +
                                    `times weight ${fmt(e.weight)} contributes ${signed(e.contribution)}`);
    pairHighlight(card, e.prototype_id);
    list.append(card);
  });
}

function definitions(rows) {
  const dl = el("dl");
  for (const [term, value, cls] of rows) {
    dl.append(el("dt", { text: term }), el("dd", cls ? { class: cls, text: value } : { text: value }));
  }
  return dl;
}

// Hovering or focusing a box highlights its card and the reverse.
function pairHighlight(node, prototypeId) {
  const on = () => setActive(prototypeId, true);
  const off = () => setActive(prototypeId, false);
  node.addEventListener("mouseenter", on);
  node.addEventListener("mouseleave", off);
  node.addEventListener("focus", on);
  node.addEventListener("blur", off);
}

function setActive(prototypeId, active) {
  for (const node of document.querySelectorAll(`[data-prototype="${prototypeId}"]`)) {
    node.classList.toggle("active", active);
  }
}

// ------------------------------------------------------------------------------------------ heatmap

function drawHeatmap() {
  const canvas = $("heatmap");
  for (const button of document.querySelectorAll(".card .heat")) {
    const pressed = button.closest(".card").dataset.prototype === String(state.heatmapOf);
    button.setAttribute("aria-pressed", String(pressed));
    button.textContent = pressed ? "Hide heatmap" : "Show heatmap";
  }
  const evidence = state.response && state.heatmapOf != null
    ? state.response.explanations[0].data.top_prototypes.find((e) => e.prototype_id === state.heatmapOf) : null;
  if (!evidence || !evidence.heatmap) {
    canvas.hidden = true;
    return;
  }
  const grey = new Image();
  grey.onload = () => {
    // The map is at the model's input size; the model stretched the image to it, so stretching the
    // map back over the image lines them up.
    canvas.width = grey.naturalWidth;
    canvas.height = grey.naturalHeight;
    const ctx = canvas.getContext("2d");
    ctx.drawImage(grey, 0, 0);
    const pixels = ctx.getImageData(0, 0, canvas.width, canvas.height);
    for (let i = 0; i < pixels.data.length; i += 4) {
      const [r, g, b] = heatColour(pixels.data[i] / 255);
      pixels.data[i] = r;
      pixels.data[i + 1] = g;
      pixels.data[i + 2] = b;
      pixels.data[i + 3] = 255;
    }
    ctx.putImageData(pixels, 0, 0);
    canvas.hidden = false;
  };
  grey.src = `data:image/png;base64,${evidence.heatmap}`;
}

// A blue-to-red ramp: low similarity cold, high similarity hot.
function heatColour(t) {
  const stops = [[0, [30, 40, 160]], [0.35, [40, 180, 220]], [0.6, [250, 230, 60]], [1, [220, 30, 30]]];
  for (let i = 1; i < stops.length; i++) {
    const [t1, c1] = stops[i];
    const [t0, c0] = stops[i - 1];
    if (t <= t1) {
      const u = (t - t0) / (t1 - t0);
      return c0.map((c, k) => Math.round(c + u * (c1[k] - c)));
    }
  }
  return stops[stops.length - 1][1];
}

// ------------------------------------------------------------------------------------------ input

function useFile(file) {
  if (!file) return;
  state.file = file;
  if (state.imageUrl) URL.revokeObjectURL(state.imageUrl);
  state.imageUrl = URL.createObjectURL(file);
  $("target").value = "";
  explain();
}

function setUpInput() {
  const drop = $("drop");
  $("file").addEventListener("change", (event) => useFile(event.target.files[0]));
  for (const type of ["dragenter", "dragover"]) {
    drop.addEventListener(type, (event) => {
      event.preventDefault();
      drop.classList.add("dragging");
    });
  }
  for (const type of ["dragleave", "drop"]) {
    drop.addEventListener(type, () => drop.classList.remove("dragging"));
  }
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    useFile(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const item = [...(event.clipboardData ? event.clipboardData.files : [])][0];
    if (item) useFile(item);
  });
  $("target").addEventListener("change", explain);
  $("n-prototypes").addEventListener("change", explain);
  $("regions").addEventListener("change", () => { explain(); renderBank(); });
  $("upload").addEventListener("submit", (event) => event.preventDefault());
}

// ------------------------------------------------------------------------------------------ prototype bank

function renderBank() {
  const m = state.metadata;
  const bank = $("bank");
  if (!m) return;
  const wanted = $("bank-class").value;
  // a bundle whose run predates this version of the evidence rule has ProtoPNet's only
  const evidence = $("regions").value === "evidence" && m.prototypes.some((p) => p.evidence_patch_url);
  $("bank-rule").textContent = evidence ? "the input each similarity depends on"
                                        : "where each similarity map peaks";
  bank.replaceChildren();
  m.classes.forEach((label, index) => {
    if (wanted !== "" && Number(wanted) !== index) return;
    const own = m.prototypes.filter((p) => p.class_index === index);
    const section = el("section", { class: "bank-class", "data-class": String(index) },
      el("h3", { text: `${label}: ${own.length} prototype${own.length === 1 ? "" : "s"}` }));
    const grid = el("ul", { class: "bank-grid" });
    for (const p of own) {
      const source = p.source || {};
      const [patch, context] = evidence && p.evidence_patch_url ? [p.evidence_patch_url, p.evidence_context_url]
                                                                : [p.patch_url, p.context_url];
      grid.append(el("li", { "data-prototype-bank": String(p.id) },
        el("div", { class: "imgs" },
          el("img", { src: patch, alt: `Prototype ${p.id} of class ${label}`, loading: "lazy" }),
          el("img", { src: context, alt: `Training image ${source.index} with prototype ${p.id}'s patch boxed`,
                      loading: "lazy" })),
        el("p", { text: `#${p.id} \u00b7 weight ${fmt(p.weight, 2)} \u00b7 training image ${source.index}` })));
    }
    section.append(own.length ? grid : el("p", { class: "muted", text: "No prototype has this class." }));
    bank.append(section);
  });
}

// ------------------------------------------------------------------------------------------ start

setUpTabs();
setUpInput();
$("bank-class").addEventListener("change", renderBank);
loadMetadata().catch((error) => showError(`Could not read the model's metadata: ${error.message}`));
