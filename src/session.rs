//! The session settings the dispatcher's connections need, checked where they arrive.
//!
//! On a direct connection the dispatcher sends its settings at connect time, in the
//! startup `options`. A transaction-mode pooler refuses that parameter (pgbouncer,
//! unless it is listed in `ignore_startup_parameters`, and then it is dropped without a
//! word), so behind one the settings must come from the role or the database
//! (`ALTER ROLE ... SET`), which PostgreSQL applies to every server session the pooler
//! opens, at no cost per transaction. Either way the start checks what the sessions
//! really run with, so a setting is never silently missing.

use tokio_postgres::Client;
use tokio_postgres::types::{ToSql, Type};

use crate::error::Result;

/// A setting the dispatcher's sessions should have.
#[derive(Debug, Clone, Copy)]
pub struct Expected {
    /// The parameter, as `current_setting` names it.
    pub name: &'static str,
    /// Its value as `current_setting` shows it.
    pub value: &'static str,
    /// What is lost without it.
    pub why: &'static str,
}

/// What the dispatcher's sessions should run with.
pub const DISPATCHER: &[Expected] = &[Expected {
    name: "synchronous_commit",
    value: "off",
    why: "each claim and each write of outcomes waits for a WAL flush (slower, never less \
          safe: a lost dispatcher commit means a redelivery, not a lost event)",
}];

/// One setting that differs from what is expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    /// The parameter.
    pub name: &'static str,
    /// What the session has.
    pub found: String,
    /// What it should have.
    pub expected: &'static str,
}

const CURRENT: &str = "SELECT current_user::text, array_agg(current_setting(name) ORDER BY n) \
    FROM unnest($1::text[]) WITH ORDINALITY AS s(name, n)";

/// Reads `expected` on `client`'s session; returns the role and what differs.
pub async fn compare(client: &Client, expected: &[Expected]) -> Result<(String, Vec<Mismatch>)> {
    let names: Vec<&str> = expected.iter().map(|e| e.name).collect();
    let params: [(&(dyn ToSql + Sync), Type); 1] = [(&names, Type::TEXT_ARRAY)];
    let row = client.query_typed_one(CURRENT, &params).await?;
    let role: String = row.get(0);
    let found: Vec<String> = row.get(1);
    let mismatches = expected
        .iter()
        .zip(found)
        .filter(|(e, found)| found != e.value)
        .map(|(e, found)| Mismatch {
            name: e.name,
            found,
            expected: e.value,
        })
        .collect();
    Ok((role, mismatches))
}

/// Checks the dispatcher's settings on one of its sessions and logs, for each that is
/// missing, what is lost and the statement that sets it for the role.
pub async fn check(client: &Client) -> Result<()> {
    let (role, mismatches) = compare(client, DISPATCHER).await?;
    for m in &mismatches {
        let why = DISPATCHER
            .iter()
            .find(|e| e.name == m.name)
            .map_or("", |e| e.why);
        tracing::warn!(
            setting = m.name,
            found = %m.found,
            expected = m.expected,
            fix = %alter_role(&role, m.name, m.expected),
            "a session setting of the dispatcher is missing (a pooler in between drops \
             startup options): {why}"
        );
    }
    Ok(())
}

/// `ALTER ROLE "role" SET name = 'value'`, quoted for PostgreSQL.
pub fn alter_role(role: &str, name: &str, value: &str) -> String {
    format!(
        "ALTER ROLE \"{}\" SET {name} = '{}'",
        role.replace('"', "\"\""),
        value.replace('\'', "''")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn alter_role_quotes() {
        assert_eq!(
            alter_role("out\"boxd", "lock_timeout", "5s"),
            "ALTER ROLE \"out\"\"boxd\" SET lock_timeout = '5s'"
        );
    }
}
