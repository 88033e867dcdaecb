//! TLS to PostgreSQL with rustls, configured from libpq's parameters.
//!
//! What each `sslmode` checks, as in libpq:
//!
//! * `require`, `prefer`, `allow` without root certificates: encryption only, the
//!   certificate is not checked (the handshake's signatures still are).
//! * `verify-ca`, and `require`/`prefer`/`allow` *with* root certificates (an explicit
//!   `sslrootcert` or `~/.postgresql/root.crt`): the chain must lead to a root.
//! * `verify-full`: the chain, and the certificate must name the `host` (never the
//!   `hostaddr`).
//!
//! A certificate that fails its check ends the connection with the reason (unknown
//! issuer, name mismatch, expired, revoked...): `prefer` and `allow` fall back to
//! plaintext only when the server refuses TLS, never after a failed check (libpq would
//! retry in plaintext; outboxd does not, so a forged certificate cannot buy a
//! plaintext session).

use std::fmt;
use std::future::Future;
use std::io;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::WebPkiSupportedAlgorithms;
use rustls::pki_types::pem::PemObject as _;
use rustls::pki_types::{
    CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime,
};
use rustls::{
    CertificateError, ClientConfig, DigitallySignedStruct, RootCertStore, SignatureScheme,
};
use sha2::Digest as _;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_postgres::Socket;
use tokio_postgres::tls::{ChannelBinding, MakeTlsConnect, TlsConnect};

use super::conninfo::{ConnInfoError, RootCert, SslCertMode, SslMode, TlsParams, TlsVersion};

/// PostgreSQL 17's ALPN protocol name, required by a direct TLS handshake and
/// harmless to older servers, which ignore it (libpq 17 always sends it).
const ALPN_POSTGRESQL: &[u8] = b"postgresql";

/// The TLS side of a connection: a rustls configuration built once from the
/// connection string (files read, roots loaded), shared by every connection.
#[derive(Clone)]
pub struct MakeRustls {
    config: Arc<ClientConfig>,
    /// What the certificate is checked against, for error messages.
    checked_against: Arc<str>,
}

impl fmt::Debug for MakeRustls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("MakeRustls")
            .field("checked_against", &self.checked_against)
            .finish_non_exhaustive()
    }
}

/// `$HOME`, where libpq looks for `~/.postgresql/` defaults.
pub fn home_dir() -> Option<PathBuf> {
    std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
}

impl MakeRustls {
    /// Builds the TLS configuration for `params`, reading every file now so that a
    /// missing or unreadable one is reported at start, naming its parameter. `home`
    /// holds libpq's default files (`.postgresql/root.crt`, `root.crl`,
    /// `postgresql.crt`, `postgresql.key`). With `sslmode=disable` no file is read and
    /// the configuration is never used.
    pub fn new(params: &TlsParams, home: Option<&Path>) -> Result<Self, ConnInfoError> {
        if params.mode == SslMode::Disable {
            let provider = rustls::crypto::aws_lc_rs::default_provider();
            let verifier = Arc::new(AcceptAnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            });
            let config = ClientConfig::builder_with_provider(Arc::new(provider))
                .with_safe_default_protocol_versions()
                .map_err(|e| ConnInfoError {
                    parameter: Some("sslmode".to_owned()),
                    message: e.to_string(),
                })?
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            return Ok(Self {
                config: Arc::new(config),
                checked_against: "nothing (sslmode=disable)".into(),
            });
        }
        let default_file = |name: &str| {
            home.map(|h| h.join(".postgresql").join(name))
                .filter(|p| p.exists())
        };
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());

        let (roots, checked_against) = match &params.rootcert {
            RootCert::File(path) => (
                Some(load_roots(path)?),
                format!("sslrootcert={}", path.display()),
            ),
            RootCert::System => (
                Some(system_roots()?),
                "the platform's roots (sslrootcert=system)".to_owned(),
            ),
            RootCert::Default => match default_file("root.crt") {
                Some(path) => {
                    let roots = load_roots(&path)?;
                    (Some(roots), path.display().to_string())
                }
                None => (None, "nothing (no root certificates)".to_owned()),
            },
        };
        let verifier: Arc<dyn ServerCertVerifier> = match roots {
            None if params.mode.verifies() => {
                return Err(ConnInfoError {
                    parameter: Some("sslrootcert".to_owned()),
                    message: format!(
                        "sslmode={} checks the server's certificate and needs root certificates: \
                         give sslrootcert=FILE (a CA's PEM file) or sslrootcert=system \
                         (~/.postgresql/root.crt does not exist)",
                        params.mode.as_str()
                    ),
                });
            }
            None => Arc::new(AcceptAnyCertificate {
                algorithms: provider.signature_verification_algorithms,
            }),
            Some(roots) => {
                let roots = Arc::new(roots);
                let build = |crls: Vec<CertificateRevocationListDer<'static>>| {
                    WebPkiServerVerifier::builder_with_provider(
                        Arc::clone(&roots),
                        Arc::clone(&provider),
                    )
                    .with_crls(crls)
                    .build()
                };
                // With roots, only a CRL that does not parse fails the build: try each
                // file alone first, so the error names the file and its parameter.
                let mut crls = Vec::new();
                for (parameter, path, file_crls) in load_crls(params, default_file("root.crl"))? {
                    build(file_crls.clone()).map_err(|e| ConnInfoError {
                        parameter: Some(parameter.to_owned()),
                        message: format!("{}: {e}", path.display()),
                    })?;
                    crls.extend(file_crls);
                }
                let inner = build(crls).map_err(|e| ConnInfoError {
                    parameter: Some("sslrootcert".to_owned()),
                    message: e.to_string(),
                })?;
                Arc::new(ChainVerifier {
                    inner,
                    check_name: params.mode == SslMode::VerifyFull,
                })
            }
        };

        let mut versions = Vec::new();
        let max = params.max_version.unwrap_or(TlsVersion::V1_3);
        if params.min_version <= TlsVersion::V1_2 && max >= TlsVersion::V1_2 {
            versions.push(&rustls::version::TLS12);
        }
        if max >= TlsVersion::V1_3 {
            versions.push(&rustls::version::TLS13);
        }
        let builder = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&versions)
            .map_err(|e| ConnInfoError {
                parameter: Some("ssl_min_protocol_version".to_owned()),
                message: e.to_string(),
            })?
            .dangerous()
            .with_custom_certificate_verifier(verifier);
        let mut config = match client_certificate(params, default_file)? {
            Some((chain, key)) => {
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| ConnInfoError {
                        parameter: Some("sslkey".to_owned()),
                        message: format!("does not fit sslcert: {e}"),
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_POSTGRESQL.to_vec()];
        config.enable_sni = params.sni;
        Ok(Self {
            config: Arc::new(config),
            checked_against: checked_against.into(),
        })
    }
}

