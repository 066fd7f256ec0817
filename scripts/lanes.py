#!/usr/bin/env python3
"""Runs the built test binaries and the other checks of `scripts/test` in three lanes
at once, so the Kafka tests, the RabbitMQ tests and everything else wait on different
brokers instead of on each other:

    python3 scripts/lanes.py ARTIFACTS LOG [TEST ARGS...]

ARTIFACTS is the output of `cargo test --no-run --message-format=json`; TEST ARGS go to
every test binary (a name filter, say). Within a lane steps run one at a time, so tansu
sees one Kafka test binary at a time, as before. Each step's output goes to
.scratch/steps/<step>.log; a line per step reports it as it ends, and a failed step's
last lines follow. All step logs are appended to LOG in lane order (the conformance,
fault and gate lines `scripts/test` prints come from there). Exits non-zero when a step
failed or ran past its time limit.
"""

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
STEPS = ROOT / ".scratch" / "steps"
# A hung step is killed and reported instead of holding CI until its limit.
STEP_LIMIT = 900

# Test binaries that reach tansu although their name does not say so: they run in the
# Kafka lane, one at a time with the other Kafka tests.
KAFKA_ALSO = {
    "capabilities",
    "durable_idempotency",
    "facade",
    "hostile_input",
    "process_faults",
    "secrets",
    "tower_limits",
}
RABBITMQ_ALSO = {"ephemeral_groups"}
# Test binaries that stop and restart a shared broker (RabbitMQ, PostgreSQL): they run
# alone after the lanes, so no other test sees the outage.
ALONE = {"broker_faults", "postgres_restart"}


def lane_of(package, name):
    if name in ALONE:
        return "alone"
    if package == "switchyard-kafka" or "kafka" in name or name in KAFKA_ALSO:
        return "kafka"
    if package == "switchyard-rabbitmq" or "rabbitmq" in name or name in RABBITMQ_ALSO:
        return "rabbitmq"
    return "other"


def package_name(package_id):
    """The name in a package id: "path+file:///…/dir#name@0.1.0", or
    "path+file:///…/name#0.1.0" when the directory has the package's name."""
    path, _, fragment = package_id.partition("#")
    if "@" in fragment:
        return fragment.split("@")[0]
    return path.rstrip("/").rsplit("/", 1)[-1]


def executables(artifacts):
    """The artifact messages of the built executables (tests and examples)."""
    for line in Path(artifacts).read_text().splitlines():
        try:
            msg = json.loads(line)
        except ValueError:
            continue
        if msg.get("reason") == "compiler-artifact" and msg.get("executable"):
            yield msg


def example_binary(artifacts, name):
    """The executable of the facade's example `name`, as the build made it: running it
    through `cargo run` would resolve features for the facade alone and rebuild tokio and
    the crates above it."""
    for msg in executables(artifacts):
        if msg["target"]["kind"][0] == "example" and msg["target"]["name"] == name:
            return msg["executable"]
    sys.exit(f"lanes.py: the build made no example '{name}'")


def test_binaries(artifacts):
    """(package, target name, kind, executable, package dir) of each built test."""
    found = []
    for msg in executables(artifacts):
        if not msg["profile"]["test"]:
            continue
        package = package_name(msg["package_id"])
        found.append(
            (
                package,
                msg["target"]["name"],
                msg["target"]["kind"][0],
                msg["executable"],
                str(Path(msg["manifest_path"]).parent),
            )
        )
    return found


class Step:
    def __init__(self, name, argv, cwd=ROOT, env=None, summary=0):
        self.name, self.argv, self.cwd, self.env = name, argv, cwd, env or {}
        # How many of its last lines go into the summary (steps that print one).
        self.summary = summary
        self.log = STEPS / (name.replace("/", "-").replace(" ", "-") + ".log")
        self.ok = None
        self.seconds = 0
        # CPU time (user + system) of the step and the processes it waited for: the
        # suite is bound by CPU on two cores, so this says which steps cost the most.
        self.cpu = 0


def failure_excerpt(lines, tail=40, panics=5):
    """What a failed step's log shows: each panic's message first (with
    RUST_BACKTRACE set, the backtrace after it fills the tail), then the last lines."""
    excerpt = []
    for i, line in enumerate(lines[:-tail]):
        if "panicked at" in line and len(excerpt) < panics * 8:
            excerpt.append(line)
            for follow in lines[i + 1 : i + 8]:
                if follow.startswith(("stack backtrace:", "note: ")):
                    break
                excerpt.append(follow)
    if excerpt:
        excerpt.append("...")
    return excerpt + lines[-tail:]


def wait_with_usage(proc, deadline):
    """Waits for `proc` until `deadline` (then kills its group): its exit code (or
    why it was killed) and the CPU seconds it and its reaped children used."""
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, round(usage.ru_utime + usage.ru_stime)
        if time.monotonic() >= deadline:
            os.killpg(proc.pid, 9)
            _, _, usage = os.wait4(proc.pid, 0)
            proc.returncode = -9
            return f"killed after {STEP_LIMIT} s", round(usage.ru_utime + usage.ru_stime)
        time.sleep(0.2)


