// The live dashboard: polls GET /stats each second, derives rates and windowed percentiles by
// diffing snapshots (like Prometheus rate() and histogram_quantile()), draws canvas charts.
import { apiFetch, bindKeyField, describeError, errorFromResponse, formatNumber } from "./common.js";

const POLL_MS = 1000;
const WINDOW_S = 10;      // hit rate and percentiles
const HISTORY = 120;      // chart points (2 minutes)

const snapshots = [];     // recent /stats bodies, oldest first
const series = {};        // chart name -> {label -> [values]}
let timer = null;
let generation = 0;       // bumped when the key changes: older polls stop

const $ = (id) => document.getElementById(id);

// ---- maths -------------------------------------------------------------------------------------

// Quantile q of a cumulative histogram (bounds ascending; cum[i] = observations <= bounds[i]).
export function quantile(q, bounds, cum, count) {
  if (!(count > 0)) return null;
  const rank = q * count;
  let lowBound = 0;
  let lowCount = 0;
  for (let i = 0; i < bounds.length; i += 1) {
    if (cum[i] >= rank) {
      const inBucket = cum[i] - lowCount;
      const frac = inBucket > 0 ? (rank - lowCount) / inBucket : 0;
      return lowBound + (bounds[i] - lowBound) * frac;
    }
    lowBound = bounds[i];
    lowCount = cum[i];
  }
  return bounds.length ? bounds[bounds.length - 1] : null;  // in the +Inf bucket
}

function histDelta(now, then) {
  if (!then) return { ...now };
  return {
    count: now.count - then.count,
    bounds: now.bounds,
    buckets: now.buckets.map((v, i) => v - (then.buckets[i] || 0)),
  };
}

function percentiles(hist) {
  return [0.5, 0.9, 0.99].map((q) => quantile(q, hist.bounds, hist.buckets, hist.count));
}

function snapshotAgo(seconds) {
  const now = snapshots[snapshots.length - 1];
  for (let i = snapshots.length - 2; i >= 0; i -= 1) {
    if (now.time - snapshots[i].time >= seconds) return snapshots[i];
  }
  return snapshots.length > 1 ? snapshots[0] : null;
}

function finishedTotal(s) {
  return Object.values(s.finished || {}).reduce((a, b) => a + b, 0);
}

// Everything the tiles and charts show, from the latest snapshots.
function derive() {
  const now = snapshots[snapshots.length - 1];
  const prev = snapshots.length > 1 ? snapshots[snapshots.length - 2] : null;
  const windowStart = snapshotAgo(WINDOW_S);
  const dt = prev ? Math.max(1e-3, now.time - prev.time) : null;
  const rate = (key) => (prev ? Math.max(0, now[key] - prev[key]) / dt : null);

  const win = {
    ttft: histDelta(now.ttft, windowStart && windowStart.ttft),
    itl: histDelta(now.itl, windowStart && windowStart.itl),
    queries: now.prefix_cache_queries - (windowStart ? windowStart.prefix_cache_queries : 0),
    hits: now.prefix_cache_hits - (windowStart ? windowStart.prefix_cache_hits : 0),
  };
  // NOTE: with one snapshot there is no window yet: the values are all-time ones.
  const ttftWindowed = windowStart !== null && win.ttft.count > 0;
  const itlWindowed = windowStart !== null && win.itl.count > 0;
  const hitWindowed = windowStart !== null && win.queries > 0;
  const events = prev ? ["preemptions", "aborted", "errors", "engine_restarts"]
    .reduce((o, k) => ({ ...o, [k]: Math.max(0, now[k] - prev[k]) / dt }), {}) : {};
  return {
    now,
    promptTps: rate("prompt_tokens"),
    genTps: rate("generation_tokens"),
    ttft: { values: percentiles(ttftWindowed ? win.ttft : now.ttft), windowed: ttftWindowed },
    itl: { values: percentiles(itlWindowed ? win.itl : now.itl), windowed: itlWindowed },
    prefixHit: {
      value: hitWindowed ? win.hits / win.queries
        : (now.prefix_cache_queries > 0 ? now.prefix_cache_hits / now.prefix_cache_queries : null),
      windowed: hitWindowed,
    },
    events,
  };
}

// ---- tiles -----------------------------------------------------------------------------------

function setTile(metric, text, raw, stale = false) {
  const tile = document.querySelector(`.tile[data-metric="${metric}"]`);
  const value = tile.querySelector(".value");
  value.textContent = text;
  tile.dataset.value = raw === null || raw === undefined ? "" : String(raw);
  tile.classList.toggle("stale", stale);
}

const ms = (s) => (s === null ? "–" : `${formatNumber(s * 1000, s * 1000 < 10 ? 1 : 0)}`);
const pct = (f) => (f === null ? "–" : `${(100 * f).toFixed(1)}%`);

function renderTiles(d) {
  const n = d.now;
  setTile("prompt_tps", formatNumber(d.promptTps), d.promptTps);
  setTile("gen_tps", formatNumber(d.genTps), d.genTps);
  setTile("running", formatNumber(n.running), n.running);
  setTile("waiting", formatNumber(n.waiting), n.waiting);
  setTile("kv", pct(n.kv_cache_usage), n.kv_cache_usage);
  setTile("prefix_hit", `${pct(d.prefixHit.value)}${d.prefixHit.windowed ? "" : " all"}`,
          d.prefixHit.value, !d.prefixHit.windowed);
  for (const key of ["ttft", "itl"]) {
    const [p50, p90, p99] = d[key].values;
    const text = p50 === null ? "–" : `${ms(p50)} / ${ms(p90)} / ${ms(p99)} ms`;
    setTile(key, `${text}${d[key].windowed || p50 === null ? "" : " all"}`, p50, !d[key].windowed);
  }
  setTile("generation_tokens", formatNumber(n.generation_tokens), n.generation_tokens);
  setTile("finished", formatNumber(finishedTotal(n)), finishedTotal(n));
  for (const key of ["preemptions", "aborted", "errors", "rejected", "engine_restarts"]) {
    setTile(key, formatNumber(n[key]), n[key]);
  }
  $("model-name").textContent = n.model;
}

