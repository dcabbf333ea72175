// The accuracy matrix of GET /v1/streams/{s}/evaluations as a heat map: one row per measured
// state, labelled with that state ("v0 + topic@v1"), one column per task, each cell coloured by
// its value; then ACC, BWT, FWT and forgetting, and every state the stream has measured.

import { fixed, h } from "./dom.js";

// Red (worst) through yellow to green (best); the text stays dark enough to read on each.
function colour(cell, goodness) {
  const v = Math.max(0, Math.min(1, goodness));
  cell.style.backgroundColor = `hsl(${Math.round(120 * v)}, 70%, ${Math.round(86 - 16 * v)}%)`;
}

// How good a value is, 0-1: an accuracy as it is; a loss against the largest one shown.
function scale(evals) {
  if (evals.metric !== "loss") return (v) => v;
  const all = [...evals.baseline, ...evals.states.flatMap((st) => st.values)].filter((v) => v !== null);
  const worst = Math.max(1e-9, ...all);
  return (v) => 1 - v / worst;
}

function cells(values, columns, goodness) {
  return Array.from({ length: columns }, (_, i) => {
    const value = values[i];
    const td = h("td", { class: "cell", dataset: { task: String(i) } }, fixed(value));
    if (value !== null && value !== undefined) {
      td.dataset.value = String(value);
      colour(td, goodness(value));
    }
    return td;
  });
}

function rowHead(title, state) {
  return h("th", { class: "state", scope: "row" }, title,
    h("span", { class: "label" }, state ? state.state : "not measured"));
}

// Which measured state each row of `values` is, as the registry builds the matrix: R[t] is the
// current lineage's first state that learned task t, the last row its newest state at that
// position, the baseline the untrained root snapshot (registry/store/evaluations.py).
export function rowStates(evals, tasks) {
  const index = new Map(tasks.map((task, i) => [task.position, i]));
  const lineage = evals.states.filter((st) => st.in_lineage);
  const learned = lineage.filter((st) => index.has(st.after_position));
  const rows = evals.values.map(() => null);
  for (const st of learned) {
    const row = index.get(st.after_position);
    if (row < rows.length && rows[row] === null) rows[row] = st;
  }
  const last = rows.length - 1;
  const newest = learned.filter((st) => index.get(st.after_position) === last).pop();
  if (newest) rows[last] = newest;
  const bases = lineage.filter((st) => st.after_position < 0);
  const root = Math.min(...bases.map((st) => st.snapshot_version));
  const baseline = bases.find((st) => st.snapshot_version === root) ?? null;
  return { rows, baseline };
}

function summary(evals) {
  const items = [["ACC", evals.average_accuracy, false], ["BWT", evals.backward_transfer, true],
    ["FWT", evals.forward_transfer, true], ["forgetting", evals.forgetting, true]];
  return h("dl", { class: "summary" }, items.map(([name, value, signed]) => h("div", {},
    h("dt", {}, name), h("dd", { dataset: { metric: name } }, fixed(value, { signed })))));
}

function header(evals) {
  return h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "state"),
    evals.task_names.map((name) => h("th", { scope: "col" }, name))));
}

export function heatmap(evals, tasks) {
  if (evals.values.length === 0) {
    return h("p", { class: "empty", id: "no-evaluations" }, evals.metric === "loss"
      ? "No loss measured: free-form tasks are scored by completion loss, classification tasks "
        + "by accuracy."
      : "No accuracy measured yet: a task's training job measures every task when it publishes.");
  }
  const columns = evals.task_names.length;
  const goodness = scale(evals);
  const { rows, baseline } = rowStates(evals, tasks);
  const body = [];
  if (evals.baseline.some((v) => v !== null)) {
    body.push(h("tr", { class: "baseline" }, rowHead("baseline", baseline),
      cells(evals.baseline, columns, goodness)));
  }
  evals.values.forEach((values, t) => {
    body.push(h("tr", { dataset: { row: String(t) } },
      rowHead(`after ${evals.task_names[t]}`, rows[t]), cells(values, columns, goodness)));
  });
  const matrix = h("table", { class: "heatmap", id: "matrix" }, header(evals), h("tbody", {}, body));
  return h("div", {}, h("p", { class: "muted" },
    `${evals.metric} of each task (column) in the state each row measured`), matrix,
    evals.metric === "accuracy" ? summary(evals) : null);
}

// Every measured state, first measured first; states outside the current lineage are dimmed.
export function statesTable(evals) {
  if (evals.states.length === 0) return h("p", { class: "empty" }, "No measured states.");
  const columns = evals.task_names.length;
  const goodness = scale(evals);
  const rows = evals.states.map((st) => {
    const after = st.after_position < 0 ? "base" : `after ${evals.task_names[st.after_position] ?? st.after_position}`;
    const title = `${st.kind}, ${after}${st.in_lineage ? "" : " (outside the current lineage)"}`;
    return h("tr", { class: st.in_lineage ? "" : "outside" }, rowHead(title, st), cells(st.values, columns, goodness));
  });
  return h("table", { class: "heatmap", id: "states" }, header(evals), h("tbody", {}, rows));
}
