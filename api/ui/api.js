// The dashboard's only door to the server: JSON calls under /v1 and a job's server-sent events,
// each with `Authorization: Bearer <token>`. The token lives in this tab's sessionStorage and is
// never put in a URL (no query string, no hash), so it is in no history, log or Referer.

const KEY = "strata.token";

export const token = {
  get: () => sessionStorage.getItem(KEY),
  set: (value) => sessionStorage.setItem(KEY, value),
  clear: () => sessionStorage.removeItem(KEY),
};

// A failed call: the server's problem+json (its `detail`, `code`, `field`), or why none came.
export class Problem extends Error {
  constructor(status, body) {
    super(body.detail);
    this.status = status;
    this.detail = body.detail;
    this.code = body.code ?? null;
    this.field = body.field ?? null;
  }
}

// The one place that names the lineage endpoint of a node ({kind, id, attributes} as the graph
// gives it, or the dashboard's route). Stream-scoped adapter and snapshot routes would replace
// this line, e.g. `/streams/${s}/snapshots/${node.attributes.version}/lineage`.
export const lineagePath = (node) => `/lineage/${node.kind}/${node.id}`;

function headers(extra = {}) {
  return { Authorization: `Bearer ${token.get() ?? ""}`, ...extra };
}

async function send(path, init) {
  try {
    return await fetch(`/v1${path}`, { cache: "no-store", ...init });
  } catch (error) {
    if (error.name === "AbortError") throw error;
    throw new Problem(0, { detail: `the server did not answer (${error.message})` });
  }
}

async function problemOf(response) {
  let body = {};
  try {
    body = await response.json();
  } catch {
    // not JSON (a proxy's page): the status line is all there is
  }
  const detail = typeof body.detail === "string" && body.detail
    ? body.detail
    : `${response.status} ${response.statusText}`.trim();
  return new Problem(response.status, { ...body, detail });
}

// GET (or `method`) /v1`path`, with a JSON `body` when given; the parsed answer, or a Problem.
export async function api(path, { method = "GET", body, signal } = {}) {
  const init = { method, signal, headers: headers({ Accept: "application/json" }) };
  if (body !== undefined) {
    init.headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const response = await send(path, init);
  if (!response.ok) throw await problemOf(response);
  return response.status === 204 ? null : response.json();
}

// Every item of a cursor-paged list (`data`, `next_cursor`), at most `max` of them.
export async function allPages(path, { signal, limit = 500, max = 5000 } = {}) {
  const items = [];
  let cursor = 0;
  const sep = path.includes("?") ? "&" : "?";
  while (items.length < max) {
    const page = await api(`${path}${sep}limit=${limit}&cursor=${cursor}`, { signal });
    items.push(...page.data);
    if (page.next_cursor === null || page.next_cursor === undefined) break;
    cursor = page.next_cursor;
  }
  return items;
}

// One server-sent event block ("event:", "id:", "data:" lines; ":" comments) as
// {event, id, data}; data is parsed as JSON when it is JSON. null for a comment-only block.
export function parseEvent(block) {
  let event = "message";
  let id = null;
  const data = [];
  for (const line of block.split("\n")) {
    if (line === "" || line.startsWith(":")) continue;
    const colon = line.indexOf(":");
    const field = colon < 0 ? line : line.slice(0, colon);
    let value = colon < 0 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);
    if (field === "event") event = value;
    else if (field === "id") id = value;
    else if (field === "data") data.push(value);
  }
  if (data.length === 0 && event === "message") return null;
  const text = data.join("\n");
  let parsed = text;
  try {
    parsed = JSON.parse(text);
  } catch {
    // plain text data stays text
  }
  return { event, id, data: parsed };
}

// Read a text/event-stream body, calling onEvent for each event; true once `end` arrives.
export async function readEvents(body, onEvent) {
  const reader = body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return false;
    buffer += value;
    // lines end in \n, \r\n or \r; a \r that ends a chunk may be half of a \r\n: kept as it is
    const tail = buffer.endsWith("\r") ? 1 : 0;
    buffer = buffer.slice(0, buffer.length - tail).replace(/\r\n?/g, "\n") + (tail ? "\r" : "");
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const event = parseEvent(buffer.slice(0, cut));
      buffer = buffer.slice(cut + 2);
      if (event === null) continue;
      onEvent(event);
      if (event.event === "end") {
        await reader.cancel();
        return true;
      }
    }
  }
}

const pause = (ms, signal) => new Promise((resolve) => {
  const timer = setTimeout(resolve, ms);
  signal?.addEventListener("abort", () => { clearTimeout(timer); resolve(); }, { once: true });
});

// Follow GET /v1/jobs/{id}/events/stream until its `end` event (or `signal` aborts). The
// browser's EventSource cannot send an Authorization header, so the stream is read with fetch;
// a dropped connection resumes after the last event seen (Last-Event-ID), as EventSource would.
export async function followJob(jobId, onEvent, { signal } = {}) {
  let last = null;
  for (let attempt = 0; attempt < 30 && !signal?.aborted; attempt++) {
    const extra = { Accept: "text/event-stream" };
    if (last !== null) extra["Last-Event-ID"] = last;
    const response = await send(`/jobs/${jobId}/events/stream`, {
      signal, headers: headers(extra),
    });
    if (!response.ok) throw await problemOf(response);
    try {
      const ended = await readEvents(response.body, (event) => {
        if (event.id !== null) last = event.id;
        onEvent(event);
      });
      if (ended) return;
    } catch (error) {
      if (error.name === "AbortError" || signal?.aborted) return;
    }
    await pause(1000, signal);
  }
}
