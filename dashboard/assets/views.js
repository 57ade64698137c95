// What each list shows, and the DOM helpers that draw it. Everything that came from the API
// (names, descriptions, messages) is written as text (textContent), never parsed as HTML.

/** An element with text or child elements; `props` sets only className, dataset and href. */
export function el(tag, props, ...children) {
  const e = document.createElement(tag);
  if (props) {
    if (props.className) {
      e.className = props.className;
    }
    if (props.href) {
      e.href = props.href;
    }
    if (props.title) {
      e.title = props.title;
    }
    for (const [k, v] of Object.entries(props.data || {})) {
      e.dataset[k] = v;
    }
  }
  for (const c of children) {
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

/** `2h`, `5m`, `12s`, `3d`: how long ago `timestamp` was, as kubectl shows ages. */
export function age(timestamp, now) {
  const t = Date.parse(timestamp || "");
  if (Number.isNaN(t)) {
    return "";
  }
  const s = Math.max(0, Math.floor(((now || Date.now()) - t) / 1000));
  if (s < 120) {
    return `${s}s`;
  }
  if (s < 7200) {
    return `${Math.floor(s / 60)}m`;
  }
  if (s < 172800) {
    return `${Math.floor(s / 3600)}h`;
  }
  return `${Math.floor(s / 86400)}d`;
}

const meta = (o) => o.metadata || {};
const spec = (o) => o.spec || {};
const status = (o) => o.status || {};
const text = (v) => (v === undefined || v === null ? "" : String(v));

function addresses(server) {
  return (status(server).addresses || [])
    .map((a) => `${text(a.ip)} (${text(a.network)}${a.type === "Floating" ? ", floating" : ""})`)
    .join(", ");
}

function image(server) {
  const s = spec(server);
  const st = status(server);
  if (st.image) {
    return st.image;
  }
  if (s.image) {
    return s.image;
  }
  return s.bootVolume ? `volume ${s.bootVolume}` : "";
}

/**
 * The lists: each kind's API group, version and plural, and its columns (a key for tests and
 * styles, a heading, and the cell's text).
 */
export const KINDS = {
  servers: {
    title: "Servers",
    group: "compute.stratus.dev",
    version: "v1",
    plural: "servers",
    detail: true,
    columns: [
      ["phase", "Phase", (o) => status(o).phase || "Pending"],
      ["power", "Power", (o) => text(status(o).powerState)],
      ["node", "Node", (o) => text(status(o).hypervisor)],
      ["addresses", "Addresses", addresses],
      ["flavor", "Flavor", (o) => text(status(o).flavor || spec(o).flavor)],
      ["image", "Image", image],
    ],
  },
  networks: {
    title: "Networks",
    group: "network.stratus.dev",
    version: "v1",
    plural: "networks",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["segmentation", "Segmentation", (o) => text(spec(o).segmentation)],
      ["vni", "VNI", (o) => text(status(o).vni)],
      ["external", "External", (o) => (spec(o).external ? "yes" : "no")],
      ["description", "Description", (o) => text(spec(o).description)],
    ],
  },
  ports: {
    title: "Ports",
    group: "network.stratus.dev",
    version: "v1",
    plural: "ports",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["network", "Network", (o) => text(spec(o).network)],
      ["mac", "MAC", (o) => text(status(o).macAddress)],
      ["ips", "IPs", (o) => (status(o).fixedIPs || []).map((a) => text(a.ipAddress)).join(", ")],
      ["server", "Server", (o) => text(status(o).boundTo)],
    ],
  },
  volumes: {
    title: "Volumes",
    group: "storage.stratus.dev",
    version: "v1",
    plural: "volumes",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["size", "Size GiB", (o) => text(spec(o).sizeGiB)],
      ["attached", "Attached to", (o) => text(status(o).attachedTo)],
      ["node", "Node", (o) => text(status(o).node)],
      ["description", "Description", (o) => text(spec(o).description)],
    ],
  },
  images: {
    title: "Images",
    group: "image.stratus.dev",
    version: "v1",
    plural: "images",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["format", "Disk format", (o) => text(spec(o).diskFormat)],
      ["visibility", "Visibility", (o) => text(spec(o).visibility)],
      ["size", "Size", (o) => text(status(o).sizeBytes)],
    ],
  },
  keypairs: {
    title: "Key pairs",
    group: "compute.stratus.dev",
    version: "v1",
    plural: "keypairs",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["fingerprint", "Fingerprint", (o) => text(status(o).fingerprint)],
    ],
  },
};

