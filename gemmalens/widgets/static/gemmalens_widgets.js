// gemmalens viewers: plain DOM and SVG, no dependencies, nothing fetched.
//
// `render({ model, el })` draws the viewer named by `model.get("view")`. In Jupyter the
// model is anywidget's: Python owns the data and recomputes it when a control changes,
// and every change redraws. In a static page `renderStatic(el, payload)` puts a small
// stand-in model over the JSON that `Viewer.to_html` embeds (the data of every control
// value), so the same drawing code runs with no kernel.

const FONT =
  'system-ui, -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, "DejaVu Sans", sans-serif';
const LABEL_SIZE = 11;
const FUTURE_COLOUR = "#eeeeee"; // keys hidden by causality (as in attention.py)
const OUTSIDE_COLOUR = "#f6d7a7"; // keys outside the sliding window (as in attention.py)
const HIGHLIGHT = "#d62728";

// ------------------------------------------------------------------------ DOM helpers

let svgNamespace = null;
let uniqueId = 0;

// The SVG namespace, read off an <svg> the HTML parser made (no URL literal needed).
function svgNS() {
  if (svgNamespace === null) {
    const probe = document.createElement("div");
    probe.innerHTML = "<svg></svg>";
    svgNamespace = probe.firstChild.namespaceURI;
  }
  return svgNamespace;
}

function setAttributes(node, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      node.addEventListener(key.slice(2), value);
    } else if (key === "style" && typeof value === "object") {
      Object.assign(node.style, value);
    } else {
      node.setAttribute(key, value === true ? "" : String(value));
    }
  }
}

function append(node, children) {
  for (const child of [].concat(children)) {
    if (child === null || child === undefined || child === false) continue;
    node.appendChild(typeof child === "object" ? child : document.createTextNode(String(child)));
  }
  return node;
}

// An HTML element: h("div", { class: "x", onclick: f }, [children]).
function h(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  setAttributes(node, attrs);
  return append(node, children);
}

// An SVG element, likewise.
function svg(tag, attrs = {}, children = []) {
  const node = document.createElementNS(svgNS(), tag);
  setAttributes(node, attrs);
  return append(node, children);
}

let measureContext = null;

function textWidth(text, size = LABEL_SIZE) {
  if (measureContext === null) measureContext = document.createElement("canvas").getContext("2d");
  if (!measureContext) return text.length * size * 0.6;
  measureContext.font = `${size}px ${FONT}`;
  return measureContext.measureText(text).width;
}

function truncate(text, length) {
  text = String(text);
  return text.length <= length ? text : text.slice(0, Math.max(1, length - 1)) + "…";
}

// The smallest of 1, 2, 5, 10, 20, 50, ... that is at least `needed`.
function niceStep(needed) {
  for (let scale = 1; ; scale *= 10) {
    for (const step of [1, 2, 5]) {
      if (step * scale >= needed) return step * scale;
    }
  }
}

function clamp(value, low, high) {
  return Math.min(high, Math.max(low, value));
}

function format(value) {
  if (value === null || value === undefined || Number.isNaN(value)) return "–";
  const size = Math.abs(value);
  if (size >= 1000 || (size > 0 && size < 0.001)) return value.toExponential(2);
  if (size >= 100) return value.toFixed(1);
  if (size >= 1) return value.toFixed(2);
  return value.toFixed(3);
}

// ------------------------------------------------------------------------ colours

// Eleven evenly spaced samples of matplotlib's colour maps, interpolated linearly.
const COLOUR_MAPS = {
  blues: ["#f7fbff", "#e3eef9", "#d0e1f2", "#b7d4ea", "#94c4df", "#6aaed6", "#4a98c9",
    "#2e7ebc", "#1764ab", "#084a91", "#08306b"],
  viridis: ["#440154", "#482475", "#414487", "#355f8d", "#2a788e", "#21918c", "#22a884",
    "#44bf70", "#7ad151", "#bddf26", "#fde725"],
  rdbu: ["#67001f", "#b1182b", "#d6604d", "#f3a481", "#fddbc7", "#f6f7f7", "#d1e5f0",
    "#90c4dd", "#4393c3", "#2065ab", "#053061"],
};

function hexToRgb(hex) {
  return [1, 3, 5].map((i) => parseInt(hex.slice(i, i + 2), 16));
}

// colourMap("blues")(t) -> [r, g, b] for t in [0, 1]; null for a missing value.
function colourMap(name) {
  const stops = COLOUR_MAPS[name].map(hexToRgb);
  return (t) => {
    if (t === null || t === undefined || Number.isNaN(t)) return null;
    const x = clamp(t, 0, 1) * (stops.length - 1);
    const i = Math.min(stops.length - 2, Math.floor(x));
    const f = x - i;
    return stops[i].map((a, j) => Math.round(a + (stops[i + 1][j] - a) * f));
  };
}

function css(rgb, missing = "#d9d9d9") {
  return rgb === null ? missing : `rgb(${rgb[0]},${rgb[1]},${rgb[2]})`;
}

function isDark(rgb) {
  if (rgb === null) return false;
  return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] < 140;
}

// ------------------------------------------------------------------------ widgets

// A <select> bound to a control: its options are model.get("options")[name].
function selectControl(model, name, label) {
  const options = (model.get("options") || {})[name] || [];
  const current = JSON.stringify(model.get(name));
  const select = h("select", { class: "gl-select", "data-control": name });
  for (const [value, text] of options) {
    const option = h("option", { value: JSON.stringify(value) }, text);
    if (JSON.stringify(value) === current) option.selected = true;
    select.appendChild(option);
  }
  select.disabled = options.length <= 1;
  select.addEventListener("change", () => {
    model.set(name, JSON.parse(select.value));
    model.save_changes();
  });
  return h("label", { class: "gl-control" }, [label, select]);
}

function setControls(model, values) {
  for (const [name, value] of Object.entries(values)) model.set(name, value);
  model.save_changes();
}

function tooltip(root) {
  const tip = h("div", { class: "gl-tooltip" });
  root.appendChild(tip);
  return {
    show(text, event) {
      tip.textContent = text;
      tip.style.display = "block";
      const box = root.getBoundingClientRect();
      const x = event.clientX - box.left + 14;
      const y = event.clientY - box.top + 14;
      tip.style.left = `${Math.min(x, Math.max(0, box.width - tip.offsetWidth - 4))}px`;
      tip.style.top = `${y}px`;
    },
    hide() {
      tip.style.display = "none";
    },
  };
}

// Horizontal bars: items [{ label, value, text, colour }], scaled to `max`.
function barList(items, max = null) {
  const top = max ?? Math.max(1e-12, ...items.map((item) => Math.abs(item.value ?? 0)));
  const list = h("div", { class: "gl-barlist" });
  for (const item of items) {
    const width = clamp((Math.abs(item.value ?? 0) / top) * 100, 0, 100);
    list.appendChild(
      h("div", { class: "gl-bar-row", title: item.title || "" }, [
        h("span", { class: "gl-bar-label" }, item.label),
        h("span", { class: "gl-bar-track" }, [
          h("span", {
            class: "gl-bar-fill",
            style: { width: `${width}%`, background: item.colour || "#4a98c9" },
          }),
        ]),
        h("span", { class: "gl-bar-value" }, item.text ?? format(item.value)),
      ]),
    );
  }
  return list;
}

// A vertical colour bar from vmin (bottom) to vmax (top).
function colourBar(map, vmin, vmax, label, height) {
  // As tall as the heatmap beside it, and tall enough for its label.
  height = Math.max(110, Math.min(Math.max(height, textWidth(label) + 12), 320));
  const steps = 48;
  const bar = svg("svg", { class: "gl-colourbar", width: 74, height: height + 16 });
  for (let i = 0; i < steps; i++) {
    const t = 1 - (i + 0.5) / steps;
    bar.appendChild(
      svg("rect", {
        x: 4,
        y: 8 + (i * height) / steps,
        width: 12,
        height: height / steps + 0.5,
        fill: css(map(t)),
        "shape-rendering": "crispEdges",
      }),
    );
  }
  bar.appendChild(svg("rect", { x: 4, y: 8, width: 12, height, fill: "none", stroke: "#999" }));
  for (const [t, value] of [[0, vmax], [0.5, (vmin + vmax) / 2], [1, vmin]]) {
    bar.appendChild(
      svg("text", { class: "gl-tick", x: 20, y: 8 + t * height, "dominant-baseline": "central" },
        format(value)),
    );
  }
  bar.appendChild(
    svg("text", {
      class: "gl-axis-title",
      transform: `translate(66,${8 + height / 2}) rotate(-90)`,
      "text-anchor": "middle",
    }, truncate(label, Math.floor(height / 5.8))),
  );
  return bar;
}

