//! TLS towards upstreams with rustls: the targets' certificates verified by default (chain,
//! validity period, name) against the system's roots or a configured CA bundle, SNI, an
//! optional client certificate, ALPN http/1.1.
//!
//! One `ClientConfig` per upstream, built when the config loads (the files are read then, so
//! a bad one is a config problem); its session cache lets new connections to the same
//! target resume instead of doing a full handshake. Each target adds the name it is reached
//! by. A reload builds new settings; a pool keeps its connections only while the settings
//! and the files' contents are unchanged.

use crate::config::{ConfigProblem, UpstreamTlsConfig};
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme};
use std::io;
use std::sync::{Arc, OnceLock};

/// An upstream's TLS settings, compiled.
pub struct UpstreamTls {
    /// What it was built from, and a digest of the files it read: equal ones give an
    /// equivalent config, so a reload keeps the pools.
    settings: UpstreamTlsConfig,
    files: u64,
    connector: tokio_rustls::TlsConnector,
    /// The same settings offering only "h2" by ALPN, for HTTP/2 upstreams (`h2client.rs`).
    h2_connector: tokio_rustls::TlsConnector,
}

impl std::fmt::Debug for UpstreamTls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("UpstreamTls")
            .field("settings", &self.settings)
            .finish_non_exhaustive()
    }
}

impl PartialEq for UpstreamTls {
    fn eq(&self, other: &Self) -> bool {
        self.settings == other.settings && self.files == other.files
    }
}

/// How one target is reached over TLS: its upstream's settings and the name it is asked by
/// (sent as SNI, unless it is an IP address, and checked against its certificate).
#[derive(Debug, Clone, PartialEq)]
pub struct TargetTls {
    pub tls: Arc<UpstreamTls>,
    pub name: ServerName<'static>,
}

impl TargetTls {
    /// Handshake over `stream`; the error's message says why it failed (see [`reason`]).
    pub async fn connect(
        &self,
        stream: tokio::net::TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        self.tls.connector.connect(self.name.clone(), stream).await
    }

    /// [`connect`](TargetTls::connect) for an HTTP/2 upstream.
    pub async fn connect_h2(
        &self,
        stream: tokio::net::TcpStream,
    ) -> io::Result<tokio_rustls::client::TlsStream<tokio::net::TcpStream>> {
        self.tls.h2_connector.connect(self.name.clone(), stream).await
    }
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// The system's trusted roots, read once per process (a reload does not read them again).
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            // Unreadable or unparsable system certificates are skipped, as a browser does.
            roots.add_parsable_certificates(rustls_native_certs::load_native_certs().certs);
            Arc::new(roots)
        })
        .clone()
}

