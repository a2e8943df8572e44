//! Publishes a few messages to the `escrow dev` broker.
//!
//! ```text
//! cargo run --release --bin escrow -- dev            # terminal 1
//! cargo run --release --bin escrow -- topic create orders
//! cargo run -p escrow-producer --example publish     # terminal 2
//! ```

use escrow_client::{defaults, ClientConfig};
use escrow_producer::{Producer, ProducerConfig};
use escrow_proto::Message;

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = ClientConfig::new(defaults::default_server(), defaults::trust(None, None));
    let producer = Producer::connect(ProducerConfig::new(client)).await?;
    for i in 0..10 {
        let mut message = Message::new("", format!("order {i}").into_bytes());
        message.key = Some(format!("customer-{}", i % 3));
        let receipt = producer.send("orders", message).await?;
        println!(
            "{} -> queue {} offset {} (fsynced on {} of {} nodes)",
            receipt.id,
            receipt.position.queue,
            receipt.position.offset,
            receipt.durability.fsynced_replicas,
            receipt.durability.voters
        );
    }
    Ok(())
}
