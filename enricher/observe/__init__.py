"""Observing the system: the Grafana dashboard and the Prometheus alert rules."""