impl UpstreamTls {
    /// Read the files and build the client config; problems are located under `at`
    /// (`upstreams.billing.tls`).
    pub fn build(cfg: &UpstreamTlsConfig, at: &str) -> Result<Arc<UpstreamTls>, Vec<ConfigProblem>> {
        let provider = provider();
        let mut problems = Vec::new();
        let mut digest = Vec::new();
        let versions: &[&rustls::SupportedProtocolVersion] = match cfg.min_version.as_str() {
            "1.2" => &[&rustls::version::TLS13, &rustls::version::TLS12],
            "1.3" => &[&rustls::version::TLS13],
            other => {
                problems.push(ConfigProblem::new(
                    format!("{at}.min_version"),
                    format!("'{other}' is not a TLS version we accept (1.2 or 1.3)"),
                ));
                &[&rustls::version::TLS13]
            }
        };
        let roots = match &cfg.ca {
            None => Some(system_roots()),
            Some(ca) => match ca_roots(ca, &mut digest) {
                Ok(r) => Some(Arc::new(r)),
                Err(e) => {
                    problems.push(ConfigProblem::new(format!("{at}.ca"), e));
                    None
                }
            },
        };
        let identity = match (&cfg.client_cert, &cfg.client_key) {
            (None, None) => None,
            (Some(_), None) => {
                problems.push(ConfigProblem::new(
                    format!("{at}.client_key"),
                    "a client certificate needs its private key (client_key)",
                ));
                None
            }
            (None, Some(_)) => {
                problems.push(ConfigProblem::new(
                    format!("{at}.client_cert"),
                    "a client key needs its certificate (client_cert)",
                ));
                None
            }
            (Some(cert), Some(key)) => {
                let chain = crate::tls::load_chain(cert)
                    .map_err(|e| problems.push(ConfigProblem::new(format!("{at}.client_cert"), e)))
                    .ok();
                let der = crate::tls::load_key(key)
                    .map_err(|e| problems.push(ConfigProblem::new(format!("{at}.client_key"), e)))
                    .ok();
                for path in [cert, key] {
                    digest.extend_from_slice(&std::fs::read(path).unwrap_or_default());
                }
                chain.zip(der)
            }
        };
        if let Some(sni) = &cfg.sni {
            if ServerName::try_from(sni.as_str()).is_err() {
                problems.push(ConfigProblem::new(
                    format!("{at}.sni"),
                    format!("'{sni}' is not a DNS name or an IP address"),
                ));
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(versions)
            .map_err(|e| vec![ConfigProblem::new(at, e.to_string())])?;
        let builder = if cfg.verify {
            builder.with_root_certificates(roots.expect("no problems means the roots loaded"))
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(NoVerification(provider)))
        };
        let mut config = match identity {
            None => builder.with_no_client_auth(),
            Some((chain, key)) => builder.with_client_auth_cert(chain, key).map_err(|e| {
                vec![ConfigProblem::new(
                    format!("{at}.client_key"),
                    format!("unusable with the certificate in client_cert: {e}"),
                )]
            })?,
        };
        // HTTP/2 towards upstreams is not spoken; saying so lets an upstream that would
        // pick h2 by ALPN stay on HTTP/1.1.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        let mut h2 = config.clone();
        h2.alpn_protocols = vec![b"h2".to_vec()];
        Ok(Arc::new(UpstreamTls {
            settings: cfg.clone(),
            files: crate::balancer::hash64(&digest),
            connector: tokio_rustls::TlsConnector::from(Arc::new(config)),
            h2_connector: tokio_rustls::TlsConnector::from(Arc::new(h2)),
        }))
    }

    /// Whether the targets' certificates are checked.
    pub fn verifies(&self) -> bool {
        self.settings.verify
    }

    /// The TLS side of the target at `address` (`host:port`, `[v6]:port`).
    pub fn for_target(self: &Arc<Self>, address: &str) -> Result<TargetTls, String> {
        let name = server_name(self.settings.sni.as_deref(), address)?;
        Ok(TargetTls {
            tls: self.clone(),
            name,
        })
    }
}

fn ca_roots(ca: &str, digest: &mut Vec<u8>) -> Result<RootCertStore, String> {
    let mut roots = RootCertStore::empty();
    for cert in crate::tls::load_chain(ca)? {
        digest.extend_from_slice(&cert);
        roots
            .add(cert)
            .map_err(|e| format!("{ca}: not a usable CA certificate: {e}"))?;
    }
    Ok(roots)
}

/// The name a target is asked by: `sni` when set, else the host of its address (an IP
/// literal is verified against the certificate's IP addresses and sends no SNI).
pub fn server_name(sni: Option<&str>, address: &str) -> Result<ServerName<'static>, String> {
    let host = match sni {
        Some(s) => s,
        None => {
            let host = address.rsplit_once(':').map_or(address, |(h, _)| h);
            host.strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host)
        }
    };
    ServerName::try_from(host.to_string()).map_err(|_| format!("'{host}' is not a DNS name or an IP address"))
}

/// What went wrong in a handshake (or in the alert that ended a connection), in words fit
/// for an error message and a log line: never a key, never a file's contents.
pub fn reason(e: &io::Error) -> String {
    let Some(tls) = e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>()) else {
        return e.to_string();
    };
    match tls {
        rustls::Error::InvalidCertificate(c) => {
            format!("certificate verification failed: {}", certificate_reason(c))
        }
        rustls::Error::AlertReceived(alert) => {
            format!("the upstream refused the handshake (alert: {alert:?})")
        }
        rustls::Error::NoApplicationProtocol => "no common application protocol (ALPN)".into(),
        other => other.to_string(),
    }
}

/// Whether `e` is a certificate the gateway refused (not a network problem).
pub fn is_verification_failure(e: &io::Error) -> bool {
    matches!(tls_error(e), Some(rustls::Error::InvalidCertificate(_)))
}

/// The TLS error inside an I/O error, if it is one. A TLS 1.3 upstream that refuses the
/// gateway's client certificate says so after the gateway's side of the handshake is done:
/// that alert arrives as the first read's error.
pub fn tls_error(e: &io::Error) -> Option<&rustls::Error> {
    e.get_ref().and_then(|i| i.downcast_ref::<rustls::Error>())
}

