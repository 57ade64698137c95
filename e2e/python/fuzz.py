"""Sends seeded random requests to a live Stratus API server and reports every answer that is
a 5xx or no answer at all twice in a row (a panic in a handler drops the connection every
time; a kept-alive connection the server closed between requests is retried once).

Usage: fuzz.py KUBECONFIG NODE_TOKEN SEED REQUESTS

The requests are spread over four identities: the admin of KUBECONFIG, a project member and
a project admin this script creates (users "fuzz-member" and "fuzz-admin" with RoleAssignments
in project "demo", both logged in through the tokens endpoint, and made again and logged in
again when the fuzz took their token away), and the node identity NODE_TOKEN names. Half are random paths, methods, query parameters, content types and bodies;
half change the objects that exist (PUT, PATCH of every kind, DELETE, POST of a copy) with
mutated content (a kind is picked first, then one of its objects; mostly the objects of
project demo for the project's users):
- JSON patches built from the object's own paths: ops add/remove/replace/move/copy/test with
  `from` paths, escaped segments (`~0`, `~1`, letters written as `\\u00XX` in the JSON text),
  array paths (`/-`, out of range, negative), huge values, up to a few hundred ops, `test`
  ops that fail, and chains of `copy` ops that each double a member;
- merge patches with nulls and nested nulls; server-side apply (YAML) with the identity's own
  field manager, with and without `force`; strategic merge patches with directives;
- bodies whose content type does not match their encoding (JSON as YAML, YAML as JSON, a patch
  body as a PUT, content types with parameters or in capitals; YAML with anchors, aliases, merge
  keys, tags, odd keys or a second document), and YAML-encoded JSON patches
  under the content types that accept YAML (and some that do not).
A PUT or PATCH of an object (or its status) that succeeds must answer an object of the same
apiVersion, kind, name and namespace; one that does not is a bad answer too. The run is seeded
(`random.Random(SEED)`) and has REQUESTS requests. Prints one JSON line per bad answer and a
summary line; exits 1 if any.
"""
import base64
import copy
import json
import random
import sys
import tempfile
import urllib.parse

import urllib3
import yaml

QUERIES = [
    "", "watch=true&timeoutSeconds=1", "resourceVersion=abc", "resourceVersion=-5",
    "resourceVersion=99999999999999999999", "limit=-1", "limit=abc", "limit=1&continue=garbage",
    "continue=eyJ4IjoxfQ", "labelSelector=a%20in%20(", "labelSelector=!!",
    "labelSelector=a+in+(b,c),!d,e!=f", "fieldSelector=spec.x=1",
    "fieldSelector=metadata.name%3D%3D", "fieldSelector=status.hypervisor=node-1",
    "dryRun=All", "dryRun=bogus", "fieldValidation=Strict", "fieldValidation=nope",
    "fieldManager=" + "m" * 200, "fieldManager=fuzz&force=true", "force=maybe",
    "propagationPolicy=Foreground", "propagationPolicy=Orphan", "propagationPolicy=Nope",
    "gracePeriodSeconds=-1", "gracePeriodSeconds=x", "timeoutSeconds=-1",
    "watch=true&resourceVersion=1&timeoutSeconds=1",
    "watch=1&allowWatchBookmarks=true&sendInitialEvents=true&resourceVersionMatch=NotOlderThan&timeoutSeconds=1",
    "resourceVersionMatch=Exact&resourceVersion=1", "includeObject=None",
]
CONTENT_TYPES = [
    "application/json", "application/merge-patch+json", "application/json-patch+json",
    "application/apply-patch+yaml", "application/strategic-merge-patch+json",
    "application/yaml", "text/plain", "application/vnd.kubernetes.protobuf", "",
]
FIELDS = ["x", "status", "spec", "metadata", "finalizers", "ownerReferences",
          "deletionTimestamp", "resourceVersion", "uid", "generation", "managedFields"]
