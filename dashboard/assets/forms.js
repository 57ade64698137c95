// The actions: each is a manifest shown before it is applied (the same text is sent, so a
// GitOps user can copy it into a repository), and the API's answer decides. A refusal's
// causes are written next to the fields they name (`details.causes[].field`); what names no
// field of the form is written above it.

import * as api from "./api.js";
import { el, replaceChildren } from "./views.js";
import { toYaml } from "./yaml.js";

/** The field manager of the dashboard's creates. */
export const MANAGER = "stratus-dashboard";

/** Text as base64 of its UTF-8 bytes (a Server's `spec.userData`). */
function base64(text) {
  let bin = "";
  for (const b of new TextEncoder().encode(text)) {
    bin += String.fromCharCode(b);
  }
  return btoa(bin);
}

const given = (v) => (v === "" ? undefined : v);

/** Drops the keys whose value is undefined (nothing typed), recursively. */
function prune(obj) {
  if (Array.isArray(obj)) {
    return obj.map(prune);
  }
  if (obj === null || typeof obj !== "object") {
    return obj;
  }
  const out = {};
  for (const [k, v] of Object.entries(obj)) {
    if (v !== undefined) {
      out[k] = prune(v);
    }
  }
  return out;
}

function object(form, project, values, spec) {
  return prune({
    apiVersion: `${form.group}/v1`,
    kind: form.kind,
    metadata: { name: values.name, namespace: project },
    spec,
  });
}

/**
 * The create forms: each field's input id, label, the API field it fills (where the API's
 * causes point), its input type and, for suggestions, the list whose names it offers.
 */
export const FORMS = {
  server: {
    title: "Create a server",
    kind: "Server",
    group: "compute.stratus.dev",
    plural: "servers",
    view: "servers",
    fields: [
      { id: "name", label: "Name", path: "metadata.name", required: true },
      { id: "flavor", label: "Flavor", path: "spec.flavor", required: true, suggest: "flavors" },
      { id: "image", label: "Image", path: "spec.image", suggest: "images" },
      { id: "network", label: "Network", path: "spec.networks", suggest: "networks" },
      { id: "keypair", label: "Key pair", path: "spec.keypair", suggest: "keypairs" },
      { id: "userData", label: "User data (cloud-init)", path: "spec.userData", type: "textarea" },
      { id: "description", label: "Description", path: "spec.description" },
    ],
    build(project, v) {
      return object(this, project, v, {
        flavor: v.flavor,
        image: given(v.image),
        networks: v.network ? [{ network: v.network }] : undefined,
        keypair: given(v.keypair),
        userData: v.userData ? base64(v.userData) : undefined,
        description: given(v.description),
      });
    },
  },
  network: {
    title: "Create a network",
    kind: "Network",
    group: "network.stratus.dev",
    plural: "networks",
    view: "networks",
    fields: [
      { id: "name", label: "Name", path: "metadata.name", required: true },
      { id: "mtu", label: "MTU (empty: the default)", path: "spec.mtu", type: "number" },
      { id: "description", label: "Description", path: "spec.description" },
    ],
    build(project, v) {
      return object(this, project, v, {
        mtu: v.mtu === "" ? undefined : Number(v.mtu),
        description: given(v.description),
      });
    },
  },
  volume: {
    title: "Create a volume",
    kind: "Volume",
    group: "storage.stratus.dev",
    plural: "volumes",
    view: "volumes",
    fields: [
      { id: "name", label: "Name", path: "metadata.name", required: true },
      { id: "sizeGiB", label: "Size (GiB)", path: "spec.sizeGiB", type: "number", required: true },
      { id: "image", label: "From image (empty: blank)", path: "spec.source", suggest: "images" },
      { id: "bootable", label: "Bootable", path: "spec.bootable", type: "checkbox" },
      { id: "description", label: "Description", path: "spec.description" },
    ],
    build(project, v) {
      return object(this, project, v, {
        sizeGiB: v.sizeGiB === "" ? undefined : Number(v.sizeGiB),
        source: v.image ? { image: v.image } : undefined,
        bootable: v.bootable || undefined,
        description: given(v.description),
      });
    },
  },
};

/** Where each form's suggestions are read (one LIST when the form opens). */
const SUGGEST = {
  flavors: ["compute.stratus.dev", "flavors", false],
  images: ["image.stratus.dev", "images", true],
  networks: ["network.stratus.dev", "networks", true],
  keypairs: ["compute.stratus.dev", "keypairs", true],
};

/**
 * The field of `fields` a cause's path names: the field itself or anything under it
 * (`spec.networks[0].network` is the network field's).
 */
export function fieldOf(fields, path) {
  return fields.find((f) => path === f.path || path.startsWith(`${f.path}.`)
    || path.startsWith(`${f.path}[`));
}

