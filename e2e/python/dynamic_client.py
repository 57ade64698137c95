"""Drives Stratus with the Python kubernetes client's dynamic client: CRUD and watch.

Usage: dynamic_client.py KUBECONFIG. Prints one JSON line per step; exits non-zero on failure.
"""
import json
import sys
import threading

from kubernetes import config, dynamic
from kubernetes.client import api_client
from kubernetes.dynamic.exceptions import ConflictError, NotFoundError


def step(step_name, **kw):
    print(json.dumps({"step": step_name, **kw}), flush=True)


def main(kubeconfig):
    client = dynamic.DynamicClient(api_client.ApiClient(configuration=config.load_kube_config(config_file=kubeconfig)))
    flavors = client.resources.get(api_version="compute.stratus.dev/v1", kind="Flavor")
    keypairs = client.resources.get(api_version="compute.stratus.dev/v1", kind="Keypair")

    start_rv = flavors.get().metadata.resourceVersion
    events = []
    done = threading.Event()

    def watch():
        for ev in flavors.watch(resource_version=start_rv, timeout=20):
            events.append((ev["type"], ev["object"].metadata.name, ev["raw_object"]["spec"]["vcpus"]))
            if ev["type"] == "DELETED":
                break
        done.set()

    t = threading.Thread(target=watch, daemon=True)
    t.start()

    body = {"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor", "metadata": {"name": "py.small"},
            "spec": {"vcpus": 1, "ramMiB": 256, "diskGiB": 1}}
    created = flavors.create(body=body)
    step("create", name=created.metadata.name, rv=created.metadata.resourceVersion)
    got = flavors.get(name="py.small")
    step("get", vcpus=got.spec.vcpus, generation=got.metadata.generation)
    patched = flavors.patch(name="py.small", body={"spec": {"vcpus": 3}}, content_type="application/merge-patch+json")
    step("patch", vcpus=patched.spec.vcpus, generation=patched.metadata.generation)
    stale = dict(body)
    stale["metadata"] = {"name": "py.small", "resourceVersion": created.metadata.resourceVersion}
    try:
        flavors.replace(body=stale)
        step("stale-replace", status=200)
    except ConflictError as e:
        step("stale-replace", status=e.status)
    kp = keypairs.create(namespace="pyproj", body={"apiVersion": "compute.stratus.dev/v1", "kind": "Keypair",
                                                   "metadata": {"name": "k1"},
                                                   "spec": {"publicKey": "ssh-ed25519 AAAAC3NzaC1lZDI1NTE5AAAAIGJ1c3RlZC10ZXN0LWtleS1mb3ItcGFnaW5n py"}})
    listed = keypairs.get(namespace="pyproj")
    step("list", names=[i.metadata.name for i in listed.items], namespace=kp.metadata.namespace)
    flavors.delete(name="py.small")
    try:
        flavors.get(name="py.small")
        step("get-after-delete", status=200)
    except NotFoundError as e:
        step("get-after-delete", status=e.status)
    done.wait(20)
    step("watch", events=events)


if __name__ == "__main__":
    main(sys.argv[1])