// A heatmap of SVG rects (class gl-cell, data-r / data-c), labelled rows and columns.
//   rows, cols, cellW, cellH, fill(r, c) -> css colour, rowLabels, colLabels,
//   optional: text(r, c), textFill(r, c), xTitle, yTitle, rotateCols, defs (SVG nodes),
//   onHover(r, c, event), onLeave(), onClick(r, c).
// Returns { node, left, top, highlight(r, c), select(r, c), overlay }.
function heatmap(o) {
  const rowLabels = o.rowLabels.map((l) => truncate(l, 18));
  const colLabels = o.colLabels.map((l) => truncate(l, 16));
  const rotate = o.rotateCols ?? true;
  const rowWidth = Math.max(0, ...rowLabels.map((l) => textWidth(l)));
  const colWidth = Math.max(0, ...colLabels.map((l) => textWidth(l)));
  // Label every n-th row / column when they would overlap (upright labels need their width).
  const rowStep = niceStep(12 / o.cellH);
  const colStep = niceStep((rotate ? 13 : colWidth + 6) / o.cellW);
  const left = Math.ceil(rowWidth + 8 + (o.yTitle ? 18 : 0));
  const labelsBelow = rotate ? colWidth * 0.87 + 12 : 16;
  const bottom = Math.ceil(labelsBelow + (o.xTitle ? 18 : 0));
  const top = 4;
  const width = o.cols * o.cellW;
  const height = o.rows * o.cellH;
  const right = rotate ? 4 : Math.ceil(textWidth(colLabels[colLabels.length - 1] || "") / 2 + 4);
  const root = svg("svg", {
    class: "gl-heatmap",
    width: left + width + right,
    height: top + height + bottom,
  });
  if (o.defs) root.appendChild(svg("defs", {}, o.defs));
  const plot = svg("g", { transform: `translate(${left},${top})` });
  root.appendChild(plot);
  const cells = svg("g", { class: "gl-cells" });
  plot.appendChild(cells);
  for (let r = 0; r < o.rows; r++) {
    for (let c = 0; c < o.cols; c++) {
      cells.appendChild(
        svg("rect", {
          class: "gl-cell",
          x: c * o.cellW,
          y: r * o.cellH,
          width: o.cellW,
          height: o.cellH,
          fill: o.fill(r, c),
          "data-r": r,
          "data-c": c,
        }),
      );
    }
  }
  if (o.text) {
    const texts = svg("g", { class: "gl-cell-texts" });
    for (let r = 0; r < o.rows; r++) {
      for (let c = 0; c < o.cols; c++) {
        const label = o.text(r, c);
        if (!label) continue;
        texts.appendChild(
          svg("text", {
            class: "gl-cell-text",
            x: (c + 0.5) * o.cellW,
            y: (r + 0.5) * o.cellH,
            fill: o.textFill ? o.textFill(r, c) : "#1f2328",
            "text-anchor": "middle",
            "dominant-baseline": "central",
          }, label),
        );
      }
    }
    plot.appendChild(texts);
  }
  const overlay = svg("g", { class: "gl-overlay" });
  plot.appendChild(overlay);
  const box = (cls) => {
    const rect = svg("rect", { class: cls, visibility: "hidden" });
    overlay.appendChild(rect);
    return rect;
  };
  const hoverRow = box("gl-hl");
  const hoverCol = box("gl-hl");
  const selectRow = box("gl-sel");
  const selectCol = box("gl-sel");
  const place = (rect, r, c) => {
    if (r === null || r === undefined || r < 0) {
      rect.setAttribute("visibility", "hidden");
      return;
    }
    const whole = c === "row" ? [0, r * o.cellH, width, o.cellH]
      : c === "col" ? [r * o.cellW, 0, o.cellW, height]
        : [c * o.cellW, r * o.cellH, o.cellW, o.cellH];
    setAttributes(rect, { x: whole[0], y: whole[1], width: whole[2], height: whole[3] });
    rect.setAttribute("visibility", "visible");
  };
  for (let r = 0; r < o.rows; r += rowStep) {
    plot.appendChild(
      svg("text", {
        class: "gl-label",
        x: -5,
        y: (r + 0.5) * o.cellH,
        "text-anchor": "end",
        "dominant-baseline": "central",
      }, rowLabels[r]),
    );
  }
  for (let c = 0; c < o.cols; c += colStep) {
    const x = (c + 0.5) * o.cellW;
    const y = height + 6;
    plot.appendChild(
      rotate
        ? svg("text", {
          class: "gl-label",
          x,
          y,
          transform: `rotate(-60,${x},${y})`,
          "text-anchor": "end",
          "dominant-baseline": "central",
        }, colLabels[c])
        : svg("text", { class: "gl-label", x, y: y + 6, "text-anchor": "middle" }, colLabels[c]),
    );
  }
  if (o.yTitle) {
    plot.appendChild(
      svg("text", {
        class: "gl-axis-title",
        transform: `translate(${-left + 10},${height / 2}) rotate(-90)`,
        "text-anchor": "middle",
      }, o.yTitle),
    );
  }
  if (o.xTitle) {
    plot.appendChild(
      svg("text", {
        class: "gl-axis-title",
        x: width / 2,
        y: height + bottom - 4,
        "text-anchor": "middle",
      }, o.xTitle),
    );
  }
  const cellOf = (event) => {
    const data = event.target.dataset;
    return data && data.r !== undefined ? [Number(data.r), Number(data.c)] : null;
  };
  cells.addEventListener("mousemove", (event) => {
    const at = cellOf(event);
    if (at && o.onHover) o.onHover(at[0], at[1], event);
  });
  cells.addEventListener("mouseleave", () => o.onLeave && o.onLeave());
  cells.addEventListener("click", (event) => {
    const at = cellOf(event);
    if (at && o.onClick) o.onClick(at[0], at[1], event);
  });
  return {
    node: root,
    left,
    top,
    width,
    height,
    overlay,
    // Outline row r's and column c's lines (null hides); mode "cross" or "cell".
    highlight(r, c, mode = "cross") {
      if (mode === "cell") {
        place(hoverRow, r, c);
        place(hoverCol, null);
      } else {
        place(hoverRow, r, "row");
        place(hoverCol, c, "col");
      }
    },
    select(r, c, mode = "cross") {
      if (mode === "cell") {
        place(selectRow, r, c);
        place(selectCol, null);
      } else if (mode === "row") {
        place(selectRow, r, "row");
        place(selectCol, null);
      } else {
        place(selectRow, r, "row");
        place(selectCol, c, "col");
      }
    },
  };
}

// Lines over positions that line up with a heatmap's columns above them.
//   series [{ name, values, colour, dash }], n, cellW, left, height, yTitle, marker.
function lineChart(o) {
  const width = o.n * o.cellW;
  const height = o.height;
  const top = 8;
  const bottom = 8;
  const values = o.series.flatMap((s) => s.values).filter((v) => v !== null && !Number.isNaN(v));
  const high = Math.max(1e-12, ...values);
  const y = (v) => top + height - (v / high) * height;
  const root = svg("svg", { class: "gl-linechart", width: o.left + width + 8, height: top + height + bottom });
  const plot = svg("g", { transform: `translate(${o.left},0)` });
  root.appendChild(plot);
  for (const t of [0, 0.5, 1]) {
    plot.appendChild(svg("line", { class: "gl-grid", x1: 0, x2: width, y1: y(t * high), y2: y(t * high) }));
    plot.appendChild(
      svg("text", { class: "gl-tick", x: -5, y: y(t * high), "text-anchor": "end", "dominant-baseline": "central" },
        format(t * high)),
    );
  }
  if (o.yTitle) {
    plot.appendChild(
      svg("text", {
        class: "gl-axis-title",
        transform: `translate(${-o.left + 10},${top + height / 2}) rotate(-90)`,
        "text-anchor": "middle",
      }, o.yTitle),
    );
  }
  if (o.marker !== undefined && o.marker >= 0) {
    const x = (o.marker + 0.5) * o.cellW;
    plot.appendChild(svg("line", { class: "gl-marker", x1: x, x2: x, y1: top, y2: top + height }));
  }
  for (const s of o.series) {
    const points = s.values.map((v, i) => `${(i + 0.5) * o.cellW},${y(v ?? 0)}`).join(" ");
    plot.appendChild(
      svg("polyline", {
        class: "gl-line",
        points,
        fill: "none",
        stroke: s.colour,
        "stroke-width": 2,
        "stroke-dasharray": s.dash || null,
      }),
    );
    s.values.forEach((v, i) => {
      plot.appendChild(svg("circle", { cx: (i + 0.5) * o.cellW, cy: y(v ?? 0), r: 2.5, fill: s.colour }));
    });
  }
  const legend = h("div", { class: "gl-legend" }, o.series.map((s) =>
    h("span", { class: "gl-legend-item" }, [
      h("span", { class: "gl-swatch", style: { background: s.colour } }), s.name,
    ])));
  return h("div", { class: "gl-linechart-box" }, [root, legend]);
}