/**
 * Writes an API refusal into a form: each cause next to the field it names, the rest (and a
 * refusal without causes) in `general`. A name already taken is the name field's.
 */
export function showRefusal(e, fields, errorOf, general) {
  const causes = (e instanceof api.ApiError && e.status && e.status.details
    && Array.isArray(e.status.details.causes)) ? e.status.details.causes : [];
  const rest = [];
  for (const c of causes) {
    const field = typeof c.field === "string" ? fieldOf(fields, c.field) : undefined;
    const message = String(c.message || c.reason || "invalid");
    if (field) {
      const p = errorOf(field);
      p.textContent = p.textContent ? `${p.textContent}; ${message}` : message;
    } else {
      rest.push(c.field ? `${c.field}: ${message}` : message);
    }
  }
  const taken = e instanceof api.ApiError && e.code === 409 && e.status
    && e.status.reason === "AlreadyExists";
  const name = fields.find((f) => f.path === "metadata.name");
  if (taken && name) {
    errorOf(name).textContent = e.message;
  } else if (causes.length === 0 || rest.length > 0) {
    general.textContent = e instanceof api.ApiError ? `${e.message} (${e.code})` : String(e);
  }
}

/**
 * An open create form: its inputs, the manifest they make (shown as it is typed), and the
 * POST of that manifest.
 */
export class CreateForm {
  /**
   * @param {string} name a key of FORMS
   * @param {string} project the project it creates in
   * @param {HTMLElement} host where the form is drawn
   * @param {(form: object, created: object) => void} onCreated called after the API created it
   */
  constructor(name, project, host, onCreated) {
    this.def = FORMS[name];
    this.name = name;
    this.project = project;
    this.onCreated = onCreated;
    this.inputs = new Map();
    this.errors = new Map();
    this.draw(host);
    this.update();
    this.suggest();
  }

