// The playground: chat and raw completions streamed over SSE (fetch + ReadableStream), sampling
// controls, a per-token probability view and per-response figures.
import { ApiError, apiFetch, bindKeyField, describeError, errorFromResponse } from "./common.js";

const $ = (id) => document.getElementById(id);
const ui = {
  model: $("model"), key: $("api-key"), system: $("system"), systemBlock: $("system-block"),
  transcript: $("transcript"), error: $("error"), composer: $("composer"), prompt: $("prompt"),
  promptLabel: $("prompt-label"), send: $("send"), stop: $("stop"), regenerate: $("regenerate"),
  clear: $("clear"), tooltip: $("tooltip"),
};

const state = {
  history: [],          // chat turns: {role, content}
  lastPrompt: null,     // completion mode: the last prompt sent
  controller: null,     // AbortController of the running request
  features: {},
};

function mode() {
  return document.querySelector('input[name="mode"]:checked').value;
}

// ---- request body from the controls ----------------------------------------------------------

function numberField(id, parse) {
  const raw = $(id).value.trim();
  if (raw === "") return undefined;
  const value = parse(raw);
  if (Number.isNaN(value)) throw new Error(`${id.replace("_", " ")} must be a number`);
  return value;
}

function samplingParams() {
  const params = {
    temperature: numberField("temperature", parseFloat),
    top_p: numberField("top_p", parseFloat),
    top_k: numberField("top_k", (v) => parseInt(v, 10)),
    min_p: numberField("min_p", parseFloat),
    max_tokens: numberField("max_tokens", (v) => parseInt(v, 10)),
    seed: numberField("seed", (v) => parseInt(v, 10)),
    repetition_penalty: numberField("repetition_penalty", parseFloat),
  };
  const stops = $("stop_strings").value.split("\n").filter((s) => s.length > 0);
  if (stops.length) params.stop = stops;
  if ($("ignore_eos").checked) params.ignore_eos = true;
  if (ui.model.value) params.model = ui.model.value;
  for (const k of Object.keys(params)) if (params[k] === undefined) delete params[k];
  return params;
}

function topLogprobs() {
  if (!$("logprobs").checked) return null;
  const n = parseInt($("top_logprobs").value, 10);
  return Number.isNaN(n) ? 0 : Math.max(0, Math.min(20, n));
}

// EXTENSION POINT: JSON-schema output (only when the server advertises it).
function responseFormat() {
  if (!state.features.json_schema || !$("json-schema-on").checked) return undefined;
  let schema;
  try {
    schema = JSON.parse($("json-schema").value);
  } catch (err) {
    throw new Error(`the JSON schema is not valid JSON: ${err.message}`);
  }
  return { type: "json_schema", json_schema: { name: "output", schema, strict: true } };
}

function chatBody() {
  const messages = [];
  const system = ui.system.value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...state.history);
  const body = { ...samplingParams(), messages, stream: true,
                 stream_options: { include_usage: true } };
  const top = topLogprobs();
  if (top !== null) Object.assign(body, { logprobs: true, top_logprobs: top });
  const format = responseFormat();
  if (format) body.response_format = format;
  return body;
}

function completionBody(prompt) {
  const body = { ...samplingParams(), prompt, stream: true,
                 stream_options: { include_usage: true } };
  const top = topLogprobs();
  if (top !== null) body.logprobs = top;
  return body;
}

// ---- rendering -------------------------------------------------------------------------------

function probClass(p) {
  if (p >= 0.9) return "p5";
  if (p >= 0.7) return "p4";
  if (p >= 0.4) return "p3";
  if (p >= 0.15) return "p2";
  return "p1";
}

function addMessage(role, text) {
  const msg = document.createElement("article");
  msg.className = `msg ${role}`;
  const who = document.createElement("h2");
  who.textContent = { user: "You", assistant: "Assistant", prompt: "Prompt",
                      completion: "Completion" }[role];
  const body = document.createElement("div");
  body.className = "body";
  if (text) body.textContent = text;
  const figures = document.createElement("p");
  figures.className = "figures";
  msg.append(who, body, figures);
  ui.transcript.append(msg);
  ui.transcript.scrollTop = ui.transcript.scrollHeight;
  return { msg, body, figures };
}

// One token (or a piece of text without logprobs) appended to a response.
function appendPiece(view, text, info) {
  if (!text) return;
  if (!info) {
    view.body.append(document.createTextNode(text));
    return;
  }
  const span = document.createElement("span");
  span.className = `tok ${probClass(Math.exp(info.logprob))}`;
  span.textContent = text;
  span.tokenInfo = info;
  view.body.append(span);
}

