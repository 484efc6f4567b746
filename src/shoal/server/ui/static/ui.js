// shoal's dashboard: the overview chart, the playground's streamed answers, a run's live
// progress. Every text from a prompt or an answer is set as text (textContent), never as HTML.
"use strict";

function csrf() {
  return document.querySelector("main").dataset.csrf;
}

function drawChart() {
  const box = document.querySelector("[data-chart=overview]");
  const source = document.getElementById("chart-data");
  if (!box || !source || typeof uPlot === "undefined") return;
  const d = JSON.parse(source.textContent);
  if (!d.x.length) {
    box.textContent = "No calls in this window.";
    return;
  }
  const opts = {
    width: Math.max(280, box.clientWidth),
    height: 240,
    scales: {
      // Half a bucket either side: a single bucket is drawn one bucket wide, not over years.
      x: { time: true, auto: false, range: [d.x[0] - d.span / 2, d.x[d.x.length - 1] + d.span / 2] },
      ms: {},
    },
    series: [
      {},
      { label: "requests", stroke: "#2563eb", width: 2 },
      { label: "errors", stroke: "#dc2626" },
      { label: "p50 ms", stroke: "#059669", scale: "ms" },
      { label: "p95 ms", stroke: "#d97706", scale: "ms" },
      { label: "first token p50 ms", stroke: "#7c3aed", scale: "ms", dash: [4, 4] },
      { label: "first token p95 ms", stroke: "#db2777", scale: "ms", dash: [4, 4] },
    ],
    axes: [{}, { label: "requests" }, { side: 1, scale: "ms", label: "ms", grid: { show: false } }],
  };
  new uPlot(opts, [d.x, d.calls, d.errors, d.p50, d.p95, d.ttft_p50, d.ttft_p95], box);
}

// A calibrated route: quality against cost (a share of the best model's cost) on held-out
// queries, for each setting of the route, the setting chosen, and each model alone.
function drawRouteCharts() {
  if (typeof uPlot === "undefined") return;
  for (const box of document.querySelectorAll("[data-chart=route]")) {
    const d = JSON.parse(document.getElementById(box.dataset.source).textContent);
    const dots = (size) => ({ paths: () => null, points: { show: true, size: size } });
    const opts = {
      width: Math.max(280, box.clientWidth),
      height: 240,
      scales: { x: { time: false } },
      series: [
        { label: "cost (share of the best model's)", value: (u, v) => v == null ? "-" : Math.round(v * 100) + "%" },
        { label: "route", stroke: "#2563eb", width: 2, spanGaps: true },
        Object.assign({ label: "chosen", stroke: "#dc2626", fill: "#dc2626" }, dots(10)),
        Object.assign({ label: "model alone", stroke: "#6b7280", fill: "#6b7280" }, dots(7)),
      ],
      axes: [
        { label: "cost", values: (u, ticks) => ticks.map((v) => Math.round(v * 100) + "%") },
        { label: "quality" },
      ],
    };
    new uPlot(opts, [d.x, d.curve, d.chosen, d.models], box);
  }
}

function money(usd) {
  return usd < 0.01 ? "$" + usd.toFixed(6) : "$" + usd.toFixed(4);
}

async function streamAnswer(card, body) {
  const text = card.querySelector(".text");
  const line = card.querySelector(".figures-line");
  card.classList.add("streaming");
  let response;
  try {
    response = await fetch("/ui/playground/answer", {
      method: "POST",
      headers: { "content-type": "application/json", "x-csrf-token": csrf() },
      body: JSON.stringify(body),
      credentials: "same-origin",
    });
  } catch (err) {
    line.textContent = "error: " + err;
    return;
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try {
      message = (await response.json()).error.message;
    } catch (_) {}
    line.textContent = "error: " + message;
    card.classList.remove("streaming");
    card.classList.add("failed");
    return;
  }
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      if (!event.startsWith("data: ")) continue;
      const data = JSON.parse(event.slice(6));
      if (data.delta) text.append(document.createTextNode(data.delta));
      if (data.error) {
        line.textContent = "error: " + data.error;
        card.classList.add("failed");
      }
      if (data.done) {
        const r = data.done;
        line.textContent =
          r.model + " · " + money(r.cost_usd) + " · " + Math.round(r.latency_s * 1000) + " ms" +
          (r.ttft_s != null ? " (first token " + Math.round(r.ttft_s * 1000) + " ms)" : "") +
          " · " + r.input_tokens + " in / " + r.output_tokens + " out";
        card.querySelector(".decision pre").textContent = r.decision
          ? JSON.stringify(r.decision, null, 2)
          : "a direct model call: no route decided";
        card.classList.add("done");
      }
    }
  }
  card.classList.remove("streaming");
}

function playground() {
  const form = document.getElementById("playground");
  if (!form) return;
  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const data = new FormData(form);
    const answers = document.getElementById("answers");
    const template = document.getElementById("answer-template");
    answers.replaceChildren();
    const targets = data.getAll("target").filter((t) => t);
    const recorded = document.getElementById("history");
    const history = recorded ? JSON.parse(recorded.textContent) : [];
    answers.dataset.count = targets.length;
    for (const target of targets) {
      const card = template.content.firstElementChild.cloneNode(true);
      card.dataset.target = target;
      card.querySelector(".target").textContent = target;
      card.querySelector(".prompt").textContent = data.get("prompt");
      answers.append(card);
      streamAnswer(card, {
        target: target,
        prompt: data.get("prompt"),
        history: history,
        temperature: Number(data.get("temperature") || 0),
        max_tokens: Number(data.get("max_tokens") || 64),
        json_schema: data.get("json_schema") || "",
      });
    }
  });
}

function liveRun() {
  const box = document.getElementById("live");
  if (!box) return;
  const list = box.querySelector(".events");
  const source = new EventSource(box.dataset.events);
  source.onmessage = (message) => {
    const event = JSON.parse(message.data);
    const item = document.createElement("li");
    item.textContent = event.kind + (event.step ? " " + event.step : "") +
      (event.items ? " (" + event.items + ")" : "");
    list.append(item);
    if (event.kind === "run_done") {
      source.close();
      const status = document.getElementById("run-status");
      status.textContent = event.result ? event.result.status : "done";
      box.dataset.done = "true";
      setTimeout(() => window.location.reload(), 300);
    }
  };
}

document.addEventListener("DOMContentLoaded", () => {
  drawChart();
  drawRouteCharts();
  playground();
  liveRun();
});