fn read(parameter: &str, path: &Path) -> Result<Vec<u8>, ConnInfoError> {
    std::fs::read(path).map_err(|e| ConnInfoError {
        parameter: Some(parameter.to_owned()),
        message: format!("cannot read {}: {e}", path.display()),
    })
}

fn load_roots(path: &Path) -> Result<RootCertStore, ConnInfoError> {
    let bad = |message: String| ConnInfoError {
        parameter: Some("sslrootcert".to_owned()),
        message,
    };
    let pem = read("sslrootcert", path)?;
    let mut roots = RootCertStore::empty();
    for cert in CertificateDer::pem_slice_iter(&pem) {
        let cert = cert.map_err(|e| bad(format!("{}: {e}", path.display())))?;
        roots
            .add(cert)
            .map_err(|e| bad(format!("{}: {e}", path.display())))?;
    }
    if roots.is_empty() {
        return Err(bad(format!("{} holds no PEM certificate", path.display())));
    }
    Ok(roots)
}

fn system_roots() -> Result<RootCertStore, ConnInfoError> {
    let found = rustls_native_certs::load_native_certs();
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(found.certs);
    if added == 0 {
        let errors: Vec<String> = found.errors.iter().map(|e| e.to_string()).collect();
        return Err(ConnInfoError {
            parameter: Some("sslrootcert".to_owned()),
            message: format!(
                "system: the platform has no usable root certificates ({})",
                if errors.is_empty() {
                    "none found; install ca-certificates or set SSL_CERT_FILE".to_owned()
                } else {
                    errors.join("; ")
                }
            ),
        });
    }
    Ok(roots)
}

/// `sslcrl` (or `~/.postgresql/root.crl`) and every file in `sslcrldir`. With CRLs,
/// every certificate in the chain must be covered by one, as libpq asks of OpenSSL
/// (`X509_V_FLAG_CRL_CHECK_ALL`).
fn load_crls(params: &TlsParams, default: Option<PathBuf>) -> Result<Vec<CrlFile>, ConnInfoError> {
    let mut files = Vec::new();
    match &params.crl {
        Some(path) => files.push(("sslcrl", path.clone())),
        None => files.extend(default.map(|p| ("sslcrl", p))),
    }
    if let Some(dir) = &params.crldir {
        let entries = std::fs::read_dir(dir).map_err(|e| ConnInfoError {
            parameter: Some("sslcrldir".to_owned()),
            message: format!("cannot read {}: {e}", dir.display()),
        })?;
        for entry in entries.flatten() {
            if entry.path().is_file() {
                files.push(("sslcrldir", entry.path()));
            }
        }
    }
    let mut crls = Vec::new();
    for (parameter, path) in files {
        let pem = read(parameter, &path)?;
        let file_crls = CertificateRevocationListDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| ConnInfoError {
                parameter: Some(parameter.to_owned()),
                message: format!("{}: {e}", path.display()),
            })?;
        crls.push((parameter, path, file_crls));
    }
    Ok(crls)
}