// The common layout: title, controls, a main area and a side panel, a note.
function frame(model, root) {
  root.appendChild(h("div", { class: "gl-title" }, model.get("title") || ""));
  const controls = h("div", { class: "gl-controls" });
  const main = h("div", { class: "gl-main" });
  const side = h("div", { class: "gl-side" });
  root.append(controls, h("div", { class: "gl-body" }, [main, side]));
  const note = model.get("note");
  if (note) root.appendChild(h("div", { class: "gl-note" }, note));
  return { controls, main, side };
}

function sideHeading(text) {
  return h("div", { class: "gl-side-heading" }, text);
}

function hint(text) {
  return h("div", { class: "gl-hint" }, text);
}

function topIndices(values, k, keep = () => true) {
  return values
    .map((v, i) => [v, i])
    .filter(([v, i]) => v !== null && keep(i))
    .sort((a, b) => b[0] - a[0] || a[1] - b[1])
    .slice(0, k)
    .map(([, i]) => i);
}

// ------------------------------------------------------------------------ attention

// 0 visible, 1 hidden by causality, 2 outside the window (as attention.visibility). The
// mask covers the queries' own keys (the first self_keys); later keys are the encoder's.
function visibility(mask, q, k) {
  if (mask.self_keys !== null && mask.self_keys !== undefined && k >= mask.self_keys) return 0;
  if (mask.causal !== false && k > q) return 1;
  if (mask.before !== null && mask.before !== undefined && q - k >= mask.before) return 2;
  if (mask.after !== null && mask.after !== undefined && k - q >= mask.after) return 2;
  return 0;
}

function drawAttention(model, root) {
  const { controls, main, side } = frame(model, root);
  // Encoder-decoder models: which part (encoder, decoder self / cross / merged).
  if (((model.get("options") || {}).part || []).length > 1) {
    controls.append(selectControl(model, "part", "Part"));
  }
  controls.append(selectControl(model, "layer", "Layer"), selectControl(model, "head", "Head"));
  const matrix = model.get("matrix") || [];
  const tokens = model.get("tokens") || [];
  const keyTokens = (model.get("key_tokens") || []).length ? model.get("key_tokens") : tokens;
  const mask = model.get("window") || {};
  controls.appendChild(h("span", { class: `gl-badge gl-badge-${mask.type}` }, mask.label || ""));
  const queries = matrix.length;
  const keys = queries ? matrix[0].length : 0;
  // Keys that are the queries' own tokens (a column per query); the rest are the encoder's.
  const selfKeys = Math.min(mask.self_keys ?? keys, keys);
  const code = (q, k) => visibility(mask, q, k);
  let peak = 0;
  matrix.forEach((row, q) => row.forEach((v, k) => {
    if (code(q, k) === 0 && v > peak) peak = v;
  }));
  peak = peak || 1;
  const blues = colourMap("blues");
  const hatchId = `gl-hatch-${++uniqueId}`;
  const hatch = svg("pattern", {
    id: hatchId, width: 6, height: 6, patternUnits: "userSpaceOnUse", patternTransform: "rotate(45)",
  }, [
    svg("rect", { width: 6, height: 6, fill: OUTSIDE_COLOUR }),
    svg("line", { x1: 0, y1: 0, x2: 0, y2: 6, stroke: "#d9a55b", "stroke-width": 2 }),
  ]);
  const cell = clamp(Math.floor(560 / Math.max(queries, keys, 1)), 5, 26);

  const strip = h("div", { class: "gl-tokens" });
  const chips = tokens.map((token, i) =>
    h("span", { class: "gl-token", "data-pos": i, title: `position ${i}` }, token));
  strip.append(...chips);
  main.appendChild(strip);
  const tip = tooltip(root);
  let pinned = model.get("selected_token");

  const map = heatmap({
    rows: queries,
    cols: keys,
    cellW: cell,
    cellH: cell,
    rowLabels: tokens,
    colLabels: keyTokens,
    yTitle: "query (attending)",
    xTitle: mask.key_title || "key (attended to)",
    defs: [hatch],
    fill: (q, k) => {
      const c = code(q, k);
      if (c === 1) return FUTURE_COLOUR;
      if (c === 2) return `url(#${hatchId})`;
      return css(blues(matrix[q][k] / peak));
    },
    onHover: (q, k, event) => {
      map.highlight(q, k);
      const hidden = code(q, k) === 1 ? " (future: masked)" : code(q, k) === 2 ? " (outside the window)" : "";
      tip.show(`query ${q} ${tokens[q]} → key ${k} ${keyTokens[k]}\nweight ${format(matrix[q][k])}${hidden}`, event);
      showToken(q);
    },
    onLeave: () => {
      tip.hide();
      map.highlight(null, null);
      showToken(pinned);
    },
    onClick: (q) => pin(q),
  });
  // The window's edge: the sides shared by a visible cell and one outside the window.
  const edges = [];
  for (let q = 0; q < queries; q++) {
    for (let k = 0; k < keys; k++) {
      if (code(q, k) !== 2) continue;
      if (k + 1 < keys && code(q, k + 1) === 0) edges.push(`M${(k + 1) * cell},${q * cell}v${cell}`);
      if (k > 0 && code(q, k - 1) === 0) edges.push(`M${k * cell},${q * cell}v${cell}`);
      if (q > 0 && code(q - 1, k) === 0) edges.push(`M${k * cell},${q * cell}h${cell}`);
      if (q + 1 < queries && code(q + 1, k) === 0) edges.push(`M${k * cell},${(q + 1) * cell}h${cell}`);
    }
  }
  if (edges.length) {
    map.overlay.appendChild(svg("path", { class: "gl-window-edge", d: edges.join("") }));
  }
  if (selfKeys > 0 && selfKeys < keys) { // the merged row: the decoder's keys | the encoder's
    map.overlay.appendChild(svg("path", { class: "gl-part-edge", d: `M${selfKeys * cell},0v${queries * cell}` }));
  }
  main.appendChild(h("div", { class: "gl-figure" }, [
    map.node, colourBar(blues, 0, peak, "attention weight", queries * cell),
  ]));

  function showToken(t) {
    side.replaceChildren();
    chips.forEach((chip, i) => {
      chip.classList.toggle("gl-current", i === t);
      const row = t >= 0 && t < queries ? matrix[t] : null;
      const rgb = row && i < row.length && code(t, i) === 0 ? blues(row[i] / peak) : null;
      chip.style.background = rgb ? css(rgb) : "";
      chip.style.color = rgb && isDark(rgb) ? "#fff" : "";
    });
    map.select(pinned, pinned < selfKeys ? pinned : null);
    if (t === null || t < 0 || t >= queries) {
      side.append(sideHeading("Token"), hint("Hover a token or a cell to see what it attends to; click to pin it."));
      return;
    }
    side.appendChild(sideHeading(`Position ${t}: ${tokens[t]}`));
    const row = matrix[t];
    const attends = topIndices(row, 6, (k) => code(t, k) === 0).map((k) => ({
      label: `${k} ${truncate(keyTokens[k], 12)}`, value: row[k],
    }));
    side.append(h("div", { class: "gl-side-sub" }, "attends to (its row)"), barList(attends, 1));
    if (t < selfKeys) {
      const column = matrix.map((r) => r[t]);
      const by = topIndices(column, 6, (q) => code(q, t) === 0).map((q) => ({
        label: `${q} ${truncate(tokens[q], 12)}`, value: column[q], colour: "#6aaed6",
      }));
      side.append(h("div", { class: "gl-side-sub" }, "attended to by (its column)"), barList(by, 1));
    }
  }
  function pin(t) {
    pinned = pinned === t ? -1 : t;
    model.set("selected_token", pinned);
    model.save_changes();
  }
  chips.forEach((chip, i) => {
    chip.addEventListener("mouseenter", () => {
      showToken(i);
      map.highlight(i, i < selfKeys ? i : null);
    });
    chip.addEventListener("mouseleave", () => {
      showToken(pinned);
      map.highlight(null, null);
    });
    chip.addEventListener("click", () => pin(i));
  });
  showToken(pinned);
}

// ------------------------------------------------------------------------ AltUp

