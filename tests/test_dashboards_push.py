"""`mixtral-serve dashboards push` against a stand-in Grafana.

There is no Grafana server package on these machines, so a small `http.server` app in the test
implements the few Grafana HTTP API routes the command calls (with Grafana's status codes and
bodies): GET/POST /api/datasources, GET/PUT /api/datasources/uid/<uid>, GET/POST /api/folders,
POST /api/dashboards/db, behind a bearer token or basic auth.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dashboards.overview import DATASOURCE_UID, UID
from mixtral_serve.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOKEN = "glsa_good"
BASIC = ("admin", "secret")


@dataclass
class GrafanaState:
    datasources: dict[str, dict[str, Any]] = field(default_factory=dict)  # by uid
    folders: dict[str, str] = field(default_factory=dict)  # uid -> title
    dashboards: dict[str, dict[str, Any]] = field(default_factory=dict)  # uid -> {"dashboard", "folderUid", "version"}
    calls: list[str] = field(default_factory=list)


def make_handler(state: GrafanaState) -> type[BaseHTTPRequestHandler]:
    class Grafana(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def _reply(self, status: int, body: Any) -> None:
            data = json.dumps(body).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def _authorized(self) -> bool:
            basic = base64.b64encode(":".join(BASIC).encode()).decode()
            return self.headers.get("Authorization") in (f"Bearer {TOKEN}", f"Basic {basic}")

        def _handle(self) -> None:
            state.calls.append(f"{self.command} {self.path}")
            if not self._authorized():
                return self._reply(401, {"message": "invalid API key"})
            length = int(self.headers.get("Content-Length") or 0)
            body = json.loads(self.rfile.read(length)) if length else None
            route = f"{self.command} {self.path.split('?')[0]}"
            if match := re.fullmatch(r"(GET|PUT) /api/datasources/uid/([\w-]+)", route):
                uid = match.group(2)
                if uid not in state.datasources:
                    return self._reply(404, {"message": "Data source not found"})
                if match.group(1) == "PUT":
                    state.datasources[uid] = {**body, "uid": uid}
                    return self._reply(200, {"message": "Datasource updated"})
                return self._reply(200, state.datasources[uid])
            if route == "POST /api/datasources":
                if any(ds["name"] == body["name"] for ds in state.datasources.values()):
                    return self._reply(409, {"message": "data source with the same name already exists"})
                state.datasources[body["uid"]] = {**body, "id": len(state.datasources) + 1}
                return self._reply(200, {"message": "Datasource added", "datasource": body})
            if route == "GET /api/folders":
                return self._reply(200, [{"uid": u, "title": t} for u, t in state.folders.items()])
            if route == "POST /api/folders":
                uid = f"f{len(state.folders) + 1}"
                state.folders[uid] = body["title"]
                return self._reply(200, {"uid": uid, "title": body["title"]})
            if route == "POST /api/dashboards/db":
                dashboard = body["dashboard"]
                old = state.dashboards.get(dashboard["uid"])
                if old is not None and not body.get("overwrite"):
                    return self._reply(412, {"message": "The dashboard has been changed by someone else"})
                if body.get("folderUid") not in state.folders:
                    return self._reply(400, {"message": "folder not found"})
                version = old["version"] + 1 if old else 1
                state.dashboards[dashboard["uid"]] = {"dashboard": dashboard, "folderUid": body["folderUid"],
                                                      "version": version}
                return self._reply(200, {"status": "success", "uid": dashboard["uid"], "version": version,
                                         "url": f"/d/{dashboard['uid']}/x"})
            return self._reply(404, {"message": "Not found"})

        do_GET = do_POST = do_PUT = _handle

    return Grafana


@pytest.fixture
def grafana() -> Iterator[tuple[str, GrafanaState]]:
    state = GrafanaState()
    server = ThreadingHTTPServer(("127.0.0.1", 0), make_handler(state))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", state
    server.shutdown()
    server.server_close()


def push(url: str, *extra: str) -> None:
    main(["dashboards", "push", "--grafana-url", url, *extra])


def test_push_creates_once_and_is_idempotent(grafana: tuple[str, GrafanaState], capsys: pytest.CaptureFixture) -> None:
    url, state = grafana
    push(url, "--token", TOKEN, "--folder", "LLM serving", "--prometheus-url", "http://prom:9090")
    assert "datasource created" in capsys.readouterr().out
    assert list(state.datasources) == [DATASOURCE_UID]
    assert state.datasources[DATASOURCE_UID]["url"] == "http://prom:9090"
    assert state.datasources[DATASOURCE_UID]["type"] == "prometheus"
    assert list(state.folders.values()) == ["LLM serving"]
    assert set(state.dashboards) == {UID}
    stored = state.dashboards[UID]
    assert stored["folderUid"] == next(iter(state.folders))
    assert stored["dashboard"]["templating"]["list"][0]["current"]["value"] == DATASOURCE_UID

    push(url, "--basic-auth", ":".join(BASIC), "--folder", "LLM serving")  # again, other credentials
    out = capsys.readouterr().out
    assert "datasource unchanged" in out and f"/d/{UID}/" in out
    assert len(state.datasources) == 1 and len(state.folders) == 1 and len(state.dashboards) == 1
    assert state.dashboards[UID]["version"] == 2
    assert sum(call == "POST /api/datasources" for call in state.calls) == 1
    assert sum(call == "POST /api/folders" for call in state.calls) == 1

    push(url, "--token", TOKEN, "--folder", "LLM serving", "--prometheus-url", "http://prom2:9090")
    assert "datasource updated" in capsys.readouterr().out
    assert state.datasources[DATASOURCE_UID]["url"] == "http://prom2:9090"
    assert len(state.datasources) == 1


def test_rejected_token_is_one_clear_line(grafana: tuple[str, GrafanaState], capsys: pytest.CaptureFixture) -> None:
    url, state = grafana
    with pytest.raises(SystemExit) as exit_:
        push(url, "--token", "wrong")
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "rejected the credentials (401" in err and url in err
    assert not state.datasources and not state.dashboards


def test_unreachable_grafana_is_one_clear_line() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    run = subprocess.run([sys.executable, "-m", "mixtral_serve.cli", "dashboards", "push", "--grafana-url",
                          f"http://127.0.0.1:{port}", "--token", TOKEN], capture_output=True, text=True,
                         timeout=120, cwd=ROOT)
    assert run.returncode == 2
    assert run.stderr.strip().count("\n") == 0, run.stderr
    assert run.stderr.startswith(f"error: cannot reach Grafana at http://127.0.0.1:{port}")


def test_build_regenerates(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    main(["dashboards", "build", "--out", str(tmp_path / "json"), "--rules", str(tmp_path / "rules.yml")])
    assert (tmp_path / "json" / f"{UID}.json").read_text() == (ROOT / "dashboards" / "json" / f"{UID}.json").read_text()
    assert "rules.yml" in capsys.readouterr().out