/// The CRLs of one file, with the parameter that named it.
type CrlFile = (
    &'static str,
    PathBuf,
    Vec<CertificateRevocationListDer<'static>>,
);

type ClientCertificate = (Vec<CertificateDer<'static>>, PrivateKeyDer<'static>);

/// The client certificate and key, if any: `sslcert`/`sslkey`, or libpq's defaults
/// `~/.postgresql/postgresql.crt`/`.key` when they exist. Unlike libpq, a `sslcert`
/// that is named but missing is an error rather than "no certificate", so a typo shows.
fn client_certificate(
    params: &TlsParams,
    default_file: impl Fn(&str) -> Option<PathBuf>,
) -> Result<Option<ClientCertificate>, ConnInfoError> {
    if params.certmode == SslCertMode::Disable {
        return Ok(None);
    }
    let Some(cert_path) = params
        .cert
        .clone()
        .or_else(|| default_file("postgresql.crt"))
    else {
        return Ok(None);
    };
    let pem = read("sslcert", &cert_path)?;
    let chain = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| ConnInfoError {
            parameter: Some("sslcert".to_owned()),
            message: format!("{}: {e}", cert_path.display()),
        })?;
    if chain.is_empty() {
        return Err(ConnInfoError {
            parameter: Some("sslcert".to_owned()),
            message: format!("{} holds no PEM certificate", cert_path.display()),
        });
    }
    let Some(key_path) = params
        .key
        .clone()
        .or_else(|| default_file("postgresql.key"))
    else {
        return Err(ConnInfoError {
            parameter: Some("sslkey".to_owned()),
            message: format!(
                "not given, and ~/.postgresql/postgresql.key does not exist, for the certificate \
                 {}",
                cert_path.display()
            ),
        });
    };
    check_key_permissions(&key_path)?;
    let pem = read("sslkey", &key_path)?;
    let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|e| ConnInfoError {
        parameter: Some("sslkey".to_owned()),
        message: format!(
            "{}: no usable private key ({e}); PKCS#8, PKCS#1 or SEC1 PEM, not encrypted",
            key_path.display()
        ),
    })?;
    Ok(Some((chain, key)))
}

/// libpq refuses a private key file that others may read: so does outboxd. A file
/// owned by root may be group-readable (0640), for keys managed by the system.
#[cfg(unix)]
fn check_key_permissions(path: &Path) -> Result<(), ConnInfoError> {
    use std::os::unix::fs::MetadataExt as _;
    let meta = std::fs::metadata(path).map_err(|e| ConnInfoError {
        parameter: Some("sslkey".to_owned()),
        message: format!("cannot read {}: {e}", path.display()),
    })?;
    let mode = meta.mode() & 0o777;
    let too_open = if meta.uid() == 0 {
        mode & 0o037 != 0
    } else {
        mode & 0o077 != 0
    };
    if too_open {
        return Err(ConnInfoError {
            parameter: Some("sslkey".to_owned()),
            message: format!(
                "{} has group or world access ({mode:o}); it must be u=rw (0600) or less, or \
                 u=rw,g=r (0640) or less if owned by root",
                path.display()
            ),
        });
    }
    Ok(())
}

#[cfg(not(unix))]
fn check_key_permissions(_: &Path) -> Result<(), ConnInfoError> {
    Ok(())
}

/// `verify-ca` and `verify-full`: webpki checks the chain (and CRLs); for `verify-ca`
/// a name mismatch alone is forgiven. webpki checks the name only after the chain has
/// verified, so forgiving it never forgives anything else.
#[derive(Debug)]
struct ChainVerifier {
    inner: Arc<WebPkiServerVerifier>,
    check_name: bool,
}

impl ServerCertVerifier for ChainVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        match self.inner.verify_server_cert(
            end_entity,
            intermediates,
            server_name,
            ocsp_response,
            now,
        ) {
            Err(rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            )) if !self.check_name => Ok(ServerCertVerified::assertion()),
            other => other,
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// `require`/`prefer`/`allow` without roots: libpq encrypts without checking who it
/// talks to. The handshake signatures are still verified, so the session is at least
/// bound to the certificate's key.
#[derive(Debug)]
struct AcceptAnyCertificate {
    algorithms: WebPkiSupportedAlgorithms,
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.algorithms.supported_schemes()
    }
}

