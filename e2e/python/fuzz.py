"""Sends seeded random requests to a live Stratus API server and reports every answer that is
a 5xx or no answer at all twice in a row (a panic in a handler drops the connection every
time; a kept-alive connection the server closed between requests is retried once).

Usage: fuzz.py KUBECONFIG NODE_TOKEN SEED REQUESTS

The requests come from three identities: the admin of KUBECONFIG, a project member this
script creates (user "fuzz-member" in project "demo"), and the node identity NODE_TOKEN
names. Half are random paths, methods, query parameters, content types and bodies; half
change the objects that exist (PUT, PATCH of every kind, DELETE, POST of a copy) with
mutated content. Prints one JSON line per bad answer and a summary line; exits 1 if any.
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


def member_token(api):
    """A token of a member of project demo, made through the identity API."""
    ensure(api, "/apis/identity.stratus.dev/v1/projects",
           {"apiVersion": "identity.stratus.dev/v1", "kind": "Project", "metadata": {"name": "demo"}, "spec": {}})
    ensure(api, "/apis/identity.stratus.dev/v1/users",
           {"apiVersion": "identity.stratus.dev/v1", "kind": "User",
            "metadata": {"name": "fuzz-member"}, "spec": {"enabled": True}})
    ensure(api, "/apis/identity.stratus.dev/v1/namespaces/demo/roleassignments",
           {"apiVersion": "identity.stratus.dev/v1", "kind": "RoleAssignment",
            "metadata": {"name": "fuzz-member"}, "spec": {"user": "fuzz-member", "role": "member"}})
    code, data = api.send(api.admin, "PUT", "/apis/identity.stratus.dev/v1/users/fuzz-member/password",
                          json.dumps({"password": "fuzz-password-1"}).encode())
    if code is None or code >= 300:
        raise RuntimeError(f"password: {code} {data[:300]!r}")
    code, data = api.send("", "POST", "/apis/identity.stratus.dev/v1/tokens",
                          json.dumps({"user": "fuzz-member", "password": "fuzz-password-1"}).encode())
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


def object_request(rng, objs):
    gv, plural, kind, obj = rng.choice(objs)
    meta = obj["metadata"]
    base = gv + (f"/namespaces/{meta['namespace']}" if meta.get("namespace") else "") + "/" + plural
    path = base + "/" + meta["name"] + rng.choice(["", "", "/status", "/binding"])
    method = rng.choice(["PUT", "PATCH", "PATCH", "PATCH", "DELETE", "POST"])
    query = rng.choice(["", "dryRun=All", "fieldManager=fuzz&force=true", "fieldValidation=Strict",
                        "propagationPolicy=Foreground", "propagationPolicy=Orphan"])
    current = copy.deepcopy(obj)
    content_type = "application/json"
    body = None
    if method == "PUT":
        body = json.dumps(mutate(rng, current) if rng.random() < 0.8 else current).encode()
    elif method == "POST":
        path = base
        doc = mutate(rng, current)
        if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
            doc["metadata"].pop("resourceVersion", None)
            doc["metadata"]["name"] = "fuzz" + str(rng.randrange(50))
        body = json.dumps(doc).encode()
    elif method == "PATCH":
        how = rng.choice(["merge", "json", "apply", "strategic"])
        if how == "merge":
            content_type = "application/merge-patch+json"
            body = json.dumps(mutate(rng, rng.choice([{}, {"spec": current.get("spec")}, current]))).encode()
        elif how == "json":
            content_type = "application/json-patch+json"
            body = body_of(rng, None, content_type) if rng.random() < 0.2 else json.dumps(
                [{"op": rng.choice(["add", "remove", "replace", "move", "copy", "test"]),
                  "path": rng.choice(PATHS), "from": rng.choice(PATHS), "value": mutate(rng, None)}
                 for _ in range(rng.randint(1, 3))]).encode()
        elif how == "apply":
            content_type = "application/apply-patch+yaml"
            doc = mutate(rng, current)
            if isinstance(doc, dict) and isinstance(doc.get("metadata"), dict):
                doc["metadata"].pop("managedFields", None)
                doc["metadata"].pop("resourceVersion", None)
            body = json.dumps(doc).encode()
            if "fieldManager" not in query:
                query = (query + "&" if query else "") + "fieldManager=fuzz"
        else:
            content_type = "application/strategic-merge-patch+json"
            doc = mutate(rng, {"spec": current.get("spec")})
            if isinstance(doc, dict):
                doc[rng.choice(["$patch", "$retainKeys", "$setElementOrder/x", "$deleteFromPrimitiveList/finalizers"])] = \
                    rng.choice(["delete", "replace", "merge", ["a"], [{"name": "x"}], None])
            body = json.dumps(doc).encode()
    if query:
        path += "?" + query
    return method, path, body, content_type


def main(kubeconfig, node_token, seed, count):
    rng = random.Random(seed)
    api = Api(kubeconfig)
    identities = [("admin", api.admin), ("member", member_token(api)), ("node", node_token)]
    kinds = resources(api)
    examples = [o[3] for o in objects(api, kinds)]
    bad = 0
    for i in range(count):
        if i % 500 == 0:
            objs = objects(api, kinds)
        label, token = rng.choice(identities)
        if objs and rng.random() < 0.5:
            method, path, body, content_type = object_request(rng, objs)
        else:
            method, path, body, content_type = random_request(rng, kinds, examples)
        code, data = api.send(token, method, path, body, content_type)
        if code is None:
            # The server may close a kept-alive connection between requests (as HTTP allows);
            # a panic in the handler drops the connection again on the retry.
            api.http.clear()
            code, data = api.send(token, method, path, body, content_type)
        if code is None or code >= 500:
            bad += 1
            print(json.dumps({"as": label, "method": method, "path": path, "content_type": content_type,
                              "body": (body or b"")[:400].decode("utf-8", "replace"), "code": code,
                              "answer": data[:400].decode("utf-8", "replace")}), flush=True)
    print(json.dumps({"requests": count, "bad": bad, "kinds": len(kinds)}), flush=True)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])))
