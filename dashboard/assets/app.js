// The page: logging in and out, the project switcher, and the live list or server detail the
// location's fragment names (`#servers`, `#servers/NAME`, `#networks`, ...).

import * as api from "./api.js";
import { Informer } from "./informer.js";
import {
  KINDS, conditionRows, eventRows, headerRow, renderRows, replaceChildren, serverFields, el,
} from "./views.js";

const $ = (id) => document.getElementById(id);

const state = {
  project: null,
  projects: [],
  view: "servers",
  detail: null,
  list: null,
  listKey: "",
  events: null,
  eventsKey: "",
  drawing: 0,
  ticker: 0,
};

function showError(message) {
  $("error").textContent = message || "";
}

function describe(e) {
  if (e instanceof api.ApiError) {
    return `${e.message} (${e.code})`;
  }
  return e && e.message ? e.message : String(e);
}

// ---- live lists -------------------------------------------------------------------------

function onListState(s, e) {
  const live = $("live");
  live.dataset.state = s;
  live.dataset.lists = String(state.list ? state.list.lists : 0);
  live.dataset.watches = String(state.list ? state.list.watches : 0);
  live.textContent = { listing: "loading…", live: "● live", reconnecting: "reconnecting…", refused: "refused" }[s] || s;
  if (s === "refused" && e && e.code === 401) {
    endSession("Your session has ended; log in again.");
    return;
  }
  if (s === "refused" || s === "reconnecting") {
    showError(describe(e));
  } else if (s === "live") {
    showError("");
  }
}

function stopInformers() {
  for (const key of ["list", "events"]) {
    if (state[key]) {
      state[key].stop();
      state[key] = null;
    }
  }
  state.listKey = "";
  state.eventsKey = "";
}

/** Starts the informers the current view needs (and stops those it no longer needs). */
function follow() {
  if (!api.loggedIn() || !state.project) {
    stopInformers();
    draw();
    return;
  }
  const kind = KINDS[state.view];
  const listKey = `${state.project}/${state.view}`;
  if (state.listKey !== listKey) {
    if (state.list) {
      state.list.stop();
    }
    state.listKey = listKey;
    const path = api.collection(kind.group, kind.version, kind.plural, state.project);
    state.list = new Informer(path, {}, draw, onListState).start();
    replaceChildren($("list").tBodies[0], []);
  }
  const eventsKey = state.detail ? `${state.project}/${state.view}/${state.detail}` : "";
  if (state.eventsKey !== eventsKey) {
    if (state.events) {
      state.events.stop();
      state.events = null;
    }
    state.eventsKey = eventsKey;
    if (state.detail) {
      const path = api.collection("", "v1", "events", state.project);
      const query = { fieldSelector: `involvedObject.kind=Server,involvedObject.name=${state.detail}` };
      state.events = new Informer(path, query, draw, () => {}).start();
    }
  }
  draw();
}

// ---- drawing ---------------------------------------------------------------------------

/** Draws on the next frame: many changes at once cost one drawing. */
function draw() {
  if (state.drawing === 0) {
    state.drawing = requestAnimationFrame(() => {
      state.drawing = 0;
      drawNow();
    });
  }
}

function drawNow() {
  const kind = KINDS[state.view];
  for (const a of $("tabs").querySelectorAll("a")) {
    a.classList.toggle("active", a.dataset.view === state.view);
  }
  const detail = Boolean(state.detail);
  $("list-view").hidden = detail;
  $("detail-view").hidden = !detail;
  const now = Date.now();
  if (!detail) {
    $("list-title").textContent = state.project ? `${kind.title} in ${state.project}` : kind.title;
    const thead = $("list").tHead;
    if (thead.dataset.view !== state.view) {
      replaceChildren(thead, [headerRow(kind)]);
      thead.dataset.view = state.view;
    }
    const items = state.list ? state.list.items : new Map();
    renderRows($("list").tBodies[0], kind, state.view, items, now);
    $("list-empty").textContent = items.size === 0 && state.list && state.list.lists > 0
      ? `No ${kind.title.toLowerCase()} in this project yet.`
      : "";
    return;
  }
  $("detail-title").textContent = `Server ${state.detail}`;
  const server = state.list ? state.list.items.get(`${state.project}/${state.detail}`) : undefined;
  if (!server) {
    replaceChildren($("detail-fields"), [el("dd", null, state.list && state.list.lists > 0
      ? "This server does not exist (or no longer exists)."
      : "loading…")]);
    replaceChildren($("conditions").tBodies[0], []);
  } else {
    replaceChildren($("detail-fields"), serverFields(server).flatMap(([k, v]) => [
      el("dt", null, k),
      el("dd", { data: { field: k.toLowerCase().replace(/ /g, "-") } }, v),
    ]));
    replaceChildren($("conditions").tBodies[0], conditionRows((server.status || {}).conditions, now));
  }
  const events = state.events ? [...state.events.items.values()] : [];
  replaceChildren($("events").tBodies[0], eventRows(events, now));
  $("events-empty").textContent = events.length === 0 ? "No events." : "";
}

