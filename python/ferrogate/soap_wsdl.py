"""A WSDL 1.1 document read with zeep, offline: the documents it imports are read from local
files only (never fetched over the network, at load time or later), and the service's
operations turned into envelopes and their replies back into values or faults."""

import os
from dataclasses import dataclass
from typing import Any, cast
from urllib.parse import unquote, urlparse

import zeep
from lxml import etree
from zeep.exceptions import ExternalReferenceForbidden, Fault
from zeep.loader import parse_xml
from zeep.transports import Transport
from zeep.wsdl.bindings.soap import Soap12Binding, SoapBinding

__all__ = ["LocalTransport", "Reply", "SoapFault", "SoapService", "load_service"]

SOAP11_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12_ENV = "http://www.w3.org/2003/05/soap-envelope"


class LocalTransport(Transport):
    """Reads the WSDL and its imports from local files; anything remote is refused, so a
    schema that is not shipped beside the WSDL is a load error rather than a download."""

    def __init__(self) -> None:
        super().__init__(timeout=1, operation_timeout=1)

    def load(self, url: str) -> bytes:
        parsed = urlparse(url)
        if parsed.scheme in ("", "file"):
            path = unquote(parsed.path) if parsed.scheme == "file" else url
            with open(os.path.expanduser(path), "rb") as f:
                return f.read()
        raise ValueError(
            f"{url} is not a local file: the WSDL and the schemas it imports are read from "
            "local files only (save a copy beside the WSDL and point the import there)"
        )

    def post(self, address: str, message: Any, headers: Any) -> Any:
        raise RuntimeError("the gateway's SOAP documents never send requests themselves")

    def _load_remote_data(self, url: str) -> bytes:
        raise ValueError(f"{url}: remote documents are not fetched")


_SETTINGS = zeep.Settings(strict=True, forbid_dtd=True, forbid_entities=True, forbid_external=True)


@dataclass
class SoapFault(Exception):
    """A fault the service answered with."""

    code: str
    message: str
    detail: Any
    """The fault's detail element (lxml), or None."""
    subcodes: list[str]

    @property
    def from_client(self) -> bool:
        """Whether the service blames the request (SOAP 1.1 Client, 1.2 Sender)."""
        local = self.code.rpartition(":")[2].split(".")[0]
        return local in ("Client", "Sender")


@dataclass(frozen=True)
class Reply:
    value: Any


@dataclass
class SoapService:
    """One port of a WSDL service: its binding, operations and endpoint."""

    binding: SoapBinding
    address: str
    """The port's soap:address location."""
    transport: LocalTransport

    @property
    def version(self) -> str:
        return "1.2" if isinstance(self.binding, Soap12Binding) else "1.1"

    @property
    def envelope_ns(self) -> str:
        return SOAP12_ENV if self.version == "1.2" else SOAP11_ENV

    def operations(self) -> list[str]:
        return list(self.binding.all())

    def operation(self, name: str) -> Any:
        """The binding's operation ``name``, or None."""
        return self.binding.all().get(name)

    def request(self, name: str, args: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The envelope for operation ``name`` called with ``args``, and the HTTP headers
        its SOAP version asks for (SOAP 1.1: text/xml and SOAPAction; SOAP 1.2:
        application/soap+xml with the action as a media type parameter)."""
        op = self.binding.get(name)
        message = op.create(**args)
        body = etree.tostring(message.content, xml_declaration=True, encoding="utf-8")
        action = op.soapaction or ""
        if self.version == "1.2":
            ctype = "application/soap+xml; charset=utf-8"
            if action:
                ctype += f'; action="{action}"'
            return body, {"content-type": ctype}
        return body, {"content-type": "text/xml; charset=utf-8", "soapaction": f'"{action}"'}

    def reply(self, name: str, status: int, content: bytes) -> Reply:
        """The operation's output from the service's answer. Raises SoapFault for a fault,
        ValueError for anything that is not this SOAP version's answer."""
        op = self.binding.get(name)
        try:
            # Annotated as str, parsed by lxml: bytes keep the document's own encoding.
            doc = parse_xml(cast(str, content), self.transport, settings=_SETTINGS)
        except Exception as e:  # zeep's XMLSyntaxError, lxml's and defusedxml-style refusals
            raise ValueError(f"the answer is not XML ({_first_line(e)})") from None
        if doc.tag != f"{{{self.envelope_ns}}}Envelope":
            raise ValueError(
                f"the answer is not a SOAP {self.version} envelope (root element {doc.tag})"
            )
        fault = doc.find(f"{{{self.envelope_ns}}}Body/{{{self.envelope_ns}}}Fault")
        if fault is not None:
            try:
                self.binding.process_error(doc, op)
            except Fault as f:
                raise SoapFault(
                    code=f.code or "",
                    message=f.message or "",
                    detail=f.detail if isinstance(f.detail, etree._Element) else None,
                    subcodes=[str(getattr(s, "text", s)) for s in (f.subcodes or [])],
                ) from None
        if status != 200:
            raise ValueError(f"the service answered status {status} without a SOAP fault")
        try:
            return Reply(op.process_reply(doc))
        except Exception as e:
            raise ValueError(
                f"the answer does not fit {name}'s output ({_first_line(e)})"
            ) from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:200]


def load_service(wsdl: str, service: str | None, port: str | None) -> SoapService:
    """The chosen (else the first) service and SOAP port of ``wsdl``; ValueError naming the
    setting when the document, the service or the port is not usable."""
    if not os.path.isfile(wsdl):
        raise ValueError(f"wsdl: no such file {wsdl}")
    transport = LocalTransport()
    try:
        client = zeep.Client(os.path.abspath(wsdl), transport=transport, settings=_SETTINGS)
    except ExternalReferenceForbidden as e:
        raise ValueError(
            f"wsdl: {wsdl} refers to {e.url}, which is not a local file: imported documents "
            "are read from local files only (save a copy and point the import there)"
        ) from None
    except Exception as e:
        raise ValueError(f"wsdl: cannot read {wsdl}: {_first_line(e)}") from None
    services = client.wsdl.services
    if not services:
        raise ValueError(f"wsdl: {wsdl} defines no service")
    if service is None:
        svc = next(iter(services.values()))
    elif service in services:
        svc = services[service]
    else:
        raise ValueError(
            f"service: no service {service!r} in the WSDL (it has {', '.join(services)})"
        )
    soap_ports = {n: p for n, p in svc.ports.items() if isinstance(p.binding, SoapBinding)}
    if port is None:
        if not soap_ports:
            raise ValueError(f"service: {svc.name} has no SOAP port")
        chosen = next(iter(soap_ports.values()))
    elif port in soap_ports:
        chosen = soap_ports[port]
    else:
        raise ValueError(
            f"port: no SOAP port {port!r} in service {svc.name} (it has {', '.join(soap_ports)})"
        )
    address = (chosen.binding_options or {}).get("address") or ""
    return SoapService(chosen.binding, address, transport)
