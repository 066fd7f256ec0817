//! An ephemeral group's broker state goes away after its last member leaves; a normal
//! group's stays. Memory in process; RabbitMQ against the real broker (127.0.0.1:5672,
//! guest/guest; `SWITCHYARD_AMQP_URL` overrides), failing, never skipping, when it is
//! unreachable. Run with `--features all-backends`.

#[cfg(feature = "memory")]
mod memory {
    use switchyard::memory::MemoryBroker;
    use switchyard::{Broker, Message, Publisher, SubscribeOptions, Subscriber};

    fn groups(broker: &MemoryBroker, topic: &str) -> Vec<String> {
        let (_, groups) = broker.topic_stats(topic).expect("topic exists");
        groups.into_iter().map(|(name, _)| name).collect()
    }

    #[tokio::test]
    async fn an_ephemeral_group_is_dropped_with_its_last_member_and_a_normal_one_stays() {
        let broker = MemoryBroker::new();
        let ephemeral = SubscribeOptions::new("t", "look").ephemeral(true);
        let a = broker.subscribe(ephemeral.clone()).await.unwrap();
        let mut b = broker.subscribe(ephemeral.clone()).await.unwrap();
        let normal = broker
            .subscribe(SubscribeOptions::new("t", "kept"))
            .await
            .unwrap();
        // Members must agree.
        assert!(broker
            .subscribe(SubscribeOptions::new("t", "look"))
            .await
            .is_err());
        broker.publish("t", Message::new("m")).await.unwrap();
        a.close().await.unwrap();
        assert_eq!(
            groups(&broker, "t"),
            vec!["look", "kept"],
            "one member left"
        );
        // The last member's unsettled delivery does not keep the group.
        let d = b.recv().await.unwrap().unwrap();
        b.close().await.unwrap();
        assert!(d.ack().await.is_err(), "its group is gone");
        assert_eq!(groups(&broker, "t"), vec!["kept"]);
        let topics = broker.topics().await.unwrap();
        let names: Vec<&str> = topics[0].groups.iter().map(|g| g.name.as_str()).collect();
        assert_eq!(names, vec!["kept"]);
        // A dropped member (no close) counts as leaving too.
        let c = broker.subscribe(ephemeral.clone()).await.unwrap();
        assert_eq!(groups(&broker, "t"), vec!["kept", "look"]);
        drop(c);
        assert_eq!(groups(&broker, "t"), vec!["kept"]);
        normal.close().await.unwrap();
        assert_eq!(groups(&broker, "t"), vec!["kept"], "a normal group stays");
        assert_eq!(broker.lag("t", "kept").await.unwrap(), 1);
    }

    /// A group that no longer exists holds no messages in the log: a full topic with
    /// only a dropped ephemeral group behind accepts new messages.
    #[tokio::test]
    async fn a_dropped_ephemeral_group_holds_back_no_messages() {
        use std::time::Duration;
        use switchyard::memory::MemoryConfig;
        let broker = MemoryBroker::with_config(
            MemoryConfig::default()
                .capacity(4)
                .publish_timeout(Duration::from_millis(200)),
        );
        let sub = broker
            .subscribe(SubscribeOptions::new("t", "look").ephemeral(true))
            .await
            .unwrap();
        for i in 0..4 {
            broker
                .publish("t", Message::new(format!("{i}")))
                .await
                .unwrap();
        }
        sub.close().await.unwrap();
        broker
            .publish("t", Message::new("after"))
            .await
            .expect("room once the group is gone");
    }
}

#[cfg(all(feature = "rabbitmq", feature = "broker-tests"))]
mod rabbitmq {
    use std::process::Command;
    use std::time::{Duration, Instant};

    use switchyard::rabbitmq::{RabbitBroker, Unroutable};
    use switchyard::{Broker, Error, Message, Publisher, SubscribeOptions, Subscriber};
    use switchyard_conformance::support::unique_name;

    fn url() -> String {
        std::env::var("SWITCHYARD_AMQP_URL")
            .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".to_string())
    }

