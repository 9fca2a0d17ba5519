// The GLM-Image playground: a client of the public API, nothing more.
//
// On load it reads GET /playground/limits to build the size controls. "Generate" sends
// POST /v1/images/generations (JSON), or /v1/images/edits (multipart) when condition images
// are attached, with stream + stream_progress, and reads the server-sent events with
// fetch() + a stream reader: EventSource can only GET. An API key, when the server needs one, is
// sent as "Authorization: Bearer KEY" and kept in sessionStorage: this tab only, gone when it closes.
//
// Seeds go up to 2^63 - 1, beyond what a JavaScript number holds exactly (2^53): they are kept as
// strings of digits from the seed field to the request body and from the response back to the page
// (parseJson), never as numbers, so a seed shown or reused is the seed the server used.
"use strict";

const $ = (id) => document.getElementById(id);
let limits = null;
let conditionFiles = []; // [{file, url}] in upload order: the first one decides size "auto"
let inFlight = null; // the AbortController of the running request
let blobUrls = []; // object URLs of the shown results, revoked when they are cleared
const API_KEY_STORE = "glm-image-playground.api-key";

// ---------------------------------------------------------------- set-up

document.addEventListener("DOMContentLoaded", async () => {
  setUpApiKey(); // first: the page is usable for the key even if the limits cannot be read
  try {
    const response = await fetch("/playground/limits");
    if (!response.ok) throw new Error(await errorText(response));
    limits = await response.json();
  } catch (err) {
    showError(`cannot read the server's limits: ${err.message}`);
    return;
  }
  setUpControls();
  $("form").addEventListener("submit", (event) => { event.preventDefault(); generate(); });
  $("stop").addEventListener("click", () => inFlight && inFlight.abort());
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && (event.ctrlKey || event.metaKey)) $("form").requestSubmit();
  });
});

function setUpControls() {
  $("server-info").textContent =
    `${limits.models.join(", ") || "no model"} · sides ${limits.min_side}–${limits.max_side}, ` +
    `multiples of ${limits.size_multiple}, aspect ratio ≤ ${limits.max_aspect_ratio}:1`;
  for (const id of ["width", "height"]) {
    Object.assign($(id), { min: limits.min_side, max: limits.max_side, step: limits.size_multiple });
    $(id).addEventListener("input", matchPreset);
  }
  const preset = $("preset");
  for (const size of limits.presets) preset.add(new Option(size.replace("x", " × "), size));
  preset.add(new Option("custom (width × height below)", "custom"));
  // "auto" is the edits endpoint's default: the first condition image's size, made valid.
  preset.add(new Option("auto (first condition image's size)", "auto"));
  preset.addEventListener("change", applyPreset);
  preset.value = limits.default_size;
  applyPreset();

  Object.assign($("steps"), { max: limits.max_inference_steps, value: limits.num_inference_steps });
  Object.assign($("guidance"), { max: limits.max_guidance_scale, value: limits.guidance_scale });
  $("seed").placeholder = `server default (${limits.seed})`;
  $("n").max = limits.max_n;
  setUpDropZone();
}

function setUpApiKey() {
  const input = $("api-key");
  try {
    input.value = sessionStorage.getItem(API_KEY_STORE) || "";
  } catch (_) { /* storage disabled: the key lives in the field only */ }
  input.addEventListener("input", () => {
    try {
      if (input.value) sessionStorage.setItem(API_KEY_STORE, input.value);
      else sessionStorage.removeItem(API_KEY_STORE);
    } catch (_) { /* storage disabled */ }
  });
}

// The Authorization header of the typed key; none when the field is empty.
function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

function applyPreset() {
  const value = $("preset").value;
  if (/^\d+x\d+$/.test(value)) [$("width").value, $("height").value] = value.split("x");
  const auto = value === "auto";
  $("width").disabled = $("height").disabled = auto;
}

function matchPreset() {
  // Typing a size that is a preset selects it; anything else is "custom".
  const size = `${$("width").value}x${$("height").value}`;
  $("preset").value = limits.presets.includes(size) ? size : "custom";
}

// ---------------------------------------------------------------- condition images

function setUpDropZone() {
  const zone = $("drop");
  if (limits.max_condition_images === 0) {
    zone.closest("fieldset").hidden = true; // image-to-image is off on this server
    return;
  }
  zone.addEventListener("dragover", (event) => { event.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("over");
    addFiles(event.dataTransfer.files);
  });
  $("files").addEventListener("change", () => { addFiles($("files").files); $("files").value = ""; });
  updateThumbs();
}

