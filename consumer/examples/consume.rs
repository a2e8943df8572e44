//! Consumes `orders` as group `example` from the `escrow dev` broker until Ctrl-C.

use escrow_client::{defaults, ClientConfig};
use escrow_consumer::{Consumer, PushOptions};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let client = ClientConfig::new(defaults::default_server(), defaults::trust(None, None));
    let consumer = Consumer::connect(&client, "example", "orders").await?;
    let stop = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    let stats = consumer
        .run(
            PushOptions::default(),
            |delivery| async move {
                println!(
                    "{} (queue {} offset {}, delivery {})",
                    String::from_utf8_lossy(&delivery.message.body),
                    delivery.position.queue,
                    delivery.position.offset,
                    delivery.delivery_count
                );
                Ok::<(), std::convert::Infallible>(())
            },
            stop,
        )
        .await?;
    println!(
        "acked {}, failed {}, given back {}",
        stats.acked, stats.failed, stats.released
    );
    Ok(())
}
