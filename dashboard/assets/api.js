// The API client: every request goes to this page's own origin with the user's bearer token
// in the Authorization header. The token lives only in this module's memory: never in a URL,
// a cookie or browser storage, so a reload or a closed tab ends the session.

const TOKENS = "/apis/identity.stratus.dev/v1/tokens";

let token = null;
let user = null;

/** An answer of the API that was not a success, with the Kubernetes Status it carried. */
export class ApiError extends Error {
  constructor(code, status) {
    super(status && typeof status.message === "string" && status.message
      ? status.message
      : `the API answered ${code}`);
    this.code = code;
    this.status = status || null;
  }
}

/** The logged-in user's name, or null. */
export function currentUser() {
  return user;
}

function headers(extra) {
  const h = new Headers(extra || {});
  h.set("Accept", "application/json");
  if (token !== null) {
    h.set("Authorization", `Bearer ${token}`);
  }
  return h;
}

async function statusOf(resp) {
  try {
    return await resp.json();
  } catch {
    return null;
  }
}

/** Logs in with a user name and password; the token is kept for the requests that follow. */
export async function login(name, password) {
  const resp = await fetch(TOKENS, {
    method: "POST",
    headers: { "Content-Type": "application/json", Accept: "application/json" },
    body: JSON.stringify({ user: name, password }),
    credentials: "omit",
    cache: "no-store",
  });
  if (resp.status !== 201) {
    throw new ApiError(resp.status, await statusOf(resp));
  }
  const issued = await resp.json();
  if (typeof issued.token !== "string" || issued.token === "") {
    throw new ApiError(resp.status, { message: "the API issued no token" });
  }
  token = issued.token;
  user = typeof issued.user === "string" ? issued.user : name;
}

/** Revokes the token with the API (best effort) and forgets it. */
export async function logout() {
  const held = token;
  token = null;
  user = null;
  if (held === null) {
    return;
  }
  try {
    await fetch(`${TOKENS}/self`, {
      method: "DELETE",
      headers: { Authorization: `Bearer ${held}`, Accept: "application/json" },
      credentials: "omit",
      cache: "no-store",
    });
  } catch {
    // The token is forgotten here whatever the API said; it expires on its own.
  }
}

/** Whether a token is held. */
export function loggedIn() {
  return token !== null;
}

async function call(method, path, body, contentType, signal) {
  const init = { method, headers: headers(), credentials: "omit", cache: "no-store", signal };
  if (body !== undefined) {
    init.headers.set("Content-Type", contentType);
    init.body = body;
  }
  const resp = await fetch(path, init);
  if (!resp.ok) {
    throw new ApiError(resp.status, await statusOf(resp));
  }
  return resp.json();
}

/**
 * A request to the API; resolves to the decoded JSON answer, or throws an ApiError carrying
 * the API's Status.
 */
export function request(method, path, body, signal) {
  return call(method, path, body === undefined ? undefined : JSON.stringify(body),
    "application/json", signal);
}

/**
 * A write whose body is `text` of type `contentType` (a YAML manifest as shown to the user);
 * resolves to the decoded answer, or throws an ApiError carrying the API's Status.
 */
export function send(method, path, text, contentType) {
  return call(method, path, text, contentType);
}

/** A GET of a text resource (a server's console log): its text, or an ApiError. */
export async function text(path) {
  const init = { headers: headers(), credentials: "omit", cache: "no-store" };
  init.headers.set("Accept", "text/plain");
  const resp = await fetch(path, init);
  if (!resp.ok) {
    throw new ApiError(resp.status, await statusOf(resp));
  }
  return resp.text();
}

/** A streamed GET (a watch): the Response, its body still to be read. */
export async function stream(path, signal) {
  const resp = await fetch(path, { headers: headers(), credentials: "omit", cache: "no-store", signal });
  if (!resp.ok) {
    throw new ApiError(resp.status, await statusOf(resp));
  }
  return resp;
}

/** A collection's path: `/apis/GROUP/VERSION[/namespaces/NS]/PLURAL` (`/api/v1/...` for core). */
export function collection(group, version, plural, namespace) {
  const base = group === "" ? `/api/${version}` : `/apis/${group}/${version}`;
  const ns = namespace ? `/namespaces/${encodeURIComponent(namespace)}` : "";
  return `${base}${ns}/${plural}`;
}
