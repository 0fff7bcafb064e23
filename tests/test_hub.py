"""Hub ids: `load_pretrained("org/name")` against a stand-in for the Hugging Face hub on 127.0.0.1.

A thread serves tiny checkpoints in the hub's layout, with the endpoints that huggingface_hub's
`snapshot_download` calls:
  * GET /api/models/{org}/{name}/revision/{rev} -> {"id", "sha", "siblings"} (the commit of the revision),
  * GET /api/models/{org}/{name}/tree/{commit}  -> the file listing (path, size, git oid, LFS info),
  * HEAD / GET /{org}/{name}/resolve/{commit}/{file} -> the file, with ETag / X-Linked-Etag,
    X-Linked-Size, Content-Length and X-Repo-Commit headers,
  * 404 with the hub's X-Error-Code (RepoNotFound, RevisionNotFound, EntryNotFound) otherwise.

huggingface_hub reads HF_ENDPOINT, HF_HOME and HF_HUB_OFFLINE when it is imported, so each load runs in a
subprocess with its environment set: first online (the server up), then with HF_HUB_OFFLINE=1 and the
server stopped, then online but with the server gone (unreachable hub, cache found via HF_HUB_CACHE).
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import re
import shutil
import socket
import subprocess
import sys
import threading
import urllib.parse
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import helpers_hf
import numpy as np
import pytest

from flax_textvae.models import load_pretrained

REPO = pathlib.Path(__file__).resolve().parents[1]
FLAX_FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "tiny_bart_flax"
LFS_SUFFIXES = (".safetensors", ".msgpack", ".bin")  # served as LFS files, like the hub does
UNKNOWN_ID = "tiny-org/never-published"

# Loads each id given on the command line and writes, per id, the flattened params (.npz) and a record
# (snapshot path, tokenizer output, or the OSError with its chaining) to results.json in the out folder.
_LOAD_SCRIPT = r"""
import json, os, sys, time
import numpy as np
from flax.traverse_util import flatten_dict
from flax_textvae.models import load_pretrained

out, ids = sys.argv[1], sys.argv[2:]
results = {}
for i, name in enumerate(ids):
    start = time.time()
    try:
        pre = load_pretrained(name)
    except OSError as err:
        results[name] = dict(ok=False, type=type(err).__name__, message=str(err), seconds=time.time() - start,
                             cause=repr(err.__cause__), suppress_context=err.__suppress_context__)
        continue
    flat = flatten_dict(pre.params, sep="/")
    np.savez(os.path.join(out, f"{i}.npz"), **{k: np.asarray(v) for k, v in flat.items()})
    results[name] = dict(ok=True, npz=f"{i}.npz", path=pre.path, seconds=time.time() - start,
                         model_type=pre.config.model_type, tokens=pre.tokenizer("w0 w1 w2")["input_ids"])
with open(os.path.join(out, "results.json"), "w") as f:
    json.dump(results, f)