def run_step(lane, step, print_lock):
    env = dict(os.environ, **step.env)
    started = time.monotonic()
    with open(step.log, "wb") as out:
        proc = subprocess.Popen(
            step.argv, cwd=step.cwd, env=env, stdout=out, stderr=subprocess.STDOUT,
            process_group=0,  # its own group, so a timeout kills its children too
        )
        code, step.cpu = wait_with_usage(proc, started + STEP_LIMIT)
    step.seconds = round(time.monotonic() - started)
    step.ok = code == 0
    verdict = "ok" if step.ok else f"FAILED ({code})"
    with print_lock:
        print(f"== {lane}: {step.name} {verdict}, {step.seconds} s (CPU {step.cpu} s) ==",
              flush=True)
        if not step.ok:
            lines = step.log.read_text(errors="replace").splitlines()
            print("\n".join("    " + line for line in failure_excerpt(lines)), flush=True)


def main():
    artifacts, log = sys.argv[1], Path(sys.argv[2])
    test_args = sys.argv[3:]
    STEPS.mkdir(parents=True, exist_ok=True)
    features = os.environ["SWITCHYARD_FEATURES"]
    cargo = os.environ.get("CARGO") or shutil.which("cargo") or "cargo"
    kafka = os.environ["SWITCHYARD_KAFKA_URL"]
    amqp = os.environ["SWITCHYARD_AMQP_URL"]

    lanes = {"kafka": [], "rabbitmq": [], "other": [], "alone": []}
    for package, name, kind, exe, pkg_dir in sorted(test_binaries(artifacts)):
        # What `cargo test` gives a test process: its package directory as the working
        # directory, and the cargo it may call back (tests/fault_process builds an
        # example with it).
        env = {"CARGO": cargo, "CARGO_MANIFEST_DIR": pkg_dir, "CARGO_PKG_NAME": package}
        step = Step(f"{package}/{kind}/{name}", [exe, *test_args], pkg_dir, env)
        lanes[lane_of(package, name)].append(step)

    def orders(url, n):
        topic = f"sy-orders-{os.getpid()}-{url.split(':')[0]}"
        argv = [example_binary(artifacts, "orders"), "--orders", str(n), "--fail-rate",
                "0.2", "--poison", "3", "--duplicates", "20", "--url", url, "--topic", topic]
        return Step(f"orders {url.split(':')[0]}", argv, summary=1)

    if not test_args:
        # The main example with transient failures, poison orders and duplicates: it
        # exits non-zero unless every order is handled once per group, in per-customer
        # order, with exactly the poison orders dead-lettered.
        lanes["rabbitmq"] += [
            orders(amqp, 2000),
            orders(kafka, 2000),
            # Every pattern example once; each exits non-zero when what it shows did
            # not happen.
            Step("examples", ["scripts/examples"], summary=40),
        ]
        lanes["other"] += [
            Step("doctests", [cargo, "test", "--workspace", "--doc", "--no-fail-fast",
                              "--features", features]),
            orders("memory://", 10000),
            # Without the broker features: the "backend not compiled in" errors.
            Step("facade without broker features",
                 [cargo, "test", "-p", "switchyard", "--test", "facade"]),
            # Formatting, lints, docs, feature combinations and rust-version.
            Step("release gates", ["scripts/gates"]),
        ]

    print_lock = threading.Lock()
    started = time.monotonic()
    threads = []
    for lane, steps in lanes.items():
        if lane == "alone":
            continue

        def run_lane(lane=lane, steps=steps):
            for step in steps:
                run_step(lane, step, print_lock)
        thread = threading.Thread(target=run_lane)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    for step in lanes["alone"]:
        run_step("alone", step, print_lock)

    failed = 0
    summary = []
    with open(log, "a") as out:
        for lane, steps in lanes.items():
            for step in steps:
                out.write(f"\n==== {lane}: {step.name} ====\n")
                out.write(step.log.read_text(errors="replace"))
                failed += not step.ok
                if step.summary:
                    lines = step.log.read_text(errors="replace").splitlines()
                    summary += [f"{step.name}: {line}" for line in lines[-step.summary:]]
    (STEPS / "summary.txt").write_text("".join(line + "\n" for line in summary))
    for lane, steps in lanes.items():
        print(f"lane {lane}: {len(steps)} steps, {sum(s.seconds for s in steps)} s, "
              f"CPU {sum(s.cpu for s in steps)} s")
    costliest = sorted((s for steps in lanes.values() for s in steps), key=lambda s: -s.cpu)
    print("most CPU: " + ", ".join(f"{s.name} {s.cpu} s" for s in costliest[:8]))
    print(f"lanes: {failed} failed, in {round(time.monotonic() - started)} s")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