const ALTUP_LINES = [
  ["prediction", "#2e7ebc", null],
  ["correction", "#22a884", "6 3"],
  ["difference", "#d6604d", "2 3"],
];

function drawAltUp(model, root) {
  const { controls, main, side } = frame(model, root);
  controls.append(
    selectControl(model, "layer", "Layer"),
    selectControl(model, "stream", "Stream"),
    selectControl(model, "measure", "Heatmap"),
  );
  const norms = model.get("norms") || {};
  const labels = model.get("measure_labels") || {};
  const measure = model.get("measure");
  const values = norms[measure] || [];
  const tokens = model.get("tokens") || [];
  const active = model.get("active_stream");
  const stream = model.get("stream");
  const streams = values.length;
  const positions = streams ? values[0].length : 0;
  const flat = values.flat().filter((v) => v !== null);
  const low = Math.min(...flat);
  const high = Math.max(...flat);
  const span = high - low || 1;
  const viridis = colourMap("viridis");
  const cellW = clamp(Math.floor(640 / Math.max(positions, 1)), 8, 40);
  const tip = tooltip(root);
  const streamName = (s) => `stream ${s}${s === active ? " (active)" : ""}`;
  const map = heatmap({
    rows: streams,
    cols: positions,
    cellW,
    cellH: 26,
    rowLabels: [...Array(streams).keys()].map(streamName),
    colLabels: tokens,
    fill: (s, p) => css(viridis((values[s][p] - low) / span)),
    onHover: (s, p, event) => {
      map.highlight(s, p, "cell");
      const lines = ["prediction", "correction", "difference", "relative"]
        .map((m) => `${labels[m] || m}: ${format(norms[m][s][p])}`);
      tip.show(`${streamName(s)}, position ${p} ${tokens[p]}\n${lines.join("\n")}`, event);
    },
    onLeave: () => {
      tip.hide();
      map.highlight(null, null);
    },
    onClick: (s) => setControls(model, { stream: s }),
  });
  map.select(stream, null, "row");
  main.appendChild(h("div", { class: "gl-figure" }, [
    map.node, colourBar(viridis, low, high, labels[measure] || measure, streams * 26),
  ]));
  const lines = model.get("stream_norms") || {};
  main.appendChild(h("div", { class: "gl-side-sub" }, `${streamName(stream)} along the sequence`));
  main.appendChild(lineChart({
    series: ALTUP_LINES.map(([name, colour, dash]) => ({
      name: labels[name] || name, values: lines[name] || [], colour, dash,
    })),
    n: positions,
    cellW,
    left: map.left,
    height: 120,
    yTitle: "norm",
    marker: model.get("selected_token"),
  }));

  // Overview: how strongly each layer corrects each stream; click to jump there.
  const overview = model.get("overview") || [];
  const layers = model.get("layers") || [];
  const layerIndex = layers.indexOf(model.get("layer"));
  const overviewFlat = overview.flat().filter((v) => v !== null);
  const overviewHigh = Math.max(1e-12, ...overviewFlat);
  side.appendChild(sideHeading("All layers"));
  side.appendChild(h("div", { class: "gl-side-sub" }, "mean ‖corrected − prediction‖ / ‖prediction‖"));
  const layerOptions = new Set(((model.get("options") || {}).layer || []).map((o) => o[0]));
  const overviewMap = heatmap({
    rows: overview.length,
    cols: streams,
    cellW: 26,
    cellH: clamp(Math.floor(320 / Math.max(overview.length, 1)), 6, 20),
    rowLabels: layers.map((l) => `layer ${l}`),
    colLabels: [...Array(streams).keys()].map(String),
    rotateCols: false,
    xTitle: "stream",
    fill: (l, s) => css(viridis(overview[l][s] / overviewHigh)),
    onHover: (l, s, event) => {
      overviewMap.highlight(l, s, "cell");
      tip.show(`layer ${layers[l]}, ${streamName(s)}: ${format(overview[l][s])}`, event);
    },
    onLeave: () => {
      tip.hide();
      overviewMap.highlight(null, null);
    },
    onClick: (l, s) => {
      if (layerOptions.has(layers[l])) setControls(model, { layer: layers[l], stream: s });
    },
  });
  overviewMap.select(layerIndex, stream, "cell");
  side.appendChild(overviewMap.node);
}

// ------------------------------------------------------------------------ routing

function drawRouting(model, root) {
  const { controls, main, side } = frame(model, root);
  controls.append(selectControl(model, "layer", "Layer"), selectControl(model, "show", "Colour"));
  const show = model.get("show");
  const values = model.get(show) || [];
  const weights = model.get("weights") || [];
  const probabilities = model.get("probabilities") || [];
  const chosen = model.get("chosen") || [];
  const load = model.get("load") || [];
  const loadWeight = model.get("load_weight") || [];
  const tokens = model.get("tokens") || [];
  const positions = values.length;
  const experts = positions ? values[0].length : 0;
  const peak = Math.max(1e-12, ...values.flat());
  const blues = colourMap("blues");
  const cellW = clamp(Math.floor(640 / Math.max(experts, 1)), 4, 26);
  const cellH = clamp(Math.floor(420 / Math.max(positions, 1)), 8, 20);
  const tip = tooltip(root);
  let pinned = model.get("selected_token");
  const map = heatmap({
    rows: positions,
    cols: experts,
    cellW,
    cellH,
    rowLabels: tokens,
    colLabels: [...Array(experts).keys()].map(String),
    rotateCols: false,
    yTitle: "token",
    xTitle: "expert",
    fill: (p, e) => css(blues(values[p][e] / peak)),
    onHover: (p, e, event) => {
      map.highlight(p, e);
      const mark = chosen[p] && chosen[p].includes(e) ? " (chosen)" : "";
      tip.show(`${p} ${tokens[p]} → expert ${e}${mark}\nweight ${format(weights[p][e])}, ` +
        `probability ${format(probabilities[p][e])}`, event);
      showToken(p);
    },
    onLeave: () => {
      tip.hide();
      map.highlight(null, null);
      showToken(pinned);
    },
    onClick: (p) => {
      pinned = pinned === p ? -1 : p;
      model.set("selected_token", pinned);
      model.save_changes();
    },
  });
  // Outline the chosen experts where cells are big enough to show both outline and colour.
  if (cellW >= 8) chosen.forEach((row, p) => row.forEach((e) => {
    map.overlay.appendChild(svg("rect", {
      class: "gl-chosen", x: e * cellW + 0.75, y: p * cellH + 0.75, width: cellW - 1.5, height: cellH - 1.5,
    }));
  }));
  main.appendChild(h("div", { class: "gl-figure" }, [
    map.node, colourBar(blues, 0, peak, show === "weights" ? "expert weight" : "router probability", positions * cellH),
  ]));

  // Each expert's load, its bars under the heatmap's columns.
  const most = Math.max(1, ...load);
  const barHeight = 70;
  const bars = svg("svg", { class: "gl-bars", width: map.left + experts * cellW + 8, height: barHeight + 22 });
  const plot = svg("g", { transform: `translate(${map.left},4)` });
  bars.appendChild(plot);
  load.forEach((count, e) => {
    const height = (count / most) * barHeight;
    plot.appendChild(svg("rect", {
      class: "gl-bar", x: e * cellW + 0.5, y: barHeight - height, width: Math.max(1, cellW - 1), height,
    }, [svg("title", {}, `expert ${e}: ${count} tokens, total weight ${format(loadWeight[e])}`)]));
  });
  plot.appendChild(svg("line", { class: "gl-grid", x1: 0, x2: experts * cellW, y1: barHeight, y2: barHeight }));
  plot.appendChild(svg("text", { class: "gl-tick", x: -5, y: 0, "text-anchor": "end", "dominant-baseline": "hanging" }, String(most)));
  plot.appendChild(svg("text", { class: "gl-tick", x: -5, y: barHeight, "text-anchor": "end" }, "0"));
  plot.appendChild(svg("text", { class: "gl-axis-title", x: experts * cellW / 2, y: barHeight + 14, "text-anchor": "middle" },
    "expert load (tokens that chose it)"));
  main.appendChild(bars);

  function showToken(p) {
    side.replaceChildren();
    map.select(pinned, null, "row");
    if (p === null || p < 0 || p >= positions) {
      side.append(sideHeading("Token"), hint("Hover a row to see the token's experts; click to pin it."));
      return;
    }
    side.appendChild(sideHeading(`Position ${p}: ${tokens[p]}`));
    const picks = chosen[p] || [];
    const order = topIndices(probabilities[p], Math.max(picks.length + 2, 4));
    side.appendChild(h("div", { class: "gl-side-sub" }, "router probability (✓ chosen, with its weight)"));
    side.appendChild(barList(order.map((e) => ({
      label: `expert ${e}${picks.includes(e) ? " ✓" : ""}`,
      value: probabilities[p][e],
      text: picks.includes(e) ? `${format(probabilities[p][e])} · w ${format(weights[p][e])}` : format(probabilities[p][e]),
      colour: picks.includes(e) ? "#2e7ebc" : "#b7d4ea",
    }))));
  }
  showToken(pinned);
}

