"""The soap plugin through a real gateway, in front of a real SOAP service (tests/soap_service.py,
SOAP 1.1 and 1.2 ports of tests/soap/orders.wsdl): JSON requests become the envelopes the
service expects, replies and faults come back as JSON, and requests that do not fit the
operation's input are refused before the service sees them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
import zeep
from lxml import etree

from gateway import Gateway, GatewayFactory, run_cli
from soap_service import SOAP11, SOAP12, TNS, SoapService

WSDL = str(Path(__file__).parent / "soap" / "orders.wsdl")
REST = [
    {"method": "POST", "path": "/shop/orders", "operation": "CreateOrder"},
    {"method": "GET", "path": "/shop/orders/{id}", "operation": "GetOrder"},
    {"method": "POST", "path": "/shop/echo", "operation": "Echo"},
]
ORDER = {
    "customer": "Ada",
    "items": [
        {"sku": "A-1", "qty": 2, "price": "1.25"},
        {"sku": "B-2", "qty": 1, "price": 0.5},
    ],
    "deliverOn": "2026-03-04",
}


@pytest.fixture
def service() -> Iterator[SoapService]:
    svc = SoapService()
    yield svc
    svc.close()


@pytest.fixture
def gw(gateway: GatewayFactory, service: SoapService) -> Gateway:
    def soap(prefix: str, **config: Any) -> dict[str, Any]:
        return {
            "paths": [f"{prefix}/*"],
            "upstream": service.url,
            "plugins": [{"name": "soap", "config": {"wsdl": WSDL, **config}}],
        }

    return gateway(
        {
            "routes": [
                soap("/shop", operations=REST),
                soap("/v12", port="OrdersSoap12Port"),
                soap("/byname"),
            ]
        },
        workers=1,
    )


def q(name: str) -> str:
    return f"{{{TNS}}}{name}"


def test_the_service_is_real_soap(service: SoapService) -> None:
    """A zeep client, talking to the service directly over both bindings."""
    client = zeep.Client(WSDL)
    for port, path in (("OrdersSoap11Port", "/soap/v1"), ("OrdersSoap12Port", "/soap/v2")):
        proxy = client.create_service(f"{{{TNS}}}{port.replace('Port', '')}", service.url + path)
        assert proxy.Echo(text="ab", times=2).result == "abab"
        created = proxy.CreateOrder(order=ORDER)
        assert str(created.total) == "3.00"
        assert proxy.GetOrder(id=created.id).customer == "Ada"
        with pytest.raises(zeep.exceptions.Fault, match="no order 99"):
            proxy.GetOrder(id=99)


def test_simple_operation_with_strings_and_ints(gw: Gateway, service: SoapService) -> None:
    r = httpx.post(gw.url + "/shop/echo", json={"text": "hé", "times": 3})
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "application/json"
    assert r.json() == {"result": "héhéhé", "length": 6}
    assert r.headers["x-service"] == "orders"  # the service's own headers come along

    (call,) = service.calls
    assert call.path == "/soap/v1"  # the soap:address path, not the client's
    assert call.headers["content-type"] == "text/xml; charset=utf-8"
    assert call.headers["soapaction"] == '"urn:example:orders/Echo"'
    assert "accept-encoding" not in call.headers
    env = call.envelope
    assert env.tag == f"{{{SOAP11}}}Envelope"
    op = call.operation()
    assert op.tag == q("Echo")
    assert [(etree.QName(c).localname, c.text) for c in op] == [("text", "hé"), ("times", "3")]


def test_nested_repeated_optional_dates_and_decimals(gw: Gateway, service: SoapService) -> None:
    r = httpx.post(gw.url + "/shop/orders", json={"order": ORDER})
    assert r.status_code == 200, r.text
    assert r.json() == {"id": 1, "total": "3.00", "created": "2026-01-02"}
    order = service.calls[-1].operation().find(q("order"))
    assert order is not None
    assert [i.findtext(q("sku")) for i in order.findall(q("items"))] == ["A-1", "B-2"]
    assert [i.findtext(q("price")) for i in order.findall(q("items"))] == ["1.25", "0.5"]
    assert order.find(q("note")) is None  # optional and not given: not sent

    # GET with a path parameter and a query parameter, both typed through the XSD.
    r = httpx.get(gw.url + "/shop/orders/1?withItems=true")
    assert r.status_code == 200, r.text
    assert r.json() == {
        "customer": "Ada",
        "items": [
            {"sku": "A-1", "qty": 2, "price": "1.25"},
            {"sku": "B-2", "qty": 1, "price": "0.5"},
        ],
        "note": None,
        "deliverOn": "2026-03-04",
    }
    call = service.calls[-1]
    assert call.headers["soapaction"] == '"urn:example:orders/GetOrder"'
    op = call.operation()
    assert (op.findtext(q("id")), op.findtext(q("withItems"))) == ("1", "true")

    r = httpx.get(gw.url + "/shop/orders/1?withItems=false")
    assert r.status_code == 200, r.text
    assert r.json()["items"] == []


def test_faults_become_json_errors(gw: Gateway, service: SoapService) -> None:
    r = httpx.get(gw.url + "/shop/orders/42")
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["code"] == "soap_fault"
    assert err["request_id"] == r.headers["x-request-id"]
    assert err["message"] == "no order 42"
    assert err["fault"] == {
        "code": "soap:Client",
        "message": "no order 42",
        "detail": {"OrderFault": {"id": "42", "reason": "unknown order"}},
    }

    r = httpx.post(gw.url + "/shop/echo", json={"text": "boom", "times": 1})
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert (err["status"], err["code"]) == (502, "soap_fault")
    assert err["fault"]["code"] == "soap:Server"
    assert err["fault"]["message"] == "the echo chamber exploded"

    r = httpx.post(gw.url + "/shop/echo", json={"text": "garbage", "times": 1})
    assert r.status_code == 502, r.text
    err = r.json()["error"]
    assert err["code"] == "soap_bad_response"
    assert "not XML" in err["message"]
    assert len(service.calls) == 3


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "code", "where", "field", "words"),
    [
        ("POST", "/shop/echo", {"text": "x"}, 400, "invalid_request", "body", "times", "required"),
        (
            "POST",
            "/shop/echo",
            {"text": "x", "times": "3"},
            400,
            "invalid_request",
            "body",
            "times",
            "integer",
        ),
        (
            "POST",
            "/shop/echo",
            {"text": 5, "times": 1},
            400,
            "invalid_request",
            "body",
            "text",
            "string",
        ),
        (
            "POST",
            "/shop/echo",
            {"text": "x", "times": 1, "loud": True},
            400,
            "invalid_request",
            "body",
            "loud",
            "not a field",
        ),
        (
            "POST",
            "/shop/orders",
            {"order": {**ORDER, "items": [{"sku": "A", "qty": 1, "price": "1,5"}]}},
            400,
            "invalid_request",
            "body",
            "order.items[0].price",
            "decimal",
        ),
        (
            "POST",
            "/shop/orders",
            {"order": {**ORDER, "deliverOn": "tomorrow"}},
            400,
            "invalid_request",
            "body",
            "order.deliverOn",
            "date",
        ),
        (
            "POST",
            "/shop/orders",
            {"order": {"items": []}},
            400,
            "invalid_request",
            "body",
            "order.customer",
            "required",
        ),
        ("GET", "/shop/orders/seven", None, 400, "invalid_request", "path", "id", "integer"),
        (
            "GET",
            "/shop/orders/1?withItems=maybe",
            None,
            400,
            "invalid_request",
            "query",
            "withItems",
            "true or false",
        ),
        (
            "GET",
            "/shop/orders/1?color=red",
            None,
            400,
            "invalid_request",
            "query",
            "color",
            "not an argument",
        ),
        ("POST", "/shop/echo", [1, 2], 400, "invalid_request", "body", "", "JSON object"),
        ("GET", "/shop/echo", None, 405, "method_not_allowed", None, None, "POST"),
        ("POST", "/shop/refunds", {}, 404, "unknown_operation", None, None, "/shop/refunds"),
    ],
)
def test_requests_that_do_not_fit_never_reach_the_service(
    gw: Gateway,
    service: SoapService,
    method: str,
    path: str,
    body: Any,
    status: int,
    code: str,
    where: str | None,
    field: str | None,
    words: str,
) -> None:
    r = httpx.request(method, gw.url + path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["code"] == code
    assert err["request_id"] == r.headers["x-request-id"]
    assert words in err["message"], err["message"]
    if where is not None:
        assert (err["in"], err["field"]) == (where, field)
    assert service.calls == []


def test_invalid_json_is_refused(gw: Gateway, service: SoapService) -> None:
    r = httpx.post(
        gw.url + "/shop/echo", content=b'{"text": ', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    assert r.json()["error"]["code"] == "invalid_json"
    assert service.calls == []


def test_soap_12_binding(gw: Gateway, service: SoapService) -> None:
    """Without ``operations``, the last path segment names the operation."""
    r = httpx.post(gw.url + "/v12/Echo", json={"text": "ok", "times": 2})
    assert r.status_code == 200, r.text
    assert r.json() == {"result": "okok", "length": 4}
    call = service.calls[-1]
    assert call.path == "/soap/v2"
    assert call.headers["content-type"] == (
        'application/soap+xml; charset=utf-8; action="urn:example:orders/Echo"'
    )
    assert "soapaction" not in call.headers
    assert call.envelope.tag == f"{{{SOAP12}}}Envelope"

    r = httpx.post(gw.url + "/v12/GetOrder", json={"id": 5})
    assert r.status_code == 400, r.text
    fault = r.json()["error"]["fault"]
    assert (fault["code"], fault["message"]) == ("soap:Sender", "no order 5")
    assert fault["detail"] == {"OrderFault": {"id": "5", "reason": "unknown order"}}

    r = httpx.post(gw.url + "/v12/Echo", json={"text": "boom", "times": 1})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["fault"]["code"] == "soap:Receiver"

    r = httpx.post(gw.url + "/byname/CreateOrder", json={"order": ORDER})
    assert r.status_code == 200, r.text
    assert r.json()["total"] == "3.00"
    assert service.calls[-1].path == "/soap/v1"  # the first port: SOAP 1.1

    n = len(service.calls)
    r = httpx.post(gw.url + "/byname/Refund", json={})
    assert r.status_code == 404, r.text
    assert "Refund" in r.json()["error"]["message"]
    assert len(service.calls) == n


def test_upstream_errors_keep_the_gateway_shape(gateway: GatewayFactory) -> None:
    """The service unreachable: the gateway's own 502 passes through the plugin as it is."""
    gw = gateway(
        {
            "routes": [
                {
                    "paths": ["/*"],
                    "upstream": "http://127.0.0.1:9",
                    "plugins": [{"name": "soap", "config": {"wsdl": WSDL}}],
                }
            ]
        },
        workers=1,
    )
    r = httpx.post(gw.url + "/Echo", json={"text": "x", "times": 1})
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_unreachable"


