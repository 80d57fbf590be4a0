//! How the broker answers a fetch from an offset inside a produced batch:
//! the consumer may stop in the middle of a batch and must get the rest of
//! it on its next fetch.

use std::collections::BTreeMap;

use eventfold_tests::kafka::Broker;
use rskafka::{
    client::{
        ClientBuilder,
        partition::{Compression, UnknownTopicHandling},
    },
    record::Record,
};

#[tokio::test]
async fn a_fetch_from_inside_a_batch_returns_the_rest_of_it() {
    let broker = Broker::start();
    let client = ClientBuilder::new(vec![broker.bootstrap()]).build().await.unwrap();
    client.controller_client().unwrap().create_topic("b", 1, 1, 5_000).await.unwrap();
    let partition = client.partition_client("b", 0, UnknownTopicHandling::Retry).await.unwrap();
    let records: Vec<Record> = (0..10)
        .map(|i| Record { key: None, value: Some(vec![i]), headers: BTreeMap::new(), timestamp: chrono::Utc::now() })
        .collect();
    let offsets = partition.produce(records, Compression::NoCompression).await.unwrap();
    assert_eq!(offsets.len(), 10);
    let (fetched, high_watermark) = partition.fetch_records(offsets[5], 1..1_000_000, 1).await.unwrap();
    let got: Vec<i64> = fetched.iter().map(|r| r.offset).filter(|o| *o >= offsets[5]).collect();
    assert_eq!(
        got,
        offsets[5..].to_vec(),
        "high watermark {high_watermark}, fetched {:?}",
        fetched.iter().map(|r| r.offset).collect::<Vec<_>>()
    );
    assert_eq!(high_watermark, offsets[9] + 1);
}
