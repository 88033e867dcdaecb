//! The session settings outboxd gives its own connections, on top of the user's.
//!
//! They travel in the startup packet's `options` (`-c name=value`), after or before the
//! user's own `options` from the connection string: PostgreSQL applies the `-c`
//! switches in order, so the later one wins, and startup options outrank
//! `ALTER DATABASE/ROLE ... SET`. No extra round trip, and a pooled connection that is
//! replaced gets them again.
//!
//! Behind a pooler this route may not arrive: pgbouncer refuses unknown startup
//! parameters, or drops `options` when told to ignore it. [`Session::settings`] is the
//! one place that says what a session needs, whatever route delivers it.

use std::time::Duration;

use crate::Config;

/// What kind of session outboxd opens; it decides the settings.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Session {
    /// The dispatcher's pool and LISTEN session.
    Dispatcher(Limits),
    /// `migrate`, the CLI, the admin API and the status server: an operator's work.
    Operator,
}

/// How long a dispatcher statement may wait for a lock or run (zero: no limit).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `lock_timeout`.
    pub lock_timeout: Duration,
    /// `statement_timeout`.
    pub statement_timeout: Duration,
}

/// A dispatcher never leaves a transaction open between statements for longer than a
/// statement takes; a transaction idle this long belongs to a stuck process, and ending
/// it frees its locks and lets vacuum proceed.
pub const DISPATCHER_IDLE_IN_TRANSACTION: Duration = Duration::from_secs(60);

/// An operator's command waits this long for a lock before it gives up, unless the
/// connection string's `options` set `lock_timeout` themselves.
pub const OPERATOR_LOCK_TIMEOUT: Duration = Duration::from_secs(10);

/// One `name = value` setting.
pub type Setting = (&'static str, String);

/// The settings of one kind of session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Settings {
    /// outboxd's defaults: applied before the user's options, which may override them.
    pub defaults: Vec<Setting>,
    /// What outboxd's statements rely on: applied after the user's options, so they win.
    pub required: Vec<Setting>,
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl Session {
    /// The dispatcher's session for `config`.
    pub fn dispatcher(config: &Config) -> Self {
        Session::Dispatcher(Limits {
            lock_timeout: config.db_lock_timeout,
            statement_timeout: config.db_statement_timeout,
        })
    }

    /// What a session of this kind needs.
    ///
    /// Every session runs its transactions at READ COMMITTED whatever the database's
    /// default: the claim's `FOR UPDATE SKIP LOCKED`, the doorbell and the settle rely on
    /// seeing rows committed after the transaction began, which REPEATABLE READ and
    /// SERIALIZABLE turn into serialization failures.
    ///
    /// The dispatcher's sessions also run with `synchronous_commit = off` (a lost
    /// outcome means a redelivery, never a lost event, since the producers' commits keep
    /// their durability), a `lock_timeout` and `statement_timeout` from its settings so
    /// no statement waits without bound, an idle-in-transaction limit, and, unless the
    /// user's options say otherwise, `jit = off`.
    ///
    /// An operator's session gets a default `lock_timeout`, so a command does not hang
    /// behind someone's lock; the connection string's `options` may set another.
    pub fn settings(&self) -> Settings {
        let isolation = ("default_transaction_isolation", "read committed".to_owned());
        match self {
            // JIT off: the claim is a short statement whose estimated cost, with many
            // endpoints, passes `jit_above_cost` through branches it never runs, and
            // compiling it took ~1.8 s a claim. A default: your options may turn it on.
            Session::Dispatcher(limits) => Settings {
                defaults: vec![("jit", "off".to_owned())],
                required: vec![
                    isolation,
                    ("synchronous_commit", "off".to_owned()),
                    ("lock_timeout", ms(limits.lock_timeout)),
                    ("statement_timeout", ms(limits.statement_timeout)),
                    (
                        "idle_in_transaction_session_timeout",
                        ms(DISPATCHER_IDLE_IN_TRANSACTION),
                    ),
                ],
            },
            Session::Operator => Settings {
                defaults: vec![("lock_timeout", ms(OPERATOR_LOCK_TIMEOUT))],
                required: vec![isolation],
            },
        }
    }
}

impl Settings {
    /// The startup `options`: outboxd's defaults, the user's `options` verbatim, then
    /// what outboxd requires. Values are escaped as the server splits `options`
    /// (whitespace separates, a backslash escapes the next character).
    pub fn options(&self, user: Option<&str>) -> Option<String> {
        let switch = |(name, value): &Setting| format!("-c {name}={}", escape(value));
        let parts: Vec<String> = self
            .defaults
            .iter()
            .map(switch)
            .chain(user.filter(|u| !u.trim().is_empty()).map(str::to_owned))
            .chain(self.required.iter().map(switch))
            .collect();
        (!parts.is_empty()).then(|| parts.join(" "))
    }
}

/// Escapes a value for the server's split of `options`.
fn escape(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for c in value.chars() {
        if c.is_whitespace() || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            lock_timeout: Duration::from_millis(1500),
            statement_timeout: Duration::from_secs(30),
        }
    }

    #[test]
    fn dispatcher_settings_follow_the_users_options() {
        let options = Session::Dispatcher(limits())
            .settings()
            .options(Some(r"-c search_path=my\ schema"))
            .unwrap();
        assert_eq!(
            options,
            concat!(
                r"-c jit=off -c search_path=my\ schema",
                r" -c default_transaction_isolation=read\ committed",
                " -c synchronous_commit=off -c lock_timeout=1500 -c statement_timeout=30000",
                " -c idle_in_transaction_session_timeout=60000"
            )
        );
    }

    #[test]
    fn operator_defaults_come_before_the_users_options() {
        let settings = Session::Operator.settings();
        assert_eq!(
            settings.options(Some("-c lock_timeout=0")).unwrap(),
            r"-c lock_timeout=10000 -c lock_timeout=0 -c default_transaction_isolation=read\ committed"
        );
        assert_eq!(
            settings.options(None).unwrap(),
            r"-c lock_timeout=10000 -c default_transaction_isolation=read\ committed"
        );
        // Blank user options add nothing.
        assert_eq!(settings.options(Some("  ")), settings.options(None));
    }

    #[test]
    fn values_are_escaped_for_the_servers_split() {
        assert_eq!(escape("read committed"), r"read\ committed");
        assert_eq!(escape(r"a\b"), r"a\\b");
        assert_eq!(escape("tab\there"), "tab\\\there");
    }
}