PATHS = ["/spec", "/metadata/labels", "/metadata/finalizers", "/metadata/finalizers/-", "/status",
         "/metadata/ownerReferences", "/metadata/annotations/a~1b", "/metadata/name",
         "/metadata/namespace", "/metadata/deletionTimestamp", "", "/spec/-", "/a/b/c"]


class Api:
    def __init__(self, kubeconfig):
        kc = yaml.safe_load(open(kubeconfig))
        self.base = kc["clusters"][0]["cluster"]["server"]
        self.admin = kc["users"][0]["user"]["token"]
        cluster = kc["clusters"][0]["cluster"]
        ca = cluster.get("certificate-authority")
        if ca is None:
            pem = tempfile.NamedTemporaryFile("wb", suffix=".crt", delete=False)
            pem.write(base64.b64decode(cluster["certificate-authority-data"]))
            pem.close()
            ca = pem.name
        self.http = urllib3.PoolManager(
            ca_certs=ca, cert_reqs="CERT_REQUIRED",
            timeout=urllib3.Timeout(connect=5, read=20), retries=False)

    def send(self, token, method, path, body=None, content_type="application/json"):
        headers = {"Authorization": "Bearer " + token}
        if body is not None:
            headers["Content-Type"] = content_type
        try:
            r = self.http.request(method, self.base + path, body=body, headers=headers)
            return r.status, r.data
        except urllib3.exceptions.HTTPError as e:
            return None, str(e).encode()

    def json(self, token, method, path, doc=None):
        code, data = self.send(token, method, path, None if doc is None else json.dumps(doc).encode())
        if code is None or code >= 300:
            raise RuntimeError(f"{method} {path}: {code} {data[:300]!r}")
        return json.loads(data)


def ensure(api, path, doc):
    """Creates `doc` unless it exists."""
    code, data = api.send(api.admin, "POST", path, json.dumps(doc).encode())
    if code not in (201, 409):
        raise RuntimeError(f"POST {path}: {code} {data[:300]!r}")


USERS = [("member", "fuzz-member", "member"), ("project-admin", "fuzz-admin", "admin")]


def project_token(api, user, role):
    """A token of a user with `role` in project demo, made through the identity API."""
    ensure(api, "/apis/identity.stratus.dev/v1/projects",
           {"apiVersion": "identity.stratus.dev/v1", "kind": "Project", "metadata": {"name": "demo"}, "spec": {}})
    ensure(api, "/apis/identity.stratus.dev/v1/users",
           {"apiVersion": "identity.stratus.dev/v1", "kind": "User",
            "metadata": {"name": user}, "spec": {"enabled": True}})
    # Both kept as made: the fuzz may have changed them.
    api.send(api.admin, "PATCH", f"/apis/identity.stratus.dev/v1/users/{user}",
             json.dumps({"spec": {"enabled": True}}).encode(), "application/merge-patch+json")
    ensure(api, "/apis/identity.stratus.dev/v1/namespaces/demo/roleassignments",
           {"apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment",
            "metadata": {"name": user}, "spec": {"user": user, "role": role}})
    api.send(api.admin, "PATCH", f"/apis/identity.stratus.dev/v1/namespaces/demo/roleassignments/{user}",
             json.dumps({"spec": {"user": user, "role": role}}).encode(), "application/merge-patch+json")
    code, data = api.send(api.admin, "PUT", f"/apis/identity.stratus.dev/v1/users/{user}/password",
                          json.dumps({"password": "fuzz-password-1"}).encode())
    if code is None or code >= 300:
        raise RuntimeError(f"password: {code} {data[:300]!r}")
    code, data = api.send("", "POST", "/apis/identity.stratus.dev/v1/tokens",
                          json.dumps({"user": user, "password": "fuzz-password-1"}).encode())
    if code is None or code >= 300:
        raise RuntimeError(f"token: {code} {data[:300]!r}")
    return json.loads(data)["token"]


