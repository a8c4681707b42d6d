"""Self-contained HTML pages: the attention explorer and the beam-search tree.

Each page is one file with its data inlined as JSON and its script inline: no CDN, no network,
it works opened from disk. Cell colour encodes weight: red channel = 255 * (1 - weight).
"""

from __future__ import annotations

import html
import json
from typing import Any

_STYLE = """
body { font: 14px system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 4px; } .muted { color: #777; }
label { margin-right: 12px; } select { margin-left: 4px; }
.tok { display: inline-block; padding: 2px 5px; margin: 1px; border-radius: 3px; cursor: default;
       border: 1px solid #ddd; font-family: ui-monospace, monospace; font-size: 12px; }
.tok.active { outline: 2px solid #d62728; }
#overview canvas { margin: 2px; border: 1px solid #ccc; cursor: pointer; }
#overview canvas.sel { border: 2px solid #d62728; }
.row { display: flex; gap: 24px; align-items: flex-start; flex-wrap: wrap; }
"""


def _data_script(data: Any) -> str:
    # "</" would end the <script> element early; JSON allows the escaped form
    payload = json.dumps(data, ensure_ascii=False).replace("</", "<\\/")
    return f'<script id="data" type="application/json">{payload}</script>'


_ATTENTION_JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const CELL = 22, PAD = 110;
const kindSel = document.getElementById('kind'), layerSel = document.getElementById('layer'),
      headSel = document.getElementById('head');
let hover = -1;
function axes(kind) {  // [query tokens, key tokens], named by the data
  const [q, k] = D.axes[kind];
  return [D[q], D[k]];
}
function weights() {
  const layers = D.attention[kindSel.value], L = layers[+layerSel.value];
  if (headSel.value === 'mean') {
    return L[0].map((row, i) => row.map((_, j) => L.reduce((s, h) => s + h[i][j], 0) / L.length));
  }
  return L[+headSel.value];
}
function color(w) {
  const r = Math.round(255 * (1 - w)), g = Math.round(255 * (1 - 0.6 * w));
  return `rgb(${r},${g},255)`;
}
function fillOptions(sel, n, extra) {
  const keep = sel.value; sel.innerHTML = '';
  for (let i = 0; i < n; i++) sel.add(new Option(String(i), String(i)));
  if (extra) sel.add(new Option(extra, 'mean'));
  if ([...sel.options].some(o => o.value === keep)) sel.value = keep;
}
function drawHeatmap() {
  const [rows, cols] = axes(kindSel.value), W = weights();
  const c = document.getElementById('heatmap'), ctx = c.getContext('2d');
  c.width = PAD + cols.length * CELL; c.height = PAD + rows.length * CELL;
  ctx.fillStyle = '#fff'; ctx.fillRect(0, 0, c.width, c.height);
  ctx.font = '11px monospace'; ctx.fillStyle = '#222';
  rows.forEach((t, i) => { ctx.textAlign = 'right';
    ctx.fillText(t, PAD - 4, PAD + i * CELL + CELL * 0.65); });
  cols.forEach((t, j) => { ctx.save(); ctx.translate(PAD + j * CELL + CELL * 0.65, PAD - 4);
    ctx.rotate(-Math.PI / 3); ctx.textAlign = 'left'; ctx.fillText(t, 0, 0); ctx.restore(); });
  W.forEach((row, i) => row.forEach((w, j) => {
    ctx.fillStyle = color(w); ctx.fillRect(PAD + j * CELL, PAD + i * CELL, CELL, CELL); }));
  if (hover >= 0 && hover < rows.length) {
    ctx.strokeStyle = '#d62728'; ctx.lineWidth = 2;
    ctx.strokeRect(PAD, PAD + hover * CELL, cols.length * CELL, CELL);
  }
  shadeTokens(W);
}
function buildTokens() {
  const [rows, cols] = axes(kindSel.value);
  const q = document.getElementById('queries'), k = document.getElementById('keys');
  q.innerHTML = ''; k.innerHTML = '';
  rows.forEach((t, i) => { const s = document.createElement('span'); s.className = 'tok';
    s.textContent = t; s.onmouseenter = () => { hover = i; drawHeatmap(); }; q.appendChild(s); });
  cols.forEach(t => { const s = document.createElement('span'); s.className = 'tok';
    s.textContent = t; k.appendChild(s); });
}
function shadeTokens(W) {
  const qs = document.querySelectorAll('#queries .tok');
  const ks = document.querySelectorAll('#keys .tok');
  qs.forEach((s, i) => s.classList.toggle('active', i === hover));
  ks.forEach((s, j) => { const on = hover >= 0 && hover < qs.length;
    s.style.background = on ? color(W[hover][j]) : '';
    s.title = on ? W[hover][j].toFixed(3) : ''; });
}
function drawOverview() {
  const box = document.getElementById('overview'); box.innerHTML = '';
  const layers = D.attention[kindSel.value];
  layers.forEach((L, l) => { const line = document.createElement('div');
    line.appendChild(document.createTextNode(`layer ${l} `));
    L.forEach((H, h) => { const c = document.createElement('canvas'); const s = 3;
      c.width = H[0].length * s; c.height = H.length * s; c.title = `layer ${l}, head ${h}`;
      if (l === +layerSel.value && String(h) === headSel.value) c.className = 'sel';
      const ctx = c.getContext('2d');
      H.forEach((row, i) => row.forEach((w, j) => { ctx.fillStyle = color(w);
        ctx.fillRect(j * s, i * s, s, s); }));
      c.onclick = () => { layerSel.value = String(l); headSel.value = String(h); redraw(); };
      line.appendChild(c); });
    box.appendChild(line); });
}
function redraw() { buildTokens(); drawHeatmap(); drawOverview(); }
function onKind() {
  const layers = D.attention[kindSel.value];
  fillOptions(layerSel, layers.length); fillOptions(headSel, layers[0].length, 'mean of heads');
  hover = -1; redraw();
}
Object.keys(D.attention).forEach(k => kindSel.add(new Option(k, k)));
kindSel.value = D.default_kind in D.attention ? D.default_kind : Object.keys(D.attention)[0];
kindSel.onchange = onKind; layerSel.onchange = redraw; headSel.onchange = redraw;
document.getElementById('heatmap').onmousemove = e => {
  const r = e.target.getBoundingClientRect(), i = Math.floor((e.clientY - r.top - PAD) / CELL);
  if (i !== hover) { hover = i; drawHeatmap(); }
};
onKind();
window.qkvReady = true;
"""


def attention_page(explanation: dict[str, Any]) -> str:
    """The attention explorer for one translation (Explanation.to_json())."""
    e = explanation
    title = html.escape(e["source"])
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qkv attention: {title}</title>
<style>{_STYLE}</style></head><body>
<h1>{title}</h1>
<div class="muted">→ {html.escape(e["translation"])} &nbsp; ({html.escape(e["mode"])})</div>
<p><label>attention<select id="kind"></select></label>
<label>layer<select id="layer"></select></label>
<label>head<select id="head"></select></label>
<span class="muted">Hover a query token (or a heatmap row) to see what it attends to.</span></p>
<div class="row"><canvas id="heatmap"></canvas>
<div><div class="muted">queries</div><div id="queries"></div>
<div class="muted" style="margin-top:8px">keys, shaded by the hovered query's weights</div>
<div id="keys"></div></div></div>
<h2 style="font-size:15px">All heads of this kind <span class="muted">(click one)</span></h2>
<div id="overview"></div>
{_data_script(e)}
<script>{_ATTENTION_JS}</script>
</body></html>
"""


