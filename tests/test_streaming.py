"""Bodies stream through the gateway: 200 MiB each way with bounded worker memory."""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator

import pytest

from gateway import Gateway, GatewayFactory
from upstreams import CHUNK, Upstream, pattern_crc

MIB = 1024 * 1024
SIZE = 200 * MIB
MAX_GROWTH = 100 * 1000 * 1000  # bytes of worker RSS growth allowed while 200 MiB pass


class RssWatcher:
    """Samples the summed RSS of the gateway's workers in the background."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self.baseline = gw.rss()
        self.peak = self.baseline
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, self.gw.rss())

    def __enter__(self) -> RssWatcher:
        assert self.baseline > 0, "could not read the workers' RSS"
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def growth(self) -> int:
        return self.peak - self.baseline


def start(gateway: GatewayFactory, up: Upstream) -> Gateway:
    gw = gateway(
        {
            "upstreams": {"backend": {"targets": [up.address]}},
            "routes": [{"name": "all", "paths": ["/*"], "upstream": "backend"}],
        }
    )
    # warm up both workers' buffers and pools before the baseline
    with gw.client() as client:
        for _ in range(4):
            client.post("/warm", content=CHUNK)
            client.get("/warm", headers={"X-Up-Size": str(MIB)})
    return gw


@pytest.mark.heavy
def test_200_mib_upload_streams_with_bounded_memory(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream)

    def body() -> Iterator[bytes]:
        for _ in range(SIZE // len(CHUNK)):
            yield CHUNK

    with RssWatcher(gw) as rss, gw.client(timeout=120) as client:
        resp = client.post("/upload", content=body(), headers={"Content-Length": str(SIZE)})
    assert resp.status_code == 200
    assert resp.json()["body_len"] == SIZE
    seen = upstream.last()
    assert seen.target == "/upload"
    assert seen.body_len == SIZE
    assert seen.body_crc == pattern_crc(SIZE)
    print(f"worker RSS: {rss.baseline / MIB:.0f} MiB, peak growth {rss.growth / MIB:.1f} MiB")
    assert rss.growth < MAX_GROWTH, f"worker RSS grew by {rss.growth / MIB:.0f} MiB"


@pytest.mark.heavy
def test_200_mib_download_streams_with_bounded_memory(
    gateway: GatewayFactory, upstream: Upstream
) -> None:
    gw = start(gateway, upstream)
    crc = 0
    total = 0
    with (
        RssWatcher(gw) as rss,
        gw.client(timeout=120) as client,
        client.stream("GET", "/download", headers={"X-Up-Size": str(SIZE)}) as resp,
    ):
        assert resp.status_code == 200
        assert resp.headers.get("content-length") in (None, str(SIZE))
        for data in resp.iter_raw(MIB):
            if total == 0:
                # a slow reader: a gateway that does not apply backpressure would now
                # pull the whole body from the fast upstream into memory
                time.sleep(1.5)
            crc = zlib.crc32(data, crc)
            total += len(data)
    assert total == SIZE
    assert crc == pattern_crc(SIZE)
    print(f"worker RSS: {rss.baseline / MIB:.0f} MiB, peak growth {rss.growth / MIB:.1f} MiB")
    assert rss.growth < MAX_GROWTH, f"worker RSS grew by {rss.growth / MIB:.0f} MiB"
