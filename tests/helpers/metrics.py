"""The metric classes filled with observations, and the PromQL the dashboard and docs query:
shared by the deploy and promtool tests."""

import json
import re

from prometheus_client import CollectorRegistry

from asyncrl import metrics
from tests.conftest import ROOT

ROLE_CLASSES = {"generator": metrics.GeneratorMetrics, "buffer": metrics.BufferMetrics,
                "learner": metrics.LearnerMetrics, "launcher": metrics.LauncherMetrics,
                "evaluator": metrics.EvaluatorMetrics, "reward": metrics.RewardMetrics}
def metric_objects(m) -> list:
    """Every metric an instance holds, also those kept in a dict (LearnerMetrics.step_gauges)."""
    return [x for v in vars(m).values() for x in (v.values() if isinstance(v, dict) else [v])]


def filled(cls) -> CollectorRegistry:
    """A fresh registry holding one role's metrics, each with a few observations."""
    registry = CollectorRegistry()
    m = cls(registry)
    for metric in metric_objects(m):
        names = metric._labelnames
        children = ([metric.labels(*[v] * len(names)) for v in ("bad_type", "too_large")]
                    if names else [metric])
        for child in children:
            kind = type(metric).__name__
            if kind == "Counter":
                child.inc(3)
            elif kind == "Gauge":
                child.set(0.25)
            else:
                for v in (0, 0.02, 0.7, 3, 100):
                    child.observe(v)
    return registry


def dashboard() -> dict:
    return json.loads((ROOT / "deploy" / "grafana" / "asyncrl-dashboard.json").read_text())


def dashboard_exprs() -> list[str]:
    return [t["expr"] for p in dashboard()["panels"] for t in p.get("targets", [])]


def doc_queries() -> list[str]:
    text = (ROOT / "docs" / "metrics.md").read_text().split("\n## Useful queries", 1)[1]
    blocks = re.findall(r"```promql\n(.*?)```", text, re.S)
    return [q for b in blocks for q in b.strip().splitlines()]
