"""The generated dashboards and Prometheus rules: up to date, querying only metrics the code
defines, laid out sanely, and accepted by `promtool`. No Ray, no Prometheus server."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from dashboards import build, promql
from dashboards.tiers import DEFAULT_CONFIG, load_tiers
from deployments import metrics as m

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

# Words in a PromQL expression that are neither functions (followed by "(") nor metric names.
_KEYWORDS = {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right", "bool",
             "offset"}
_LABEL_LIST = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)")


def metric_names(expr: str) -> set[str]:
    """The metric (or recorded series) names an expression selects."""
    expr = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)  # label values, which may hold anything
    expr = re.sub(r"\{[^}]*\}", "", expr)  # label matchers
    expr = re.sub(r"\[[^\]]*\]", "", expr)  # range windows
    expr = _LABEL_LIST.sub("", expr)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", expr):
        follows = expr[match.end():].lstrip()[:1]
        if follows != "(" and match.group() not in _KEYWORDS:
            names.add(match.group())
    return names


def dashboard_queries() -> list[tuple[str, str]]:
    """(where, expr) of every query of every committed dashboard, variables included."""
    queries = []
    for path in sorted(build.JSON_DIR.glob("*.json")):
        dashboard = json.loads(path.read_text())
        for panel in dashboard["panels"]:
            for target in panel.get("targets", []):
                queries.append((f"{path.name}: {panel['title']}", target["expr"]))
        for var in dashboard["templating"]["list"]:
            if var["type"] == "query":
                inner = re.fullmatch(r"label_values\((.*), *\w+\)", var["query"]["query"])
                assert inner, var["query"]
                queries.append((f"{path.name}: variable {var['name']}", inner.group(1)))
    return queries


def rules_queries() -> list[tuple[str, str]]:
    groups = yaml.safe_load(build.RULES_FILE.read_text())["groups"]
    return [(rule.get("record") or rule["alert"], rule["expr"]) for g in groups for rule in g["rules"]]


def test_generated_files_are_up_to_date() -> None:
    stale = [str(path.relative_to(ROOT)) for path, text in build.render(DEFAULT_CONFIG).items()
             if not path.exists() or path.read_text() != text]
    assert not stale, f"{stale} differ from the generators: run `mixtral-serve dashboards build`"
    built = {f"{d.uid}.json" for d in build.dashboards(DEFAULT_CONFIG)}
    assert {p.name for p in build.JSON_DIR.glob("*.json")} == built


def test_metric_name_parser() -> None:
    expr = ('(sum by (tier) (rate(a_total{x="b_c{}"}[$__rate_interval])) or sum by (tier) (g) * 0) '
            '/ ignoring(expert) group_left sum by (layer) (h_bucket{le="0.05"}) and rec:x:y < 0.99')
    assert metric_names(expr) == {"a_total", "g", "h_bucket", "rec:x:y"}


def test_dashboards_query_only_defined_metrics() -> None:
    defined = m.exported_series() | promql.RAY_BUILTIN_SERIES
    queries = dashboard_queries()
    assert len(queries) > 30
    used = set()
    for where, expr in queries:
        names = metric_names(expr)
        assert names or expr.startswith("vector("), f"{where}: no metric in {expr!r}"
        assert names <= defined, f"{where}: undefined {sorted(names - defined)} in {expr}"
        used |= names
    # Every Ray built-in listed is used, and the catalog's metrics all appear on the dashboard.
    assert promql.RAY_BUILTIN_SERIES <= used
    unused = {spec.name for spec in m.CATALOG if not set(spec.series) & used}
    assert not unused, f"metrics no panel shows: {sorted(unused)}"


def test_rules_query_only_defined_metrics() -> None:
    recorded = {name for name, _ in rules_queries() if ":" in name}
    defined = m.exported_series() | recorded
    for name, expr in rules_queries():
        assert metric_names(expr) <= defined, f"{name}: undefined {sorted(metric_names(expr) - defined)}"


def test_slo_queries_read_existing_buckets() -> None:
    """An `le` a query names must be a bucket the replicas create, or the panel stays empty."""
    tiers = load_tiers(DEFAULT_CONFIG)
    buckets = m.histogram_buckets(t.targets for t in tiers)
    checked = 0
    for where, expr in dashboard_queries() + rules_queries():
        for name, le in re.findall(r'(\w+)_bucket\{[^}]*le="([^"]+)"', expr):
            spec = next(s for s in m.CATALOG if s.exported == name)
            assert le in {m.le_label(b) for b in buckets[spec.name]}, f"{where}: no bucket le={le} in {name}"
            checked += 1
    assert checked == 2 * sum(len(t.targets) for t in tiers)  # one dashboard panel and one rule per target


def test_layout_and_variables() -> None:
    for path in build.JSON_DIR.glob("*.json"):
        dashboard = json.loads(path.read_text())
        cells: set[tuple[int, int]] = set()
        for panel in dashboard["panels"]:
            g = panel["gridPos"]
            assert g["x"] + g["w"] <= 24
            area = {(x, y) for x in range(g["x"], g["x"] + g["w"]) for y in range(g["y"], g["y"] + g["h"])}
            assert not area & cells, f"{panel['title']} overlaps another panel"
            cells |= area
            for target in panel.get("targets", []):
                assert target["datasource"]["uid"] == "${datasource}"
        assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
        variables = {v["name"]: v for v in dashboard["templating"]["list"]}
        assert set(variables) == {"datasource", "tier", "replica"}
        assert '$tier' in variables["replica"]["query"]["query"]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_every_shipped_config_builds(config: Path, tmp_path: Path) -> None:
    files = build.write(config, tmp_path / "json", tmp_path / "rules.yml")
    targets = [t for t in load_tiers(config) if t.targets]
    overview = json.loads(files[0].read_text())
    slo_titles = [p["title"] for p in overview["panels"] if p["type"] == "stat"]
    assert len(slo_titles) == sum(len(t.targets) for t in targets)
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "rules", str(tmp_path / "rules.yml")], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


def test_promtool_accepts_the_cluster_config_and_rules() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")
    for args in (["check", "config", str(ROOT / "cluster" / "prometheus.yml")],
                 ["check", "rules", str(build.RULES_FILE)]):
        check = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "SUCCESS" in check.stdout + check.stderr