function showTooltip(span) {
  const info = span.tokenInfo;
  const tip = ui.tooltip;
  tip.replaceChildren();
  const head = document.createElement("div");
  head.className = "tip-head";
  head.textContent = `${JSON.stringify(info.token)}  ${(100 * Math.exp(info.logprob)).toFixed(1)}%`;
  tip.append(head);
  if (info.top && info.top.length) {
    const table = document.createElement("table");
    for (const alt of info.top) {
      const row = table.insertRow();
      row.insertCell().textContent = JSON.stringify(alt.token);
      row.insertCell().textContent = `${(100 * Math.exp(alt.logprob)).toFixed(1)}%`;
      if (alt.token === info.token) row.className = "chosen";
    }
    tip.append(table);
  }
  tip.hidden = false;
  const rect = span.getBoundingClientRect();
  const left = Math.min(rect.left, window.innerWidth - tip.offsetWidth - 8);
  tip.style.left = `${Math.max(4, left + window.scrollX)}px`;
  tip.style.top = `${rect.bottom + window.scrollY + 4}px`;
}

ui.transcript.addEventListener("mouseover", (ev) => {
  const span = ev.target.closest && ev.target.closest(".tok");
  if (span && span.tokenInfo) showTooltip(span);
});
ui.transcript.addEventListener("mouseout", (ev) => {
  if (ev.target.closest && ev.target.closest(".tok")) ui.tooltip.hidden = true;
});

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

function setBusy(busy) {
  ui.send.disabled = busy;
  ui.stop.disabled = !busy;
  ui.regenerate.disabled = busy || !canRegenerate();
  ui.clear.disabled = busy;
}

function canRegenerate() {
  if (mode() === "completion") return state.lastPrompt !== null;
  return state.history.some((m) => m.role === "user");
}

// ---- streaming -------------------------------------------------------------------------------

