//! Keeping secrets out of log lines: header values by header name, and values in captured
//! bodies and query strings by key.
//!
//! Captured bodies are cut at a size limit, so a JSON body is often not valid JSON by the
//! time it is redacted: the JSON redaction is a tolerant scan over the text (a key is a
//! string followed by `:`), not a parse, and a secret value cut short is still replaced.

/// What a secret value is replaced by.
pub const REDACTED: &str = "[REDACTED]";

#[derive(Debug, Clone, Default, PartialEq)]
pub struct Redactor {
    /// Header names, lower case: matched exactly.
    headers: Vec<String>,
    /// Body and query keys, lower case: matched as substrings of the lower-cased key. The
    /// secret header names are among them (a body that echoes a cookie holds a secret).
    keys: Vec<String>,
}

impl Redactor {
    pub fn new(headers: &[String], keys: &[String]) -> Self {
        Redactor {
            headers: headers.iter().map(|h| h.to_ascii_lowercase()).collect(),
            keys: keys
                .iter()
                .chain(headers)
                .map(|k| k.to_lowercase())
                .filter(|k| !k.is_empty())
                .collect(),
        }
    }

    /// `name` as `http::HeaderName` gives it: lower case.
    pub fn header_is_secret(&self, name: &str) -> bool {
        self.headers.iter().any(|h| h == name)
    }

    pub fn key_is_secret(&self, key: &str) -> bool {
        if self.keys.is_empty() {
            return false;
        }
        let key = key.to_lowercase();
        self.keys.iter().any(|k| key.contains(k.as_str()))
    }

    /// A captured body as text (invalid UTF-8 replaced), secrets out: JSON-looking text by
    /// key, a form-encoded body (`form`) by field name.
    pub fn body(&self, body: &[u8], form: bool) -> String {
        let text = String::from_utf8_lossy(body);
        match text.trim_start().as_bytes().first() {
            Some(b'{' | b'[') => self.json(&text),
            _ if form => self.form(&text).into_owned(),
            _ => text.into_owned(),
        }
    }

    /// A query string or form body with the values of secret fields replaced; borrowed
    /// when nothing was secret.
    pub fn form<'a>(&self, text: &'a str) -> std::borrow::Cow<'a, str> {
        let secret = |pair: &str| {
            let raw = pair.split_once('=').map_or(pair, |(k, _)| k);
            form_urlencoded::parse(raw.as_bytes())
                .next()
                .is_some_and(|(k, _)| self.key_is_secret(&k))
        };
        if self.keys.is_empty() || !text.split('&').any(|p| p.contains('=') && secret(p)) {
            return std::borrow::Cow::Borrowed(text);
        }
        let mut out = String::with_capacity(text.len());
        for (i, pair) in text.split('&').enumerate() {
            if i > 0 {
                out.push('&');
            }
            match pair.split_once('=') {
                Some((k, _)) if secret(pair) => {
                    out.push_str(k);
                    out.push('=');
                    out.push_str(REDACTED);
                }
                _ => out.push_str(pair),
            }
        }
        std::borrow::Cow::Owned(out)
    }

    /// JSON text, possibly cut short, with the value of every secret key replaced by
    /// `"[REDACTED]"` (a nested object or array as a whole), at any depth.
    pub fn json(&self, text: &str) -> String {
        let b = text.as_bytes();
        let mut out = String::with_capacity(text.len());
        let mut i = 0;
        // Copied up to here.
        let mut copied = 0;
        while i < b.len() {
            if b[i] != b'"' {
                i += 1;
                continue;
            }
            let end = string_end(b, i);
            let mut j = skip_ws(b, end);
            if j >= b.len() || b[j] != b':' || !self.key_is_secret(&json_key(&text[i..end])) {
                i = end;
                continue;
            }
            j = skip_ws(b, j + 1);
            out.push_str(&text[copied..j]);
            out.push('"');
            out.push_str(REDACTED);
            out.push('"');
            i = value_end(b, j);
            copied = i;
        }
        out.push_str(&text[copied..]);
        out
    }
}

/// The end (one past the closing quote) of the string starting at `start`; the end of the
/// text when it was cut inside the string.
fn string_end(b: &[u8], start: usize) -> usize {
    let mut i = start + 1;
    while i < b.len() {
        match b[i] {
            b'\\' => i += 2,
            b'"' => return i + 1,
            _ => i += 1,
        }
    }
    b.len()
}

