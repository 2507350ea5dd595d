//! X-Request-Id, X-Forwarded-For, -Proto, -Host and Via: the fields every request takes
//! upstream.
//!
//! They are written into the head as it goes out (`h1client`), not inserted in the request's
//! header map: hashing and inserting names the `http` crate does not know took 1.5k of a
//! proxied request's 21k instructions (callgrind). Requests that leave as a map (HTTP/2
//! upstreams, mirrored copies, cache refreshes) get them through [`Forwarding::apply`].
//! Both ways give the same fields: our request id (replacing any other), the client's
//! X-Forwarded-For values folded into one list with the client's address last, our
//! X-Forwarded-Proto, the client's X-Forwarded-Host or else its Host, and our Via after any
//! the client sent.

use crate::filters::via_value;
use crate::headers::{
    append_forwarded_for, X_FORWARDED_FOR, X_FORWARDED_HOST, X_FORWARDED_PROTO, X_REQUEST_ID,
};
use crate::phase::RequestCtx;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};

#[derive(Clone, Debug)]
pub struct Forwarding {
    pub request_id: HeaderValue,
    pub client_ip: HeaderValue,
    /// `http` or `https`: how the client reached the gateway.
    pub proto: &'static str,
    /// The Host the client asked for (its `:authority` over HTTP/2).
    pub host: Option<HeaderValue>,
    /// `1.1 ferrogate` or `2 ferrogate`, after the client's protocol version.
    pub via: HeaderValue,
}

/// A field of the request's own that one of ours replaces or joins.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Field {
    RequestId,
    For,
    Proto,
    Host,
}

impl Field {
    /// Which of ours `name` is, if any (most names are told apart by their length alone).
    fn of(name: &HeaderName) -> Option<Field> {
        let s = name.as_str();
        if !s.starts_with("x-") {
            return None;
        }
        match s.len() {
            12 if *name == X_REQUEST_ID => Some(Field::RequestId),
            15 if *name == X_FORWARDED_FOR => Some(Field::For),
            16 if *name == X_FORWARDED_HOST => Some(Field::Host),
            17 if *name == X_FORWARDED_PROTO => Some(Field::Proto),
            _ => None,
        }
    }
}

impl Forwarding {
    pub fn new(
        request_id: HeaderValue,
        client_ip: HeaderValue,
        proto: &'static str,
        host: Option<HeaderValue>,
        version: http::Version,
    ) -> Self {
        Forwarding {
            request_id,
            client_ip,
            proto,
            host,
            via: via_value(version),
        }
    }

    /// The fields for the request `ctx` describes.
    pub fn of(ctx: &RequestCtx) -> Self {
        Forwarding::new(
            ctx.request_id.clone(),
            ctx.client_ip.clone(),
            ctx.scheme,
            ctx.host.clone(),
            ctx.version,
        )
    }