"""


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    """A threaded HTTP server on 127.0.0.1 (free port) serving model repos in the hub's file layout.

    Args:
      repos: repo id ("org/name") -> {path in the repo: file bytes}.

    Attributes:
      endpoint: the base URL to put in HF_ENDPOINT.
      requests: (method, url path) of every request received, in order.
    """

    def __init__(self, repos: dict[str, dict[str, bytes]]):
        self.repos = repos
        self.commits = {repo: hashlib.sha1(repo.encode()).hexdigest() for repo in repos}
        self.requests: list[tuple[str, str]] = []
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_HEAD(self):
                hub._handle(self, send_body=False)

            def do_GET(self):
                hub._handle(self, send_body=True)

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> "FakeHub":
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving and closes the listening socket (later connections are refused)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=10)

    def gets(self, repo: str) -> Counter:
        """How often each file of `repo` was downloaded (GET on its resolve URL)."""
        prefix = f"/{repo}/resolve/"
        return Counter(
            path[len(prefix) :].split("/", 1)[1]
            for method, path in self.requests
            if method == "GET" and path.startswith(prefix)
        )

    def _reply(
        self, handler, status: int, body: bytes = b"", headers: dict | None = None, send_body: bool = True
    ) -> None:
        handler.send_response(status)
        for key, value in (headers or {}).items():
            handler.send_header(key, value)
        handler.send_header("Content-Length", str(len(body)))
        handler.end_headers()
        if send_body:
            handler.wfile.write(body)

    def _json(self, handler, value, send_body: bool) -> None:
        self._reply(handler, 200, json.dumps(value).encode(), {"Content-Type": "application/json"}, send_body)

    def _not_found(self, handler, code: str, send_body: bool, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": code, "Content-Type": "application/json"}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._reply(handler, 404, json.dumps({"error": code}).encode(), headers, send_body)

    def _handle(self, handler, send_body: bool) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(handler.path).path)
        with self._lock:
            self.requests.append((handler.command, path))
        api = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
        resolve = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        match = api or resolve
        if match is None or match.group(1) not in self.repos:
            return self._not_found(handler, "RepoNotFound", send_body)
        repo = match.group(1)
        files, commit = self.repos[repo], self.commits[repo]
        revision = match.group(3) if api else match.group(2)
        if revision not in ("main", commit):
            return self._not_found(handler, "RevisionNotFound", send_body)
        if api and api.group(2) == "revision":
            return self._json(
                handler,
                {
                    "id": repo,
                    "sha": commit,
                    "private": False,
                    "siblings": [{"rfilename": name} for name in sorted(files)],
                },
                send_body,
            )
        if api:
            tree = []
            for name in sorted(files):
                entry = {"type": "file", "path": name, "size": len(files[name]), "oid": _git_blob_sha1(files[name])}
                if name.endswith(LFS_SUFFIXES):
                    entry["lfs"] = {
                        "oid": hashlib.sha256(files[name]).hexdigest(),
                        "size": len(files[name]),
                        "pointerSize": 134,
                    }
                tree.append(entry)
            return self._json(handler, tree, send_body)
        name = resolve.group(3)
        if name not in files:
            return self._not_found(handler, "EntryNotFound", send_body, commit=commit)
        data = files[name]
        headers = {
            "Content-Type": "application/octet-stream",
            "X-Repo-Commit": commit,
            "ETag": f'"{_git_blob_sha1(data)}"',
        }
        if name.endswith(LFS_SUFFIXES):
            headers["X-Linked-Etag"] = f'"{hashlib.sha256(data).hexdigest()}"'
            headers["X-Linked-Size"] = str(len(data))
        self._reply(handler, 200, data, headers, send_body)


def _read_folder(folder: pathlib.Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _run_loads(ids: list[str], out: pathlib.Path, **env_overrides: str) -> dict:
    out.mkdir(parents=True)
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_TOKEN", "HF_ENDPOINT")
    }
    env.update(
        JAX_PLATFORMS="cpu",
        TOKENIZERS_PARALLELISM="false",
        NO_PROXY="127.0.0.1,localhost",
        no_proxy="127.0.0.1,localhost",
        HF_HUB_DISABLE_PROGRESS_BARS="1",
        HF_HUB_DISABLE_TELEMETRY="1",
        HF_HUB_DISABLE_IMPLICIT_TOKEN="1",
        PYTHONPATH=str(REPO),
    )
    env.update(env_overrides)
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_SCRIPT, str(out), *ids],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    results = json.loads((out / "results.json").read_text())
    for record in results.values():
        if record["ok"]:
            with np.load(out / record["npz"]) as npz:
                record["params"] = dict(npz)
    return results


@pytest.fixture(scope="module")
def hub_runs(tmp_path_factory):
    """Builds the checkpoints, serves them, and runs the online, offline and unreachable loads.

    Returns:
      dict with the local source folders ("local"), the served file names ("served"), the requests per
      phase, the fake hub, HF_HOME and the load results of each phase.
    """
    tmp = tmp_path_factory.mktemp("hub")
    local = {}
    local["tiny-org/bart-single"] = tmp / "single"
    helpers_hf.make_tiny_bart(local["tiny-org/bart-single"], seed=1)

    sharded = tmp / "sharded"
    model = helpers_hf.make_tiny_bart(sharded, seed=2)
    os.remove(sharded / "model.safetensors")
    model.save_pretrained(str(sharded), max_shard_size="40KB")
    local["tiny-org/bart-sharded"] = sharded

    # the same shards under names outside the model-0000x-of-0000y pattern, found through the index
    renamed = tmp / "renamed"
    shutil.copytree(sharded, renamed)
    index = json.loads((renamed / "model.safetensors.index.json").read_text())
    new_names = {old: f"weights-part{i}.safetensors" for i, old in enumerate(sorted(set(index["weight_map"].values())))}
    for old, new in new_names.items():
        os.rename(renamed / old, renamed / new)
    index["weight_map"] = {k: new_names[v] for k, v in index["weight_map"].items()}
    (renamed / "model.safetensors.index.json").write_text(json.dumps(index))
    local["tiny-org/bart-renamed-shards"] = renamed

    flax_only = tmp / "flax_only"
    shutil.copytree(FLAX_FIXTURE, flax_only, ignore=shutil.ignore_patterns("*.npy", "PRODUCED_BY.json"))
    local["tiny-org/bart-flax"] = flax_only

    served = {repo: _read_folder(folder) for repo, folder in local.items()}
    # files a repo holds that the loader does not need; none of them may be requested
    decoys = {
        "README.md": b"# tiny\n",
        "pytorch_model.bin": os.urandom(256),
        "onnx/model.safetensors": os.urandom(256),
        "flax_model.msgpack": os.urandom(256),
    }
    for repo in ("tiny-org/bart-single", "tiny-org/bart-sharded"):
        served[repo].update(decoys)
    served["tiny-org/bart-flax"]["pytorch_model.bin"] = os.urandom(256)
    needed = {repo: set(_read_folder(folder)) for repo, folder in local.items()}

    ids = sorted(local)
    hf_home = tmp / "hf_home"
    hub = FakeHub(served).start()
    try:
        online = _run_loads(
            ids + [UNKNOWN_ID],
            tmp / "online",
            HF_ENDPOINT=hub.endpoint,
            HF_HOME=str(hf_home),
            HF_HUB_OFFLINE="0",
            TRANSFORMERS_OFFLINE="0",
        )
    finally:
        hub.stop()
    online_requests = list(hub.requests)
    offline = _run_loads(
        ids + [UNKNOWN_ID],
        tmp / "offline",
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(hf_home),
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="0",
    )
    # the hub is gone but not declared offline; the cache is named through HF_HUB_CACHE, not HF_HOME
    unreachable = _run_loads(
        ["tiny-org/bart-single", UNKNOWN_ID],
        tmp / "unreachable",
        HF_ENDPOINT=hub.endpoint,
        HF_HOME=str(tmp / "empty_home"),
        HF_HUB_CACHE=str(hf_home / "hub"),
        HF_HUB_OFFLINE="0",
        TRANSFORMERS_OFFLINE="0",
    )
    return dict(
        local=local,
        needed=needed,
        served=served,
        hub=hub,
        hf_home=hf_home,
        online_requests=online_requests,
        online=online,
        offline=offline,
        unreachable=unreachable,
    )


def _assert_same_params(got: dict, want_params) -> None:
    from flax.traverse_util import flatten_dict

    want = {k: np.asarray(v) for k, v in flatten_dict(want_params, sep="/").items()}
    assert set(got) == set(want)
    for key, value in want.items():
        np.testing.assert_array_equal(got[key], value, err_msg=key)


def test_online_download_matches_local_folder_and_fetches_only_needed_files(hub_runs):
    hub = hub_runs["hub"]
    for repo, folder in hub_runs["local"].items():
        record = hub_runs["online"][repo]
        assert record["ok"], record
        ref = load_pretrained(str(folder))
        _assert_same_params(record["params"], ref.params)
        assert record["tokens"] == ref.tokenizer("w0 w1 w2")["input_ids"]
        assert record["model_type"] == "bart"
        # the snapshot lives in the standard cache layout under HF_HOME/hub
        snapshot = pathlib.Path(
            hub_runs["hf_home"], "hub", "models--" + repo.replace("/", "--"), "snapshots", hub.commits[repo]
        )
        assert pathlib.Path(record["path"]) == snapshot
        assert set(_read_folder(snapshot)) == hub_runs["needed"][repo]
        assert _read_folder(snapshot) == {n: hub_runs["served"][repo][n] for n in hub_runs["needed"][repo]}
        # every needed file was downloaded exactly once; nothing else (decoys, other weights) was requested
        assert hub.gets(repo) == Counter({name: 1 for name in hub_runs["needed"][repo]}), repo
        requested = {
            path.split("/resolve/", 1)[1].split("/", 1)[1]
            for _, path in hub_runs["online_requests"]
            if path.startswith(f"/{repo}/resolve/")
        }
        assert requested == hub_runs["needed"][repo], repo
        assert ("GET", f"/api/models/{repo}/revision/main") in hub_runs["online_requests"]
    assert {"tokenizer.json", "config.json", "model.safetensors.index.json"} <= hub_runs["needed"][
        "tiny-org/bart-sharded"
    ]
    assert sum(name.endswith(".safetensors") for name in hub_runs["needed"]["tiny-org/bart-sharded"]) >= 2
    assert "flax_model.msgpack" in hub_runs["needed"]["tiny-org/bart-flax"]
    # only hub endpoints were called (no request outside the API / resolve routes)
    assert all(path.startswith(("/api/models/", "/tiny-org/")) for _, path in hub_runs["online_requests"])


def test_online_unknown_id_names_the_id_and_the_fix(hub_runs):
    record = hub_runs["online"][UNKNOWN_ID]
    assert not record["ok"] and record["type"] == "OSError", record
    msg = record["message"]
    assert UNKNOWN_ID in msg and "RepositoryNotFoundError" in msg and "local folder" in msg, msg
    assert "config.json" in msg and "model.safetensors" in msg and "tokenizer" in msg, msg
    assert record["cause"] == "None" and record["suppress_context"], record
    assert ("GET", f"/api/models/{UNKNOWN_ID}/revision/main") in hub_runs["online_requests"]


def test_offline_second_load_comes_from_cache(hub_runs):
    port = int(hub_runs["hub"].endpoint.rsplit(":", 1)[1])
    with pytest.raises(ConnectionRefusedError):  # the hub really was gone during the offline load
        socket.create_connection(("127.0.0.1", port), timeout=2).close()
    for repo, record in hub_runs["offline"].items():
        if repo == UNKNOWN_ID:
            continue
        assert record["ok"], record
        assert record["path"] == hub_runs["online"][repo]["path"]
        online = hub_runs["online"][repo]["params"]
        assert set(record["params"]) == set(online)
        for key, value in online.items():
            np.testing.assert_array_equal(record["params"][key], value, err_msg=key)
        assert record["tokens"] == hub_runs["online"][repo]["tokens"]


def test_offline_unknown_id_fails_fast_with_the_fix(hub_runs):
    record = hub_runs["offline"][UNKNOWN_ID]
    assert not record["ok"] and record["type"] == "OSError", record
    assert record["seconds"] < 5, record
    msg = record["message"]
    assert UNKNOWN_ID in msg and "HF_HUB_OFFLINE" in msg and "local folder" in msg, msg
    assert "config.json" in msg and "flax_model.msgpack" in msg and "tokenizer" in msg, msg
    assert "Traceback" not in msg and len(msg) < 1200, msg
    assert record["cause"] == "None" and record["suppress_context"], record


def test_unreachable_hub_uses_cache_from_hf_hub_cache_and_explains_unknown_ids(hub_runs):
    cached = hub_runs["unreachable"]["tiny-org/bart-single"]
    assert cached["ok"], cached
    assert cached["path"] == hub_runs["online"]["tiny-org/bart-single"]["path"]
    for key, value in hub_runs["online"]["tiny-org/bart-single"]["params"].items():
        np.testing.assert_array_equal(cached["params"][key], value, err_msg=key)
    record = hub_runs["unreachable"][UNKNOWN_ID]
    assert not record["ok"] and record["type"] == "OSError", record
    msg = record["message"]
    assert UNKNOWN_ID in msg and "could not be reached" in msg and "local folder" in msg, msg
    assert "ConnectError" in msg, msg
    assert record["cause"] == "None" and record["suppress_context"], record