// ---- the fragment ----------------------------------------------------------------------

function route() {
  let fragment = "";
  try {
    fragment = decodeURIComponent(location.hash.replace(/^#/, ""));
  } catch {
    // A malformed fragment shows the servers.
  }
  const [view, name] = fragment.split("/");
  state.view = KINDS[view] ? view : "servers";
  state.detail = KINDS[state.view].detail && name ? name : null;
  follow();
}

// ---- projects --------------------------------------------------------------------------

function setProjects(names, selected) {
  state.projects = [...new Set(names)].sort();
  replaceChildren($("project"), state.projects.map((n) => {
    const o = el("option", null, n);
    o.value = n;
    return o;
  }));
  if (selected) {
    $("project").value = selected;
  }
}

function switchProject(name) {
  state.project = name;
  $("project").value = name;
  stopInformers();
  follow();
}

/**
 * The projects this user can see: every Project for someone who may list them (a cluster-wide
 * role), otherwise the user's default project; more are opened by name.
 */
async function loadProjects() {
  try {
    const list = await api.request("GET", api.collection("identity.stratus.dev", "v1", "projects"));
    return (list.items || []).map((p) => p.metadata.name);
  } catch (e) {
    if (!(e instanceof api.ApiError) || e.code !== 403) {
      throw e;
    }
  }
  const me = await api.request("GET", `${api.collection("identity.stratus.dev", "v1", "users")}/${encodeURIComponent(api.currentUser())}`);
  const fallback = me.spec && me.spec.defaultProject;
  return fallback ? [fallback] : [];
}

async function openProject(name) {
  if (!/^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$/.test(name)) {
    showError(`"${name}" is not a project name: a DNS-1123 label (lower-case letters, digits and '-')`);
    return;
  }
  try {
    await api.request("GET", `${api.collection("", "v1", "namespaces")}/${encodeURIComponent(name)}`);
  } catch (e) {
    showError(e instanceof api.ApiError && (e.code === 403 || e.code === 404)
      ? `You have no role in a project "${name}" (${e.code}).`
      : describe(e));
    return;
  }
  showError("");
  setProjects([...state.projects, name], name);
  switchProject(name);
}

// ---- the session -----------------------------------------------------------------------

function showSession(on) {
  $("login-view").hidden = on;
  $("app-view").hidden = !on;
  $("session").hidden = !on;
}

function endSession(message) {
  stopInformers();
  state.project = null;
  state.projects = [];
  replaceChildren($("project"), []);
  replaceChildren($("list").tBodies[0], []);
  replaceChildren($("detail-fields"), []);
  replaceChildren($("conditions").tBodies[0], []);
  replaceChildren($("events").tBodies[0], []);
  $("user").textContent = "";
  $("live").textContent = "";
  $("live").dataset.state = "";
  clearInterval(state.ticker);
  showError("");
  showSession(false);
  $("login-error").textContent = message || "";
  api.logout();
}

async function onLogin(ev) {
  ev.preventDefault();
  const name = $("login-user").value.trim();
  const password = $("login-password").value;
  $("login-password").value = "";
  $("login-error").textContent = "";
  try {
    await api.login(name, password);
  } catch (e) {
    $("login-error").textContent = e instanceof api.ApiError && e.code === 401
      ? "Wrong user name or password."
      : describe(e);
    return;
  }
  $("user").textContent = api.currentUser();
  showSession(true);
  state.ticker = setInterval(draw, 5000);
  try {
    const projects = await loadProjects();
    setProjects(projects, projects[0]);
    if (projects.length === 0) {
      showError("No project known yet: open one by name.");
      follow();
      return;
    }
    switchProject(projects[0]);
  } catch (e) {
    showError(describe(e));
  }
}

function start() {
  $("login").addEventListener("submit", onLogin);
  $("logout").addEventListener("click", () => endSession("Logged out."));
  $("project").addEventListener("change", () => switchProject($("project").value));
  $("open-project").addEventListener("submit", (ev) => {
    ev.preventDefault();
    const name = $("open-project-name").value.trim();
    $("open-project-name").value = "";
    openProject(name);
  });
  window.addEventListener("hashchange", route);
  route();
}

start();
