//! Prints, for each partition of a topic, the high watermark and what a
//! fetch from a given offset returns: `partition_state BROKER TOPIC OFFSET…`
//! (one offset per partition). A debugging aid for consumers.

use rskafka::client::{ClientBuilder, partition::UnknownTopicHandling};

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let (broker, topic) = (&args[1], &args[2]);
    let client = ClientBuilder::new(vec![broker.clone()]).build().await.expect("connect");
    for (partition, offset) in args[3..].iter().enumerate() {
        let offset: i64 = offset.parse().expect("an offset");
        let pc =
            client.partition_client(topic, partition as i32, UnknownTopicHandling::Error).await.expect("partition");
        let max: i32 = std::env::var("MAX_BYTES").ok().and_then(|m| m.parse().ok()).unwrap_or(1_000_000);
        let (records, high_watermark) = pc.fetch_records(offset, 1..max, 1).await.expect("fetch");
        let offsets: Vec<i64> = records.iter().map(|r| r.offset).collect();
        println!(
            "partition {partition}: high watermark {high_watermark}, fetch from {offset}: {} records, first {:?}, last {:?}",
            offsets.len(),
            offsets.first(),
            offsets.last()
        );
    }
}
