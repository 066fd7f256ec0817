//! Run: `cargo run --example quickstart` — the README's first example, kept compiling here.

use std::time::Duration;

use switchyard::{
    App, CancellationToken, Consumer, HandlerError, Json, PublisherExt, SubscribeOptions,
};

#[derive(serde::Serialize, serde::Deserialize)]
struct OrderCreated {
    order: u64,
    customer: String,
}

async fn charge(Json(order): Json<OrderCreated>) -> Result<(), HandlerError> {
    // `?` works on any error type; HandlerError::permanent(e) marks what retrying can't fix.
    println!("charging order {} for {}", order.order, order.customer);
    Ok(())
}

#[tokio::main]
async fn main() -> switchyard::Result<()> {
    let broker = switchyard::connect("memory://").await?; // or kafka://…, amqp://…
    let shutdown = CancellationToken::new(); // or switchyard::shutdown_on_signal()
    let app = App::new(broker.clone())
        .consumer(
            Consumer::handler(SubscribeOptions::new("orders", "payment"), charge).concurrency(16),
        )
        .start(shutdown.clone())
        .await?; // every group has subscribed here
    for order in 1..=3 {
        let event = OrderCreated {
            order,
            customer: "customer-7".into(),
        };
        broker
            .publish_json("orders", Some("customer-7"), &event)
            .await?;
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    shutdown.cancel(); // graceful: in-flight handlers finish and are acked
    for report in app.join().await? {
        println!("{}/{}: acked {}", report.topic, report.group, report.acked);
    }
    Ok(())
}
