//! TLS termination with rustls: certificates picked by SNI, TLS 1.2/1.3 only, ALPN h2 and
//! http/1.1, optional or required client certificates, and certificate files watched so a
//! rotation on disk is served without a reload.
//!
//! The `ServerConfig` in force sits behind an `ArcSwap`: a handshake takes the current one,
//! a rebuild swaps in a new one, and connections already set up keep theirs. A rebuild that
//! fails (a half-written file, a key that does not match) keeps the old config and logs.

use crate::config::{ClientAuthMode, ConfigProblem, ConsumerConfig, SniCertificate, TlsConfig};
use crate::server::log_event;
use arc_swap::ArcSwap;
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert, WebPkiClientVerifier};
use rustls::sign::CertifiedKey;
use rustls::{RootCertStore, ServerConfig};
use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate, X509Name};

/// How often certificate files are looked at for a change on disk.
pub const WATCH_INTERVAL: Duration = Duration::from_secs(2);

/// Who the client is by its certificate (verified against the configured CAs). Parsed once
/// per connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientIdentity {
    /// RFC 4514 (most specific RDN first), e.g. `CN=alice,O=Acme`.
    pub subject: String,
    /// DNS names, URIs and email addresses from the subjectAltName extension.
    pub sans: Vec<String>,
}

