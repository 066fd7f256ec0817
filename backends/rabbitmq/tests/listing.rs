//! Listing topics through the management plugin's HTTP API, against the real broker
//! (127.0.0.1:5672 and its management API on 15672; `SWITCHYARD_AMQP_URL` overrides).

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{cleanup_delays, cleanup_groups, unique, url};
use switchyard_core::{Broker, Error, Message, Publisher, SubscribeOptions, Subscriber};
use switchyard_rabbitmq::{ManagementUnavailable, RabbitBroker};

#[tokio::test]
async fn topics_lists_topics_and_groups_with_their_lag_through_the_management_api() {
    let broker = RabbitBroker::connect(&url()).await.unwrap();
    let topic = unique("listed");
    let sub = broker
        .subscribe(SubscribeOptions::new(&topic, "g"))
        .await
        .unwrap();
    // Subscribed, but the group keeps what it does not take: 3 ready messages.
    sub.close().await.unwrap();
    let sub2 = broker
        .subscribe(SubscribeOptions::new(&topic, "idle"))
        .await
        .unwrap();
    sub2.close().await.unwrap();
    let batch = (0..3).map(|i| Message::new(format!("{i}"))).collect();
    broker.publish_batch(&topic, batch).await.unwrap();
    let topics = broker.topics().await.unwrap();
    let info = topics
        .iter()
        .find(|t| t.name == topic)
        .unwrap_or_else(|| panic!("{topic} is not listed"));
    let lags: HashMap<&str, Option<u64>> = info
        .groups
        .iter()
        .map(|g| (g.name.as_str(), g.lag))
        .collect();
    assert_eq!(lags.len(), 2, "{:?}", info.groups);
    assert_eq!(lags["g"], Some(3));
    assert_eq!(lags["idle"], Some(3));
    assert_eq!(lags["g"], Some(broker.lag(&topic, "g").await.unwrap()));
    // Objects that are not topics stay out: the broker's own, and a group's hold and
    // return exchanges.
    broker
        .redeliver_after(&topic, "g", Message::new("later"), Duration::from_secs(60))
        .await
        .unwrap();
    let names: Vec<String> = broker
        .topics()
        .await
        .unwrap()
        .into_iter()
        .map(|t| t.name)
        .collect();
    assert!(
        names
            .iter()
            .all(|n| !n.starts_with("amq.") && !n.contains(':')),
        "{names:?}"
    );
    broker.close().await.unwrap();
    cleanup_delays(&topic, "g", &[60_000]).await;
    cleanup_groups(&topic, &["g", "idle"], 8).await;
}

#[tokio::test]
async fn topics_without_the_management_api_names_the_plugin() {
    let url = format!("{}?management_url=http://127.0.0.1:9", url());
    let broker = RabbitBroker::connect(&url).await.unwrap();
    let err = broker.topics().await.unwrap_err();
    let Error::Backend { source, .. } = &err else {
        panic!("unexpected error {err}");
    };
    let unavailable = source
        .downcast_ref::<ManagementUnavailable>()
        .unwrap_or_else(|| panic!("source is not ManagementUnavailable: {source}"));
    assert_eq!(unavailable.url, "http://127.0.0.1:9");
    assert!(
        err.to_string()
            .contains("rabbitmq-plugins enable rabbitmq_management"),
        "{err}"
    );
    broker.close().await.unwrap();
}
