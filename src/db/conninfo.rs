//! libpq connection strings: the URL form and the key=value form, every parameter
//! libpq knows, each with libpq's meaning.
//!
//! tokio-postgres parses only part of libpq's language (no `verify-ca`, `verify-full`,
//! `sslrootcert`, `sslcert`, ...), so outboxd parses the string itself and builds the
//! driver's configuration from the result. A parameter libpq knows but outboxd cannot
//! honour is refused by name rather than ignored: ignoring `sslcrl` or `require_auth`
//! would quietly weaken what the operator asked for.

use std::collections::BTreeMap;
use std::fmt;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

/// A connection string that cannot be used. The message names the parameter at fault
/// and never repeats a password.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", match .parameter { Some(p) => format!("{p}: {}", .message), None => .message.clone() })]
pub struct ConnInfoError {
    /// The parameter at fault, when one is.
    pub parameter: Option<String>,
    /// What is wrong.
    pub message: String,
}

impl ConnInfoError {
    fn param(parameter: &str, message: impl Into<String>) -> Self {
        Self {
            parameter: Some(parameter.to_owned()),
            message: message.into(),
        }
    }

    fn syntax(message: impl Into<String>) -> Self {
        Self {
            parameter: None,
            message: message.into(),
        }
    }
}

/// libpq's `sslmode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plaintext only.
    Disable,
    /// Plaintext first; TLS only if the server refuses the plaintext session.
    Allow,
    /// TLS if the server offers it, plaintext if it refuses TLS (libpq's default).
    Prefer,
    /// TLS, the certificate unchecked unless a root certificate is given (then as
    /// `verify-ca`).
    Require,
    /// TLS with the server's chain checked against the root certificates.
    VerifyCa,
    /// `verify-ca`, and the certificate must name the host connected to.
    VerifyFull,
}

impl SslMode {
    /// The spelling in a connection string.
    pub fn as_str(self) -> &'static str {
        match self {
            SslMode::Disable => "disable",
            SslMode::Allow => "allow",
            SslMode::Prefer => "prefer",
            SslMode::Require => "require",
            SslMode::VerifyCa => "verify-ca",
            SslMode::VerifyFull => "verify-full",
        }
    }

    /// Whether this mode checks the certificate against root certificates.
    pub fn verifies(self) -> bool {
        matches!(self, SslMode::VerifyCa | SslMode::VerifyFull)
    }
}

/// libpq's `sslnegotiation`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslNegotiation {
    /// Ask with PostgreSQL's SSLRequest first (every server version).
    Postgres,
    /// Start the TLS handshake at once, with ALPN `postgresql` (PostgreSQL 17+).
    Direct,
}

/// Where the root certificates for verification come from (`sslrootcert`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// Not given: libpq's default file `~/.postgresql/root.crt`, when it exists.
    Default,
    /// A PEM file of one or more CA certificates.
    File(PathBuf),
    /// `system`: the platform's trusted roots.
    System,
}

/// libpq's `sslcertmode` (the values outboxd supports).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslCertMode {
    /// Never send a client certificate.
    Disable,
    /// Send one if configured and the server asks (libpq's default).
    Allow,
}

/// A TLS protocol version bound (`ssl_min_protocol_version`, `ssl_max_protocol_version`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum TlsVersion {
    /// TLS 1.0 (accepted as a minimum; rustls speaks 1.2 and 1.3 only).
    V1_0,
    /// TLS 1.1 (as for 1.0).
    V1_1,
    /// TLS 1.2.
    V1_2,
    /// TLS 1.3.
    V1_3,
}

/// Everything about TLS in a connection string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsParams {
    /// `sslmode`.
    pub mode: SslMode,
    /// `sslnegotiation`.
    pub negotiation: SslNegotiation,
    /// `sslrootcert`.
    pub rootcert: RootCert,
    /// `sslcert`, when given.
    pub cert: Option<PathBuf>,
    /// `sslkey`, when given.
    pub key: Option<PathBuf>,
    /// `sslcrl`, when given.
    pub crl: Option<PathBuf>,
    /// `sslcrldir`, when given.
    pub crldir: Option<PathBuf>,
    /// `sslsni`: send the host name in the handshake (never for an IP address).
    pub sni: bool,
    /// `sslcertmode`.
    pub certmode: SslCertMode,
    /// `ssl_min_protocol_version` (libpq's default: TLS 1.2).
    pub min_version: TlsVersion,
    /// `ssl_max_protocol_version`; `None` is no upper bound.
    pub max_version: Option<TlsVersion>,
}

/// A host as given: a name or address to reach over TCP, or a socket directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Host {
    /// A host name or IP address.
    Tcp(String),
    /// A directory holding the server's Unix socket (a value starting with `/`).
    Unix(PathBuf),
}

/// One server to try, in order: `host`, `hostaddr` and `port` entries of one index.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The `host` entry, if any: the name TLS checks the certificate against.
    pub host: Option<Host>,
    /// The `hostaddr` entry, if any: where the connection goes (no name lookup).
    pub hostaddr: Option<IpAddr>,
    /// The port.
    pub port: u16,
}

impl Target {
    /// Whether this target is reached over a Unix socket, where libpq never uses TLS.
    pub fn is_unix(&self) -> bool {
        self.hostaddr.is_none() && matches!(self.host, Some(Host::Unix(_)))
    }

    /// The name a certificate must carry under `verify-full`: the `host` entry, never
    /// the `hostaddr` (as libpq).
    pub fn tls_name(&self) -> Option<&str> {
        match &self.host {
            Some(Host::Tcp(name)) => Some(name),
            _ => None,
        }
    }
}