/// Put on every request of a TLS connection (request extensions).
#[derive(Debug, Clone)]
pub struct TlsConn {
    pub client: Option<Arc<ClientIdentity>>,
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

// --- names --------------------------------------------------------------------------------

/// A distinguished name as RFC 4514 writes it: RDNs in reverse order, comma-separated.
pub fn rfc4514(name: &X509Name<'_>) -> String {
    let registry = x509_parser::objects::oid_registry();
    let rdns: Vec<String> = name
        .iter()
        .map(|rdn| {
            rdn.iter()
                .map(|atv| {
                    let oid = atv.attr_type();
                    let kind = x509_parser::objects::oid2abbrev(oid, registry)
                        .map(str::to_string)
                        .unwrap_or_else(|_| oid.to_id_string());
                    let value = match atv.as_str() {
                        Ok(s) => escape_value(s),
                        Err(_) => {
                            let raw = atv.attr_value().data;
                            let hex: String = raw.iter().map(|b| format!("{b:02x}")).collect();
                            format!("#{hex}")
                        }
                    };
                    format!("{}={value}", kind.to_ascii_uppercase())
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn escape_value(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    let last = v.chars().count().saturating_sub(1);
    for (i, c) in v.chars().enumerate() {
        let special = matches!(c, ',' | '+' | '"' | '\\' | '<' | '>' | ';')
            || (i == 0 && (c == '#' || c == ' '))
            || (i == last && c == ' ');
        if special {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// A subject as written in the config, in the form `rfc4514` produces: no spaces around
/// separators, attribute types upper case ("cn=alice, o=Acme" → "CN=alice,O=Acme").
pub fn canonical_subject(text: &str) -> String {
    let mut parts = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                current.push(c);
                if let Some(next) = chars.next() {
                    current.push(next);
                }
            }
            ',' | '+' => {
                parts.push((std::mem::take(&mut current), c));
            }
            _ => current.push(c),
        }
    }
    parts.push((current, ' '));
    let mut out = String::new();
    for (part, sep) in parts {
        let (kind, value) = part.split_once('=').unwrap_or((&part, ""));
        out.push_str(&kind.trim().to_ascii_uppercase());
        out.push('=');
        out.push_str(value.trim_start());
        // A trailing escaped space stays; plain trailing spaces go.
        while out.ends_with(' ') && !out.ends_with("\\ ") {
            out.pop();
        }
        if sep != ' ' {
            out.push(sep);
        }
    }
    out
}

/// The identity in a (verified) client certificate; None when it does not parse.
pub fn client_identity(der: &[u8]) -> Option<ClientIdentity> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let mut sans = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            match name {
                GeneralName::DNSName(s) | GeneralName::URI(s) | GeneralName::RFC822Name(s) => {
                    sans.push((*s).to_string())
                }
                _ => {}
            }
        }
    }
    Some(ClientIdentity {
        subject: rfc4514(cert.subject()),
        sans,
    })
}

/// The DNS names a server certificate is for (its SANs; its CN when it has none).
fn dns_names(cert: &X509Certificate<'_>) -> Vec<String> {
    let mut names = Vec::new();
    if let Ok(Some(ext)) = cert.subject_alternative_name() {
        for name in &ext.value.general_names {
            if let GeneralName::DNSName(s) = name {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    if names.is_empty() {
        for cn in cert.subject().iter_common_name() {
            if let Ok(s) = cn.as_str() {
                names.push(s.to_ascii_lowercase());
            }
        }
    }
    names
}

// --- consumers by certificate -------------------------------------------------------------

struct MtlsCredential {
    consumer: String,
    id: String,
    subject: Option<String>,
    san: Option<String>,
}

/// The consumers' `mtls` credentials, looked up by a client certificate's subject or SANs.
#[derive(Default)]
pub struct MtlsIndex {
    credentials: Vec<MtlsCredential>,
    by_subject: HashMap<String, Vec<usize>>,
    by_san: HashMap<String, Vec<usize>>,
}

impl MtlsIndex {
    pub fn build(consumers: &BTreeMap<String, ConsumerConfig>) -> Self {
        let mut index = MtlsIndex::default();
        for (name, c) in consumers {
            for cred in c.credentials.iter().filter(|c| c.kind == "mtls") {
                let at = index.credentials.len();
                let subject = cred.subject.as_deref().map(canonical_subject);
                if let Some(s) = &subject {
                    index.by_subject.entry(s.clone()).or_default().push(at);
                } else if let Some(san) = &cred.san {
                    index.by_san.entry(san.clone()).or_default().push(at);
                }
                index.credentials.push(MtlsCredential {
                    consumer: name.clone(),
                    id: cred.id.clone(),
                    subject,
                    san: cred.san.clone(),
                });
            }
        }
        index
    }

    pub fn is_empty(&self) -> bool {
        self.credentials.is_empty()
    }

    /// (consumer, credential id) of the first credential the identity satisfies: a given
    /// subject must equal the certificate's, a given SAN must be among its SANs.
    pub fn identify(&self, who: &ClientIdentity) -> Option<(&str, &str)> {
        let by_san = who.sans.iter().filter_map(|s| self.by_san.get(s));
        let mut candidates: Vec<usize> = self
            .by_subject
            .get(&who.subject)
            .into_iter()
            .chain(by_san)
            .flatten()
            .copied()
            .collect();
        candidates.sort_unstable();
        candidates
            .into_iter()
            .map(|i| &self.credentials[i])
            .find(|c| {
                c.subject.as_ref().is_none_or(|s| *s == who.subject)
                    && c.san.as_ref().is_none_or(|s| who.sans.contains(s))
            })
            .map(|c| (c.consumer.as_str(), c.id.as_str()))
    }
}

// --- loading ------------------------------------------------------------------------------

fn read(path: &str) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {path}: {e}"))
}

pub(crate) fn load_chain(path: &str) -> Result<Vec<CertificateDer<'static>>, String> {
    let bytes = read(path)?;
    let chain = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| format!("{path}: not a PEM certificate file: {e}"))?;
    if chain.is_empty() {
        return Err(format!(
            "{path}: no PEM certificate (BEGIN CERTIFICATE) in the file"
        ));
    }
    for cert in &chain {
        X509Certificate::from_der(cert).map_err(|e| format!("{path}: not a valid X.509 certificate: {e}"))?;
    }
    Ok(chain)
}

pub(crate) fn load_key(path: &str) -> Result<PrivateKeyDer<'static>, String> {
    let bytes = read(path)?;
    PrivateKeyDer::from_pem_slice(&bytes).map_err(|e| match e {
        rustls::pki_types::pem::Error::NoItemsFound => {
            format!("{path}: no PEM private key (PKCS#8, PKCS#1 or SEC1) in the file")
        }
        e => format!("{path}: not a PEM private key: {e}"),
    })
}

/// One certificate with its key, ready to serve, and the names it is for.
struct Served {
    key: Arc<CertifiedKey>,
    names: Vec<String>,
}

fn load_certificate(cert: &str, key: &str, provider: &CryptoProvider) -> Result<Served, (bool, String)> {
    let chain = load_chain(cert).map_err(|e| (true, e))?;
    let names = X509Certificate::from_der(&chain[0])
        .map(|(_, c)| dns_names(&c))
        .unwrap_or_default();
    let der = load_key(key).map_err(|e| (false, e))?;
    let certified = certified(chain, der, provider).map_err(|e| match e {
        Mismatch::Unusable(e) => (false, format!("{key}: unusable private key: {e}")),
        Mismatch::NotItsKey => (
            false,
            format!("the private key in {key} does not belong to the certificate in {cert}"),
        ),
    })?;
    Ok(Served {
        key: Arc::new(certified),
        names,
    })
}

enum Mismatch {
    Unusable(rustls::Error),
    NotItsKey,
}

fn certified(
    chain: Vec<CertificateDer<'static>>,
    der: PrivateKeyDer<'static>,
    provider: &CryptoProvider,
) -> Result<CertifiedKey, Mismatch> {
    let signing = provider
        .key_provider
        .load_private_key(der)
        .map_err(Mismatch::Unusable)?;
    let certified = CertifiedKey::new(chain, signing);
    match certified.keys_match() {
        Ok(()) | Err(rustls::Error::InconsistentKeys(rustls::InconsistentKeys::Unknown)) => Ok(certified),
        Err(_) => Err(Mismatch::NotItsKey),
    }
}

/// A `certificates:` entity from its inline PEM; errors never quote the key.
fn load_entity(c: &SniCertificate, provider: &CryptoProvider) -> Result<Served, (bool, String)> {
    let chain = CertificateDer::pem_slice_iter(c.cert.as_bytes())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| (true, format!("not a PEM certificate: {e}")))?;
    if chain.is_empty() {
        return Err((true, "no PEM certificate (BEGIN CERTIFICATE)".into()));
    }
    let der = PrivateKeyDer::from_pem_slice(c.key.as_bytes()).map_err(|_| {
        (
            false,
            "not a PEM private key (PKCS#8, PKCS#1 or SEC1)".to_string(),
        )
    })?;
    let certified = certified(chain, der, provider).map_err(|e| match e {
        Mismatch::Unusable(e) => (false, format!("unusable private key: {e}")),
        Mismatch::NotItsKey => (false, "the private key does not belong to the certificate".into()),
    })?;
    Ok(Served {
        key: Arc::new(certified),
        names: c.snis.iter().map(|n| n.to_ascii_lowercase()).collect(),
    })
}

/// Picks the certificate for the name the client asked for (SNI): an exact name, then a
/// `*.` wildcard one level up, then the default (the listener's first certificate). At
/// each step the `certificates:` entities come before the listener's own files.
#[derive(Debug)]
struct SniResolver {
    keys: Vec<Arc<CertifiedKey>>,
    exact: HashMap<String, usize>,
    wildcard: HashMap<String, usize>,
    default: usize,
}

impl SniResolver {
    fn new(entities: Vec<Served>, own: Vec<Served>) -> Self {
        let mut r = SniResolver {
            keys: Vec::new(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: entities.len(),
        };
        for (i, s) in entities.into_iter().chain(own).enumerate() {
            for name in s.names {
                // The first certificate listed for a name wins.
                match name.strip_prefix("*.") {
                    Some(parent) => r.wildcard.entry(parent.to_string()).or_insert(i),
                    None => r.exact.entry(name).or_insert(i),
                };
            }
            r.keys.push(s.key);
        }
        r
    }

    fn pick(&self, server_name: Option<&str>) -> usize {
        let Some(name) = server_name.map(str::to_ascii_lowercase) else {
            return self.default;
        };
        if let Some(&i) = self.exact.get(&name) {
            return i;
        }
        name.split_once('.')
            .and_then(|(_, parent)| self.wildcard.get(parent).copied())
            .unwrap_or(self.default)
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.keys.get(self.pick(hello.server_name())).cloned()
    }
}

/// Read the files of `cfg` and build the rustls config; every problem located by its path
/// in the config (`tls.certificates[0].key`).
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<ServerConfig>, Vec<ConfigProblem>> {
    let provider = provider();
    let mut problems = Vec::new();
    let mut served = Vec::new();
    for (i, files) in cfg.certificates.iter().enumerate() {
        match load_certificate(&files.cert, &files.key, &provider) {
            Ok(s) => served.push(s),
            Err((on_cert, message)) => problems.push(ConfigProblem::new(
                format!("tls.certificates[{i}].{}", if on_cert { "cert" } else { "key" }),
                message,
            )),
        }
    }
    let mut entities = Vec::new();
    for c in &cfg.sni {
        match load_entity(c, &provider) {
            Ok(s) => entities.push(s),
            Err((on_cert, message)) => problems.push(ConfigProblem::new(
                format!("certificates.{}.{}", c.name, if on_cert { "cert" } else { "key" }),
                message,
            )),
        }
    }
    if cfg.certificates.is_empty() {
        problems.push(ConfigProblem::new(
            "tls.certificates",
            "at least one certificate is needed",
        ));
    }
    let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version.as_str() {
        "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
        "1.3" => &[&rustls::version::TLS13],
        other => {
            problems.push(ConfigProblem::new(
                "tls.min_version",
                format!("'{other}' is not a TLS version we accept (1.2 or 1.3)"),
            ));
            &[&rustls::version::TLS13]
        }
    };
    let verifier = match (cfg.client_auth.mode, &cfg.client_auth.ca) {
        (ClientAuthMode::None, _) => None,
        (_, None) => {
            problems.push(ConfigProblem::new(
                "tls.client_auth.ca",
                "client certificates need a CA bundle to be verified against",
            ));
            None
        }
        (mode, Some(ca)) => match client_verifier(mode, ca, &provider) {
            Ok(v) => Some(v),
            Err(e) => {
                problems.push(ConfigProblem::new("tls.client_auth.ca", e));
                None
            }
        },
    };
    if !problems.is_empty() {
        return Err(problems);
    }
    let builder = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(versions)
        .map_err(|e| vec![ConfigProblem::new("tls", e.to_string())])?;
    let builder = match verifier {
        Some(v) => builder.with_client_cert_verifier(v),
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_cert_resolver(Arc::new(SniResolver::new(entities, served)));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn client_verifier(
    mode: ClientAuthMode,
    ca: &str,
    provider: &Arc<CryptoProvider>,
) -> Result<Arc<dyn rustls::server::danger::ClientCertVerifier>, String> {
    let mut roots = RootCertStore::empty();
    for cert in load_chain(ca)? {
        roots
            .add(cert)
            .map_err(|e| format!("{ca}: not a usable CA certificate: {e}"))?;
    }
    let builder = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider.clone());
    let builder = match mode {
        ClientAuthMode::Optional => builder.allow_unauthenticated(),
        _ => builder,
    };
    builder.build().map_err(|e| format!("{ca}: {e}"))
}

/// Problems of the `tls` section, for `ferrogate check` (reads the files).
pub fn check(cfg: &TlsConfig) -> Vec<ConfigProblem> {
    server_config(cfg).err().unwrap_or_default()
}

// --- the worker's terminator --------------------------------------------------------------

/// What a file looked like when it was read: a rotation (rename or rewrite) changes it.
type Stamp = Vec<Option<(std::time::SystemTime, u64, u64)>>;

fn stamp(cfg: &TlsConfig) -> Stamp {
    use std::os::unix::fs::MetadataExt;
    let mut paths: Vec<PathBuf> = Vec::new();
    for c in &cfg.certificates {
        paths.push(c.cert.clone().into());
        paths.push(c.key.clone().into());
    }
    if let Some(ca) = &cfg.client_auth.ca {
        paths.push(ca.into());
    }
    paths
        .iter()
        .map(|p| {
            let m = std::fs::metadata(p).ok()?;
            Some((m.modified().ok()?, m.len(), m.ino()))
        })
        .collect()
}

struct Watched {
    settings: TlsConfig,
    /// The files as they were when `settings` last built (or last failed to build).
    seen: Stamp,
}

/// The TLS side of a worker's listeners.
pub struct Terminator {
    config: ArcSwap<ServerConfig>,
    watched: Mutex<Watched>,
    worker_id: usize,
}

fn joined(problems: Vec<ConfigProblem>) -> String {
    problems
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("; ")
}

impl Terminator {
    pub fn new(cfg: &TlsConfig, worker_id: usize) -> Result<Self, String> {
        let seen = stamp(cfg);
        let config = server_config(cfg).map_err(joined)?;
        Ok(Terminator {
            config: ArcSwap::new(config),
            watched: Mutex::new(Watched {
                settings: cfg.clone(),
                seen,
            }),
            worker_id,
        })
    }

    pub fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.config.load_full())
    }

