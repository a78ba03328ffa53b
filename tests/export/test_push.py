"""``push`` against a loopback stand-in for the Hub: the few endpoints huggingface_hub's create_repo,
create_branch, upload_folder and snapshot_download call, served from memory by a stdlib ThreadingHTTPServer."""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from dspark_lightning.export import export_checkpoint, load_drafter
from dspark_lightning.export.push import push

TOKEN = "hf_pushtest_0123456789abcdef"


class FakeHub:
    """Repositories as ``{repo_id: {revision: {path: bytes}}}``; every request is logged with its auth header."""

    def __init__(self) -> None:
        self.repos: dict[str, dict[str, dict[str, bytes]]] = {}
        self.commits: dict[tuple[str, str], str] = {}
        self.requests: list[tuple[str, str, str | None]] = []
        self.created: list[dict] = []

    def sha(self, repo: str, rev: str) -> str:
        return self.commits.get((repo, rev), "0" * 40)

    def files(self, repo: str, rev: str) -> tuple[str, dict[str, bytes]] | None:
        """(branch, files) of a branch name or of the commit sha a branch points at."""
        revisions = self.repos.get(repo, {})
        if rev in revisions:
            return rev, revisions[rev]
        branch = next((b for (r, b), sha in self.commits.items() if r == repo and sha == rev), None)
        return (branch, revisions[branch]) if branch else None


def _handler(hub: FakeHub) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:  # keep pytest output clean
            pass

        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False) -> None:
            self.send_response(status)
            for key, value in {"Content-Length": str(len(body)), **(headers or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, data, status: int = 200) -> None:
            self._send(status, json.dumps(data).encode(), {"Content-Type": "application/json"})

        def _not_found(self, code: str = "RepoNotFound", head: bool = False) -> None:
            self._send(404, b"" if head else b'{"error": "not found"}', {"X-Error-Code": code}, head=head)

        def _log(self) -> str:
            path = self.path.split("?")[0]
            hub.requests.append((self.command, path, self.headers.get("Authorization")))
            return path

        def do_POST(self) -> None:
            path = self._log()
            body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
            if path == "/api/validate-yaml":
                return self._json({"errors": [], "warnings": []})
            if path == "/api/repos/create":
                data = json.loads(body)
                repo = f"{data['organization']}/{data['name']}" if data.get("organization") else data["name"]
                hub.created.append(data)
                hub.repos.setdefault(repo, {"main": {}})
                return self._json({"url": f"http://{self.headers['Host']}/{repo}", "name": repo})
            match = re.fullmatch(r"/api/models/(.+?)/(preupload|commit|branch)/(.+)", path)
            if not match or match.group(1) not in hub.repos:
                return self._not_found()
            repo, action, rev = match.groups()
            revisions = hub.repos[repo]
            if action == "branch":
                revisions.setdefault(rev, dict(revisions["main"]))
                return self._json({})
            if action == "preupload":
                files = json.loads(body)["files"]
                return self._json({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                             for f in files]})
            if rev not in revisions:
                return self._not_found("RevisionNotFound")
            for line in body.splitlines():
                item = json.loads(line)
                if item["key"] == "file":
                    revisions[rev][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
                elif item["key"] != "header":
                    return self._json({"error": f"{item['key']} not supported here"}, 400)
            oid = hashlib.sha1(body).hexdigest()
            hub.commits[(repo, rev)] = oid
            return self._json({"commitUrl": f"http://{self.headers['Host']}/{repo}/commit/{oid}", "commitOid": oid})

        def _get(self, head: bool) -> None:
            path = self._log()
            match = re.fullmatch(r"/(.+?)/resolve/([^/]+)/(.+)", path)
            if match:
                repo, rev, file = match.groups()
                found = hub.files(repo, rev)
                data = found[1].get(file) if found else None
                if data is None:
                    return self._not_found("EntryNotFound", head=head)
                return self._send(200, data, {"X-Repo-Commit": hub.sha(repo, found[0]),
                                              "ETag": f'"{hashlib.sha1(data).hexdigest()}"'}, head=head)
            match = re.fullmatch(r"/api/models/(.+?)/tree/([^/]+)", path)
            if match and not head:
                found = hub.files(*match.groups())
                if found is None:
                    return self._not_found("RevisionNotFound")
                return self._json([{"type": "file", "path": name, "size": len(data),
                                    "oid": hashlib.sha1(data).hexdigest()} for name, data in sorted(found[1].items())])
            match = re.fullmatch(r"/api/models/(.+?)(?:/revision/([^/]+))?", path)
            if match and not head:
                found = hub.files(match.group(1), match.group(2) or "main")
                if found is None:
                    return self._not_found()
                return self._json({"id": match.group(1), "modelId": match.group(1), "private": False,
                                   "sha": hub.sha(match.group(1), found[0]),
                                   "siblings": [{"rfilename": name} for name in sorted(found[1])]})
            return self._not_found(head=head)

        def do_GET(self) -> None:
            self._get(head=False)

        def do_HEAD(self) -> None:
            self._get(head=True)

    return Handler


@pytest.fixture
def fake_hub(monkeypatch):
    """The fake Hub on 127.0.0.1, with offline mode lifted and a token in the environment for this test only."""
    from huggingface_hub import constants

    hub = FakeHub()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(hub))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # frozen at import from the env
    monkeypatch.setenv("HF_ENDPOINT", endpoint)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    hub.endpoint = endpoint
    yield hub
    server.shutdown()
    server.server_close()


