// Building the page from data: every text goes in as a text node (never as HTML), so names and
// labels from the server cannot inject markup.

export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  setAttributes(el, attrs);
  append(el, children);
  return el;
}

const SVG = "http://www.w3.org/2000/svg";

export function s(tag, attrs = {}, ...children) {
  const el = document.createElementNS(SVG, tag);
  setAttributes(el, attrs);
  append(el, children);
  return el;
}

function setAttributes(el, attrs) {
  for (const [key, value] of Object.entries(attrs)) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "dataset") {
      Object.assign(el.dataset, value);
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
}

function append(el, children) {
  for (const child of children.flat(Infinity)) {
    if (child === undefined || child === null || child === false) continue;
    el.append(child instanceof Node ? child : String(child));
  }
}

// A table of `rows` (arrays of cells) under `headings`, or `empty` when there are none.
export function table(headings, rows, { empty = "none", attrs = {} } = {}) {
  if (rows.length === 0) return h("p", { class: "empty" }, empty);
  return h("table", attrs,
    h("thead", {}, h("tr", {}, headings.map((text) => h("th", { scope: "col" }, text)))),
    h("tbody", {}, rows.map((row) => (row instanceof Node ? row : h("tr", {}, row.map((cell) => h("td", {}, cell)))))));
}

export function section(title, id, ...children) {
  return h("section", { id }, h("h2", {}, title), ...children);
}

// A route inside the dashboard: `#/streams/news`; each part is encoded.
export const href = (...parts) => `#/${parts.map((p) => encodeURIComponent(String(p))).join("/")}`;

export const link = (text, ...parts) => h("a", { href: href(...parts) }, text);

export const when = (iso) => (iso ? new Date(iso).toLocaleString() : "");

export const fixed = (value, { signed = false } = {}) => {
  if (value === null || value === undefined) return "–";
  const text = value.toFixed(3);
  return signed && value >= 0 ? `+${text}` : text;
};

export function problemText(error) {
  return error.status ? `${error.status}: ${error.detail}` : error.detail ?? String(error);
}
