"""Checks that a refused request whose body arrives after its headers (a slow client, or one
under load) leaves its HTTP/1.1 connection open for the next request, as a kept-alive
connection should be.

Usage: keepalive.py KUBECONFIG. Exits non-zero, saying why, when the server closes the
connection after refusing a request or answers something unexpected.
"""

import base64
import socket
import ssl
import sys
import tempfile
import time
import urllib.parse

import yaml


def read_answer(conn):
    """Reads one HTTP/1.1 answer with a Content-Length body; returns (status, headers, body),
    or None when the server closed the connection."""
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        data += chunk
    head, rest = data.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    length = int(headers.get("content-length", "0"))
    while len(rest) < length:
        chunk = conn.recv(65536)
        if not chunk:
            return None
        rest += chunk
    return status, headers, rest[:length]


def main():
    kc = yaml.safe_load(open(sys.argv[1]))
    cluster = kc["clusters"][0]["cluster"]
    url = urllib.parse.urlsplit(cluster["server"])
    ca = cluster.get("certificate-authority")
    if ca is None:
        pem = tempfile.NamedTemporaryFile(suffix=".pem", delete=False)
        pem.write(base64.b64decode(cluster["certificate-authority-data"]))
        pem.close()
        ca = pem.name
    token = kc["users"][0]["user"]["token"]
    ctx = ssl.create_default_context(cafile=ca)
    ctx.set_alpn_protocols(["http/1.1"])
    conn = ctx.wrap_socket(
        socket.create_connection((url.hostname, url.port)), server_hostname=url.hostname
    )
    body = b'{"apiVersion": "compute.stratus.dev/v1", "kind": "Flavor"}' + b" " * 4000
    failures = []
    # Refused for want of a valid token, for a query that is not UTF-8, for a resource that
    # does not exist.
    for label, path, auth in [
        ("a wrong token", "/apis/compute.stratus.dev/v1/flavors", "Bearer wrong-token"),
        ("a malformed query", "/apis/compute.stratus.dev/v1/flavors?x=%FF", "Bearer " + token),
        ("no such resource", "/apis/compute.stratus.dev/v1/nothings", "Bearer " + token),
    ]:
        head = (
            f"POST {path} HTTP/1.1\r\nHost: {url.hostname}\r\n"
            f"Authorization: {auth}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\n\r\n"
        ).encode()
        conn.sendall(head)
        # The body comes later, as from a slow client.
        time.sleep(0.3)
        try:
            conn.sendall(body)
            refused = read_answer(conn)
        except OSError as e:
            refused = None
            failures.append(f"{label}: the connection failed while sending the body: {e}")
            break
        if refused is None:
            failures.append(f"{label}: the server closed the connection instead of answering")
            break
        if refused[0] < 400 or refused[0] >= 500:
            failures.append(f"{label}: expected a 4xx, got {refused[0]} {refused[2][:200]!r}")
        # The same connection serves the next request.
        try:
            conn.sendall(
                f"GET /version HTTP/1.1\r\nHost: {url.hostname}\r\n"
                f"Authorization: Bearer {token}\r\n\r\n".encode()
            )
            after = read_answer(conn)
        except OSError as e:
            after = None
            failures.append(f"after {label}: {e}")
        if after is None:
            failures.append(f"after {label}: the server closed the kept-alive connection")
            break
        if after[0] != 200:
            failures.append(f"after {label}: GET /version answered {after[0]}")
    if failures:
        print("\n".join(failures))
        sys.exit(1)
    print("kept alive")


main()
