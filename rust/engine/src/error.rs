//! Errors the gateway answers itself, with one stable JSON shape:
//! `{"error": {"status", "code", "message", "request_id"}}`.

use http::{header, HeaderValue, Response, StatusCode};

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorKind {
    BadRequest,
    NoRoute,
    RequestTimeout,
    BodyTooLarge,
    HeadersTooLarge,
    UriTooLong,
    IpForbidden,
    Internal,
    PluginFailed,
    RateLimited,
    RateLimitStoreUnavailable,
    Overloaded,
    ResponseTooLarge,
    UpstreamUnreachable,
    UpstreamTimeout,
    UpstreamTlsFailed,
    NoHealthyTarget,
    CircuitOpen,
    ClientCertRequired,
    WafBlocked,
    VersionRetired,
    UnknownVersion,
}

impl ErrorKind {
    pub fn status(self) -> StatusCode {
        match self {
            ErrorKind::BadRequest => StatusCode::BAD_REQUEST,
            ErrorKind::NoRoute => StatusCode::NOT_FOUND,
            ErrorKind::RequestTimeout => StatusCode::REQUEST_TIMEOUT,
            ErrorKind::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            ErrorKind::HeadersTooLarge => StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            ErrorKind::UriTooLong => StatusCode::URI_TOO_LONG,
            ErrorKind::IpForbidden => StatusCode::FORBIDDEN,
            ErrorKind::Internal => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::PluginFailed => StatusCode::INTERNAL_SERVER_ERROR,
            ErrorKind::RateLimited => StatusCode::TOO_MANY_REQUESTS,
            ErrorKind::RateLimitStoreUnavailable => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::Overloaded => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::ResponseTooLarge => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamUnreachable => StatusCode::BAD_GATEWAY,
            ErrorKind::UpstreamTimeout => StatusCode::GATEWAY_TIMEOUT,
            ErrorKind::UpstreamTlsFailed => StatusCode::BAD_GATEWAY,
            ErrorKind::NoHealthyTarget => StatusCode::SERVICE_UNAVAILABLE,
            ErrorKind::CircuitOpen => StatusCode::SERVICE_UNAVAILABLE,
            // No HTTP authentication scheme can supply a certificate: 403, not 401.
            ErrorKind::ClientCertRequired => StatusCode::FORBIDDEN,
            ErrorKind::WafBlocked => StatusCode::FORBIDDEN,
            ErrorKind::VersionRetired => StatusCode::GONE,
            ErrorKind::UnknownVersion => StatusCode::NOT_FOUND,
        }
    }

    pub fn code(self) -> &'static str {
        match self {
            ErrorKind::BadRequest => "bad_request",
            ErrorKind::NoRoute => "no_route",
            ErrorKind::RequestTimeout => "request_timeout",
            ErrorKind::BodyTooLarge => "body_too_large",
            ErrorKind::HeadersTooLarge => "headers_too_large",
            ErrorKind::UriTooLong => "uri_too_long",
            ErrorKind::IpForbidden => "ip_forbidden",
            ErrorKind::Internal => "internal_error",
            ErrorKind::PluginFailed => "plugin_error",
            ErrorKind::RateLimited => "rate_limited",
            ErrorKind::RateLimitStoreUnavailable => "rate_limit_store_unavailable",
            ErrorKind::Overloaded => "overloaded",
            ErrorKind::ResponseTooLarge => "response_too_large",
            ErrorKind::UpstreamUnreachable => "upstream_unreachable",
            ErrorKind::UpstreamTimeout => "upstream_timeout",
            ErrorKind::UpstreamTlsFailed => "upstream_tls_failed",
            ErrorKind::NoHealthyTarget => "no_healthy_target",
            ErrorKind::CircuitOpen => "circuit_open",
            ErrorKind::ClientCertRequired => "client_cert_required",
            ErrorKind::WafBlocked => "waf_blocked",
            ErrorKind::VersionRetired => "version_retired",
            ErrorKind::UnknownVersion => "unknown_version",
        }
    }

    /// Errors about the client's framing leave the connection in an unknown state: close it.
    fn closes_connection(self) -> bool {
        matches!(
            self,
            ErrorKind::BadRequest | ErrorKind::BodyTooLarge | ErrorKind::RequestTimeout
        )
    }
}

#[derive(Debug)]
pub struct GatewayError {
    pub kind: ErrorKind,
    pub message: String,
    /// One more member of the error object (a retired version's `successor`).
    pub detail: Option<Box<(&'static str, serde_json::Value)>>,
}

// The constructors are `#[cold]`: the compiler then treats every branch that leads to an
// error as unlikely and lays the request path's code out without them in between.
impl GatewayError {
    #[cold]
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        GatewayError {
            kind,
            message: message.into(),
            detail: None,
        }
    }

    #[cold]
    pub fn with_detail(mut self, key: &'static str, value: serde_json::Value) -> Self {
        self.detail = Some(Box::new((key, value)));
        self
    }

    pub fn body(&self, request_id: &HeaderValue) -> String {
        let mut body = serde_json::json!({"error": {
            "status": self.kind.status().as_u16(),
            "code": self.kind.code(),
            "message": self.message,
            "request_id": request_id.to_str().unwrap_or(""),
        }});
        if let Some((key, value)) = self.detail.as_deref() {
            body["error"][*key] = value.clone();
        }
        body.to_string()
    }

    #[cold]
    pub fn into_response<B>(self, request_id: &HeaderValue, full: impl FnOnce(String) -> B) -> Response<B> {
        let body = self.body(request_id);
        let mut resp = Response::new(full(body));
        *resp.status_mut() = self.kind.status();
        let h = resp.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        if self.kind.closes_connection() {
            h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        }
        resp
    }
}

impl std::fmt::Display for GatewayError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.kind.code(), self.message)
    }
}
