"""The plugin tutorial (docs/plugins.md) stays true: the example's own tests pass, the code the
page shows is the code in examples/, its Python parses, and its configs are valid."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from ferrogate.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "plugins.md"
EXAMPLE = ROOT / "examples" / "api_key"
EXAMPLE_FILES = {
    "examples/api_key/plugins/api_key.py",
    "examples/api_key/gateway.yaml",
    "examples/api_key/test_api_key.py",
}

# A fenced code block; the HTML comment on the line before it, when there is one, says where
# its text comes from: "<!-- file: PATH -->" (the whole file) or "<!-- excerpt: PATH -->"
# (consecutive whole lines of it).
BLOCK = re.compile(
    r"^(?:<!-- (?P<kind>file|excerpt): (?P<path>\S+) -->\n)?"
    r"```(?P<lang>[a-z]*)\n(?P<text>.*?)^```$",
    re.M | re.S,
)


def blocks() -> list[dict[str, Any]]:
    return [m.groupdict() for m in BLOCK.finditer(DOC.read_text())]


def test_the_example_tests_pass() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "pytest", "examples/api_key", "-q", "-p", "no:cacheprovider"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    # the count the tutorial shows is the count there is
    shown = re.search(r"^(\d+) passed in ", DOC.read_text(), re.M)
    assert shown is not None
    assert re.search(rf"^{shown.group(1)} passed in ", out.stdout, re.M), out.stdout


def test_the_code_shown_is_the_code_in_examples() -> None:
    marked = [b for b in blocks() if b["kind"]]
    assert {b["path"] for b in marked} == EXAMPLE_FILES
    for b in marked:
        text = (ROOT / b["path"]).read_text()
        if b["kind"] == "file":
            assert b["text"] == text, f"docs/plugins.md shows another {b['path']}"
        else:
            assert ("\n" + text).find("\n" + b["text"]) >= 0, (
                f"docs/plugins.md shows lines that are not in {b['path']}:\n{b['text']}"
            )
    # every python block of the page is either one of these or at least valid Python
    for b in blocks():
        if b["lang"] == "python" and not b["kind"]:
            ast.parse(b["text"])


def test_the_example_config_passes_check() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "ferrogate", "check", "examples/api_key/gateway.yaml"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == "examples/api_key/gateway.yaml: ok"


def plugin_configs() -> list[str]:
    """The page's YAML blocks that are a config's ``plugins`` (and ``routes``) sections."""
    found = []
    for b in blocks():
        if b["lang"] == "yaml" and not b["kind"]:
            doc = yaml.safe_load(b["text"])
            if isinstance(doc, dict) and "plugins" in doc and set(doc) <= {"plugins", "routes"}:
                found.append(b["text"])
    return found


def test_the_page_shows_plugin_configs() -> None:
    names = {p["name"] for text in plugin_configs() for p in yaml.safe_load(text)["plugins"]}
    # one example of each first-party plugin, and the settings of a use
    assert names >= {"cors", "request-transformer", "response-transformer", "request-termination"}
    assert "api-key" in names


@pytest.mark.parametrize("text", plugin_configs())
def test_plugin_configs_shown_are_valid(text: str, tmp_path: Path) -> None:
    doc = yaml.safe_load(text)
    doc.setdefault("routes", [{"paths": ["/*"], "upstream": "http://127.0.0.1:9000"}])
    doc["listen"] = ["127.0.0.1:18699"]
    doc["plugins_dir"] = str(EXAMPLE / "plugins")
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc))
    try:
        load_config(path)
    except ConfigError as e:
        pytest.fail(f"{e}\n{text}")
