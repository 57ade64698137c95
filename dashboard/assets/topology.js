// A project's topology as an SVG picture, drawn anew from four live lists (networks, subnets,
// routers, servers; each one LIST then one WATCH): networks as horizontal lines, routers and
// servers as boxes above them, each box joined to every network it is on. Names are text
// nodes, never markup.

import * as api from "./api.js";
import { Informer } from "./informer.js";

const BOX_W = 130;
const BOX_H = 44;
const GAP = 24;
const LEFT = 170;
const TOP = 16;
const FIRST_NET = TOP + BOX_H + 50;
const NET_GAP = 44;

/**
 * An SVG element in the namespace of `root` (the page's own <svg>, so that no namespace URL
 * is written in a script).
 */
function element(root, tag, attrs, text) {
  const e = document.createElementNS(root.namespaceURI, tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k.startsWith("data-")) {
      e.dataset[k.slice(5).replace(/-([a-z])/g, (_, c) => c.toUpperCase())] = String(v);
    } else {
      e.setAttribute(k, String(v));
    }
  }
  if (text !== undefined) {
    e.textContent = text;
  }
  return e;
}

/** A name cut to fit a box, with the whole name as the element's tooltip. */
function label(name, max) {
  return name.length > max ? `${name.slice(0, max - 1)}…` : name;
}

const nameOf = (o) => String((o.metadata || {}).name || "");

/**
 * The picture's content from the lists: the networks (sorted; a network only referred to,
 * such as another project's external one, is added and marked), and the routers then the
 * servers, each with the networks it is on.
 */
export function layout(networks, subnets, routers, servers) {
  const nets = new Map();
  for (const n of networks.values()) {
    nets.set(nameOf(n), { name: nameOf(n), external: Boolean((n.spec || {}).external), known: true });
  }
  const subnetNet = new Map();
  for (const s of subnets.values()) {
    subnetNet.set(nameOf(s), String((s.spec || {}).network || ""));
  }
  const nodes = [];
  const sorted = (m) => [...m.values()].sort((a, b) => nameOf(a).localeCompare(nameOf(b)));
  for (const r of sorted(routers)) {
    const spec = r.spec || {};
    const on = new Set();
    if (spec.externalGateway && spec.externalGateway.network) {
      on.add(String(spec.externalGateway.network));
    }
    for (const i of spec.interfaces || []) {
      const net = subnetNet.get(String(i.subnet || ""));
      if (net) {
        on.add(net);
      }
    }
    nodes.push({ kind: "router", name: nameOf(r), phase: String((r.status || {}).phase || "Pending"), on });
  }
  for (const s of sorted(servers)) {
    const on = new Set();
    for (const n of (s.spec || {}).networks || []) {
      if (n.network) {
        on.add(String(n.network));
      }
    }
    for (const a of (s.status || {}).addresses || []) {
      if (a.network) {
        on.add(String(a.network));
      }
    }
    nodes.push({ kind: "server", name: nameOf(s), phase: String((s.status || {}).phase || "Pending"), on });
  }
  for (const n of nodes) {
    for (const net of n.on) {
      if (!nets.has(net)) {
        nets.set(net, { name: net, external: true, known: false });
      }
    }
  }
  return { nets: [...nets.values()].sort((a, b) => a.name.localeCompare(b.name)), nodes };
}

/** Draws `picture` (from `layout`) into the <svg> `root`. */
export function drawPicture(root, picture) {
  const { nets, nodes } = picture;
  const width = Math.max(LEFT + nodes.length * (BOX_W + GAP), 480) + 20;
  const height = FIRST_NET + Math.max(nets.length - 1, 0) * NET_GAP + 30;
  root.setAttribute("viewBox", `0 0 ${width} ${height}`);
  root.setAttribute("width", String(width));
  root.setAttribute("height", String(height));
  const y = new Map(nets.map((n, j) => [n.name, FIRST_NET + j * NET_GAP]));
  const svg = (tag, attrs, text) => element(root, tag, attrs, text);
  const parts = [];
  for (const n of nets) {
    const g = svg("g", { class: n.external ? "topo-net external" : "topo-net", "data-network": n.name });
    g.append(svg("title", {}, n.known ? n.name : `${n.name} (not in this project)`),
      svg("line", { x1: 10, y1: y.get(n.name), x2: width - 10, y2: y.get(n.name) }),
      svg("text", { x: 12, y: y.get(n.name) - 7 }, label(n.external ? `${n.name} (external)` : n.name, 24)));
    parts.push(g);
  }
  nodes.forEach((n, i) => {
    const x = LEFT + i * (BOX_W + GAP);
    const cx = x + BOX_W / 2;
    const id = `${n.kind}/${n.name}`;
    for (const net of [...n.on].sort()) {
      const g = svg("g", { class: "topo-link", "data-link": `${id}|${net}` });
      g.append(svg("line", { x1: cx, y1: TOP + BOX_H, x2: cx, y2: y.get(net) }),
        svg("circle", { cx, cy: y.get(net), r: 4 }));
      parts.push(g);
    }
    const g = svg("g", { class: `topo-node ${n.kind}`, "data-node": id, "data-phase": n.phase });
    g.append(svg("title", {}, `${n.kind} ${n.name}: ${n.phase}`),
      svg("rect", { x, y: TOP, width: BOX_W, height: BOX_H, rx: 5 }),
      svg("text", { x: x + 8, y: TOP + 18, class: "topo-name" }, label(n.name, 16)),
      svg("text", { x: x + 8, y: TOP + 35, class: "topo-phase" }, `${n.kind} · ${n.phase}`));
    parts.push(g);
  });
  root.replaceChildren(...parts);
}

/** The four lists a project's picture is drawn from, and the picture kept up to date. */
export class Topology {
  /**
   * @param {string} project
   * @param {SVGSVGElement} root where it is drawn
   * @param {(state: string, error?: Error) => void} onState the worst state of the four lists
   * @param {(empty: boolean) => void} onDrawn called after each drawing
   */
  constructor(project, root, onState, onDrawn) {
    this.root = root;
    this.onDrawn = onDrawn;
    this.frame = 0;
    this.states = new Map();
    const lists = {
      networks: ["network.stratus.dev", "networks"],
      subnets: ["network.stratus.dev", "subnets"],
      routers: ["network.stratus.dev", "routers"],
      servers: ["compute.stratus.dev", "servers"],
    };
    this.informers = {};
    for (const [key, [group, plural]] of Object.entries(lists)) {
      this.informers[key] = new Informer(api.collection(group, "v1", plural, project), {},
        () => this.draw(), (s, e) => {
          this.states.set(key, [s, e]);
          onState(...this.worst());
        });
    }
    for (const i of Object.values(this.informers)) {
      i.start();
    }
  }

  worst() {
    for (const s of ["refused", "reconnecting", "listing"]) {
      for (const [state, e] of this.states.values()) {
        if (state === s) {
          return [s, e];
        }
      }
    }
    return this.states.size === Object.keys(this.informers).length ? ["live"] : ["listing"];
  }

  /** Draws on the next frame: many changes at once cost one drawing. */
  draw() {
    if (this.frame === 0) {
      this.frame = requestAnimationFrame(() => {
        this.frame = 0;
        const i = this.informers;
        const picture = layout(i.networks.items, i.subnets.items, i.routers.items, i.servers.items);
        drawPicture(this.root, picture);
        this.onDrawn(picture.nets.length === 0 && picture.nodes.length === 0);
      });
    }
  }

  stop() {
    for (const i of Object.values(this.informers)) {
      i.stop();
    }
    cancelAnimationFrame(this.frame);
    this.frame = 0;
  }
}
