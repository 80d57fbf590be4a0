//! Upcasting on both adapters: events stored as v1 come out of every read
//! path as v2, while the stored chain still verifies.

mod common;

use std::{sync::Arc, time::Duration};

use eventfold_store::{
    AllRead, AppendRequest, EventFilter, EventLog, ExpectedVersion, MemoryEventLog, NewEvent, StreamRead,
    SubscriptionMessage, SubscriptionOptions, Subscriptions, Target, Upcasters, Upcasting,
};
use serde_json::{Value, json};

/// v1 `{"amount": "12.50"}` → v2 `{"amount_minor": 1250}` → v3 adds
/// `"currency": "USD"`: two chained steps.
fn upcasters() -> Upcasters {
    let mut u = Upcasters::new();
    u.register("Priced", 1, |mut data: Value| {
        let text = data["amount"].as_str().ok_or("amount is not a string")?.to_owned();
        let minor = (text.parse::<f64>().map_err(|e| e.to_string())? * 100.0).round() as i64;
        let object = data.as_object_mut().ok_or("not an object")?;
        object.remove("amount");
        object.insert("amount_minor".into(), json!(minor));
        Ok(data)
    });
    u.register("Priced", 2, |mut data: Value| {
        data.as_object_mut().ok_or("not an object")?.insert("currency".into(), json!("USD"));
        Ok(data)
    });
    u
}

fn v1(amount: &str) -> NewEvent {
    NewEvent::new("Priced", json!({ "amount": amount }))
}

fn v3(minor: i64) -> Value {
    json!({ "amount_minor": minor, "currency": "USD" })
}

async fn upcasts_every_read_path(inner: Arc<dyn EventLog>) {
    inner
        .append(AppendRequest::new("priced-1", ExpectedVersion::NoStream, vec![v1("12.50"), v1("0.07")]))
        .await
        .unwrap();
    let mut current = NewEvent::new("Priced", v3(300));
    current.schema_version = 3;
    inner.append(AppendRequest::new("priced-1", ExpectedVersion::Exact(1), vec![current])).await.unwrap();
    inner
        .append(AppendRequest::new("other", ExpectedVersion::NoStream, vec![NewEvent::new("Other", json!({ "n": 1 }))]))
        .await
        .unwrap();

    let log: Arc<dyn EventLog> = Arc::new(Upcasting::new(inner.clone(), upcasters()));
    let stream = log.read_stream(StreamRead::forwards("priced-1", 10)).await.unwrap();
    let seen: Vec<(u32, Value)> = stream.events.iter().map(|e| (e.schema_version, e.data.clone())).collect();
    assert_eq!(seen, vec![(3, v3(1250)), (3, v3(7)), (3, v3(300))]);

    let all = log.read_all(AllRead { after: 0, max_count: 10, filter: EventFilter::default() }).await.unwrap();
    assert_eq!(all.events.len(), 4);
    assert_eq!((all.events[0].schema_version, &all.events[0].data), (3, &v3(1250)));
    assert_eq!((all.events[3].event_type.as_str(), all.events[3].schema_version), ("Other", 1), "others untouched");

    let subscriptions = Subscriptions::new(log.clone(), SubscriptionOptions::default());
    let mut rx = subscriptions.subscribe(Target::All { after: Some(0), filter: EventFilter::default() }, 100);
    let first = loop {
        match tokio::time::timeout(Duration::from_secs(10), rx.recv()).await.unwrap().unwrap().unwrap() {
            SubscriptionMessage::Event(e) => break e,
            SubscriptionMessage::Checkpoint(_) => {}
            other => panic!("expected an event, got {other:?}"),
        }
    };
    assert_eq!((first.schema_version, first.data), (3, v3(1250)));

    // The stored form is unchanged and its chain verifies.
    let stored = inner.read_stream(StreamRead::forwards("priced-1", 10)).await.unwrap();
    assert_eq!((stored.events[0].schema_version, &stored.events[0].data), (1, &json!({ "amount": "12.50" })));
    assert!(log.verify_stream("priced-1").await.unwrap().first_broken.is_none());

    // A body the step cannot read (another client's event under the same
    // type name) is delivered as stored, at its stored version.
    inner
        .append(AppendRequest::new(
            "broken",
            ExpectedVersion::NoStream,
            vec![NewEvent::new("Priced", json!({ "amount": 5 }))],
        ))
        .await
        .unwrap();
    let broken = log.read_stream(StreamRead::forwards("broken", 10)).await.unwrap();
    assert_eq!((broken.events[0].schema_version, &broken.events[0].data), (1, &json!({ "amount": 5 })));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_reads_come_out_upcast() {
    upcasts_every_read_path(Arc::new(MemoryEventLog::new())).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_reads_come_out_upcast() {
    let (_db, log) = common::postgres().await;
    upcasts_every_read_path(log).await;
}
