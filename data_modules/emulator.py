"""A Cloud Storage API server on 127.0.0.1 for tests and benchmarks (``gcp-storage-emulator``, dev extra).

The server runs in a thread of the calling process, keeps objects in memory, and records every
request, so that a test can count the requests for one file. Clients reach it the standard way:
``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT`` (see :meth:`Emulator.env`), which gcsfs honours.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path
from urllib.parse import unquote


class Emulator:
    """``with Emulator() as emu: emu.upload(dir, "prefix")``; ``emu.url`` is ``gs://<bucket>``.

    ``delay``: seconds each GET waits before it is served (to slow a transfer down in a test).
    ``stop()``/``start()`` take the server away and bring it back on the same port, objects kept.
    """

    def __init__(self, bucket: str = "gqn-dataset", delay: float = 0.0):
        try:
            from gcp_storage_emulator import server as gse
        except ImportError as err:  # a dev dependency
            raise ImportError("the Cloud Storage emulator needs gcp-storage-emulator: pip install -e .[dev]") from err
        self._gse, self.bucket, self.delay = gse, bucket, delay
        self._server = gse.create_server("127.0.0.1", 0, in_memory=True, default_bucket=bucket)
        self.port = 0
        self.requests: list[tuple[str, str, str | None]] = []  # (method, unquoted path with query, Range header)
        self._lock = threading.Lock()
        self._api = None

    # ------------------------------------------------------------------ server
    def _thread(self):
        gse, emulator = self._gse, self

        class Handler(gse.RequestHandler):
            def __init__(self, *args, **kwargs):
                super().__init__(*args, **kwargs)

            def _note(self):
                with emulator._lock:
                    emulator.requests.append((self.command, unquote(self.path), self.headers.get("Range")))

            def do_GET(self):
                self._note()
                if emulator.delay:
                    time.sleep(emulator.delay)
                super().do_GET()

            def do_POST(self):
                self._note()
                super().do_POST()

            def do_PUT(self):
                self._note()
                super().do_PUT()

            def do_DELETE(self):
                self._note()
                super().do_DELETE()

            def log_message(self, format, *args):  # quiet
                pass

        storage = self._server._storage

        class API(gse.APIThread):
            def run(self):
                from functools import partial
                from http import server

                self._httpd = server.HTTPServer((self._host, self._port), partial(Handler, storage))
                self._port = self._httpd.server_address[1]
                self.is_running.set()
                self._httpd.serve_forever(poll_interval=0.05)

        return API("127.0.0.1", self.port, storage, daemon=True)

    def start(self) -> Emulator:
        self._api = self._thread()
        self._api.start()
        self._api.is_running.wait()
        self.port = self._api._port
        return self

    def stop(self) -> None:
        if self._api is not None:
            self._api.join()
            self._api = None

    def __enter__(self) -> Emulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ clients
    @property
    def host(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def url(self) -> str:
        return f"gs://{self.bucket}"

    def env(self) -> dict[str, str]:
        """The environment that points gcsfs (and so this package) at this server."""
        return {"STORAGE_EMULATOR_HOST": self.host}

    def put(self, key: str, data: bytes) -> None:
        """Write (or overwrite) object ``key`` of the bucket (a JSON-API media upload: the emulator's
        multipart parser drops a byte of some binary payloads, so gcsfs' small-file upload is not used)."""
        import urllib.request
        from urllib.parse import quote

        url = f"{self.host}/upload/storage/v1/b/{self.bucket}/o?uploadType=media&name={quote(key, safe='')}"
        req = urllib.request.Request(url, data=bytes(data), method="POST",
                                     headers={"Content-Type": "application/octet-stream"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            resp.read()

    def upload(self, local_dir: str | Path, prefix: str) -> list[str]:
        """Copy every file under ``local_dir`` to ``{bucket}/{prefix}/...``; returns the keys."""
        keys = []
        for path in sorted(Path(local_dir).rglob("*")):
            if path.is_file():
                key = "/".join(p for p in (prefix.strip("/"), path.relative_to(local_dir).as_posix()) if p)
                self.put(key, path.read_bytes())
                keys.append(key)
        return keys

    def count(self, text: str, method: str = "GET") -> int:
        """Requests so far whose path contains ``text`` (e.g. an object's name)."""
        with self._lock:
            return sum(1 for m, p, _ in self.requests if m == method and text in p)

    def ranges(self, text: str) -> list[str | None]:
        """The Range headers of the GET requests so far whose path contains ``text``."""
        with self._lock:
            return [r for m, p, r in self.requests if m == "GET" and text in p]

    def reset_counts(self) -> None:
        with self._lock:
            self.requests.clear()
