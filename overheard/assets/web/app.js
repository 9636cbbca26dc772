// overheard serve: the pages' only script. Data from inputs goes in as text (textContent), never HTML.
"use strict";
const $ = (id) => document.getElementById(id);
const params = new URLSearchParams(location.search);

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "text") e.textContent = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v);
  }
  for (const c of kids) e.append(c);
  return e;
}
const svgEl = (tag, attrs) => {
  const e = document.createElementNS("http://www.w3.org/2000/svg", tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  return e;
};
function t(s) {  // seconds -> m:ss.s (h:mm:ss past an hour)
  if (s == null) return "?";
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), x = s % 60;
  const ss = (x < 10 ? "0" : "") + x.toFixed(1);
  return h ? `${h}:${String(m).padStart(2, "0")}:${ss.slice(0, 2)}` : `${m}:${ss}`;
}
const num = (x, d) => (x == null ? "–" : Number(x).toFixed(d));
const baseName = (u) => u.replace(/\/+$/, "").split("/").pop();
const audioUrl = (u, a, b) => "/api/audio?" + new URLSearchParams({source_uri: u, start_s: a, end_s: b});
async function getJSON(url) {
  const r = await fetch(url, {credentials: "same-origin"});
  const body = await r.json();
  if (!r.ok) throw new Error(body.error || r.statusText);
  return body;
}
const status = (msg) => { $("status").textContent = msg; };

async function searchPage() {
  const q = params.get("q") || "";
  $("q").value = q;
  if (!q) return;
  status("searching…");
  const hits = await getJSON("/api/search?" + new URLSearchParams({q, k: params.get("k") || 20}));
  status(`${hits.length} result${hits.length === 1 ? "" : "s"} for “${q}”`);
  for (const h of hits) {
    const src = "/source?" + new URLSearchParams({source_uri: h.source_uri, w: h.window_index});
    $("results").append(el("li", {class: "hit"},
      el("div", {}, el("a", {href: src, class: "file", text: baseName(h.source_uri)}),
         el("span", {class: "dim num", text: `  ${t(h.start_s)}–${t(h.end_s)}`})),
      el("div", {class: "cap", text: h.caption}),
      el("div", {class: "dim num"}, `confidence ${num(h.confidence, 2)} · score ${num(h.score, 4)} `,
         el("audio", {controls: "", preload: "none", src: audioUrl(h.source_uri, h.start_s, h.end_s)}))));
  }
}

async function sourcePage() {
  const uri = params.get("source_uri") || "";
  const s = await getJSON("/api/source?" + new URLSearchParams({source_uri: uri}));
  document.title = "overheard · " + s.name;
  $("name").textContent = s.name;
  $("uri").textContent = s.source_uri;
  const end = Math.max(1e-9, ...s.windows.map((w) => w.end_s));
  const player = $("player");
  const buttons = [];
  const play = (w, i) => {
    buttons.forEach((b, j) => b.classList.toggle("on", j === i));
    player.src = audioUrl(s.source_uri, w.start_s, w.end_s);
    $("now").textContent = `window ${w.window_index}, ${t(w.start_s)}–${t(w.end_s)}: ${w.caption}`;
    player.play().catch(() => {});
  };
  s.windows.forEach((w, i) => {
    const b = el("button", {title: `${t(w.start_s)}–${t(w.end_s)} ${w.caption}`, text: w.caption,
                            onclick: () => play(w, i)});
    b.style.left = (100 * w.start_s / end) + "%";
    b.style.width = (100 * (w.end_s - w.start_s) / end) + "%";
    buttons.push(b);
    $("timeline").append(b);
    $("windows").tBodies[0].append(el("tr", {},
      el("td", {class: "num", text: w.window_index}), el("td", {class: "num", text: `${t(w.start_s)}–${t(w.end_s)}`}),
      el("td", {text: w.caption}), el("td", {class: "num", text: num(w.confidence, 2)}),
      el("td", {}, el("button", {text: "▶", onclick: () => play(w, i)}))));
  });
  const sel = s.windows.findIndex((w) => String(w.window_index) === params.get("w"));
  if (sel >= 0) { buttons[sel].classList.add("on"); player.src = audioUrl(s.source_uri, s.windows[sel].start_s, s.windows[sel].end_s); }
  for (const f of s.failures) $("failures").append(el("li", {text: `${f.stage} ${f.error_type}: ${f.message}`}));
  if (!s.failures.length) $("failures").append(el("li", {class: "dim", text: "none"}));
}

