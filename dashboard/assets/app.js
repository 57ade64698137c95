// The page: logging in and out, the project switcher, and the live list, server detail or
// create form the location's fragment names (`#servers`, `#servers/NAME`, `#networks`,
// `#create/server`, ...).

import * as api from "./api.js";
import { Informer } from "./informer.js";
import {
  KINDS, conditionRows, eventRows, headerRow, quotaHeaderRow, renderQuota, renderRows,
  replaceChildren, serverFields, consoleNote, el, FEED_ROWS,
} from "./views.js";
import { CreateForm, FORMS, actionPanel } from "./forms.js";
import { Topology } from "./topology.js";

const $ = (id) => document.getElementById(id);

const state = {
  project: null,
  projects: [],
  view: "servers",
  detail: null,
  create: null,
  form: null,
  topology: null,
  topologyKey: "",
  /** Counts the logins, so that an answer to an earlier session's request is dropped. */
  session: 0,
  list: null,
  listKey: "",
  events: null,
  eventsKey: "",
  drawing: 0,
  ticker: 0,
  /** The console log of the open server: its key, text (null until read) and error. */
  console: { key: "", log: null, error: null, timer: 0 },
};

/** How often an open server's console log is read again (the API serves it; no watch). */
const CONSOLE_MS = 5000;

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

/** Reads the open server's console log now and every CONSOLE_MS while its page is open. */
function followConsole() {
  const key = state.detail && state.view === "servers" && api.loggedIn() && state.project
    ? `${state.project}/${state.detail}`
    : "";
  const c = state.console;
  if (c.key === key) {
    return;
  }
  clearTimeout(c.timer);
  state.console = { key, log: null, error: null, timer: 0 };
  if (key === "") {
    return;
  }
  const [project, name] = [state.project, state.detail];
  const path = `${api.collection("compute.stratus.dev", "v1", "servers", project)}/${encodeURIComponent(name)}/console`;
  const read = async () => {
    let log = null;
    let error = null;
    try {
      log = await api.text(path);
    } catch (e) {
      error = e;
    }
    if (state.console.key !== key) {
      return;
    }
    state.console.log = log;
    state.console.error = error;
    state.console.timer = setTimeout(read, CONSOLE_MS);
    draw();
  };
  read();
}

function stopInformers() {
  for (const key of ["list", "events", "topology"]) {
    if (state[key]) {
      state[key].stop();
      state[key] = null;
    }
  }
  state.listKey = "";
  state.eventsKey = "";
  state.topologyKey = "";
  clearTimeout(state.console.timer);
  state.console = { key: "", log: null, error: null, timer: 0 };
}

