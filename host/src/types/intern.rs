//! The process-wide name interner: entity types, property names and node ids, each stored
//! once and named by a small number in every compact twin ([`super::compact`]).
//!
//! Reading a name by its number takes no lock (append-only chunks of write-once cells);
//! adding a name takes a mutex, and happens once per distinct name. The table is bounded
//! ([`MAX_INTERNED`]): past it a name is not interned and the compact form carries it inline.
//! Numbers are this process's own: what goes to disk carries names, never numbers.

use std::sync::{Arc, LazyLock, OnceLock};

use dashmap::DashMap;
use rustc_hash::FxBuildHasher;

/// Most names interned. Entity types, property names and node ids of one deployment are far
/// fewer; a client making up property names without end gets its later ones stored inline
/// (the table is never trimmed, so it must stay bounded).
pub const MAX_INTERNED: u32 = 100_000;

/// Size of the first chunk of cells; each next chunk is twice the size of the one before.
const FIRST_CHUNK: u32 = 1024;
/// Enough chunks for [`MAX_INTERNED`] names: 1024 · (2^7 − 1) = 130,048.
const CHUNKS: usize = 7;

/// A chunk of names, each cell set once.
type Chunk = Box<[OnceLock<Arc<str>>]>;

struct Interner {
    ids: DashMap<Arc<str>, u32, FxBuildHasher>,
    chunks: [OnceLock<Chunk>; CHUNKS],
    /// Held while a name is added (numbers are handed out in order).
    adding: parking_lot::Mutex<u32>,
}

static INTERNER: LazyLock<Interner> = LazyLock::new(|| Interner {
    ids: DashMap::with_hasher(FxBuildHasher),
    chunks: Default::default(),
    adding: parking_lot::Mutex::new(0),
});

/// Chunk and place in it of name number `id`.
fn slot(id: u32) -> (usize, usize) {
    let i = id + FIRST_CHUNK;
    let k = (31 - i.leading_zeros() - FIRST_CHUNK.trailing_zeros()) as usize;
    (k, (i - (FIRST_CHUNK << k)) as usize)
}

/// The number of `name`, interning it if there is room; `None` when the table is full.
pub fn intern(name: &str) -> Option<u32> {
    let it = &*INTERNER;
    if let Some(id) = it.ids.get(name) {
        return Some(*id);
    }
    let mut next = it.adding.lock();
    if let Some(id) = it.ids.get(name) {
        return Some(*id);
    }
    if *next >= MAX_INTERNED {
        return None;
    }
    let id = *next;
    let (k, at) = slot(id);
    let chunk = it.chunks[k].get_or_init(|| {
        (0..(FIRST_CHUNK << k) as usize)
            .map(|_| OnceLock::new())
            .collect()
    });
    let arc: Arc<str> = Arc::from(name);
    chunk[at]
        .set(arc.clone())
        .expect("each number is handed out once");
    it.ids.insert(arc, id);
    *next += 1;
    Some(id)
}

/// The number of `name` if it is interned already (never adds it).
pub fn lookup(name: &str) -> Option<u32> {
    INTERNER.ids.get(name).map(|id| *id)
}

/// The name numbered `id`; `None` for a number never handed out. Takes no lock.
pub fn name(id: u32) -> Option<&'static Arc<str>> {
    if id >= MAX_INTERNED {
        return None;
    }
    let (k, at) = slot(id);
    INTERNER.chunks[k].get()?.get(at)?.get()
}

/// `name` as a shared string: the interned one when there is room, else a copy of its own.
pub fn shared(name: &str) -> Arc<str> {
    match intern(name).and_then(self::name) {
        Some(n) => n.clone(),
        None => Arc::from(name),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_cover_every_number_once() {
        assert_eq!(slot(0), (0, 0));
        assert_eq!(slot(1023), (0, 1023));
        assert_eq!(slot(1024), (1, 0));
        assert_eq!(slot(3071), (1, 2047));
        assert_eq!(slot(3072), (2, 0));
        let (k, at) = slot(MAX_INTERNED - 1);
        assert!(k < CHUNKS && at < (FIRST_CHUNK << k) as usize);
    }

    #[test]
    fn a_name_keeps_its_number() {
        let a = intern("intern-test-a").unwrap();
        let b = intern("intern-test-b").unwrap();
        assert_ne!(a, b);
        assert_eq!(intern("intern-test-a"), Some(a));
        assert_eq!(lookup("intern-test-b"), Some(b));
        assert_eq!(name(a).map(|n| &**n), Some("intern-test-a"));
        assert!(Arc::ptr_eq(&shared("intern-test-a"), name(a).unwrap()));
        assert_eq!(name(MAX_INTERNED - 1), None);
    }
}
