"""The Grafana dashboard and provisioning under grafana/: every metric a query names is one the
mirror exports (read from `mirror.metrics.Metrics`, not from a list kept here), and the
provisioning files are what Grafana needs to show the dashboard without any clicking.

The helpers here (`dashboard_queries`, `to_promql`, ...) are also used by
tests/integration/test_metrics.py, which runs every query through a real Prometheus."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirror.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
GRAFANA = ROOT / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "mirror.json"
DATASOURCES = GRAFANA / "provisioning" / "datasources" / "prometheus.yaml"
PROVIDERS = GRAFANA / "provisioning" / "dashboards" / "mirror.yaml"
PROMETHEUS_CONFIG = GRAFANA / "prometheus.yml"
DATASOURCE_UID = "prometheus"

# Panels whose queries must return data once a few images went through the mirror (checked
# against a live Prometheus by the integration test).
MAIN_PANELS = ("Blob hit ratio", "Manifest & tag hit ratio", "Hit ratio", "Bytes saved",
               "Bytes served by source", "Requests / s", "Client requests by status",
               "Upstream requests by status")

# Grafana's built-in variables, with the values the integration test uses for them.
GRAFANA_BUILTINS = {"__rate_interval": "1m", "__interval": "15s", "__range": "5m"}

AGGREGATIONS = {"sum", "min", "max", "avg", "group", "stddev", "stdvar", "count",
                "count_values", "bottomk", "topk", "quantile", "limitk", "limit_ratio"}
KEYWORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or",
            "unless", "offset", "atan2", "inf", "nan"}
LABEL_LISTS = {"by", "without", "on", "ignoring", "group_left", "group_right"}

TOKEN = re.compile(r"""
    (?P<space>\s+)
  | (?P<string>"(?:\\.|[^"\\])*"|'(?:\\.|[^'\\])*'|`[^`]*`)
  | (?P<variable>\$\{[^}]*\}|\$\w+|\[\[\w+\]\])
  | (?P<duration>(?:\d+(?:ms|[smhdwy]))+)
  | (?P<number>0[xX][0-9a-fA-F]+|(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)
  | (?P<ident>[A-Za-z_:][A-Za-z0-9_:]*)
  | (?P<punct>=~|!~|!=|==|<=|>=|[-+*/%^<>=(){}\[\],@:])
""", re.VERBOSE)


@dataclass(frozen=True)
class Query:
    """One query of the dashboard: a panel target's `expr` or a templating variable's query."""

    where: str  # "panel 'TITLE' target A" or "variable 'NAME'"
    text: str  # as written in the dashboard (Grafana syntax)

    @property
    def promql(self) -> str:
        return to_promql(self.text)


def tokens(expr: str) -> Iterator[tuple[str, str]]:
    """(kind, text) of every token of `expr`, spaces left out; fails on anything unknown."""
    pos = 0
    while pos < len(expr):
        match = TOKEN.match(expr, pos)
        if match is None:
            raise ValueError(f"cannot tokenize {expr[pos:pos + 20]!r} in {expr!r}")
        pos = match.end()
        kind = match.lastgroup
        assert kind is not None
        if kind != "space":
            yield kind, match.group()


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression selects: identifiers that are not followed by `(`
    (functions, aggregations), not keywords, not label names (inside `{...}`, or in the lists
    of by/without/on/ignoring/group_left/group_right) and not inside a `[...]` range."""
    toks = list(tokens(expr))
    names: set[str] = set()
    braces = brackets = 0
    label_list = False  # inside by(...) and the like
    for i, (kind, text) in enumerate(toks):
        following = toks[i + 1][1] if i + 1 < len(toks) else ""
        if kind == "punct":
            if text == "{":
                braces += 1
            elif text == "}":
                braces -= 1
            elif text == "[":
                brackets += 1
            elif text == "]":
                brackets -= 1
            elif text == ")" and label_list:
                label_list = False
            continue
        if kind != "ident" or braces or brackets or label_list:
            continue
        lowered = text.lower()
        if lowered in LABEL_LISTS and following == "(":
            label_list = True
        elif following != "(" and lowered not in KEYWORDS and lowered not in AGGREGATIONS:
            names.add(text)
    if braces or brackets:
        raise ValueError(f"unbalanced braces or brackets in {expr!r}")
    return names


LABEL_VALUES = re.compile(
    r"\s*label_values\(\s*(?:(?P<selector>.+?)\s*,\s*)?(?P<label>\w+)\s*\)\s*")


def to_promql(query: str) -> str:
    """A dashboard query as plain PromQL: Grafana's `label_values(SELECTOR, LABEL)` becomes
    `group by (LABEL) (SELECTOR)`; Grafana's built-in variables get the values in
    `GRAFANA_BUILTINS` and the dashboard's own variables (all of them regex-matched label
    values, `$job` and the like) become `.*`."""
    match = LABEL_VALUES.fullmatch(query)
    if match:
        selector = match["selector"] or '{__name__=~".+"}'
        query = f"group by ({match['label']}) ({selector})"

    def value(var: re.Match[str]) -> str:
        name = var.group(1) or var.group(2) or var.group(3)
        return GRAFANA_BUILTINS.get(name, ".*")

    return re.sub(r"\$\{(\w+)(?::\w+)?\}|\$(\w+)|\[\[(\w+)\]\]", value, query)


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def all_panels(dashboard: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """Every panel, also those nested in (collapsed) rows."""
    for panel in dashboard.get("panels", []):
        yield panel
        yield from panel.get("panels", [])


def dashboard_queries(dashboard: dict[str, Any] | None = None) -> list[Query]:
    dashboard = dashboard or load_dashboard()
    queries = []
    for panel in all_panels(dashboard):
        for target in panel.get("targets", []):
            if "expr" in target:
                queries.append(Query(f"panel {panel['title']!r} target {target['refId']}",
                                     target["expr"]))
    for var in dashboard.get("templating", {}).get("list", []):
        if var.get("type") == "query":
            query = var["query"]
            text = query["query"] if isinstance(query, dict) else query
            queries.append(Query(f"variable {var['name']!r}", text))
    return queries


def panel_queries(title: str) -> list[Query]:
    return [q for q in dashboard_queries() if q.where.startswith(f"panel {title!r} ")]


def exported_names() -> dict[str, str]:
    """Every sample name the mirror exports, mapped to its metric family's name, read from a
    fresh `Metrics()`: counters as NAME_total, histograms as NAME_bucket/_sum/_count."""
    suffixes = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
                "summary": ("", "_sum", "_count")}
    names = {}
    for family in Metrics().registry.collect():
        for suffix in suffixes[family.type]:
            names[family.name + suffix] = family.name
    return names


# --- the tokenizer itself --------------------------------------------------------------------

@pytest.mark.parametrize(("expr", "names"), [
    ('sum by (route, le) (rate(a_bucket{job=~"$job", le!="x"}[$__rate_interval]))',
     {"a_bucket"}),
    ("histogram_quantile(0.95, sum without (pid) (rate(b_total[5m] offset 1h)))", {"b_total"}),
    ('x / on (instance) group_left (version) y{kind="blob"} > 0', {"x", "y"}),
    ("max(c) / max(d) * 100 and e unless f", {"c", "d", "e", "f"}),
    ('sum(increase(g{a="b}[c]"}[1h30m])) or vector(0)', {"g"}),
    ("label_values(h{job=~\"$job\"}, instance)", {"h"}),
])
def test_metric_names_finds_only_metrics(expr: str, names: set[str]) -> None:
    assert metric_names(to_promql(expr)) == names


def test_to_promql_replaces_grafana_variables() -> None:
    assert to_promql('rate(x{i=~"$instance", j=~"${job}"}[$__rate_interval])') == (
        'rate(x{i=~".*", j=~".*"}[1m])')
    assert to_promql("label_values(up, job)") == "group by (job) (up)"


# --- the dashboard ---------------------------------------------------------------------------

def test_every_metric_in_the_dashboard_is_exported_by_the_mirror() -> None:
    exported = exported_names()
    queries = dashboard_queries()
    assert len(queries) > 20
    unknown = {}
    for query in queries:
        names = metric_names(query.promql)
        assert names, f"{query.where}: no metric in {query.text!r}"
        missing = names - exported.keys()
        if missing:
            unknown[query.where] = sorted(missing)
    assert not unknown, f"metrics the mirror does not export: {unknown}"


def test_dashboard_covers_every_metric_the_mirror_exports() -> None:
    """A metric added to `Metrics` should get a panel (or be listed here, with a reason)."""
    exported = exported_names()
    used = {exported[name] for q in dashboard_queries() for name in metric_names(q.promql)}
    assert set(exported.values()) - used == set()


def test_dashboard_shape() -> None:
    dashboard = load_dashboard()
    assert dashboard["uid"] == "mirror"
    assert dashboard.get("id") is None
    assert 36 <= dashboard["schemaVersion"] <= 41
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    source = variables["datasource"]
    assert source["type"] == "datasource"
    assert source["query"] == "prometheus"
    assert source["current"]["value"] == DATASOURCE_UID
    ids = [p["id"] for p in all_panels(dashboard)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    titles = {p["title"] for p in all_panels(dashboard)}
    assert set(MAIN_PANELS) <= titles
    for panel in all_panels(dashboard):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        if panel["type"] == "row":
            continue
        assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"] == panel["datasource"]
    for var in variables.values():
        if var["type"] == "query":
            assert var["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
    for query in dashboard_queries(dashboard):
        # every variable the queries use is defined (or one of Grafana's)
        for name in re.findall(r"\$\{?(\w+)", query.text):
            assert name in variables or name in GRAFANA_BUILTINS, (query.where, name)


# --- provisioning ----------------------------------------------------------------------------

def test_datasource_provisioning() -> None:
    config = yaml.safe_load(DATASOURCES.read_text())
    assert config["apiVersion"] == 1
    [source] = config["datasources"]
    assert source["uid"] == DATASOURCE_UID
    assert source["type"] == "prometheus"
    assert source["access"] == "proxy"
    assert source["url"] == "${PROMETHEUS_URL}"  # Grafana expands it from its environment


def test_dashboard_provisioning_points_at_the_documented_mount() -> None:
    config = yaml.safe_load(PROVIDERS.read_text())
    assert config["apiVersion"] == 1
    [provider] = config["providers"]
    assert provider["type"] == "file"
    path = provider["options"]["path"]
    assert path.startswith("/")
    # The README's `docker run` mounts the repository's dashboards exactly there.
    readme = (ROOT / "README.md").read_text()
    assert f"grafana/dashboards:{path}" in readme
    assert "grafana/provisioning:/etc/grafana/provisioning" in readme
    assert "PROMETHEUS_URL" in readme


def test_example_prometheus_config() -> None:
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text())
    [job] = config["scrape_configs"]
    assert job["job_name"] == "mirror"
    assert job.get("metrics_path", "/metrics") == "/metrics"
    assert job["static_configs"][0]["targets"]


def test_readme_lists_every_metric() -> None:
    """The Monitoring section's table names every metric (counters with `_total`)."""
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Monitoring"):]
    section = section[:section.find("\n## ", 1)]
    listed = set(re.findall(r"`(mirror_\w+)`", section))
    histograms = ("_bucket", "_sum", "_count")
    expected = {name if not name.endswith(histograms) else family
                for name, family in exported_names().items()}
    assert expected - listed == set()
