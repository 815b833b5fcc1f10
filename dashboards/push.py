"""`mixtral-serve dashboards push`: the dashboards into a Grafana folder, with their Prometheus datasource.

Idempotent: the datasource (a fixed uid) is created only when missing and updated only when a
different `--prometheus-url` is given, the folder is found by its title before one is created,
and dashboards are saved by uid with `overwrite`, so a second push changes nothing but
dashboard versions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from dashboards.grafana import Dashboard
from dashboards.overview import DATASOURCE_NAME, DATASOURCE_UID

DEFAULT_PROMETHEUS_URL = "http://127.0.0.1:9090"
Credential = str | tuple[str, str] | None  # a token, or (user, password)


class PushError(ValueError):
    """A failure to report in one line (the CLI exits 2)."""


@dataclass
class PushResult:
    datasource: str  # created | updated | unchanged
    folder_uid: str
    dashboards: list[str] = field(default_factory=list)  # their URLs inside Grafana


def push(grafana_url: str, dashboards: list[Dashboard], credential: Credential = None, folder: str = "mixtral-serve",
         prometheus_url: str | None = None) -> PushResult:
    from grafana_client import GrafanaApi
    from grafana_client.client import GrafanaClientError, GrafanaException, GrafanaServerError

    api = GrafanaApi.from_url(grafana_url, credential=credential, timeout=10.0)
    try:
        state = _ensure_datasource(api, prometheus_url)
        result = PushResult(state, _ensure_folder(api, folder))
        for dashboard in dashboards:
            saved = api.dashboard.update_dashboard({
                "dashboard": dashboard.to_json(), "folderUid": result.folder_uid, "overwrite": True,
                "message": "mixtral-serve dashboards push",
            })
            result.dashboards.append(saved.get("url", dashboard.uid))
        return result
    except GrafanaClientError as err:
        if err.status_code == 401:
            raise PushError(f"Grafana at {grafana_url} rejected the credentials (401 Unauthorized); "
                            "check --token or --basic-auth") from None
        raise PushError(f"Grafana at {grafana_url} refused a request: {_one_line(err.message)}") from None
    except GrafanaServerError as err:
        raise PushError(f"Grafana at {grafana_url} failed: {_one_line(err.message)}") from None
    except (GrafanaException, OSError) as err:  # refused connection, DNS, timeout
        raise PushError(f"cannot reach Grafana at {grafana_url}: {_one_line(str(err))}") from None


def _ensure_datasource(api: Any, prometheus_url: str | None) -> str:
    from grafana_client.client import GrafanaClientError

    try:
        existing = api.datasource.get_datasource_by_uid(DATASOURCE_UID)
    except GrafanaClientError as err:
        if err.status_code != 404:
            raise
        api.datasource.create_datasource({
            "uid": DATASOURCE_UID, "name": DATASOURCE_NAME, "type": "prometheus", "access": "proxy",
            "url": prometheus_url or DEFAULT_PROMETHEUS_URL, "isDefault": False,
            "jsonData": {"httpMethod": "POST", "timeInterval": "10s"},  # Ray reports every 10 s
        })
        return "created"
    if prometheus_url is None or existing.get("url") == prometheus_url:
        return "unchanged"
    api.datasource.update_datasource_by_uid(DATASOURCE_UID, {**existing, "url": prometheus_url})
    return "updated"


def _ensure_folder(api: Any, title: str) -> str:
    for folder in api.folder.get_all_folders():
        if folder.get("title") == title:
            return folder["uid"]
    return api.folder.create_folder(title)["uid"]


def _one_line(text: str) -> str:
    return " ".join(text.split())
