//! Built-in filters that every route runs.

use crate::error::{ErrorKind, GatewayError};
use crate::phase::{Filter, RequestCtx};
use http::{header, request, HeaderValue};

static VIA_H1: HeaderValue = HeaderValue::from_static("1.1 ferrogate");
static VIA_H2: HeaderValue = HeaderValue::from_static("2 ferrogate");

/// The client IP as a header value, IPv4-mapped IPv6 addresses shown as IPv4.
pub fn client_ip_value(addr: &std::net::SocketAddr) -> HeaderValue {
    let ip = match addr.ip() {
        std::net::IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(addr.ip(), std::net::IpAddr::V4),
        ip => ip,
    };
    HeaderValue::from_str(&ip.to_string()).expect("an IP address is a valid header value")
}

pub fn via_value(version: http::Version) -> HeaderValue {
    if version == http::Version::HTTP_2 {
        VIA_H2.clone()
    } else {
        VIA_H1.clone()
    }
}

/// Refuses a declared body above `limits.max_body_bytes` before anything is forwarded;
/// streamed bodies are counted in [`crate::body::RequestBody`].
pub struct BodyLimit(pub u64);

impl Filter for BodyLimit {
    fn name(&self) -> &'static str {
        "body-limit"
    }

    fn access(&self, _ctx: &mut RequestCtx, req: &request::Parts) -> Result<(), GatewayError> {
        let declared = req
            .headers
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        match declared {
            Some(n) if n > self.0 => Err(GatewayError::new(
                ErrorKind::BodyTooLarge,
                format!("request body of {n} bytes is above the limit of {} bytes", self.0),
            )),
            _ => Ok(()),
        }
    }
}
