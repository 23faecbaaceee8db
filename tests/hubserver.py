"""A local, in-memory, Hugging Face Hub-compatible HTTP server for tests and the offline demo.

It speaks the part of the Hub's HTTP API that ``huggingface_hub.HfApi`` uses to publish and read a model
repo with classic Git LFS (the client must run with ``HF_HUB_DISABLE_XET=1``): whoami, repo creation,
YAML validation, preupload, the LFS batch API with self-authorizing upload links and a verify step, NDJSON
commits (base64 and LFS files), branches, tags, refs, repo info, tree, commit lists, paths-info,
``HEAD``/``GET`` on ``resolve`` and collections (create, get, add and delete an item). Repos live in memory; commit ids are sha1s of the commit's content and
file ids are git blob ids (sha256 for LFS objects), as on the Hub.

Faults can be injected per request (an HTTP status, or a connection dropped after part of the body).

Use it from Python (``with HubServer() as hub: ...``) or from a shell::

    python -m tests.hubserver --port 0 --token hf_demo --user demo
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import socket
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, quote, unquote, urlsplit

import yaml

DEFAULT_GITATTRIBUTES = "".join(
    f"{p} filter=lfs diff=lfs merge=lfs -text\n"
    for p in (
        "*.7z",
        "*.arrow",
        "*.bin",
        "*.bz2",
        "*.ckpt",
        "*.ftz",
        "*.gguf",
        "*.gz",
        "*.h5",
        "*.joblib",
        "*.lfs.*",
        "*.mlmodel",
        "*.model",
        "*.msgpack",
        "*.npy",
        "*.npz",
        "*.onnx",
        "*.ot",
        "*.parquet",
        "*.pb",
        "*.pickle",
        "*.pkl",
        "*.pt",
        "*.pth",
        "*.rar",
        "*.safetensors",
        "*.tar.*",
        "*.tar",
        "*.tflite",
        "*.tgz",
        "*.wasm",
        "*.xz",
        "*.zip",
        "*.zst",
        "*tfevents*",
    )
)
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
RELATIONS = {"adapter", "merge", "quantized", "finetune"}


def git_blob_oid(data: bytes) -> str:
    """Git's blob id of ``data`` (what the Hub reports as a regular file's oid / ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(oid: str, size: int) -> bytes:
    """The Git LFS pointer file of an object."""
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n".encode()


def _now() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass
class Entry:
    """One file in a commit's tree."""

    size: int
    oid: str  # git blob id (of the pointer for an LFS file)
    lfs: str | None = None  # sha256 of the content for an LFS file


@dataclass
class Commit:
    """One commit: its parent, message, author, date and full tree (path -> Entry)."""

    id: str
    parent: str | None
    title: str
    message: str
    author: str
    date: str
    files: dict[str, Entry]


@dataclass
class Repo:
    """One model repo: owner namespace, visibility, refs, commits and the LFS objects it holds."""

    repo_id: str
    owner: str
    private: bool = False
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    commits: dict[str, Commit] = field(default_factory=dict)
    lfs: set[str] = field(default_factory=set)


@dataclass
class CollectionItem:
    """One item of a collection: the Hub's object id, the repo id and its type."""

    object_id: str
    item_id: str
    item_type: str
    note: str | None = None


@dataclass
class Collection:
    """A collection: slug (``namespace/title-slug-<24 hex>``), title, owner namespace and its items in order."""

    slug: str
    title: str
    namespace: str
    description: str | None = None
    private: bool = False
    items: list[CollectionItem] = field(default_factory=list)
    updated: str = ""


@dataclass
class User:
    """A token's user and the organizations it can write to."""

    name: str
    orgs: list[str] = field(default_factory=list)


@dataclass
class Fault:
    """An injected failure: for requests matching ``method`` and ``path`` (a regex), ``times`` times."""

    method: str
    path: str
    status: int | None = None
    drop: bool = False
    times: int = 1
    hits: int = 0


