//! gRPC over the proxy: which requests are gRPC calls, the status of answers the gateway
//! makes itself (as "trailers-only" responses), and deadlines (`grpc-timeout`).
//!
//! Status codes follow gRPC's doc/statuscodes.md; an upstream's non-gRPC HTTP error maps by
//! doc/http-grpc-status-mapping.md, the gateway's own errors by what they mean (a missing
//! credential is UNAUTHENTICATED, a spent rate limit RESOURCE_EXHAUSTED, ...).

use http::{header, HeaderMap, HeaderName, HeaderValue, StatusCode};
use std::time::{Duration, Instant};

pub const GRPC_STATUS: HeaderName = HeaderName::from_static("grpc-status");
pub const GRPC_MESSAGE: HeaderName = HeaderName::from_static("grpc-message");
pub const GRPC_TIMEOUT: HeaderName = HeaderName::from_static("grpc-timeout");

pub const OK: u32 = 0;
pub const UNKNOWN: u32 = 2;
pub const INVALID_ARGUMENT: u32 = 3;
pub const DEADLINE_EXCEEDED: u32 = 4;
pub const PERMISSION_DENIED: u32 = 7;
pub const RESOURCE_EXHAUSTED: u32 = 8;
pub const UNIMPLEMENTED: u32 = 12;
pub const INTERNAL: u32 = 13;
pub const UNAVAILABLE: u32 = 14;
pub const UNAUTHENTICATED: u32 = 16;

/// Whether `headers` (a request's or a response's) say gRPC: `application/grpc`,
/// `application/grpc+proto`, ... but not gRPC-Web.
pub fn is_grpc(headers: &HeaderMap) -> bool {
    headers
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| is_grpc_type(v.as_bytes()))
}

fn is_grpc_type(v: &[u8]) -> bool {
    let Some(rest) = v.strip_prefix(b"application/grpc") else {
        return false;
    };
    rest.is_empty() || rest[0] == b'+' || rest[0] == b';'
}

/// A gRPC call as the client made it: what its answers must look like, and its deadline.
#[derive(Debug, Clone, Copy)]
pub struct Call {
    /// The call came as gRPC-Web (`grpc_web.rs`) and is translated both ways.
    pub web: Option<crate::grpc_web::Web>,
    /// From the client's `grpc-timeout`, counted from when the request arrived.
    pub deadline: Option<Instant>,
}

impl Call {
    /// The call a request makes, if it is gRPC or gRPC-Web; None for anything else.
    pub fn of(headers: &HeaderMap) -> Option<Call> {
        let web = crate::grpc_web::Web::of(headers);
        if web.is_none() && !is_grpc(headers) {
            return None;
        }
        // The clock is read for a call with a deadline only (every request asks).
        let deadline = headers
            .get(GRPC_TIMEOUT)
            .and_then(|v| parse_timeout(v.as_bytes()))
            .and_then(|t| Instant::now().checked_add(t));
        Some(Call { web, deadline })
    }
}

/// `grpc-timeout`: at most 8 digits and a unit (H M S m u n); None when malformed.
pub fn parse_timeout(v: &[u8]) -> Option<Duration> {
    let (&unit, digits) = v.split_last()?;
    if digits.is_empty() || digits.len() > 8 || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n: u64 = std::str::from_utf8(digits).ok()?.parse().ok()?;
    Some(match unit {
        b'H' => Duration::from_secs(n * 3600),
        b'M' => Duration::from_secs(n * 60),
        b'S' => Duration::from_secs(n),
        b'm' => Duration::from_millis(n),
        b'u' => Duration::from_micros(n),
        b'n' => Duration::from_nanos(n),
        _ => return None,
    })
}

/// A `grpc-timeout` value for `d`, in the finest unit that fits 8 digits (rounded up, so a
/// remaining deadline is never announced shorter than zero).
pub fn format_timeout(d: Duration) -> HeaderValue {
    const MAX: u128 = 99_999_999;
    let ns = d.as_nanos().max(1);
    let units: [(u128, char); 6] = [
        (1, 'n'),
        (1_000, 'u'),
        (1_000_000, 'm'),
        (1_000_000_000, 'S'),
        (60_000_000_000, 'M'),
        (3_600_000_000_000, 'H'),
    ];
    for (per, unit) in units {
        let n = ns.div_ceil(per);
        if n <= MAX {
            return HeaderValue::from_str(&format!("{n}{unit}")).expect("digits and a letter");
        }
    }
    HeaderValue::from_static("99999999H")
}

/// The status of an upstream's HTTP error that carried no `grpc-status`
/// (doc/http-grpc-status-mapping.md).
pub fn status_of_upstream_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        400 => INTERNAL,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 => UNIMPLEMENTED,
        429 | 502 | 503 | 504 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// The status of an answer the gateway made itself (its errors, plugins' early answers).
pub fn status_of_gateway_http(status: StatusCode) -> u32 {
    match status.as_u16() {
        200..=299 => OK,
        400 | 411 | 414 | 431 => INVALID_ARGUMENT,
        401 => UNAUTHENTICATED,
        403 => PERMISSION_DENIED,
        404 | 405 => UNIMPLEMENTED,
        408 | 504 => DEADLINE_EXCEEDED,
        413 | 429 => RESOURCE_EXHAUSTED,
        500 => INTERNAL,
        502 | 503 => UNAVAILABLE,
        _ => UNKNOWN,
    }
}

