"""`ferrogate import openapi`: an OpenAPI 3 document becomes an API the gateway serves."""

from __future__ import annotations

from pathlib import Path

import yaml

from gateway import GatewayFactory, run_cli
from upstreams import UpstreamFactory

SPEC = Path(__file__).parent / "openapi" / "petstore.yaml"


def test_the_imported_config_passes_check_as_is(tmp_path: Path) -> None:
    out = run_cli("import", "openapi", str(SPEC))
    assert out.returncode == 0, out.stderr
    config = yaml.safe_load(out.stdout)
    api = config["apis"]["pet-store"]
    # the first server is the upstream; info.version 1.4.0 names the version v1
    assert api["versions"] == {"v1": {"upstream": "http://127.0.0.1:1/api"}}
    assert [(r["name"], r["paths"], r["methods"]) for r in api["routes"]] == [
        ("listPets", ["/pets"], ["GET"]),
        ("createPet", ["/pets"], ["POST"]),
        ("showPetById", ["/pets/{petId}"], ["GET"]),
        ("deletePet", ["/pets/{petId}"], ["DELETE"]),
        ("getPhoto", ["/pets/{id}/photos/{file_ext}"], ["GET"]),
    ]
    assert "plugins" not in api
    path = tmp_path / "imported.yaml"
    path.write_text(out.stdout)
    checked = run_cli("check", str(path))
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_a_document_that_is_not_openapi_is_refused(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("openapi: 3.0.3\ninfo: {title: x}\npaths: {}\n")
    out = run_cli("import", "openapi", str(bad))
    assert out.returncode == 2
    assert "invalid OpenAPI document" in out.stderr
    no_server = tmp_path / "relative.yaml"
    spec = yaml.safe_load(SPEC.read_text())
    spec["servers"] = [{"url": "/api"}]
    no_server.write_text(yaml.safe_dump(spec))
    out = run_cli("import", "openapi", str(no_server))
    assert out.returncode == 2 and "--upstream" in out.stderr


def test_every_operation_is_served_and_validated(
    tmp_path: Path, gateway: GatewayFactory, upstream_factory: UpstreamFactory
) -> None:
    up = upstream_factory("pets")
    target = tmp_path / "pets.yaml"
    out = run_cli(
        "import",
        "openapi",
        str(SPEC),
        "--api",
        "pets",
        "--upstream",
        f"{up.url}/api",
        "--validate",
        "-o",
        str(target),
    )
    assert out.returncode == 0, out.stderr
    checked = run_cli("check", str(target))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    config = yaml.safe_load(target.read_text())
    assert config["apis"]["pets"]["plugins"][0]["name"] == "request-validation"
    del config["listen"]
    gw = gateway(config, workers=1)

    def served(method: str, path: str, expected: str, **kw: object) -> None:
        r = gw.request(method, path, **kw)
        assert r.status_code == 200, (method, path, r.text)
        got = r.json()
        assert (got["method"], got["target"]) == (method, expected)

    served("GET", "/pets/v1/pets?limit=5", "/api/pets?limit=5")
    served("POST", "/pets/v1/pets", "/api/pets", json={"name": "rex"})
    served("GET", "/pets/v1/pets/7", "/api/pets/7")
    served("DELETE", "/pets/v1/pets/7", "/api/pets/7")
    served("GET", "/pets/v1/pets/7/photos/a.png", "/api/pets/7/photos/a.png")
    seen = up.count

    # invalid requests are refused by the document before they reach the upstream
    r = gw.get("/pets/v1/pets/seven")
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_request"
    r = gw.request("POST", "/pets/v1/pets", json={"tag": "no name"})
    assert r.status_code == 400 and r.json()["error"]["in"] == "body"
    assert gw.get("/pets/v1/pets?limit=0").status_code == 400
    assert gw.get("/pets/v1/pets/7/photos/a.gif").status_code == 400
    # an operation the document does not have is no route at all
    assert gw.request("PUT", "/pets/v1/pets/7").status_code == 404
    assert up.count == seen
