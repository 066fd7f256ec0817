//! The facade: picking a backend from a URL, and the errors a user sees when the URL
//! or the build is wrong.

use std::sync::Arc;

use switchyard::{
    handler_fn, Error, FailureKind, HandlerError, Json, Message, PublisherExt, SubscribeOptions,
};
use tower::{Service, ServiceExt};

#[derive(Debug, PartialEq, serde::Serialize, serde::Deserialize)]
struct Order {
    id: u64,
    customer: String,
}

#[tokio::test]
async fn unknown_scheme_names_the_known_ones_and_hides_the_password() {
    let err = switchyard::connect("redis://user:hunter2@127.0.0.1:6379")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::UnknownScheme { ref scheme, .. } if scheme == "redis"),
        "{err}"
    );
    let text = err.to_string();
    assert!(
        text.contains("kafka://") && text.contains("amqp://"),
        "{text}"
    );
    assert!(!text.contains("hunter2"), "password leaked: {text}");
}

#[tokio::test]
async fn a_url_without_scheme_is_a_config_error() {
    let err = switchyard::connect("127.0.0.1:9092").await.err().unwrap();
    assert!(
        matches!(err, Error::Config { ref setting, .. } if setting == "url"),
        "{err}"
    );
}

#[cfg(not(feature = "kafka"))]
#[tokio::test]
async fn kafka_url_without_the_feature_names_the_feature() {
    let err = switchyard::connect("kafka://127.0.0.1:9092")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(
            err,
            Error::BackendNotCompiled {
                feature: "kafka",
                ..
            }
        ),
        "{err}"
    );
    assert!(err.to_string().contains("features = [\"kafka\"]"), "{err}");
}

#[cfg(not(feature = "rabbitmq"))]
#[tokio::test]
async fn amqp_url_without_the_feature_names_the_feature() {
    for url in [
        "amqp://guest:guest@127.0.0.1:5672/%2f",
        "amqps://h:5671/%2f",
    ] {
        let err = switchyard::connect(url).await.err().unwrap();
        assert!(
            matches!(
                err,
                Error::BackendNotCompiled {
                    feature: "rabbitmq",
                    ..
                }
            ),
            "{err}"
        );
        assert!(!err.to_string().contains("guest:guest"), "{err}");
    }
}

#[tokio::test]
async fn memory_urls_share_a_named_broker_and_reject_bad_settings() {
    let a = switchyard::connect("memory://facade-shared").await.unwrap();
    let b = switchyard::connect("memory://facade-shared").await.unwrap();
    let mut sub = b.subscribe(SubscribeOptions::new("t", "g")).await.unwrap();
    a.publish("t", Message::new("via a")).await.unwrap();
    let d = sub.recv().await.unwrap().unwrap();
    assert_eq!(d.payload(), b"via a");
    d.ack().await.unwrap();
    assert_eq!(a.backend(), "memory");
    assert!(a.capabilities().replay);

    let err = switchyard::connect("memory://x?capacity=many")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::Config { ref setting, .. } if setting == "capacity"),
        "{err}"
    );
    let err = switchyard::connect("memory://x?capasity=10")
        .await
        .err()
        .unwrap();
    assert!(
        matches!(err, Error::Config { ref setting, .. } if setting == "capasity"),
        "{err}"
    );
    let err = switchyard::connect("memory://x?capacity=0")
        .await
        .err()
        .unwrap();
    assert!(err.to_string().contains("at least 1"), "{err}");
}

#[tokio::test]
async fn typed_json_round_trip_and_undecodable_payload_is_a_decode_failure() {
    let broker = switchyard::connect("memory://facade-json").await.unwrap();
    let mut sub = broker
        .subscribe(SubscribeOptions::new("orders", "billing"))
        .await
        .unwrap();
    let order = Order {
        id: 7,
        customer: "c-1".into(),
    };
    broker
        .publish_json("orders", Some("c-1"), &order)
        .await
        .unwrap();
    broker
        .publish("orders", Message::new(&b"\xff{not json"[..]))
        .await
        .unwrap();

    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let record = seen.clone();
    let mut service = handler_fn(move |Json(o): Json<Order>| {
        let record = record.clone();
        async move {
            record.lock().unwrap().push(o);
            Ok::<_, HandlerError>(())
        }
    });

    let good = sub.recv().await.unwrap().unwrap();
    assert_eq!(good.message().content_type(), Some("application/json"));
    assert_eq!(good.key(), Some("c-1"));
    service
        .ready()
        .await
        .unwrap()
        .call(good.clone())
        .await
        .unwrap();
    assert_eq!(seen.lock().unwrap().as_slice(), &[order]);
    // Settled by us here (the runtime does it in an app); an unsettled drop would requeue it.
    good.ack().await.unwrap();

    let bad = sub.recv().await.unwrap().unwrap();
    assert_eq!(bad.payload(), b"\xff{not json");
    let err = service
        .ready()
        .await
        .unwrap()
        .call(bad.clone())
        .await
        .unwrap_err();
    assert_eq!(err.kind(), FailureKind::Decode);
    assert!(!err.is_retryable());
    assert!(err.to_string().contains("Order"), "{err}");
    bad.nack(switchyard::Nack::Reject).await.unwrap();
}

#[tokio::test]
async fn a_dropped_unsettled_delivery_is_redelivered() {
    let broker = switchyard::connect("memory://facade-drop").await.unwrap();
    let mut sub = broker
        .subscribe(SubscribeOptions::new("t", "g"))
        .await
        .unwrap();
    broker.publish("t", Message::new("keep me")).await.unwrap();
    let first = sub.recv().await.unwrap().unwrap();
    let id = first.id().to_string();
    drop(first);
    let again = sub.recv().await.unwrap().unwrap();
    assert_eq!(again.id(), id);
    assert_eq!(again.delivery_count(), 2);
    again.ack().await.unwrap();
}
