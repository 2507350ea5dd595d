"""A realistic request mix for load-testing a ferrogate deployment with Locust.

    pip install '.[bench]'
    locust -f bench/locustfile.py --host http://127.0.0.1:8080 \
        --headless -u 200 -r 50 -t 2m

Point ``--host`` at your own gateway. The mix (by weight): small JSON GETs (10), parameterised
routes ``/api/users/{id}`` and ``/api/users/{id}/orders`` (6), JSON POSTs (3) and a 16 KiB
download (1). Paths come from environment variables so they can match your routes:

``FG_STATUS_PATH``    small JSON GET                  default ``/api/status``
``FG_USERS_PREFIX``   parameterised routes            default ``/api/users``
``FG_ORDERS_PATH``    JSON POST                       default ``/api/orders``
``FG_DOWNLOAD_PATH``  16 KiB download                 default ``/static/16k.json``
``FG_DOWNLOAD_BYTES`` expected download size; unset: not checked

``ferrogate run`` without arguments (the quickstart: an echo upstream behind the gateway on
127.0.0.1:8080) answers every one of these paths, which makes a quick smoke run possible.
"""

from __future__ import annotations

import json
import os
import random

from locust import FastHttpUser, between, task

STATUS_PATH = os.environ.get("FG_STATUS_PATH", "/api/status")
USERS_PREFIX = os.environ.get("FG_USERS_PREFIX", "/api/users").rstrip("/")
ORDERS_PATH = os.environ.get("FG_ORDERS_PATH", "/api/orders")
DOWNLOAD_PATH = os.environ.get("FG_DOWNLOAD_PATH", "/static/16k.json")
DOWNLOAD_BYTES = int(os.environ["FG_DOWNLOAD_BYTES"]) if "FG_DOWNLOAD_BYTES" in os.environ else None


class GatewayUser(FastHttpUser):
    wait_time = between(0.05, 0.5)

    def on_start(self) -> None:
        self.user_id = random.randint(1, 100_000)
        self.session = f"s-{random.getrandbits(64):016x}"

    @task(10)
    def status(self) -> None:
        self.client.get(STATUS_PATH, headers={"Accept": "application/json"})

    @task(4)
    def user_profile(self) -> None:
        uid = random.randint(1, 100_000)
        self.client.get(f"{USERS_PREFIX}/{uid}", name=f"{USERS_PREFIX}/[id]")

    @task(2)
    def user_orders(self) -> None:
        self.client.get(
            f"{USERS_PREFIX}/{self.user_id}/orders?limit=20&page={random.randint(1, 5)}",
            name=f"{USERS_PREFIX}/[id]/orders",
            headers={"Cookie": f"session={self.session}"},
        )

    @task(3)
    def create_order(self) -> None:
        order = {
            "user_id": self.user_id,
            "items": [
                {"sku": f"SKU-{random.randint(1000, 9999)}", "qty": random.randint(1, 4)}
                for _ in range(random.randint(1, 6))
            ],
            "note": "x" * random.randint(0, 512),
        }
        self.client.post(
            ORDERS_PATH,
            data=json.dumps(order),
            headers={"Content-Type": "application/json", "Cookie": f"session={self.session}"},
        )

    @task(1)
    def download(self) -> None:
        with self.client.get(DOWNLOAD_PATH, catch_response=True) as resp:
            if DOWNLOAD_BYTES is not None and len(resp.content or b"") != DOWNLOAD_BYTES:
                resp.failure(f"expected {DOWNLOAD_BYTES} bytes, got {len(resp.content or b'')}")
