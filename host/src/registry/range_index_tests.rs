//! Range indexes through the registry: a query answered from an index gives the same twins as
//! the scan, across pages, after updates and deletes, after a reopen, and once the model
//! drops the index.

use std::collections::BTreeSet;

use serde_json::{json, Value};

use crate::registry::{Model, NewTwin, Query, Registry, Update};
use crate::store::Store;
use crate::types::{Properties, TwinId};

fn open(dir: &std::path::Path) -> Registry {
    let store = Store::open(dir).expect("opening the store");
    Registry::open(&store, "node-test").expect("opening the registry")
}

fn props(v: Value) -> Properties {
    v.as_object().expect("an object").clone()
}

/// A small deterministic generator (xorshift).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    /// A temperature: mostly numbers (integers and floats), sometimes a string, a boolean,
    /// an object, or nothing.
    fn temperature(&mut self) -> Value {
        match self.next() % 20 {
            0 => json!("hot"),
            1 => json!(true),
            2 => json!({"c": 90}),
            3 => Value::Null,
            4..=9 => json!(self.next() % 120),
            _ => json!((self.next() % 12_000) as f64 / 100.0),
        }
    }
}

/// Every twin `q` finds, paging `page` at a time; and whether the pages came from an index.
fn run(reg: &Registry, q: &Value, page: usize) -> (BTreeSet<TwinId>, bool) {
    let mut q: Query = serde_json::from_value(q.clone()).unwrap();
    q.limit = Some(page);
    let (mut out, mut indexed) = (BTreeSet::new(), false);
    loop {
        let p = reg.query(&q).unwrap();
        for t in p.iter() {
            assert!(out.insert(t.id), "twin {} came twice", t.id);
        }
        match p.next_cursor {
            Some(c) => {
                indexed |= c.starts_with("ix1.");
                q.cursor = Some(c);
            }
            None => return (out, indexed),
        }
    }
}

/// What `q` should find: every machine, each checked with the query's own conditions.
fn brute(reg: &Registry, q: &Value) -> BTreeSet<TwinId> {
    let query: Query = serde_json::from_value(q.clone()).unwrap();
    let all: Query =
        serde_json::from_value(json!({"entity_type": "machine", "limit": 10000})).unwrap();
    reg.query(&all)
        .unwrap()
        .iter()
        .map(|t| reg.get(&t.id).unwrap())
        .filter(|t| query.matches(t))
        .filter(|t| {
            query
                .ancestor_id
                .is_none_or(|a| reg.is_under(t.parent_id, a))
        })
        .map(|t| t.id)
        .collect()
}

fn queries(site: TwinId) -> Vec<Value> {
    let w = |op: &str, v: Value| json!({"entity_type": "machine", "where": [{"property": "temperature", "op": op, "value": v}]});
    vec![
        w(">", json!(85)),
        w(">=", json!(85.5)),
        w("<", json!(10)),
        w("<=", json!(0)),
        w("=", json!(42)),
        w("=", json!("hot")),
        w("=", json!(true)),
        w("in", json!([1, 2.5, "hot", 3, 100])),
        w(">", json!("a")),
        json!({"entity_type": "machine", "properties": {"status": "fault"}}),
        json!({"entity_type": "machine", "properties": {"status": "fault"},
               "where": [{"property": "temperature", "op": ">", "value": 50}]}),
        json!({"entity_type": "machine", "parent_id": site,
               "where": [{"property": "temperature", "op": ">", "value": 60}]}),
        json!({"entity_type": "machine", "ancestor_id": site,
               "where": [{"property": "temperature", "op": "<=", "value": 60}]}),
    ]
}