def resources(api):
    """(group-version path, plural, namespaced, kind) of every kind served."""
    out = []
    for g in api.json(api.admin, "GET", "/apis")["groups"]:
        gv = g["preferredVersion"]["groupVersion"]
        for r in api.json(api.admin, "GET", "/apis/" + gv)["resources"]:
            if "/" not in r["name"]:
                out.append(("/apis/" + gv, r["name"], r["namespaced"], r["kind"]))
    for r in api.json(api.admin, "GET", "/api/v1")["resources"]:
        if "/" not in r["name"]:
            out.append(("/api/v1", r["name"], r["namespaced"], r["kind"]))
    return out


def objects(api, kinds):
    out = []
    for gv, plural, namespaced, kind in kinds:
        code, data = api.send(api.admin, "GET", f"{gv}/{plural}")
        if code == 200:
            for item in json.loads(data).get("items") or []:
                out.append((gv, plural, kind, item))
    return out


def mutate(rng, v):
    r = rng.random()
    if isinstance(v, dict) and v and r < 0.7:
        k = rng.choice(sorted(v))
        v = dict(v)
        v[k] = mutate(rng, v[k])
        return v
    if isinstance(v, list) and v and r < 0.7:
        v = list(v)
        i = rng.randrange(len(v))
        v[i] = mutate(rng, v[i])
        return v
    if isinstance(v, dict) and r < 0.85:
        v = dict(v)
        v[rng.choice(FIELDS)] = mutate(rng, None)
        return v
    return rng.choice([
        None, True, -1, 0, 2**63, -2**63 - 1, 1e308, 1.5, "", "x" * 300, "\u00fc\u0000", [], {},
        [None], {"a": None}, "-1", "10.0.0.0/33", "UPPER_case", [[[]]], "2020-01-01T00:00:00Z",
        {"k8s.io/x": "y"}, ["a/b", "stratus.dev/x"], {"$patch": "delete"},
        [{"apiVersion": "v1", "kind": "X", "name": "n", "uid": "u", "controller": True}],
    ])


def body_of(rng, doc, content_type):
    r = rng.random()
    if r < 0.1:
        return bytes(rng.randrange(256) for _ in range(rng.randrange(200)))
    if r < 0.25:
        return json.dumps([{"op": rng.choice(["add", "remove", "replace", "move", "copy", "test", "x"]),
                            "path": rng.choice(PATHS), "from": rng.choice(PATHS), "value": mutate(rng, None)}
                           for _ in range(rng.randint(1, 3))]).encode()
    if content_type.endswith("yaml") and r < 0.6:
        return yaml.safe_dump(doc).encode()
    return json.dumps(doc).encode()


NON_RESOURCE = ["/metrics", "/version", "/healthz", "/readyz", "/livez", "/api", "/api/v1", "/apis",
                "/apis/compute.stratus.dev", "/apis/made.up/v1", "/openapi/v2", "/openapi/v3", "/"]


def random_request(rng, kinds, examples):
    if rng.random() < 0.05:
        method = rng.choice(["GET", "GET", "POST", "DELETE"])
        body = b"{}" if method == "POST" else None
        return method, rng.choice(NON_RESOURCE) + rng.choice(["", "", "?watch=true", "?x=%FF"]), body, "application/json"
    gv, plural, namespaced, kind = rng.choice(kinds)
    ns = rng.choice(["demo", "default", "nope", "UPPER", "a" * 70, "kube-system"])
    # Percent-encoded: the request line stays valid HTTP (a raw space would make the server
    # answer 400 and close the connection, which is right, and the next request would find
    # the connection gone).
    name = urllib.parse.quote(
        rng.choice(["x", "web-1", "demo", "bad name", "..", "a" * 300, "%2F", "-x", ""]), safe="%")
    sub = rng.choice(["", "", "", "/status", "/binding", "/scale", "/x"])
    path = gv + (f"/namespaces/{ns}" if namespaced and rng.random() < 0.85 else "") + "/" + plural
    method = rng.choice(["GET", "GET", "POST", "PUT", "PATCH", "PATCH", "DELETE"])
    if method != "POST" and rng.random() < 0.8:
        path += "/" + name + sub
    query = rng.choice(QUERIES)
    if query:
        path += "?" + query
    content_type = rng.choice(CONTENT_TYPES)
    body = None
    if method in ("POST", "PUT", "PATCH"):
        same = [e for e in examples if e.get("kind") == kind] or examples
        doc = copy.deepcopy(rng.choice(same))
        for _ in range(rng.randint(0, 3)):
            doc = mutate(rng, doc)
        body = body_of(rng, doc, content_type)
    return method, path, body, content_type


