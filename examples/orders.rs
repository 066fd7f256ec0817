//! Placeholder; the orders example follows.
fn main() {}
