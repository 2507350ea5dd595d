//! The request path as routing and authorization see it.
//!
//! Routes, the plugins they run and the ACLs they carry are chosen by path, so every
//! spelling of a path must lead to the same decision: `/admin/x`, `//admin/x`,
//! `/public/../admin/x` and `/%61dmin/x` are one resource to an upstream that decodes and
//! normalizes, and must be one route here. The path is normalized once, before routing, and
//! the normalized form is what plugins see and what is forwarded (like Envoy with
//! `normalize_path` and `merge_slashes` on).
//!
//! Rules, in order:
//! 1. Percent-escapes of unreserved characters (`A-Z a-z 0-9 - . _ ~`, RFC 3986 §2.3) are
//!    decoded; other escapes are kept with upper-case hex (§6.2.2.1).
//! 2. Refused (400), because an upstream may read them differently from us: an encoded `/`
//!    or `\` (`%2F`, `%5C`; Envoy's `path_with_escaped_slashes_action: REJECT_REQUEST`), a
//!    raw `\`, an encoded NUL, a double-encoded escape (`%25` followed by two hex digits,
//!    e.g. `%252e`), a malformed escape, and a dot segment with parameters (`..;x`, which
//!    some servlet containers read as `..`).
//! 3. Runs of `/` are merged into one.
//! 4. Dot segments are removed (RFC 3986 §5.2.4); a path that climbs above the root is
//!    refused instead of being clamped.
//!
//! Case is kept: routes match case-sensitively, as in Envoy, Kong and APISIX.

use crate::error::{ErrorKind, GatewayError};
use http::uri::PathAndQuery;
use http::Uri;
use std::borrow::Cow;

/// Why a path was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    EncodedSlash,
    Backslash,
    EncodedNul,
    DoubleEncoded,
    BadEscape,
    DotSegmentParams,
    AboveRoot,
}

impl Refused {
    pub fn message(self) -> &'static str {
        match self {
            Refused::EncodedSlash => "the path contains an encoded '/' or '\\' (%2F, %5C)",
            Refused::Backslash => "the path contains a '\\'",
            Refused::EncodedNul => "the path contains an encoded NUL (%00)",
            Refused::DoubleEncoded => {
                "the path contains a double-encoded escape (%25 followed by hex digits)"
            }
            Refused::BadEscape => "the path contains a '%' that does not start an escape (%XX)",
            Refused::DotSegmentParams => "the path contains a dot segment with parameters ('..;')",
            Refused::AboveRoot => "the path climbs above the root with '..'",
        }
    }
}

fn hex(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'a'..=b'f' => Some(b - b'a' + 10),
        b'A'..=b'F' => Some(b - b'A' + 10),
        _ => None,
    }
}

