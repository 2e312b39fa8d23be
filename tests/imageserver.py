"""A loopback HTTP server for image downloads in tests: serves files, answers
HEAD and Range requests with an ETag, counts requests, and can cut a transfer.
``require_auth=(user, password)`` and ``require_token=t`` refuse (401/403) a
request without that HTTP basic authentication or ``?token=t``."""

from __future__ import annotations

import base64
import hashlib
import http.server
import os
import threading
import urllib.parse
from collections import Counter
from pathlib import Path


class ImageServer:
    """``ImageServer({"/a.qcow2": path_or_bytes})``; ``url("/a.qcow2")``."""

    def __init__(
        self,
        files: dict[str, Path | bytes],
        require_auth: tuple[str, str] | None = None,
        require_token: str | None = None,
    ):
        self.files = files
        self.require_auth, self.require_token = require_auth, require_token
        self.requests: Counter = Counter()  # (method, path) -> count
        self.cut_after: dict[str, int] = {}  # path -> bytes sent before dropping, once
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_HEAD(self):
                server._answer(self, body=False)

            def do_GET(self):
                server._answer(self, body=True)

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def gets(self, path: str) -> int:
        return self.requests[("GET", path)]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def _size(self, item) -> int:
        return len(item) if isinstance(item, bytes) else os.path.getsize(item)

    def _read(self, item, start: int, length: int) -> bytes:
        if isinstance(item, bytes):
            return item[start : start + length]
        with open(item, "rb") as handle:
            handle.seek(start)
            return handle.read(length)

    def _allowed(self, req, query: str) -> bool:
        if self.require_auth is not None:
            expected = base64.b64encode(":".join(self.require_auth).encode()).decode()
            if req.headers.get("Authorization") != f"Basic {expected}":
                req.send_error(401)
                return False
        if self.require_token is not None:
            if urllib.parse.parse_qs(query).get("token") != [self.require_token]:
                req.send_error(403)
                return False
        return True

    def _answer(self, req, body: bool) -> None:
        path, _, query = req.path.partition("?")
        self.requests[(req.command, path)] += 1
        if not self._allowed(req, query):
            return
        item = self.files.get(path)
        if item is None:
            req.send_error(404)
            return
        size = self._size(item)
        etag = '"' + hashlib.sha256(f"{path}:{size}".encode()).hexdigest()[:16] + '"'
        start = 0
        ranged = req.headers.get("Range", "")
        if ranged.startswith("bytes=") and req.headers.get("If-Range", etag) == etag:
            start = int(ranged[6:].split("-")[0])
        req.send_response(206 if start else 200)
        req.send_header("Content-Length", str(size - start))
        req.send_header("ETag", etag)
        req.send_header("Accept-Ranges", "bytes")
        if start:
            req.send_header("Content-Range", f"bytes {start}-{size - 1}/{size}")
        req.end_headers()
        if not body:
            return
        limit = self.cut_after.pop(path, None)
        offset = start
        while offset < size:
            chunk = self._read(item, offset, 1024 * 1024)
            if limit is not None and offset - start + len(chunk) > limit:
                req.wfile.write(chunk[: max(0, limit - (offset - start))])
                req.wfile.flush()
                req.close_connection = True
                return
            req.wfile.write(chunk)
            offset += len(chunk)
