// The page of `imgvec serve`: search by an image picked or dropped, or by a result clicked.
// Every name from the store is put in the page as text (textContent), never as markup.
// A search from a stored image leaves that image out of its results; changing k re-runs the search
// on screen; each search from a stored image is a URL (?path=P&k=K), so Back and Forward restore it.
// The map (GET /api/map: imgvec inspect's 2-D layout of the store) is drawn with DOM methods as an SVG
// scatter coloured by label; hovering a point shows its thumbnail (the /image route), a click searches from it.
"use strict";
(() => {
  const $ = (id) => document.getElementById(id);
  const results = $("results"), status = $("status"), drop = $("drop"), kInput = $("k");
  const COLUMNS = 11; // a query and k=10 neighbours share one row, as on the static query pages
  const DEFAULT_K = Number($("serve").dataset.k), MAX_K = Number(kInput.max);
  const uploads = new Map(); // history entries of uploads: their files, so Back can search again
  let current = null; // the search on screen: {path} or {upload}
  let shownHits = []; // the paths of its results
  let latest = 0; // the number of the latest search: an answer to an earlier one is not shown

  const el = (tag, cls, text) => {
    const e = document.createElement(tag);
    if (cls) e.className = cls;
    if (text !== undefined) e.textContent = text;
    return e;
  };
  const imageUrl = (path) => "/image?path=" + encodeURIComponent(path);
  const k = () => {
    const n = Math.trunc(Number(kInput.value));
    return n >= 1 && n <= MAX_K ? n : DEFAULT_K;
  };
  // headers carry percent-encoded text (a path in a note cannot break them)
  const header = (response, name) => {
    const value = response.headers.get(name);
    try { return value && decodeURIComponent(value); } catch (e) { return value; }
  };

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

  async function show(search, response, querySrc, started, wanted, fromStore) {
    let data;
    try { data = await response.json(); } catch (e) { data = {error: `HTTP ${response.status}`}; }
    if (search !== latest) return;
    if (!response.ok) {
      status.className = "error";
      status.textContent = data.error || `HTTP ${response.status}`;
      return;
    }
    // the record `imgvec query --format json` prints for one image: paths absolute, the store's root beside them
    const root = data.root ? data.root.replace(/\/$/, "") + "/" : "";
    const shown = (path) => root && path.startsWith(root) ? path.slice(root.length) : path;
    const query = data.queries[0];
    // a stored image's own row (the query's path, absolute as the hits' are) is not a neighbour of it
    const found = query.results.filter((n) => !fromStore || n.path !== query.query).slice(0, wanted);
    const grid = el("div", "grid");
    grid.style.gridTemplateColumns = `repeat(${Math.min(found.length + 1, COLUMNS)},minmax(0,176px))`;
    grid.append(card(querySrc, "query", shown(query.query), "", "query"));
    found.forEach((n, i) => {
      const fig = card(imageUrl(n.path), `#${i + 1} · ${n.score.toFixed(4)}`, shown(n.path), n.label, "hit");
      fig.tabIndex = 0;
      fig.dataset.path = n.path;
      fig.addEventListener("click", () => byPath(n.path));
      fig.addEventListener("keydown", (ev) => { if (ev.key === "Enter") byPath(n.path); });
      grid.append(fig);
    });
    results.replaceChildren(el("h2", "", shown(query.query)), grid);
    shownHits = found.map((n) => n.path);
    markHits(shownHits);
    // an answer from another state of the store (embed added rows, say): the service lays out its map again
    if (mapState !== null && mapState !== `${response.headers.get("X-Imgvec-Generation")}/` +
        `${response.headers.get("X-Imgvec-Rows")}`) { mapState = null; loadMap(); }
    const stale = header(response, "X-Imgvec-Stale");
    status.className = stale ? "error" : "";
    status.textContent = `${found.length} neighbours in ${Math.round(performance.now() - started)} ms; ` +
      `store generation ${response.headers.get("X-Imgvec-Generation")}, ${response.headers.get("X-Imgvec-Rows")} rows` +
      (stale ? `; STALE: ${stale}` : "");
  }

  // -- the map -------------------------------------------------------------------------------------
  const SVG = "http://www.w3.org/2000/svg";
  const MAP_SIZE = 420, PAD = 8, RADIUS = 3.5;
  const mapBox = $("map"), mapStatus = $("mapstatus"), legend = $("legend"), preview = $("preview");
  const dots = new Map(); // a point's absolute path -> its circle
  let mapState = null, mapRoot = "", mapTimer = null, marked = null; // mapState: the store state drawn
  let ringed = []; // the points of the results on screen

  const svgEl = (tag, attrs) => {
    const e = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attrs)) e.setAttribute(name, String(value));
    return e;
  };
  const mapShown = (path) => mapRoot && path.startsWith(mapRoot) ? path.slice(mapRoot.length) : path;

  async function loadMap(wait = 500) { // 202 while the service lays it out: ask again, less often each time
    clearTimeout(mapTimer);
    let response, data;
    try {
      response = await fetch("/api/map");
      data = await response.json();
    } catch (e) {
      mapStatus.textContent = `map: ${e}`;
      return;
    }
    if (response.status === 202 || response.status === 503) { // being made, or the store changed meanwhile
      mapStatus.textContent = response.status === 202 ? `laying out ${data.rows} images ...` : "waiting for the store ...";
      mapTimer = setTimeout(() => loadMap(Math.min(wait * 2, 4000)), wait);
      return;
    }
    if (!response.ok) {
      mapStatus.textContent = `map: ${data.error || "HTTP " + response.status}`;
      return;
    }
    drawMap(data);
  }

  function drawMap(data) {
    mapState = `${data.generation}/${data.rows}`;
    mapRoot = data.root ? data.root.replace(/\/$/, "") + "/" : "";
    const colour = new Map(data.legend.map((item) => [item.label, item.colour]));
    const svg = svgEl("svg", {width: MAP_SIZE, height: MAP_SIZE, viewBox: `0 0 ${MAP_SIZE} ${MAP_SIZE}`,
                              role: "img", "aria-label": "2-D map of the store's images"});
    const span = MAP_SIZE - 2 * PAD;
    dots.clear();
    if (!data.points.length) { // no map: turned off, or too few rows
      mapBox.replaceChildren(); legend.replaceChildren(); $("mapmethod").textContent = "";
      mapStatus.textContent = data.method;
      return;
    }
    for (const p of data.points) {
      const dot = svgEl("circle", {cx: (PAD + p.x * span).toFixed(1), cy: (PAD + (1 - p.y) * span).toFixed(1),
                                   r: RADIUS, fill: colour.get(p.label) || "#9aa1ad", "fill-opacity": 0.85});
      dot.dataset.path = p.path;
      dot.dataset.label = p.label || "";
      dots.set(p.path, dot);
      svg.append(dot);
    }
    svg.addEventListener("pointerover", (ev) => { if (ev.target.dataset && ev.target.dataset.path) hover(ev.target); });
    svg.addEventListener("pointerout", (ev) => { if (ev.target.dataset && ev.target.dataset.path) preview.hidden = true; });
    svg.addEventListener("click", (ev) => {
      if (ev.target.dataset && ev.target.dataset.path) { preview.hidden = true; byPath(ev.target.dataset.path); }
    });
    mapBox.replaceChildren(svg);
    legend.replaceChildren(...data.legend.map((item) => {
      const li = el("li"), swatch = el("span", "swatch");
      swatch.style.background = item.colour;
      li.append(swatch, document.createTextNode(`${item.label === null ? "no label" : item.label} (${item.points})`));
      return li;
    }));
    mapStatus.textContent = data.points.length ? `${data.points.length} of ${data.rows} images; ` +
      "hover a point to see its image, click it to search from it" : "";
    $("mapmethod").textContent = [data.method, ...data.notes].join(" · ");
    mark(current && current.path);
    markHits(shownHits);
  }

  function hover(dot) { // the point's thumbnail beside it
    const path = dot.dataset.path, thumb = el("div", "thumb"), img = el("img");
    img.alt = path;
    img.addEventListener("error", () => thumb.replaceChildren(el("div", "missing", "image not shown")));
    img.src = imageUrl(path);
    thumb.append(img);
    const cap = el("figcaption", "", mapShown(path));
    if (dot.dataset.label) cap.append(el("br"), el("span", "label", dot.dataset.label));
    preview.replaceChildren(thumb, cap);
    const x = Number(dot.getAttribute("cx")), y = Number(dot.getAttribute("cy"));
    preview.style.left = `${x + (x > MAP_SIZE - 180 ? -180 : 12)}px`;
    preview.style.top = `${Math.max(0, Math.min(y - 40, MAP_SIZE - 200))}px`;
    preview.hidden = false;
  }

  function markHits(paths) { // ring the results' points
    ringed.forEach((dot) => dot.classList.remove("hit"));
    ringed = paths.map((path) => dots.get(path)).filter(Boolean);
    ringed.forEach((dot) => dot.classList.add("hit"));
  }

  function mark(path) { // ring the image searched from, drawn on top
    if (marked) marked.classList.remove("current");
    marked = (path && dots.get(path)) || null;
    if (marked) { marked.classList.add("current"); marked.parentNode.append(marked); }
  }

  async function byFile(file, id = null) {
    const started = performance.now(), wanted = k(), search = ++latest;
    if (id === null) { // a new upload: a history entry of its own (its file kept for Back)
      id = uploads.size + 1;
      uploads.set(id, file);
      history.pushState({upload: id, k: wanted}, "", "?k=" + wanted);
    }
    current = {upload: id};
    mark(null);
    status.className = ""; status.textContent = `embedding ${file.name} ...`;
    const response = await fetch(`/api/query?k=${wanted}&name=${encodeURIComponent(file.name)}`,
      {method: "POST", body: file, headers: {"Content-Type": file.type || "application/octet-stream"}});
    await show(search, response, URL.createObjectURL(file), started, wanted, false);
  }

  async function byPath(path, remember = true) {
    const started = performance.now(), wanted = k(), search = ++latest;
    current = {path};
    mark(path);
    if (remember) history.pushState({path, k: wanted}, "", `?path=${encodeURIComponent(path)}&k=${wanted}`);
    // one more than shown: the image itself comes back as its own nearest neighbour, and is left out
    const response = await fetch(`/api/query?k=${Math.min(wanted + 1, MAX_K)}&path=${encodeURIComponent(path)}`);
    await show(search, response, imageUrl(path), started, wanted, true);
  }

  function restore() { // the search the URL names (Back, Forward, a link)
    const params = new URLSearchParams(location.search);
    kInput.value = params.get("k") || DEFAULT_K;
    const path = params.get("path"), state = history.state || {};
    if (path) byPath(path, false);
    else if (state.upload && uploads.has(state.upload)) byFile(uploads.get(state.upload), state.upload);
    else { current = null; mark(null); shownHits = []; markHits([]); latest++; results.replaceChildren(); status.className = ""; status.textContent = ""; }
  }

  $("file").addEventListener("change", (ev) => { if (ev.target.files.length) byFile(ev.target.files[0]); });
  kInput.addEventListener("change", () => {
    if (current && current.path) byPath(current.path);
    else if (current && current.upload) {
      history.replaceState({upload: current.upload, k: k()}, "", "?k=" + k());
      byFile(uploads.get(current.upload), current.upload);
    }
  });
  drop.addEventListener("dragover", (ev) => { ev.preventDefault(); drop.classList.add("over"); });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault(); drop.classList.remove("over");
    if (ev.dataTransfer.files.length) byFile(ev.dataTransfer.files[0]);
  });
  window.addEventListener("popstate", restore);
  restore();
  loadMap();
})();
