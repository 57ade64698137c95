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

const num = (v, otherwise) => (typeof v === "number" && Number.isFinite(v) ? v : otherwise);

/** A usage bar's cell value: `used` of `total` (a <meter> and its text). */
export function bar(used, total, unit) {
  if (typeof total !== "number" || !Number.isFinite(total)) {
    return { used: 0, total: 0, text: "not reported" };
  }
  const t = Math.floor(total);
  return { used: num(used, 0), total: t, text: `${num(used, 0)} / ${t}${unit ? ` ${unit}` : ""}` };
}

/**
 * What a hypervisor can hold, as the scheduler counts it: its capacity less the host's
 * reservation, times the allocation ratio (the API's defaults where the spec is silent).
 */
export function allocatable(hv) {
  const s = spec(hv);
  const cap = status(hv).capacity;
  if (!cap) {
    return {};
  }
  const less = (a, b) => Math.max(0, num(a, 0) - num(b, 0));
  return {
    vcpus: less(cap.vcpus, s.reservedHostCPUs) * num(s.cpuAllocationRatio, 16),
    ramMiB: less(cap.ramMiB, num(s.reservedHostMemoryMiB, 512)) * num(s.ramAllocationRatio, 1.5),
    diskGiB: less(cap.diskGiB, s.reservedHostDiskGiB) * num(s.diskAllocationRatio, 1),
  };
}

function hvBar(resource, unit) {
  return (o) => bar((status(o).allocated || {})[resource] || 0, allocatable(o)[resource], unit);
}

const yesNo = (v) => (v ? "yes" : "no");

/**
 * The lists: each kind's API group, version and plural, and its columns (a key for tests and
 * styles, a heading, and the cell: its text, or a `bar`). `admin` kinds are read across the
 * cluster; their tabs show only once the API answered the user's LIST of them.
 */
export const KINDS = {
  servers: {
    title: "Servers",
    group: "compute.stratus.dev",
    version: "v1",
    plural: "servers",
    detail: true,
    create: "server",
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
    create: "network",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["segmentation", "Segmentation", (o) => text(spec(o).segmentation)],
      ["vni", "VNI", (o) => text(status(o).vni)],
      ["external", "External", (o) => yesNo(spec(o).external)],
      ["description", "Description", (o) => text(spec(o).description)],
    ],
  },
  subnets: {
    title: "Subnets",
    group: "network.stratus.dev",
    version: "v1",
    plural: "subnets",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["network", "Network", (o) => text(spec(o).network)],
      ["cidr", "CIDR", (o) => text(spec(o).cidr)],
      ["gateway", "Gateway", (o) => text(status(o).gatewayIP || spec(o).gatewayIP)],
      ["dhcp", "DHCP", (o) => (spec(o).enableDHCP === false ? "off" : text(status(o).dhcpIP) || "on")],
      ["ips", "Addresses used", (o) => bar(status(o).usedIPs,
        num(status(o).usedIPs, 0) + num(status(o).availableIPs, NaN))],
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
  routers: {
    title: "Routers",
    group: "network.stratus.dev",
    version: "v1",
    plural: "routers",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["gateway", "External gateway", (o) => text((spec(o).externalGateway || {}).network)],
      ["gateway-ips", "Gateway IPs", (o) => (status(o).externalGatewayIPs || []).map(text).join(", ")],
      ["interfaces", "Interfaces", (o) => (status(o).interfaces || spec(o).interfaces || [])
        .map((i) => (i.ipAddress ? `${text(i.subnet)} (${text(i.ipAddress)})` : text(i.subnet))).join(", ")],
      ["node", "Node", (o) => text(status(o).node)],
    ],
  },
  floatingips: {
    title: "Floating IPs",
    group: "network.stratus.dev",
    version: "v1",
    plural: "floatingips",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["address", "Address", (o) => text(status(o).floatingIPAddress)],
      ["network", "Network", (o) => text(spec(o).floatingNetwork)],
      ["port", "Port", (o) => text(spec(o).port)],
      ["fixed", "Fixed IP", (o) => text(status(o).fixedIP || spec(o).fixedIP)],
      ["router", "Router", (o) => text(status(o).router)],
    ],
  },
  volumes: {
    title: "Volumes",
    group: "storage.stratus.dev",
    version: "v1",
    plural: "volumes",
    create: "volume",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["size", "Size GiB", (o) => text(spec(o).sizeGiB)],
      ["attached", "Attached to", (o) => text(status(o).attachedTo)],
      ["node", "Node", (o) => text(status(o).node)],
      ["description", "Description", (o) => text(spec(o).description)],
    ],
  },
  snapshots: {
    title: "Snapshots",
    group: "storage.stratus.dev",
    version: "v1",
    plural: "volumesnapshots",
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["volume", "Volume", (o) => text(spec(o).volume)],
      ["size", "Size GiB", (o) => text(status(o).sizeGiB)],
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
  events: {
    title: "Events",
    group: "",
    version: "v1",
    plural: "events",
    feed: true,
    columns: [
      ["last-seen", "Last seen", (o, now) => age(eventTime(o), now)],
      ["type", "Type", (o) => text(o.type)],
      ["reason", "Reason", (o) => text(o.reason)],
      ["object", "Object", eventObject],
      ["message", "Message", (o) => text(o.message || o.note)],
      ["count", "Count", (o) => text(o.count || (o.series && o.series.count) || 1)],
    ],
  },
  quota: {
    title: "Quota",
    group: "identity.stratus.dev",
    version: "v1",
    plural: "quotas",
    quota: true,
    columns: [],
  },
  hypervisors: {
    title: "Hypervisors",
    group: "compute.stratus.dev",
    version: "v1",
    plural: "hypervisors",
    admin: true,
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["servers", "Servers", (o) => text(status(o).servers)],
      ["vcpus", "vCPUs allocated", hvBar("vcpus", "")],
      ["ram", "RAM allocated", hvBar("ramMiB", "MiB")],
      ["disk", "Disk allocated", hvBar("diskGiB", "GiB")],
      ["zone", "Zone", (o) => text(spec(o).availabilityZone)],
      ["disabled", "Disabled", (o) => (spec(o).disabled ? `yes: ${text(spec(o).disabledReason)}` : "no")],
    ],
  },
  storagepools: {
    title: "Storage pools",
    group: "storage.stratus.dev",
    version: "v1",
    plural: "storagepools",
    admin: true,
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["backend", "Backend", (o) => text(spec(o).backend)],
      ["node", "Node", (o) => text(spec(o).node)],
      ["space", "Allocated", (o) => bar(status(o).allocatedGiB, status(o).capacityGiB, "GiB")],
      ["volumes", "Volumes", (o) => text(status(o).volumes)],
    ],
  },
  projects: {
    title: "Projects",
    group: "identity.stratus.dev",
    version: "v1",
    plural: "projects",
    admin: true,
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["enabled", "Enabled", (o) => yesNo(spec(o).enabled !== false)],
      ["description", "Description", (o) => text(spec(o).description)],
    ],
  },
  users: {
    title: "Users",
    group: "identity.stratus.dev",
    version: "v1",
    plural: "users",
    admin: true,
    columns: [
      ["phase", "Status", (o) => text(status(o).phase)],
      ["display", "Display name", (o) => text(spec(o).displayName)],
      ["project", "Default project", (o) => text(spec(o).defaultProject)],
      ["enabled", "Enabled", (o) => yesNo(spec(o).enabled !== false)],
    ],
  },
  roleassignments: {
    title: "Role assignments",
    group: "identity.stratus.dev",
    version: "v1",
    plural: "roleassignments",
    admin: true,
    columns: [
      ["project", "Project", (o) => (spec(o).clusterWide ? "(every project)" : text(meta(o).namespace))],
      ["user", "User", (o) => text(spec(o).user)],
      ["role", "Role", (o) => text(spec(o).role)],
      ["phase", "Status", (o) => text(status(o).phase)],
    ],
  },
};