def pointer_token(key):
    """One JSON pointer segment: `~` as `~0`, `/` as `~1`."""
    return str(key).replace("~", "~0").replace("/", "~1")


def paths_of(v, at="", out=None, depth=0):
    """(pointer, value) of every member and element of `v`, the root included."""
    if out is None:
        out = []
    out.append((at, v))
    if depth < 8:
        if isinstance(v, dict):
            for k in v:
                paths_of(v[k], at + "/" + pointer_token(k), out, depth + 1)
        elif isinstance(v, list):
            for i, e in enumerate(v):
                paths_of(e, f"{at}/{i}", out, depth + 1)
    return out


def json_str(rng, s, escape):
    """`s` as a JSON string; with `escape`, some ASCII letters are written as `\\u00XX`."""
    if not escape:
        return json.dumps(s)
    return '"' + "".join(f"\\u{ord(c):04x}" if c.isascii() and c.isalpha() and rng.random() < 0.4
                         else json.dumps(c)[1:-1] for c in s) + '"'


def huge_value(rng):
    return rng.choice([
        "x" * rng.choice([70_000, 600_000, 1_100_000]),
        {f"k{i}": i for i in range(rng.choice([1_000, 20_000]))},
        [list(range(100))] * rng.choice([100, 1_000]),
        json.loads("[" * 200 + "]" * 200),
        {"a" * 50_000: 1},
    ])


def mutated_path(rng, pointers, current):
    """A path of the object, or one just beside it."""
    p, v = rng.choice(pointers)
    r = rng.random()
    if r < 0.6 and not (isinstance(v, list) and r < 0.3):
        return p
    if isinstance(v, list) or r < 0.7:
        return p + rng.choice(["/-", "/-", "/0", f"/{len(v) if isinstance(v, list) else 0}", "/999999", "/-1",
                               "/01", "/1e3", "/18446744073709551616"])
    if r < 0.85:
        return p + "/" + rng.choice(["a~1b", "~0", "~01", "a/b", "", "x~1y~0z", "\u00fc", "~1~0~1"])
    if r < 0.92:
        return rng.choice(["", "/", "//", "/metadata/", p + "/x/y/z", "/-"])
    if r < 0.95:
        return rng.choice(["spec", p + "~", p + "/~2", p + "/~"])
    return rng.choice(PATHS)


