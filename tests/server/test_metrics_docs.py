"""/metrics against its documentation and the example Grafana dashboard: every metric a dashboard query
names exists on /metrics, every md_ metric is documented in server/README.md (and nothing else is), and
the per-domain residency gauge follows the bank (set on load, removed on LRU eviction)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from adapters_store import LocalStore
from server.app import create_app
from tests.server.conftest import encode, image, settings_for

ROOT = Path(__file__).parents[2]
DASHBOARD = ROOT / "deploy" / "grafana" / "multidomain.json"
_METRIC = re.compile(r"\bmd_[a-z_]+\b")


def _exposed(client: httpx.Client) -> tuple[set[str], set[str]]:
    """(family names, sample names) on /metrics after one request of each kind."""
    for domain in ("birds", "digits"):
        r = client.post(
            f"/v1/domains/{domain}/classify", content=encode(image(1)), headers={"Content-Type": "image/png"}
        )
        assert r.status_code == 200, r.text
    families = list(text_string_to_metric_families(client.get("/metrics").text))
    return {f.name for f in families}, {s.name for f in families for s in f.samples}


def _dashboard_queries() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["title"] == "multidomain" and dashboard["panels"]
    return [t["expr"] for p in dashboard["panels"] for t in p["targets"]]


def test_every_metric_a_dashboard_query_names_exists(client: httpx.Client) -> None:
    _families, samples = _exposed(client)
    named = {m for q in _dashboard_queries() for m in _METRIC.findall(q)}
    assert len(named) >= 15
    assert named - samples == set()


def test_metrics_are_documented_in_the_server_readme(client: httpx.Client) -> None:
    families, _samples = _exposed(client)
    # prometheus-client's `_created` timestamps of counters and histograms are not metrics of their own
    ours = {f for f in families if f.startswith("md_") and not f.endswith("_created")}
    readme = (ROOT / "server" / "README.md").read_text()
    table = readme.split("## Metrics", 1)[1].split("\n## ", 1)[0]
    documented = {m.removesuffix("_total") for m in re.findall(r"^\| `(md_[a-z_]+)`", table, re.M)}
    assert ours == documented


def test_residency_gauge_follows_the_bank(store: LocalStore) -> None:
    with TestClient(create_app(settings_for(store, bank_slots=1, merged_cache=0))) as client:

        def resident() -> set[tuple[str, str]]:
            text = client.get("/metrics").text
            return {
                (s.labels["domain"], s.labels["version"])
                for f in text_string_to_metric_families(text)
                if f.name == "md_domain_resident"
                for s in f.samples
            }

        headers = {"Content-Type": "image/png"}
        assert (
            client.post("/v1/domains/birds/classify", content=encode(image(1)), headers=headers).status_code
            == 200
        )
        assert ("birds", "1") in resident()
        assert (
            client.post("/v1/domains/digits/classify", content=encode(image(1)), headers=headers).status_code
            == 200
        )
        assert resident() == {("digits", "1")}  # birds was evicted (one slot): its series is gone