/** The quota resources, in the order shown, with their headings. */
const QUOTA = [
  ["servers", "Servers"], ["vcpus", "vCPUs"], ["ramMiB", "RAM MiB"], ["volumes", "Volumes"],
  ["volumeGiB", "Volume GiB"], ["snapshots", "Snapshots"], ["networks", "Networks"],
  ["subnets", "Subnets"], ["ports", "Ports"], ["routers", "Routers"],
  ["floatingIPs", "Floating IPs"], ["securityGroups", "Security groups"],
];

/**
 * Brings `tbody` to the usage bars of `quotas` (a Map of Quota objects): one row per limited
 * resource, its use against its limit.
 */
export function renderQuota(tbody, quotas) {
  const rows = [];
  const sorted = [...quotas.values()].sort((a, b) => text(meta(a).name).localeCompare(text(meta(b).name)));
  for (const q of sorted) {
    const limits = spec(q).limits || {};
    const used = status(q).used || {};
    for (const [key, heading] of QUOTA) {
      if (typeof limits[key] !== "number") {
        continue;
      }
      const tr = el("tr", { data: { key: `${text(meta(q).name)}/${key}`, name: key } },
        el("td", { data: { col: "name" } }, heading),
        el("td", { data: { col: "usage" } }),
        el("td", { data: { col: "quota" } }, text(meta(q).name)));
      setCell(tr.children[1], bar(used[key] || 0, limits[key], ""));
      rows.push(tr);
    }
  }
  replaceChildren(tbody, rows);
}

/** The header row of a kind's table (a feed has no name or age column of its own). */
export function headerRow(kind) {
  if (kind.feed) {
    return el("tr", null, ...kind.columns.map(([key, heading]) => el("th", { data: { col: key } }, heading)));
  }
  return el("tr", null,
    el("th", null, "Name"),
    ...kind.columns.map(([key, heading]) => el("th", { data: { col: key } }, heading)),
    el("th", { data: { col: "age" } }, "Age"));
}

