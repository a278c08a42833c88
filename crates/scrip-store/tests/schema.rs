//! A store opened for reading only ([`Schema::Require`]) is never created or
//! migrated, and is refused unless its schema is exactly this scrip's: an
//! older one (to be migrated first, by `scrip migrate`), one a newer scrip
//! migrated, or a database that is not a scrip store.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::panic,
    reason = "test code"
)]

use scrip_store::{PgStore, Schema, SqliteStore, StoreError};
use scrip_testkit::PgDatabase;

fn refused<T>(result: Result<T, StoreError>, says: &str) {
    match result {
        Ok(_) => panic!("opened; expected a refusal saying `{says}`"),
        Err(StoreError::Open(message)) => {
            assert!(message.contains(says), "`{message}` does not say `{says}`");
        }
        Err(e) => panic!("{e:?}"),
    }
}

#[tokio::test]
async fn an_embedded_store_of_another_schema_is_read_as_is_or_refused() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scrip.db");
    refused(SqliteStore::open_as(&path, Schema::Require).await, "");
    assert!(!path.exists(), "a store that is only read is never created");
    drop(SqliteStore::open(&path).await.unwrap());
    drop(SqliteStore::open_as(&path, Schema::Require).await.unwrap());

    let db = rusqlite::Connection::open(&path).unwrap();
    let newest: i64 = db
        .query_row("SELECT MAX(version) FROM _sqlx_migrations", [], |r| {
            r.get(0)
        })
        .unwrap();
    // As a store an older scrip migrated: the newest migration not applied.
    db.execute("DELETE FROM _sqlx_migrations WHERE version = ?1", [newest])
        .unwrap();
    refused(
        SqliteStore::open_as(&path, Schema::Require).await,
        "run `scrip migrate` first",
    );
    let count = |db: &rusqlite::Connection| -> i64 {
        db.query_row(
            "SELECT COUNT(*) FROM _sqlx_migrations WHERE version = ?1",
            [newest],
            |r| r.get(0),
        )
        .unwrap()
    };
    assert_eq!(count(&db), 0, "not migrated");
    // As a store a newer scrip migrated.
    db.execute(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         SELECT 99999, 'future', 1, checksum, 0 FROM _sqlx_migrations LIMIT 1",
        [],
    )
    .unwrap();
    refused(
        SqliteStore::open_as(&path, Schema::Require).await,
        "a newer scrip migrated the store (migration 99999",
    );
    // And a command that migrates says the same, and why it cannot start.
    refused(
        SqliteStore::open(&path).await,
        "a newer scrip migrated the store (migration 99999, which this one does not know): use that version; a replica of this one cannot start on it",
    );
}

#[tokio::test]
async fn a_shared_store_of_another_schema_is_refused_and_left_as_it_is() {
    let db = PgDatabase::new();
    refused(
        PgStore::connect_as(db.url(), Schema::Require).await,
        "is it a scrip store?",
    );
    drop(PgStore::connect(db.url()).await.unwrap());
    drop(
        PgStore::connect_as(db.url(), Schema::Require)
            .await
            .unwrap(),
    );

    let mut conn = <sqlx::PgConnection as sqlx::Connection>::connect(db.url())
        .await
        .unwrap();
    let newest: i64 = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations")
        .fetch_one(&mut conn)
        .await
        .unwrap();
    sqlx::query("DELETE FROM _sqlx_migrations WHERE version = $1")
        .bind(newest)
        .execute(&mut conn)
        .await
        .unwrap();
    refused(
        PgStore::connect_as(db.url(), Schema::Require).await,
        "is not applied",
    );
    let left: i64 = sqlx::query_scalar("SELECT COUNT(*) FROM _sqlx_migrations WHERE version = $1")
        .bind(newest)
        .fetch_one(&mut conn)
        .await
        .unwrap();
    assert_eq!(left, 0, "not migrated");
    // A migration whose text differs from this scrip's.
    sqlx::query("UPDATE _sqlx_migrations SET checksum = '\\x00'::bytea WHERE version = 1")
        .execute(&mut conn)
        .await
        .unwrap();
    refused(
        PgStore::connect_as(db.url(), Schema::Require).await,
        "migration 1 is not this scrip's",
    );
    // A replica of an older scrip starting on a store a newer one migrated
    // (during a rolling upgrade, or a roll-back) is told so.
    let db2 = PgDatabase::new();
    drop(PgStore::connect(db2.url()).await.unwrap());
    let mut conn2 = <sqlx::PgConnection as sqlx::Connection>::connect(db2.url())
        .await
        .unwrap();
    sqlx::query(
        "INSERT INTO _sqlx_migrations (version, description, success, checksum, execution_time) \
         SELECT 99999, 'future', true, checksum, 0 FROM _sqlx_migrations LIMIT 1",
    )
    .execute(&mut conn2)
    .await
    .unwrap();
    refused(
        PgStore::connect(db2.url()).await,
        "a newer scrip migrated the store (migration 99999, which this one does not know): use that version; a replica of this one cannot start on it",
    );
}
