"""A small stand-in for the Hugging Face Hub's HTTP API, for tests of `valind stage` (tests/test_staging.py).

Only what huggingface_hub 2.4.0 calls for `snapshot_download`, `hf_hub_download` and
`HfApi().model_info(..., files_metadata=True)`, answered as the Hub answers it:
- GET  /api/models/{repo}/revision/{rev}[?blobs=True]  repo info: sha, siblings (sizes, blob ids, lfs)
- GET  /api/models/{repo}/tree/{rev}?recursive=..      the file listing, in pages linked by a `Link` header
- HEAD /{repo}/resolve/{rev}/{path}                    X-Repo-Commit, ETag, Content-Length (no redirect, no xet)
- GET  /{repo}/resolve/{rev}/{path}                    the bytes
Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), which huggingface_hub
maps to its exceptions. One commit per repo; `main` resolves to it. Weights (*.safetensors, *.bin) are
LFS files: their ETag is the sha256 of the content, as on the Hub; other files' is their git blob sha1.

To break it on purpose: `Repo.listed` (the size the API lists instead of the true one) and
`Repo.served` (what GET sends instead of the file, while HEAD still describes the file);
`Repo.gate` holds a file's GET until the test lets it go (`FakeHub.waiting` names the files held). `FakeHub.counts` counts requests per "METHOD path".
"""
from __future__ import annotations

import hashlib
import json
import threading
from collections import Counter
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

COMMIT = "5a1e0b9c4d3f2e1a0b9c8d7e6f5a4b3c2d1e0f9a"
LFS = (".safetensors", ".bin")


def git_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    files: dict[str, bytes]                               # path in the repo -> content
    listed: dict[str, int] = field(default_factory=dict)  # the API lists this size instead
    served: dict[str, bytes] = field(default_factory=dict)  # GET sends this instead
    gate: dict[str, threading.Event] = field(default_factory=dict)  # GET waits for it to be set (60 s at most)

    @classmethod
    def from_dir(cls, root: Path) -> Repo:
        return cls({p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()})

    def entry(self, path: str) -> dict:
        """The tree listing's entry for a file (the Hub's JSON keys)."""
        data = self.files[path]
        size = self.listed.get(path, len(data))
        if not path.endswith(LFS):
            return {"type": "file", "path": path, "size": size, "oid": git_sha1(data)}
        sha = hashlib.sha256(data).hexdigest()
        pointer = f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha}\nsize {size}\n".encode()
        return {"type": "file", "path": path, "size": size, "oid": git_sha1(pointer),
                "lfs": {"oid": sha, "size": size, "pointerSize": len(pointer)}}

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path.endswith(LFS) else git_sha1(data)


class FakeHub:
    """`with FakeHub({"acme/tiny": Repo(...)}) as hub:` serves on hub.url (127.0.0.1, a free port)."""

    def __init__(self, repos: dict[str, Repo], page_size: int = 1000):
        self.repos, self.page_size = repos, page_size
        self.counts: Counter[str] = Counter()
        self.waiting: set[str] = set()
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_HEAD(self) -> None:
                hub._serve(self, head=True)

            def do_GET(self) -> None:
                hub._serve(self, head=False)

            def log_message(self, *args: object) -> None:  # quiet: the counts say what was asked
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()

    # --- routing ---------------------------------------------------------------------------------

    def _serve(self, h: BaseHTTPRequestHandler, head: bool) -> None:
        url = urlsplit(h.path)
        path = unquote(url.path)
        query = {k: v[-1].lower() for k, v in parse_qs(url.query).items()}  # httpx sends True as "true"
        with self._lock:
            self.counts[f"{h.command} {path}"] += 1
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            repo, rev = "/".join(parts[2:4]), parts[5]
            if (err := self._check(repo, rev)) is not None:
                return self._send(h, *err)
            if parts[4] == "revision":
                return self._json(h, self._info(repo, blobs=query.get("blobs") == "true"))
            return self._tree(h, repo, int(query.get("cursor", "0")), query)
        if len(parts) >= 5 and parts[2] == "resolve":
            repo, rev, file = "/".join(parts[:2]), parts[3], "/".join(parts[4:])
            if (err := self._check(repo, rev)) is not None:
                return self._send(h, *err)
            return self._file(h, self.repos[repo], file, head)
        self._send(h, 404, {}, b"not served by the fake hub")

    def _check(self, repo: str, rev: str) -> tuple[int, dict, bytes] | None:
        if repo not in self.repos:  # the Hub answers 401 to an anonymous caller: private or missing
            return 401, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'
        if rev not in ("main", COMMIT):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}'
        return None

    def _info(self, repo: str, blobs: bool) -> dict:
        r = self.repos[repo]
        siblings = [{"rfilename": p} for p in r.files]
        if blobs:  # files_metadata=True
            for s in siblings:
                e = r.entry(s["rfilename"])
                s.update(size=e["size"], blobId=e["oid"])
                if "lfs" in e:
                    s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": e["lfs"]["pointerSize"]}
        return {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "gated": False, "siblings": siblings}

    def _tree(self, h: BaseHTTPRequestHandler, repo: str, cursor: int, query: dict) -> None:
        r = self.repos[repo]
        dirs = sorted({p.rsplit("/", 1)[0] for p in r.files if "/" in p})
        entries = [{"type": "directory", "path": d, "oid": git_sha1(d.encode())} for d in dirs]
        entries += [r.entry(p) for p in sorted(r.files)]
        if query.get("recursive") != "true":
            entries = [e for e in entries if "/" not in e["path"]]
        page, headers = entries[cursor:cursor + self.page_size], {}
        if cursor + self.page_size < len(entries):
            base = f"{self.url}/api/models/{repo}/tree/{COMMIT}"
            headers["Link"] = (f'<{base}?recursive={query.get("recursive", "false")}&expand=false'
                               f'&cursor={cursor + self.page_size}>; rel="next"')
        self._json(h, page, headers)

    def _file(self, h: BaseHTTPRequestHandler, r: Repo, file: str, head: bool) -> None:
        if file not in r.files:
            return self._send(h, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"Entry not found")
        body = r.files[file] if head else r.served.get(file, r.files[file])
        if not head and file in r.gate:
            self.waiting.add(file)
            r.gate[file].wait(60)
        self._send(h, 200, {"X-Repo-Commit": COMMIT, "ETag": f'"{r.etag(file)}"',
                            "Content-Type": "application/octet-stream"}, body, head)

    def _json(self, h: BaseHTTPRequestHandler, obj: object, headers: dict | None = None) -> None:
        self._send(h, 200, {"Content-Type": "application/json", **(headers or {})}, json.dumps(obj).encode())

    @staticmethod
    def _send(h: BaseHTTPRequestHandler, status: int, headers: dict, body: bytes, head: bool = False) -> None:
        h.send_response(status)
        for k, v in {**headers, "Content-Length": str(len(body))}.items():
            h.send_header(k, v)
        h.end_headers()
        if not head:
            h.wfile.write(body)


__all__ = ["COMMIT", "FakeHub", "Repo"]
