// A lineage graph (GET /v1/lineage/{kind}/{id}) drawn as inline SVG: one column per depth from
// the root, an arrow per edge labelled with its relation (child -> parent), and each node a link
// to its own lineage (following an edge).

import { h, href, s } from "./dom.js";

const W = 230;
const H = 44;
const GAP_X = 110;
const GAP_Y = 22;
const PAD = 16;

const key = (node) => `${node.kind}:${node.id}`;
const short = (text, n) => (text.length > n ? `${text.slice(0, n - 1)}…` : text);
export const nodeRoute = (node, direction) => href("lineage", node.kind, node.id, direction);

// Columns by depth from the root; within a column, nodes ordered by the mean row of their
// neighbours in the column before (fewer crossing edges), then by kind and id.
function layout(graph) {
  const columns = new Map();
  for (const node of graph.nodes) {
    if (!columns.has(node.depth)) columns.set(node.depth, []);
    columns.get(node.depth).push(node);
  }
  const depths = [...columns.keys()].sort((a, b) => a - b);
  const neighbours = new Map(graph.nodes.map((n) => [key(n), []]));
  for (const e of graph.edges) {
    neighbours.get(e.child)?.push(e.parent);
    neighbours.get(e.parent)?.push(e.child);
  }
  const row = new Map();
  const at = new Map();
  depths.forEach((depth, col) => {
    const mean = (node) => {
      const rows = neighbours.get(key(node)).filter((k) => row.has(k)).map((k) => row.get(k));
      return rows.length ? rows.reduce((a, b) => a + b, 0) / rows.length : Infinity;
    };
    const nodes = columns.get(depth).map((n) => [mean(n), n]);
    nodes.sort(([ma, a], [mb, b]) => ma - mb || a.kind.localeCompare(b.kind) || a.id - b.id);
    nodes.forEach(([, node], i) => {
      row.set(key(node), i);
      at.set(key(node), { x: PAD + col * (W + GAP_X), y: PAD + i * (H + GAP_Y) });
    });
  });
  const tallest = Math.max(1, ...[...columns.values()].map((c) => c.length));
  return {
    at,
    width: 2 * PAD + depths.length * W + Math.max(0, depths.length - 1) * GAP_X + 70,
    height: 2 * PAD + tallest * H + (tallest - 1) * GAP_Y,
  };
}

function edgeShape(edge, at) {
  const child = at.get(edge.child);
  const parent = at.get(edge.parent);
  if (!child || !parent) return null;
  const [cy, py] = [child.y + H / 2, parent.y + H / 2];
  let d;
  let label;
  if (child.x === parent.x) { // same depth: a loop out to the right of the column
    const x = child.x + W;
    d = `M ${x} ${cy} C ${x + 60} ${cy}, ${x + 60} ${py}, ${x} ${py}`;
    label = [x + 48, (cy + py) / 2];
  } else { // from the side of each box that faces the other
    const [cx, px] = child.x < parent.x ? [child.x + W, parent.x] : [child.x, parent.x + W];
    d = `M ${cx} ${cy} L ${px} ${py}`;
    label = [(cx + px) / 2, (cy + py) / 2 - 4];
  }
  return s("g", { class: "edge", dataset: { child: edge.child, parent: edge.parent } },
    s("path", { d, "marker-end": "url(#arrow)" }),
    s("text", { x: label[0], y: label[1], "text-anchor": "middle" }, edge.relation));
}

function nodeShape(node, graph, at, navigate) {
  const { x, y } = at.get(key(node));
  const root = key(node) === graph.root;
  const go = () => navigate(nodeRoute(node, graph.direction));
  return s("g", {
    class: `node ${node.kind}${root ? " root" : ""}`, tabindex: 0, role: "link",
    "aria-label": node.label, dataset: { node: key(node) },
    transform: `translate(${x}, ${y})`,
    onclick: go,
    onkeydown: (event) => { if (event.key === "Enter" || event.key === " ") go(); },
  },
  s("title", {}, node.label),
  s("rect", { width: W, height: H, rx: 6 }),
  s("text", { class: "kind", x: 10, y: 15 }, `${node.kind} ${node.id}`),
  s("text", { x: 10, y: 33 }, short(node.label, 34)));
}

export function lineageSvg(graph, navigate) {
  const { at, width, height } = layout(graph);
  return s("svg", {
    class: "lineage", width, height, viewBox: `0 0 ${width} ${height}`, role: "img",
    "aria-label": `lineage of ${graph.root}`, dataset: { root: graph.root, direction: graph.direction },
  },
  s("defs", {}, s("marker", { id: "arrow", viewBox: "0 0 10 10", refX: 10, refY: 5,
    markerWidth: 7, markerHeight: 7, orient: "auto-start-reverse" },
  s("path", { d: "M 0 0 L 10 5 L 0 10 z" }))),
  graph.edges.map((edge) => edgeShape(edge, at)),
  graph.nodes.map((node) => nodeShape(node, graph, at, navigate)));
}

// The same edges as text, each end a link: readable without the picture.
export function edgeList(graph) {
  const byKey = new Map(graph.nodes.map((n) => [key(n), n]));
  const end = (k) => {
    const node = byKey.get(k);
    return node ? h("a", { href: nodeRoute(node, graph.direction) }, node.label) : k;
  };
  if (graph.edges.length === 0) return h("p", { class: "empty" }, "No edges.");
  return h("ul", { class: "edges" }, graph.edges.map((e) => h("li", {},
    end(e.child), " ", h("span", { class: "muted" }, `${e.relation} →`), " ", end(e.parent))));
}