/// libpq's `target_session_attrs` (the values tokio-postgres can check).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TargetSessionAttrs {
    /// Any server.
    Any,
    /// A server that accepts writes.
    ReadWrite,
    /// A server that is read-only.
    ReadOnly,
}

/// libpq's `channel_binding`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChannelBinding {
    /// Never.
    Disable,
    /// When TLS and SCRAM allow it (libpq's default).
    Prefer,
    /// Always: refuse authentication without it.
    Require,
}

/// A parsed connection string. `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnInfo {
    /// The servers to try, in order.
    pub targets: Vec<Target>,
    /// `user`.
    pub user: Option<String>,
    /// `password`.
    pub password: Option<String>,
    /// `dbname`.
    pub dbname: Option<String>,
    /// `options`, exactly as given (backslash escapes and all).
    pub options: Option<String>,
    /// `application_name`.
    pub application_name: Option<String>,
    /// `fallback_application_name`.
    pub fallback_application_name: Option<String>,
    /// `connect_timeout`: `None` when not given, `Some(ZERO)` for "wait indefinitely".
    pub connect_timeout: Option<Duration>,
    /// `keepalives`.
    pub keepalives: Option<bool>,
    /// `keepalives_idle`.
    pub keepalives_idle: Option<Duration>,
    /// `keepalives_interval`.
    pub keepalives_interval: Option<Duration>,
    /// `keepalives_count`.
    pub keepalives_count: Option<u32>,
    /// `tcp_user_timeout` (milliseconds in the string, as libpq).
    pub tcp_user_timeout: Option<Duration>,
    /// `channel_binding`.
    pub channel_binding: ChannelBinding,
    /// `target_session_attrs`.
    pub target_session_attrs: TargetSessionAttrs,
    /// `load_balance_hosts=random`.
    pub load_balance_hosts: bool,
    /// The TLS parameters.
    pub tls: TlsParams,
}

impl fmt::Debug for ConnInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ConnInfo")
            .field("targets", &self.targets)
            .field("user", &self.user)
            .field("password", &self.password.as_ref().map(|_| "<redacted>"))
            .field("dbname", &self.dbname)
            .field("options", &self.options)
            .field("application_name", &self.application_name)
            .field("tls", &self.tls)
            .finish_non_exhaustive()
    }
}

/// The socket directory libpq uses when a string names no host: Debian's and the
/// official container images' build default.
pub const DEFAULT_SOCKET_DIR: &str = "/var/run/postgresql";

/// Every parameter libpq 17 knows that outboxd refuses, and why.
const UNSUPPORTED: &[(&str, &str)] = &[
    (
        "service",
        "service files (pg_service.conf) are not read; spell the parameters out",
    ),
    (
        "passfile",
        "password files are not read; give password in the string",
    ),
    (
        "sslpassword",
        "encrypted client keys are not supported; decrypt the key file",
    ),
    ("requirepeer", "is not supported"),
    ("require_auth", "is not supported"),
    ("replication", "replication connections are not supported"),
    ("sslkeylogfile", "is not supported"),
    ("min_protocol_version", "is not supported"),
    ("max_protocol_version", "is not supported"),
    ("scram_client_key", "is not supported"),
    ("scram_server_key", "is not supported"),
    ("oauth_issuer", "OAuth is not supported"),
    ("oauth_client_id", "OAuth is not supported"),
    ("oauth_client_secret", "OAuth is not supported"),
    ("oauth_scope", "OAuth is not supported"),
];

/// libpq parameters that only matter for features outboxd never uses (GSSAPI, SSL
/// compression, which OpenSSL disables anyway): accepted and ignored, as libpq ignores
/// them when they do not apply.
const IGNORED: &[&str] = &["sslcompression", "krbsrvname", "gsslib", "gssdelegation"];

impl ConnInfo {
    /// Parses a connection string in either of libpq's forms:
    /// `postgres://user:pass@host:port,host2/db?param=value` (or `postgresql://`), or
    /// `host=... port=... param='quoted value'`. A parameter given twice keeps its last
    /// value, as in libpq.
    pub fn parse(s: &str) -> Result<Self, ConnInfoError> {
        let s = s.trim();
        let pairs = match ["postgresql://", "postgres://"]
            .iter()
            .find_map(|prefix| s.strip_prefix(prefix))
        {
            Some(rest) => parse_uri(rest)?,
            None => parse_keyword_value(s)?,
        };
        Self::from_pairs(pairs)
    }