/// A TLS failure, worded for the operator: what was refused and why.
#[derive(Debug)]
pub struct TlsError(String);

impl fmt::Display for TlsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for TlsError {}

impl TlsError {
    fn handshake(e: &io::Error, checked_against: &str) -> Self {
        let rustls_error = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        Self(match rustls_error {
            Some(rustls::Error::InvalidCertificate(reason)) => format!(
                "the server's certificate was refused: {} (checked against {checked_against})",
                certificate_reason(reason)
            ),
            Some(rustls::Error::AlertReceived(alert)) => format!(
                "the server ended the TLS handshake with the alert {alert:?}{}",
                match alert {
                    rustls::AlertDescription::CertificateRequired
                    | rustls::AlertDescription::UnknownCA
                    | rustls::AlertDescription::BadCertificate
                    | rustls::AlertDescription::CertificateUnknown => {
                        ": it wants a client certificate it trusts (sslcert, sslkey)"
                    }
                    _ => "",
                }
            ),
            Some(other) => format!("TLS handshake failed: {other}"),
            None => format!("TLS handshake failed: {e}"),
        })
    }
}

/// Why a certificate was refused, in words.
pub fn certificate_reason(reason: &CertificateError) -> String {
    match reason {
        CertificateError::UnknownIssuer => {
            "unknown issuer: it does not chain to a trusted root certificate".to_owned()
        }
        CertificateError::NotValidForName => {
            "name mismatch: it does not name the host connected to".to_owned()
        }
        CertificateError::NotValidForNameContext {
            expected,
            presented,
        } => format!(
            "name mismatch: it is not valid for the host {:?} (it names {})",
            expected.to_str(),
            if presented.is_empty() {
                "no host at all".to_owned()
            } else {
                presented.join(", ")
            }
        ),
        CertificateError::Expired | CertificateError::ExpiredContext { .. } => {
            format!("expired ({reason})")
        }
        CertificateError::NotValidYet | CertificateError::NotValidYetContext { .. } => {
            format!("not valid yet ({reason})")
        }
        CertificateError::Revoked => "revoked (listed in sslcrl or sslcrldir)".to_owned(),
        CertificateError::UnknownRevocationStatus => {
            "unknown revocation status: no CRL in sslcrl or sslcrldir covers its issuer".to_owned()
        }
        CertificateError::ExpiredRevocationList
        | CertificateError::ExpiredRevocationListContext { .. } => {
            format!("the CRL has expired ({reason})")
        }
        CertificateError::BadSignature => "bad signature".to_owned(),
        CertificateError::InvalidPurpose | CertificateError::InvalidPurposeContext { .. } => {
            format!("not a TLS server certificate ({reason})")
        }
        other => other.to_string(),
    }
}

impl MakeTlsConnect<Socket> for MakeRustls {
    type Stream = RustlsStream;
    type TlsConnect = RustlsConnect;
    type Error = TlsError;

    fn make_tls_connect(&mut self, domain: &str) -> Result<RustlsConnect, TlsError> {
        // The driver asks for a connector for every host, a Unix socket's too (with an
        // empty name), even where it will not use TLS: over a socket it never does
        // (`Connector::attempts`), so no name is needed there.
        let name = match domain {
            "" => None,
            _ => Some(ServerName::try_from(domain.to_owned()).map_err(|e| {
                TlsError(format!("{domain:?} is not a valid TLS server name: {e}"))
            })?),
        };
        Ok(RustlsConnect {
            connector: tokio_rustls::TlsConnector::from(Arc::clone(&self.config)),
            name,
            checked_against: Arc::clone(&self.checked_against),
        })
    }
}

/// One connection's handshake.
pub struct RustlsConnect {
    connector: tokio_rustls::TlsConnector,
    /// `None` for a Unix socket, where TLS is never used.
    name: Option<ServerName<'static>>,
    checked_against: Arc<str>,
}

impl TlsConnect<Socket> for RustlsConnect {
    type Stream = RustlsStream;
    type Error = TlsError;
    type Future = Pin<Box<dyn Future<Output = Result<RustlsStream, TlsError>> + Send>>;

    fn connect(self, stream: Socket) -> Self::Future {
        Box::pin(async move {
            let name = self
                .name
                .ok_or_else(|| TlsError("TLS is not used over a Unix socket".to_owned()))?;
            self.connector
                .connect(name, stream)
                .await
                .map(|s| RustlsStream(Box::new(s)))
                .map_err(|e| TlsError::handshake(&e, &self.checked_against))
        })
    }
}