/** The header row of a kind's table. */
export function headerRow(kind) {
  return el("tr", null,
    el("th", null, "Name"),
    ...kind.columns.map(([key, heading]) => el("th", { data: { col: key } }, heading)),
    el("th", { data: { col: "age" } }, "Age"));
}

function setText(cell, value) {
  if (cell.textContent !== value) {
    cell.textContent = value;
  }
}

/**
 * Brings `tbody` to `items` (a Map of objects), sorted by name: rows are kept per object and
 * only the cells whose text changed are written.
 */
export function renderRows(tbody, kind, viewName, items, now) {
  const rows = new Map();
  for (const tr of tbody.children) {
    rows.set(tr.dataset.key, tr);
  }
  const objs = [...items.values()].sort((a, b) => text(meta(a).name).localeCompare(text(meta(b).name)));
  let at = tbody.firstElementChild;
  for (const obj of objs) {
    const name = text(meta(obj).name);
    const key = `${text(meta(obj).namespace)}/${name}`;
    let tr = rows.get(key);
    if (tr) {
      rows.delete(key);
    } else {
      const nameCell = kind.detail
        ? el("td", { data: { col: "name" } }, el("a", { href: `#${viewName}/${encodeURIComponent(name)}` }, name))
        : el("td", { data: { col: "name" } }, name);
      tr = el("tr", { data: { key, name } },
        nameCell,
        ...kind.columns.map(([col]) => el("td", { data: { col } })),
        el("td", { data: { col: "age" } }));
    }
    kind.columns.forEach(([, , cell], i) => setText(tr.children[i + 1], cell(obj)));
    setText(tr.lastElementChild, age(meta(obj).creationTimestamp, now));
    if (at === tr) {
      at = tr.nextElementSibling;
    } else {
      tbody.insertBefore(tr, at);
    }
  }
  for (const gone of rows.values()) {
    gone.remove();
  }
}

/** Replaces `parent`'s children with `children`. */
export function replaceChildren(parent, children) {
  parent.replaceChildren(...children);
}

/** A definition list's entries for a server's detail page. */
export function serverFields(server) {
  const s = spec(server);
  const st = status(server);
  return [
    ["Description", text(s.description)],
    ["Phase", st.phase || "Pending"],
    ["Power state", `${text(st.powerState) || "—"} (wanted: ${text(s.powerState) || "Running"})`],
    ["Node", text(st.hypervisor)],
    ["Flavor", text(st.flavor || s.flavor)],
    ["Image", image(server)],
    ["Addresses", addresses(server)],
    ["Key pair", text(s.keypair)],
    ["Networks", (s.networks || []).map((n) => text(n.network || n.port)).join(", ")],
    ["Volumes", (s.volumes || []).map((v) => text(v.volume)).join(", ")],
    ["Launched", text(st.launchedAt)],
    ["Created", text(meta(server).creationTimestamp)],
    ["UID", text(meta(server).uid)],
  ];
}

/** Rows of a conditions table. */
export function conditionRows(conditions, now) {
  return (conditions || []).map((c) => el("tr", { data: { type: text(c.type) } },
    el("td", null, text(c.type)),
    el("td", null, text(c.status)),
    el("td", null, text(c.reason)),
    el("td", { data: { col: "message" } }, text(c.message)),
    el("td", null, age(c.lastTransitionTime, now))));
}

/** When an Event last happened (core/v1 has several places for it). */
export function eventTime(e) {
  return e.lastTimestamp || e.eventTime || (e.series && e.series.lastObservedTime)
    || e.firstTimestamp || meta(e).creationTimestamp || "";
}

/** Rows of an Events table, newest first. */
export function eventRows(events, now) {
  return [...events]
    .sort((a, b) => text(eventTime(b)).localeCompare(text(eventTime(a))))
    .map((e) => el("tr", { data: { reason: text(e.reason) } },
      el("td", null, text(e.type)),
      el("td", null, text(e.reason)),
      el("td", { data: { col: "message" } }, text(e.message || e.note)),
      el("td", null, text(e.reportingComponent || (e.source && e.source.component) || e.reportingController)),
      el("td", null, age(eventTime(e), now))));
}