function addFiles(files) {
  for (const file of files) {
    if (!file.type.startsWith("image/")) continue;
    if (conditionFiles.length >= limits.max_condition_images) {
      showError(`at most ${limits.max_condition_images} condition images are accepted`);
      break;
    }
    conditionFiles.push({ file, url: URL.createObjectURL(file) });
  }
  updateThumbs();
}

function updateThumbs() {
  const thumbs = $("thumbs");
  thumbs.replaceChildren(...conditionFiles.map((entry, i) => {
    const figure = document.createElement("figure");
    const img = Object.assign(document.createElement("img"), { src: entry.url, alt: entry.file.name, title: entry.file.name });
    const remove = Object.assign(document.createElement("button"), { type: "button", textContent: "×", title: "remove" });
    remove.addEventListener("click", () => {
      URL.revokeObjectURL(entry.url);
      conditionFiles.splice(i, 1);
      updateThumbs();
    });
    figure.append(img, remove);
    return figure;
  }));
  const autoOption = $("preset").querySelector('option[value="auto"]');
  autoOption.disabled = conditionFiles.length === 0;
  if (autoOption.disabled && $("preset").value === "auto") {
    $("preset").value = limits.default_size;
    applyPreset();
  }
}

// ---------------------------------------------------------------- the request

// Why `width x height` is not a valid size, mirroring the server's rules; null when it is.
function sizeProblem(width, height) {
  const m = limits.size_multiple;
  if (!Number.isInteger(width) || !Number.isInteger(height)) return "width and height must be whole numbers";
  if (width % m || height % m) return `both sides must be multiples of ${m}`;
  if ([width, height].some((side) => side < limits.min_side || side > limits.max_side))
    return `each side must be between ${limits.min_side} and ${limits.max_side}`;
  if (Math.max(width, height) / Math.min(width, height) > limits.max_aspect_ratio)
    return `the aspect ratio must be at most ${limits.max_aspect_ratio}:1`;
  return null;
}

// The size to send. The custom text goes as typed: the server's answer is the authority.
function chosenSize() {
  const custom = $("custom-size").value.trim();
  if (custom) return custom;
  if ($("preset").value === "auto") return "auto";
  const width = Number($("width").value), height = Number($("height").value);
  const problem = sizeProblem(width, height);
  if (problem) throw new Error(`size ${width}x${height} is not valid: ${problem}`);
  return `${width}x${height}`;
}

// Fields shared by both endpoints; empty inputs are left out so the server's defaults apply.
function requestFields() {
  const fields = {
    prompt: $("prompt").value,
    size: chosenSize(),
    n: Number($("n").value || 1),
    num_inference_steps: $("steps").value,
    guidance_scale: $("guidance").value,
    seed: $("seed").value,
    partial_images: Number($("partials").value),
    stream: true,
    stream_progress: true,
  };
  for (const key of ["num_inference_steps", "guidance_scale"]) {
    if (fields[key] === "") delete fields[key];
    else fields[key] = Number(fields[key]);
  }
  const seed = fields.seed.trim();
  if (seed === "") delete fields.seed;
  else if (/^[0-9]+$/.test(seed)) fields.seed = BigInt(seed).toString(); // exact, without leading zeros
  else throw new Error(`seed ${seed} is not valid: a seed is a whole number, 0 or more`);
  return fields;
}

// `fields` as JSON, the seed (a string of digits) written as the exact integer it is: JSON.stringify
// of a number would round it (9007199254740993 becomes 9007199254740992).
function requestJson(fields) {
  const { seed, ...rest } = fields;
  const json = JSON.stringify(rest);
  return seed === undefined ? json : `${json.slice(0, -1)},"seed":${seed}}`;
}