    fn from_pairs(pairs: Vec<(String, String)>) -> Result<Self, ConnInfoError> {
        let mut params = BTreeMap::new();
        for (key, value) in pairs {
            params.insert(key, value);
        }
        for key in params.keys() {
            if let Some((_, why)) = UNSUPPORTED.iter().find(|(k, _)| k == key) {
                return Err(ConnInfoError::param(key, *why));
            }
            if !KNOWN.contains(&key.as_str()) && !IGNORED.contains(&key.as_str()) {
                return Err(ConnInfoError::param(
                    key,
                    "is not a connection parameter (libpq knows no such option)",
                ));
            }
        }
        let text = |key: &str| params.get(key).filter(|v| !v.is_empty()).cloned();
        let path = |key: &str| text(key).map(PathBuf::from);

        if let Some(mode) = params.get("gssencmode") {
            choose(
                "gssencmode",
                mode,
                &[("disable", ()), ("prefer", ())],
                "disable or prefer (outboxd has no GSSAPI encryption)",
            )?;
        }
        if let Some(encoding) = params.get("client_encoding") {
            let e = encoding.to_ascii_lowercase().replace(['-', '_'], "");
            if !matches!(e.as_str(), "utf8" | "unicode" | "auto") {
                return Err(ConnInfoError::param(
                    "client_encoding",
                    format!("outboxd always talks UTF8, got {encoding:?}"),
                ));
            }
        }

        let rootcert = match text("sslrootcert") {
            None => RootCert::Default,
            Some(v) if v == "system" => RootCert::System,
            Some(v) => RootCert::File(PathBuf::from(v)),
        };
        let mode = match params.get("sslmode") {
            Some(v) => choose(
                "sslmode",
                v,
                &[
                    ("disable", SslMode::Disable),
                    ("allow", SslMode::Allow),
                    ("prefer", SslMode::Prefer),
                    ("require", SslMode::Require),
                    ("verify-ca", SslMode::VerifyCa),
                    ("verify-full", SslMode::VerifyFull),
                ],
                "disable, allow, prefer, require, verify-ca or verify-full",
            )?,
            // libpq 16+: the platform's roots only make sense with a host name check.
            None if rootcert == RootCert::System => SslMode::VerifyFull,
            None => SslMode::Prefer,
        };
        if rootcert == RootCert::System && mode != SslMode::VerifyFull {
            return Err(ConnInfoError::param(
                "sslmode",
                format!(
                    "sslrootcert=system requires sslmode=verify-full (got {}): any certificate \
                     a public CA issued would pass a weaker check",
                    mode.as_str()
                ),
            ));
        }
        let negotiation = match params.get("sslnegotiation") {
            Some(v) => choose(
                "sslnegotiation",
                v,
                &[
                    ("postgres", SslNegotiation::Postgres),
                    ("direct", SslNegotiation::Direct),
                ],
                "postgres or direct",
            )?,
            None => SslNegotiation::Postgres,
        };
        if negotiation == SslNegotiation::Direct
            && matches!(mode, SslMode::Disable | SslMode::Allow | SslMode::Prefer)
        {
            return Err(ConnInfoError::param(
                "sslnegotiation",
                format!(
                    "direct needs sslmode=require, verify-ca or verify-full (got {}): a direct \
                     handshake cannot fall back to plaintext",
                    mode.as_str()
                ),
            ));
        }
        let sni = match params.get("sslsni") {
            Some(v) => choose("sslsni", v, &[("0", false), ("1", true)], "0 or 1")?,
            None => true,
        };
        let certmode = match params.get("sslcertmode") {
            Some(v) if v == "require" => {
                return Err(ConnInfoError::param(
                    "sslcertmode",
                    "require is not supported (disable or allow)",
                ));
            }
            Some(v) => choose(
                "sslcertmode",
                v,
                &[
                    ("disable", SslCertMode::Disable),
                    ("allow", SslCertMode::Allow),
                ],
                "disable or allow",
            )?,
            None => SslCertMode::Allow,
        };
        let version = |key: &str| -> Result<Option<TlsVersion>, ConnInfoError> {
            match params.get(key).map(String::as_str) {
                None | Some("") => Ok(None),
                Some(v) => choose(
                    key,
                    v,
                    &[
                        ("TLSv1", TlsVersion::V1_0),
                        ("TLSv1.1", TlsVersion::V1_1),
                        ("TLSv1.2", TlsVersion::V1_2),
                        ("TLSv1.3", TlsVersion::V1_3),
                    ],
                    "TLSv1, TLSv1.1, TLSv1.2 or TLSv1.3",
                )
                .map(Some),
            }
        };
        let min_version = version("ssl_min_protocol_version")?.unwrap_or(TlsVersion::V1_2);
        let max_version = version("ssl_max_protocol_version")?;
        if let Some(max) = max_version {
            if max < TlsVersion::V1_2 {
                return Err(ConnInfoError::param(
                    "ssl_max_protocol_version",
                    "outboxd speaks TLS 1.2 and 1.3 only",
                ));
            }
            if max < min_version {
                return Err(ConnInfoError::param(
                    "ssl_max_protocol_version",
                    "is lower than ssl_min_protocol_version",
                ));
            }
        }
        let tls = TlsParams {
            mode,
            negotiation,
            rootcert,
            cert: path("sslcert"),
            key: path("sslkey"),
            crl: path("sslcrl"),
            crldir: path("sslcrldir"),
            sni,
            certmode,
            min_version,
            max_version,
        };

        let targets = targets(
            params.get("host").map(String::as_str),
            params.get("hostaddr").map(String::as_str),
            params.get("port").map(String::as_str),
        )?;
        if tls.mode == SslMode::VerifyFull {
            if let Some(t) = targets
                .iter()
                .find(|t| !t.is_unix() && t.tls_name().is_none())
            {
                let addr = t.hostaddr.map(|a| a.to_string()).unwrap_or_default();
                return Err(ConnInfoError::param(
                    "host",
                    format!(
                        "sslmode=verify-full checks the certificate against the host name, and \
                         hostaddr={addr} comes without one: add host=NAME"
                    ),
                ));
            }
        }

        let seconds = |key: &str| -> Result<Option<i64>, ConnInfoError> {
            match params.get(key).map(|v| v.trim()) {
                None | Some("") => Ok(None),
                Some(v) => v.parse::<i64>().map(Some).map_err(|_| {
                    ConnInfoError::param(key, format!("expected an integer, got {v:?}"))
                }),
            }
        };
        let positive = |v: Option<i64>| v.filter(|n| *n > 0).map(|n| n as u64);
        let connect_timeout = seconds("connect_timeout")?.map(|n| match n {
            // libpq: zero or negative waits indefinitely, and 1 means 2 seconds.
            n if n <= 0 => Duration::ZERO,
            n => Duration::from_secs((n as u64).max(2)),
        });
        let keepalives = match params.get("keepalives").map(|v| v.trim()) {
            None | Some("") => None,
            Some(v) => Some(
                v.parse::<i64>().map_err(|_| {
                    ConnInfoError::param("keepalives", format!("expected 0 or 1, got {v:?}"))
                })? != 0,
            ),
        };
        // tokio-postgres's own spelling of keepalives_count, accepted for strings that
        // worked before.
        let count = match seconds("keepalives_count")? {
            Some(n) => Some(n),
            None => seconds("keepalives_retries")?,
        };
        let channel_binding = match params.get("channel_binding") {
            Some(v) => choose(
                "channel_binding",
                v,
                &[
                    ("disable", ChannelBinding::Disable),
                    ("prefer", ChannelBinding::Prefer),
                    ("require", ChannelBinding::Require),
                ],
                "disable, prefer or require",
            )?,
            None => ChannelBinding::Prefer,
        };
        let target_session_attrs = match params.get("target_session_attrs") {
            Some(v) if matches!(v.as_str(), "primary" | "standby" | "prefer-standby") => {
                return Err(ConnInfoError::param(
                    "target_session_attrs",
                    format!("{v} is not supported (any, read-write or read-only)"),
                ));
            }
            Some(v) => choose(
                "target_session_attrs",
                v,
                &[
                    ("any", TargetSessionAttrs::Any),
                    ("read-write", TargetSessionAttrs::ReadWrite),
                    ("read-only", TargetSessionAttrs::ReadOnly),
                ],
                "any, read-write or read-only",
            )?,
            None => TargetSessionAttrs::Any,
        };
        let load_balance_hosts = match params.get("load_balance_hosts") {
            Some(v) => choose(
                "load_balance_hosts",
                v,
                &[("disable", false), ("random", true)],
                "disable or random",
            )?,
            None => false,
        };

        Ok(Self {
            targets,
            user: text("user"),
            password: text("password"),
            dbname: text("dbname"),
            options: text("options"),
            application_name: text("application_name"),
            fallback_application_name: text("fallback_application_name"),
            connect_timeout,
            keepalives,
            keepalives_idle: positive(seconds("keepalives_idle")?).map(Duration::from_secs),
            keepalives_interval: positive(seconds("keepalives_interval")?).map(Duration::from_secs),
            keepalives_count: positive(count).map(|n| u32::try_from(n).unwrap_or(u32::MAX)),
            tcp_user_timeout: positive(seconds("tcp_user_timeout")?).map(Duration::from_millis),
            channel_binding,
            target_session_attrs,
            load_balance_hosts,
            tls,
        })
    }
}

