"""A small stand-in for the Hugging Face Hub's HTTP API, for tests of `valind stage` (tests/test_staging.py,
tests/test_staging_benchmarks.py: a repo whose README.md maps configs to folders, as cais/mmlu, needs nothing more).

Only what huggingface_hub 2.4.0 calls for `snapshot_download`, `hf_hub_download`,
`HfApi().model_info(..., files_metadata=True)` and, for dataset repos, what `datasets.load_dataset`
(5.2, no loading script) calls, answered as the Hub answers it ({kind}: models or datasets):
- GET  /api/{kind}/{repo}[/revision/{rev}][?blobs=True] repo info: sha, siblings (sizes, blob ids, lfs)
- GET  /api/{kind}/{repo}/tree/{rev}[/{folder}]?recursive=..  the file listing, in pages linked by a `Link` header
- HEAD /{repo}/resolve/{rev}/{path}                    X-Repo-Commit, ETag, Content-Length (no redirect, no xet)
- GET  /{repo}/resolve/{rev}/{path}                    the bytes
  (a dataset's: /datasets/{repo}/resolve/...)
Errors carry the Hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound), which huggingface_hub
maps to its exceptions. One commit per repo; `main` resolves to it. Weights (*.safetensors, *.bin) and
*.parquet are LFS files: their ETag is the sha256 of the content, as on the Hub; other files' is their git blob sha1.

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
from urllib.parse import parse_qs, quote, unquote, urlsplit

COMMIT = "5a1e0b9c4d3f2e1a0b9c8d7e6f5a4b3c2d1e0f9a"
LFS = (".safetensors", ".bin", ".parquet")


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

    def entries(self) -> list[dict]:
        """Every folder's and file's entry, as the tree listing gives them."""
        dirs = sorted({p.rsplit("/", i)[0] for p in self.files for i in range(1, p.count("/") + 1)})
        return [{"type": "directory", "path": d, "oid": git_sha1(d.encode())} for d in dirs] + \
            [self.entry(p) for p in sorted(self.files)]

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if path.endswith(LFS) else git_sha1(data)


class FakeHub:
    """`with FakeHub({"acme/tiny": Repo(...)}, datasets={"acme/prefs": Repo(...)}) as hub:` serves the model
    and dataset repos on hub.url (127.0.0.1, a free port)."""

    def __init__(self, repos: dict[str, Repo], page_size: int = 1000, datasets: dict[str, Repo] | None = None):
        self.repos, self.page_size, self.datasets = repos, page_size, datasets or {}
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
        parts = [unquote(p) for p in url.path.strip("/").split("/")]  # split first: a quoted rev or path holds "/"
        query = {k: v[-1].lower() for k, v in parse_qs(url.query).items()}  # httpx sends True as "true"
        with self._lock:
            self.counts[f"{h.command} /{'/'.join(parts)}"] += 1
        if parts[0] == "api" and parts[1:2] in (["models"], ["datasets"]) and (len(parts) == 4 or len(parts) >= 6):
            op, rev = (parts[4], parts[5]) if len(parts) > 4 else ("revision", "main")  # /api/{kind}s/{repo}: main's
            kind, repo = parts[1], "/".join(parts[2:4])
            if (err := self._check(kind, repo, rev)) is not None:
                return self._send(h, *err)
            r = self._repos(kind)[repo]
            if op == "revision":
                return self._json(h, self._info(repo, r, blobs=query.get("blobs") == "true"))
            if op != "tree":
                return self._send(h, 404, {}, b"not served by the fake hub")
            return self._tree(h, kind, repo, "/".join(parts[6:]), int(query.get("cursor", "0")), query)
        kind = "datasets" if parts[0] == "datasets" else "models"
        at = parts[1:] if kind == "datasets" else parts  # {repo}/resolve/{rev}/{path}
        if len(at) >= 5 and at[2] == "resolve":
            repo, rev, file = "/".join(at[:2]), at[3], "/".join(at[4:])
            if (err := self._check(kind, repo, rev)) is not None:
                return self._send(h, *err)
            return self._file(h, self._repos(kind)[repo], file, head)
        self._send(h, 404, {}, b"not served by the fake hub")

    def _repos(self, kind: str) -> dict[str, Repo]:
        return self.datasets if kind == "datasets" else self.repos

    def _check(self, kind: str, repo: str, rev: str) -> tuple[int, dict, bytes] | None:
        if repo not in self._repos(kind):  # the Hub answers 401 to an anonymous caller: private or missing
            return 401, {"X-Error-Code": "RepoNotFound"}, b'{"error": "Repository not found"}'
        if rev not in ("main", COMMIT):
            return 404, {"X-Error-Code": "RevisionNotFound"}, b'{"error": "Invalid rev id"}'
        return None

    @staticmethod
    def _info(repo: str, r: Repo, blobs: bool) -> dict:
        siblings = [{"rfilename": p} for p in r.files]
        if blobs:  # files_metadata=True
            for s in siblings:
                e = r.entry(s["rfilename"])
                s.update(size=e["size"], blobId=e["oid"])
                if "lfs" in e:
                    s["lfs"] = {"sha256": e["lfs"]["oid"], "size": e["size"], "pointerSize": e["lfs"]["pointerSize"]}
        return {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "gated": False, "siblings": siblings}

    def _tree(self, h: BaseHTTPRequestHandler, kind: str, repo: str, under: str, cursor: int, query: dict) -> None:
        """The entries under a folder (all of them, or its children only), a page at a time."""
        prefix = under + "/" if under else ""
        entries = [e for e in self._repos(kind)[repo].entries() if e["path"].startswith(prefix)]
        if query.get("recursive") != "true":
            entries = [e for e in entries if "/" not in e["path"][len(prefix):]]
        page, headers = entries[cursor:cursor + self.page_size], {}
        if cursor + self.page_size < len(entries):
            base = f"{self.url}/api/{kind}/{repo}/tree/{COMMIT}" + (f"/{quote(under, safe='')}" if under else "")
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
