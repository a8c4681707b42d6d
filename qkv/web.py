"""The page `qkv serve` shows at `/`: pick a model, type, and see the answer beside the attention
behind it. Everything it needs comes from the server itself (no CDN): the answer from the JSON
endpoints, the attention explorer and the beam-search tree from /pages/*, which serve the same
self-contained pages `qkv explain` writes (qkv/html.py), shown in frames.
"""

from __future__ import annotations

from .html import _STYLE

_JS = r"""
const $ = id => document.getElementById(id);
let MODELS = [];
const HINT = {
  translation: 'A sentence to translate', lm: 'A prompt to continue',
  classify: 'A sentence to classify', similarity: 'A sentence (and a second one below)',
  items: 'Item ids, oldest first, e.g. 2969 1178 1574',
};
function current() { return MODELS.find(m => m.name === $('model').value); }
function show(id, on) { $(id).style.display = on ? '' : 'none'; }
function onModel() {
  const m = current(); if (!m) return;
  $('text').placeholder = HINT[m.task] || '';
  show('beamBox', m.task === 'translation'); show('pairBox', m.task === 'similarity');
  show('tokensBox', m.task === 'lm');
  $('about').textContent = `${m.task}` + (m.languages.src_lang ?
    ` ${m.languages.src_lang}→${m.languages.tgt_lang}` : '') +
    `, ${m.config.d_model} wide, vocabulary ${m.vocab_size}`;
}
async function post(path, body) {
  const r = await fetch(path, {method: 'POST', headers: {'Content-Type': 'application/json'},
                               body: JSON.stringify(body)});
  const data = await r.json();
  if (!r.ok) throw new Error(`${data.error.field}: ${data.error.message}`);
  return data;
}
function frame(id, path, params) {
  const q = new URLSearchParams(Object.entries(params).filter(([, v]) => v !== undefined &&
                                                                        v !== ''));
  $(id).src = `${path}?${q}`; show(id + 'Box', true);
}
function listItems(rows) {
  $('nbest').innerHTML = '';
  rows.forEach(([score, text]) => { const li = document.createElement('li');
    const b = document.createElement('b'); b.textContent = score; li.appendChild(b);
    li.appendChild(document.createTextNode(' ' + text)); $('nbest').appendChild(li); });
}
async function streamGenerate(m, text, n) {
  const r = await fetch('/v1/generate', {method: 'POST',
    headers: {'Content-Type': 'application/json'},
    body: JSON.stringify({model: m.name, prompt: text, max_new_tokens: n, stream: true})});
  if (!r.ok) { const d = await r.json(); throw new Error(d.error.message); }
  const reader = r.body.getReader(), dec = new TextDecoder(); let buf = '';
  for (;;) {
    const {value, done} = await reader.read(); if (done) break;
    buf += dec.decode(value, {stream: true});
    let at;
    while ((at = buf.indexOf('\n\n')) >= 0) {
      const line = buf.slice(0, at); buf = buf.slice(at + 2);
      if (!line.startsWith('data: ')) continue;
      const ev = JSON.parse(line.slice(6));
      if (ev.error) throw new Error(ev.error.message);
      $('output').textContent = text + ev.text;
    }
  }
}
async function go() {
  const m = current(), text = $('text').value; if (!m || !text.trim()) return;
  $('error').textContent = ''; $('output').textContent = '…'; $('nbest').innerHTML = '';
  show('attentionBox', false); show('treeBox', false);
  const beam = +$('beam').value || 5, n = +$('tokens').value || 100;
  try {
    if (m.task === 'translation') {
      const d = await post('/v1/translate', {model: m.name, texts: [text], beam,
                                             nbest: Math.min(beam, 5)});
      const t = d.translations[0];
      $('output').textContent = t.text;
      listItems(t.nbest.map(h => [h.score === null ? '-inf' : h.score.toFixed(3), h.text]));
      frame('attention', '/pages/attention', {model: m.name, text, beam});
      frame('tree', '/pages/beam', {model: m.name, text, beam});
    } else if (m.task === 'lm') {
      await streamGenerate(m, text, n);
      frame('attention', '/pages/attention', {model: m.name, text, max_new_tokens: n,
                                              strategy: 'greedy'});
    } else if (m.task === 'classify') {
      const r = (await post('/v1/classify', {model: m.name, texts: [text]})).results[0];
      $('output').textContent = `${r.label} (${r.probability.toFixed(3)})`;
      listItems(Object.entries(r.probabilities).map(([l, p]) => [p.toFixed(3), l]));
      frame('attention', '/pages/attention', {model: m.name, text});
    } else if (m.task === 'similarity') {
      const pair = $('pair').value;
      const d = await post('/v1/explain', {model: m.name, text, pair});
      $('output').textContent = `cosine ${d.cosine.toFixed(3)}`;
      frame('attention', '/pages/attention', {model: m.name, text, pair});
    } else if (m.task === 'items') {
      const history = text.split(/[\s,]+/).filter(Boolean).map(Number);
      const r = (await post('/v1/recommend', {model: m.name, histories: [history]})).results[0];
      $('output').textContent = r.items.slice(0, 10).join(' ');
      listItems(r.items.map((item, i) => [r.scores[i].toFixed(3), String(item)]));
      frame('attention', '/pages/attention', {model: m.name, history: history.join(' ')});
    }
  } catch (e) { $('error').textContent = e.message; $('output').textContent = ''; }
}
async function start() {
  MODELS = (await (await fetch('/v1/models')).json()).models;
  MODELS.forEach(m => $('model').add(new Option(`${m.name} (${m.task})`, m.name)));
  $('model').onchange = onModel; onModel();
  $('go').onclick = go;
  $('text').onkeydown = e => {
    if (e.key === 'Enter' && !e.shiftKey) { e.preventDefault(); go(); }
  };
  window.qkvPageReady = true;
}
start();
"""

PAGE = f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>qkv</title>
<style>{_STYLE}
textarea {{ width: min(720px, 95vw); height: 3em; font: inherit; }}
#output {{ font-size: 18px; margin: 10px 0 4px; min-height: 1.3em; white-space: pre-wrap; }}
#error {{ color: #d62728; }} iframe {{ width: 100%; height: 620px; border: 1px solid #ddd; }}
</style></head><body>
<h1>qkv</h1>
<p><label>model<select id="model"></select></label> <span id="about" class="muted"></span></p>
<p><textarea id="text" autofocus></textarea></p>
<p id="pairBox" style="display:none"><textarea id="pair" placeholder="The second sentence">
</textarea></p>
<p><span id="beamBox"><label>beam<input id="beam" type="number" min="1" max="16" value="5"
 style="width:4em"></label></span>
<span id="tokensBox"><label>new tokens<input id="tokens" type="number" min="1" value="100"
 style="width:5em"></label></span>
<button id="go">Go</button> <span class="muted">(Enter)</span></p>
<div id="output"></div><div id="error"></div>
<ol id="nbest"></ol>
<div id="attentionBox" style="display:none"><h2 style="font-size:15px">Attention</h2>
<iframe id="attention" title="attention"></iframe></div>
<div id="treeBox" style="display:none"><h2 style="font-size:15px">Beam search</h2>
<iframe id="tree" title="beam search"></iframe></div>
<script>{_JS}</script>
</body></html>
"""