fn unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Whether `path` may need any work: the common case (no escapes, no dot segments, no
/// doubled slash) is returned as it is without allocating.
fn needs_work(path: &[u8]) -> bool {
    let mut prev = 0u8;
    for &b in path {
        if b == b'%' || b == b'\\' || (prev == b'/' && (b == b'/' || b == b'.')) {
            return true;
        }
        prev = b;
    }
    false
}

/// The normalized form of an origin-form path (no query). Paths that do not start with
/// `/` (`*`, or an authority-form target) are returned unchanged: no route can match them.
pub fn normalize(path: &str) -> Result<Cow<'_, str>, Refused> {
    let bytes = path.as_bytes();
    if !bytes.starts_with(b"/") || !needs_work(bytes) {
        return Ok(Cow::Borrowed(path));
    }
    // 1 and 2: decode what is unreserved, refuse what is ambiguous.
    let mut decoded = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let b = bytes[i];
        match b {
            b'\\' => return Err(Refused::Backslash),
            b'%' => {
                let (Some(hi), Some(lo)) = (
                    bytes.get(i + 1).copied().and_then(hex),
                    bytes.get(i + 2).copied().and_then(hex),
                ) else {
                    return Err(Refused::BadEscape);
                };
                let v = hi << 4 | lo;
                match v {
                    b'/' | b'\\' => return Err(Refused::EncodedSlash),
                    0 => return Err(Refused::EncodedNul),
                    b'%' if bytes.get(i + 3).copied().and_then(hex).is_some()
                        && bytes.get(i + 4).copied().and_then(hex).is_some() =>
                    {
                        return Err(Refused::DoubleEncoded)
                    }
                    v if unreserved(v) => decoded.push(v),
                    _ => {
                        decoded.push(b'%');
                        decoded
                            .extend_from_slice(&[bytes[i + 1], bytes[i + 2]].map(|c| c.to_ascii_uppercase()));
                    }
                }
                i += 3;
            }
            _ => {
                decoded.push(b);
                i += 1;
            }
        }
    }
    // 3 and 4: merge slashes, remove dot segments.
    let mut segments: Vec<&[u8]> = Vec::new();
    let mut trailing = false;
    for seg in decoded[1..].split(|&b| b == b'/') {
        trailing = false;
        match seg {
            b"" => trailing = true,
            b"." => trailing = true,
            b".." => {
                if segments.pop().is_none() {
                    return Err(Refused::AboveRoot);
                }
                trailing = true;
            }
            s if s.starts_with(b".;") || s.starts_with(b"..;") => return Err(Refused::DotSegmentParams),
            s => segments.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for s in &segments {
        out.push('/');
        // Only ASCII bytes were decoded into the path, so it stays valid UTF-8.
        out.push_str(std::str::from_utf8(s).expect("the path was UTF-8 and only ASCII was decoded"));
    }
    if out.is_empty() || trailing {
        out.push('/');
    }
    Ok(if out == path {
        Cow::Borrowed(path)
    } else {
        Cow::Owned(out)
    })
}

/// Replace the request's path with its normalized form (the query is kept as sent); a
/// refused path is a 400.
pub fn normalize_uri(uri: &mut Uri) -> Result<(), GatewayError> {
    let path = match normalize(uri.path()) {
        Ok(Cow::Borrowed(_)) => return Ok(()),
        Ok(Cow::Owned(p)) => p,
        Err(r) => return Err(GatewayError::new(ErrorKind::BadRequest, r.message())),
    };
    let pq = match uri.query() {
        Some(q) => format!("{path}?{q}"),
        None => path,
    };
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(
        PathAndQuery::try_from(pq)
            .map_err(|e| GatewayError::new(ErrorKind::BadRequest, format!("invalid path: {e}")))?,
    );
    *uri = Uri::from_parts(parts)
        .map_err(|e| GatewayError::new(ErrorKind::BadRequest, format!("invalid path: {e}")))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(p: &str) -> String {
        normalize(p).unwrap_or_else(|e| panic!("{p}: {e:?}")).into_owned()
    }

    #[test]
    fn plain_paths_are_borrowed_unchanged() {
        for p in ["/", "/a", "/a/b/", "/a.b/c..d", "/users/7/.well", "*"] {
            assert!(matches!(normalize(p), Ok(Cow::Borrowed(_))), "{p}");
        }
    }

    #[test]
    fn slashes_are_merged_and_dot_segments_removed() {
        assert_eq!(ok("//admin/x"), "/admin/x");
        assert_eq!(ok("/./admin/x"), "/admin/x");
        assert_eq!(ok("/admin/./x"), "/admin/x");
        assert_eq!(ok("/public/../admin/x"), "/admin/x");
        assert_eq!(ok("/a//b///c"), "/a/b/c");
        assert_eq!(ok("/a/b/.."), "/a/");
        assert_eq!(ok("/a/b/."), "/a/b/");
        assert_eq!(ok("/a/b//"), "/a/b/");
        assert_eq!(ok("/."), "/");
        assert_eq!(ok("/a/.."), "/");
        assert_eq!(ok("//"), "/");
        assert_eq!(ok("/a/.hidden/..x"), "/a/.hidden/..x");
    }

    #[test]
    fn unreserved_escapes_are_decoded_in_any_case() {
        assert_eq!(ok("/%61dmin/x"), "/admin/x");
        assert_eq!(ok("/public/%2e%2e/admin/x"), "/admin/x");
        assert_eq!(ok("/public/%2E%2e/admin/x"), "/admin/x");
        assert_eq!(ok("/%7Euser/%41"), "/~user/A");
        // reserved and other characters stay encoded, with upper-case hex
        assert_eq!(ok("/a%3fb/%20c%e2%82%ac"), "/a%3Fb/%20c%E2%82%AC");
        assert_eq!(ok("/a%25"), "/a%25");
        assert_eq!(ok("/100%25x"), "/100%25x");
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        let refused = |p: &str| normalize(p).unwrap_err();
        assert_eq!(refused("/admin%2fx"), Refused::EncodedSlash);
        assert_eq!(refused("/public%2F..%2Fadmin/x"), Refused::EncodedSlash);
        assert_eq!(refused("/a%5cb"), Refused::EncodedSlash);
        assert_eq!(refused("/\\admin"), Refused::Backslash);
        assert_eq!(refused("/a%00"), Refused::EncodedNul);
        assert_eq!(refused("/%252e%252e/admin"), Refused::DoubleEncoded);
        assert_eq!(refused("/%2561dmin"), Refused::DoubleEncoded);
        assert_eq!(refused("/a%zz"), Refused::BadEscape);
        assert_eq!(refused("/a%2"), Refused::BadEscape);
        assert_eq!(refused("/public/..;/admin"), Refused::DotSegmentParams);
        assert_eq!(refused("/public/.;x/admin"), Refused::DotSegmentParams);
        assert_eq!(refused("/.."), Refused::AboveRoot);
        assert_eq!(refused("/%2e%2e/admin"), Refused::AboveRoot);
        assert_eq!(refused("/a/../../b"), Refused::AboveRoot);
    }

    #[test]
    fn the_uri_keeps_its_query_and_authority() {
        let mut uri: Uri = "http://a.test/x//../y/%7e?q=%2f..".parse().unwrap();
        normalize_uri(&mut uri).unwrap();
        assert_eq!(uri.to_string(), "http://a.test/y/~?q=%2f..");
        let mut bad: Uri = "/a%2fb".parse().unwrap();
        assert_eq!(normalize_uri(&mut bad).unwrap_err().kind, ErrorKind::BadRequest);
    }

    #[test]
    fn normalizing_twice_changes_nothing() {
        for p in ["//a/./b/../c/", "/%61/%2e/x", "/a%3fb//c", "/x/y/z/../.."] {
            let once = ok(p);
            assert_eq!(ok(&once), once, "{p}");
        }
    }
}