// ---- charts ----------------------------------------------------------------------------------

const COLORS = ["#2f7ed8", "#e4572e", "#29a35a", "#9b59b6"];

function push(chart, label, value) {
  const byLabel = (series[chart] = series[chart] || {});
  const values = (byLabel[label] = byLabel[label] || []);
  values.push(value);
  if (values.length > HISTORY) values.shift();
}

function drawChart(canvas, byLabel, fixedMax) {
  const ratio = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const ctx = canvas.getContext("2d");
  ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const style = getComputedStyle(canvas);
  const fg = style.color;
  const labels = Object.keys(byLabel || {});
  const all = labels.flatMap((l) => byLabel[l]).filter((v) => v !== null && Number.isFinite(v));
  const dataMax = Math.max(0, ...all);
  const max = fixedMax || (dataMax > 0 ? dataMax * 1.1 : 1);
  const left = 44;
  const top = 18;
  const plotW = width - left - 8;
  const plotH = height - top - 14;
  ctx.font = "11px system-ui, sans-serif";
  ctx.fillStyle = fg;
  ctx.strokeStyle = "rgba(128,128,128,0.35)";
  ctx.lineWidth = 1;
  for (const f of [0, 0.5, 1]) {
    const y = top + plotH * (1 - f);
    ctx.beginPath();
    ctx.moveTo(left, y);
    ctx.lineTo(left + plotW, y);
    ctx.stroke();
    ctx.fillText(formatNumber(max * f), 2, y + 4);
  }
  labels.forEach((label, i) => {
    const values = byLabel[label];
    const color = COLORS[i % COLORS.length];
    ctx.strokeStyle = color;
    ctx.lineWidth = 1.8;
    ctx.beginPath();
    let pen = false;
    values.forEach((v, j) => {
      if (v === null || !Number.isFinite(v)) {
        pen = false;
        return;
      }
      const x = left + plotW * ((j + HISTORY - values.length) / (HISTORY - 1));
      const y = top + plotH * (1 - Math.min(v, max) / max);
      if (pen) ctx.lineTo(x, y);
      else ctx.moveTo(x, y);
      pen = true;
    });
    ctx.stroke();
    const x = left + 4 + i * 78;
    ctx.fillStyle = color;
    ctx.fillRect(x, 4, 10, 10);
    ctx.fillStyle = fg;
    ctx.fillText(label, x + 14, 13);
  });
}

function renderCharts(d) {
  const n = d.now;
  const toMs = (v) => (v === null ? null : v * 1000);
  push("tokens", "in", d.promptTps);
  push("tokens", "out", d.genTps);
  push("requests", "running", n.running);
  push("requests", "waiting", n.waiting);
  push("cache", "KV used", 100 * n.kv_cache_usage);
  push("cache", "prefix hits", d.prefixHit.value === null ? null : 100 * d.prefixHit.value);
  ["p50", "p90", "p99"].forEach((p, i) => {
    push("ttft", p, d.ttft.windowed ? toMs(d.ttft.values[i]) : null);
    push("itl", p, d.itl.windowed ? toMs(d.itl.values[i]) : null);
  });
  push("events", "preempt", d.events.preemptions ?? null);
  push("events", "abort", d.events.aborted ?? null);
  push("events", "error", d.events.errors ?? null);
  push("events", "restart", d.events.engine_restarts ?? null);
  redraw();
}

function redraw() {
  drawChart($("chart-tokens"), series.tokens);
  drawChart($("chart-requests"), series.requests);
  drawChart($("chart-cache"), series.cache, 100);
  drawChart($("chart-ttft"), series.ttft);
  drawChart($("chart-itl"), series.itl);
  drawChart($("chart-events"), series.events);
}

// ---- polling ---------------------------------------------------------------------------------

async function poll(gen = generation) {
  try {
    const resp = await apiFetch("/stats", { cache: "no-store" });
    if (!resp.ok) throw await errorFromResponse(resp);
    const snap = await resp.json();
    if (gen !== generation) return;
    snapshots.push(snap);
    while (snapshots.length > 2 && snap.time - snapshots[0].time > WINDOW_S + 5) snapshots.shift();
    const d = derive();
    renderTiles(d);
    renderCharts(d);
    $("status").textContent = `${snap.ready ? "ready" : "not ready"} · updated ${new Date(snap.time * 1000).toLocaleTimeString()}`;
    $("error").hidden = true;
  } catch (err) {
    if (gen !== generation) return;
    $("status").textContent = "not updating";
    $("error").textContent = describeError(err);
    $("error").hidden = false;
  } finally {
    if (gen === generation) timer = setTimeout(poll, POLL_MS);
  }
}

function restart() {
  clearTimeout(timer);
  generation += 1;
  snapshots.length = 0;
  poll();
}

bindKeyField($("api-key"), restart);
window.addEventListener("resize", redraw);
poll();