/// Every parameter name outboxd honours (besides [`IGNORED`] and the refused ones).
const KNOWN: &[&str] = &[
    "host",
    "hostaddr",
    "port",
    "dbname",
    "user",
    "password",
    "options",
    "application_name",
    "fallback_application_name",
    "connect_timeout",
    "client_encoding",
    "keepalives",
    "keepalives_idle",
    "keepalives_interval",
    "keepalives_count",
    "keepalives_retries",
    "tcp_user_timeout",
    "sslmode",
    "sslnegotiation",
    "sslrootcert",
    "sslcert",
    "sslkey",
    "sslcrl",
    "sslcrldir",
    "sslsni",
    "sslcertmode",
    "ssl_min_protocol_version",
    "ssl_max_protocol_version",
    "gssencmode",
    "channel_binding",
    "target_session_attrs",
    "load_balance_hosts",
];

/// Picks `value` among `choices`, or names the parameter and what it accepts.
fn choose<T: Copy>(
    key: &str,
    value: &str,
    choices: &[(&str, T)],
    expected: &str,
) -> Result<T, ConnInfoError> {
    choices
        .iter()
        .find(|(name, _)| *name == value)
        .map(|(_, v)| *v)
        .ok_or_else(|| {
            ConnInfoError::param(
                key,
                format!("invalid value {value:?} (expected {expected})"),
            )
        })
}

/// libpq's pairing of the comma-separated `host`, `hostaddr` and `port` lists.
fn targets(
    host: Option<&str>,
    hostaddr: Option<&str>,
    port: Option<&str>,
) -> Result<Vec<Target>, ConnInfoError> {
    let split = |v: Option<&str>| -> Vec<String> {
        match v {
            None | Some("") => Vec::new(),
            Some(v) => v.split(',').map(|s| s.trim().to_owned()).collect(),
        }
    };
    let hosts = split(host);
    let addrs = split(hostaddr);
    let ports = split(port);
    if !hosts.is_empty() && !addrs.is_empty() && hosts.len() != addrs.len() {
        return Err(ConnInfoError::param(
            "hostaddr",
            format!(
                "could not match {} host names to {} hostaddr values",
                hosts.len(),
                addrs.len()
            ),
        ));
    }
    let n = hosts.len().max(addrs.len()).max(1);
    if ports.len() > 1 && ports.len() != n {
        return Err(ConnInfoError::param(
            "port",
            format!("could not match {} port numbers to {n} hosts", ports.len()),
        ));
    }
    (0..n)
        .map(|i| {
            let host = hosts.get(i).filter(|h| !h.is_empty());
            let hostaddr = match addrs.get(i).filter(|a| !a.is_empty()) {
                Some(a) => Some(a.parse::<IpAddr>().map_err(|_| {
                    ConnInfoError::param("hostaddr", format!("{a:?} is not an IP address"))
                })?),
                None => None,
            };
            let host = match host {
                Some(h) if h.starts_with('@') => {
                    return Err(ConnInfoError::param(
                        "host",
                        "abstract Unix sockets are not supported",
                    ));
                }
                Some(h) if h.starts_with('/') => Some(Host::Unix(PathBuf::from(h))),
                Some(h) => Some(Host::Tcp(h.clone())),
                None if hostaddr.is_none() => Some(Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR))),
                None => None,
            };
            let port =
                match ports.get(i).or(ports.first()).map(String::as_str) {
                    None | Some("") => 5432,
                    Some(p) => p.parse::<u16>().ok().filter(|p| *p > 0).ok_or_else(|| {
                        ConnInfoError::param("port", format!("invalid port {p:?}"))
                    })?,
                };
            Ok(Target {
                host,
                hostaddr,
                port,
            })
        })
        .collect()
}

