"""Observability: Grafana dashboards and alert rules generated from one source, and panels drawn without Grafana."""
