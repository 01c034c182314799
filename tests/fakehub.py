"""A local HTTP server that speaks the part of the Hugging Face Hub protocol snapshot_download uses
(revision info, file tree, resolve with X-Repo-Commit and ETag), so the real huggingface_hub client
downloads from it: the online path of rule `model` tested without a network."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


def serve(repos: dict[str, tuple[str, Path]], broken: set[str] = frozenset()) -> ThreadingHTTPServer:
    """Serve ``{repo: (commit, folder)}`` on a free port; files named in ``broken`` fail with 500."""

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def _json(self, obj) -> None:
            data = json.dumps(obj).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self):
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                commit, folder = repos["/".join(parts[2:4])]
                files = sorted(p for p in folder.iterdir() if p.is_file())
                if len(parts) > 4 and parts[4] == "tree":
                    tree = [{"type": "file", "path": p.name, "size": p.stat().st_size, "oid": "0" * 40} for p in files]
                    return self._json(tree)
                return self._json(
                    {"id": "/".join(parts[2:4]), "sha": commit, "siblings": [{"rfilename": p.name} for p in files]}
                )
            self._file(body=True)

        def do_HEAD(self):
            self._file(body=False)

        def _file(self, body: bool) -> None:
            parts = self.path.split("?")[0].strip("/").split("/")
            commit, folder = repos["/".join(parts[:2])]
            path = folder / "/".join(parts[4:])
            if not path.exists() or (body and path.name in broken):
                self.send_response(404 if not path.exists() else 500)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            data = path.read_bytes()
            self.send_response(200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            if body:
                self.wfile.write(data)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