// Yields the JSON payload of each `data:` event of an SSE response until [DONE].
async function* sseEvents(resp) {
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      const data = event.split("\n").filter((l) => l.startsWith("data:"))
        .map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// The token pieces of one chunk: [{text, info}] (info null without logprobs).
function chatPieces(choice) {
  const text = (choice.delta && choice.delta.content) || "";
  const entries = (choice.logprobs && choice.logprobs.content) || [];
  const infos = entries.map((e) => ({ token: e.token, logprob: e.logprob, top: e.top_logprobs }));
  return splitPieces(text, infos);
}

function completionPieces(choice) {
  const lp = choice.logprobs;
  const infos = [];
  if (lp && lp.tokens) {
    lp.tokens.forEach((token, i) => {
      const top = Object.entries((lp.top_logprobs && lp.top_logprobs[i]) || {})
        .map(([t, l]) => ({ token: t, logprob: l })).sort((a, b) => b.logprob - a.logprob);
      infos.push({ token, logprob: lp.token_logprobs[i], top });
    });
  }
  return splitPieces(choice.text || "", infos);
}

// NOTE: the streamed text is the exact detokenized output; token strings may split characters
// or include trimmed stop text, so they are only used as labels when they add up to the text.
function splitPieces(text, infos) {
  if (infos.length === 0) return text ? [{ text, info: null, count: 0 }] : [];
  if (infos.length === 1) return [{ text, info: infos[0], count: 1 }];
  if (infos.map((i) => i.token).join("") === text) {
    return infos.map((info) => ({ text: info.token, info, count: 1 }));
  }
  return [{ text, info: infos[infos.length - 1], count: infos.length }];
}

async function run(path, body, view, pieces) {
  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  showError("");
  const started = performance.now();
  const fig = { first: null, last: null, tokens: 0, usage: null, finish: null };
  let text = "";
  let outcome = "done";
  try {
    const resp = await apiFetch(path, {
      method: "POST", body: JSON.stringify(body), signal: controller.signal,
      headers: { "Content-Type": "application/json" },
    });
    if (!resp.ok) throw await errorFromResponse(resp);
    view.msg.classList.add("streaming");
    for await (const chunk of sseEvents(resp)) {
      if (chunk.error) throw new ApiError(500, `stream failed: ${chunk.error.message}`);
      if (chunk.usage) fig.usage = chunk.usage;
      for (const choice of chunk.choices || []) {
        for (const piece of pieces(choice)) {
          if (fig.first === null) fig.first = performance.now();
          fig.last = performance.now();
          fig.tokens += piece.count;
          text += piece.text;
          appendPiece(view, piece.text, piece.info);
        }
        if (choice.finish_reason) fig.finish = choice.finish_reason;
      }
      ui.transcript.scrollTop = ui.transcript.scrollHeight;
    }
  } catch (err) {
    if (err.name === "AbortError") {
      outcome = "stopped";
    } else {
      outcome = "error";
      showError(describeError(err));
      if (err instanceof ApiError && err.status === 401) ui.key.focus();
    }
  } finally {
    state.controller = null;
    view.msg.classList.remove("streaming");
    view.figures.textContent = figuresText(fig, started, outcome);
    setBusy(false);
  }
  return { text, outcome };
}

function figuresText(fig, started, outcome) {
  const parts = [];
  if (fig.first !== null) parts.push(`TTFT ${Math.round(fig.first - started)} ms`);
  const completion = fig.usage ? fig.usage.completion_tokens : fig.tokens;
  const seconds = fig.first !== null ? (fig.last - fig.first) / 1000 : 0;
  if (completion > 1 && seconds > 0) {
    parts.push(`${((completion - 1) / seconds).toFixed(1)} tokens/s`);
  }
  if (fig.usage) {
    const cached = fig.usage.prompt_tokens_details
      ? fig.usage.prompt_tokens_details.cached_tokens : 0;
    parts.push(`${fig.usage.prompt_tokens} prompt tokens${cached ? ` (${cached} cached)` : ""}`);
  }
  if (fig.first !== null || fig.usage) parts.push(`${completion} completion tokens`);
  if (fig.finish) parts.push(`finish: ${fig.finish}`);
  if (outcome === "stopped") parts.push("stopped");
  if (outcome === "error") parts.push("failed");
  return parts.join(" · ");
}

// ---- actions ---------------------------------------------------------------------------------

async function sendChat() {
  let body;
  try {
    body = chatBody();
  } catch (err) {
    showError(err.message);
    return;
  }
  const view = addMessage("assistant", "");
  const { text, outcome } = await run("/v1/chat/completions", body, view, chatPieces);
  if (outcome !== "error" && text) state.history.push({ role: "assistant", content: text });
  if (outcome === "error" && !text) view.msg.remove();
  setBusy(false);
}

async function sendCompletion(prompt) {
  let body;
  try {
    body = completionBody(prompt);
  } catch (err) {
    showError(err.message);
    return;
  }
  state.lastPrompt = prompt;
  ui.transcript.replaceChildren();
  addMessage("prompt", prompt);
  const view = addMessage("completion", "");
  const { text, outcome } = await run("/v1/completions", body, view, completionPieces);
  if (outcome === "error" && !text) view.msg.remove();
}

function submit() {
  if (state.controller) return;
  const text = ui.prompt.value;
  if (mode() === "completion") {
    if (!text) return;
    sendCompletion(text);
    return;
  }
  if (!text.trim()) return;
  state.history.push({ role: "user", content: text });
  addMessage("user", text);
  ui.prompt.value = "";
  sendChat();
}

function regenerate() {
  if (state.controller) return;
  if (mode() === "completion") {
    if (state.lastPrompt !== null) sendCompletion(state.lastPrompt);
    return;
  }
  const last = state.history[state.history.length - 1];
  if (last && last.role === "assistant") {
    state.history.pop();
    const views = ui.transcript.querySelectorAll(".msg.assistant");
    if (views.length) views[views.length - 1].remove();
  } else {
    const stale = ui.transcript.lastElementChild;  // a stopped or failed answer
    if (stale && stale.classList.contains("assistant")) stale.remove();
  }
  if (state.history.length) sendChat();
}

function stop() {
  if (state.controller) state.controller.abort();
}

function clearAll() {
  stop();
  state.history = [];
  state.lastPrompt = null;
  ui.transcript.replaceChildren();
  showError("");
  setBusy(false);
  ui.prompt.focus();
}

function applyMode() {
  const chat = mode() === "chat";
  ui.systemBlock.hidden = !chat;
  ui.promptLabel.textContent = chat ? "Message" : "Prompt";
  clearAll();
}

// ---- server discovery --------------------------------------------------------------------------

async function loadModels() {
  try {
    const resp = await apiFetch("/v1/models");
    if (!resp.ok) throw await errorFromResponse(resp);
    const { data } = await resp.json();
    const current = ui.model.value;
    ui.model.replaceChildren(...data.map((m) => new Option(m.id, m.id)));
    if (data.some((m) => m.id === current)) ui.model.value = current;
    ui.model.disabled = data.length < 2;
    showError("");
  } catch (err) {
    showError(describeError(err));
  }
}

async function loadFeatures() {
  try {
    const resp = await apiFetch("/stats");
    if (!resp.ok) return;  // without access the optional controls stay hidden
    state.features = (await resp.json()).features || {};
  } catch {
    state.features = {};
  }
  $("json-schema-controls").hidden = !state.features.json_schema;
  $("spec-controls").hidden = !state.features.speculative;
  if (state.features.speculative) {
    $("spec-info").textContent = `This server drafts ${state.features.num_speculative_tokens} `
      + `tokens per step with ${state.features.speculative_method}; the output is unchanged.`;
  }
}

function refreshServer() {
  loadModels();
  loadFeatures();
}

ui.composer.addEventListener("submit", (ev) => {
  ev.preventDefault();
  submit();
});
ui.prompt.addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey && !ev.isComposing) {
    ev.preventDefault();
    submit();
  }
});
document.addEventListener("keydown", (ev) => {
  if (ev.key === "Escape") {
    ui.tooltip.hidden = true;
    stop();
  }
});
ui.stop.addEventListener("click", stop);
ui.regenerate.addEventListener("click", regenerate);
ui.clear.addEventListener("click", clearAll);
for (const radio of document.querySelectorAll('input[name="mode"]')) {
  radio.addEventListener("change", applyMode);
}
bindKeyField(ui.key, refreshServer);
refreshServer();
ui.prompt.focus();