// ------------------------------------------------------------------------ logit lens

function drawLogitLens(model, root) {
  const { controls, main, side } = frame(model, root);
  controls.append(selectControl(model, "k", "Top k"), selectControl(model, "color_by", "Colour"));
  const k = model.get("k");
  const topTokens = model.get("top_tokens") || [];
  const topProbs = model.get("top_probs") || [];
  const nextTokens = model.get("next_tokens") || [];
  const nextProbs = model.get("next_probs") || [];
  const nextRanks = model.get("next_ranks") || [];
  const rowLabels = model.get("row_labels") || [];
  const tokens = model.get("tokens") || [];
  const byNext = model.get("color_by") === "next" && nextProbs.length;
  const rows = topTokens.length;
  const positions = rows ? topTokens[0].length : 0;
  const blues = colourMap("blues");
  const cellW = clamp(Math.floor(1100 / Math.max(positions, 1)), 30, 64);
  const cellH = clamp(Math.floor(520 / Math.max(rows, 1)), 14, 22);
  const chars = Math.max(2, Math.floor((cellW - 4) / 6.2));
  // Display row d shows layer entry rows - 1 - d: the last layer on top.
  const entry = (d) => rows - 1 - d;
  const colour = (d, p) => {
    const r = entry(d);
    return blues(byNext ? nextProbs[r][p] : topProbs[r][p][0]);
  };
  const tip = tooltip(root);
  const after = (r) => (rowLabels[r] === "embed" ? "the embedding" : `layer ${rowLabels[r]}`);
  let pinned = model.get("selected_cell") || [-1, -1];
  const map = heatmap({
    rows,
    cols: positions,
    cellW,
    cellH,
    rowLabels: rowLabels.slice().reverse(),
    colLabels: tokens,
    yTitle: "after layer",
    xTitle: "input token",
    fill: (d, p) => css(colour(d, p)),
    text: (d, p) => truncate(topTokens[entry(d)][p][0], chars),
    textFill: (d, p) => (isDark(colour(d, p)) ? "#fff" : "#1f2328"),
    onHover: (d, p, event) => {
      map.highlight(d, p, "cell");
      const r = entry(d);
      const next = nextTokens[p] ? `\nnext token ${nextTokens[p]}: ${format(nextProbs[r]?.[p])}` : "";
      tip.show(`after ${after(r)}, position ${p} ${tokens[p]}\ntop ${topTokens[r][p][0]}: ${format(topProbs[r][p][0])}${next}`, event);
      showCell(r, p);
    },
    onLeave: () => {
      tip.hide();
      map.highlight(null, null);
      showCell(pinned[0], pinned[1]);
    },
    onClick: (d, p) => {
      const r = entry(d);
      pinned = pinned[0] === r && pinned[1] === p ? [-1, -1] : [r, p];
      model.set("selected_cell", pinned);
      model.save_changes();
    },
  });
  main.appendChild(h("div", { class: "gl-figure" }, [
    map.node,
    colourBar(blues, 0, 1, byNext ? "probability of the next token" : "probability of the top token", rows * cellH),
  ]));

  function showCell(r, p) {
    side.replaceChildren();
    map.select(r >= 0 ? entry(r) : -1, p, "cell");
    if (r === null || r < 0 || r >= rows || p < 0 || p >= positions) {
      side.append(sideHeading("Cell"), hint("Hover a cell for its top tokens; click to pin it."));
      return;
    }
    side.appendChild(sideHeading(`After ${after(r)}, position ${p}: ${tokens[p]}`));
    const next = nextTokens[p];
    const list = topTokens[r][p].slice(0, k).map((token, i) => ({
      label: token, value: topProbs[r][p][i], colour: token === next ? "#22a884" : "#4a98c9",
    }));
    side.append(h("div", { class: "gl-side-sub" }, `top ${k} predictions`), barList(list, 1));
    if (next && nextProbs.length) {
      side.appendChild(h("div", { class: "gl-side-sub" },
        `next token ${next}: probability ${format(nextProbs[r][p])}, rank ${nextRanks[r][p] + 1}`));
    }
  }
  showCell(pinned[0], pinned[1]);
}

// ------------------------------------------------------------------------ patching

function drawPatching(model, root) {
  const { controls, main, side } = frame(model, root);
  controls.append(selectControl(model, "site", "Site"), selectControl(model, "show", "Show"));
  const matrix = model.get("matrix") || [];
  const rowLabels = model.get("row_labels") || [];
  const colLabels = model.get("col_labels") || [];
  const unit = model.get("unit");
  const limit = model.get("limit") || 1;
  const label = model.get("value_label") || "";
  const layers = matrix.length;
  const units = layers ? matrix[0].length : 0;
  const rdbu = colourMap("rdbu");
  const cellW = clamp(Math.floor(640 / Math.max(units, 1)), 10, 44);
  const cellH = clamp(Math.floor(380 / Math.max(layers, 1)), 10, 26);
  const unitTitle = { pos: "position (token)", head: "head", kv_head: "KV head" }[unit] || unit;
  const tip = tooltip(root);
  let pinned = model.get("selected_cell") || [-1, -1];
  const colour = (v) => rdbu(v === null ? null : (v / limit + 1) / 2);
  const map = heatmap({
    rows: layers,
    cols: units,
    cellW,
    cellH,
    rowLabels: rowLabels.map((l) => String(l)),
    colLabels,
    rotateCols: unit === "pos",
    yTitle: "layer",
    xTitle: unitTitle,
    fill: (l, u) => css(colour(matrix[l][u])),
    onHover: (l, u, event) => {
      map.highlight(l, u, "cell");
      tip.show(`layer ${rowLabels[l]}, ${unit === "pos" ? "position" : "unit"} ${u} ${colLabels[u]}\n${label}: ${format(matrix[l][u])}`, event);
    },
    onLeave: () => {
      tip.hide();
      map.highlight(null, null);
    },
    onClick: (l, u) => {
      pinned = pinned[0] === l && pinned[1] === u ? [-1, -1] : [l, u];
      model.set("selected_cell", pinned);
      model.save_changes();
    },
  });
  map.select(pinned[0], pinned[1], "cell");
  main.appendChild(h("div", { class: "gl-figure" }, [
    map.node, colourBar(rdbu, -limit, limit, label, layers * cellH),
  ]));
  side.appendChild(sideHeading("Largest effects"));
  const sites = [];
  matrix.forEach((row, l) => row.forEach((v, u) => {
    if (v !== null) sites.push([Math.abs(v), l, u]);
  }));
  sites.sort((a, b) => b[0] - a[0]);
  side.appendChild(barList(sites.slice(0, 8).map(([, l, u]) => ({
    label: `L${rowLabels[l]} ${truncate(colLabels[u], 12)}`,
    value: matrix[l][u],
    colour: matrix[l][u] >= 0 ? "#4393c3" : "#d6604d",
  })), limit));
  const baselines = model.get("baselines") || {};
  if (baselines.clean !== null && baselines.clean !== undefined) {
    side.appendChild(h("div", { class: "gl-side-sub" },
      `clean run: ${format(baselines.clean)}; corrupted run: ${format(baselines.corrupted)}`));
  }
}

// ------------------------------------------------------------------------ SAE features

// Tab buttons bound to a control: choices [[value, text], ...].
function tabButtons(model, name, choices) {
  const current = model.get(name);
  return h("span", { class: "gl-tabs", role: "tablist" }, choices.map(([value, text]) =>
    h("button", {
      type: "button",
      role: "tab",
      class: value === current ? "gl-tab gl-tab-on" : "gl-tab",
      "data-tab": value,
      onclick: () => setControls(model, { [name]: value }),
    }, text)));
}

