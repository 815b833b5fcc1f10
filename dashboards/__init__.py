"""Grafana dashboards and Prometheus rules for mixtral-serve, generated from Python (see build.py)."""
