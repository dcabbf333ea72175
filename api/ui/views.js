// The dashboard's pages. Each takes the route's parts and a context {signal, navigate, report,
// refresh} and returns the element to show; a failed main request throws its Problem (the app
// shows its detail), a failed part of a page shows its detail in its own section.

import { allPages, api, followJob, lineagePath, Problem } from "./api.js";
import { fixed, h, href, link, problemText, section, table, when } from "./dom.js";
import { heatmap, statesTable } from "./heatmap.js";
import { edgeList, lineageSvg, nodeRoute } from "./lineage.js";

const TERMINAL = new Set(["succeeded", "failed", "cancelled"]);
const LIVE_JOBS = 3; // SSE streams a stream's page keeps open (browsers allow 6 per server)
const enc = encodeURIComponent;

// ---- streams -------------------------------------------------------------------------------
export async function streamsPage(_parts, ctx) {
  const streams = await allPages("/streams", { signal: ctx.signal });
  const rows = streams.map((st) => [link(st.name, "streams", st.name), st.state, st.method,
    h("code", {}, JSON.stringify(st.base_source)), when(st.created_at)]);
  return h("div", {}, h("h1", {}, "Streams"),
    section("Streams", "streams", table(["name", "state", "method", "base", "created"], rows,
      { empty: "No streams yet: create one with `strata streams create`." })));
}

// ---- one stream ----------------------------------------------------------------------------
export async function streamPage([name, metric = "accuracy"], ctx) {
  const { signal } = ctx;
  if (!["accuracy", "loss"].includes(metric)) {
    throw new Problem(0, { detail: `the matrix is of accuracy or loss, not ${metric}` });
  }
  const path = `/streams/${enc(name)}`;
  const stream = await api(path, { signal }); // a missing stream: its 404 detail, nothing else
  const [tasks, evals, snapshots, adapters, jobs, schedules] = await Promise.allSettled([
    api(`${path}/tasks`, { signal }),
    api(`${path}/evaluations?metric=${metric}`, { signal }),
    api(`${path}/snapshots`, { signal }),
    allPages(`${path}/adapters`, { signal }),
    allPages(`/jobs?stream=${enc(name)}`, { signal }),
    api(`${path}/schedules`, { signal }),
  ]);
  const taskList = tasks.status === "fulfilled" ? tasks.value.data : [];
  const part = (result, draw) => (result.status === "fulfilled" ? draw(result.value)
    : h("p", { class: "problem" }, problemText(result.reason)));
  return h("div", {},
    h("h1", {}, stream.name, " ", h("span", { class: "muted" }, `(${stream.state})`)),
    overview(stream, ctx),
    section("Tasks", "tasks", part(tasks, (t) => tasksTable(t.data))),
    section(metric === "loss" ? "Loss matrix" : "Accuracy matrix", "evaluations",
      metricSwitch(name, metric), part(evals, (e) => [heatmap(e, taskList),
      h("details", {}, h("summary", {}, "Every measured state"), statesTable(e))])),
    section("Snapshots", "snapshots", part(snapshots, (s) => snapshotsPart(s.data))),
    section("Adapters", "adapters", part(adapters, adaptersTable)),
    section("Jobs", "jobs", part(jobs, (j) => jobsTable(j, ctx))),
    section("Schedules", "schedules", part(schedules, (s) => schedulesTable(s.data, taskList))));
}

// Classification tasks are scored by accuracy, free-form ones by completion loss.
function metricSwitch(name, metric) {
  const choice = (m, ...route) => (m === metric ? h("b", {}, m) : h("a", { href: href(...route), id: `metric-${m}` }, m));
  return h("p", { class: "muted" }, "metric: ", choice("accuracy", "streams", name), " · ",
    choice("loss", "streams", name, "loss"));
}

