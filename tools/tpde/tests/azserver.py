"""A local Azure Blob Storage server for the object-store tests: Azurite, the
emulator Microsoft publishes on npm (tools/test-all.sh installs it under
target/azurite), on 127.0.0.1 with a container `tpde`.

    python3 azserver.py AZURITE_BLOB DATA_DIR    prints the port, then serves

It serves until the parent closes our stdin (or kills us). The container is made
with a request signed by the emulator's well-known account key (SharedKey), which
object_store uses too when AZURE_STORAGE_USE_EMULATOR is set.
"""

import base64
import hashlib
import hmac
import socket
import subprocess
import sys
import time
import urllib.request
from email.utils import formatdate

ACCOUNT = "devstoreaccount1"
KEY = base64.b64decode(
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def create_container(port, name):
    headers = {"x-ms-date": formatdate(usegmt=True), "x-ms-version": "2021-08-06"}
    canonical_headers = "".join(f"{k}:{v}\n" for k, v in sorted(headers.items()))
    content_type = "application/octet-stream"
    # The verb, then eleven standard headers: Content-Encoding, -Language, -Length
    # (empty for 0), -MD5, Content-Type, Date, If-Modified-Since, If-Match,
    # If-None-Match, If-Unmodified-Since, Range.
    standard = ["", "", "", "", content_type, "", "", "", "", "", ""]
    string_to_sign = "\n".join(["PUT", *standard]) + "\n" + canonical_headers
    string_to_sign += f"/{ACCOUNT}/{ACCOUNT}/{name}\nrestype:container"
    signature = base64.b64encode(hmac.new(KEY, string_to_sign.encode(), hashlib.sha256).digest()).decode()
    headers["Authorization"] = f"SharedKey {ACCOUNT}:{signature}"
    headers["Content-Type"] = content_type
    url = f"http://127.0.0.1:{port}/{ACCOUNT}/{name}?restype=container"
    urllib.request.urlopen(urllib.request.Request(url, method="PUT", headers=headers, data=b"")).read()


def main():
    azurite, data = sys.argv[1], sys.argv[2]
    port = free_port()
    server = subprocess.Popen(
        [azurite, "--silent", "--location", data, "--blobHost", "127.0.0.1", "--blobPort", str(port)],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("azurite did not start")
                time.sleep(0.1)
        create_container(port, "tpde")
        print(port, flush=True)
        sys.stdin.read()
    finally:
        server.kill()


if __name__ == "__main__":
    main()
