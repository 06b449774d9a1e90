//! `max-resolver`: merges two concurrent writes of a property by keeping the larger number.
//! Non-numbers fall back to the write with the higher clock (`b`, by the canonical order).

use twinhost_sdk::{Resolver, Side, Value};

struct Max;

impl Resolver for Max {
    fn resolve(_property: &str, a: Side, b: Side) -> Result<Value, String> {
        Ok(match (a.value.as_f64(), b.value.as_f64()) {
            (Some(x), Some(y)) if x > y => a.value,
            (Some(_), Some(_)) => b.value,
            _ => b.value,
        })
    }
}

twinhost_sdk::export_resolver!(Max);
