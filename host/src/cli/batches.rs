//! Splitting a file of items — a JSON array or NDJSON, from a path or stdin (`-`) — into
//! NDJSON request bodies of at most `batch` items, for the bulk commands (`ingest`,
//! `twin import`); their progress bar and their report of rejected items.

use std::io::{BufRead, Read};
use std::path::Path;

use anyhow::{bail, Context};
use indicatif::{ProgressBar, ProgressStyle};
use serde_json::{json, Value};

/// Rejected items printed in full on stderr; the rest are counted.
pub const SHOWN_REJECTED: usize = 20;

/// One request: an NDJSON body, its item count, and the input bytes it covers.
pub struct Chunk {
    pub body: Vec<u8>,
    pub items: usize,
    pub bytes: u64,
}

pub type Chunks = Box<dyn Iterator<Item = anyhow::Result<Chunk>>>;

/// The batches of `file` (`-`: stdin), and the input's size when it is known (a file).
/// NDJSON streams line by line; a JSON array is read whole, then split.
pub fn open(file: &Path, batch: usize) -> anyhow::Result<(Chunks, Option<u64>)> {
    if batch == 0 {
        bail!("--batch must be at least 1");
    }
    let (mut reader, size): (Box<dyn BufRead>, Option<u64>) = if file == Path::new("-") {
        (Box::new(std::io::stdin().lock()), None)
    } else {
        let f = std::fs::File::open(file).with_context(|| format!("reading {}", file.display()))?;
        let size = f.metadata().ok().map(|m| m.len());
        (Box::new(std::io::BufReader::new(f)), size)
    };
    let first = loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            break None;
        }
        match buf.iter().position(|b| !b.is_ascii_whitespace()) {
            Some(p) => break Some(buf[p]),
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    };
    let chunks = match first {
        None => bail!("{} holds no items", file.display()),
        Some(b'[') => array_chunks(reader, batch)?,
        Some(_) => ndjson_chunks(reader, batch),
    };
    Ok((chunks, size))
}

/// A JSON array, read whole and split into NDJSON bodies of `batch` items.
fn array_chunks(mut reader: impl Read, batch: usize) -> anyhow::Result<Chunks> {
    let mut text = String::new();
    reader.read_to_string(&mut text)?;
    let items: Vec<&serde_json::value::RawValue> =
        serde_json::from_str(&text).context("the input is not a JSON array")?;
    let per_item = text.len() as u64 / items.len().max(1) as u64;
    let chunks: Vec<Chunk> = items
        .chunks(batch)
        .map(|ch| {
            let mut body = Vec::new();
            for it in ch {
                // Compact: an item spread over several lines must stay one NDJSON line.
                let v: Value = serde_json::from_str(it.get()).expect("an item of a parsed array");
                serde_json::to_writer(&mut body, &v).expect("a Value serializes");
                body.push(b'\n');
            }
            Chunk {
                body,
                items: ch.len(),
                bytes: per_item * ch.len() as u64,
            }
        })
        .collect();
    Ok(Box::new(chunks.into_iter().map(Ok)))
}

/// NDJSON, streamed line by line into bodies of `batch` items.
fn ndjson_chunks(reader: impl BufRead + 'static, batch: usize) -> Chunks {
    let mut lines = reader.lines();
    Box::new(std::iter::from_fn(move || {
        let mut body = Vec::new();
        let (mut n, mut bytes) = (0usize, 0u64);
        for line in lines.by_ref() {
            let line = match line {
                Ok(l) => l,
                Err(e) => return Some(Err(e.into())),
            };
            bytes += line.len() as u64 + 1;
            if line.trim().is_empty() {
                continue;
            }
            body.extend_from_slice(line.as_bytes());
            body.push(b'\n');
            n += 1;
            if n == batch {
                break;
            }
        }
        (n > 0).then_some(Ok(Chunk {
            body,
            items: n,
            bytes,
        }))
    }))
}

/// A progress bar on stderr (drawn only on a terminal) counting input bytes: against the
/// input's size when it is known, else a running count.
pub fn progress_bar(size: Option<u64>) -> ProgressBar {
    match size {
        Some(n) => {
            let bar = ProgressBar::new(n);
            bar.set_style(
                ProgressStyle::with_template("{bar:40} {bytes}/{total_bytes} {msg} ({eta})")
                    .expect("valid template"),
            );
            bar
        }
        None => {
            let bar = ProgressBar::no_length();
            bar.set_style(
                ProgressStyle::with_template("{spinner} {bytes} read, {msg} ({elapsed})")
                    .expect("valid template"),
            );
            bar
        }
    }
}

/// Add a response's `rejected` items to `out`, their indexes shifted by `offset` (the items
/// of the batches before) so they count from the start of the input.
pub fn collect_rejected(response: &Value, offset: usize, out: &mut Vec<Value>) {
    for r in response["rejected"].as_array().into_iter().flatten() {
        let mut r = r.clone();
        r["index"] = json!(r["index"].as_u64().unwrap_or(0) + offset as u64);
        out.push(r);
    }
}

/// Print the first rejected items on stderr, and how many more there are.
pub fn print_rejected(rejected: &[Value]) {
    for r in rejected.iter().take(SHOWN_REJECTED) {
        eprintln!(
            "item {}: {}",
            r["index"],
            r["error"]["message"].as_str().unwrap_or("")
        );
    }
    if rejected.len() > SHOWN_REJECTED {
        eprintln!(
            "… and {} more rejected items",
            rejected.len() - SHOWN_REJECTED
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bodies(c: Chunks) -> Vec<(String, usize)> {
        c.map(|c| {
            let c = c.unwrap();
            (String::from_utf8(c.body).unwrap(), c.items)
        })
        .collect()
    }

    #[test]
    fn ndjson_and_arrays_split_into_ndjson_batches() {
        let nd = "{\"a\":1}\n\n{\"a\":2}\n{\"a\":3}\n";
        let got = bodies(ndjson_chunks(std::io::Cursor::new(nd), 2));
        assert_eq!(
            got,
            [
                ("{\"a\":1}\n{\"a\":2}\n".to_owned(), 2),
                ("{\"a\":3}\n".to_owned(), 1)
            ]
        );
        let arr = "[{\"a\":\n 1}, {\"a\": 2},\n{\"a\": 3}]";
        let got = bodies(array_chunks(std::io::Cursor::new(arr), 2).unwrap());
        assert_eq!(
            got,
            [
                ("{\"a\":1}\n{\"a\":2}\n".to_owned(), 2),
                ("{\"a\":3}\n".to_owned(), 1)
            ]
        );
        assert!(array_chunks(std::io::Cursor::new("[1,"), 2).is_err());
    }

    #[test]
    fn rejected_indexes_count_from_the_start_of_the_input() {
        let mut out = Vec::new();
        let resp = json!({"rejected": [{"index": 1, "error": {"message": "m"}}]});
        collect_rejected(&resp, 5000, &mut out);
        assert_eq!(out[0]["index"], 5001);
    }
}