class HubState:
    """Everything the server holds: users, repos, blobs and LFS objects, faults and a request log."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.users: dict[str, User] = {}
        self.repos: dict[str, Repo] = {}
        self.collections: dict[str, Collection] = {}  # slug -> collection
        self.blobs: dict[str, bytes] = {}  # git oid -> content (regular files and pointers)
        self.objects: dict[str, bytes] = {}  # sha256 -> LFS content
        self.faults: list[Fault] = []
        self.requests: list[tuple[str, str, int]] = []  # (method, path without query, status)
        self.secret = secrets.token_bytes(16)
        self._seq = 0

    # -- helpers used by tests -------------------------------------------------------------------
    def add_user(self, token: str, name: str, orgs: list[str] | None = None) -> None:
        """Accept ``token`` as user ``name`` (member of ``orgs``)."""
        with self.lock:
            self.users[token] = User(name, list(orgs or []))

    def create_repo(self, repo_id: str, owner: str | None = None, private: bool = False) -> Repo:
        """Create a repo with the Hub's initial commit (a .gitattributes); ``owner`` defaults to its namespace."""
        with self.lock:
            repo = Repo(repo_id, owner or repo_id.split("/")[0], private)
            self.repos[repo_id] = repo
            data = DEFAULT_GITATTRIBUTES.encode()
            self.blobs[git_blob_oid(data)] = data
            files = {".gitattributes": Entry(len(data), git_blob_oid(data))}
            repo.branches["main"] = self._new_commit(repo, None, files, "initial commit", "", repo.owner)
            return repo

    def inject(
        self, method: str, path: str, *, status: int | None = None, drop: bool = False, times: int = 1
    ) -> Fault:
        """Fail the next ``times`` requests whose method and path (regex search) match."""
        fault = Fault(method.upper(), path, status, drop, times)
        with self.lock:
            self.faults.append(fault)
        return fault

    def commits(self, repo_id: str) -> int:
        """How many commits the repo holds (the initial one included)."""
        with self.lock:
            return len(self.repos[repo_id].commits)

    def count(self, method: str, pattern: str) -> int:
        """How many logged requests match ``method`` and the regex ``pattern``."""
        with self.lock:
            return sum(1 for m, p, _ in self.requests if m == method and re.search(pattern, p))

    def collection_items(self, slug: str) -> list[str]:
        """The item ids of a collection, in order."""
        with self.lock:
            return [i.item_id for i in self.collections[slug].items]

    def file_bytes(self, repo_id: str, revision: str, path: str) -> bytes:
        """Content of a file at a revision."""
        with self.lock:
            repo = self.repos[repo_id]
            entry = repo.commits[self.resolve(repo, revision)].files[path]
            return self.objects[entry.lfs] if entry.lfs else self.blobs[entry.oid]

    # -- model -----------------------------------------------------------------------------------
    def resolve(self, repo: Repo, revision: str) -> str | None:
        """Commit id of a branch, tag or commit id (None if unknown)."""
        revision = unquote(revision)
        if revision in repo.branches:
            return repo.branches[revision]
        if revision in repo.tags:
            return repo.tags[revision]
        if revision in repo.commits:
            return revision
        return None

    def _new_commit(
        self, repo: Repo, parent: str | None, files: dict[str, Entry], title: str, message: str, author: str
    ) -> str:
        self._seq += 1
        tree = "".join(f"{p}\0{e.oid}\n" for p, e in sorted(files.items()))
        body = f"tree {hashlib.sha1(tree.encode()).hexdigest()}\nparent {parent}\nseq {self._seq}\n\n{title}\n{message}"
        cid = hashlib.sha1(body.encode()).hexdigest()
        repo.commits[cid] = Commit(cid, parent, title, message, author, _now(), dict(files))
        return cid