def json_patch(rng, current, escape, huge=True):
    """The text of a JSON patch built from `current`'s paths (one op of twenty has a huge value)."""
    pointers = paths_of(current)
    if rng.random() < 0.05:
        # Each op doubles a member (or the whole object): the result must be refused, not built.
        q = rng.choice([p for p, v in pointers if isinstance(v, dict) and len(p) < 40] or [""])
        ops = [{"op": "copy", "from": q or "/metadata", "path": f"{q}/c{i}"} for i in range(rng.randint(10, 200))]
        return json.dumps(ops).encode()
    n = rng.choice([1, 1, 2, 3, 5, rng.randint(1, 20), rng.randint(50, 300)])
    big = rng.randrange(n) if huge and rng.random() < 0.05 else -1
    ops = []
    for i in range(n):
        op = rng.choice(["add", "remove", "replace", "move", "copy", "test"]) if rng.random() < 0.99 else \
            rng.choice(["x", None, "ADD", 1])
        path = mutated_path(rng, pointers, current)
        fields = []
        if op is not None or rng.random() < 0.5:
            fields.append(('"op"', json_str(rng, op, escape) if isinstance(op, str) else "null"))
        if rng.random() < 0.95:
            fields.append(('"path"', json_str(rng, path, escape)))
        if op in ("move", "copy") or rng.random() < 0.1:
            fields.append(('"from"', json_str(rng, mutated_path(rng, pointers, current), escape)))
        if op in ("add", "replace", "test") or rng.random() < 0.1:
            r = rng.random()
            if i == big:
                value = huge_value(rng)
            elif r < 0.4:
                value = copy.deepcopy(rng.choice(pointers)[1])
            elif r < 0.6 and op == "test":
                # A test that holds (the value at the path), so the ops after it run.
                value = dict(pointers).get(path, None)
            else:
                value = mutate(rng, copy.deepcopy(rng.choice(pointers)[1]))
            fields.append(('"value"', json.dumps(value)))
        if escape and rng.random() < 0.1:
            fields = [(json_str(rng, k[1:-1], True), v) for k, v in fields]
        rng.shuffle(fields)
        ops.append("{" + ",".join(f"{k}:{v}" for k, v in fields) + "}")
    return ("[" + ",".join(ops) + "]").encode()


def with_nulls(rng, v, depth=0):
    """`v` with some members, nested ones too, set to null."""
    if isinstance(v, dict):
        out = {}
        for k in v:
            r = rng.random()
            if r < 0.2:
                out[k] = None
            elif r < 0.6:
                out[k] = with_nulls(rng, v[k], depth + 1)
        if rng.random() < 0.2:
            out[rng.choice(FIELDS)] = rng.choice([None, {"a": None}, {"a": {"b": None}}, [None]])
        return out
    if isinstance(v, list) and v and rng.random() < 0.3:
        return [with_nulls(rng, e, depth + 1) for e in v]
    return None if rng.random() < 0.3 else v


YAML_ODDITIES = [
    "x: &a {k: v}\ny: *a\n", "spec:\n  <<: {a: 1}\n  b: 2\n", "z: !!binary aGVsbG8=\n", "? [a]: b\n",
    "1: 2\n", "n: .inf\n", "t: 2020-01-01\n", "h: 0x1F\n", "o: !!python/object:os.system ls\n",
    "".join(f"a{i}: &a{i} [" + ",".join([f"*a{i - 1}" if i else '"lol"'] * 9) + "]\n" for i in range(7)),
]


def yaml_text(rng, doc):
    """`doc` as YAML, sometimes with an anchor, alias, merge key, tag, odd key or second document."""
    text = yaml.safe_dump(doc, default_flow_style=rng.random() < 0.3)
    if rng.random() < 0.3 and text.startswith(tuple("abcdefghijklmnopqrstuvwxyz")):
        text = rng.choice([text + rng.choice(YAML_ODDITIES), "%YAML 1.1\n---\n" + text,
                           text + "---\nkind: X\n", "--- !!map\n" + text, text + "...\n"])
    return text.encode()


def retyped(rng, body, content_type):
    """The same body under a content type that does not match its encoding, sometimes."""
    if rng.random() < 0.85 or len(body) > 100_000:
        return body, content_type
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    r = rng.random()
    if r < 0.35 and doc is not None:
        # YAML under a JSON content type.
        return yaml_text(rng, doc), content_type
    if r < 0.6:
        # JSON (which is YAML) under a YAML content type.
        return body, rng.choice(["application/yaml", "application/apply-patch+yaml", "text/yaml"])
    return body, rng.choice(CONTENT_TYPES + ["application/json; charset=utf-16", "application/x-yaml",
                                             "application/json-patch+yaml", "application/merge-patch+yaml",
                                             content_type + "; charset=utf-8", content_type + ";x=y;;",
                                             content_type.upper(), " " + content_type])


