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

/// Every migration that has landed, and the SHA-256 of its text. A landed
/// migration is never edited (ARCHITECTURE.md): a store it was applied to
/// would refuse every later scrip ("migration N was previously applied but
/// has been modified"). A new migration is added here as it lands.
const LANDED: &[(&str, &str)] = &[
    (
        "migrations/postgres/0001_init.sql",
        "8QdU-6Vde4QNoAs8onSZiJA_vCOq73Sxw80iHPqRTdM",
    ),
    (
        "migrations/postgres/0002_secrets.sql",
        "EHLhyCO2164XFFZQkvP7mBydXc9NVrOM4x_3R4P3NDQ",
    ),
    (
        "migrations/postgres/0003_audit_indexes.sql",
        "TL_RJjVEd5GQvO-Au85deRdavdbMJTf-6nsbscLSQZk",
    ),
    (
        "migrations/postgres/0004_approvals_task.sql",
        "40SnRHLRdGsDrnONUYO5zkAAnchK0t3Rnxv0ONgu6dE",
    ),
    (
        "migrations/postgres/0005_chain_links.sql",
        "z1pMuLj3aNjBvxoByrHM_zBeL0cEnKNrX_yx8tXRb8w",
    ),
    (
        "migrations/postgres/0006_approvals_denied.sql",
        "1txc6kkV1AE3DCmAI-afvtfy45E9XiSLoLN75El4LtA",
    ),
    (
        "migrations/postgres/0007_audit_heads.sql",
        "rH5IKcoKDSAwf9cQjPhx9BfgjKCHgm3wXF0vHCvYenk",
    ),
    (
        "migrations/postgres/0008_revocations_task.sql",
        "cXkPLueLlr_vbSkrrnFMpeK64Cu0KBYDK4eUoNnfv3c",
    ),
    (
        "migrations/postgres/0009_approvals_approvable.sql",
        "z07yUPuTujr0-nKy-Cz6LLHaw4PJXk5RDDBwcyoYxfg",
    ),
    (
        "migrations/postgres/0010_tasks_held.sql",
        "fIGbaxZS7sv7xHd04Dpr6ZZHtyxRdrc-xWg-yxEj7zw",
    ),
    (
        "migrations/postgres/0011_tasks_subtasks.sql",
        "zVa-SPyAe6lpraqdtvY8Pp1pxpMB7cN6w5EjXitBJ8Y",
    ),
    (
        "migrations/postgres/0012_tasks_agent_open.sql",
        "BOp1MT3d8fy7TX9QTtz1O_AF1nV7ftJPkw_WLplo0Zc",
    ),
    (
        "migrations/postgres/0013_tasks_agent_dropped.sql",
        "4kdC4FtPtlcDuX5g1_PmLA8hgw2U7VO-_QrrVShKzhU",
    ),
    (
        "migrations/postgres/0014_dpop_proofs.sql",
        "i2rq-E5EfC-no3zPIK_3clxRBmoIRUjIn4CQGbbOoDI",
    ),
    (
        "migrations/sqlite/0001_init.sql",
        "DRqcob0tJyV6tZqxcEBkc4Pk4P8903k8hnRx1FhT9P8",
    ),
    (
        "migrations/sqlite/0002_secrets.sql",
        "4QPQum09j4SKI9FXYlYeCR7JWJdwOJ3dDNvpOfFmdiU",
    ),
    (
        "migrations/sqlite/0003_keys.sql",
        "B6fboEa1PgHy2HAWbx-pu2Z6wEnmP35HZz4G7kyc-Us",
    ),
    (
        "migrations/sqlite/0004_audit_indexes.sql",
        "TL_RJjVEd5GQvO-Au85deRdavdbMJTf-6nsbscLSQZk",
    ),
    (
        "migrations/sqlite/0005_approvals_task.sql",
        "40SnRHLRdGsDrnONUYO5zkAAnchK0t3Rnxv0ONgu6dE",
    ),
    (
        "migrations/sqlite/0006_chain_links.sql",
        "Q5U9AKV2lM16L8Ea_iMAujRHRZ_v21xSQsFZhHpbuqM",
    ),
    (
        "migrations/sqlite/0007_approvals_denied.sql",
        "1txc6kkV1AE3DCmAI-afvtfy45E9XiSLoLN75El4LtA",
    ),
    (
        "migrations/sqlite/0008_audit_heads.sql",
        "KaKdDUUpfctWyZSkyiRFv4zTyiHJ_Hkthbl9_K4_YmA",
    ),
    (
        "migrations/sqlite/0009_revocations_task.sql",
        "cXkPLueLlr_vbSkrrnFMpeK64Cu0KBYDK4eUoNnfv3c",
    ),
    (
        "migrations/sqlite/0010_audit_denied.sql",
        "NMi2tLpntxhw6CnM1cCXBF_Eq4MfuKHEuyokfMqgd1s",
    ),
    (
        "migrations/sqlite/0011_approvals_approvable.sql",
        "z07yUPuTujr0-nKy-Cz6LLHaw4PJXk5RDDBwcyoYxfg",
    ),
    (
        "migrations/sqlite/0012_tasks_held.sql",
        "fIGbaxZS7sv7xHd04Dpr6ZZHtyxRdrc-xWg-yxEj7zw",
    ),
    (
        "migrations/sqlite/0013_tasks_subtasks.sql",
        "c8gGvzXbqGAS0bf4XbdoS8W33UYgf9Jn4DGDhsBrjDU",
    ),
    (
        "migrations/sqlite/0014_tasks_agent_open.sql",
        "FqW6IjgoLZO3QmA5axHIchwCTS5yS4CrcR-SVzBJMPQ",
    ),
    (
        "migrations/sqlite/0015_dpop_proofs.sql",
        "rT55XyQb_clixNAMq65Fb7M3AHg-Fe84F92Npm8ozm8",
    ),
];

#[test]
fn landed_migrations_are_never_edited_or_removed() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    for (file, pinned) in LANDED {
        let text = std::fs::read(root.join(file))
            .unwrap_or_else(|e| panic!("{file}: {e} (a landed migration is never removed)"));
        assert_eq!(
            scrip_store::hash(&text),
            *pinned,
            "{file} was edited after it landed: add a new migration instead"
        );
    }
    for backend in ["postgres", "sqlite"] {
        for entry in std::fs::read_dir(root.join("migrations").join(backend)).unwrap() {
            let name = format!(
                "migrations/{backend}/{}",
                entry.unwrap().file_name().to_string_lossy()
            );
            assert!(
                LANDED.iter().any(|(file, _)| *file == name),
                "{name} is not in LANDED: pin it as it lands"
            );
        }
    }
}
