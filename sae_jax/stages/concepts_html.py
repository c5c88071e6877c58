"""The concepts stage's outputs: concepts.json, a sortable index page, one card page per concept, the
cards' thumbnails (thumbs/) and activation histograms (cards/hist_<id>.png, matplotlib).

Pages are static and self-contained: relative links only, images as PNG files beside them, a small
inline script for sorting the index (no network, no server).
"""

from __future__ import annotations

import html
import json
import os
from typing import Any

import numpy as np

from sae_jax import workdir as workdir_lib
from sae_jax.concept_stats import composition, composition_line

SET_NAMES = ("S_E", "S_A", "S_B", "removed")
TOKENS_NOTE = (
  "Top tokens: not applicable here: the analysed rows are pooled embeddings (one row per image or "
  "caption), so no token of a row is stored."
)

# Click a header: sort the rows by that column (numbers numerically, else as text); again: reverse.
SORT_JS = """
document.querySelectorAll('table.sortable th').forEach(function (th, col) {
  th.addEventListener('click', function () {
    var body = th.closest('table').tBodies[0];
    var rows = Array.prototype.slice.call(body.rows);
    var asc = th.getAttribute('data-order') !== 'asc';
    th.closest('tr').querySelectorAll('th').forEach(function (h) { h.removeAttribute('data-order'); });
    th.setAttribute('data-order', asc ? 'asc' : 'desc');
    function key(r) {
      var t = r.cells[col].getAttribute('data-v');
      if (t === null) { t = r.cells[col].textContent; }
      var x = parseFloat(t);
      return isNaN(x) ? t : x;
    }
    rows.sort(function (a, b) {
      var x = key(a), y = key(b);
      var o = (typeof x === 'number' && typeof y === 'number') ? x - y : String(x).localeCompare(String(y));
      return asc ? o : -o;
    });
    rows.forEach(function (r) { body.appendChild(r); });
  });
});
"""

STYLE = (
  "body{font-family:sans-serif;margin:1em}table{border-collapse:collapse;font-size:13px}"
  "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{cursor:pointer;background:#eee}"
  "td.l{text-align:left}.ex{display:inline-block;margin:4px;text-align:center;font-size:12px}"
)


def _num(x: Any, nd: int = 4) -> str:
  return "nan" if x is None or not np.isfinite(float(x)) else f"{float(x):.{nd}g}"


def _page(title: str, body: list, script: str = "") -> str:
  head = f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
  tail = f"<script>{script}</script>" if script else ""
  return head + f"<style>{STYLE}</style></head><body>" + "\n".join(body) + tail + "</body></html>\n"


def _per_concept(result: dict) -> dict:
  conc, lab = result["conc"], result["labels"]
  return {
    "energy": conc["energy"],
    "modality_score": conc["modality_score"],
    "bridge_score": conc["bridge_score"],
    "attribution_matched": conc["attribution"],
    "attribution_unmatched": result["a_minus"],
    "fire_rate_image": lab["fire_rate_image"],
    "fire_rate_text": lab["fire_rate_text"],
    "label_auroc": lab["label_auroc"],
  }


def _thumb(rows: Any, image_id: int, out_dir: str, size: int) -> str:
  """Relative path of the thumbnail of `image_id` (written once), or "" when its file is unknown."""
  src = rows.image_files.get(int(image_id))
  if not src or not os.path.exists(src):
    return ""
  rel = os.path.join("thumbs", f"{int(image_id)}.png")
  dst = os.path.join(out_dir, rel)
  if not os.path.exists(dst):
    from PIL import Image

    with Image.open(src) as im:
      im.convert("RGB").resize((size, size)).save(dst)
  return rel


