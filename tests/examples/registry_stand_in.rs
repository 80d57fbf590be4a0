//! The Schema Registry stand-in as a process, for local benchmarks and
//! manual runs where the real Confluent Schema Registry cannot run:
//! `cargo run -p eventfold-tests --example registry_stand_in` prints its
//! URL and serves until Ctrl-C.

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let registry = eventfold_tests::registry::RegistryStandIn::start().await;
    println!("{}", registry.url());
    tokio::signal::ctrl_c().await.expect("wait for Ctrl-C");
}
