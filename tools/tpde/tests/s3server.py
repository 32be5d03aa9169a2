"""A local S3-compatible server for the object-store tests and benchmarks: moto's
S3 over real HTTP on 127.0.0.1, with a bucket `tpde`, that logs every request and
can be told to fail.

    python3 s3server.py LOG     prints the port it listens on, then serves

Each request is appended to LOG as one JSON line: method, path, query, Range header,
when it started, status and body bytes sent. Keys with `fail-part` in their name get
HTTP 400 for every UploadPart (a failure that is not retried); keys with `slow-part`
wait a second before each UploadPart (so a test can interrupt an upload); requests
signed with the access key `denied` get 403 AccessDenied.
"""

import json
import sys
import threading
import time
import urllib.request

from moto.server import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import make_server

DENIED = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>AccessDenied</Code>'
    b"<Message>Access Denied</Message></Error>"
)
BAD_PART = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>InvalidPart</Code>'
    b"<Message>injected failure</Message></Error>"
)


class Logged:
    """WSGI middleware: logs each request, and injects the failures above."""

    def __init__(self, app, log_path):
        self.app = app
        self.log = open(log_path, "a", buffering=1)
        self.lock = threading.Lock()

    def write(self, record):
        with self.lock:
            self.log.write(json.dumps(record) + "\n")

    def __call__(self, environ, start_response):
        method = environ["REQUEST_METHOD"]
        path = environ.get("PATH_INFO", "")
        query = environ.get("QUERY_STRING", "")
        # "started" orders requests as they arrived; records are written in the
        # order their responses were ready, which may differ.
        record = {
            "method": method,
            "path": path,
            "query": query,
            "range": environ.get("HTTP_RANGE"),
            "started": time.monotonic(),
        }
        upload_part = method == "PUT" and "partNumber=" in query
        if "Credential=denied/" in environ.get("HTTP_AUTHORIZATION", ""):
            return self.reply(start_response, record, "403 Forbidden", DENIED)
        if upload_part and "fail-part" in path:
            return self.reply(start_response, record, "400 Bad Request", BAD_PART)
        if upload_part and "slow-part" in path:
            time.sleep(1.0)
        status = {}

        def recording_start(s, headers, exc_info=None):
            status["status"] = s
            return start_response(s, headers, exc_info)

        # The body is gathered (moto builds it in memory anyway) and the record
        # written before any of it is sent, so that a client that has read a
        # response finds its request in the log.
        response = self.app(environ, recording_start)
        try:
            body = list(response)
        finally:
            getattr(response, "close", lambda: None)()
        record["status"] = int(status.get("status", "0").split()[0])
        record["bytes"] = sum(len(piece) for piece in body)
        self.write(record)
        return body

    def reply(self, start_response, record, status, body):
        start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
        record["status"] = int(status.split()[0])
        record["bytes"] = len(body)
        self.write(record)
        return [body]


def main():
    log_path = sys.argv[1]
    app = Logged(DomainDispatcherApplication(create_backend_app), log_path)
    server = make_server("127.0.0.1", 0, app, threaded=True)
    port = server.server_port
    threading.Thread(target=server.serve_forever, daemon=True).start()
    urllib.request.urlopen(urllib.request.Request(f"http://127.0.0.1:{port}/tpde", method="PUT")).read()
    print(port, flush=True)
    # Serve until the parent closes our stdin (or kills us).
    sys.stdin.read()


if __name__ == "__main__":
    main()