/// libpq's `postgresql://[user[:password]@][host[:port][,...]][/dbname][?param=value&...]`,
/// after the scheme. Values are percent-decoded; `ssl=true` means `sslmode=require`.
fn parse_uri(rest: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    // Credentials end at the first '@' that comes before any '/'.
    let mut p = match rest.find(['@', '/']) {
        Some(at) if rest.as_bytes()[at] == b'@' => {
            let (user, password) = match rest[..at].split_once(':') {
                Some((u, pw)) => (u, Some(pw)),
                None => (&rest[..at], None),
            };
            if !user.is_empty() {
                pairs.push(("user".to_owned(), decode("user", user)?));
            }
            if let Some(pw) = password.filter(|pw| !pw.is_empty()) {
                pairs.push(("password".to_owned(), decode("password", pw)?));
            }
            &rest[at + 1..]
        }
        _ => rest,
    };

    let mut hosts = String::new();
    let mut ports = String::new();
    let terminator = loop {
        if let Some(after) = p.strip_prefix('[') {
            let close = after.find(']').ok_or_else(|| {
                ConnInfoError::param("host", "no matching \"]\" for an IPv6 address")
            })?;
            if close == 0 {
                return Err(ConnInfoError::param(
                    "host",
                    "an IPv6 address may not be empty",
                ));
            }
            hosts.push_str(&after[..close]);
            p = &after[close + 1..];
            if let Some(c) = p
                .chars()
                .next()
                .filter(|c| !matches!(c, ':' | '/' | '?' | ','))
            {
                return Err(ConnInfoError::param(
                    "host",
                    format!("unexpected {c:?} after an IPv6 address (expected \":\" or \"/\")"),
                ));
            }
        } else {
            let end = p.find([':', '/', '?', ',']).unwrap_or(p.len());
            hosts.push_str(&p[..end]);
            p = &p[end..];
        }
        if let Some(after) = p.strip_prefix(':') {
            let end = after.find(['/', '?', ',']).unwrap_or(after.len());
            ports.push_str(&after[..end]);
            p = &after[end..];
        }
        match p.strip_prefix(',') {
            Some(after) => {
                p = after;
                hosts.push(',');
                ports.push(',');
            }
            None => break p.chars().next(),
        }
    };
    if !hosts.is_empty() {
        pairs.push(("host".to_owned(), decode("host", &hosts)?));
    }
    if !ports.chars().all(|c| c == ',') {
        pairs.push(("port".to_owned(), decode("port", &ports)?));
    }
    let mut query = None;
    if terminator == Some('/') {
        let path = &p[1..];
        let (dbname, q) = match path.split_once('?') {
            Some((d, q)) => (d, Some(q)),
            None => (path, None),
        };
        if !dbname.is_empty() {
            pairs.push(("dbname".to_owned(), decode("dbname", dbname)?));
        }
        query = q;
    } else if terminator == Some('?') {
        query = Some(&p[1..]);
    }
    if let Some(query) = query {
        let mut parts = query.split('&').peekable();
        while let Some(part) = parts.next() {
            if part.is_empty() && parts.peek().is_none() {
                break; // a trailing '&'
            }
            let (key, value) = part.split_once('=').ok_or_else(|| {
                ConnInfoError::syntax(format!(
                    "missing \"=\" in the URL query parameter {:?}",
                    redact_pair(part)
                ))
            })?;
            if value.contains('=') {
                return Err(ConnInfoError::syntax(format!(
                    "extra \"=\" in the URL query parameter {:?}",
                    redact_pair(part)
                )));
            }
            let key = decode("URL query parameter", key)?;
            let value = decode(&key, value)?;
            if key == "ssl" && value == "true" {
                // libpq's concession to JDBC URLs.
                pairs.push(("sslmode".to_owned(), "require".to_owned()));
            } else {
                pairs.push((key, value));
            }
        }
    }
    Ok(pairs)
}

/// A query parameter for an error message, without its value when it might be a secret.
fn redact_pair(part: &str) -> String {
    match part.split_once('=') {
        Some((key, _)) if key.contains("password") => format!("{key}=..."),
        _ => part.to_owned(),
    }
}

/// libpq's percent-decoding: `%XX` only (`+` stays `+`), `%00` forbidden.
fn decode(what: &str, s: &str) -> Result<String, ConnInfoError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ConnInfoError::param(what, "invalid percent-encoding"))?;
            if hex == 0 {
                return Err(ConnInfoError::param(what, "%00 is not allowed"));
            }
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| ConnInfoError::param(what, "is not valid UTF-8"))
}

