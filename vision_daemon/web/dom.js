// Small DOM helpers: build an element once, then change only text nodes.

export function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") node.className = v;
    else if (k === "dataset") Object.assign(node.dataset, v);
    else node.setAttribute(k, v);
  }
  for (const c of children) node.append(c);
  return node;
}

/** A text node whose set() touches the DOM only when the text changes. */
export class Text {
  constructor(initial = "") {
    this.node = document.createTextNode(initial);
    this.value = initial;
  }

  set(value) {
    const s = String(value);
    if (s !== this.value) {
      this.value = s;
      this.node.data = s;
    }
  }
}

/** Set an element's text, changing its one text node in place (no child nodes replaced). */
export function setText(node, text) {
  const first = node.firstChild;
  if (first && first.nodeType === Node.TEXT_NODE && first === node.lastChild) {
    if (first.data !== text) first.data = text;
  } else if (node.textContent !== text) {
    node.textContent = text;
  }
}

const DASH = "\u2013";

export function fmtInt(n) {
  return typeof n === "number" ? n.toLocaleString("en-US") : DASH;
}

export function fmtNum(n, digits = 1) {
  return typeof n === "number" && Number.isFinite(n) ? n.toFixed(digits) : DASH;
}

export function fmtMs(n) {
  if (typeof n !== "number" || !Number.isFinite(n)) return DASH;
  return n >= 100 ? n.toFixed(0) : n.toFixed(1);
}

export function fmtPct(x) {
  return typeof x === "number" ? `${Math.round(x * 100)}%` : DASH;
}

export function fmtAge(s) {
  if (typeof s !== "number") return DASH;
  if (s < 60) return `${s.toFixed(0)} s`;
  if (s < 3600) return `${(s / 60).toFixed(0)} min`;
  return `${(s / 3600).toFixed(1)} h`;
}

/** "superseded 3 · throttled 40": the reasons that happened, largest first. */
export function fmtReasons(byReason) {
  const parts = Object.entries(byReason || {})
    .filter(([, n]) => n > 0)
    .sort((a, b) => b[1] - a[1])
    .map(([r, n]) => `${r} ${n.toLocaleString("en-US")}`);
  return parts.length ? parts.join(" \u00b7 ") : "none";
}

/**
 * A table body with one row per key, created once; update() adds and removes rows and sets only
 * the text that changed. columns: [{cls, text: (row) => string}] or [{cls, button, onClick}].
 */
export class KeyedTable {
  constructor(tbody, columns, attr) {
    this.tbody = tbody;
    this.columns = columns;
    this.attr = attr;
    this.rows = new Map();
  }

  update(data) {
    for (const [key, row] of this.rows) {
      if (!(key in data)) {
        row.tr.remove();
        this.rows.delete(key);
      }
    }
    let order = false;
    for (const key of Object.keys(data).sort()) {
      let row = this.rows.get(key);
      if (!row) {
        row = this.create(key);
        this.rows.set(key, row);
        order = true;
      }
      this.columns.forEach((c, i) => {
        if (c.text) row.cells[i].set(c.text(data[key], key));
      });
    }
    if (order) for (const key of [...this.rows.keys()].sort()) this.tbody.append(this.rows.get(key).tr);
  }

  create(key) {
    const tr = el("tr", { dataset: { [this.attr]: key } });
    const cells = this.columns.map((c) => {
      const td = el("td", { class: c.cls || "" });
      if (c.button) {
        const b = el("button", { type: "button", class: c.buttonClass || "" }, c.button);
        b.addEventListener("click", () => c.onClick(key, b));
        td.append(b);
        tr.append(td);
        return null;
      }
      const t = new Text();
      td.append(t.node);
      tr.append(td);
      return t;
    });
    return { tr, cells };
  }
}

/**
 * A button that needs a second click within 3 s (no blocking confirm() dialog); then runs act.
 */
export function confirmClick(button, label, act) {
  if (button.dataset.armed === "1") {
    button.dataset.armed = "";
    button.textContent = label;
    act();
    return;
  }
  button.dataset.armed = "1";
  button.textContent = "Click again to confirm";
  setTimeout(() => {
    if (button.dataset.armed === "1") {
      button.dataset.armed = "";
      button.textContent = label;
    }
  }, 3000);
}
