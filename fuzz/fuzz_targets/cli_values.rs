//! The CLI's `--header` and seconds values: Ok or Err, never a panic; an accepted
//! header joins back to what was given.
#![no_main]

use libfuzzer_sys::fuzz_target;
use switchyard_cli::{parse_header, parse_secs};

fuzz_target!(|value: &str| {
    if let Ok((name, v)) = parse_header(value) {
        assert!(!name.is_empty());
        assert_eq!(format!("{name}={v}"), value);
    }
    if let Ok(d) = parse_secs(value) {
        let secs: f64 = value.trim().parse().expect("accepted means a number");
        assert_eq!(Ok(d), std::time::Duration::try_from_secs_f64(secs));
    }
});