function plot(series, wps) {  // committed windows over time, as an inline SVG
  const W = 420, H = 150, L = 48, B = 28, R = 10, T = 10;
  const xmax = Math.max(1e-9, ...series.map((p) => p[0])), ymax = Math.max(1, ...series.map((p) => p[1]));
  const X = (x) => L + (W - L - R) * x / xmax, Y = (y) => H - B - (H - B - T) * y / ymax;
  const svg = svgEl("svg", {class: "plot", width: W, height: H, viewBox: `0 0 ${W} ${H}`, role: "img"});
  svg.append(svgEl("title", {})); svg.lastChild.textContent = `windows committed over time (${wps} windows/s on average)`;
  svg.append(svgEl("line", {x1: L, y1: H - B, x2: W - R, y2: H - B}), svgEl("line", {x1: L, y1: T, x2: L, y2: H - B}));
  // a staircase: windows count as done when their part is committed, not before
  const pts = series.flatMap((p, i) => (i ? [[p[0], series[i - 1][1]], p] : [p]));
  svg.append(svgEl("polyline", {points: pts.map((p) => `${X(p[0]).toFixed(1)},${Y(p[1]).toFixed(1)}`).join(" ")}));
  const label = (x, y, s, anchor) => { const e = svgEl("text", {x, y, "text-anchor": anchor}); e.textContent = s; svg.append(e); };
  label(L - 4, T + 8, String(ymax), "end"); label(L - 4, H - B, "0", "end");
  label(W - R, H - B + 14, `${xmax.toFixed(1)} s`, "end"); label(L, H - B + 14, "0 s", "start");
  label((L + W) / 2, H - 4, "windows committed vs. seconds since start", "middle");
  return svg;
}

async function runsPage() {
  const runs = await getJSON("/api/runs");
  if (!runs.length) $("runs").append(el("p", {class: "dim", text: "no runs yet"}));
  for (const m of runs) {
    const dl = el("dl");
    const row = (k, v) => dl.append(el("dt", {text: k}), el("dd", {class: "num", text: v}));
    row("status", m.status);
    if (m.windows != null) {
      row("hours captioned", num(m.audio_hours, 3));
      row("files", `${m.sources_captioned} captioned, ${m.sources_failed} failed, ${m.sources_skipped_done} already done`);
      row("windows", `${m.windows} in ${num(m.wall_s, 1)} s = ${num(m.windows_per_s, 2)} windows/s`);
      const f = Object.entries(m.failures_by_type || {});
      row("failures by type", f.length ? f.map(([k, v]) => `${k}: ${v}`).join(", ") : "none");
      if (m.input) row("input", m.input);
    }
    const card = el("section", {class: "run"}, el("h2", {text: m.run_id}), dl);
    if (m.throughput) card.append(plot(m.throughput, num(m.windows_per_s, 2)));
    $("runs").append(card);
  }
  const etype = params.get("error_type") || "";
  const fl = await getJSON("/api/failures?" + new URLSearchParams({error_type: etype}));
  const sel = $("etype");
  for (const [k, v] of Object.entries(fl.counts)) sel.append(el("option", {value: k, text: `${k} (${v})`}));
  sel.value = etype;
  sel.addEventListener("change", () => { location.search = sel.value ? "?" + new URLSearchParams({error_type: sel.value}) : ""; });
  $("fcount").textContent = `${fl.total} row${fl.total === 1 ? "" : "s"}${fl.rows.length < fl.total ? `, first ${fl.rows.length} shown` : ""}`;
  for (const f of fl.rows) {
    $("failures").tBodies[0].append(el("tr", {},
      el("td", {text: baseName(f.source_uri), title: f.source_uri}), el("td", {text: f.stage}),
      el("td", {text: f.error_type}), el("td", {text: f.message}), el("td", {text: f.run_id})));
  }
}

const page = {search: searchPage, source: sourcePage, runs: runsPage}[document.body.dataset.page];
page().catch((e) => status("error: " + e.message));