/// A TLS session to PostgreSQL.
pub struct RustlsStream(Box<tokio_rustls::client::TlsStream<Socket>>);

impl AsyncRead for RustlsStream {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_read(cx, buf)
    }
}

impl AsyncWrite for RustlsStream {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut *self.0).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut *self.0).poll_shutdown(cx)
    }
}

impl tokio_postgres::tls::TlsStream for RustlsStream {
    /// `tls-server-end-point` (RFC 5929) for SCRAM-SHA-256-PLUS: the server
    /// certificate's hash, with the hash of its signature algorithm (SHA-256 for MD5
    /// and SHA-1), as PostgreSQL computes it.
    fn channel_binding(&self) -> ChannelBinding {
        let (_, session) = self.0.get_ref();
        session
            .peer_certificates()
            .and_then(|certs| certs.first())
            .and_then(|cert| tls_server_end_point(cert))
            .map_or_else(ChannelBinding::none, ChannelBinding::tls_server_end_point)
    }
}

/// The `tls-server-end-point` binding of a DER certificate, or `None` for a signature
/// algorithm without one (Ed25519, RSA-PSS: PostgreSQL has none for them either).
pub fn tls_server_end_point(der: &[u8]) -> Option<Vec<u8>> {
    // DER OID contents of the signature algorithms PostgreSQL's servers can bind.
    const SHA256: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x04], // md5WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x05], // sha1WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0b], // sha256WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x01],             // ecdsa-with-SHA1
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02],       // ecdsa-with-SHA256
    ];
    const SHA384: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0c], // sha384WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03],       // ecdsa-with-SHA384
    ];
    const SHA512: &[&[u8]] = &[
        &[0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d], // sha512WithRSAEncryption
        &[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x04],       // ecdsa-with-SHA512
    ];
    let oid = signature_algorithm(der)?;
    if SHA256.contains(&oid) {
        Some(sha2::Sha256::digest(der).to_vec())
    } else if SHA384.contains(&oid) {
        Some(sha2::Sha384::digest(der).to_vec())
    } else if SHA512.contains(&oid) {
        Some(sha2::Sha512::digest(der).to_vec())
    } else {
        None
    }
}

/// The OID of `Certificate.signatureAlgorithm`:
/// `SEQUENCE { tbsCertificate SEQUENCE, signatureAlgorithm SEQUENCE { OID, ... }, ... }`.
fn signature_algorithm(der: &[u8]) -> Option<&[u8]> {
    let (certificate, _) = der_element(der, 0x30)?;
    let (_tbs, rest) = der_element(certificate, 0x30)?;
    let (algorithm, _) = der_element(rest, 0x30)?;
    let (oid, _) = der_element(algorithm, 0x06)?;
    Some(oid)
}

