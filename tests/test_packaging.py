"""A non-editable install: the wheel carries what the CLI needs (configs, kernels' C source) and
writes only where the user runs it, never into site-packages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# The installed package only: no checkout on the import path.
ENV = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}


def test_wheel_in_a_fresh_venv_runs_generate_and_dashboards_build(tmp_path: Path, tiny_checkpoint: Path) -> None:
    wheels = tmp_path / "wheels"
    # No build isolation: the build needs only setuptools, already here (CI has no index mirror of it).
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(wheels),
                    str(ROOT)], check=True, timeout=300, cwd=tmp_path)
    venv = tmp_path / "venv"
    # The dependencies (torch, ray, ...) come from this interpreter's site-packages; the package itself
    # from the wheel, which the venv's own site-packages put first.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    python, cli = venv / "bin" / "python", venv / "bin" / "mixtral-serve"
    (wheel,) = wheels.glob("mixtral_serve-*.whl")
    # --ignore-installed: this interpreter's own (editable) mixtral-serve must not count as installed.
    subprocess.run([python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", "--ignore-installed", str(wheel)],
                   check=True, timeout=300, env=ENV)
    work = tmp_path / "work"
    work.mkdir()

    where = subprocess.run([python, "-c", "import configs, dashboards, engine, json; print(json.dumps("
                            "[engine.__file__, dashboards.__file__, str(configs.LOCAL), configs.LOCAL.is_file()]))"],
                           cwd=work, capture_output=True, text=True, check=True, timeout=120, env=ENV)
    engine_file, dashboards_file, local_config, config_shipped = json.loads(where.stdout)
    site = Path(engine_file).parents[1]
    assert site.is_relative_to(venv) and Path(dashboards_file).is_relative_to(venv), where.stdout
    assert config_shipped and Path(local_config).is_relative_to(venv)
    assert (site / "engine" / "cpu_kernels.c").is_file()
    before = {p for p in site.rglob("*") if "__pycache__" not in p.parts}

    done = subprocess.run([cli, "generate", "--model", str(tiny_checkpoint), "--prompt", "Hello", "--max-tokens", "4",
                           "--ignore-eos", "--json"], cwd=work, capture_output=True, text=True, timeout=300, env=ENV)
    assert done.returncode == 0, done.stderr[-2000:]
    assert len(json.loads(done.stdout)["token_ids"]) == 4

    built = subprocess.run([cli, "dashboards", "build"], cwd=work, capture_output=True, text=True, timeout=120,
                           env=ENV)
    assert built.returncode == 0, built.stderr[-2000:]
    shipped = sorted(p.stem for p in Path(local_config).parent.glob("*.yaml"))
    assert sorted(p.stem for p in (work / "cluster" / "prometheus-rules").glob("*.yml")) == shipped
    assert list((work / "dashboards" / "json").glob("*.json"))
    added = {p for p in site.rglob("*") if "__pycache__" not in p.parts} - before
    assert not added, f"written into site-packages: {sorted(map(str, added))[:5]}"
