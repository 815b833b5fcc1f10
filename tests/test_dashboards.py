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

import configs
from dashboards import build, promql
from dashboards.tiers import load_tiers
from deployments import metrics as m

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = configs.shipped()

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
    for path in sorted((ROOT / build.JSON_DIR).glob("*.json")):
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


def rules_queries(config: Path = configs.LOCAL) -> list[tuple[str, str]]:
    groups = yaml.safe_load((ROOT / build.rules_file(config)).read_text())["groups"]
    return [(rule.get("record") or rule["alert"], rule["expr"]) for g in groups for rule in g["rules"]]


def test_generated_files_are_up_to_date() -> None:
    files = build.render(CONFIGS)
    stale = [str(path) for path, text in files.items()
             if not (ROOT / path).exists() or (ROOT / path).read_text() != text]
    assert not stale, f"{stale} differ from the generators: run `mixtral-serve dashboards build` in the repository"
    built = {f"{d.uid}.json" for d in build.dashboards(configs.LOCAL)}
    assert {p.name for p in (ROOT / build.JSON_DIR).glob("*.json")} == built
    assert {p.name for p in (ROOT / build.RULES_DIR).glob("*.yml")} == {f"{c.stem}.yml" for c in CONFIGS}


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


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_rules_query_only_defined_metrics(config: Path) -> None:
    recorded = {name for name, _ in rules_queries(config) if ":" in name}
    defined = m.exported_series() | recorded
    for name, expr in rules_queries(config):
        assert metric_names(expr) <= defined, f"{name}: undefined {sorted(metric_names(expr) - defined)}"


def _bucket_bounds(queries: list[tuple[str, str]]) -> list[tuple[str, str, str]]:
    """(where, histogram, le) of every bucket a query names."""
    return [(where, name, le) for where, expr in queries
            for name, le in re.findall(r'(\w+)_bucket\{[^}]*le="([^"]+)"', expr)]


@pytest.mark.parametrize("config", CONFIGS, ids=[c.name for c in CONFIGS])
def test_slo_queries_read_existing_buckets(config: Path) -> None:
    """An `le` a query names must be a bucket the replicas of that config create, or the
    panel stays empty and the alert can never fire: every shipped rules file is checked against
    the config it was built from."""
    tiers = load_tiers(config)
    buckets = m.histogram_buckets(t.targets for t in tiers)
    queries = rules_queries(config) + (dashboard_queries() if config == configs.LOCAL else [])
    checked = _bucket_bounds(queries)
    for where, name, le in checked:
        spec = next(s for s in m.CATALOG if s.exported == name)
        assert le in {m.le_label(b) for b in buckets[spec.name]}, f"{config.name}: {where}: no bucket le={le} in {name}"
    panels = 1 if config == configs.LOCAL else 0
    assert len(checked) == (1 + panels) * sum(len(t.targets) for t in tiers)  # a rule (and a panel) per target


def test_rules_of_one_config_name_buckets_another_lacks() -> None:
    """Why the rules are per config: local.yaml's TTFT bound is not an 8x7B bucket."""
    gpu = ROOT / "configs" / "mixtral-8x7b-instruct.yaml"
    gpu_buckets = m.histogram_buckets(t.targets for t in load_tiers(gpu))
    foreign = [(name, le) for _, name, le in _bucket_bounds(rules_queries(configs.LOCAL))
               if le not in {m.le_label(b) for b in gpu_buckets[next(s.name for s in m.CATALOG if s.exported == name)]}]
    assert foreign


def test_layout_and_variables() -> None:
    for path in (ROOT / build.JSON_DIR).glob("*.json"):
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
    files = build.write([config], tmp_path / "json", tmp_path / "rules")
    targets = [t for t in load_tiers(config) if t.targets]
    overview = json.loads(files[0].read_text())
    slo_titles = [p["title"] for p in overview["panels"] if p["type"] == "stat"]
    assert len(slo_titles) == sum(len(t.targets) for t in targets)
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "rules", str(files[-1])], capture_output=True,
                               text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr


def test_promtool_accepts_the_cluster_config_and_rules() -> None:
    if shutil.which("promtool") is None:
        pytest.skip("promtool not installed (.ci/run installs Debian's prometheus package)")
    for args in (["check", "config", str(ROOT / "cluster" / "prometheus.yml")],
                 ["check", "rules", *(str(ROOT / build.rules_file(c)) for c in CONFIGS)]):
        check = subprocess.run(["promtool", *args], capture_output=True, text=True, timeout=60)
        assert check.returncode == 0, check.stdout + check.stderr
        assert "SUCCESS" in check.stdout + check.stderr