#[tokio::test]
async fn indexed_queries_find_what_the_scan_finds() {
    let dir = tempfile::tempdir().unwrap();
    let reg = open(dir.path());
    let sites: Vec<TwinId> = {
        let mut v = Vec::new();
        for _ in 0..2 {
            v.push(
                reg.create(NewTwin {
                    entity_type: "site".into(),
                    ..Default::default()
                })
                .await
                .unwrap()
                .id,
            );
        }
        v
    };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut ids = Vec::new();
    for i in 0..1500 {
        let mut p = props(json!({"status": if i % 3 == 0 { "fault" } else { "ok" }}));
        let t = rng.temperature();
        if !t.is_null() {
            p.insert("temperature".into(), t);
        }
        // A few twins of another type with the same property: never in a machine query.
        let entity_type = if i % 50 == 0 { "pump" } else { "machine" };
        ids.push(
            reg.create(NewTwin {
                entity_type: entity_type.into(),
                properties: p,
                parent_id: Some(sites[i % 2]),
                ..Default::default()
            })
            .await
            .unwrap()
            .id,
        );
    }
    let qs = queries(sites[0]);
    // Before the index: the scan's answers.
    let scanned: Vec<BTreeSet<TwinId>> = qs.iter().map(|q| run(&reg, q, 10_000).0).collect();
    for (q, s) in qs.iter().zip(&scanned) {
        assert_eq!(s, &brute(&reg, q), "scan of {q}");
    }
    // The model applies to writes from now on: the twins already there keep their mixed
    // values (strings, booleans, objects), which the index must handle.
    let model: Model = serde_json::from_value(json!({"properties": {
        "temperature": {"type": "number", "indexed": true},
        "status": {"type": "string", "indexed": true}}}))
    .unwrap();
    reg.put_model("machine", model).await.unwrap();
    assert!(
        reg.inner
            .twins
            .ranges
            .entries("machine", "temperature")
            .unwrap()
            > 1000
    );
    for (q, s) in qs.iter().zip(&scanned) {
        for page in [7, 100] {
            let (got, indexed) = run(&reg, q, page);
            assert_eq!(&got, s, "indexed {q} by pages of {page}");
            assert!(indexed || got.len() <= page, "{q} did not use the index");
        }
    }
    // Updates, removals of the property and deletes move the entries.
    for (k, id) in ids.iter().enumerate().step_by(3) {
        let mut p = Properties::new();
        p.insert(
            "temperature".into(),
            if k % 2 == 0 {
                Value::Null
            } else {
                rng.temperature()
            },
        );
        let _ = reg.apply_batch(vec![Update::new(*id, p)]).await.unwrap();
    }
    for id in ids.iter().skip(1).step_by(7) {
        reg.delete(*id, false).await.unwrap();
    }
    for q in &qs {
        assert_eq!(run(&reg, q, 13).0, brute(&reg, q), "after updates: {q}");
    }
    // A reopen builds the index again from the stored twins.
    let want: Vec<BTreeSet<TwinId>> = qs.iter().map(|q| brute(&reg, q)).collect();
    reg.shutdown();
    drop(reg);
    let reg = open(dir.path());
    assert!(reg
        .inner
        .twins
        .ranges
        .entries("machine", "temperature")
        .is_some());
    for (q, w) in qs.iter().zip(&want) {
        let (got, _) = run(&reg, q, 50);
        assert_eq!(&got, w, "after a reopen: {q}");
    }
    // Without the index the scan answers again; a cursor from the index is refused clearly.
    let mut q: Query = serde_json::from_value(qs[0].clone()).unwrap();
    q.limit = Some(5);
    let cursor = reg.query(&q).unwrap().next_cursor.unwrap();
    reg.delete_model("machine").await.unwrap();
    assert!(reg
        .inner
        .twins
        .ranges
        .entries("machine", "temperature")
        .is_none());
    q.cursor = Some(cursor);
    let e = reg.query(&q).unwrap_err().to_string();
    assert!(e.contains("start again without a cursor"), "{e}");
    for (q, w) in qs.iter().zip(&want) {
        assert_eq!(
            &run(&reg, q, 10_000).0,
            w,
            "scan after the index is gone: {q}"
        );
    }
}
