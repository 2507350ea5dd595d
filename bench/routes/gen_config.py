"""Write a ferrogate config with N routes for the route-lookup scaling benchmark.

Route i serves ``/svc{i}/users/{id}`` and ``/svc{i}/static/{*file}``. Even routes are bound to
the exact host ``svc{i}.example.test``, every tenth route also to the wildcard
``*.zone{i}.example.test``, odd routes to any host. All go to the built-in echo upstream.

    python bench/routes/gen_config.py --routes 10000 --listen 127.0.0.1:18090 \
        --echo 127.0.0.1:18091 > routes-10000.yaml
"""

from __future__ import annotations

import argparse
import json
import sys


def build(routes: int, listen: str, echo: str) -> dict[str, object]:
    table = []
    for i in range(routes):
        route: dict[str, object] = {
            "name": f"svc{i}",
            "paths": [f"/svc{i}/users/{{id}}", f"/svc{i}/static/{{*file}}"],
            "upstream": "echo",
        }
        if i % 2 == 0:
            hosts = [f"svc{i}.example.test"]
            if i % 10 == 0:
                hosts.append(f"*.zone{i}.example.test")
            route["hosts"] = hosts
        table.append(route)
    return {
        "listen": [listen],
        "workers": 1,
        "echo": {"listen": echo},
        "upstreams": {"echo": {"targets": [echo], "keepalive": 1024}},
        "routes": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, required=True)
    parser.add_argument("--listen", default="127.0.0.1:18090")
    parser.add_argument("--echo", default="127.0.0.1:18091")
    args = parser.parse_args()
    # JSON is YAML: a compact file that loads fast even with 10,000 routes
    json.dump(build(args.routes, args.listen, args.echo), sys.stdout, indent=1)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
