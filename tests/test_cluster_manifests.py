"""Cluster manifests: validated against the schemas Ray ships and against our own config models."""

from __future__ import annotations

import json
import re
import tomllib
from importlib import resources
from pathlib import Path

import jsonschema
import ray
import yaml
from packaging.specifiers import SpecifierSet
from ray.serve.schema import ServeDeploySchema

from deployments.config import AppConfig

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_launcher_yaml_matches_rays_schema() -> None:
    schema = json.loads((Path(str(resources.files("ray"))) / "autoscaler" / "ray-schema.json").read_text())
    config = yaml.safe_load((ROOT / "cluster" / "ray-cluster.yaml").read_text())
    jsonschema.validate(config, schema)
    starts = " ".join(config["head_start_ray_commands"] + config["worker_start_ray_commands"])
    assert starts.count("--metrics-export-port=8080") == 2  # outside Ray's worker port range
    # Every node runs the image the RayService runs (cluster/Dockerfile), with the launching checkout on top.
    service = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    images = {c["image"] for group in [service["spec"]["rayClusterConfig"]["headGroupSpec"],
                                       *service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
              for c in group["template"]["spec"]["containers"]}
    assert images == {config["docker"]["image"]}
    assert any("pip install --no-deps --force-reinstall ~/mixtral-serve" in c for c in config["setup_commands"])


def test_dockerfile_builds_on_rays_gpu_image_of_the_pinned_ray_and_a_current_cuda_index() -> None:
    text = (ROOT / "cluster" / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S+)$", text, flags=re.M))
    image = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py3(\d+)-(gpu|cu\d+)", args["RAY_IMAGE"])
    assert image, args["RAY_IMAGE"]
    assert image.group(1).rsplit(".", 1)[0] == ray.__version__.rsplit(".", 1)[0]  # the Ray the package pins
    python_minor = int(image.group(2))
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["requires-python"]
    assert SpecifierSet(pyproject).contains(f"3.{python_minor}")
    cuda = re.fullmatch(r"https://download\.pytorch\.org/whl/cu(\d+)", args["TORCH_INDEX_URL"])
    assert cuda and int(cuda.group(1)) >= 126, args["TORCH_INDEX_URL"]  # PyTorch 2.9+ builds cu126 and newer
    assert re.search(r"^FROM \$\{RAY_IMAGE\}$", text, flags=re.M)
    assert "pip install --no-cache-dir /home/ray/mixtral-serve" in text  # a wheel install, not editable


def test_rayservice_serve_config_is_the_8x7b_config_and_valid(tiny_checkpoint: Path) -> None:
    service = yaml.safe_load((ROOT / "cluster" / "rayservice.yaml").read_text())
    # Fields KubeRay 1.x ignores would only pretend to give slow loads more time.
    assert not {"serviceUnhealthySecondThreshold", "deploymentUnhealthySecondThreshold"} & service["spec"].keys()
    assert service["kind"] == "RayService"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    shipped = yaml.safe_load((ROOT / "configs" / "mixtral-8x7b-instruct.yaml").read_text())
    assert embedded == shipped, "serveConfigV2 drifted from configs/mixtral-8x7b-instruct.yaml"
    ServeDeploySchema.model_validate(embedded)
    for app in embedded["applications"]:
        # The weights live on the cluster; everything else is checked here against a local folder.
        AppConfig.model_validate(app["args"] | {"model": str(tiny_checkpoint)})
    workers = service["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    gpus = int(workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
    tiers = embedded["applications"][0]["args"]["tiers"]
    assert all(t["deployment"]["num_gpus"] <= gpus for t in tiers.values())  # every tier fits a node
