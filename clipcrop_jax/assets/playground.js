// ClipCrop playground: uploads the chosen image to POST /v1/crops, draws the ranked crops on the
// image and as thumbnails (each downloadable). No build step, no dependencies.
'use strict';

const RANK_COLORS = ['#e6194b', '#f58231', '#ffe119', '#3cb44b', '#4363d8', '#911eb4'];
// What each query selected, by role: the caption and its subject keywords make the union box the
// crops start from; context keywords (where, beside what) only inform the decoder.
const ROLE_COLORS = { caption: '#00b8d4', subject: '#00b8d4', context: '#c51162' };
const $ = (id) => document.getElementById(id);
const SVG = 'http://www.w3.org/2000/svg';
let imageFile = null;
window.lastResult = null;  // the last JSON answer (tests read it)

function setStatus(message, isError = false) {
  $('status').textContent = message;
  $('status').className = isError ? 'error' : '';
}

function useImage(file) {
  if (!file) return;
  imageFile = file;
  $('preview').src = URL.createObjectURL(file);
  $('overlay').replaceChildren();
  $('thumbs').replaceChildren();
  $('drop').querySelector('span').textContent = file.name;
}

function drawQueries(queries, overlay, height) {
  // One dashed box per query (queries that selected the same box share it: one label line each).
  const size = Math.max(9, height / 32);
  const lines = new Map();  // box key -> number of labels written on it
  queries.forEach((query) => {
    if (!query.box) return;
    const [x0, y0, x1, y1] = query.box;
    const color = ROLE_COLORS[query.role] || '#888';
    const key = query.box.map((v) => v.toFixed(1)).join(',');
    const line = lines.get(key) || 0;
    lines.set(key, line + 1);
    const rect = document.createElementNS(SVG, 'rect');
    rect.setAttribute('class', `query-box role-${query.role}`);
    for (const [k, v] of [['x', x0], ['y', y0], ['width', x1 - x0], ['height', y1 - y0]]) {
      rect.setAttribute(k, v);
    }
    rect.setAttribute('stroke', color);
    const label = document.createElementNS(SVG, 'text');
    label.setAttribute('class', 'query-label');
    label.setAttribute('x', x0 + 3);
    label.setAttribute('y', Math.min(height - 2, Math.max(size, y1 - 4 - line * (size + 2))));
    label.setAttribute('fill', color);
    label.setAttribute('font-size', size);
    label.textContent = `${query.role}: ${query.text} (${query.score.toFixed(2)})`;
    overlay.append(rect, label);
  });
}

function describeQueries(queries) {
  const list = $('queries');
  list.replaceChildren();
  queries.forEach((query) => {
    const item = document.createElement('li');
    item.className = `role-${query.role}`;
    item.style.setProperty('--role-color', ROLE_COLORS[query.role] || '#888');
    const where = query.box ? `selected ${query.box.map((v) => Math.round(v)).join(', ')}`
      : 'selected nothing';
    item.textContent = `${query.role}: “${query.text}” — ${where}, score ` +
      `${query.score.toFixed(2)}${query.in_union ? ', in the union box' : ', context only'}`;
    list.append(item);
  });
  $('legend').hidden = queries.length === 0;
}

function drawBoxes(crops, width, height) {
  const overlay = $('overlay');
  overlay.setAttribute('viewBox', `0 0 ${width} ${height}`);
  overlay.replaceChildren();
  const queries = crops.length ? crops[0].queries || [] : [];
  drawQueries(queries, overlay, height);
  describeQueries(queries);
  crops.forEach((crop, i) => {
    const [x0, y0, x1, y1] = crop.box;
    const color = RANK_COLORS[i % RANK_COLORS.length];
    const rect = document.createElementNS(SVG, 'rect');
    rect.setAttribute('class', 'crop-box');
    for (const [k, v] of [['x', x0], ['y', y0], ['width', x1 - x0], ['height', y1 - y0]]) {
      rect.setAttribute(k, v);
    }
    rect.setAttribute('stroke', color);
    const label = document.createElementNS(SVG, 'text');
    label.setAttribute('x', x0 + 4);
    label.setAttribute('y', y0 + Math.max(12, height / 25));
    label.setAttribute('fill', color);
    label.setAttribute('font-size', Math.max(10, height / 25));
    label.textContent = String(i + 1);
    overlay.append(rect, label);
  });
}

function drawThumbs(crops) {
  const img = $('preview');
  const list = $('thumbs');
  list.replaceChildren();
  crops.forEach((crop, i) => {
    const [x0, y0, x1, y1] = crop.box;
    const w = Math.max(1, Math.round(x1 - x0));
    const h = Math.max(1, Math.round(y1 - y0));
    const canvas = document.createElement('canvas');
    canvas.width = w;
    canvas.height = h;
    canvas.getContext('2d').drawImage(img, x0, y0, x1 - x0, y1 - y0, 0, 0, w, h);
    const item = document.createElement('li');
    item.className = 'thumb';
    item.style.setProperty('--rank-color', RANK_COLORS[i % RANK_COLORS.length]);
    const link = document.createElement('a');
    link.textContent = 'download';
    link.download = `crop-${i + 1}.png`;
    link.href = canvas.toDataURL('image/png');
    const caption = document.createElement('div');
    caption.textContent = crop.fused
      ? `#${i + 1}  fused: the mean of the best predictions (score ${crop.score.toFixed(3)}, ` +
        `ranked first)  ${w}\u00d7${h} `
      : `#${i + 1}  score ${crop.score.toFixed(3)}  ${w}\u00d7${h} `;
    if (crop.fused) item.classList.add('fused');
    caption.append(link);
    item.append(canvas, caption);
    list.append(item);
  });
}

async function submit(event) {
  event.preventDefault();
  if (!imageFile) { setStatus('Choose an image first.', true); return; }
  const body = new FormData();
  body.append('image', imageFile);
  const text = $('text').value.trim();
  const example = $('query_image').files[0];
  if (example) body.append('query_image', example);
  else if (text) body.append('text', text);
  else { setStatus('Type a text or choose an example image.', true); return; }
  if ($('aspect_ratio').value) body.append('aspect_ratio', $('aspect_ratio').value);
  body.append('top_k', $('top_k').value || '3');
  const headers = {};
  if ($('token').value) headers.Authorization = `Bearer ${$('token').value}`;
  $('go').disabled = true;
  setStatus('Cropping\u2026');
  const started = performance.now();
  try {
    const response = await fetch('/v1/crops', { method: 'POST', body, headers });
    const answer = await response.json();
    if (!response.ok) throw new Error(answer.error || `HTTP ${response.status}`);
    if (!$('preview').complete) await $('preview').decode();
    window.lastResult = answer;
    drawBoxes(answer.crops, answer.image_size[0], answer.image_size[1]);
    drawThumbs(answer.crops);
    const ms = Math.round(performance.now() - started);
    setStatus(`${answer.crops.length} crops in ${ms} ms (${answer.model}).`);
  } catch (error) {
    setStatus(error.message, true);
  } finally {
    $('go').disabled = false;
  }
}

$('image').addEventListener('change', () => useImage($('image').files[0]));
$('form').addEventListener('submit', submit);
const drop = $('drop');
drop.addEventListener('dragover', (e) => { e.preventDefault(); drop.classList.add('over'); });
drop.addEventListener('dragleave', () => drop.classList.remove('over'));
drop.addEventListener('drop', (e) => {
  e.preventDefault();
  drop.classList.remove('over');
  useImage(e.dataTransfer.files[0]);
});
