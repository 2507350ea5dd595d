//! Per-route static response headers and retired routes: how an API version's lifecycle
//! (`apis:` in the control plane) reaches the data plane without a plugin, so such routes
//! stay off the GIL. Deprecated versions add `Deprecation`, `Sunset` and `Link` to every
//! response; a retired one answers 410 `version_retired` (and a version named in a header or
//! query parameter that the API does not serve, 404 `unknown_version`) in the access phase,
//! before limits, plugins or the upstream.

use crate::config::{ConfigProblem, RouteConfig};
use crate::error::{ErrorKind, GatewayError};
use crate::phase::{Filter, RequestCtx};
use http::{request, HeaderMap, HeaderName, HeaderValue};
use serde::Deserialize;

/// `routes[].response_headers[]` of the normalized config.
#[derive(Debug, Clone, Deserialize)]
pub struct ResponseHeaderConfig {
    pub name: String,
    pub value: String,
    /// Added beside the fields of that name the response has (`Link`); otherwise it
    /// replaces them.
    #[serde(default)]
    pub append: bool,
}

/// `routes[].refuse` of the normalized config: the route answers with this error.
#[derive(Debug, Clone, Deserialize)]
pub struct RefuseConfig {
    pub code: RefuseCode,
    pub message: String,
    /// Where clients should go instead; goes into the error object as `successor`.
    #[serde(default)]
    pub successor: Option<serde_json::Value>,
}

struct Header {
    name: HeaderName,
    value: HeaderValue,
    append: bool,
}

/// The compiled settings, by route index; empty when no route has any.
#[derive(Default)]
pub struct Lifecycle {
    headers: Vec<Vec<Header>>,
    refused: Vec<Option<RefuseConfig>>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RefuseCode {
    VersionRetired,
    UnknownVersion,
}

impl Lifecycle {
    pub fn build(routes: &[RouteConfig]) -> Result<Lifecycle, Vec<ConfigProblem>> {
        let mut problems = Vec::new();
        let mut out = Lifecycle::default();
        if routes.iter().any(|r| !r.response_headers.is_empty()) {
            out.headers = routes
                .iter()
                .enumerate()
                .map(|(i, r)| compile_headers(i, &r.response_headers, &mut problems))
                .collect();
        }
        if routes.iter().any(|r| r.refuse.is_some()) {
            out.refused = routes.iter().map(|r| r.refuse.clone()).collect();
        }
        if problems.is_empty() {
            Ok(out)
        } else {
            Err(problems)
        }
    }

    pub fn refuses(&self) -> bool {
        !self.refused.is_empty()
    }

    /// Add the route's static headers to a response leaving it (the upstream's answer, a
    /// plugin's, or the gateway's own).
    pub fn apply(&self, route: usize, headers: &mut HeaderMap) {
        let Some(list) = self.headers.get(route) else {
            return;
        };
        for h in list {
            if h.append {
                headers.append(h.name.clone(), h.value.clone());
            } else {
                headers.insert(h.name.clone(), h.value.clone());
            }
        }
    }

    fn refused(&self, route: usize) -> Option<&RefuseConfig> {
        self.refused.get(route)?.as_ref()
    }
}

fn compile_headers(
    i: usize,
    list: &[ResponseHeaderConfig],
    problems: &mut Vec<ConfigProblem>,
) -> Vec<Header> {
    let mut out = Vec::with_capacity(list.len());
    for (j, h) in list.iter().enumerate() {
        let at = format!("routes[{i}].response_headers[{j}]");
        let name = HeaderName::from_bytes(h.name.as_bytes());
        let value = HeaderValue::from_str(&h.value);
        match (name, value) {
            (Ok(name), Ok(value)) => out.push(Header {
                name,
                value,
                append: h.append,
            }),
            (Err(_), _) => problems.push(ConfigProblem::new(
                at,
                format!("'{}' is not a valid header name", h.name),
            )),
            (_, Err(_)) => problems.push(ConfigProblem::new(at, "not a valid header value")),
        }
    }
    out
}

/// The access-phase filter that answers refusing routes.
pub struct RefusedRoutes(pub std::sync::Arc<Lifecycle>);

impl Filter for RefusedRoutes {
    fn name(&self) -> &'static str {
        "refused-routes"
    }

    fn access(&self, ctx: &mut RequestCtx, _req: &request::Parts) -> Result<(), GatewayError> {
        let Some(route) = &ctx.route else {
            return Ok(());
        };
        match self.0.refused(route.index) {
            None => Ok(()),
            Some(r) => {
                let kind = match r.code {
                    RefuseCode::VersionRetired => ErrorKind::VersionRetired,
                    RefuseCode::UnknownVersion => ErrorKind::UnknownVersion,
                };
                let e = GatewayError::new(kind, r.message.clone());
                Err(match &r.successor {
                    Some(s) => e.with_detail("successor", s.clone()),
                    None => e,
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn routes(v: serde_json::Value) -> Vec<RouteConfig> {
        serde_json::from_value(v).unwrap()
    }

    #[test]
    fn set_replaces_and_append_adds() {
        let l = Lifecycle::build(&routes(serde_json::json!([
            {"paths": ["/a"], "upstream": "u"},
            {"paths": ["/b"], "upstream": "u", "response_headers": [
                {"name": "Deprecation", "value": "@1"},
                {"name": "Link", "value": "</v2>; rel=\"successor-version\"", "append": true}
            ]}
        ])))
        .unwrap();
        let mut h = HeaderMap::new();
        h.insert("deprecation", HeaderValue::from_static("@9"));
        h.insert("link", HeaderValue::from_static("</p2>; rel=\"next\""));
        l.apply(0, &mut h);
        assert_eq!(h.len(), 2);
        l.apply(1, &mut h);
        assert_eq!(h.get_all("deprecation").iter().collect::<Vec<_>>(), ["@1"]);
        assert_eq!(h.get_all("link").iter().count(), 2);
        assert!(!l.refuses());
    }

    #[test]
    fn bad_headers_are_problems_at_their_place() {
        let p = Lifecycle::build(&routes(serde_json::json!([
            {"paths": ["/b"], "upstream": "u", "response_headers": [
                {"name": "ok", "value": "x"}, {"name": "bad name", "value": "x"},
                {"name": "ok", "value": "line\nbreak"}
            ]}
        ])))
        .err()
        .unwrap();
        let at: Vec<_> = p.iter().map(|p| p.path.as_str()).collect();
        assert_eq!(
            at,
            ["routes[0].response_headers[1]", "routes[0].response_headers[2]"]
        );
    }

    #[test]
    fn retired_error_carries_the_successor() {
        let e = GatewayError::new(ErrorKind::VersionRetired, "gone")
            .with_detail("successor", serde_json::json!({"version": "v2"}));
        let body: serde_json::Value = serde_json::from_str(&e.body(&HeaderValue::from_static("id"))).unwrap();
        assert_eq!(body["error"]["status"], 410);
        assert_eq!(body["error"]["code"], "version_retired");
        assert_eq!(body["error"]["successor"]["version"], "v2");
        assert_eq!(body["error"]["request_id"], "id");
    }
}
