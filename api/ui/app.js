// The dashboard: log in by pasting a token, then hash routes (the server serves one page):
//   #/streams                 every stream
//   #/streams/NAME            a stream: tasks, accuracy heat map, snapshots, adapters, jobs, schedules
//   #/jobs/ID                 a job's progress, live over its event stream
//   #/lineage/KIND/ID[/DIR]   a node's ancestors (or descendants) as a graph
// Any failed request shows the server's problem+json `detail` above the page.

import { api, Problem, token } from "./api.js";
import { h } from "./dom.js";
import { jobPage, lineagePage, streamPage, streamsPage } from "./views.js";

const ROUTES = { streams: streamsPage, jobs: jobPage, lineage: lineagePage };
const view = document.getElementById("view");
const banner = document.getElementById("problem");
const logout = document.getElementById("logout");
let current = null; // the shown page's AbortController: leaving a page stops its requests

function report(error) {
  if (error?.name === "AbortError") return;
  const problem = error instanceof Problem ? error : new Problem(0, { detail: String(error) });
  banner.replaceChildren(h("span", { class: "status" }, problem.status ? `${problem.status}` : "Error"),
    h("span", { class: "detail", id: "problem-detail" }, problem.detail));
  banner.hidden = false;
  if (problem.status === 401) {
    token.clear();
    showLogin();
  }
}

function clearReport() {
  banner.hidden = true;
  banner.replaceChildren();
}

function navigate(target) {
  if (location.hash === target) route();  // the same page again: read it afresh
  else location.hash = target;
}

function showLogin() {
  current?.abort();
  logout.hidden = true;
  const input = h("input", { type: "password", id: "token", name: "token", autocomplete: "off",
    placeholder: "strata_...", required: true, "aria-label": "API token" });
  const form = h("form", { id: "login" }, h("h1", {}, "Log in"),
    h("p", { class: "muted" }, "Paste an API token (", h("code", {}, "strata serve"),
      " prints the first one; ", h("code", {}, "strata tokens create"), " makes more). It is kept "
      + "in this tab's session storage only, and sent only in the Authorization header."),
    h("div", { class: "row" }, input, h("button", { type: "submit" }, "Log in")));
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    clearReport();
    token.set(input.value.trim());
    try {
      await api("/streams?limit=1"); // does the server take it?
    } catch (error) {
      token.clear();
      report(error);
      return;
    }
    route();
  });
  view.replaceChildren(form);
  input.focus();
}

// Show the page the hash names; `quiet`: redraw the shown page in place (no "Loading…").
async function route({ quiet = false } = {}) {
  current?.abort();
  current = new AbortController();
  const { signal } = current;
  clearReport();
  if (!token.get()) {
    showLogin();
    return;
  }
  logout.hidden = false;
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean).map(decodeURIComponent);
  const [name = "streams", ...rest] = parts;
  const page = name === "streams" && rest.length ? streamPage : ROUTES[name];
  if (!quiet) view.replaceChildren(h("p", { class: "muted" }, "Loading…"));
  const refresh = () => { if (!signal.aborted) route({ quiet: true }); };
  try {
    if (!page) throw new Problem(0, { detail: `no such page: #/${parts.join("/")}` });
    const shown = await page(rest, { signal, navigate, report, refresh });
    if (!signal.aborted) view.replaceChildren(shown);
  } catch (error) {
    if (signal.aborted || error?.name === "AbortError") return;
    report(error);
    if (token.get()) {
      view.replaceChildren(h("p", {}, h("a", { href: "#/streams" }, "Back to the streams")));
    }
  }
}

logout.addEventListener("click", () => {
  token.clear();
  clearReport();
  showLogin();
});
window.addEventListener("hashchange", () => route());
route();
