//! The map in docs/architecture.md ("Where each step lives") names real files: every
//! backticked path in that section must exist, and the section must name one.

use std::path::Path;

#[test]
fn every_path_in_the_architecture_map_exists() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let doc = std::fs::read_to_string(root.join("docs/architecture.md"))
        .expect("docs/architecture.md is readable");
    let start = doc
        .find("## Where each step lives")
        .expect("docs/architecture.md has a 'Where each step lives' section");
    let section = &doc[start..];
    let section = match section[3..].find("\n## ") {
        Some(end) => &section[..end + 3],
        None => section,
    };
    let paths: Vec<&str> = section
        .split('`')
        .skip(1)
        .step_by(2)
        .filter(|s| s.ends_with(".rs"))
        .collect();
    assert!(
        paths.len() >= 20,
        "the map names only {} paths",
        paths.len()
    );
    let missing: Vec<&&str> = paths.iter().filter(|p| !root.join(p).is_file()).collect();
    assert!(
        missing.is_empty(),
        "docs/architecture.md names files that do not exist: {missing:?}"
    );
}
