// The chat page: lists the server's models, streams chat completions (Server-Sent Events) into the
// conversation, stops an answer on request, shows tokens/s and every error the server sends.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { history: [], controller: null };

function apiKey() {
  return $("api-key").value.trim();
}

function headers() {
  const h = { "Content-Type": "application/json" };
  if (apiKey()) h.Authorization = `Bearer ${apiKey()}`;
  return h;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

async function errorMessage(response) {
  const text = await response.text();
  try {
    const body = JSON.parse(text);
    const error = body.error;
    if (error) return typeof error === "string" ? error : error.message || JSON.stringify(error);
  } catch (e) {
    // not JSON: the text itself is the message
  }
  return text || `${response.status} ${response.statusText}`;
}

async function loadModels() {
  let response;
  try {
    response = await fetch("/v1/models", { headers: headers() });
  } catch (e) {
    showError(`Cannot reach the server: ${e.message}`);
    return;
  }
  if (response.status === 401) {
    $("api-key-field").hidden = false;
    showError("This server needs an API key: enter it above.");
    return;
  }
  if (!response.ok) {
    showError(await errorMessage(response));
    return;
  }
  const body = await response.json();
  const select = $("model");
  const current = select.value;
  select.replaceChildren(
    ...body.data.map((m) => {
      const option = document.createElement("option");
      option.value = option.textContent = m.id;
      return option;
    }),
  );
  if (current) select.value = current;
  state.models = Object.fromEntries(body.data.map((m) => [m.id, m]));
  showDefaults();
  showError("");
}

// The sampling fields start from the served model's defaults (its generation_config.json, its card's
// values, or gptserve's), which the server reports in the model's /v1/models entry.
const DEFAULT_FIELDS = {
  temperature: "temperature",
  top_p: "top-p",
  min_p: "min-p",
  repetition_penalty: "repetition-penalty",
};

function showDefaults() {
  const model = (state.models || {})[$("model").value];
  const defaults = model && model.sampling_defaults;
  if (!defaults) return;
  for (const [key, id] of Object.entries(DEFAULT_FIELDS)) {
    if (defaults[key] !== undefined) $(id).value = String(defaults[key]);
  }
  $("defaults-source").textContent = `Defaults from ${defaults.source}`;
}

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = `message ${role}`;
  div.textContent = text;
  $("messages").appendChild(div);
  div.scrollIntoView({ block: "end" });
  return div;
}

function number(id) {
  const value = $(id).value.trim();
  return value === "" ? undefined : Number(value);
}

function requestBody() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  const body = {
    model: $("model").value,
    messages: messages.concat(state.history),
    stream: true,
    stream_options: { include_usage: true },
    temperature: number("temperature"),
    top_p: number("top-p"),
    min_p: number("min-p"),
    repetition_penalty: number("repetition-penalty"),
    max_tokens: number("max-tokens"),
    seed: number("seed"),
  };
  for (const key of Object.keys(body)) if (body[key] === undefined) delete body[key];
  return body;
}

// The JSON events of an SSE response, until [DONE]; an event carrying an error throws it.
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        const event = JSON.parse(data);
        if (event.error) throw new Error(event.error.message || JSON.stringify(event.error));
        yield event;
      }
    }
  }
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

function rate(tokens, started, firstAt) {
  const seconds = (performance.now() - started) / 1000;
  const parts = [`${tokens} tokens`, `${(tokens / Math.max(seconds, 1e-3)).toFixed(1)} tokens/s`];
  if (firstAt !== null) parts.push(`first token after ${((firstAt - started) / 1000).toFixed(2)} s`);
  return parts.join(" · ");
}

async function send(text) {
  showError("");
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  const controller = (state.controller = new AbortController());
  setBusy(true);
  $("status").textContent = "generating…";
  const started = performance.now();
  let firstAt = null;
  let chunks = 0;
  let usage = null;
  let answer = "";
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      body: JSON.stringify(requestBody()),
      signal: controller.signal,
    });
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const event of events(response)) {
      if (event.usage) usage = event.usage;
      for (const choice of event.choices || []) {
        const piece = (choice.delta || {}).content;
        if (!piece) continue;
        if (firstAt === null) firstAt = performance.now();
        chunks += 1;
        answer += piece;
        bubble.textContent = answer;
        bubble.scrollIntoView({ block: "end" });
        $("status").textContent = rate(chunks, started, firstAt);
      }
    }
    const tokens = usage ? usage.completion_tokens : chunks;
    $("status").textContent = rate(tokens, started, firstAt);
  } catch (e) {
    if (controller.signal.aborted) {
      bubble.classList.add("stopped");
      $("status").textContent = `stopped · ${rate(chunks, started, firstAt)}`;
    } else {
      bubble.classList.add("failed");
      bubble.textContent = answer ? `${answer}\n\n${e.message}` : e.message;
      showError(e.message);
      $("status").textContent = "error";
      if (!answer) state.history.pop(); // the turn did not happen
    }
  } finally {
    if (answer) state.history.push({ role: "assistant", content: answer });
    state.controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (event) => {
  event.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.controller) return;
  $("prompt").value = "";
  send(text);
});

$("prompt").addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) {
    event.preventDefault();
    $("composer").requestSubmit();
  }
});

$("stop").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
});

$("reset").addEventListener("click", () => {
  if (state.controller) state.controller.abort();
  state.history = [];
  $("messages").replaceChildren();
  $("status").textContent = "";
  showError("");
});

$("api-key").addEventListener("change", loadModels);
$("model").addEventListener("change", showDefaults);

loadModels();