  draw(host) {
    const def = this.def;
    const form = el("form", { className: "create", data: { form: this.name } });
    form.noValidate = true;
    form.append(el("h2", null, def.title));
    for (const f of def.fields) {
      let input;
      if (f.type === "textarea") {
        input = el("textarea");
        input.rows = 4;
        input.maxLength = 49152;
      } else {
        input = el("input");
        input.type = f.type || "text";
        if (input.type === "text") {
          input.maxLength = 255;
          input.autocomplete = "off";
        }
      }
      input.id = `f-${this.name}-${f.id}`;
      input.dataset.field = f.path;
      if (f.suggest) {
        const list = el("datalist");
        list.id = `${input.id}-list`;
        input.setAttribute("list", list.id);
        form.append(list);
      }
      const label = el("label", null, f.label);
      label.htmlFor = input.id;
      const error = el("p", { className: "field-error", data: { for: f.path } });
      error.setAttribute("role", "alert");
      form.append(el("div", { className: f.type === "checkbox" ? "field check" : "field" }, label, input, error));
      input.addEventListener("input", () => {
        // What the API said of the field was said of what it held then.
        error.textContent = "";
        this.update();
      });
      input.addEventListener("change", () => this.update());
      this.inputs.set(f.id, input);
      this.errors.set(f.path, error);
    }
    this.general = el("p", { className: "error form-error" });
    this.general.setAttribute("role", "alert");
    this.manifest = el("pre", { className: "manifest" });
    const apply = el("button", { className: "apply" }, `Create ${def.kind.toLowerCase()}`);
    apply.type = "submit";
    const copy = el("button", { className: "copy" }, "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => copyText(this.manifest));
    const cancel = el("a", { className: "cancel", href: `#${def.view}` }, "Cancel");
    form.append(this.general, el("div", { className: "buttons" }, apply, cancel));
    const side = el("div", { className: "manifest-side" },
      el("h3", null, "The manifest it applies"),
      el("p", { className: "muted" }, `kubectl -n ${this.project} create -f -`),
      this.manifest, copy);
    form.addEventListener("submit", (ev) => {
      ev.preventDefault();
      this.apply();
    });
    replaceChildren(host, [el("div", { className: "create-layout" }, form, side)]);
  }

  values() {
    const v = {};
    for (const [id, input] of this.inputs) {
      // User data is the guest's to read as typed; a name or a number has no spaces.
      v[id] = input.type === "checkbox" ? input.checked
        : input.tagName === "TEXTAREA" ? input.value : input.value.trim();
    }
    return v;
  }

  /** The manifest for what is typed now. */
  text() {
    return toYaml(this.def.build(this.project, this.values()));
  }

  update() {
    this.manifest.textContent = this.text();
  }

  clearErrors() {
    for (const p of this.errors.values()) {
      p.textContent = "";
    }
    this.general.textContent = "";
  }

  async apply() {
    this.clearErrors();
    const text = this.text();
    this.manifest.textContent = text;
    const path = `${api.collection(this.def.group, "v1", this.def.plural, this.project)}?fieldManager=${MANAGER}`;
    try {
      const created = await api.send("POST", path, text, "application/yaml");
      this.onCreated(this.def, created);
    } catch (e) {
      showRefusal(e, this.def.fields, (f) => this.errors.get(f.path), this.general);
    }
  }

  /** Fills the suggestion lists: names the user may pick, or type past. */
  async suggest() {
    for (const f of this.def.fields.filter((x) => x.suggest)) {
      const [group, plural, namespaced] = SUGGEST[f.suggest];
      try {
        const list = await api.request("GET",
          api.collection(group, "v1", plural, namespaced ? this.project : undefined));
        const names = (list.items || []).map((o) => String((o.metadata || {}).name || "")).sort();
        const datalist = this.inputs.get(f.id).list;
        if (datalist) {
          replaceChildren(datalist, names.map((n) => {
            const o = el("option");
            o.value = n;
            return o;
          }));
        }
      } catch {
        // No suggestions: the name is typed.
      }
    }
  }
}

/** Puts an element's text on the clipboard (where the browser allows it), else selects it. */
export function copyText(node) {
  const select = () => {
    const range = document.createRange();
    range.selectNodeContents(node);
    const sel = window.getSelection();
    sel.removeAllRanges();
    sel.addRange(range);
  };
  if (navigator.clipboard && navigator.clipboard.writeText) {
    navigator.clipboard.writeText(node.textContent).catch(select);
  } else {
    select();
  }
}

/** The server actions: a field manager of their own each, so that one never drops another's field. */
const ACTIONS = {
  stop: { label: "Stop", manager: "stratus-dashboard-power", spec: () => ({ powerState: "Stopped" }) },
  start: { label: "Start", manager: "stratus-dashboard-power", spec: () => ({ powerState: "Running" }) },
  reboot: {
    label: "Reboot",
    manager: "stratus-dashboard-reboot",
    spec: () => ({ rebootRequest: new Date().toISOString() }),
  },
};

/** The actions a server offers, in the order of its buttons. */
export const SERVER_ACTIONS = ["stop", "start", "reboot", "delete"];

/**
 * A pending action on a server: its manifest (a server-side apply of only the fields it sets)
 * or, for a delete, the command, shown with a button that does it.
 */
export function actionPanel(action, project, name, host, onDone) {
  const collectionPath = api.collection("compute.stratus.dev", "v1", "servers", project);
  const objectPath = `${collectionPath}/${encodeURIComponent(name)}`;
  const error = el("p", { className: "error action-error" });
  error.setAttribute("role", "alert");
  const cancel = el("button", { className: "cancel" }, "Cancel");
  cancel.type = "button";
  cancel.addEventListener("click", () => {
    replaceChildren(host, []);
    host.hidden = true;
  });
  let doIt;
  let confirm;
  let shown;
  if (action === "delete") {
    shown = el("pre", { className: "manifest" }, `kubectl -n ${project} delete server ${name}`);
    confirm = el("button", { className: "confirm danger" }, `Delete ${name}`);
    doIt = () => api.request("DELETE", objectPath);
    host.replaceChildren(el("h3", null, `Delete server ${name}?`),
      el("p", null, "Its guest is shut down and its disks and ports are released. This cannot be undone."),
      shown);
  } else {
    const a = ACTIONS[action];
    const text = toYaml({
      apiVersion: "compute.stratus.dev/v1",
      kind: "Server",
      metadata: { name, namespace: project },
      spec: a.spec(),
    });
    shown = el("pre", { className: "manifest" }, text);
    confirm = el("button", { className: "confirm" }, `${a.label} ${name}`);
    const copy = el("button", { className: "copy" }, "Copy");
    copy.type = "button";
    copy.addEventListener("click", () => copyText(shown));
    doIt = () => api.send("PATCH", `${objectPath}?fieldManager=${a.manager}&force=true`, text,
      "application/apply-patch+yaml");
    host.replaceChildren(el("h3", null, `${a.label} server ${name}`),
      el("p", { className: "muted" },
        `kubectl apply --server-side --field-manager=${a.manager} --force-conflicts -f -`),
      shown, copy);
  }
  confirm.type = "button";
  confirm.addEventListener("click", async () => {
    error.textContent = "";
    confirm.disabled = true;
    try {
      await doIt();
      replaceChildren(host, []);
      host.hidden = true;
      onDone(action);
    } catch (e) {
      showRefusal(e, [], () => error, error);
    } finally {
      confirm.disabled = false;
    }
  });
  host.dataset.action = action;
  host.append(el("div", { className: "buttons" }, confirm, cancel), error);
  host.hidden = false;
}
