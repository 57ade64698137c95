// Objects written as YAML manifests, the text a GitOps user copies into a repository and the
// very text the dashboard sends (`application/yaml`, `application/apply-patch+yaml`).
// Strings a YAML reader could take for something else (a number, a boolean, null, a key, a
// comment) are written double-quoted with JSON's escapes, which YAML reads the same way.

/** Strings written bare: a letter, then letters, digits and `_./-` (no `:`, `#` or space). */
const PLAIN = /^[A-Za-z_][A-Za-z0-9_./-]*$/;
/** Bare words YAML 1.1 readers take for booleans or null. */
const RESERVED = /^(true|false|null|yes|no|on|off|y|n)$/i;
/** Characters JSON leaves as they are but YAML does not print (DEL, C1 controls, BOM, line separators). */
const UNPRINTABLE = /[\u007f-\u009f\u2028\u2029\ufeff]/g;

function quoted(s) {
  return JSON.stringify(s).replace(UNPRINTABLE,
    (c) => `\\u${c.charCodeAt(0).toString(16).padStart(4, "0")}`);
}

/** One scalar as YAML. */
export function scalar(v) {
  if (v === null || v === undefined) {
    return "null";
  }
  if (typeof v === "boolean") {
    return v ? "true" : "false";
  }
  if (typeof v === "number") {
    return Number.isFinite(v) ? String(v) : "null";
  }
  const s = String(v);
  return PLAIN.test(s) && !RESERVED.test(s) ? s : quoted(s);
}

const isMap = (v) => v !== null && typeof v === "object" && !Array.isArray(v);

function lines(value, pad, out) {
  for (const [k, v] of Object.entries(value)) {
    const key = `${pad}${scalar(k)}:`;
    if (isMap(v) && Object.keys(v).length > 0) {
      out.push(key);
      lines(v, `${pad}  `, out);
    } else if (Array.isArray(v) && v.length > 0) {
      out.push(key);
      for (const item of v) {
        if (isMap(item) && Object.keys(item).length > 0) {
          const at = out.length;
          lines(item, `${pad}  `, out);
          out[at] = `${pad}- ${out[at].slice(pad.length + 2)}`;
        } else {
          out.push(`${pad}- ${leaf(item)}`);
        }
      }
    } else {
      out.push(`${key} ${leaf(v)}`);
    }
  }
}

function leaf(v) {
  if (isMap(v)) {
    return "{}";
  }
  if (Array.isArray(v)) {
    return "[]";
  }
  return scalar(v);
}

/** `obj` (plain data: maps, lists, strings, numbers, booleans) as a YAML document. */
export function toYaml(obj) {
  const out = [];
  lines(obj, "", out);
  return `${out.join("\n")}\n`;
}
