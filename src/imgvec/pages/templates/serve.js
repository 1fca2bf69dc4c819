// The page of `imgvec serve`: search by an image picked or dropped, or by a result clicked.
// Every name from the store is put in the page as text (textContent), never as markup.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const results = $("results"), status = $("status"), drop = $("drop"), kInput = $("k");
  const COLUMNS = 11; // a query and k=10 neighbours share one row, as on the static query pages

  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const imageUrl = (path) => "/image?path=" + encodeURIComponent(path);
  const k = () => encodeURIComponent(kInput.value || $("serve").dataset.k);

  function card(src, head, path, label, cls) {
    const fig = el("figure", cls), thumb = el("div", "thumb"), img = el("img");
    img.alt = path; img.title = path;
    img.addEventListener("error", () => thumb.replaceChildren(el("div", "missing", "image not shown")));
    img.src = src;
    thumb.append(img);
    const cap = el("figcaption");
    cap.append(el("span", "score", head), el("br"), document.createTextNode(path));
    if (label) cap.append(el("br"), el("span", "label", label));
    fig.append(thumb, cap);
    return fig;
  }

  async function show(response, querySrc, started) {
    let data;
    try { data = await response.json(); } catch (e) { data = {error: `HTTP ${response.status}`}; }
    if (!response.ok) {
      status.className = "error";
      status.textContent = data.error || `HTTP ${response.status}`;
      return;
    }
    // the record `imgvec query --format json` prints for one image: paths absolute, the store's root beside them
    const root = data.root ? data.root.replace(/\/$/, "") + "/" : "";
    const shown = (path) => root && path.startsWith(root) ? path.slice(root.length) : path;
    const query = data.queries[0];
    const grid = el("div", "grid");
    grid.style.gridTemplateColumns = `repeat(${Math.min(query.results.length + 1, COLUMNS)},minmax(0,176px))`;
    grid.append(card(querySrc, "query", shown(query.query), "", "query"));
    for (const n of query.results) {
      const fig = card(imageUrl(n.path), `#${n.rank} · ${n.score.toFixed(4)}`, shown(n.path), n.label, "hit");
      fig.tabIndex = 0;
      fig.dataset.path = n.path;
      fig.addEventListener("click", () => byPath(n.path));
      fig.addEventListener("keydown", (ev) => { if (ev.key === "Enter") byPath(n.path); });
      grid.append(fig);
    }
    results.replaceChildren(el("h2", "", shown(query.query)), grid);
    const stale = response.headers.get("X-Imgvec-Stale");
    status.className = stale ? "error" : "";
    status.textContent = `${query.results.length} neighbours in ${Math.round(performance.now() - started)} ms; ` +
      `store generation ${response.headers.get("X-Imgvec-Generation")}, ${response.headers.get("X-Imgvec-Rows")} rows` +
      (stale ? `; STALE: ${stale}` : "");
  }

  async function byFile(file) {
    const started = performance.now();
    status.className = ""; status.textContent = `embedding ${file.name} ...`;
    const response = await fetch(`/api/query?k=${k()}&name=${encodeURIComponent(file.name)}`,
      {method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"}});
    await show(response, URL.createObjectURL(file), started);
  }

  async function byPath(path, remember = true) {
    const started = performance.now();
    if (remember) history.pushState({path}, "", "?path=" + encodeURIComponent(path));
    const response = await fetch(`/api/query?k=${k()}&path=${encodeURIComponent(path)}`);
    await show(response, imageUrl(path), started);
  }

  $("file").addEventListener("change", (ev) => { if (ev.target.files.length) byFile(ev.target.files[0]); });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault(); drop.classList.remove("over");
    if (ev.dataTransfer.files.length) byFile(ev.dataTransfer.files[0]);
  });
  window.addEventListener("popstate", (ev) => { if (ev.state && ev.state.path) byPath(ev.state.path, false); });
  const start = new URLSearchParams(location.search).get("path");
  if (start) byPath(start, false);
})();
