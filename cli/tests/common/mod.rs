//! Helpers shared by the CLI's broker tests: running a process with input, fresh topic
//! names, the RabbitMQ test broker and its pika helper.
// Each test binary uses only some of these.
#![allow(dead_code)]

use std::io::Write;
use std::process::{Command, Stdio};

/// The RabbitMQ test broker (`SWITCHYARD_AMQP_URL`).
pub(crate) fn amqp_url() -> String {
    std::env::var("SWITCHYARD_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The pika helper script (publish / consume / delete).
pub(crate) fn rabbitmq_client() -> String {
    concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/foreign/rabbitmq_client.py"
    )
    .to_string()
}

/// The `switchyard` binary, not reading a URL from the environment.
pub(crate) fn switchyard() -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_switchyard"));
    cmd.env_remove("SWITCHYARD_URL");
    cmd
}

/// Runs `cmd` with `stdin` as its input; panics with its output unless it succeeds,
/// and returns its standard output.
pub(crate) fn run(mut cmd: Command, stdin: &str) -> String {
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// A fresh topic name (`sy-` prefixed, so the RabbitMQ cleanup script knows it).
pub(crate) fn topic(label: &str) -> String {
    format!(
        "sy-cli-{label}-{}",
        &switchyard::new_id().replace('-', "")[20..]
    )
}

/// Deletes a topic's exchange and its groups' queues on RabbitMQ (at the end of a test,
/// and on a panic).
pub(crate) struct RabbitCleanup {
    /// The topic.
    pub(crate) topic: String,
    /// Its groups.
    pub(crate) groups: Vec<String>,
}

impl Drop for RabbitCleanup {
    fn drop(&mut self) {
        let mut cmd = Command::new("python3");
        cmd.args([
            rabbitmq_client().as_str(),
            "delete",
            &amqp_url(),
            &self.topic,
        ]);
        cmd.args(&self.groups);
        let _ = cmd.status();
    }
}