fn skip_ws(b: &[u8], mut i: usize) -> usize {
    while i < b.len() && b[i].is_ascii_whitespace() {
        i += 1;
    }
    i
}

/// A key's text with its escapes decoded (a key can spell "password" with `\u0070`).
fn json_key(quoted: &str) -> String {
    serde_json::from_str::<String>(quoted).unwrap_or_else(|_| quoted.trim_matches('"').to_owned())
}

/// The end of the JSON value starting at `i` (string, object, array or scalar); the end of
/// the text when it was cut inside the value.
fn value_end(b: &[u8], i: usize) -> usize {
    match b.get(i) {
        None => i,
        Some(b'"') => string_end(b, i),
        Some(b'{' | b'[') => {
            let mut depth = 0usize;
            let mut k = i;
            while k < b.len() {
                match b[k] {
                    b'"' => {
                        k = string_end(b, k);
                        continue;
                    }
                    b'{' | b'[' => depth += 1,
                    b'}' | b']' => {
                        depth -= 1;
                        if depth == 0 {
                            return k + 1;
                        }
                    }
                    _ => {}
                }
                k += 1;
            }
            b.len()
        }
        Some(_) => {
            let mut k = i;
            while k < b.len() && !matches!(b[k], b',' | b'}' | b']') && !b[k].is_ascii_whitespace() {
                k += 1;
            }
            k
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn redactor() -> Redactor {
        let s = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
        Redactor::new(
            &s(&["authorization", "cookie"]),
            &s(&["password", "secret", "token"]),
        )
    }

    #[test]
    fn secret_json_values_are_replaced_at_any_depth() {
        let r = redactor();
        let body = r#"{"user": "ann", "Password": "hunter2", "nested": {"client_secret": 12, "ok": [1, {"token": {"a": "}"}}]}, "n": 1}"#;
        assert_eq!(
            r.json(body),
            r#"{"user": "ann", "Password": "[REDACTED]", "nested": {"client_secret": "[REDACTED]", "ok": [1, {"token": "[REDACTED]"}]}, "n": 1}"#
        );
        // Strings that only look like keys are left alone.
        assert_eq!(r.json(r#"["password", "x"]"#), r#"["password", "x"]"#);
    }

    #[test]
    fn a_body_cut_inside_a_secret_still_hides_it() {
        let r = redactor();
        assert_eq!(
            r.json(r#"{"a": 1, "password": "hunte"#),
            r#"{"a": 1, "password": "[REDACTED]""#
        );
        assert_eq!(r.json(r#"{"token": {"x": "abc"#), r#"{"token": "[REDACTED]""#);
        assert_eq!(r.json(r#"{"secret": 12345"#), r#"{"secret": "[REDACTED]""#);
        assert_eq!(r.json(r#"{"secret":"#), r#"{"secret":"[REDACTED]""#);
    }

    #[test]
    fn escaped_keys_and_quotes_are_understood() {
        let r = redactor();
        assert_eq!(
            r.json(r#"{"pass\u0077ord": "x\"y", "note": "say \"password\": no"}"#),
            r#"{"pass\u0077ord": "[REDACTED]", "note": "say \"password\": no"}"#
        );
    }

    #[test]
    fn form_fields_and_plain_text() {
        let r = redactor();
        assert_eq!(
            r.form("user=ann&pass%77ord=x&b"),
            "user=ann&pass%77ord=[REDACTED]&b"
        );
        assert!(matches!(r.form("a=1&b=2"), std::borrow::Cow::Borrowed(_)));
        assert_eq!(r.body(b"password=x", false), "password=x");
        assert_eq!(r.body(b"password=x", true), "password=[REDACTED]");
        assert_eq!(r.body(b"  {\"token\":1}", false), "  {\"token\":\"[REDACTED]\"}");
        assert_eq!(r.body(b"caf\xc3", false), "caf\u{fffd}");
    }

    #[test]
    fn header_names_match_exactly() {
        let r = redactor();
        assert!(r.header_is_secret("authorization"));
        assert!(!r.header_is_secret("x-authorization-hint"));
    }
}
