"""The metric catalog (deployments/metrics.py): Prometheus naming conventions, a `tier` label on
every metric, buckets that contain every tier's targets, and no Ray import to read it."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from deployments import metrics as m

ROOT = Path(__file__).resolve().parents[1]


def test_reading_the_catalog_imports_no_ray() -> None:
    code = ("import sys, deployments.metrics, dashboards.build\n"
            "assert not [k for k in sys.modules if k == 'ray' or k.startswith('ray.')]")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=120)


def test_names_follow_prometheus_conventions() -> None:
    names = [spec.name for spec in m.CATALOG]
    assert len(names) == len(set(names))
    for spec in m.CATALOG:
        assert re.fullmatch(r"mixtral_[a-z0-9_]+", spec.name), spec.name
        assert spec.labels[0] == "tier", f"{spec.name}: every metric has a tier label, first"
        assert spec.help and not spec.help.endswith(".")
        assert spec.name.endswith("_total") == (spec.type == "counter"), spec.name
        if "latency" in spec.name or "time" in spec.name:
            assert spec.name.endswith("_seconds"), spec.name
        if spec.type == "histogram":
            assert spec.buckets and list(spec.buckets) == sorted(set(spec.buckets)), spec.name
        else:
            assert not spec.buckets and spec.target is None, spec.name
        assert not set(spec.labels) & set(m.RAY_TAGS[spec.component]), f"{spec.name}: Ray sets those tags"
    # Exported as Ray exports them.
    assert m.TTFT.series == ("ray_mixtral_time_to_first_token_seconds_bucket",
                             "ray_mixtral_time_to_first_token_seconds_sum",
                             "ray_mixtral_time_to_first_token_seconds_count")
    assert m.REQUEST_SUCCESS.series == ("ray_mixtral_request_success_total",)


def test_buckets_hold_every_tiers_targets() -> None:
    tiers = [m.tier_targets(50, 2000), m.tier_targets(None, None), m.tier_targets(33.3, None)]
    buckets = m.histogram_buckets(tiers)
    assert set(buckets) == {s.name for s in m.CATALOG if s.type == "histogram"}
    assert {0.05, 0.0333} <= set(buckets[m.ITL.name]) and 2.0 in buckets[m.TTFT.name]
    assert set(m.ITL.buckets) <= set(buckets[m.ITL.name])
    assert buckets[m.E2E.name] == m.E2E.buckets  # no target of that kind
    assert all(list(b) == sorted(set(b)) for b in buckets.values())
    assert [m.le_label(b) for b in (0.05, 2, 0.0333)] == ["0.05", "2.0", "0.0333"]


def test_readme_table_lists_the_catalog() -> None:
    """README's Metrics table: one row per metric, with the exported name, type and labels."""
    section = (ROOT / "README.md").read_text().split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in section.splitlines()
            if line.startswith("| `ray_")]
    documented = {(name.strip("`"), kind, tuple(label.strip(" `") for label in labels.split(",")))
                  for name, kind, labels, _ in rows}
    assert len(rows) == len(documented)
    assert documented == {(spec.exported, spec.type, spec.labels) for spec in m.CATALOG}