function overview(stream, ctx) {
  const evaluate = h("button", { type: "button", id: "evaluate" }, "Evaluate now");
  evaluate.addEventListener("click", async () => {
    evaluate.disabled = true;
    try {
      const job = await api(`/streams/${enc(stream.name)}/evaluate`, { method: "POST", body: {} });
      ctx.navigate(href("jobs", job.id));
    } catch (error) {
      ctx.report(error);
      evaluate.disabled = false;
    }
  });
  return section("Stream", "overview", h("div", { class: "row" },
    h("span", {}, "method ", h("b", {}, stream.method)),
    h("span", {}, "base ", h("code", {}, JSON.stringify(stream.base_source))),
    h("span", {}, "created ", when(stream.created_at)), evaluate));
}

function tasksTable(tasks) {
  return table(["#", "task", "dataset", "created"], tasks.map((t) => [t.position + 1, t.name,
    h("code", { title: t.dataset_digest }, t.dataset_digest.slice(0, 12)),
    when(t.created_at)]), { empty: "No tasks yet." });
}

function snapshotsPart(snapshots) {
  const current = snapshots.find((sn) => sn.current);
  const lineage = (sn) => link("lineage", "lineage", "snapshot", sn.id);
  const head = current
    ? h("p", { id: "current-snapshot" }, "Current snapshot: ", h("b", {}, `v${current.version}`),
      ` (${Object.keys(current.source)[0] ?? "source unknown"}`, current.folded_adapter_ids.length
        ? `, folds adapters ${current.folded_adapter_ids.join(", ")})` : ")", " ", lineage(current))
    : h("p", { class: "empty" }, "No snapshot yet: the base model is being imported.");
  return [head, table(["version", "parent", "source", "digest", "created", ""],
    snapshots.map((sn) => [`v${sn.version}${sn.current ? " (current)" : ""}`, sn.parent_id ?? "",
      h("code", {}, JSON.stringify(sn.source)), h("code", {}, sn.artifact_digest.slice(0, 12)),
      when(sn.created_at), lineage(sn)]), { empty: "" })];
}

function adaptersTable(versions) {
  const rows = versions.map((v) => [v.task_name, `v${v.version}`, v.status,
    fixed(v.metrics?.accuracy), h("span", {}, v.aliases.map((a) => h("span", {
      class: `chip ${a}`,
    }, a))), Object.entries(v.tags).map(([k, val]) => h("span", { class: "chip" }, `${k}: ${val}`)),
    link("lineage", "lineage", "adapter", v.id)]);
  return table(["task", "version", "status", "accuracy", "aliases", "tags", ""], rows,
    { empty: "No adapters yet.", attrs: { id: "adapter-table" } });
}

// A job's progress bar and state, kept current from its event stream while it runs.
export function progressWidget(job) {
  const bar = h("progress", { max: 1, value: job.progress, dataset: { job: String(job.id) } });
  const label = h("span", { class: "job-state" });
  const update = (state, progress) => {
    bar.value = progress;
    bar.dataset.state = state;
    label.className = `job-state state-${state}`;
    label.textContent = ` ${state} ${Math.round(100 * progress)}%`;
  };
  update(job.state, job.progress);
  return { el: h("span", { class: "progress" }, bar, label), update };
}

// Follow a job's events: the widget moves with each `state`; onEvent sees every event.
export function follow(job, widget, ctx, onEvent = () => {}) {
  if (TERMINAL.has(job.state)) return Promise.resolve();
  return followJob(job.id, (event) => {
    if (event.event === "state") widget.update(event.data.state, event.data.progress);
    onEvent(event);
  }, { signal: ctx.signal }).catch((error) => {
    if (error.name !== "AbortError") ctx.report(error);
  });
}