// A horizontal colour scale: "label vmin [gradient] vmax".
function scaleLegend(map, vmin, vmax, label) {
  const width = 120;
  const steps = 24;
  const bar = svg("svg", { class: "gl-scale-bar", width, height: 10 });
  for (let i = 0; i < steps; i++) {
    bar.appendChild(svg("rect", {
      x: (i * width) / steps, y: 0, width: width / steps + 0.5, height: 10,
      fill: css(map((i + 0.5) / steps)), "shape-rendering": "crispEdges",
    }));
  }
  bar.appendChild(svg("rect", { x: 0, y: 0, width, height: 10, fill: "none", stroke: "#999" }));
  return h("div", { class: "gl-scale" }, [
    h("span", {}, label), h("span", { class: "gl-tick-text" }, vmin === 0 ? "0" : format(vmin)), bar,
    h("span", { class: "gl-tick-text" }, format(vmax)),
  ]);
}

// One row of text: every token shaded by an activation (hover for the value), the token
// `center` outlined. `label` (with `title`) heads the row.
function activationRow(tokens, acts, center, peak, label, title, tip) {
  const blues = colourMap("blues");
  const text = h("span", { class: "gl-example-text" });
  tokens.forEach((token, i) => {
    const act = acts[i] ?? 0;
    const rgb = act > 0 ? blues(act / peak) : null;
    const span = h("span", {
      class: i === center ? "gl-ftok gl-ftok-max" : "gl-ftok",
      "data-act": act,
      style: { background: rgb ? css(rgb) : "", color: rgb && isDark(rgb) ? "#fff" : "" },
    }, token);
    span.addEventListener("mousemove", (event) => tip.show(`${token}: activation ${format(act)}`, event));
    span.addEventListener("mouseleave", () => tip.hide());
    text.appendChild(span);
  });
  const head = label ? h("span", { class: "gl-example-value", title }, label) : null;
  return h("div", { class: "gl-example" }, [head, text]);
}

// Bars of a histogram: edges [bins + 1], counts [bins].
function histogramChart(edges, counts, xTitle, yTitle) {
  const width = 250;
  const height = 110;
  const left = 40;
  const top = 8;
  const bottom = 34;
  const root = svg("svg", { class: "gl-hist", width: left + width + 12, height: top + height + bottom });
  const plot = svg("g", { transform: `translate(${left},${top})` });
  root.appendChild(plot);
  const low = edges[0];
  const high = edges[edges.length - 1];
  const span = high - low || 1;
  const most = Math.max(1, ...counts);
  const x = (v) => ((v - low) / span) * width;
  counts.forEach((count, i) => {
    const barHeight = (count / most) * height;
    plot.appendChild(svg("rect", {
      class: "gl-bar",
      x: x(edges[i]) + 0.5,
      y: height - barHeight,
      width: Math.max(1, x(edges[i + 1]) - x(edges[i]) - 1),
      height: barHeight,
    }, [svg("title", {}, `${format(edges[i])} – ${format(edges[i + 1])}: ${count} tokens`)]));
  });
  plot.appendChild(svg("line", { class: "gl-grid", x1: 0, x2: width, y1: height, y2: height }));
  for (const [value, anchor] of [[low, "start"], [(low + high) / 2, "middle"], [high, "end"]]) {
    plot.appendChild(svg("text", { class: "gl-tick", x: x(value), y: height + 13, "text-anchor": anchor }, format(value)));
  }
  plot.appendChild(svg("text", { class: "gl-tick", x: -5, y: 0, "text-anchor": "end", "dominant-baseline": "hanging" }, String(most)));
  plot.appendChild(svg("text", { class: "gl-tick", x: -5, y: height, "text-anchor": "end" }, "0"));
  plot.appendChild(svg("text", { class: "gl-axis-title", x: width / 2, y: height + bottom - 4, "text-anchor": "middle" }, xTitle));
  plot.appendChild(svg("text", {
    class: "gl-axis-title", transform: `translate(${-left + 10},${height / 2}) rotate(-90)`, "text-anchor": "middle",
  }, yTitle));
  return root;
}

function drawFeatures(model, root) {
  const { controls, main, side } = frame(model, root);
  const tokens = model.get("tokens") || [];
  const hasPrompt = tokens.length > 0;
  const tab = hasPrompt && model.get("tab") === "prompt" ? "prompt" : "feature";
  controls.append(selectControl(model, "feature", "Feature"));
  if (hasPrompt) controls.append(tabButtons(model, "tab", (model.get("options") || {}).tab || []));
  const feature = model.get("feature");
  const embedded = new Set(((model.get("options") || {}).feature || []).map((o) => o[0]));
  const available = (f) => embedded.has(f) || model.get("on_demand") === true;
  const open = (f) => setControls(model, { feature: f, tab: "feature" });
  const promptActs = model.get("prompt_acts") || [];
  const peak = model.get("max_activation") || Math.max(1e-12, ...promptActs);
  const tip = tooltip(root);
  if (tab === "prompt") {
    drawPromptFeatures();
  } else {
    drawFeature();
  }

  function drawFeature() {
    const examples = model.get("examples") || [];
    main.appendChild(h("div", { class: "gl-side-heading" }, `Feature ${feature}: top activating examples`));
    main.appendChild(scaleLegend(colourMap("blues"), 0, peak, "activation"));
    const list = h("div", { class: "gl-examples" });
    if (!examples.length) list.appendChild(hint("This feature never fired on the corpus."));
    for (const example of examples) {
      list.appendChild(activationRow(example.tokens, example.acts, example.center, peak,
        format(example.value), `corpus row ${example.sequence}, position ${example.position}`, tip));
    }
    main.appendChild(list);
    if (hasPrompt) {
      const best = promptActs.length ? promptActs.indexOf(Math.max(...promptActs)) : -1;
      main.appendChild(h("div", { class: "gl-side-sub" }, "On the prompt"));
      main.appendChild(h("div", { class: "gl-examples gl-prompt-row" }, [
        activationRow(tokens, promptActs, promptActs[best] > 0 ? best : -1,
          Math.max(peak, ...promptActs), "prompt", "the prompt", tip),
      ]));
    }

    const histogram = model.get("histogram") || {};
    const fired = model.get("fired") || 0;
    const total = model.get("corpus_size") || 0;
    const rate = total ? ((100 * fired) / total).toFixed(2) : "0";
    side.appendChild(sideHeading("Activations over the corpus"));
    side.appendChild(h("div", { class: "gl-side-sub gl-fired" },
      `fired on ${fired} of ${total} tokens (${rate}%)`));
    if ((histogram.counts || []).length) {
      side.appendChild(histogramChart(histogram.edges, histogram.counts, "activation (nonzero)", "tokens"));
    }
    const effects = model.get("logit_effects") || {};
    const top = effects.top_values || [];
    const bottom = effects.bottom_values || [];
    const limit = Math.max(1e-12, ...top.map(Math.abs), ...bottom.map(Math.abs));
    side.appendChild(sideHeading("Logit effects"));
    if (!top.length) {
      side.appendChild(hint(model.get("logit_note") || "Not available."));
      return;
    }
    side.appendChild(h("div", { class: "gl-side-sub" }, "raises most"));
    side.appendChild(barList(top.map((value, i) => ({
      label: effects.top_tokens[i], value, colour: "#4393c3",
    })), limit));
    side.appendChild(h("div", { class: "gl-side-sub" }, "lowers most"));
    side.appendChild(barList(bottom.map((value, i) => ({
      label: effects.bottom_tokens[i], value, colour: "#d6604d",
    })), limit));
  }

  function drawPromptFeatures() {
    const features = model.get("prompt_features") || [];
    const values = model.get("prompt_values") || [];
    const ranks = Math.max(1, ...features.map((row) => row.length));
    const promptPeak = Math.max(1e-12, ...values.flat().filter((v) => v !== null));
    const blues = colourMap("blues");
    main.appendChild(h("div", { class: "gl-side-heading" }, "Strongest features at each prompt token"));
    main.appendChild(scaleLegend(blues, 0, promptPeak, "activation"));
    const head = h("tr", {}, [h("th", {}, "pos"), h("th", {}, "token"),
      ...[...Array(ranks).keys()].map((r) => h("th", {}, r === 0 ? "strongest" : `#${r + 1}`))]);
    const table = h("table", { class: "gl-ftable" }, [head]);
    tokens.forEach((token, p) => {
      const cells = (features[p] || []).map((f, r) => {
        const rgb = blues(values[p][r] / promptPeak);
        const ok = available(f);
        const chip = h("button", {
          type: "button",
          class: `gl-fchip${f === feature ? " gl-fchip-current" : ""}${ok ? "" : " gl-fchip-off"}`,
          "data-feature": f,
          disabled: !ok,
          title: ok ? `open feature ${f}` : `feature ${f} is not embedded in this static copy (pass features=[...] to embed it)`,
          style: { background: css(rgb), color: isDark(rgb) ? "#fff" : "" },
          onclick: ok ? () => open(f) : null,
        }, [h("b", {}, String(f)), ` ${format(values[p][r])}`]);
        return h("td", {}, chip);
      });
      if (!cells.length) cells.push(h("td", { class: "gl-hint" }, "none fired"));
      table.appendChild(h("tr", {}, [h("td", { class: "gl-tick-text" }, String(p)),
        h("td", {}, h("span", { class: "gl-ftok" }, token)), ...cells]));
    });
    main.appendChild(h("div", { class: "gl-ftable-box" }, table));
    side.appendChild(sideHeading(`Feature ${feature} on the prompt`));
    side.appendChild(h("div", { class: "gl-examples" }, [
      activationRow(tokens, promptActs, -1, Math.max(peak, ...promptActs), "", "", tip),
    ]));
    side.appendChild(hint("Click a feature in the table to open it in the feature view."));
  }
}

