"""Lists every Flavor with the Python kubernetes client, unpaged, as a user's script would.

Usage: list_all.py KUBECONFIG. Prints one JSON line with the counts; exits non-zero on failure.
"""
import json
import sys
import time

from kubernetes import client, config


def main(kubeconfig):
    api = client.CustomObjectsApi(api_client=config.new_client_from_config(config_file=kubeconfig))
    started = time.monotonic()
    everything = api.list_cluster_custom_object("compute.stratus.dev", "v1", "flavors", _request_timeout=120)
    seconds = time.monotonic() - started
    names = [i["metadata"]["name"] for i in everything["items"]]
    gold = api.list_cluster_custom_object("compute.stratus.dev", "v1", "flavors", label_selector="tier=gold")
    not_one = api.list_cluster_custom_object(
        "compute.stratus.dev", "v1", "flavors", field_selector="metadata.name!=f-00042"
    )
    print(json.dumps({
        "kind": everything["kind"],
        "count": len(names),
        "distinct": len(set(names)),
        "sorted": names == sorted(names),
        "resourceVersion": everything["metadata"]["resourceVersion"],
        "seconds": round(seconds, 2),
        "gold": len(gold["items"]),
        "gold_labelled": all(i["metadata"]["labels"]["tier"] == "gold" for i in gold["items"]),
        "not_one": len(not_one["items"]),
        "not_one_has_it": any(i["metadata"]["name"] == "f-00042" for i in not_one["items"]),
    }), flush=True)


if __name__ == "__main__":
    main(sys.argv[1])
