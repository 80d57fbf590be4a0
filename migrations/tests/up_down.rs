//! Migrations apply, report, revert and re-apply on a real PostgreSQL.

use eventfold_tests::TestDatabase;
use tokio_postgres::NoTls;

async fn table_exists(client: &tokio_postgres::Client, name: &str) -> bool {
    client.query_one("SELECT to_regclass($1) IS NOT NULL", &[&name]).await.unwrap().get(0)
}

async fn column_exists(client: &tokio_postgres::Client, table: &str, column: &str) -> bool {
    client
        .query_one(
            "SELECT EXISTS (SELECT 1 FROM information_schema.columns \
             WHERE table_schema = 'eventstore' AND table_name = $1 AND column_name = $2)",
            &[&table, &column],
        )
        .await
        .unwrap()
        .get(0)
}

#[tokio::test]
async fn up_status_down_up() {
    let db = TestDatabase::create().await;
    let (mut client, connection) = tokio_postgres::connect(db.url(), NoTls).await.unwrap();
    tokio::spawn(connection);

    let before = eventfold_migrations::status(&client).await.unwrap();
    assert!(!before.is_empty());
    assert!(before.iter().all(|m| !m.applied));

    eventfold_migrations::up(&mut client).await.unwrap();
    assert!(eventfold_migrations::status(&client).await.unwrap().iter().all(|m| m.applied));
    assert!(table_exists(&client, "eventstore.events").await);
    assert!(table_exists(&client, "projections.checkpoints").await);
    assert!(table_exists(&client, "auth.api_keys").await);
    assert!(table_exists(&client, "topic_catalog.topics").await);
    // Applying again is a no-op.
    eventfold_migrations::up(&mut client).await.unwrap();

    eventfold_migrations::down(&mut client, Some(0)).await.unwrap();
    assert!(eventfold_migrations::status(&client).await.unwrap().iter().all(|m| !m.applied));
    assert!(!table_exists(&client, "eventstore.events").await);

    eventfold_migrations::up(&mut client).await.unwrap();
    eventfold_migrations::down(&mut client, None).await.unwrap();
    let after = eventfold_migrations::status(&client).await.unwrap();
    assert!(!after.last().unwrap().applied, "down without --to reverts the latest");
    assert!(after[..after.len() - 1].iter().all(|m| m.applied), "and only the latest");
    // The latest migration (0009) is reverted: the topic catalog goes; 0008
    // and before stay.
    assert!(!table_exists(&client, "topic_catalog.topics").await, "the latest migration (0009) is reverted");
    assert!(table_exists(&client, "auth.api_keys").await, "0008 and before stay");
    assert!(column_exists(&client, "snapshots", "namespace").await, "0007 and before stay");

    // Down to 6: snapshots and request ids lose their namespace and scope
    // (0007); 0006 and before stay.
    eventfold_migrations::down(&mut client, Some(6)).await.unwrap();
    assert!(!column_exists(&client, "snapshots", "namespace").await, "0007 is reverted");
    assert!(!column_exists(&client, "append_requests", "scope").await);
    assert!(table_exists(&client, "saga.saga_instances").await, "0006 and before stay");
    assert!(table_exists(&client, "bus.consumer_events").await);
    assert!(table_exists(&client, "bus.relay_checkpoints").await);
    assert!(table_exists(&client, "projections.checkpoints").await);
    assert!(table_exists(&client, "eventstore.events").await);

    assert!(matches!(
        eventfold_migrations::down(&mut client, Some(9999)).await,
        Err(eventfold_migrations::Error::UnknownVersion(9999))
    ));
}