/// libpq's `keyword = value` form: values may be single-quoted; a backslash escapes the
/// next character, quoted or not.
fn parse_keyword_value(s: &str) -> Result<Vec<(String, String)>, ConnInfoError> {
    let mut pairs = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.peek().is_none() {
            return Ok(pairs);
        }
        let mut key = String::new();
        while let Some(c) = chars.next_if(|c| !c.is_whitespace() && *c != '=') {
            key.push(c);
        }
        if key.is_empty() {
            return Err(ConnInfoError::syntax(
                "a \"=\" without a parameter name in the connection string",
            ));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        if chars.next() != Some('=') {
            return Err(ConnInfoError::syntax(format!(
                "missing \"=\" after {key:?} in the connection string"
            )));
        }
        while chars.next_if(|c| c.is_whitespace()).is_some() {}
        let mut value = String::new();
        if chars.next_if_eq(&'\'').is_some() {
            loop {
                match chars.next() {
                    None => {
                        return Err(ConnInfoError::param(
                            &key,
                            "unterminated quoted string in the connection string",
                        ));
                    }
                    Some('\'') => break,
                    Some('\\') => match chars.next() {
                        Some(c) => value.push(c),
                        None => {
                            return Err(ConnInfoError::param(
                                &key,
                                "unterminated quoted string in the connection string",
                            ));
                        }
                    },
                    Some(c) => value.push(c),
                }
            }
        } else {
            while let Some(c) = chars.next_if(|c| !c.is_whitespace()) {
                if c == '\\' {
                    if let Some(escaped) = chars.next() {
                        value.push(escaped);
                    }
                } else {
                    value.push(c);
                }
            }
        }
        pairs.push((key, value));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> ConnInfo {
        ConnInfo::parse(s).unwrap_or_else(|e| panic!("{s}: {e}"))
    }

    fn refused(s: &str) -> ConnInfoError {
        match ConnInfo::parse(s) {
            Ok(info) => panic!("{s} must be refused, got {info:?}"),
            Err(e) => e,
        }
    }

    fn tcp(host: &str, port: u16) -> Target {
        Target {
            host: Some(Host::Tcp(host.to_owned())),
            hostaddr: None,
            port,
        }
    }

    #[test]
    fn url_form_has_every_part() {
        let info = parse("postgres://al%40ice:p%3Ass@db.example:6432/app%20db?sslmode=verify-full");
        assert_eq!(info.user.as_deref(), Some("al@ice"));
        assert_eq!(info.password.as_deref(), Some("p:ss"));
        assert_eq!(info.targets, vec![tcp("db.example", 6432)]);
        assert_eq!(info.dbname.as_deref(), Some("app db"));
        assert_eq!(info.tls.mode, SslMode::VerifyFull);
        // postgresql:// is the same language.
        assert_eq!(
            parse("postgresql://u@h/d").targets,
            parse("postgres://u@h/d").targets
        );
    }

    #[test]
    fn url_form_lists_hosts_with_their_ports() {
        let info = parse("postgres://a:5433,b,[::1]:5435,[fe80::1]/db");
        assert_eq!(
            info.targets,
            vec![
                tcp("a", 5433),
                tcp("b", 5432),
                tcp("::1", 5435),
                tcp("fe80::1", 5432)
            ]
        );
        assert_eq!(info.dbname.as_deref(), Some("db"));
        // Only a query, no path.
        let info = parse("postgres://h?dbname=x&user=y");
        assert_eq!(info.targets, vec![tcp("h", 5432)]);
        assert_eq!(info.dbname.as_deref(), Some("x"));
        assert_eq!(info.user.as_deref(), Some("y"));
    }

    #[test]
    fn url_form_without_host_means_the_default_socket() {
        let info = parse("postgres:///db");
        assert_eq!(
            info.targets,
            vec![Target {
                host: Some(Host::Unix(PathBuf::from(DEFAULT_SOCKET_DIR))),
                hostaddr: None,
                port: 5432
            }]
        );
        assert!(info.targets[0].is_unix());
        let info = parse("postgres:///db?host=%2Frun%2Fpg&port=5999");
        assert_eq!(
            info.targets[0].host,
            Some(Host::Unix(PathBuf::from("/run/pg")))
        );
        assert_eq!(info.targets[0].port, 5999);
    }

    #[test]
    fn url_query_overrides_earlier_values_and_decodes() {
        let info = parse(
            "postgres://u@h:1/d?host=other&port=2&options=-csearch_path%3Dwebhooks%20-c%20a%3Db\\%20c",
        );
        assert_eq!(info.targets, vec![tcp("other", 2)]);
        assert_eq!(
            info.options.as_deref(),
            Some("-csearch_path=webhooks -c a=b\\ c")
        );
        // `+` is not a space in libpq's URLs.
        assert_eq!(
            parse("postgres://h/d?application_name=a+b")
                .application_name
                .as_deref(),
            Some("a+b")
        );
    }

    #[test]
    fn url_ssl_true_means_require() {
        assert_eq!(parse("postgres://h/d?ssl=true").tls.mode, SslMode::Require);
    }

    #[test]
    fn url_syntax_errors() {
        for (s, needle) in [
            ("postgres://h/d?sslmode", "missing \"=\""),
            ("postgres://h/d?a=b=c", "extra \"=\""),
            ("postgres://h/d?a=b&&c=d", "missing \"=\""),
            ("postgres://[::1/d", "host"),
            ("postgres://[]/d", "host"),
            ("postgres://[::1]x/d", "host"),
            ("postgres://h/d%zz", "dbname: invalid percent-encoding"),
            ("postgres://h/d%00", "dbname: %00"),
            (
                "postgres://h/d?password=se%2",
                "password: invalid percent-encoding",
            ),
        ] {
            let e = refused(s);
            assert!(e.to_string().contains(needle), "{s}: {e}");
        }
        // A trailing '&' is fine.
        parse("postgres://h/d?sslmode=disable&");
    }

    #[test]
    fn errors_never_show_a_password() {
        for s in [
            "postgres://u:hunter2@h/d?nonsense=1",
            "postgres://h/d?password=hunter2=x",
            "user=u password=hunter2 nonsense=1",
            "user=u password='hunter2",
        ] {
            let e = refused(s).to_string();
            assert!(!e.contains("hunter2"), "{s}: {e}");
        }
        let debug = format!("{:?}", parse("postgres://u:hunter2@h/d"));
        assert!(!debug.contains("hunter2"), "{debug}");
    }

    #[test]
    fn keyword_value_form_values() {
        let info = parse(
            r"host = h1,h2 port=5433,5434 dbname='my db' user=o\'neil password='p\'w' options='-c search_path=a\\ b'",
        );
        assert_eq!(info.targets, vec![tcp("h1", 5433), tcp("h2", 5434)]);
        assert_eq!(info.dbname.as_deref(), Some("my db"));
        assert_eq!(info.user.as_deref(), Some("o'neil"));
        assert_eq!(info.password.as_deref(), Some("p'w"));
        // The backslash that escapes the space reaches the server, which splits options.
        assert_eq!(info.options.as_deref(), Some(r"-c search_path=a\ b"));
        // Later keys override earlier ones.
        assert_eq!(
            parse("sslmode=disable sslmode=require").tls.mode,
            SslMode::Require
        );
        // An empty quoted value means "not given".
        assert_eq!(
            parse("host=h sslrootcert=''").tls.rootcert,
            RootCert::Default
        );
    }

    #[test]
    fn keyword_value_syntax_errors() {
        for (s, needle) in [
            ("host", "missing \"=\" after \"host\""),
            ("host h", "missing \"=\""),
            ("host='h", "host: unterminated quoted string"),
            ("host='h\\", "host: unterminated quoted string"),
            ("=x", "without a parameter name"),
        ] {
            let e = refused(s);
            assert!(e.to_string().contains(needle), "{s}: {e}");
        }
    }

    #[test]
    fn host_hostaddr_and_port_pairing() {
        let info = parse("host=db.example,other hostaddr=127.0.0.1,::1 port=1,2");
        assert_eq!(
            info.targets,
            vec![
                Target {
                    host: Some(Host::Tcp("db.example".into())),
                    hostaddr: Some("127.0.0.1".parse().unwrap()),
                    port: 1
                },
                Target {
                    host: Some(Host::Tcp("other".into())),
                    hostaddr: Some("::1".parse().unwrap()),
                    port: 2
                },
            ]
        );
        assert_eq!(info.targets[0].tls_name(), Some("db.example"));
        // hostaddr alone: no name, no socket.
        let info = parse("hostaddr=10.0.0.1 sslmode=require");
        assert_eq!(info.targets[0].host, None);
        assert_eq!(info.targets[0].tls_name(), None);
        assert!(!info.targets[0].is_unix());
        // One port for all hosts.
        let info = parse("host=a,b port=7");
        assert_eq!(info.targets[1].port, 7);
        // An empty entry takes the default.
        let info = parse("host=a,b port=,7");
        assert_eq!((info.targets[0].port, info.targets[1].port), (5432, 7));
        for (s, param) in [
            ("host=a,b hostaddr=127.0.0.1", "hostaddr"),
            ("host=a,b,c port=1,2", "port"),
            ("host=a port=x", "port"),
            ("host=a port=0", "port"),
            ("host=a port=70000", "port"),
            ("hostaddr=db.example", "hostaddr"),
            ("host=@abstract", "host"),
            ("hostaddr=127.0.0.1 sslmode=verify-full", "host"),
        ] {
            assert_eq!(refused(s).parameter.as_deref(), Some(param), "{s}");
        }
        // verify-full with a name for every address is fine, and Unix sockets never
        // use TLS, so they need no name.
        parse("host=db.example hostaddr=127.0.0.1 sslmode=verify-full");
        parse("host=/run/pg sslmode=verify-full");
    }

    #[test]
    fn every_sslmode() {
        for (value, mode) in [
            ("disable", SslMode::Disable),
            ("allow", SslMode::Allow),
            ("prefer", SslMode::Prefer),
            ("require", SslMode::Require),
            ("verify-ca", SslMode::VerifyCa),
            ("verify-full", SslMode::VerifyFull),
        ] {
            assert_eq!(parse(&format!("host=h sslmode={value}")).tls.mode, mode);
            assert_eq!(mode.as_str(), value);
            assert_eq!(mode.verifies(), value.starts_with("verify"));
        }
        assert_eq!(parse("host=h").tls.mode, SslMode::Prefer);
        for bad in ["Require", "verify_full", "", "true"] {
            let e = refused(&format!("host=h sslmode='{bad}'"));
            assert_eq!(e.parameter.as_deref(), Some("sslmode"));
            assert!(e.message.contains("verify-full"), "{e}");
        }
    }

    #[test]
    fn ssl_files_and_system_roots() {
        let info = parse(
            "host=h sslmode=verify-ca sslrootcert=/ca.pem sslcert=/c.pem sslkey=/k.pem sslcrl=/r.crl sslcrldir=/crls",
        );
        assert_eq!(info.tls.rootcert, RootCert::File("/ca.pem".into()));
        assert_eq!(info.tls.cert, Some("/c.pem".into()));
        assert_eq!(info.tls.key, Some("/k.pem".into()));
        assert_eq!(info.tls.crl, Some("/r.crl".into()));
        assert_eq!(info.tls.crldir, Some("/crls".into()));
        // system: verify-full by default, and nothing weaker.
        let info = parse("host=h sslrootcert=system");
        assert_eq!(info.tls.rootcert, RootCert::System);
        assert_eq!(info.tls.mode, SslMode::VerifyFull);
        let e = refused("host=h sslrootcert=system sslmode=require");
        assert_eq!(e.parameter.as_deref(), Some("sslmode"));
    }

    #[test]
    fn negotiation_sni_certmode_and_versions() {
        let info = parse(
            "host=h sslmode=require sslnegotiation=direct sslsni=0 sslcertmode=disable ssl_min_protocol_version=TLSv1.3",
        );
        assert_eq!(info.tls.negotiation, SslNegotiation::Direct);
        assert!(!info.tls.sni);
        assert_eq!(info.tls.certmode, SslCertMode::Disable);
        assert_eq!(info.tls.min_version, TlsVersion::V1_3);
        let info = parse("host=h");
        assert_eq!(info.tls.negotiation, SslNegotiation::Postgres);
        assert!(info.tls.sni);
        assert_eq!(info.tls.certmode, SslCertMode::Allow);
        assert_eq!(info.tls.min_version, TlsVersion::V1_2);
        assert_eq!(info.tls.max_version, None);
        for (s, param) in [
            ("host=h sslnegotiation=direct", "sslnegotiation"),
            (
                "host=h sslnegotiation=direct sslmode=allow",
                "sslnegotiation",
            ),
            (
                "host=h sslnegotiation=fast sslmode=require",
                "sslnegotiation",
            ),
            ("host=h sslsni=yes", "sslsni"),
            ("host=h sslcertmode=require", "sslcertmode"),
            ("host=h sslcertmode=maybe", "sslcertmode"),
            (
                "host=h ssl_min_protocol_version=TLSv2",
                "ssl_min_protocol_version",
            ),
            (
                "host=h ssl_max_protocol_version=TLSv1.1",
                "ssl_max_protocol_version",
            ),
            (
                "host=h ssl_min_protocol_version=TLSv1.3 ssl_max_protocol_version=TLSv1.2",
                "ssl_max_protocol_version",
            ),
        ] {
            assert_eq!(refused(s).parameter.as_deref(), Some(param), "{s}");
        }
    }

    #[test]
    fn other_parameters() {
        let info = parse(
            "host=h connect_timeout=1 keepalives=0 keepalives_idle=30 keepalives_interval=5 \
             keepalives_count=4 tcp_user_timeout=1500 channel_binding=require \
             target_session_attrs=read-write load_balance_hosts=random application_name=app \
             fallback_application_name=fb client_encoding=UTF8 gssencmode=disable \
             sslcompression=0 krbsrvname=postgres",
        );
        assert_eq!(info.connect_timeout, Some(Duration::from_secs(2)));
        assert_eq!(info.keepalives, Some(false));
        assert_eq!(info.keepalives_idle, Some(Duration::from_secs(30)));
        assert_eq!(info.keepalives_interval, Some(Duration::from_secs(5)));
        assert_eq!(info.keepalives_count, Some(4));
        assert_eq!(info.tcp_user_timeout, Some(Duration::from_millis(1500)));
        assert_eq!(info.channel_binding, ChannelBinding::Require);
        assert_eq!(info.target_session_attrs, TargetSessionAttrs::ReadWrite);
        assert!(info.load_balance_hosts);
        assert_eq!(info.application_name.as_deref(), Some("app"));
        assert_eq!(info.fallback_application_name.as_deref(), Some("fb"));
        assert_eq!(
            parse("host=h connect_timeout=0").connect_timeout,
            Some(Duration::ZERO)
        );
        assert_eq!(
            parse("host=h keepalives_retries=3").keepalives_count,
            Some(3)
        );
        for (s, param) in [
            ("host=h connect_timeout=ten", "connect_timeout"),
            ("host=h keepalives=on", "keepalives"),
            ("host=h channel_binding=always", "channel_binding"),
            (
                "host=h target_session_attrs=primary",
                "target_session_attrs",
            ),
            (
                "host=h target_session_attrs=whatever",
                "target_session_attrs",
            ),
            ("host=h load_balance_hosts=1", "load_balance_hosts"),
            ("host=h client_encoding=LATIN1", "client_encoding"),
            ("host=h gssencmode=require", "gssencmode"),
        ] {
            assert_eq!(refused(s).parameter.as_deref(), Some(param), "{s}");
        }
    }

    #[test]
    fn unsupported_and_unknown_parameters_are_named() {
        for (key, _) in UNSUPPORTED {
            let e = refused(&format!("host=h {key}=x"));
            assert_eq!(e.parameter.as_deref(), Some(*key));
            let e = refused(&format!("postgres://h/d?{key}=x"));
            assert_eq!(e.parameter.as_deref(), Some(*key));
        }
        let e = refused("postgres://h/d?sslmdoe=require");
        assert_eq!(e.parameter.as_deref(), Some("sslmdoe"));
        assert!(e.to_string().contains("not a connection parameter"), "{e}");
    }
}