// JSON.parse, except that every "seed" and every item of "seeds" is a string of the exact digits
// the server wrote: JSON.parse alone reads numbers as doubles and rounds seeds above 2^53. The pattern
// matches whole string literals, so text inside a string (a prompt, base64) is never taken for a key.
const STRING_OR_SEED = /"[^"\\]*(?:\\.[^"\\]*)*"(?:(\s*:\s*)(\[[\s0-9,]*\]|[0-9]+))?/g;

function parseJson(text) {
  return JSON.parse(text.replace(STRING_OR_SEED, (match, colon, value) => {
    if (value === undefined) return match;
    const key = match.slice(0, match.length - colon.length - value.length);
    return key === '"seed"' || key === '"seeds"' ? key + colon + value.replace(/[0-9]+/g, '"$&"') : match;
  }));
}

function buildRequest(fields) {
  if (conditionFiles.length === 0) {
    return ["/v1/images/generations",
            { method: "POST", headers: { "Content-Type": "application/json", ...authHeaders() }, body: requestJson(fields) }];
  }
  const form = new FormData();
  for (const [key, value] of Object.entries(fields)) form.append(key, String(value));
  for (const { file } of conditionFiles) form.append("image[]", file, file.name);
  // The browser sets the multipart Content-Type (with its boundary).
  return ["/v1/images/edits", { method: "POST", headers: authHeaders(), body: form }];
}

async function generate() {
  hideError();
  let fields;
  try {
    fields = requestFields();
  } catch (err) {
    showError(err.message);
    return;
  }
  clearResults();
  let cards = []; // made once the server has accepted the request (and so its n)
  const [url, init] = buildRequest(fields);
  const controller = inFlight = new AbortController();
  setRunning(true);
  const started = performance.now();
  setStatus(`generating ${fields.n} image${fields.n > 1 ? "s" : ""}…`);
  try {
    const response = await fetch(url, { ...init, signal: controller.signal });
    if (!response.ok) throw new Error(await errorText(response));
    cards = Array.from({ length: fields.n }, (_, i) => makeCard(i));
    if ((response.headers.get("Content-Type") || "").startsWith("text/event-stream")) {
      await readEvents(response.body, (name, data) => handleEvent(cards, name, data));
    } else {
      showWholeResponse(cards, parseJson(await response.text())); // a server without streaming answers whole
    }
    const missing = cards.filter((card) => !card.done).length;
    if (missing) throw new Error(`the stream ended before ${missing} of the images arrived`);
    setStatus(`done in ${((performance.now() - started) / 1000).toFixed(1)} s`);
  } catch (err) {
    if (err.name === "AbortError") {
      setStatus("stopped");
    } else {
      setStatus("");
      showError(err.message);
    }
    cards.filter((card) => !card.done).forEach((card) => card.fail());
  } finally {
    controller.abort(); // after an error event, stop reading; after a full stream it changes nothing
    inFlight = null;
    setRunning(false);
  }
}

// The server's message from an error response ({"error": {"message"}}), else the status line.
async function errorText(response) {
  const text = await response.text();
  try {
    const message = JSON.parse(text).error.message;
    if (message) return `${response.status}: ${message}`;
  } catch (_) { /* not our JSON error shape: fall through */ }
  return `${response.status} ${response.statusText}${text ? `: ${text.slice(0, 300)}` : ""}`;
}

// ---------------------------------------------------------------- server-sent events

// Calls onEvent(name, data) for each `event: name` / `data: json` block of the stream.
async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  let carry = ""; // a "\r" at the end of a chunk may be the first half of "\r\n"
  let scanFrom = 0; // images make events megabytes long: never rescan what was scanned
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return; // an unterminated last block is dropped, as the SSE spec says
    let text = carry + value;
    carry = text.endsWith("\r") ? "\r" : "";
    if (carry) text = text.slice(0, -1);
    buffer += text.replace(/\r\n?/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n", scanFrom)) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      scanFrom = 0;
      const event = parseBlock(block);
      if (event) onEvent(event.name, event.data);
    }
    scanFrom = Math.max(0, buffer.length - 1);
  }
}

function parseBlock(block) {
  let name = "message";
  const data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue; // comments keep the connection alive
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    const value = colon < 0 ? "" : line.slice(colon + 1).replace(/^ /, "");
    if (field === "event") name = value;
    else if (field === "data") data.push(value);
  }
  return data.length ? { name, data: parseJson(data.join("\n")) } : null;
}

function handleEvent(cards, name, data) {
  if (name === "error") {
    const error = data.error || {};
    throw new Error(`${error.code || "error"}: ${error.message || "the server failed the request"}`);
  }
  // image_generation.* and image_edit.* carry the same events.
  const kind = name.slice(name.indexOf(".") + 1);
  const card = cards[data.image_index || 0];
  if (!card) return;
  if (kind === "progress") card.progress(data);
  else if (kind === "partial_image") card.partial(data);
  else if (kind === "completed") card.complete(data);
}

function showWholeResponse(cards, body) {
  body.data.forEach((item, i) => cards[i] && cards[i].complete({
    b64_json: item.b64_json, seed: item.seed, output_format: body.output_format,
    size: body.size, timings: (body.timings || [])[i],
  }));
}