def test_push_then_download_and_load(fake_hub, checkpoints, original, same_outputs, tmp_path, capsys):
    from huggingface_hub import snapshot_download
    from transformers import AutoModel

    export = tmp_path / "export"
    export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="hf", out=str(export), dtype="float32")
    url = push(str(export), repo_id="me/tiny-dspark", private=True, commit_message="first drafter")
    assert url.startswith(fake_hub.endpoint + "/me/tiny-dspark/commit/")
    assert fake_hub.created[0].get("visibility") == "private" or fake_hub.created[0].get("private") is True
    stored = fake_hub.repos["me/tiny-dspark"]["main"]
    assert sorted(stored) == sorted(p.name for p in export.iterdir())
    assert stored["model.safetensors"] == (export / "model.safetensors").read_bytes()
    # The token went to the Hub in the Authorization header, and nowhere else.
    assert {auth for method, _, auth in fake_hub.requests if method == "POST"} == {f"Bearer {TOKEN}"}
    printed = capsys.readouterr()
    assert TOKEN not in printed.out + printed.err

    local = snapshot_download("me/tiny-dspark", endpoint=fake_hub.endpoint, cache_dir=tmp_path / "cache")
    assert not any(TOKEN.encode() in p.read_bytes() for p in Path(tmp_path).rglob("*") if p.is_file())
    reference = original(checkpoints["dspark_vanilla"])
    same_outputs(reference, load_drafter(local))
    same_outputs(reference, AutoModel.from_pretrained(local, trust_remote_code=True, dtype=torch.float32).drafter)


def test_push_to_a_new_branch(fake_hub, checkpoints, tmp_path):
    export = tmp_path / "export"
    export_checkpoint(ckpt=str(checkpoints["dflash_zlab"]), format="sglang", out=str(export))
    push(str(export), repo_id="org/dflash", revision="v1")
    assert ("POST", "/api/models/org/dflash/branch/v1", f"Bearer {TOKEN}") in fake_hub.requests
    assert "config.json" in fake_hub.repos["org/dflash"]["v1"] and fake_hub.repos["org/dflash"]["main"] == {}


def test_dry_run_lists_operations_offline(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    export = tmp_path / "export"
    export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="sglang", out=str(export))
    assert push(str(export), repo_id="me/drafter", revision="exp", dry_run=True) == "dry-run"
    out = capsys.readouterr().out
    assert "create_repo me/drafter (private=False" in out and "create_branch me/drafter@exp" in out
    assert "upload_folder" in out and "model.safetensors" in out and "config.json" in out
    assert TOKEN not in out


@pytest.mark.parametrize("repo_id", ["no-namespace", "a/b/c", "me/bad name", "me/x--y", "me/.hidden", ""])
def test_invalid_repo_id_is_named(repo_id, tmp_path):
    with pytest.raises(ValueError, match=re.escape(f"Invalid --repo_id {repo_id!r}")):
        push(str(tmp_path), repo_id=repo_id, dry_run=True)


def test_push_refuses_offline_mode_and_non_exports(checkpoints, tmp_path):
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        push(str(tmp_path), repo_id="me/x", dry_run=True)
    export = tmp_path / "export"
    export_checkpoint(ckpt=str(checkpoints["dspark_vanilla"]), format="sglang", out=str(export))
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE"):  # the test session runs offline
        push(str(export), repo_id="me/x")
