//! The real `switchyard` binary: help, exit status and error text.

use std::process::Command;

fn switchyard(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(args)
        .env_remove("SWITCHYARD_URL")
        .output()
        .expect("run the switchyard binary")
}

#[test]
fn help_lists_the_commands() {
    let out = switchyard(&["--help"]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    for cmd in ["publish", "consume", "dlq", "topics"] {
        assert!(text.contains(cmd), "{text}");
    }
}

#[test]
fn failures_exit_non_zero_with_a_clear_message() {
    let out = switchyard(&["topics", "--url", "nats://127.0.0.1:4222"]);
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.starts_with("switchyard: unknown broker URL scheme `nats`"),
        "{err}"
    );

    let out = switchyard(&["publish", "--topic", "t"]);
    assert_eq!(
        out.status.code(),
        Some(2),
        "a missing --url is a usage error"
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("--url"));
}

#[test]
fn memory_publish_prints_ids_and_offsets() {
    let out = Command::new(env!("CARGO_BIN_EXE_switchyard"))
        .args(["publish", "--url", "memory://", "--topic", "t"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"one\ntwo\n")?;
            child.wait_with_output()
        })
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].ends_with(" offset=0") && lines[1].ends_with(" offset=1"),
        "{text}"
    );
}

#[test]
fn unusable_idle_seconds_are_usage_errors() {
    let commands: [&[&str]; 3] = [
        &[
            "consume",
            "--url",
            "memory://",
            "--topic",
            "t",
            "--group",
            "g",
        ],
        &["dlq", "list", "--url", "memory://", "--topic", "t"],
        &[
            "dlq",
            "replay",
            "--url",
            "memory://",
            "--topic",
            "t",
            "--all",
        ],
    ];
    for command in commands {
        for bad in ["inf", "1e300", "-1", "NaN", "soon"] {
            // `=`, so clap takes "-1" as the value rather than as a flag.
            let arg = format!("--idle-secs={bad}");
            let mut args = command.to_vec();
            args.push(&arg);
            let out = switchyard(&args);
            let err = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{args:?}: {err}");
            assert!(err.contains("--idle-secs"), "{args:?}: {err}");
        }
    }
    // Zero is fine: take what is there now.
    let out = switchyard(&[
        "consume",
        "--url",
        "memory://",
        "--topic",
        "t",
        "--group",
        "g",
        "--idle-secs",
        "0",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
