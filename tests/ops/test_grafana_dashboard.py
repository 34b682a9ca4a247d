"""ops/grafana/toxrelay.json (issue 14, "What must exist"): it parses, every
panel is placed and has queries, and every PromQL expression names only
metrics (and labels) that the relay exports and docs/operations.md documents.

The exported names come from the metrics module itself: a scrape of
``ClusterCollector`` over a cluster state that holds a sample of every
labelled counter, so a renamed or removed metric breaks this test.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cluster.metrics import LABELLED_COUNTERS, ClusterCollector, ClusterStats

ROOT = Path(__file__).resolve().parents[2]
DASHBOARD = ROOT / "ops" / "grafana" / "toxrelay.json"
OPERATIONS = ROOT / "docs" / "operations.md"

METRIC = re.compile(r"\btoxrelay_[a-z_]+\b")
GROUPING = re.compile(r"\b(?:by|without)\s*\(([^)]*)\)")
MATCHER = re.compile(r"\{([^}]*)\}")
PROMQL_WORDS = {"sum", "max", "min", "avg", "rate", "increase", "by", "without"}
TARGET_LABELS = {"instance", "job"}  # added by Prometheus at scrape time
# The subjects the issue asks the dashboard to show, by the metric that shows them.
REQUIRED = {
    "connections": "toxrelay_connections",
    "relayed frames": "toxrelay_relayed_packets_total",
    "relayed bytes": "toxrelay_relayed_bytes_total",
    "drops by reason": "toxrelay_dropped_packets_total",
    "handshakes": "toxrelay_handshakes_total",
    "onion traffic": "toxrelay_onion_packets_total",
    "worker restarts": "toxrelay_worker_restarts_total",
    "loop lag": "toxrelay_event_loop_lag_seconds",
}


def exported_metrics() -> dict[str, set[str]]:
    """Sample name -> its label names, from a scrape of the metrics module."""
    stats = ClusterStats()
    stats.slot_of_shard[1] = 0
    counters = {f"{prefix}example": 1 for prefix in LABELLED_COUNTERS}
    report = {
        "counters": counters,
        "connections": {"incoming": 0, "unconfirmed": 0, "confirmed": 1},
        "loop_lag": 0.0,
        "rss": 1,
        "cpu": 0.1,
    }
    stats.record(1, 100, report, now=1.0)
    registry = CollectorRegistry()
    registry.register(ClusterCollector(stats))
    names: dict[str, set[str]] = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            names.setdefault(sample.name, set()).update(sample.labels)
    return names


def expressions(dashboard: dict) -> list[tuple[str, str]]:
    """(panel title, expr) of every query, the template variables' included."""
    found = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            found.append((panel["title"], target["expr"]))
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            found.append((f"variable {variable['name']}", variable["query"]["query"]))
    return found


def test_dashboard_parses_and_every_panel_is_complete() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    occupied: set[tuple[int, int]] = set()
    for panel in dashboard["panels"]:
        grid = panel["gridPos"]
        assert grid["x"] >= 0 and grid["x"] + grid["w"] <= 24, panel["title"]
        cells = {
            (grid["y"] + dy, grid["x"] + dx) for dy in range(grid["h"]) for dx in range(grid["w"])
        }
        assert not cells & occupied, f"{panel['title']} overlaps another panel"
        occupied |= cells
        if panel["type"] == "row":
            continue
        assert panel["targets"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}"
        refs = [target["refId"] for target in panel["targets"]]
        assert len(refs) == len(set(refs)), panel["title"]


def test_every_expression_names_only_exported_documented_metrics() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    exported = exported_metrics()
    documented = set(METRIC.findall(OPERATIONS.read_text()))
    used: set[str] = set()
    for title, expr in expressions(dashboard):
        assert expr.count("(") == expr.count(")") and expr.count("{") == expr.count("}"), title
        names = set(METRIC.findall(expr))
        assert names, f"{title}: {expr} names no toxrelay metric"
        unknown = names - exported.keys()
        assert not unknown, f"{title}: {sorted(unknown)} not exported by the relay"
        undocumented = names - documented
        assert not undocumented, f"{title}: {sorted(undocumented)} not in docs/operations.md"
        labels = set().union(*(exported[name] for name in names)) | TARGET_LABELS
        for group in GROUPING.findall(expr):
            for label in filter(None, (part.strip() for part in group.split(","))):
                assert label in labels, f"{title}: grouping by unknown label {label!r}"
        for matchers in MATCHER.findall(expr):
            for matcher in filter(None, (part.strip() for part in matchers.split(","))):
                label = re.split(r"=~|!=|!~|=", matcher)[0].strip()
                assert label in labels, f"{title}: matcher on unknown label {label!r}"
        used |= names
    for subject, metric in REQUIRED.items():
        assert metric in used, f"the dashboard shows no {subject} ({metric})"


def test_operations_guide_points_to_the_dashboard() -> None:
    assert "ops/grafana/toxrelay.json" in OPERATIONS.read_text()
