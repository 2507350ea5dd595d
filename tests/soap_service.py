"""A small real SOAP service for the tests: the operations of ``tests/soap/orders.wsdl``,
over SOAP 1.1 (``/soap/v1``) and SOAP 1.2 (``/soap/v2``), built with lxml.

Every request is recorded whole (path, headers, body) before it is answered. The service is
strict about what SOAP requires: the envelope's namespace must be the one of the endpoint's
SOAP version, a SOAP 1.1 request needs ``text/xml`` and a ``SOAPAction`` header, a SOAP 1.2
one ``application/soap+xml``; anything else gets a fault.

Operations: ``Echo(text, times)`` repeats the text (``text`` "boom" gives a server fault,
"garbage" a non-XML answer); ``CreateOrder(order)`` stores an order and answers its id, total
and creation date; ``GetOrder(id, withItems?)`` answers a stored order, or a client fault
with an ``OrderFault`` detail for an unknown id.
"""

from __future__ import annotations

import socketserver
import threading
from dataclasses import dataclass
from decimal import Decimal
from http.server import BaseHTTPRequestHandler

from lxml import etree

TNS = "urn:example:orders"
SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
ENDPOINTS = {"/soap/v1": SOAP11, "/soap/v2": SOAP12}
CREATED = "2026-01-02"


@dataclass
class Call:
    path: str
    headers: dict[str, str]
    body: bytes

    @property
    def envelope(self) -> etree._Element:
        return etree.fromstring(self.body)

    def operation(self) -> etree._Element:
        """The first element of the SOAP body."""
        body = self.envelope.find(f"{{{ENDPOINTS[self.path]}}}Body")
        assert body is not None
        return body[0]


class _Fault(Exception):
    def __init__(self, client: bool, message: str, detail: etree._Element | None = None):
        super().__init__(message)
        self.client = client
        self.detail = detail


def _q(name: str) -> str:
    return f"{{{TNS}}}{name}"


def _text(parent: etree._Element, name: str) -> str | None:
    return parent.findtext(_q(name))


def _sub(parent: etree._Element, name: str, value: object) -> etree._Element:
    el = etree.SubElement(parent, _q(name))
    el.text = str(value)
    return el