class Handler(BaseHTTPRequestHandler):
    """Routes one request; the server's ``state`` holds everything."""

    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body leave at once: no delayed-ACK stalls per request
    wbufsize = 1 << 16
    server: _Server

    # -- plumbing --------------------------------------------------------------------------------
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - BaseHTTPRequestHandler's name
        """Silence the default stderr log (the state keeps a request log, without headers)."""

    @property
    def state(self) -> HubState:
        """The server's state."""
        return self.server.state

    @property
    def base(self) -> str:
        """This server's URL (for links it hands out)."""
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def _read_body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            out = b""
            while True:
                size = int(self.rfile.readline().strip().split(b";")[0], 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return out
                out += self.rfile.read(size)
                self.rfile.readline()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _send(
        self, status: int, body: object = None, headers: dict[str, str] | None = None, head: bool = False
    ) -> None:
        if isinstance(body, bytes):
            data, ctype = body, "application/octet-stream"
        else:
            data, ctype = json.dumps(body if body is not None else {}).encode(), "application/json"
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if not head:
            self.wfile.write(data)
        with self.state.lock:
            self.state.requests.append((self.command, self._path, status))

    def _error(self, status: int, message: str, code: str | None = None, head: bool = False) -> None:
        headers = {"X-Error-Message": message}
        if code:
            headers["X-Error-Code"] = code
        self._send(status, {"error": message}, headers, head=head)

    def _fault(self) -> bool:
        with self.state.lock:
            fault = next(
                (
                    f
                    for f in self.state.faults
                    if f.hits < f.times and f.method == self.command and re.search(f.path, self._path)
                ),
                None,
            )
            if fault is not None:
                fault.hits += 1
        if fault is None:
            return False
        if fault.drop:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(max(1, length // 2))
            with self.state.lock:
                self.state.requests.append((self.command, self._path, 0))
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            return True
        self._read_body()
        self._error(fault.status or 500, f"injected fault ({fault.status})")
        return True

    def _user(self) -> User | None | bool:
        """The caller (None if anonymous, False if the token is unknown)."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        token = auth.split(" ", 1)[1] if " " in auth else auth
        return self.state.users.get(token, False)

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self._path = split.path
        self._query = {k: v[-1] for k, v in parse_qs(split.query).items()}
        if self._fault():
            return
        head = self.command == "HEAD"
        for method, pattern, name in ROUTES:
            if method != ("GET" if head else self.command):
                continue
            m = re.fullmatch(pattern, self._path)
            if m:
                # The self-authorizing LFS upload link carries its own signature, no token.
                user = self._user()
                if user is False and name != "lfs_put":
                    self._read_body()
                    self._error(401, "Invalid credentials in Authorization header", head=head)
                    return
                try:
                    getattr(self, "r_" + name)(
                        user, *[unquote(g) if g is not None else None for g in m.groups()]
                    )
                except (ValueError, KeyError, json.JSONDecodeError) as exc:
                    self._error(400, f"bad request: {exc}", head=head)
                return
        self._read_body()
        self._error(404, f"no route {self.command} {self._path}", head=head)

    do_GET = do_POST = do_PUT = do_HEAD = do_DELETE = _dispatch

    # -- access checks ---------------------------------------------------------------------------
    def _repo(self, user, repo_id: str, write: bool = False, head: bool = False) -> Repo | None:
        repo = self.state.repos.get(repo_id)
        can_write = bool(user) and repo is not None and (repo.owner == user.name or repo.owner in user.orgs)
        if repo is None or (repo.private and not can_write):
            self._error(404, "Repository not found", "RepoNotFound", head=head)
            return None
        if write and not user:
            self._error(401, "You must be authenticated to write", head=head)
            return None
        if write and not can_write:
            self._error(403, f"You don't have the rights to write to {repo_id}", head=head)
            return None
        return repo

    def _commit_of(self, repo: Repo, revision: str, head: bool = False) -> Commit | None:
        cid = self.state.resolve(repo, revision)
        if cid is None:
            self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound", head=head)
            return None
        return repo.commits[cid]

    # -- routes ----------------------------------------------------------------------------------
    def r_whoami(self, user) -> None:
        """The token's user and organizations (401 without a valid token)."""
        if not user:
            self._error(401, "Invalid credentials in Authorization header")
            return
        self._send(
            200,
            {
                "type": "user",
                "name": user.name,
                "orgs": [{"name": o, "roleInOrg": "write"} for o in user.orgs],
                "auth": {"type": "access_token", "accessToken": {"role": "write"}},
            },
        )

    def r_create(self, user) -> None:
        """Create a repo in the caller's namespace or one of its orgs (409 if it exists, 403 elsewhere)."""
        payload = json.loads(self._read_body() or b"{}")
        if not user:
            self._error(401, "You must be authenticated to create a repo")
            return
        ns = payload.get("organization") or user.name
        repo_id = f"{ns}/{payload['name']}"
        if ns != user.name and ns not in user.orgs:
            self._error(403, f'You don\'t have the rights to create a model under the namespace "{ns}"')
            return
        with self.state.lock:
            if repo_id in self.state.repos:
                msg = "You already created this model repo"
                self._send(409, {"error": msg, "url": f"{self.base}/{repo_id}"}, {"X-Error-Message": msg})
                return
            private = payload.get("visibility") == "private" or bool(payload.get("private"))
            self.state.create_repo(repo_id, ns, private)
        self._send(200, {"url": f"{self.base}/{repo_id}", "name": repo_id, "id": repo_id})

    def r_validate_yaml(self, user) -> None:
        """Check a README's metadata block the way the Hub does (400 with errors)."""
        payload = json.loads(self._read_body() or b"{}")
        errors = validate_card_metadata(payload.get("content", ""))
        self._send(400 if errors else 200, {"errors": [{"message": e} for e in errors], "warnings": []})

    def r_info(self, user, repo_id: str, revision: str = "main") -> None:
        """Repo info at a revision: sha, visibility and siblings."""
        with self.state.lock:
            repo = self._repo(user, repo_id)
            if repo is None:
                return
            commit = self._commit_of(repo, revision)
            if commit is None:
                return
            self._send(
                200,
                {
                    "id": repo_id,
                    "author": repo.owner,
                    "sha": commit.id,
                    "private": repo.private,
                    "lastModified": commit.date,
                    "tags": [],
                    "siblings": [{"rfilename": p} for p in sorted(commit.files)],
                },
            )

    def r_info_rev(self, user, repo_id: str, revision: str) -> None:
        """Repo info at an explicit revision."""
        self.r_info(user, repo_id, revision)

    def r_refs(self, user, repo_id: str) -> None:
        """Branches and tags with their target commits (converts and pull requests empty)."""
        with self.state.lock:
            repo = self._repo(user, repo_id)
            if repo is None:
                return

            def refs(kind: str, d: dict[str, str]) -> list[dict]:
                return [
                    {"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in sorted(d.items())
                ]

            self._send(
                200,
                {
                    "branches": refs("heads", repo.branches),
                    "tags": refs("tags", repo.tags),
                    "converts": [],
                    "pullRequests": [],
                },
            )

    def r_commits(self, user, repo_id: str, revision: str) -> None:
        """The commits of a revision, newest first."""
        with self.state.lock:
            repo = self._repo(user, repo_id)
            commit = repo and self._commit_of(repo, revision)
            if not commit:
                return
            out = []
            while commit is not None:
                out.append(
                    {
                        "id": commit.id,
                        "title": commit.title,
                        "message": commit.message,
                        "authors": [{"user": commit.author}],
                        "date": commit.date,
                    }
                )
                commit = repo.commits.get(commit.parent) if commit.parent else None
            self._send(200, out)

    def _tree_entry(self, path: str, entry: Entry) -> dict:
        item = {"type": "file", "oid": entry.oid, "size": entry.size, "path": path}
        if entry.lfs:
            ptr = lfs_pointer(entry.lfs, entry.size)
            item["lfs"] = {"oid": entry.lfs, "size": entry.size, "pointerSize": len(ptr)}
        return item

    def r_tree(self, user, repo_id: str, revision: str, path: str | None = None) -> None:
        """The files (and folders) of a revision, optionally under a path and recursive."""
        recursive = self._query.get("recursive", "").lower() in ("1", "true")
        with self.state.lock:
            repo = self._repo(user, repo_id)
            commit = repo and self._commit_of(repo, revision)
            if not commit:
                return
            prefix = (path.strip("/") + "/") if path else ""
            if path and not any(p.startswith(prefix) for p in commit.files):
                self._error(404, f"{path} does not exist on {revision}", "EntryNotFound")
                return
            out, dirs = [], set()
            for p, entry in sorted(commit.files.items()):
                if not p.startswith(prefix):
                    continue
                rest = p[len(prefix) :].split("/")
                for i in range(1, len(rest)):
                    d = prefix + "/".join(rest[:i])
                    if (recursive or i == 1) and d not in dirs:
                        dirs.add(d)
                        out.append(
                            {
                                "type": "directory",
                                "oid": hashlib.sha1(d.encode()).hexdigest(),
                                "size": 0,
                                "path": d,
                            }
                        )
                if recursive or len(rest) == 1:
                    out.append(self._tree_entry(p, entry))
            self._send(200, out)

    def r_paths_info(self, user, repo_id: str, revision: str) -> None:
        """Info on the given paths at a revision."""
        body = self._read_body().decode()
        form = parse_qs(body) if "json" not in self.headers.get("Content-Type", "") else json.loads(body)
        paths = form.get("paths", [])
        with self.state.lock:
            repo = self._repo(user, repo_id)
            commit = repo and self._commit_of(repo, revision)
            if not commit:
                return
            self._send(200, [self._tree_entry(p, commit.files[p]) for p in paths if p in commit.files])

    def r_preupload(self, user, repo_id: str, revision: str) -> None:
        """Upload mode (lfs/regular), shouldIgnore and the remote oid of each announced file."""
        payload = json.loads(self._read_body() or b"{}")
        with self.state.lock:
            repo = self._repo(user, repo_id, write=True)
            commit = repo and self._commit_of(repo, revision)
            if not commit:
                return
            patterns = _lfs_patterns(self.state, commit)
            ignores = [ln.strip() for ln in (payload.get("gitIgnore") or "").splitlines() if ln.strip()]
            files = []
            for f in payload["files"]:
                sample = base64.b64decode(f.get("sample", ""))
                name = f["path"].rsplit("/", 1)[-1]
                lfs = (
                    f["size"] >= LFS_SIZE_THRESHOLD
                    or b"\0" in sample
                    or any(fnmatch.fnmatch(name, p) or fnmatch.fnmatch(f["path"], p) for p in patterns)
                )
                old = commit.files.get(f["path"])
                files.append(
                    {
                        "path": f["path"],
                        "uploadMode": "lfs" if lfs else "regular",
                        "shouldIgnore": any(fnmatch.fnmatch(f["path"], p) for p in ignores),
                        "oid": (old.lfs or old.oid) if old else None,
                    }
                )
            self._send(200, {"files": files, "commitOid": commit.id})

    def r_lfs_batch(self, user, repo_id: str) -> None:
        """LFS batch API: a signed upload link and a verify link per object the repo lacks."""
        payload = json.loads(self._read_body() or b"{}")
        with self.state.lock:
            repo = self._repo(user, repo_id, write=payload.get("operation") == "upload")
            if repo is None:
                return
            objects = []
            for obj in payload.get("objects", []):
                oid, size = obj["oid"], int(obj["size"])
                item = {"oid": oid, "size": size, "authenticated": True}
                if oid not in repo.lfs:
                    sig = _sign(self.state.secret, repo_id, oid, size)
                    item["actions"] = {
                        "upload": {
                            "href": f"{self.base}/lfs-upload/{repo_id}/{oid}?size={size}&sig={sig}",
                            "header": {},
                        },
                        "verify": {"href": f"{self.base}/lfs-verify/{repo_id}", "header": {}},
                    }
                objects.append(item)
            self._send(200, {"transfer": "basic", "objects": objects})

    def r_lfs_put(self, user, repo_id: str, oid: str) -> None:
        """Store an LFS object sent to its self-authorizing link (checks signature, size, sha256)."""
        data = self._read_body()
        size = int(self._query.get("size", "-1"))
        if not hmac.compare_digest(self._query.get("sig", ""), _sign(self.state.secret, repo_id, oid, size)):
            self._error(403, "bad signature")
            return
        if len(data) != size or hashlib.sha256(data).hexdigest() != oid:
            self._error(400, "content does not match the announced oid/size")
            return
        with self.state.lock:
            self.state.objects[oid] = data
            self.state.repos[repo_id].lfs.add(oid)
        self._send(200, {})

    def r_lfs_verify(self, user, repo_id: str) -> None:
        """Confirm an LFS object is stored (404 if not)."""
        payload = json.loads(self._read_body() or b"{}")
        with self.state.lock:
            repo = self._repo(user, repo_id, write=True)
            if repo is None:
                return
            if payload.get("oid") not in repo.lfs:
                self._error(404, "object not found")
                return
            self._send(200, {"success": True})

    def r_commit(self, user, repo_id: str, revision: str) -> None:
        """Apply an NDJSON commit (base64 files, LFS files, deletions) to a branch head."""
        lines = [json.loads(ln) for ln in self._read_body().splitlines() if ln.strip()]
        with self.state.lock:
            repo = self._repo(user, repo_id, write=True)
            if repo is None:
                return
            if revision not in repo.branches:
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                return
            head_id = repo.branches[revision]
            files = dict(repo.commits[head_id].files)
            header = {}
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    header = value
                elif key == "file":
                    if value.get("encoding") != "base64":
                        raise ValueError("only base64 content is supported")
                    data = base64.b64decode(value["content"])
                    self.state.blobs[git_blob_oid(data)] = data
                    files[value["path"]] = Entry(len(data), git_blob_oid(data))
                elif key == "lfsFile":
                    oid = value["oid"]
                    if oid not in repo.lfs:
                        self._error(422, f"LFS object {oid} for {value['path']} was not uploaded")
                        return
                    size = len(self.state.objects[oid])
                    ptr = lfs_pointer(oid, size)
                    self.state.blobs[git_blob_oid(ptr)] = ptr
                    files[value["path"]] = Entry(size, git_blob_oid(ptr), oid)
                elif key == "deletedFile":
                    if files.pop(value["path"], None) is None:
                        self._error(
                            404, f"A file with this name doesn't exist: {value['path']}", "EntryNotFound"
                        )
                        return
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    files = {p: e for p, e in files.items() if not p.startswith(prefix)}
                else:
                    raise ValueError(f"unknown commit operation {key!r}")
            parent = header.get("parentCommit")
            if parent and not head_id.startswith(parent):
                self._error(412, f"parent commit {parent} is not the head of {revision}")
                return
            cid = self.state._new_commit(
                repo, head_id, files, header.get("summary", ""), header.get("description", ""), user.name
            )
            repo.branches[revision] = cid
        self._send(
            200, {"commitUrl": f"{self.base}/{repo_id}/commit/{cid}", "commitOid": cid, "success": True}
        )

    def r_branch(self, user, repo_id: str, branch: str) -> None:
        """Create a branch at a starting point (default: main's head; 409 if it exists)."""
        payload = json.loads(self._read_body() or b"{}")
        with self.state.lock:
            repo = self._repo(user, repo_id, write=True)
            if repo is None:
                return
            if branch in repo.branches:
                self._error(409, f"Branch {branch} already exists")
                return
            commit = self._commit_of(repo, payload.get("startingPoint") or "main")
            if commit is None:
                return
            repo.branches[branch] = commit.id
        self._send(200, {})

    def r_tag(self, user, repo_id: str, revision: str) -> None:
        """Tag a revision (409 if the tag exists)."""
        payload = json.loads(self._read_body() or b"{}")
        with self.state.lock:
            repo = self._repo(user, repo_id, write=True)
            commit = repo and self._commit_of(repo, revision)
            if not commit:
                return
            if payload["tag"] in repo.tags:
                self._error(409, f"Tag {payload['tag']} already exists")
                return
            repo.tags[payload["tag"]] = commit.id
        self._send(200, {})

    def r_delete_tag(self, user, repo_id: str, tag: str) -> None:
        """Delete a tag."""
        with self.state.lock:
            repo = self._repo(user, repo_id, write=True)
            if repo is None:
                return
            if repo.tags.pop(tag, None) is None:
                self._error(404, f"Invalid rev id: {tag}", "RevisionNotFound")
                return
        self._send(200, {})

    # -- collections -----------------------------------------------------------------------------
    def _collection_json(self, c: Collection) -> dict:
        return {
            "slug": c.slug,
            "title": c.title,
            "description": c.description,
            "owner": {
                "name": c.namespace,
                "type": "org" if c.namespace not in self._user_names() else "user",
            },
            "items": [
                {
                    "_id": i.object_id,
                    "id": i.item_id,
                    "type": i.item_type,
                    "position": n,
                    **({"note": {"text": i.note, "html": i.note}} if i.note else {}),
                }
                for n, i in enumerate(c.items)
            ],
            "lastUpdated": c.updated,
            "position": 0,
            "private": c.private,
            "theme": "default",
            "upvotes": 0,
            "isUpvotedByUser": False,
        }

    def _user_names(self) -> set[str]:
        return {u.name for u in self.state.users.values()}

    def _collection(self, user, slug: str, write: bool = False) -> Collection | None:
        c = self.state.collections.get(slug)
        can_write = bool(user) and c is not None and (c.namespace == user.name or c.namespace in user.orgs)
        if c is None or (c.private and not can_write):
            self._error(404, "Collection not found")
            return None
        if write and not user:
            self._error(401, "You must be authenticated to change a collection")
            return None
        if write and not can_write:
            self._error(403, f"You don't have the rights to change the collection {slug}")
            return None
        return c

    def r_collection_create(self, user) -> None:
        """Create a collection in the caller's namespace or one of its orgs (409 with its slug if the title is
        taken there)."""
        payload = json.loads(self._read_body() or b"{}")
        if not user:
            self._error(401, "You must be authenticated to create a collection")
            return
        ns, title = payload.get("namespace") or user.name, str(payload["title"])
        if ns != user.name and ns not in user.orgs:
            self._error(403, f"You don't have the rights to create a collection under {ns!r}")
            return
        if not title.strip():
            self._error(400, "title must not be empty")
            return
        with self.state.lock:
            same = next(
                (c for c in self.state.collections.values() if c.namespace == ns and c.title == title), None
            )
            if same is not None:
                msg = "Collection already exists"
                self._send(409, {"error": msg, "slug": same.slug}, {"X-Error-Message": msg})
                return
            words = re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-") or "collection"
            slug = f"{ns}/{words}-{secrets.token_hex(12)}"
            c = Collection(
                slug, title, ns, payload.get("description"), bool(payload.get("private")), [], _now()
            )
            self.state.collections[slug] = c
            body = self._collection_json(c)
        self._send(200, body)

    def r_collection(self, user, slug: str) -> None:
        """A collection with every item."""
        with self.state.lock:
            c = self._collection(user, slug)
            if c is None:
                return
            body = self._collection_json(c)
        self._send(200, body)

    def r_collection_add(self, user, slug: str) -> None:
        """Add an item (404 if the repo does not exist or the caller cannot see it, 409 if it is in already)."""
        payload = json.loads(self._read_body() or b"{}")
        with self.state.lock:
            c = self._collection(user, slug, write=True)
            if c is None:
                return
            item_id, item_type = payload["item"]["id"], payload["item"]["type"]
            if item_type == "model":
                repo = self.state.repos.get(item_id)
                visible = repo is not None and (
                    not repo.private or (bool(user) and (repo.owner == user.name or repo.owner in user.orgs))
                )
                if not visible:
                    self._error(404, f"Repository not found: {item_id}", "RepoNotFound")
                    return
            if any(i.item_id == item_id and i.item_type == item_type for i in c.items):
                self._error(409, "Item already exists in the collection")
                return
            c.items.append(CollectionItem(secrets.token_hex(12), item_id, item_type, payload.get("note")))
            c.updated = _now()
            body = self._collection_json(c)
        self._send(200, body)

    def r_collection_delete_item(self, user, slug: str, object_id: str) -> None:
        """Remove an item by its object id."""
        with self.state.lock:
            c = self._collection(user, slug, write=True)
            if c is None:
                return
            kept = [i for i in c.items if i.object_id != object_id]
            if len(kept) == len(c.items):
                self._error(404, "Item not found")
                return
            c.items, c.updated = kept, _now()
        self._send(200, {"success": True})

    def r_resolve(self, user, repo_id: str, revision: str, path: str) -> None:
        """HEAD/GET a file at a revision, with X-Repo-Commit, ETag and the LFS linked headers."""
        head = self.command == "HEAD"
        with self.state.lock:
            repo = self._repo(user, repo_id, head=head)
            commit = repo and self._commit_of(repo, revision, head=head)
            if not commit:
                return
            entry = commit.files.get(path)
            if entry is None:
                self._error(404, f"{path} does not exist on {revision}", "EntryNotFound", head=head)
                return
            data = self.state.objects[entry.lfs] if entry.lfs else self.state.blobs[entry.oid]
        headers = {
            "X-Repo-Commit": commit.id,
            "ETag": f'"{entry.lfs or entry.oid}"',
            "Accept-Ranges": "bytes",
        }
        if entry.lfs:
            headers.update({"X-Linked-Etag": f'"{entry.lfs}"', "X-Linked-Size": str(entry.size)})
        self._send(200, data, headers, head=head)


def _sign(secret: bytes, repo_id: str, oid: str, size: int) -> str:
    return hmac.new(secret, f"{repo_id}:{oid}:{size}".encode(), hashlib.sha256).hexdigest()


def _lfs_patterns(state: HubState, commit: Commit) -> list[str]:
    entry = commit.files.get(".gitattributes")
    if entry is None:
        return []
    text = state.blobs[entry.oid].decode(errors="replace")
    return [ln.split()[0] for ln in text.splitlines() if "filter=lfs" in ln and ln.split()]


def validate_card_metadata(content: str) -> list[str]:
    """What the Hub would reject in a README's YAML metadata block (an empty list when it is valid)."""
    if not content.startswith("---"):
        return []
    match = re.match(r"^---\s*\n(.*?)\n---\s*(\n|$)", content, re.S)
    if not match:
        return ["metadata block is not closed by '---'"]
    try:
        meta = yaml.safe_load(match.group(1))
    except yaml.YAMLError as exc:
        return [f"invalid YAML: {exc}"]
    if meta is None:
        return []
    if not isinstance(meta, dict):
        return ["metadata must be a mapping"]
    errors = []
    if "base_model_relation" in meta and meta["base_model_relation"] not in RELATIONS:
        errors.append(f"base_model_relation must be one of {sorted(RELATIONS)}")
    for key in ("tags", "datasets"):
        if key in meta and not (isinstance(meta[key], list) and all(isinstance(x, str) for x in meta[key])):
            errors.append(f"{key} must be a list of strings")
    if "model-index" in meta:
        mi = meta["model-index"]
        if not isinstance(mi, list) or not all(isinstance(m, dict) and "name" in m for m in mi):
            errors.append("model-index must be a list of {name, results}")
    return errors


NAME = r"([\w.\-]+/[\w.\-]+)"
REV = r"([^/]+)"
ROUTES: list[tuple[str, str, str]] = [
    ("GET", r"/api/whoami-v2", "whoami"),
    ("POST", r"/api/repos/create", "create"),
    ("POST", r"/api/validate-yaml", "validate_yaml"),
    ("GET", rf"/api/models/{NAME}", "info"),
    ("GET", rf"/api/models/{NAME}/revision/{REV}", "info_rev"),
    ("GET", rf"/api/models/{NAME}/refs", "refs"),
    ("GET", rf"/api/models/{NAME}/commits/{REV}", "commits"),
    ("GET", rf"/api/models/{NAME}/tree/{REV}(?:/(.+))?", "tree"),
    ("POST", rf"/api/models/{NAME}/paths-info/{REV}", "paths_info"),
    ("POST", rf"/api/models/{NAME}/preupload/{REV}", "preupload"),
    ("POST", rf"/api/models/{NAME}/commit/{REV}", "commit"),
    ("POST", rf"/api/models/{NAME}/branch/{REV}", "branch"),
    ("POST", rf"/api/models/{NAME}/tag/{REV}", "tag"),
    ("DELETE", rf"/api/models/{NAME}/tag/{REV}", "delete_tag"),
    ("POST", rf"/{NAME}\.git/info/lfs/objects/batch", "lfs_batch"),
    ("PUT", rf"/lfs-upload/{NAME}/([0-9a-f]{{64}})", "lfs_put"),
    ("POST", rf"/lfs-verify/{NAME}", "lfs_verify"),
    ("GET", rf"/{NAME}/resolve/{REV}/(.+)", "resolve"),
    ("POST", r"/api/collections", "collection_create"),
    ("GET", rf"/api/collections/{NAME}", "collection"),
    ("POST", rf"/api/collections/{NAME}/items", "collection_add"),
    ("DELETE", rf"/api/collections/{NAME}/items/([0-9a-f]+)", "collection_delete_item"),
]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    state: HubState


class HubServer:
    """The server on 127.0.0.1 (port 0 picks a free one), run in a thread; a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, state: HubState | None = None):
        self.state = state or HubState()
        self._httpd = _Server((host, port), Handler)
        self._httpd.state = self.state
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        """The endpoint to give ``HfApi(endpoint=...)``."""
        host, port = self._httpd.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> HubServer:
        """Serve in a daemon thread."""
        self._thread = threading.Thread(target=self._httpd.serve_forever, name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving and close the socket."""
        self._httpd.shutdown()
        self._httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def repo_url(endpoint: str, repo_id: str, revision: str = "main") -> str:
    """A human link to a revision of a repo on this server."""
    return f"{endpoint}/{repo_id}/tree/{quote(revision, safe='')}"


@contextlib.contextmanager
def local_hub(monkeypatch, tmp_path, token: str) -> Iterator[HubServer]:
    """A fresh local Hub (user alice, member of org acme, signed in with ``token``) and a client set to use it."""
    from types import SimpleNamespace

    from huggingface_hub import constants
    from huggingface_hub.utils import _http

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
    monkeypatch.setattr(_http, "time", SimpleNamespace(sleep=lambda s: None))  # no back-off waits
    monkeypatch.setenv("HF_TOKEN", token)
    monkeypatch.delenv("HF_ENDPOINT", raising=False)
    with HubServer() as server:
        server.state.add_user(token, "alice", ["acme"])
        yield server


def main(argv: list[str] | None = None) -> int:
    """Run the server in the foreground: prints its URL on the first line, serves until interrupted."""
    p = argparse.ArgumentParser(prog="python -m tests.hubserver", description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--token", action="append", default=[], help="accepted token (TOKEN or TOKEN=USER)")
    p.add_argument("--user", default="demo", help="user of tokens given without =USER")
    p.add_argument("--org", action="append", default=[], help="organization the users belong to")
    args = p.parse_args(argv)
    server = HubServer(args.host, args.port)
    for t in args.token:
        token, _, user = t.partition("=")
        server.state.add_user(token, user or args.user, args.org)
    server.start()
    print(server.url, flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