// ---------------------------------------------------------------- result cards

function makeCard(index) {
  const node = $("card").content.firstElementChild.cloneNode(true);
  const q = (selector) => node.querySelector(selector);
  const [view, badge] = [q(".view img"), q(".view .badge")];
  q(".title").textContent = `Image ${index + 1}`;
  $("results").append(node);

  const units = { ar: "tokens", dit: "steps" };
  const totals = {}; // per stage, once the server has said it
  const setBar = (stage, done, total) => {
    const bar = q(`.bar-${stage}`);
    totals[stage] = total;
    bar.max = Math.max(total, 1);
    bar.value = Math.min(done, bar.max);
    q(`.count-${stage}`).textContent = `${done} / ${total} ${units[stage]}`;
  };
  // A finished stage shows full, also when its last progress event was skipped or never sent.
  const fillBar = (stage) => {
    if (stage in totals) setBar(stage, totals[stage], totals[stage]);
    else q(`.bar-${stage}`).value = q(`.bar-${stage}`).max;
  };
  const show = (data, partial) => {
    const url = imageUrl(data.b64_json, data.output_format);
    view.src = url;
    view.hidden = false;
    view.classList.toggle("is-partial", partial);
    view.classList.toggle("is-final", !partial);
    return url;
  };

  const card = {
    done: false,
    progress(data) {
      const note = q(".note");
      // `position` counts the images ahead of this one, in this request and others.
      if (data.stage === "queued") note.textContent = data.position ? `queued: ${data.position} image${data.position > 1 ? "s" : ""} ahead` : "queued";
      else if (data.stage === "retry") note.textContent = `retrying: ${data.reason || "a worker failed"}`;
      else note.textContent = "";
      if (data.stage === "ar") setBar("ar", data.done, data.total);
      if (data.stage === "dit") {
        fillBar("ar"); // the DiT starts after the AR has written every token
        setBar("dit", data.done, data.total);
      }
    },
    partial(data) {
      const url = show(data, true);
      badge.textContent = `partial preview ${data.partial_image_index + 1}`;
      badge.hidden = false;
      const thumb = Object.assign(document.createElement("img"), {
        src: url, className: "partial", alt: `partial preview ${data.partial_image_index + 1}`,
        title: `partial preview ${data.partial_image_index + 1}`,
      });
      q(".partials").append(thumb);
    },
    complete(data) {
      card.done = true;
      const url = show(data, false);
      badge.hidden = true;
      fillBar("ar");
      fillBar("dit");
      q(".note").textContent = "";
      const extension = data.output_format === "jpeg" ? "jpg" : data.output_format || "png";
      const seed = data.seed != null ? data.seed : index;
      Object.assign(q(".download"), { href: url, download: `glm-image-${data.size || ""}-seed${seed}.${extension}`, hidden: false });
      q(".title").textContent = `Image ${index + 1}${data.seed != null ? ` · seed ${data.seed}` : ""}`;
      if (data.seed != null) {
        // Back into the seed field as the exact digits (a string): Generate then makes this image again.
        Object.assign(q(".reuse-seed"), { hidden: false, title: `seed ${data.seed}` }).onclick = () => { $("seed").value = data.seed; };
      }
      view.alt = `generated image ${index + 1}`;
      if (data.timings) {
        q(".timings").textContent = Object.entries(data.timings)
          .map(([key, seconds]) => `${key.replace(/_s$/, "")} ${Number(seconds).toFixed(2)} s`).join(" · ");
      }
    },
    fail() {
      node.classList.add("failed");
      q(".note").textContent = "not generated";
    },
  };
  return card;
}

// A blob: URL rather than a data: URL: big images stay cheap to show and to download.
function imageUrl(b64, format) {
  const bytes = Uint8Array.from(atob(b64), (c) => c.charCodeAt(0));
  const url = URL.createObjectURL(new Blob([bytes], { type: `image/${format || "png"}` }));
  blobUrls.push(url);
  return url;
}

function clearResults() {
  blobUrls.forEach((url) => URL.revokeObjectURL(url));
  blobUrls = [];
  $("results").replaceChildren();
}

// ---------------------------------------------------------------- status and errors

function setRunning(running) {
  $("generate").disabled = running;
  $("stop").disabled = !running;
}

function setStatus(text) { $("status").textContent = text; }

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = false;
}

function hideError() { $("error").hidden = true; }
