#!/usr/bin/env python3
"""Checks Grafana dashboards: valid JSON, unique panel ids, every panel has Prometheus
queries, and every metric a query names is one Tern exports (or a planned one, or a standard
node_exporter/Prometheus series). Usage: check_dashboards.py FILE.json..."""
import glob, json, os, re, sys

# What the code exports today: every metric name registered in the Rust sources.
ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
EXPORTED = set()
for src in glob.glob(f"{ROOT}/*/src/**/*.rs", recursive=True):
    EXPORTED |= set(re.findall(r'(?:counter|gauge|histogram)!\(\s*"(tern_[a-z_]+)"', open(src).read()))
assert "tern_relay_listeners" in EXPORTED, EXPORTED
PLANNED = {"tern_relay_listener_loss_ratio", "tern_relay_upstream_latency_seconds_bucket",
           "tern_packager_upload_lag_seconds", "tern_relay_upstream_up"}
OTHER = {"up", "node_cpu_seconds_total", "node_memory_MemAvailable_bytes", "node_memory_MemTotal_bytes"}
WORDS = {"sum", "by", "rate", "max", "min", "avg", "count", "histogram_quantile", "instance",
         "broadcast", "le", "region", "job", "mode", "and", "or", "on", "without"}

failed = False
for path in sys.argv[1:]:
    d = json.load(open(path))
    panels = d["panels"]
    assert panels, f"{path}: no panels"
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids)), f"{path}: duplicate panel ids"
    used = set()
    for p in panels:
        assert p.get("targets"), f"{path}: panel {p['title']!r} has no queries"
        for t in p["targets"]:
            expr = re.sub(r'\{[^}]*\}|"[^"]*"|\[[^\]]*\]', "", t["expr"])
            for name in re.findall(r"[a-zA-Z_:][a-zA-Z0-9_:]*", expr):
                if name in WORDS:
                    continue
                used.add(name)
                if name not in EXPORTED | PLANNED | OTHER:
                    print(f"{path}: panel {p['title']!r}: unknown metric {name}")
                    failed = True
    real = used & EXPORTED
    assert real or "planned" in d["title"], f"{path}: no exported metric used"
    print(f"dashboards: {path}: {len(panels)} panels, metrics {sorted(real)}"[:200])
sys.exit(1 if failed else 0)
