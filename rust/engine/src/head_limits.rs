//! Limits on a request's head that hold on every protocol: the request target's length
//! (414) and the number of header fields (431). On HTTP/1.1 hyper also counts the fields
//! while parsing (`max_headers`), so a flood of them is never stored.

use crate::config::Limits;
use crate::error::{ErrorKind, GatewayError};
use http::request;

pub fn check(parts: &request::Parts, limits: &Limits) -> Result<(), GatewayError> {
    let target = parts.uri.path_and_query().map_or(0, |pq| pq.as_str().len());
    if limits.max_url_bytes > 0 && target > limits.max_url_bytes {
        return Err(GatewayError::new(
            ErrorKind::UriTooLong,
            format!(
                "the request target is {target} bytes, above the limit of {} bytes",
                limits.max_url_bytes
            ),
        ));
    }
    let fields = parts.headers.len();
    if limits.max_headers > 0 && fields > limits.max_headers {
        return Err(GatewayError::new(
            ErrorKind::HeadersTooLarge,
            format!(
                "the request has {fields} header fields, above the limit of {}",
                limits.max_headers
            ),
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parts(uri: &str, headers: usize) -> request::Parts {
        let mut b = http::Request::builder().uri(uri);
        for i in 0..headers {
            b = b.header(format!("x-h{i}"), "v");
        }
        b.body(()).unwrap().into_parts().0
    }

    #[test]
    fn limits_hold_at_the_boundary() {
        let limits = Limits {
            max_url_bytes: 10,
            max_headers: 3,
            ..Limits::default()
        };
        assert!(check(&parts("/123456789", 3), &limits).is_ok());
        let e = check(&parts("/1234567890", 0), &limits).unwrap_err();
        assert_eq!(e.kind, ErrorKind::UriTooLong);
        assert!(check(&parts("/?a=56789", 0), &limits).is_ok());
        let e = check(&parts("/", 4), &limits).unwrap_err();
        assert_eq!(e.kind, ErrorKind::HeadersTooLarge);
        let off = Limits {
            max_url_bytes: 0,
            max_headers: 0,
            ..Limits::default()
        };
        assert!(check(&parts("/1234567890", 400), &off).is_ok());
    }
}