class SoapService:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.orders: dict[int, etree._Element] = {}
        self._lock = threading.Lock()
        service = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, format: str, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("content-length", "0")))
                call = Call(self.path, {k.lower(): v for k, v in self.headers.items()}, body)
                with service._lock:
                    service.calls.append(call)
                status, ctype, out = service.answer(call)
                self.send_response(status)
                self.send_header("content-type", ctype)
                self.send_header("content-length", str(len(out)))
                self.send_header("x-service", "orders")
                self.end_headers()
                self.wfile.write(out)

            def do_GET(self) -> None:
                self.send_response(405)
                self.send_header("content-length", "0")
                self.end_headers()

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self._server = Server(("127.0.0.1", 0), Handler)
        self.port = self._server.server_address[1]
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    # -- SOAP ------------------------------------------------------------------------------
    def answer(self, call: Call) -> tuple[int, str, bytes]:
        env_ns = ENDPOINTS.get(call.path)
        if env_ns is None:
            return 404, "text/plain", b"no such endpoint"
        ctype = "text/xml" if env_ns == SOAP11 else "application/soap+xml"
        try:
            self._check_transport(call, env_ns)
            try:
                envelope = etree.fromstring(call.body)
            except etree.XMLSyntaxError as e:
                raise _Fault(True, f"not XML: {e}") from None
            if envelope.tag != f"{{{env_ns}}}Envelope":
                raise _Fault(True, f"not a SOAP envelope of this version: {envelope.tag}")
            body = envelope.find(f"{{{env_ns}}}Body")
            if body is None or len(body) != 1:
                raise _Fault(True, "the body must hold one element")
            request = body[0]
            if request.tag == _q("Echo") and _text(request, "text") == "garbage":
                return 200, "text/plain", b"this is not XML"
            result = self._dispatch(request)
        except _Fault as f:
            return self._fault(env_ns, ctype, f)
        envelope = etree.Element(f"{{{env_ns}}}Envelope", nsmap={"soap": env_ns, "o": TNS})
        etree.SubElement(envelope, f"{{{env_ns}}}Body").append(result)
        return 200, f"{ctype}; charset=utf-8", etree.tostring(envelope, xml_declaration=True)

    @staticmethod
    def _check_transport(call: Call, env_ns: str) -> None:
        ctype = call.headers.get("content-type", "")
        if env_ns == SOAP11:
            if not ctype.startswith("text/xml") or "soapaction" not in call.headers:
                raise _Fault(True, "SOAP 1.1 needs text/xml and a SOAPAction header")
        elif not ctype.startswith("application/soap+xml"):
            raise _Fault(True, "SOAP 1.2 needs application/soap+xml")

    def _dispatch(self, request: etree._Element) -> etree._Element:
        name = etree.QName(request).localname
        if name == "Echo":
            text = _text(request, "text") or ""
            if text == "boom":
                raise _Fault(False, "the echo chamber exploded")
            times = int(_text(request, "times") or "0")
            out = etree.Element(_q("EchoResponse"))
            _sub(out, "result", text * times)
            _sub(out, "length", len(text) * times)
            return out
        if name == "CreateOrder":
            order = request.find(_q("order"))
            assert order is not None
            total = sum(
                (
                    int(_text(item, "qty") or "0") * Decimal(_text(item, "price") or "0")
                    for item in order.findall(_q("items"))
                ),
                Decimal(0),
            )
            with self._lock:
                oid = len(self.orders) + 1
                self.orders[oid] = order
            out = etree.Element(_q("CreateOrderResponse"))
            _sub(out, "id", oid)
            _sub(out, "total", total)
            _sub(out, "created", CREATED)
            return out
        if name == "GetOrder":
            oid = int(_text(request, "id") or "0")
            stored = self.orders.get(oid)
            if stored is None:
                detail = etree.Element(_q("OrderFault"))
                _sub(detail, "id", oid)
                _sub(detail, "reason", "unknown order")
                raise _Fault(True, f"no order {oid}", detail)
            order = etree.fromstring(etree.tostring(stored))
            if _text(request, "withItems") in ("false", "0"):
                for item in order.findall(_q("items")):
                    order.remove(item)
            out = etree.Element(_q("GetOrderResponse"))
            out.append(order)
            return out
        raise _Fault(True, f"unknown operation {name}")

    @staticmethod
    def _fault(env_ns: str, ctype: str, f: _Fault) -> tuple[int, str, bytes]:
        envelope = etree.Element(f"{{{env_ns}}}Envelope", nsmap={"soap": env_ns})
        body = etree.SubElement(envelope, f"{{{env_ns}}}Body")
        fault = etree.SubElement(body, f"{{{env_ns}}}Fault")
        if env_ns == SOAP11:
            code = "soap:Client" if f.client else "soap:Server"
            etree.SubElement(fault, "faultcode").text = code
            etree.SubElement(fault, "faultstring").text = str(f)
            if f.detail is not None:
                etree.SubElement(fault, "detail").append(f.detail)
            status = 500
        else:
            code_el = etree.SubElement(fault, f"{{{env_ns}}}Code")
            value = etree.SubElement(code_el, f"{{{env_ns}}}Value")
            value.text = "soap:" + ("Sender" if f.client else "Receiver")
            reason = etree.SubElement(fault, f"{{{env_ns}}}Reason")
            text = etree.SubElement(reason, f"{{{env_ns}}}Text")
            text.set("{http://www.w3.org/XML/1998/namespace}lang", "en")
            text.text = str(f)
            if f.detail is not None:
                etree.SubElement(fault, f"{{{env_ns}}}Detail").append(f.detail)
            status = 400 if f.client else 500
        return status, f"{ctype}; charset=utf-8", etree.tostring(envelope, xml_declaration=True)