    /// The fields inserted in `headers` (a request that goes upstream as a map).
    pub fn apply(&self, headers: &mut HeaderMap) {
        headers.insert(&X_REQUEST_ID, self.request_id.clone());
        append_forwarded_for(headers, &self.client_ip);
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static(self.proto));
        if let (header::Entry::Vacant(e), Some(h)) = (headers.entry(&X_FORWARDED_HOST), &self.host) {
            e.insert(h.clone());
        }
        headers.append(header::VIA, self.via.clone());
    }

    /// The fields as head lines, after the request's own (`headers`) but its X-Request-Id,
    /// X-Forwarded-For and -Proto; `seen`: which of [`Field`] the request had.
    fn write(&self, headers: &HeaderMap, seen: Seen, out: &mut Vec<u8>) {
        out.extend_from_slice(b"x-request-id: ");
        out.extend_from_slice(self.request_id.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-for: ");
        if seen.forwarded_for {
            for v in headers.get_all(&X_FORWARDED_FOR) {
                out.extend_from_slice(v.as_bytes());
                out.extend_from_slice(b", ");
            }
        }
        out.extend_from_slice(self.client_ip.as_bytes());
        out.extend_from_slice(b"\r\nx-forwarded-proto: ");
        out.extend_from_slice(self.proto.as_bytes());
        out.extend_from_slice(b"\r\n");
        if let (false, Some(h)) = (seen.host, &self.host) {
            out.extend_from_slice(b"x-forwarded-host: ");
            out.extend_from_slice(h.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"via: ");
        out.extend_from_slice(self.via.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
}

/// Which of the fields the request brought.
#[derive(Clone, Copy, Default, Debug)]
struct Seen {
    forwarded_for: bool,
    host: bool,
}

/// The request's fields as head lines (but Content-Length: framing is the writer's to
/// state), then ours when `forwarding` is given.
pub fn write_fields(headers: &HeaderMap, forwarding: Option<&Forwarding>, out: &mut Vec<u8>) {
    let mut seen = Seen::default();
    for (name, value) in headers {
        if name == header::CONTENT_LENGTH {
            continue;
        }
        if forwarding.is_some() {
            match Field::of(name) {
                Some(Field::For) => {
                    seen.forwarded_for = true;
                    continue;
                }
                Some(Field::RequestId | Field::Proto) => continue,
                Some(Field::Host) => seen.host = true,
                None => {}
            }
        }
        out.extend_from_slice(name.as_str().as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value.as_bytes());
        out.extend_from_slice(b"\r\n");
    }
    if let Some(f) = forwarding {
        f.write(headers, seen, out);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(fwd: &Forwarding, headers: &HeaderMap) -> String {
        let mut out = Vec::new();
        write_fields(headers, Some(fwd), &mut out);
        String::from_utf8(out).unwrap()
    }

    /// The head's fields, name by name in order of first appearance, values joined.
    fn fields(head: &str) -> Vec<(String, String)> {
        let mut map = HeaderMap::new();
        for line in head.split("\r\n").filter(|l| !l.is_empty()) {
            let (n, v) = line.split_once(": ").unwrap();
            map.append(
                HeaderName::from_bytes(n.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        as_fields(&map)
    }

    fn as_fields(map: &HeaderMap) -> Vec<(String, String)> {
        let mut out: Vec<(String, String)> = map
            .keys()
            .map(|k| {
                let values: Vec<&str> = map.get_all(k).iter().map(|v| v.to_str().unwrap()).collect();
                (k.to_string(), values.join(" | "))
            })
            .collect();
        out.sort();
        out
    }

    fn fwd(host: Option<&'static str>, version: http::Version) -> Forwarding {
        Forwarding::new(
            HeaderValue::from_static("0123456789abcdef"),
            HeaderValue::from_static("10.1.2.3"),
            "https",
            host.map(HeaderValue::from_static),
            version,
        )
    }

    #[test]
    fn field_names_are_told_apart() {
        assert_eq!(Field::of(&X_FORWARDED_FOR), Some(Field::For));
        assert_eq!(Field::of(&X_FORWARDED_PROTO), Some(Field::Proto));
        assert_eq!(Field::of(&X_FORWARDED_HOST), Some(Field::Host));
        assert_eq!(Field::of(&X_REQUEST_ID), Some(Field::RequestId));
        for other in [
            "x-request-ip",
            "x-correlation-id",
            "x-forwarded-port",
            "x-forwarded-prefix",
            "x-forwarded",
            "host",
            "via",
            "forwarded",
        ] {
            assert_eq!(Field::of(&HeaderName::from_static(other)), None, "{other}");
        }
    }

    #[test]
    fn written_and_applied_give_the_same_fields() {
        let cases: Vec<(Vec<(&str, &str)>, Option<&'static str>, http::Version)> = vec![
            (vec![("accept", "*/*")], Some("api.test"), http::Version::HTTP_11),
            (vec![], None, http::Version::HTTP_2),
            (
                vec![
                    ("x-forwarded-for", "192.0.2.1"),
                    ("accept", "*/*"),
                    ("x-forwarded-for", "192.0.2.2, 192.0.2.3"),
                    ("x-forwarded-proto", "http"),
                    ("x-forwarded-host", "outer.test"),
                    ("via", "1.0 edge"),
                    ("x-request-id", "from-the-client"),
                ],
                Some("api.test"),
                http::Version::HTTP_11,
            ),
        ];
        for (fields_in, host, version) in cases {
            let mut headers = HeaderMap::new();
            for (n, v) in &fields_in {
                headers.append(HeaderName::from_static(n), HeaderValue::from_static(v));
            }
            let f = fwd(host, version);
            let written = fields(&head_of(&f, &headers));
            let mut applied = headers.clone();
            f.apply(&mut applied);
            assert_eq!(written, as_fields(&applied), "{fields_in:?}");
        }
    }

    #[test]
    fn the_client_list_comes_first_and_its_host_is_kept() {
        let mut headers = HeaderMap::new();
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.1"));
        headers.append(&X_FORWARDED_FOR, HeaderValue::from_static("192.0.2.2"));
        headers.insert(&X_FORWARDED_PROTO, HeaderValue::from_static("http"));
        headers.insert(&X_FORWARDED_HOST, HeaderValue::from_static("outer.test"));
        let head = head_of(&fwd(Some("api.test"), http::Version::HTTP_11), &headers);
        assert!(
            head.contains("x-forwarded-for: 192.0.2.1, 192.0.2.2, 10.1.2.3\r\n"),
            "{head}"
        );
        assert!(head.contains("x-forwarded-proto: https\r\n"), "{head}");
        assert!(!head.contains("proto: http\r\n"), "{head}");
        assert!(head.contains("x-forwarded-host: outer.test\r\n"), "{head}");
        assert!(!head.contains("api.test"), "{head}");
        assert!(head.ends_with("via: 1.1 ferrogate\r\n"), "{head}");
    }
}
