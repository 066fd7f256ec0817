//! Placeholder; the memory benchmark follows.
fn main() {}