function jobsTable(jobs, ctx) {
  const newest = [...jobs].reverse();
  let live = 0;
  const rows = newest.map((job) => {
    const widget = progressWidget(job);
    // a job that ends changes the page (evaluations, adapters, snapshots): read it again
    const ended = (event) => { if (event.event === "end") ctx.refresh(); };
    if (!TERMINAL.has(job.state) && live++ < LIVE_JOBS) follow(job, widget, ctx, ended);
    return [link(`#${job.id}`, "jobs", job.id), job.kind, widget.el, job.error?.message ?? "",
      when(job.created_at)];
  });
  return table(["job", "kind", "progress", "error", "created"], rows, { empty: "No jobs yet." });
}

function schedulesTable(schedules, tasks) {
  const names = new Map(tasks.map((t) => [t.id, t.name]));
  return table(["id", "kind", "cron", "task", "next run", "last run", "last job"],
    schedules.map((sc) => [sc.id, sc.kind, h("code", {}, sc.cron),
      sc.task_id === null ? "" : names.get(sc.task_id) ?? sc.task_id, when(sc.next_run_at),
      when(sc.last_run_at), sc.last_job_id === null ? "" : link(`#${sc.last_job_id}`, "jobs", sc.last_job_id)]),
    { empty: "No schedules." });
}

// ---- one job -------------------------------------------------------------------------------
export async function jobPage([id], ctx) {
  if (!/^\d+$/.test(id ?? "")) throw new Problem(0, { detail: `not a job id: ${id}` });
  const job = await api(`/jobs/${id}`, { signal: ctx.signal });
  const widget = progressWidget(job);
  const events = h("ol", { class: "events", id: "events" });
  const outcome = h("div", { id: "outcome" });
  const addEvent = (ev) => events.append(h("li", {}, h("span", { class: "muted" }, when(ev.created_at)),
    ` ${ev.level}: ${ev.message}`, ev.metrics ? h("code", {}, ` ${JSON.stringify(ev.metrics)}`) : null));
  const finish = (done) => {
    outcome.replaceChildren(
      done.error ? h("p", { class: "problem" }, `${done.error.code}: ${done.error.message}`) : null,
      done.result ? h("details", {}, h("summary", {}, "result"),
        h("pre", {}, JSON.stringify(done.result, null, 2))) : null);
  };
  const page = h("div", {}, h("h1", {}, `Job ${job.id} `, h("span", { class: "muted" }, `(${job.kind})`)),
    section("Progress", "progress", widget.el, outcome),
    section("Events", "job-events", events));
  if (TERMINAL.has(job.state)) {
    (await allPages(`/jobs/${id}/events`, { signal: ctx.signal, limit: 1000 })).forEach(addEvent);
    finish(job);
  } else {
    follow(job, widget, ctx, async (event) => {
      if (event.event === "job-event") addEvent(event.data);
      if (event.event === "end") {
        const done = await api(`/jobs/${id}`, { signal: ctx.signal });
        widget.update(done.state, done.progress);
        finish(done);
      }
    });
  }
  return page;
}

// ---- lineage -------------------------------------------------------------------------------
export async function lineagePage([kind, id, direction = "ancestors"], ctx) {
  if (!["ancestors", "descendants"].includes(direction)) {
    throw new Problem(0, { detail: `direction must be ancestors or descendants, not ${direction}` });
  }
  const node = { kind, id };
  const graph = await api(`${lineagePath(node)}?direction=${direction}`, { signal: ctx.signal });
  const root = graph.nodes.find((n) => `${n.kind}:${n.id}` === graph.root);
  const other = direction === "ancestors" ? "descendants" : "ancestors";
  return h("div", {},
    h("h1", { id: "lineage-title" }, `${direction === "ancestors" ? "Ancestors" : "Descendants"} of `,
      root ? root.label : graph.root),
    h("p", {}, h("a", { href: nodeRoute(node, other) }, `show ${other}`),
      h("span", { class: "muted" }, " · click a node to follow its edge")),
    section("Graph", "graph", lineageSvg(graph, ctx.navigate)),
    section("Edges", "edges", edgeList(graph)));
}
