"""The alert rules for the Prometheus Operator: k8s/base/prometheusrule.yaml.

k8s/base/prometheus/alerts.yaml is the one source of the rules (a plain
Prometheus rule file: docker/compose.yaml mounts it; promtool checks and tests
it). An Operator-managed Prometheus reads rules only from PrometheusRule
objects, so `python -m enricher.observe.alerts` writes the same groups into
one; tests/test_observe.py fails when the two differ.
"""

from __future__ import annotations

from pathlib import Path

import yaml

K8S = Path(__file__).resolve().parents[2] / "k8s" / "base"
RULES = K8S / "prometheus" / "alerts.yaml"
OUTPUT = K8S / "prometheusrule.yaml"

HEADER = ("# Written by `python -m enricher.observe.alerts` from prometheus/alerts.yaml: edit that file.\n"
          "# For a Prometheus run by the Prometheus Operator (its ruleSelector must match these labels).\n")


class _Dumper(yaml.SafeDumper):
    """Multi-line expressions as block scalars, as they are written in the source."""


_Dumper.add_representer(str, lambda d, v: d.represent_scalar("tag:yaml.org,2002:str", v,
                                                             style="|" if "\n" in v else None))


def render(rules_text: str | None = None) -> str:
    groups = yaml.safe_load(rules_text if rules_text is not None else RULES.read_text())["groups"]
    doc = {"apiVersion": "monitoring.coreos.com/v1", "kind": "PrometheusRule",
           "metadata": {"name": "enricher-alerts", "labels": {"app.kubernetes.io/name": "enricher",
                                                               "app.kubernetes.io/component": "alerts"}},
           "spec": {"groups": groups}}
    return HEADER + yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)


if __name__ == "__main__":
    OUTPUT.write_text(render())
    print(f"wrote {OUTPUT}")