def check(tmp_path: Path, config: dict[str, Any]) -> str:
    doc = {
        "listen": ["127.0.0.1:1"],
        "routes": [
            {
                "paths": ["/*"],
                "upstream": "http://127.0.0.1:9",
                "plugins": [{"name": "soap", "config": config}],
            }
        ],
    }
    path = tmp_path / "gateway.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    out = run_cli("check", str(path))
    assert out.returncode != 0, out.stdout
    return out.stdout + out.stderr


def test_config_problems_name_the_field(tmp_path: Path) -> None:
    out = check(tmp_path, {"wsdl": WSDL, "operations": [{"path": "/x", "operation": "Nope"}]})
    assert "gateway.yaml:" in out
    assert "operations[0].operation: no operation 'Nope'" in out
    assert "Echo" in out  # the known ones are listed

    out = check(tmp_path, {"wsdl": WSDL, "service": "Shop"})
    assert "service: no service 'Shop'" in out and "OrderService" in out

    out = check(tmp_path, {"wsdl": WSDL, "port": "Nope"})
    assert "port: no SOAP port 'Nope'" in out

    out = check(
        tmp_path,
        {"wsdl": WSDL, "operations": [{"path": "/o/{oid}", "operation": "GetOrder"}]},
    )
    assert "operations[0].path: {oid} is not an argument of GetOrder" in out

    out = check(tmp_path, {"wsdl": str(tmp_path / "missing.wsdl")})
    assert "wsdl: no such file" in out


def test_wsdl_imports_are_never_fetched(tmp_path: Path) -> None:
    """A schema imported from a URL is a load error, not a download (the URL points at a
    listener that records any connection)."""
    import socket
    import threading

    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.2)
    port = listener.getsockname()[1]
    hits: list[object] = []
    stop = threading.Event()

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                continue
            hits.append(conn)
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        schema = '<xsd:schema targetNamespace="urn:example:orders" elementFormDefault="qualified">'
        remote_xsd = f"http://127.0.0.1:{port}/x.xsd"
        imported = f'<xsd:import namespace="urn:remote" schemaLocation="{remote_xsd}"/>'
        text = Path(WSDL).read_text().replace(schema, schema + imported)
        remote = tmp_path / "remote.wsdl"
        remote.write_text(text)
        out = check(tmp_path, {"wsdl": str(remote)})
        assert f"refers to {remote_xsd}, which is not a local file" in out, out
    finally:
        stop.set()
        thread.join()
        listener.close()
    assert hits == []