class _Histograms:
  """Activation histograms of both modalities on fixed axes (activation / its max on x, count / the
  largest bin on y), drawn by matplotlib: the axes once, then per card only the two step curves
  (blitting; a full redraw per card would cost ~15x more, minutes for a thousand cards)."""

  def __init__(self, bins: int):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    self.plt = plt
    self.fig, self.ax = plt.subplots(figsize=(4.0, 2.0), dpi=90)
    self.fig.subplots_adjust(left=0.14, right=0.98, bottom=0.22, top=0.96)
    self.edges = np.linspace(0.0, 1.0, int(bins) + 1)
    zero = np.zeros(int(bins))
    self.steps = [
      self.ax.stairs(zero, self.edges, fill=True, alpha=0.55, label=name, animated=True)
      for name in ("image", "text")
    ]
    self.ax.set_xlim(0.0, 1.0)
    self.ax.set_ylim(0.0, 1.05)
    self.ax.set_xlabel("activation / max activation (rows that fire)", fontsize=7)
    self.ax.set_ylabel("rows / fullest bin", fontsize=7)  # both sides on one scale
    self.ax.tick_params(labelsize=7)
    self.ax.legend(fontsize=7)
    self.fig.canvas.draw()
    self.background = self.fig.canvas.copy_from_bbox(self.fig.bbox)

  def draw(self, path: str, image: np.ndarray, text: np.ndarray) -> float:
    """Writes the PNG of one concept's nonzero activations; returns the max activation (x = 1)."""
    from PIL import Image

    hi = max(float(np.max(image, initial=0.0)), float(np.max(text, initial=0.0)), 1e-12)
    counts = [np.histogram(np.asarray(x) / hi, self.edges)[0] for x in (image, text)]
    top = max(1, *(int(c.max(initial=0)) for c in counts))
    canvas = self.fig.canvas
    canvas.restore_region(self.background)
    for step, c in zip(self.steps, counts):
      step.set_data(c / top)
      self.ax.draw_artist(step)
    Image.fromarray(np.asarray(canvas.buffer_rgba())).convert("RGB").save(path, compress_level=1)
    return hi

  def close(self) -> None:
    self.plt.close(self.fig)


def _card_data(i: int, k: int, result: dict, rows: Any, out_dir: str, size: int) -> dict:
  """The card of concept `i` (position `k` in result["cards"]) as a JSON-able dict; writes thumbnails."""
  vi, ri, oki = (a[i] for a in result["top_image"])
  vt, rt, okt = (a[i] for a in result["top_text"])
  images = []
  for v, r in zip(vi[oki], ri[oki]):
    iid = int(rows.image_ids[r]) if rows.image_ids is not None else int(r)
    images.append(
      {"row": int(r), "image_id": iid, "activation": float(v), "thumb": _thumb(rows, iid, out_dir, size)}
    )
  captions = [
    {
      "row": int(r),
      "activation": float(v),
      "caption": str(rows.captions[r]) if rows.captions is not None else f"text row {int(r)}",
    }
    for v, r in zip(vt[okt], rt[okt])
  ]
  near_i, near_c = result["nearest"]
  return {
    "id": int(i),
    "top_images": images,
    "top_captions": captions,
    "nearest": [{"id": int(j), "cosine": float(x)} for j, x in zip(near_i[k], near_c[k])],
    "tokens": None,
  }


def _index_html(table: list, sets: dict, lines: list, truth: list) -> str:
  cols = [
    "id", "energy", "modality", "bridge", "A+ (matched)", "A- (unmatched)", "fire img", "fire txt",
    "sets", "label", "AUROC", "category",
  ]  # fmt: skip
  body = [
    "<h1>Concepts</h1>",
    "<p>Click a column header to sort. Cards exist for the concepts of "
    + ", ".join(f"{k} ({len(v)})" for k, v in sets.items())
    + (
      f"; labels against the truth: {', '.join(truth)}"
      if truth
      else "; no truth given: labels are the modality only"
    )
    + ".</p>",
    "<ul>" + "".join(f"<li>{html.escape(x)}</li>" for x in lines) + "</ul>",
    "<table class='sortable' id='concepts'><thead><tr>" + "".join(f"<th>{html.escape(c)}</th>" for c in cols),
    "</tr></thead><tbody>",
  ]
  for r in table:
    cid = r["id"]
    link = f"<a href='cards/{cid}.html'>{cid}</a>" if r["card"] else str(cid)
    cells = [f"<td data-v='{cid}'>{link}</td>"]
    for key in ("energy", "modality_score", "bridge_score", "attribution_matched", "attribution_unmatched"):
      cells.append(f"<td>{_num(r[key])}</td>")
    cells += [f"<td>{_num(r['fire_rate_image'], 3)}</td>", f"<td>{_num(r['fire_rate_text'], 3)}</td>"]
    cells.append(f"<td class='l'>{' '.join(r['sets'])}</td>")
    cells.append(f"<td class='l'>{html.escape(r['label'])}</td><td>{_num(r['label_auroc'], 3)}</td>")
    cells.append(f"<td class='l'>{html.escape(r['category'])}</td>")
    body.append("<tr>" + "".join(cells) + "</tr>")
  body.append("</tbody></table>")
  return _page("Concepts", body, SORT_JS)


