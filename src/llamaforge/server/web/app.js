// llamaforge chat page: keeps the conversation in memory, streams answers from /v1/chat/completions (SSE).
"use strict";
const $ = (id) => document.getElementById(id);
const conversation = [];          // [{role, content}] without the system prompt
let controller = null;            // AbortController of the answer being streamed
let modelId = null;

function addMessage(role, text) {
  const div = document.createElement("div");
  div.className = "msg " + role;
  div.textContent = text;         // textContent: model output is never parsed as HTML
  $("messages").appendChild(div);
  $("messages").scrollTop = $("messages").scrollHeight;
  return div;
}

function headers() {
  const h = { "Content-Type": "application/json" };
  const key = $("api-key").value.trim();
  if (key) h["Authorization"] = "Bearer " + key;
  return h;
}

function setBusy(busy) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
}

async function loadModel() {
  try {
    const r = await fetch("/health");
    const j = await r.json();
    modelId = j.model;
    $("model").textContent = j.model;
  } catch (e) {
    $("model").textContent = "server unreachable";
  }
}

// Parse "data: ..." lines of an SSE stream, calling onData for each JSON payload.
async function readSSE(response, onData) {
  const reader = response.body.getReader();
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
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        onData(JSON.parse(data));
      }
    }
  }
}

async function send(text) {
  conversation.push({ role: "user", content: text });
  addMessage("user", text);
  const bubble = addMessage("assistant", "");
  bubble.classList.add("streaming");
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  messages.push(...conversation);
  controller = new AbortController();
  setBusy(true);
  $("status").textContent = "";
  let answer = "";
  let finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST",
      headers: headers(),
      signal: controller.signal,
      body: JSON.stringify({
        model: modelId || undefined,
        messages,
        stream: true,
        temperature: parseFloat($("temperature").value),
        max_tokens: parseInt($("max-tokens").value, 10) || 256,
      }),
    });
    if (!response.ok) {
      const j = await response.json().catch(() => ({}));
      throw new Error((j.error && j.error.message) || response.statusText);
    }
    await readSSE(response, (chunk) => {
      if (chunk.error) throw new Error(chunk.error.message);
      const choice = chunk.choices && chunk.choices[0];
      if (!choice) return;
      if (choice.delta && choice.delta.content) {
        answer += choice.delta.content;
        bubble.textContent = answer;
        $("messages").scrollTop = $("messages").scrollHeight;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    });
    $("status").textContent = finish ? "finish_reason: " + finish : "";
  } catch (e) {
    if (e.name === "AbortError") {
      $("status").textContent = "stopped";
    } else {
      addMessage("error", "Error: " + e.message);
    }
  } finally {
    bubble.classList.remove("streaming");
    if (answer) conversation.push({ role: "assistant", content: answer });
    else bubble.remove();
    controller = null;
    setBusy(false);
  }
}

$("composer").addEventListener("submit", (ev) => {
  ev.preventDefault();
  const text = $("input").value.trim();
  if (!text || controller) return;
  $("input").value = "";
  send(text);
});
$("input").addEventListener("keydown", (ev) => {
  if (ev.key === "Enter" && !ev.shiftKey) {
    ev.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => { if (controller) controller.abort(); });
$("clear").addEventListener("click", () => {
  if (controller) controller.abort();
  conversation.length = 0;
  $("messages").textContent = "";
  $("status").textContent = "";
});
$("temperature").addEventListener("input", () => { $("temperature-value").textContent = $("temperature").value; });
loadModel();
