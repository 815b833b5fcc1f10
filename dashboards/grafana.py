"""A small model of Grafana dashboards (plain dataclasses) and its dashboard JSON.

NOTE: plain dataclasses rather than grafana-foundation-sdk: the SDK is a generated builder
library tied to Grafana's schema versions and would be one more dependency for the four
things used here (time series, stat and heatmap panels, query variables); a page of
dataclasses keeps the generated JSON small, reviewable in diffs and checkable by tests (every
query is a plain `Target.expr`). The JSON follows Grafana 10/11's dashboard model
(schemaVersion 39); Grafana migrates it forward on import.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

DATASOURCE_VAR = "datasource"
_DATASOURCE = {"type": "prometheus", "uid": "${%s}" % DATASOURCE_VAR}
_GRID_WIDTH = 24
TARGET_LEGEND_SUFFIX = "target"  # series whose legend ends so are drawn as dashed red lines


@dataclass
class Target:
    expr: str
    legend: str = ""


@dataclass
class Panel:
    title: str
    targets: list[Target]
    unit: str = "short"
    description: str = ""
    kind: Literal["timeseries", "stat", "heatmap"] = "timeseries"
    width: int = 8
    height: int = 8
    min: float | None = 0
    max: float | None = None
    # stat panels: (from value, color) steps; the first step's value is None (from -inf)
    thresholds: list[tuple[float | None, str]] = field(default_factory=lambda: [(None, "green")])


@dataclass
class Row:
    title: str
    panels: list[Panel]


@dataclass
class Variable:
    """A multi-value query variable over one label's values (Grafana's `label_values`)."""

    name: str
    label: str
    query: str  # e.g. label_values(metric{tier=~"$tier"}, replica)


@dataclass
class Dashboard:
    uid: str
    title: str
    description: str
    rows: list[Row]
    variables: list[Variable]
    datasource_name: str
    datasource_uid: str
    tags: list[str] = field(default_factory=list)

    def panels(self) -> Iterator[Panel]:
        for row in self.rows:
            yield from row.panels

    def to_json(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": self.tags,
            "editable": True,
            "graphTooltip": 1,  # shared crosshair
            "refresh": "10s",
            "schemaVersion": 39,
            "time": {"from": "now-1h", "to": "now"},
            "timezone": "browser",
            "templating": {"list": [self._datasource_variable(), *map(_variable_json, self.variables)]},
            "panels": list(_layout(self.rows)),
        }

    def _datasource_variable(self) -> dict[str, Any]:
        return {
            "name": DATASOURCE_VAR, "label": "Data source", "type": "datasource", "query": "prometheus",
            "current": {"text": self.datasource_name, "value": self.datasource_uid},
            "hide": 0, "refresh": 1, "regex": "", "options": [],
        }


def _variable_json(var: Variable) -> dict[str, Any]:
    return {
        "name": var.name, "label": var.label, "type": "query", "datasource": _DATASOURCE,
        "query": {"query": var.query, "refId": var.name}, "definition": var.query,
        "refresh": 2,  # on time range change: replicas come and go
        "multi": True, "includeAll": True, "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1, "hide": 0, "regex": "", "options": [],
    }


def _layout(rows: list[Row]) -> Iterator[dict[str, Any]]:
    """Rows stacked top to bottom; panels left to right inside a row, wrapping at the grid width."""
    ids = iter(range(1, 10_000))
    y = 0
    for row in rows:
        yield {"type": "row", "id": next(ids), "title": row.title, "collapsed": False, "panels": [],
               "gridPos": {"h": 1, "w": _GRID_WIDTH, "x": 0, "y": y}}
        y += 1
        x = line_height = 0
        for panel in row.panels:
            if x + panel.width > _GRID_WIDTH:
                x, y, line_height = 0, y + line_height, 0
            yield _panel_json(panel, next(ids), {"h": panel.height, "w": panel.width, "x": x, "y": y})
            x += panel.width
            line_height = max(line_height, panel.height)
        y += line_height


def _panel_json(panel: Panel, panel_id: int, grid: dict[str, int]) -> dict[str, Any]:
    defaults: dict[str, Any] = {
        "unit": panel.unit,
        "color": {"mode": "palette-classic"},
        "thresholds": {"mode": "absolute", "steps": [{"value": v, "color": c} for v, c in panel.thresholds]},
    }
    for key in ("min", "max"):
        if getattr(panel, key) is not None:
            defaults[key] = getattr(panel, key)
    overrides: list[dict[str, Any]] = []
    options: dict[str, Any]
    if panel.kind == "timeseries":
        defaults["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                              "spanNulls": True}
        options = {"legend": {"displayMode": "table", "placement": "bottom", "calcs": ["lastNotNull", "max"]},
                   "tooltip": {"mode": "multi", "sort": "desc"}}
        overrides.append({
            "matcher": {"id": "byRegexp", "options": f".*{TARGET_LEGEND_SUFFIX}$"},
            "properties": [{"id": "custom.lineStyle", "value": {"fill": "dash", "dash": [10, 10]}},
                           {"id": "color", "value": {"mode": "fixed", "fixedColor": "red"}},
                           {"id": "custom.fillOpacity", "value": 0}],
        })
    elif panel.kind == "stat":
        defaults["color"] = {"mode": "thresholds"}
        options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                   "colorMode": "background", "graphMode": "area", "textMode": "value_and_name",
                   "orientation": "auto"}
    else:  # heatmap: one row per series (calculate off), y axis ordinal by legend
        options = {"calculate": False, "cellGap": 1, "yAxis": {"axisPlacement": "left"},
                   "color": {"mode": "scheme", "scheme": "Oranges", "steps": 64, "exponent": 0.5},
                   "rowsFrame": {"layout": "auto"}, "tooltip": {"show": True, "yHistogram": False},
                   "legend": {"show": True}, "cellValues": {"unit": panel.unit}}
    return {
        "type": panel.kind, "id": panel_id, "title": panel.title, "description": panel.description,
        "gridPos": grid, "datasource": _DATASOURCE,
        "targets": [{"refId": chr(ord("A") + i), "expr": t.expr, "legendFormat": t.legend or "__auto",
                     "range": True, "datasource": _DATASOURCE} for i, t in enumerate(panel.targets)],
        "fieldConfig": {"defaults": defaults, "overrides": overrides},
        "options": options,
    }
