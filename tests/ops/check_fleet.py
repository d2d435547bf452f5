#!/usr/bin/env python3
"""Checks a rendered fleet.toml: [[router.fleet]] entries with id, region, url, latitude,
longitude, capacity, as `tern router` will read them."""
import sys, tomllib

with open(sys.argv[1], "rb") as f:
    doc = tomllib.load(f)
fleet = doc["router"]["fleet"]
assert fleet, "empty fleet"
for e in fleet:
    assert set(e) == {"id", "region", "url", "latitude", "longitude", "capacity"}, e
    assert -90 <= e["latitude"] <= 90 and -180 <= e["longitude"] <= 180, e
    assert isinstance(e["capacity"], int) and e["capacity"] > 0, e
    assert e["url"].startswith(("http://", "https://")), e
assert len({e["id"] for e in fleet}) == len(fleet), "duplicate relay ids"
