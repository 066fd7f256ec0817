//! The README's quickstart is `examples/quickstart.rs`, which `cargo test` compiles and
//! `scripts/examples` runs: this test fails when the README's copy drifts from it.

#[test]
fn the_readme_quotes_examples_quickstart_verbatim() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md");
    let example =
        std::fs::read_to_string(root.join("examples/quickstart.rs")).expect("the example");
    let quoted = readme
        .split("```rust\n")
        .skip(1)
        .filter_map(|rest| rest.split_once("```").map(|(code, _)| code))
        .any(|code| code == example);
    assert!(
        quoted,
        "README.md has no ```rust block equal to examples/quickstart.rs: copy the file into it"
    );
}