    /// A config reload: read the files again (they may have changed, as may the settings).
    pub fn apply(&self, cfg: Option<&TlsConfig>) {
        let Some(cfg) = cfg else {
            log_event(
                "warn",
                "tls_removed_needs_restart",
                serde_json::json!({"worker": self.worker_id}),
            );
            return;
        };
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        watched.settings = cfg.clone();
        self.rebuild(&mut watched, "reload");
    }

    /// Rebuild when a file changed on disk since it was last read.
    pub fn refresh(&self) {
        let mut watched = self.watched.lock().unwrap_or_else(|e| e.into_inner());
        if stamp(&watched.settings) != watched.seen {
            self.rebuild(&mut watched, "files_changed");
        }
    }

    fn rebuild(&self, watched: &mut Watched, why: &str) {
        watched.seen = stamp(&watched.settings);
        match server_config(&watched.settings) {
            Ok(config) => {
                self.config.store(config);
                log_event(
                    "info",
                    "tls_certificates_loaded",
                    serde_json::json!({"worker": self.worker_id, "cause": why}),
                );
            }
            Err(problems) => log_event(
                "error",
                "tls_reload_failed",
                serde_json::json!({
                    "worker": self.worker_id,
                    "cause": why,
                    "error": joined(problems),
                    "keeping": "the certificates in use",
                }),
            ),
        }
    }