_BEAM_JS = r"""
const D = JSON.parse(document.getElementById('data').textContent);
const sel = document.getElementById('sentence');
D.sentences.forEach((s, i) => sel.add(new Option(`${i}: ${s.source.slice(0, 60)}`, i)));
const COLORS = {live: '#1f77b4', finished: '#2ca02c', '': '#bbb'};
function draw() {
  const S = D.sentences[+sel.value], nodes = S.nodes;
  document.getElementById('nbest').innerHTML = S.nbest.map((h, r) =>
    `<li><b>${h.score.toFixed(3)}</b> ${h.text.replace(/</g, '&lt;')}</li>`).join('');
  const best = new Set(); S.nbest.forEach(h => { let n = h.node;
    while (n !== null && n !== undefined) { best.add(n); n = nodes[n].parent; } });
  const bySteps = {}; nodes.forEach(n => (bySteps[n.step] = bySteps[n.step] || []).push(n));
  const steps = Object.keys(bySteps).map(Number).sort((a, b) => a - b);
  const X = 140, Y = 22, pos = {};
  let height = 0;
  steps.forEach((s, col) => bySteps[s].forEach((n, row) => {
    pos[n.id] = [20 + col * X, 20 + row * Y]; height = Math.max(height, 40 + row * Y); }));
  const svg = document.getElementById('tree');
  svg.setAttribute('width', 60 + steps.length * X); svg.setAttribute('height', height);
  let out = '';
  nodes.forEach(n => { if (n.parent === null) return; const [x1, y1] = pos[n.parent],
    [x2, y2] = pos[n.id], on = best.has(n.id);
    out += `<line x1="${x1 + 60}" y1="${y1}" x2="${x2}" y2="${y2}"
    stroke="${on ? '#d62728' : '#ccc'}" stroke-width="${on ? 2.5 : 1}"/>`; });
  nodes.forEach(n => { const [x, y] = pos[n.id]; const esc = n.text.replace(/&/g, '&amp;')
      .replace(/</g, '&lt;');
    out += `<g class="node ${n.kept || 'pruned'}"><title>${esc}  log p ${n.log_prob.toFixed(3)}` +
      `  score ${n.score.toFixed(3)}  ${n.kept || 'pruned'}</title><circle cx="${x}" cy="${y}"
      r="4" fill="${COLORS[n.kept]}"/><text x="${x + 7}" y="${y + 4}" font-size="11"
      font-weight="${best.has(n.id) ? 'bold' : 'normal'}" fill="${n.kept ? '#222' : '#999'}">` +
      `${esc} ${n.score.toFixed(2)}</text></g>`; });
  svg.innerHTML = out;
}
sel.onchange = draw; draw(); window.qkvReady = true;
"""


def beam_page(trace: dict[str, Any]) -> str:
    """The beam-search tree: each column a step, each node a candidate with its score; blue
    survived, green finished, grey pruned; the final n-best paths in red."""
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qkv beam search</title>
<style>{_STYLE} svg {{ display: block; margin-top: 8px; }}</style></head><body>
<h1>Beam search, beam {trace["beam"]}</h1>
<p><label>sentence<select id="sentence"></select></label>
<span class="muted">Columns are steps; every candidate the search considered, with its
length-normalised score. <span style="color:#1f77b4">blue</span>: kept alive,
<span style="color:#2ca02c">green</span>: finished, <span style="color:#999">grey</span>: pruned,
<span style="color:#d62728">red</span>: the final n-best.</span></p>
<ol id="nbest"></ol>
<svg id="tree" xmlns="http://www.w3.org/2000/svg"></svg>
{_data_script(trace)}
<script>{_BEAM_JS}</script>
</body></html>
"""
