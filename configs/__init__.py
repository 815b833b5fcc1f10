"""The shipped Serve configs, installed with the package so that the CLI finds them anywhere.

NOTE: a package (not a folder beside the code) because a non-editable `pip install .` copies only
packages: `mixtral-serve serve` and `dashboards build` would otherwise look for configs/local.yaml
inside site-packages and find nothing.
"""

from __future__ import annotations

from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent
LOCAL = CONFIG_DIR / "local.yaml"  # the CPU default: three tiers on the embedded tiny model


def shipped() -> list[Path]:
    """Every shipped config, local.yaml first."""
    return [LOCAL, *sorted(p for p in CONFIG_DIR.glob("*.yaml") if p != LOCAL)]