/** Starts the informers the current view needs (and stops those it no longer needs). */
function follow() {
  if (!api.loggedIn() || !state.project) {
    stopInformers();
    draw();
    return;
  }
  if (state.view === "topology") {
    followTopology();
    return;
  }
  if (state.topology) {
    state.topology.stop();
    state.topology = null;
    state.topologyKey = "";
  }
  const kind = KINDS[state.view];
  const namespace = kind.admin ? undefined : state.project;
  const listKey = `${namespace || ""}/${state.view}`;
  if (state.listKey !== listKey) {
    if (state.list) {
      state.list.stop();
    }
    state.listKey = listKey;
    const path = api.collection(kind.group, kind.version, kind.plural, namespace);
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
  followConsole();
  draw();
}

/** The topology's four lists instead of the list and events of the other views. */
function followTopology() {
  for (const key of ["list", "events"]) {
    if (state[key]) {
      state[key].stop();
      state[key] = null;
    }
  }
  state.listKey = "";
  state.eventsKey = "";
  followConsole();
  if (state.topologyKey !== state.project) {
    if (state.topology) {
      state.topology.stop();
    }
    state.topologyKey = state.project;
    state.topology = new Topology(state.project, $("topology"), onListState, (empty) => {
      $("topology-empty").textContent = empty ? "No networks, routers or servers in this project yet." : "";
    });
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
  for (const a of $("tabs").querySelectorAll("a")) {
    a.classList.toggle("active", a.dataset.view === state.view);
  }
  const topology = state.view === "topology";
  $("topology-view").hidden = !topology;
  if (topology) {
    $("list-view").hidden = true;
    $("detail-view").hidden = true;
    $("create-view").hidden = true;
    $("topology-title").textContent = state.project ? `Topology of ${state.project}` : "Topology";
    return;
  }
  const kind = KINDS[state.view];
  const detail = Boolean(state.detail);
  const creating = Boolean(state.create);
  $("list-view").hidden = detail || creating;
  $("detail-view").hidden = !detail || creating;
  $("create-view").hidden = !creating;
  if (creating) {
    return;
  }
  const now = Date.now();
  if (!detail) {
    $("list-title").textContent = state.project && !kind.admin ? `${kind.title} in ${state.project}` : kind.title;
    const create = $("create-button");
    create.hidden = !kind.create;
    if (kind.create) {
      create.href = `#create/${kind.create}`;
      create.textContent = FORMS[kind.create].title;
    }
    const thead = $("list").tHead;
    if (thead.dataset.view !== state.view) {
      replaceChildren(thead, [kind.quota ? quotaHeaderRow() : headerRow(kind)]);
      replaceChildren($("list").tBodies[0], []);
      thead.dataset.view = state.view;
    }
    const items = state.list ? state.list.items : new Map();
    if (kind.quota) {
      renderQuota($("list").tBodies[0], items);
    } else {
      renderRows($("list").tBodies[0], kind, state.view, items, now);
    }
    $("list-empty").textContent = items.size === 0 && state.list && state.list.lists > 0
      ? (kind.quota ? "No quota in this project: nothing is limited." : `No ${kind.title.toLowerCase()} here yet.`)
      : kind.feed && items.size > FEED_ROWS ? `The ${FEED_ROWS} newest of ${items.size} are shown.` : "";
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
  const c = state.console;
  $("console-note").textContent = consoleNote(c.log, c.error);
  if ($("console").textContent !== (c.log || "")) {
    $("console").textContent = c.log || "";
  }
  $("console").hidden = !c.log;
  const events = state.events ? [...state.events.items.values()] : [];
  replaceChildren($("events").tBodies[0], eventRows(events, now));
  $("events-empty").textContent = events.length === 0 ? "No events." : "";
}

// ---- actions ---------------------------------------------------------------------------

/** Opens the create form the fragment names (once per visit: typing is not redrawn). */
function openForm() {
  if (!state.create || !state.project) {
    state.form = null;
    replaceChildren($("create-view"), []);
    return;
  }
  const key = `${state.project}/${state.create}`;
  if (state.form && state.form.key === key) {
    return;
  }
  const form = new CreateForm(state.create, state.project, $("create-view"), (def) => {
    state.form = null;
    location.hash = `#${def.view}`;
  });
  form.key = key;
  state.form = form;
}

function closeActionPanel() {
  replaceChildren($("action-panel"), []);
  $("action-panel").hidden = true;
}

function onAction(ev) {
  const button = ev.target.closest("button[data-action]");
  if (!button || !state.detail || !state.project) {
    return;
  }
  actionPanel(button.dataset.action, state.project, state.detail, $("action-panel"), (action) => {
    if (action === "delete") {
      location.hash = "#servers";
    }
  });
}

/**
 * Shows the admin tabs this user's token may list: the API answers one LIST of each (a 403
 * keeps its tab hidden; opening it by its fragment shows the same refusal).
 */
async function probeAdmin() {
  const session = state.session;
  for (const a of $("tabs").querySelectorAll("a.admin")) {
    const kind = KINDS[a.dataset.view];
    let allowed = "unknown";
    try {
      await api.request("GET", `${api.collection(kind.group, kind.version, kind.plural)}?limit=1`);
      allowed = "yes";
    } catch (e) {
      if (e instanceof api.ApiError && (e.code === 403 || e.code === 401)) {
        allowed = "no";
      }
    }
    if (!api.loggedIn() || state.session !== session) {
      return;
    }
    a.dataset.allowed = allowed;
    a.hidden = allowed !== "yes";
  }
}

function hideAdmin() {
  for (const a of $("tabs").querySelectorAll("a.admin")) {
    a.hidden = true;
    delete a.dataset.allowed;
  }
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
  if (view === "create" && FORMS[name]) {
    state.create = name;
    state.view = FORMS[name].view;
    state.detail = null;
  } else if (view === "topology") {
    state.create = null;
    state.view = view;
    state.detail = null;
  } else {
    state.create = null;
    state.view = KINDS[view] ? view : "servers";
    state.detail = KINDS[state.view].detail && name ? name : null;
  }
  closeActionPanel();
  openForm();
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
  state.form = null;
  closeActionPanel();
  openForm();
  follow();
}

/**
 * The projects this user can see: every Project for someone who may list them (a cluster-wide
 * role), otherwise the user's default project first and the projects the API names as the
 * user's own (the `extra` of the user's SelfSubjectReview, which names no other project);
 * more are opened by name.
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
  const review = await api.request("POST", api.collection("authentication.k8s.io", "v1", "selfsubjectreviews"),
    { apiVersion: "authentication.k8s.io/v1", kind: "SelfSubjectReview" });
  const extra = (review.status && review.status.userInfo && review.status.userInfo.extra) || {};
  const mine = extra["projects.stratus.dev/member-of"] || [];
  const fallback = me.spec && me.spec.defaultProject;
  return [...new Set([fallback, ...mine].filter(Boolean))];
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
  state.session += 1;
  stopInformers();
  state.project = null;
  state.projects = [];
  replaceChildren($("project"), []);
  replaceChildren($("list").tBodies[0], []);
  replaceChildren($("detail-fields"), []);
  replaceChildren($("conditions").tBodies[0], []);
  replaceChildren($("events").tBodies[0], []);
  state.form = null;
  replaceChildren($("create-view"), []);
  closeActionPanel();
  hideAdmin();
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
  probeAdmin();
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
  $("actions").addEventListener("click", onAction);
  window.addEventListener("hashchange", route);
  route();
}

start();