def _card_html(row: dict, card: dict, hist: str) -> str:
  cid = row["id"]
  body = [
    f"<p><a href='../index.html'>all concepts</a></p><h1>Concept {cid}</h1>",
    f"<p>label: <b>{html.escape(row['label'] or '-')}</b> (AUROC {_num(row['label_auroc'], 3)}), category "
    f"<b>{html.escape(row['category'])}</b>; sets: {' '.join(row['sets']) or '-'}</p>",
    f"<p>energy {_num(row['energy'])}, modality {_num(row['modality_score'])}, bridge {_num(row['bridge_score'])}, "
    f"A+ {_num(row['attribution_matched'])}, A- {_num(row['attribution_unmatched'])}, fire rate image "
    f"{_num(row['fire_rate_image'], 3)} / text {_num(row['fire_rate_text'], 3)}</p>",
    "<h2>Top images</h2><div>",
  ]
  for im in card["top_images"]:
    pic = f"<img src='../{im['thumb']}' alt='image {im['image_id']}'><br>" if im["thumb"] else ""
    body.append(f"<span class='ex'>{pic}image {im['image_id']}<br>{im['activation']:.3f}</span>")
  body.append("</div>" if card["top_images"] else "none fire</div>")
  body.append("<h2>Top captions</h2><table><tr><th>activation</th><th>caption</th></tr>")
  for t in card["top_captions"]:
    body.append(f"<tr><td>{t['activation']:.3f}</td><td class='l'>{html.escape(t['caption'])}</td></tr>")
  body.append("</table>")
  h = card["histogram"]
  body.append(
    f"<h2>Activations</h2><p>nonzero activations of the {h['image_rows_firing']} image rows and "
    f"{h['text_rows_firing']} text rows (of {h['rows']} each) that fire; x = 1 is {h['max_activation']:.4g}</p>"
    f"<img src='{os.path.basename(hist)}' alt='histogram'>"
  )
  body.append("<h2>Nearest concepts (decoder cosine)</h2><ul>")
  for n in card["nearest"]:
    body.append(f"<li><a href='{n['id']}.html'>{n['id']}</a> {n['cosine']:.3f}</li>")
  body.append(f"</ul><p>{TOKENS_NOTE}</p>")
  return _page(f"Concept {cid}", body)


def write_pages(out_dir: str, ccfg: Any, result: dict, rows: Any, D: np.ndarray) -> dict:
  """concepts.json, index.html, cards/<id>.html (+ histograms), thumbs/; returns the stage summary."""
  for sub in ("cards", "thumbs"):
    os.makedirs(os.path.join(out_dir, sub), exist_ok=True)
  per = _per_concept(result)
  lab, sets = result["labels"], result["sets"]
  c = D.shape[0]
  member = [[] for _ in range(c)]
  for name in SET_NAMES:
    for i in sets.get(name, []):
      member[int(i)].append(name)
  card_set = set(int(i) for i in result["cards"])
  table = [
    {
      "id": i,
      **{k: (float(v[i]) if np.isfinite(v[i]) else None) for k, v in per.items()},
      "label": lab["label"][i],
      "category": lab["category"][i],
      "content_free": bool(lab["content_free"][i]),
      "sets": member[i],
      "card": i in card_set,
    }
    for i in range(c)
  ]
  comps = {name: composition(lab["category"], ids) for name, ids in sets.items()}
  lines = [composition_line(name, comp) for name, comp in comps.items()]
  workdir_lib.atomic_write_text(
    os.path.join(out_dir, "index.html"), _index_html(table, sets, lines, result["truth"])
  )
  hist = _Histograms(int(ccfg.hist_bins))
  sp_i, sp_t = result["codes"]
  cards = []
  try:
    for k, i in enumerate(result["cards"]):
      card = _card_data(int(i), k, result, rows, out_dir, int(ccfg.thumb_size))
      path = os.path.join(out_dir, "cards", f"hist_{int(i)}.png")
      col_i, col_t = (m.data[m.indptr[i] : m.indptr[i + 1]] for m in (sp_i, sp_t))
      card["histogram"] = {
        "max_activation": hist.draw(path, col_i, col_t),
        "image_rows_firing": int(col_i.size),
        "text_rows_firing": int(col_t.size),
        "rows": int(sp_i.shape[0]),
      }
      workdir_lib.atomic_write_text(
        os.path.join(out_dir, "cards", f"{int(i)}.html"), _card_html(table[i], card, path)
      )
      cards.append(card)
  finally:
    hist.close()
  payload = {
    "concepts": table,
    "cards": cards,
    "sets": {k: [int(x) for x in v] for k, v in sets.items()},
    "composition": comps,
    "truth": result["truth"],
    "tokens_note": TOKENS_NOTE,
  }
  workdir_lib.atomic_write_text(os.path.join(out_dir, "concepts.json"), json.dumps(payload))
  return {"composition": comps, "composition_lines": lines, "n_cards": len(cards), "truth": result["truth"]}