/// `grpc-message` per the spec: UTF-8, percent-encoding every byte outside printable
/// ASCII and `%` itself.
pub fn encode_message(m: &str) -> HeaderValue {
    let mut out = String::with_capacity(m.len());
    for &b in m.as_bytes() {
        if (0x20..=0x7e).contains(&b) && b != b'%' {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    HeaderValue::from_str(&out).expect("printable ASCII")
}

/// Make `headers` those of a trailers-only response with `code` and `message`
/// (the HTTP status is then 200 and the body empty).
pub fn trailers_only(headers: &mut HeaderMap, code: u32, message: &str) {
    headers.remove(header::CONTENT_LENGTH);
    headers.remove(header::CONTENT_ENCODING);
    headers.remove(header::CONNECTION);
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/grpc"));
    headers.insert(GRPC_STATUS, HeaderValue::from(code));
    if !message.is_empty() {
        headers.insert(GRPC_MESSAGE, encode_message(message));
    }
}

/// The message of a gateway error body (`{"error": {"message": ...}}`), or of any short
/// text body.
pub fn message_of_body(body: &[u8]) -> String {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(body) {
        let m = v.pointer("/error/message").or_else(|| v.get("message"));
        if let Some(m) = m.and_then(|m| m.as_str()) {
            return m.to_string();
        }
        if let Some(m) = v.get("error").and_then(|m| m.as_str()) {
            return m.to_string();
        }
    }
    match std::str::from_utf8(body) {
        Ok(t) if t.len() <= 512 => t.trim().to_string(),
        _ => String::new(),
    }
}

/// A response for a gRPC client: one that is not gRPC already and is not a success (an
/// error the gateway made, a plugin's early answer, an upstream's HTTP error) becomes a
/// trailers-only response with the status mapped from its HTTP status and the message of
/// its body. `from_upstream`: the upstream answered (the spec's table applies).
pub async fn as_grpc<G: Unpin>(
    resp: http::Response<crate::body::ResponseBody<G>>,
    from_upstream: bool,
) -> http::Response<crate::body::ResponseBody<G>> {
    if is_grpc(resp.headers()) || resp.status().is_success() {
        return resp;
    }
    let (mut parts, body) = resp.into_parts();
    let code = if from_upstream {
        status_of_upstream_http(parts.status)
    } else {
        status_of_gateway_http(parts.status)
    };
    let message = match crate::body::collect_capped(body, 8192).await {
        Ok(Some(b)) => message_of_body(&b),
        _ => String::new(),
    };
    let message = if message.is_empty() {
        format!("HTTP status {}", parts.status.as_u16())
    } else {
        message
    };
    parts.status = StatusCode::OK;
    trailers_only(&mut parts.headers, code, &message);
    http::Response::from_parts(parts, crate::body::ResponseBody::Full(None))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grpc_content_types() {
        assert!(is_grpc_type(b"application/grpc"));
        assert!(is_grpc_type(b"application/grpc+proto"));
        assert!(!is_grpc_type(b"application/grpc-web"));
        assert!(!is_grpc_type(b"application/json"));
    }

    #[test]
    fn timeouts_parse_per_the_spec() {
        assert_eq!(parse_timeout(b"300m"), Some(Duration::from_millis(300)));
        assert_eq!(parse_timeout(b"2S"), Some(Duration::from_secs(2)));
        assert_eq!(parse_timeout(b"1H"), Some(Duration::from_secs(3600)));
        assert_eq!(parse_timeout(b"5n"), Some(Duration::from_nanos(5)));
        assert_eq!(parse_timeout(b"123456789m"), None);
        assert_eq!(parse_timeout(b"m"), None);
        assert_eq!(parse_timeout(b"10x"), None);
        assert_eq!(parse_timeout(b"-1S"), None);
    }

    #[test]
    fn timeouts_format_in_8_digits_rounding_up() {
        assert_eq!(format_timeout(Duration::from_millis(25)), "25000000n");
        assert_eq!(format_timeout(Duration::from_millis(250)), "250000u");
        assert_eq!(format_timeout(Duration::from_secs(200)), "200000m");
        assert_eq!(format_timeout(Duration::from_secs(3600 * 30)), "108000S");
        assert_eq!(format_timeout(Duration::ZERO), "1n");
        for d in [1u64, 999, 123_456_789_123] {
            let d = Duration::from_nanos(d);
            assert!(parse_timeout(format_timeout(d).as_bytes()).unwrap() >= d);
        }
    }

    #[test]
    fn messages_are_percent_encoded() {
        assert_eq!(encode_message("no route: 100%"), "no route: 100%25");
        assert_eq!(encode_message("é\n"), "%C3%A9%0A");
    }

    #[test]
    fn gateway_and_upstream_statuses_map() {
        assert_eq!(
            status_of_gateway_http(StatusCode::TOO_MANY_REQUESTS),
            RESOURCE_EXHAUSTED
        );
        assert_eq!(
            status_of_gateway_http(StatusCode::GATEWAY_TIMEOUT),
            DEADLINE_EXCEEDED
        );
        assert_eq!(status_of_upstream_http(StatusCode::GATEWAY_TIMEOUT), UNAVAILABLE);
        assert_eq!(status_of_upstream_http(StatusCode::IM_A_TEAPOT), UNKNOWN);
        assert_eq!(message_of_body(br#"{"error":{"message":"nope"}}"#), "nope");
    }
}
