//! Whether a store's schema is the one this scrip reads: for commands that
//! only read a store, and so must not migrate it (an auditor's newer
//! `scrip audit verify` would otherwise change the schema under the
//! running replicas).

use sqlx::migrate::{Migrate, MigrateError, Migrator};

use crate::StoreError;

/// What opening a store does with its schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Schema {
    /// Apply the migrations this scrip has and the store lacks.
    Migrate,
    /// Change nothing; refuse a store whose schema is not exactly this
    /// scrip's.
    Require,
}

/// The table sqlx records applied migrations in.
const TABLE: &str = "_sqlx_migrations";

/// What a failed migration says: a store a newer scrip migrated is named
/// as such (sqlx says only that a migration is missing).
pub(crate) fn migration_failed(e: &MigrateError) -> String {
    match e {
        MigrateError::VersionMissing(v) => format!(
            "a newer scrip migrated the store (migration {v}, which this one does not know): use that version; a replica of this one cannot start on it (during a rolling upgrade, replicas still running go on)"
        ),
        MigrateError::VersionMismatch(v) => format!(
            "the store's migration {v} differs from this scrip's: a development build applied an earlier draft of it; such a store cannot be upgraded (start on a new one, or use that build)"
        ),
        e => format!("migration failed: {e}"),
    }
}

/// Refuses a store whose applied migrations are not exactly `migrator`'s
/// ([`Schema::Require`]); reads, never writes.
pub(crate) async fn require(
    conn: &mut impl Migrate,
    migrator: &Migrator,
) -> Result<(), StoreError> {
    let unreadable = |e: MigrateError| {
        StoreError::Open(format!(
            "cannot read which migrations the store has (is it a scrip store?): {e}"
        ))
    };
    if let Some(v) = conn.dirty_version(TABLE).await.map_err(unreadable)? {
        return Err(StoreError::Open(format!(
            "migration {v} failed part-way on the store; run `scrip migrate`"
        )));
    }
    let applied = conn
        .list_applied_migrations(TABLE)
        .await
        .map_err(unreadable)?;
    let known: Vec<_> = migrator
        .iter()
        .filter(|m| !m.migration_type.is_down_migration())
        .collect();
    for a in &applied {
        match known.iter().find(|m| m.version == a.version) {
            None => {
                return Err(StoreError::Open(format!(
                    "a newer scrip migrated the store (migration {}, which this one does not know): use that version",
                    a.version
                )));
            }
            Some(m) if m.checksum != a.checksum => {
                return Err(StoreError::Open(format!(
                    "the store's migration {} is not this scrip's (a development build applied an earlier draft of it)",
                    a.version
                )));
            }
            Some(_) => {}
        }
    }
    if let Some(m) = known
        .iter()
        .find(|m| !applied.iter().any(|a| a.version == m.version))
    {
        return Err(StoreError::Open(format!(
            "the store's schema is older than this scrip's (migration {} `{}` is not applied); this command does not change it: run `scrip migrate` first",
            m.version, m.description
        )));
    }
    Ok(())
}