// ------------------------------------------------------------------------ image attention

// Attention over an image's cells (soft tokens or patches), drawn over the image itself.
function drawImageAttention(model, root) {
  const { controls, main, side } = frame(model, root);
  const source = model.get("source");
  controls.append(
    selectControl(model, "layer", "Layer"),
    selectControl(model, "head", "Head"),
    selectControl(model, "image", "Image"),
  );
  const rows = model.get("rows");
  const cols = model.get("cols");
  const heat = model.get("heat") || [];
  const tokens = model.get("tokens") || [];
  const share = model.get("share") || [];
  const inImage = new Set(model.get("image_positions") || []);
  const text = source === "text";
  let query = text ? model.get("selected_token") : model.get("query_patch");
  if (text && (query === null || query < 0)) {
    // The last token outside the image: what the model is about to answer from.
    query = tokens.length - 1;
    while (query > 0 && inImage.has(query)) query -= 1;
  }
  const values = (text ? heat[query] : heat) || [];
  const peak = Math.max(1e-12, ...values.map((v) => v ?? 0));
  const map = colourMap("viridis");
  const cell = Math.max(4, Math.floor(320 / Math.max(rows, cols)));
  const width = cols * cell;
  const height = rows * cell;
  const tip = tooltip(root);
  const picture = svg("svg", { class: "gl-image-attention", width, height });
  picture.appendChild(svg("image", {
    href: model.get("image_url"), x: 0, y: 0, width, height, preserveAspectRatio: "none",
  }));
  values.forEach((value, index) => {
    const r = Math.floor(index / cols);
    const c = index % cols;
    const t = (value ?? 0) / peak;
    const rect = svg("rect", {
      class: "gl-cell", x: c * cell, y: r * cell, width: cell, height: cell,
      fill: css(map(t)), "fill-opacity": (0.05 + 0.6 * t).toFixed(3),
      "data-cell": index,
    });
    rect.addEventListener("mousemove", (event) =>
      tip.show(`cell ${index} (row ${r}, column ${c}): attention ${format(value)}`, event));
    rect.addEventListener("mouseleave", () => tip.hide());
    if (!text) rect.addEventListener("click", () => setControls(model, { patch: index }));
    picture.appendChild(rect);
  });
  if (!text && query >= 0) {
    picture.appendChild(svg("rect", {
      class: "gl-query-cell", x: (query % cols) * cell + 1, y: Math.floor(query / cols) * cell + 1,
      width: cell - 2, height: cell - 2, fill: "none", stroke: "#2ca02c", "stroke-width": 2,
    }));
  }
  main.appendChild(h("div", { class: "gl-figure" }, [picture, colourBar(map, 0, peak, "attention", height)]));

  if (text) {
    // The query tokens; the image's own run collapses into one chip.
    const strip = h("div", { class: "gl-tokens" });
    let chipDone = false;
    tokens.forEach((token, i) => {
      if (inImage.has(i)) {
        if (!chipDone) strip.appendChild(h("span", { class: "gl-token gl-image-chip" }, `[image: ${inImage.size} tokens]`));
        chipDone = true;
        return;
      }
      const span = h("span", {
        class: `gl-token${i === query ? " gl-current" : ""}`, "data-pos": i,
        title: `position ${i}: ${format(share[i])} of its attention on the image`,
      }, token);
      span.addEventListener("click", () => setControls(model, { selected_token: i }));
      strip.appendChild(span);
    });
    main.appendChild(hint("Click a token to see where it looks in the image."));
    main.appendChild(strip);
  } else {
    main.appendChild(hint("Click a patch to see where it looks."));
  }

  const top = topIndices(values, 5);
  if (text) {
    side.append(
      sideHeading(`Position ${query}: ${tokens[query] ?? ""}`),
      h("div", { class: "gl-side-sub" }, `attention on this image: ${format(share[query])}`),
    );
  } else {
    side.append(sideHeading(`Patch ${query} (row ${Math.floor(query / cols)}, column ${query % cols})`));
  }
  side.appendChild(h("div", { class: "gl-side-sub" }, "most attended cells"));
  side.appendChild(barList(top.map((i) => ({
    label: `cell ${i} (${Math.floor(i / cols)}, ${i % cols})`, value: values[i],
  }))));
}

// ------------------------------------------------------------------------ audio attention

// Seconds on a horizontal axis of `width` px: ticks at a nice step, labels below `y`.
function timeAxis(group, seconds, width, y, title) {
  const scale = width / Math.max(seconds, 1e-9);
  const step = niceStep(Math.max(seconds, 1e-3) / 8 * 1000) / 1000;
  group.appendChild(svg("line", { class: "gl-grid", x1: 0, x2: width, y1: y, y2: y }));
  for (let t = 0; t <= seconds + 1e-9; t += step) {
    group.appendChild(svg("line", { class: "gl-grid", x1: t * scale, x2: t * scale, y1: y, y2: y + 4 }));
    group.appendChild(svg("text", { class: "gl-tick", x: t * scale, y: y + 14, "text-anchor": "middle" },
      `${Number(t.toFixed(3))}`));
  }
  if (title) {
    group.appendChild(svg("text", { class: "gl-axis-title", x: width / 2, y: y + 30, "text-anchor": "middle" }, title));
  }
}

