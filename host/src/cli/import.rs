//! `twinhost twin import FILE`: provision twins from a JSON array or NDJSON file (or stdin,
//! `-`) through `POST /v1/twins/bulk`, in batches sent one after another, so an item may
//! name as its parent a twin of an earlier line — in its own batch or in one before.

use std::path::Path;
use std::time::Instant;

use anyhow::{bail, Context};
use reqwest::Method;
use serde_json::{json, Value};

use super::batches::{self, Chunk};
use super::client::Client;

/// Items per request by default: one durable commit each, well under the server's default
/// bound (`--max-bulk-items`, 10,000) and its default body limit at a few hundred bytes an item.
pub const DEFAULT_IMPORT_BATCH: usize = 5_000;

/// Send the items of `file` in batches of `batch`, with a progress bar on stderr; print the
/// summary (`created`, `updated`, `failed`) on stdout and the first errors on stderr. Fails
/// (exit 1) when an item was refused; what was accepted stays committed.
pub async fn import(c: &Client, file: &Path, batch: usize, upsert: bool) -> anyhow::Result<()> {
    let (chunks, size) = batches::open(file, batch)?;
    let path = if upsert {
        "/v1/twins/bulk?upsert=true"
    } else {
        "/v1/twins/bulk"
    };
    let bar = batches::progress_bar(size);
    let started = Instant::now();
    let (mut created, mut updated, mut offset) = (0u64, 0u64, 0usize);
    let mut rejected: Vec<Value> = Vec::new();
    for chunk in chunks {
        let Chunk { body, items, bytes } = chunk?;
        let v = c
            .call(Method::POST, path, Some(body), "application/x-ndjson")
            .await
            .with_context(|| {
                format!(
                    "the batch of items {offset}–{} was refused whole; the {offset} items \
                     before it were sent ({created} created, {updated} updated); a smaller \
                     --batch may help",
                    offset + items - 1
                )
            });
        let v = match v {
            Ok(v) => v,
            Err(e) => {
                bar.abandon();
                return Err(e);
            }
        };
        created += v["created"].as_u64().unwrap_or(0);
        updated += v["updated"].as_u64().unwrap_or(0);
        batches::collect_rejected(&v, offset, &mut rejected);
        offset += items;
        bar.inc(bytes);
        bar.set_message(format!(
            "{created} created, {updated} updated, {} failed",
            rejected.len()
        ));
    }
    bar.finish();
    let secs = started.elapsed().as_secs_f64();
    batches::print_rejected(&rejected);
    println!(
        "{}",
        json!({"created": created, "updated": updated, "failed": rejected.len(),
               "seconds": (secs * 1000.0).round() / 1000.0,
               "twins_per_s": ((created + updated) as f64 / secs).round()})
    );
    if !rejected.is_empty() {
        bail!(
            "{} of {} items were refused (the others are committed)",
            rejected.len(),
            offset
        );
    }
    Ok(())
}