    /// Look at the files every `WATCH_INTERVAL` (on the worker's runtime).
    pub fn watch(self: &Arc<Self>) -> tokio::task::JoinHandle<()> {
        let me = self.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(WATCH_INTERVAL);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            tick.tick().await;
            loop {
                tick.tick().await;
                me.refresh();
            }
        })
    }
}

/// What a finished handshake tells the request path.
pub fn connection_info(conn: &rustls::ServerConnection) -> TlsConn {
    let client = conn
        .peer_certificates()
        .and_then(|chain| chain.first())
        .and_then(|leaf| client_identity(leaf))
        .map(Arc::new);
    TlsConn { client }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn canonical_subjects() {
        assert_eq!(canonical_subject("CN=alice,O=Acme"), "CN=alice,O=Acme");
        assert_eq!(canonical_subject("cn=alice, o=Acme Corp"), "CN=alice,O=Acme Corp");
        assert_eq!(canonical_subject("CN=a\\,b , O = x"), "CN=a\\,b,O=x");
        assert_eq!(canonical_subject("CN=a+UID=7,O=x"), "CN=a+UID=7,O=x");
        assert_eq!(canonical_subject("CN=trailing\\ "), "CN=trailing\\ ");
    }

    #[test]
    fn escaping() {
        assert_eq!(escape_value("a,b"), "a\\,b");
        assert_eq!(escape_value("#x "), "\\#x\\ ");
        assert_eq!(escape_value("plain"), "plain");
    }

    fn identity(subject: &str, sans: &[&str]) -> ClientIdentity {
        ClientIdentity {
            subject: subject.into(),
            sans: sans.iter().map(|s| s.to_string()).collect(),
        }
    }

    fn consumers(json: &str) -> BTreeMap<String, ConsumerConfig> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn identify_by_subject_san_or_both() {
        let index = MtlsIndex::build(&consumers(
            r#"{
            "alice": {"credentials": [{"type": "mtls", "id": "a", "subject": "cn=alice, O=Acme"}]},
            "bob": {"credentials": [{"type": "mtls", "id": "b", "san": "bob.example"}]},
            "carol": {"credentials": [{"type": "mtls", "id": "c", "subject": "CN=carol", "san": "spiffe://x/carol"}]},
            "dave": {"credentials": [{"type": "key-auth", "id": "k"}]}
        }"#,
        ));
        assert_eq!(
            index.identify(&identity("CN=alice,O=Acme", &[])),
            Some(("alice", "a"))
        );
        assert_eq!(
            index.identify(&identity("CN=x", &["bob.example"])),
            Some(("bob", "b"))
        );
        assert_eq!(
            index.identify(&identity("CN=carol", &["spiffe://x/carol"])),
            Some(("carol", "c"))
        );
        // Both were given: both must match.
        assert_eq!(index.identify(&identity("CN=carol", &[])), None);
        assert_eq!(
            index.identify(&identity("CN=mallory", &["spiffe://x/carol"])),
            None
        );
        assert_eq!(index.identify(&identity("CN=alice,O=Other", &[])), None);
    }

    #[test]
    fn sni_picks_exact_then_wildcard_then_first() {
        let r = SniResolver {
            keys: Vec::new(),
            exact: HashMap::from([("a.example".into(), 1), ("b.example".into(), 2)]),
            wildcard: HashMap::from([("example".into(), 3)]),
            default: 0,
        };
        assert_eq!(r.pick(None), 0);
        assert_eq!(r.pick(Some("A.Example")), 1);
        assert_eq!(r.pick(Some("b.example")), 2);
        assert_eq!(r.pick(Some("c.example")), 3);
        assert_eq!(r.pick(Some("x.c.example")), 0);
        assert_eq!(r.pick(Some("other.test")), 0);
    }

    #[test]
    fn entities_come_first_and_the_listener_stays_the_default() {
        let r = SniResolver {
            keys: Vec::new(),
            exact: HashMap::new(),
            wildcard: HashMap::new(),
            default: 2,
        };
        assert_eq!(r.pick(None), 2);
        assert_eq!(r.pick(Some("unknown.test")), 2);
    }
}