def object_request(rng, objs, label):
    if label in ("member", "project-admin") and rng.random() < 0.7:
        # Mostly their own project's objects, so more of their writes get past authorization.
        objs = [o for o in objs if o[3]["metadata"].get("namespace") == "demo"] or objs
    # A kind, then one of its objects (the many Events would otherwise crowd the rest out).
    kind = rng.choice(sorted({o[2] for o in objs}))
    gv, plural, kind, obj = rng.choice([o for o in objs if o[2] == kind])
    meta = obj["metadata"]
    base = gv + (f"/namespaces/{meta['namespace']}" if meta.get("namespace") else "") + "/" + plural
    sub = rng.choice(["", "", "/status", "/binding"])
    path = base + "/" + meta["name"] + sub
    method = rng.choice(["PUT", "PATCH", "PATCH", "PATCH", "PATCH", "DELETE", "POST"])
    query = rng.choice(["", "dryRun=All", "fieldManager=fuzz&force=true", "fieldValidation=Strict",
                        "propagationPolicy=Foreground", "propagationPolicy=Orphan"])
    manager = "fuzz-" + label
    current = copy.deepcopy(obj)
    content_type = "application/json"
    body = None
    if method == "PUT":
        r = rng.random()
        if r < 0.15:
            # A patch body sent as a PUT.
            content_type = rng.choice(["application/json", "application/merge-patch+json",
                                       "application/json-patch+json", "application/yaml"])
            body = rng.choice([json_patch(rng, current, False), json.dumps(with_nulls(rng, current)).encode()])
        elif r < 0.3:
            content_type = "application/yaml"
            body = yaml_text(rng, mutate(rng, current))
        else:
            body = json.dumps(mutate(rng, current) if rng.random() < 0.8 else current).encode()
        body, content_type = retyped(rng, body, content_type)
    elif method == "POST":
        path = base
        doc = mutate(rng, current)
        if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
            doc["metadata"].pop("resourceVersion", None)
            doc["metadata"]["name"] = "fuzz" + str(rng.randrange(50))
        body = json.dumps(doc).encode()
        body, content_type = retyped(rng, body, content_type)
    elif method == "PATCH":
        how = rng.choice(["merge", "json", "json", "json", "apply", "strategic", "yaml-json"])
        if how == "merge":
            content_type = "application/merge-patch+json"
            r = rng.random()
            if r < 0.5:
                doc = with_nulls(rng, current)
            elif r < 0.6:
                doc = rng.choice([None, {"metadata": None}, {"spec": None}, {"metadata": {"labels": None}},
                                  {"spec": {"a": {"b": None}}}, [None], "null", {"metadata": {"name": None}}])
            else:
                doc = mutate(rng, rng.choice([{}, {"spec": current.get("spec")}, current]))
            body = json.dumps(doc).encode()
        elif how == "json":
            content_type = "application/json-patch+json"
            body = body_of(rng, None, content_type) if rng.random() < 0.1 else \
                json_patch(rng, current, rng.random() < 0.3)
        elif how == "yaml-json":
            # A JSON patch written as YAML, under the content types that take YAML (and some that do not).
            ops = json.loads(json_patch(rng, current, False, huge=False))
            content_type = rng.choice(["application/yaml", "application/apply-patch+yaml", "application/x-yaml",
                                       "application/json-patch+yaml", "application/json-patch+json"])
            body = yaml.safe_dump(ops, default_flow_style=rng.random() < 0.3).encode()
            if "fieldManager" not in query:
                query = (query + "&" if query else "") + "fieldManager=" + manager
        elif how == "apply":
            content_type = "application/apply-patch+yaml"
            doc = mutate(rng, current) if rng.random() < 0.7 else with_nulls(rng, current)
            if isinstance(doc, dict) and rng.random() < 0.9:
                # Still this object, so the apply gets past its names.
                doc.update({k: current[k] for k in ("apiVersion", "kind") if k in current})
                if not isinstance(doc.get("metadata"), dict):
                    doc["metadata"] = {}
                doc["metadata"].update({k: meta[k] for k in ("name", "namespace") if k in meta})
            if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
                doc["metadata"].pop("managedFields", None)
                doc["metadata"].pop("resourceVersion", None)
            if isinstance(doc, dict) and rng.random() < 0.1:
                doc.pop(rng.choice(["apiVersion", "kind", "metadata"]), None)
            body = yaml_text(rng, doc) if rng.random() < 0.8 else json.dumps(doc).encode()
            query = rng.choice(["", "dryRun=All&", "fieldValidation=Strict&", ""]) + "fieldManager=" + \
                rng.choice([manager, manager, manager, "kubectl", "m" * 200, ""]) + \
                rng.choice(["", "&force=true", "&force=false"])
        else:
            content_type = "application/strategic-merge-patch+json"
            doc = mutate(rng, {"spec": current.get("spec")}) if rng.random() < 0.7 else with_nulls(rng, current)
            if isinstance(doc, dict):
                doc[rng.choice(["$patch", "$retainKeys", "$setElementOrder/x", "$deleteFromPrimitiveList/finalizers"])] = \
                    rng.choice(["delete", "replace", "merge", ["a"], [{"name": "x"}], None])
            body = json.dumps(doc).encode()
        if how != "yaml-json":
            body, content_type = retyped(rng, body, content_type)
    if query:
        path += "?" + query
    api_version = gv[len("/apis/"):] if gv.startswith("/apis/") else gv[len("/api/"):]
    expect = (api_version, kind, meta["name"], meta.get("namespace")) \
        if method in ("PUT", "PATCH") and sub in ("", "/status") else None
    return method, path, body, content_type, expect


