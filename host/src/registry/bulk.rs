//! Bulk provisioning: many twins created — or, with `upsert`, updated when their id exists —
//! in one job of the writer, so one durable commit covers the whole batch.
//!
//! Each item goes through the same steps as a single create ([`Registry::create_one`]) or a
//! single patch ([`Registry::apply_one`]): validation against the model, version and clocks,
//! the change feed, events and history. Items are applied in order, so an item may name as its
//! parent a twin created by an earlier item of the same batch. A rejected item does not stop
//! the rest.

use chrono::Utc;

use super::{check_patch, NewTwin, Registry, RegistryError, Update};
use crate::types::TwinId;

/// What became of a batch of twins.
#[derive(Debug, Default)]
pub struct ProvisionOutcome {
    /// Twins created.
    pub created: usize,
    /// Existing twins updated (upsert only), including those whose patch changed nothing.
    pub updated: usize,
    /// The id of each item, by its position in the batch: the twin created or updated, or
    /// `None` for a rejected item.
    pub ids: Vec<Option<TwinId>>,
    /// Why each rejected item was refused, by its position in the batch.
    pub rejected: Vec<(usize, RegistryError)>,
}

impl Registry {
    /// Create `items` in order with one durable commit. With `upsert`, an item whose `id`
    /// names an existing twin updates it instead: its `properties` are a merge patch (as
    /// `PATCH`; `null` removes), its `entity_type` must be the twin's, and its `parent_id`,
    /// when given, the twin's parent (a twin is not moved here). Without `upsert` such an
    /// item is refused as a duplicate.
    pub async fn provision(
        &self,
        items: Vec<NewTwin>,
        upsert: bool,
    ) -> Result<ProvisionOutcome, RegistryError> {
        self.write(move |this, b, changes| {
            let now = Utc::now();
            let mut out = ProvisionOutcome {
                ids: Vec::with_capacity(items.len()),
                ..Default::default()
            };
            for (i, n) in items.into_iter().enumerate() {
                let existing = match (upsert, n.id) {
                    (true, Some(id)) => this.inner.twins.with(&id, |b| {
                        (
                            id,
                            crate::types::compact::entity_type_is(b, &n.entity_type),
                            crate::types::compact::parent_id(b),
                        )
                    }),
                    _ => None,
                };
                let r = match existing {
                    Some((id, same_type, parent)) => {
                        if !same_type {
                            Err(RegistryError::Conflict(format!(
                                "twin {id} exists with another entity type; an upsert cannot change it"
                            )))
                        } else if n.parent_id.is_some_and(|p| Some(p) != parent) {
                            Err(RegistryError::Conflict(format!(
                                "twin {id} exists under another parent; an upsert does not move a twin"
                            )))
                        } else {
                            let mut u = Update::new(id, n.properties);
                            check_patch(&u.patch)
                                .and_then(|()| {
                                    this.apply_one(&mut u, now, b, changes, false, false)
                                })
                                .map(|_| {
                                    out.updated += 1;
                                    id
                                })
                        }
                    }
                    None => this.create_one(n, now, b, changes).map(|t| {
                        out.created += 1;
                        t.id
                    }),
                };
                match r {
                    Ok(id) => out.ids.push(Some(id)),
                    Err(e) => {
                        out.ids.push(None);
                        out.rejected.push((i, e));
                    }
                }
            }
            metrics::counter!("twinhost_twins_provisioned_total", "outcome" => "created")
                .increment(out.created as u64);
            metrics::counter!("twinhost_twins_provisioned_total", "outcome" => "updated")
                .increment(out.updated as u64);
            out
        })
        .await
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use serde_json::{json, Value};

    use super::*;
    use crate::registry::{Change, ChangeKind};
    use crate::store::Store;
    use crate::types::Properties;

    type Seen = Arc<parking_lot::Mutex<Vec<Change>>>;

    /// A registry on `dir` whose committed changes are collected.
    fn open(dir: &std::path::Path) -> (Registry, Seen) {
        let store = Store::open(dir).expect("opening the store");
        let registry = Registry::open(&store, "node-test").expect("opening the registry");
        let seen = Seen::default();
        let sink = seen.clone();
        registry.set_change_sink(Arc::new(move |changes| sink.lock().extend(changes)));
        (registry, seen)
    }

    fn kinds(seen: &Seen) -> Vec<ChangeKind> {
        seen.lock().iter().map(|c| c.kind).collect()
    }

    fn props(v: serde_json::Value) -> Properties {
        v.as_object().expect("an object").clone()
    }

    fn machine(id: Option<TwinId>, parent: Option<TwinId>, p: serde_json::Value) -> NewTwin {
        NewTwin {
            id,
            entity_type: "machine".into(),
            properties: props(p),
            parent_id: parent,
        }
    }

    #[tokio::test]
    async fn items_apply_in_order_and_bad_ones_are_refused_alone() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, seen) = open(dir.path());
        let (building, dup) = (TwinId::new_v7(), TwinId::new_v7());
        let items = vec![
            NewTwin {
                id: Some(building),
                entity_type: "building".into(),
                ..Default::default()
            },
            machine(None, Some(building), json!({"temperature": 70})),
            machine(Some(dup), None, json!({})),
            machine(Some(dup), None, json!({})),
            machine(None, Some(TwinId::new_v7()), json!({})),
        ];
        let out = reg.provision(items, false).await.unwrap();
        assert_eq!((out.created, out.updated), (3, 0));
        let bad: Vec<usize> = out.rejected.iter().map(|r| r.0).collect();
        assert_eq!(bad, [3, 4]);
        assert!(matches!(out.rejected[0].1, RegistryError::Conflict(_)));
        assert!(matches!(out.rejected[1].1, RegistryError::NotFound(_)));
        let child = out.ids[1].expect("created");
        assert_eq!(reg.get(&child).unwrap().parent_id, Some(building));
        assert_eq!(reg.get(&building).unwrap().children_ids.len(), 1);
        assert_eq!(out.ids[3], None);
        // One change (an event, a feed entry) per twin created, none for the refused.
        assert_eq!(kinds(&seen), [ChangeKind::Created; 3]);
        reg.shutdown();
    }

    #[tokio::test]
    async fn upsert_merges_into_existing_twins_and_creates_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, seen) = open(dir.path());
        let id = reg
            .create(machine(
                None,
                None,
                json!({"temperature": 70, "status": "ok"}),
            ))
            .await
            .unwrap()
            .id;
        let fresh = TwinId::new_v7();
        let items = vec![
            machine(Some(id), None, json!({"temperature": 71, "status": null})),
            machine(Some(fresh), None, json!({"temperature": 1})),
            NewTwin {
                id: Some(id),
                entity_type: "pump".into(),
                ..Default::default()
            },
            machine(Some(id), Some(fresh), json!({})),
        ];
        let out = reg.provision(items, true).await.unwrap();
        assert_eq!((out.created, out.updated), (1, 1), "{:?}", out.rejected);
        assert_eq!(out.rejected.iter().map(|r| r.0).collect::<Vec<_>>(), [2, 3]);
        let t = reg.get(&id).unwrap();
        assert_eq!(Value::Object(t.properties), json!({"temperature": 71}));
        assert_eq!(t.version, 2);
        assert!(reg.get(&fresh).is_ok());
        assert_eq!(
            kinds(&seen),
            [
                ChangeKind::Created,
                ChangeKind::Updated,
                ChangeKind::Created
            ]
        );
        reg.shutdown();
    }

    /// A twin's JSON lists at most [`crate::registry::MAX_CHILDREN_LISTED`] children (the
    /// first in id order); the children call and a query on `parent_id` give every one.
    #[tokio::test]
    async fn a_parent_lists_its_first_thousand_children_and_queries_page_through_all() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _) = open(dir.path());
        let building = TwinId::new_v7();
        let mut items = vec![NewTwin {
            id: Some(building),
            entity_type: "building".into(),
            ..Default::default()
        }];
        let n = crate::registry::MAX_CHILDREN_LISTED + 234;
        items.extend((0..n).map(|i| machine(None, Some(building), json!({"i": i}))));
        let out = reg.provision(items, false).await.unwrap();
        assert_eq!(out.created, n + 1);
        let listed = reg.get(&building).unwrap().children_ids;
        assert_eq!(listed.len(), crate::registry::MAX_CHILDREN_LISTED);
        let mut all: Vec<TwinId> = out.ids[1..].iter().map(|i| i.unwrap()).collect();
        all.sort();
        assert_eq!(
            listed.iter().copied().collect::<Vec<_>>(),
            all[..crate::registry::MAX_CHILDREN_LISTED]
        );
        assert_eq!(reg.children(&building, None, n).unwrap().0.len(), n);
        let mut q = crate::registry::Query {
            parent_id: Some(building),
            limit: Some(500),
            ..Default::default()
        };
        let mut seen = Vec::new();
        loop {
            let page = reg.query(&q).unwrap();
            seen.extend(page.iter().map(|t| t.id));
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(seen, all);
        reg.shutdown();
    }

    /// A parent with more children than a cascading delete removes per commit (the
    /// issue's million children, scaled down): its children are listed in pages, an
    /// `ancestor_id` query too big to gather pages through every twin of the subtree, and
    /// the delete goes leaves first, in chunks, until the parent itself is gone.
    #[tokio::test]
    async fn a_parent_of_many_children_pages_them_and_a_cascade_deletes_in_chunks() {
        use crate::registry::write::DELETE_CHUNK;
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let reg = Registry::open(&store, "node-test").unwrap();
        // The changes, and how many each commit handed over.
        let (seen, commits) = (
            Seen::default(),
            Arc::new(parking_lot::Mutex::new(Vec::new())),
        );
        let (sink, sizes) = (seen.clone(), commits.clone());
        reg.set_change_sink(Arc::new(move |changes: Vec<Change>| {
            sizes.lock().push(changes.len());
            sink.lock().extend(changes)
        }));
        let (site, building) = (TwinId::new_v7(), TwinId::new_v7());
        let n = 2 * DELETE_CHUNK + 500;
        assert!(n > crate::registry::query::MAX_SUBTREE_GATHERED);
        let mut items = vec![
            NewTwin {
                id: Some(site),
                entity_type: "site".into(),
                ..Default::default()
            },
            NewTwin {
                id: Some(building),
                entity_type: "building".into(),
                parent_id: Some(site),
                ..Default::default()
            },
        ];
        items.extend((0..n).map(|i| machine(None, Some(building), json!({"i": i}))));
        let out = reg.provision(items, false).await.unwrap();
        let mut machines: Vec<TwinId> = out.ids[2..].iter().map(|i| i.unwrap()).collect();
        machines.sort();
        // Three grandchildren under the first machine.
        let sensors: Vec<NewTwin> = (0..3)
            .map(|_| NewTwin {
                entity_type: "sensor".into(),
                parent_id: Some(machines[0]),
                ..Default::default()
            })
            .collect();
        let sensors: Vec<TwinId> = (reg.provision(sensors, false).await.unwrap().ids)
            .into_iter()
            .map(Option::unwrap)
            .collect();

        // The children call pages in id order.
        let (mut listed, mut after) = (Vec::new(), None);
        loop {
            let (page, next) = reg.children(&building, after, 7_000).unwrap();
            assert!(page.len() <= 7_000);
            listed.extend(page.iter().map(|t| t.id));
            match next {
                Some(c) => after = Some(c),
                None => break,
            }
        }
        assert_eq!(listed, machines);

        // The site's subtree is too big to gather: the query walks up from every machine.
        let mut q = crate::registry::Query {
            ancestor_id: Some(site),
            entity_type: Some("machine".into()),
            limit: Some(10_000),
            ..Default::default()
        };
        let mut found = Vec::new();
        loop {
            let page = reg.query(&q).unwrap();
            found.extend(page.iter().map(|t| t.id));
            match page.next_cursor {
                Some(c) => q.cursor = Some(c),
                None => break,
            }
        }
        assert_eq!(found, machines);
        // A small subtree is still answered (gathered).
        q.ancestor_id = Some(machines[0]);
        q.entity_type = Some("sensor".into());
        q.cursor = None;
        assert_eq!(reg.query(&q).unwrap().len(), 3);

        // A chunk of the subtree holds children before their parents, the root last.
        {
            let idx = reg.inner.index.read();
            let chunk = idx.leaves_first(site, 5);
            let mut first: Vec<TwinId> = chunk[..3].to_vec();
            first.sort();
            let mut want = sensors.clone();
            want.sort();
            assert_eq!(
                (first, chunk[3..].to_vec()),
                (want, vec![machines[0], machines[1]])
            );
            let all = idx.leaves_first(site, usize::MAX);
            assert_eq!((all.len(), all.last()), (n + 5, Some(&site)));
        }

        // Without cascade the delete is refused and counts the subtree.
        match reg.delete(site, false).await {
            Err(RegistryError::HasDescendants { count, .. }) => assert_eq!(count, n + 4),
            other => panic!("expected HasDescendants, got {other:?}"),
        }
        seen.lock().clear();
        commits.lock().clear();
        assert_eq!(reg.delete(site, true).await.unwrap(), n + 5);
        // In chunks: no commit removed more than a chunk.
        let sizes = commits.lock().clone();
        assert_eq!(sizes.iter().sum::<usize>(), n + 5);
        assert!(
            sizes.len() >= 3 && sizes.iter().all(|&k| k <= DELETE_CHUNK),
            "{sizes:?}"
        );
        assert!(reg.get(&site).is_err() && reg.get(&building).is_err());
        assert_eq!(reg.ids_of_type("machine", 1).1, 0);
        assert_eq!(reg.ids_of_type("sensor", 1).1, 0);
        // Every twin's delete event, each after those of its children.
        let deleted: Vec<TwinId> = seen
            .lock()
            .iter()
            .filter(|c| c.kind == ChangeKind::Deleted)
            .filter_map(|c| c.twin_id)
            .collect();
        assert_eq!(deleted.len(), n + 5);
        let at = |id: &TwinId| deleted.iter().position(|d| d == id).unwrap();
        assert_eq!(at(&site), n + 4);
        assert!(at(&building) > at(&machines[n - 1]));
        assert!(sensors.iter().all(|s| at(s) < at(&machines[0])));
        reg.shutdown();
    }

    /// A big query over an unchanged type reads a segment of its twins (made by the second
    /// such query); any change after that is seen by the next query (which reads the map),
    /// and the segment made again after it holds the change.
    #[tokio::test]
    async fn a_query_after_a_change_sees_it_whether_or_not_a_segment_was_read() {
        let dir = tempfile::tempdir().unwrap();
        let (reg, _) = open(dir.path());
        let n = crate::registry::segment::MIN_TWINS + 100;
        let status = json!({"status": "operational"});
        let items = (0..n)
            .map(|_| machine(None, None, status.clone()))
            .collect();
        let out = reg.provision(items, false).await.unwrap();
        let mut ids: Vec<TwinId> = out.ids.into_iter().map(Option::unwrap).collect();
        ids.sort();
        // One machine has a child (a sensor): its JSON lists it, from a segment too.
        let sensor = NewTwin {
            entity_type: "sensor".into(),
            parent_id: Some(ids[5]),
            ..Default::default()
        };
        let sensor = reg.create(sensor).await.unwrap().id;
        let q: crate::registry::Query = serde_json::from_value(json!({
            "entity_type": "machine", "properties": {"status": "operational"}, "limit": 10_000}))
        .unwrap();
        let found = |reg: &Registry| -> Vec<TwinId> {
            reg.query(&q).unwrap().iter().map(|t| t.id).collect()
        };
        let twins = reg.inner.twins.clone();
        assert_eq!(found(&reg), ids);
        assert_eq!(twins.segment_bytes(), 0, "the first big query makes none");
        assert_eq!(found(&reg), ids);
        assert!(twins.segment_bytes() > 0, "the second makes one");
        // Served from the segment: the same twins, the same JSON as a decoded twin.
        let page = reg.query(&q).unwrap();
        for i in [5, 7] {
            assert_eq!(
                page.get(i).map(|t| t.twin()),
                Some(reg.get(&ids[i]).unwrap())
            );
        }
        assert_eq!(
            page.get(5).map(|t| t.children_ids.clone()),
            Some([sensor].into())
        );
        // A change: one machine stops, one is added, one is deleted.
        let stopped = ids[10];
        let upsert = machine(Some(stopped), None, json!({"status": "stopped"}));
        reg.provision(vec![upsert], true).await.unwrap();
        let added = reg
            .create(machine(None, None, status.clone()))
            .await
            .unwrap()
            .id;
        let deleted = ids[20];
        reg.delete(deleted, false).await.unwrap();
        let want: Vec<TwinId> = ids
            .iter()
            .copied()
            .filter(|id| *id != stopped && *id != deleted)
            .chain([added])
            .collect();
        assert_eq!(found(&reg), want);
        assert_eq!(twins.segment_bytes(), 0, "the stale segment is dropped");
        assert_eq!(found(&reg), want);
        assert!(twins.segment_bytes() > 0);
        assert_eq!(found(&reg), want, "read from the new segment");
        // A child added under a machine of the segment (a twin of another type): the
        // machine's JSON lists it at once.
        let child = NewTwin {
            entity_type: "sensor".into(),
            parent_id: Some(ids[6]),
            ..Default::default()
        };
        let child = reg.create(child).await.unwrap().id;
        let listed = |reg: &Registry| {
            let page = reg.query(&q).unwrap();
            page.get(6).map(|t| t.children_ids.clone())
        };
        assert_eq!(listed(&reg), Some([child].into()));
        assert_eq!(listed(&reg), Some([child].into()), "from a segment again");
        assert!(twins.segment_bytes() > 0);
        reg.shutdown();
    }

    /// Queries over more candidates than a page's scan budget: pages of every size give each
    /// match once, in id order, and a page that runs out of its budget first ends early with
    /// a cursor that goes on.
    #[tokio::test]
    async fn queries_page_through_many_candidates_in_order_within_the_budget() {
        use crate::registry::query::MAX_EXAMINED_PER_PAGE;
        let dir = tempfile::tempdir().unwrap();
        let (reg, _) = open(dir.path());
        let n = MAX_EXAMINED_PER_PAGE + 20_000;
        let items = (0..n)
            .map(|i| {
                let status = if i % 3 == 0 { "operational" } else { "idle" };
                machine(None, None, json!({"i": i, "status": status}))
            })
            .collect();
        let out = reg.provision(items, false).await.unwrap();
        let ids: Vec<TwinId> = out.ids.into_iter().map(Option::unwrap).collect();
        // Ids are v7: creation order is id order.
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(sorted, ids);
        let pages = |q: &mut crate::registry::Query| {
            let (mut all, mut sizes) = (Vec::new(), Vec::new());
            loop {
                let page = reg.query(q).unwrap();
                sizes.push(page.len());
                all.extend(page.iter().map(|t| t.id));
                match page.next_cursor {
                    Some(c) => q.cursor = Some(c),
                    None => return (all, sizes),
                }
            }
        };
        let operational: Vec<TwinId> = ids.iter().step_by(3).copied().collect();
        for limit in [1, 100, 1_500, 10_000] {
            let mut q: crate::registry::Query = serde_json::from_value(json!({
                "entity_type": "machine", "properties": {"status": "operational"},
                "limit": limit}))
            .unwrap();
            if limit == 1 {
                // One twin a page through 40K matches is slow: start near the end.
                q.cursor = Some(operational[operational.len() - 5].to_string());
                let (all, _) = pages(&mut q);
                assert_eq!(all, operational[operational.len() - 4..]);
                continue;
            }
            let (all, sizes) = pages(&mut q);
            assert_eq!(all, operational, "limit {limit}");
            assert!(sizes.iter().all(|&k| k <= limit));
        }
        // Matches only past the budget: the first page is empty and its cursor goes on.
        let mut q: crate::registry::Query = serde_json::from_value(json!({
            "entity_type": "machine", "limit": 50,
            "where": [{"property": "i", "op": ">=", "value": n - 10}]}))
        .unwrap();
        let first = reg.query(&q).unwrap();
        assert!(first.is_empty());
        assert_eq!(
            first.next_cursor.as_deref(),
            Some(ids[MAX_EXAMINED_PER_PAGE - 1].to_string().as_str())
        );
        let (all, _) = pages(&mut q);
        assert_eq!(all, ids[n - 10..]);
        reg.shutdown();
    }
}
