"""The adapters loaded at runtime (POST /v1/load_lora_adapter), per tier: one record every router
replica reads, so all of them serve the same set, and every model replica, also one autoscaling
starts later, gets an adapter's folder with each request that names it.

A Serve deployment of one replica in the application: Serve restarts it if it dies, with an empty
record (adapters from the config file are not here: the routers hold those).
"""

from __future__ import annotations

from ray import serve


@serve.deployment(num_replicas=1, ray_actor_options={"num_cpus": 0})
class AdapterRegistry:
    def __init__(self) -> None:
        self.adapters: dict[str, dict[str, str]] = {}  # tier -> name -> folder

    def add(self, tier: str, name: str, path: str) -> bool:
        """False when the tier already serves an adapter of that name."""
        served = self.adapters.setdefault(tier, {})
        if name in served:
            return False
        served[name] = path
        return True

    def remove(self, tier: str, name: str) -> bool:
        return self.adapters.get(tier, {}).pop(name, None) is not None

    def lookup(self, tier: str, name: str) -> str | None:
        return self.adapters.get(tier, {}).get(name)

    def listing(self, tier: str) -> dict[str, str]:
        return dict(self.adapters.get(tier, {}))