    fn unroutable(e: &Error) -> bool {
        matches!(e, Error::Backend { source, .. } if source.downcast_ref::<Unroutable>().is_some())
    }

    /// Deletes a group's queues and the topic's exchange with `rabbitmqctl` (this crate
    /// has no AMQP client of its own), so the broker's file handles are not used up.
    fn cleanup(topic: &str, group: &str) {
        let queues = (0..8)
            .map(|p| format!("{topic}:{group}.p{p}"))
            .chain([format!("{topic}:{group}.members")]);
        let mut expr = String::new();
        for q in queues {
            expr.push_str(&format!(
                "catch rabbit_amqqueue:delete(element(2, rabbit_amqqueue:lookup(rabbit_misc:r(<<\"/\">>, queue, <<\"{q}\">>))), false, false, <<\"test\">>), "
            ));
        }
        expr.push_str(&format!(
            "catch rabbit_exchange:delete(rabbit_misc:r(<<\"/\">>, exchange, <<\"{topic}\">>), false, <<\"test\">>), ok."
        ));
        let out = Command::new("rabbitmqctl")
            .args(["eval", &expr])
            .output()
            .expect("rabbitmqctl must be runnable (the test deletes what it made with it)");
        assert!(
            out.status.success(),
            "cleanup failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// An ephemeral group's queues carry `x-expires`: soon after its last member
    /// left (3 s here), they are gone, so a message to its topic reaches no queue. A normal group's
    /// queues stay and keep what is published.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_ephemeral_groups_queues_expire_after_its_last_member_and_a_normal_ones_stay() {
        let broker = RabbitBroker::connect(&url())
            .await
            .expect("RabbitMQ must be reachable");
        let (gone_topic, kept_topic) = (unique_name("sye-gone"), unique_name("sye-kept"));
        // Long enough to outlast declaring the group's 1,024 slot bindings on a loaded
        // machine; the queues' x-expires clock runs from their declaration.
        let expiry = Duration::from_secs(3);
        let ephemeral = SubscribeOptions::new(&gone_topic, "look")
            .ephemeral(true)
            .ephemeral_expiry(expiry);
        // In a task, so the queues are deleted even when an assertion fails.
        let (gone, kept_name, client) = (gone_topic.clone(), kept_topic.clone(), broker.clone());
        let outcome = tokio::spawn(async move {
            let (broker, gone_topic, kept_topic) = (client, gone, kept_name);
            let a = broker.subscribe(ephemeral.clone()).await?;
            let b = broker.subscribe(ephemeral.clone()).await?;
            let kept = broker
                .subscribe(SubscribeOptions::new(&kept_topic, "kept"))
                .await?;
            // Members must agree on the group's kind.
            let mismatch = broker
                .subscribe(SubscribeOptions::new(&gone_topic, "look"))
                .await;
            assert!(mismatch.is_err(), "a durable member of an ephemeral group");
            a.close().await?;
            // One member is left: the queues stay past the expiry.
            tokio::time::sleep(expiry + Duration::from_millis(500)).await;
            broker
                .publish(&gone_topic, Message::new("while one is left"))
                .await?;
            b.close().await?;
            kept.close().await?;
            let start = Instant::now();
            loop {
                match broker.publish(&gone_topic, Message::new("after")).await {
                    Err(e) if unroutable(&e) => break,
                    Err(e) => return Err(e),
                    Ok(_) => assert!(
                        start.elapsed() < Duration::from_secs(15),
                        "the ephemeral group's queues still take messages 15 s after its last \
                         member left (x-expires {expiry:?})"
                    ),
                }
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            // The normal group, left as long, still keeps messages.
            broker.publish(&kept_topic, Message::new("kept")).await?;
            assert_eq!(broker.lag(&kept_topic, "kept").await?, 1);
            Ok::<_, Error>(())
        })
        .await;
        cleanup(&gone_topic, "look");
        cleanup(&kept_topic, "kept");
        let _ = broker.close().await;
        match outcome {
            Ok(r) => r.unwrap(),
            Err(e) => std::panic::resume_unwind(e.into_panic()),
        }
    }
}