fn certificate_reason(c: &CertificateError) -> String {
    match c {
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => "certificate expired".into(),
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            "certificate not yet valid".into()
        }
        CertificateError::UnknownIssuer => "unknown issuer".into(),
        CertificateError::NotValidForName => "certificate not valid for the name asked".into(),
        CertificateError::NotValidForNameContext { expected, presented } => {
            let expected = match expected {
                ServerName::DnsName(d) => d.as_ref().to_string(),
                ServerName::IpAddress(ip) => std::net::IpAddr::from(*ip).to_string(),
                other => format!("{other:?}"),
            };
            format!(
                "certificate not valid for '{expected}' (it is for {})",
                presented.join(", ")
            )
        }
        CertificateError::Revoked => "certificate revoked".into(),
        CertificateError::BadSignature => "bad certificate signature".into(),
        CertificateError::BadEncoding => "certificate badly encoded".into(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            "certificate not for server authentication".into()
        }
        other => format!("{other:?}"),
    }
}

/// `verify: false`: any certificate is taken, but the handshake's signatures are still
/// checked by the provider (the connection is encrypted, not authenticated).
#[derive(Debug)]
struct NoVerification(Arc<CryptoProvider>);

impl ServerCertVerifier for NoVerification {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.0.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_come_from_sni_or_the_target_host() {
        assert_eq!(
            server_name(None, "api.example.test:8443").unwrap(),
            ServerName::try_from("api.example.test").unwrap()
        );
        assert!(matches!(
            server_name(None, "127.0.0.1:443").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert!(matches!(
            server_name(None, "[::1]:443").unwrap(),
            ServerName::IpAddress(_)
        ));
        assert_eq!(
            server_name(Some("billing.internal"), "10.0.0.1:8443").unwrap(),
            ServerName::try_from("billing.internal").unwrap()
        );
        assert!(server_name(Some("bad name"), "10.0.0.1:8443").is_err());
    }

    fn wrapped(e: rustls::Error) -> io::Error {
        io::Error::new(io::ErrorKind::InvalidData, e)
    }

    #[test]
    fn reasons_name_the_check_that_failed() {
        let e = wrapped(rustls::Error::InvalidCertificate(CertificateError::Expired));
        assert_eq!(reason(&e), "certificate verification failed: certificate expired");
        assert!(is_verification_failure(&e));
        let e = wrapped(rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer));
        assert_eq!(reason(&e), "certificate verification failed: unknown issuer");
        let e = wrapped(rustls::Error::InvalidCertificate(
            CertificateError::NotValidForNameContext {
                expected: ServerName::try_from("a.test").unwrap().to_owned(),
                presented: vec!["DnsName(\"b.test\")".into()],
            },
        ));
        assert!(reason(&e).contains("not valid for 'a.test'"), "{}", reason(&e));
        let e = wrapped(rustls::Error::AlertReceived(
            rustls::AlertDescription::CertificateRequired,
        ));
        assert!(reason(&e).contains("refused the handshake"));
        assert!(!is_verification_failure(&e));
        let plain = io::Error::new(io::ErrorKind::ConnectionReset, "reset");
        assert_eq!(reason(&plain), "reset");
    }

    fn settings(ca: Option<&str>) -> UpstreamTlsConfig {
        UpstreamTlsConfig {
            verify: true,
            ca: ca.map(str::to_string),
            sni: None,
            client_cert: None,
            client_key: None,
            min_version: "1.2".into(),
        }
    }

    #[test]
    fn bad_settings_are_problems_at_their_place() {
        let problems =
            UpstreamTls::build(&settings(Some("/nonexistent/ca.pem")), "upstreams.a.tls").unwrap_err();
        assert_eq!(problems[0].path, "upstreams.a.tls.ca");
        assert!(
            problems[0].message.contains("cannot read"),
            "{}",
            problems[0].message
        );
        let mut s = settings(None);
        s.client_cert = Some("/nonexistent/c.pem".into());
        s.min_version = "1.1".into();
        let paths: Vec<String> = UpstreamTls::build(&s, "u")
            .unwrap_err()
            .into_iter()
            .map(|p| p.path)
            .collect();
        assert_eq!(paths, ["u.min_version", "u.client_key"]);
        let a = UpstreamTls::build(&settings(None), "u").unwrap();
        let b = UpstreamTls::build(&settings(None), "u").unwrap();
        assert_eq!(*a, *b, "same settings and files: the pools are kept");
    }
}