def main(kubeconfig, node_token, seed, count):
    rng = random.Random(seed)
    api = Api(kubeconfig)
    identities = [("admin", api.admin)] + [(label, project_token(api, user, role)) for label, user, role in USERS] + \
        [("node", node_token)]
    kinds = resources(api)
    examples = [o[3] for o in objects(api, kinds)]
    bad = 0
    refused = set()
    for i in range(count):
        if i % 500 == 0:
            objs = objects(api, kinds)
            # The fuzz may have deleted or disabled a user, or changed its password: a user whose
            # token was refused is made again and logs in again (or keeps its token if it cannot).
            for j, (label, user, role) in enumerate(USERS):
                if label in refused:
                    try:
                        identities[j + 1] = (label, project_token(api, user, role))
                    except RuntimeError:
                        pass
            refused = set()
        label, token = rng.choice(identities)
        if objs and rng.random() < 0.5:
            method, path, body, content_type, expect = object_request(rng, objs, label)
        else:
            method, path, body, content_type = random_request(rng, kinds, examples)
            expect = None
        code, data = api.send(token, method, path, body, content_type)
        if code is None:
            # The server may close a kept-alive connection between requests (as HTTP allows);
            # a panic in the handler drops the connection again on the retry.
            api.http.clear()
            code, data = api.send(token, method, path, body, content_type)
        if code == 401:
            refused.add(label)
        # A write of an object that succeeds answers an object of the same apiVersion, kind, name
        # and namespace.
        changed = False
        if expect and code is not None and 200 <= code < 300:
            try:
                answer = json.loads(data)
            except ValueError:
                answer = None
            meta = answer.get("metadata") if isinstance(answer, dict) else None
            changed = not isinstance(meta, dict) or \
                (answer.get("apiVersion"), answer.get("kind"), meta.get("name"), meta.get("namespace")) != expect
        if code is None or code >= 500 or changed:
            bad += 1
            print(json.dumps({"as": label, "method": method, "path": path, "content_type": content_type,
                              "body": (body or b"")[:400].decode("utf-8", "replace"), "code": code,
                              "answer": data[:400].decode("utf-8", "replace")}), flush=True)
    print(json.dumps({"requests": count, "bad": bad, "kinds": len(kinds)}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
