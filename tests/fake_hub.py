"""A local stand-in for the Hugging Face Hub's HTTP endpoints, so huggingface_hub's own download code runs in tests.

Served (what huggingface_hub 2.x asks for a snapshot): ``GET /api/{models,datasets}/ORG/NAME[/revision/REV]``
(repo info: sha, siblings), ``GET /api/.../tree/REV[/PATH]`` (the file listing), and ``HEAD``/``GET``
``[/datasets]/ORG/NAME/resolve/REV/FILE`` with the headers the library reads (X-Repo-Commit, ETag,
Content-Length). Unknown repositories and files answer 404 with the X-Error-Code the library maps to its errors.
Every request's Authorization header is recorded, so a test can see the token was sent.

Also :func:`write_cached_repo`: a repository written straight into a Hub cache in the layout huggingface_hub
writes (``models--org--name/{blobs,refs,snapshots}``), for the offline path without any server.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


def git_blob_sha(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit_of(files: dict[str, bytes]) -> str:
    """A stable 40-hex commit id for a set of files (the Hub's would be git's; any 40 hex digits will do)."""
    return hashlib.sha1(json.dumps({k: git_blob_sha(v) for k, v in sorted(files.items())}).encode()).hexdigest()


def directory_files(directory: Path) -> dict[str, bytes]:
    return {p.relative_to(directory).as_posix(): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


class FakeHub:
    def __init__(self) -> None:
        self.repos: dict[tuple[str, str], tuple[str, dict[str, bytes]]] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self._server: ThreadingHTTPServer | None = None

    def add(self, repo_type: str, repo_id: str, files: dict[str, bytes]) -> str:
        """Serve ``files`` as ``repo_id`` (``repo_type`` model or dataset) at one commit, also its ``main``."""
        commit = commit_of(files)
        self.repos[(repo_type, repo_id)] = (commit, files)
        return commit

    @property
    def url(self) -> str:
        assert self._server is not None
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> str:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:  # quiet
                pass

            def do_HEAD(self) -> None:
                hub._answer(self, body=False)

            def do_GET(self) -> None:
                hub._answer(self, body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self.url

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # ------------------------------------------------------------------ requests

    def _repo(self, repo_type: str, repo_id: str, revision: str):
        found = self.repos.get((repo_type, repo_id))
        if found is None or revision not in ("main", found[0]):
            return None
        return found

    def _answer(self, request: BaseHTTPRequestHandler, body: bool) -> None:
        self.requests.append((request.command, request.path, request.headers.get("Authorization")))
        parts = [unquote(p) for p in urlparse(request.path).path.strip("/").split("/")]
        if parts[:1] == ["api"] and len(parts) in (4, 6) or len(parts) > 6 and parts[1] in ("models", "datasets"):
            # /api/models/ORG/NAME is the repo info at the default branch
            action, revision = (parts[4], parts[5]) if len(parts) > 4 else ("revision", "main")
            repo_type, repo_id = parts[1][:-1], f"{parts[2]}/{parts[3]}"
            found = self._repo(repo_type, repo_id, revision)
            if found is None:
                return self._send(request, 404, b'{"error": "not found"}', {"X-Error-Code": "RepoNotFound"}, body)
            commit, files = found
            if action == "revision":
                info = {"id": repo_id, "sha": commit, "private": False,
                        "siblings": [{"rfilename": name} for name in sorted(files)]}
                return self._send(request, 200, json.dumps(info).encode(), {}, body)
            if action == "tree":
                prefix = "/".join(parts[6:])
                listing = [{"type": "file", "path": name, "size": len(data), "oid": git_blob_sha(data)}
                           for name, data in sorted(files.items()) if name.startswith(prefix)]
                return self._send(request, 200, json.dumps(listing).encode(), {}, body)
        repo_type = "dataset" if parts[:1] == ["datasets"] else "model"
        rest = parts[1:] if repo_type == "dataset" else parts
        if len(rest) >= 5 and rest[2] == "resolve":
            found = self._repo(repo_type, f"{rest[0]}/{rest[1]}", rest[3])
            if found is None:
                return self._send(request, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)
            commit, files = found
            data = files.get("/".join(rest[4:]))
            if data is None:
                return self._send(request, 404, b"", {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": commit}, body)
            headers = {"X-Repo-Commit": commit, "ETag": f'"{hashlib.sha256(data).hexdigest()}"'}
            return self._send(request, 200, data, headers, body)
        self._send(request, 404, b"", {"X-Error-Code": "RepoNotFound"}, body)

    @staticmethod
    def _send(request: BaseHTTPRequestHandler, status: int, data: bytes, headers: dict[str, str], body: bool) -> None:
        request.send_response(status)
        for key, value in headers.items():
            request.send_header(key, value)
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        if body:
            request.wfile.write(data)


def write_cached_repo(cache: Path, repo_type: str, repo_id: str, files: dict[str, bytes]) -> str:
    """Write ``files`` into the Hub cache ``cache`` as huggingface_hub lays a download out: blobs by etag,
    ``snapshots/<commit>/`` symlinks to them, ``refs/main`` holding the commit. Returns the commit."""
    commit = commit_of(files)
    root = cache / f"{repo_type}s--{repo_id.replace('/', '--')}"
    (root / "refs").mkdir(parents=True, exist_ok=True)
    (root / "refs" / "main").write_text(commit)
    for name, data in files.items():
        blob = root / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        link = root / "snapshots" / commit / name
        link.parent.mkdir(parents=True, exist_ok=True)
        os.symlink(os.path.relpath(blob, link.parent), link)
    return commit