/** The header row of the quota's table. */
export function quotaHeaderRow() {
  return el("tr", null, el("th", null, "Resource"), el("th", { data: { col: "usage" } }, "Used"),
    el("th", { data: { col: "quota" } }, "Quota"));
}

/** Writes a cell's text, its link or its bar (a <meter> and its text), only where it changed. */
function setCell(cell, value) {
  if (typeof value !== "object") {
    if (cell.textContent !== value) {
      cell.textContent = value;
    }
    return;
  }
  if ("href" in value) {
    const a = cell.querySelector("a");
    if (!a || a.getAttribute("href") !== value.href || a.textContent !== value.text) {
      replaceChildren(cell, [el("a", { href: value.href }, value.text)]);
    }
    return;
  }
  let meter = cell.querySelector("meter");
  if (!meter) {
    meter = el("meter");
    meter.min = 0;
    replaceChildren(cell, [meter, el("span", { className: "bar-text" })]);
  }
  meter.max = Math.max(value.total, 1);
  meter.high = meter.max * 0.8;
  meter.low = meter.max * 0.5;
  meter.optimum = 0;
  meter.value = value.used;
  meter.dataset.used = String(value.used);
  meter.dataset.total = String(value.total);
  const label = cell.querySelector(".bar-text");
  if (label.textContent !== value.text) {
    label.textContent = value.text;
  }
}

/** The most rows a feed shows: its newest, however many objects its list holds. */
export const FEED_ROWS = 200;

/**
 * By name, in code-unit order: names are DNS-1123 (lower-case ASCII), where that is the
 * alphabet's order, and it costs far less than a locale's comparison on every drawing of a
 * thousand rows.
 */
function byName(a, b) {
  const x = text(meta(a).name);
  const y = text(meta(b).name);
  return x < y ? -1 : (x > y ? 1 : 0);
}

/** Newest first (by when each Event last happened), then by name. */
function newestFirst(a, b) {
  const t = (e) => {
    const ms = Date.parse(eventTime(e));
    return Number.isNaN(ms) ? 0 : ms;
  };
  return t(b) - t(a) || byName(a, b);
}

/**
 * Brings `tbody` to `items` (a Map of objects), sorted by name (a feed: its newest
 * `FEED_ROWS`, newest first): rows are kept per object and only the cells whose text changed
 * are written.
 */
export function renderRows(tbody, kind, viewName, items, now) {
  const rows = new Map();
  for (const tr of tbody.children) {
    rows.set(tr.dataset.key, tr);
  }
  const objs = kind.feed
    ? [...items.values()].sort(newestFirst).slice(0, FEED_ROWS)
    : [...items.values()].sort(byName);
  const first = kind.feed ? 0 : 1;
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
      const cells = kind.columns.map(([col]) => el("td", { data: { col } }));
      tr = kind.feed
        ? el("tr", { data: { key, name } }, ...cells)
        : el("tr", { data: { key, name } }, nameCell, ...cells, el("td", { data: { col: "age" } }));
    }
    kind.columns.forEach(([, , cell], i) => setCell(tr.children[i + first], cell(obj, now)));
    if (kind.feed) {
      tr.dataset.type = text(obj.type);
    } else {
      setCell(tr.lastElementChild, age(meta(obj).creationTimestamp, now));
    }
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

/** What the console section says beside the log (or instead of it). */
export function consoleNote(log, error) {
  if (error) {
    return error.code === 403
      ? "Your role in this project does not let you read this server's console (403)."
      : `The console log cannot be read: ${error.message}`;
  }
  if (log === null) {
    return "loading…";
  }
  return log === ""
    ? "No console output yet: the node running the server has sent none."
    : "The last 64 KiB of the serial console, as the server's node last sent it (read every 5 s).";
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

/**
 * What an Event is about, as `kubectl get events` writes it (`server/web-1`): a link to the
 * object's page where the dashboard has one.
 */
export function eventObject(e) {
  const o = e.involvedObject || e.regarding || {};
  const label = `${text(o.kind).toLowerCase()}/${text(o.name)}`;
  const view = Object.keys(KINDS).find((v) => KINDS[v].detail && KINDS[v].plural === `${text(o.kind).toLowerCase()}s`);
  return view && o.name ? { href: `#${view}/${encodeURIComponent(text(o.name))}`, text: label } : label;
}

/** Rows of an Events table, newest first. */
export function eventRows(events, now) {
  return [...events]
    .sort(newestFirst)
    .map((e) => el("tr", { data: { reason: text(e.reason) } },
      el("td", null, text(e.type)),
      el("td", null, text(e.reason)),
      el("td", { data: { col: "message" } }, text(e.message || e.note)),
      el("td", null, text(e.reportingComponent || (e.source && e.source.component) || e.reportingController)),
      el("td", null, age(eventTime(e), now))));
}
