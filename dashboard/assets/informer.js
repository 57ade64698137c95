// A live copy of one collection, as an informer keeps it: one LIST, then one WATCH from the
// list's resourceVersion (with bookmarks, so the resourceVersion stays fresh while nothing
// changes). A watch that ends or drops is resumed from the last resourceVersion seen; a
// resourceVersion the API no longer has (410 Gone) is answered with a new LIST.

import { ApiError, request, stream } from "./api.js";

/** How long one watch asks to last; it is then resumed from where it was. */
const WATCH_SECONDS = 300;
/** The longest one watch event may be (the API server's objects are far smaller). */
const MAX_LINE = 8 * 1024 * 1024;
const FIRST_DELAY_MS = 500;
const MAX_DELAY_MS = 30000;

function sleep(ms, signal) {
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      signal.removeEventListener("abort", done);
      resolve();
    };
    const timer = setTimeout(done, ms);
    signal.addEventListener("abort", done, { once: true });
  });
}

function keyOf(obj) {
  const m = (obj && obj.metadata) || {};
  return `${m.namespace || ""}/${m.name || ""}`;
}

export class Informer {
  /**
   * @param {string} path the collection's path
   * @param {Record<string,string>} query extra query parameters (a fieldSelector)
   * @param {(items: Map<string, object>) => void} onChange called after the copy changed
   * @param {(state: string, error?: Error) => void} onState "listing", "live",
   *   "reconnecting" (with the error) or "refused" (the API said no; with its ApiError)
   */
  constructor(path, query, onChange, onState) {
    this.path = path;
    this.query = query || {};
    this.onChange = onChange;
    this.onState = onState || (() => {});
    this.items = new Map();
    this.resourceVersion = "";
    this.controller = new AbortController();
    this.stopped = false;
    /** How many LISTs it made (the first, then one per 410). */
    this.lists = 0;
    /** How many watches it opened. */
    this.watches = 0;
  }

  start() {
    this.run();
    return this;
  }

  stop() {
    this.stopped = true;
    this.controller.abort();
  }

  url(extra) {
    const q = new URLSearchParams(this.query);
    for (const [k, v] of Object.entries(extra)) {
      q.set(k, v);
    }
    const s = q.toString();
    return s === "" ? this.path : `${this.path}?${s}`;
  }

  async run() {
    const signal = this.controller.signal;
    let relist = true;
    let delay = FIRST_DELAY_MS;
    while (!this.stopped) {
      try {
        if (relist) {
          this.onState("listing");
          await this.list(signal);
          relist = false;
        }
        await this.watch(signal);
        // The watch ended on its own (its timeout): resume it at once.
        delay = FIRST_DELAY_MS;
      } catch (e) {
        if (this.stopped) {
          return;
        }
        if (e instanceof ApiError && e.code === 410) {
          relist = true;
          continue;
        }
        if (e instanceof ApiError && [400, 401, 403, 404].includes(e.code)) {
          // Retrying cannot help until something else changes (a role, the project).
          this.onState("refused", e);
          await sleep(MAX_DELAY_MS, signal);
          relist = true;
          continue;
        }
        this.onState("reconnecting", e);
        await sleep(delay, signal);
        delay = Math.min(delay * 2, MAX_DELAY_MS);
      }
    }
  }

  async list(signal) {
    const list = await request("GET", this.url({}), undefined, signal);
    this.lists += 1;
    const items = new Map();
    for (const obj of list.items || []) {
      items.set(keyOf(obj), obj);
    }
    this.items = items;
    this.resourceVersion = (list.metadata && list.metadata.resourceVersion) || "";
    this.onChange(this.items);
  }

  async watch(signal) {
    const resp = await stream(this.url({
      watch: "1",
      allowWatchBookmarks: "true",
      resourceVersion: this.resourceVersion,
      timeoutSeconds: String(WATCH_SECONDS),
    }), signal);
    this.watches += 1;
    this.onState("live");
    const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
    let buffered = "";
    try {
      for (;;) {
        const { value, done } = await reader.read();
        if (done) {
          return;
        }
        buffered += value;
        let changed = false;
        let nl;
        while ((nl = buffered.indexOf("\n")) >= 0) {
          const line = buffered.slice(0, nl);
          buffered = buffered.slice(nl + 1);
          if (line.trim() !== "") {
            changed = this.apply(JSON.parse(line)) || changed;
          }
        }
        if (buffered.length > MAX_LINE) {
          throw new Error("a watch event longer than the dashboard reads");
        }
        if (changed) {
          this.onChange(this.items);
        }
      }
    } finally {
      reader.cancel().catch(() => {});
    }
  }

  /** Applies one watch event; whether the copy changed. */
  apply(event) {
    const obj = event.object || {};
    const rv = obj.metadata && obj.metadata.resourceVersion;
    switch (event.type) {
      case "ADDED":
      case "MODIFIED":
        this.items.set(keyOf(obj), obj);
        break;
      case "DELETED":
        this.items.delete(keyOf(obj));
        break;
      case "BOOKMARK":
        if (rv) {
          this.resourceVersion = rv;
        }
        return false;
      case "ERROR":
        throw new ApiError(typeof obj.code === "number" ? obj.code : 500, obj);
      default:
        return false;
    }
    if (rv) {
      this.resourceVersion = rv;
    }
    return true;
  }
}