/// One DER element with tag `tag` at the start of `input`: its contents and the rest.
fn der_element(input: &[u8], tag: u8) -> Option<(&[u8], &[u8])> {
    let (&first, rest) = input.split_first()?;
    if first != tag {
        return None;
    }
    let (&len, rest) = rest.split_first()?;
    let (len, rest) = if len < 0x80 {
        (usize::from(len), rest)
    } else {
        let n = usize::from(len & 0x7f);
        if n == 0 || n > 4 || rest.len() < n {
            return None;
        }
        let len = rest[..n]
            .iter()
            .fold(0usize, |acc, b| (acc << 8) | usize::from(*b));
        (len, &rest[n..])
    };
    (rest.len() >= len).then(|| rest.split_at(len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::conninfo::ConnInfo;

    fn params(s: &str) -> TlsParams {
        ConnInfo::parse(s).expect("valid").tls
    }

    #[test]
    fn der_walk_finds_the_signature_algorithm() {
        // SEQUENCE { SEQUENCE {}, SEQUENCE { OID 1.2.840.10045.4.3.2 }, BIT STRING }
        let cert = [
            0x30, 0x10, 0x30, 0x00, 0x30, 0x0a, 0x06, 0x08, 0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04,
            0x03, 0x02, 0x03, 0x00,
        ];
        assert_eq!(
            signature_algorithm(&cert),
            Some(&[0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x02][..])
        );
        assert_eq!(tls_server_end_point(&cert).map(|h| h.len()), Some(32));
        // Truncated or mistagged input is no certificate.
        assert_eq!(signature_algorithm(&cert[..10]), None);
        assert_eq!(signature_algorithm(&[0x31, 0x00]), None);
        assert_eq!(signature_algorithm(&[]), None);
        // Long-form lengths.
        let mut long = vec![0x30, 0x81, 0x10];
        long.extend_from_slice(&cert[2..]);
        assert!(signature_algorithm(&long).is_some());
    }

    #[test]
    fn only_verification_needs_roots() {
        // Nothing to read for these.
        for mode in ["disable", "require", "prefer", "allow"] {
            MakeRustls::new(&params(&format!("host=h sslmode={mode}")), None).unwrap();
        }
        for mode in ["verify-ca", "verify-full"] {
            let e = MakeRustls::new(&params(&format!("host=h sslmode={mode}")), None).unwrap_err();
            assert_eq!(e.parameter.as_deref(), Some("sslrootcert"), "{e}");
            assert!(e.message.contains("sslrootcert=system"), "{e}");
        }
    }

    #[test]
    fn missing_files_are_named() {
        for (s, param) in [
            (
                "host=h sslmode=verify-ca sslrootcert=/nonexistent/ca.pem",
                "sslrootcert",
            ),
            (
                "host=h sslmode=require sslcert=/nonexistent/c.pem",
                "sslcert",
            ),
        ] {
            let e = MakeRustls::new(&params(s), None).unwrap_err();
            assert_eq!(e.parameter.as_deref(), Some(param), "{e}");
            assert!(e.message.contains("/nonexistent/"), "{e}");
        }
    }

    /// A directory of files for one test, removed when dropped.
    struct Files(PathBuf);

    impl Files {
        fn new(label: &str) -> Self {
            let dir = std::env::temp_dir().join(format!(
                "outboxd-tls-{label}-{}-{}",
                std::process::id(),
                rand::random::<u64>()
            ));
            std::fs::create_dir_all(&dir).expect("a temporary directory");
            Self(dir)
        }

        /// Writes `name` (owner-only, as a key must be) and returns its path.
        fn write(&self, name: &str, contents: &str) -> PathBuf {
            use std::os::unix::fs::PermissionsExt as _;
            let path = self.0.join(name);
            if let Some(parent) = path.parent() {
                std::fs::create_dir_all(parent).expect("a directory");
            }
            std::fs::write(&path, contents).expect("write a file");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))
                .expect("chmod 600");
            path
        }
    }

    impl Drop for Files {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA (its issuer and PEM) and a client certificate it signed (PEM, key PEM).
    fn certificates() -> (rcgen::Issuer<'static, rcgen::KeyPair>, String, String, String) {
        let ca_key = rcgen::KeyPair::generate().expect("a CA key");
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca.key_usages = vec![
            rcgen::KeyUsagePurpose::KeyCertSign,
            rcgen::KeyUsagePurpose::CrlSign,
        ];
        let ca_pem = ca.self_signed(&ca_key).expect("self-sign").pem();
        let issuer = rcgen::Issuer::new(ca, ca_key);
        let key = rcgen::KeyPair::generate().expect("a key");
        let cert = rcgen::CertificateParams::new(Vec::<String>::new())
            .expect("params")
            .signed_by(&key, &issuer)
            .expect("sign");
        (issuer, ca_pem, cert.pem(), key.serialize_pem())
    }

    fn refused(conninfo: &str, home: Option<&Path>) -> ConnInfoError {
        match MakeRustls::new(&params(conninfo), home) {
            Ok(_) => panic!("{conninfo} must be refused"),
            Err(e) => e,
        }
    }

    #[test]
    fn unusable_files_are_refused_naming_their_parameter() {
        let files = Files::new("bad");
        let (_, ca, cert, key) = certificates();
        let ca = files.write("ca.pem", &ca);
        let cert = files.write("client.crt", &cert);
        let key = files.write("client.key", &key);
        let empty = files.write("empty.pem", "no PEM here\n");
        let garbled = files.write(
            "garbled.pem",
            "-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n",
        );
        let garbled_crl = files.write(
            "garbled.crl",
            "-----BEGIN X509 CRL-----\n!!!!\n-----END X509 CRL-----\n",
        );
        let (_, _, other_cert, _) = certificates();
        let other_cert = files.write("other.crt", &other_cert);
        let verify = format!("host=h sslmode=verify-full sslrootcert={}", ca.display());
        for (conninfo, parameter, says) in [
            (
                format!("host=h sslmode=verify-ca sslrootcert={}", empty.display()),
                "sslrootcert",
                "holds no PEM certificate",
            ),
            (
                format!("host=h sslmode=verify-ca sslrootcert={}", garbled.display()),
                "sslrootcert",
                "garbled.pem",
            ),
            (
                format!("{verify} sslcrl={}", garbled_crl.display()),
                "sslcrl",
                "garbled.crl",
            ),
            (
                format!("{verify} sslcrldir={}", files.0.join("nodir").display()),
                "sslcrldir",
                "cannot read",
            ),
            (
                format!("host=h sslmode=require sslcert={}", empty.display()),
                "sslcert",
                "holds no PEM certificate",
            ),
            (
                format!("host=h sslmode=require sslcert={}", garbled.display()),
                "sslcert",
                "garbled.pem",
            ),
            // A certificate needs its key: libpq's default file does not exist here.
            (
                format!("host=h sslmode=require sslcert={}", cert.display()),
                "sslkey",
                "postgresql.key does not exist",
            ),
            (
                format!(
                    "host=h sslmode=require sslcert={} sslkey={}",
                    cert.display(),
                    files.0.join("missing.key").display()
                ),
                "sslkey",
                "cannot read",
            ),
            (
                format!(
                    "host=h sslmode=require sslcert={} sslkey={}",
                    cert.display(),
                    cert.display()
                ),
                "sslkey",
                "no usable private key",
            ),
            (
                format!(
                    "host=h sslmode=require sslcert={} sslkey={}",
                    other_cert.display(),
                    key.display()
                ),
                "sslkey",
                "does not fit sslcert",
            ),
        ] {
            let e = refused(&conninfo, Some(&files.0));
            assert_eq!(e.parameter.as_deref(), Some(parameter), "{conninfo}: {e}");
            assert!(e.message.contains(says), "{conninfo}: {e}");
        }
        // The key is named but never shown.
        let e = refused(
            &format!(
                "host=h sslmode=require sslcert={} sslkey={}",
                other_cert.display(),
                key.display()
            ),
            None,
        );
        assert!(!e.to_string().contains("PRIVATE KEY"), "{e}");
    }

    #[test]
    fn libpq_default_files_are_used_from_home() {
        let files = Files::new("home");
        let (issuer, ca, cert, key) = certificates();
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2999, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .expect("sign a CRL")
        .pem()
        .expect("CRL PEM");
        // Without ~/.postgresql/root.crt, verify-full has nothing to check against.
        let e = refused("host=h sslmode=verify-full", Some(&files.0));
        assert!(e.message.contains("root.crt does not exist"), "{e}");

        files.write(".postgresql/root.crt", &ca);
        files.write(".postgresql/root.crl", &crl);
        let tls = MakeRustls::new(&params("host=h sslmode=verify-full"), Some(&files.0))
            .expect("the default files make a configuration");
        let debug = format!("{tls:?}");
        assert!(debug.contains("root.crt"), "says what it checks against: {debug}");
        files.write(".postgresql/postgresql.crt", &cert);
        // A default certificate without its default key is refused, naming the key.
        let e = refused("host=h sslmode=verify-full", Some(&files.0));
        assert_eq!(e.parameter.as_deref(), Some("sslkey"), "{e}");
        files.write(".postgresql/postgresql.key", &key);
        let tls = MakeRustls::new(&params("host=h sslmode=verify-full"), Some(&files.0))
            .expect("certificate, key, roots and CRL from home");
        assert!(!format!("{tls:?}").contains("PRIVATE"), "no key in Debug output");
        // sslcertmode=disable sends no certificate, so it reads none.
        std::fs::write(files.0.join(".postgresql/postgresql.key"), "not a key").expect("write");
        MakeRustls::new(
            &params("host=h sslmode=verify-full sslcertmode=disable"),
            Some(&files.0),
        )
        .expect("no client certificate is read");
        // A corrupt default CRL is named as sslcrl, with its path.
        std::fs::write(
            files.0.join(".postgresql/root.crl"),
            "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n",
        )
        .expect("write");
        let e = refused(
            "host=h sslmode=verify-full sslcertmode=disable",
            Some(&files.0),
        );
        assert_eq!(e.parameter.as_deref(), Some("sslcrl"), "{e}");
        assert!(e.message.contains("root.crl"), "{e}");
    }

    #[test]
    fn a_crl_directory_is_read_whole() {
        let files = Files::new("crldir");
        let (issuer, ca, _, _) = certificates();
        let ca = files.write("ca.pem", &ca);
        let crl = rcgen::CertificateRevocationListParams {
            this_update: rcgen::date_time_ymd(2020, 1, 1),
            next_update: rcgen::date_time_ymd(2999, 1, 1),
            crl_number: rcgen::SerialNumber::from(1u64),
            issuing_distribution_point: None,
            revoked_certs: Vec::new(),
            key_identifier_method: rcgen::KeyIdMethod::Sha256,
        }
        .signed_by(&issuer)
        .expect("sign a CRL")
        .pem()
        .expect("CRL PEM");
        files.write("crls/a.crl", &crl);
        std::fs::create_dir(files.0.join("crls/subdir")).expect("a subdirectory is skipped");
        let conninfo = format!(
            "host=h sslmode=verify-ca sslrootcert={} sslcrldir={}",
            ca.display(),
            files.0.join("crls").display()
        );
        MakeRustls::new(&params(&conninfo), None).expect("a CRL directory");
        files.write("crls/b.crl", "-----BEGIN X509 CRL-----\nAAAA\n-----END X509 CRL-----\n");
        let e = refused(&conninfo, None);
        assert_eq!(e.parameter.as_deref(), Some("sslcrldir"), "{e}");
        assert!(e.message.contains("b.crl"), "{e}");
    }

    #[test]
    fn system_roots_are_the_platforms() {
        // The test machines have ca-certificates (reqwest's TLS needs them too).
        let tls = MakeRustls::new(&params("host=h sslmode=verify-full sslrootcert=system"), None)
            .expect("the platform's roots");
        assert!(format!("{tls:?}").contains("sslrootcert=system"));
    }

    #[test]
    fn end_point_binding_follows_the_signature_hash() {
        // A certificate reduced to what is read: SEQUENCE { tbs, SEQUENCE { OID } }.
        let cert = |oid: &[u8]| {
            let mut algorithm = vec![0x06, oid.len() as u8];
            algorithm.extend_from_slice(oid);
            let mut body = vec![0x30, 0x00, 0x30, algorithm.len() as u8];
            body.extend_from_slice(&algorithm);
            let mut der = vec![0x30, body.len() as u8];
            der.extend_from_slice(&body);
            der
        };
        let ecdsa_sha384 = [0x2a, 0x86, 0x48, 0xce, 0x3d, 0x04, 0x03, 0x03];
        let rsa_sha512 = [0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x0d];
        let ed25519 = [0x2b, 0x65, 0x70];
        assert_eq!(tls_server_end_point(&cert(&ecdsa_sha384)).map(|h| h.len()), Some(48));
        assert_eq!(tls_server_end_point(&cert(&rsa_sha512)).map(|h| h.len()), Some(64));
        // PostgreSQL has no binding for Ed25519 either: SCRAM goes without.
        assert_eq!(tls_server_end_point(&cert(&ed25519)), None);
        // A long-form length of zero or more than four octets is not DER we read.
        assert_eq!(der_element(&[0x30, 0x80], 0x30), None);
        assert_eq!(der_element(&[0x30, 0x85, 1, 1, 1, 1, 1], 0x30), None);
        assert_eq!(der_element(&[0x30, 0x82, 1], 0x30), None);
    }

    #[test]
    fn every_refusal_reason_is_worded() {
        let name_for = |presented: Vec<String>| CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("db.example").expect("a name"),
            presented,
        };
        for (reason, says) in [
            (CertificateError::NotValidForName, "name mismatch"),
            (name_for(Vec::new()), "no host at all"),
            (CertificateError::NotValidYet, "not valid yet"),
            (
                CertificateError::UnknownRevocationStatus,
                "no CRL in sslcrl or sslcrldir",
            ),
            (CertificateError::ExpiredRevocationList, "the CRL has expired"),
            (CertificateError::BadSignature, "bad signature"),
            (CertificateError::InvalidPurpose, "not a TLS server certificate"),
            (CertificateError::BadEncoding, "BadEncoding"),
        ] {
            let worded = certificate_reason(&reason);
            assert!(worded.contains(says), "{reason:?}: {worded}");
        }
    }

    #[test]
    fn a_host_that_is_no_server_name_is_refused_for_tls() {
        let mut tls = MakeRustls::new(&params("host=h sslmode=require"), None).expect("config");
        let Err(e) = tls.make_tls_connect("bad..name") else {
            panic!("bad..name is no TLS server name");
        };
        assert!(e.to_string().contains("not a valid TLS server name"), "{e}");
        // A Unix socket (an empty name) gets a connector: TLS is never asked of it there.
        assert!(tls.make_tls_connect("").is_ok());
        assert!(tls.make_tls_connect("127.0.0.1").is_ok());
    }

    #[test]
    fn reasons_are_worded() {
        assert!(certificate_reason(&CertificateError::UnknownIssuer).contains("unknown issuer"));
        assert!(certificate_reason(&CertificateError::Expired).contains("expired"));
        assert!(certificate_reason(&CertificateError::Revoked).contains("revoked"));
        let mismatch = certificate_reason(&CertificateError::NotValidForNameContext {
            expected: ServerName::try_from("db.example").unwrap(),
            presented: vec!["other.example".to_owned()],
        });
        assert!(mismatch.contains("name mismatch"), "{mismatch}");
        assert!(mismatch.contains("db.example") && mismatch.contains("other.example"));
    }
}