// A clip's waveform, spectrogram and attention per stretch of time (soft tokens or
// encoder frames), one time axis; the encoder source adds the frame-by-frame heatmap.
function drawAudioAttention(model, root) {
  const { controls, main, side } = frame(model, root);
  const text = model.get("source") === "text";
  controls.append(
    selectControl(model, "layer", text ? "Layer" : "Audio block"),
    selectControl(model, "head", "Head"),
    selectControl(model, "clip", "Clip"),
  );
  const heat = model.get("heat") || [];
  const times = model.get("times") || [];
  const tokens = model.get("tokens") || [];
  const share = model.get("share") || [];
  const wave = model.get("waveform") || [];
  const positions = model.get("audio_positions") || [];
  const inAudio = new Set(positions);
  const duration = model.get("duration") || 0;
  const end = Math.max(duration, times.length ? times[times.length - 1][1] : 0, 1e-3);
  let query = text ? model.get("selected_token") : Math.min(model.get("frame"), times.length - 1);
  if (text && (query === null || query < 0)) {
    query = tokens.length - 1;
    while (query > 0 && inAudio.has(query)) query -= 1;
  }
  const values = heat[query] || [];
  const real = text ? model.get("real_tokens") : times.length;
  const shown = values.slice(0, real);
  const peak = Math.max(1e-12, ...shown.map((v) => v ?? 0));
  const map = colourMap("viridis");
  const tip = tooltip(root);

  const width = 560;
  const left = 64;
  const scale = width / end;
  const waveH = wave.length ? 48 : 0;
  const specH = 96;
  const barH = 80;
  const gap = 8;
  const height = waveH + (waveH ? gap : 0) + specH + gap + barH + 40;
  const strip = svg("svg", { class: "gl-audio-strip", width: left + width + 12, height });
  const plot = svg("g", { transform: `translate(${left},4)` });
  strip.appendChild(plot);
  let y = 0;
  const rowTitle = (label, top, h) => plot.appendChild(svg("text", {
    class: "gl-axis-title", transform: `translate(-8,${top + h / 2}) rotate(-90)`, "text-anchor": "middle",
  }, label));
  if (waveH) {
    const peakWave = Math.max(1e-9, ...wave.map(([a, b]) => Math.max(Math.abs(a), Math.abs(b))));
    const mid = y + waveH / 2;
    const step = (duration * scale) / wave.length;
    const points = wave.map(([, b], i) => `${i * step},${mid - (b / peakWave) * waveH / 2}`)
      .concat(wave.slice().reverse().map(([a], i) => `${(wave.length - 1 - i) * step},${mid - (a / peakWave) * waveH / 2}`));
    plot.appendChild(svg("polygon", { class: "gl-waveform", points: points.join(" "), fill: "#6e7781" }));
    rowTitle("wave", y, waveH);
    y += waveH + gap;
  }
  plot.appendChild(svg("image", {
    href: model.get("spectrogram_url"), x: 0, y, width: duration * scale, height: specH, preserveAspectRatio: "none",
  }));
  plot.appendChild(svg("rect", { x: 0, y, width: duration * scale, height: specH, fill: "none", stroke: "#999" }));
  rowTitle("mel", y, specH);
  const specTop = y;
  y += specH + gap;
  rowTitle("attention", y, barH);
  shown.forEach((value, i) => {
    const [start, stop] = times[i];
    const t = (value ?? 0) / peak;
    const h = Math.max(0.5, t * barH);
    const bar = svg("rect", {
      class: "gl-cell", x: start * scale, y: y + barH - h, width: Math.max(1, (stop - start) * scale - 1), height: h,
      fill: css(map(t)), "data-item": i,
    });
    const what = text ? `soft token ${i}` : `frame ${i}`;
    const show = (event) => tip.show(`${what}, ${format(start)}–${format(stop)} s: attention ${format(value)}`, event);
    bar.addEventListener("mousemove", show);
    bar.addEventListener("mouseleave", () => tip.hide());
    plot.appendChild(bar);
    // The same stretch, faintly, over the spectrogram.
    plot.appendChild(svg("rect", {
      x: start * scale, y: specTop, width: Math.max(1, (stop - start) * scale), height: specH,
      fill: "#ffffff", "fill-opacity": (0.45 * (1 - t)).toFixed(3), "pointer-events": "none",
    }));
  });
  if (!text && query >= 0 && times[query]) {
    const [start, stop] = times[query];
    plot.appendChild(svg("rect", {
      class: "gl-query-cell", x: start * scale, y: specTop, width: Math.max(1, (stop - start) * scale), height: specH,
      fill: "none", stroke: "#d62728", "stroke-width": 2,
    }));
  }
  timeAxis(plot, end, width, y + barH, "time (s)");
  main.appendChild(h("div", { class: "gl-figure" }, [strip, colourBar(map, 0, peak, "attention", 140)]));

  if (text) {
    const row = h("div", { class: "gl-tokens" });
    let chipDone = false;
    tokens.forEach((token, i) => {
      if (inAudio.has(i)) {
        if (!chipDone) row.appendChild(h("span", { class: "gl-token gl-audio-chip" }, `[audio: ${inAudio.size} tokens]`));
        chipDone = true;
        return;
      }
      const span = h("span", {
        class: `gl-token${i === query ? " gl-current" : ""}`, "data-pos": i,
        title: `position ${i}: ${format(share[i])} of its attention on the clip`,
      }, token);
      span.addEventListener("click", () => setControls(model, { selected_token: i }));
      row.appendChild(span);
    });
    main.appendChild(hint("Click a token to see where it listens in the clip."));
    main.appendChild(row);
  } else {
    // The frame-by-frame heatmap: click a row to choose the query frame.
    const n = times.length;
    const cell = Math.max(3, Math.min(14, Math.floor(420 / Math.max(1, n))));
    const labels = times.map(([start]) => `${format(start)} s`);
    const rowPeak = Math.max(1e-12, ...heat.flat().map((v) => v ?? 0));
    const grid = heatmap({
      rows: n, cols: n, cellW: cell, cellH: cell,
      fill: (r, c) => css(map((heat[r][c] ?? 0) / rowPeak)),
      rowLabels: labels, colLabels: labels, xTitle: "key time", yTitle: "query time",
      onHover: (r, c, event) => tip.show(`frame ${r} -> frame ${c}: ${format(heat[r][c])}`, event),
      onLeave: () => tip.hide(),
      onClick: (r) => setControls(model, { frame: r }),
    });
    if (query >= 0) grid.select(query, 0, "row");
    main.appendChild(hint("Click a row (a query frame) to see where it looks."));
    main.appendChild(h("div", { class: "gl-figure" }, [grid.node, colourBar(map, 0, rowPeak, "attention", n * cell)]));
  }

  const top = topIndices(shown, 5);
  if (text) {
    const padding = values.slice(real).reduce((a, b) => a + (b ?? 0), 0);
    side.append(
      sideHeading(`Position ${query}: ${tokens[query] ?? ""}`),
      h("div", { class: "gl-side-sub" }, `attention on the clip's soft tokens: ${format(share[query])}`),
      h("div", { class: "gl-side-sub" },
        `of which on ${values.length - real} padding soft tokens (past the clip's end): ${format(padding)}`),
    );
  } else if (times[query]) {
    side.append(sideHeading(`Frame ${query} (${format(times[query][0])}–${format(times[query][1])} s)`));
  }
  side.appendChild(h("div", { class: "gl-side-sub" }, text ? "most attended soft tokens" : "most attended frames"));
  side.appendChild(barList(top.map((i) => ({
    label: `${text ? "token" : "frame"} ${i} (${format(times[i][0])} s)`, value: shown[i],
  }))));
}

// ------------------------------------------------------------------------ entry points

const VIEWS = {
  attention: [drawAttention, ["part", "layer", "head", "selected_token", "matrix", "window", "key_tokens"]],
  altup: [drawAltUp, ["layer", "stream", "measure", "selected_token", "norms", "stream_norms"]],
  routing: [drawRouting, ["layer", "show", "selected_token", "weights", "probabilities", "chosen", "load"]],
  "logit-lens": [drawLogitLens, ["k", "color_by", "selected_cell", "top_tokens", "top_probs"]],
  patching: [drawPatching, ["site", "show", "selected_cell", "matrix", "limit", "col_labels"]],
  "image-attention": [drawImageAttention, ["source", "layer", "head", "image", "selected_token", "patch", "query_patch", "heat", "share", "image_url", "rows", "cols", "image_positions"]],
  "audio-attention": [drawAudioAttention, ["source", "layer", "head", "clip", "selected_token", "frame", "duration", "spectrogram_url", "waveform", "heat", "share", "times", "real_tokens", "audio_positions"]],
  features: [drawFeatures, ["feature", "tab", "examples", "histogram", "logit_effects", "prompt_acts", "fired"]],
};
const COMMON_KEYS = ["tokens", "options", "note", "title"];

function render({ model, el }) {
  const name = model.get("view");
  const root = h("div", { class: `gemmalens-view gemmalens-${name}` });
  el.appendChild(root);
  const entry = VIEWS[name];
  if (!entry) {
    root.textContent = `gemmalens: unknown viewer ${JSON.stringify(name)}`;
    return undefined;
  }
  const [draw, keys] = entry;
  let queued = false;
  const redraw = () => {
    queued = false;
    root.replaceChildren();
    try {
      draw(model, root);
      root.setAttribute("data-gl-drawn", "true");
    } catch (error) {
      root.replaceChildren(h("pre", { class: "gl-error" }, String((error && error.stack) || error)));
      console.error("gemmalens viewer", error);
    }
  };
  // Python sends the data of one control change together: draw once for all of it.
  const schedule = () => {
    if (!queued) {
      queued = true;
      Promise.resolve().then(redraw);
    }
  };
  const events = [...keys, ...COMMON_KEYS].map((key) => `change:${key}`);
  events.forEach((event) => model.on(event, schedule));
  redraw();
  return () => events.forEach((event) => model.off(event, schedule));
}

// A stand-in for the widget model over the JSON `Viewer.to_html` embeds: setting a
// control looks up the data of the new combination of control values.
function staticModel(payload) {
  const values = { ...payload.initial };
  const handlers = new Map();
  const fire = (key) => (handlers.get(key) || []).slice().forEach((callback) => callback());
  return {
    get: (key) => values[key],
    set(key, value) {
      values[key] = value;
      const changed = [key];
      if (payload.controls.includes(key)) {
        const state = payload.states[JSON.stringify(payload.controls.map((c) => values[c]))];
        if (state) {
          Object.assign(values, state);
          changed.push(...Object.keys(state));
        }
      }
      changed.forEach(fire);
    },
    save_changes() {},
    on(event, callback) {
      const key = event.replace(/^change:/, "");
      handlers.set(key, [...(handlers.get(key) || []), callback]);
    },
    off(event, callback) {
      const key = event.replace(/^change:/, "");
      handlers.set(key, (handlers.get(key) || []).filter((c) => c !== callback));
    },
  };
}

function renderStatic(el, payload) {
  return render({ model: staticModel(payload), el });
}

// anywidget loads the default export; `Viewer.to_html` calls renderStatic in this module.
export { renderStatic };
export default { render };
